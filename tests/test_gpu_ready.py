"""Issue 20 ("ready for the GPU"): what can be shown on a CPU, shown on a CPU.

The GPU side of the same items is in ``tests/test_gpu.py`` (skipped without CUDA)."""

import warnings

import pytest
import torch
from torch import nn

import robust_meta as rm
from robust_meta import fast as _fast
from robust_meta.data import Task


def tiny_tasks(n=2, ways=3, size=8, channels=1):
    g = torch.Generator().manual_seed(0)
    return [Task(torch.rand(ways, channels, size, size, generator=g), torch.arange(ways),
                 torch.rand(3 * ways, channels, size, size, generator=g), torch.arange(ways).repeat(3))
            for _ in range(n)]


# ----------------------------------------------------------------- item 1: half precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eps", [1 / 255, 2 / 255, 8 / 255])
def test_half_precision_models_keep_the_eps_ball_in_float32(dtype, eps):
    torch.manual_seed(0)
    model = rm.Conv4(1, 3, hidden=4, image_size=8).to(dtype)
    t = tiny_tasks(1)[0]
    adv = rm.perturb("pgd", model, t.query_x, t.query_y, eps=eps, steps=3)
    assert adv.dtype == torch.float32
    assert float((adv - t.query_x).abs().double().max()) <= eps  # bf16 projection reached 1.25/255 at 1/255
    res = rm.evaluate(model, tiny_tasks(2), eps=[0, eps], steps=1, step_size=0.1, attack_steps=2,
                      progress=False, seed=0)
    assert res.settings["dtype"] == str(dtype)


# ----------------------------------------------------------------- item 3: default device
def test_task_draws_name_their_device_under_another_default_device():
    images, labels = torch.rand(30, 1, 4, 4), torch.arange(30) % 6
    torch.set_default_device("meta")  # stands in for "cuda": a draw that forgets device= lands there
    try:
        sampler = rm.TaskSampler(images, labels, ways=3, shots=1, queries=2, seed=0)
        task = sampler.sample(1)[0]
        pool = rm.UnlabeledPool(images, labels)
        extra = pool.draw(4, classes=[0, 1], generator=torch.Generator().manual_seed(0))
        anywhere = pool.draw(4, generator=torch.Generator().manual_seed(0))
        splits = rm.split_classes(labels, seed=0)
    finally:
        torch.set_default_device(None)
    assert task.support_x.device.type == "cpu" and extra.device.type == anywhere.device.type == "cpu"
    assert len(splits.train)


# ----------------------------------------------------------------- items 4, 5: backend and devices
def test_backend_follows_the_training_device_not_the_machine(monkeypatch):
    from robust_meta.distributed import rank_device, select_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_backend("cpu") == "gloo"  # torchrun ... train --device cpu on a GPU machine
    assert select_backend(torch.device("cuda")) == "nccl"
    assert select_backend(None) == "nccl"
    assert rank_device("cuda", local_rank=3, world_size=4, cuda_count=2) == torch.device("cuda", 1)
    assert rank_device("cuda", local_rank=3, world_size=4, cuda_count=1) == torch.device("cuda", 0)  # one GPU shown
    assert rank_device("cpu", local_rank=3, world_size=4, cuda_count=2) == torch.device("cpu")
    assert rank_device("cuda:1", local_rank=0, world_size=1, cuda_count=2) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="every rank on"):
        rank_device("cuda:1", local_rank=0, world_size=2, cuda_count=2)


def test_a_cuda_index_beyond_the_visible_gpus_is_a_clear_error(monkeypatch, capsys):
    from robust_meta._train_config import resolve_device
    from robust_meta.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"sees 2 CUDA devices \(cuda:0..cuda:1"):
        resolve_device("cuda:7")
    assert main(["train", "--device", "cuda:7", "--meta-steps", "1", "--out", "/tmp/never"]) == 2
    assert "cuda:7" in capsys.readouterr().err


# ----------------------------------------------------------------- item 8, 9: compiled calls
@pytest.fixture
def eager_backend(monkeypatch):
    """torch.compile with dynamo's graph capture but no code generation (fast on a CPU)."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="eager", dynamic=False))
    monkeypatch.setattr(_fast, "compile_available", lambda device="cpu": True)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def mlp(n_out=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, n_out))


def test_every_model_gets_its_own_recompile_budget(eager_backend):
    from torch._dynamo.utils import counters

    counters.clear()
    models = [mlp(n) for n in (3, 4, 5)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", rm.CompileWarning)
        with rm.fast_paths(compile=True, channels_last=False):
            for model in models:  # 3 models x 4 batch sizes = 12 graphs > one code object's limit of 8
                for b in (2, 3, 4, 5):
                    out = rm.call_model(model, torch.rand(b, 1, 4, 4))
                    assert out.shape == (b, model[-1].out_features)
    assert counters["stats"]["unique_graphs"] >= 12  # all compiled, none silently eager


def test_past_the_recompile_limit_a_model_falls_back_with_a_warning(eager_backend, monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    model = mlp()
    with rm.fast_paths(compile=True, channels_last=False):
        with pytest.warns(rm.CompileWarning, match="recompile_limit"):
            for b in (2, 3, 4, 5):
                out = rm.call_model(model, torch.rand(b, 1, 4, 4))
    torch.testing.assert_close(out, model(torch.rand(5, 1, 4, 4)) * 0 + out)  # it still answers


def test_the_stop_signal_of_call_features_is_not_a_compile_failure(eager_backend):
    model = mlp()
    calls = []
    model[1].register_forward_hook(lambda *_: calls.append(1))
    x = torch.rand(4, 1, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", rm.CompileWarning)
        with rm.fast_paths(compile=True, channels_last=False):
            for _ in range(3):
                feats = rm.call_features(model, x, dict(model.named_parameters()), head="3")
    assert feats.shape == (4, 8)
    assert len(calls) == 3  # one forward a call, not the compiled try and an eager re-run
    assert model not in _fast._BROKEN


def test_out_of_memory_in_a_compiled_call_reaches_the_caller(monkeypatch):
    monkeypatch.setattr(_fast, "compile_available", lambda device="cpu": True)

    def oom(_model):
        def fn(*a):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return fn

    monkeypatch.setattr(_fast, "_compiled_forward", oom)
    model = mlp()
    with rm.fast_paths(compile=True, channels_last=False), pytest.raises(torch.OutOfMemoryError):
        rm.call_model(model, torch.rand(2, 1, 4, 4), dict(model.named_parameters()))
    assert model not in _fast._BROKEN  # not taken for a compile failure


# ----------------------------------------------------------------- item 10: when "auto" decides
def test_robust_meta_update_decides_compile_at_call_time_on_the_inputs_device(monkeypatch):
    seen = []
    real = _fast.resolve_compile
    monkeypatch.setattr(_fast, "resolve_compile", lambda s, d, **k: seen.append(torch.device(d)) or real(s, d, **k))
    model = mlp()
    loss = rm.RobustMetaUpdate(nn.functional.cross_entropy, model, eps=0.1, gamma_out=0, compile="auto")
    assert seen == []  # building the loss before model.to("cuda") decides nothing
    loss(torch.rand(3, 1, 4, 4), torch.arange(3), params=dict(model.named_parameters()))
    assert seen == [torch.device("cpu")]
    with pytest.raises(ValueError, match="compile"):
        rm.RobustMetaUpdate(nn.functional.cross_entropy, model, eps=0.1, gamma_out=0, compile="sometimes")


# ----------------------------------------------------------------- item 11: host reads
def test_stats_and_input_checks_read_the_device_once(monkeypatch):
    model = mlp()
    loss = rm.RobustMetaUpdate(nn.functional.cross_entropy, model, attack="fgsm", eps=0.1, gamma_out=1.0)
    x, y = torch.rand(6, 1, 4, 4), torch.arange(6) % 3
    loss(x, y, params=dict(model.named_parameters()))
    stats = loss.last.as_dict()
    assert set(stats) == {"loss", "clean_loss", "robust_loss", "aux_loss", "clean_acc", "adv_acc"}
    assert stats["loss"] == pytest.approx(stats["clean_loss"] + stats["robust_loss"])
    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.numel()) or real(t))
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: pytest.fail("a check read the device with bool()"))
    loss(x, y, params=dict(model.named_parameters()))
    assert len(reads) == 1  # every value check of the call in one transfer
    monkeypatch.undo()
    for bad, match in ((x * 2, r"\[0, 1\]"), (x * float("nan"), "NaN"), (None, r"labels must lie")):
        with pytest.raises(ValueError, match=match):
            if bad is None:
                loss(x, y + 3, params=dict(model.named_parameters()))
            else:
                loss(bad, y, params=dict(model.named_parameters()))


# ----------------------------------------------------------------- item 12: ResNets and checkpoints
def test_global_average_pool_equals_adaptive_pooling_and_keeps_checkpoints():
    from robust_meta.models import GlobalAvgPool

    x = torch.rand(3, 7, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(GlobalAvgPool()(x), nn.AdaptiveAvgPool2d(1)(x).flatten(1))
    model = rm.ResNet12(3, 5, image_size=32, widths=(4, 8, 8, 8))
    assert not any("pool" in k for k in model.state_dict())  # no parameters: old checkpoints load


def test_checkpoint_snapshots_are_copies_and_saved_on_the_cpu(tmp_path):
    from robust_meta._checkpoint import checkpoint_state, to_cpu

    model = mlp()
    opt = torch.optim.Adam(model.parameters())
    model(torch.rand(2, 1, 4, 4)).sum().backward()
    opt.step()
    snap = checkpoint_state(model=model, config={}, step=1, optimizer=opt, on_device=True)
    before = snap["model"]["1.weight"].clone()
    with torch.no_grad():
        model[1].weight.add_(1)
    assert torch.equal(snap["model"]["1.weight"], before)  # a snapshot, not a view of the live weights
    state = snap["optimizer"]["state"][0]["exp_avg"]
    assert state is not opt.state_dict()["state"][0]["exp_avg"]
    assert to_cpu(snap)["model"]["1.weight"] is snap["model"]["1.weight"]  # CPU tensors: no extra copy


# ----------------------------------------------------------------- item 13: the command on GPUs
def test_eval_workers_on_a_gpu_is_refused_before_any_work(monkeypatch, capsys, tmp_path):
    import robust_meta.train as T
    from robust_meta.cli import main

    monkeypatch.setattr(T, "_device", lambda name: torch.device("cuda"))
    ckpt = tmp_path / "x.pt"
    ckpt.write_bytes(b"not read")
    assert main(["eval", str(ckpt), "--workers", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--device cpu" in err and "--workers 1" in err


def test_reproduce_workers_spread_over_the_gpus():
    from robust_meta.reproduce import _worker_device

    assert [_worker_device("cuda", i, 2) for i in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert _worker_device("cuda:1", 3, 2) == "cuda:1" and _worker_device("cpu", 3, 2) == "cpu"
