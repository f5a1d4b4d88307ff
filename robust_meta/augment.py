"""Batched image augmentations on the inputs' device, for contrastive views.

Every function takes a batch ``(B, C, H, W)`` in [0, 1] and draws **per-image** random
parameters (one crop, flip, hole or angle per image), so the same image repeated in a batch
gets different views. All work is tensor ops on ``x.device`` (``affine_grid`` /
``grid_sample``), with no PIL loop. Outputs keep the shape and dtype and stay in [0, 1].

Randomness comes from ``generator`` (a ``torch.Generator``, on any device; the numbers
are drawn on the generator's device and moved to the inputs') or, when ``None``, from the
global RNG of the inputs' device. With a seeded generator the result is deterministic.

```python
g = torch.Generator().manual_seed(0)
views = Augment()(images, generator=g)
```
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_pixels

__all__ = ["Augment", "cutout", "horizontal_flip", "random_resized_crop", "rotate"]


def _check_images(x: Tensor) -> None:
    check_pixels(x, "images")
    if x.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(x.shape)}")


def _uniform(n: int, lo: float, hi: float, x: Tensor, generator: torch.Generator | None) -> Tensor:
    """``n`` draws from U[lo, hi) in ``x``'s dtype on ``x``'s device."""
    device = generator.device if generator is not None else x.device
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    return (lo + (hi - lo) * u).to(device=x.device, dtype=x.dtype)


def _check_prob(p: float, name: str) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def _check_range(r: tuple[float, float], name: str, lo: float, hi: float) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in r)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a pair of numbers (low, high), got {r!r}") from err
    if not (lo <= a <= b <= hi):
        raise ValueError(f"{name} must satisfy {lo} <= low <= high <= {hi}, got {r!r}")
    return a, b


def _warp(x: Tensor, theta: Tensor, padding_mode: str) -> Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    return out.clamp_(0.0, 1.0)


def random_resized_crop(
    x: Tensor,
    *,
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Crop a random area of each image and resize it back to ``(H, W)`` (bilinear).

    Each image gets its own area fraction ``s ~ U[scale]``, aspect ratio ``r`` (log-uniform
    in ``ratio``) and position; the crop always lies inside the image.

    Args:
        x: images in [0, 1].
        scale: range of the crop's area as a fraction of the image (in ``(0, 1]``).
        ratio: range of the crop's width/height aspect ratio.
        generator: random source; ``None`` uses the global RNG.

    Returns:
        The crops, same shape and dtype as ``x``, in [0, 1].

    Raises:
        ValueError: images not ``(B, C, H, W)`` in [0, 1], or a bad range.

    Shape:
        x: ``(B, C, H, W)`` -> ``(B, C, H, W)``.
    """
    _check_images(x)
    s_lo, s_hi = _check_range(scale, "scale", 0.0, 1.0)
    if s_lo <= 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    r_lo, r_hi = _check_range(ratio, "ratio", 1e-6, math.inf)
    b = x.shape[0]
    area = _uniform(b, s_lo, s_hi, x, generator)
    log_r = _uniform(b, math.log(r_lo), math.log(r_hi), x, generator)
    aspect = log_r.exp()
    # Width and height of the crop as fractions of the image side (clamped to fit).
    w = (area * aspect).sqrt().clamp(max=1.0)
    h = (area / aspect).sqrt().clamp(max=1.0)
    # Centre offsets in normalised [-1, 1] coordinates, keeping the crop inside.
    tx = _uniform(b, -1.0, 1.0, x, generator) * (1 - w)
    ty = _uniform(b, -1.0, 1.0, x, generator) * (1 - h)
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([w, zero, tx], 1), torch.stack([zero, h, ty], 1)], 1)
    return _warp(x, theta, "border")


def horizontal_flip(x: Tensor, *, p: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Mirror each image left-right with probability ``p`` (independently per image).

    Args:
        x: images in [0, 1].
        p: flip probability.
        generator: random source; ``None`` uses the global RNG.

    Returns:
        Same shape and dtype as ``x``.

    Shape:
        x: ``(B, C, H, W)`` -> ``(B, C, H, W)``.
    """
    _check_images(x)
    p = _check_prob(p, "p")
    flip = _uniform(x.shape[0], 0.0, 1.0, x, generator) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def cutout(
    x: Tensor,
    *,
    size: float | int = 0.25,
    fill: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Fill one random square of each image with ``fill`` (DeVries & Taylor 2017).

    The square's centre is uniform over the image; the square is clipped at the borders.

    Args:
        x: images in [0, 1].
        size: side of the square, in pixels (int) or as a fraction of ``min(H, W)`` (float
            in ``(0, 1]``).
        fill: value written in the square, in [0, 1] (0: black; 0.5: grey).
        generator: random source; ``None`` uses the global RNG.

    Returns:
        Same shape and dtype as ``x``.

    Shape:
        x: ``(B, C, H, W)`` -> ``(B, C, H, W)``.
    """
    _check_images(x)
    hgt, wid = x.shape[-2:]
    if isinstance(size, bool) or not isinstance(size, numbers.Real):
        raise TypeError(f"size must be an int (pixels) or a float fraction, got {type(size).__name__}")
    if isinstance(size, numbers.Integral):
        side = int(size)
    else:
        if not 0.0 < float(size) <= 1.0:
            raise ValueError(f"size as a fraction must lie in (0, 1], got {size!r}")
        side = max(1, round(float(size) * min(hgt, wid)))
    if side < 1:
        raise ValueError(f"size must be >= 1 pixel, got {size!r}")
    if not 0.0 <= float(fill) <= 1.0:
        raise ValueError(f"fill must lie in [0, 1], got {fill!r}")
    b = x.shape[0]
    cy = (_uniform(b, 0.0, 1.0, x, generator) * hgt).floor().long()
    cx = (_uniform(b, 0.0, 1.0, x, generator) * wid).floor().long()
    top, left = cy - side // 2, cx - side // 2
    rows = torch.arange(hgt, device=x.device)
    cols = torch.arange(wid, device=x.device)
    in_rows = (rows[None] >= top[:, None]) & (rows[None] < top[:, None] + side)
    in_cols = (cols[None] >= left[:, None]) & (cols[None] < left[:, None] + side)
    hole = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
    return x.masked_fill(hole, float(fill))


def rotate(
    x: Tensor,
    *,
    degrees: float = 15.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Rotate each image by its own angle drawn from ``U[-degrees, degrees]``.

    Pixels that come from outside the image repeat the border.

    Args:
        x: images in [0, 1].
        degrees: largest absolute angle (small angles keep the content).
        generator: random source; ``None`` uses the global RNG.

    Returns:
        Same shape and dtype as ``x``.

    Shape:
        x: ``(B, C, H, W)`` -> ``(B, C, H, W)``.
    """
    _check_images(x)
    if isinstance(degrees, bool) or not isinstance(degrees, numbers.Real) or not 0 <= degrees <= 180:
        raise ValueError(f"degrees must be a number in [0, 180], got {degrees!r}")
    b = x.shape[0]
    angle = _uniform(b, -float(degrees), float(degrees), x, generator) * (math.pi / 180)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return _warp(x, theta, "border")


class Augment:
    """Random crop-resize, flip, rotation and cut-out, each applied with a probability.

    Each transform is applied to a random subset of the batch (per image, probability
    ``p_*``), in the order crop → flip → rotate → cut-out. The default is a SimCLR-style
    view for small few-shot images: always crop, flip half the time, cut-out half the time,
    no rotation.

    Args:
        p_crop: probability of [`random_resized_crop`][robust_meta.augment.random_resized_crop].
        p_flip: probability of [`horizontal_flip`][robust_meta.augment.horizontal_flip].
        p_rotate: probability of [`rotate`][robust_meta.augment.rotate].
        p_cutout: probability of [`cutout`][robust_meta.augment.cutout].
        scale, ratio: crop parameters.
        degrees: rotation range.
        cutout_size, cutout_fill: cut-out parameters.

    Raises:
        ValueError: a probability outside [0, 1] or a bad transform parameter.

    Shape:
        ``augment(x, generator=None)``: ``(B, C, H, W)`` -> ``(B, C, H, W)``.

    Example:
        >>> aug = Augment(p_rotate=0.5, cutout_fill=0.5)
        >>> view = aug(x, generator=torch.Generator().manual_seed(0))
    """

    def __init__(
        self,
        *,
        p_crop: float = 1.0,
        p_flip: float = 0.5,
        p_rotate: float = 0.0,
        p_cutout: float = 0.5,
        scale: tuple[float, float] = (0.35, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        degrees: float = 15.0,
        cutout_size: float | int = 0.25,
        cutout_fill: float = 0.0,
    ):
        self.p_crop = _check_prob(p_crop, "p_crop")
        self.p_flip = _check_prob(p_flip, "p_flip")
        self.p_rotate = _check_prob(p_rotate, "p_rotate")
        self.p_cutout = _check_prob(p_cutout, "p_cutout")
        self.scale = _check_range(scale, "scale", 0.0, 1.0)
        if self.scale[0] <= 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        self.ratio = _check_range(ratio, "ratio", 1e-6, math.inf)
        if isinstance(degrees, bool) or not isinstance(degrees, numbers.Real) or not 0 <= degrees <= 180:
            raise ValueError(f"degrees must be a number in [0, 180], got {degrees!r}")
        self.degrees = float(degrees)
        if isinstance(cutout_size, bool) or not isinstance(cutout_size, numbers.Real) or cutout_size <= 0 or (
            not isinstance(cutout_size, numbers.Integral) and cutout_size > 1
        ):
            raise ValueError(
                f"cutout_size must be an int >= 1 (pixels) or a fraction in (0, 1], got {cutout_size!r}"
            )
        self.cutout_size = cutout_size
        if not 0.0 <= float(cutout_fill) <= 1.0:
            raise ValueError(f"cutout_fill must lie in [0, 1], got {cutout_fill!r}")
        self.cutout_fill = float(cutout_fill)

    def __repr__(self) -> str:
        return (
            f"Augment(p_crop={self.p_crop}, p_flip={self.p_flip}, p_rotate={self.p_rotate}, "
            f"p_cutout={self.p_cutout}, scale={self.scale}, degrees={self.degrees}, "
            f"cutout_size={self.cutout_size}, cutout_fill={self.cutout_fill})"
        )

    @staticmethod
    def _some(x: Tensor, out: Tensor, p: float, generator: torch.Generator | None) -> Tensor:
        if p >= 1.0:
            return out
        pick = _uniform(x.shape[0], 0.0, 1.0, x, generator) < p
        return torch.where(pick[:, None, None, None], out, x)

    def __call__(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """One random view of every image of ``x`` (see the class docstring)."""
        _check_images(x)
        x = x.detach()
        if self.p_crop > 0:
            x = self._some(x, random_resized_crop(x, scale=self.scale, ratio=self.ratio,
                                                  generator=generator), self.p_crop, generator)
        if self.p_flip > 0:
            x = horizontal_flip(x, p=self.p_flip, generator=generator)
        if self.p_rotate > 0:
            x = self._some(x, rotate(x, degrees=self.degrees, generator=generator),
                           self.p_rotate, generator)
        if self.p_cutout > 0:
            x = self._some(x, cutout(x, size=self.cutout_size, fill=self.cutout_fill,
                                     generator=generator), self.p_cutout, generator)
        return x
