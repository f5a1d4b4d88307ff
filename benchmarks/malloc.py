"""glibc malloc tuning (`robust_meta.fast.tune_malloc`): its effect, in fresh processes.

mallopt settings are process-wide and glibc adapts its thresholds to what a process has freed
so far, so this cannot be measured in one process. Each timed run is a fresh interpreter that
evaluates the same tasks with the plain eager per-task loop of ``research_baseline.py`` (S-FT
10 + PGD-10, Conv4 hidden 32, 84×84×3, 5-way 1-shot 15-query) once to warm up and once timed,
with or without `tune_malloc` (``ROBUST_META_MALLOPT=0``); the two kinds alternate.

Usage::

    python benchmarks/malloc.py [--reps 3] [--tasks 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def child(n_tasks: int, tune: bool) -> dict:
    import copy

    import torch

    sys.path.insert(0, HERE)
    import research_baseline as rb

    import robust_meta
    from robust_meta import fast

    applied = fast.tune_malloc() if tune else False
    s = copy.copy(rb.FULL)
    torch.manual_seed(0)
    model = robust_meta.Conv4(3, 5, hidden=32, image_size=84).train()
    tasks = rb.make_tasks(s, n_tasks, torch.device("cpu"), seed=1)
    rb.plain_eval_loop(model, tasks[:1])  # warm-up
    t = time.perf_counter()
    res = rb.plain_eval_loop(model, tasks)
    elapsed = time.perf_counter() - t
    return {"seconds": elapsed, "tasks_per_s": n_tasks / elapsed, "mallopt": applied, "sa": res["sa"],
            "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--child", choices=["tuned", "default"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.tasks, args.child == "tuned")))
        return {}
    runs: dict[str, list[dict]] = {"default": [], "tuned": []}
    for _ in range(args.reps):
        for kind in ("default", "tuned"):
            env = dict(os.environ, ROBUST_META_MALLOPT="0" if kind == "default" else "1")
            out = subprocess.run([sys.executable, __file__, "--child", kind, "--tasks", str(args.tasks)],
                                 capture_output=True, text=True, env=env, check=True)
            runs[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = runs[kind][-1]
            print(f"{kind:>8}: {r['seconds']:6.2f} s for {args.tasks} tasks, max RSS {r['max_rss_mib']:.0f} MiB, "
                  f"mallopt applied: {r['mallopt']}", flush=True)
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    ratios = sorted(d["seconds"] / t["seconds"] for d, t in zip(runs["default"], runs["tuned"]))
    res = {"runs": runs, "median_s": med, "speedup_median": med["default"] / med["tuned"],
           "speedup_min": ratios[0], "speedup_max": ratios[-1],
           "rss_ratio": statistics.median(r["max_rss_mib"] for r in runs["tuned"])
           / statistics.median(r["max_rss_mib"] for r in runs["default"])}
    print(f"plain eval loop: default {med['default']:.2f} s, tuned {med['tuned']:.2f} s -> "
          f"{res['speedup_median']:.2f}x [{ratios[0]:.2f}–{ratios[-1]:.2f}], peak RSS x{res['rss_ratio']:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return res


if __name__ == "__main__":
    main()
