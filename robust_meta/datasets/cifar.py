"""CIFAR-FS and FC100: few-shot splits of CIFAR-100, from the files researchers have.

* **CIFAR-FS** (Bertinetto et al. 2019): the 100 fine classes split 64 / 16 / 20.
* **FC100** (Oreshkin et al. 2018): the 20 superclasses split 12 / 4 / 4; a split's classes
  are the 5 fine classes of each of its superclasses (60 / 20 / 20), so no superclass is
  shared between meta-train and meta-test.

The class splits ship with robust-meta (``robust_meta/datasets/assets/``, taken from
torchmeta's assets, which follow the papers): ``cifar-fs.json`` (fine names per split),
``fc100.json`` (superclass names per split) and ``cifar100.json`` (the CIFAR-100 ``fine``
label names in id order, the ``coarse`` names and ``fine_to_coarse``).

Layouts read, detected from the file names (first match wins, in this order):

| layout | files |
|---|---|
| ``"cifar-100-python"`` | the official archive ``cifar-100-python.tar.gz`` (``root`` may be the file itself; its members are read without extracting) or its extracted folder ``cifar-100-python/{train,test,meta}`` (``root`` may be that folder, under any name) |
| ``"metaoptnet"`` | MetaOptNet's ``CIFAR_FS_{train,val,test}.pickle`` / ``FC100_{train,val,test}.pickle`` (Python 2 pickles: ``data`` uint8 N×32×32×3, ``labels`` CIFAR-100 fine ids) |

When ``root`` holds neither, its immediate sub-folders are tried in sorted order. From the
archive a class's 600 images pool the ``train`` file's 500 and the ``test`` file's 100 (train
images first, each in file order). Every layout returns the images grouped by class (sorted
fine names), in file order within a class.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import json
import os
import pickle
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._benchmark import (
    BENCHMARK_SPLITS,
    BenchmarkSplit,
    LayoutError,
    _as_uint8_nchw,
    layout_error,
    read_pickle,
    str_keys,
)

__all__ = ["CIFAR_LAYOUTS", "cifar100_names", "cifar_fs_classes", "fc100_classes", "load_cifar_fs", "load_fc100"]

#: The layouts `load_cifar_fs` / `load_fc100` read, in the order they are tried.
CIFAR_LAYOUTS = ("cifar-100-python", "metaoptnet")

_ASSETS = Path(__file__).resolve().parent / "assets"
_ARCHIVE = "cifar-100-python.tar.gz"
_FOLDER = "cifar-100-python"
_MEMBERS = ("train", "test", "meta")
# The MD5 sums torchvision verifies (torchvision.datasets.CIFAR100): the archive and its files.
_MD5 = {
    _ARCHIVE: "eb9058c3a382ffc7106e4002c42a8d85",
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
_METAOPTNET_PREFIX = {"cifar-fs": "CIFAR_FS", "fc100": "FC100"}
_NAMES = {"cifar-fs": "CIFAR-FS", "fc100": "FC100"}


# --------------------------------------------------------------------------- the shipped splits


@functools.cache
def _asset(name: str) -> dict[str, Any]:
    with open(_ASSETS / name, encoding="utf-8") as f:
        return json.load(f)


def cifar100_names() -> dict[str, Any]:
    """The CIFAR-100 label names: ``{"fine": [100, id order], "coarse": [20], "fine_to_coarse": {...}}``."""
    blob = _asset("cifar100.json")
    return {"fine": list(blob["fine"]), "coarse": list(blob["coarse"]), "fine_to_coarse": dict(blob["fine_to_coarse"])}


def cifar_fs_classes(split: str) -> tuple[str, ...]:
    """The sorted CIFAR-100 fine names of a CIFAR-FS split (64 / 16 / 20)."""
    _check_split(split)
    return tuple(sorted(_asset("cifar-fs.json")[split]))


def fc100_classes(split: str) -> tuple[str, ...]:
    """The sorted CIFAR-100 fine names of an FC100 split: 5 per superclass (60 / 20 / 20)."""
    _check_split(split)
    supers = set(_asset("fc100.json")[split])
    mapping = _asset("cifar100.json")["fine_to_coarse"]
    return tuple(sorted(f for f, c in mapping.items() if c in supers))


def _check_split(split: str) -> None:
    if split not in BENCHMARK_SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(BENCHMARK_SPLITS)}")


# --------------------------------------------------------------------------- detection


def _expected(name: str) -> list[tuple[str, str]]:
    prefix = _METAOPTNET_PREFIX[name]
    return [
        ("cifar-100-python", f"{_ARCHIVE}, or the folder {_FOLDER}/ holding {', '.join(_MEMBERS)}"),
        ("metaoptnet", f"{prefix}_{{train,val,test}}.pickle"),
    ]


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar"))


def _is_extracted(folder: Path) -> bool:
    return all((folder / m).is_file() for m in _MEMBERS)


def _find_in(folder: Path, name: str, split: str) -> tuple[str, Path] | None:
    """(layout, path) found directly in ``folder``, or None."""
    if (folder / _FOLDER).is_dir() and _is_extracted(folder / _FOLDER):
        return "cifar-100-python", folder / _FOLDER
    if _is_extracted(folder):  # the extracted folder itself, whatever its name
        return "cifar-100-python", folder
    if (folder / _ARCHIVE).is_file():
        return "cifar-100-python", folder / _ARCHIVE
    prefix = _METAOPTNET_PREFIX[name]
    present = [s for s in BENCHMARK_SPLITS if (folder / f"{prefix}_{s}.pickle").is_file()]
    if present:
        path = folder / f"{prefix}_{split}.pickle"
        if not path.is_file():
            raise LayoutError(f"{str(folder)!r} holds {_NAMES[name]} in the metaoptnet layout but not its {split} "
                              f"split: {path.name!r} missing")
        return "metaoptnet", path
    return None


def _detect(root: Path, name: str, split: str) -> tuple[str, Path]:
    if root.is_file():
        if _is_archive(root):
            return "cifar-100-python", root
        if root.name.startswith(_METAOPTNET_PREFIX[name] + "_") and root.suffix == ".pickle":
            root = root.parent  # a MetaOptNet pickle stands for its folder: read the asked split
        else:
            raise layout_error(_NAMES[name], root, _expected(name))
    found = _find_in(root, name, split)
    if found is None:
        try:
            subs = sorted(p for p in root.iterdir() if p.is_dir())
        except OSError:
            subs = []
        for sub in subs:
            found = _find_in(sub, name, split)
            if found is not None:
                break
    if found is None:
        raise layout_error(_NAMES[name], root, _expected(name))
    return found


# --------------------------------------------------------------------------- readers


def _loads(data: bytes, what: str) -> Any:
    try:
        return pickle.loads(data, encoding="latin1")
    except (EOFError, pickle.UnpicklingError, ValueError, IndexError, KeyError, AttributeError,
            ModuleNotFoundError, TypeError) as err:
        raise ValueError(f"{what} is truncated or not a CIFAR-100 pickle ({type(err).__name__}: {err})") from err


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _md5_file(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _read_members(path: Path, verify: bool) -> dict[str, bytes]:
    """The bytes of ``train``, ``test``, ``meta`` from the archive or the extracted folder."""
    if path.is_dir():
        out = {m: (path / m).read_bytes() for m in _MEMBERS}
        if verify:
            for m, data in out.items():
                if _md5(data) != _MD5[m]:
                    raise ValueError(f"MD5 mismatch for {str(path / m)!r}: expected {_MD5[m]}, got {_md5(data)} "
                                     "(not the official CIFAR-100 file)")
        return out
    if verify:
        got = _md5_file(path)
        if got != _MD5[_ARCHIVE]:
            raise ValueError(f"MD5 mismatch for {str(path)!r}: expected {_MD5[_ARCHIVE]}, got {got} "
                             "(not the official cifar-100-python.tar.gz)")
    out: dict[str, bytes] = {}
    try:
        with open(path, "rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
        with contextlib.ExitStack() as stack:
            gz = stack.enter_context(gzip.open(path, "rb")) if gzipped else None
            tar = stack.enter_context(tarfile.open(fileobj=gz, mode="r:") if gz else tarfile.open(path, "r:*"))
            for info in tar:  # every member, to the end: a cut archive must not pass unnoticed
                base = info.name.rstrip("/").rsplit("/", 1)[-1]
                if info.isfile() and base in _MEMBERS and base not in out:
                    fh = tar.extractfile(info)
                    data = fh.read() if fh is not None else b""
                    if len(data) != info.size:
                        raise EOFError(f"member {info.name!r} is cut short")
                    out[base] = data
            if gz is not None:  # the rest of the stream, to its CRC and length trailer
                while gz.read(1 << 20):
                    pass
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise ValueError(f"{str(path)!r} is truncated or not a tar archive ({type(err).__name__}: {err})") from err
    missing = [m for m in _MEMBERS if m not in out]
    if missing:
        raise ValueError(f"{str(path)!r} has no member {', '.join(missing)} (expected {_FOLDER}/{{train,test,meta}})")
    return out


def _names(values: Any, what: str) -> list[str]:
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{what} must be a list of names")
    return [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in values]


def _part(blob: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    d = str_keys(blob)
    if "data" not in d or "fine_labels" not in d:
        raise ValueError(f"{what} is not a CIFAR-100 file: expected keys 'data' and 'fine_labels', got {sorted(d)}")
    data = np.asarray(d["data"])
    labels = np.asarray(d["fine_labels"], dtype=np.int64).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{what}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if len(labels) != len(data):
        raise ValueError(f"{what}: {len(data)} images but {len(labels)} fine labels")
    return data.reshape(-1, 3, 32, 32), labels


def _read_archive(path: Path, name: str, split: str, classes: Sequence[str], verify: bool) -> BenchmarkSplit:
    members = _read_members(path, verify)
    meta = str_keys(_loads(members["meta"], f"{str(path)!r} (meta)"))
    if "fine_label_names" not in meta:
        raise ValueError(f"{str(path)!r}: meta has no fine_label_names")
    fine = _names(meta["fine_label_names"], f"{str(path)!r}: fine_label_names")
    missing = sorted(set(classes) - set(fine))
    if missing:
        raise ValueError(f"{str(path)!r}: meta lacks the {_NAMES[name]} classes {missing[:5]}")
    # train file first, then test: per class, its train images then its test images
    xs, ys = zip(*(_part(_loads(members[m], f"{str(path)!r} ({m})"), f"{str(path)!r} ({m})") for m in ("train", "test")))
    images = np.concatenate(xs)
    ids = np.concatenate(ys)
    if len(ids) and (ids.min() < 0 or ids.max() >= len(fine)):
        raise ValueError(f"{str(path)!r}: fine labels outside [0, {len(fine)})")
    wanted = {fine.index(c): i for i, c in enumerate(classes)}
    lut = np.full(len(fine), -1, dtype=np.int64)
    for fid, i in wanted.items():
        lut[fid] = i
    labels = lut[ids]
    keep = np.nonzero(labels >= 0)[0]
    return _finish(name, split, classes, images[keep], labels[keep], "cifar-100-python", path, nchw=True)


def _read_metaoptnet(path: Path, name: str, split: str, classes: Sequence[str]) -> BenchmarkSplit:
    blob = str_keys(read_pickle(path))
    if "data" not in blob or "labels" not in blob:
        raise ValueError(f"{str(path)!r} is not a MetaOptNet pickle: expected keys 'data' and 'labels', got {sorted(blob)}")
    images = np.asarray(blob["data"])
    ids = np.asarray(blob["labels"], dtype=np.int64).reshape(-1)
    if len(ids) != len(images):
        raise ValueError(f"{str(path)!r}: {len(images)} images but {len(ids)} labels")
    fine = _asset("cifar100.json")["fine"]
    if len(ids) and (ids.min() < 0 or ids.max() >= len(fine)):
        raise ValueError(f"{str(path)!r}: labels must be CIFAR-100 fine ids in [0, 100)")
    index = {c: i for i, c in enumerate(classes)}
    extra = sorted({fine[i] for i in ids.tolist()} - set(classes))
    if extra:
        raise ValueError(f"{str(path)!r} holds classes {extra[:5]} that are not in the {_NAMES[name]} {split} split")
    lut = np.array([index.get(f, -1) for f in fine], dtype=np.int64)
    return _finish(name, split, classes, images, lut[ids], "metaoptnet", path, nchw=False)


def _finish(name: str, split: str, classes: Sequence[str], images: np.ndarray, labels: np.ndarray, layout: str,
            path: Path, *, nchw: bool) -> BenchmarkSplit:
    what = f"{str(path)!r}"
    present = set(labels.tolist())
    absent = [c for i, c in enumerate(classes) if i not in present]
    if absent:
        raise ValueError(f"{what} has no image of the {_NAMES[name]} {split} classes {absent[:5]} "
                         f"({len(absent)} of {len(classes)} missing)")
    order = np.argsort(labels, kind="stable")
    if np.array_equal(order, np.arange(len(order))):  # already grouped: no copy
        order = slice(None)
    x = torch.from_numpy(np.ascontiguousarray(images[order])) if nchw else _as_uint8_nchw(images[order], what)
    if x.dtype != torch.uint8 or tuple(x.shape[1:]) != (3, 32, 32):
        raise ValueError(f"{what}: expected uint8 32×32 RGB images, got {x.dtype} (C, H, W) = {tuple(x.shape[1:])}")
    return BenchmarkSplit(name, split, tuple(classes), torch.from_numpy(labels[order].copy()), x.contiguous(), layout,
                          str(path))


def _load(name: str, root: str | os.PathLike, split: str, verify: bool) -> BenchmarkSplit:
    _check_split(split)
    root = Path(os.path.expanduser(os.fspath(root)))
    if not root.exists():
        raise LayoutError(f"{_NAMES[name]} folder {str(root)!r} does not exist")
    classes = cifar_fs_classes(split) if name == "cifar-fs" else fc100_classes(split)
    layout, path = _detect(root, name, split)
    if layout == "cifar-100-python":
        return _read_archive(path, name, split, classes, verify)
    if verify:
        raise ValueError(f"no official checksum is known for the {layout} layout of {_NAMES[name]} ({str(path)!r}); "
                         "load it with verify=False")
    return _read_metaoptnet(path, name, split, classes)


def load_cifar_fs(
    root: str | os.PathLike,
    split: str,
    *,
    verify: bool = False,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> BenchmarkSplit:
    """One meta-split of CIFAR-FS (Bertinetto et al. 2019): 64 / 16 / 20 CIFAR-100 fine classes.

    Args:
        root: the folder holding the files (see the module docstring), the
            ``cifar-100-python.tar.gz`` archive itself, or the extracted ``cifar-100-python/``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        verify: check the archive (or the extracted ``train``/``test``/``meta``) against the MD5
            sums torchvision verifies; ``ValueError`` on a mismatch. No official checksum is
            known for the MetaOptNet pickles: ``verify=True`` raises ``ValueError`` there.
        cache_dir: unused (CIFAR is read directly); accepted for `load_benchmark`.
        progress: unused; accepted for `load_benchmark`.

    Returns:
        `BenchmarkSplit` named ``"cifar-fs"``: ``classes`` the split's sorted CIFAR-100 fine names (64 / 16 / 20), ``labels`` index into
        them, ``images`` uint8 (N, 3, 32, 32) grouped by class (train-file images first, then
        test-file images, within a class), ``layout`` ``"cifar-100-python"`` or ``"metaoptnet"``.

    Raises:
        ValueError: unknown split; a truncated or malformed archive or pickle; a file lacking
            a class of the split (or, for MetaOptNet, holding one of another split); a
            checksum mismatch, or ``verify=True`` on the MetaOptNet layout.
        LayoutError: ``root`` holds no layout (the message names the files each expects), or
            MetaOptNet pickles without the asked split.
    """
    return _load("cifar-fs", root, split, verify)


def load_fc100(
    root: str | os.PathLike,
    split: str,
    *,
    verify: bool = False,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> BenchmarkSplit:
    """One meta-split of FC100 (Oreshkin et al. 2018): superclasses split 12 / 4 / 4.

    Args:
        root: the folder holding the files (see the module docstring), the
            ``cifar-100-python.tar.gz`` archive itself, or the extracted ``cifar-100-python/``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        verify: check the archive (or the extracted ``train``/``test``/``meta``) against the MD5
            sums torchvision verifies; ``ValueError`` on a mismatch. No official checksum is
            known for the MetaOptNet pickles: ``verify=True`` raises ``ValueError`` there.
        cache_dir: unused (CIFAR is read directly); accepted for `load_benchmark`.
        progress: unused; accepted for `load_benchmark`.

    Returns:
        `BenchmarkSplit` named ``"fc100"``: ``classes`` the sorted CIFAR-100 fine names of the split's superclasses,
        5 each (60 / 20 / 20), ``labels`` index into
        them, ``images`` uint8 (N, 3, 32, 32) grouped by class (train-file images first, then
        test-file images, within a class), ``layout`` ``"cifar-100-python"`` or ``"metaoptnet"``.

    Raises:
        ValueError: unknown split; a truncated or malformed archive or pickle; a file lacking
            a class of the split (or, for MetaOptNet, holding one of another split); a
            checksum mismatch, or ``verify=True`` on the MetaOptNet layout.
        LayoutError: ``root`` holds no layout (the message names the files each expects), or
            MetaOptNet pickles without the asked split.
    """
    return _load("fc100", root, split, verify)

