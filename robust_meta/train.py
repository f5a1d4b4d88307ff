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

Files written in ``out_dir``: ``last.pt`` (full state, for ``resume``), ``best.pt`` (the
selected model), ``config.json``, ``log.jsonl`` and ``log.csv``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed as dist_
from ._checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CheckpointError,
    _check_model_matches,
    _signature,
    build_model_for,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from ._io import atomic_save
from ._io import atomic_write_text as _atomic_write_text
from ._rng import forked_rng as _forked_rng
from ._rng import rng_state as _rng_state
from ._rng import seed_all as _seed_all
from ._rng import set_rng_state as _set_rng_state
from ._rng import step_seed
from ._train_config import RESUMABLE_CHANGES, SELECT, TrainConfig
from ._train_config import resolve_device as _device
from ._train_data import _array_sources, _TaskSource, _torchmeta_sources, build_task_sources
from .adapt import adapt
from .anil import ANILHead
from .attacks import perturb
from .data import Task
from .meta import RobustMetaUpdate
from .params import call_model, preserved_buffers
from .presets import method_preset
from .regularizers import ATRegularizer, TradesRegularizer

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "OverfittingMonitor",
    "TrainConfig",
    "atomic_save",
    "build_model_for",
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
    anil: ANILHead | None = None,
) -> dict[str, float]:
    """Mean accuracies on tasks after standard fine-tuning (S-FT).

    For each task the model is fine-tuned on the support set (``steps`` steps of ``step_size``,
    head only with ``anil``), then scored on the clean query set (``sa``) and on its PGD
    adversarial examples (``ra``, ``attack_steps`` steps, radius ``eps``) against the
    fine-tuned weights. With ``one_step`` also ``ra_fgsm`` (FGSM with random start). The
    network runs in train mode (batch statistics, as during meta-training); its buffers are
    left untouched.

    Returns:
        ``{"sa": ..., "ra": ...[, "ra_fgsm": ...]}`` as floats in [0, 1].
    """
    was_training = model.training
    model.train()
    sums = {"sa": 0.0, "ra": 0.0, "ra_fgsm": 0.0}
    try:
        with preserved_buffers(model):
            for task in tasks:
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
    finally:
        model.train(was_training)
    n = max(1, len(tasks))
    out = {"sa": sums["sa"] / n, "ra": sums["ra"] / n}
    if one_step:
        out["ra_fgsm"] = sums["ra_fgsm"] / n
    return out


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
    """(RobustMetaUpdate, inner regularizer or None, ANILHead or None, aux module or None)."""
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
    return update, inner_reg, anil, aux


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

    Args:
        config: the run (unset options come from the presets, see `TrainConfig.resolved`).
        out_dir: folder for checkpoints and logs (created).
        resume: continue from ``out_dir/last.pt`` (bitwise the same result as an uninterrupted
            run on the CPU). Without a checkpoint there, training starts from scratch.
        overwrite: allow starting afresh in a folder that already holds a checkpoint.
        progress: show a tqdm progress bar with the live loss and accuracies.
        callback: called as ``callback(step, record)`` after every meta-step (``record`` is
            the log record, with validation metrics on validation steps). An exception it
            raises stops training; a ``KeyboardInterrupt`` first saves ``last.pt``.

    Returns:
        Path of ``best.pt``.

    Raises:
        ValueError: invalid config; FileExistsError: ``out_dir`` holds a run and neither
            ``resume`` nor ``overwrite`` is set; CheckpointError: ``last.pt`` is unreadable or
            was written for another model or config; FileNotFoundError: missing data.

    Example:
        >>> best = train(TrainConfig(method="rmaml-out", attack="fgsm", meta_steps=200), out_dir="runs/x")
        >>> model, cfg, ckpt = model_from_checkpoint(best)
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    config = config.resolved()
    caller_rng = _rng_state()
    try:
        return _train(config, Path(out_dir), resume=resume, overwrite=overwrite, progress=progress,
                      callback=callback)
    finally:
        _set_rng_state(caller_rng)  # the caller's random streams are left as they were


def _train(
    config: TrainConfig,
    out: Path,
    *,
    resume: bool,
    overwrite: bool,
    progress: bool,
    callback: Callable[[int, dict[str, Any]], None] | None,
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    last_path, best_path = out / "last.pt", out / "best.pt"
    log_path, csv_path = out / "log.jsonl", out / "log.csv"
    device = _device(config.device)

    ckpt = None
    if resume and last_path.exists():
        ckpt = load_checkpoint(last_path)
        old = dict(ckpt["config"])
        diff = sorted(k for k in set(old) | set(config.to_dict())
                      if k not in RESUMABLE_CHANGES and old.get(k) != config.to_dict().get(k))
        if diff:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {getattr(config, k, None)!r}" for k in diff[:6])
            raise CheckpointError(
                f"cannot resume {str(last_path)!r}: the config differs in {details}; only "
                f"{sorted(RESUMABLE_CHANGES)} may change on resume"
            )
    elif resume:
        warnings.warn(f"resume: no checkpoint in {str(out)!r}; training from scratch", stacklevel=3)
    elif last_path.exists() and not overwrite:
        raise FileExistsError(
            f"{str(out)!r} already holds a run (last.pt); pass resume=True to continue it or "
            "overwrite=True to start again"
        )

    # torchrun: tasks of each meta-batch are sharded across ranks and the meta-gradient is
    # all-reduced; without torchrun this is one process (rank 0 of 1).
    rank, world = dist_.init_from_env()
    main_process = rank == 0
    sources = build_task_sources(config)
    _seed_all(step_seed(config.seed, "init"))
    model = build_model_for(config).to(device)
    model.train()
    if world > 1:
        dist_.broadcast_parameters(model)
    update, inner_reg, anil, aux = _build_objective(model, config)
    if aux is not None:
        aux.to(device)
    params = list(model.parameters()) + ([] if aux is None else list(aux.parameters()))
    optimizer = torch.optim.Adam(params, lr=config.meta_lr)

    with _forked_rng(step_seed(config.seed, "val-tasks"), device):
        val_tasks = [t.to(device) for t in sources["val"].sample(config.val_tasks, step_seed(config.seed, "val"))]

    start, best_score, best_step = 0, -math.inf, -1
    monitor = OverfittingMonitor()
    records: list[dict[str, Any]] = []
    if ckpt is not None:
        _check_model_matches(model, ckpt, last_path)
        model.load_state_dict(ckpt["model"])
        if ckpt.get("optimizer") is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        if aux is not None and ckpt.get("aux") is not None:
            aux.load_state_dict(ckpt["aux"])
        start = int(ckpt["step"])
        extra = ckpt.get("extra", {})
        best_score = float(extra.get("best_score", -math.inf))
        best_step = int(extra.get("best_step", -1))
        for pgd, fgsm in extra.get("monitor", []):
            monitor.update(pgd, fgsm)
        if ckpt.get("rng"):
            _set_rng_state(ckpt["rng"])
        records = _read_log(log_path, start)
        if main_process:
            _atomic_write_text("".join(json.dumps(r) + "\n" for r in records), log_path)
    elif main_process:
        for p in (log_path, csv_path, best_path):
            if p.exists():
                p.unlink()
    if main_process:  # only rank 0 writes files
        _atomic_write_text(json.dumps(config.to_dict(), indent=2, default=_json_default) + "\n", out / "config.json")

    def save_last(step: int) -> None:
        save_checkpoint(
            last_path, model=model, config=config, step=step, optimizer=optimizer, aux=aux,
            extra={"best_score": best_score, "best_step": best_step,
                   "monitor": [list(h) for h in monitor.history]},
        )

    bar = None
    if progress and main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.meta_steps, initial=start, desc=config.method, dynamic_ncols=True)
    t0 = time.perf_counter()
    completed = start  # the model and optimizer hold the state after this step...
    dirty = False  # ...unless a later optimizer step has run and its bookkeeping has not finished
    saved = start if ckpt is not None else -1
    try:
        with open(log_path if main_process else os.devnull, "a", encoding="utf-8") as log_file:
            for step in range(start + 1, config.meta_steps + 1):
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
                    if anil is not None:
                        fast = anil.adapt(task.support_x, task.support_y, steps=config.inner_steps,
                                          step_size=config.inner_lr, first_order=config.first_order)
                    else:
                        fast = adapt(model, task.support_x, task.support_y, steps=config.inner_steps,
                                     step_size=config.inner_lr, first_order=config.first_order,
                                     regularizer=inner_reg, gamma_in=config.gamma_in or 0.0)
                    unl = task.unlabeled if config.unlabeled else None
                    loss = update(task.query_x, task.query_y, params=fast, unlabeled=unl)
                    loss.backward()
                    rows.append(update.last.as_dict())
                # Sum over this rank's tasks -> mean over the whole meta-batch on every rank.
                dist_.all_reduce_grads(params, average_over=len(tasks))
                dirty = True
                optimizer.step()
                stats = _mean_stats(rows) if rows else {}  # a rank may hold no task
                rec: dict[str, Any] = {"step": step}
                rec.update(stats)

                if main_process and (step % config.eval_every == 0 or step == config.meta_steps):
                    with _forked_rng(step_seed(config.seed, f"val:{step}"), device):
                        val = validate(model, val_tasks, eps=config.eps, steps=config.test_inner_steps,
                                       step_size=config.inner_lr, attack_steps=config.eval_attack_steps,
                                       one_step=config.one_step_attack, anil=anil)
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
                                f"fell to {val['ra']:.3f} (best {monitor.best_pgd:.3f}) while FGSM accuracy "
                                f"is {val['ra_fgsm']:.3f}; consider a smaller FGSM step, more attack steps "
                                "or the checkpoint selected before the collapse", RuntimeWarning, stacklevel=3,
                            )
                    rec["best"] = score > best_score
                    if score > best_score:
                        best_score, best_step = score, step
                        save_checkpoint(best_path, model=model, config=config, step=step,
                                        aux=aux, extra={"val": val, "score": score, "select": config.select})
                rec["time"] = round(time.perf_counter() - t0, 3)
                if main_process and (step % config.log_every == 0 or "val_score" in rec):
                    clean = _clean_json(rec)
                    records.append(clean)
                    log_file.write(json.dumps(clean) + "\n")
                    log_file.flush()
                if main_process and (step % config.save_every == 0 or step == config.meta_steps):
                    save_last(step)
                    saved = step
                    _write_csv(records, csv_path)
                if bar is not None:
                    post = {"loss": f"{stats['loss']:.3f}", "acc": f"{stats['clean_acc']:.2f}"}
                    if not math.isnan(stats["adv_acc"]):
                        post["adv"] = f"{stats['adv_acc']:.2f}"
                    if "val_sa" in rec:
                        post["val_sa"] = f"{rec['val_sa']:.2f}"
                        post["val_ra"] = f"{rec['val_ra']:.2f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                completed, dirty = step, False
                if callback is not None:
                    callback(step, rec)
    except KeyboardInterrupt:
        if main_process:
            if not dirty and completed > saved:
                save_last(completed)
            _write_csv(records, csv_path)
        raise
    finally:
        if bar is not None:
            bar.close()
    if not main_process:
        return best_path
    _write_csv(records, csv_path)
    if not best_path.exists():  # meta_steps == 0 or resumed after the end
        save_checkpoint(best_path, model=model, config=config, step=completed, aux=aux,
                        extra={"val": {}, "score": best_score, "select": config.select})
    return best_path
