"""MiniImageNet, CIFAR-FS and FC100 read from fabricated copies of every community layout.

Every fabricated archive holds every class of every split (a few images each): 64 / 16 / 20
synthetic wnids for MiniImageNet, the real CIFAR-100 names (from the shipped asset) for CIFAR.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from robust_meta.datasets import BenchmarkSplit, LayoutError, cifar, load_benchmark, miniimagenet
from robust_meta.datasets.cifar import (
    cifar100_names,
    cifar_fs_classes,
    fc100_classes,
    load_cifar_fs,
    load_fc100,
)
from robust_meta.datasets.miniimagenet import load_miniimagenet

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

SPLITS = ("train", "val", "test")
MINI_COUNTS = {"train": 64, "val": 16, "test": 20}
MINI_WNIDS = {
    "train": [f"n{i:08d}" for i in range(0, 64)],
    "val": [f"n{i:08d}" for i in range(64, 80)],
    "test": [f"n{i:08d}" for i in range(80, 100)],
}
PER_CLASS = 2


# --------------------------------------------------------------------------- Python 2 pickles


class _Py2Str(bytes):
    """Pickled as a Python 2 ``str`` (BINSTRING): plain ``pickle.load`` fails on non-ASCII ones."""


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table is extensible
    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2str(self, obj):
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + bytes(obj))
        self.memoize(obj)

    dispatch[_Py2Str] = _save_py2str

    def reducer_override(self, obj):
        if type(obj) is np.ndarray:  # numpy under Python 2: typecode and raw data are str
            func, args, (version, shape, dtype, fortran, raw) = obj.__reduce__()
            return func, (args[0], args[1], _Py2Str(args[2])), (version, shape, dtype, fortran, _Py2Str(raw))
        return NotImplemented


def _py2(obj):
    if isinstance(obj, str):
        return _Py2Str(obj.encode("latin1"))
    if isinstance(obj, dict):
        return {_py2(k): _py2(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_py2(v) for v in obj]
    return obj


def py2_dumps(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(_py2(obj))
    return buf.getvalue()


def py2_dump(obj, path: Path) -> None:
    path.write_bytes(py2_dumps(obj))


def _interleaved(names_per_class: dict[str, int], rng) -> list[str]:
    """Class names, each repeated, in a shuffled (not grouped) order."""
    names = [c for c, k in names_per_class.items() for _ in range(k)]
    return [names[i] for i in rng.permutation(len(names))]


def _check_grouped(part: BenchmarkSplit, expected: dict[str, np.ndarray]) -> None:
    """Classes sorted, labels grouped, and per class exactly the expected images in order."""
    assert part.classes == tuple(sorted(expected))
    assert torch.all(part.labels[1:] >= part.labels[:-1])
    for i, c in enumerate(part.classes):
        got = part.images[part.labels == i].numpy()
        np.testing.assert_array_equal(got, expected[c])
    assert len(part) == sum(len(v) for v in expected.values())


# --------------------------------------------------------------------------- MiniImageNet fixtures


def _mini_arrays(seed: int = 0):
    """split → (images N×84×84×3 in file order, wnid per image), classes interleaved."""
    rng = np.random.default_rng(seed)
    out = {}
    for split in SPLITS:
        names = _interleaved({w: PER_CLASS for w in MINI_WNIDS[split]}, rng)
        images = rng.integers(0, 256, (len(names), 84, 84, 3), dtype=np.uint8)
        out[split] = (images, names)
    return out


def _expected_mini(images, names):
    return {c: images[[i for i, n in enumerate(names) if n == c]].transpose(0, 3, 1, 2) for c in set(names)}


@pytest.fixture(scope="module")
def mini_data():
    return _mini_arrays()


def _write_pickle_cache(folder: Path, data) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, fname in (("train", "train"), ("val", "validation"), ("test", "test")):
        images, names = data[split]
        class_dict = {}
        for i, n in enumerate(names):
            class_dict.setdefault(n, []).append(i)
        with open(folder / f"mini-imagenet-cache-{fname}.pkl", "wb") as f:
            pickle.dump({"image_data": images, "class_dict": class_dict}, f, protocol=2)


def _write_metaoptnet_mini(folder: Path, data) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ids = {w: i for i, w in enumerate(w for s in SPLITS for w in MINI_WNIDS[s])}
    for split, fname in (("train", "train_phase_train"), ("val", "val"), ("test", "test")):
        images, names = data[split]
        blob = {"data": images, "labels": [ids[n] for n in names],
                "catname2label": {w: ids[w] for w in MINI_WNIDS[split]}}
        py2_dump(blob, folder / f"miniImageNet_category_split_{fname}.pickle")
    # pre-training files of the meta-train classes: never part of meta-train (garbage: reading fails)
    for extra in ("train_phase_val", "train_phase_test"):
        (folder / f"miniImageNet_category_split_{extra}.pickle").write_bytes(b"not read")


def _write_torchmeta(folder: Path, data) -> None:
    import h5py

    folder.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        images, names = data[split]
        with h5py.File(folder / f"{split}_data.hdf5", "w") as f:
            group = f.create_group("datasets")
            for w in MINI_WNIDS[split]:
                group.create_dataset(w, data=images[[i for i, n in enumerate(names) if n == w]])
        (folder / f"{split}_labels.json").write_text(json.dumps(sorted(MINI_WNIDS[split])))


def _block_image(rng, size=(84, 84)) -> np.ndarray:
    """Constant colour with one constant block: JPEG keeps it almost exactly."""
    w, h = size
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = rng.integers(30, 226, 3, dtype=np.uint8)
    img[16:48, 16:48] = rng.integers(30, 226, 3, dtype=np.uint8)
    return img


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


BIG_NAME = "n0000000000000000.jpg"  # the first image of the first train class is full-size


def _write_csv_images(folder: Path, seed: int = 0) -> dict[str, dict[str, list[np.ndarray]]]:
    """Ravi & Larochelle's layout; returns split → wnid → source arrays (in csv order)."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    sources: dict[str, dict[str, list[np.ndarray]]] = {}
    for split in SPLITS:
        rows, sources[split] = ["filename,label"], {}
        counter: dict[str, int] = {}
        for w in _interleaved({w: PER_CLASS for w in MINI_WNIDS[split]}, rng):
            k = counter[w] = counter.get(w, -1) + 1
            fname = f"{w}{k:08d}.jpg"
            if fname == BIG_NAME:
                yy, xx = np.mgrid[0:300, 0:400]
                arr = np.stack([xx * 255 // 400, yy * 255 // 300, (xx + yy) * 255 // 700], -1).astype(np.uint8)
            else:
                arr = _block_image(rng)
            (folder / "images" / fname).write_bytes(_jpeg(arr))
            sources[split].setdefault(w, []).append(arr)
            rows.append(f"{fname},{w}")
        (folder / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return sources


@pytest.fixture(scope="module")
def csv_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini_csv")
    return root, _write_csv_images(root)


# --------------------------------------------------------------------------- MiniImageNet: array layouts


@pytest.mark.parametrize("layout", ["pickle-cache", "metaoptnet", "torchmeta"])
def test_mini_array_layouts_round_trip(tmp_path, mini_data, layout):
    if layout == "pickle-cache":
        _write_pickle_cache(tmp_path, mini_data)
        root = tmp_path
    elif layout == "metaoptnet":
        _write_metaoptnet_mini(tmp_path, mini_data)
        root = tmp_path
    else:
        _write_torchmeta(tmp_path / "miniimagenet", mini_data)
        root = tmp_path  # torchmeta's root: the files are in miniimagenet/
    for split in SPLITS:
        part = load_miniimagenet(root, split, cache_dir=tmp_path / "cache", progress=False)
        assert isinstance(part, BenchmarkSplit)
        assert (part.name, part.split, part.layout) == ("miniimagenet", split, layout)
        assert part.num_classes == MINI_COUNTS[split]
        assert part.classes == tuple(MINI_WNIDS[split])
        assert part.images.shape == (MINI_COUNTS[split] * PER_CLASS, 3, 84, 84)
        assert part.images.dtype == torch.uint8 and part.labels.dtype == torch.int64
        _check_grouped(part, _expected_mini(*mini_data[split]))
    assert not (tmp_path / "cache").exists()  # only the JPEG layout is cached


def test_mini_splits_are_disjoint_and_cover_100(tmp_path, mini_data):
    _write_pickle_cache(tmp_path, mini_data)
    classes = [set(load_miniimagenet(tmp_path, s).classes) for s in SPLITS]
    assert [len(c) for c in classes] == [64, 16, 20]
    assert len(set.union(*classes)) == 100


def test_mini_metaoptnet_ignores_train_phase_val_and_test(tmp_path, mini_data):
    _write_metaoptnet_mini(tmp_path, mini_data)
    # only train_phase_train is meta-train; the (unreadable) pre-training files are never opened
    part = load_miniimagenet(tmp_path, "train")
    _check_grouped(part, _expected_mini(*mini_data["train"]))
    (tmp_path / "miniImageNet_category_split_train_phase_train.pickle").unlink()
    with pytest.raises(LayoutError, match="train_phase_train"):
        load_miniimagenet(tmp_path, "train")


def test_mini_metaoptnet_is_a_python2_pickle(tmp_path, mini_data):
    _write_metaoptnet_mini(tmp_path, mini_data)
    path = tmp_path / "miniImageNet_category_split_val.pickle"
    with open(path, "rb") as f, pytest.raises(UnicodeDecodeError):
        pickle.load(f)  # a Python 2 numpy pickle: only latin1 reads it
    part = load_miniimagenet(tmp_path, "val")
    _check_grouped(part, _expected_mini(*mini_data["val"]))


def test_mini_pickle_cache_maps_val_to_validation(tmp_path, mini_data):
    _write_pickle_cache(tmp_path, mini_data)
    part = load_miniimagenet(tmp_path, "val")
    assert part.source.endswith("mini-imagenet-cache-validation.pkl")
    (tmp_path / "mini-imagenet-cache-validation.pkl").unlink()
    with pytest.raises(LayoutError, match="validation"):
        load_miniimagenet(tmp_path, "val")


def test_mini_file_as_root_and_load_benchmark(tmp_path, mini_data):
    _write_pickle_cache(tmp_path, mini_data)
    part = load_miniimagenet(tmp_path / "mini-imagenet-cache-train.pkl", "test")
    assert part.split == "test" and part.num_classes == 20
    via = load_benchmark("MiniImageNet", tmp_path, "train")
    direct = load_miniimagenet(tmp_path, "train")
    assert via.classes == direct.classes and torch.equal(via.images, direct.images)
    assert torch.equal(via.labels, direct.labels)


@pytest.mark.parametrize("layout", ["pickle-cache", "metaoptnet", "torchmeta"])
def test_mini_truncated_files_raise_value_error(tmp_path, mini_data, layout):
    if layout == "pickle-cache":
        _write_pickle_cache(tmp_path, mini_data)
        path = tmp_path / "mini-imagenet-cache-train.pkl"
    elif layout == "metaoptnet":
        _write_metaoptnet_mini(tmp_path, mini_data)
        path = tmp_path / "miniImageNet_category_split_train_phase_train.pickle"
    else:
        _write_torchmeta(tmp_path, mini_data)
        path = tmp_path / "train_data.hdf5"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_miniimagenet(tmp_path, "train")


def test_mini_malformed_pickles(tmp_path, mini_data):
    images, names = mini_data["test"]
    path = tmp_path / "mini-imagenet-cache-test.pkl"
    with open(path, "wb") as f:  # class_dict leaves an image out: not a silent partial split
        pickle.dump({"image_data": images, "class_dict": {names[0]: [0]}}, f, protocol=2)
    with pytest.raises(ValueError, match="covers 1 of the 40"):
        load_miniimagenet(tmp_path, "test")
    with open(path, "wb") as f:
        pickle.dump({"images": images}, f, protocol=2)
    with pytest.raises(ValueError, match="image_data"):
        load_miniimagenet(tmp_path, "test")
    with open(path, "wb") as f:  # 32×32 images are not MiniImageNet
        pickle.dump({"image_data": np.zeros((2, 32, 32, 3), np.uint8), "class_dict": {"n1": [0, 1]}}, f, protocol=2)
    with pytest.raises(ValueError, match="84×84"):
        load_miniimagenet(tmp_path, "test")


def test_mini_errors(tmp_path, mini_data):
    with pytest.raises(LayoutError) as info:
        load_miniimagenet(tmp_path, "train")
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for expected in ("mini-imagenet-cache-{train,validation,test}.pkl",
                     "miniImageNet_category_split_{train_phase_train,val,test}.pickle",
                     "_data.hdf5", "_labels.json", "images/*.jpg", "{train,val,test}.csv"):
        assert expected in msg
    with pytest.raises(LayoutError, match="does not exist"):
        load_miniimagenet(tmp_path / "nope", "train")
    _write_pickle_cache(tmp_path, mini_data)
    with pytest.raises(ValueError, match="unknown split"):
        load_miniimagenet(tmp_path, "validation")
    with pytest.raises(ValueError, match="unknown split"):
        load_benchmark("miniimagenet", tmp_path, "meta-train")
    with pytest.raises(ValueError, match="no official checksum.*pickle-cache"):
        load_miniimagenet(tmp_path, "train", verify=True)


def test_mini_torchmeta_label_mismatch(tmp_path, mini_data):
    _write_torchmeta(tmp_path, mini_data)
    (tmp_path / "test_labels.json").write_text(json.dumps(MINI_WNIDS["test"] + ["n99999999"]))
    with pytest.raises(ValueError, match="n99999999"):
        load_miniimagenet(tmp_path, "test")


# --------------------------------------------------------------------------- MiniImageNet: JPEGs


def test_mini_csv_images_round_trip(csv_root, tmp_path):
    root, sources = csv_root
    for split in SPLITS:
        part = load_miniimagenet(root, split, cache_dir=tmp_path, progress=False)
        assert part.layout == "csv-images" and part.source == str(root)
        assert part.classes == tuple(MINI_WNIDS[split])
        assert part.images.shape == (MINI_COUNTS[split] * PER_CLASS, 3, 84, 84)
        assert torch.all(part.labels[1:] >= part.labels[:-1])
        for i, c in enumerate(part.classes):
            got = part.images[part.labels == i].permute(0, 2, 3, 1).numpy().astype(np.int16)
            assert len(got) == PER_CLASS
            for k, src in enumerate(sources[split][c]):
                if split == "train" and i == 0 and k == 0:
                    continue  # the full-size image: see the next test
                assert np.abs(got[k] - src.astype(np.int16)).mean() < 1.5  # JPEG tolerance


def test_mini_csv_full_size_image_is_lanczos_resized(csv_root, tmp_path):
    root, _ = csv_root
    part = load_miniimagenet(root, "train", cache_dir=tmp_path, progress=False)
    with Image.open(root / "images" / BIG_NAME) as img:
        assert img.size == (400, 300)
        want = np.asarray(img.convert("RGB").resize((84, 84), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(part.images[0].permute(1, 2, 0).numpy(), want)


def test_mini_csv_cache_is_read_and_keyed_by_content(tmp_path, monkeypatch):
    root = tmp_path / "mini"
    _write_csv_images(root, seed=1)
    cache = tmp_path / "cache"
    calls = []
    real = miniimagenet._decode_jpeg

    def counting(data):
        calls.append(1)
        return real(data)

    monkeypatch.setattr(miniimagenet, "_decode_jpeg", counting)
    first = load_miniimagenet(root, "val", cache_dir=cache, progress=True)
    assert len(calls) == 32 and len(list(cache.glob("*.pt"))) == 1

    def boom(data):
        raise AssertionError("the cache should have been read")

    monkeypatch.setattr(miniimagenet, "_decode_jpeg", boom)
    second = load_miniimagenet(root, "val", cache_dir=cache, progress=False)
    assert second.classes == first.classes and torch.equal(second.images, first.images)
    assert torch.equal(second.labels, first.labels)

    # a changed image changes the key: decoded again, into a second cache file
    name = next(iter(sorted((root / "images").glob("n00000064*.jpg"))))
    name.write_bytes(_jpeg(np.zeros((84, 84, 3), np.uint8)))
    with pytest.raises(AssertionError, match="cache should have been read"):
        load_miniimagenet(root, "val", cache_dir=cache, progress=False)
    calls.clear()
    monkeypatch.setattr(miniimagenet, "_decode_jpeg", counting)
    third = load_miniimagenet(root, "val", cache_dir=cache, progress=False)
    assert len(calls) == 32 and len(list(cache.glob("*.pt"))) == 2
    assert not torch.equal(third.images, first.images)
    assert int(third.images[third.labels == 0][0].max()) < 10


def test_mini_csv_default_cache_dir_and_corrupt_cache(tmp_path, monkeypatch):
    root = tmp_path / "mini"
    _write_csv_images(root, seed=2)
    monkeypatch.setenv("ROBUST_META_CACHE", str(tmp_path / "env"))
    first = load_miniimagenet(root, "test", progress=False)
    (path,) = (tmp_path / "env" / "miniimagenet").glob("*.pt")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.warns(RuntimeWarning, match="corrupt"):
        again = load_miniimagenet(root, "test", progress=False)
    assert torch.equal(again.images, first.images)
    assert torch.equal(load_miniimagenet(root, "test", progress=False).images, first.images)


def test_mini_csv_errors(tmp_path):
    root = tmp_path / "mini"
    (root / "images").mkdir(parents=True)
    (root / "test.csv").write_text("name,wnid\nx.jpg,n1\n")
    with pytest.raises(ValueError, match="header"):
        load_miniimagenet(root, "test", cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(LayoutError, match="train.csv"):
        load_miniimagenet(root, "train", cache_dir=tmp_path / "c", progress=False)
    (root / "test.csv").write_text("filename,label\nx.jpg,n1\n")
    with pytest.raises(FileNotFoundError, match="x.jpg"):
        load_miniimagenet(root, "test", cache_dir=tmp_path / "c", progress=False)
    (root / "images" / "x.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError, match="not a readable image"):
        load_miniimagenet(root, "test", cache_dir=tmp_path / "c", progress=False)


# --------------------------------------------------------------------------- CIFAR-100 fixtures


NAMES = cifar100_names()
FINE = NAMES["fine"]
TRAIN_PER_CLASS, TEST_PER_CLASS = 2, 1


def test_shipped_class_splits():
    assert len(FINE) == 100 == len(set(FINE)) and FINE == sorted(FINE)  # CIFAR-100 ids are alphabetical
    assert len(NAMES["coarse"]) == 20 and set(NAMES["fine_to_coarse"]) == set(FINE)
    assert set(NAMES["fine_to_coarse"].values()) == set(NAMES["coarse"])
    fs = [set(cifar_fs_classes(s)) for s in SPLITS]
    assert [len(c) for c in fs] == [64, 16, 20] and set.union(*fs) == set(FINE)
    supers = json.loads((Path(cifar.__file__).parent / "assets" / "fc100.json").read_text())
    assert [len(supers[s]) for s in SPLITS] == [12, 4, 4]
    assert set().union(*(supers[s] for s in SPLITS)) == set(NAMES["coarse"])
    fc = [set(fc100_classes(s)) for s in SPLITS]
    assert [len(c) for c in fc] == [60, 20, 20] and set.union(*fc) == set(FINE)
    for s, classes in zip(SPLITS, fc):
        assert {NAMES["fine_to_coarse"][c] for c in classes} == set(supers[s])
    assert {"apple", "aquarium_fish"} <= set(cifar_fs_classes("train"))


def _cifar_files(seed: int = 0):
    """The train / test / meta dicts of a small CIFAR-100 (every class), classes interleaved."""
    rng = np.random.default_rng(seed)
    coarse_id = {c: i for i, c in enumerate(NAMES["coarse"])}
    files = {}
    for member, k in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        names = _interleaved({f: k for f in FINE}, rng)
        files[member] = {
            "data": rng.integers(0, 256, (len(names), 3072), dtype=np.uint8),
            "fine_labels": [FINE.index(n) for n in names],
            "coarse_labels": [coarse_id[NAMES["fine_to_coarse"][n]] for n in names],
        }
    files["meta"] = {"fine_label_names": list(FINE), "coarse_label_names": list(NAMES["coarse"])}
    return files


def _bytes_style(obj):
    """How Python 3 sees a CIFAR pickle read with encoding="bytes": b'data' keys, bytes names."""
    if isinstance(obj, str):
        return obj.encode()
    if isinstance(obj, dict):
        return {_bytes_style(k): _bytes_style(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_bytes_style(v) for v in obj]
    return obj


def _member_bytes(files, style: str) -> dict[str, bytes]:
    if style == "py2":
        return {m: py2_dumps(d) for m, d in files.items()}
    return {m: pickle.dumps(_bytes_style(d), protocol=2) for m, d in files.items()}


def _write_extracted(folder: Path, files, style="bytes") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for m, data in _member_bytes(files, style).items():
        (folder / m).write_bytes(data)
    return folder


def _write_tar(path: Path, files, style="bytes") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb", compresslevel=1) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for m, data in _member_bytes(files, style).items():
            info = tarfile.TarInfo(f"cifar-100-python/{m}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _expected_cifar(files, classes) -> dict[str, np.ndarray]:
    """Per class: its train-file images, then its test-file images, in file order (NCHW)."""
    out = {}
    for c in classes:
        fid = FINE.index(c)
        parts = [files[m]["data"][[i for i, v in enumerate(files[m]["fine_labels"]) if v == fid]]
                 for m in ("train", "test")]
        out[c] = np.concatenate(parts).reshape(-1, 3, 32, 32)
    return out


@pytest.fixture(scope="module")
def cifar_files():
    return _cifar_files()


@pytest.fixture(scope="module")
def cifar_tar(tmp_path_factory, cifar_files):
    return _write_tar(tmp_path_factory.mktemp("cifar_tar") / "cifar-100-python.tar.gz", cifar_files)


LOADERS = {"cifar-fs": (load_cifar_fs, cifar_fs_classes, {"train": 64, "val": 16, "test": 20}),
           "fc100": (load_fc100, fc100_classes, {"train": 60, "val": 20, "test": 20})}


# --------------------------------------------------------------------------- CIFAR-FS / FC100


@pytest.mark.parametrize("name", ["cifar-fs", "fc100"])
def test_cifar_archive_round_trip_and_pooling(cifar_tar, cifar_files, name):
    load, classes_of, counts = LOADERS[name]
    for split in SPLITS:
        part = load(cifar_tar, split)
        assert (part.name, part.split, part.layout, part.source) == (name, split, "cifar-100-python", str(cifar_tar))
        assert part.classes == classes_of(split) and part.num_classes == counts[split]
        per_class = TRAIN_PER_CLASS + TEST_PER_CLASS
        assert part.images.shape == (counts[split] * per_class, 3, 32, 32)
        _check_grouped(part, _expected_cifar(cifar_files, part.classes))
        # pooling order: within each class, the train-file images come first
        first = part.images[part.labels == 0]
        fid = FINE.index(part.classes[0])
        test_imgs = [i for i, v in enumerate(cifar_files["test"]["fine_labels"]) if v == fid]
        np.testing.assert_array_equal(first[-1].numpy().reshape(-1), cifar_files["test"]["data"][test_imgs[0]])


def test_fc100_superclasses_are_disjoint(cifar_tar):
    f2c = NAMES["fine_to_coarse"]
    supers = {s: {f2c[c] for c in load_fc100(cifar_tar, s).classes} for s in SPLITS}
    assert [len(supers[s]) for s in SPLITS] == [12, 4, 4]
    assert not (supers["train"] & supers["val"]) and not (supers["train"] & supers["test"])
    assert not (supers["val"] & supers["test"])


@pytest.mark.parametrize("where", ["file", "folder-with-tar", "parent-of-folder", "extracted", "extracted-itself",
                                   "extracted-py2", "extracted-subfolder"])
def test_cifar_archive_locations(tmp_path, cifar_files, where):
    if where == "file":
        root = _write_tar(tmp_path / "x" / "cifar-100-python.tar.gz", cifar_files)
    elif where == "folder-with-tar":
        _write_tar(tmp_path / "cifar-100-python.tar.gz", cifar_files)
        root = tmp_path
    elif where == "parent-of-folder":
        _write_tar(tmp_path / "data" / "cifar-100-python.tar.gz", cifar_files)
        root = tmp_path
    elif where == "extracted":
        _write_extracted(tmp_path / "cifar-100-python", cifar_files)
        root = tmp_path
    elif where == "extracted-itself":
        root = _write_extracted(tmp_path / "cifar-100-python", cifar_files)
    elif where == "extracted-py2":
        root = _write_extracted(tmp_path / "cifar-100-python", cifar_files, style="py2")
    else:
        _write_extracted(tmp_path / "data" / "cifar-100-python", cifar_files)
        root = tmp_path
    part = load_cifar_fs(root, "val")
    assert part.layout == "cifar-100-python" and part.classes == cifar_fs_classes("val")
    _check_grouped(part, _expected_cifar(cifar_files, part.classes))


def _write_metaoptnet_cifar(folder: Path, name: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    prefix = {"cifar-fs": "CIFAR_FS", "fc100": "FC100"}[name]
    classes_of = LOADERS[name][1]
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split in SPLITS:
        names = _interleaved({c: PER_CLASS for c in classes_of(split)}, rng)
        images = rng.integers(0, 256, (len(names), 32, 32, 3), dtype=np.uint8)
        py2_dump({"data": images, "labels": [FINE.index(n) for n in names]}, folder / f"{prefix}_{split}.pickle")
        out[split] = {c: images[[i for i, n in enumerate(names) if n == c]].transpose(0, 3, 1, 2) for c in set(names)}
    return out


@pytest.mark.parametrize("name", ["cifar-fs", "fc100"])
def test_cifar_metaoptnet_round_trip(tmp_path, name):
    expected = _write_metaoptnet_cifar(tmp_path, name)
    load, classes_of, counts = LOADERS[name]
    prefix = {"cifar-fs": "CIFAR_FS", "fc100": "FC100"}[name]
    with open(tmp_path / f"{prefix}_test.pickle", "rb") as f, pytest.raises(UnicodeDecodeError):
        pickle.load(f)  # a Python 2 numpy pickle: only latin1 reads it
    for split in SPLITS:
        part = load(tmp_path, split)
        assert (part.name, part.layout) == (name, "metaoptnet")
        assert part.classes == classes_of(split) and part.num_classes == counts[split]
        _check_grouped(part, expected[split])
    via = load_benchmark(name.upper().replace("-", "_"), tmp_path / f"{prefix}_train.pickle", "val")
    assert via.split == "val" and via.classes == classes_of("val")


def test_cifar_metaoptnet_wrong_classes(tmp_path):
    _write_metaoptnet_cifar(tmp_path, "cifar-fs")
    blob = pickle.loads((tmp_path / "CIFAR_FS_train.pickle").read_bytes(), encoding="latin1")
    blob["labels"][0] = FINE.index(cifar_fs_classes("test")[0])  # a test class in the train file
    py2_dump(blob, tmp_path / "CIFAR_FS_train.pickle")
    with pytest.raises(ValueError, match="not in the CIFAR-FS train split"):
        load_cifar_fs(tmp_path, "train")
    keep = [i for i, v in enumerate(blob["labels"]) if v != FINE.index("apple")]
    py2_dump({"data": blob["data"][keep], "labels": [FINE.index(cifar_fs_classes("train")[1])] * len(keep)},
             tmp_path / "CIFAR_FS_train.pickle")
    with pytest.raises(ValueError, match="no image of the CIFAR-FS train classes"):
        load_cifar_fs(tmp_path, "train")
    (tmp_path / "CIFAR_FS_val.pickle").unlink()
    with pytest.raises(LayoutError, match="CIFAR_FS_val.pickle"):
        load_cifar_fs(tmp_path, "val")
    with pytest.raises(LayoutError):  # FC100 pickles are other files
        load_fc100(tmp_path, "test")


def test_cifar_truncated_files(tmp_path, cifar_tar, cifar_files):
    data = cifar_tar.read_bytes()
    for cut in (len(data) // 2, len(data) - 30, 100):
        bad = tmp_path / f"cut{cut}" / "cifar-100-python.tar.gz"
        bad.parent.mkdir()
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated"):
            load_cifar_fs(bad.parent, "train")
    folder = _write_extracted(tmp_path / "ex" / "cifar-100-python", cifar_files)
    (folder / "test").write_bytes((folder / "test").read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated"):
        load_fc100(folder, "test")
    _write_metaoptnet_cifar(tmp_path / "mo", "fc100")
    path = tmp_path / "mo" / "FC100_val.pickle"
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(ValueError, match="truncated"):
        load_fc100(tmp_path / "mo", "val")


def test_cifar_archive_missing_class(tmp_path, cifar_files):
    files = {m: dict(d) for m, d in cifar_files.items()}
    for m in ("train", "test"):
        keep = [i for i, v in enumerate(files[m]["fine_labels"]) if FINE[v] != "apple"]
        files[m]["data"] = files[m]["data"][keep]
        files[m]["fine_labels"] = [files[m]["fine_labels"][i] for i in keep]
    folder = _write_extracted(tmp_path / "cifar-100-python", files)
    with pytest.raises(ValueError, match="apple"):
        load_cifar_fs(folder, "train")
    assert load_cifar_fs(folder, "val").num_classes == 16  # apple is a train class


def test_cifar_errors(tmp_path, cifar_tar, monkeypatch):
    with pytest.raises(LayoutError) as info:
        load_cifar_fs(tmp_path, "train")
    assert isinstance(info.value, FileNotFoundError)
    assert "cifar-100-python.tar.gz" in str(info.value) and "CIFAR_FS_{train,val,test}.pickle" in str(info.value)
    with pytest.raises(LayoutError, match=r"FC100_\{train,val,test\}.pickle"):
        load_benchmark("fc100", tmp_path, "train")
    with pytest.raises(ValueError, match="unknown split"):
        load_cifar_fs(cifar_tar, "meta-test")
    with pytest.raises(ValueError, match="unknown split"):
        load_fc100(cifar_tar, "validation")
    # verify: the fabricated archive is not the official one
    with pytest.raises(ValueError, match="MD5 mismatch"):
        load_cifar_fs(cifar_tar, "train", verify=True)
    monkeypatch.setitem(cifar._MD5, "cifar-100-python.tar.gz", hashlib.md5(cifar_tar.read_bytes()).hexdigest())
    assert load_benchmark("cifar-fs", cifar_tar, "test", verify=True).num_classes == 20
    _write_metaoptnet_cifar(tmp_path / "mo", "cifar-fs")
    with pytest.raises(ValueError, match="no official checksum.*metaoptnet"):
        load_cifar_fs(tmp_path / "mo", "train", verify=True)


def test_cifar_verify_extracted_folder(tmp_path, cifar_files, monkeypatch):
    folder = _write_extracted(tmp_path / "cifar-100-python", cifar_files)
    with pytest.raises(ValueError, match="MD5 mismatch"):
        load_fc100(folder, "train", verify=True)
    for m in ("train", "test", "meta"):
        monkeypatch.setitem(cifar._MD5, m, hashlib.md5((folder / m).read_bytes()).hexdigest())
    assert load_fc100(folder, "train", verify=True).num_classes == 60


def test_load_benchmark_dispatch(cifar_tar):
    a = load_benchmark("cifar-fs", cifar_tar, "train")
    b = load_benchmark("FC100", str(cifar_tar), "train", progress=False)
    assert (a.name, b.name) == ("cifar-fs", "fc100")
    assert "64 classes" in repr(a) and "layout='cifar-100-python'" in repr(a)
