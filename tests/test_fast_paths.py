"""Fast paths: torch.compile'd forward passes, channels_last, evaluate(workers=N).

Every compiled path is checked against the eager one in float64 (same fast weights, same
adversarial examples from the same random start, same meta-gradient, same batch-norm
buffers), the compile cache against recompilation per task (dynamo counters), and the
worker processes against ``workers=1`` value for value.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robust_meta as rm
from robust_meta import fast as _fast
from robust_meta.distributed import evaluate_distributed

needs_compiler = pytest.mark.skipif(not rm.compile_available("cpu"), reason="no C++ compiler for inductor")


def small_net(channels: int = 1, classes: int = 3) -> nn.Module:
    """Conv + train-mode batch norm + pool + linear: every kind of layer the fast paths meet."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 4 * 4, classes),
    ).double()


def make_tasks(n: int, *, channels: int = 1, size: int = 8, classes: int = 3, queries: int = 4, seed: int = 0):
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        sx = torch.rand(classes, channels, size, size, generator=g, dtype=torch.float64)
        qx = torch.rand(classes * queries, channels, size, size, generator=g, dtype=torch.float64)
        out.append((sx, torch.arange(classes), qx, torch.arange(classes).repeat(queries)))
    return out


def dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@pytest.fixture
def fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- compile
@needs_compiler
def test_compiled_inner_loop_attack_and_meta_gradient_match_eager(fresh_dynamo):
    """One first-order R-MAML_out-PGD step: fast weights, adversarial examples, loss, meta-gradient
    and the batch-norm running statistics the step moves are those of the eager step."""
    sx, sy, qx, qy = make_tasks(1)[0]

    def step(model, compile):
        update = rm.RobustMetaUpdate(F.cross_entropy, model, attack="pgd", eps=8 / 255, gamma_out=0.5,
                                     attack_steps=3, compile=compile)
        with rm.fast_paths(compile=compile, channels_last=False):
            fast = rm.adapt(model, sx, sy, steps=2, step_size=0.1, first_order=True)
            torch.manual_seed(7)
            adv = rm.perturb("pgd", model, qx, qy, params=fast, eps=8 / 255, steps=3)
            torch.manual_seed(7)
            loss = update(qx, qy, params=fast)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return fast, adv, loss, grads, [b.clone() for b in model.buffers()]

    eager_model, compiled_model = small_net(), small_net()
    fe, ae, le, ge, be = step(eager_model, False)
    before = dynamo_graphs()
    fc, ac, lc, gc, bc = step(compiled_model, True)
    assert dynamo_graphs() > before, "nothing was compiled"
    for k in fe:
        torch.testing.assert_close(fc[k], fe[k], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ac, ae, rtol=0, atol=1e-12)
    torch.testing.assert_close(lc, le, rtol=1e-10, atol=1e-12)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for a, b in zip(bc, be):  # running statistics moved by the clean forward, as in eager
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@needs_compiler
def test_evaluate_compiles_once_not_per_task(fresh_dynamo):
    """New tasks (new fast weights, new images of the same shapes) reuse the compiled graphs."""
    model = small_net()
    tasks = make_tasks(5)
    kw = dict(eps=8 / 255, steps=2, step_size=0.1, attack_steps=2, progress=False, seed=0, checks=False)
    first = rm.evaluate(model, tasks[:1], compile=True, **kw)
    graphs = dynamo_graphs()
    assert graphs >= 3  # fine-tune step, measurement, attack step
    from torch._dynamo.utils import counters

    recompiles = sum(counters["recompiles"].values()) if "recompiles" in counters else 0
    rest = rm.evaluate(model, tasks, compile=True, **kw)
    assert dynamo_graphs() == graphs, "a new task recompiled"
    if "recompiles" in counters:
        assert sum(counters["recompiles"].values()) == recompiles
    eager = rm.evaluate(model, tasks, compile=False, **kw)
    assert rest.settings["compile"] is True and eager.settings["compile"] is False
    assert rest.metrics["sa"].values == eager.metrics["sa"].values
    assert rest.metrics["ra"].values == eager.metrics["ra"].values
    assert first.metrics["ra"].values == eager.metrics["ra"].values[:1]


@needs_compiler
def test_second_order_inner_loop_stays_eager_and_exact(fresh_dynamo):
    """create_graph inner steps are not compiled (double backward); the meta-gradient is eager's."""
    sx, sy, qx, qy = make_tasks(1)[0]

    def meta_grad(model, compile):
        fast = rm.adapt(model, sx, sy, steps=2, step_size=0.1, first_order=False, compile=compile)
        loss = F.cross_entropy(rm.call_model(model, qx, fast), qy)
        return torch.autograd.grad(loss, list(model.parameters()))

    eager = meta_grad(small_net(), False)
    before = dynamo_graphs()
    with rm.fast_paths(compile=True, channels_last=False):
        compiled = meta_grad(small_net(), True)
    # Only the outer forward may have been compiled; the two inner steps were not.
    assert dynamo_graphs() - before <= 1
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_failed_compilation_warns_and_runs_eagerly(monkeypatch):
    model = small_net()
    x = make_tasks(1)[0][2]

    def broken(_model):
        def fn(*_a, **_k):
            raise RuntimeError("inductor exploded")
        return fn

    monkeypatch.setattr(_fast, "_compiled_forward", broken)
    ref = copy.deepcopy(model)
    expected = ref(x)  # eager, train mode: moves ref's running statistics
    with _fast._use_policy(True, False), pytest.warns(rm.CompileWarning, match="inductor exploded"):
        out = rm.call_model(model, x, dict(model.named_parameters()))
    torch.testing.assert_close(out, expected)
    for a, b in zip(model.buffers(), ref.buffers()):  # the fallback moved the model's own
        torch.testing.assert_close(a, b)
    # Marked broken: the next call is eager and silent.
    with _fast._use_policy(True, False), warnings.catch_warnings():
        warnings.simplefilter("error")
        rm.call_model(model, x, dict(model.named_parameters()))


def test_a_real_error_is_not_hidden_by_the_fallback(monkeypatch):
    model = small_net()

    def broken(_model):
        def fn(*_a, **_k):
            raise RuntimeError("compile failed first")
        return fn

    monkeypatch.setattr(_fast, "_compiled_forward", broken)
    bad = torch.rand(2, 5, 8, 8, dtype=torch.float64)  # 5 channels into a 1-channel conv
    with _fast._use_policy(True, False), pytest.raises(RuntimeError, match="channels") as info:
        rm.call_model(model, bad, dict(model.named_parameters()))
    assert info.value.__context__ is None  # not chained to the compiler's exception


def test_compile_switch_values(monkeypatch):
    with pytest.raises(ValueError, match="compile must be"):
        _fast.resolve_compile("yes", "cpu")
    with pytest.raises(ValueError, match="channels_last must be"):
        with rm.fast_paths(compile=False, channels_last="sometimes"):
            pass
    assert _fast.resolve_compile(False, "cpu") is False
    monkeypatch.setenv("ROBUST_META_COMPILE", "0")
    assert rm.compile_available("cpu") is False
    assert _fast.resolve_compile("auto", "cpu") is False
    with pytest.warns(rm.CompileWarning, match="not available"):
        assert _fast.resolve_compile(True, "cpu") is False
    monkeypatch.delenv("ROBUST_META_COMPILE")
    # "auto" never compiles on a CPU (measured slower than eager channels_last there) ...
    assert _fast.resolve_compile("auto", "cpu", work=10**6, min_work=1) is False
    # ... and on CUDA only for a workload that repays the compilation.
    monkeypatch.setattr(_fast, "compile_available", lambda device="cpu": True)
    assert _fast.resolve_compile("auto", "cuda", work=5, min_work=100) is False
    assert _fast.resolve_compile("auto", "cuda", work=100, min_work=100) is True
    assert _fast.resolve_compile("auto", "cuda") is True


def test_auto_compile_leaves_cpu_inputs_eager(monkeypatch):
    """fast_paths(compile="auto") on a machine with triton compiles CUDA inputs only."""
    monkeypatch.setattr(_fast, "compile_available", lambda device="cpu": True)

    def refuse(_model):
        raise AssertionError("a CPU input reached torch.compile under compile='auto'")

    monkeypatch.setattr(_fast, "_compiled_forward", refuse)
    model = small_net()
    x = make_tasks(1)[0][2]
    with rm.fast_paths(compile="auto", channels_last=False):
        out = rm.call_model(model, x, dict(model.named_parameters()))
    torch.testing.assert_close(out, model(x))


def test_malloc_tuning_is_an_opt_in_for_library_calls_and_the_command_s_own(monkeypatch):
    """Issue 17, defect 6: a library call never changes the host process's allocator."""
    calls = []
    monkeypatch.setattr(_fast, "tune_malloc", lambda: calls.append(1) or True)
    monkeypatch.delenv("ROBUST_META_MALLOPT", raising=False)
    rm.evaluate(small_net(), make_tasks(1), eps=8 / 255, steps=1, step_size=0.1, attack_steps=1,
                progress=False, seed=0)
    with rm.fast_paths():
        pass
    assert calls == [], "a library call tuned malloc without being asked"
    monkeypatch.setenv("ROBUST_META_MALLOPT", "1")  # the documented opt-in
    rm.evaluate(small_net(), make_tasks(1), eps=8 / 255, steps=1, step_size=0.1, attack_steps=1,
                progress=False, seed=0)
    assert calls, "ROBUST_META_MALLOPT=1 did not opt in"
    calls.clear()
    monkeypatch.delenv("ROBUST_META_MALLOPT")
    from robust_meta.cli import main

    assert main(["presets"]) == 0
    assert calls == [1], "the robust-meta command (its own process) should tune malloc"
    monkeypatch.undo()
    monkeypatch.setattr(_fast, "_MALLOC_TUNED", [])
    monkeypatch.setenv("ROBUST_META_MALLOPT", "0")
    assert _fast.tune_malloc() is False
    monkeypatch.setattr(_fast, "_MALLOC_TUNED", [])
    monkeypatch.delenv("ROBUST_META_MALLOPT")
    import platform
    import sys

    expected = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert _fast.tune_malloc() is expected
    assert _fast.tune_malloc() is expected  # cached: mallopt runs once


def test_meta_modules_are_never_compiled(monkeypatch):
    class Meta(nn.Module):  # duck-typed torchmeta MetaModule
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def meta_named_parameters(self):
            return self.named_parameters()

        def forward(self, x, params=None):
            if params is None:
                return self.lin(x)
            return F.linear(x, params["lin.weight"], params["lin.bias"])

    def refuse(_model):
        raise AssertionError("a MetaModule reached torch.compile")

    monkeypatch.setattr(_fast, "_compiled_forward", refuse)
    m = Meta()
    with _fast._use_policy(True, "auto"):
        out = rm.call_model(m, torch.rand(3, 4), dict(m.named_parameters()))
    assert out.shape == (3, 2)


def test_evaluate_auto_compile_needs_enough_tasks():
    model = small_net()
    res = rm.evaluate(model, make_tasks(2), eps=8 / 255, steps=1, step_size=0.1, attack_steps=1,
                      progress=False, seed=0, compile="auto")
    assert res.settings["compile"] is False  # 2 tasks cannot repay a compilation


# ----------------------------------------------------------------------------- layout
def test_channels_last_rule():
    rule = rm.channels_last_wins
    assert rule(torch.empty(75, 3, 84, 84))
    assert not rule(torch.empty(75, 1, 28, 28))  # measured slower: stays contiguous
    assert rule(torch.empty(75, 3, 32, 32))
    assert not rule(torch.empty(75, 3, 16, 16))
    assert not rule(torch.empty(75, 3 * 84 * 84))
    conv = small_net(channels=3)
    conv84 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                           nn.Flatten(), nn.Linear(16, 3)).double()
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 84 * 84, 2))
    x = torch.rand(2, 3, 84, 84, dtype=torch.float64)
    assert _fast._layout(conv84, x, "auto").is_contiguous(memory_format=torch.channels_last)
    assert _fast._layout(conv, x, "auto") is x  # the model cannot take 84x84 at all: left as it is
    assert _fast._layout(mlp, x, "auto") is x
    assert _fast._layout(conv, x, False) is x
    small = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    assert _fast._layout(conv, small, "auto") is small
    assert _fast._layout(conv, small, True).is_contiguous(memory_format=torch.channels_last)


def test_channels_last_gives_the_same_values():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    ).double()
    tasks = make_tasks(3, channels=3)
    kw = dict(eps=8 / 255, steps=2, step_size=0.1, attack_steps=3, progress=False, seed=1, compile=False)
    a = rm.evaluate(model, tasks, channels_last=True, **kw)
    b = rm.evaluate(model, tasks, channels_last=False, **kw)
    assert a.metrics["sa"].values == b.metrics["sa"].values
    assert a.metrics["ra"].values == b.metrics["ra"].values
    x = tasks[0][2]
    with _fast._use_policy(False, True):
        cl = rm.call_model(model, x, dict(model.named_parameters()))
    torch.testing.assert_close(cl, model(x), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- seeds and workers
def trained_ish() -> nn.Module:
    """A model whose RA depends on the random start (so a seed mix-up would show)."""
    model = small_net()
    tasks = make_tasks(20, seed=100)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for sx, sy, qx, qy in tasks:
        loss = F.cross_entropy(model(torch.cat([sx, qx])), torch.cat([sy, qy]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_per_task_seeds_make_each_task_independent_of_the_others():
    model = trained_ish()
    tasks = make_tasks(6)
    kw = dict(eps=[4 / 255, 16 / 255], steps=2, step_size=0.1, attack_steps=2, progress=False, compile=False)
    whole = rm.evaluate(model, tasks, seed=5, **kw)
    tail = rm.evaluate(model, tasks[2:], seed=7, **kw)  # task i of the tail is task i + 2
    for k in whole.metrics:
        assert whole.metrics[k].values[2:] == tail.metrics[k].values
    dist = evaluate_distributed(model, tasks, seed=5, **kw)  # one process: same per-task seeds
    for k in whole.metrics:
        assert dist.metrics[k].values == whole.metrics[k].values
    other = rm.evaluate(model, tasks, seed=6, **kw)
    assert any(other.metrics[k].values != whole.metrics[k].values for k in whole.metrics if k != "sa")


def test_unseeded_evaluate_follows_the_global_generator():
    model = trained_ish()
    tasks = make_tasks(4)
    kw = dict(eps=16 / 255, steps=1, step_size=0.1, attack_steps=1, progress=False, compile=False)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    a = rm.evaluate(model, tasks, **kw)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is not moved
    b = rm.evaluate(model, tasks, **kw)
    assert a.metrics["ra"].values == b.metrics["ra"].values
    torch.manual_seed(4)
    c = rm.evaluate(model, tasks, **kw)
    assert c.settings["base_seed"] != a.settings["base_seed"]


def loss_fn_module_level(logits, targets):
    return F.cross_entropy(logits, targets)


@pytest.mark.slow
def test_workers_give_the_values_of_one_process():
    model = trained_ish()
    model_before = copy.deepcopy(model.state_dict())
    tasks = make_tasks(7)
    kw = dict(eps=[0, 4 / 255, 16 / 255], steps=2, step_size=0.1, attack_steps=2, progress=False,
              seed=11, attacks=("pgd", "fgsm"), compile=False, loss_fn=loss_fn_module_level)
    one = rm.evaluate(model, tasks, workers=1, **kw)
    two = rm.evaluate(model, iter(tasks), workers=2, **kw)  # a stream, not a list
    assert two.settings["workers"] == 2
    for k in one.metrics:
        assert two.metrics[k].values == one.metrics[k].values, k
    assert one.warnings == two.warnings
    for k, v in model.state_dict().items():
        assert torch.equal(v, model_before[k])
    capped = rm.evaluate(model, iter(tasks), workers=2, max_tasks=3, **kw)
    assert capped.metrics["ra"].values == one.metrics["ra"].values[:3]


def test_workers_refuse_bad_values_and_unpicklable_jobs():
    model = small_net()
    tasks = make_tasks(2)
    kw = dict(eps=8 / 255, steps=1, step_size=0.1, progress=False, compile=False)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="workers must be an int"):
            rm.evaluate(model, tasks, workers=bad, **kw)
    with pytest.raises(ValueError, match="cannot be pickled"):
        rm.evaluate(model, tasks, workers=2, loss_fn=lambda a, b: F.cross_entropy(a, b), **kw)
