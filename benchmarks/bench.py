"""Meta-step and evaluation benchmark of robust-meta (issue 7).

Usage::

    python benchmarks/bench.py [--quick] [--config conv4-84|omniglot-28|tiny|all] [--json out.json]
                               [--device cpu|cuda] [--dtype fp32|bf16] [--channels-last]
                               [--no-extras] [--profile METHOD] [--compile off|on|auto]

For each method (MAML, R-MAML_out with PGD-10 / FGSM / TRADES, AQ, R-MAML_both, ANIL,
R-MAML_out-ANIL-FGSM, R-MAML_out-CL), first and second order, it measures one *meta-step*
(for each task of the meta-batch: adapt K=5 steps on the support set, robust outer loss on
the query set with :class:`robust_meta.RobustMetaUpdate`; mean over tasks, backward, Adam
step):

* median and min/max of the step time over ``--steps`` steps after warm-up, and the
  ratio to plain MAML (same order) measured in the same process. The methods are timed
  **round-robin**: every method's step runs once per rep, in turn, so all of them see the
  same machine conditions (not one method's steps after another's); the ``x MAML`` ratio
  is also taken per rep (min–max shown);
* FLOPs per step (``torch.utils.flop_counter.FlopCounterMode`` over the whole step:
  inner loop, attack, outer forward, backward), the achieved FLOP/s, and that as a fraction
  of this machine's large fp32 matmul FLOP/s and of a large conv forward+backward,
  both measured in the same run; ``(time ratio) / (FLOP ratio)`` vs MAML;
* peak memory of a step (CPU: the process's RSS high-water mark, reset before each step
  through ``/proc/self/clear_refs``; CUDA: ``torch.cuda.max_memory_allocated``);

plus evaluation throughput (test tasks per second, S-FT 10 steps + PGD-10), a plain MAML
step written with ``higher`` (if installed) side by side with ours, a ``torch.func.vmap``
over tasks versus the per-task loop (evaluation and meta-step), and the effect of
``check_inputs=False`` and ``channels_last`` on the R-MAML_out-FGSM step (each comparison
timed round-robin too).

ANIL: the speedup of R-MAML_out-ANIL-FGSM over R-MAML_out-FGSM (per-rep ratio, median and
min–max) is reported next to their FLOP ratio FGSM / ANIL-FGSM, with the verdict "meets its
FLOP ratio" when the median speedup reaches the FLOP ratio ("... within the min–max spread"
when only the best rep does).

``--compile off|on|auto`` runs every robust-meta step (and the evaluation) inside
``robust_meta.fast_paths(compile=...)`` (needs a robust_meta that has it). ``--config tiny``
(28×28×1, hidden 8, 2 tasks; not part of ``all``) is for tests.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from robust_meta import (
    ANILHead,
    ATRegularizer,
    Conv4,
    RobustMetaUpdate,
    TradesRegularizer,
    adapt,
    perturb,
)
from robust_meta.params import call_model

EPS = 2 / 255
INNER_LR = 0.01
K_TRAIN = 5


# ----------------------------------------------------------------------------- model


def build_conv4(in_channels: int, n_classes: int, hidden: int, image_size: int) -> tuple[nn.Module, str]:
    return Conv4(in_channels, n_classes, hidden, image_size=image_size), "robust_meta.models.Conv4"


@dataclass
class Config:
    name: str
    in_channels: int
    image_size: int
    hidden: int
    ways: int
    shots: int
    queries: int
    tasks: int


CONFIGS = {
    # MAML's MiniImageNet net (32 filters), the paper's setting.
    "conv4-84": Config("conv4-84", 3, 84, 32, 5, 1, 15, 4),
    # MAML's Omniglot net (64 filters), 28x28 grey images, meta-batch 16.
    "omniglot-28": Config("omniglot-28", 1, 28, 64, 5, 1, 15, 16),
    # For tests: seconds per run; the numbers mean nothing. Not part of --config all.
    "tiny": Config("tiny", 1, 28, 8, 5, 1, 15, 2),
}
ALL_CONFIGS = ["conv4-84", "omniglot-28"]


def make_tasks(cfg: Config, n: int, device, dtype, channels_last: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    out = []
    for _ in range(n):
        sx = torch.rand(cfg.ways * cfg.shots, *shape, generator=g)
        qx = torch.rand(cfg.ways * cfg.queries, *shape, generator=g)
        sy = torch.arange(cfg.ways).repeat_interleave(cfg.shots)
        qy = torch.arange(cfg.ways).repeat_interleave(cfg.queries)
        sx, qx = (t.to(device=device, dtype=dtype) for t in (sx, qx))
        if channels_last:
            sx, qx = (t.contiguous(memory_format=torch.channels_last) for t in (sx, qx))
        out.append((sx, sy.to(device), qx, qy.to(device)))
    return out


# ----------------------------------------------------------------------------- methods


@dataclass
class Method:
    name: str
    gamma_out: float = 0.0
    attack: str = "none"
    attack_steps: int | None = None
    trades: bool = False
    both: bool = False
    anil: bool = False
    cl: bool = False


METHODS = [
    Method("MAML"),
    Method("R-MAML_out-PGD10", 0.2, "pgd", 10),
    Method("R-MAML_out-FGSM", 0.2, "fgsm"),
    Method("R-MAML_out-TRADES", 5.0, "pgd", 10, trades=True),
    Method("AQ-PGD10", math.inf, "pgd", 10),
    Method("R-MAML_both-PGD10", 0.2, "pgd", 10, both=True),
    Method("ANIL", anil=True),
    Method("R-MAML_out-ANIL-FGSM", 0.2, "fgsm", anil=True),
    Method("R-MAML_out-CL-PGD10", 0.2, "pgd", 10, cl=True),
]


class Step:
    """One meta-step of a method: callable, holds the model, optimizer and loss objects."""

    def __init__(self, method: Method, model: nn.Module, tasks, *, first_order: bool,
                 check_inputs: bool = True, context: Callable[[], contextlib.AbstractContextManager] | None = None):
        self.method, self.model, self.tasks, self.first_order = method, model, tasks, first_order
        self.context = context
        aux = None
        extra: list[nn.Parameter] = []
        if method.cl:
            from robust_meta.contrastive import ContrastiveAux

            aux = ContrastiveAux(model, weight=0.1, temperature=0.5)
            extra = list(aux.parameters())
        reg = None
        if method.trades:
            reg = TradesRegularizer(method.attack, eps=EPS, steps=method.attack_steps, check_inputs=check_inputs)
        self.robust = RobustMetaUpdate(
            F.cross_entropy, model, attack=method.attack if method.gamma_out else "none", eps=EPS,
            gamma_out=method.gamma_out, attack_steps=method.attack_steps, regularizer=reg, aux=aux,
            check_inputs=check_inputs,
        )
        self.inner_reg = ATRegularizer(method.attack, eps=EPS, steps=method.attack_steps,
                                       check_inputs=check_inputs) if method.both else None
        self.anil = ANILHead(model) if method.anil else None
        self.opt = torch.optim.Adam([*model.parameters(), *extra], lr=1e-3)

    def eager(self) -> Callable[[], float]:
        """This step outside any ``--compile`` context (FLOPs are counted eagerly; same math)."""

        def run() -> float:
            context, self.context = self.context, None
            try:
                return self()
            finally:
                self.context = context

        return run

    def __call__(self) -> float:
        with self.context() if self.context is not None else contextlib.nullcontext():
            self.opt.zero_grad(set_to_none=True)
            losses = []
            for sx, sy, qx, qy in self.tasks:
                if self.anil is not None:
                    fast = self.anil.adapt(sx, sy, steps=K_TRAIN, step_size=INNER_LR, first_order=self.first_order)
                else:
                    fast = adapt(self.model, sx, sy, steps=K_TRAIN, step_size=INNER_LR,
                                 first_order=self.first_order, regularizer=self.inner_reg,
                                 gamma_in=0.2 if self.inner_reg else 0.0)
                losses.append(self.robust(qx, qy, params=fast))
            loss = torch.stack(losses).mean()
            loss.backward()
            self.opt.step()
        return float(loss.detach())


# ----------------------------------------------------------------------------- measurement


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            m = re.search(rf"{field}:\s+(\d+)\s+kB", fh.read())
        return int(m.group(1)) if m else None
    except OSError:
        return None


def reset_peak(device: torch.device) -> int | None:
    """Reset the peak-memory counter; return the current usage in bytes."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM (Linux >= 4.0)
    except OSError:
        pass
    # The kernel's RSS counters are synced lazily (per-thread caches), so right after the reset
    # VmRSS can read a little above VmHWM: take the smaller, so that "peak - base" is never < 0.
    rss = [v for v in (_status_kib("VmRSS"), _status_kib("VmHWM")) if v is not None]
    return min(rss) * 1024 if rss else None


def read_peak(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    hwm = _status_kib("VmHWM")
    if hwm is None:  # not Linux: ru_maxrss is a process-lifetime high-water mark
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return hwm * 1024


class _GlobalOnly:
    """Replaces FlopCounterMode's ModuleTracker: its backward hooks break
    ``torch.autograd.grad(..., inputs=<leaf>)`` (torchattacks' input gradients) with
    "A leaf node was passed to _will_engine_execute_node". Totals are all we need."""

    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of everything ``fn`` dispatches (forward, attack, backward, double backward)."""
    fc = FlopCounterMode(display=False)
    fc.mod_tracker = _GlobalOnly()
    with fc:
        fn()
    return int(fc.get_total_flops())


def _timed_call(fn: Callable[[], object], device, memory: bool, times: list, peaks: list) -> None:
    base = reset_peak(device) if memory else None
    t0 = time.perf_counter()
    fn()
    sync(device)
    times.append(time.perf_counter() - t0)
    if memory:
        peak = read_peak(device)
        if peak is not None and base is not None:
            peaks.append((peak, peak - base))


def _timing(times: list[float], peaks: list) -> dict:
    out = {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "times_s": times,
    }
    if peaks:
        out["peak_bytes"] = max(p for p, _ in peaks)
        out["peak_over_start_bytes"] = max(d for _, d in peaks)
    return out


def time_fn(fn: Callable[[], object], device, *, warmup: int, steps: int, memory: bool = False):
    """Time one function alone (``steps`` calls after ``warmup``)."""
    return time_round_robin({"fn": fn}, device, warmup=warmup, steps=steps, memory=memory)["fn"]


def time_round_robin(fns: dict[str, Callable[[], object]], device, *, warmup: int, steps: int,
                     memory: bool = False, on_error: bool = False) -> dict[str, dict | str]:
    """Time several functions **interleaved**: ``warmup`` untimed rounds, then ``steps`` rounds
    in each of which every function runs once, in the given order (A B C A B C ...), so that
    all of them see the same machine conditions. Returns ``name -> time_fn``-style dict.

    ``on_error=True``: a function that raises during warm-up is reported as
    ``"failed: ..."`` and left out of the timed rounds (the others go on).
    """
    live = dict(fns)
    out: dict[str, dict | str] = {}
    for _ in range(warmup):
        for name, fn in list(live.items()):
            try:
                fn()
            except Exception as err:  # noqa: BLE001
                if not on_error:
                    raise
                out[name] = f"failed: {type(err).__name__}: {str(err)[:120]}"
                del live[name]
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in live}
    peaks: dict[str, list] = {name: [] for name in live}
    for _ in range(steps):
        for name, fn in live.items():
            _timed_call(fn, device, memory, times[name], peaks[name])
    for name in live:
        out[name] = _timing(times[name], peaks[name])
    return {name: out[name] for name in fns}


def per_rep_ratio(num: dict, den: dict) -> dict:
    """``num / den`` per rep of a round-robin timing: median, min, max."""
    r = [a / b for a, b in zip(num["times_s"], den["times_s"])]
    return {"median": statistics.median(r), "min": min(r), "max": max(r)}


def matmul_flops_per_s(device, dtype, *, n: int, reps: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def conv_flops_per_s(device, dtype, *, channels: int, size: int, batch: int, reps: int, channels_last: bool) -> float:
    conv = nn.Conv2d(channels, channels, 3, padding=1).to(device=device, dtype=dtype)
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype, requires_grad=True)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)

    def fb():
        conv(x).sum().backward()

    flops = count_flops(fb)
    fb()
    sync(device)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fb()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return flops / best


# ----------------------------------------------------------------------------- peer: higher


def higher_maml_step(model, opt, tasks, *, first_order: bool):
    """The same plain MAML step written with ``higher.innerloop_ctx`` (per-task backward)."""
    import higher

    inner_opt = torch.optim.SGD(model.parameters(), lr=INNER_LR)
    opt.zero_grad(set_to_none=True)
    n = len(tasks)
    for sx, sy, qx, qy in tasks:
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False,
                                  track_higher_grads=not first_order) as (fmodel, diffopt):
            for _ in range(K_TRAIN):
                diffopt.step(F.cross_entropy(fmodel(sx), sy))
            (F.cross_entropy(fmodel(qx), qy) / n).backward()
    opt.step()


def plain_maml_step(model, opt, tasks, *, first_order: bool):
    """Our MAML step with a per-task backward, like higher's loop (for a like-for-like row)."""
    opt.zero_grad(set_to_none=True)
    n = len(tasks)
    for sx, sy, qx, qy in tasks:
        fast = adapt(model, sx, sy, steps=K_TRAIN, step_size=INNER_LR, first_order=first_order)
        (F.cross_entropy(call_model(model, qx, fast), qy) / n).backward()
    opt.step()


# ----------------------------------------------------------------------------- vmap vs loop


def functional_pieces(model: nn.Module):
    """Pure-function inner loop and PGD on a copy of ``model`` without running statistics."""
    from torch.func import functional_call, grad, replace_all_batch_norm_modules_

    fmodel = copy.deepcopy(model)
    replace_all_batch_norm_modules_(fmodel)

    def loss(params, x, y):
        return F.cross_entropy(functional_call(fmodel, params, (x,)), y)

    def inner(params, sx, sy, steps, first_order):
        for _ in range(steps):
            g = grad(loss)(params, sx, sy)
            params = {k: v - INNER_LR * (g[k].detach() if first_order else g[k]) for k, v in params.items()}
        return params

    def pgd(params, x, y, steps, alpha):
        params = {k: v.detach() for k, v in params.items()}
        delta = (torch.rand_like(x) * 2 - 1) * EPS
        for _ in range(steps):
            g = grad(lambda d: loss(params, (x + d).clamp(0, 1), y))(delta)
            delta = (delta + alpha * g.sign()).clamp(-EPS, EPS)
        return (x + delta).clamp(0, 1).detach()

    return fmodel, loss, inner, pgd


def vmap_vs_loop(model, tasks, device, *, warmup: int, steps: int, first_order: bool):
    """Evaluation (S-FT 10 + PGD-10) and R-MAML_out-FGSM meta-gradient: vmap vs per-task loop."""
    from torch.func import functional_call, grad, vmap

    fmodel, loss, inner, pgd = functional_pieces(model)
    params = {k: v.detach() for k, v in fmodel.named_parameters()}
    sx, sy, qx, qy = (torch.stack([t[i] for t in tasks]) for i in range(4))

    def eval_task(p, sx, sy, qx, qy):
        fast = inner(p, sx, sy, 10, True)
        adv = pgd(fast, qx, qy, 10, 2.5 * EPS / 10)
        logits = functional_call(fmodel, fast, (adv,))
        return (logits.argmax(1) == qy).float().mean()

    def outer_task(p, sx, sy, qx, qy):
        fast = inner(p, sx, sy, K_TRAIN, first_order)
        adv = pgd(fast, qx, qy, 1, 1.25 * EPS)
        return loss(fast, qx, qy) + 0.2 * loss(fast, adv, qy)

    def eval_loop():
        return torch.stack([eval_task(params, *(t[i] for i in range(4))) for t in tasks])

    def eval_vmap():
        return vmap(eval_task, in_dims=(None, 0, 0, 0, 0), randomness="different")(params, sx, sy, qx, qy)

    def meta_loop():
        return grad(lambda p: torch.stack([outer_task(p, *(t[i] for i in range(4))) for t in tasks]).mean())(params)

    def meta_vmap():
        return grad(lambda p: vmap(outer_task, in_dims=(None, 0, 0, 0, 0), randomness="different")(
            p, sx, sy, qx, qy).mean())(params)

    out = {}
    fns = {"eval_loop": eval_loop, "eval_vmap": eval_vmap, "meta_loop": meta_loop, "meta_vmap": meta_vmap}
    # failures are reported, they do not stop the benchmark
    timed = time_round_robin(fns, device, warmup=max(warmup, 1), steps=steps, on_error=True)
    for name, t in timed.items():
        out[name] = t if isinstance(t, str) else t["median_s"]
    for kind in ("eval", "meta"):
        a, b = out[f"{kind}_loop"], out[f"{kind}_vmap"]
        if isinstance(a, float) and isinstance(b, float):
            out[f"{kind}_vmap_speedup"] = a / b
    return out


# ----------------------------------------------------------------------------- evaluation


def eval_throughput(model, tasks, device, *, reps: int, context=None) -> dict:
    """Test tasks per second for S-FT 10 steps + PGD-10 (robust_meta.evaluation if present)."""
    try:
        from robust_meta.evaluation import evaluate
    except ImportError:
        evaluate = None

    def run_eval():
        if evaluate is not None:
            with context() if context is not None else contextlib.nullcontext():
                evaluate(model, tasks, eps=EPS, steps=10, step_size=INNER_LR, attacks=("pgd",),
                         attack_steps=10, progress=False, checks=False)
            return
        for sx, sy, qx, qy in tasks:
            with torch.no_grad():
                fast = adapt(model, sx, sy, steps=10, step_size=INNER_LR)
                call_model(model, qx, fast)
            adv = perturb("pgd", model, qx, qy, params=fast, eps=EPS, steps=10)
            with torch.no_grad():
                call_model(model, adv, fast)

    r = time_fn(run_eval, device, warmup=1, steps=reps)
    return {"path": "robust_meta.evaluation" if evaluate else "adapt+perturb", "n_tasks": len(tasks),
            "tasks_per_s": len(tasks) / r["median_s"], "median_s": r["median_s"],
            "flops_per_task": count_flops(run_eval) / len(tasks)}


# ----------------------------------------------------------------------------- profile


def profile_step(step: Callable[[], object], *, rows: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# ----------------------------------------------------------------------------- driver


def fast_paths_context(setting: str | None) -> Callable[[], contextlib.AbstractContextManager] | None:
    """``--compile`` -> a factory of ``robust_meta.fast_paths(compile=...)`` contexts (or None)."""
    if setting is None:
        return None
    import robust_meta

    value: bool | str = {"on": True, "off": False}.get(setting, setting)
    return lambda: robust_meta.fast_paths(compile=value)


def anil_verdict(speedup: dict, flop_ratio: float) -> str:
    if speedup["median"] >= flop_ratio:
        return "meets its FLOP ratio"
    if speedup["max"] >= flop_ratio:
        return "meets its FLOP ratio within the min–max spread"
    return "below its FLOP ratio"


def run_config(cfg: Config, args, device, dtype) -> dict:
    torch.manual_seed(0)
    base_model, model_src = build_conv4(cfg.in_channels, cfg.ways, cfg.hidden, cfg.image_size)
    base_model = base_model.to(device=device, dtype=dtype).train()
    n_tasks = 1 if args.quick else cfg.tasks
    tasks = make_tasks(cfg, n_tasks, device, dtype, args.channels_last)
    warmup, steps = (0, 1) if args.quick else (1, args.steps)
    context = fast_paths_context(getattr(args, "compile", None))
    if context is not None:  # the FLOP count runs eagerly: compile in an untimed call
        warmup = max(warmup, 1)
    res: dict = {"config": vars(cfg) | {"tasks": n_tasks}, "model": model_src,
                 "n_params": sum(p.numel() for p in base_model.parameters()), "methods": [],
                 "timing": "round-robin: every method once per rep, in turn"}

    def fresh():
        m = copy.deepcopy(base_model)
        if args.channels_last:
            m = m.to(memory_format=torch.channels_last)
        return m

    orders = [True] if args.quick else [True, False]
    methods = [m for m in METHODS if not args.methods or m.name in args.methods]
    for first_order in orders:
        # Every method's step is built first, then they are timed round-robin.
        steps_by_name = {m.name: Step(m, fresh(), tasks, first_order=first_order, context=context)
                         for m in methods}
        flops_by_name = {name: count_flops(step.eager()) for name, step in steps_by_name.items()}  # warm-up
        timed = time_round_robin(steps_by_name, device, warmup=warmup, steps=steps, memory=True)
        maml = None
        for method in methods:
            t, flops = timed[method.name], flops_by_name[method.name]
            row = {"method": method.name, "order": 1 if first_order else 2, "flops": flops,
                   "flop_per_s": flops / t["median_s"], **t}
            if method.name == "MAML":
                maml = row
            if maml is not None:
                row["time_ratio"] = t["median_s"] / maml["median_s"]
                ratio = per_rep_ratio(t, maml)
                row["time_ratio_min"], row["time_ratio_max"] = ratio["min"], ratio["max"]
                row["flop_ratio"] = flops / maml["flops"]
                row["time_over_flop_ratio"] = row["time_ratio"] / row["flop_ratio"]
            res["methods"].append(row)
            print(f"  {cfg.name} order{row['order']} {method.name:<22} {t['median_s'] * 1e3:9.1f} ms "
                  f"{flops / 1e9:8.2f} GFLOP", flush=True)
        del steps_by_name
    # references measured in the same run
    small = args.quick or cfg.name == "tiny"
    res["matmul_flop_per_s"] = matmul_flops_per_s(device, dtype, n=1024 if small else 2048, reps=5)
    res["conv_flop_per_s"] = conv_flops_per_s(device, dtype, channels=cfg.hidden, size=cfg.image_size // 2,
                                              batch=cfg.ways * cfg.queries, reps=3,
                                              channels_last=args.channels_last)
    for row in res["methods"]:
        row["frac_matmul"] = row["flop_per_s"] / res["matmul_flop_per_s"]
        row["frac_conv"] = row["flop_per_s"] / res["conv_flop_per_s"]

    # ANIL: the speedup of R-MAML_out-ANIL-FGSM over R-MAML_out-FGSM against their FLOP ratio
    by = {(r["method"], r["order"]): r for r in res["methods"]}
    res["anil"] = {}
    for o in (1, 2):
        fgsm, anil = by.get(("R-MAML_out-FGSM", o)), by.get(("R-MAML_out-ANIL-FGSM", o))
        if fgsm is None or anil is None:
            continue
        speedup = per_rep_ratio(fgsm, anil)
        flop_ratio = fgsm["flops"] / anil["flops"]
        res["anil"][o] = {"speedup": speedup, "flop_ratio": flop_ratio,
                          "verdict": anil_verdict(speedup, flop_ratio)}
    # ratio of the medians, kept for readers of older result files
    res["anil_speedup"] = {o: by[("R-MAML_out-FGSM", o)]["median_s"] / by[("R-MAML_out-ANIL-FGSM", o)]["median_s"]
                           for o in res["anil"]}

    eval_tasks = make_tasks(cfg, 1 if args.quick else 4, device, dtype, args.channels_last, seed=1)
    res["eval"] = eval_throughput(fresh(), eval_tasks, device, reps=1 if args.quick else 2, context=context)
    print(f"  {cfg.name} eval {res['eval']['tasks_per_s']:.2f} tasks/s ({res['eval']['path']})", flush=True)

    if not args.no_extras:
        res["extras"] = extras(cfg, args, device, dtype, fresh, tasks, warmup, steps)
    if args.profile:
        method = next(m for m in METHODS if m.name == args.profile)
        res["profile"] = profile_step(Step(method, fresh(), tasks, first_order=True, context=context))
        print(res["profile"])
    return res


def extras(cfg, args, device, dtype, fresh, tasks, warmup, steps) -> dict:
    out: dict = {}
    orders = [True] if args.quick else [True, False]
    # peer: the same plain MAML step written with higher, timed next to ours
    try:
        import higher  # noqa: F401
    except ImportError:
        out["higher"] = "not installed (pip install higher==0.2.1)"
    else:
        rows = {}
        for first_order in orders:
            o = 1 if first_order else 2
            m1 = fresh()
            opt1 = torch.optim.Adam(m1.parameters(), lr=1e-3)
            m2 = fresh()
            opt2 = torch.optim.Adam(m2.parameters(), lr=1e-3)
            timed = time_round_robin({
                "ours": functools.partial(plain_maml_step, m1, opt1, tasks, first_order=first_order),
                "higher": functools.partial(higher_maml_step, m2, opt2, tasks, first_order=first_order),
            }, device, warmup=max(warmup, 1), steps=steps, memory=True)
            ours, peer = timed["ours"], timed["higher"]
            rows[o] = {"robust_meta_s": ours["median_s"], "higher_s": peer["median_s"],
                       "higher_over_ours": peer["median_s"] / ours["median_s"],
                       "robust_meta_peak_over_start": ours.get("peak_over_start_bytes"),
                       "higher_peak_over_start": peer.get("peak_over_start_bytes")}
            print(f"  {cfg.name} order{o} MAML ours {ours['median_s'] * 1e3:.1f} ms, higher "
                  f"{peer['median_s'] * 1e3:.1f} ms", flush=True)
        out["higher"] = rows
    # cheap knobs on the R-MAML_out-FGSM step (first order)
    fgsm = next(m for m in METHODS if m.name == "R-MAML_out-FGSM")
    knob_steps = {}
    for label, kw, cl in (("default", {}, False), ("check_inputs=False", {"check_inputs": False}, False),
                          ("channels_last", {}, True)):
        model = fresh()
        tk = tasks
        if cl and not args.channels_last:
            model = model.to(memory_format=torch.channels_last)
            tk = [(a.contiguous(memory_format=torch.channels_last), b,
                   c.contiguous(memory_format=torch.channels_last), d) for a, b, c, d in tasks]
        knob_steps[label] = Step(fgsm, model, tk, first_order=True, **kw)
    timed = time_round_robin(knob_steps, device, warmup=max(warmup, 1), steps=steps)
    knobs = {label: t["median_s"] for label, t in timed.items()}
    out["fgsm_knobs_s"] = knobs
    print(f"  {cfg.name} FGSM knobs {knobs}", flush=True)
    # vmap over tasks vs loop
    if not args.quick or args.vmap:
        vm = {}
        for first_order in orders:
            vm[1 if first_order else 2] = vmap_vs_loop(fresh(), tasks, device, warmup=1, steps=max(1, steps - 1),
                                                       first_order=first_order)
        out["vmap"] = vm
        print(f"  {cfg.name} vmap {vm}", flush=True)
    return out


def machine_info(device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "device": str(device)}
    try:
        with open("/proc/cpuinfo") as fh:
            m = re.search(r"model name\s*:\s*(.+)", fh.read())
        info["cpu"] = m.group(1) if m else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    return info


def fmt_table(results: dict) -> str:
    lines = []
    for name, res in results["configs"].items():
        mm, cv = res["matmul_flop_per_s"], res["conv_flop_per_s"]
        lines.append(f"\n## {name} ({res['model']}, {res['n_params']} params, {res['config']['tasks']} tasks/step); "
                     f"matmul {mm / 1e9:.1f} GFLOP/s, conv fwd+bwd {cv / 1e9:.1f} GFLOP/s")
        hdr = (f"| {'method':<22} | ord | median ms | min–max ms | x MAML | x MAML min–max | GFLOP | FLOP x | "
               f"t/FLOP | GFLOP/s | %matmul | %conv | peak MiB |")
        lines += [hdr, "|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|"]
        for r in res["methods"]:
            peak = r.get("peak_over_start_bytes")
            spread = (f"{r['time_ratio_min']:.2f}–{r['time_ratio_max']:.2f}" if "time_ratio_min" in r else "")
            lines.append(
                f"| {r['method']:<22} | {r['order']:>3} | {r['median_s'] * 1e3:9.1f} | "
                f"{r['min_s'] * 1e3:.0f}–{r['max_s'] * 1e3:.0f} | {r.get('time_ratio', float('nan')):6.2f} | "
                f"{spread:>14} | "
                f"{r['flops'] / 1e9:5.1f} | {r.get('flop_ratio', float('nan')):6.2f} | "
                f"{r.get('time_over_flop_ratio', float('nan')):6.2f} | {r['flop_per_s'] / 1e9:7.1f} | "
                f"{100 * r['frac_matmul']:6.1f}% | {100 * r['frac_conv']:4.0f}% | "
                f"{'' if peak is None else f'{peak / 2**20:8.0f}'} |"
            )
        ev = res["eval"]
        lines.append(f"\neval (S-FT 10 + PGD-10, {ev['path']}): {ev['tasks_per_s']:.2f} tasks/s, "
                     f"{ev['flops_per_task'] / 1e9:.1f} GFLOP/task")
        for o, a in res.get("anil", {}).items():
            sp = a["speedup"]
            lines.append(f"order {o}: ANIL-FGSM speedup over FGSM {sp['median']:.2f}x "
                         f"[{sp['min']:.2f}–{sp['max']:.2f}], FLOP ratio FGSM/ANIL-FGSM {a['flop_ratio']:.2f}: "
                         f"{a['verdict']}")
        if "extras" in res:
            lines.append(f"extras: {json.dumps(res['extras'], default=str)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="1 task/step, first order only, 1 timed step after the FLOP-counting step")
    p.add_argument("--config", choices=[*CONFIGS, "all"], default="conv4-84",
                   help=f"'all' = {', '.join(ALL_CONFIGS)}; 'tiny' is for tests")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--steps", type=int, default=3, help="timed meta-steps per method (after 1 warm-up)")
    p.add_argument("--methods", nargs="*", default=None, help="subset of method names")
    p.add_argument("--no-extras", action="store_true", help="skip the higher/vmap/knob comparisons")
    p.add_argument("--vmap", action="store_true", help="run the vmap comparison even with --quick")
    p.add_argument("--profile", default=None, choices=[m.name for m in METHODS],
                   help="print a torch.profiler table of one first-order step of this method")
    p.add_argument("--compile", choices=["off", "on", "auto"], default=None,
                   help="run the robust-meta steps and the evaluation inside "
                        "robust_meta.fast_paths(compile=...) (needs that API); default: as they are")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.compile is not None:
        import robust_meta

        if not hasattr(robust_meta, "fast_paths"):
            p.error(f"--compile {args.compile}: this robust_meta ({robust_meta.__version__}) has no "
                    "robust_meta.fast_paths")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    names = list(ALL_CONFIGS) if args.config == "all" else [args.config]
    t0 = time.perf_counter()
    results = {"machine": machine_info(device), "args": vars(args), "configs": {}}
    for name in names:
        print(f"[{name}]", flush=True)
        results["configs"][name] = run_config(CONFIGS[name], args, device, dtype)
    results["wall_s"] = time.perf_counter() - t0
    print(fmt_table(results))
    print(f"\ntotal {results['wall_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1, default=str)
    return results


if __name__ == "__main__":
    main()
