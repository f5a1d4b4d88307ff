"""Attack properties: ε-ball, [0, 1], detached, effective, against the adapted weights."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchattacks
from torch import nn

from robust_meta import ModelAt, adapt, make_attack, perturb


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 5))


def batch(n=20):
    return torch.rand(n, 3, 12, 12), torch.randint(0, 5, (n,))


ATTACK_SPECS = ["pgd", "fgsm", "apgd", torchattacks.PGD, "autoattack"]


@pytest.mark.parametrize("attack", ATTACK_SPECS, ids=str)
@pytest.mark.parametrize("eps", [2 / 255, 0.1])
def test_inside_eps_ball_and_unit_box_and_detached(attack, eps):
    model = net()
    x, y = batch(10)
    fast = adapt(model, x, y, steps=1, step_size=0.1)
    adv = perturb(attack, model, x, y, params=fast, eps=eps, n_classes=5)
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert (adv - x).abs().max() <= eps + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert not adv.requires_grad and adv.grad_fn is None


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


def test_fgsm_is_one_step_of_1_25_eps_from_uniform_start():
    view = ModelAt(net())
    att = make_attack("fgsm", view, eps=0.04)
    assert isinstance(att, torchattacks.FFGSM)
    assert att.alpha == pytest.approx(0.05) and att.eps == pytest.approx(0.04)
    pgd = make_attack("pgd", view, eps=0.04, steps=7)
    assert pgd.steps == 7 and pgd.random_start and pgd.alpha == pytest.approx(2.5 * 0.04 / 7)


def test_instance_is_retargeted_not_mutated():
    model = net()
    user_att = torchattacks.PGD(model, eps=0.03, steps=2)
    view = ModelAt(model)
    att = make_attack(user_att, view, eps=0.03)
    assert att.model is view and user_att.model is model


def test_eps_zero_returns_inputs():
    model = net()
    x, y = batch(4)
    assert torch.equal(perturb("pgd", model, x, y, eps=0.0), x)


def test_autoattack_skips_targeted_parts_for_few_ways():
    view = ModelAt(net())
    three = make_attack("autoattack", view, eps=0.03, n_classes=3)
    five = make_attack("autoattack", view, eps=0.03, n_classes=5)
    assert len(three.attacks) == 2 and len(five.attacks) == 4
