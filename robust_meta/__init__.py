"""robust-meta: adversarially robust few-shot meta-learning as composable pieces.

Wang et al., "On Fast Adversarial Robustness Adaptation in Model-Agnostic Meta-Learning",
ICLR 2021. ``import robust_meta.compat.torchmeta`` makes torchmeta run on torch 2.x; it is
not imported here.
"""

from ._version import __version__
from .adapt import adapt
from .anil import ANILHead
from .attacks import (
    ATTACKS,
    PGDAttack,
    StrongAttack,
    TradesAttack,
    linf_pgd,
    make_attack,
    perturb,
    project_linf,
)
from .auditing import AuditResult, AuditWarning, audit
from .augment import Augment
from .contrastive import ContrastiveAux, nt_xent
from .data import (
    ClassSplits,
    Task,
    TaskSampler,
    UnlabeledPool,
    as_task,
    digits_splits,
    iter_tasks,
    load_digits,
    load_tensor_dataset,
    split_classes,
    torchmeta_loader,
    torchmeta_tasks,
)
from .datasets import (
    OmniglotDataset,
    OmniglotSplits,
    download_omniglot,
    load_omniglot,
    omniglot_splits,
    omniglot_task_sampler,
)
from .evaluation import EvalResult, EvalWarning, Metric, confidence_interval, evaluate
from .fast import (
    CompileWarning,
    LayoutWarning,
    channels_last_wins,
    compile_available,
    fast_paths,
    tune_malloc,
)
from .meta import MetaStepStats, RobustMetaUpdate
from .metric import ProtoNetHead, R2D2Head
from .models import Conv4, ResNet12, ResNet18, build_model
from .params import ModelAt, call_features, call_head, call_model, named_params
from .regularizers import ATRegularizer, RobustnessRegularizer, TradesRegularizer, trades_kl
from .support_attacks import THREATS, perturb_support
from .visualize import feature_inversion, plot_ra_vs_eps, save_image_grid

__all__ = [
    "ANILHead",
    "ATRegularizer",
    "ATTACKS",
    "AuditResult",
    "AuditWarning",
    "Augment",
    "ClassSplits",
    "CompileWarning",
    "ContrastiveAux",
    "Conv4",
    "EvalResult",
    "EvalWarning",
    "LayoutWarning",
    "MetaStepStats",
    "Metric",
    "ModelAt",
    "OmniglotDataset",
    "OmniglotSplits",
    "PGDAttack",
    "ProtoNetHead",
    "R2D2Head",
    "ResNet12",
    "ResNet18",
    "RobustMetaUpdate",
    "RobustnessRegularizer",
    "StrongAttack",
    "Task",
    "THREATS",
    "TaskSampler",
    "TradesAttack",
    "TradesRegularizer",
    "UnlabeledPool",
    "__version__",
    "adapt",
    "as_task",
    "audit",
    "build_model",
    "call_features",
    "call_head",
    "call_model",
    "channels_last_wins",
    "compile_available",
    "confidence_interval",
    "digits_splits",
    "download_omniglot",
    "evaluate",
    "fast_paths",
    "feature_inversion",
    "iter_tasks",
    "linf_pgd",
    "load_digits",
    "load_omniglot",
    "load_tensor_dataset",
    "make_attack",
    "named_params",
    "nt_xent",
    "omniglot_splits",
    "omniglot_task_sampler",
    "perturb",
    "perturb_support",
    "plot_ra_vs_eps",
    "project_linf",
    "save_image_grid",
    "split_classes",
    "torchmeta_loader",
    "torchmeta_tasks",
    "trades_kl",
    "tune_malloc",
]
