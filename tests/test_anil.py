"""ANILHead: head-only adaptation, its meta-gradient, and the body run once per task.

Reference: full :func:`robust_meta.adapt` with step size α on the head and 0 on the body is
the same inner loop mathematically (the body weights stay put, the head follows the same
gradients), so its first- and second-order meta-gradients must match ANIL's in float64.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_meta import ANILHead, adapt, call_model


class FeatNet(nn.Module):
    """timm-style model: forward_features / forward_head, batch norm in the body."""

    def __init__(self, n_way=3):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
            nn.Linear(3 * 5 * 5, 6), nn.Tanh(),
        )
        self.classifier = nn.Linear(6, n_way)

    def forward_features(self, x):
        return self.body(x)

    def forward_head(self, f):
        return self.classifier(f)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def seq_net(n_way=3):
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
        nn.Linear(3 * 5 * 5, n_way),
    )


CASES = {
    "forward_features": (FeatNet, None, "classifier"),
    "sequential": (seq_net, "4", "4"),
}


def make(case):
    factory, head, prefix = CASES[case]
    torch.manual_seed(0)
    model = factory().double()
    return model, ANILHead(model, head=head), prefix


def task(n_way=3, shots=2, queries=2):
    xs = torch.rand(n_way * shots, 1, 5, 5, dtype=torch.float64)
    ys = torch.arange(n_way).repeat(shots)
    xq = torch.rand(n_way * queries, 1, 5, 5, dtype=torch.float64)
    yq = torch.arange(n_way).repeat(queries)
    return xs, ys, xq, yq


@pytest.mark.parametrize("case", list(CASES))
def test_only_head_parameters_change(case):
    model, anil, prefix = make(case)
    xs, ys, _, _ = task()
    start = dict(model.named_parameters())
    fast = anil.adapt(xs, ys, steps=3, step_size=0.5)
    assert set(fast) == set(start)
    assert anil.head_names == [n for n in start if n.startswith(prefix + ".")]
    for n, w in fast.items():
        if n in anil.head_names:
            assert not torch.allclose(w, start[n]), n
        else:
            assert w is start[n], n


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_meta_gradient_equals_full_adapt_with_zero_body_step(case, first_order):
    model, anil, _ = make(case)
    xs, ys, xq, yq = task()
    alpha, K = 0.3, 3

    def meta_grads(inner):
        model.zero_grad()
        fast = inner()
        loss = F.cross_entropy(call_model(model, xq, fast), yq)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    sizes = {n: (alpha if n in anil.head_names else 0.0) for n, _ in model.named_parameters()}
    loss_a, g_anil = meta_grads(lambda: anil.adapt(xs, ys, steps=K, step_size=alpha, first_order=first_order))
    loss_f, g_full = meta_grads(lambda: adapt(model, xs, ys, steps=K, step_size=sizes, first_order=first_order))
    torch.testing.assert_close(loss_a, loss_f, rtol=1e-13, atol=1e-14)
    for n in g_full:
        torch.testing.assert_close(g_anil[n], g_full[n], rtol=1e-10, atol=1e-13, msg=n)
        assert g_anil[n].abs().sum() > 0, n
    # A dict of head step sizes (with the body at 0) is accepted and gives the same weights.
    fast_dict = anil.adapt(xs, ys, steps=K, step_size=sizes, first_order=first_order)
    fast_float = anil.adapt(xs, ys, steps=K, step_size=alpha, first_order=first_order)
    for n in fast_dict:
        torch.testing.assert_close(fast_dict[n], fast_float[n], rtol=0, atol=0)


def test_second_order_differs_from_first_order():
    """Second order sends gradient to the body through the cached support features."""
    model, anil, _ = make("forward_features")
    xs, ys, xq, yq = task()
    grads = []
    for fo in (False, True):
        model.zero_grad()
        fast = anil.adapt(xs, ys, steps=2, step_size=0.5, first_order=fo)
        F.cross_entropy(call_model(model, xq, fast), yq).backward()
        grads.append(model.body[0].weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1], atol=1e-8)


@pytest.mark.parametrize("case", list(CASES))
def test_body_runs_once_per_task(case):
    model, anil, _ = make(case)
    first = model.body[0] if case == "forward_features" else model[0]
    calls = []
    handle = first.register_forward_hook(lambda *_: calls.append(1))
    xs, ys, _, _ = task()
    try:
        anil.adapt(xs, ys, steps=5, step_size=0.1)
        assert len(calls) == 1
        calls.clear()
        sizes = {n: 0.1 for n in anil.head_names}
        adapt(model, xs, ys, steps=5, step_size=sizes)  # the counter works: 5 body passes
        assert len(calls) == 5
    finally:
        handle.remove()


@pytest.mark.parametrize("case", list(CASES))
def test_under_no_grad_returns_detached_adapted_weights(case):
    model, anil, _ = make(case)
    xs, ys, _, _ = task()
    with torch.no_grad():
        fast = anil.adapt(xs, ys, steps=3, step_size=0.5)
    ref = anil.adapt(xs, ys, steps=3, step_size=0.5, first_order=True)
    for n, w in fast.items():
        assert not w.requires_grad and w.grad_fn is None, n
        torch.testing.assert_close(w, ref[n].detach(), rtol=1e-13, atol=1e-14)
    assert any(not torch.equal(fast[n], p) for n, p in model.named_parameters() if n in anil.head_names)


def test_continue_from_params_and_zero_steps():
    model, anil, _ = make("forward_features")
    xs, ys, _, _ = task()
    two = anil.adapt(xs, ys, steps=2, step_size=0.2, first_order=True)
    one_one = anil.adapt(xs, ys, steps=1, step_size=0.2, first_order=True,
                         params=anil.adapt(xs, ys, steps=1, step_size=0.2, first_order=True))
    for n in two:
        torch.testing.assert_close(two[n], one_one[n], rtol=1e-13, atol=1e-14)
    zero = anil.adapt(xs, ys, steps=0, step_size=0.2)
    assert all(torch.equal(zero[n], p) for n, p in model.named_parameters())


def test_anil_validation():
    with pytest.raises(ValueError, match="no parameters under"):
        ANILHead(seq_net(), head="9")
    with pytest.raises(TypeError, match="forward_features"):
        ANILHead(seq_net(), head_prefix="4")
    model, anil, _ = make("forward_features")
    xs, ys, _, _ = task()
    with pytest.raises(ValueError, match="same batch size"):
        anil.adapt(xs, ys[:-1], steps=1, step_size=0.1)
    with pytest.raises(ValueError, match="ANIL adapts the head only"):
        anil.adapt(xs, ys, steps=1, step_size={"body.0.weight": 0.1, "classifier.weight": 0.1})
    with pytest.raises(ValueError, match="labels must lie"):
        anil.adapt(xs, ys + 5, steps=1, step_size=0.1)
