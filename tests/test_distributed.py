"""robust_meta.distributed: sharding, gradient all-reduce and result gathering.

The two-process tests spawn 2 CPU workers with the gloo backend on 127.0.0.1 and check,
in float64, that the all-reduced meta-gradient and the gathered per-task evaluation equal
a single-process run over the same tasks.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_meta import PGDAttack, RobustMetaUpdate, adapt, perturb
from robust_meta.distributed import (
    all_reduce_grads,
    evaluate_distributed,
    gather_results,
    get_rank,
    get_world_size,
    init_from_env,
    is_main_process,
    shard,
    shard_bounds,
)
from robust_meta.params import call_model

WAYS, SHOTS, QUERIES = 3, 1, 2
EPS = 4 / 255


class TinyNet(nn.Module):
    """conv-BN-ReLU-pool + linear head: batch norm present, as in Conv4."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
        )
        self.classifier = nn.Linear(16, WAYS)

    def forward(self, x):
        return self.classifier(self.features(x))


def make_model() -> nn.Module:
    torch.manual_seed(123)
    return TinyNet().double().train()


def make_tasks(n: int) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(7)
    tasks = []
    for _ in range(n):
        sx = torch.rand(WAYS * SHOTS, 1, 6, 6, generator=g, dtype=torch.float64)
        qx = torch.rand(WAYS * QUERIES, 1, 6, 6, generator=g, dtype=torch.float64)
        sy = torch.arange(WAYS).repeat_interleave(SHOTS)
        qy = torch.arange(WAYS).repeat_interleave(QUERIES)
        tasks.append((sx, sy, qx, qy))
    return tasks


def task_loss(model, robust, task, index):
    """Second-order R-MAML_out loss of one task; the PGD random start is seeded by task index."""
    sx, sy, qx, qy = task
    torch.manual_seed(1000 + index)
    fast = adapt(model, sx, sy, steps=2, step_size=0.1)
    return robust(qx, qy, params=fast)


def task_eval(model, task, index):
    """Per-task SA / RA / clean loss after fine-tuning (eval-time protocol, no graph)."""
    sx, sy, qx, qy = task
    torch.manual_seed(2000 + index)
    with torch.no_grad():
        fast = adapt(model, sx, sy, steps=3, step_size=0.1)
        logits = call_model(model, qx, fast)
    adv = perturb("pgd", model, qx, qy, params=fast, eps=EPS, steps=3)
    with torch.no_grad():
        adv_logits = call_model(model, adv, fast)
    return {
        "index": index,
        "sa": float((logits.argmax(1) == qy).double().mean()),
        "ra": float((adv_logits.argmax(1) == qy).double().mean()),
        "loss": float(F.cross_entropy(logits, qy)),
    }


def meta_grads(model, tasks, indices, n_total):
    """Gradient of the SUM of local task losses, then all-reduced over n_total tasks."""
    robust = RobustMetaUpdate(F.cross_entropy, model, attack="pgd", eps=EPS, gamma_out=0.2, attack_steps=2)
    model.zero_grad(set_to_none=True)
    if tasks:
        sum(task_loss(model, robust, t, i) for t, i in zip(tasks, indices)).backward()
    all_reduce_grads(model, average_over=n_total)
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


#: FGSM without a random start: a deterministic attack.
FGSM0 = PGDAttack(eps=EPS, alpha=1.0, steps=1, random_start=None)
EVAL_KW = dict(eps=[EPS, 3 * EPS], steps=3, step_size=0.1, attack_steps=3, progress=False)


def library_evals(model, tasks):
    """evaluate_distributed twice: per-task seeded PGD, and a deterministic attack (FGSM)."""
    seeded = evaluate_distributed(model, tasks, seed=5, **EVAL_KW)
    deterministic = evaluate_distributed(model, tasks, attacks={"fgsm0": FGSM0}, **EVAL_KW)
    return seeded, deterministic


def single_process_reference(n_tasks):
    model = make_model()
    tasks = make_tasks(n_tasks)
    robust = RobustMetaUpdate(F.cross_entropy, model, attack="pgd", eps=EPS, gamma_out=0.2, attack_steps=2)
    model.zero_grad(set_to_none=True)
    loss = torch.stack([task_loss(model, robust, t, i) for i, t in enumerate(tasks)]).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    evals = [task_eval(model, t, i) for i, t in enumerate(tasks)]
    return grads, evals


def _worker(rank: int, world: int, port: int, out_dir: str, n_tasks: int) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    got_rank, got_world = init_from_env(backend="gloo", timeout_s=60)
    try:
        assert (got_rank, got_world) == (rank, world) == (get_rank(), get_world_size())
        assert is_main_process() == (rank == 0)
        model = make_model()
        all_tasks = make_tasks(n_tasks)
        start, stop = shard_bounds(n_tasks)
        local = shard(all_tasks)
        indices = list(range(start, stop))
        grads = meta_grads(model, local, indices, n_tasks)
        evals = gather_results([task_eval(model, t, i) for t, i in zip(local, indices)], n_total=n_tasks)
        seeded, deterministic = library_evals(model, all_tasks)
        torch.save({"grads": grads, "evals": evals, "seeded": seeded.to_dict(),
                    "deterministic": deterministic.to_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, out_dir: str, n_tasks: int, timeout: float = 60.0) -> None:
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _worker, args=(world, _free_port(), out_dir, n_tasks), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"distributed workers did not finish within {timeout} s")


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """Spawn the 2 gloo workers once per task count; returns the directory of their outputs."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    cache: dict[int, str] = {}

    def run(n_tasks: int):
        if n_tasks not in cache:
            out = tmp_path_factory.mktemp(f"dist{n_tasks}")
            _spawn(2, str(out), n_tasks)
            cache[n_tasks] = out
        return cache[n_tasks]

    return run


# ---------------------------------------------------------------- single-process properties


@pytest.mark.parametrize("n,world", [(0, 3), (1, 2), (5, 2), (7, 3), (8, 4), (3, 5)])
def test_shard_partitions_in_order_and_balanced(n, world):
    items = list(range(n))
    blocks = [shard(items, rank=r, world_size=world) for r in range(world)]
    assert [x for b in blocks for x in b] == items
    sizes = [len(b) for b in blocks]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)
    assert [shard_bounds(n, r, world) for r in range(world)] == [
        (sum(sizes[:r]), sum(sizes[: r + 1])) for r in range(world)
    ]


def test_shard_defaults_to_everything_in_one_process_and_accepts_iterables():
    assert shard(iter(range(4))) == [0, 1, 2, 3]
    assert (get_rank(), get_world_size(), is_main_process()) == (0, 1, True)


@pytest.mark.parametrize("rank,world", [(2, 2), (-1, 2), (0, 0), (0, 1.5)])
def test_shard_rejects_bad_rank_or_world(rank, world):
    with pytest.raises(ValueError, match="rank|world_size"):
        shard([1, 2], rank=rank, world_size=world)


def test_init_from_env_without_torchrun_is_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env() == (0, 1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_from_env() == (0, 1)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2"):
        init_from_env()


def test_all_reduce_grads_single_process_divides_by_average_over():
    p = nn.Parameter(torch.tensor([2.0, 4.0], dtype=torch.float64))
    q = nn.Parameter(torch.zeros(1))  # no grad: left as None
    p.grad = torch.tensor([3.0, 6.0], dtype=torch.float64)
    all_reduce_grads([p, q], average_over=3)
    assert torch.equal(p.grad, torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert q.grad is None
    with pytest.raises(ValueError, match="average_over"):
        all_reduce_grads([p], average_over=0)
    with pytest.raises(TypeError, match="str"):
        all_reduce_grads(["w"])


def test_sum_then_average_over_equals_mean_loss_single_process():
    """The documented recipe (sum of task losses + average_over=n) is the mean-loss gradient."""
    grads_ref, _ = single_process_reference(3)
    model = make_model()
    tasks = make_tasks(3)
    grads = meta_grads(model, tasks, [0, 1, 2], 3)
    for n, g in grads_ref.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-12, atol=1e-14)


def test_gather_results_single_process_checks_length():
    assert gather_results([1, 2], n_total=2) == [1, 2]
    with pytest.raises(ValueError, match="rank 0 returned 2 results"):
        gather_results([1, 2], n_total=3)


# ---------------------------------------------------------------- two processes (gloo)


@pytest.mark.parametrize("n_tasks", [3, 1])
def test_two_process_meta_gradient_and_eval_equal_single_process(two_process_run, n_tasks):
    """3 tasks: uneven shards (2 + 1). 1 task: rank 1 has none and contributes zeros."""
    tmp_path = two_process_run(n_tasks)
    grads_ref, evals_ref = single_process_reference(n_tasks)
    assert grads_ref["features.0.weight"].abs().sum() > 0
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        for n, g in grads_ref.items():
            torch.testing.assert_close(out["grads"][n], g, rtol=1e-12, atol=1e-14, msg=f"rank {rank} {n}")
        assert out["evals"] == evals_ref  # per-task values, in the original task order


def _values(d):
    return {k: m["values"] for k, m in d["metrics"].items()}


@pytest.mark.parametrize("n_tasks", [3])
def test_two_process_evaluate_distributed_equals_single_process(two_process_run, n_tasks):
    """evaluate_distributed on 2 ranks: same per-task values as 1 process, in task order."""
    from robust_meta.evaluation import evaluate

    tmp_path = two_process_run(n_tasks)
    model = make_model()
    tasks = make_tasks(n_tasks)
    seeded_ref = evaluate_distributed(model, tasks, seed=5, **EVAL_KW).to_dict()
    det_ref = evaluate(model, tasks, attacks={"fgsm0": FGSM0}, **EVAL_KW).to_dict()
    assert seeded_ref["settings"]["world_size"] == 1
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert out["seeded"]["settings"]["world_size"] == 2
        assert out["seeded"]["settings"]["n_tasks"] == n_tasks
        assert _values(out["seeded"]) == _values(seeded_ref)
        assert _values(out["deterministic"]) == _values(det_ref)
        for k, m in out["deterministic"]["metrics"].items():
            assert m["mean"] == pytest.approx(det_ref["metrics"][k]["mean"], abs=1e-15)


def test_evaluate_distributed_seeding_is_per_task():
    """Per-task seeds: tasks[1:] with seed+1 gives the values of tasks 1 and 2."""
    model = make_model()
    tasks = make_tasks(3)
    full = _values(evaluate_distributed(model, tasks, seed=5, **EVAL_KW).to_dict())
    assert all(len(v) == 3 for v in full.values())
    tail = _values(evaluate_distributed(model, tasks[1:], seed=6, **EVAL_KW).to_dict())
    assert {k: v[1:] for k, v in full.items()} == tail
