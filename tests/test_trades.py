"""TRADES: the KL formula, the regularizer inside the meta-update, unlabeled data, the attack.

Deterministic checks use a stub attack (a fixed shift of the pixels), so the numbers can be
recomputed independently with torch.func.functional_call and hand-written formulas.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_meta import RobustMetaUpdate, TradesAttack, TradesRegularizer, adapt, perturb, trades_kl


class ShiftAttack(TradesAttack):
    """Deterministic stand-in: x_adv = clamp(x + eps, 0, 1); labels ignored."""

    def __call__(self, images, labels=None):
        return (images + self.eps).clamp(0, 1)


def shift(x, eps):
    return (x + eps).clamp(0, 1)


def small_net(bn=True):
    layers = [nn.Conv2d(1, 3, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(3))
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 4)]
    return nn.Sequential(*layers)


def task(n_way=4, shots=1, queries=2, dtype=torch.float32):
    xs = torch.rand(n_way * shots, 1, 6, 6, dtype=dtype)
    ys = torch.arange(n_way).repeat(shots)
    xq = torch.rand(n_way * queries, 1, 6, 6, dtype=dtype)
    yq = torch.arange(n_way).repeat(queries)
    return xs, ys, xq, yq


def call(model, params, x):
    return torch.func.functional_call(model, params, (x,))


# --------------------------------------------------------------------------- the KL formula


def hand_kl(clean, adv):
    """mean_b Σ_c p_c (log p_c − log q_c) with loops and a max-shifted log-sum-exp."""

    def log_softmax(row):
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        return [v - lse for v in row]

    total = 0.0
    for a, b in zip(clean, adv):
        lp, lq = log_softmax(a), log_softmax(b)
        total += sum(math.exp(p) * (p - q) for p, q in zip(lp, lq))
    return total / len(clean)


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_trades_kl_matches_float64_hand_computation(scale):
    clean = torch.randn(5, 4, dtype=torch.float64) * scale
    adv = torch.randn(5, 4, dtype=torch.float64) * scale
    got = trades_kl(clean, adv)
    assert got.item() == pytest.approx(hand_kl(clean.tolist(), adv.tolist()), rel=1e-12, abs=1e-13)
    # Direction matters: KL(p‖q) ≠ KL(q‖p) in general, and ours is clean-first.
    assert got.item() != pytest.approx(trades_kl(adv, clean).item(), rel=1e-6)


def test_trades_kl_nonnegative_zero_on_equal_and_shift_invariant():
    clean = torch.randn(200, 5, dtype=torch.float64)
    adv = clean + torch.randn_like(clean)
    per = [trades_kl(clean[i : i + 1], adv[i : i + 1]).item() for i in range(200)]
    assert min(per) >= 0
    assert trades_kl(clean, clean).item() == 0.0
    c = torch.randn(200, 1, dtype=torch.float64)
    assert trades_kl(clean + c, adv - c).item() == pytest.approx(trades_kl(clean, adv).item(), rel=1e-12)


# --------------------------------------------------------------------------- the regularizer


@pytest.mark.parametrize("attack", ["pgd", "fgsm"])
def test_trades_term_nonnegative(attack):
    model = small_net()
    params = dict(model.named_parameters())
    _, _, xq, _ = task(queries=3)
    reg = TradesRegularizer(attack, eps=0.1, steps=3 if attack == "pgd" else None)
    out = reg(model, params, xq, None)
    assert out.value.item() >= 0
    assert (out.adv_inputs - xq).abs().max() <= 0.1 + 1e-6


@pytest.mark.parametrize("attack,eps", [("pgd", 0.0), ("fgsm", 0.0), ("none", 0.1)])
def test_trades_term_exactly_zero_without_perturbation(attack, eps):
    model = small_net()  # train mode: batch statistics, same batch -> same logits
    xs, ys, xq, yq = task()
    fast = adapt(model, xs, ys, steps=1, step_size=0.1)
    out = TradesRegularizer(attack, eps=eps)(model, fast, xq, yq)
    assert torch.equal(out.adv_inputs, xq)
    assert out.value.item() == 0.0


@pytest.mark.parametrize("first_order", [False, True])
def test_trades_meta_gradient_reaches_meta_params_and_equals_hand_sum(first_order):
    torch.manual_seed(1)
    model = small_net().double()
    xs, ys, xq, yq = task(dtype=torch.float64)
    eps, gamma = 0.1, 5.0

    def meta_grads(loss_of_fast):
        model.zero_grad()
        fast = adapt(model, xs, ys, steps=2, step_size=0.1, first_order=first_order)
        loss_of_fast(fast).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    robust = RobustMetaUpdate(F.cross_entropy, model, gamma_out=gamma,
                              regularizer=TradesRegularizer(ShiftAttack(eps=eps)))
    g_rob = meta_grads(lambda fast: robust(xq, yq, params=fast))
    g_maml = meta_grads(lambda fast: F.cross_entropy(call(model, fast, xq), yq))
    # Independent form of the same objective: CE + γ KL(p(x) ‖ p(shift(x))), written here.
    g_hand = meta_grads(lambda fast: F.cross_entropy(call(model, fast, xq), yq) + gamma * trades_kl(
        call(model, fast, xq), call(model, fast, shift(xq, eps))))
    for n in g_rob:
        assert torch.isfinite(g_rob[n]).all() and g_rob[n].abs().sum() > 0, n
        torch.testing.assert_close(g_rob[n], g_hand[n], rtol=1e-10, atol=1e-12)
    assert any(not torch.allclose(g_rob[n], g_maml[n], atol=1e-6) for n in g_rob)


def test_trades_with_pgd_meta_gradient_is_finite_and_differs_from_maml():
    model = small_net()
    xs, ys, xq, yq = task()
    robust = RobustMetaUpdate(F.cross_entropy, model, gamma_out=5.0,
                              regularizer=TradesRegularizer("pgd", eps=0.1, steps=3))
    fast = adapt(model, xs, ys, steps=1, step_size=0.1)
    robust(xq, yq, params=fast).backward()
    g_rob = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    fast = adapt(model, xs, ys, steps=1, step_size=0.1)
    F.cross_entropy(call(model, fast, xq), yq).backward()
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in g_rob)
    assert any(not torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(g_rob, model.parameters()))


def test_unlabeled_images_need_no_labels_and_enter_the_mean():
    torch.manual_seed(2)
    model = small_net().double()
    xs, ys, xq, yq = task(dtype=torch.float64)
    unl = torch.rand(5, 1, 6, 6, dtype=torch.float64)
    eps = 0.1
    reg = TradesRegularizer(ShiftAttack(eps=eps))
    fast = adapt(model, xs, ys, steps=1, step_size=0.1)

    # No label is passed anywhere for the unlabeled images.
    with_u = reg(model, fast, xq, None, unlabeled=unl).value
    without = reg(model, fast, xq, None).value
    v_lab = trades_kl(call(model, fast, xq), call(model, fast, shift(xq, eps)))
    v_unl = trades_kl(call(model, fast, unl), call(model, fast, shift(unl, eps)))
    n, m = xq.shape[0], unl.shape[0]
    assert without.item() == pytest.approx(v_lab.item(), rel=1e-12)
    assert with_u.item() == pytest.approx(((n * v_lab + m * v_unl) / (n + m)).item(), rel=1e-12)
    assert abs(with_u.item() - without.item()) > 1e-8

    # Through the meta-update: the value changes, the clean loss does not (separate BN batch).
    robust = RobustMetaUpdate(F.cross_entropy, model, gamma_out=5.0, regularizer=reg)
    total_u = robust(xq, yq, params=fast, unlabeled=unl)
    stats_u = robust.last.as_dict()
    total = robust(xq, yq, params=fast)
    stats = robust.last.as_dict()
    assert total_u.item() != pytest.approx(total.item(), rel=1e-9)
    assert stats_u["clean_loss"] == stats["clean_loss"]
    total_u.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_unlabeled_with_real_trades_attack_runs():
    model = small_net()
    xs, ys, xq, yq = task()
    robust = RobustMetaUpdate(F.cross_entropy, model, gamma_out=5.0,
                              regularizer=TradesRegularizer("fgsm", eps=0.05))
    fast = adapt(model, xs, ys, steps=1, step_size=0.1)
    loss = robust(xq, yq, params=fast, unlabeled=torch.rand(6, 1, 6, 6))
    loss.backward()
    assert math.isfinite(loss.item()) and robust.last.robust_loss >= 0


# --------------------------------------------------------------------------- the attack


@pytest.mark.parametrize("attack,steps", [("pgd", 5), ("fgsm", None)])
def test_trades_attack_in_eps_ball_and_unit_box(attack, steps):
    model = small_net()
    x = torch.rand(16, 1, 6, 6)
    x[:4] = 0.0
    x[4:8] = 1.0  # saturated images: the clamp to [0, 1] must bite
    eps = 0.08
    adv = perturb(attack, model, x, None, eps=eps, steps=steps, objective="kl")
    assert adv.shape == x.shape and not adv.requires_grad
    assert (adv - x).abs().max() <= eps + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv != x).any()


def test_trades_attack_normal_start_stays_in_ball():
    model = small_net().eval()
    x = torch.rand(8, 1, 6, 6)
    adv = TradesAttack(model, eps=0.05, alpha=0.02, steps=4, random_start="normal")(x, torch.zeros(8, dtype=torch.long))
    assert (adv - x).abs().max() <= 0.05 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with pytest.raises(ValueError, match="random_start"):
        TradesAttack(model, random_start="gaussian")


def _per_image_kl(model, x, adv):
    with torch.no_grad():
        lp, lq = F.log_softmax(model(x), 1), F.log_softmax(model(adv), 1)
    return (lp.exp() * (lp - lq)).sum(1)


def test_trades_attack_raises_kl_over_random_noise_of_same_size():
    torch.manual_seed(3)
    model = small_net(bn=False).eval()
    x = torch.rand(64, 1, 6, 6) * 0.8 + 0.1  # away from the box: noise is not clipped
    eps = 0.05
    adv = perturb("pgd", model, x, None, eps=eps, steps=10, objective="kl")
    noise = (x + eps * torch.randint(0, 2, x.shape).float().mul(2).sub(1)).clamp(0, 1)
    kl_adv, kl_noise = _per_image_kl(model, x, adv), _per_image_kl(model, x, noise)
    assert kl_adv.mean() > 2 * kl_noise.mean()
    assert (kl_adv > kl_noise).float().mean() > 0.9
