"""First-load time, cached-load time, peak RSS and tasks/s of every file layout `load_benchmark` reads.

For each format the train split (the largest) is fabricated in the layout's exact file format
at ``--scale`` × its real size (timed, not counted), then measured, each phase in a fresh
process (so its peak RSS is its own):

* ``first``: the first load, with any cache build (MiniImageNet JPEGs, tieredImageNet PNGs).
  The fabricated files are written back and dropped from the page cache first (``os.sync`` +
  ``POSIX_FADV_DONTNEED``), so they are read from the disk, as after a download or a reboot;
* ``cached``: a second load (files and cache now in the page cache);
* ``sample``: a load, then `TaskSampler` 5-way 1-shot 15-query tasks/s on the loaded uint8
  images, one task at a time (the VmHWM is reset after the load, so ``sampling_peak_rss_mb``
  is that of the sampling alone).

The phases run with ``--threads`` torch threads (default 1, as in a DataLoader worker: a
task's gather-and-convert is too small to gain from more, and on busy cores the thread pool
slows it down many times).

Every phase reports the load time, the image tensor's shape, the RSS right after the imports
and the peak RSS (``/proc/self/status`` VmHWM and ``getrusage`` ru_maxrss). Where the scale
is below 1 the report adds a linear extrapolation to the real train split, marked as such
(``extrapolated_to_full_train_split``: an estimate from this run, not a measurement): times
and the anonymous memory scale with the images, the file-backed RSS of a memory-mapped cache
(tieredImageNet: the pages its checks touch, with the device's read-ahead,
``workdir_read_ahead_kb``) is kept as measured. Each phase also reports how much of the RSS
it ends with is anonymous memory and how much file-backed (``anon_``/``file_over_imports_now_mb``).

| ``--format`` | benchmark / layout | real train split | default scale |
|---|---|---|---|
| ``mini-csv`` | MiniImageNet ``csv-images``: ``images/*.jpg`` + ``train.csv`` (JPEGs of ``--jpeg-size``, ImageNet-like 500×375 by default: the loader resizes them to 84×84) | 38,400 | 0.1 |
| ``mini-pickle`` | MiniImageNet ``pickle-cache``: ``mini-imagenet-cache-train.pkl`` | 38,400 | 1 |
| ``mini-metaoptnet`` | MiniImageNet ``metaoptnet``: ``miniImageNet_category_split_train_phase_train.pickle`` (Python 2 pickle) | 38,400 | 1 |
| ``mini-torchmeta`` | MiniImageNet ``torchmeta``: ``miniimagenet/train_data.hdf5`` + ``train_labels.json`` | 38,400 | 1 |
| ``cifar-tar`` | CIFAR-FS from ``cifar-100-python.tar.gz`` (all 100 classes, 60,000 images: Python 2 pickles) | 38,400 | 1 |
| ``cifar-folder`` | CIFAR-FS from the extracted ``cifar-100-python/`` | 38,400 | 1 |
| ``cifar-metaoptnet`` | CIFAR-FS ``metaoptnet``: ``CIFAR_FS_train.pickle`` (Python 2 pickle) | 38,400 | 1 |
| ``tiered`` | tieredImageNet ``png-pickles``: ``train_images_png.pkl`` + ``train_labels.pkl`` | 448,695 | 0.05 |

Classes are grouped in the files as in the originals (MiniImageNet, tieredImageNet), shuffled
in CIFAR-100's ``train``/``test``; tieredImageNet's pickles are Python 2 ones with the PNGs as
``str`` (the tarball's; ``--tiered-style py3-bytes`` for re-saved ones). Pixels: random for the array layouts (their cost does not depend on content), smooth pictures
plus noise where the files are compressed (JPEG, PNG, gzip), ``--distinct`` different ones
repeated so that fabrication stays quick (decoding costs the same). ``--tiny`` fabricates 16
images per class for every class (what a 1-shot 15-query task needs), small JPEGs, 20 tasks:
the smoke test's size (``tests/test_loading_bench.py``).

The free disk space of ``--workdir`` is checked before each format is fabricated; a format
whose files and cache would not fit is refused with a message. At the default scales a
format needs at most ~1 GB; at ``--scale 1`` ``mini-csv`` needs ~4 GB (3.2 GB of JPEGs +
0.8 GB cache) and ``tiered`` ~16 GB (6.3 GB of pickles + 9.5 GB cache). Each format's files
are deleted after it is measured unless ``--keep`` (then they add up).

Usage:
    python benchmarks/loading.py --format all [--scale S] [--workdir DIR] [--keep] [--json-out PATH]
    python benchmarks/loading.py --format tiered --scale 0.05
    python benchmarks/loading.py --format all --tiny --isolation fork     # the smoke test

``--isolation spawn`` (default) runs each phase in a new interpreter; ``fork`` forks it from
one clean interpreter that imported torch and robust-meta once (quick: for the smoke test; its
RSS figures leave out library pages the phase never touched).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import pickle
import platform
import resource
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

SCHEMA = "robust-meta-loading-bench/1"
MINI_PIXELS = 84 * 84 * 3
CIFAR_PIXELS = 32 * 32 * 3
TINY_PER_CLASS = 16  # 1 shot + 15 queries


@dataclass(frozen=True)
class Format:
    benchmark: str
    layout: str
    train_images: int  # the real train split
    all_images: int  # the real dataset, every split
    classes: int  # of the train split
    default_scale: float
    about: str


FORMATS = {
    "mini-csv": Format("miniimagenet", "csv-images", 38_400, 60_000, 64, 0.1, "images/*.jpg + train.csv"),
    "mini-pickle": Format("miniimagenet", "pickle-cache", 38_400, 60_000, 64, 1.0, "mini-imagenet-cache-train.pkl"),
    "mini-metaoptnet": Format("miniimagenet", "metaoptnet", 38_400, 60_000, 64, 1.0,
                              "miniImageNet_category_split_train_phase_train.pickle (Python 2)"),
    "mini-torchmeta": Format("miniimagenet", "torchmeta", 38_400, 60_000, 64, 1.0,
                             "miniimagenet/train_data.hdf5 + train_labels.json"),
    "cifar-tar": Format("cifar-fs", "cifar-100-python", 38_400, 60_000, 64, 1.0,
                        "cifar-100-python.tar.gz (Python 2 pickles)"),
    "cifar-folder": Format("cifar-fs", "cifar-100-python", 38_400, 60_000, 64, 1.0,
                           "cifar-100-python/{train,test,meta} (Python 2 pickles)"),
    "cifar-metaoptnet": Format("cifar-fs", "metaoptnet", 38_400, 60_000, 64, 1.0, "CIFAR_FS_train.pickle (Python 2)"),
    "tiered": Format("tieredimagenet", "png-pickles", 448_695, 779_165, 351, 0.05,
                     "train_images_png.pkl + train_labels.pkl"),
}


# --------------------------------------------------------------------------- memory


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


def _mb(kb: float) -> float:
    return round(kb / 1024, 1)


def _memory(base: dict) -> dict:
    """Peak RSS of this process so far, and its growth over ``base`` (`_rss` right after the imports)."""
    hwm, now = _status("VmHWM"), _rss()
    return {
        "rss_after_imports_mb": _mb(base["VmRSS"]),
        "peak_rss_vmhwm_mb": _mb(hwm),
        "peak_rss_getrusage_mb": _mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),
        "peak_over_imports_mb": _mb(hwm - base["VmRSS"]),
        # of the RSS now, what is anonymous memory and what file-backed (mapped files, e.g. a
        # memory-mapped cache: page cache, reclaimable), each over its value after the imports
        "anon_over_imports_now_mb": _mb(now["RssAnon"] - base["RssAnon"]),
        "file_over_imports_now_mb": _mb(now["RssFile"] - base["RssFile"]),
    }


def _rss() -> dict:
    return {k: _status(k) for k in ("VmRSS", "RssAnon", "RssFile")}


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- fabrication helpers


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table is extensible
    """Writes ``bytes`` as Python 2 ``str`` (as cPickle did), numpy's raw data included."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n))
        self.write(obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _py2(obj):
    """Text as Python 2 ``str`` (bytes here) throughout dicts and lists."""
    if isinstance(obj, str):
        return obj.encode("latin1")
    if isinstance(obj, dict):
        return {_py2(k): _py2(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_py2(v) for v in obj]
    return obj


def _py2_dumps(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(_py2(obj))
    return buf.getvalue()


def _py2_dump(obj, path: Path) -> None:
    with path.open("wb") as f:
        _Py2Pickler(f, protocol=2).dump(_py2(obj))


def _pictures(rng, n: int, h: int, w: int, block: int):
    """``n`` smooth pictures (random ``block``-pixel blocks) plus noise: uint8 (n, h, w, 3)."""
    import numpy as np

    low = rng.integers(0, 256, size=(n, -(-h // block), -(-w // block), 3), dtype=np.uint8)
    pic = np.repeat(np.repeat(low, block, axis=1), block, axis=2)[:, :h, :w]
    noise = rng.integers(-12, 13, size=pic.shape, dtype=np.int16)
    return np.clip(pic.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def _encode(pixels, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "JPEG":
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    else:
        Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _check_space(folder: Path, need: int, what: str) -> None:
    """Refuse (SystemExit) when ``need`` bytes (+10 % and 256 MiB) do not fit on ``folder``'s disk."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    want = int(need * 1.1) + (256 << 20)
    if want > free:
        raise SystemExit(f"not enough disk space for {what}: it needs ~{want / 1e9:.2f} GB (fabricated files + cache) "
                         f"in {str(folder)!r}, which has {free / 1e9:.2f} GB free; use --workdir elsewhere or a "
                         "smaller --scale")


def _mini_wnids() -> list[str]:
    return [f"n{i:08d}" for i in range(64)]


def _class_counts(fmt: str, scale: float, tiny: bool) -> int:
    """Images per class of the train split (tieredImageNet: images in all)."""
    spec = FORMATS[fmt]
    if fmt == "tiered":
        return spec.classes * TINY_PER_CLASS if tiny else max(spec.classes * TINY_PER_CLASS,
                                                              round(spec.train_images * scale))
    return TINY_PER_CLASS if tiny else max(TINY_PER_CLASS, round(600 * scale))


# --------------------------------------------------------------------------- fabricators


def _fab_mini_array(fmt: str, data: Path, per_class: int, args) -> dict:
    """The three array layouts of MiniImageNet's train split: 64 classes, grouped as the originals."""
    import numpy as np

    wnids = _mini_wnids()
    n = 64 * per_class
    _check_space(data, n * MINI_PIXELS, fmt)
    rng = np.random.default_rng(args.seed)
    images = rng.integers(0, 256, size=(n, 84, 84, 3), dtype=np.uint8)
    data.mkdir(parents=True, exist_ok=True)
    if fmt == "mini-pickle":
        class_dict = {w: list(range(i * per_class, (i + 1) * per_class)) for i, w in enumerate(wnids)}
        path = data / "mini-imagenet-cache-train.pkl"
        with path.open("wb") as f:
            pickle.dump({"image_data": images, "class_dict": class_dict}, f, protocol=4)
        files = [path]
    elif fmt == "mini-metaoptnet":
        labels = [i for i in range(64) for _ in range(per_class)]
        path = data / "miniImageNet_category_split_train_phase_train.pickle"
        _py2_dump({"data": images, "labels": labels, "catname2label": {w: i for i, w in enumerate(wnids)}}, path)
        files = [path]
    else:  # torchmeta: one uint8 dataset per wnid
        import h5py

        folder = data / "miniimagenet"
        folder.mkdir(parents=True, exist_ok=True)
        with h5py.File(folder / "train_data.hdf5", "w") as f:
            group = f.create_group("datasets")
            for i, w in enumerate(wnids):
                group.create_dataset(w, data=images[i * per_class:(i + 1) * per_class])
        (folder / "train_labels.json").write_text(json.dumps(wnids))
        files = [folder / "train_data.hdf5", folder / "train_labels.json"]
    return {"images": n, "files": files}


def _fab_mini_csv(data: Path, cache_need_per_image: int, per_class: int, args) -> dict:
    """Ravi & Larochelle's layout: ``images/<wnid><index>.jpg`` + ``train.csv``, classes grouped."""
    import numpy as np

    w, h = args.jpeg_size
    rng = np.random.default_rng(args.seed)
    distinct = min(args.distinct, 64 * per_class)
    jpegs = [_encode(_pictures(rng, 1, h, w, block=max(8, w // 40))[0], "JPEG") for _ in range(distinct)]
    n = 64 * per_class
    mean = sum(map(len, jpegs)) / len(jpegs)
    _check_space(data, int(n * (mean + 4096)) + n * cache_need_per_image, "mini-csv")  # + a block per file
    (data / "images").mkdir(parents=True, exist_ok=True)
    rows, files = ["filename,label"], []
    for i, wnid in enumerate(_mini_wnids()):
        for k in range(per_class):
            name = f"{wnid}{k:08d}.jpg"
            path = data / "images" / name
            path.write_bytes(jpegs[(i * per_class + k) % distinct])
            files.append(path)
            rows.append(f"{name},{wnid}")
    (data / "train.csv").write_text("\n".join(rows) + "\n")
    return {"images": n, "files": [*files, data / "train.csv"], "jpeg_size": f"{w}x{h}",
            "mean_jpeg_bytes": round(mean), "distinct_pictures": distinct}


def _cifar_members(per_train: int, per_test: int, args) -> dict[str, bytes]:
    """CIFAR-100's ``train`` / ``test`` / ``meta`` as the official Python 2 pickles (classes shuffled)."""
    import numpy as np

    from robust_meta.datasets.cifar import cifar100_names

    names = cifar100_names()
    fine, coarse = names["fine"], names["coarse"]
    rng = np.random.default_rng(args.seed)
    out = {}
    for member, k in (("train", per_train), ("test", per_test)):
        ids = rng.permutation(np.repeat(np.arange(100), k)).tolist()
        pixels = _pictures(rng, len(ids), 32, 32, block=4).transpose(0, 3, 1, 2).reshape(len(ids), CIFAR_PIXELS)
        out[member] = _py2_dumps({
            "filenames": [f"img_{member}_{i}.png" for i in range(len(ids))],
            "batch_label": f"{member} batch",
            "fine_labels": ids,
            "coarse_labels": [coarse.index(names["fine_to_coarse"][fine[i]]) for i in ids],
            "data": np.ascontiguousarray(pixels),
        })
    out["meta"] = _py2_dumps({"fine_label_names": list(fine), "coarse_label_names": list(coarse)})
    return out


def _fab_cifar(fmt: str, data: Path, per_class: int, args) -> dict:
    import numpy as np

    data.mkdir(parents=True, exist_ok=True)
    if fmt == "cifar-metaoptnet":
        from robust_meta.datasets.cifar import cifar100_names, cifar_fs_classes

        fine = cifar100_names()["fine"]
        classes = cifar_fs_classes("train")
        n = len(classes) * per_class
        _check_space(data, n * CIFAR_PIXELS, fmt)
        rng = np.random.default_rng(args.seed)
        path = data / "CIFAR_FS_train.pickle"
        _py2_dump({"data": _pictures(rng, n, 32, 32, block=4),
                   "labels": [fine.index(c) for c in classes for _ in range(per_class)]}, path)
        return {"images": n, "files": [path]}
    # the official archive: 500 train + 100 test images per class; tiny: 13 + 3
    per_train = max(1, round(per_class * 5 / 6))
    per_test = per_class - per_train
    _check_space(data, 100 * per_class * (CIFAR_PIXELS + 64), fmt)
    members = _cifar_members(per_train, per_test, args)
    if fmt == "cifar-folder":
        folder = data / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for m, blob in members.items():
            (folder / m).write_bytes(blob)
            files.append(folder / m)
    else:
        path = data / "cifar-100-python.tar.gz"
        with gzip.open(path, "wb", compresslevel=9) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
            for m, blob in members.items():
                info = tarfile.TarInfo(f"cifar-100-python/{m}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
        files = [path]
    return {"images": 64 * per_class, "archive_images": 100 * per_class, "files": files}


def _fab_tiered(data: Path, n: int, args) -> dict:
    """``train_images_png.pkl`` / ``train_labels.pkl``: ``n`` 84×84×3 PNGs over the 351 train classes."""
    import numpy as np

    from robust_meta.datasets.tieredimagenet import _table

    rows = [r for r in _table() if r[1] == "train"]
    rng = np.random.default_rng(args.seed)
    distinct = min(args.distinct, n)
    pngs = [_encode(_pictures(rng, 1, 84, 84, block=8)[0], "PNG") for _ in range(distinct)]
    mean = sum(map(len, pngs)) / distinct
    _check_space(data, int(n * (mean + 40)) + n * MINI_PIXELS, "tiered")
    # distinct objects (same bytes): pickle memoizes by identity, and one shared object would
    # shrink the pickle to `distinct` images
    images = [bytes(bytearray(pngs[i % distinct])) for i in range(n)]
    labels = np.sort(np.arange(n) % len(rows)).astype(np.int32)  # balanced, grouped by class as the original
    blob = {"label_specific": labels, "label_general": np.zeros_like(labels),
            "label_specific_str": [r[2] for r in rows], "label_general_str": ["g"]}
    data.mkdir(parents=True, exist_ok=True)
    files = [data / "train_images_png.pkl", data / "train_labels.pkl"]
    if args.tiered_style == "py2-str":  # the original tarball: Python 2 pickles, PNGs as str
        _py2_dump(images, files[0])
        _py2_dump(blob, files[1])
    else:
        for obj, path in zip((images, blob), files):
            with path.open("wb") as f:
                pickle.dump(obj, f, protocol=4)
    return {"images": n, "files": files, "mean_png_bytes": round(mean), "distinct_pictures": distinct,
            "pickle_style": args.tiered_style}


def fabricate(fmt: str, data: Path, args) -> dict:
    per = _class_counts(fmt, args.scale_of[fmt], args.tiny)
    if fmt in ("mini-pickle", "mini-metaoptnet", "mini-torchmeta"):
        return _fab_mini_array(fmt, data, per, args)
    if fmt == "mini-csv":
        return _fab_mini_csv(data, MINI_PIXELS, per, args)
    if fmt.startswith("cifar"):
        return _fab_cifar(fmt, data, per, args)
    return _fab_tiered(data, per, args)


def _evict(files) -> bool:
    """Write the files back and drop them from the page cache; False where that is not possible."""
    if not hasattr(os, "posix_fadvise"):
        return False
    os.sync()
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


# --------------------------------------------------------------------------- one phase


def phase(name: str, fmt: str, data: str, cache: str, tasks: int, threads: int) -> dict:
    """One measured phase, in this (fresh) process."""
    import torch

    from robust_meta.datasets import TaskSampler, load_benchmark

    if threads:
        torch.set_num_threads(threads)
    base = _rss()
    spec = FORMATS[fmt]
    t = time.perf_counter()
    split = load_benchmark(spec.benchmark, data, "train", cache_dir=cache, progress=False)
    out: dict = {"load_s": round(time.perf_counter() - t, 4)}
    if split.layout != spec.layout:
        raise RuntimeError(f"{fmt}: read as {split.layout!r}, expected {spec.layout!r}")
    out["rss_after_load_mb"] = _mb(_status("VmRSS"))
    out["images_shape"] = list(split.images.shape)
    out["classes"] = split.num_classes
    out["images_memory_mapped"] = bool(split.images.is_shared())
    out["torch_threads"] = torch.get_num_threads()
    out.update(_memory(base))
    if name == "cached" and fmt == "tiered":  # how much of the cached load is the content hash
        from robust_meta.datasets import tieredimagenet as tiered

        root = Path(data)
        t = time.perf_counter()
        tiered._cache_key(root / "train_images_png.pkl", root / "train_labels.pkl")
        out["content_hash_s"] = round(time.perf_counter() - t, 4)
    if name == "sample":
        rss = _status("VmRSS")
        reset = _reset_peak()
        sampler = TaskSampler(split.images, split.labels, ways=5, shots=1, queries=15, seed=0)
        out["sampler_keeps_uint8"] = sampler.images.dtype == torch.uint8
        sampler.sample(max(1, tasks // 10))  # warm-up
        t = time.perf_counter()
        for _ in range(tasks):  # one at a time, not kept: an 84×84 task is ~6.8 MB of float32
            task = sampler.sample(1)[0]
        dt = time.perf_counter() - t
        out["tasks"] = tasks
        out["tasks_per_s"] = round(tasks / dt, 1)
        out["task_support_query_shapes"] = [list(task.support_x.shape), list(task.query_x.shape)]
        out["sampling_peak_rss_mb"] = _mb(_status("VmHWM")) if reset else None
        out["sampling_peak_over_loaded_mb"] = _mb(_status("VmHWM") - rss) if reset else None
    return out


def _serve() -> None:
    """``--isolation fork``: import once, then fork one child per phase request (a JSON line on stdin)."""
    import torch  # noqa: F401

    from robust_meta.datasets import TaskSampler, load_benchmark  # noqa: F401

    for line in sys.stdin:
        req = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, write the result, leave without cleanup
            os.close(r)
            try:
                res = phase(**req)
            except BaseException:  # noqa: BLE001 - reported to the parent
                res = {"error": traceback.format_exc()[-3000:]}
            with os.fdopen(w, "w") as f:
                f.write(json.dumps(res))
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            text = f.read()
        _, status = os.waitpid(pid, 0)
        if not text:
            text = json.dumps({"error": f"phase process ended with status {status} and no result"})
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


class _Runner:
    """Runs phases in fresh processes: a new interpreter each (spawn) or a fork of a clean one."""

    def __init__(self, isolation: str):
        self.isolation = isolation
        self.server = None
        if isolation == "fork":
            self.server = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True)

    def __call__(self, **req) -> dict:
        if self.server is not None:
            self.server.stdin.write(json.dumps(req) + "\n")
            self.server.stdin.flush()
            line = self.server.stdout.readline()
            res = json.loads(line) if line else {"error": "the phase server died"}
        else:
            cmd = [sys.executable, __file__, "--phase", json.dumps(req)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                res = {"error": proc.stderr[-3000:]}
            else:
                res = json.loads(proc.stdout.strip().splitlines()[-1])
        if "error" in res:
            raise SystemExit(f"phase {req['name']} of {req['fmt']} failed:\n{res['error']}")
        return res

    def close(self) -> None:
        if self.server is not None:
            self.server.stdin.close()
            self.server.wait(timeout=60)


# --------------------------------------------------------------------------- one format


def _size_mb(paths) -> float:
    return round(sum(p.stat().st_size for p in paths if p.is_file()) / 2**20, 1)


def _extrapolate(spec: Format, n: int, rep: dict) -> dict:
    k = spec.train_images / n
    first, cached = rep["first"], rep["cached"]
    out = {
        "note": (f"linear extrapolation from this run of {n} images to the real train split of "
                 f"{spec.train_images}: an estimate, not a measurement (tasks/s is not scaled; the file-backed "
                 "pages of a memory-mapped cache are kept as measured)"),
        "images": spec.train_images,
        "first_load_s": round(first["load_s"] * k, 1),
        "cached_load_s": round(cached["load_s"] * k, 2),
    }
    for ph in ("first", "cached"):
        r = rep[ph]
        # file-backed pages of a memory-mapped cache are those its checks touched (a fixed number
        # of sampled images and their read-ahead), not a fraction of the file: kept as measured
        mapped = max(0.0, r["file_over_imports_now_mb"]) if r["images_memory_mapped"] else 0.0
        over = max(0.0, r["peak_over_imports_mb"] - mapped) * k + mapped
        out[f"{ph}_peak_over_imports_mb"] = round(over)
        out[f"{ph}_peak_rss_mb"] = round(r["rss_after_imports_mb"] + over)
    out["files_mb"] = round(rep["fabricate"]["files_mb"] * k)
    out["cache_mb"] = round(rep["cache_files_mb"] * k)
    return out


def run_format(fmt: str, work: Path, runner: _Runner, args) -> dict:
    spec = FORMATS[fmt]
    data, cache = work / fmt / "data", work / fmt / "cache"
    shutil.rmtree(work / fmt, ignore_errors=True)
    try:
        t = time.perf_counter()
        fab = fabricate(fmt, data, args)
        files = fab.pop("files")
        fab["files_mb"] = _size_mb(files)
        fab["seconds"] = round(time.perf_counter() - t, 1)
        n = fab["images"]
        rep: dict = {
            "benchmark": spec.benchmark, "layout": spec.layout, "files": spec.about, "split": "train",
            "images": n, "real_train_images": spec.train_images, "real_all_splits_images": spec.all_images,
            "scale": round(n / spec.train_images, 5), "tiny": args.tiny,
            "measured_at_full_size": n >= spec.train_images, "fabricate": fab,
        }
        rep["first_page_cache"] = "evicted" if _evict(files) else "warm (posix_fadvise unavailable)"
        for name in ("first", "cached", "sample"):
            rep[name] = runner(name=name, fmt=fmt, data=str(data), cache=str(cache), tasks=args.tasks,
                               threads=args.threads)
        rep["cache_files_mb"] = _size_mb([p for p in cache.rglob("*") if p.is_file()]) if cache.exists() else 0.0
        rep["extrapolated_to_full_train_split"] = None if rep["measured_at_full_size"] else _extrapolate(spec, n, rep)
        return rep
    finally:
        if not args.keep:
            shutil.rmtree(work / fmt, ignore_errors=True)


def machine_info() -> dict:
    import torch

    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        from robust_meta import __version__ as rm_version
    except ImportError:  # pragma: no cover
        rm_version = None
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": mem,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "robust_meta": rm_version,
    }


def _read_ahead_kb(folder: Path) -> int | None:
    """The read-ahead of the block device holding ``folder`` (it sets how much a page fault maps)."""
    dev = os.stat(folder).st_dev
    base = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    for cand in (base / "queue" / "read_ahead_kb", base.parent / "queue" / "read_ahead_kb",
                 base / ".." / "queue" / "read_ahead_kb"):
        try:
            return int(cand.read_text())
        except (OSError, ValueError):
            continue
    return None


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h or w)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--format", default="all", choices=(*FORMATS, "all"))
    ap.add_argument("--scale", type=float, default=None,
                    help="fraction of the real train split fabricated (default per format: 1; mini-csv 0.1; tiered 0.05)")
    ap.add_argument("--tiny", action="store_true",
                    help="16 images per class of every class, small JPEGs, 20 tasks (the smoke test)")
    ap.add_argument("--tasks", type=int, default=None, help="tasks timed in the sample phase (default 300; tiny 20)")
    ap.add_argument("--jpeg-size", type=_size, default=None, help="WxH of the fabricated JPEGs (default 500x375)")
    ap.add_argument("--distinct", type=int, default=512, help="distinct JPEG/PNG pictures, repeated")
    ap.add_argument("--tiered-style", choices=("py2-str", "py3-bytes"), default="py2-str",
                    help="tieredImageNet pickles: Python 2 (the tarball's) or Python 3")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in the measured phases (default 1, as in a DataLoader worker; 0: torch's default)")
    ap.add_argument("--isolation", choices=("spawn", "fork"), default="spawn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="where to fabricate (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the fabricated files and caches")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        _serve()
        return {}
    if args.phase:
        print(json.dumps(phase(**json.loads(args.phase))))
        return {}
    if args.scale is not None and not 0 < args.scale <= 1:
        ap.error("--scale must be in (0, 1]")
    if args.tasks is None:
        args.tasks = 20 if args.tiny else 300
    if args.jpeg_size is None:
        args.jpeg_size = (100, 75) if args.tiny else (500, 375)
    formats = list(FORMATS) if args.format == "all" else [args.format]
    args.scale_of = {f: FORMATS[f].default_scale if args.scale is None else args.scale for f in formats}

    work = args.workdir or Path(tempfile.mkdtemp(prefix="loading-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    runner = _Runner(args.isolation)
    t0 = time.perf_counter()
    report = {"schema": SCHEMA, "machine": machine_info(),
              "config": {"formats": formats, "scale": args.scale_of, "tiny": args.tiny, "tasks": args.tasks,
                         "torch_threads": args.threads or "torch default",
                         "task": "5-way 1-shot 15-query", "jpeg_size": "x".join(map(str, args.jpeg_size)),
                         "distinct": args.distinct, "tiered_style": args.tiered_style,
                         "isolation": args.isolation, "workdir": str(work),
                         "disk_free_gb_at_start": round(shutil.disk_usage(work).free / 1e9, 1),
                         "workdir_read_ahead_kb": _read_ahead_kb(work)},
              "formats": {}}
    try:
        for fmt in formats:
            report["formats"][fmt] = run_format(fmt, work, runner, args)
            if args.json_out:  # rewritten after every format: a killed run keeps what it finished
                args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    finally:
        runner.close()
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=2)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
