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


def _image_tensor(x: object, name: str) -> Tensor:
    """The structural half of `check_pixels` (no device read): a non-empty float tensor."""
    check_tensor(x, name)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point image tensor, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty")
    return x


def _pixel_range(lo: float, hi: float, name: str) -> None:
    """The value half of `check_pixels`, on the read minimum and maximum."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if lo < 0 or hi > 1:
        raise ValueError(
            f"{name} must lie in [0, 1] (pixel space; put normalisation inside the model), "
            f"got values in [{lo:.4g}, {hi:.4g}]"
        )


def check_pixels(x: Tensor, name: str = "inputs") -> None:
    """Images for an attack: floating point, finite, inside [0, 1]."""
    lo, hi = torch.aminmax(_image_tensor(x, name))
    _pixel_range(float(lo), float(hi), name)


def check_batch(inputs: Tensor, targets: Tensor | None, what: str = "inputs", *, finite: bool = True) -> None:
    """Types and batch sizes (no device read); with ``finite`` also NaN/inf (one read each)."""
    check_tensor(inputs, what)
    if inputs.dim() == 0:
        raise ValueError(f"{what} must have a batch dimension, got a scalar")
    if finite:
        check_finite(inputs, what)
    if targets is None:
        return
    check_tensor(targets, "targets")
    if targets.dim() == 0 or targets.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"{what} and targets must have the same batch size, got {inputs.shape[0]} "
            f"and {tuple(targets.shape)[:1] or 'a scalar'}"
        )
    if finite:
        check_finite(targets, "targets")


class DeferredChecks:
    """The value checks of a call (NaN/inf, pixel range, label range) read from the device once.

    Each check queues small device tensors without reading them; `raise_if_bad` reads them all
    with one host transfer and raises the first failure with the same message as the direct
    checks (`check_finite`, `check_pixels`, `check_labels`). On a GPU that is one blocking read
    instead of one per check, and it can come after the forward pass was launched.
    """

    def __init__(self) -> None:
        self._items: list[tuple[str, str, int, list[Tensor]]] = []

    def finite(self, x: Tensor, name: str) -> None:
        if x.is_floating_point():
            self._items.append(("finite", name, 0, [torch.isfinite(x).all()]))

    def pixels(self, x: Tensor, name: str = "inputs") -> None:
        lo, hi = torch.aminmax(_image_tensor(x, name))
        self._items.append(("pixels", name, 0, [lo, hi]))

    def labels(self, logits: Tensor, targets: Tensor) -> None:
        if targets.is_floating_point() or targets.dtype == torch.bool or logits.dim() != 2 or targets.numel() == 0:
            return
        lo, hi = torch.aminmax(targets)
        self._items.append(("labels", "labels", logits.shape[1], [lo, hi]))

    def raise_if_bad(self) -> None:
        if not self._items:
            return
        flat = [t for *_, ts in self._items for t in ts]
        dev = flat[0].device
        values = torch.stack([t.detach().reshape(()).to(device=dev, dtype=torch.float64) for t in flat]).tolist()
        self._items, items = [], self._items
        i = 0
        for kind, name, n, ts in items:
            vals = values[i:i + len(ts)]
            i += len(ts)
            if kind == "finite" and not vals[0]:
                raise ValueError(f"{name} contains NaN or infinite values")
            if kind == "pixels":
                _pixel_range(vals[0], vals[1], name)
            if kind == "labels":
                lo, hi = int(vals[0]), int(vals[1])
                if lo < 0 or hi >= n:
                    raise ValueError(
                        f"labels must lie in [0, {n}) for a model with {n} outputs, got labels in [{lo}, {hi}]"
                    )


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
