"""Issue 17 ("numbers you can trust, II"): the seams of the attack layer, the fast paths and the
workers. Each test names the defect it guards; each failed on the code before the fix."""

import math
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robust_meta as rm
from robust_meta.attacks import linf_pgd, perturb
from robust_meta.data import Task
from robust_meta.evaluation import EvalWarning

# Names new in this release are imported inside the tests, so that on the previous code each
# test fails on its own (and says why) instead of the whole file failing to import.

ROOT = Path(__file__).resolve().parents[1]


def colour_tasks(n: int, *, size: int = 32, ways: int = 3, seed: int = 0) -> list[Task]:
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        sy = torch.arange(ways)
        qy = torch.arange(ways).repeat(2)
        out.append(Task(torch.rand(ways, 3, size, size, generator=g), sy,
                        torch.rand(2 * ways, 3, size, size, generator=g), qy))
    return out


def gray_tasks(n: int, *, ways: int = 3, size: int = 8, seed: int = 0) -> list[Task]:
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        out.append(Task(torch.rand(ways, 1, size, size, generator=g), torch.arange(ways),
                        torch.rand(3 * ways, 1, size, size, generator=g), torch.arange(ways).repeat(3)))
    return out


class ViewNet(nn.Module):
    """The MAML reference code's flatten: ``x.view(x.size(0), -1)`` (needs contiguous memory)."""

    def __init__(self, ways: int = 3, size: int = 32):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * (size // 4) ** 2, ways)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 4)
        return self.fc(x.view(x.size(0), -1))


class StrideNet(ViewNet):
    """Reads raw memory order: silently computes something else on channels_last inputs."""

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 4)  # keeps the input's memory format
        flat = torch.as_strided(x, (x.size(0), x[0].numel()), (x.stride(0), 1))
        return self.fc(flat)


def small_gray_net(ways: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, ways))


EVAL = dict(eps=8 / 255, steps=2, step_size=0.1, attack_steps=3, progress=False, seed=0, compile=False)


# ------------------------------------------------------------------ defect 1: channels_last
@pytest.mark.parametrize("cls", [ViewNet, StrideNet], ids=["view-fails", "strides-differ"])
def test_channels_last_auto_never_breaks_or_changes_a_working_model(cls):
    from robust_meta.fast import LayoutWarning
    torch.manual_seed(0)
    model = cls()
    tasks = colour_tasks(2)
    plain = rm.evaluate(model, tasks, channels_last=False, **EVAL)
    with pytest.warns(LayoutWarning, match="channels_last=False"):
        auto = rm.evaluate(model, tasks, **EVAL)  # the default: channels_last="auto"
    for k in plain.metrics:
        assert auto.metrics[k].values == plain.metrics[k].values, k


def test_a_model_that_accepts_channels_last_still_gets_it():
    from robust_meta.fast import LayoutWarning
    torch.manual_seed(0)
    model = rm.Conv4(3, 3, hidden=4, image_size=32)
    seen = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LayoutWarning)
        rm.evaluate(model, colour_tasks(1), **EVAL)
    assert seen and all(seen[2:])  # after the one-time check (contiguous + channels_last)


# ------------------------------------------------------------------ defect 3: step size follows ε
def test_a_pgd_instance_built_at_another_eps_attacks_like_pgd_at_the_new_eps():
    model = small_gray_net()
    tasks = gray_tasks(4)
    kw = dict(EVAL, eps=[4 / 255, 16 / 255])
    named = rm.evaluate(model, tasks, attacks={"pgd": "pgd"}, **kw)
    inst = rm.evaluate(model, tasks, attacks={"pgd": rm.PGDAttack(eps=2 / 255, steps=3)}, **kw)
    for k in named.metrics:
        assert inst.metrics[k].values == named.metrics[k].values, k
    spec = rm.PGDAttack(eps=2 / 255, steps=10)
    assert spec.alpha == pytest.approx(0.5 / 255) and spec.retarget(None, 8 / 255).alpha == pytest.approx(2 / 255)
    fixed = rm.PGDAttack(eps=2 / 255, alpha=0.5 / 255, steps=10)
    assert fixed.retarget(None, 8 / 255).alpha == pytest.approx(0.5 / 255)  # explicit: kept


def test_an_attack_that_cannot_travel_eps_is_flagged_wherever_it_comes_from():
    from robust_meta.attacks import attack_reach
    model = small_gray_net()
    short = rm.PGDAttack(eps=2 / 255, alpha=0.5 / 255, steps=10)  # reach 5/255
    assert attack_reach(short, 8 / 255) == pytest.approx(5 / 255)
    assert attack_reach("pgd", 8 / 255, steps=10) == pytest.approx(20 / 255)
    assert attack_reach("pgd", 8 / 255, steps=10, step_size=0.5 / 255) == pytest.approx(5 / 255)
    assert attack_reach("fgsm", 8 / 255) == pytest.approx(10 / 255)
    with pytest.warns(EvalWarning, match="cannot reach the edge"):
        res = rm.evaluate(model, gray_tasks(2), attacks={"short": short}, **EVAL)
    assert any("'short'" in w and "8/255" in w for w in res.warnings)
    with pytest.warns(EvalWarning, match="cannot reach"):
        res = rm.evaluate(model, gray_tasks(2), attack_step_size=0.5 / 255, **EVAL)
    with pytest.warns(EvalWarning, match="A-FT"):
        rm.evaluate(model, gray_tasks(1), finetune="adversarial",
                    finetune_attack=rm.PGDAttack(eps=8 / 255, alpha=0.5 / 255, steps=10), **EVAL)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvalWarning)
        res = rm.evaluate(model, gray_tasks(1), attacks=("pgd", "fgsm"), checks=True,
                          **{**EVAL, "eps": 1e-6})  # nothing to flag
    assert not any("reach" in w for w in res.warnings)


# ------------------------------------------------------------------ defect 4: the attack's generator
def test_an_attack_s_generator_is_never_advanced_and_task_values_depend_on_seed_and_index_only():
    model = small_gray_net()
    tasks = gray_tasks(4)
    g = torch.Generator().manual_seed(123)
    spec = rm.PGDAttack(steps=3, generator=g)
    before = g.get_state()
    full = rm.evaluate(model, tasks, attacks={"p": spec}, **EVAL)
    assert torch.equal(g.get_state(), before), "evaluate advanced the attack's generator"
    tail = rm.evaluate(model, tasks[2:], attacks={"p": spec}, **{**EVAL, "seed": EVAL["seed"] + 2})
    for k in full.metrics:
        assert full.metrics[k].values[2:] == tail.metrics[k].values, k  # no dependence on earlier tasks
    two = rm.evaluate(model, tasks, attacks={"p": spec}, workers=2, **EVAL)
    for k in full.metrics:
        assert two.metrics[k].values == full.metrics[k].values, k


# ------------------------------------------------------------------ defect 5: mixed modes
def _mixed_model():
    model = small_gray_net().train()
    model[1].eval()  # a frozen batch norm inside a train-mode model
    seen = []
    model[1].register_forward_pre_hook(lambda m, _a: seen.append(m.training))
    return model, seen


def test_every_submodule_s_mode_is_kept_inside_and_restored_after():
    from robust_meta.params import module_modes
    model, seen = _mixed_model()
    modes = module_modes(model)
    rm.evaluate(model, gray_tasks(2), **EVAL)
    assert seen and not any(seen), "the frozen batch norm ran in train mode inside evaluate()"
    assert module_modes(model) == modes
    seen.clear()
    x, y = gray_tasks(1)[0].query_x, gray_tasks(1)[0].query_y
    perturb("pgd", model, x, y, eps=8 / 255, steps=2)
    assert seen and not any(seen) and module_modes(model) == modes
    from robust_meta.train import validate

    seen.clear()
    validate(model, gray_tasks(1), eps=8 / 255, steps=1, step_size=0.1, attack_steps=1)
    assert module_modes(model) == modes  # validate runs in train mode (MAML), then restores exactly
    # An explicit mode is applied to the whole model for the call, and undone exactly.
    seen.clear()
    rm.evaluate(model, gray_tasks(1), train_mode=True, **EVAL)
    assert seen and all(seen) and module_modes(model) == modes
    seen.clear()
    perturb("pgd", model, x, y, eps=8 / 255, steps=2, training=False)
    assert seen and not any(seen) and module_modes(model) == modes


# ------------------------------------------------------------------ defect 9: interactive __main__
def test_workers_with_a_class_from_an_interactive_main_get_a_clear_error():
    script = textwrap.dedent("""
        import torch
        from torch import nn
        import robust_meta as rm
        from robust_meta.data import Task

        class Net(nn.Module):  # defined in __main__ of `python -c`: a worker cannot import it
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(16, 2)
            def forward(self, x):
                return self.fc(x.flatten(1))

        t = Task(torch.rand(2, 1, 4, 4), torch.arange(2), torch.rand(4, 1, 4, 4), torch.arange(2).repeat(2))
        try:
            rm.evaluate(Net(), [t, t], eps=0.1, steps=1, step_size=0.1, workers=2, progress=False)
        except ValueError as err:
            print("ERROR:", err)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert "ERROR:" in out.stdout, out.stdout + out.stderr
    assert "Net" in out.stdout and "interactive" in out.stdout and "workers=1" in out.stdout
    assert "BrokenProcessPool" not in out.stdout + out.stderr


# ------------------------------------------------------------------ defect 11: CUDA generators
def test_cpu_work_never_seeds_a_cuda_generator(monkeypatch, tmp_path):
    model = small_gray_net()  # (seeds with torch.manual_seed itself: before the spy)
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: calls.append(("all", s)))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda s: calls.append(("one", s)))
    rm.evaluate(model, gray_tasks(2), **EVAL)
    t = gray_tasks(1)[0]
    perturb("pgd", model, t.query_x, t.query_y, eps=8 / 255)
    from robust_meta.cli import demo_config
    from robust_meta.train import train

    train(demo_config("rmaml-out", quick=True).replace(meta_steps=2, device="cpu"), out_dir=tmp_path / "r",
          progress=False)
    assert calls == [], f"CPU work seeded CUDA generators: {calls[:3]}"


# ------------------------------------------------------------------ defect 13: no_grad / inference
def test_attacks_enable_gradients_themselves_and_explain_inference_mode():
    model = small_gray_net().eval()
    t = gray_tasks(1)[0]
    x, y = t.query_x, t.query_y
    with torch.no_grad():
        adv = rm.PGDAttack(model, eps=8 / 255, steps=2)(x, y)
        adv2 = perturb("pgd", model, x, y, eps=8 / 255, steps=2)
    assert (adv - x).abs().max() > 0 and (adv2 - x).abs().max() > 0
    with torch.inference_mode():
        adv3 = perturb("pgd", model, x, y, eps=8 / 255, steps=2)
        fast = {k: v * 1.0 for k, v in model.named_parameters()}  # weights made in inference mode
        with pytest.raises(RuntimeError, match="torch.no_grad"):
            perturb("pgd", model, x, y, params=fast, eps=8 / 255, steps=2)
    assert not adv3.is_inference() and (adv3 - x).abs().max() <= 8 / 255


# ------------------------------------------------------------------ defect 14: the ε-ball, exactly
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("eps", [1e-3, 1 / 255, 8 / 255])
def test_attacks_keep_the_eps_ball_exactly_in_the_images_dtype(dtype, eps):
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(8, 1, 8, 8, generator=g).to(dtype)
    labels = torch.arange(8) % 3
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).to(dtype)
    for attack in ("pgd", "fgsm"):
        adv = perturb(attack, model, imgs, labels, eps=eps, steps=3)
        assert adv.dtype == dtype and bool(((adv - imgs).abs() <= eps).all()), attack  # in the dtype
        assert float((adv - imgs).abs().double().max()) <= eps  # and as real numbers
        assert float(adv.min()) >= 0 and float(adv.max()) <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("eps", [1e-3, 1 / 255, 8 / 255])
def test_the_projection_holds_exactly_in_the_images_dtype(dtype, eps):
    from robust_meta.attacks import project_linf

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4096, generator=g).to(dtype)
    adv = project_linf(x + torch.randn(4096, generator=g).to(dtype), x, eps)
    d = (adv - x).abs()
    assert bool((d <= eps).all())
    assert float(d.double().max()) <= eps
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1


# ------------------------------------------------------------------ defect 15: no aliasing at ε = 0
def test_eps_zero_returns_a_copy_not_a_view():
    model = small_gray_net()
    t = gray_tasks(1)[0]
    for attack, eps in (("pgd", 0.0), ("none", 0.1)):
        adv = perturb(attack, model, t.query_x, t.query_y, eps=eps)
        assert torch.equal(adv, t.query_x) and adv.data_ptr() != t.query_x.data_ptr()
        adv.add_(1)
        assert float(t.query_x.max()) <= 1


# ------------------------------------------------------------------ the strong attack of the audit
def test_margin_objective_reaches_the_known_optimum_of_a_linear_model():
    torch.manual_seed(0)
    lin = nn.Linear(16, 2, bias=False)
    x = 0.3 + 0.4 * torch.rand(5, 16)
    y = torch.zeros(5, dtype=torch.long)
    eps = 0.05
    # The margin z_1 - z_0 is linear in x: its ℓ∞-ball maximum is x + eps·sign(w_1 - w_0).
    w = (lin.weight[1] - lin.weight[0]).detach()
    best = x + eps * w.sign()
    adv = linf_pgd(lin, x, y, eps=eps, alpha=eps / 4, steps=20, objective="margin")
    torch.testing.assert_close(adv, best, atol=1e-6, rtol=0)


def test_strong_attack_takes_the_per_image_worst_case_over_its_runs():
    from robust_meta.attacks import StrongAttack
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.Tanh(), nn.Linear(4, 3)).eval()
    x = torch.rand(32, 1, 8, 8)
    y = torch.arange(32) % 3
    att = StrongAttack(model, eps=0.05, steps=3, restarts=2)
    torch.manual_seed(7)
    adv = att(x, y)
    torch.manual_seed(7)
    runs = [linf_pgd(model, x, y, eps=0.05, alpha=0.05 / 4, steps=3, objective=o) for o in ("ce", "margin")
            for _ in range(2)]
    with torch.no_grad():
        wrong = [model(r).argmax(1) != y for r in runs]
        any_wrong = torch.stack(wrong).any(0) | (model(x).argmax(1) != y)
        assert torch.equal(model(adv).argmax(1) != y, any_wrong)
    assert bool(((adv - x).abs() <= 0.05).all())
    # With batch statistics (train-mode batch norm) the combination is not a batch any run saw:
    # the strongest batch is returned, never weaker than a run.
    bn = nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).train()
    torch.manual_seed(7)
    adv = StrongAttack(bn, eps=0.05, steps=3, restarts=2)(x, y)
    torch.manual_seed(7)
    runs = [linf_pgd(bn, x, y, eps=0.05, alpha=0.05 / 4, steps=3, objective=o) for o in ("ce", "margin")
            for _ in range(2)]
    with torch.no_grad():
        n_wrong = int((bn(adv).argmax(1) != y).sum())
        assert all(n_wrong >= int((bn(r).argmax(1) != y).sum()) for r in runs)
    assert StrongAttack().describe().startswith("PGD-50")
    assert math.isclose(StrongAttack(eps=8 / 255).retarget(None, 2 / 255).alpha, 0.5 / 255)


def test_audit_reports_evaluate_s_own_protocol_values_and_flags_a_weak_attack():
    from robust_meta.attacks import StrongAttack
    model = small_gray_net()
    tasks = gray_tasks(6)
    kw = {k: v for k, v in EVAL.items() if k != "eps"}
    ev = rm.evaluate(model, tasks, eps=8 / 255, **kw)
    au = rm.audit(model, tasks, eps=8 / 255, strong=StrongAttack(steps=8, restarts=2), **kw)
    assert au.protocol.values == ev.metrics["ra"].values  # the same streams as evaluate
    assert au.sa.values == ev.metrics["sa"].values
    assert all(w == min(p, s) for w, p, s in zip(au.worst.values, au.protocol.values, au.strong.values))
    assert au.drop.mean >= 0 and au.to_dict()["n_tasks"] == 6 and "RA (PGD-3)" in au.summary()
    weak = rm.PGDAttack(steps=1, alpha=0.01 / 255, random_start=None)  # barely moves: RA ~ SA
    with pytest.warns(rm.AuditWarning, match="overstates"):
        flagged = rm.audit(model, tasks, eps=32 / 255, attack=weak, strong=StrongAttack(steps=8, restarts=2), **kw)
    assert flagged.flagged and flagged.warnings[0].startswith("audit:")
    with pytest.raises(ValueError, match="eps > 0"):
        rm.audit(model, tasks, eps=0.0)
