"""robust-meta's own attacks: ε-ball, [0, 1], detached, effective, against the adapted weights.

Nothing here needs torchattacks (see test_torchattacks_bridge.py for the optional extra).
"""

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_meta import ModelAt, PGDAttack, TradesAttack, adapt, linf_pgd, make_attack, perturb
from robust_meta.attacks import TORCHATTACKS_EXTRA


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 5))


def batch(n=20):
    return torch.rand(n, 3, 12, 12), torch.randint(0, 5, (n,))


NATIVE_SPECS = ["pgd", "fgsm", PGDAttack(steps=3), TradesAttack(None, steps=2)]


@pytest.mark.parametrize("attack", NATIVE_SPECS, ids=repr)
@pytest.mark.parametrize("eps", [2 / 255, 0.1])
def test_inside_eps_ball_and_unit_box_and_detached(attack, eps):
    model = net()
    x, y = batch(10)
    fast = adapt(model, x, y, steps=1, step_size=0.1)
    objective = "kl" if getattr(attack, "objective", "ce") == "kl" else "ce"
    adv = perturb(attack, model, x, y, params=fast, eps=eps, objective=objective)
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert (adv - x).abs().max() <= eps + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert not adv.requires_grad and adv.grad_fn is None
    assert not torch.equal(adv, x)


@pytest.mark.parametrize("attack", ["pgd", "fgsm"])
def test_raises_the_loss_on_average(attack):
    model = net().eval()
    x, y = batch(64)
    eps = 8 / 255
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y)
        noise = F.cross_entropy(model((x + eps * torch.randn_like(x).sign()).clamp(0, 1)), y)
        adv = F.cross_entropy(model(perturb(attack, model, x, y, eps=eps)), y)
    assert adv > clean and adv > noise


def test_kl_attack_raises_the_divergence_without_labels():
    from robust_meta import trades_kl

    model = net().eval()
    x, _ = batch(32)
    with torch.no_grad():
        clean = model(x)
        noise = trades_kl(clean, model((x + 0.05 * torch.randn_like(x).sign()).clamp(0, 1)))
        adv = trades_kl(clean, model(perturb("pgd", model, x, None, eps=0.05, objective="kl")))
    assert adv > noise > 0


def test_attack_uses_the_adapted_weights():
    model = net()
    x, y = batch(8)
    fast = adapt(model, x, y, steps=3, step_size=0.5)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            p.copy_(fast[n])
    torch.manual_seed(1)
    a = perturb("pgd", model, x, y, params=fast, eps=0.1)
    torch.manual_seed(1)
    b = perturb("pgd", twin, x, y, eps=0.1)
    torch.manual_seed(1)
    c = perturb("pgd", model, x, y, eps=0.1)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_attack_leaves_model_mode_params_and_buffers():
    model = net().train()
    x, y = batch(8)
    before = copy.deepcopy(model.state_dict())
    perturb("pgd", model, x, y, eps=0.1)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    model.eval()
    perturb("fgsm", model, x, y, eps=0.1)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


def test_attack_runs_in_the_mode_of_the_loss():
    """In train mode the attacked network uses batch statistics (MAML convention)."""
    model = net()
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(m.training))
    x, y = batch(4)
    model.train()
    perturb("fgsm", model, x, y, eps=0.1)
    assert seen and all(seen)
    seen.clear()
    model.eval()
    perturb("fgsm", model, x, y, eps=0.1)
    assert seen and not any(seen)
    seen.clear()
    perturb("fgsm", model, x, y, eps=0.1, training=True)
    assert seen and all(seen) and not model.training


def test_fgsm_is_one_step_of_1_25_eps_from_uniform_start():
    view = ModelAt(net())
    att = make_attack("fgsm", view, eps=0.04)
    assert isinstance(att, PGDAttack) and att.model is view
    assert att.steps == 1 and att.random_start == "uniform"
    assert att.alpha == pytest.approx(0.05) and att.eps == pytest.approx(0.04)
    pgd = make_attack("pgd", view, eps=0.04, steps=7)
    assert pgd.steps == 7 and pgd.random_start == "uniform" and pgd.alpha == pytest.approx(2.5 * 0.04 / 7)
    assert make_attack("none", view, eps=0.04) is None


def reference_pgd(model, x, y, *, eps, alpha, steps, start, objective="ce"):
    """A plain float64 loop, one image at a time for the gradient (independent of the batch op)."""
    x = x.double()
    adv = (x + start).clamp(0, 1)
    with torch.no_grad():
        p = F.softmax(model(x), 1)
    for _ in range(steps):
        grads = []
        for b in range(x.shape[0]):
            a = adv[b : b + 1].clone().requires_grad_(True)
            out = model(a)
            if objective == "ce":
                loss = F.cross_entropy(out, y[b : b + 1]) / x.shape[0]
            else:
                loss = (p[b : b + 1] * (p[b : b + 1].log() - F.log_softmax(out, 1))).sum()
            (g,) = torch.autograd.grad(loss, a)
            grads.append(g)
        adv = adv + alpha * torch.cat(grads).sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0, 1)
    return adv


@pytest.mark.parametrize("objective", ["ce", "kl"])
def test_linf_pgd_equals_a_per_image_float64_loop(objective):
    """A model without batch coupling (eval mode): the batched op == a per-image loop."""
    model = net().double().eval()
    x, y = batch(6)
    x = x.double()
    eps, alpha, steps = 0.05, 0.02, 4
    g = torch.Generator().manual_seed(3)
    start = torch.empty_like(x).uniform_(-eps, eps, generator=torch.Generator().manual_seed(3))
    got = linf_pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, objective=objective, generator=g)
    want = reference_pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, start=start, objective=objective)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_random_start_comes_from_the_global_rng_or_a_generator():
    model = net().eval()
    x, y = batch(4)
    torch.manual_seed(5)
    a = perturb("fgsm", model, x, y, eps=0.1)
    torch.manual_seed(5)
    b = perturb("fgsm", model, x, y, eps=0.1)
    c = perturb("fgsm", model, x, y, eps=0.1)
    assert torch.equal(a, b) and not torch.equal(b, c)
    # A PGDAttack's own generator serves direct calls (and is advanced by them) ...
    g = torch.Generator().manual_seed(1)
    direct = PGDAttack(model, eps=0.1, steps=1, alpha=0.125, generator=g)
    state = torch.get_rng_state()
    d1, d2 = direct(x, y), direct(x, y)
    assert torch.equal(torch.get_rng_state(), state) and not torch.equal(d1, d2)
    g.manual_seed(1)
    assert torch.equal(direct(x, y), d1)
    # ... but as a specification robust-meta draws from its own (global) stream and never
    # advances the object's generator (issue 17, defect 4).
    spec = PGDAttack(eps=0.1, steps=1, alpha=0.125, generator=torch.Generator().manual_seed(1))
    before = spec.generator.get_state()
    torch.manual_seed(5)
    e = perturb(spec, model, x, y, eps=0.1)
    assert torch.equal(spec.generator.get_state(), before)
    torch.manual_seed(5)
    assert torch.equal(perturb(spec, model, x, y, eps=0.1), e)
    assert torch.equal(e, a)  # the same draw as the named "fgsm" from the same state


def test_instance_eps_is_replaced_on_a_copy_and_never_mutated():
    model = net().eval()
    x, y = batch(6)
    spec = PGDAttack(eps=0.3, steps=2, alpha=0.2)
    adv = perturb(spec, model, x, y, eps=0.02)
    assert (adv - x).abs().max() <= 0.02 + 1e-7
    assert spec.eps == 0.3 and spec.model is None and spec.alpha == 0.2


def test_spec_without_model_refuses_to_run_alone():
    with pytest.raises(ValueError, match="no model"):
        PGDAttack(eps=0.1)(torch.rand(2, 3, 4, 4), torch.zeros(2, dtype=torch.long))


def test_eps_zero_returns_inputs():
    model = net()
    x, y = batch(4)
    assert torch.equal(perturb("pgd", model, x, y, eps=0.0), x)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(attack="pgdd"), ValueError, "unknown attack 'pgdd'; choose from"),
        (dict(attack=3), TypeError, "attack must be a name"),
        (dict(eps=8), ValueError, "did you mean 8/255"),
        (dict(eps=float("nan")), ValueError, r"\[0, 1\]"),
        (dict(eps=-0.1), ValueError, r"\[0, 1\]"),
        (dict(targets=None), ValueError, "targets are required"),
        (dict(steps=0), ValueError, "steps must be >= 1"),
        (dict(objective="mse"), ValueError, "objective"),
    ],
)
def test_bad_inputs(kwargs, err, match):
    model = net()
    x, y = batch(4)
    args = dict(attack="pgd", targets=y, eps=0.1)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        perturb(args.pop("attack"), model, x, args.pop("targets"), **args)


def test_bad_pixels():
    model = net()
    x, y = batch(4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        perturb("pgd", model, x * 255, y, eps=0.1)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        perturb("pgd", model, x, y, eps=0.1)


def test_torchattacks_names_without_the_extra_name_the_extra(monkeypatch):
    """With torchattacks absent, 'apgd' fails with an ImportError naming the extra;
    'pgd'/'fgsm' keep working."""
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # import torchattacks -> ImportError
    model = net().eval()
    x, y = batch(4)
    with pytest.raises(ImportError, match=r"robust-meta\[torchattacks\]") as info:
        perturb("apgd", model, x, y, eps=0.1)
    assert TORCHATTACKS_EXTRA in str(info.value)
    assert perturb("pgd", model, x, y, eps=0.1).shape == x.shape


def test_import_loads_no_optional_dependency():
    import subprocess

    code = (
        "import sys, robust_meta; "
        "bad = [m for m in ('torchattacks', 'scipy', 'matplotlib', 'sklearn', 'torchmeta', "
        "'torchvision', 'PIL') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
