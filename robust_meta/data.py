"""Task sources (compatibility module): everything now lives in `robust_meta.datasets`.

`robust_meta.data` re-exports the names it always had (and the private helpers other
modules use), so `from robust_meta.data import TaskSampler` and `robust_meta.data.Task`
keep working. New code may import from `robust_meta.datasets` instead, which also holds
the Omniglot loader (`load_omniglot`, `omniglot_splits`, ...).
"""

from __future__ import annotations

from .datasets._tasks import (
    _SPLIT_NAMES,
    ClassSplits,
    Task,
    TaskSampler,
    UnlabeledPool,
    _as_class_list,
    _check_images,
    _int_arg,
    _labels_tensor,
    as_task,
    iter_tasks,
    split_classes,
)
from .datasets.digits import digits_splits, load_digits
from .datasets.omniglot import (
    OMNIGLOT_SETS,
    OmniglotDataset,
    OmniglotSplits,
    download_omniglot,
    load_omniglot,
    omniglot_splits,
    omniglot_task_sampler,
)
from .datasets.tensors import load_tensor_dataset
from .datasets.torchmeta import (
    _SPLIT_ALIASES,
    _TORCHMETA_DATASETS,
    TORCHMETA_DATASETS,
    _collate_torchmeta,
    _torchmeta_key,
    check_torchmeta_folder,
    torchmeta_dataset,
    torchmeta_loader,
    torchmeta_tasks,
)

__all__ = [
    "TORCHMETA_DATASETS",
    "ClassSplits",
    "Task",
    "TaskSampler",
    "UnlabeledPool",
    "as_task",
    "check_torchmeta_folder",
    "digits_splits",
    "iter_tasks",
    "load_digits",
    "load_tensor_dataset",
    "split_classes",
    "torchmeta_dataset",
    "torchmeta_loader",
    "torchmeta_tasks",
]

# names importable from here without being documented twice (their page is robust_meta.datasets)
_REEXPORTED = (
    OMNIGLOT_SETS, OmniglotDataset, OmniglotSplits, download_omniglot, load_omniglot, omniglot_splits,
    omniglot_task_sampler, _SPLIT_NAMES, _SPLIT_ALIASES, _TORCHMETA_DATASETS, _as_class_list, _check_images,
    _collate_torchmeta, _int_arg, _labels_tensor, _torchmeta_key,
)
