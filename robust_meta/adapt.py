"""The inner loop: K gradient steps on the support set, as a pure function of the weights."""

from __future__ import annotations

import contextlib
import math
import numbers
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fast as _fast
from ._checks import check_batch, check_labels, check_steps
from .params import Params, call_model, named_params

if TYPE_CHECKING:  # pragma: no cover
    from .regularizers import RobustnessRegularizer

__all__ = ["adapt", "inner_loop", "StepSize"]

StepSize = float | Tensor | Mapping[str, float | Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


def _step_sizes(step_size: StepSize, names: list[str]) -> dict[str, float | Tensor]:
    """Per-parameter step sizes; parameters absent from a dict are not adapted."""
    if isinstance(step_size, Mapping):
        unknown = sorted(set(step_size) - set(names))
        if unknown:
            raise ValueError(f"step_size names unknown parameters {unknown[:5]}; parameters are {names[:10]}")
        out = {}
        for n in names:
            if n in step_size:
                out[n] = _one_step_size(step_size[n], n)
        return out
    lr = _one_step_size(step_size, "step_size")
    return {n: lr for n in names}


def _one_step_size(lr: float | Tensor, name: str) -> float | Tensor:
    if isinstance(lr, Tensor):
        if lr.is_floating_point() and not bool(torch.isfinite(lr.detach()).all()):
            raise ValueError(f"step size for {name} is not finite")
        return lr
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"step size for {name} must be a float, a tensor or a dict, got {type(lr).__name__}")
    lr = float(lr)
    if not lr >= 0 or lr == float("inf"):
        raise ValueError(f"step size for {name} must be a finite number >= 0, got {lr}")
    return lr


def adapt(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    steps: int,
    step_size: StepSize,
    first_order: bool = False,
    params: Mapping[str, Tensor] | None = None,
    loss_fn: LossFn | None = None,
    regularizer: RobustnessRegularizer | None = None,
    gamma_in: float = 0.0,
    compile: bool | str | None = None,
) -> Params:
    r"""Fine-tune ``model`` on a support set with ``steps`` gradient steps; return the weights.

    Implements `w^{(k)} = w^{(k-1)} - \alpha \nabla_w [\ell(w^{(k-1)}; D) +
    \gamma_{in} R(w^{(k-1)}; D)]` (paper eq. 3, constraint; Algorithm S1 lines 4–7).
    The robust inner term (R-MAML_both) is evaluated at the *current* fast weights at every
    step, with adversarial examples generated against them.

    Args:
        model: a plain ``nn.Module`` or a torchmeta ``MetaModule``.
        inputs: support inputs.
        targets: support targets.
        steps: number of inner steps K (0 returns the starting weights).
        step_size: α as a float; a dict ``name -> float | Tensor`` (per-parameter; names
            left out are **not adapted**, which is how ANIL-style partial fine-tuning is
            expressed); or tensors that require grad (Meta-SGD: the step sizes are then
            meta-learned through the returned weights).
        first_order: if True the inner gradients are constants (FOMAML); otherwise they
            carry a graph and the meta-gradient is second order. Second order is the default
            (the paper's text); the authors' code was first order.
        params: starting weights (default: the model's own parameters). Pass the result of a
            previous ``adapt`` to continue from it.
        loss_fn: ``loss_fn(logits, targets) -> scalar``; default cross-entropy.
        regularizer: robustness term R for the inner loop (e.g. ``ATRegularizer``).
        gamma_in: its weight γ_in; 0 disables it; ``float("inf")`` fine-tunes on the
            adversarial loss alone (AQ-style adversarial fine-tuning; AT regularizer only).
        compile: ``True``/``"auto"``: run the steps' forward passes through ``torch.compile``
            (first order only; `robust_meta.fast_paths`); ``False``: eager; ``None``
            (default): as the enclosing `robust_meta.fast_paths` block says, eager outside one.

    Returns:
        ``dict[str, Tensor]`` of all parameters (adapted or not), usable as
        ``model(x, params=...)`` on a MetaModule and with
        ``torch.func.functional_call`` on an nn.Module. Under ``torch.no_grad()`` the result
        is detached.

    Raises:
        ValueError: mismatched batch sizes, labels outside ``[0, n_classes)``, NaN inputs,
            ``steps < 0``, a negative step size, unknown parameter names, a model without
            parameters.
        TypeError: wrong argument types.

    Shape:
        inputs: ``(B, ...)``; targets: ``(B,)`` class indices (or what ``loss_fn`` takes).

    Example:
        >>> fast = adapt(model, x_support, y_support, steps=5, step_size=0.01)
        >>> loss = F.cross_entropy(torch.func.functional_call(model, fast, (x_query,)), y_query)
    """
    steps = check_steps(steps)
    check_batch(inputs, targets)
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    start = named_params(model) if params is None else OrderedDict(params)
    if not start:
        raise ValueError("params is empty: there is nothing to adapt")
    names = list(start)
    lrs = _step_sizes(step_size, names)
    gamma_in = float(gamma_in)
    if gamma_in and regularizer is None:
        raise ValueError("gamma_in > 0 needs a regularizer (e.g. ATRegularizer(attack='pgd', eps=...))")
    if math.isnan(gamma_in) or gamma_in < 0:
        raise ValueError(f"gamma_in must be >= 0 (or inf), got {gamma_in}")
    adversarial_only = math.isinf(gamma_in)
    if adversarial_only and regularizer.objective != "ce":
        raise ValueError("gamma_in=inf (adversarial loss alone) needs the AT regularizer")

    def loss_at(fast: Params, k: int) -> Tensor:
        if adversarial_only:
            if k == 0:
                with torch.no_grad():
                    check_labels(call_model(model, inputs, fast), targets)
            return regularizer(model, fast, inputs, targets, loss_fn=loss_fn).value
        logits = call_model(model, inputs, fast)
        if k == 0:
            check_labels(logits, targets)
        loss = loss_fn(logits, targets)
        if gamma_in:
            reg = regularizer(model, fast, inputs, targets, logits=logits, loss_fn=loss_fn)
            loss = loss + gamma_in * reg.value
        return loss

    if compile is None:
        return inner_loop(start, lrs, steps, first_order, loss_at)
    on = _fast.resolve_compile(compile, _fast._model_device(model))
    with _fast._use_policy(on, _fast._current_channels_last()):
        return inner_loop(start, lrs, steps, first_order, loss_at)


def inner_loop(
    start: Mapping[str, Tensor],
    lrs: Mapping[str, float | Tensor],
    steps: int,
    first_order: bool,
    loss_at: Callable[[Params, int], Tensor],
) -> Params:
    """Plain gradient descent on ``loss_at(fast, k)`` over the names in ``lrs``.

    Shared by `adapt` and `robust_meta.ANILHead`. Under ``torch.no_grad()`` it
    runs on detached copies (first order) and returns detached weights.
    """
    outer_grad = torch.is_grad_enabled()
    if not outer_grad:
        first_order = True
    fast: Params = OrderedDict(start) if outer_grad else OrderedDict((k, v.detach()) for k, v in start.items())
    names = list(lrs)
    # A second-order step differentiates its gradient again: compiled graphs cannot, so eager.
    for k in range(steps):
        with torch.enable_grad(), (contextlib.nullcontext() if first_order else _fast._eager()):
            if not outer_grad:
                for n in names:
                    fast[n] = fast[n].detach().requires_grad_(True)
            loss = loss_at(fast, k)
            wrt = [n for n in names if fast[n].requires_grad]
            if not wrt:
                raise ValueError("none of the adapted weights requires grad: adapt trainable parameters")
            grads = torch.autograd.grad(
                loss, [fast[n] for n in wrt], create_graph=not first_order, allow_unused=True
            )
        new = OrderedDict(fast)
        for n, g in zip(wrt, grads):
            if g is None:
                continue
            if first_order:
                g = g.detach()
            if outer_grad:
                new[n] = fast[n] - lrs[n] * g
            else:
                with torch.no_grad():
                    new[n] = fast[n] - lrs[n] * g
        fast = new
    if not outer_grad:
        fast = OrderedDict((k, v.detach()) for k, v in fast.items())
    return fast
