"""What every few-shot image benchmark loader returns, and the file readers they share.

`BenchmarkSplit` is the public record of one split (`robust_meta.datasets.load_benchmark`);
the helpers below read the files the community passes around: pickles written by Python 2
(read as such: a plain ``pickle.load`` fails on them), truncated files as errors, never as
a silently partial dataset.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["BENCHMARKS", "BENCHMARK_SPLITS", "BenchmarkSplit", "LayoutError", "read_pickle"]

#: The benchmarks `load_benchmark` reads.
BENCHMARKS = ("miniimagenet", "tieredimagenet", "cifar-fs", "fc100")
#: The splits of every benchmark.
BENCHMARK_SPLITS = ("train", "val", "test")


class LayoutError(FileNotFoundError):
    """A folder holds none of the layouts a benchmark is distributed in.

    The message names the files each layout expects.
    """


@dataclass(frozen=True)
class BenchmarkSplit:
    """One split of a few-shot benchmark, as `load_benchmark` returns it.

    Attributes:
        name: the benchmark (``"miniimagenet"``, ``"tieredimagenet"``, ``"cifar-fs"``, ``"fc100"``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        classes: the split's class names, sorted (ImageNet wnids for Mini/tieredImageNet,
            CIFAR-100 fine label names for CIFAR-FS/FC100).
        labels: int64 tensor (N,): index into ``classes`` of every image.
        images: uint8 tensor (N, C, H, W) at the native size of the files (84×84×3 for
            MiniImageNet pickles, 32×32×3 for CIFAR); indexable with an index tensor. Large
            splits are memory-mapped from an on-disk cache: indexing reads only what it takes.
        layout: which file layout was read (e.g. ``"csv-images"``, ``"pickle-cache"``,
            ``"metaoptnet"``, ``"cifar-100-python"``).
        source: the folder or file it was read from.
    """

    name: str
    split: str
    classes: tuple[str, ...]
    labels: Tensor
    images: Tensor
    layout: str
    source: str

    def __post_init__(self) -> None:
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(f"labels must be an int64 vector, got {self.labels.dtype} {tuple(self.labels.shape)}")
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if list(self.classes) != sorted(self.classes) or len(set(self.classes)) != len(self.classes):
            raise ValueError("classes must be sorted and distinct")
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise ValueError(f"labels outside [0, {len(self.classes)})")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        shape = "×".join(str(s) for s in self.images.shape[1:])
        return (f"BenchmarkSplit({self.name!r}, {self.split!r}, {len(self.classes)} classes, "
                f"{len(self)} images of {shape}, layout={self.layout!r})")


def read_pickle(path: str | os.PathLike) -> Any:
    """Unpickle a dataset file written by Python 2 or 3.

    Python 2 ``str`` objects (numpy arrays' raw bytes among them) are read with the
    ``latin1`` codec, which maps bytes 1:1 — the reading numpy documents for such pickles.
    Keys that come back as ``bytes`` are left to the caller (see `str_keys`).

    Raises:
        ValueError: the file is truncated or not a pickle (the message names the file).
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return pickle.load(fh, encoding="latin1")
    except (EOFError, pickle.UnpicklingError, ValueError, IndexError, KeyError, AttributeError,
            ModuleNotFoundError, TypeError) as err:
        raise ValueError(f"{str(path)!r} is truncated or not a dataset pickle ({type(err).__name__}: {err})") from err


def str_keys(mapping: Any) -> dict[str, Any]:
    """A dict whose ``bytes`` keys (Python 2 pickles read with ``encoding="bytes"``) are ``str``."""
    if not isinstance(mapping, dict):
        raise ValueError(f"expected a dict, got {type(mapping).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in mapping.items()}


def layout_error(name: str, root: Path, layouts: Sequence[tuple[str, str]]) -> LayoutError:
    """The error for a folder that matches none of ``layouts`` (``(layout, files expected)``)."""
    lines = "\n".join(f"  - {layout}: {files}" for layout, files in layouts)
    return LayoutError(f"{str(root)!r} holds no {name} layout robust-meta reads; expected one of:\n{lines}")


def _as_uint8_nchw(array: Any, what: str) -> Tensor:
    """(N, H, W, C) / (N, H, W) uint8 numpy array or tensor → contiguous uint8 (N, C, H, W) tensor."""
    t = torch.as_tensor(array)
    if t.dtype != torch.uint8:
        raise ValueError(f"{what}: images must be uint8, got {t.dtype}")
    if t.dim() == 3:
        t = t.unsqueeze(-1)
    if t.dim() != 4:
        raise ValueError(f"{what}: images must be (N, H, W, C), got shape {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2).contiguous()
