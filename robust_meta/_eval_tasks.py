"""`robust_meta.evaluate`'s per-task work, in this process or in spawned worker processes.

Task ``i`` is evaluated on its own random stream (``base_seed + i``), so where it runs does not
change its values. The worker pool keeps at most ``2·workers`` tasks in flight (a task stream
is never read ahead further) and yields the results in task order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import evaluation as _ev
from . import fast as _fast
from .adapt import LossFn
from .anil import ANILHead
from .attacks import AttackLike, perturb
from .params import call_model, preserved_buffers


@dataclass
class _EvalJob:
    """Everything `evaluate` does to one task (picklable, for the worker processes)."""

    steps: int
    step_size: Any
    first_order: bool
    finetune: str
    finetune_attack: Any
    finetune_eps: float | None
    finetune_gamma: float
    attack_steps: int
    attack_step_size: float | None
    anil: ANILHead | None
    loss_fn: LossFn | None
    table: list[tuple[str, AttackLike]]
    eps_list: list[float]
    mode: bool
    checks: bool
    compile: bool
    channels_last: bool | str
    device: torch.device
    dtype: torch.dtype


def _eval_task(model: nn.Module, job: _EvalJob, index: int, raw: Any, task_seed: int
               ) -> tuple[dict[str, float], list[str]]:
    """SA and every RA of one task, on its own random stream ``task_seed``."""
    devices = [job.device] if job.device.type == "cuda" else []
    row: dict[str, float] = {}
    msgs: list[str] = []
    with torch.random.fork_rng(devices=devices), preserved_buffers(model), \
            _fast._use_policy(job.compile, job.channels_last):
        torch.manual_seed(task_seed)
        model.train(job.mode)
        task = _ev._prepare(raw, job.device, job.dtype)
        ways = int(max(int(task.support_y.max()), int(task.query_y.max()))) + 1
        with torch.no_grad():
            fast = _ev._finetune(
                model, task.support_x, task.support_y, steps=job.steps, step_size=job.step_size,
                first_order=job.first_order, mode=job.finetune, attack=job.finetune_attack,
                eps=job.finetune_eps, gamma=job.finetune_gamma, attack_steps=job.attack_steps,
                attack_step_size=job.attack_step_size, anil=job.anil, loss_fn=job.loss_fn,
            )
            clean = call_model(model, task.query_x, fast)
        row["sa"] = _ev._accuracy(clean, task.query_y)
        for label, spec in job.table:
            a_steps, a_lr = _ev._attack_steps(spec, job.attack_steps, job.attack_step_size)
            for e in job.eps_list:
                # An attack instance is copied with its ε (sub-attacks' too) set to e.
                adv = perturb(spec, model, task.query_x, task.query_y, params=fast, eps=e,
                              steps=a_steps, step_size=a_lr, n_classes=ways, training=job.mode)
                with torch.no_grad():
                    row[_ev.metric_name(label, e)] = _ev._accuracy(call_model(model, adv, fast), task.query_y)
        if job.checks and index == 0:
            # After the attacks, so that the values do not depend on ``checks``.
            msgs += _ev._first_task_checks(model, fast, task, F.cross_entropy if job.loss_fn is None else job.loss_fn)
    return row, msgs


def _serial(model: nn.Module, job: _EvalJob, source: Iterable[Any], base_seed: int):
    for i, raw in enumerate(source):
        yield _eval_task(model, job, i, raw, base_seed + i)


_WORKER: dict[str, Any] = {}


def _worker_init(payload: bytes, threads: int) -> None:
    import pickle
    import signal

    # The parent decides when to stop (Ctrl-C reaches the whole process group).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    _WORKER["model"], _WORKER["job"] = pickle.loads(payload)


def _worker_task(index: int, raw: Any, task_seed: int) -> tuple[dict[str, float], list[str]]:
    return _eval_task(_WORKER["model"], _WORKER["job"], index, raw, task_seed)


def _parallel(model: nn.Module, job: _EvalJob, source: Iterable[Any], base_seed: int, workers: int):
    """`_serial` in ``workers`` spawned processes; yields in task order, ≤ 2·workers tasks in flight."""
    import multiprocessing as mp
    import pickle
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    try:
        payload = pickle.dumps((model, job))
    except Exception as err:
        raise ValueError(
            f"workers={workers} sends the model, loss_fn and attacks to other processes, but they "
            f"cannot be pickled ({type(err).__name__}: {err}); use a module-level function "
            "instead of a lambda, or workers=1"
        ) from None
    threads = max(1, torch.get_num_threads() // workers)
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                               initializer=_worker_init, initargs=(payload, threads))
    pending: dict[Any, int] = {}
    done: dict[int, Any] = {}
    nxt = 0
    tasks = enumerate(source)
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < 2 * workers:
                try:
                    i, raw = next(tasks)
                except StopIteration:
                    exhausted = True
                    break
                pending[pool.submit(_worker_task, i, raw, base_seed + i)] = i
            if not pending and nxt not in done:
                break
            if nxt not in done:
                finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for fut in finished:
                    done[pending.pop(fut)] = fut.result()
            while nxt in done:
                yield done.pop(nxt)
                nxt += 1
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
