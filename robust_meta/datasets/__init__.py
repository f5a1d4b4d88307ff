"""Task sources: the `Task` record, samplers and splits, and one module per data source.

| module | what is in it |
|---|---|
| `robust_meta.datasets._tasks` | `Task`, `as_task`, `iter_tasks`, `split_classes`, `ClassSplits`, `TaskSampler`, `UnlabeledPool` |
| `robust_meta.datasets.digits` | `load_digits`, `digits_splits` (scikit-learn's 8x8 digits, offline) |
| `robust_meta.datasets.tensors` | `load_tensor_dataset` (a user's `{"images", "labels"}` tensor file) |
| `robust_meta.datasets.torchmeta` | the torchmeta bridge (torchmeta imported lazily) |
| `robust_meta.datasets.benchmarks` | `load_benchmark`: MiniImageNet, tieredImageNet, CIFAR-FS, FC100 from the files researchers have |
| `robust_meta.datasets.omniglot` | `load_omniglot` from the official zips, alphabet-disjoint splits, `download_omniglot` |

Importing this package imports neither torchmeta, scikit-learn, PIL nor numpy-heavy extras:
each loader imports what it needs when called.
"""

from ._benchmark import BENCHMARKS, BenchmarkSplit, LayoutError
from ._tasks import (
    ClassSplits,
    Task,
    TaskSampler,
    UnlabeledPool,
    as_task,
    iter_tasks,
    split_classes,
)
from .benchmarks import load_benchmark
from .cifar import load_cifar_fs, load_fc100
from .digits import digits_splits, load_digits
from .miniimagenet import load_miniimagenet
from .omniglot import (
    OMNIGLOT_SETS,
    OmniglotDataset,
    OmniglotSplits,
    download_omniglot,
    load_omniglot,
    omniglot_splits,
    omniglot_task_sampler,
)
from .tensors import load_tensor_dataset
from .tieredimagenet import load_tieredimagenet
from .torchmeta import (
    TORCHMETA_DATASETS,
    check_torchmeta_folder,
    torchmeta_dataset,
    torchmeta_loader,
    torchmeta_tasks,
)

__all__ = [
    "BENCHMARKS",
    "BenchmarkSplit",
    "LayoutError",
    "load_benchmark",
    "load_cifar_fs",
    "load_fc100",
    "load_miniimagenet",
    "load_tieredimagenet",
    "OMNIGLOT_SETS",
    "TORCHMETA_DATASETS",
    "ClassSplits",
    "OmniglotDataset",
    "OmniglotSplits",
    "Task",
    "TaskSampler",
    "UnlabeledPool",
    "as_task",
    "check_torchmeta_folder",
    "digits_splits",
    "download_omniglot",
    "iter_tasks",
    "load_digits",
    "load_omniglot",
    "load_tensor_dataset",
    "omniglot_splits",
    "omniglot_task_sampler",
    "split_classes",
    "torchmeta_dataset",
    "torchmeta_loader",
    "torchmeta_tasks",
]
