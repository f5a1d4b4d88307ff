"""Backbones: shapes, feature/head split, functional_call, normalisation, 2nd-order grads."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from robust_meta.adapt import adapt
from robust_meta.models import MODELS, Conv4, Normalize, ResNet12, ResNet18, build_model
from robust_meta.params import call_features, call_model, named_params


def small(name: str, in_channels: int, size: int, n_classes: int = 3):
    kw = {"conv4": {"hidden": 4}, "resnet12": {"widths": (4, 4, 6, 6)}, "resnet18": {"width": 2}}[name]
    return build_model(name, in_channels=in_channels, n_classes=n_classes, image_size=size, **kw)


CASES = [(1, 8), (1, 28), (3, 32), (3, 84)]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("channels,size", CASES)
def test_shapes_for_sizes_and_channels(name, channels, size):
    model = small(name, channels, size)
    x = torch.rand(4, channels, size, size)
    feats = model.forward_features(x)
    assert feats.shape == (4, model.feature_dim)
    assert model(x).shape == (4, 3)
    assert isinstance(model.classifier, torch.nn.Linear)
    assert model.classifier.in_features == model.feature_dim


@pytest.mark.parametrize(
    "size,hidden,expected",
    # 84 -> 42 -> 21 -> 10 -> 5; 28 -> 14 -> 7 -> 3 -> 1; 32 -> ... -> 2; 8 -> 4 -> 2 -> 1 -> 1 (no pool)
    [(84, 64, 64 * 5 * 5), (84, 32, 32 * 25), (28, 64, 64), (32, 64, 64 * 2 * 2), (8, 64, 64), (1, 5, 5)],
)
def test_conv4_feature_dim_by_hand(size, hidden, expected):
    model = Conv4(1, 2, hidden, image_size=size)
    assert model.feature_dim == expected
    assert model.forward_features(torch.rand(2, 1, size, size)).shape == (2, expected)


def test_resnet_widths_and_stems():
    assert ResNet12(3, 5, widths=(4, 5, 6, 7)).feature_dim == 7
    assert ResNet18(3, 5, width=3).feature_dim == 24
    assert isinstance(ResNet18(3, 5, width=2, image_size=84).features[3], torch.nn.MaxPool2d)  # ImageNet stem
    assert ResNet18(3, 5, width=2, image_size=32).features[0].kernel_size == (3, 3)  # CIFAR stem
    # the standard sizes (parameter counts of the published architectures, with a 5-way head)
    assert sum(p.numel() for p in ResNet18(3, 5).features.parameters()) == 11_176_512
    assert sum(p.numel() for p in ResNet12(3, 5).features.parameters()) == 12_424_320


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("train", [True, False])
def test_forward_is_head_of_features(name, train):
    model = small(name, 3, 16).train(train)
    x = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), model.forward_head(model.forward_features(x)))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("train", [True, False])
def test_functional_call_with_own_params_equals_forward(name, train):
    model = small(name, 1, 12).double().train(train)
    if not train:  # give the running statistics non-trivial values first
        model.train()
        with torch.no_grad():
            model(torch.rand(6, 1, 12, 12, dtype=torch.float64))
        model.eval()
    x = torch.rand(6, 1, 12, 12, dtype=torch.float64)
    params = dict(named_params(model))
    with torch.no_grad():
        plain = model(x)
        torch.testing.assert_close(torch.func.functional_call(model, params, (x,)), plain, rtol=0, atol=0)
        torch.testing.assert_close(call_model(model, x, params), plain, rtol=0, atol=0)
        torch.testing.assert_close(call_features(model, x, params), model.forward_features(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_functional_call_with_other_weights_equals_a_copy_holding_them(name):
    model = small(name, 3, 10).double().train()
    x = torch.rand(6, 3, 10, 10, dtype=torch.float64)
    other = {k: v.detach() + 0.05 * torch.randn_like(v) for k, v in named_params(model).items()}
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for k, v in twin.named_parameters():
            v.copy_(other[k])
        torch.testing.assert_close(call_model(model, x, other), twin(x), rtol=0, atol=0)
        assert not torch.allclose(call_model(model, x, other), model(x))


def test_normalize_inside_equals_normalizing_outside():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    torch.manual_seed(1)
    inside = Conv4(3, 4, 4, image_size=12, normalize=(mean, std))
    torch.manual_seed(1)
    outside = Conv4(3, 4, 4, image_size=12)
    x = torch.rand(3, 3, 12, 12)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(inside(x), outside((x - m) / s))
        assert not torch.allclose(inside(x), outside(x))
    # the constants are not parameters (nothing to meta-learn) and follow .double()
    assert not any("normalize" in n for n in named_params(inside))
    assert inside.double()(x.double()).dtype == torch.float64
    # one value broadcasts to every channel
    one = Normalize(0.5, 0.25, channels=3)
    torch.testing.assert_close(one(x), (x - 0.5) / 0.25)


def test_normalize_validation():
    with pytest.raises(ValueError, match="in_channels=3"):
        Conv4(3, normalize=((0.5, 0.5), (0.2, 0.2)))
    with pytest.raises(ValueError, match="std must be > 0"):
        Conv4(1, normalize=(0.5, 0.0))
    with pytest.raises(TypeError, match="normalize"):
        Conv4(1, normalize=0.5)


@pytest.mark.parametrize("name,h", [("conv4", 1e-6), ("resnet12", 1e-7), ("resnet18", None)])
def test_second_order_meta_gradient_matches_finite_differences(name, h):
    """d/dt L_query(adapt(θ + t·v)) at t = 0: autograd (2nd order, through BN) vs central FD.

    The tiny ResNet-18 (width 2, dead channels renormalised by BN) is too curved for a finite
    difference to converge at float64 resolution; there the gradient is only checked to be
    finite and different from the first-order one.
    """
    torch.manual_seed(0)
    model = small(name, 1, 8).double().train()
    sx, sy = torch.rand(6, 1, 8, 8, dtype=torch.float64), torch.arange(6) % 3
    qx, qy = torch.rand(6, 1, 8, 8, dtype=torch.float64), torch.arange(6) % 3
    theta = named_params(model)
    v = {k: torch.randn_like(p) for k, p in theta.items()}

    def query_loss(start, first_order=False):
        fast = adapt(model, sx, sy, steps=2, step_size=0.1, params=start, first_order=first_order)
        return F.cross_entropy(call_model(model, qx, fast), qy)

    loss = query_loss(theta)
    grads = torch.autograd.grad(loss, list(theta.values()))
    directional = sum((g * v[k]).sum() for g, k in zip(grads, theta))
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    if h is not None:
        up = {k: (p + h * v[k]).detach().requires_grad_() for k, p in theta.items()}
        down = {k: (p - h * v[k]).detach().requires_grad_() for k, p in theta.items()}
        fd = (query_loss(up).detach() - query_loss(down).detach()) / (2 * h)
        torch.testing.assert_close(directional.detach(), fd, rtol=1e-6, atol=1e-8)

    fo = torch.autograd.grad(query_loss(theta, first_order=True), list(theta.values()))
    fo_dir = sum((g * v[k]).sum() for g, k in zip(fo, theta))
    assert abs(float(fo_dir - directional)) > 1e-6  # the second-order terms are really there


def test_batchnorm_modes():
    x = torch.rand(6, 1, 8, 8) * 3 + 1
    tracked = Conv4(1, 3, 4, image_size=8, track_running_stats=True)
    with torch.no_grad():
        train_out = tracked.train()(x)
        assert not torch.allclose(tracked.eval()(x), train_out)  # running stats in eval mode
    transductive = Conv4(1, 3, 4, image_size=8, track_running_stats=False)
    assert not any(b is not None and b.numel() for b in transductive.buffers())
    with torch.no_grad():
        torch.testing.assert_close(transductive.eval()(x), transductive.train()(x))


def test_input_validation():
    model = Conv4(3, 5, 4, image_size=16)
    with pytest.raises(ValueError, match="in_channels=3"):
        model(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="image_size"):
        model(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="hidden must be >= 1"):
        Conv4(3, 5, 0)
    with pytest.raises(TypeError, match="n_classes must be an int"):
        Conv4(3, 5.0)
    with pytest.raises(ValueError, match="4 channel counts"):
        ResNet12(3, 5, widths=(4, 4))


def test_build_model():
    assert isinstance(build_model("Conv4", in_channels=1, n_classes=2, image_size=8, hidden=3), Conv4)
    assert isinstance(build_model("resnet-12", widths=(2, 2, 2, 2)), ResNet12)
    assert isinstance(build_model("ResNet_18", width=2, image_size=32), ResNet18)
    assert isinstance(build_model(Conv4, hidden=2, image_size=8), Conv4)
    with pytest.raises(ValueError, match="unknown model 'resnet50'; choose from conv4, resnet12, resnet18"):
        build_model("resnet50")
    with pytest.raises(TypeError, match="string or an nn.Module class"):
        build_model(3)
    with pytest.raises(TypeError):
        build_model("conv4", hiden=3)  # typo in a keyword is not swallowed
