"""Bridge to torchmeta's few-shot datasets (MiniImageNet, CIFAR-FS, FC100, ...).

torchmeta is imported lazily, inside the functions: importing this module does not import it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from ._tasks import Task, _int_arg

__all__ = [
    "TORCHMETA_DATASETS",
    "check_torchmeta_folder",
    "torchmeta_dataset",
    "torchmeta_loader",
    "torchmeta_tasks",
]

# name -> (torchmeta helper, folder under root, files that prove the data is there, source)
_TORCHMETA_DATASETS: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "omniglot": ("omniglot", "omniglot", ("data.hdf5", "vinyals_{split}_labels.json"),
                 "https://github.com/brendenlake/omniglot (images_background.zip, images_evaluation.zip)"),
    "miniimagenet": ("miniimagenet", "miniimagenet", ("{split}_data.hdf5", "{split}_labels.json"),
                     "the Ravi & Larochelle split, mini-imagenet.tar.gz (Google Drive, via torchmeta)"),
    "tieredimagenet": ("tieredimagenet", "tieredimagenet", ("{split}_data.hdf5", "{split}_labels.json"),
                       "tiered-imagenet.tar (Google Drive, via torchmeta)"),
    "cifar-fs": ("cifar_fs", "cifar100", ("data.hdf5", "fine_names.json", "cifar-fs/{split}_labels.json"),
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
    "fc100": ("fc100", "cifar100", ("data.hdf5", "fine_names.json", "fc100/{split}_labels.json"),
              "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
    "cub": ("cub", "cub", ("{split}_data.hdf5", "{split}_labels.json"),
            "CUB_200_2011.tgz (Caltech-UCSD Birds, via torchmeta)"),
}
TORCHMETA_DATASETS = tuple(_TORCHMETA_DATASETS)
_SPLIT_ALIASES = {"train": "train", "meta_train": "train", "val": "val", "valid": "val", "meta_val": "val",
                  "test": "test", "meta_test": "test"}


def _torchmeta_key(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    key = {"cifarfs": "cifar-fs", "mini-imagenet": "miniimagenet", "tiered-imagenet": "tieredimagenet"}.get(key, key)
    if key not in _TORCHMETA_DATASETS:
        raise ValueError(f"unknown torchmeta dataset {name!r}; choose from {', '.join(TORCHMETA_DATASETS)}")
    return key


def check_torchmeta_folder(name: str, folder: str | os.PathLike, *, split: str = "train") -> str:
    """Check that ``folder`` holds torchmeta's processed files for ``name``; return the key.

    Raises:
        FileNotFoundError: with the missing files and how to obtain the data.
        ValueError: unknown dataset or split.
    """
    key = _torchmeta_key(name)
    if split not in _SPLIT_ALIASES:
        raise ValueError(f"unknown split {split!r}; choose from train, val, test")
    split = _SPLIT_ALIASES[split]
    _, sub, files, source = _TORCHMETA_DATASETS[key]
    root = os.path.expanduser(os.fspath(folder))
    missing = [os.path.join(root, sub, f.format(split=split)) for f in files
               if not os.path.isfile(os.path.join(root, sub, f.format(split=split)))]
    if missing:
        where = "does not exist" if not os.path.isdir(root) else f"lacks {', '.join(missing)}"
        raise FileNotFoundError(
            f"{key} data not found: folder {root!r} {where}. torchmeta expects its processed files "
            f"under <folder>/{sub}/. To obtain them, on a machine with internet run once "
            f"`robust_meta.data.torchmeta_tasks({key!r}, {root!r}, ways=5, shots=1, queries=15, "
            f"n_tasks=1, download=True)` (torchmeta downloads {source} and converts it), then copy "
            f"the {sub}/ folder here. `pip install --no-deps torchmeta==1.8.0 ordered-set h5py` "
            "provides the loader."
        )
    return key


def torchmeta_dataset(
    name: str,
    folder: str | os.PathLike,
    *,
    ways: int,
    shots: int,
    queries: int,
    split: str = "train",
    seed: int | None = 0,
    image_size: int | None = None,
    download: bool = False,
    **kwargs: object,
) -> Any:
    """torchmeta's own few-shot dataset (helper + ``ClassSplitter``), after checking the folder.

    Args:
        name: one of `TORCHMETA_DATASETS` (``"omniglot"``, ``"miniimagenet"``,
            ``"cifar-fs"``, ``"fc100"``, ``"tieredimagenet"``, ``"cub"``).
        folder: the torchmeta root folder (holding e.g. ``miniimagenet/``).
        ways, shots, queries: N, K and query images per class.
        split: ``"train"``, ``"val"`` or ``"test"``.
        seed: torchmeta's dataset seed (which images each class contributes to a task).
        image_size: resize images to this size (default: the helper's: 28 for Omniglot, 84
            for (tiered)MiniImageNet/CUB, 32 for CIFAR).
        download: let torchmeta download the data (needs internet).
        **kwargs: passed to the torchmeta helper.

    Returns:
        A torchmeta ``CombinationMetaDataset``; index it with a tuple of class indices, or
        wrap it in ``torchmeta.utils.data.BatchMetaDataLoader``.

    Raises:
        FileNotFoundError: the data is not in ``folder`` (and ``download`` is False).
        ImportError: torchmeta is not installed.
    """
    key = _torchmeta_key(name)
    if not download:
        check_torchmeta_folder(key, folder, split=split)
    split = _SPLIT_ALIASES.get(split, split)
    from ..compat.torchmeta import patch_torchmeta

    patch_torchmeta()
    from torchmeta.datasets import helpers

    if image_size is not None:
        from torchvision.transforms import Compose, Resize, ToTensor

        kwargs.setdefault("transform", Compose([Resize(_int_arg(image_size, "image_size", minimum=1)), ToTensor()]))
    helper = getattr(helpers, _TORCHMETA_DATASETS[key][0])
    return helper(
        os.fspath(folder), shots=_int_arg(shots, "shots", minimum=1), ways=_int_arg(ways, "ways", minimum=1),
        test_shots=_int_arg(queries, "queries", minimum=1), meta_split=split, seed=seed,
        download=download, **kwargs,
    )


def torchmeta_loader(
    name: str,
    folder: str | os.PathLike,
    *,
    ways: int,
    shots: int,
    queries: int,
    split: str = "train",
    batch_size: int = 4,
    num_workers: int = 0,
    shuffle: bool = True,
    seed: int | None = 0,
    image_size: int | None = None,
    download: bool = False,
    **kwargs: object,
) -> Any:
    """torchmeta's ``BatchMetaDataLoader`` over `torchmeta_dataset`.

    Each batch is torchmeta's ``{"train": (x, y), "test": (x, y)}`` with 5-D inputs; turn it
    into `Task` objects with `iter_tasks`. Arguments as in
    `torchmeta_dataset`.

    Raises:
        FileNotFoundError: the data is not in ``folder``.
    """
    dataset = torchmeta_dataset(name, folder, ways=ways, shots=shots, queries=queries, split=split,
                                seed=seed, image_size=image_size, download=download, **kwargs)
    from torchmeta.utils.data import BatchMetaDataLoader

    return BatchMetaDataLoader(dataset, batch_size=_int_arg(batch_size, "batch_size", minimum=1),
                               num_workers=num_workers, shuffle=shuffle)


def _collate_torchmeta(subset: Any) -> tuple[Tensor, Tensor, list[int]]:
    """Images, labels and real class index of every item of a ClassSplitter task split."""
    import bisect

    concat = subset.dataset
    xs, ys, cls = [], [], []
    for j in range(len(subset)):
        x, y = subset[j]
        xs.append(x)
        ys.append(int(y))
        part = bisect.bisect_right(concat.cumulative_sizes, int(subset.indices[j]))
        cls.append(int(concat.datasets[part].index))
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long, device="cpu"), cls


def torchmeta_tasks(
    name: str,
    folder: str | os.PathLike,
    *,
    ways: int,
    shots: int,
    queries: int,
    split: str = "train",
    n_tasks: int,
    seed: int = 0,
    image_size: int | None = None,
    download: bool = False,
    **kwargs: object,
) -> list[Task]:
    """``n_tasks`` reproducible `Task` objects from a torchmeta dataset on disk.

    Classes are drawn with a private generator seeded by ``seed``; torchmeta's own random
    label assignment runs under a forked, seeded global RNG, so the same arguments give the
    same tasks and the caller's RNG state is untouched. ``Task.classes[i]`` is torchmeta's
    class index (within the split, class augmentations included) behind label ``i``.

    Args:
        name, folder, ways, shots, queries, split, image_size, download, **kwargs: as in
            `torchmeta_dataset`.
        n_tasks: how many tasks.
        seed: seed of the task stream.

    Returns:
        ``list[Task]``; support ``(N·K, C, H, W)``, query ``(N·Q, C, H, W)``, in [0, 1].

    Raises:
        FileNotFoundError: the data is not in ``folder``; the message says how to get it.
        ValueError: ``ways`` larger than the split's number of classes, bad arguments.
        ImportError: torchmeta is not installed.

    Example:
        >>> tasks = torchmeta_tasks("miniimagenet", "~/data", ways=5, shots=1, queries=15,
        ...                         split="test", n_tasks=100, seed=0)
    """
    n_tasks = _int_arg(n_tasks, "n_tasks", minimum=0)
    dataset = torchmeta_dataset(name, folder, ways=ways, shots=shots, queries=queries, split=split,
                                seed=seed, image_size=image_size, download=download, **kwargs)
    n_classes = len(dataset.dataset)
    if ways > n_classes:
        raise ValueError(f"ways={ways} is more than the {n_classes} classes of the {split} split of {name!r}")
    g = torch.Generator().manual_seed(int(seed))
    tasks = []
    for _ in range(n_tasks):
        index = tuple(torch.randperm(n_classes, generator=g, device=g.device)[:ways].tolist())
        task_seed = int(torch.randint(0, 2**62, (1,), generator=g, device=g.device))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(task_seed)  # the CPU's only: no CUDA device re-seeded
            episode = dataset[index]
            sx, sy, s_cls = _collate_torchmeta(episode["train"])
            qx, qy, _ = _collate_torchmeta(episode["test"])
        classes = torch.empty(ways, dtype=torch.long)
        for label, c in zip(sy.tolist(), s_cls):
            classes[label] = c
        tasks.append(Task(sx, sy, qx, qy, classes=classes))
    return tasks
