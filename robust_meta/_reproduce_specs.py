"""The settings of ``robust-meta reproduce miniimagenet`` / ``cifar-fs``: one spec per benchmark.

Re-exported by `robust_meta.reproduce` (`BenchmarkReproduction`, `BENCHMARK_SPECS`,
`BENCHMARK_METHODS`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .presets import DATASET_PRESETS

__all__ = ["BENCHMARK_METHODS", "BENCHMARK_SPECS", "BenchmarkReproduction", "benchmark_spec"]

#: The methods of the paper's MiniImageNet Tables 2–3 (and CIFAR-FS Tables S2–S3), as
#: ``TrainConfig`` options (the default of ``reproduce miniimagenet`` / ``cifar-fs``). The keys
#: shared with `robust_meta.reproduce.OMNIGLOT_METHODS` are the same methods.
BENCHMARK_METHODS: dict[str, dict[str, Any]] = {
    "maml": {"method": "maml"},
    "aq": {"method": "aq", "attack": "pgd"},
    "rmaml-out-at": {"method": "rmaml-out", "attack": "pgd"},
    "rmaml-out-anil": {"method": "anil", "attack": "pgd"},
    "rmaml-out-fgsm": {"method": "rmaml-out", "attack": "fgsm"},
    "rmaml-out-trades": {"method": "rmaml-out-trades", "attack": "pgd"},
}

_INT_FIELDS = ("ways", "queries", "test_queries", "test_tasks", "meta_steps", "meta_batch", "hidden",
               "val_tasks", "eval_every", "image_size", "eval_attack_steps", "train_attack_steps",
               "audit_steps", "audit_restarts", "estimate_steps")


@dataclass(frozen=True)
class BenchmarkReproduction:
    """The settings of one benchmark's reproduction (paper Tables 1–3, S2–S3).

    The paper's settings (Sec. 6 and Appendix): Conv4, 5-way 1-shot and 5-shot, α = 0.01,
    meta learning rate 1e-3, 4 tasks a meta-batch, 15 query images a class, K = 5 inner steps
    at meta-training and 10 at meta-test (S-FT), PGD-10 as the training attack (FGSM for
    R-MAML_out-FGSM) and at test time; γ_out = 0.2 for AT (R-MAML_out, -ANIL, -FGSM), 5 for
    TRADES, ∞ for AQ (the method presets); ε = 2/255 on MiniImageNet, 8/255 on CIFAR-FS.

    Chosen here, and reported with the results: **10,000 meta-steps** (sized for one GPU:
    hours per run; the paper trains longer), second-order meta-gradients, Conv4 width 64
    (the dataset presets'), model selection every 500 steps on 100 meta-validation tasks, and
    **600 test tasks** (the paper: 2400; ``test_tasks``). ``reproduce`` times a few meta-steps
    on the machine before it starts and prints the estimated wall time.

    Left out: R-MAML_out-TRADES with unlabeled data and R-MAML_out-CL (Table 3's last rows)
    need an unlabeled image pool besides the few-shot splits; the methods here are those of
    `BENCHMARK_METHODS`.

    Attributes:
        dataset: the benchmark, as `robust_meta.datasets.load_benchmark` names it
            (``"miniimagenet"``, ``"cifar-fs"``).
        name: its display name (tables and plot titles).
        eps: ℓ∞ radius (training and test) in [0, 1] pixel units.
        image_size: the images' size in the files (84 for MiniImageNet, 32 for CIFAR-FS).
        methods: keys of `BENCHMARK_METHODS`.
        shots: the K of K-shot (one model per method and K).
        ways: N of the N-way tasks.
        queries, test_queries: query images a class at meta-training / at meta-test.
        test_tasks: meta-test tasks per (method, K) (the CI is over these).
        meta_steps, meta_batch: meta-updates and tasks per meta-update.
        hidden: Conv4 width.
        inner_steps, test_inner_steps: fine-tuning steps at meta-training / at meta-test.
        inner_lr, meta_lr: α and the Adam learning rate.
        first_order: FOMAML meta-gradients.
        train_attack_steps: PGD steps of the training attack (AT, AQ, TRADES, ANIL).
        eval_attack_steps: PGD steps of the test attack.
        gamma_out: per-method γ_out overrides (default none: the method presets).
        val_tasks, eval_every: meta-validation tasks and their period (model selection).
        seed: the seed of everything.
        audit_tasks: test tasks of the strong-attack audit (the first ones; 0: no audit).
        audit_steps, audit_restarts: the `robust_meta.StrongAttack` of the audit.
        audit_tolerance: a mean RA drop above this flags the row (default 3 points).
        estimate_steps: meta-steps timed per run for the wall-time estimate (after one
            warm-up step); not part of any result.
    """

    dataset: str
    name: str
    eps: float
    image_size: int
    methods: tuple[str, ...] = tuple(BENCHMARK_METHODS)
    shots: tuple[int, ...] = (1, 5)
    ways: int = 5
    queries: int = 15
    test_queries: int = 15
    test_tasks: int = 600
    meta_steps: int = 10000
    meta_batch: int = 4
    hidden: int = 64
    inner_steps: int = 5
    test_inner_steps: int = 10
    inner_lr: float = 0.01
    meta_lr: float = 1e-3
    first_order: bool = False
    train_attack_steps: int = 10
    eval_attack_steps: int = 10
    gamma_out: dict[str, float] = field(default_factory=dict)
    val_tasks: int = 100
    eval_every: int = 500
    seed: int = 0
    audit_tasks: int = 25
    audit_steps: int = 50
    audit_restarts: int = 2
    audit_tolerance: float = 0.03
    estimate_steps: int = 3

    def quick(self, **changes: Any) -> BenchmarkReproduction:
        """A CI-sized version of these settings: tiny model, a handful of steps and tasks."""
        base = dict(meta_steps=3, hidden=4, queries=2, test_queries=2, test_tasks=6, meta_batch=2,
                    val_tasks=2, eval_every=3, inner_steps=1, test_inner_steps=2, first_order=True,
                    eval_attack_steps=2, train_attack_steps=1, audit_tasks=2, audit_steps=4,
                    audit_restarts=1, estimate_steps=1)
        return self.replace(**{**base, **changes})

    def replace(self, **changes: Any) -> BenchmarkReproduction:
        """A copy with some settings changed (validated)."""
        return dataclasses.replace(self, **changes)

    def __post_init__(self) -> None:
        from .datasets import BENCHMARKS

        if self.dataset not in BENCHMARKS:
            raise ValueError(f"unknown benchmark dataset {self.dataset!r}; choose from {', '.join(BENCHMARKS)}")
        unknown = [m for m in self.methods if m not in BENCHMARK_METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown methods {unknown}; choose from {', '.join(BENCHMARK_METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods repeat: {list(self.methods)}")
        if (not self.shots or len(set(self.shots)) != len(self.shots)
                or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.shots)):
            raise ValueError(f"shots must be distinct integers >= 1, got {self.shots!r}")
        for name in _INT_FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "ways" else 1):
                raise ValueError(f"{name} must be an integer >= {2 if name == 'ways' else 1}, got {v!r}")
        for name in ("inner_steps", "test_inner_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.eps <= 1:
            raise ValueError(f"eps must lie in (0, 1] pixel units, got {self.eps}")
        check_audit_settings(self)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["methods"], d["shots"] = list(self.methods), list(self.shots)
        return d

    def train_config(self, method: str, shots: int, data_folder: str, device: str = "auto"):
        """The `robust_meta.train.TrainConfig` of one (method, K) run."""
        from .reproduce import _train_config

        return _train_config(self, BENCHMARK_METHODS, method, dataset=self.dataset, ways=self.ways,
                             shots=shots, data_folder=data_folder, device=device)


def check_audit_settings(settings: Any) -> None:
    """The audit fields every reproduction spec shares (``audit_tasks``, ``audit_tolerance``).

    Raises:
        ValueError: ``audit_tasks`` outside [0, test_tasks] or ``audit_tolerance`` outside [0, 1].
    """
    if not 0 <= settings.audit_tasks <= settings.test_tasks:
        raise ValueError(f"audit_tasks must lie in [0, test_tasks={settings.test_tasks}], got {settings.audit_tasks}")
    if not 0 <= settings.audit_tolerance <= 1:
        raise ValueError(f"audit_tolerance must lie in [0, 1], got {settings.audit_tolerance}")


#: One spec per benchmark: the paper's settings (``.quick()`` for CI).
#: ε and image size are the dataset presets' (`robust_meta.presets.DATASET_PRESETS`), not copies.
BENCHMARK_SPECS: dict[str, BenchmarkReproduction] = {
    key: BenchmarkReproduction(dataset=key, name=name, eps=DATASET_PRESETS[key].eps,
                               image_size=DATASET_PRESETS[key].image_size)
    for key, name in (("miniimagenet", "MiniImageNet"), ("cifar-fs", "CIFAR-FS"))
}


def benchmark_spec(name: str) -> BenchmarkReproduction:
    """The spec of benchmark ``name`` (``"miniimagenet"``, ``"cifar-fs"``).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    key = str(name).lower()
    if key not in BENCHMARK_SPECS:
        raise ValueError(f"unknown benchmark {name!r}; choose from omniglot, {', '.join(BENCHMARK_SPECS)}")
    return BENCHMARK_SPECS[key]
