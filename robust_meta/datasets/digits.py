"""The UCI handwritten digits shipped with scikit-learn (offline demo data)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._tasks import ClassSplits, split_classes

__all__ = ["digits_splits", "load_digits"]


def load_digits() -> tuple[Tensor, Tensor]:
    """The UCI handwritten digits shipped with scikit-learn: real data that works offline.

    Returns:
        ``(images, labels)``: ``(1797, 1, 8, 8)`` float32 in [0, 1] (pixel counts 0..16
        divided by 16) and ``(1797,)`` int64 labels 0..9.

    Raises:
        ImportError: scikit-learn is missing (``pip install scikit-learn`` or
            ``pip install robust-meta[demo]``).
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as err:
        raise ImportError(
            "load_digits needs scikit-learn: pip install scikit-learn (or pip install 'robust-meta[demo]')"
        ) from err
    bunch = _sk_load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32, device="cpu").unsqueeze(1) / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.int64, device="cpu")
    return images, labels


def digits_splits(seed: int = 0) -> ClassSplits:
    """Disjoint class splits of the 10 digits: 4 train, 3 val, 3 test classes.

    10 classes cannot give three disjoint splits of 5 classes, so the digits demo uses
    **3-way** tasks, which every split supports (4 train classes also give
    ``C(4, 3) = 4`` class combinations, each with random label permutations).

    Args:
        seed: which digits go where.

    Returns:
        `ClassSplits` (``._asdict()`` for a dict).
    """
    return split_classes(torch.arange(10), counts=(4, 3, 3), seed=seed)
