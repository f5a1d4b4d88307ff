"""tieredImageNet (Ren et al. 2018) from the PNG pickles of the original tarball.

The files read are those of ``tiered-imagenet.tar`` (few-shot-ssl-public): for each split,
``<split>_images_png.pkl`` — a pickled list (or numpy object array) of PNG-encoded 84×84×3
images, as ``bytes``, as Python 2 ``str`` (read as latin1, see `read_pickle`) or as the
numpy ``uint8`` buffers ``cv2.imencode`` returns (what the original script pickled) — and
``<split>_labels.pkl`` — a dict with ``label_specific`` (int, N) and ``label_specific_str``
(the class names, indexed by ``label_specific``; ``bytes`` keys are accepted). Python 2 and
re-saved Python 3 pickles both read.

Folders searched, in this order: ``root``, ``root/tiered-imagenet``, ``root/tieredimagenet``;
the first that holds both pickles of the split is read.

Classes are ImageNet wnids, sorted. The names in ``label_specific_str`` are those of the
tarball's ``class_names.txt``, line-aligned with its ``synsets.txt`` (wnids): when both files
sit next to the pickles (or in ``root``) they map the names. Otherwise the table shipped in
``assets/tieredimagenet_classes.tsv`` maps them (608 wnids with their split, from Ren et al.'s
split CSVs, and their WordNet words): a name matches a row when, compared case-insensitively
with underscores read as spaces and runs of blanks as one, it equals the row's full words
string, else when its first synonym (the part before the first comma) equals the row's first
synonym. A name matching no row or more than one is a `ValueError` naming it.

Decoded images go to an on-disk cache built once, then memory-mapped (the train split is
~9.5 GB of uint8, all three ~16.5 GB): ``<cache_dir>/tieredimagenet/<split>-<key>.u8`` holds
raw uint8 pixels in (N, 3, H, W) order (C-contiguous, so one image is one contiguous
3·84·84-byte block), ``<split>-<key>.json`` its sidecar (format, key, shape, the raw
``label_specific`` and names, a SHA-256 of sampled images, and a SHA-256 of the sidecar
itself). The key is the SHA-256 of the cache format and of the size and full SHA-256 of both
pickles: the images pickle is hashed, streamed, on every load (about 1–2 s per GB; the
labels pickle is small). Both files are written through a temporary file, fsync and an
atomic rename, the pixels first: a build stopped at any point (an exception, Ctrl-C, a
kill) leaves no sidecar for its pixels, so a later load rebuilds (the temporary file a kill leaves
is deleted by a later build once untouched for an hour: a fresh one may be another process's
build in progress). A cache whose file size,
sidecar checksum or sampled-image checksum does not match is reported with a warning and
rebuilt.

Pixels are RGB as the PNGs store them. (The original ``.npz`` files, decoded with OpenCV,
are BGR.)

Example:
    >>> from robust_meta.datasets import load_benchmark
    >>> train = load_benchmark("tieredimagenet", "~/data/tiered-imagenet", "train")
    >>> train.images.shape, train.num_classes      # ((448695, 3, 84, 84), 351)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import time
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_write
from ._benchmark import BENCHMARK_SPLITS, BenchmarkSplit, layout_error, read_pickle, str_keys

__all__ = ["TIERED_SPLIT_SIZES", "load_tieredimagenet", "tieredimagenet_classes"]

#: Number of classes of each split (Ren et al. 2018).
TIERED_SPLIT_SIZES = {"train": 351, "val": 97, "test": 160}

_CACHE_FORMAT = 1
_SUBDIRS = ("", "tiered-imagenet", "tieredimagenet")
_TABLE = Path(__file__).with_name("assets") / "tieredimagenet_classes.tsv"
_CHUNK = 1024  # images decoded, then written, at a time
_SAMPLES = 64  # images whose bytes the sidecar checksums
_HASH_BLOCK = 8 << 20


# --------------------------------------------------------------------------- the class table


@lru_cache(maxsize=1)
def _table() -> tuple[tuple[str, str, str], ...]:
    """The shipped ``(wnid, split, name)`` rows."""
    rows = []
    for line in _TABLE.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        wnid, split, name = line.split("\t")
        rows.append((wnid, split, name))
    return tuple(rows)


def tieredimagenet_classes(split: str) -> tuple[str, ...]:
    """The sorted wnids of one split in the shipped table (351 / 97 / 160 classes).

    Raises:
        ValueError: unknown ``split``.
    """
    if split not in BENCHMARK_SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(BENCHMARK_SPLITS)}")
    return tuple(sorted(w for w, s, _ in _table() if s == split))


def _norm(name: str) -> str:
    return re.sub(r"\s+", " ", name.replace("_", " ")).strip().casefold()


def _first(name: str) -> str:
    return _norm(name.split(",", 1)[0])


@lru_cache(maxsize=1)
def _table_index() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Normalised full words string → wnids, and normalised first synonym → wnids."""
    full: dict[str, set[str]] = {}
    first: dict[str, set[str]] = {}
    for w, _, n in _table():
        full.setdefault(_norm(n), set()).add(w)
        first.setdefault(_first(n), set()).add(w)
    return full, first


def _table_wnid(name: str) -> str:
    """The wnid of ``name`` in the shipped table (full words string, else first synonym)."""
    for index, key in zip(_table_index(), (_norm, _first)):
        hits = sorted(index.get(key(name), ()))
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise ValueError(
                f"tieredImageNet class name {name!r} is ambiguous in robust-meta's table (wnids {hits}); "
                "put the tarball's synsets.txt and class_names.txt next to the pickles to map names to wnids"
            )
    raise ValueError(
        f"tieredImageNet class name {name!r} is not in robust-meta's table of the 608 classes; "
        "put the tarball's synsets.txt and class_names.txt next to the pickles to map names to wnids"
    )


def _read_name_files(folders: Sequence[Path]) -> dict[str, list[str]] | None:
    """``class_names.txt`` / ``synsets.txt`` (line-aligned) as name → wnids, or ``None``."""
    for folder in folders:
        names, synsets = folder / "class_names.txt", folder / "synsets.txt"
        if names.is_file() and synsets.is_file():
            lines_n = names.read_text(encoding="utf-8", errors="replace").splitlines()
            lines_s = synsets.read_text(encoding="utf-8", errors="replace").splitlines()
            while lines_n and not lines_n[-1].strip():
                lines_n.pop()
            while lines_s and not lines_s[-1].strip():
                lines_s.pop()
            if len(lines_n) != len(lines_s):
                raise ValueError(
                    f"{str(names)!r} has {len(lines_n)} lines but {str(synsets)!r} {len(lines_s)}: "
                    "they must be line-aligned"
                )
            mapping: dict[str, list[str]] = {}
            for n, s in zip(lines_n, lines_s):
                mapping.setdefault(n.strip(), []).append(s.strip())
            return mapping
        if names.is_file() != synsets.is_file():
            present = names if names.is_file() else synsets
            warnings.warn(f"{str(present)!r} is alone (class_names.txt and synsets.txt go together); "
                          "ignoring it and mapping names with robust-meta's table", RuntimeWarning, stacklevel=3)
    return None


def _wnids(names: Sequence[str], split: str, name_files: dict[str, list[str]] | None) -> list[str]:
    """The wnid of every class name (``class_names.txt``/``synsets.txt`` first, else the table)."""
    in_split = {w for w, s, _ in _table() if s == split}
    out = []
    for name in names:
        hits = name_files.get(name.strip(), []) if name_files is not None else []
        if len(hits) > 1:  # e.g. ImageNet's two "crane"s: keep the one of this split
            hits = [w for w in hits if w in in_split] or hits
        if len(hits) > 1:
            raise ValueError(f"tieredImageNet class name {name!r} maps to several wnids {sorted(hits)} "
                             "in class_names.txt/synsets.txt")
        out.append(hits[0] if hits else _table_wnid(name))
    if len(set(out)) != len(out):
        dup = sorted({w for w in out if out.count(w) > 1})
        raise ValueError(f"several tieredImageNet class names map to the same wnid(s) {dup}")
    return out


# --------------------------------------------------------------------------- reading the pickles


def _find(root: Path, split: str) -> Path:
    for sub in _SUBDIRS:
        folder = root / sub if sub else root
        if (folder / f"{split}_images_png.pkl").is_file() and (folder / f"{split}_labels.pkl").is_file():
            return folder
    where = ", ".join(repr(s + "/") if s else "root" for s in _SUBDIRS)
    raise layout_error("tieredimagenet", root, [(
        "png-pickles", f"{split}_images_png.pkl and {split}_labels.pkl in {where}")])


def _as_str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _read_labels(path: Path) -> tuple[np.ndarray, list[str]]:
    """``label_specific`` (int64) and ``label_specific_str`` of a labels pickle."""
    data = str_keys(read_pickle(path))
    missing = [k for k in ("label_specific", "label_specific_str") if k not in data]
    if missing:
        raise ValueError(f"{str(path)!r} has no {' / '.join(missing)} (keys: {sorted(data)})")
    labels = np.asarray(data["label_specific"])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{str(path)!r}: label_specific must be an integer vector, got {labels.dtype} {labels.shape}")
    names = [_as_str(n) for n in data["label_specific_str"]]
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        raise ValueError(f"{str(path)!r}: label_specific outside [0, {len(names)})")
    return labels.astype(np.int64), names


def _png_bytes(item: Any, index: int) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):  # a Python 2 str read as latin1: bytes 1:1
        return item.encode("latin1")
    if isinstance(item, (bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:  # cv2.imencode's buffer
        return item.tobytes()
    raise ValueError(f"image {index} is a {type(item).__name__}, not PNG bytes")


def _decode_png(data: bytes) -> np.ndarray:
    """One PNG → uint8 (H, W, 3) RGB array (Pillow, imported here)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.mode != "RGB":
            im = im.convert("RGB")
        return np.asarray(im, dtype=np.uint8)


# --------------------------------------------------------------------------- the cache


def _default_cache_dir() -> Path:
    base = os.environ.get("ROBUST_META_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "robust_meta"
    )
    return Path(base)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while block := f.read(_HASH_BLOCK):
                h.update(block)
    except OSError as err:
        raise ValueError(f"cannot read {str(path)!r} ({err})") from err
    return h.hexdigest()


def _cache_key(images_pkl: Path, labels_pkl: Path) -> str:
    """SHA-256 of the format and of the size and SHA-256 of both pickles (by content)."""
    parts = [f"tieredimagenet-cache-{_CACHE_FORMAT}"]
    for p in (images_pkl, labels_pkl):
        parts.append(f"{p.stat().st_size}:{_file_sha256(p)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _sample_index(n: int) -> list[int]:
    return sorted({int(i) for i in np.linspace(0, n - 1, num=min(n, _SAMPLES))}) if n else []


def _sidecar_digest(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _open_images(path: Path, shape: tuple[int, ...]) -> torch.Tensor:
    """The cached pixels, memory-mapped (copy-on-write: writes never reach the file)."""
    n = int(np.prod(shape))
    if n == 0:
        return torch.empty(shape, dtype=torch.uint8)
    return torch.from_file(str(path), shared=False, size=n, dtype=torch.uint8).view(*shape)


def _read_cache(u8: Path, side: Path, key: str) -> tuple[torch.Tensor, dict[str, Any]] | None:
    """The memory-mapped pixels and sidecar, or ``None`` (absent; corrupt with a warning)."""
    if not side.is_file():
        return None  # an interrupted build leaves pixels without a sidecar: not trusted
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("checksum") != _sidecar_digest(meta):
            raise ValueError("the sidecar's checksum does not match")
        if meta.get("format") != _CACHE_FORMAT or meta.get("key") != key:
            raise ValueError("the sidecar is of another format or key")
        shape = tuple(int(s) for s in meta["shape"])
        if len(shape) != 4 or shape[1] != 3 or len(meta["label_specific"]) != shape[0]:
            raise ValueError(f"bad shape {shape}")
        size = u8.stat().st_size if u8.is_file() else -1
        if size != int(np.prod(shape)):
            raise ValueError(f"the pixel file has {size} bytes, expected {int(np.prod(shape))}")
        images = _open_images(u8, shape)
        idx = _sample_index(shape[0])
        if hashlib.sha256(images[idx].numpy().tobytes()).hexdigest() != meta["sample_sha256"]:
            raise ValueError("the checksum of the sampled images does not match")
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        warnings.warn(f"ignoring the corrupt tieredImageNet cache {str(u8)!r} ({err}); rebuilding it",
                      RuntimeWarning, stacklevel=3)
        return None
    return images, meta


def _remove_stale_temps(folder: Path, names: Sequence[str], *, age_s: float = 3600.0) -> None:
    """Delete temporaries of ``names`` left by a killed build, untouched for ``age_s`` seconds.

    A build in progress (another process) writes its temporary file continuously, so a
    fresh one is left alone.
    """
    now = time.time()
    for name in names:
        for tmp in folder.glob(f".{name}.*.tmp"):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > age_s:
                    tmp.unlink()


def _build_cache(u8: Path, side: Path, key: str, images_pkl: Path, labels: np.ndarray, names: list[str],
                 progress: bool) -> None:
    """Decode the PNGs in chunks straight into ``u8``, then write the sidecar (both atomically)."""
    _remove_stale_temps(u8.parent, (u8.name, side.name))
    items = read_pickle(images_pkl)
    if isinstance(items, np.ndarray) and items.dtype == object:
        items = items.reshape(-1)
    elif isinstance(items, tuple):
        items = list(items)
    if not isinstance(items, (list, np.ndarray)):
        raise ValueError(f"{str(images_pkl)!r} holds a {type(items).__name__}, not a list of PNG images")
    n = len(items)
    if n != len(labels):
        raise ValueError(f"{str(images_pkl)!r} holds {n} images but the labels pickle {len(labels)} labels")
    if n == 0:
        raise ValueError(f"{str(images_pkl)!r} holds no image")
    samples = _sample_index(n)
    sampled: dict[int, bytes] = {}
    shape: list[int] = []

    def write(f: Any) -> None:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc=f"decode tieredImageNet {u8.name.split('-')[0]}", unit="img", leave=False)
        try:
            for start in range(0, n, _CHUNK):
                stop = min(n, start + _CHUNK)
                chunk = None
                for i in range(start, stop):
                    try:
                        pixels = _decode_png(_png_bytes(items[i], i))
                    except ValueError:
                        raise
                    except Exception as err:  # Pillow's errors on a damaged PNG
                        raise ValueError(f"{str(images_pkl)!r}: image {i} is not a readable PNG ({err})") from err
                    if pixels.ndim != 3 or pixels.shape[2] != 3:
                        raise ValueError(f"{str(images_pkl)!r}: image {i} has shape {pixels.shape}")
                    if not shape:
                        shape.extend((n, 3, pixels.shape[0], pixels.shape[1]))
                    if pixels.shape[:2] != tuple(shape[2:]):
                        raise ValueError(f"{str(images_pkl)!r}: image {i} is {pixels.shape[1]}×{pixels.shape[0]}, "
                                         f"the first one {shape[3]}×{shape[2]}")
                    if chunk is None:
                        chunk = np.empty((stop - start, *shape[1:]), dtype=np.uint8)
                    chunk[i - start] = pixels.transpose(2, 0, 1)
                    items[i] = None  # the PNG bytes are not needed any more
                assert chunk is not None
                for j in samples:
                    if start <= j < stop:
                        sampled[j] = chunk[j - start].tobytes()
                f.write(memoryview(chunk).cast("B"))
                if bar is not None:
                    bar.update(stop - start)
        finally:
            if bar is not None:
                bar.close()

    atomic_write(u8, write)
    meta: dict[str, Any] = {
        "format": _CACHE_FORMAT,
        "key": key,
        "layout": "NCHW uint8",
        "shape": shape,
        "label_specific": [int(v) for v in labels],
        "label_specific_str": names,
        "sample_sha256": hashlib.sha256(b"".join(sampled[j] for j in samples)).hexdigest(),
        "source": str(images_pkl),
    }
    meta["checksum"] = _sidecar_digest(meta)
    atomic_write(side, lambda f: f.write(json.dumps(meta).encode()))


# --------------------------------------------------------------------------- the loader


def load_tieredimagenet(
    root: str | os.PathLike,
    split: str,
    *,
    verify: bool = False,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> BenchmarkSplit:
    """One split of tieredImageNet from the PNG pickles, decoded once into a memory-mapped cache.

    Args:
        root: the folder holding ``<split>_images_png.pkl`` and ``<split>_labels.pkl``, or
            its parent with them in ``tiered-imagenet/`` or ``tieredimagenet/``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        verify: must be ``False``: no official checksums of the pickles are known (the
            authors publish none), so they cannot be verified.
        cache_dir: where the decoded cache goes (in ``<cache_dir>/tieredimagenet/``);
            default ``$ROBUST_META_CACHE``, else ``$XDG_CACHE_HOME/robust_meta``, else
            ``~/.cache/robust_meta``. It takes N·3·84·84 bytes (~9.5 GB for train).
        progress: show a tqdm progress bar while the cache is built.

    Returns:
        `BenchmarkSplit` named ``"tieredimagenet"``, ``layout="png-pickles"``: sorted wnids
        as ``classes``, int64 ``labels``, uint8 (N, 3, 84, 84) RGB ``images``
        memory-mapped from the cache (``images[idx]`` reads only those images, into an
        ordinary tensor; in-place writes stay in memory, never reach the file).

    Raises:
        ValueError: ``verify=True``; an unknown split; a truncated or malformed pickle; a
            different number of images and labels; an image that is not a readable PNG or
            not of the first one's size; a class name that neither ``class_names.txt`` /
            ``synsets.txt`` nor the shipped table maps to one wnid.
        LayoutError: no folder searched holds both pickles of the split.
    """
    if verify:
        raise ValueError(
            "verify=True: no official checksums of the tieredImageNet pickles are known (Ren et al. publish "
            "none), so robust-meta cannot verify them; load with verify=False"
        )
    if split not in BENCHMARK_SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(BENCHMARK_SPLITS)}")
    root = Path(os.path.expanduser(os.fspath(root)))
    folder = _find(root, split)
    images_pkl, labels_pkl = folder / f"{split}_images_png.pkl", folder / f"{split}_labels.pkl"
    name_files = _read_name_files([folder] if folder == root else [folder, root])

    key = _cache_key(images_pkl, labels_pkl)
    cache = (_default_cache_dir() if cache_dir is None else Path(os.path.expanduser(os.fspath(cache_dir))))
    cache = cache / "tieredimagenet"
    u8, side = cache / f"{split}-{key[:32]}.u8", cache / f"{split}-{key[:32]}.json"
    found = _read_cache(u8, side, key)
    if found is None:
        raw, names = _read_labels(labels_pkl)
        _wnids(names, split, name_files)  # an unmappable name fails before the long decode
        cache.mkdir(parents=True, exist_ok=True)
        _build_cache(u8, side, key, images_pkl, raw, names, progress)
        found = _read_cache(u8, side, key)
        if found is None:  # pragma: no cover - the file system lost what was just written
            raise ValueError(f"the tieredImageNet cache {str(u8)!r} could not be read back")
    images, meta = found
    names = [str(n) for n in meta["label_specific_str"]]
    wnids = _wnids(names, split, name_files)
    classes = tuple(sorted(wnids))
    remap = torch.tensor([classes.index(w) for w in wnids], dtype=torch.int64)
    labels = remap[torch.tensor(meta["label_specific"], dtype=torch.int64)]
    return BenchmarkSplit(
        name="tieredimagenet",
        split=split,
        classes=classes,
        labels=labels,
        images=images,
        layout="png-pickles",
        source=str(folder),
    )
