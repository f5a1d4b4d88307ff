"""A complete meta-training loop for every method, with checkpoints, resume and logs.

`train` runs MAML / R-MAML_out / R-MAML_both / AQ / ANIL / CL / TRADES(+unlabeled)
from one `TrainConfig` (see `robust_meta.presets`), on the core pieces
(`robust_meta.adapt`, `robust_meta.RobustMetaUpdate`, `robust_meta.ANILHead`).
It is what ``robust-meta train`` and ``robust-meta demo`` call.

**Reproducibility and resume.** The randomness of meta-step ``s`` (its task batch, attack
random starts, augmentations) is drawn from generators re-seeded from ``(seed, s)`` at the
start of the step, and validation runs on its own forked generator. A run's trajectory is
therefore a function of the config alone: resuming from a checkpoint gives bitwise the
same weights as an uninterrupted run on the same CPU (on GPUs, up to the nondeterminism of
cuDNN kernels). Checkpoints also store the generator states (torch, numpy, Python
``random``) and restore them.

**Model selection** uses META-VALIDATION tasks (classes disjoint from the training and test
classes), never the test split. The criterion is ``config.select``: ``"sa+ra"`` (default:
clean accuracy plus PGD robust accuracy at the training ε, after standard fine-tuning),
``"sa"``, ``"ra"`` or ``"last"``.

**Catastrophic overfitting.** When the training attack is one-step (FGSM), validation also
measures the FGSM robust accuracy; `OverfittingMonitor` flags (``warnings.warn`` and
the ``catastrophic_overfitting`` log field) a collapse of PGD accuracy while the FGSM one
holds or rises (Wong et al., "Fast is better than free", ICLR 2020).

**Interruptions.** Whatever stops a run, the files on disk are one consistent step
boundary: SIGINT and SIGTERM discard the step in progress and write the state at the end of
the last completed one (an in-memory snapshot taken at every step boundary: parameters,
buffers, optimizer, generator states, model selection, log rows); SIGKILL loses at most the
steps since the last ``last.pt``. ``last.pt`` carries a copy of ``best.pt`` and the number of
log rows, so that ``resume`` can make the other files agree with it again. See `train`.

Files written in ``out_dir``: ``last.pt`` (full state, for ``resume``), ``best.pt`` (the
selected model), ``config.json``, ``log.jsonl`` and ``log.csv``, all atomically.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed as dist_
from . import fast as _fast
from ._checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CheckpointError,
    _check_model_matches,
    _signature,
    build_model_for,
    checkpoint_state,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    to_cpu,
)
from ._io import atomic_save, remove_stale_temps
from ._io import atomic_write_text as _atomic_write_text
from ._rng import forked_rng as _forked_rng
from ._rng import rng_state as _rng_state
from ._rng import seed_all as _seed_all
from ._rng import set_rng_state as _set_rng_state
from ._rng import step_seed
from ._signals import Interrupted, SignalGuard
from ._train_config import AUTO_COMPILE_MIN_STEPS, RESUMABLE_CHANGES, SELECT, TrainConfig
from ._train_config import resolve_device as _device
from ._train_data import (
    _array_sources,
    _TaskSource,
    _torchmeta_sources,
    build_task_sources,
    data_identity,
)
from .adapt import adapt
from .anil import ANILHead
from .attacks import perturb
from .data import Task
from .fast import resolve_compile
from .meta import RobustMetaUpdate
from .metric import _learner_state, build_learner
from .params import call_model, preserved_buffers, preserved_modes
from .presets import method_preset
from .regularizers import ATRegularizer, TradesRegularizer

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "Interrupted",
    "OverfittingMonitor",
    "TrainConfig",
    "atomic_save",
    "build_model_for",
    "data_identity",
    "load_checkpoint",
    "model_from_checkpoint",
    "save_checkpoint",
    "step_seed",
    "train",
    "validate",
]

# Names kept importable from `robust_meta.train` after the split into `_train_config`,
# `_checkpoint`, `_train_data`, `_rng` and `_io` (tests, the CLI and users import them here).
_REEXPORTED = (
    CHECKPOINT_VERSION, RESUMABLE_CHANGES, SELECT, _array_sources, _check_model_matches,
    _signature, _TaskSource, _torchmeta_sources, _forked_rng, _rng_state, _seed_all, _set_rng_state,
)


# --------------------------------------------------------------------------- validation


def validate(
    model: nn.Module,
    tasks: Sequence[Task],
    *,
    eps: float,
    steps: int,
    step_size: float,
    attack_steps: int = 10,
    one_step: bool = False,
    anil: Any = None,
    train_mode: bool = True,
) -> dict[str, float]:
    """Mean accuracies on tasks after standard fine-tuning (S-FT).

    For each task the model is fine-tuned on the support set (``steps`` steps of ``step_size``,
    head only with ``anil``), then scored on the clean query set (``sa``) and on its PGD
    adversarial examples (``ra``, ``attack_steps`` steps, radius ``eps``) against the
    fine-tuned weights. With ``one_step`` also ``ra_fgsm`` (FGSM with random start). The
    network runs in train mode (batch statistics, as during meta-training; ``train_mode=False``:
    running statistics, as metric learners are evaluated); its buffers and the mode of every
    submodule are left as they were. ``anil``: an `ANILHead` or a metric head
    (`robust_meta.ProtoNetHead`, `robust_meta.R2D2Head`) that turns the support set into weights.

    Returns:
        ``{"sa": ..., "ra": ...[, "ra_fgsm": ...]}`` as floats in [0, 1].
    """
    sums = {"sa": 0.0, "ra": 0.0, "ra_fgsm": 0.0}
    with preserved_modes(model, bool(train_mode)), preserved_buffers(model):
        for i, task in enumerate(tasks):
            if i and _VALIDATION_HOOK:
                _VALIDATION_HOOK[-1]()
            sx, sy, qx, qy = task.support_x, task.support_y, task.query_x, task.query_y
            with torch.no_grad():
                if anil is not None:
                    fast = anil.adapt(sx, sy, steps=steps, step_size=step_size, first_order=True)
                else:
                    fast = adapt(model, sx, sy, steps=steps, step_size=step_size, first_order=True)
                sums["sa"] += _acc(call_model(model, qx, fast), qy)
            adv = perturb("pgd", model, qx, qy, params=fast, eps=eps, steps=attack_steps)
            with torch.no_grad():
                sums["ra"] += _acc(call_model(model, adv, fast), qy)
            if one_step:
                adv1 = perturb("fgsm", model, qx, qy, params=fast, eps=eps)
                with torch.no_grad():
                    sums["ra_fgsm"] += _acc(call_model(model, adv1, fast), qy)
    n = max(1, len(tasks))
    out = {"sa": sums["sa"] / n, "ra": sums["ra"] / n}
    if one_step:
        out["ra_fgsm"] = sums["ra_fgsm"] / n
    return out


_VALIDATION_HOOK: list[Callable[[], None]] = []  # fault injection between validation tasks


@contextlib.contextmanager
def _validation_hook(hook: Callable[[], None]) -> Iterator[None]:
    _VALIDATION_HOOK.append(hook)
    try:
        yield
    finally:
        _VALIDATION_HOOK.remove(hook)


def _acc(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


@dataclass
class OverfittingMonitor:
    """Flags catastrophic overfitting of one-step adversarial training (Wong et al. 2020).

    Feed it the validation PGD and FGSM robust accuracies after each validation. It flags a
    point where PGD accuracy has fallen to at most ``(1 - drop)`` of its best value so far (and
    by at least ``min_gap`` in absolute terms) while FGSM accuracy is at least what it was at
    that best point and exceeds PGD accuracy by ``min_gap``: the model has learned to defeat
    the one-step attack only.

    Args:
        drop: relative fall of PGD accuracy that counts as a collapse (default 0.5).
        min_gap: minimum absolute fall (default 0.05), so noise at tiny accuracies is ignored.

    Example:
        >>> mon = OverfittingMonitor()
        >>> mon.update(0.40, 0.45), mon.update(0.10, 0.80)
        (False, True)
    """

    drop: float = 0.5
    min_gap: float = 0.05
    best_pgd: float = -1.0
    fgsm_at_best: float = 0.0
    history: list[tuple[float, float]] = field(default_factory=list)

    def update(self, ra_pgd: float, ra_fgsm: float) -> bool:
        """Record one validation; returns whether it shows catastrophic overfitting."""
        self.history.append((float(ra_pgd), float(ra_fgsm)))
        if ra_pgd > self.best_pgd:
            self.best_pgd, self.fgsm_at_best = float(ra_pgd), float(ra_fgsm)
            return False
        fell = self.best_pgd - ra_pgd
        return (
            ra_pgd <= (1 - self.drop) * self.best_pgd
            and fell >= self.min_gap
            and ra_fgsm >= self.fgsm_at_best
            and ra_fgsm - ra_pgd >= self.min_gap
        )


# --------------------------------------------------------------------------- training

def _build_objective(model: nn.Module, config: TrainConfig):
    """(RobustMetaUpdate, inner regularizer or None, the head learner or None, aux module or None).

    The head learner is an `ANILHead` (method ``anil``) or a metric head (``learner=
    "protonet"``/``"r2d2"``): both turn a support set into weights with ``.adapt``.
    """
    m = method_preset(config.method)
    reg_kw = {"eps": config.eps, "steps": config.attack_steps, "step_size": config.attack_step_size}
    if config.attack == "fgsm" and config.attack_steps is None:
        reg_kw["steps"] = 1
    outer_reg = None
    if m.regularizer == "trades":
        outer_reg = TradesRegularizer(config.attack, **reg_kw)
    elif m.regularizer == "at":
        outer_reg = ATRegularizer(config.attack, **reg_kw)
    inner_reg = ATRegularizer(config.attack, **reg_kw) if config.gamma_in else None
    aux = None
    if config.gamma_cl:
        from .contrastive import ContrastiveAux

        aux = ContrastiveAux(model, weight=config.gamma_cl, projection=64)
    gamma_out = config.gamma_out if outer_reg is not None else 0.0
    update = RobustMetaUpdate(
        F.cross_entropy, model, eps=config.eps, gamma_out=gamma_out, regularizer=outer_reg, aux=aux,
    )
    anil = ANILHead(model) if m.anil else None
    # A metric learner (ProtoNet, R2-D2) takes the place of the inner loop; it is `anil`'s slot.
    learner = build_learner(config.learner, model)
    return update, inner_reg, anil if learner is None else learner, aux


def _mean_stats(rows: list[dict[str, float]]) -> dict[str, float]:
    out = {}
    for k in rows[0]:
        vals = [r[k] for r in rows if not math.isnan(r[k])]
        out[k] = sum(vals) / len(vals) if vals else float("nan")
    return out


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _clean_json(rec: Mapping[str, Any]) -> dict[str, Any]:
    """NaN/inf become None so that log.jsonl is strict JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}


def _write_csv(records: list[dict[str, Any]], path: Path) -> None:
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, restval="")
    w.writeheader()
    for r in records:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    _atomic_write_text(buf.getvalue(), path)


def _read_log(path: Path, upto: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut by the interruption: everything after it is dropped
        if rec.get("step", 0) <= upto:
            out.append(rec)
    return out


def train(
    config: TrainConfig,
    *,
    out_dir: str | os.PathLike,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
) -> Path:
    """Meta-train ``config.method`` and return the path of the selected checkpoint.

    Each meta-step samples ``meta_batch`` training tasks, adapts the model on each support
    set (`robust_meta.adapt`, or `robust_meta.ANILHead` for ``anil``; with the
    AT inner term for ``rmaml-both``), adds the outer loss of
    `robust_meta.RobustMetaUpdate` on the query set, and takes one Adam step on the
    mean. Every ``eval_every`` steps (and at the last step) the model is scored on fixed
    meta-validation tasks (`validate`); the best by ``config.select`` is ``best.pt``.

    **Interruptions.** In the main thread, SIGINT and SIGTERM are handled alike (the previous
    handlers are restored when `train` returns): the step in progress is discarded (or, if
    the signal lands while an optimizer step, a log row or a checkpoint is being written,
    that is finished first), the state at the end of the last completed step is written
    (``log.jsonl``, ``log.csv``, ``best.pt``, ``last.pt``, all of the same step), and
    `robust_meta._signals.Interrupted` (a ``KeyboardInterrupt``) is raised. A second
    signal stops at once, like SIGKILL: then, as after SIGKILL, the files hold the last
    regular checkpoint (every write is atomic) and ``resume`` repairs the rest (log rows
    after it are dropped, ``best.pt`` is rewritten from ``last.pt``). Either way resuming
    gives bitwise the run an uninterrupted one gives on the CPU.

    Args:
        config: the run (unset options come from the presets, see `TrainConfig.resolved`).
        out_dir: folder for checkpoints and logs (created).
        resume: continue from ``out_dir/last.pt`` (bitwise the same result as an uninterrupted
            run on the CPU). Without a checkpoint there, training starts from scratch.
        overwrite: allow starting afresh in a folder that already holds a checkpoint.
        progress: show a tqdm progress bar with the live loss and accuracies.
        callback: called as ``callback(step, record)`` after every meta-step (``record`` is
            the log record, with validation metrics on validation steps). An exception it
            raises stops training; a ``KeyboardInterrupt`` first saves ``last.pt`` (at
            ``step``).

    Returns:
        Path of ``best.pt``.

    Raises:
        ValueError: invalid config; FileExistsError: ``out_dir`` holds a run and neither
            ``resume`` nor ``overwrite`` is set; CheckpointError: ``last.pt`` is unreadable or
            was written for another model or config; FileNotFoundError: missing data;
            KeyboardInterrupt: SIGINT or SIGTERM (`robust_meta._signals.Interrupted`, with
            its ``signum``) after the emergency checkpoint was written.

    Example:
        >>> best = train(TrainConfig(method="rmaml-out", attack="fgsm", meta_steps=200), out_dir="runs/x")
        >>> model, cfg, ckpt = model_from_checkpoint(best)
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    config = config.resolved()
    if _device(config.device).type == "cuda":
        # Initialise CUDA now (running any seeding the caller queued), so that the caller's
        # CUDA generators are saved below and restored after, even when training is the
        # process's first CUDA user.
        torch.cuda.init()
    caller_rng = _rng_state()
    had_group = dist_.is_distributed()
    try:
        with SignalGuard() as guard:
            return _train(config, Path(out_dir), resume=resume, overwrite=overwrite, progress=progress,
                          callback=callback, guard=guard)
    finally:
        _set_rng_state(caller_rng)  # the caller's random streams are left as they were
        if not had_group and dist_.is_distributed():  # a process group we created under torchrun
            torch.distributed.destroy_process_group()


# -- test-only fault injection -----------------------------------------------------------
#: Environment variable of the fault-injection tests: ``SIGNAL@STEP:POINT`` (e.g.
#: ``SIGTERM@5:backward``) sends ``SIGNAL`` to this process when meta-step ``STEP`` reaches
#: ``POINT`` (see `_FAULT_POINTS`); ``sleep=SECONDS`` sleeps at every point instead (to widen
#: the windows that randomly timed signals hit). Not for production use.
FAULT_ENV = "ROBUST_META_FAULT_INJECT"
_FAULT_POINTS = ("task", "backward", "optimizer", "validate", "log", "save", "boundary", "emergency")


class _Faults:
    """Parsed `FAULT_ENV`: comma-separated ``SIGNAL@STEP:POINT`` items, or ``sleep=SECONDS``."""

    def __init__(self, spec: str) -> None:
        self.sleep: float | None = None
        self.items: list[tuple[int, int, str]] = []
        for item in (t.strip() for t in spec.split(",")):
            if not item:
                continue
            if item.startswith("sleep="):
                self.sleep = float(item.split("=", 1)[1])
                continue
            try:
                sig, rest = item.split("@", 1)
                step, point = rest.split(":", 1)
                signum = int(getattr(signal, sig.upper()))
                self.items.append((signum, int(step), point))
            except (ValueError, AttributeError) as err:
                raise ValueError(f"{FAULT_ENV}={spec!r}: expected SIGNAL@STEP:POINT or sleep=SECONDS") from err
            if point not in _FAULT_POINTS:
                raise ValueError(f"{FAULT_ENV}: unknown point {point!r}; choose from {_FAULT_POINTS}")

    def __call__(self, point: str, step: int) -> None:
        if self.sleep:
            time.sleep(self.sleep)
        for item in self.items:
            if item[1:] == (step, point):
                self.items.remove(item)  # each fires once
                os.kill(os.getpid(), item[0])
                return


# -- the loop ----------------------------------------------------------------------------


@dataclass
class _Boundary:
    """Everything ``last.pt`` holds at the end of one meta-step, copied in memory."""

    state: dict[str, Any]  # the last.pt payload (see `robust_meta._checkpoint.checkpoint_state`)
    n_records: int  # log rows up to this step
    saved: bool  # last.pt on disk is this state

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def best(self) -> dict[str, Any] | None:
        return self.state["extra"].get("best")


def _best_payload(model: nn.Module, config: TrainConfig, step: int, aux: nn.Module | None,
                  val: Mapping[str, Any], score: float, data: Any = None, learner: Any = None) -> dict[str, Any]:
    """The ``best.pt`` content for the model as it is now (copied); ``data``: `data_identity`;
    ``learner``: the head learner, whose own meta-parameters (R2-D2) are stored with it."""
    return checkpoint_state(model=model, config=config, step=step, aux=aux, on_device=True,
                            extra={"val": dict(val), "score": score, "select": config.select, "data": data,
                                   "learner": _learner_state(learner)})


def _write_logs(records: list[dict[str, Any]], log_path: Path, csv_path: Path) -> None:
    _atomic_write_text("".join(json.dumps(r) + "\n" for r in records), log_path)
    _write_csv(records, csv_path)


def _write_best(best: Mapping[str, Any] | None, best_path: Path) -> None:
    if best is None:
        if best_path.exists():
            best_path.unlink()
    else:
        atomic_save(to_cpu(best), best_path)


def _check_resumable(ckpt: Mapping[str, Any], config: TrainConfig, data_id: Any, last_path: Path) -> None:
    """Refuse to resume on another config or other data; another path to the same data is fine.

    Raises:
        CheckpointError: a config option outside `RESUMABLE_CHANGES` differs, or the data differ
            from those ``last.pt`` was trained on (splits, images, labels).
    """
    old = TrainConfig.saved_dict(ckpt["config"])  # checkpoints before learners: MAML
    new = config.to_dict()
    saved_id = ckpt.get("extra", {}).get("data")
    if saved_id is not None and data_id is not None and saved_id != data_id:
        what = [k for k in sorted(set(saved_id) | set(data_id)) if saved_id.get(k) != data_id.get(k)]
        raise CheckpointError(
            f"cannot resume {str(last_path)!r}: the data differ from those it was trained on "
            f"({', '.join(what)} changed; e.g. files added to or removed from the data folder, "
            "which changes the class split). Start again in a new --out folder (or --overwrite)"
        )
    same_data = saved_id is not None and saved_id == data_id
    diff = sorted(k for k in set(old) | set(new)
                  if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k)
                  and not (k == "data_folder" and same_data))  # where the data lie may change
    if diff:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {getattr(config, k, None)!r}" for k in diff[:6])
        raise CheckpointError(
            f"cannot resume {str(last_path)!r}: the config differs in {details}; only "
            f"{sorted(RESUMABLE_CHANGES)} (and data_folder, for the same data) may change on resume"
        )


def _train(
    config: TrainConfig,
    out: Path,
    *,
    resume: bool,
    overwrite: bool,
    progress: bool,
    callback: Callable[[int, dict[str, Any]], None] | None,
    guard: SignalGuard,
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    last_path, best_path = out / "last.pt", out / "best.pt"
    log_path, csv_path = out / "log.jsonl", out / "log.csv"
    device = _device(config.device)
    fault = _Faults(os.environ.get(FAULT_ENV, ""))

    ckpt = None
    if resume and last_path.exists():
        ckpt = load_checkpoint(last_path)
    elif resume:
        warnings.warn(f"resume: no checkpoint in {str(out)!r}; training from scratch", stacklevel=3)
    elif last_path.exists() and not overwrite:
        raise FileExistsError(
            f"{str(out)!r} already holds a run (last.pt); pass resume=True to continue it or "
            "overwrite=True to start again"
        )

    # torchrun: tasks of each meta-batch are sharded across ranks and the meta-gradient is
    # all-reduced; without torchrun this is one process (rank 0 of 1). The backend follows the
    # training device (gloo for a CPU run, also on a GPU machine); each rank takes its own GPU.
    rank, world = dist_.init_from_env(device=device)
    device = dist_.rank_device(device, world_size=world)
    main_process = rank == 0
    sources = build_task_sources(config)
    data_id = data_identity(sources)
    if ckpt is not None:
        _check_resumable(ckpt, config, data_id, last_path)
    _seed_all(step_seed(config.seed, "init"))
    model = build_model_for(config).to(device)
    model.train()
    if world > 1:
        dist_.broadcast_parameters(model)
    update, inner_reg, anil, aux = _build_objective(model, config)
    if aux is not None:
        aux.to(device)
    head_params = list(anil.parameters()) if isinstance(anil, nn.Module) else []  # R2-D2: λ, scale, bias
    if head_params:
        anil.to(device)
    params = list(model.parameters()) + ([] if aux is None else list(aux.parameters())) + head_params
    optimizer = torch.optim.Adam(params, lr=config.meta_lr)

    with _forked_rng(step_seed(config.seed, "val-tasks"), device):
        val_tasks = [t.to(device) for t in sources["val"].sample(config.val_tasks, step_seed(config.seed, "val"))]

    start, best_score, best_step = 0, -math.inf, -1
    best: dict[str, Any] | None = None  # the best.pt payload, kept in memory and inside last.pt
    monitor = OverfittingMonitor()
    records: list[dict[str, Any]] = []
    if ckpt is not None:
        _check_model_matches(model, ckpt, last_path)
        model.load_state_dict(ckpt["model"])
        if ckpt.get("optimizer") is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        if aux is not None and ckpt.get("aux") is not None:
            aux.load_state_dict(ckpt["aux"])
        if isinstance(anil, nn.Module) and ckpt.get("extra", {}).get("learner"):
            anil.load_state_dict(ckpt["extra"]["learner"])
        start = int(ckpt["step"])
        extra = ckpt.get("extra", {})
        best_score = float(extra.get("best_score", -math.inf))
        best_step = int(extra.get("best_step", -1))
        best = extra.get("best")
        for pgd, fgsm in extra.get("monitor", []):
            monitor.update(pgd, fgsm)
        if ckpt.get("rng"):
            _set_rng_state(ckpt["rng"])
        records = _read_log(log_path, start)
        want = extra.get("log_rows")
        if want is not None and len(records) < int(want):
            warnings.warn(
                f"resume: {str(log_path)!r} holds {len(records)} rows up to step {start}, last.pt "
                f"expects {want}: the log was changed outside robust-meta; its missing rows are lost",
                RuntimeWarning, stacklevel=3,
            )
        if main_process:
            # The files on disk may be ahead of last.pt (a kill after log rows or best.pt were
            # written): make them agree with it again before going on.
            with guard.critical():
                remove_stale_temps(out, ("last.pt", "best.pt", "log.jsonl", "log.csv", "config.json"))
                _write_logs(records, log_path, csv_path)
                if "best" in extra:  # checkpoints of robust-meta < 0.1.1 lack it: keep best.pt
                    _write_best(best, best_path)
    elif main_process:
        with guard.critical():
            remove_stale_temps(out, ("last.pt", "best.pt", "log.jsonl", "log.csv", "config.json"))
            for p in (log_path, csv_path, best_path):
                if p.exists():
                    p.unlink()
    if main_process:  # only rank 0 writes files
        with guard.critical():
            _atomic_write_text(json.dumps(config.to_dict(), indent=2, default=_json_default) + "\n",
                               out / "config.json")

    def snapshot(step: int) -> _Boundary:
        """The state at the end of ``step`` (what last.pt holds at that boundary)."""
        extra = {"best_score": best_score, "best_step": best_step,
                 "monitor": [list(h) for h in monitor.history], "best": best, "log_rows": len(records),
                 "data": data_id, "learner": _learner_state(anil)}
        # On the device (a clone, no host transfer): written to disk, on the CPU, at flush time.
        state = checkpoint_state(model=model, config=config, step=step, optimizer=optimizer, aux=aux,
                                 extra=extra, on_device=True)
        return _Boundary(state, len(records), saved=False)

    written_best: list[Any] = [best if ckpt is not None else None]

    def flush(b: _Boundary, log_file: Any) -> None:
        """Write the boundary ``b``: logs first, then best.pt, then last.pt (each atomic)."""
        if log_file is not None:
            log_file.flush()
            os.fsync(log_file.fileno())
        else:  # after an interruption: drop rows written after the boundary
            _atomic_write_text("".join(json.dumps(r) + "\n" for r in records[: b.n_records]), log_path)
        _write_csv(records[: b.n_records], csv_path)
        if b.best is not written_best[0] or not best_path.exists():
            _write_best(b.best, best_path)
            written_best[0] = b.best
        fault("save", b.step)
        atomic_save(to_cpu(b.state), last_path)
        b.saved = True

    bar = None
    if progress and main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.meta_steps, initial=start, desc=config.method, dynamic_ncols=True)
    t0 = time.perf_counter()
    boundary = snapshot(start) if main_process else None
    if boundary is not None and ckpt is not None:
        boundary.saved = True
    try:
        fast_ctx = _fast._use_policy(
            resolve_compile({"on": True, "off": False}.get(config.compile, config.compile), device,
                            work=config.meta_steps - start, min_work=AUTO_COMPILE_MIN_STEPS),
            "auto",
        )
        with open(log_path if main_process else os.devnull, "a", encoding="utf-8") as log_file, fast_ctx:
            for step in range(start + 1, config.meta_steps + 1):
                # -- the step's work: a signal here discards it (the boundary is untouched) --
                _seed_all(step_seed(config.seed, step))
                tasks = sources["train"].sample(config.meta_batch, step_seed(config.seed, f"tasks:{step}"))
                lo, hi = dist_.shard_bounds(len(tasks), rank, world)
                optimizer.zero_grad(set_to_none=True)
                rows = []
                for i in range(lo, hi):
                    # Each task's attack randomness depends on (seed, step, task) only, so a
                    # sharded run computes exactly what one process computes.
                    _seed_all(step_seed(config.seed, f"task:{step}:{i}"))
                    task = tasks[i].to(device)
                    if i > lo:
                        fault("task", step)
                    if anil is not None:
                        fast = anil.adapt(task.support_x, task.support_y, steps=config.inner_steps,
                                          step_size=config.inner_lr, first_order=config.first_order)
                    else:
                        fast = adapt(model, task.support_x, task.support_y, steps=config.inner_steps,
                                     step_size=config.inner_lr, first_order=config.first_order,
                                     regularizer=inner_reg, gamma_in=config.gamma_in or 0.0)
                    unl = task.unlabeled if config.unlabeled else None
                    loss = update(task.query_x, task.query_y, params=fast, unlabeled=unl)
                    fault("backward", step)
                    loss.backward()
                    rows.append(update.last.as_dict())
                # Sum over this rank's tasks -> mean over the whole meta-batch on every rank.
                dist_.all_reduce_grads(params, average_over=len(tasks))
                with guard.critical():
                    optimizer.step()
                    fault("optimizer", step)
                stats = _mean_stats(rows) if rows else {}  # a rank may hold no task
                rec: dict[str, Any] = {"step": step}
                rec.update(stats)

                val = None
                if main_process and (step % config.eval_every == 0 or step == config.meta_steps):
                    with _forked_rng(step_seed(config.seed, f"val:{step}"), device), \
                            _validation_hook(lambda s=step: fault("validate", s)):
                        val = validate(model, val_tasks, eps=config.eps, steps=config.test_inner_steps,
                                       step_size=config.inner_lr, attack_steps=config.eval_attack_steps,
                                       one_step=config.one_step_attack, anil=anil,
                                       train_mode=config.learner == "maml")

                # -- bookkeeping, logs, checkpoint, boundary: a signal waits until it is done --
                with guard.critical():
                    if val is not None:
                        score = {"sa+ra": val["sa"] + val["ra"], "sa": val["sa"], "ra": val["ra"],
                                 "last": float(step)}[config.select]
                        rec.update({f"val_{k}": v for k, v in val.items()})
                        rec["val_score"] = score
                        if config.one_step_attack:
                            co = monitor.update(val["ra"], val["ra_fgsm"])
                            rec["catastrophic_overfitting"] = co
                            if co:
                                warnings.warn(
                                    f"step {step}: catastrophic overfitting - validation PGD robust accuracy "
                                    f"fell to {val['ra']:.3f} (best {monitor.best_pgd:.3f}) while FGSM "
                                    f"accuracy is {val['ra_fgsm']:.3f}; consider a smaller FGSM step, more "
                                    "attack steps or the checkpoint selected before the collapse",
                                    RuntimeWarning, stacklevel=3,
                                )
                        rec["best"] = score > best_score
                        if score > best_score:
                            best_score, best_step = score, step
                            best = _best_payload(model, config, step, aux, val, score, data_id, anil)
                    rec["time"] = round(time.perf_counter() - t0, 3)
                    if main_process and (step % config.log_every == 0 or "val_score" in rec):
                        clean = _clean_json(rec)
                        records.append(clean)
                        log_file.write(json.dumps(clean) + "\n")
                        log_file.flush()
                        fault("log", step)
                    if main_process:
                        boundary = snapshot(step)
                        if step % config.save_every == 0 or step == config.meta_steps:
                            flush(boundary, log_file)
                if bar is not None:
                    post = {"loss": f"{stats['loss']:.3f}", "acc": f"{stats['clean_acc']:.2f}"}
                    if not math.isnan(stats["adv_acc"]):
                        post["adv"] = f"{stats['adv_acc']:.2f}"
                    if "val_sa" in rec:
                        post["val_sa"] = f"{rec['val_sa']:.2f}"
                        post["val_ra"] = f"{rec['val_ra']:.2f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                fault("boundary", step)
                if callback is not None:
                    callback(step, rec)
    except KeyboardInterrupt:
        # SIGINT/SIGTERM (Interrupted) or a KeyboardInterrupt from the callback: write the
        # last step boundary, whatever the live model holds now.
        if boundary is not None and not boundary.saved:
            with guard.critical():
                fault("emergency", boundary.step)
                flush(boundary, None)
            guard.pending = None
        raise
    finally:
        if bar is not None:
            bar.close()
    if not main_process:
        return best_path
    if not best_path.exists():  # meta_steps == 0 or resumed after the end
        with guard.critical():
            _write_best(_best_payload(model, config, start, aux, {}, best_score, data_id, anil), best_path)
    return best_path
