"""The optional torchattacks bridge: equal to our native attacks, and one regression test per
defect of the 0.1.0 review (issue 10):

1. an attack instance's ε silently overriding ``eps=``;
2. composite instances (MultiAttack, AutoAttack) attacking at their own ε in an ε sweep;
3. TRADES running a cross-entropy attack towards label 0;
4. "apgd"/"autoattack" resetting the caller's global RNG;
5. subset attacks normalising with a subset's batch statistics in train mode (and crashing);
6. ``copy.copy`` sharing sub-attacks, so the user's objects were re-targeted.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_meta import (
    ATRegularizer,
    ModelAt,
    RobustMetaUpdate,
    Task,
    TradesRegularizer,
    adapt,
    evaluate,
    make_attack,
    perturb,
)

torchattacks = pytest.importorskip("torchattacks")
pytestmark = pytest.mark.torchattacks


def net(bn=True):
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 6, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(6))
    layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 5)]
    return nn.Sequential(*layers)


def batch(n=20):
    return torch.rand(n, 3, 12, 12), torch.randint(0, 5, (n,))


# ------------------------------------------------------------------ native == torchattacks


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_native_pgd_equals_torchattacks_pgd_given_the_same_random_start(mode):
    model = net()
    model.train(mode == "train")
    x, y = batch(16)
    eps, steps = 8 / 255, 5
    view = ModelAt(model)  # fixes the mode: torchattacks would otherwise switch to eval
    torch.manual_seed(7)
    theirs = torchattacks.PGD(view, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=True)(x, y)
    torch.manual_seed(7)
    ours = perturb("pgd", model, x, y, eps=eps, steps=steps)
    _same_up_to_the_exact_projection(ours, theirs, x, eps)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_native_fgsm_equals_torchattacks_ffgsm_given_the_same_random_start(mode):
    """FFGSM draws ``randn_like(x).uniform_(-ε, ε)``: the normal draw is discarded, so the same
    uniform start is ours after skipping as many normals."""
    model = net()
    model.train(mode == "train")
    x, y = batch(16)
    eps = 8 / 255
    torch.manual_seed(11)
    theirs = torchattacks.FFGSM(ModelAt(model), eps=eps, alpha=1.25 * eps)(x, y)
    torch.manual_seed(11)
    torch.randn_like(x)
    ours = perturb("fgsm", model, x, y, eps=eps)
    _same_up_to_the_exact_projection(ours, theirs, x, eps)


def _same_up_to_the_exact_projection(ours, theirs, x, eps):
    """The same attack; ours differs by at most one unit in the last place, where its exact
    projection (ε rounded down to float32, `project_linf`) and torchattacks' clamp round apart."""
    torch.testing.assert_close(ours, theirs, rtol=0, atol=4e-8)
    assert bool(((ours - x).abs() <= eps).all()) and float((ours - x).abs().double().max()) <= eps


def test_native_trades_attack_equals_torchattacks_tpgd_given_the_same_start():
    from robust_meta import TradesAttack

    model = net().eval()
    x, _ = batch(12)
    eps, alpha, steps = 0.05, 0.01, 3
    torch.manual_seed(2)
    theirs = torchattacks.TPGD(ModelAt(model), eps=eps, alpha=alpha, steps=steps)(x)
    torch.manual_seed(2)
    ours = TradesAttack(ModelAt(model), eps=eps, alpha=alpha, steps=steps, random_start="normal")(x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


# --------------------------------------------------------------- named and given attacks


@pytest.mark.parametrize("attack", ["apgd", torchattacks.PGD, "autoattack"], ids=str)
def test_inside_eps_ball_and_unit_box_and_detached(attack):
    model = net().eval()
    x, y = batch(10)
    fast = adapt(model, x, y, steps=1, step_size=0.1)
    eps = 0.05
    adv = perturb(attack, model, x, y, params=fast, eps=eps, n_classes=5)
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert (adv - x).abs().max() <= eps + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert not adv.requires_grad and adv.grad_fn is None


def test_autoattack_skips_targeted_parts_for_few_ways():
    view = ModelAt(net())
    three = make_attack("autoattack", view, eps=0.03, n_classes=3)
    five = make_attack("autoattack", view, eps=0.03, n_classes=5)
    assert len(three.attacks) == 2 and len(five.attacks) == 4


# ---------------------------------------------------------------------------- defect 1


def test_defect1_instance_eps_conflicting_with_eps_is_refused():
    model = net()
    user = torchattacks.PGD(model, eps=8 / 255)
    with pytest.raises(ValueError, match=r"eps=0\.0313.*8/255.*eps=0\.00784.*2/255"):
        RobustMetaUpdate(F.cross_entropy, model, attack=user, eps=2 / 255, gamma_out=0.2)
    with pytest.raises(ValueError, match="has eps="):
        ATRegularizer(user, eps=2 / 255)
    # eps=None: the instance's own ε, honoured
    reg = RobustMetaUpdate(F.cross_entropy, model, attack=user, gamma_out=0.2).regularizer
    assert reg.eps == pytest.approx(8 / 255)
    # a matching eps is fine, and the attack runs at exactly that radius
    x, y = batch(8)
    out = ATRegularizer(torchattacks.PGD(model, eps=2 / 255, alpha=1 / 255), eps=2 / 255)(model.eval(), None, x, y)
    dist = (out.adv_inputs - x).abs().max()
    assert dist <= 2 / 255 + 1e-6 and dist > 1.5 / 255


# ---------------------------------------------------------------------------- defect 2


def linear_setup(seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).double().eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(2, 16, generator=g, dtype=torch.float64) * 0.7)
        model[1].bias.zero_()
    x = torch.rand(n, 1, 4, 4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[: n // 4] = 1 - y[: n // 4]  # some wrong already
    return model, x, y


def worst_case_correct(model, x, y, eps):
    """Closed form for a 2-class linear model in the box [0, 1]: move each pixel by ε against
    the margin (separable), clip; correct iff the margin stays > 0."""
    w = model[1].weight.detach().numpy()
    b = model[1].bias.detach().numpy()
    xs, ys = x.flatten(1).numpy(), y.numpy()
    out = []
    for xi, yi in zip(xs, ys):
        d = w[yi] - w[1 - yi]
        adv = np.clip(xi - eps * np.sign(d), 0, 1)
        out.append(float(d @ adv + b[yi] - b[1 - yi] > 0))
    return float(np.mean(out))


@pytest.mark.parametrize("kind", ["multi", "pgd_instance"])
def test_defect2_instances_follow_every_eps_of_a_sweep(kind):
    model, x, y = linear_setup()
    sweep = [0.01, 0.05, 0.2]
    if kind == "multi":
        user = torchattacks.MultiAttack([torchattacks.PGD(model, eps=0.5, alpha=0.05, steps=20),
                                         torchattacks.FGSM(model, eps=0.5)])
    else:
        user = torchattacks.PGD(model, eps=0.5, alpha=0.05, steps=20)
    tasks = [Task(x[:2], y[:2], x, y)]
    res = evaluate(model, tasks, eps=sweep, steps=0, attacks={"user": user}, progress=False, seed=0)
    eps_axis, means, _ = res.curve("user")
    want = [worst_case_correct(model, x, y, e) for e in sweep]
    assert len(set(want)) == 3  # the closed form is not flat
    assert eps_axis[1:] == sweep  # curve() starts at ε=0 (SA)
    assert means[1:] == pytest.approx(want, abs=1e-12)
    for sub in [user, *user.__dict__["_attacks"].values()]:
        if hasattr(sub, "eps"):
            assert sub.eps == 0.5


def test_defect2_autoattack_instance_attacks_at_the_eps_asked():
    model = net().eval()
    x, y = batch(6)
    user = torchattacks.AutoAttack(model, eps=0.9, n_classes=5, seed=0)
    for e in (0.3, 0.5):  # large enough for APGD to flip every image: Square has nothing left
        adv = perturb(user, model, x, y, eps=e, n_classes=5)
        assert (adv - x).abs().max() <= e + 1e-6
    assert user.eps == 0.9
    assert all(a.eps == 0.9 for a in user.__dict__["_attacks"].values() if hasattr(a, "eps"))


def test_attack_without_an_eps_is_refused():
    model = net().eval()
    x, y = batch(4)
    with pytest.raises(ValueError, match="no ℓ∞ radius"):
        perturb(torchattacks.DeepFool(model, steps=2), model, x, y, eps=0.1)


# ---------------------------------------------------------------------------- defect 3


@pytest.mark.parametrize("spec", ["class", "instance", "apgd"])
def test_defect3_trades_refuses_cross_entropy_attacks(spec):
    model = net()
    attack = {"class": torchattacks.PGD, "instance": torchattacks.PGD(model, eps=0.1), "apgd": "apgd"}[spec]
    with pytest.raises(ValueError, match="KL"):
        TradesRegularizer(attack, eps=0.1)


def test_defect3_trades_with_tpgd_maximises_the_kl():
    from robust_meta import trades_kl

    model = net().eval()
    x, _ = batch(16)
    reg = TradesRegularizer(torchattacks.TPGD(model, eps=0.05, alpha=0.01, steps=5))
    out = reg(model, None, x, None)
    with torch.no_grad():
        clean = model(x)
        noise = trades_kl(clean, model((x + 0.05 * torch.randn_like(x).sign()).clamp(0, 1)))
    assert float(out.value.detach()) > float(noise) > 0
    assert (out.adv_inputs - x).abs().max() <= 0.05 + 1e-6


# ---------------------------------------------------------------------------- defect 4


@pytest.mark.parametrize("attack", ["apgd", "autoattack", "pgd_instance"])
def test_defect4_torchattacks_leave_the_callers_rng_as_it_was(attack):
    model = net().eval()
    x, y = batch(6)
    spec = torchattacks.PGD(model, eps=0.1) if attack == "pgd_instance" else attack
    torch.manual_seed(123)
    state = torch.get_rng_state()
    perturb(spec, model, x, y, eps=0.4, n_classes=5)
    assert torch.equal(torch.get_rng_state(), state)


def test_defect4_a_user_loop_sampling_tasks_draws_different_tasks():
    model = net().eval()
    x, y = batch(6)
    torch.manual_seed(0)
    draws = []
    for _ in range(5):
        draws.append(int(torch.randint(0, 10**6, (1,))))
        perturb("apgd", model, x, y, eps=0.03)
    assert len(set(draws)) == 5


def test_defect4_evaluate_with_apgd_leaves_the_rng():
    model = net().eval()
    x, y = batch(10)
    tasks = [Task(x[:5], y[:5], x[5:], y[5:])]
    torch.manual_seed(9)
    state = torch.get_rng_state()
    evaluate(model, tasks, eps=0.03, steps=1, step_size=0.1, attacks=("apgd",), progress=False)
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------------- defect 5


@pytest.mark.parametrize("attack", ["apgd", "autoattack", "square", "multi"])
def test_defect5_subset_attacks_are_refused_in_train_mode_with_batch_norm(attack):
    model = net().train()
    x, y = batch(8)
    spec = {
        "square": torchattacks.Square(model, eps=0.1, n_queries=10),
        "multi": torchattacks.MultiAttack([torchattacks.PGD(model), torchattacks.FGSM(model)]),
    }.get(attack, attack)
    with pytest.raises(ValueError, match="train mode.*eval mode"):
        perturb(spec, model, x, y, eps=0.03, n_classes=5)
    tasks = [Task(x[:4], y[:4], x[4:], y[4:])]
    with pytest.raises(ValueError, match="train_mode=False"):
        evaluate(model, tasks, eps=0.03, steps=0, attacks=(spec,), progress=False)


def test_defect5_subset_attacks_run_in_eval_mode_and_without_batch_norm():
    x, y = batch(8)
    perturb("apgd", net(bn=False).train(), x, y, eps=0.03)  # no batch coupling: allowed
    model = net().train()
    perturb("apgd", model, x, y, eps=0.03, training=False)
    assert model.training
    # one correct image (the 0.1.0 crash): fine in eval mode
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(1)
    y1 = (pred + 1) % 5
    y1[0] = pred[0]
    adv = perturb("apgd", model, x, y1, eps=0.03)
    assert (adv - x).abs().max() <= 0.03 + 1e-6


def test_defect5_pgd_instances_still_run_in_train_mode():
    model = net().train()
    x, y = batch(8)
    before = copy.deepcopy(model.state_dict())
    perturb(torchattacks.PGD(model, eps=0.03), model, x, y, eps=0.03)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------------------- defect 6


def test_defect6_user_attack_objects_are_never_mutated():
    model = net().eval()
    x, y = batch(6)
    fast = adapt(model, x, y, steps=1, step_size=0.1)
    pgd, fgsm = torchattacks.PGD(model, eps=0.2), torchattacks.FFGSM(model, eps=0.2)
    user = torchattacks.MultiAttack([pgd, fgsm])
    user_auto = torchattacks.AutoAttack(model, eps=0.6, n_classes=5, seed=0)
    before = {id(a): dict(vars(a)) for a in (user, pgd, fgsm, user_auto)}
    perturb(user, model, x, y, params=fast, eps=0.01)
    perturb(user_auto, model, x, y, params=fast, eps=0.15, n_classes=5)
    for a in (user, pgd, fgsm, user_auto):
        assert a.model is model
        assert {k: v for k, v in vars(a).items()} == before[id(a)]
    for owner, eps in ((user, 0.2), (user_auto, 0.6)):
        for sub in owner.__dict__["_attacks"].values():
            assert sub.model is model
            if hasattr(sub, "eps"):
                assert sub.eps == eps
    assert user.attacks[0] is pgd and user.attacks[1] is fgsm


def test_instance_is_retargeted_not_mutated():
    model = net()
    user_att = torchattacks.PGD(model, eps=0.03, steps=2)
    view = ModelAt(model)
    att = make_attack(user_att, view, eps=0.03)
    assert att.model is view and user_att.model is model and att is not user_att


# ------------------------------------------------------------------ issue 17 seams, torchattacks side
def test_a_torchattacks_instance_built_for_a_smaller_eps_is_flagged_and_projected_exactly():
    from robust_meta.attacks import attack_reach
    from robust_meta.data import Task
    from robust_meta.evaluation import EvalWarning, evaluate

    small = torchattacks.PGD(net(), eps=2 / 255, alpha=0.5 / 255, steps=10)  # reach 5/255
    assert attack_reach(small, 8 / 255) == pytest.approx(5 / 255)
    assert attack_reach(torchattacks.FFGSM, 8 / 255) == pytest.approx(10 / 255)  # default alpha 10/255
    assert attack_reach("apgd", 8 / 255) is None  # adaptive step: no bound claimed
    model = net().eval()
    x, y = batch(6)
    t = [Task(x[:5], torch.arange(5), x, y)]
    with pytest.warns(EvalWarning, match="cannot reach"):
        evaluate(model, t, eps=8 / 255, attacks={"small": small}, steps=1, step_size=0.1, progress=False, seed=0)
    adv = perturb(small, model, x, y, eps=1e-3)
    assert bool(((adv - x).abs() <= 1e-3).all()) and float((adv - x).abs().double().max()) <= 1e-3


def test_torchattacks_seeding_never_reaches_a_cuda_generator(monkeypatch):
    """torchattacks seeds with torch.manual_seed (every CUDA device, queued before CUDA starts):
    robust-meta's fork drops what it queued, so the caller's first CUDA use is not seeded by it."""
    if torch.cuda.is_initialized():
        pytest.skip("CUDA already initialised in this process")
    model = net().eval()  # (net() itself calls torch.manual_seed: before the snapshot)
    x, y = batch(6)
    tracker = torch.cuda._lazy_seed_tracker
    before = (tracker.manual_seed_all_cb, tracker.manual_seed_cb, list(tracker.call_order))
    perturb(torchattacks.PGD, model, x, y, eps=0.05)
    perturb("apgd", model, x, y, eps=0.05, n_classes=5)
    assert (tracker.manual_seed_all_cb, tracker.manual_seed_cb, list(tracker.call_order)) == before
