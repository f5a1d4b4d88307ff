"""A user's own dataset saved as a file of tensors."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import Tensor

from ._tasks import _check_images, _labels_tensor

__all__ = ["load_tensor_dataset"]


def load_tensor_dataset(path: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """A user's dataset saved as ``torch.save({"images": ..., "labels": ...}, path)``.

    Loaded with ``weights_only=True`` (no code execution) onto the CPU. uint8 images are
    divided by 255; ``(N, H, W)`` grey images get a channel dimension.

    Returns:
        ``(images, labels)``: ``(N, C, H, W)`` floating point in [0, 1], ``(N,)`` int64.

    Raises:
        FileNotFoundError: no such file.
        ValueError: missing keys, mismatched lengths, pixels outside [0, 1].
        TypeError: not a dict of tensors, or non-integer labels.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tensor dataset file {path!r} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors differ across torch versions
        raise ValueError(
            f"could not load {path!r} with torch.load(weights_only=True): {err}. Save plain tensors: "
            "torch.save({'images': images, 'labels': labels}, path)"
        ) from err
    if not isinstance(data, Mapping) or not {"images", "labels"} <= set(data):
        keys = sorted(data) if isinstance(data, Mapping) else type(data).__name__
        raise ValueError(f"{path!r} must hold a dict with keys 'images' and 'labels', got {keys}")
    images, labels = data["images"], data["labels"]
    if not isinstance(images, Tensor):
        raise TypeError(f"'images' in {path!r} must be a tensor, got {type(images).__name__}")
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise ValueError(f"'images' in {path!r} must be (N, C, H, W) or (N, H, W), got {tuple(images.shape)}")
    _check_images(images, f"'images' in {path!r}")
    labels = _labels_tensor(labels, f"'labels' in {path!r}")
    if len(labels) != len(images):
        raise ValueError(f"{path!r}: {len(images)} images but {len(labels)} labels")
    return images, labels
