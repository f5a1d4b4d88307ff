"""Task sources of a training run: reproducible task batches of the train / val / test splits.

Re-exported by `robust_meta.train` (`build_task_sources`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from ._train_config import TrainConfig
from .data import Task
from .presets import DATASET_PRESETS

__all__ = ["build_task_sources"]


class _TaskSource:
    """Samples ``n`` tasks of one split reproducibly from a seed."""

    def __init__(self, sample: Callable[[int, int], list[Task]], name: str):
        self._sample = sample
        self.name = name

    def sample(self, n: int, seed: int) -> list[Task]:
        return self._sample(n, seed)


def build_task_sources(config: TrainConfig) -> dict[str, _TaskSource]:
    """``{"train", "val", "test"}`` task sources for a resolved config (disjoint classes).

    ``digits`` uses `robust_meta.data.digits_splits` (4 / 3 / 3 classes); a
    ``tensor:PATH`` dataset is split 60 / 20 / 20 % of its classes with seed 0; torchmeta
    datasets use their own meta-train / meta-val / meta-test splits.

    Raises:
        FileNotFoundError: the dataset's folder (``data_folder``) or tensor file is missing.
        ValueError: a split has fewer classes than ``ways``, or classes with too few images.
    """
    from . import data as D

    name = config.dataset
    if name in DATASET_PRESETS and DATASET_PRESETS[name].needs_folder:
        folder = config.data_folder
        if not folder:
            raise FileNotFoundError(
                f"dataset {name!r} needs --data-folder (the torchmeta root folder holding it)"
            )
        if not Path(folder).expanduser().is_dir():
            raise FileNotFoundError(f"data folder {folder!r} for dataset {name!r} does not exist")
        for split in ("train", "val", "test"):
            D.check_torchmeta_folder(name, folder, split=split)
        return _torchmeta_sources(config, D)
    if name == "digits":
        images, labels = D.load_digits()
        splits = D.digits_splits(seed=0)
    else:
        path = name.split(":", 1)[1]
        if not Path(path).is_file():
            raise FileNotFoundError(f"tensor dataset file {path!r} does not exist")
        images, labels = D.load_tensor_dataset(path)
        splits = D.split_classes(labels, seed=0)
    return _array_sources(config, images, labels, splits, D)


def _array_sources(config: TrainConfig, images: Tensor, labels: Tensor, splits: Any, D: Any) -> dict[str, _TaskSource]:
    sources = {}
    for split_name, classes in zip(("train", "val", "test"), splits):
        if len(classes) < config.ways:
            raise ValueError(
                f"the {split_name} split of {config.dataset!r} has {len(classes)} classes "
                f"({list(classes)}), fewer than ways={config.ways}"
            )
        sampler = D.TaskSampler(
            images, labels, ways=config.ways, shots=config.shots, queries=config.queries,
            classes=list(classes), unlabeled=config.unlabeled if split_name == "train" else 0, seed=0,
        )

        def sample(n: int, seed: int, sampler=sampler) -> list[Task]:
            sampler.generator.manual_seed(seed)  # the stream of step s depends on (seed, s) only
            return sampler.sample(n)

        sources[split_name] = _TaskSource(sample, split_name)
    return sources


def _torchmeta_sources(config: TrainConfig, D: Any) -> dict[str, _TaskSource]:
    sources = {}
    for split_name in ("train", "val", "test"):
        def sample(n: int, seed: int, split_name=split_name) -> list[Task]:
            return D.torchmeta_tasks(
                config.dataset, config.data_folder, split=split_name, ways=config.ways,
                shots=config.shots, queries=config.queries, n_tasks=n, seed=seed % 2**63,
                image_size=config.image_size,
            )

        sources[split_name] = _TaskSource(sample, split_name)
    return sources
