"""Every method the paper names runs one meta-step and gives finite meta-gradients.

Tiny conv net with batch norm (train mode, batch statistics), 5-way 1-shot, 3 queries a
class, 2 tasks, 8x8 RGB images; each variant with "pgd" and "fgsm", first and second order.
Besides "finite on every parameter", each robust variant's meta-gradient must differ from
its clean counterpart (same inner loop, plain cross-entropy outer loss): the robust term is
really there.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_meta import (
    ANILHead,
    ATRegularizer,
    RobustMetaUpdate,
    Task,
    TradesRegularizer,
    adapt,
    call_model,
)
from robust_meta.augment import Augment
from robust_meta.contrastive import ContrastiveAux

WAYS, SHOTS, QUERIES, SIZE, EPS = 5, 1, 3, 8, 4 / 255
VARIANTS = [
    "R-MAML_out(AT)",
    "R-MAML_out(TRADES)",
    "R-MAML_out-TRADES",  # TRADES + unlabeled images
    "R-MAML_out-CL",
    "R-MAML_out-ANIL",
    "R-MAML_both",
    "AQ",
]


class TinyConv(nn.Module):
    """Two conv3x3-BN-ReLU-maxpool blocks and a linear head (Conv4's API, smaller)."""

    def __init__(self, in_channels=3, n_classes=WAYS, hidden=6):
        super().__init__()
        block = lambda i, o: [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)]  # noqa: E731
        self.features = nn.Sequential(*block(in_channels, hidden), *block(hidden, hidden), nn.Flatten())
        self.classifier = nn.Linear(hidden * (SIZE // 4) ** 2, n_classes)

    def forward_features(self, x):
        return self.features(x)

    def forward_head(self, f):
        return self.classifier(f)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def make_tasks(n_tasks=2, n_unlabeled=5, size=SIZE):
    tasks = []
    for _ in range(n_tasks):
        tasks.append(Task(
            support_x=torch.rand(WAYS * SHOTS, 3, size, size),
            support_y=torch.arange(WAYS).repeat(SHOTS),
            query_x=torch.rand(WAYS * QUERIES, 3, size, size),
            query_y=torch.arange(WAYS).repeat(QUERIES),
            unlabeled=torch.rand(n_unlabeled, 3, size, size),
        ))
    return tasks


def meta_step(variant, model, tasks, attack, first_order, *, robust=True):
    """One meta-batch: mean outer loss over tasks (backward is called); returns the extras."""
    steps = 2 if attack == "pgd" else None  # short PGD keeps the test fast
    at = dict(attack=attack, eps=EPS, attack_steps=steps)
    extras = []
    aux = None
    if variant in ("R-MAML_out(TRADES)", "R-MAML_out-TRADES"):
        outer = RobustMetaUpdate(F.cross_entropy, model, gamma_out=5.0,
                                 regularizer=TradesRegularizer(attack, eps=EPS, steps=steps))
    elif variant == "R-MAML_out-CL":
        aux = ContrastiveAux(model, weight=0.1, temperature=0.5, projection=4,
                             augment=Augment(p_rotate=0.5), generator=torch.Generator().manual_seed(0))
        extras = list(aux.parameters())
        outer = RobustMetaUpdate(F.cross_entropy, model, gamma_out=0.2, aux=aux, **at)
    elif variant == "AQ":
        outer = RobustMetaUpdate(F.cross_entropy, model, gamma_out=float("inf"), **at)
    else:
        outer = RobustMetaUpdate(F.cross_entropy, model, gamma_out=0.2, **at)
    anil = ANILHead(model) if variant == "R-MAML_out-ANIL" else None

    total = 0.0
    for t in tasks:
        if anil is not None:
            fast = anil.adapt(t.support_x, t.support_y, steps=2, step_size=0.1, first_order=first_order)
        elif variant == "R-MAML_both" and robust:
            fast = adapt(model, t.support_x, t.support_y, steps=2, step_size=0.1, first_order=first_order,
                         regularizer=ATRegularizer(attack, eps=EPS, steps=steps), gamma_in=0.2)
        else:
            fast = adapt(model, t.support_x, t.support_y, steps=2, step_size=0.1, first_order=first_order)
        if robust:
            unlabeled = t.unlabeled if variant == "R-MAML_out-TRADES" else None
            total = total + outer(t.query_x, t.query_y, params=fast, unlabeled=unlabeled)
        else:
            total = total + F.cross_entropy(call_model(model, t.query_x, fast), t.query_y)
    loss = total / len(tasks)
    loss.backward()
    return loss, outer, extras


def grads_of(params):
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


@pytest.mark.parametrize("first_order", [False, True], ids=["2nd-order", "1st-order"])
@pytest.mark.parametrize("attack", ["pgd", "fgsm"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_runs_one_meta_step_with_finite_meta_grads(variant, attack, first_order):
    model = TinyConv()
    tasks = make_tasks()
    loss, outer, extras = meta_step(variant, model, tasks, attack, first_order)
    assert math.isfinite(loss.item())
    names = [n for n, _ in model.named_parameters()]
    g_rob = grads_of(model.parameters())
    for n, g in zip(names, g_rob):
        assert g is not None, f"{variant}: no meta-gradient for {n}"
        assert torch.isfinite(g).all(), f"{variant}: non-finite meta-gradient for {n}"
    assert sum(g.abs().sum() for g in g_rob) > 0
    for p in extras:  # the contrastive projection head is meta-learned too
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0

    stats = outer.last.as_dict()
    assert math.isfinite(stats["robust_loss"]) and stats["robust_loss"] >= 0
    if variant == "R-MAML_out-CL":
        assert stats["aux_loss"] > 0
    if variant == "AQ":
        assert stats["loss"] == pytest.approx(stats["robust_loss"])

    # The clean counterpart (same inner loop, cross-entropy outer loss) differs.
    model.zero_grad()
    meta_step(variant, model, tasks, attack, first_order, robust=False)
    g_clean = grads_of(model.parameters())
    assert any(not torch.allclose(a, b, atol=1e-7) for a, b in zip(g_rob, g_clean)), variant


def test_r_maml_out_cl_optimizer_moves_model_and_projection_head():
    """R-MAML_out-CL with one optimizer over model + aux parameters: two steps move all of them."""
    model = TinyConv()
    tasks = make_tasks()
    aux = ContrastiveAux(model, weight=0.1, projection=4)
    opt = torch.optim.SGD([*model.parameters(), *aux.parameters()], lr=0.1)
    before = [p.detach().clone() for p in [*model.parameters(), *aux.parameters()]]
    outer = RobustMetaUpdate(F.cross_entropy, model, attack="fgsm", eps=EPS, gamma_out=0.2, aux=aux)
    for _ in range(2):
        opt.zero_grad()
        loss = sum(outer(t.query_x, t.query_y, params=adapt(model, t.support_x, t.support_y, steps=1, step_size=0.1))
                   for t in tasks)
        loss.backward()
        opt.step()
    after = [*model.parameters(), *aux.parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("variant", ["R-MAML_out-CL", "R-MAML_out-ANIL", "R-MAML_out-TRADES"])
def test_variants_on_conv4(variant):
    """The library's Conv4 (image_size=16, hidden=8) through the same meta-step."""
    from robust_meta.models import Conv4

    model = Conv4(in_channels=3, n_classes=WAYS, hidden=8, image_size=16)
    loss, outer, extras = meta_step(variant, model, make_tasks(size=16), "fgsm", first_order=False)
    assert math.isfinite(loss.item())
    for n, p in [*model.named_parameters(), *((f"aux.{i}", e) for i, e in enumerate(extras))]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
