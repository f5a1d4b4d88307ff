"""`robust_meta.evaluate`'s per-task work, in this process or in spawned worker processes.

One task: fine-tune on its support set (`finetune`), score SA on the clean query, attack the
query against the fine-tuned weights at every (attack, ε) and score RA, and (first task only)
run the AutoAttack-style checks. Task ``i`` is evaluated on its own random stream
(``base_seed + i``; only the CPU generator and the evaluation device's own are seeded and
restored), in the mode the job says (``None``: every submodule's own mode, restored exactly),
so where it runs does not change its values. The worker pool keeps at most ``2·workers`` tasks
in flight (a task stream is never read ahead further) and yields the results in task order.
"""

from __future__ import annotations

import io
import pickle
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fast as _fast
from ._checks import check_eps
from ._metrics import metric_name
from ._rng import cuda_devices, seed_torch
from .adapt import LossFn, StepSize, adapt
from .anil import ANILHead
from .attacks import AttackLike, perturb
from .data import Task
from .params import LOW_PRECISION, Params, call_model, preserved_buffers, preserved_modes
from .regularizers import ATRegularizer

__all__ = ["FINETUNE", "finetune"]

FINETUNE = ("standard", "adversarial")


# ------------------------------------------------------------------------- fine-tuning
def finetune(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    steps: int,
    step_size: StepSize,
    first_order: bool = True,
    mode: str = "standard",
    attack: AttackLike = "pgd",
    eps: float | None = None,
    gamma: float = 1.0,
    attack_steps: int | None = None,
    attack_step_size: float | None = None,
    anil: ANILHead | None = None,
    loss_fn: LossFn | None = None,
    learner: Any = None,
) -> Params:
    r"""Meta-test fine-tuning of ``model`` on a support set; returns the fast weights.

    * ``mode="standard"`` (S-FT): ``steps`` gradient steps on the clean loss
      (`robust_meta.adapt`, or ``anil.adapt`` for head-only fine-tuning).
    * ``mode="adversarial"`` (A-FT, Table 1): steps on
      \(\ell(w; D) + \gamma\,\ell(w; D_{adv})\) with adversarial examples generated
      against the current fast weights at every step (``ATRegularizer`` with
      ``gamma_in=gamma``); ``gamma=math.inf`` fine-tunes on the adversarial loss only
      (AQ-style). With ``anil`` only the head adapts.

    Runs in the model's current train/eval mode (of every submodule); call it under ``torch.no_grad()`` to get
    detached weights (the values do not depend on ``first_order``).

    Args:
        model: plain ``nn.Module`` or torchmeta ``MetaModule``.
        inputs, targets: the support set.
        steps, step_size, first_order, loss_fn: as in `robust_meta.adapt`.
        mode: ``"standard"`` or ``"adversarial"``.
        attack, eps, attack_steps, attack_step_size: the A-FT attack (``eps`` required).
        gamma: weight of the adversarial term (> 0; ``inf`` for adversarial loss only).
        anil: an `robust_meta.ANILHead` of ``model`` to fine-tune the head only.
        learner: a metric head of ``model`` (`robust_meta.ProtoNetHead`, `robust_meta.R2D2Head`):
            its weights come from the support set in closed form (``steps`` are not used).

    Returns:
        ``dict[str, Tensor]`` of all parameters.

    Raises:
        ValueError: unknown ``mode``, A-FT without ``eps``, ``gamma <= 0``, an ``anil`` head
            of another model.

    Shape:
        inputs: ``(N·K, C, H, W)`` in [0, 1]; targets: ``(N·K,)``.
    """
    if mode not in FINETUNE:
        raise ValueError(f"unknown finetune mode {mode!r}; choose from {', '.join(FINETUNE)}")
    if learner is not None:  # a metric head: the support set gives the weights in closed form
        if mode != "standard":
            raise ValueError(f"{learner!r} has no fine-tuning steps: adversarial fine-tuning needs a gradient learner")
        return learner.adapt(inputs, targets)
    if anil is not None and anil.model is not model:
        raise ValueError("anil must be an ANILHead built on the model being evaluated")
    if mode == "standard":
        if anil is not None:
            return anil.adapt(inputs, targets, steps=steps, step_size=step_size,
                              first_order=first_order, loss_fn=loss_fn)
        return adapt(model, inputs, targets, steps=steps, step_size=step_size,
                     first_order=first_order, loss_fn=loss_fn)
    if eps is None:
        raise ValueError("adversarial fine-tuning needs eps (finetune_eps)")
    eps = check_eps(eps, "finetune eps")
    gamma = float(gamma)
    if not gamma > 0:
        raise ValueError(f"finetune gamma must be > 0 (or inf), got {gamma}")
    if isinstance(step_size, Mapping) or anil is None:
        lr = step_size
    else:
        lr = {n: step_size for n in anil.head_names}
    if isinstance(lr, Mapping) and anil is not None:
        lr = {n: v for n, v in lr.items() if n in anil.head_names}
    att_steps, att_lr = _attack_steps(attack, attack_steps, attack_step_size)
    reg = ATRegularizer(attack, eps=eps, steps=att_steps, step_size=att_lr)
    return adapt(model, inputs, targets, steps=steps, step_size=lr, first_order=first_order,
                 loss_fn=loss_fn, regularizer=reg, gamma_in=gamma)


def _attack_steps(attack: AttackLike, steps: int | None, step_size: float | None):
    """Iteration settings that apply to a named attack (PGD: steps + step; APGD: steps)."""
    if isinstance(attack, str):
        name = attack.lower()
        if name == "pgd":
            return steps, step_size
        if name == "apgd":
            return steps, None
    return None, None



def _accuracy(logits: Tensor, targets: Tensor) -> float:
    return float((logits.argmax(dim=1) == targets).double().mean())


def _first_task_checks(
    model: nn.Module, fast: Params, task: Task, loss_fn: Callable[[Tensor, Tensor], Tensor]
) -> list[str]:
    """AutoAttack-style checks on one task: probabilities out, determinism, zero gradients."""
    out: list[str] = []
    x, y = task.query_x, task.query_y
    with torch.no_grad():
        a = call_model(model, x, fast)
        b = call_model(model, x, fast)
    if a.dim() == 2 and a.shape[1] > 1:
        rows = a.double().sum(dim=1)
        if bool(a.min() >= 0) and bool(a.max() <= 1) and bool(torch.allclose(rows, torch.ones_like(rows), atol=1e-5)):
            out.append(
                "the model's outputs lie in [0, 1] and sum to 1: it seems to return probabilities, "
                "not logits; attacks on the cross-entropy of probabilities are weak (AutoAttack "
                "check_range_output). Remove the final softmax."
            )
    if not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
        out.append(
            "the model is not deterministic: two calls on the same input in the evaluation mode "
            f"differ by up to {float((a - b).abs().max()):.3g} (dropout or another random "
            "layer?). RA of a randomised model needs EOT attacks; these numbers may overstate it."
        )
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(call_model(model, xg, fast), y)
        (g,) = torch.autograd.grad(loss, xg, allow_unused=True)
    if g is None:
        zero = x.shape[0]
    else:
        zero = int((g.detach().flatten(1).abs().sum(dim=1) == 0).sum())
    if zero:
        out.append(
            f"{zero} of {x.shape[0]} query images have a zero input gradient at the fine-tuned "
            "weights (first task): gradient-based attacks cannot move them; RA may be "
            "overestimated by gradient masking (AutoAttack check_zero_gradients)."
        )
    return out


def _prepare(raw: Task, device: torch.device, dtype: torch.dtype) -> Task:
    """The task on the model's device, its images in the model's dtype — float32 for a
    half-precision model (the network's input is cast in `call_model`, so the ε-ball and the
    projection stay in float32)."""
    task = raw.to(device)
    if dtype in LOW_PRECISION:
        dtype = torch.float32

    def cast(t: Tensor | None) -> Tensor | None:
        if t is not None and t.is_floating_point() and t.dtype != dtype:
            return t.to(dtype)
        return t

    return Task(cast(task.support_x), task.support_y, cast(task.query_x), task.query_y,
                cast(task.unlabeled), task.classes)


# ------------------------------------------------------------------------- one task
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
    learner: Any
    table: list[tuple[str, AttackLike]]
    eps_list: list[float]
    mode: bool | None  # None: every submodule keeps its own mode
    checks: bool
    threats: tuple[str, ...]
    compile: bool
    channels_last: bool | str
    device: torch.device
    dtype: torch.dtype


def _eval_task(model: nn.Module, job: _EvalJob, index: int, raw: Any, task_seed: int
               ) -> tuple[dict[str, float], list[str]]:
    """SA and every RA of one task, on its own random stream ``task_seed``."""
    row: dict[str, float] = {}
    msgs: list[str] = []
    with torch.random.fork_rng(devices=cuda_devices(job.device)), preserved_buffers(model), \
            preserved_modes(model, job.mode), _fast._use_policy(job.compile, job.channels_last):
        seed_torch(task_seed, job.device)
        task = _prepare(raw, job.device, job.dtype)
        ways = int(max(int(task.support_y.max()), int(task.query_y.max()))) + 1
        with torch.no_grad():
            fast = finetune(
                model, task.support_x, task.support_y, steps=job.steps, step_size=job.step_size,
                first_order=job.first_order, mode=job.finetune, attack=job.finetune_attack,
                eps=job.finetune_eps, gamma=job.finetune_gamma, attack_steps=job.attack_steps,
                attack_step_size=job.attack_step_size, anil=job.anil, loss_fn=job.loss_fn,
                learner=job.learner,
            )
            clean = call_model(model, task.query_x, fast)
        row["sa"] = _accuracy(clean, task.query_y)
        for label, spec in job.table:
            a_steps, a_lr = _attack_steps(spec, job.attack_steps, job.attack_step_size)
            for e in job.eps_list:
                # An attack instance is copied with its ε (sub-attacks' too) set to e.
                adv = perturb(spec, model, task.query_x, task.query_y, params=fast, eps=e,
                              steps=a_steps, step_size=a_lr, n_classes=ways, training=job.mode)
                with torch.no_grad():
                    row[metric_name(label, e)] = _accuracy(call_model(model, adv, fast), task.query_y)
        if "support" in job.threats or "both" in job.threats:
            row.update(_support_threats(model, job, task, ways))
        if job.checks and index == 0:
            # After the attacks, so that the values do not depend on ``checks``.
            msgs += _first_task_checks(model, fast, task, F.cross_entropy if job.loss_fn is None else job.loss_fn)
    return row, msgs


def _support_threats(model: nn.Module, job: _EvalJob, task: Task, ways: int) -> dict[str, float]:
    """RA with a poisoned support set (PGD through the adaptation), and with both sets attacked."""
    from .support_attacks import _adapt_fn, perturb_support, support_metric_name

    row: dict[str, float] = {}
    adapt_fn = _adapt_fn(model, learner=job.learner, anil=job.anil, steps=job.steps,
                         step_size=job.step_size, loss_fn=job.loss_fn)
    for e in job.eps_list:
        if e == 0:
            continue
        poisoned = perturb_support(adapt_fn, model, task.support_x, task.support_y, task.query_x,
                                   task.query_y, eps=e, steps=job.attack_steps,
                                   step_size=job.attack_step_size, training=job.mode)
        with torch.no_grad():
            fast = adapt_fn(poisoned, task.support_y) if job.learner is not None else finetune(
                model, poisoned, task.support_y, steps=job.steps, step_size=job.step_size,
                first_order=True, anil=job.anil, loss_fn=job.loss_fn)
            if "support" in job.threats:
                row[support_metric_name("support", "pgd", e)] = _accuracy(call_model(model, task.query_x, fast),
                                                                          task.query_y)
        if "both" in job.threats:
            for label, spec in job.table:
                a_steps, a_lr = _attack_steps(spec, job.attack_steps, job.attack_step_size)
                adv = perturb(spec, model, task.query_x, task.query_y, params=fast, eps=e,
                              steps=a_steps, step_size=a_lr, n_classes=ways, training=job.mode)
                with torch.no_grad():
                    row[support_metric_name("both", label, e)] = _accuracy(call_model(model, adv, fast),
                                                                           task.query_y)
    return row


def _serial(model: nn.Module, job: _EvalJob, source: Iterable[Any], base_seed: int):
    for i, raw in enumerate(source):
        yield _eval_task(model, job, i, raw, base_seed + i)


# ------------------------------------------------------------------------- worker processes
_WORKER: dict[str, Any] = {}


def _worker_init(payload: bytes, threads: int) -> None:
    import signal

    # The parent decides when to stop (Ctrl-C reaches the whole process group).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    _fast.tune_malloc()  # a worker process is robust-meta's own (ROBUST_META_MALLOPT=0: off)
    _WORKER["model"], _WORKER["job"] = pickle.loads(payload)


def _worker_task(index: int, raw: Any, task_seed: int) -> tuple[dict[str, float], list[str]]:
    return _eval_task(_WORKER["model"], _WORKER["job"], index, raw, task_seed)


class _MainRecorder(pickle.Pickler):
    """A pickler that notes every class or function it stores by reference to ``__main__``."""

    def __init__(self, file: Any):
        super().__init__(file)
        self.main_refs: list[str] = []

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, type) or callable(obj):
            if getattr(obj, "__module__", None) == "__main__":
                name = getattr(obj, "__qualname__", repr(obj))
                if name not in self.main_refs:
                    self.main_refs.append(name)
        return NotImplemented


def _interactive_main() -> bool:
    """Whether ``__main__`` cannot be re-imported by a spawned process (notebook, ``-c``, stdin)."""
    main = sys.modules.get("__main__")
    return main is None or not getattr(main, "__file__", None)


def _payload(model: nn.Module, job: _EvalJob, workers: int) -> bytes:
    """The pickled (model, job) for the workers, or a clear error where workers could not load it."""
    buf = io.BytesIO()
    pickler = _MainRecorder(buf)
    try:
        pickler.dump((model, job))
    except Exception as err:  # noqa: BLE001 - any pickling failure gets the same advice
        raise ValueError(
            f"workers={workers} sends the model, loss_fn and attacks to other processes, but they "
            f"cannot be pickled ({type(err).__name__}: {err}); use a module-level function "
            "instead of a lambda, or workers=1"
        ) from None
    if pickler.main_refs and _interactive_main():
        names = ", ".join(pickler.main_refs[:4])
        raise ValueError(
            f"workers={workers} runs the tasks in new processes, which must import {names}; "
            "it is defined in this interactive session (a notebook, python -c or stdin), which a "
            "new process cannot import. Put it in a .py file next to the notebook (e.g. with "
            "%%writefile mymodel.py) and import it from there, or use workers=1"
        )
    return buf.getvalue()


def _parallel(model: nn.Module, job: _EvalJob, source: Iterable[Any], base_seed: int, workers: int):
    """`_serial` in ``workers`` spawned processes; yields in task order, ≤ 2·workers tasks in flight."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    payload = _payload(model, job, workers)
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
    except BrokenProcessPool as err:
        raise RuntimeError(
            f"an evaluation worker process died ({err}). Common causes: the model class or loss "
            "is defined where a new process cannot import it (move it into a .py module), the "
            "machine ran out of memory (fewer workers), or a crash in native code; workers=1 "
            "evaluates in this process"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
