"""robust-meta: adversarially robust few-shot meta-learning as composable pieces.

Wang et al., "On Fast Adversarial Robustness Adaptation in Model-Agnostic Meta-Learning",
ICLR 2021.
"""

from ._version import __version__
from .adapt import adapt
from .anil import ANILHead
from .attacks import ATTACKS, TradesAttack, make_attack, perturb
from .data import Task, as_task, iter_tasks
from .meta import MetaStepStats, RobustMetaUpdate
from .params import ModelAt, call_features, call_head, call_model, named_params
from .regularizers import ATRegularizer, RobustnessRegularizer, TradesRegularizer, trades_kl

__all__ = [
    "ANILHead",
    "ATRegularizer",
    "ATTACKS",
    "MetaStepStats",
    "ModelAt",
    "RobustMetaUpdate",
    "RobustnessRegularizer",
    "Task",
    "TradesAttack",
    "TradesRegularizer",
    "__version__",
    "adapt",
    "as_task",
    "call_features",
    "call_head",
    "call_model",
    "iter_tasks",
    "make_attack",
    "named_params",
    "perturb",
    "trades_kl",
]
