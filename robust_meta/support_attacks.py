r"""Attacks on the support set: test-time poisoning of the few labelled examples of a task.

In few-shot learning an adversary may also plant the support images — the handful of
labelled examples the model adapts to. `perturb_support` finds a perturbation
\(\delta\), \(\|\delta\|_\infty \le \varepsilon\), of the support images that maximises the
loss on the **clean query after adaptation** to the perturbed support set:

\[
\max_{\|\delta\|_\infty \le \varepsilon} \; \ell\big(w'(x_s + \delta, y_s);\, x_q, y_q\big),
\]

by projected sign-gradient ascent (PGD) with the gradient taken **through the adaptation**:
the closed form of a metric learner (`robust_meta.ProtoNetHead`, `robust_meta.R2D2Head`), or
the unrolled fine-tuning steps of MAML (a second-order graph through every step). The query
is the attacker's objective only: the poisoned support images are what is returned. The
"both" threat then attacks the query as well, against the weights adapted to the poisoned
support. `robust_meta.evaluate(..., threats=("query", "support", "both"))` reports each.

The model's buffers and the mode of every submodule are restored; the support perturbation
lies in the exact ε-ball (`robust_meta.project_linf`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_eps, check_pixels
from .attacks import project_linf
from .params import Params, call_model, preserved_buffers, preserved_modes

__all__ = ["THREATS", "perturb_support"]

#: What `robust_meta.evaluate` can attack: the query images, the support images, or both.
THREATS = ("query", "support", "both")

AdaptFn = Callable[[Tensor, Tensor], Params]


def perturb_support(
    adapt_fn: AdaptFn,
    model: nn.Module,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    *,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    training: bool | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Poisoned support images that maximise the clean query's loss after adaptation.

    Args:
        adapt_fn: ``(support_x, support_y) -> params``: the learner, differentiable in
            ``support_x`` (e.g. ``lambda x, y: adapt(model, x, y, steps=10, step_size=0.01)``
            — second order — or ``head.adapt`` of a metric head).
        model: the meta-model the params belong to.
        support_x, support_y: the support set (images in [0, 1]).
        query_x, query_y: the clean query set whose post-adaptation loss is maximised.
        eps: ℓ∞ radius in [0, 1] pixel units.
        steps: PGD steps (default 10); step_size: default ``2.5·eps/steps``.
        random_start: start from a uniform point of the ε-ball (the global generator of the
            images' device, or ``generator``).
        loss_fn: the attacked loss (default cross-entropy).
        training: run the model in this mode (default: every submodule's own).
        generator: for the random start.

    Returns:
        The perturbed support images, detached, with ``|x' - x|∞ <= eps`` exactly.

    Shape:
        support_x: ``(n, C, H, W)`` -> ``(n, C, H, W)``.
    """
    check_pixels(support_x, "support_x")
    eps = check_eps(eps)
    if eps == 0:
        return support_x.detach().clone()
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    alpha = 2.5 * eps / steps if step_size is None else float(step_size)
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    x0 = support_x.detach()
    if random_start:
        dev = x0.device if generator is None else generator.device
        noise = torch.empty(x0.shape, dtype=x0.dtype, device=dev)
        noise = noise.uniform_(-eps, eps) if generator is None else noise.uniform_(-eps, eps, generator=generator)
        adv = project_linf(x0 + noise.to(x0.device), x0, eps)
    else:
        adv = x0.clone()
    qx, qy = query_x.detach(), query_y.detach()
    with preserved_buffers(model), preserved_modes(model, training), torch.enable_grad():
        for _ in range(steps):
            adv.requires_grad_(True)
            fast = adapt_fn(adv, support_y)
            loss = loss_fn(call_model(model, qx, fast), qy)
            (grad,) = torch.autograd.grad(loss, adv)
            adv = project_linf(adv.detach() + alpha * grad.sign(), x0, eps)
    return adv.detach()


def support_metric_name(threat: str, attack: str, eps: float) -> str:
    """The metric key of a support or both threat: ``"ra_support[pgd@8/255]"``."""
    return f"ra_{threat}[{attack}@{eps * 255:g}/255]"


def _adapt_fn(model: nn.Module, *, learner: object, anil: object, steps: int, step_size: object,
              loss_fn: object, params: Mapping[str, Tensor] | None = None) -> AdaptFn:
    """The evaluation's adaptation as a function of the support images, with a graph through it."""
    if learner is not None:
        return lambda x, y: learner.adapt(x, y)
    if anil is not None:
        return lambda x, y: anil.adapt(x, y, steps=steps, step_size=step_size, first_order=False, loss_fn=loss_fn)
    from .adapt import adapt

    return lambda x, y: adapt(model, x, y, steps=steps, step_size=step_size, first_order=False, loss_fn=loss_fn)
