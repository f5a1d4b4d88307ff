"""RobustMetaUpdate wrapping a plain-PyTorch MAML loop in three lines."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_meta import ATRegularizer, RobustMetaUpdate, adapt, perturb


def tiny_net(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    ).to(dtype)


def make_tasks(n=3, ways=3, shots=1, queries=2, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(ways, 1, 8, 8, generator=g)
    tasks = []
    for _ in range(n):
        def draw(k):
            y = torch.arange(ways).repeat_interleave(k)
            x = (protos[y] + 0.15 * torch.randn(len(y), 1, 8, 8, generator=g)).clamp(0, 1)
            return x.to(dtype), y
        tasks.append((*draw(shots), *draw(queries)))
    return tasks


def meta_loss(model, tasks, outer, *, first_order=False, seed=0):
    """The user's loop; `outer(x, y, params)` is either their CE line or the wrapper."""
    torch.manual_seed(seed)
    total = 0.0
    for sx, sy, qx, qy in tasks:
        params = adapt(model, sx, sy, steps=2, step_size=0.1, first_order=first_order)
        total = total + outer(qx, qy, params)
    return total / len(tasks)


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def plain_ce(model):
    return lambda x, y, params: F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)


@pytest.mark.parametrize("first_order", [False, True])
def test_gamma_zero_reproduces_plain_maml_exactly(first_order):
    model, tasks = tiny_net(), make_tasks()
    ref = meta_loss(model, tasks, plain_ce(model), first_order=first_order)
    g_ref = grads(model, ref)
    wrapped = RobustMetaUpdate(F.cross_entropy, model, attack="pgd", eps=0.1, gamma_out=0)
    out = meta_loss(model, tasks, wrapped, first_order=first_order)
    g_out = grads(model, out)
    assert torch.equal(ref.detach(), out.detach())
    assert all(torch.equal(a, b) for a, b in zip(g_ref, g_out))


@pytest.mark.parametrize("attack", ["pgd", "fgsm"])
def test_aq_equals_adversarial_only_loss(attack):
    model, tasks = tiny_net(), make_tasks(n=2)
    aq = RobustMetaUpdate(F.cross_entropy, model, attack=attack, eps=0.1, gamma_out=math.inf)
    assert aq.is_aq

    def by_hand(x, y, params):
        x_adv = perturb(attack, model, x, y, params=params, eps=0.1)
        return F.cross_entropy(torch.func.functional_call(model, params, (x_adv,)), y)

    # The attack's random start comes from the global RNG: the same seed gives the same draw.
    a = meta_loss(model, tasks, aq, seed=5)
    b = meta_loss(model, tasks, by_hand, seed=5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for ga, gb in zip(grads(model, meta_loss(model, tasks, aq, seed=5)),
                      grads(model, meta_loss(model, tasks, by_hand, seed=5))):
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)


def test_weighted_loss_equals_clean_plus_gamma_adv():
    model, tasks = tiny_net(), make_tasks(n=1)
    sx, sy, qx, qy = tasks[0]
    fast = adapt(model, sx, sy, steps=1, step_size=0.1)
    torch.manual_seed(3)
    total = RobustMetaUpdate(F.cross_entropy, model, attack="fgsm", eps=0.1, gamma_out=0.2)(qx, qy, fast)
    torch.manual_seed(3)
    clean = F.cross_entropy(torch.func.functional_call(model, fast, (qx,)), qy)
    adv = perturb("fgsm", model, qx, qy, params=fast, eps=0.1)
    robust = F.cross_entropy(torch.func.functional_call(model, fast, (adv,)), qy)
    torch.testing.assert_close(total, clean + 0.2 * robust)


@pytest.mark.parametrize("attack", ["pgd", "fgsm"])
def test_robust_meta_gradient_differs_from_maml(attack):
    model, tasks = tiny_net(), make_tasks()
    g_ref = grads(model, meta_loss(model, tasks, plain_ce(model)))
    robust = RobustMetaUpdate(F.cross_entropy, model, attack=attack, eps=0.1, gamma_out=0.2)
    g_rob = grads(model, meta_loss(model, tasks, robust))
    diff = max((a - b).abs().max().item() for a, b in zip(g_ref, g_rob))
    assert diff > 1e-4
    assert all(torch.isfinite(g).all() for g in g_rob)


def test_three_line_loop_trains():
    """The user's loop + the three lines: the robust outer loss goes down."""
    model, tasks = tiny_net(), make_tasks(n=4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    robust = RobustMetaUpdate(F.cross_entropy, model, attack="fgsm", eps=0.05, gamma_out=0.2)
    losses = []
    for step in range(30):
        opt.zero_grad()
        loss = meta_loss(model, tasks, robust, seed=step)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    stats = robust.last.as_dict()
    assert set(stats) >= {"clean_loss", "robust_loss", "clean_acc", "adv_acc"}
    assert 0 <= stats["adv_acc"] <= 1 and 0 <= stats["clean_acc"] <= 1


def test_params_none_means_model_weights():
    model, tasks = tiny_net(), make_tasks(n=1)
    _, _, qx, qy = tasks[0]
    r = RobustMetaUpdate(F.cross_entropy, model, attack="none", eps=0.1, gamma_out=0)
    torch.testing.assert_close(r(qx, qy), F.cross_entropy(model(qx), qy))


def test_second_order_reaches_meta_params_through_params():
    model, tasks = tiny_net(torch.float64), make_tasks(n=1, dtype=torch.float64)
    sx, sy, qx, qy = tasks[0]
    robust = RobustMetaUpdate(F.cross_entropy, model, attack="fgsm", eps=0.05, gamma_out=0.2)

    def loss_at(first_order):
        torch.manual_seed(0)
        fast = adapt(model, sx, sy, steps=2, step_size=0.3, first_order=first_order)
        return robust(qx, qy, fast)

    g2 = grads(model, loss_at(False))
    g1 = grads(model, loss_at(True))
    assert max((a - b).abs().max().item() for a, b in zip(g1, g2)) > 1e-8


def test_robust_inner_term_uses_current_fast_weights():
    """R-MAML_both: step k attacks the step-(k−1) fast weights, not the meta-weights."""
    model, tasks = tiny_net(), make_tasks(n=1)
    sx, sy, _, _ = tasks[0]
    seen = []

    class Spy(ATRegularizer):
        def __call__(self, model, params, inputs, targets, **kw):
            seen.append({k: v.detach().clone() for k, v in params.items()})
            return super().__call__(model, params, inputs, targets, **kw)

    fast = adapt(model, sx, sy, steps=3, step_size=0.1, regularizer=Spy("fgsm", eps=0.05), gamma_in=1.0)
    one = adapt(model, sx, sy, steps=1, step_size=0.1, regularizer=ATRegularizer("fgsm", eps=0.05), gamma_in=1.0)
    assert len(seen) == 3
    meta = dict(model.named_parameters())
    assert all(torch.equal(seen[0][k], meta[k].detach()) for k in meta)
    assert not torch.equal(seen[1]["5.weight"], meta["5.weight"].detach())
    assert not torch.equal(seen[2]["5.weight"], seen[1]["5.weight"])
    # and adaptation goes past one step
    assert not torch.equal(fast["5.weight"], one["5.weight"])


def test_inner_gamma_needs_regularizer():
    model, tasks = tiny_net(), make_tasks(n=1)
    sx, sy, _, _ = tasks[0]
    with pytest.raises(ValueError, match="regularizer"):
        adapt(model, sx, sy, steps=1, step_size=0.1, gamma_in=1.0)



def test_cloned_learner_style_loop_via_model_override():
    """learn2learn style: the adapted clone is passed as `model=`, params stay None."""
    import copy

    model, tasks = tiny_net(torch.float64), make_tasks(n=1, dtype=torch.float64)
    sx, sy, qx, qy = tasks[0]
    robust = RobustMetaUpdate(F.cross_entropy, model, attack="fgsm", eps=0.05, gamma_out=0.2)
    fast = adapt(model, sx, sy, steps=1, step_size=0.1, first_order=True)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in clone.named_parameters():
            p.copy_(fast[n])
    torch.manual_seed(0)
    a = robust(qx, qy, model=clone)
    torch.manual_seed(0)
    b = robust(qx, qy, params=fast)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_aux_only_attacks_without_computing_the_robust_term():
    """gamma_out=0 with an aux: the aux sees adversarial inputs; R is never evaluated."""
    model, tasks = tiny_net(), make_tasks(n=1)
    sx, sy, qx, qy = tasks[0]
    seen, calls = [], []

    class Reg(ATRegularizer):
        def __call__(self, *a, **k):
            calls.append(1)
            return super().__call__(*a, **k)

    def aux(model, params, inputs, adv_inputs):
        seen.append((inputs, adv_inputs))
        return torch.tensor(0.5)

    fast = adapt(model, sx, sy, steps=1, step_size=0.1)
    r = RobustMetaUpdate(F.cross_entropy, model, regularizer=Reg("fgsm", eps=0.1), gamma_out=0, aux=aux)
    out = r(qx, qy, fast)
    clean = F.cross_entropy(torch.func.functional_call(model, fast, (qx,)), qy)
    torch.testing.assert_close(out, clean + 0.5)
    assert not calls
    x, adv = seen[0]
    assert 0 < (adv - x).abs().max() <= 0.1 + 1e-6
    assert math.isnan(r.last.as_dict()["robust_loss"])


def test_inner_gamma_inf_is_adversarial_fine_tuning_alone():
    """gamma_in=inf: each inner step descends the adversarial loss only (by hand below)."""
    model, tasks = tiny_net(torch.float64), make_tasks(n=1, dtype=torch.float64)
    sx, sy, _, _ = tasks[0]
    torch.manual_seed(7)
    fast = adapt(model, sx, sy, steps=2, step_size=0.1, first_order=True,
                 regularizer=ATRegularizer("fgsm", eps=0.05), gamma_in=math.inf)
    torch.manual_seed(7)
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        w = {n: v.requires_grad_(True) for n, v in w.items()}
        adv = perturb("fgsm", model, sx, sy, params=w, eps=0.05)
        loss = F.cross_entropy(torch.func.functional_call(model, w, (adv,)), sy)
        g = torch.autograd.grad(loss, list(w.values()))
        w = {n: (v - 0.1 * gi).detach() for (n, v), gi in zip(w.items(), g)}
    for n in w:
        torch.testing.assert_close(fast[n].detach(), w[n], rtol=1e-12, atol=1e-12)
