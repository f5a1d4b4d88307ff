"""The paper's comparisons in one call: ``robust-meta reproduce omniglot`` / ``miniimagenet`` /
``cifar-fs``.

**MiniImageNet and CIFAR-FS** (`reproduce_benchmark`; one `BenchmarkReproduction` spec per
benchmark in `BENCHMARK_SPECS`): the paper's Tables 1–3 and S2–S3, 5-way 1-shot and 5-shot,
Conv4, ε = 2/255 (MiniImageNet) and 8/255 (CIFAR-FS), the methods of `BENCHMARK_METHODS`
(MAML, AQ, R-MAML_out (AT), -ANIL, -FGSM, (TRADES)), S-FT with 10 steps at test time, RA
under PGD-10 with the strong-attack audit below. One model per (method, K) in
``runs/<method>-<K>shot/``; ``results.json`` and ``table.md`` as for Omniglot (rows also carry
``"benchmark"``), the plot is ``<benchmark>_shots.png`` / ``.svg`` (grouped bars: SA and RA per
method, one bar per K). These runs are sized for a GPU: before training, a few meta-steps and
one test task of every run still to do are timed on the machine, and the estimated total wall
time is printed and recorded (``settings.estimate``).

**Omniglot** (`reproduce_omniglot`):

Wang et al. (ICLR 2021), Appendix 7 / Fig. S3: MAML, AQ and R-MAML_out on Omniglot,
1-shot N-way for N ∈ {5, 10, 15, 20}, robust accuracy under PGD at ε = 10/255. For every
method and every N one model is meta-trained on the **meta-train alphabets** (model selection
on the meta-validation alphabets) and evaluated on tasks of the **held-out test alphabets**
(SA; RA under PGD-10; mean and 95% CI over ``test_tasks`` tasks).

Files written in ``out``:

* ``runs/<method>-<N>way/``: the training run (``best.pt``, ``last.pt``, logs) and
  ``result.json`` (its evaluation);
* ``results.json``: ``{"runs": [{"method", "ways", "shots", "checkpoint", "sa": {"mean",
  "ci95"}, "ra": {"mean", "ci95"}, "eps", "train_seconds", "audit": {...}, ...}], "settings":
  {...}}``;
  ``checkpoint`` is relative to ``out`` and loads with
  `robust_meta.train.model_from_checkpoint` (its config holds the test-time ``inner_lr`` and
  ``test_inner_steps``);
* ``table.md`` and ``omniglot_ways.png`` / ``.svg`` (SA and RA versus N, one line per
  method, 95% CI bands).

**A strong-attack audit of every RA.** On the first ``audit_tasks`` test tasks each model is
also attacked by a `robust_meta.StrongAttack` (PGD-``audit_steps`` with step ε/4,
``audit_restarts`` random restarts × {cross-entropy, logit margin}, per-image worst case),
on the same fine-tuned weights and random streams (`robust_meta.audit`); the row's
``"audit"`` holds the protocol RA, the strong RA, the worst case of both and the drop, and a
drop above ``audit_tolerance`` is flagged (an `robust_meta.AuditWarning` and a mark in
``table.md``).

**Resumable, and never on other data.** Every file is written atomically. A finished run is
reused only when everything that defines its result is the same: the settings, the evaluation
protocol (`robust_meta.evaluation.EVAL_PROTOCOL`) and the data — their *content* and class
split (`robust_meta.train.data_identity`), not the folder's path: adding
``images_background_small2.zip`` next to ``small1`` changes the alphabet split, so every run
is trained again, never scored on alphabets it was trained on. An interrupted run resumes
from its ``last.pt`` (bitwise the same as an uninterrupted run on the CPU), also through
another path to the same data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._reproduce_report import PAPER_NAMES, plot_shots, plot_ways, results_table
from ._reproduce_specs import (
    BENCHMARK_METHODS,
    BENCHMARK_SPECS,
    BenchmarkReproduction,
    benchmark_spec,
    check_audit_settings,
)

__all__ = [
    "ALL_METHODS",
    "BENCHMARK_METHODS",
    "BENCHMARK_SPECS",
    "BenchmarkReproduction",
    "OMNIGLOT_METHODS",
    "PROTONET_METHODS",
    "OmniglotReproduction",
    "PAPER_NAMES",
    "benchmark_spec",
    "plot_shots",
    "plot_ways",
    "reproduce_benchmark",
    "reproduce_omniglot",
    "results_table",
]

#: The methods compared, as ``TrainConfig`` options (the paper's; the default of ``reproduce``).
OMNIGLOT_METHODS: dict[str, dict[str, Any]] = {
    "maml": {"method": "maml"},
    "aq": {"method": "aq", "attack": "pgd"},
    "rmaml-out-at": {"method": "rmaml-out", "attack": "pgd"},
    "rmaml-out-trades": {"method": "rmaml-out-trades", "attack": "pgd"},
    "rmaml-out-fgsm": {"method": "rmaml-out", "attack": "fgsm"},
}
#: The same objectives with a ProtoNet learner (`robust_meta.ProtoNetHead`): ``--methods
#: protonet,protonet-aq,...``. Evaluated with running batch-norm statistics, as ProtoNets are.
PROTONET_METHODS: dict[str, dict[str, Any]] = {
    "protonet": {"method": "maml", "learner": "protonet"},
    "protonet-aq": {"method": "aq", "attack": "pgd", "learner": "protonet"},
    "rprotonet-out-at": {"method": "rmaml-out", "attack": "pgd", "learner": "protonet"},
    "rprotonet-out-trades": {"method": "rmaml-out-trades", "attack": "pgd", "learner": "protonet"},
    "rprotonet-out-fgsm": {"method": "rmaml-out", "attack": "fgsm", "learner": "protonet"},
}
#: Every method ``reproduce omniglot --methods`` accepts.
ALL_METHODS: dict[str, dict[str, Any]] = {**OMNIGLOT_METHODS, **PROTONET_METHODS}

#: γ_out chosen on the meta-validation alphabets (5-way pilot, 400 meta-steps): γ = 1 gave
#: higher validation RA than the paper's 0.2 at the same SA for AT (68.3 vs 62.9 %) and FGSM
#: (66.5 vs 60.9 %); TRADES keeps the paper's 5 (val RA 70.4 %).
TUNED_GAMMA_OUT: dict[str, float] = {"rmaml-out-at": 1.0, "rmaml-out-fgsm": 1.0,
                                     # not tuned separately: the MAML rows' values
                                     "rprotonet-out-at": 1.0, "rprotonet-out-fgsm": 1.0}

@dataclass(frozen=True)
class OmniglotReproduction:
    """Settings of the reproduction (defaults: about an hour on a 2-core CPU).

    The paper fixes ε = 10/255, 1-shot, N ∈ {5, 10, 15, 20}, Conv4, PGD-10 at test time,
    4 tasks a meta-batch, K = 5 inner steps at training and 10 at test. What it leaves open,
    or what a 2-core CPU cannot afford at the paper's scale, is set here and reported with
    the results: Conv4 width 32, first-order meta-gradients, 400 meta-steps, 5 query images a
    class, PGD-3 as the training attack of AT/AQ/TRADES (FGSM for R-MAML_out-FGSM), and the
    inner step α = 0.1, chosen on the **meta-validation** alphabets (5-way: val SA 80% with
    α = 0.1 against 67% with MAML's usual Omniglot α = 0.4 at K = 5 steps; see
    docs/reproducing.md).

    Attributes:
        methods: keys of `OMNIGLOT_METHODS`.
        ways: the N of the N-way tasks (one model per method and N).
        shots: K of K-shot (support images a class).
        queries, test_queries: query images a class at meta-training / at meta-test.
        test_tasks: meta-test tasks per (method, N) (the CI is over these).
        meta_steps, meta_batch: meta-updates and tasks per meta-update.
        hidden: Conv4 width.
        inner_steps, test_inner_steps: fine-tuning steps at meta-training / at meta-test.
        inner_lr, meta_lr: α and the Adam learning rate.
        first_order: FOMAML meta-gradients.
        eps: ℓ∞ radius (training and test) in [0, 1] pixel units.
        train_attack_steps: PGD steps of the training attack (AT, AQ, TRADES).
        eval_attack_steps: PGD steps of the test attack.
        gamma_out: per-method γ_out (default `TUNED_GAMMA_OUT`: 1 for AT and FGSM, chosen on
            meta-validation; methods not listed use their presets: 5 for TRADES).
        val_tasks, eval_every: meta-validation tasks and their period (model selection).
        image_size: Omniglot images are resized to this.
        seed: the seed of everything.
        audit_tasks: test tasks of the strong-attack audit (the first ones; 0: no audit).
        audit_steps, audit_restarts: the `robust_meta.StrongAttack` of the audit.
        audit_tolerance: a mean RA drop above this flags the row (default 3 points).
    """

    methods: tuple[str, ...] = tuple(OMNIGLOT_METHODS)
    ways: tuple[int, ...] = (5, 10, 15, 20)
    shots: int = 1
    queries: int = 5
    test_queries: int = 5
    test_tasks: int = 600
    meta_steps: int = 400
    meta_batch: int = 4
    hidden: int = 32
    inner_steps: int = 5
    test_inner_steps: int = 10
    inner_lr: float = 0.1
    meta_lr: float = 1e-3
    first_order: bool = True
    eps: float = 10 / 255
    train_attack_steps: int = 3
    eval_attack_steps: int = 10
    gamma_out: dict[str, float] = field(default_factory=lambda: dict(TUNED_GAMMA_OUT))
    val_tasks: int = 40
    eval_every: int = 100
    image_size: int = 28
    seed: int = 0
    audit_tasks: int = 25
    audit_steps: int = 50
    audit_restarts: int = 2
    audit_tolerance: float = 0.03

    @classmethod
    def quick(cls, **changes: Any) -> OmniglotReproduction:
        """A few-minute version for CI: tiny model, a handful of steps and tasks."""
        base = dict(meta_steps=3, hidden=8, test_tasks=8, val_tasks=4, eval_every=3,
                    inner_steps=1, test_inner_steps=2, eval_attack_steps=2, train_attack_steps=1,
                    audit_tasks=3, audit_steps=4, audit_restarts=1)
        return cls(**{**base, **changes})

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown methods {unknown}; choose from {', '.join(ALL_METHODS)}")
        if not self.ways or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in self.ways):
            raise ValueError(f"ways must be integers >= 2, got {self.ways!r}")
        if self.shots + max(self.queries, self.test_queries) > 20:
            raise ValueError(
                f"shots + queries = {self.shots + max(self.queries, self.test_queries)} > 20: "
                "Omniglot has 20 drawings of each character"
            )
        for name in ("test_tasks", "meta_steps", "meta_batch", "hidden", "val_tasks", "eval_every",
                     "audit_steps", "audit_restarts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_audit_settings(self)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["methods"], d["ways"] = list(self.methods), list(self.ways)
        return d

    def train_config(self, method: str, ways: int, data_folder: str, device: str = "auto"):
        """The `robust_meta.train.TrainConfig` of one run."""
        return _train_config(self, ALL_METHODS, method,
                             dataset=f"omniglot-{ways}way" if ways in (5, 10, 15, 20) else "omniglot",
                             ways=ways, shots=self.shots, data_folder=data_folder, device=device)


def _train_config(settings: Any, table: dict[str, dict[str, Any]], method: str, *, dataset: str, ways: int,
                  shots: int, data_folder: str, device: str):
    """The resolved `robust_meta.train.TrainConfig` of one run of a reproduction (Omniglot or a
    benchmark: both settings classes share these field names)."""
    from .train import TrainConfig

    opts = dict(table[method])
    attack_steps = 1 if opts.get("attack") == "fgsm" else settings.train_attack_steps
    if opts["method"] == "maml":
        attack_steps = None
    if method in settings.gamma_out:
        opts["gamma_out"] = float(settings.gamma_out[method])
    return TrainConfig(
        dataset=dataset, data_folder=str(data_folder), ways=ways, shots=shots, queries=settings.queries,
        meta_batch=settings.meta_batch, meta_steps=settings.meta_steps, inner_steps=settings.inner_steps,
        test_inner_steps=settings.test_inner_steps, inner_lr=settings.inner_lr, meta_lr=settings.meta_lr,
        first_order=settings.first_order, eps=settings.eps, attack_steps=attack_steps,
        eval_attack_steps=settings.eval_attack_steps, eval_every=settings.eval_every,
        val_tasks=settings.val_tasks, hidden=settings.hidden, image_size=settings.image_size,
        seed=settings.seed, device=device, save_every=max(1, settings.eval_every // 2), **opts,
    ).resolved()


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _run_settings(settings: OmniglotReproduction, method: str, ways: int, data_id: Any) -> dict[str, Any]:
    """Everything that defines one run's result (its reuse key): settings, data, protocol."""
    from .evaluation import EVAL_PROTOCOL

    keep = settings.to_dict()
    keep.pop("methods"), keep.pop("ways")
    keep["gamma_out"] = settings.gamma_out.get(method)
    return {"method": method, "ways": ways, "settings": keep, "data": data_id,
            "protocol": EVAL_PROTOCOL}


def reproduce_omniglot(
    data_folder: str | Path,
    out: str | Path,
    *,
    settings: OmniglotReproduction | None = None,
    device: str = "auto",
    progress: bool = True,
    workers: int = 1,
) -> dict[str, Any]:
    """Train and evaluate every method at every N; write results.json, table.md and the plot.

    Args:
        data_folder: Omniglot: the official zips or their extracted folders (see
            `robust_meta.datasets.load_omniglot`).
        out: output folder (created; a second call resumes and skips finished runs).
        settings: the configuration (default `OmniglotReproduction()`; ``.quick()`` for CI).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        progress: a progress bar per method (and, with one worker, the training/evaluation
            bars inside).
        workers: runs done at once, each in its own process with ``cores // workers`` threads.
            The runs are the same; their numbers can differ in the last bits with the thread
            count (float summation order).

    Returns:
        The ``results.json`` document.

    Raises:
        FileNotFoundError: no Omniglot at ``data_folder``.
        ValueError: bad settings, or a split with fewer classes than the largest N.
    """
    from . import data as D
    from ._train_data import omniglot_identity, omniglot_split_for

    settings = OmniglotReproduction() if settings is None else settings
    if not isinstance(settings, OmniglotReproduction):
        raise TypeError(f"settings must be an OmniglotReproduction, got {type(settings).__name__}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = D.load_omniglot(data_folder, image_size=settings.image_size)
    splits = omniglot_split_for(data)
    data_id = omniglot_identity(data, splits)
    for split in ("val", "test"):
        part = data.split(splits, split)
        if part.num_classes < max(settings.ways):
            raise ValueError(
                f"the Omniglot {split} split has {part.num_classes} classes (alphabets "
                f"{list(getattr(splits, split))}), fewer than ways={max(settings.ways)}"
            )
    t_start = time.perf_counter()
    jobs = [(m, n) for m in settings.methods for n in settings.ways]
    records: dict[tuple[str, int], dict[str, Any]] = {}
    for m, n in jobs:
        done = _finished_record(out, settings, m, n, data_id)
        if done is not None:
            records[(m, n)] = done
    folder = str(Path(data_folder).resolve())

    def run_here(job: tuple[str, int], bar: Any) -> dict[str, Any]:
        return _run_one(data, splits, data_id, settings, job[0], job[1], out, folder, device,
                        progress and workers == 1, bar)

    _do_jobs(jobs, records, settings.methods, run_here, _pool_job,
             lambda job: (folder, settings, job[0], job[1], str(out), device), workers=workers,
             progress=progress)

    runs = [{k: v for k, v in records[j].items() if k != "key"} for j in jobs]
    doc = {
        "runs": runs,
        "settings": {
            **settings.to_dict(),
            "data_folder": str(data_folder),
            "splits": splits.to_dict(),
            "data_sha256": data_id["sha256"],
            "classes": {s: data.split(splits, s).num_classes for s in ("train", "val", "test")},
            "device": device,
            "workers": workers,
            "wall_seconds_this_call": time.perf_counter() - t_start,
        },
    }
    _write_outputs(doc, out, plot_ways, out / "omniglot_ways.png")
    return doc


def _write_outputs(doc: dict[str, Any], out: Path, plot: Any, plot_path: Path) -> None:
    """``results.json``, ``table.md`` and the plot (PNG + SVG; none without matplotlib)."""
    from ._io import atomic_write_json, atomic_write_text

    atomic_write_json(doc, out / "results.json")
    atomic_write_text(results_table(doc), out / "table.md")
    try:
        plot(doc, plot_path)
    except ImportError as err:  # matplotlib is the [demo] extra
        print(f"no plot written: {err}")


def _bar_class(progress: bool) -> Any:
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a core dependency
        return None
    return tqdm


def _do_jobs(jobs: list[tuple[str, int]], records: dict[tuple[str, int], dict[str, Any]],
             methods: tuple[str, ...], run_here: Any, pool_job: Any, pool_args: Any, *, workers: int,
             progress: bool) -> None:
    """Do the ``(method, n)`` jobs not in ``records`` (filled in), here or in ``workers`` processes.

    ``run_here(job, bar)`` does one job in this process; ``pool_job(pool_args(job))`` in a worker.
    One progress bar per method; with workers, the largest ``n`` first (the slowest runs: better
    packing).
    """
    from ._cpus import usable_cpus

    bar_cls = _bar_class(progress)
    bars = {}
    if bar_cls is not None:
        for i, m in enumerate(methods):
            mine = [j for j in jobs if j[0] == m]
            bars[m] = bar_cls(total=len(mine), initial=sum(j in records for j in mine), desc=m, unit="run",
                              position=i)
    todo = [j for j in jobs if j not in records]
    try:
        if workers == 1 or len(todo) <= 1:
            for job in todo:
                records[job] = run_here(job, bars.get(job[0]))
                if job[0] in bars:
                    bars[job[0]].update(1)
        else:
            import multiprocessing as mp

            threads = max(1, usable_cpus() // workers)
            todo.sort(key=lambda j: -j[1])  # the widest (slowest) runs first: better packing
            ctx = mp.get_context("spawn")
            with ctx.Pool(workers, initializer=_init_worker, initargs=(threads,)) as pool:
                for job, rec in zip(todo, pool.imap(pool_job, [pool_args(j) for j in todo])):
                    records[job] = rec
                    if job[0] in bars:
                        bars[job[0]].update(1)
                # Shut down cleanly: the workers exit on the sentinel. (Leaving it to the
                # context manager's terminate() can deadlock on the task queue's lock, which an
                # idle worker holds while it waits, when a worker is killed.)
                pool.close()
                pool.join()
    finally:
        for bar in bars.values():
            bar.close()


def _init_worker(threads: int) -> None:
    import torch

    from .fast import tune_malloc

    torch.set_num_threads(threads)
    tune_malloc()  # a worker process is robust-meta's own (ROBUST_META_MALLOPT=0: off)


def _pool_job(args: tuple) -> dict[str, Any]:
    """One (method, N) run in a worker process (data from the on-disk cache)."""
    from . import data as D
    from ._train_data import omniglot_identity, omniglot_split_for

    folder, settings, method, ways, out, device = args
    device = _worker_device(device)
    data = D.load_omniglot(folder, image_size=settings.image_size)
    splits = omniglot_split_for(data)
    return _run_one(data, splits, omniglot_identity(data, splits), settings, method, ways, Path(out),
                    folder, device, False, None)


def _worker_device(device: str, index: int | None = None, cuda_count: int | None = None) -> str:
    """The device of pool worker ``index`` (default: this process's): on CUDA, worker i takes
    ``cuda:(i mod GPUs)`` instead of every worker sharing GPU 0; other devices as given."""
    import multiprocessing as mp

    import torch

    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dev.type != "cuda" or dev.index is not None:
        return device
    if index is None:
        identity = mp.current_process()._identity  # (1,), (2,), ... in a Pool; () in the parent
        index = identity[0] - 1 if identity else 0
    if cuda_count is None:
        cuda_count = torch.cuda.device_count()
    return f"cuda:{index % max(1, cuda_count)}"


def _finished_record(out: Path, settings: OmniglotReproduction, method: str, ways: int, data_id: Any):
    """The stored ``result.json`` of a run if it is for exactly these settings, data and protocol."""
    return _stored_record(out / "runs" / f"{method}-{ways}way" / "result.json",
                          _fingerprint(_run_settings(settings, method, ways, data_id)))


def _stored_record(path: Path, key: str) -> dict[str, Any] | None:
    """The ``result.json`` at ``path`` if its reuse key is ``key``."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return old if isinstance(old, dict) and old.get("key") == key else None


def _run_one(data, splits, data_id, settings, method, ways, out, folder, device, progress, bar) -> dict[str, Any]:
    """Train (or resume) and evaluate one (method, N) run; write its ``result.json``."""
    from . import data as D
    from ._rng import step_seed

    def test_tasks() -> list:
        sampler = D.omniglot_task_sampler(
            data, splits, "test", ways=ways, shots=settings.shots, queries=settings.test_queries,
            seed=step_seed(settings.seed, f"test:{ways}") % 2**62,
        )
        return sampler.sample(settings.test_tasks)

    return _train_and_score(
        out / "runs" / f"{method}-{ways}way", _fingerprint(_run_settings(settings, method, ways, data_id)),
        settings.train_config(method, ways, folder, device=device), data_id, test_tasks, settings,
        {"method": method, "ways": ways, "shots": settings.shots}, out, device, progress, bar,
        f"{ways}-way",
    )


def _train_and_score(run_dir: Path, key: str, cfg: Any, data_id: Any, test_tasks: Any, settings: Any,
                     row: dict[str, Any], out: Path, device: str, progress: bool, bar: Any,
                     label: str) -> dict[str, Any]:
    """Train (or resume) ``cfg`` in ``run_dir``, evaluate it on ``test_tasks()`` (SA; RA under
    PGD-``settings.eval_attack_steps``), audit it, and write its ``result.json`` (``row`` first)."""
    from ._io import atomic_write_json
    from ._train_config import resolve_device
    from .anil import ANILHead
    from .attacks import StrongAttack
    from .auditing import audit
    from .evaluation import EVAL_PROTOCOL, evaluate
    from .metric import learner_from_checkpoint
    from .presets import method_preset
    from .train import model_from_checkpoint, train

    if bar is not None:
        bar.set_postfix_str(f"{label}: training")
    best = run_dir / "best.pt"
    state = _training_state(run_dir, cfg, data_id)
    if state == "finished":
        train_seconds = _previous_train_seconds(run_dir)
    else:
        if state == "other":  # trained on other data or settings: never reused
            (run_dir / "train_time.json").unlink(missing_ok=True)
        t0 = time.perf_counter()
        previous = _previous_train_seconds(run_dir) if state == "resume" else 0.0
        best = train(cfg, out_dir=run_dir, resume=state == "resume", overwrite=state == "other",
                     progress=progress)
        train_seconds = time.perf_counter() - t0 + previous
        atomic_write_json({"train_seconds": train_seconds}, run_dir / "train_time.json")
    if bar is not None:
        bar.set_postfix_str(f"{label}: evaluating")
    dev = resolve_device(device)
    model, config, ckpt = model_from_checkpoint(best, device=dev)
    tasks = test_tasks()
    learner = learner_from_checkpoint(model, config, ckpt)
    # Metric learners meta-test with running batch-norm statistics (their papers); MAML with batch ones.
    protocol = dict(steps=config.test_inner_steps, step_size=config.inner_lr, learner=learner,
                    train_mode=True if learner is None else False,
                    attack_steps=settings.eval_attack_steps, seed=settings.seed, progress=progress)
    if method_preset(config.method).anil:  # fine-tunes the head only, as it was meta-trained
        protocol["anil"] = ANILHead(model)
    t0 = time.perf_counter()
    res = evaluate(model, tasks, eps=settings.eps, attacks=("pgd",), checks=False, **protocol)
    eval_seconds = time.perf_counter() - t0
    sa, ra = res.metrics["sa"], res.metrics["ra"]
    record = {
        "key": key,
        **row,
        "checkpoint": str(best.relative_to(out)) if best.is_relative_to(out) else str(best),
        "sa": {"mean": sa.mean, "ci95": sa.ci95},
        "ra": {"mean": ra.mean, "ci95": ra.ci95},
        "eps": settings.eps,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "n_tasks": res.n_tasks,
        "attack": f"PGD-{settings.eval_attack_steps}",
        "learner": cfg.learner,
        "train_mode": res.settings["train_mode"],
        "protocol": EVAL_PROTOCOL,
        "device": res.settings["device"],
        "device_name": res.settings["device_name"],
    }
    if settings.audit_tasks:
        if bar is not None:
            bar.set_postfix_str(f"{label}: audit")
        strong = StrongAttack(steps=settings.audit_steps, restarts=settings.audit_restarts)
        t0 = time.perf_counter()
        au = audit(model, tasks[: settings.audit_tasks], eps=settings.eps, strong=strong,
                   tolerance=settings.audit_tolerance, **protocol)
        record["audit"] = {**au.to_dict(), "seconds": time.perf_counter() - t0}
    atomic_write_json(record, run_dir / "result.json")
    return record


def _training_state(run_dir: Path, cfg: Any, data_id: Any) -> str:
    """``"finished"``, ``"resume"``, ``"new"`` (no run) or ``"other"`` (a run on other data/settings).

    A run counts as this one only if ``last.pt`` holds exactly this config (the data folder's
    path aside) and was trained on data of this `robust_meta.train.data_identity`; a
    ``last.pt`` without a data identity (robust-meta < 0.3) cannot be checked and is redone.
    """
    from .train import CheckpointError, load_checkpoint

    last_path = run_dir / "last.pt"
    if not last_path.is_file():
        return "new"
    try:
        last = load_checkpoint(last_path)
    except (CheckpointError, OSError):
        return "other"
    old, new = type(cfg).saved_dict(last.get("config", {})), cfg.to_dict()
    old.pop("data_folder", None), new.pop("data_folder", None)
    if old != new or last.get("extra", {}).get("data") != data_id:
        return "other"
    if last.get("step") == cfg.meta_steps and (run_dir / "best.pt").is_file():
        return "finished"
    return "resume"


def _previous_train_seconds(run_dir: Path) -> float:
    try:
        return float(json.loads((run_dir / "train_time.json").read_text())["train_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


# ---------------------------------------------------------------------------- the benchmarks


def _benchmark_run_settings(settings: BenchmarkReproduction, method: str, shots: int, data_id: Any) -> dict[str, Any]:
    """Everything that defines one benchmark run's result (its reuse key)."""
    from .evaluation import EVAL_PROTOCOL

    keep = settings.to_dict()
    for name in ("methods", "shots", "name", "estimate_steps"):  # not part of this run's result
        keep.pop(name)
    keep["gamma_out"] = settings.gamma_out.get(method)
    return {"benchmark": settings.dataset, "method": method, "shots": shots, "settings": keep,
            "data": data_id, "protocol": EVAL_PROTOCOL}


def _run_name(method: str, shots: int) -> str:
    return f"{method}-{shots}shot"


def _benchmark_data(settings: BenchmarkReproduction, folder: str) -> tuple[Any, Any]:
    """(data identity, test split) of the benchmark in ``folder``, checked against the settings:
    image size, classes ≥ ways and images a class ≥ shots + queries in every split."""
    from .data import TaskSampler
    from .datasets import load_benchmark
    from .train import build_task_sources, data_identity

    widest = max(settings.shots)
    cfg = settings.train_config(settings.methods[0], widest, folder, device="cpu")
    data_id = data_identity(build_task_sources(cfg))
    test = load_benchmark(settings.dataset, folder, "test")
    TaskSampler(test.images, test.labels, ways=settings.ways, shots=widest, queries=settings.test_queries)
    return data_id, test


def _benchmark_test_tasks(settings: BenchmarkReproduction, test: Any, shots: int, n: int | None = None) -> list:
    """The first ``n`` (default ``test_tasks``) seeded K-shot test tasks of the held-out classes."""
    from ._rng import step_seed
    from .data import TaskSampler

    sampler = TaskSampler(test.images, test.labels, ways=settings.ways, shots=shots,
                          queries=settings.test_queries,
                          seed=step_seed(settings.seed, f"test:{shots}shot") % 2**62)
    return sampler.sample(settings.test_tasks if n is None else n)


def _run_benchmark_one(data_id: Any, test: Any, settings: BenchmarkReproduction, method: str, shots: int,
                       out: Path, folder: str, device: str, progress: bool, bar: Any) -> dict[str, Any]:
    """Train (or resume) and evaluate one (method, K) run; write its ``result.json``."""
    return _train_and_score(
        out / "runs" / _run_name(method, shots),
        _fingerprint(_benchmark_run_settings(settings, method, shots, data_id)),
        settings.train_config(method, shots, folder, device=device), data_id,
        lambda: _benchmark_test_tasks(settings, test, shots), settings,
        {"method": method, "ways": settings.ways, "shots": shots, "benchmark": settings.dataset},
        out, device, progress, bar, f"{shots}-shot",
    )


def _benchmark_pool_job(args: tuple) -> dict[str, Any]:
    """One (method, K) run in a worker process."""
    folder, settings, method, shots, out, device = args
    device = _worker_device(device)
    data_id, test = _benchmark_data(settings, folder)
    return _run_benchmark_one(data_id, test, settings, method, shots, Path(out), folder, device, False, None)


class _StopTiming(Exception):
    """Raised from the timing run's callback: enough meta-steps were timed."""


def _seconds_per_meta_step(cfg: Any, steps: int) -> float:
    """Seconds a meta-step of ``cfg`` takes here: a throwaway run (temporary folder) of
    ``steps`` timed meta-steps after one warm-up step, stopped before any validation."""
    import tempfile

    from .train import train

    stamps: list[float] = []

    def tick(step: int, record: Any) -> None:
        stamps.append(time.perf_counter())
        if step == steps + 1:
            raise _StopTiming

    probe = cfg.replace(meta_steps=steps + 2, eval_every=steps + 2, save_every=steps + 2, val_tasks=1)
    with tempfile.TemporaryDirectory(prefix="robust-meta-timing-") as tmp:
        try:
            train(probe, out_dir=tmp, progress=False, callback=tick)
        except _StopTiming:
            pass
    return (stamps[-1] - stamps[0]) / steps


def _seconds_per_test_task(cfg: Any, settings: BenchmarkReproduction, test: Any, shots: int, device: str) -> float:
    """Seconds the test protocol (S-FT, clean + PGD) takes for one task with ``cfg``'s model here."""
    from ._checkpoint import build_model_for
    from ._train_config import resolve_device
    from .anil import ANILHead
    from .evaluation import evaluate
    from .presets import method_preset

    dev = resolve_device(device)
    model = build_model_for(cfg).to(dev)
    extra = {"anil": ANILHead(model)} if method_preset(cfg.method).anil else {}
    tasks = _benchmark_test_tasks(settings, test, shots, n=1)
    t0 = time.perf_counter()
    evaluate(model, tasks, eps=settings.eps, attacks=("pgd",), checks=False, steps=cfg.test_inner_steps,
             step_size=cfg.inner_lr, train_mode=True, attack_steps=settings.eval_attack_steps,
             seed=settings.seed, progress=False, **extra)
    return time.perf_counter() - t0


def _estimate(settings: BenchmarkReproduction, todo: list[tuple[str, int]], test: Any, folder: str,
              device: str, workers: int) -> dict[str, Any]:
    """Time ``estimate_steps`` meta-steps (and one test task) of every run to do; the estimated
    wall time of all of them (training, validation, test, audit), printed and returned."""
    from ._train_config import resolve_device

    dev = str(resolve_device(device))
    if not todo:
        print("estimated total wall time: 0 s (every run is finished)")
        return {"total_seconds": 0.0, "runs": 0, "device": dev}
    print(f"timing {settings.estimate_steps} meta-step(s) of each of the {len(todo)} runs to do on {dev} ...",
          flush=True)
    per_step: dict[str, float] = {}
    per_task: dict[str, float] = {}
    total = 0.0
    # audit per task: the protocol's attack plus 2 losses × restarts × audit_steps strong steps
    audit_factor = 1 + 2 * settings.audit_restarts * settings.audit_steps / settings.eval_attack_steps
    validations = settings.meta_steps // settings.eval_every + (settings.meta_steps % settings.eval_every > 0)
    for method, shots in todo:
        cfg = settings.train_config(method, shots, folder, device=device)
        s_step = per_step[_run_name(method, shots)] = _seconds_per_meta_step(cfg, settings.estimate_steps)
        s_task = per_task[_run_name(method, shots)] = _seconds_per_test_task(cfg, settings, test, shots, device)
        total += (settings.meta_steps * s_step + validations * settings.val_tasks * s_task
                  + settings.test_tasks * s_task + settings.audit_tasks * s_task * audit_factor)
    measured = ", ".join(f"{v:.3g} s per meta-step for {k}" for k, v in per_step.items())
    print(f"estimated total wall time: {_duration(total)} for {len(todo)} runs of {settings.meta_steps} "
          f"meta-steps on {dev}, one at a time"
          + (f" (about {_duration(total / min(workers, len(todo)))} with {workers} workers at best)"
             if workers > 1 and len(todo) > 1 else "")
          + f" (measured: {measured}; {max(per_task.values()):.3g} s per test task at most)", flush=True)
    return {"total_seconds": total, "runs": len(todo), "device": dev, "timing_steps": settings.estimate_steps,
            "seconds_per_meta_step": per_step, "seconds_per_test_task": per_task,
            "validations_per_run": validations}


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def reproduce_benchmark(
    name: str,
    data_folder: str | Path,
    out: str | Path,
    *,
    settings: BenchmarkReproduction | None = None,
    device: str = "auto",
    progress: bool = True,
    workers: int = 1,
    estimate: bool = True,
) -> dict[str, Any]:
    """The paper's comparison on ``name`` (``"miniimagenet"``, ``"cifar-fs"``): train and evaluate
    every method at every K; write results.json, table.md and ``<name>_shots.png/.svg``.

    Every (method, K) run lies in ``out/runs/<method>-<K>shot/``; like `reproduce_omniglot` it is
    resumable and reused only for the same settings, evaluation protocol and data identity, and
    every RA is audited with a `robust_meta.StrongAttack`.

    Args:
        name: the benchmark (a key of `BENCHMARK_SPECS`).
        data_folder: its files, any layout `robust_meta.datasets.load_benchmark` reads.
        out: output folder (created; a second call resumes and skips finished runs).
        settings: the configuration (default ``BENCHMARK_SPECS[name]``; ``.quick()`` for CI);
            its ``dataset`` must be ``name``.
        device, progress, workers: as for `reproduce_omniglot`.
        estimate: first time ``settings.estimate_steps`` meta-steps and one test task of every
            run still to do on this machine, print the estimated total wall time and record it
            in ``results.json`` (``settings.estimate``).

    Returns:
        The ``results.json`` document.

    Raises:
        ValueError: unknown benchmark, bad settings, or data that do not fit them (image size,
            too few classes or images a class).
        FileNotFoundError: no such benchmark at ``data_folder``.
    """
    spec = benchmark_spec(name)
    settings = spec if settings is None else settings
    if not isinstance(settings, BenchmarkReproduction):
        raise TypeError(f"settings must be a BenchmarkReproduction, got {type(settings).__name__}")
    if settings.dataset != spec.dataset:
        raise ValueError(f"settings are for {settings.dataset!r}, not {spec.dataset!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    out = Path(out)
    folder = str(Path(data_folder).expanduser().resolve())
    data_id, test = _benchmark_data(settings, folder)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    jobs = [(m, k) for m in settings.methods for k in settings.shots]
    records: dict[tuple[str, int], dict[str, Any]] = {}
    for m, k in jobs:
        done = _stored_record(out / "runs" / _run_name(m, k) / "result.json",
                              _fingerprint(_benchmark_run_settings(settings, m, k, data_id)))
        if done is not None:
            records[(m, k)] = done
    todo = [j for j in jobs if j not in records]
    timing = _estimate(settings, todo, test, folder, device, workers) if estimate else None

    def run_here(job: tuple[str, int], bar: Any) -> dict[str, Any]:
        return _run_benchmark_one(data_id, test, settings, job[0], job[1], out, folder, device,
                                  progress and workers == 1, bar)

    _do_jobs(jobs, records, settings.methods, run_here, _benchmark_pool_job,
             lambda job: (folder, settings, job[0], job[1], str(out), device), workers=workers,
             progress=progress)
    doc = {
        "runs": [{k: v for k, v in records[j].items() if k != "key"} for j in jobs],
        "settings": {
            **settings.to_dict(),
            "benchmark": settings.dataset,
            "data_folder": str(data_folder),
            "classes": {s: len(c) for s, c in (data_id or {}).get("classes", {}).items()},
            "device": device,
            "workers": workers,
            "estimate": timing,
            "wall_seconds_this_call": time.perf_counter() - t_start,
        },
    }
    _write_outputs(doc, out, plot_shots, out / f"{settings.dataset}_shots.png")
    return doc
