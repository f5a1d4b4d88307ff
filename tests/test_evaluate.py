"""robust_meta.evaluation: SA/RA protocol, closed-form checks, CI, sanity warnings, export."""

from __future__ import annotations

import copy
import csv
import importlib
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_meta.anil import ANILHead
from robust_meta.attacks import PGDAttack
from robust_meta.data import Task
from robust_meta.evaluation import (
    EvalResult,
    EvalWarning,
    Metric,
    confidence_interval,
    evaluate,
    finetune,
    metric_name,
)

# The package re-exports the function ``evaluate``, which shadows the submodule attribute.
ev = importlib.import_module("robust_meta.evaluation")

# ----------------------------------------------------------------------------- helpers


class BiasOnly(nn.Module):
    """Logits = a learned bias; the input enters only with weight 0 (zero input gradient)."""

    def __init__(self, ways: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(ways))

    def forward(self, x):
        return self.bias.expand(x.shape[0], -1) + 0.0 * x.flatten(1).sum(1, keepdim=True)


class SmallNet(nn.Module):
    """Conv-BN-ReLU body + linear head with forward_features/forward_head (Conv4 in miniature)."""

    def __init__(self, ways: int = 3, hidden: int = 4, size: int = 8, softmax: bool = False, dropout: float = 0.0):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(dropout),
        )
        self.classifier = nn.Linear(hidden * (size // 2) ** 2, ways)
        self.softmax = softmax

    def forward_features(self, x):
        return self.features(x)

    def forward_head(self, f):
        return self.classifier(f)

    def forward(self, x):
        out = self.forward_head(self.forward_features(x))
        return out.softmax(dim=1) if self.softmax else out


def rand_task(ways=3, shots=2, queries=3, size=8, channels=1, lo=0.0, hi=1.0, dtype=torch.float32):
    sx = lo + (hi - lo) * torch.rand(ways * shots, channels, size, size, dtype=dtype)
    qx = lo + (hi - lo) * torch.rand(ways * queries, channels, size, size, dtype=dtype)
    sy = torch.arange(ways).repeat_interleave(shots)
    qy = torch.arange(ways).repeat_interleave(queries)
    return Task(sx, sy, qx, qy)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before, mode):
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"
    assert model.training == mode
    assert all(p.grad is None for p in model.parameters())


def run(model, tasks, **kw):
    kw.setdefault("progress", False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = evaluate(model, tasks, **kw)
    emitted = [str(w.message) for w in rec if issubclass(w.category, EvalWarning)]
    assert emitted == res.warnings  # every sanity message is both emitted and recorded
    return res


# ----------------------------------------------------------------------------- CI


def test_confidence_interval_matches_hand_formula():
    vals = [0.2, 0.4, 0.6, 1.0]
    # by hand: mean 0.55; squared deviations .1225 .0225 .0025 .2025 sum .35; s^2 = .35/3
    mean, ci = confidence_interval(vals)
    assert mean == pytest.approx(0.55, abs=1e-15)
    assert ci == pytest.approx(1.96 * math.sqrt(0.35 / 3) / 2, abs=1e-15)
    m = Metric.from_values(vals)
    assert m.std == pytest.approx(np.std(np.array(vals), ddof=1), abs=1e-15)  # second implementation
    assert m.n == 4 and m.values == vals
    one = Metric.from_values([0.3])
    assert one.mean == 0.3 and math.isnan(one.ci95) and math.isnan(one.std)
    with pytest.raises(ValueError, match="at least one"):
        confidence_interval([])
    with pytest.raises(ValueError, match="finite"):
        confidence_interval([0.1, float("nan")])


# ----------------------------------------------------------------------------- closed forms


def test_input_ignoring_model_has_ra_equal_sa_exactly():
    # Unbalanced queries so that SA is not the same on every task.
    tasks = []
    for q in ([0, 0, 0, 1, 2], [1, 1, 2, 0, 0], [2, 2, 2, 2, 1]):
        t = rand_task(ways=3, shots=1)
        tasks.append(Task(t.support_x, torch.tensor([0, 0, 1]), torch.rand(5, 1, 8, 8), torch.tensor(q)))
    model = BiasOnly(3)
    res = run(model, tasks, eps=[2 / 255, 8 / 255, 64 / 255], attacks=("pgd", "fgsm"), steps=3, step_size=0.5)
    sa = res.metrics["sa"].values
    # fine-tuning on support labels (0, 0, 1) makes class 0 the prediction everywhere
    assert sa == pytest.approx([3 / 5, 2 / 5, 0.0], abs=1e-12)
    for name, m in res.metrics.items():
        assert m.values == sa, name
    assert any("zero input gradient" in w for w in res.warnings)


def _linear_tasks(n_tasks, eps, d=16, n_query=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n_tasks):
        # keep x in [eps, 1 - eps]: the [0, 1] box never binds, so the worst case is a corner
        qx = eps + (1 - 2 * eps) * torch.rand(n_query, 1, 4, d // 4, generator=g)
        qy = torch.randint(0, 2, (n_query,), generator=g)
        tasks.append(Task(qx[:2], torch.tensor([0, 1]), qx, qy))
    return tasks


def test_linear_two_class_ra_matches_closed_form():
    sweep = [4 / 255, 8 / 255]
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():
        model[1].weight.normal_(0.0, 0.6)
        model[1].bias.normal_(0.0, 0.3)
    tasks = _linear_tasks(3, max(sweep))
    W = model[1].weight.detach().double().numpy()
    b = model[1].bias.detach().double().numpy()
    wd = W[0] - W[1]
    exp_sa, exp_ra, kinds = [], {e: [] for e in sweep}, set()
    for t in tasks:
        x = t.query_x.flatten(1).double().numpy()
        sign = np.where(t.query_y.numpy() == 0, 1.0, -1.0)
        margin = sign * (x @ wd + b[0] - b[1])  # logit of the label minus the other logit
        # min of the margin over the eps-ball (box inactive): margin - eps * ||w0 - w1||_1
        worst = {e: margin - e * np.abs(wd).sum() for e in sweep}
        keep = np.abs(margin) > 1e-3  # drop near-ties
        for w in worst.values():
            keep &= np.abs(w) > 1e-3
        t.query_x, t.query_y = t.query_x[torch.from_numpy(keep)], t.query_y[torch.from_numpy(keep)]
        assert keep.sum() >= 20
        exp_sa.append(float((margin[keep] > 0).mean()))
        for e in sweep:
            exp_ra[e].append(float((worst[e][keep] > 0).mean()))
        kinds |= {(bool(m > 0), bool(w > 0)) for m, w in zip(margin[keep], worst[8 / 255][keep])}
    # the data exercise all three cases: robust, flipped by the attack, wrong already
    assert kinds == {(True, True), (True, False), (False, False)}
    assert exp_ra[4 / 255] != exp_ra[8 / 255]
    # PGD-10 (random start, 10 steps of 2.5 eps / 10) and FGSM without random start both
    # reach the worst corner of a linear model; the FGSM-like instance's own eps (0.9) is
    # replaced by each eps of the sweep.
    attacks = {"pgd": "pgd", "fgsm_inst": PGDAttack(eps=0.9, alpha=0.9, steps=1, random_start=None)}
    res = run(model, tasks, eps=sweep, steps=0, attacks=attacks, attack_steps=10, seed=0)
    assert res.metrics["sa"].values == pytest.approx(exp_sa, abs=1e-12)
    for e in sweep:
        for label in attacks:
            assert res.metrics[metric_name(label, e)].values == pytest.approx(exp_ra[e], abs=1e-12)
    assert res.metrics["ra"].values == res.metrics["ra[pgd@4/255]"].values
    assert res.metrics["ra"].mean == pytest.approx(sum(exp_ra[4 / 255]) / 3, abs=1e-12)
    m = res.metrics["ra[pgd@8/255]"]
    assert m.ci95 == pytest.approx(1.96 * np.std(exp_ra[8 / 255], ddof=1) / math.sqrt(3), abs=1e-12)
    assert res.warnings == []  # negative control for the sanity checks


# ----------------------------------------------------------------------------- fine-tuning


def test_adversarial_finetuning_differs_and_has_exact_limits():
    torch.manual_seed(3)
    model = SmallNet()
    t = rand_task()
    kw = dict(steps=3, step_size=0.1)
    with torch.no_grad():
        s_ft = finetune(model, t.support_x, t.support_y, **kw)
        a_ft = finetune(model, t.support_x, t.support_y, mode="adversarial", eps=8 / 255, **kw)
        # eps = 0: loss + gamma * loss = (1 + gamma) * loss -> S-FT with step (1 + gamma) * alpha
        a0 = finetune(model, t.support_x, t.support_y, mode="adversarial", eps=0.0, gamma=1.0, **kw)
        s2 = finetune(model, t.support_x, t.support_y, steps=3, step_size=0.2)
        # AQ-style (adversarial loss only) at eps = 0 is S-FT
        aq0 = finetune(model, t.support_x, t.support_y, mode="adversarial", eps=0.0, gamma=math.inf, **kw)
    assert any(not torch.equal(s_ft[k], a_ft[k]) for k in s_ft)
    for k in s_ft:
        torch.testing.assert_close(a0[k], s2[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(aq0[k], s_ft[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="eps"):
        finetune(model, t.support_x, t.support_y, mode="adversarial", **kw)
    with pytest.raises(ValueError, match="unknown finetune mode"):
        finetune(model, t.support_x, t.support_y, mode="robust", **kw)


@pytest.mark.parametrize("mode", [True, False])
def test_sft_and_aft_leave_meta_model_untouched(mode):
    model = SmallNet(dropout=0.0)
    model.train(mode)
    before = snapshot(model)
    tasks = [rand_task() for _ in range(2)]
    s = run(model, tasks, eps=8 / 255, steps=2, step_size=0.1, attack_steps=3)
    assert_untouched(model, before, mode)
    a = run(model, tasks, eps=8 / 255, steps=2, step_size=0.1, attack_steps=3, finetune="adversarial")
    assert_untouched(model, before, mode)
    q = run(model, tasks, eps=8 / 255, steps=2, step_size=0.1, attack_steps=3, finetune="adversarial",
            finetune_gamma=math.inf, anil=ANILHead(model))
    assert_untouched(model, before, mode)
    assert s.settings["train_mode"] is mode and a.settings["finetune"] == "adversarial"
    assert q.settings["anil"] is not None


def test_anil_finetunes_the_head_only():
    model = SmallNet()
    t = rand_task()
    anil = ANILHead(model)
    for mode in ("standard", "adversarial"):
        with torch.no_grad():
            fast = finetune(model, t.support_x, t.support_y, steps=2, step_size=0.5, mode=mode,
                            eps=4 / 255, anil=anil)
        for k, v in model.named_parameters():
            if k.startswith("classifier."):
                assert not torch.equal(fast[k], v), (mode, k)
            else:
                assert torch.equal(fast[k], v), (mode, k)
    with pytest.raises(ValueError, match="ANILHead built on the model"):
        evaluate(SmallNet(), [t], eps=0.0, anil=anil, progress=False)


# ----------------------------------------------------------------------------- sweeps


def test_eps_sweep_is_monotone_and_eps0_is_sa():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 3))
    tasks = [rand_task() for _ in range(4)]
    sweep = [0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255]
    res = run(model, tasks, eps=sweep, steps=5, step_size=0.5, attack_steps=20, seed=0)
    eps, means, cis = res.curve()
    assert eps == sweep and len(cis) == len(sweep)
    assert all(a >= b for a, b in zip(means, means[1:])), means
    assert means[-1] < means[0]  # the attack does something
    assert res.metrics["ra[pgd@0/255]"].values == res.metrics["sa"].values
    assert res.metrics["ra"].values == res.metrics["ra[pgd@2/255]"].values  # first nonzero eps
    assert not [w for w in res.warnings if "rises" in w or "above SA" in w]
    # a sweep without 0 still starts its curve at (0, SA)
    res2 = run(model, tasks, eps=[8 / 255], steps=5, step_size=0.5, seed=0, checks=False)
    e2, m2, _ = res2.curve()
    assert e2 == [0.0, 8 / 255] and m2[0] == res2.metrics["sa"].mean


def test_same_seed_same_numbers_and_global_rng_restored():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    tasks = [rand_task() for _ in range(2)]
    state = torch.get_rng_state()
    r1 = run(model, tasks, eps=16 / 255, seed=5, checks=False)
    assert torch.equal(torch.get_rng_state(), state)
    r2 = run(model, tasks, eps=16 / 255, seed=5, checks=False)
    assert r1.metrics["ra"].values == r2.metrics["ra"].values


# ----------------------------------------------------------------------------- warnings


class HelpfulAttack(PGDAttack):
    """A fabricated 'attack' that moves inputs to lower the loss: RA > SA."""

    def __call__(self, images, labels):
        x = images.clone().detach().requires_grad_(True)
        loss = F.cross_entropy(self.model(x), labels)
        (g,) = torch.autograd.grad(loss, x)
        return (images - self.eps * g.sign()).clamp(0, 1).detach()


def test_warning_for_ra_above_sa_and_ra_rising_with_eps():
    eps = 8 / 255
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():
        model[1].weight.normal_(0.0, 0.6)
    tasks = _linear_tasks(3, 64 / 255)
    res = run(model, tasks, eps=[eps, 64 / 255], steps=0, attacks={"helpful": HelpfulAttack()})
    assert res.metrics["ra"].mean > res.metrics["sa"].mean
    assert any("above SA" in w for w in res.warnings)
    assert any("rises with ε" in w for w in res.warnings)


def test_warning_for_probability_outputs():
    model = SmallNet(softmax=True).eval()
    res = run(model, [rand_task()], eps=2 / 255, steps=1, attack_steps=2)
    assert any("probabilities" in w for w in res.warnings)
    plain = run(SmallNet().eval(), [rand_task()], eps=2 / 255, steps=1, attack_steps=2)
    assert not any("probabilities" in w for w in plain.warnings)


def test_warning_for_nondeterministic_model():
    model = SmallNet(dropout=0.5).train()
    res = run(model, [rand_task()], eps=2 / 255, steps=1, attack_steps=2)
    assert any("not deterministic" in w for w in res.warnings)
    # the same net in eval mode (dropout off) is deterministic
    res = run(model, [rand_task()], eps=2 / 255, steps=1, attack_steps=2, train_mode=False)
    assert not any("not deterministic" in w for w in res.warnings)


def test_warning_when_stronger_attack_scores_higher():
    def metric(v):
        return Metric.from_values(v)

    table = [("fgsm", "fgsm"), ("pgd", "pgd")]
    e = 8 / 255
    metrics = {"sa": metric([0.9, 0.8, 0.9]), metric_name("fgsm", e): metric([0.2, 0.1, 0.2]),
               metric_name("pgd", e): metric([0.6, 0.5, 0.6])}
    msgs = ev._metric_checks(metrics, table, [e])
    assert any("stronger attack 'pgd'" in m for m in msgs)
    metrics[metric_name("pgd", e)] = metric([0.2, 0.1, 0.15])
    assert ev._metric_checks(metrics, table, [e]) == []


# ----------------------------------------------------------------------------- plumbing


def test_task_formats_max_tasks_and_dtype():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).double()
    tasks = [rand_task() for _ in range(3)]  # float32 tasks, float64 model: cast to the model
    ref = run(model, tasks, eps=4 / 255, seed=0, checks=False)
    batch = {"train": (torch.stack([t.support_x for t in tasks]), torch.stack([t.support_y for t in tasks])),
             "test": (torch.stack([t.query_x for t in tasks]), torch.stack([t.query_y for t in tasks]))}
    from_dict = run(model, batch, eps=4 / 255, seed=0, checks=False)
    tuples = run(model, [(t.support_x, t.support_y, t.query_x, t.query_y) for t in tasks], eps=4 / 255,
                 seed=0, checks=False)
    assert from_dict.metrics["ra"].values == ref.metrics["ra"].values == tuples.metrics["ra"].values
    assert ref.settings["dtype"] == "torch.float64" and ref.settings["n_tasks"] == 3
    two = run(model, iter(tasks), eps=4 / 255, seed=0, checks=False, max_tasks=2)
    assert two.metrics["sa"].n == 2 and two.metrics["sa"].values == ref.metrics["sa"].values[:2]


def test_perturb_gets_fast_weights_ways_and_mode(monkeypatch):
    from robust_meta import _eval_tasks  # evaluate's per-task work calls perturb from there

    calls = []
    real = _eval_tasks.perturb

    def spy(*args, **kw):
        calls.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(_eval_tasks, "perturb", spy)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    res = run(model, [rand_task(ways=3)], eps=[0.0, 4 / 255], steps=2, step_size=0.5, attack_steps=7,
              attack_step_size=0.001, train_mode=False, checks=False)
    assert len(calls) == 2
    for kw in calls:
        assert kw["n_classes"] == 3 and kw["training"] is False
        assert kw["steps"] == 7 and kw["step_size"] == 0.001
        assert not torch.equal(kw["params"]["1.weight"], model[1].weight)  # fine-tuned weights
    assert res.settings["attack_steps"] == 7


def test_validation_errors():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    t = [rand_task()]
    with pytest.raises(ValueError, match="8/255"):
        evaluate(model, t, eps=8, progress=False)
    with pytest.raises(ValueError, match="unknown attack 'pgdd'"):
        evaluate(model, t, eps=0.1, attacks="pgdd", progress=False)
    with pytest.raises(ValueError, match="unknown finetune"):
        evaluate(model, t, eps=0.1, finetune="aft", progress=False)
    with pytest.raises(ValueError, match="duplicate attack labels"):
        evaluate(model, t, eps=0.1, attacks=("pgd", "PGD"), progress=False)
    with pytest.raises(ValueError, match="repeat"):
        evaluate(model, t, eps=[0.1, 0.1], progress=False)
    with pytest.raises(ValueError, match="no tasks"):
        evaluate(model, [], eps=0.1, progress=False)
    with pytest.raises(ValueError, match="finetune_eps"):
        evaluate(model, t, eps=0.0, finetune="adversarial", progress=False)
    with pytest.raises(TypeError, match="attack"):
        evaluate(model, t, eps=0.1, attacks=[42], progress=False)
    with pytest.raises(TypeError, match="model"):
        evaluate("net", t, eps=0.1, progress=False)


def test_json_and_csv_round_trip(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    res = run(model, [rand_task() for _ in range(3)], eps=[0.0, 4 / 255], attacks=("pgd", "fgsm"), seed=0)
    back = EvalResult.from_json(res.to_json(tmp_path / "r.json"))
    assert list(back.metrics) == list(res.metrics)
    for k, m in res.metrics.items():
        assert back.metrics[k] == m
    assert back.settings["eps"] == res.settings["eps"] and back.warnings == res.warnings
    assert back.curve("fgsm") == res.curve("fgsm")
    path = res.to_csv(tmp_path / "r.csv")
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and [r["task"] for r in rows] == ["0", "1", "2"]
    assert [float(r["ra[fgsm@4/255]"]) for r in rows] == res.metrics["ra[fgsm@4/255]"].values
    back = EvalResult.from_csv(path)
    assert {k: m.values for k, m in back.metrics.items()} == {k: m.values for k, m in res.metrics.items()}
    assert back.curve("pgd") == res.curve("pgd")
    text = res.table()
    assert all(k in text for k in res.metrics) and f"{100 * res.metrics['sa'].mean:.2f}" in text
    with pytest.raises(KeyError, match="unknown attack"):
        res.curve("apgd")


def test_conv4_runs_in_train_mode_untouched():
    """The paper's protocol on the project's Conv4 (local stand-in if models.py is missing)."""
    try:
        from robust_meta.models import Conv4
        model = Conv4(1, 3, 8, image_size=16)
    except ImportError:  # pragma: no cover - models.py is another helper's file
        model = copy.deepcopy(SmallNet(hidden=8, size=16))
    model.train()
    before = snapshot(model)
    tasks = [rand_task(size=16) for _ in range(2)]
    res = run(model, tasks, eps=[0.0, 2 / 255], steps=2, step_size=0.01, attack_steps=3, seed=0)
    assert_untouched(model, before, True)
    assert 0.0 <= res.metrics["ra"].mean <= 1.0
    assert res.metrics["ra[pgd@0/255]"].values == res.metrics["sa"].values
