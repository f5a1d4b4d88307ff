"""tieredImageNet from fabricated PNG pickles: every class of every split, 1–2 tiny images each."""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robust_meta.datasets import LayoutError, load_benchmark
from robust_meta.datasets import tieredimagenet as tiered
from robust_meta.datasets.tieredimagenet import load_tieredimagenet, tieredimagenet_classes

SPLITS = ("train", "val", "test")


def _rows(split):
    return [(w, n) for w, s, n in tiered._table() if s == split]


class _Py2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` (SHORT_BINSTRING / BINSTRING), as cPickle did."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _dump(obj, path: Path, style: str) -> None:
    if style == "py2":
        buf = io.BytesIO()
        _Py2Pickler(buf, protocol=2).dump(obj)
        path.write_bytes(buf.getvalue())
    else:
        with path.open("wb") as f:
            pickle.dump(obj, f, protocol=4)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _make_split(folder: Path, split: str, *, style: str = "py2", names=None, seed: int = 0, bytes_keys=False,
                as_array=False):
    """Write the split's two pickles; returns (pixels NHWC, wnid of every image)."""
    rng = np.random.default_rng(seed)
    rows = _rows(split)
    order = rng.permutation(len(rows))  # label_specific_str in listdir order, not sorted
    wnids = [rows[i][0] for i in order]
    strs = names if names is not None else [rows[i][1] for i in order]
    label_specific = []
    for c in range(len(wnids)):
        label_specific += [c] * (2 if c < 3 else 1)
    label_specific = np.array(label_specific, dtype=np.int32)
    pixels = rng.integers(0, 256, size=(len(label_specific), 84, 84, 3), dtype=np.uint8)
    pngs = [_png(p) for p in pixels]
    if style == "py2":  # Python 2 str: bytes; its text too
        pngs_obj: object = pngs
        strs = [s.encode() for s in strs]
        keys = [b"label_specific", b"label_general", b"label_specific_str", b"label_general_str"]
    else:
        pngs_obj = pngs
        keys = [k.encode() if bytes_keys else k
                for k in ("label_specific", "label_general", "label_specific_str", "label_general_str")]
    if as_array:
        arr = np.empty(len(pngs), dtype=object)
        arr[:] = pngs
        pngs_obj = arr
    folder.mkdir(parents=True, exist_ok=True)
    _dump(pngs_obj, folder / f"{split}_images_png.pkl", style)
    general = [b"general"] if style == "py2" else ["general"]
    labels = dict(zip(keys, [label_specific, np.zeros_like(label_specific), strs, general]))
    _dump(labels, folder / f"{split}_labels.pkl", style)
    return pixels, [wnids[c] for c in label_specific]


def _check(data, split, pixels, wnids):
    assert data.name == "tieredimagenet" and data.split == split and data.layout == "png-pickles"
    assert data.classes == tieredimagenet_classes(split)
    assert len(data.classes) == tiered.TIERED_SPLIT_SIZES[split]
    assert data.images.shape == (len(pixels), 3, 84, 84) and data.images.dtype == torch.uint8
    assert torch.equal(data.images, torch.from_numpy(pixels).permute(0, 3, 1, 2))  # lossless round trip
    assert [data.classes[i] for i in data.labels.tolist()] == wnids


@pytest.fixture(scope="module")
def py2_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiered-py2")
    made = {s: _make_split(root, s, style="py2", seed=i) for i, s in enumerate(SPLITS)}
    return root, made


def test_table_has_the_608_classes():
    rows = tiered._table()
    assert len(rows) == 608 and len({w for w, _, _ in rows}) == 608
    assert {s: len(tieredimagenet_classes(s)) for s in SPLITS} == {"train": 351, "val": 97, "test": 160}
    assert all(w.startswith("n") and len(w) == 9 and n for w, _, n in rows)


def test_python2_pickles_every_split(py2_root, tmp_path):
    root, made = py2_root
    for split in SPLITS:
        data = load_tieredimagenet(root, split, cache_dir=tmp_path, progress=False)
        _check(data, split, *made[split])
        assert data.source == str(root)


def test_python3_pickles_bytes_keys_object_array_and_load_benchmark(tmp_path):
    root = tmp_path / "data"
    pixels, wnids = _make_split(root / "tiered-imagenet", "val", style="py3", bytes_keys=True, as_array=True)
    data = load_benchmark("tieredimagenet", root, "val", cache_dir=tmp_path / "c", progress=False)
    _check(data, "val", pixels, wnids)
    assert data.source == str(root / "tiered-imagenet")
    pixels, wnids = _make_split(tmp_path / "d2" / "tieredimagenet", "test", style="py3", seed=3)
    _check(load_benchmark("tieredImageNet", tmp_path / "d2", "test", cache_dir=tmp_path / "c", progress=False),
           "test", pixels, wnids)


def test_cv2_buffers_are_read(tmp_path):
    """The original script pickled cv2.imencode's (L, 1) uint8 arrays."""
    pixels, wnids = _make_split(tmp_path, "val", style="py3")
    pngs = pickle.loads((tmp_path / "val_images_png.pkl").read_bytes())
    _dump([np.frombuffer(p, np.uint8).reshape(-1, 1) for p in pngs], tmp_path / "val_images_png.pkl", "py2")
    _check(load_tieredimagenet(tmp_path, "val", cache_dir=tmp_path / "c", progress=False), "val", pixels, wnids)


def test_names_through_synsets_and_class_names(tmp_path):
    rows = _rows("val")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(rows))  # what _make_split's seed 0 draws
    names = [f"custom class {i}" for i in range(len(rows))]
    pixels, wnids = _make_split(tmp_path, "val", style="py2", names=names, seed=0)
    with pytest.raises(ValueError, match="custom class .*synsets.txt"):
        load_tieredimagenet(tmp_path, "val", cache_dir=tmp_path / "c", progress=False)
    assert not list((tmp_path / "c").rglob("*.u8"))  # failed before decoding
    (tmp_path / "class_names.txt").write_text("\n".join(["tench, Tinca tinca", *names]) + "\n")
    (tmp_path / "synsets.txt").write_text("\n".join(["n01440764", *[rows[i][0] for i in order]]) + "\n")
    _check(load_tieredimagenet(tmp_path, "val", cache_dir=tmp_path / "c", progress=False), "val", pixels, wnids)


def test_names_through_the_table_variants(tmp_path):
    rows = _rows("val")
    order = np.random.default_rng(0).permutation(len(rows))
    names = []
    for k, i in enumerate(order):
        full = rows[i][1]
        first = full.split(",")[0]
        names.append([full, full.upper(), first, first.replace(" ", "_"), f"  {first.lower()} "][k % 5])
    pixels, wnids = _make_split(tmp_path, "val", style="py3", names=names, seed=0)
    _check(load_tieredimagenet(tmp_path, "val", cache_dir=tmp_path / "c", progress=False), "val", pixels, wnids)


def test_unknown_and_ambiguous_names(tmp_path, monkeypatch):
    rows = _rows("test")
    order = np.random.default_rng(0).permutation(len(rows))
    names = [rows[i][1] for i in order]
    names[5] = "no such class"
    _make_split(tmp_path, "test", style="py3", names=names, seed=0)
    with pytest.raises(ValueError, match="'no such class'.*class_names.txt"):
        load_tieredimagenet(tmp_path, "test", cache_dir=tmp_path / "c", progress=False)
    table = tiered._table()
    first = table[0]
    twin = ("n99999999", first[1], first[2].split(",")[0] + ", something else")
    monkeypatch.setattr(tiered, "_table", lambda: (*table, twin))
    monkeypatch.setattr(tiered, "_table_index", functools.lru_cache(maxsize=1)(tiered._table_index.__wrapped__))
    names[5] = first[2].split(",")[0]
    _make_split(tmp_path, "test", style="py3", names=names, seed=0)
    with pytest.raises(ValueError, match="ambiguous"):
        load_tieredimagenet(tmp_path, "test", cache_dir=tmp_path / "c", progress=False)


def test_truncated_pickles_and_count_mismatch(tmp_path):
    _make_split(tmp_path, "val", style="py2")
    img = tmp_path / "val_images_png.pkl"
    good = img.read_bytes()
    img.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_tieredimagenet(tmp_path, "val", cache_dir=tmp_path / "c", progress=False)
    assert not list((tmp_path / "c").rglob("*.json"))
    img.write_bytes(good)
    lab = tmp_path / "val_labels.pkl"
    lab_good = lab.read_bytes()
    lab.write_bytes(lab_good[:-20])
    with pytest.raises(ValueError, match="truncated"):
        load_tieredimagenet(tmp_path, "val", cache_dir=tmp_path / "c", progress=False)
    lab.write_bytes(lab_good)
    pngs = pickle.loads(good, encoding="latin1")
    _dump([p.encode("latin1") for p in pngs[:-1]], img, "py2")
    with pytest.raises(ValueError, match="images but the labels pickle"):
        load_tieredimagenet(tmp_path, "val", cache_dir=tmp_path / "c", progress=False)


def test_verify_layout_and_split_errors(tmp_path):
    with pytest.raises(ValueError, match="no official checksums"):
        load_tieredimagenet(tmp_path, "train", verify=True, cache_dir=tmp_path)
    with pytest.raises(LayoutError, match="train_images_png.pkl"):
        load_tieredimagenet(tmp_path, "train", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown split"):
        load_tieredimagenet(tmp_path, "trainval", cache_dir=tmp_path)


def test_second_load_uses_the_cache_memory_mapped(py2_root, tmp_path, monkeypatch):
    root, made = py2_root
    first = load_tieredimagenet(root, "test", cache_dir=tmp_path, progress=True)
    files = sorted(p.name for p in (tmp_path / "tieredimagenet").iterdir())
    assert len(files) == 2 and files[0].startswith("test-") and files[0].endswith(".json")

    def boom(data):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(tiered, "_decode_png", boom)
    monkeypatch.setattr(tiered, "read_pickle", boom)  # not even the pickles are unpickled
    again = load_tieredimagenet(root, "test", cache_dir=tmp_path, progress=False)
    _check(again, "test", *made["test"])
    assert torch.equal(again.labels, first.labels)
    assert again.images.is_shared()  # file-backed mapping, not a heap copy
    u8 = next((tmp_path / "tieredimagenet").glob("*.u8"))
    assert u8.stat().st_size == again.images.numel()
    idx = torch.tensor([5, 0, 5, len(again) - 1])
    picked = again.images[idx]
    assert not picked.is_shared() and picked.shape == (4, 3, 84, 84)
    assert torch.equal(picked, torch.from_numpy(made["test"][0][idx.numpy()]).permute(0, 3, 1, 2))
    picked += 1  # an ordinary copy: the cache is untouched
    assert torch.equal(again.images[idx[:1]], torch.from_numpy(made["test"][0][5:6]).permute(0, 3, 1, 2))


def test_interrupted_build_is_not_trusted(py2_root, tmp_path, monkeypatch):
    root, made = py2_root
    real = tiered._decode_png
    calls = {"n": 0}

    def interrupt(data):
        calls["n"] += 1
        if calls["n"] > 40:
            raise KeyboardInterrupt
        return real(data)

    monkeypatch.setattr(tiered, "_decode_png", interrupt)
    with pytest.raises(KeyboardInterrupt):
        load_tieredimagenet(root, "val", cache_dir=tmp_path, progress=False)
    assert list((tmp_path / "tieredimagenet").iterdir()) == []  # no pixels, no sidecar, no temp file
    monkeypatch.setattr(tiered, "_decode_png", real)
    _check(load_tieredimagenet(root, "val", cache_dir=tmp_path, progress=False), "val", *made["val"])


def test_pixels_without_sidecar_are_rebuilt(py2_root, tmp_path, monkeypatch):
    """A stop between the two renames leaves pixels and no sidecar: rebuilt, not trusted."""
    root, made = py2_root
    load_tieredimagenet(root, "val", cache_dir=tmp_path, progress=False)
    side = next((tmp_path / "tieredimagenet").glob("*.json"))
    u8 = side.with_suffix(".u8")
    side.unlink()
    u8.write_bytes(b"\0" * u8.stat().st_size)
    _check(load_tieredimagenet(root, "val", cache_dir=tmp_path, progress=False), "val", *made["val"])


@pytest.mark.parametrize("damage", ["truncate", "sidecar", "pixels", "sidecar-json"])
def test_corrupt_cache_is_rebuilt_with_a_warning(py2_root, tmp_path, damage):
    root, made = py2_root
    load_tieredimagenet(root, "val", cache_dir=tmp_path, progress=False)
    side = next((tmp_path / "tieredimagenet").glob("*.json"))
    u8 = side.with_suffix(".u8")
    if damage == "truncate":
        u8.write_bytes(u8.read_bytes()[:-100])
    elif damage == "pixels":
        raw = bytearray(u8.read_bytes())
        raw[10] ^= 0xFF  # image 0 is always sampled
        u8.write_bytes(bytes(raw))
    elif damage == "sidecar":
        meta = json.loads(side.read_text())
        meta["label_specific"][0] = 1 - meta["label_specific"][0]
        side.write_text(json.dumps(meta))
    else:
        side.write_text(side.read_text()[:50])
    with pytest.warns(RuntimeWarning, match="corrupt tieredImageNet cache"):
        data = load_tieredimagenet(root, "val", cache_dir=tmp_path, progress=False)
    _check(data, "val", *made["val"])


def test_stale_temporaries_of_a_killed_build_are_removed(py2_root, tmp_path):
    root, made = py2_root
    load_tieredimagenet(root, "val", cache_dir=tmp_path, progress=False)
    folder = tmp_path / "tieredimagenet"
    u8 = next(folder.glob("*.u8"))
    next(folder.glob("*.json")).unlink()
    old, fresh = folder / f".{u8.name}.old.tmp", folder / f".{u8.name}.fresh.tmp"
    old.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(old, (1, 1))
    _check(load_tieredimagenet(root, "val", cache_dir=tmp_path, progress=False), "val", *made["val"])
    assert not old.exists() and fresh.exists()  # a fresh one may be another process's build
