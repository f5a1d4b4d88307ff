"""`robust-meta train` under torchrun: 2 gloo ranks give the single-process result."""

import os
import socket
import time

import pytest
import torch

from robust_meta.train import TrainConfig, load_checkpoint, train

pytestmark = pytest.mark.filterwarnings("ignore:step .*catastrophic overfitting:RuntimeWarning")

CONFIG = dict(
    method="rmaml-out", attack="fgsm", dataset="digits", ways=3, shots=1, queries=2, meta_batch=3,
    meta_steps=3, inner_steps=1, test_inner_steps=1, inner_lr=0.1, meta_lr=0.01, first_order=False,
    eval_every=3, val_tasks=2, eval_attack_steps=2, hidden=4, device="cpu", seed=5,
)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        train(TrainConfig(**CONFIG), out_dir=out_dir, progress=False)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_rank_training_equals_single_process(tmp_path, monkeypatch):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    import torch.multiprocessing as mp

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    # One thread like the workers: the same kernels in the same summation order, so the
    # comparison can be exact (float noise would be amplified by FGSM's sign()).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig(**CONFIG), out_dir=tmp_path / "single", progress=False)
    finally:
        torch.set_num_threads(threads)

    ctx = mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail("distributed training did not finish within 120 s")

    single = load_checkpoint(tmp_path / "single" / "last.pt")
    ddp = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert single["step"] == ddp["step"] == 3
    # Parameters equal the single-process run. Batch-norm running statistics are rank 0's
    # (each rank only sees its shard), as with DDP's broadcast buffers.
    names = [k for k in single["model"] if "running_" not in k and "num_batches" not in k]
    assert names
    for k in names:
        torch.testing.assert_close(ddp["model"][k], single["model"][k], rtol=1e-6, atol=1e-7, msg=k)
    from robust_meta.train import _seed_all, build_model_for, step_seed

    _seed_all(step_seed(CONFIG["seed"], "init"))  # the initial weights, as train() makes them
    init = build_model_for(TrainConfig(**CONFIG).resolved()).state_dict()
    moved = max((single["model"][k] - init[k]).abs().max().item() for k in names if k in init)
    assert moved > 1e-4  # training moved the weights: not two untouched models compared
    lines = (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()
    assert len(lines) == len((tmp_path / "single" / "log.jsonl").read_text().splitlines())
