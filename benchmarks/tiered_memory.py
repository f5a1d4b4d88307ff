"""Time and memory of the tieredImageNet loader on a fabricated, tieredImageNet-shaped split.

Fabricates ``--images`` 84×84×3 PNGs over ``--classes`` classes (names from robust-meta's
table) as ``train_images_png.pkl`` / ``train_labels.pkl`` (Python 3 pickles; ``--distinct``
different pictures, repeated, so that fabrication stays quick: decoding costs the same), then
measures, each phase in a fresh process (so peak RSS is that phase's own):

* ``first``: the first load (hash the pickles, unpickle, decode, write the cache);
* ``cached``: a second load (hash the pickles, check and memory-map the cache), with the
  time of the content hash alone;
* ``sample``: ``TaskSampler`` 5-way 1-shot 15-query tasks/s on the memory-mapped images.

Peak RSS is reported from ``resource.getrusage`` (ru_maxrss) and ``/proc/self/status``
(VmHWM), with the RSS right after the imports. Prints one JSON object, including a linear
extrapolation to the 779,165 images of tieredImageNet (an extrapolation from this run, not
a measurement).

Usage:
    python benchmarks/tiered_memory.py --images 20000 [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL_IMAGES = 779_165  # train 448,695 + val 124,261 + test 206,209
TRAIN_IMAGES = 448_695  # the largest split: the peak memory of one load is that of this one


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in kB (0 where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _memory(base_kb: int) -> dict:
    return {
        "rss_after_imports_mb": round(base_kb / 1024, 1),
        "peak_rss_getrusage_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_vmhwm_mb": round(_status("VmHWM") / 1024, 1),
        "peak_over_imports_mb": round((_status("VmHWM") - base_kb) / 1024, 1),
    }


def fabricate(folder: Path, n: int, classes: int, distinct: int, seed: int) -> dict:
    import numpy as np
    from PIL import Image

    from robust_meta.datasets.tieredimagenet import _table

    rows = [r for r in _table() if r[1] == "train"][:classes]
    rng = np.random.default_rng(seed)
    pngs = []
    for _ in range(distinct):  # smooth pictures + noise: PNGs of a natural image's size
        low = rng.integers(0, 256, size=(11, 11, 3), dtype=np.uint8)
        pic = np.kron(low, np.ones((8, 8, 1), np.uint8))[:84, :84]
        pic = np.clip(pic.astype(np.int16) + rng.integers(-12, 13, size=pic.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pic).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    # distinct objects (same bytes): pickle memoizes by identity, and one shared object would
    # shrink the pickle to `distinct` images
    images = [bytes(bytearray(pngs[i % distinct])) for i in range(n)]
    labels = np.sort(np.arange(n) % len(rows)).astype(np.int32)  # balanced, grouped by class as the original
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "train_images_png.pkl").open("wb") as f:
        pickle.dump(images, f, protocol=4)
    with (folder / "train_labels.pkl").open("wb") as f:
        pickle.dump({"label_specific": labels, "label_general": np.zeros_like(labels),
                     "label_specific_str": [r[2] for r in rows], "label_general_str": ["g"]}, f, protocol=4)
    return {
        "images_pickle_mb": round((folder / "train_images_png.pkl").stat().st_size / 2**20, 1),
        "mean_png_bytes": round(sum(map(len, pngs)) / distinct),
    }


def phase(name: str, data: Path, cache: Path) -> dict:
    """One measured phase, in this (fresh) process."""
    import torch

    from robust_meta.datasets import TaskSampler, load_benchmark
    from robust_meta.datasets import tieredimagenet as tiered

    base = _status("VmRSS")
    out: dict = {}
    if name in ("first", "cached"):
        if name == "cached":
            t = time.perf_counter()
            tiered._cache_key(data / "train_images_png.pkl", data / "train_labels.pkl")
            out["content_hash_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        split = load_benchmark("tieredimagenet", data, "train", cache_dir=cache, progress=False)
        out["load_s"] = round(time.perf_counter() - t, 3)
        out["rss_after_load_mb"] = round(_status("VmRSS") / 1024, 1)
        out["images_is_file_mapped"] = bool(split.images.is_shared())
    else:
        split = load_benchmark("tieredimagenet", data, "train", cache_dir=cache, progress=False)
        sampler = TaskSampler(split.images, split.labels, ways=5, shots=1, queries=15, seed=0)
        out["sampler_keeps_uint8"] = sampler.images.dtype == torch.uint8
        sampler.sample(20)  # warm-up
        n, t = 300, time.perf_counter()
        for _ in range(n):  # one at a time, not kept: a task is ~6.8 MB of float32
            task = sampler.sample(1)[0]
        dt = time.perf_counter() - t
        out["tasks_per_s"] = round(n / dt, 1)
        out["task_support_query_shapes"] = [list(task.support_x.shape), list(task.query_x.shape)]
    out.update(_memory(base))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--classes", type=int, default=351)
    ap.add_argument("--distinct", type=int, default=512, help="distinct PNGs, repeated to fill --images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the fabricated files and cache")
    ap.add_argument("--phase", choices=("first", "cached", "sample"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="tiered-bench-"))
    data, cache = work / "data", work / "cache"
    if args.phase:
        print(json.dumps(phase(args.phase, data, cache)))
        return
    try:
        t = time.perf_counter()
        report: dict = {"images": args.images, "classes": args.classes}
        report["fabricate"] = fabricate(data, args.images, args.classes, args.distinct, args.seed)
        report["fabricate"]["seconds"] = round(time.perf_counter() - t, 1)
        for name in ("first", "cached", "sample"):
            res = subprocess.run([sys.executable, __file__, "--phase", name, "--workdir", str(work)],
                                 capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(f"phase {name} failed:\n{res.stderr[-3000:]}")
            report[name] = json.loads(res.stdout.strip().splitlines()[-1])
        report["cache_file_mb"] = round(sum(p.stat().st_size for p in (cache / "tieredimagenet").glob("*.u8")) / 2**20, 1)
        scale = FULL_IMAGES / args.images
        first, cached = report["first"], report["cached"]
        report["extrapolated_to_779165_images"] = {
            "note": "linear extrapolation from this run, not a measurement: times for all three splits "
                    "loaded one after another, peak memory for one load of the train split",
            "first_load_s": round(first["load_s"] * scale, 1),
            "cached_load_s": round(cached["load_s"] * scale, 1),
            "train_split_first_load_peak_over_imports_gb": round(
                first["peak_over_imports_mb"] * TRAIN_IMAGES / args.images / 1024, 2),
            "train_split_cache_gb": round(TRAIN_IMAGES * 3 * 84 * 84 / 1e9, 2),
            "cache_gb": round(FULL_IMAGES * 3 * 84 * 84 / 1e9, 2),
        }
        print(json.dumps(report, indent=2))
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
