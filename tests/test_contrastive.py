"""NT-Xent, ContrastiveAux (R-MAML_out-CL) and the batched augmentations.

The reference loss is written out with Python loops over float64 numbers (math.exp/log),
independently of the vectorised implementation.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_meta import RobustMetaUpdate, adapt
from robust_meta.augment import Augment, cutout, horizontal_flip, random_resized_crop, rotate
from robust_meta.contrastive import ContrastiveAux, nt_xent

# --------------------------------------------------------------------------- reference


def hand_nt_xent(views, tau):
    """Multi-view NT-Xent with explicit loops: views[v][b] is a list of floats."""
    V, B = len(views), len(views[0])

    def unit(u):
        n = math.sqrt(sum(c * c for c in u))
        return [c / n for c in u]

    emb = [(b, unit(views[v][b])) for v in range(V) for b in range(B)]

    def s(i, j):
        return sum(p * q for p, q in zip(emb[i][1], emb[j][1])) / tau

    total = 0.0
    for i in range(len(emb)):
        denom = sum(math.exp(s(i, k)) for k in range(len(emb)) if k != i)
        acc = 0.0
        for j in range(len(emb)):
            if j != i and emb[j][0] == emb[i][0]:
                acc += -math.log(math.exp(s(i, j)) / denom)
        total += acc / (V - 1)
    return total / len(emb)


def as_lists(t):
    return [[row.tolist() for row in view] for view in t]


@pytest.mark.parametrize("V,B,D", [(2, 3, 4), (3, 2, 3), (4, 3, 2)])
@pytest.mark.parametrize("tau", [0.1, 0.5, 2.0])
def test_nt_xent_matches_loop_formula(V, B, D, tau):
    z = torch.randn(V, B, D, dtype=torch.float64)
    got = nt_xent(z, temperature=tau)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(hand_nt_xent(as_lists(z), tau), rel=1e-12, abs=1e-12)
    # A list of views gives the same number.
    assert nt_xent(list(z), temperature=tau).item() == pytest.approx(got.item(), rel=1e-14)


def test_nt_xent_tiny_vectors_by_hand():
    # B = 1, V = 2, orthogonal unit vectors: the only other embedding is the positive,
    # so every anchor's log-probability is log(1) = 0.
    z = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
    assert nt_xent(z, temperature=0.5).item() == 0.0
    # B = 2, V = 2: x0=(1,0), x1=(0,1), positives identical. For each anchor:
    # s_pos = 1/τ, the two negatives have s = 0  ->  loss = -log(e^{1/τ} / (e^{1/τ} + 2)).
    tau = 0.5
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [0.0, 3.0]]], dtype=torch.float64)
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2.0))
    assert nt_xent(z, temperature=tau).item() == pytest.approx(expected, rel=1e-14)


def test_nt_xent_two_views_equals_simclr_cross_entropy():
    """Second implementation: SimCLR's usual 2B-way cross-entropy with the diagonal masked."""
    B, tau = 5, 0.3
    z = torch.randn(2, B, 7, dtype=torch.float64)
    h = F.normalize(torch.cat([z[0], z[1]]), dim=1)
    logits = h @ h.T / tau
    logits.fill_diagonal_(-1e9)
    labels = torch.cat([torch.arange(B, 2 * B), torch.arange(B)])
    ref = F.cross_entropy(logits, labels)
    assert nt_xent(z, temperature=tau).item() == pytest.approx(ref.item(), rel=1e-12)


def test_nt_xent_invariant_to_pair_permutation_not_to_mismatch():
    z = torch.randn(3, 6, 5, dtype=torch.float64)
    perm = torch.randperm(6)
    base = nt_xent(z, temperature=0.5)
    assert nt_xent(z[:, perm], temperature=0.5).item() == pytest.approx(base.item(), rel=1e-12)
    # Permuting one view only breaks the positive pairs: the loss changes.
    broken = z.clone()
    broken[1] = z[1, perm]
    assert abs(nt_xent(broken, temperature=0.5).item() - base.item()) > 1e-6


def test_nt_xent_uses_cosine_similarity():
    z = torch.randn(2, 4, 3, dtype=torch.float64)
    scale = torch.rand(2, 4, 1, dtype=torch.float64) * 10 + 0.1
    assert nt_xent(z * scale, temperature=0.7).item() == pytest.approx(nt_xent(z, temperature=0.7).item(), rel=1e-12)


def test_nt_xent_gradient_is_finite_and_pulls_positives_together():
    z = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    loss = nt_xent(z, temperature=0.5)
    (g,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    # A small gradient step lowers the loss.
    assert nt_xent(z.detach() - 0.01 * g, temperature=0.5) < loss


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan"), float("inf")])
def test_nt_xent_rejects_bad_temperature(tau):
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.randn(2, 3, 4), temperature=tau)


def test_nt_xent_rejects_bad_views():
    with pytest.raises(ValueError, match="at least 2 views"):
        nt_xent(torch.randn(1, 3, 4), temperature=0.5)
    with pytest.raises(ValueError, match="same shape"):
        nt_xent([torch.randn(3, 4), torch.randn(2, 4)], temperature=0.5)
    with pytest.raises(TypeError):
        nt_xent("views", temperature=0.5)


# --------------------------------------------------------------------------- ContrastiveAux


class Net(nn.Module):
    """Linear body (no batch norm: features are per-image) and a linear classifier."""

    def __init__(self, d_in=2 * 4 * 4, d=6, n=3):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(d_in, d), nn.Tanh())
        self.classifier = nn.Linear(d, n)

    def forward_features(self, x):
        return self.body(x)

    def forward_head(self, f):
        return self.classifier(f)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def invert(x):
    return 1.0 - x


def _feats(model, x, params=None):
    if params is None:
        return model.forward_features(x)
    return torch.func.functional_call(model.body, {k[5:]: v for k, v in params.items() if k.startswith("body.")}, (x,))


def test_aux_matches_three_view_hand_formula_with_adversarial_view():
    model = Net().double()
    x = torch.rand(4, 2, 4, 4, dtype=torch.float64)
    x_adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    aux = ContrastiveAux(model, weight=0.3, temperature=0.5, augment=invert)
    got = aux(model, None, x, x_adv)
    with torch.no_grad():
        views = [model.forward_features(v) for v in (x, invert(x), x_adv)]
    assert got.item() == pytest.approx(0.3 * hand_nt_xent(as_lists(views), 0.5), rel=1e-12)
    two = ContrastiveAux(model, weight=0.3, temperature=0.5, augment=invert, adversarial_view=False)
    assert two(model, None, x, x_adv).item() == pytest.approx(
        0.3 * hand_nt_xent(as_lists(views[:2]), 0.5), rel=1e-12)


def test_adversarial_view_is_a_positive_of_its_own_image():
    """x_adv = x (a perfect positive) scores lower than x_adv = another image's x."""
    model = Net(d=16).double()
    x = torch.rand(6, 2, 4, 4, dtype=torch.float64)
    aux = ContrastiveAux(model, weight=1.0, temperature=0.5, augment=invert)
    own = aux(model, None, x, x.clone())
    shifted = aux(model, None, x, x.roll(1, dims=0))
    assert own.item() < shifted.item()
    # x_adv = x: the third view equals the first, as in the 3-view formula.
    with torch.no_grad():
        f, ft = model.forward_features(x), model.forward_features(invert(x))
    assert own.item() == pytest.approx(hand_nt_xent(as_lists([f, ft, f]), 0.5), rel=1e-12)


def test_aux_uses_the_adapted_weights():
    model = Net().double()
    x = torch.rand(5, 2, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    fast = adapt(model, x, y, steps=2, step_size=0.5)
    aux = ContrastiveAux(model, weight=1.0, temperature=0.5, augment=invert)
    got = aux(model, fast, x, x)
    with torch.no_grad():
        views = [_feats(model, v, fast) for v in (x, invert(x), x)]
    assert got.item() == pytest.approx(hand_nt_xent(as_lists(views), 0.5), rel=1e-12)
    assert abs(got.item() - aux(model, None, x, x).item()) > 1e-8


def test_features_spec_by_name_callable_and_head_agree():
    torch.manual_seed(1)
    seq = nn.Sequential(nn.Flatten(), nn.Linear(32, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.rand(4, 2, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        views = [seq[:3](v) for v in (x, invert(x), x)]
    ref = hand_nt_xent(as_lists(views), 0.5)
    for kw in ({"head": "3"}, {"features": "2"}, {"features": lambda m, v, p: m[:3](v)}):
        aux = ContrastiveAux(seq, weight=1.0, augment=invert, **kw)
        assert aux(seq, None, x, x).item() == pytest.approx(ref, rel=1e-12), kw
    with pytest.raises(ValueError, match="no submodule"):
        ContrastiveAux(seq, head="classifier")


def test_projection_head_gets_meta_gradients_in_r_maml_out_cl():
    model = Net()
    aux = ContrastiveAux(model, weight=0.1, projection=4, augment=Augment(p_cutout=1.0))
    assert aux.projection_head[0].in_features == 6  # inferred from model.classifier
    robust = RobustMetaUpdate(F.cross_entropy, model, attack="fgsm", eps=0.05, gamma_out=0.2, aux=aux)
    xs, ys = torch.rand(3, 2, 4, 4), torch.tensor([0, 1, 2])
    xq, yq = torch.rand(6, 2, 4, 4), torch.tensor([0, 1, 2] * 2)
    fast = adapt(model, xs, ys, steps=1, step_size=0.1)
    loss = robust(xq, yq, params=fast)
    loss.backward()
    assert robust.last.aux_loss > 0
    for name, p in [*aux.named_parameters(), *model.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_lazy_projection_head_is_built_on_inputs_dtype_and_trained_by_an_earlier_optimizer():
    model = Net().double()
    aux = ContrastiveAux(weight=1.0, projection=3, augment=invert)  # no model: lazy in_dim
    opt = torch.optim.SGD(aux.parameters(), lr=0.5)
    x = torch.rand(4, 2, 4, 4, dtype=torch.float64)
    loss = aux(model, None, x, x)
    first = aux.projection_head[0]
    assert first.weight.dtype == torch.float64 and first.weight.shape == (12, 6)  # hidden = 4·projection
    before = first.weight.detach().clone()
    loss.backward()
    opt.step()
    assert not torch.equal(before, first.weight.detach())


def test_aux_validation():
    model = Net()
    x = torch.rand(2, 2, 4, 4)
    with pytest.raises(ValueError, match="weight"):
        ContrastiveAux(weight=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        ContrastiveAux(temperature=0)
    with pytest.raises(ValueError, match="projection"):
        ContrastiveAux(projection=0)
    with pytest.raises(ValueError, match="projection="):
        ContrastiveAux(in_dim=4)
    with pytest.raises(ValueError, match="adv_inputs"):
        ContrastiveAux()(model, None, x, None)
    with pytest.raises(ValueError, match="shape"):
        ContrastiveAux()(model, None, x, x[:1])


def test_eager_projection_head_on_other_dtype_is_a_clear_error():
    model = Net().double()
    aux = ContrastiveAux(model, projection=3, augment=invert)  # float32 head, in_dim from model
    x = torch.rand(2, 2, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"aux.to\(device, dtype\)"):
        aux(model, None, x, x)
    aux.double()
    assert torch.isfinite(aux(model, None, x, x))


def test_zero_weight_returns_zero_without_running_the_model():
    class Boom(Net):
        def forward_features(self, x):
            raise AssertionError("model was run")

    x = torch.rand(2, 2, 4, 4)
    out = ContrastiveAux(weight=0.0)(Boom(), None, x, x)
    assert out.item() == 0.0


# --------------------------------------------------------------------------- augmentations

TRANSFORMS = {
    "crop": random_resized_crop,
    "flip": horizontal_flip,
    "cutout": cutout,
    "rotate": rotate,
    "augment": Augment(p_rotate=0.5),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_augment_shape_range_dtype_and_diversity(name, dtype):
    f = TRANSFORMS[name]
    x = torch.rand(1, 3, 12, 10, dtype=dtype).repeat(16, 1, 1, 1)
    out = f(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == dtype
    assert out.min() >= 0 and out.max() <= 1
    # The same image in every row: per-image randomness makes the rows differ.
    flat = out.flatten(1)
    assert len({tuple(r.tolist()) for r in flat}) >= 2
    if name != "flip":  # a flip has only two outcomes
        assert len({tuple(r.tolist()) for r in flat}) >= 8


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_augment_deterministic_under_seeded_generator(name):
    f = TRANSFORMS[name]
    x = torch.rand(8, 1, 8, 8)
    a = f(x, generator=torch.Generator().manual_seed(3))
    b = f(x, generator=torch.Generator().manual_seed(3))
    c = f(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_augment_identity_and_exact_cases():
    x = torch.rand(4, 3, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(random_resized_crop(x, scale=(1, 1), ratio=(1, 1)), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(rotate(x, degrees=0), x, rtol=0, atol=1e-12)
    assert torch.equal(horizontal_flip(x, p=1.0), x.flip(-1))
    assert torch.equal(horizontal_flip(x, p=0.0), x)
    assert torch.equal(Augment(p_crop=0, p_flip=0, p_rotate=0, p_cutout=0)(x), x)
    # A 3x3 hole of grey in an all-white image: 4 (corner) to 9 grey pixels per channel.
    ones = torch.ones(32, 2, 8, 8)
    holes = (cutout(ones, size=3, fill=0.5) == 0.5).sum(dim=(2, 3))
    assert (holes[:, 0] == holes[:, 1]).all()  # the same square in every channel
    assert holes.min() >= 4 and holes.max() == 9
    assert set(cutout(ones, size=3).unique().tolist()) == {0.0, 1.0}


def test_crop_zooms_in_by_the_drawn_scale():
    """On a horizontal ramp (value j/(W-1) in column j), a square crop of area 1/4 (side 1/2)
    resized back is a ramp of half the slope wherever it samples inside the image."""
    W = 16
    ramp = (torch.arange(W, dtype=torch.float64) / (W - 1)).expand(32, 1, W, W).contiguous()
    out = random_resized_crop(ramp, scale=(0.25, 0.25), ratio=(1, 1), generator=torch.Generator().manual_seed(0))
    steps = out[..., W // 4 + 1 : 3 * W // 4] - out[..., W // 4 : 3 * W // 4 - 1]
    torch.testing.assert_close(steps, torch.full_like(steps, 0.5 / (W - 1)), rtol=0, atol=1e-9)
    # The crops lie at different places: the value at the centre differs across the batch.
    assert out[:, 0, W // 2, W // 2].unique().numel() > 16


@pytest.mark.parametrize("bad", [torch.rand(3, 8, 8), torch.rand(2, 1, 4, 4) * 2, torch.full((1, 1, 2, 2), float("nan"))])
def test_augment_rejects_bad_images(bad):
    with pytest.raises((ValueError, TypeError)):
        Augment()(bad)


def test_augment_rejects_bad_options():
    with pytest.raises(ValueError, match="p_flip"):
        Augment(p_flip=1.5)
    with pytest.raises(ValueError, match="scale"):
        Augment(scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="cutout_size"):
        Augment(cutout_size=2.5)
    with pytest.raises(ValueError, match="degrees"):
        rotate(torch.rand(1, 1, 4, 4), degrees=-3)
