"""The GPU test suite (issue 20): every path on CUDA, run the day a device is lent.

Marked ``gpu`` and skipped without CUDA (CI has none); ``benchmarks/gpu.sh`` runs it first on a
GPU machine (``pytest -m gpu``). Each test is small: the whole file takes well under a minute
on one GPU. What cannot be shown on a CPU is shown here: CPU and CUDA generators with CUDA
images, training / evaluation / ``reproduce --quick`` on ``cuda``, checkpoints moving between
devices, compile on vs off, bf16 ε-balls, and the random state of every device left alone.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import robust_meta as rm
from robust_meta.data import Task

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ROOT = Path(__file__).resolve().parents[1]
OMNIGLOT = ROOT.parent / "shared" / "data" / "omniglot"
CUDA = torch.device("cuda", 0)


def tasks(n: int = 3, *, ways: int = 3, size: int = 16, channels: int = 1, device=CUDA) -> list[Task]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        out.append(Task(torch.rand(ways, channels, size, size, generator=g), torch.arange(ways),
                        torch.rand(3 * ways, channels, size, size, generator=g),
                        torch.arange(ways).repeat(3)).to(device))
    return out


def net(ways: int = 3, size: int = 16, channels: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    return rm.Conv4(channels, ways, hidden=8, image_size=size).to(CUDA)


def all_rng_states() -> list[torch.Tensor]:
    return [torch.get_rng_state(), *torch.cuda.get_rng_state_all()]


def same_states(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------- attacks
@pytest.mark.parametrize("gen_device", ["cpu", "cuda"])
def test_attacks_take_cpu_and_cuda_generators_with_cuda_images(gen_device):
    model = net().eval()
    t = tasks(1)[0]
    g = torch.Generator(device=gen_device).manual_seed(3)
    a = rm.linf_pgd(model, t.query_x, t.query_y, eps=8 / 255, alpha=2 / 255, steps=3, generator=g)
    g.manual_seed(3)
    b = rm.PGDAttack(model, eps=8 / 255, alpha=2 / 255, steps=3, generator=g)(t.query_x, t.query_y)
    assert a.device.type == "cuda" and torch.equal(a, b)
    assert bool(((a - t.query_x).abs() <= 8 / 255).all())
    g.manual_seed(3)
    c = rm.TradesAttack(model, eps=8 / 255, steps=2, generator=g)(t.query_x)
    assert c.device.type == "cuda" and bool(((c - t.query_x).abs() <= 8 / 255).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_the_eps_ball_exactly(dtype):
    model = net().to(dtype)
    ts = tasks(2)
    for eps in (1 / 255, 8 / 255):
        t = ts[0]
        adv = rm.perturb("pgd", model, t.query_x, t.query_y, eps=eps)
        assert adv.dtype == torch.float32
        assert float((adv - t.query_x).abs().double().max()) <= eps
    res = rm.evaluate(model, ts, eps=[0, 2 / 255], steps=2, step_size=0.1, progress=False, seed=0)
    assert 0 <= res.metrics["ra"].mean <= res.metrics["sa"].mean + 1e-9


# --------------------------------------------------------------------------- evaluate / train
def test_evaluate_on_cuda_leaves_every_generator_alone_and_is_reproducible():
    model = net()
    ts = tasks(3)
    before = all_rng_states()
    a = rm.evaluate(model, ts, eps=[0, 8 / 255], steps=2, step_size=0.1, attack_steps=3, progress=False, seed=0)
    b = rm.evaluate(model, ts, eps=[0, 8 / 255], steps=2, step_size=0.1, attack_steps=3, progress=False, seed=0)
    assert same_states(before, all_rng_states())
    assert a.metrics["ra"].values == b.metrics["ra"].values
    assert a.settings["device"].startswith("cuda") and a.settings["device_name"] != "cuda"


def test_compile_on_and_off_agree_on_cuda():
    if not rm.compile_available("cuda"):
        pytest.skip("no triton")
    model = net()
    ts = tasks(2)
    kw = dict(eps=[0, 8 / 255], steps=2, step_size=0.1, attack_steps=3, progress=False, seed=0)
    eager = rm.evaluate(model, ts, compile=False, **kw)
    compiled = rm.evaluate(model, ts, compile=True, **kw)
    assert compiled.settings["compile"] is True
    for k in eager.metrics:
        assert abs(eager.metrics[k].mean - compiled.metrics[k].mean) <= 0.15, k  # sign flips of ~0 gradients


def _tiny_config(**kw):
    from robust_meta.demo import demo_config

    return demo_config("rmaml-out", quick=True).replace(**{"meta_steps": 3, "device": "cuda", **kw})


def test_train_on_cuda_restores_the_callers_generators_and_writes_cpu_checkpoints(tmp_path):
    from robust_meta.train import load_checkpoint, model_from_checkpoint, train

    torch.manual_seed(123)
    before = all_rng_states()
    best = train(_tiny_config(), out_dir=tmp_path / "run", progress=False)
    assert same_states(before, all_rng_states())
    raw = torch.load(tmp_path / "run" / "last.pt", map_location=None, weights_only=True)

    def devices(obj):
        if isinstance(obj, torch.Tensor):
            yield obj.device.type
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from devices(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from devices(v)

    assert set(devices(raw)) <= {"cpu"}, "a checkpoint holds CUDA tensors: a CPU-only machine cannot open it"
    model, cfg, _ = model_from_checkpoint(best, device="cpu")
    assert next(model.parameters()).device.type == "cpu"
    # Resume on the CPU a run trained on the GPU, and the other way round.
    train(_tiny_config(meta_steps=4, device="cpu"), out_dir=tmp_path / "run", resume=True, progress=False)
    train(_tiny_config(meta_steps=5), out_dir=tmp_path / "run", resume=True, progress=False)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 5


@pytest.mark.skipif(not (OMNIGLOT / "images_background_small1.zip").is_file(), reason="no Omniglot data")
def test_reproduce_quick_on_cuda(tmp_path):
    from robust_meta.cli import main

    out = tmp_path / "out"
    assert main(["reproduce", "omniglot", "--data-folder", str(OMNIGLOT), "--out", str(out), "--quick",
                 "--methods", "maml,rmaml-out-fgsm", "--ways", "5", "--device", "cuda", "--no-progress"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert all(r["device"].startswith("cuda") and "audit" in r for r in doc["runs"])


def test_two_rank_cpu_training_on_a_gpu_machine_uses_gloo_and_equals_one_process(tmp_path):
    """``torchrun ... train --device cpu`` on a GPU machine: gloo, not NCCL (issue 20, item 4)."""
    from robust_meta.train import load_checkpoint, train

    cfg = _tiny_config(device="cpu", meta_steps=2)
    train(cfg, out_dir=tmp_path / "one", progress=False)
    script = (
        "from robust_meta.demo import demo_config; from robust_meta.train import train\n"
        "cfg = demo_config('rmaml-out', quick=True).replace(meta_steps=2, device='cpu')\n"
        f"train(cfg, out_dir={str(tmp_path / 'two')!r}, progress=False)\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", "29517", str(_write(tmp_path / "s.py", script))],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = load_checkpoint(tmp_path / "one" / "last.pt")["model"]
    two = load_checkpoint(tmp_path / "two" / "last.pt")["model"]
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_rank_nccl_training_equals_one_process(tmp_path):
    from robust_meta.train import load_checkpoint, train

    train(_tiny_config(meta_steps=2), out_dir=tmp_path / "one", progress=False)
    script = (
        "from robust_meta.demo import demo_config; from robust_meta.train import train\n"
        "cfg = demo_config('rmaml-out', quick=True).replace(meta_steps=2, device='cuda')\n"
        f"train(cfg, out_dir={str(tmp_path / 'two')!r}, progress=False)\n"
    )
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", "29518", str(_write(tmp_path / "s.py", script))],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = load_checkpoint(tmp_path / "one" / "last.pt")["model"]
    two = load_checkpoint(tmp_path / "two" / "last.pt")["model"]
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=1e-5)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_deterministic_algorithms_run_the_resnets():
    torch.use_deterministic_algorithms(True)
    try:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        model = rm.ResNet12(3, 3, image_size=32).to(CUDA)
        x = torch.rand(4, 3, 32, 32, device=CUDA, requires_grad=True)
        F.cross_entropy(model(x), torch.arange(4, device=CUDA) % 3).backward()
        assert x.grad is not None and math.isfinite(float(x.grad.abs().sum()))
    finally:
        torch.use_deterministic_algorithms(False)
