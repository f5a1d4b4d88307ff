"""MiniImageNet (Vinyals et al. 2016, Ravi & Larochelle 2017 split) from the files researchers have.

`load_miniimagenet` reads any of the four layouts the community passes around, detected from
the file names (first match wins, in this order):

| layout | files (in ``root``) |
|---|---|
| ``"pickle-cache"`` | ``mini-imagenet-cache-{train,validation,test}.pkl`` (learn2learn, torchmeta's download): a dict with ``image_data`` (uint8 N×84×84×3) and ``class_dict`` (wnid → image indices) |
| ``"metaoptnet"`` | ``miniImageNet_category_split_{train_phase_train,val,test}.pickle`` (MetaOptNet, adversarial querying; Python 2 pickles): ``data`` (uint8 N×84×84×3), ``labels`` (ints), ``catname2label`` (wnid → int) |
| ``"torchmeta"`` | torchmeta's processed ``{train,val,test}_data.hdf5`` (group ``datasets``: one uint8 N×84×84×3 dataset per wnid) + ``{train,val,test}_labels.json`` (the wnids) |
| ``"csv-images"`` | Ravi & Larochelle's ``images/*.jpg`` + ``{train,val,test}.csv`` (header ``filename,label``, label = wnid); images of any size are converted to RGB and resized to 84×84 with Pillow's LANCZOS filter, then cached |

``root`` may hold the files itself, or be a parent folder: when ``root`` has none of them, its
immediate sub-folders are tried in sorted order (so torchmeta's root, which holds
``miniimagenet/``, works as well as ``miniimagenet/`` itself). A file as ``root`` stands for
its folder.

Every layout returns the images grouped by class (classes = sorted wnids), in file order
within a class.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_write
from ._benchmark import (
    BENCHMARK_SPLITS,
    BenchmarkSplit,
    LayoutError,
    _as_uint8_nchw,
    layout_error,
    read_pickle,
    str_keys,
)

__all__ = ["MINIIMAGENET_LAYOUTS", "load_miniimagenet"]

#: The layouts `load_miniimagenet` reads, in the order they are tried.
MINIIMAGENET_LAYOUTS = ("pickle-cache", "metaoptnet", "torchmeta", "csv-images")

IMAGE_SIZE = 84
_CACHE_FORMAT = 1

# the file(s) each layout needs for one split
_PICKLE_CACHE = {"train": "mini-imagenet-cache-train.pkl", "val": "mini-imagenet-cache-validation.pkl",
                 "test": "mini-imagenet-cache-test.pkl"}
# only train_phase_train is meta-train: train_phase_val / train_phase_test hold *other images of
# the 64 meta-train classes* (for pre-training a classifier), not part of the meta-split.
_METAOPTNET = {"train": "miniImageNet_category_split_train_phase_train.pickle",
               "val": "miniImageNet_category_split_val.pickle",
               "test": "miniImageNet_category_split_test.pickle"}

_EXPECTED = [
    ("pickle-cache", "mini-imagenet-cache-{train,validation,test}.pkl"),
    ("metaoptnet", "miniImageNet_category_split_{train_phase_train,val,test}.pickle"),
    ("torchmeta", "{train,val,test}_data.hdf5 + {train,val,test}_labels.json (e.g. in miniimagenet/)"),
    ("csv-images", "images/*.jpg + {train,val,test}.csv (header filename,label)"),
]


def _split_files(layout: str, folder: Path, split: str) -> list[Path]:
    """The files ``layout`` needs for ``split`` in ``folder``."""
    if layout == "pickle-cache":
        return [folder / _PICKLE_CACHE[split]]
    if layout == "metaoptnet":
        return [folder / _METAOPTNET[split]]
    if layout == "torchmeta":
        return [folder / f"{split}_data.hdf5", folder / f"{split}_labels.json"]
    return [folder / f"{split}.csv", folder / "images"]


def _has_layout(layout: str, folder: Path) -> bool:
    """Whether ``folder`` holds any split of ``layout`` (all its files for that split)."""
    return any(all(p.exists() for p in _split_files(layout, folder, s)) for s in BENCHMARK_SPLITS)


def _detect(root: Path, split: str) -> tuple[str, Path]:
    """(layout, folder) of the first layout found in ``root`` or, failing that, a sub-folder."""
    folder = root.parent if root.is_file() else root
    candidates = [folder]
    if not any(_has_layout(lay, folder) for lay in MINIIMAGENET_LAYOUTS):
        try:
            candidates = sorted(p for p in folder.iterdir() if p.is_dir())
        except OSError:
            candidates = []
    for cand in candidates:
        present = [lay for lay in MINIIMAGENET_LAYOUTS if _has_layout(lay, cand)]
        for layout in present:
            if all(p.exists() for p in _split_files(layout, cand, split)):
                return layout, cand
        if present:
            missing = [p for p in _split_files(present[0], cand, split) if not p.exists()]
            raise LayoutError(
                f"{str(cand)!r} holds MiniImageNet in the {present[0]} layout but not its {split} split: "
                f"{', '.join(repr(p.name) for p in missing)} missing"
            )
    raise layout_error("MiniImageNet", folder, _EXPECTED)


# --------------------------------------------------------------------------- ordering helpers


def _grouped(images: Any, names: Sequence[str], what: str, source: Path, layout: str, split: str) -> BenchmarkSplit:
    """Images (N, H, W, C) with a wnid each → a `BenchmarkSplit` grouped by sorted class, stable."""
    classes = tuple(sorted(set(names)))
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index[n] for n in names], dtype=torch.int64)
    order = np.argsort(labels.numpy(), kind="stable")
    if np.array_equal(order, np.arange(len(order))):  # already grouped: no copy
        order = slice(None)
    else:
        order = torch.from_numpy(order)
    x = _as_uint8_nchw(images, what)
    if tuple(x.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{what}: expected 84×84 RGB images (N, 84, 84, 3), got (N, H, W, C) = "
                         f"{(x.shape[0], x.shape[2], x.shape[3], x.shape[1])}")
    if len(names) != len(x):
        raise ValueError(f"{what}: {len(x)} images but {len(names)} labels")
    return BenchmarkSplit("miniimagenet", split, classes, labels[order].contiguous(), x[order].contiguous(),
                          layout, str(source))


def _decoded(value: Any) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------- pickle layouts


def _read_pickle_cache(path: Path, split: str) -> BenchmarkSplit:
    blob = str_keys(read_pickle(path))
    if "image_data" not in blob or "class_dict" not in blob:
        raise ValueError(f"{str(path)!r} is not a MiniImageNet cache: expected keys 'image_data' and 'class_dict', "
                         f"got {sorted(blob)}")
    images = np.asarray(blob["image_data"])
    n = len(images)
    owner: dict[int, str] = {}
    for wnid, indices in str_keys(blob["class_dict"]).items():
        for i in np.asarray(indices, dtype=np.int64).reshape(-1).tolist():
            if not 0 <= i < n:
                raise ValueError(f"{str(path)!r}: class {wnid!r} lists image {i}, outside [0, {n})")
            if i in owner:
                raise ValueError(f"{str(path)!r}: image {i} is in both class {owner[i]!r} and {wnid!r}")
            owner[i] = wnid
    if len(owner) != n:
        raise ValueError(f"{str(path)!r}: class_dict covers {len(owner)} of the {n} images")
    return _grouped(images, [owner[i] for i in range(n)], str(path), path, "pickle-cache", split)


def _read_metaoptnet(path: Path, split: str) -> BenchmarkSplit:
    blob = str_keys(read_pickle(path))
    if not {"data", "labels", "catname2label"} <= set(blob):
        raise ValueError(f"{str(path)!r} is not a MetaOptNet MiniImageNet pickle: expected keys 'data', 'labels', "
                         f"'catname2label', got {sorted(blob)}")
    images = np.asarray(blob["data"])
    labels = np.asarray(blob["labels"]).reshape(-1)
    if len(labels) != len(images):
        raise ValueError(f"{str(path)!r}: {len(images)} images but {len(labels)} labels")
    names: dict[int, str] = {}
    for wnid, lab in blob["catname2label"].items():
        if int(lab) in names:
            raise ValueError(f"{str(path)!r}: catname2label gives label {int(lab)} to both {names[int(lab)]!r} "
                             f"and {_decoded(wnid)!r}")
        names[int(lab)] = _decoded(wnid)
    unknown = sorted(set(labels.tolist()) - set(names))
    if unknown:
        raise ValueError(f"{str(path)!r}: labels {unknown[:5]} are not in catname2label")
    return _grouped(images, [names[int(v)] for v in labels.tolist()], str(path), path, "metaoptnet", split)


# --------------------------------------------------------------------------- torchmeta


def _read_torchmeta(folder: Path, split: str) -> BenchmarkSplit:
    import h5py

    data_path, labels_path = _split_files("torchmeta", folder, split)
    try:
        wnids = json.loads(labels_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(labels_path)!r} is not a JSON list of class names ({err})") from err
    if not isinstance(wnids, list) or not all(isinstance(w, str) for w in wnids) or len(set(wnids)) != len(wnids):
        raise ValueError(f"{str(labels_path)!r} must hold a list of distinct class names")
    parts, names = [], []
    try:
        with h5py.File(data_path, "r") as f:
            if "datasets" not in f:
                raise ValueError(f"{str(data_path)!r} has no 'datasets' group (not a torchmeta MiniImageNet file)")
            group = f["datasets"]
            missing = [w for w in wnids if w not in group]
            if missing:
                raise ValueError(f"{str(data_path)!r} lacks the classes {missing[:5]} listed in {labels_path.name}")
            for w in sorted(wnids):
                arr = np.asarray(group[w][()])
                parts.append(arr)
                names.extend([w] * len(arr))
    except OSError as err:
        raise ValueError(f"{str(data_path)!r} is truncated or not an HDF5 file ({err})") from err
    if not parts:
        raise ValueError(f"{str(labels_path)!r} lists no class")
    try:
        images = np.concatenate(parts)
    except ValueError as err:
        raise ValueError(f"{str(data_path)!r}: the classes' images differ in shape ({err})") from err
    return _grouped(images, names, str(data_path), folder, "torchmeta", split)


# --------------------------------------------------------------------------- csv + JPEGs


def _default_cache_dir() -> Path:
    base = os.environ.get("ROBUST_META_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "robust_meta"
    )
    return Path(base) / "miniimagenet"


def _read_csv(path: Path) -> list[tuple[str, str]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{str(path)!r} is not a text csv ({err})") from err
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise ValueError(f"{str(path)!r} must start with the header 'filename,label'")
    out = []
    for lineno, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise ValueError(f"{str(path)!r}, row {lineno}: expected 'filename,label', got {row}")
        name = row[0].strip()
        if "/" in name or "\\" in name or name in {".", ".."}:
            raise ValueError(f"{str(path)!r}, row {lineno}: {name!r} is not a file name in images/")
        out.append((name, row[1].strip()))
    if not out:
        raise ValueError(f"{str(path)!r} lists no image")
    return out


def _csv_key(csv_path: Path, images_dir: Path, rows: Sequence[tuple[str, str]]) -> str:
    """SHA-256 of the csv and of every image's name, size and bytes."""
    h = hashlib.sha256()
    h.update(f"format={_CACHE_FORMAT};size={IMAGE_SIZE};resample=lanczos;rgb\n".encode())
    h.update(csv_path.read_bytes())
    for name, _ in rows:
        path = images_dir / name
        try:
            data = path.read_bytes()
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{str(path)!r}, listed in {str(csv_path)!r}, does not exist") from err
        h.update(f"\n{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def _decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG (or any Pillow image) bytes → uint8 (84, 84, 3), RGB, LANCZOS-resized."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        if img.size != (IMAGE_SIZE, IMAGE_SIZE):
            img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
        return np.asarray(img, dtype=np.uint8)


def _progress(iterable: Any, total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a core dependency; be lenient anyway
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="img")


def _decode_csv(images_dir: Path, rows: Sequence[tuple[str, str]], split: str, progress: bool,
                decode: Callable[[bytes], np.ndarray]) -> tuple[torch.Tensor, list[str]]:
    out = np.empty((len(rows), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, (name, _) in enumerate(_progress(rows, len(rows), f"MiniImageNet {split}: decoding", progress)):
        path = images_dir / name
        try:
            out[i] = decode(path.read_bytes())
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{str(path)!r} does not exist") from err
        except (OSError, ValueError, SyntaxError) as err:
            raise ValueError(f"{str(path)!r} is not a readable image ({err})") from err
    return torch.from_numpy(out), [label for _, label in rows]


def _digest(images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(memoryview(images.contiguous().numpy()).cast("B"))  # no copy of the split
    h.update(memoryview(labels.contiguous().numpy()).cast("B"))
    h.update("\n".join(classes).encode())
    return h.hexdigest()


def _read_cache(path: Path, key: str) -> dict[str, Any] | None:
    """The cached split, or `None` when absent; a corrupt or stale file is reported and ignored."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(blob, dict) or blob.get("format") != _CACHE_FORMAT or blob.get("key") != key:
            raise ValueError("unexpected contents")
        images, labels, classes = blob["images"], blob["labels"], tuple(blob["classes"])
        if (images.dtype != torch.uint8 or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE)
                or labels.shape != (len(images),) or blob["digest"] != _digest(images, labels, classes)):
            raise ValueError("shapes or checksum do not match")
        return {"images": images, "labels": labels, "classes": classes}
    except Exception as err:  # truncated zip container, unpickling error, bad digest, ...
        warnings.warn(f"MiniImageNet cache {str(path)!r} is corrupt ({err}); rebuilding it", RuntimeWarning,
                      stacklevel=4)
        return None


def _read_csv_images(folder: Path, split: str, cache_dir: str | os.PathLike | None, progress: bool) -> BenchmarkSplit:
    csv_path, images_dir = _split_files("csv-images", folder, split)
    rows = _read_csv(csv_path)
    key = _csv_key(csv_path, images_dir, rows)
    cache_folder = _default_cache_dir() if cache_dir is None else Path(os.path.expanduser(os.fspath(cache_dir)))
    cache_path = cache_folder / f"miniimagenet-{split}-{IMAGE_SIZE}-{key[:24]}.pt"
    payload = _read_cache(cache_path, key)
    if payload is None:
        raw, names = _decode_csv(images_dir, rows, split, progress, _decode_jpeg)
        part = _grouped(raw.numpy(), names, str(csv_path), folder, "csv-images", split)
        payload = {"images": part.images, "labels": part.labels, "classes": part.classes}
        blob = dict(payload, classes=list(part.classes), format=_CACHE_FORMAT, key=key,
                    digest=_digest(part.images, part.labels, part.classes))
        try:
            atomic_write(cache_path, lambda f: torch.save(blob, f))
        except OSError as err:
            warnings.warn(f"could not write the MiniImageNet cache {str(cache_path)!r}: {err}", RuntimeWarning,
                          stacklevel=3)
    return BenchmarkSplit("miniimagenet", split, tuple(payload["classes"]), payload["labels"], payload["images"],
                          "csv-images", str(folder))


# --------------------------------------------------------------------------- entry point


def load_miniimagenet(
    root: str | os.PathLike,
    split: str,
    *,
    verify: bool = False,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> BenchmarkSplit:
    """One meta-split of MiniImageNet (64 / 16 / 20 classes), from any layout of the module table.

    The layout is detected from the file names (see the module docstring; ``root`` or, when it
    has none of the files, its immediate sub-folders). For the MetaOptNet layout only
    ``..._train_phase_train.pickle`` is the meta-train split; ``..._train_phase_val.pickle`` and
    ``..._train_phase_test.pickle`` (held-out images of the 64 meta-train classes, for
    pre-training) are never read, even when present.

    The JPEG layout is decoded once (RGB, resized to 84×84 with Pillow's LANCZOS filter) and
    cached as one tensor file in ``cache_dir``, keyed by the SHA-256 of the split's csv and of
    every listed image's name, size and bytes: a second load decodes nothing (it still reads
    and hashes every image, about 1 s per 10,000 small JPEGs), a changed image is decoded
    again. The cache is written atomically and memory-mapped when read; a corrupt one is
    reported with a `RuntimeWarning` and rebuilt.

    Args:
        root: the folder holding the files (or a parent folder / one of the files, see above).
        split: ``"train"``, ``"val"`` or ``"test"`` (for the pickle cache, ``"val"`` reads
            ``mini-imagenet-cache-validation.pkl``).
        verify: no official checksum is known for any MiniImageNet layout, so ``True`` raises.
        cache_dir: where the decoded JPEG layout is cached; default
            ``$ROBUST_META_CACHE/miniimagenet``, else ``~/.cache/robust_meta/miniimagenet``.
        progress: show a tqdm progress bar while JPEGs are decoded.

    Returns:
        `BenchmarkSplit` named ``"miniimagenet"``: ``classes`` the sorted wnids, ``images``
        uint8 (N, 3, 84, 84) grouped by class (file order within a class), ``layout`` one of
        `MINIIMAGENET_LAYOUTS`.

    Raises:
        ValueError: unknown split; ``verify=True``; a truncated or malformed file (pickle,
            HDF5, csv, JPEG), images that are not 84×84 RGB in the array layouts.
        LayoutError: ``root`` holds none of the layouts (the message names the files each
            expects), or holds a layout without the asked split's files.
        FileNotFoundError: an image listed in a csv is missing.
    """
    if split not in BENCHMARK_SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(BENCHMARK_SPLITS)}")
    root = Path(os.path.expanduser(os.fspath(root)))
    if not root.exists():
        raise LayoutError(f"MiniImageNet folder {str(root)!r} does not exist")
    layout, folder = _detect(root, split)
    if verify:
        raise ValueError(f"no official checksum is known for the {layout} layout of MiniImageNet "
                         f"(found in {str(folder)!r}); load it with verify=False")
    if layout == "pickle-cache":
        return _read_pickle_cache(_split_files(layout, folder, split)[0], split)
    if layout == "metaoptnet":
        return _read_metaoptnet(_split_files(layout, folder, split)[0], split)
    if layout == "torchmeta":
        return _read_torchmeta(folder, split)
    return _read_csv_images(folder, split, cache_dir, progress)

