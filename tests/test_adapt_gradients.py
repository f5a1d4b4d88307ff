"""First- and second-order MAML gradients against hand-derived values (float64).

Model: f_w(x) = w·x (no bias), inner loss 0.5‖X w − y‖², so the inner gradient is
Xᵀ(Xw − y) and the Hessian is A = XᵀX, constant. K steps of size α give
w_K = (I − αA) w_{K-1} + α Xᵀy, hence dw_K/dw = (I − αA)^K and

    second order: ∇_w L(w_K) = ((I − αA)^K)ᵀ g,   first order: g,
    with g = X'ᵀ(X' w_K − y').

Everything below is computed independently in numpy.
"""

import numpy as np
import pytest
import torch
from torch import nn

from robust_meta import adapt


def half_sse(pred, target):
    return 0.5 * ((pred.squeeze(-1) - target) ** 2).sum()


def _problem(d=3, n_s=4, n_q=5, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=d), rng.normal(size=(n_s, d)), rng.normal(size=n_s),
            rng.normal(size=(n_q, d)), rng.normal(size=n_q))


def _by_hand(w0, Xs, ys, Xq, yq, alpha, K, first_order):
    A = Xs.T @ Xs
    M = np.eye(len(w0)) - alpha * A
    w = w0.copy()
    for _ in range(K):
        w = w - alpha * (Xs.T @ (Xs @ w - ys))
    g = Xq.T @ (Xq @ w - yq)
    loss = 0.5 * np.sum((Xq @ w - yq) ** 2)
    grad = g if first_order else np.linalg.matrix_power(M, K).T @ g
    return w, loss, grad


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("K", [1, 3])
def test_maml_gradient_matches_hand_derivation(first_order, K):
    w0, Xs, ys, Xq, yq = _problem()
    alpha = 0.05
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor(w0)[None])
    t = lambda a: torch.tensor(a)  # noqa: E731
    fast = adapt(model, t(Xs), t(ys), steps=K, step_size=alpha, first_order=first_order, loss_fn=half_sse)
    out = torch.func.functional_call(model, fast, (t(Xq),))
    loss = half_sse(out, t(yq))
    loss.backward()

    w_hand, loss_hand, grad_hand = _by_hand(w0, Xs, ys, Xq, yq, alpha, K, first_order)
    np.testing.assert_allclose(fast["weight"].detach().numpy()[0], w_hand, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(loss.item(), loss_hand, rtol=1e-12)
    np.testing.assert_allclose(model.weight.grad.numpy()[0], grad_hand, rtol=1e-10, atol=1e-12)


def test_first_and_second_order_differ():
    w0, Xs, ys, Xq, yq = _problem(seed=1)
    _, _, g1 = _by_hand(w0, Xs, ys, Xq, yq, 0.1, 2, True)
    _, _, g2 = _by_hand(w0, Xs, ys, Xq, yq, 0.1, 2, False)
    assert np.abs(g1 - g2).max() > 1e-3  # the test above can tell the two apart


def test_scalar_hand_values():
    """One weight, one support point, one query point: every number written out."""
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(2.0)
    xs, ys, xq, yq, a = 3.0, 1.0, 0.5, 2.0, 0.1
    # w' = 2 − 0.1·3·(2·3 − 1) = 0.5 ; dL/dw' = 0.5·(0.5·0.5 − 2) = −0.875 ; dw'/dw = 1 − 0.1·9 = 0.1
    for first_order, expected in [(True, -0.875), (False, -0.0875)]:
        model.zero_grad()
        fast = adapt(model, torch.tensor([[xs]], dtype=torch.float64), torch.tensor([ys], dtype=torch.float64),
                     steps=1, step_size=a, first_order=first_order, loss_fn=half_sse)
        assert fast["weight"].item() == pytest.approx(0.5)
        out = torch.func.functional_call(model, fast, (torch.tensor([[xq]], dtype=torch.float64),))
        half_sse(out, torch.tensor([yq], dtype=torch.float64)).backward()
        assert model.weight.grad.item() == pytest.approx(expected, rel=1e-12)


def test_learnable_step_size_gets_meta_gradient():
    """Meta-SGD: dL/dα = −g_innerᵀ dL/dw' for one step (hand-derived)."""
    w0, Xs, ys, Xq, yq = _problem(seed=2)
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor(w0)[None])
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    t = lambda a: torch.tensor(a)  # noqa: E731
    fast = adapt(model, t(Xs), t(ys), steps=1, step_size={"weight": lr}, loss_fn=half_sse)
    half_sse(torch.func.functional_call(model, fast, (t(Xq),)), t(yq)).backward()
    g_inner = Xs.T @ (Xs @ w0 - ys)
    w1 = w0 - 0.05 * g_inner
    g_outer = Xq.T @ (Xq @ w1 - yq)
    assert lr.grad.item() == pytest.approx(-(g_inner @ g_outer), rel=1e-10)


def test_step_size_zero_and_steps_zero_leave_weights():
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    for kw in ({"steps": 3, "step_size": 0.0}, {"steps": 0, "step_size": 0.5}):
        fast = adapt(model, x, y, **kw)
        for n, p in model.named_parameters():
            assert torch.equal(fast[n], p)


def test_per_parameter_dict_only_adapts_named():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x, y = torch.randn(6, 3), torch.tensor([0, 1] * 3)
    fast = adapt(model, x, y, steps=2, step_size={"2.weight": 0.1, "2.bias": 0.1})
    assert fast["0.weight"] is dict(model.named_parameters())["0.weight"]
    assert not torch.equal(fast["2.weight"], model[2].weight)


def test_no_grad_returns_detached_and_same_values():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1] * 3)
    ref = adapt(model, x, y, steps=3, step_size=0.2, first_order=True)
    with torch.no_grad():
        out = adapt(model, x, y, steps=3, step_size=0.2)
    for n in ref:
        assert not out[n].requires_grad
        torch.testing.assert_close(out[n], ref[n].detach(), rtol=0, atol=1e-14)


def test_continue_from_params_equals_more_steps():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1] * 3)
    a = adapt(model, x, y, steps=3, step_size=0.2)
    b = adapt(model, x, y, steps=2, step_size=0.2)
    b = adapt(model, x, y, steps=1, step_size=0.2, params=b)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-14)
