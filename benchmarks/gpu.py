"""GPU-ready benchmark of robust-meta (issue 13, item 4): one short script for a lent GPU.

Usage::

    bash benchmarks/gpu.sh [--device cuda|cpu] [--tiny] [--out PATH]
    python benchmarks/gpu.py [--device cuda|cpu] [--tiny] [--out PATH] [--budget-s S]

Default: ``--device cuda``, the paper's setting (Conv4 with 32 filters, 84x84x3 images,
5-way 1-shot 15-query, 4 tasks per meta-batch, K=5 inner steps, eps=2/255), results in
``benchmarks/results-gpu.json``. ``--tiny`` shrinks everything (28x28x1, 8 filters, 2 tasks,
1 warm-up step, task batches of 2/4/8, evaluation on 2 tasks with 2 fine-tuning steps) so the
whole script runs on two CPU cores in well under two minutes; it writes the same keys, which
is what ``tests/test_gpu_bench.py`` checks.

Measured, in this order (the JSON is rewritten after every section, so a killed run keeps
what it finished):

1. ``meta_steps``: time of one meta-step (median/min/max over the timed steps after
   warm-up, ms) and its peak memory, for MAML, R-MAML_out-FGSM, R-MAML_out-PGD10 and
   AQ-PGD10, first and second order, built like ``benchmarks/bench.py`` does
   (:func:`robust_meta.adapt` + :class:`robust_meta.RobustMetaUpdate`, Adam step);
2. ``evaluate``: :func:`robust_meta.evaluate` throughput in test tasks/s (S-FT + PGD);
3. peak memory: in every ``meta_steps`` row (CUDA: ``torch.cuda.max_memory_allocated``
   after ``reset_peak_memory_stats``; CPU: the RSS high-water mark, ``null`` where the OS
   cannot reset it);
4. ``variants``: the first-order R-MAML_out-FGSM step in fp32, under
   ``torch.autocast(dtype=torch.bfloat16)``, in ``channels_last`` and both, and (not with
   ``--tiny``) inside ``robust_meta.fast_paths(compile=True)``;
5. ``task_batched``: the first-order R-MAML_out-FGSM meta-gradient for 4, 32 and 128 tasks
   per meta-batch, computed by robust-meta's per-task loop and by ``torch.func.vmap`` over
   tasks (on a copy of the net whose batch norms keep no running statistics), timed both
   ways, with the largest difference between the two gradients (and the same check in
   float64 on the smallest batch). First order only: ``vmap`` gets second-order gradients
   through batch norm wrong (``shared/design/ENVIRONMENT.md``). FGSM starts from the clean
   image here (no random start) so that both paths compute the same function.

A wall-clock budget (``--budget-s``, default 420 s; 100 s with ``--tiny``) guards the run:
once it is spent, the remaining items are recorded as ``"skipped: time budget"`` and timing
loops stop after their first timed step. An item that fails records its error string
instead of stopping the run. A short table is printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (benchmarks/bench.py, next to this file)

import robust_meta  # noqa: E402
from robust_meta import PGDAttack, RobustMetaUpdate, adapt  # noqa: E402

SCHEMA = "robust-meta-gpu-bench/1"
METHOD_NAMES = ("MAML", "R-MAML_out-FGSM", "R-MAML_out-PGD10", "AQ-PGD10")
SKIPPED = "skipped: time budget"
DEFAULT_OUT = Path(__file__).resolve().parent / "results-gpu.json"


class Budget:
    """Wall-clock guard: ``spent`` once ``seconds`` have passed since construction."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    @property
    def spent(self) -> bool:
        return self.elapsed() > self.seconds


def settings(tiny: bool) -> dict[str, Any]:
    if tiny:
        cfg = bench.Config("tiny-28", in_channels=1, image_size=28, hidden=8, ways=5, shots=1,
                           queries=15, tasks=2)
        return {"cfg": cfg, "warmup": 1, "steps": 2, "eval_tasks": 2, "eval_finetune_steps": 2,
                "eval_attack_steps": 2, "eval_reps": 1, "batch_sizes": [2, 4, 8], "batched_steps": 1,
                "fp64_max_tasks": 8, "compile_variant": False}
    return {"cfg": bench.CONFIGS["conv4-84"], "warmup": 2, "steps": 5, "eval_tasks": 32,
            "eval_finetune_steps": 10, "eval_attack_steps": 10, "eval_reps": 2,
            "batch_sizes": [4, 32, 128], "batched_steps": 2, "fp64_max_tasks": 32, "compile_variant": True}


# ----------------------------------------------------------------------------- measurement


def measure(fn: Callable[[], Any], device: torch.device, budget: Budget, *, warmup: int, steps: int,
            memory: bool = False) -> dict[str, Any]:
    """Times of ``fn`` after ``warmup`` calls (ms), its peak memory (MiB) and its last result.

    Once the budget is spent it stops after the first warm-up call and the first timed call
    (``warmup_steps`` and ``timed_steps`` say how many ran).
    """
    done = 0
    while done < warmup and not (done and budget.spent):
        fn()
        done += 1
    bench.sync(device)
    times, peaks, over = [], [], []
    result = None
    for i in range(steps):
        if i and budget.spent:
            break
        base = bench.reset_peak(device) if memory else None
        t0 = time.perf_counter()
        result = fn()
        bench.sync(device)
        times.append(time.perf_counter() - t0)
        if memory:
            peak = bench.read_peak(device)
            if peak is not None and base is not None:
                peaks.append(peak)
                over.append(max(0, peak - base))  # lazily synced RSS counters: never < 0
    out: dict[str, Any] = {
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "max_ms": 1e3 * max(times),
        "times_ms": [1e3 * t for t in times],
        "warmup_steps": done,
        "timed_steps": len(times),
    }
    if memory:
        out["peak_mib"] = max(peaks) / 2**20 if peaks else None
        out["peak_over_start_mib"] = max(over) / 2**20 if over else None
    out["_result"] = result
    return out


def _error(err: BaseException) -> str:
    return f"error: {type(err).__name__}: {str(err).strip()[:300]}"


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def guarded(fn: Callable[[], dict], device: torch.device, budget: Budget) -> dict:
    """Run one item: its dict, ``{"skipped": ...}`` past the budget, or ``{"error": ...}``."""
    if budget.spent:
        return {"skipped": SKIPPED}
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - record the failure, go on with the next item
        return {"error": _error(err)}
    finally:
        _free(device)


def _finite(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


# ----------------------------------------------------------------------------- sections


def machine(device: torch.device) -> dict[str, Any]:
    info = bench.machine_info(device)
    info.update({
        "torch": torch.__version__,
        "robust_meta": robust_meta.__version__,
        "cuda_version": torch.version.cuda,  # of the torch build
        "cuda_available": torch.cuda.is_available(),
        "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "device_name": None,
    })
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({
            "device_name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "device_memory_gib": props.total_memory / 2**30,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        })
    else:
        info["device_name"] = info.get("cpu")
    return info


def fresh_model(cfg: bench.Config, device: torch.device, *, channels_last: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model, _ = bench.build_conv4(cfg.in_channels, cfg.ways, cfg.hidden, cfg.image_size)
    model = model.to(device).train()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def meta_steps(s: dict, device: torch.device, budget: Budget) -> dict[str, dict]:
    cfg = s["cfg"]
    tasks = bench.make_tasks(cfg, cfg.tasks, device, torch.float32, False)
    methods = {m.name: m for m in bench.METHODS}
    out: dict[str, dict] = {}
    for first_order in (True, False):
        for name in METHOD_NAMES:
            order = 1 if first_order else 2

            def item(name=name, first_order=first_order) -> dict:
                step = bench.Step(methods[name], fresh_model(cfg, device), tasks, first_order=first_order)
                r = measure(step, device, budget, warmup=s["warmup"], steps=s["steps"], memory=True)
                r["loss"] = _finite(r.pop("_result"))
                return r

            out[f"{name}/o{order}"] = {"method": name, "order": order, **guarded(item, device, budget)}
            _progress(f"meta-step {name} order {order}", out[f"{name}/o{order}"])
    return out


def evaluate_throughput(s: dict, device: torch.device, budget: Budget) -> dict:
    cfg = s["cfg"]
    tasks = bench.make_tasks(cfg, s["eval_tasks"], device, torch.float32, False, seed=1)
    model = fresh_model(cfg, device)

    def run(ts):
        return robust_meta.evaluate(
            model, ts, eps=bench.EPS, steps=s["eval_finetune_steps"], step_size=bench.INNER_LR,
            attacks=("pgd",), attack_steps=s["eval_attack_steps"], progress=False, checks=False,
        )

    r = measure(lambda: run(tasks), device, budget, warmup=1, steps=s["eval_reps"])
    res = r.pop("_result")
    # what evaluate decided by itself (e.g. compile / channels_last), where it reports it
    chosen = {k: res.settings[k] for k in ("compile", "channels_last") if k in res.settings}
    return {
        "n_tasks": len(tasks), "finetune": f"S-FT {s['eval_finetune_steps']} steps",
        "attack": f"PGD-{s['eval_attack_steps']}", "eps": bench.EPS,
        "tasks_per_s": len(tasks) / (r["median_ms"] / 1e3),
        "sa": res.metrics["sa"].mean, "ra": res.metrics["ra"].mean, "evaluate_settings": chosen, **r,
    }


def variants(s: dict, device: torch.device, budget: Budget) -> dict[str, dict]:
    """The first-order R-MAML_out-FGSM step in fp32, bf16 autocast, channels_last and both."""
    cfg = s["cfg"]
    fgsm = next(m for m in bench.METHODS if m.name == "R-MAML_out-FGSM")
    out: dict[str, dict] = {}
    kinds = [("fp32", False, False, False), ("bf16_autocast", True, False, False),
             ("channels_last", False, True, False), ("bf16_autocast+channels_last", True, True, False)]
    if s["compile_variant"]:
        # robust_meta.fast_paths(compile=True): the numbers a GPU run needs to decide compile="auto"
        kinds.append(("torch_compile", False, False, True))
    for label, bf16, cl, compiled in kinds:

        def item(bf16=bf16, cl=cl, compiled=compiled) -> dict:
            tasks = bench.make_tasks(cfg, cfg.tasks, device, torch.float32, cl)
            step = bench.Step(fgsm, fresh_model(cfg, device, channels_last=cl), tasks, first_order=True)

            def run():
                ctx = (robust_meta.fast_paths(compile=True, channels_last=False) if compiled
                       else contextlib.nullcontext())
                with ctx:
                    if not bf16:
                        return step()
                    with torch.autocast(device.type, dtype=torch.bfloat16):
                        return step()

            r = measure(run, device, budget, warmup=s["warmup"], steps=s["steps"], memory=True)
            r["loss"] = _finite(r.pop("_result"))
            return r

        out[label] = {"autocast_bf16": bf16, "channels_last": cl, "compile": compiled,
                      **guarded(item, device, budget)}
        _progress(f"FGSM o1 {label}", out[label])
    base = out["fp32"].get("median_ms")
    for row in out.values():
        if base and row.get("median_ms"):
            row["speedup_vs_fp32"] = base / row["median_ms"]
    return out


# ----------------------------------------------------------------------------- task-batched


def _fgsm_attack() -> PGDAttack:
    """FGSM step of 1.25 eps without a random start: both paths compute the same function."""
    return PGDAttack(eps=bench.EPS, alpha=1.25 * bench.EPS, steps=1, random_start=None)


def loop_meta_grad(model: nn.Module, tasks) -> Callable[[], dict[str, torch.Tensor]]:
    """robust-meta's per-task loop: adapt + RobustMetaUpdate per task, mean, backward."""
    robust = RobustMetaUpdate(F.cross_entropy, model, attack=_fgsm_attack(), eps=bench.EPS, gamma_out=0.2)

    def run() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        losses = []
        for sx, sy, qx, qy in tasks:
            fast = adapt(model, sx, sy, steps=bench.K_TRAIN, step_size=bench.INNER_LR, first_order=True)
            losses.append(robust(qx, qy, params=fast))
        torch.stack(losses).mean().backward()
        return {k: p.grad for k, p in model.named_parameters()}

    return run


def vmap_meta_grad(model: nn.Module, tasks) -> Callable[[], dict[str, torch.Tensor]]:
    """The same meta-gradient as `loop_meta_grad`, with ``torch.func.vmap`` over the tasks."""
    from torch.func import grad, vmap

    fmodel, loss, inner, _ = bench.functional_pieces(model)  # batch norm without running stats
    params = {k: v.detach() for k, v in fmodel.named_parameters()}
    stacked = [torch.stack([t[i] for t in tasks]) for i in range(4)]

    def outer_task(p, sx, sy, qx, qy):
        fast = inner(p, sx, sy, bench.K_TRAIN, True)
        frozen = {k: v.detach() for k, v in fast.items()}
        g = grad(lambda x: loss(frozen, x, qy))(qx)
        adv = (qx + (1.25 * bench.EPS * g.sign()).clamp(-bench.EPS, bench.EPS)).clamp(0, 1).detach()
        return loss(fast, qx, qy) + 0.2 * loss(fast, adv, qy)

    def mean_loss(p):
        return vmap(outer_task, in_dims=(None, 0, 0, 0, 0), randomness="error")(p, *stacked).mean()

    return lambda: grad(mean_loss)(params)


def _grad_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    if set(a) != set(b):
        raise ValueError(f"parameter names differ: {sorted(set(a) ^ set(b))}")
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    scale = max(float(a[k].double().abs().max()) for k in a)
    return {"grad_max_abs_diff": diff, "grad_max_abs": scale,
            "grad_max_rel_diff": diff / scale if scale else math.inf}


def batched_size(s: dict, n: int, device: torch.device, budget: Budget) -> dict:
    cfg = s["cfg"]
    tasks = bench.make_tasks(cfg, n, device, torch.float32, False, seed=2)
    model = fresh_model(cfg, device)
    row: dict[str, Any] = {"n_tasks": n}
    grads = {}
    for path, build in (("loop", loop_meta_grad), ("vmap", vmap_meta_grad)):

        def item(build=build, path=path) -> dict:
            r = measure(build(model, tasks), device, budget, warmup=1, steps=s["batched_steps"], memory=True)
            grads[path] = {k: v.detach().clone() for k, v in r.pop("_result").items()}
            return r

        row[path] = guarded(item, device, budget)
    if "loop" in grads and "vmap" in grads:
        row.update(_grad_diff(grads["loop"], grads["vmap"]))
        row["vmap_speedup"] = row["loop"]["median_ms"] / row["vmap"]["median_ms"]
    grads.clear()
    _free(device)
    if n <= s["fp64_max_tasks"]:
        row["fp64"] = guarded(lambda: fp64_check(s, n, device), device, budget)
    else:
        row["fp64"] = {"skipped": f"float64 check only up to {s['fp64_max_tasks']} tasks (memory)"}
    return row


def fp64_check(s: dict, n: int, device: torch.device) -> dict:
    """The same two meta-gradients on the same tasks in float64: no TF32, no float32 noise.

    In float32 the two paths round differently, and FGSM's sign of an input gradient that is
    almost 0 can flip, so their float32 gradients differ by more than rounding; in float64 they
    agree to ~1e-15 unless the batched path computes something else.
    """
    cfg = s["cfg"]
    tasks = bench.make_tasks(cfg, n, device, torch.float64, False, seed=2)
    model = fresh_model(cfg, device).double()
    return _grad_diff(loop_meta_grad(model, tasks)(), vmap_meta_grad(model, tasks)())


def task_batched(s: dict, device: torch.device, budget: Budget) -> dict:
    out: dict[str, Any] = {
        "method": "R-MAML_out-FGSM, first order (FGSM without random start, gamma_out 0.2)",
        "loop": "robust_meta.adapt + RobustMetaUpdate per task, one backward",
        "batched": "torch.func.grad of torch.func.vmap over tasks (batch norm without running stats)",
        "sizes": {},
    }
    for n in s["batch_sizes"]:
        out["sizes"][str(n)] = guarded(lambda n=n: batched_size(s, n, device, budget), device, budget)
        _progress(f"task-batched {n} tasks", out["sizes"][str(n)])
    return out


# ----------------------------------------------------------------------------- report


def _progress(label: str, row: dict) -> None:
    if "median_ms" in row:
        msg = f"{row['median_ms']:.1f} ms"
    elif "loop" in row:
        msg = " / ".join(f"{p} {_ms(row.get(p, {}))}" for p in ("loop", "vmap"))
        if "grad_max_abs_diff" in row:
            msg += f", max |grad diff| {row['grad_max_abs_diff']:.1e}"
    else:
        msg = row.get("error") or row.get("skipped") or ""
    print(f"  {label}: {msg}", flush=True)


def _ms(row: dict) -> str:
    if "median_ms" in row:
        return f"{row['median_ms']:.1f} ms"
    return row.get("error") or row.get("skipped") or "-"


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def _items(section: dict) -> list[tuple[str, dict]]:
    """The rows of a section, or one pseudo-row when the whole section was skipped or failed."""
    if "skipped" in section or "error" in section:
        return [("(all)", {"method": "(all)", "order": "-", **section})]
    return list(section.items())


def _rows(section: dict) -> list[dict]:
    return [row for _, row in _items(section)]


def summary(res: dict) -> str:
    m = res["machine"]
    lines = [f"\nrobust-meta {m['robust_meta']} | torch {m['torch']} | {res['device']}: {m['device_name']}"
             f" | CUDA {m['cuda_version']} | mode {res['mode']}"]
    lines.append(f"\n{'meta-step':<20} ord {'median ms':>10} {'min-max ms':>17} {'peak MiB':>9}")
    for row in _rows(res["meta_steps"]):
        if "median_ms" in row:
            lines.append(f"{row['method']:<20} {row['order']:>3} {row['median_ms']:>10.1f} "
                         f"{row['min_ms']:>8.1f}-{row['max_ms']:<8.1f} {_mib(row['peak_mib']):>9}")
        else:
            lines.append(f"{row['method']:<20} {row['order']:>3} {_ms(row)}")
    ev = res["evaluate"]
    if "tasks_per_s" in ev:
        lines.append(f"\nevaluate ({ev['finetune']}, {ev['attack']}, {ev['n_tasks']} tasks): "
                     f"{ev['tasks_per_s']:.2f} tasks/s")
    else:
        lines.append(f"\nevaluate: {_ms(ev)}")
    lines.append("\nR-MAML_out-FGSM step, order 1:")
    for label, row in _items(res["variants"]):
        extra = f" (x{row['speedup_vs_fp32']:.2f} vs fp32)" if "speedup_vs_fp32" in row else ""
        lines.append(f"  {label:<28} {_ms(row)}{extra}")
    tb = res["task_batched"]
    lines.append(f"\ntask-batched meta-gradient ({tb.get('method', _ms(tb))}):")
    lines.append(f"  {'tasks':>5} {'loop ms':>10} {'vmap ms':>10} {'speedup':>8} {'fp32 max|diff|':>14} "
                 f"{'rel':>8} {'fp64 max|diff|':>14}")
    for n, row in _items(tb.get("sizes", {})):
        if "grad_max_abs_diff" in row:
            f64 = row.get("fp64", {})
            f64 = f"{f64['grad_max_abs_diff']:.1e}" if "grad_max_abs_diff" in f64 else _ms(f64)
            lines.append(f"  {n:>5} {row['loop']['median_ms']:>10.1f} {row['vmap']['median_ms']:>10.1f} "
                         f"{row['vmap_speedup']:>8.2f} {row['grad_max_abs_diff']:>14.1e} "
                         f"{row['grad_max_rel_diff']:>8.1e} {f64:>14}")
        else:
            bad = (row.get("skipped") or row.get("error")
                   or f"loop {_ms(row.get('loop', {}))}, vmap {_ms(row.get('vmap', {}))}")
            lines.append(f"  {n:>5} {bad}")
    lines.append(f"\ntotal {res['wall_s']:.1f} s (budget {res['budget_s']:.0f} s)")
    return "\n".join(lines)


def write(res: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=1, default=str))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="small everything: an end-to-end check on a CPU")
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON path (default {DEFAULT_OUT}; with --tiny /tmp/robust-meta-gpu-tiny.json)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget; later items are skipped once it is spent (420; 100 with --tiny)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's; 1 with --tiny --device cpu)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available (use --device cpu)")
    threads = args.threads or (1 if args.tiny and device.type == "cpu" else None)
    if threads:
        # --tiny is an end-to-end check, not a CPU benchmark: one thread keeps its time steady
        # on a small shared machine (two threads spin against other processes' work).
        torch.set_num_threads(threads)
    out = args.out or (Path("/tmp/robust-meta-gpu-tiny.json") if args.tiny else DEFAULT_OUT)
    budget = Budget(args.budget_s if args.budget_s is not None else (100.0 if args.tiny else 420.0))
    s = settings(args.tiny)
    cfg = s["cfg"]
    res: dict[str, Any] = {
        "schema": SCHEMA, "mode": "tiny" if args.tiny else "full", "device": str(device),
        "budget_s": budget.seconds, "machine": machine(device),
        "config": {**vars(cfg), "inner_steps": bench.K_TRAIN, "inner_lr": bench.INNER_LR, "eps": bench.EPS,
                   "warmup_steps": s["warmup"], "timed_steps": s["steps"],
                   "task_batch_sizes": s["batch_sizes"], "fp64_check_max_tasks": s["fp64_max_tasks"],
                   "eval_tasks": s["eval_tasks"], "eval_finetune_steps": s["eval_finetune_steps"],
                   "eval_attack_steps": s["eval_attack_steps"]},
        "memory": ("torch.cuda.max_memory_allocated after reset_peak_memory_stats" if device.type == "cuda"
                   else "process RSS high-water mark (VmHWM, reset through /proc/self/clear_refs)"),
        "meta_steps": {}, "evaluate": {}, "variants": {}, "task_batched": {},
    }
    print(f"[gpu bench] {res['mode']} on {device} ({res['machine']['device_name']}), "
          f"budget {budget.seconds:.0f} s -> {out}", flush=True)
    sections = (
        ("meta_steps", lambda: meta_steps(s, device, budget)),
        ("evaluate", lambda: evaluate_throughput(s, device, budget)),
        ("variants", lambda: variants(s, device, budget)),
        ("task_batched", lambda: task_batched(s, device, budget)),
    )
    for key, fn in sections:
        res[key] = guarded(fn, device, budget)
        if key == "evaluate":
            _progress("evaluate", res[key])
        res["wall_s"] = budget.elapsed()
        write(res, out)
    print(summary(res))
    return res


if __name__ == "__main__":
    main()
