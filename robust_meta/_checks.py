"""Validation at the boundary: clear errors naming the bad value."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor


def check_eps(eps: float, name: str = "eps") -> float:
    """ε must be a real number in [0, 1] (pixel units: write 8/255, not 8)."""
    if isinstance(eps, Tensor):
        if eps.numel() != 1:
            raise TypeError(f"{name} must be a number, got a tensor of shape {tuple(eps.shape)}")
        eps = eps.item()
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(eps).__name__}")
    eps = float(eps)
    if math.isnan(eps) or eps < 0 or eps > 1:
        hint = f" (did you mean {eps:g}/255?)" if 1 < eps <= 255 else ""
        raise ValueError(f"{name} must lie in [0, 1] pixel units, got {eps:g}{hint}")
    return eps


def check_tensor(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_finite(x: Tensor, name: str) -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def check_pixels(x: Tensor, name: str = "inputs") -> None:
    """Images for an attack: floating point, finite, inside [0, 1]."""
    check_tensor(x, name)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point image tensor, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty")
    lo, hi = torch.aminmax(x)
    lo, hi = float(lo), float(hi)
    if math.isnan(lo) or math.isnan(hi) or math.isinf(lo) or math.isinf(hi):
        raise ValueError(f"{name} contains NaN or infinite values")
    if lo < 0 or hi > 1:
        raise ValueError(
            f"{name} must lie in [0, 1] (pixel space; put normalisation inside the model), "
            f"got values in [{lo:.4g}, {hi:.4g}]"
        )


def check_batch(inputs: Tensor, targets: Tensor | None, what: str = "inputs") -> None:
    check_tensor(inputs, what)
    if inputs.dim() == 0:
        raise ValueError(f"{what} must have a batch dimension, got a scalar")
    check_finite(inputs, what)
    if targets is None:
        return
    check_tensor(targets, "targets")
    if targets.dim() == 0 or targets.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"{what} and targets must have the same batch size, got {inputs.shape[0]} "
            f"and {tuple(targets.shape)[:1] or 'a scalar'}"
        )
    check_finite(targets, "targets")


def check_labels(logits: Tensor, targets: Tensor) -> None:
    """Integer class labels must lie in [0, n_classes) for ``(B, n_classes)`` logits."""
    if targets.is_floating_point() or targets.dtype == torch.bool or logits.dim() != 2:
        return
    n = logits.shape[1]
    lo, hi = torch.aminmax(targets)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= n:
        raise ValueError(
            f"labels must lie in [0, {n}) for a model with {n} outputs, got labels in [{lo}, {hi}]"
        )


def check_steps(steps: object, name: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(steps).__name__}")
    if steps < 0:
        raise ValueError(f"{name} must be >= 0, got {steps}")
    return int(steps)
