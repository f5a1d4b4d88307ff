"""How long `import robust_meta` takes on top of `import torch` (fresh processes, interleaved).

    python benchmarks/import_time.py [--runs 15]

Prints the median (and min-max) wall time of `import torch` and of `import torch, robust_meta`
in fresh interpreters, their difference, and which heavy optional modules the import loaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

HEAVY = ("torchattacks", "scipy", "matplotlib", "sklearn", "torchmeta", "torchvision", "PIL", "requests")


def _time(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    _time("import torch")  # warm the file cache
    base, full = [], []
    for _ in range(args.runs):  # interleaved, so machine load hits both alike
        base.append(_time("import torch"))
        full.append(_time("import torch, robust_meta"))
    diffs = [f - b for f, b in zip(full, base)]
    probe = (
        "import sys, json, robust_meta; "
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    loaded = json.loads(subprocess.run([sys.executable, "-c", probe], check=True,
                                       capture_output=True, text=True).stdout)
    out = {
        "runs": args.runs,
        "import_torch_s": {"median": statistics.median(base), "min": min(base), "max": max(base)},
        "import_torch_robust_meta_s": {"median": statistics.median(full), "min": min(full), "max": max(full)},
        "robust_meta_over_torch_s": {"median": statistics.median(diffs), "min": min(diffs), "max": max(diffs)},
        "heavy_modules_loaded": loaded,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
