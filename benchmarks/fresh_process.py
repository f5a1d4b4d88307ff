"""Evaluation speed as a user meets it: every timed run in a fresh interpreter.

Process-wide state decides part of the speed — glibc's malloc thresholds (which
`robust_meta.fast.tune_malloc` raises, and which glibc itself adapts to what a process has
freed so far), worker processes to spawn — so these comparisons cannot be made in one
process. Each run is a fresh interpreter that evaluates the same tasks (``--config``:
Conv4 hidden 32 on 84×84×3, or hidden 64 on 28×28×1; 5-way 1-shot 15-query; S-FT 10 +
PGD-10 at ε = 2/255) after a one-task warm-up; the contenders alternate for ``--reps``
rounds; median and min–max of the per-round ratios.

* ``--compare malloc``: the plain eager per-task loop of ``research_baseline.py`` with glibc's
  defaults (``ROBUST_META_MALLOPT=0``) against the same loop after `tune_malloc`.
* ``--compare evaluate``: that plain loop (glibc defaults: a user's own script) against
  ``robust_meta.evaluate`` with its defaults, ``workers=1`` and ``workers=2``.
* ``--compare workers``: ``evaluate`` with ``workers=1`` against ``workers=2``.

The start-up of worker processes is inside the timed call.

Usage::

    python benchmarks/fresh_process.py --compare malloc|evaluate|workers [--config conv4-84|omniglot-28]
                                       [--reps 3] [--tasks 3] [--json out.json]
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


KINDS = {
    "malloc": ("loop", "loop-tuned"),
    "evaluate": ("loop", "evaluate", "evaluate-workers2"),
    "workers": ("evaluate", "evaluate-workers2"),
}


CONFIGS = ("conv4-84", "omniglot-28")


def child(kind: str, n_tasks: int, config: str) -> dict:
    import copy
    import warnings

    import torch

    sys.path.insert(0, HERE)
    import research_baseline as rb

    import robust_meta
    from robust_meta import fast

    applied = fast.tune_malloc() if kind == "loop-tuned" else False
    s = copy.copy(rb.FULL)
    if config == "omniglot-28":
        s = rb.Setup("omniglot-28", 1, 28, 64, 5, 1, 15, 4, n_tasks)
    torch.manual_seed(0)
    model = robust_meta.Conv4(s.in_channels, s.ways, hidden=s.hidden, image_size=s.image_size).train()
    tasks = rb.make_tasks(s, n_tasks + 1, torch.device("cpu"), seed=1)
    warm, tasks = tasks[:1], tasks[1:]

    def run(ts):
        if kind.startswith("loop"):
            return rb.plain_eval_loop(model, ts)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", robust_meta.EvalWarning)
            return rb.rm_evaluate(model, ts, workers=2 if kind == "evaluate-workers2" else 1)

    run(warm)
    t = time.perf_counter()
    res = run(tasks)
    elapsed = time.perf_counter() - t
    return {"seconds": elapsed, "tasks_per_s": n_tasks / elapsed, "mallopt": applied or kind.startswith("evaluate"),
            "sa": res["sa"], "ra": res["ra"], "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compare", choices=sorted(KINDS), default="malloc")
    p.add_argument("--config", choices=CONFIGS, default="conv4-84")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.tasks, args.config)))
        return {}
    kinds = KINDS[args.compare]
    base = kinds[0]
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for _ in range(args.reps):
        for kind in kinds:
            env = dict(os.environ, ROBUST_META_MALLOPT="0" if kind == "loop" else "1")
            out = subprocess.run([sys.executable, __file__, "--child", kind, "--tasks", str(args.tasks),
                                  "--config", args.config],
                                 capture_output=True, text=True, env=env, check=True)
            runs[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = runs[kind][-1]
            print(f"{kind:>18}: {r['seconds']:6.2f} s for {args.tasks} tasks ({r['tasks_per_s']:.2f} tasks/s), "
                  f"SA {100 * r['sa']:.1f}% RA {100 * r['ra']:.1f}%, max RSS {r['max_rss_mib']:.0f} MiB", flush=True)
    res: dict = {"compare": args.compare, "config": args.config, "tasks": args.tasks, "reps": args.reps, "runs": runs, "speedup": {}}
    for kind in kinds[1:]:
        ratios = sorted(b["seconds"] / o["seconds"] for b, o in zip(runs[base], runs[kind]))
        med = statistics.median(r["seconds"] for r in runs[base]) / statistics.median(r["seconds"] for r in runs[kind])
        rss = (statistics.median(r["max_rss_mib"] for r in runs[kind])
               / statistics.median(r["max_rss_mib"] for r in runs[base]))
        res["speedup"][kind] = {"median": med, "min": ratios[0], "max": ratios[-1], "rss_ratio": rss}
        print(f"{kind} over {base}: {med:.2f}x [{ratios[0]:.2f}–{ratios[-1]:.2f}], peak RSS x{rss:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return res


if __name__ == "__main__":
    main()
