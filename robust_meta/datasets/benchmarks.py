"""MiniImageNet, tieredImageNet, CIFAR-FS and FC100 from the files researchers have.

`load_benchmark` auto-detects which of the community's layouts a folder holds and returns a
`BenchmarkSplit` (sorted ``.classes``, int64 ``.labels``, uint8 ``.images`` at the native size):

| benchmark | layouts read |
|---|---|
| ``miniimagenet`` | ``images/*.jpg`` + ``{train,val,test}.csv``; ``mini-imagenet-cache-{train,validation,test}.pkl``; MetaOptNet's ``miniImageNet_category_split_{train_phase_train,val,test}.pickle``; torchmeta's processed files |
| ``tieredimagenet`` | ``{train,val,test}_images_png.pkl`` + ``{train,val,test}_labels.pkl`` (Python 2 or 3 pickles), decoded once into a memory-mapped cache |
| ``cifar-fs`` / ``fc100`` | ``cifar-100-python/{train,test,meta}`` or ``cifar-100-python.tar.gz`` with the papers' class splits shipped here; MetaOptNet's ``CIFAR_FS_*.pickle`` / ``FC100_*.pickle`` |

Example:
    >>> from robust_meta.datasets import load_benchmark
    >>> train = load_benchmark("cifar-fs", "~/data/cifar-100-python.tar.gz", "train")
    >>> train.classes[:2], train.images.shape       # (('apple', 'aquarium_fish'), (38400, 3, 32, 32))
"""

from __future__ import annotations

import os
from pathlib import Path

from ._benchmark import BENCHMARK_SPLITS, BENCHMARKS, BenchmarkSplit, LayoutError

__all__ = ["BENCHMARKS", "BENCHMARK_SPLITS", "BenchmarkSplit", "LayoutError", "load_benchmark"]


def load_benchmark(
    name: str,
    root: str | os.PathLike,
    split: str,
    *,
    verify: bool = False,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> BenchmarkSplit:
    """One split of a few-shot benchmark, read from the files in ``root``.

    Args:
        name: ``"miniimagenet"``, ``"tieredimagenet"``, ``"cifar-fs"`` or ``"fc100"``.
        root: the folder holding the files (for CIFAR-FS/FC100 also the CIFAR-100
            ``.tar.gz`` itself).
        split: ``"train"``, ``"val"`` or ``"test"`` (the meta-splits of the papers).
        verify: also check the files against the checksums of the official ones (a
            re-encoded or subset copy reads fine without it).
        cache_dir: where decoded caches go (tieredImageNet, MiniImageNet JPEGs); default
            ``$ROBUST_META_CACHE``, else ``~/.cache/robust_meta``.
        progress: show a progress bar while a cache is built.

    Raises:
        ValueError: unknown ``name`` or ``split``; a truncated or malformed file.
        LayoutError: ``root`` holds no layout of ``name`` (the message names the files each
            layout expects); a `FileNotFoundError`.
    """
    key = str(name).lower().replace("_", "-")
    key = {"tiered-imagenet": "tieredimagenet", "mini-imagenet": "miniimagenet", "cifarfs": "cifar-fs",
           "fc-100": "fc100"}.get(key, key)
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    if split not in BENCHMARK_SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(BENCHMARK_SPLITS)}")
    path = Path(os.path.expanduser(os.fspath(root)))
    if not path.exists():
        raise LayoutError(f"{name} folder {str(path)!r} does not exist")
    kw = {"verify": verify, "cache_dir": cache_dir, "progress": progress}
    if key == "miniimagenet":
        from .miniimagenet import load_miniimagenet

        return load_miniimagenet(path, split, **kw)
    if key == "tieredimagenet":
        from .tieredimagenet import load_tieredimagenet

        return load_tieredimagenet(path, split, **kw)
    from .cifar import load_cifar_fs, load_fc100

    return (load_cifar_fs if key == "cifar-fs" else load_fc100)(path, split, **kw)
