"""learn2learn for real (issue 18, item 6): its MAML clone loop and its ProtoNet under robust-meta.

`scripts/test.sh` installs learn2learn 0.2.0 rebuilt for Python >= 3.11
(`scripts/install_learn2learn.sh`); without it these tests skip."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robust_meta as rm

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # gym's deprecation banner
    l2l = pytest.importorskip("learn2learn")


def net(ways=3):
    torch.manual_seed(0)
    return rm.Conv4(1, ways, hidden=4, image_size=8, track_running_stats=False).double()


def task(ways=3, shots=1, queries=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(ways * shots, 1, 8, 8, generator=g, dtype=torch.float64), torch.arange(ways).repeat(shots),
            torch.rand(ways * queries, 1, 8, 8, generator=g, dtype=torch.float64), torch.arange(ways).repeat(queries))


@pytest.mark.parametrize("first_order", [False, True])
def test_gamma_zero_reproduces_learn2learns_own_meta_gradient(first_order):
    model = net()
    maml = l2l.algorithms.MAML(model, lr=0.1, first_order=first_order)
    sx, sy, qx, qy = task()

    def meta_grad(outer):
        learner = maml.clone()
        for _ in range(2):
            learner.adapt(F.cross_entropy(learner(sx), sy))
        maml.zero_grad()
        outer(learner).backward()
        return [p.grad.clone() for p in model.parameters()]

    theirs = meta_grad(lambda learner: F.cross_entropy(learner(qx), qy))
    robust = rm.RobustMetaUpdate(F.cross_entropy, model, attack="fgsm", eps=0.1, gamma_out=0)
    ours = meta_grad(lambda learner: robust(qx, qy, model=learner))
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same graph: exactly
    robust_fgsm = rm.RobustMetaUpdate(F.cross_entropy, model, attack="fgsm", eps=0.1, gamma_out=1.0)
    grads = meta_grad(lambda learner: robust_fgsm(qx, qy, model=learner))
    assert all(torch.isfinite(g).all() for g in grads) and any(not torch.equal(a, b) for a, b in zip(grads, theirs))


def test_evaluate_accepts_a_learn2learn_maml_object():
    model = net()
    maml = l2l.algorithms.MAML(model, lr=0.1)
    tasks = [rm.Task(*task(seed=i)) for i in range(2)]
    res = rm.evaluate(maml, tasks, eps=[0, 0.1], steps=2, step_size=0.1, attack_steps=2, seed=0, progress=False)
    ref = rm.evaluate(model, tasks, eps=[0, 0.1], steps=2, step_size=0.1, attack_steps=2, seed=0, progress=False)
    assert res.metrics["sa"].values == ref.metrics["sa"].values
    assert res.metrics["ra"].values == ref.metrics["ra"].values


def test_protonet_head_equals_learn2learns_prototypical_classifier():
    model = net()
    sx, sy, qx, qy = task(shots=2)
    embed = model.forward_features
    theirs = l2l.nn.PrototypicalClassifier(embed(sx), sy)(embed(qx))  # -||f - c||^2
    ours = rm.call_model(model, qx, rm.ProtoNetHead(model).adapt(sx, sy))
    torch.testing.assert_close(F.log_softmax(ours, 1), F.log_softmax(theirs, 1), rtol=1e-10, atol=1e-10)


class ProtoLoop(nn.Module):
    """A learn2learn ProtoNet loop's query classifier as a module: x -> classifier(embed(x))."""

    def __init__(self, body: nn.Module, classifier: nn.Module):
        super().__init__()
        self.body, self.classifier = body, classifier

    def forward(self, x):
        return self.classifier(self.body.forward_features(x))


def test_a_learn2learn_protonet_loop_wrapped_by_robust_meta_update():
    model = net()
    sx, sy, qx, qy = task(shots=2)
    robust = rm.RobustMetaUpdate(F.cross_entropy, model, attack="pgd", eps=0.1, gamma_out=1.0, attack_steps=3)
    classifier = l2l.nn.PrototypicalClassifier(model.forward_features(sx), sy)
    loss = robust(qx, qy, model=ProtoLoop(model, classifier))  # the one changed line of their loop
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in model.named_parameters()
               if not n.startswith("classifier"))
    # the same numbers as robust-meta's own ProtoNet head
    model.zero_grad()
    torch.manual_seed(0)
    a = robust(qx, qy, model=ProtoLoop(model, l2l.nn.PrototypicalClassifier(model.forward_features(sx), sy)))
    torch.manual_seed(0)
    b = robust(qx, qy, params=rm.ProtoNetHead(model).adapt(sx, sy))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
