"""What `robust_meta.tune_malloc` costs a long-lived process in memory, and buys it in speed.

Issue 17, defect 6: robust-meta used to raise glibc's malloc thresholds at the first
``evaluate()``/``train()``, for the rest of the user's process. Now a library call leaves malloc
alone; the ``robust-meta`` command (its own process) and robust-meta's worker processes tune
it, and a user opts in with ``tune_malloc()``. This measures both choices, each in a fresh
interpreter (the thresholds are process-wide and cannot be read back), as a notebook would
meet them: import, build Conv4 (hidden 32) on 84×84×3 5-way 1-shot 15-query tasks, then call
``evaluate`` (S-FT 10 + PGD-10) ``--calls`` times on ``--tasks`` tasks.

Per variant it reports the resident memory (VmRSS) before the first call, after each call
returns, and the peak (VmHWM), the time of each call, and ``retained``: RSS after the last
call minus RSS before the first — memory the process holds while the notebook goes on doing
other things. Variants: ``default`` (the library's behaviour now: glibc's own thresholds) and
``tuned`` (``tune_malloc()`` called first, as the command does).

Usage::

    python benchmarks/malloc_retention.py [--tasks 3] [--calls 3] [--reps 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(variant: str, n_tasks: int, calls: int) -> dict:
    import torch

    import robust_meta as rm
    from robust_meta.data import Task

    torch.set_num_threads(2)
    if variant == "tuned":
        assert rm.tune_malloc()
    g = torch.Generator().manual_seed(0)
    tasks = [Task(torch.rand(5, 3, 84, 84, generator=g), torch.arange(5),
                  torch.rand(75, 3, 84, 84, generator=g), torch.arange(5).repeat(15)) for _ in range(n_tasks)]
    torch.manual_seed(0)
    model = rm.Conv4(3, 5, hidden=32, image_size=84)
    before = _status_mib("VmRSS")
    rss, times = [], []
    for _ in range(calls):
        t0 = time.perf_counter()
        rm.evaluate(model, tasks, eps=2 / 255, steps=10, step_size=0.01, attack_steps=10, seed=0,
                    progress=False, checks=False)
        times.append(time.perf_counter() - t0)
        rss.append(_status_mib("VmRSS"))
    return {"variant": variant, "rss_before_mib": before, "rss_after_mib": rss,
            "peak_mib": _status_mib("VmHWM"), "retained_mib": rss[-1] - before, "seconds": times}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.tasks, args.calls)))
        return {}
    runs: dict[str, list[dict]] = {"default": [], "tuned": []}
    env = {k: v for k, v in os.environ.items() if k != "ROBUST_META_MALLOPT"}
    for _ in range(args.reps):
        for variant in runs:  # interleaved: default, tuned, default, tuned, ...
            out = subprocess.run([sys.executable, __file__, "--child", variant, "--tasks", str(args.tasks),
                                  "--calls", str(args.calls)], capture_output=True, text=True, env=env, check=True)
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary = {}
    for variant, rs in runs.items():
        summary[variant] = {
            "retained_mib": statistics.median(r["retained_mib"] for r in rs),
            "retained_range_mib": [min(r["retained_mib"] for r in rs), max(r["retained_mib"] for r in rs)],
            "peak_mib": statistics.median(r["peak_mib"] for r in rs),
            "first_call_s": statistics.median(r["seconds"][0] for r in rs),
            "later_call_s": statistics.median(statistics.median(r["seconds"][1:] or r["seconds"]) for r in rs),
        }
        s = summary[variant]
        print(f"{variant:>8}: retained after the calls {s['retained_mib']:.0f} MiB "
              f"[{s['retained_range_mib'][0]:.0f}–{s['retained_range_mib'][1]:.0f}], peak {s['peak_mib']:.0f} MiB, "
              f"first call {s['first_call_s']:.2f} s, later calls {s['later_call_s']:.2f} s", flush=True)
    speed = summary["default"]["later_call_s"] / summary["tuned"]["later_call_s"]
    print(f"tuned over default: {speed:.2f}x faster per call; holds "
          f"{summary['tuned']['retained_mib'] - summary['default']['retained_mib']:.0f} MiB more")
    doc = {"machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                       "load_1min": os.getloadavg()[0]},
           "settings": vars(args), "summary": summary, "runs": runs, "speedup_tuned": speed}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=2)
    return doc


if __name__ == "__main__":
    main()
