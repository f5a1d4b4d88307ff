"""robust_meta.visualize: feature inversion (IAM), image grids, RA-vs-ε figures."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

from robust_meta.adapt import adapt
from robust_meta.evaluation import EvalResult, Metric, metric_name
from robust_meta.params import call_features
from robust_meta.visualize import feature_inversion, plot_ra_vs_eps, save_image_grid

pytest.importorskip("matplotlib")


class Net(nn.Module):
    def __init__(self, channels: int = 1, size: int = 8, hidden: int = 6, ways: int = 3):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.LeakyReLU(0.1),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.classifier = nn.Linear(hidden * 4, ways)

    def forward_features(self, x):
        return self.body(x)

    def forward_head(self, f):
        return self.classifier(f)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def act(model, x, neuron, params=None):
    with torch.no_grad():
        return call_features(model, x, params)[:, neuron]


def test_iam_increases_the_chosen_activation_and_stays_in_the_box():
    model = Net().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seeds = torch.rand(4, 1, 8, 8)
    out = feature_inversion(model, seeds, neuron=5, steps=30, step_size=0.5)
    assert out.shape == seeds.shape and out.dtype == seeds.dtype and not out.requires_grad
    assert out.min() >= 0 and out.max() <= 1
    assert (act(model, out, 5) > act(model, seeds, 5) + 1e-3).all()
    assert not torch.equal(out, seeds)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())
    # steps=0 returns the seeds
    assert torch.equal(feature_inversion(model, seeds, neuron=5, steps=0), seeds)


def test_iam_per_image_neurons_and_module_features():
    model = Net().eval()
    seeds = torch.rand(3, 1, 8, 8)
    neurons = [0, 7, 20]
    out = feature_inversion(model, seeds, neuron=neurons, steps=20, step_size=0.5)
    feats0 = call_features(model, seeds).detach()
    feats1 = call_features(model, out).detach()
    for i, n in enumerate(neurons):
        assert feats1[i, n] > feats0[i, n]
    # the same representation named by module ("body") gives the same maps
    by_name = feature_inversion(model, seeds, neuron=neurons, steps=20, step_size=0.5, features="body")
    torch.testing.assert_close(by_name, out)
    with pytest.raises(ValueError, match="one per image"):
        feature_inversion(model, seeds, neuron=[1, 2])
    with pytest.raises(ValueError, match="out of range"):
        feature_inversion(model, seeds, neuron=24, steps=1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        feature_inversion(model, seeds * 3, neuron=1)
    with pytest.raises(TypeError, match="neuron"):
        feature_inversion(model, seeds, neuron=1.5)


def test_iam_after_finetuning_uses_the_fast_weights():
    model = Net().train()
    sx, sy = torch.rand(6, 1, 8, 8), torch.arange(3).repeat(2)
    with torch.no_grad():
        fast = adapt(model, sx, sy, steps=5, step_size=0.5)
    assert not torch.equal(fast["body.0.weight"], model.body[0].weight)  # the body moved
    seeds = torch.rand(2, 1, 8, 8)
    before = feature_inversion(model, seeds, neuron=3, steps=15, step_size=0.3)
    after = feature_inversion(model, seeds, neuron=3, params=fast, steps=15, step_size=0.3)
    assert not torch.allclose(before, after)
    # second route: a copy of the model holding the fast weights, inverted at its own weights
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for k, p in twin.named_parameters():
            p.copy_(fast[k])
    torch.testing.assert_close(feature_inversion(twin, seeds, neuron=3, steps=15, step_size=0.3), after)
    assert model.training  # mode untouched


def _png_size(path):
    from matplotlib.image import imread

    return imread(path).shape


def test_image_grid_written(tmp_path):
    seeds = torch.rand(4, 3, 8, 8)
    rows = {"seed": seeds, "IAM before": seeds.flip(0), "IAM after": seeds[:2]}
    path = save_image_grid(rows, tmp_path / "grid")
    assert path.suffix == ".png" and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w, _ = _png_size(path)
    assert w > h  # 4 columns, 3 rows
    gray = save_image_grid([torch.rand(2, 1, 8, 8)], tmp_path / "g.png")
    assert gray.stat().st_size > 0
    with pytest.raises(ValueError, match="empty"):
        save_image_grid({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="channels"):
        save_image_grid([torch.rand(2, 2, 8, 8)], tmp_path / "x.png")


def _result(means):
    eps = [0.0, 2 / 255, 4 / 255]
    metrics = {"sa": Metric.from_values(means[0])}
    for e, v in zip(eps, means):
        metrics[metric_name("pgd", e)] = Metric.from_values(v)
    return EvalResult(metrics, {"attacks": ["pgd"], "eps": eps})


def test_plot_ra_vs_eps_writes_png_and_svg(tmp_path):
    results = {
        "MAML": _result([[0.5, 0.6], [0.1, 0.2], [0.0, 0.05]]),
        "R-MAML_out": _result([[0.45, 0.55], [0.3, 0.35], [0.2, 0.25]]),
        "given curve": ([0.0, 4 / 255, 2 / 255], [0.5, 0.3, 0.4], [0.02, float("nan"), 0.02]),
    }
    png, svg = plot_ra_vs_eps(results, tmp_path / "ra_vs_eps", title="5-way 1-shot")
    assert png.suffix == ".png" and svg.suffix == ".svg"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    text = svg.read_text()
    assert "<svg" in text and "R-MAML_out" in text
    out = plot_ra_vs_eps({"m": results["MAML"]}, tmp_path / "fig.svg")
    assert [p.name for p in out] == ["fig.png", "fig.svg"] and all(p.stat().st_size > 0 for p in out)
    with pytest.raises(ValueError, match="non-empty"):
        plot_ra_vs_eps({}, tmp_path / "x")
    with pytest.raises(TypeError, match="EvalResult"):
        plot_ra_vs_eps({"bad": 3}, tmp_path / "x")


def test_missing_matplotlib_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        save_image_grid([torch.rand(1, 1, 4, 4)], tmp_path / "x.png")


def _conv4(trained_stats: bool, seed: int):
    from robust_meta.models import Conv4

    torch.manual_seed(seed)
    model = Conv4(in_channels=1, n_classes=5, hidden=8, image_size=28)
    if trained_stats:  # running statistics and weights moved away from their initial values
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
            model.train()
            for _ in range(20):
                model(torch.rand(16, 1, 28, 28) ** 2)
    return model.train()  # train mode, as models from model_from_checkpoint are


def _activation(model, x, neuron, batch_stats):
    prev = model.training
    state = copy.deepcopy(model.state_dict())
    model.train(batch_stats)
    try:
        with torch.no_grad():
            return call_features(model, x).flatten(1)[torch.arange(len(x)), neuron]
    finally:
        model.train(prev)
        model.load_state_dict(state)


@pytest.mark.parametrize("trained_stats", [False, True], ids=["fresh-bn", "trained-bn"])
@pytest.mark.parametrize("mode", ["eval", "train", "model"])
def test_iam_never_returns_an_image_below_its_seed(mode, trained_stats):
    """Measured the way it is returned (eval: running stats; train: the returned batch), no
    image ends below its seed, on Conv4s in train mode over several seeds (issue 12)."""
    gains = []
    for seed in range(3):
        model = _conv4(trained_stats, seed)
        before = copy.deepcopy(model.state_dict())
        g = torch.Generator().manual_seed(100 + seed)
        seeds = torch.rand(8, 1, 28, 28, generator=g)
        neuron = torch.randint(0, 8, (8,), generator=g).tolist()
        out = feature_inversion(model, seeds, neuron=neuron, steps=25, step_size=1.0, mode=mode)
        batch_stats = mode != "eval"  # "model": the model is in train mode
        gain = _activation(model, out, neuron, batch_stats) - _activation(model, seeds, neuron, batch_stats)
        gains.append(gain)
        assert (gain >= 0).all(), (seed, gain)
        assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    gains = torch.cat(gains)
    print(f"IAM mode={mode} {'trained' if trained_stats else 'fresh'} BN: min gain {gains.min():.4f}, "
          f"median {gains.median():.4f}, improved {(gains > 0).float().mean():.0%}")
    assert (gains > 0).float().mean() >= 0.5  # and the ascent does its job


def test_iam_training_argument_is_deprecated():
    model = Net().train()
    seeds = torch.rand(2, 1, 8, 8)
    with pytest.warns(DeprecationWarning, match="mode='train'"):
        old = feature_inversion(model, seeds, neuron=1, steps=3, training=True)
    torch.testing.assert_close(old, feature_inversion(model, seeds, neuron=1, steps=3, mode="train"))
    with pytest.raises(ValueError, match="mode must be"):
        feature_inversion(model, seeds, neuron=1, mode="batch")
