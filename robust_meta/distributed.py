"""Data-parallel meta-training and evaluation with ``torch.distributed`` (no DDP wrapper).

A meta-batch is a list of tasks; each rank takes a contiguous block of it (`shard`),
adapts and computes the outer loss of its tasks, and the meta-gradients are summed across
ranks (`all_reduce_grads`) so that every rank holds exactly the gradient a single
process would compute on the whole meta-batch. Evaluation works the same way: each rank
evaluates its block of test tasks and `gather_results` puts the per-task results back
in the original task order.

Launch with ``torchrun`` (it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT``)::

    torchrun --nproc_per_node=2 -m robust_meta.cli train ...

The training loop then needs three changes (see ``docs/performance.md``)::

    init_from_env()                         # once, before building the optimizer
    broadcast_parameters(model)             # all ranks start from rank 0's weights
    for batch in loader:
        tasks = shard(list(iter_tasks(batch)))   # this rank's block of the meta-batch
        optimizer.zero_grad()
        loss = sum(robust_loss(t.query_x, t.query_y, params=adapt(model, t.support_x,
                   t.support_y, steps=5, step_size=0.01)) for t in tasks)
        loss.backward()                     # the SUM over local tasks, not the mean
        all_reduce_grads(model, average_over=n_tasks_in_meta_batch)
        optimizer.step()
        if is_main_process(): log / checkpoint

Everything here also works without an initialised process group (a single process is
rank 0 of a world of size 1), so the same loop runs unchanged with ``python`` and with
``torchrun``.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "all_reduce_grads",
    "broadcast_parameters",
    "evaluate_distributed",
    "gather_results",
    "get_rank",
    "get_world_size",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "rank_device",
    "select_backend",
    "shard",
    "shard_bounds",
]

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): log, print and save checkpoints only here."""
    return get_rank() == 0


def select_backend(device: torch.device | str | None = None) -> str:
    """The process-group backend for training on ``device``: NCCL for CUDA, gloo otherwise.

    ``None`` (no device known): NCCL when CUDA is available, else gloo. A CPU run on a GPU
    machine gets gloo: NCCL cannot broadcast CPU tensors.
    """
    if device is None:
        return "nccl" if torch.cuda.is_available() else "gloo"
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def rank_device(device: torch.device | str, *, local_rank: int | None = None, world_size: int | None = None,
                cuda_count: int | None = None) -> torch.device:
    """The device of this rank: ``cuda`` becomes ``cuda:<LOCAL_RANK mod visible GPUs>`` under torchrun.

    With one process (or a CPU device) ``device`` is returned as it is. With several ranks each
    takes its own GPU: ``LOCAL_RANK`` modulo the GPUs this process sees (1 under launchers that
    show each process one GPU, e.g. Slurm's ``--gpus-per-task=1``). An explicit index
    (``cuda:1``) with several ranks would put every rank on that one GPU, which NCCL refuses:
    it is an error.

    Raises:
        ValueError: an explicit CUDA index with more than one rank, or no visible GPU.
    """
    device = torch.device(device)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if device.type != "cuda" or world_size <= 1:
        return device
    if device.index is not None:
        raise ValueError(
            f"--device {device} under torchrun with {world_size} processes would put every rank on "
            "that one GPU (NCCL refuses it): use --device cuda (or auto), and each rank takes "
            "cuda:LOCAL_RANK; choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) or 0)
    if cuda_count is None:
        cuda_count = torch.cuda.device_count()
    if cuda_count < 1:
        raise ValueError("a CUDA device was requested but this process sees no GPU")
    return torch.device("cuda", local_rank % cuda_count)


def init_from_env(
    *,
    backend: str | None = None,
    timeout_s: float = 600.0,
    device: torch.device | str | None = None,
) -> tuple[int, int]:
    """Initialise the default process group from the ``torchrun`` environment variables.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``
    through the ``env://`` method). Without ``WORLD_SIZE`` (a plain ``python`` run) or with
    ``WORLD_SIZE=1`` nothing is initialised and ``(0, 1)`` is returned, so scripts run the
    same way with and without ``torchrun``. Calling it again once initialised is a no-op.

    With the NCCL backend the current CUDA device is set to this rank's (`rank_device`).

    Args:
        backend: ``"gloo"``, ``"nccl"`` or ``None``: `select_backend` of ``device`` (NCCL for a
            CUDA device, gloo for a CPU one, also on a GPU machine).
        timeout_s: collective timeout in seconds.
        device: the device the ranks compute on (decides the default backend).

    Returns:
        ``(rank, world_size)``.

    Raises:
        ValueError: malformed environment variables, an unknown backend, ``timeout_s <= 0``.
        RuntimeError: ``torch.distributed`` is not available in this build of torch.

    Example:
        >>> rank, world = init_from_env()   # (0, 1) under plain `python`
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    env_world = os.environ.get("WORLD_SIZE")
    if env_world is None:
        return 0, 1
    try:
        world_size = int(env_world)
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise ValueError(
            f"RANK/WORLD_SIZE/LOCAL_RANK must be integers, got RANK={os.environ.get('RANK')!r} "
            f"WORLD_SIZE={env_world!r} LOCAL_RANK={os.environ.get('LOCAL_RANK')!r}"
        ) from err
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= RANK < WORLD_SIZE, got RANK={rank} WORLD_SIZE={world_size}")
    if world_size == 1:
        return 0, 1
    if not dist.is_available():
        raise RuntimeError("this build of torch has no torch.distributed support")
    if backend is None:
        backend = select_backend(device)
    if backend not in ("gloo", "nccl", "mpi", "ucc"):
        raise ValueError(f"unknown backend {backend!r}; choose from gloo, nccl, mpi, ucc")
    if backend == "nccl":
        torch.cuda.set_device(rank_device("cuda", local_rank=local_rank, world_size=world_size))
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return rank, world_size


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if world_size is None:
        world_size = get_world_size()
    if rank is None:
        rank = get_rank()
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    return rank, world_size


def shard_bounds(n: int, rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous block of ``n`` items.

    Blocks differ in size by at most one; the first ``n % world_size`` ranks get one more.
    Concatenating the blocks of ranks ``0..world_size-1`` gives ``range(n)`` in order.

    Raises:
        ValueError: ``n < 0`` or a bad rank/world size.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    rank, world_size = _rank_world(rank, world_size)
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return start, stop


def shard(items: Iterable[T], rank: int | None = None, world_size: int | None = None) -> list[T]:
    """This rank's contiguous block of ``items`` (e.g. the tasks of a meta-batch).

    The partition depends only on ``len(items)``, ``rank`` and ``world_size`` (defaults:
    the current process group; a single process gets everything), so a single process can
    reproduce any rank's share by passing ``rank=``/``world_size=``. A rank may get an empty
    list when there are fewer items than ranks; it must still take part in
    `all_reduce_grads` and `gather_results`.

    Args:
        items: a sequence or any finite iterable (materialised into a list).
        rank: defaults to `get_rank`.
        world_size: defaults to `get_world_size`.

    Returns:
        ``list(items)[start:stop]`` with ``(start, stop) = shard_bounds(len(items), ...)``.

    Raises:
        ValueError: a bad rank or world size.

    Example:
        >>> shard(list(range(5)), rank=0, world_size=2), shard(list(range(5)), rank=1, world_size=2)
        ([0, 1, 2], [3, 4])
    """
    seq = items if isinstance(items, Sequence) else list(items)
    start, stop = shard_bounds(len(seq), rank, world_size)
    return list(seq[start:stop])


def _trainable(params_or_module: nn.Module | Iterable[Tensor]) -> list[Tensor]:
    if isinstance(params_or_module, nn.Module):
        params = list(params_or_module.parameters())
    elif isinstance(params_or_module, Tensor):
        params = [params_or_module]
    else:
        params = list(params_or_module)
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(
                    f"params_or_module must be an nn.Module or an iterable of tensors, found "
                    f"{type(p).__name__}"
                )
    return [p for p in params if p.requires_grad]


def all_reduce_grads(
    params_or_module: nn.Module | Iterable[Tensor],
    *,
    average_over: int | None = None,
    group: Any = None,
) -> None:
    """Sum ``.grad`` across ranks and divide, so every rank holds the single-process meta-gradient.

    Two conventions, both exact:

    * ``average_over=n_tasks`` (recommended): each rank's loss is the **sum** of the outer
      losses of its own tasks; after the call each gradient is
      ``(1/n_tasks) Σ_{all tasks} ∇L_t`` — what one process computes with
      ``mean(losses over all tasks)``, whatever the shard sizes.
    * ``average_over=None``: divide by the world size (the DDP convention). Exact only when
      every rank has the same number of tasks and each rank's loss is the mean over them.

    Parameters whose ``.grad`` is ``None`` on this rank (e.g. a rank with no task) take part
    as zeros, so every rank issues the same collectives. All gradients of one dtype and
    device are flattened into one buffer and reduced with a single ``all_reduce``.

    Args:
        params_or_module: a module or an iterable of parameters; only those with
            ``requires_grad`` are reduced.
        average_over: the number of tasks in the whole meta-batch, or ``None``.
        group: a process group (default: the world).

    Raises:
        ValueError: ``average_over < 1``.
        TypeError: ``params_or_module`` is neither a module nor tensors.

    Example:
        >>> (sum(losses_of_my_tasks)).backward()
        >>> all_reduce_grads(model, average_over=meta_batch_size)
        >>> optimizer.step()
    """
    if average_over is not None and (
        isinstance(average_over, bool) or not isinstance(average_over, int) or average_over < 1
    ):
        raise ValueError(f"average_over must be an int >= 1 or None, got {average_over!r}")
    params = _trainable(params_or_module)
    distributed = is_distributed()
    world = dist.get_world_size(group) if distributed else 1
    divisor = float(world if average_over is None else average_over)
    for p in params:
        if p.grad is None:
            if not distributed:
                continue
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params if p.grad is not None]
    if distributed:
        buckets: dict[tuple, list[Tensor]] = {}
        for g in grads:
            if g.is_sparse:
                raise TypeError("sparse gradients are not supported by all_reduce_grads")
            buckets.setdefault((g.device, g.dtype), []).append(g)
        for bucket in buckets.values():
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            if divisor != 1.0:
                flat.div_(divisor)
            offset = 0
            for g in bucket:
                n = g.numel()
                g.copy_(flat[offset : offset + n].view_as(g))
                offset += n
    elif divisor != 1.0:
        for g in grads:
            g.div_(divisor)


def broadcast_parameters(module: nn.Module, *, src: int = 0, group: Any = None) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (no-op in a single process).

    Call it once after building the model (and before the optimizer's first step) so that
    every rank starts from identical weights, as DDP does at construction.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not is_distributed():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=src, group=group)


def gather_results(
    local: Sequence[T],
    *,
    n_total: int | None = None,
    group: Any = None,
) -> list[T]:
    """Per-item results of every rank's `shard`, concatenated in the original order.

    Each rank passes the results of its own block (any picklable objects: floats, dicts,
    CPU tensors). Every rank receives the full list (``all_gather_object``). In a single
    process the input is returned as a list.

    Args:
        local: this rank's results, one per item of ``shard(items)``, in that order.
        n_total: the expected total number of items; checked when given (also checks that
            each rank's block has the length `shard_bounds` gives it).
        group: a process group (default: the world).

    Returns:
        The results of all items, in the order of the unsharded sequence.

    Raises:
        ValueError: the gathered length differs from ``n_total``, or a rank's block has the
            wrong length.
    """
    local = list(local)
    if not is_distributed():
        parts = [local]
    else:
        parts = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, local, group=group)
    if n_total is not None:
        world = len(parts)
        for r, part in enumerate(parts):
            start, stop = shard_bounds(n_total, r, world)
            if len(part) != stop - start:
                raise ValueError(
                    f"rank {r} returned {len(part)} results, but its shard of {n_total} items "
                    f"has {stop - start}"
                )
    out: list[T] = [x for part in parts for x in part]
    return out


def evaluate_distributed(
    model: nn.Module,
    tasks: Iterable[Any] | Any,
    *,
    seed: int | None = None,
    checks: bool = True,
    **kwargs: Any,
) -> Any:
    """`robust_meta.evaluation.evaluate` with the test tasks split across ranks.

    Each rank evaluates its `shard` of ``tasks``; the per-task values of every metric
    are gathered in the original task order and every rank returns the same
    `robust_meta.evaluation.EvalResult` over all tasks (means and 95% intervals
    recomputed from the gathered values; ``settings["world_size"]`` added,
    ``settings["elapsed_s"]`` is the slowest rank's time).

    **Randomness.** With ``seed=s`` task ``i`` (its index in ``tasks``) is evaluated with
    its attacks seeded by ``s + i``, so the per-task values do not depend on the number of
    ranks: a 2-rank run equals a 1-process ``evaluate_distributed(..., seed=s)`` exactly.
    Plain ``evaluate(seed=s)`` seeds task ``i`` with ``s + i`` too, so it gives the same
    values (as does ``evaluate(..., workers=N)``). With ``seed=None`` each shard is evaluated
    in one call with a base seed taken from that rank's generator; the values then equal
    plain ``evaluate`` only for deterministic attacks.

    **Checks.** The first-task checks run on task 0 (on rank 0); the checks on the metrics
    (RA above SA, RA rising with ε or attack strength) run on the gathered values.

    Args:
        model: the meta-model, identical on every rank (e.g. after
            `broadcast_parameters`).
        tasks: the test tasks, the same sequence on every rank (anything
            `robust_meta.iter_tasks` accepts; materialised into a list).
        seed: per-task seeding base (see above) or ``None``.
        checks: run the sanity checks.
        **kwargs: every other option of `robust_meta.evaluation.evaluate` (``eps`` is
            required there). ``progress`` defaults to ``False`` off the main process.

    Returns:
        `robust_meta.evaluation.EvalResult` over all tasks, on every rank.

    Raises:
        ValueError: no tasks; anything `robust_meta.evaluation.evaluate` raises.

    Example:
        >>> init_from_env()
        >>> res = evaluate_distributed(model, test_tasks, eps=2/255, seed=0)
        >>> if is_main_process(): print(res.table())
    """
    import time
    import warnings

    from . import evaluation as _ev
    from .data import iter_tasks

    all_tasks = list(iter_tasks(tasks))
    max_tasks = kwargs.pop("max_tasks", None)
    if max_tasks is not None:
        all_tasks = all_tasks[:max_tasks]
    if not all_tasks:
        raise ValueError("no tasks to evaluate: the task source is empty")
    kwargs.setdefault("progress", is_main_process())
    n = len(all_tasks)
    start, stop = shard_bounds(n)
    local = all_tasks[start:stop]
    # One task a call (per-task seeds): decide compile="auto" on the whole local share, so
    # that a long evaluation compiles as evaluate() would.
    from .fast import _model_device, resolve_compile

    kwargs["compile"] = resolve_compile(kwargs.get("compile", "auto"), _model_device(model), work=len(local),
                                        min_work=_ev.AUTO_COMPILE_MIN_TASKS)

    rows: list[dict[str, float]] = []
    messages: list[str] = []
    settings: dict[str, Any] = {}
    t0 = time.perf_counter()
    if seed is None:
        chunks = [(local, None, checks and start == 0)] if local else []
    else:
        chunks = [([t], seed + start + i, checks and start + i == 0) for i, t in enumerate(local)]
    for chunk, chunk_seed, first_checks in chunks:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", _ev.EvalWarning)
            res = _ev.evaluate(model, chunk, seed=chunk_seed, checks=first_checks, **kwargs)
        if first_checks:
            # keep the first-task checks only; the metric checks are redone on all tasks
            messages += res.warnings
        settings = res.settings
        names = list(res.metrics)
        rows += [{k: res.metrics[k].values[j] for k in names} for j in range(res.n_tasks)]
    elapsed = time.perf_counter() - t0

    gathered = gather_results(rows, n_total=n)
    meta = gather_results([(settings, messages, elapsed)])
    settings = next((s for s, _, _ in meta if s), {})
    messages = [m for _, msgs, _ in meta for m in msgs]
    slowest = max(e for _, _, e in meta)

    names = list(gathered[0])
    metrics = {k: _ev.Metric.from_values(row[k] for row in gathered) for k in names}
    if checks and hasattr(_ev, "_metric_checks") and hasattr(_ev, "_attack_table"):
        # messages of the first-task checks may already hold metric checks of task 0 alone
        first_task = list(messages)
        table = _ev._attack_table(kwargs.get("attacks", ("pgd",)))
        metric_msgs = _ev._metric_checks(metrics, table, list(settings.get("eps", [])))
        messages = [m for m in first_task if not m.startswith(("RA ", "the stronger"))] + metric_msgs
    settings = dict(settings)
    settings.update(
        n_tasks=n, seed=seed, world_size=get_world_size(), elapsed_s=slowest,
        tasks_per_s=n / slowest if slowest > 0 else float("inf"),
    )
    if is_main_process():
        for msg in messages:
            warnings.warn(msg, _ev.EvalWarning, stacklevel=2)
    return _ev.EvalResult(metrics, settings, messages)
