"""Omniglot end to end on the real "background small" sets of the official repository.

The two zips live outside the repository, at `../shared/data/omniglot` from its root (the same
relative place in CI); the tests that need them are skipped with the reason when absent. The
data are decoded once per session into a temporary cache folder (module-scoped fixture).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from robust_meta.datasets import (
    OmniglotDataset,
    OmniglotSplits,
    Task,
    TaskSampler,
    download_omniglot,
    load_omniglot,
    omniglot_splits,
    omniglot_task_sampler,
)
from robust_meta.datasets import omniglot as om

OMNIGLOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"
SMALL1 = OMNIGLOT / "images_background_small1.zip"
SMALL2 = OMNIGLOT / "images_background_small2.zip"
ALPHABETS = ["Balinese", "Early_Aramaic", "Greek", "Japanese_(katakana)", "Korean", "Latin", "Sanskrit", "Tagalog"]

needs_data = pytest.mark.skipif(
    not (SMALL1.is_file() and SMALL2.is_file()),
    reason=f"the Omniglot small sets are not at {OMNIGLOT} (images_background_small1/2.zip)",
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("omniglot-cache")


@pytest.fixture(scope="module")
def data(cache_dir) -> OmniglotDataset:
    if not (SMALL1.is_file() and SMALL2.is_file()):
        pytest.skip(f"the Omniglot small sets are not at {OMNIGLOT}")
    return load_omniglot(OMNIGLOT, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def splits(data) -> OmniglotSplits:
    return omniglot_splits(data, counts=(5, 1, 2), seed=0)


def count_decodes(monkeypatch) -> list[int]:
    """Wrap the PNG decoder so that the test can count its calls."""
    calls = [0]
    real = om._decode_png

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(om, "_decode_png", counting)
    return calls


def small_zip(path: Path, *, alphabets=("Greek",), drop: int = 0, stored: bool = False) -> Path:
    """A copy of some alphabets of small set 1 in the official layout, minus `drop` drawings."""
    with zipfile.ZipFile(SMALL1) as src, zipfile.ZipFile(
        path, "w", zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    ) as dst:
        names = [n for n in src.namelist() if n.endswith(".png") and n.split("/")[1] in alphabets]
        for n in names[drop:]:
            dst.writestr(n, src.read(n))
    return path


# --------------------------------------------------------------------------- contents


@needs_data
def test_242_characters_of_20_drawings_keyed_by_alphabet(data):
    images, labels, classes, alphabets = data
    assert len(classes) == data.num_classes == 242
    assert alphabets == ALPHABETS
    assert classes == sorted(set(classes))
    assert all(re.fullmatch(r"[^/]+/character\d\d", c) for c in classes)
    assert torch.bincount(labels, minlength=242).tolist() == [20] * 242
    assert len(images) == len(labels) == 4840
    # Greek and Latin are in both zips: kept once each
    assert sum(c.startswith("Greek/") for c in classes) == 24
    assert sum(c.startswith("Latin/") for c in classes) == 26
    assert sorted(set(data.class_alphabets)) == ALPHABETS


@needs_data
def test_pixels_official_polarity_in_unit_range(data):
    x = data.images
    assert x.shape == (4840, 1, 28, 28) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float(x.mean()) > 0.5  # white paper
    assert float(x[..., 0, :].mean()) > 0.99 and float(x[..., :, 0].mean()) > 0.99  # borders are background
    assert bool((x.amin(dim=(1, 2, 3)) < 0.5).all())  # every drawing has a dark stroke


@needs_data
def test_one_zip_at_full_resolution_is_binary_and_exact(tmp_path):
    one = load_omniglot(SMALL1, image_size=105, cache=False)
    assert one.num_classes == 136 and one.images.shape == (2720, 1, 105, 105)
    assert set(torch.unique(one.images).tolist()) == {0.0, 1.0}
    assert not list(tmp_path.iterdir())


@needs_data
def test_extracted_folder_reads_like_the_zip(tmp_path, cache_dir):
    with zipfile.ZipFile(small_zip(tmp_path / "g.zip")) as zf:
        zf.extractall(tmp_path / "x")
    from_dir = load_omniglot(tmp_path / "x" / "images_background_small1", cache=False)
    from_zip = load_omniglot(tmp_path / "g.zip", cache=False)
    assert from_dir.classes == from_zip.classes and torch.equal(from_dir.images, from_zip.images)


# --------------------------------------------------------------------------- splits


@needs_data
def test_alphabet_splits_are_disjoint_seeded_and_recorded(data, splits):
    assert (len(splits.train), len(splits.val), len(splits.test)) == (5, 1, 2)
    parts = [set(splits.train), set(splits.val), set(splits.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set().union(*parts) == set(ALPHABETS)
    assert splits.seed == 0
    assert omniglot_splits(data, counts=(5, 1, 2), seed=0) == splits
    others = {omniglot_splits(data, counts=(5, 1, 2), seed=s).test for s in range(1, 6)}
    assert others - {splits.test}
    # recorded: JSON round trip
    text = splits.to_json()
    assert json.loads(text) == {"train": list(splits.train), "val": list(splits.val),
                                "test": list(splits.test), "seed": 0}
    assert OmniglotSplits.from_json(text) == splits
    # default fractions over alphabets, and a split by names only
    default = omniglot_splits(ALPHABETS, seed=3)
    assert sum(map(len, (default.train, default.val, default.test))) == 8


@needs_data
def test_test_alphabets_never_reach_meta_training(data, splits):
    train, test = data.split(splits, "train"), data.split(splits, "test")
    assert set(train.class_alphabets) == set(splits.train)
    assert set(test.class_alphabets) == set(splits.test)
    assert not set(train.class_alphabets) & set(test.class_alphabets)


def test_bad_splits_are_refused():
    with pytest.raises(ValueError, match="'Greek' is in both"):
        OmniglotSplits(("Greek", "Latin"), (), ("Greek",))
    with pytest.raises(ValueError, match="train and test"):
        OmniglotSplits(("Greek",), ("Latin",), ())
    with pytest.raises(ValueError, match="needs keys"):
        OmniglotSplits.from_dict({"train": ["Greek"]})
    with pytest.raises(ValueError, match="cannot split 2 alphabets"):
        omniglot_splits(["Greek", "Latin"], seed=0)
    with pytest.raises(TypeError, match="single string"):
        omniglot_splits("Greek")


# --------------------------------------------------------------------------- rotation classes


@needs_data
def test_rotation_classes_are_rot90_of_the_originals(data, splits):
    train = data.split(splits, "train")
    n_base = sum(a in splits.train for a in data.class_alphabets)
    assert train.num_classes == 4 * n_base and len(train.images) == 4 * 20 * n_base
    name = next(c for c in data.classes if c.split("/")[0] in splits.train)
    orig = data.images[data.labels == data.classes.index(name)]
    for k, angle in enumerate((0, 90, 180, 270)):
        key = name if angle == 0 else f"{name}/rot{angle}"
        got = train.images[train.labels == train.classes.index(key)]
        assert torch.equal(got, torch.rot90(orig, k, dims=(-2, -1)))
    # val / test: originals only by default; configurable
    assert not any("/rot" in c for c in data.split(splits, "test").classes)
    assert data.split(splits, "test", rotations=(0, 180)).num_classes == 2 * data.split(splits, "test").num_classes
    assert data.split(splits, "train", rotations=(0,)).num_classes == n_base
    with pytest.raises(ValueError, match="rotations"):
        data.split(splits, "train", rotations=(0, 45))
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        data.split(splits, "dev")
    with pytest.raises(ValueError, match="not in this dataset"):
        data.subset(["Klingon"])


# --------------------------------------------------------------------------- tasks


@needs_data
def test_task_sampler_on_the_test_alphabets(data, splits):
    test = data.split(splits, "test")
    sampler = omniglot_task_sampler(data, splits, "test", ways=5, shots=1, queries=5, seed=0)
    tasks = sampler.sample(20)
    for task in tasks:
        assert isinstance(task, Task)
        assert task.support_x.shape == (5, 1, 28, 28) and task.query_x.shape == (25, 1, 28, 28)
        assert task.support_y.tolist() == [0, 1, 2, 3, 4]
        names = [test.classes[c] for c in task.classes.tolist()]
        assert {n.split("/")[0] for n in names} <= set(splits.test)
    again = TaskSampler(test.images, test.labels, ways=5, shots=1, queries=5, seed=0).sample(20)
    assert all(torch.equal(a.support_x, b.support_x) for a, b in zip(tasks, again))
    # meta-training tasks come from the train alphabets, rotation classes included
    train = data.split(splits, "train")
    train_tasks = omniglot_task_sampler(data, splits, "train", ways=5, shots=1, queries=15, seed=1).sample(20)
    seen = {train.classes[c] for t in train_tasks for c in t.classes.tolist()}
    assert {n.split("/")[0] for n in seen} <= set(splits.train)
    assert any("/rot" in n for n in seen)


@needs_data
def test_too_few_classes_for_the_ways(data, splits):
    n = data.split(splits, "test").num_classes
    with pytest.raises(ValueError, match=rf"ways={n + 1} is more than the {n} classes of the Omniglot test split"):
        omniglot_task_sampler(data, splits, "test", ways=n + 1, shots=1, queries=1)
    with pytest.raises(ValueError, match="fewer images than"):
        omniglot_task_sampler(data, splits, "test", ways=5, shots=10, queries=15)


# --------------------------------------------------------------------------- the cache


@needs_data
def test_second_load_reads_the_cache_without_decoding(data, cache_dir, monkeypatch):
    calls = count_decodes(monkeypatch)
    again = load_omniglot(OMNIGLOT, cache_dir=cache_dir)
    assert calls[0] == 0
    assert again.classes == data.classes and again.alphabets == data.alphabets
    assert torch.equal(again.images, data.images) and torch.equal(again.labels, data.labels)
    assert not [p for p in cache_dir.iterdir() if p.name.endswith(".tmp")]


@needs_data
def test_a_changed_source_invalidates_the_cache(tmp_path, monkeypatch):
    calls = count_decodes(monkeypatch)
    src, cache = tmp_path / "images_background_small1.zip", tmp_path / "cache"
    small_zip(src, alphabets=("Greek", "Latin"))
    first = load_omniglot(tmp_path, cache_dir=cache)
    assert calls[0] == 1000 and first.num_classes == 50
    load_omniglot(tmp_path, cache_dir=cache)
    assert calls[0] == 1000  # cached
    small_zip(src, alphabets=("Greek", "Latin"), drop=1)  # rewritten, one drawing fewer
    changed = load_omniglot(tmp_path, cache_dir=cache)
    assert calls[0] == 1000 + 999 and len(changed.images) == 999
    # another size is another cache entry
    assert load_omniglot(tmp_path, cache_dir=cache, image_size=14).images.shape[-2:] == (14, 14)


def swap_members(path: Path, a: str, b: str) -> None:
    """Rewrite zip `path` with the stored bytes of members `a` and `b` swapped, keeping every
    name in place: the archive keeps its byte length (the sizes are only permuted) but two
    drawings trade places."""
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        data = {i.filename: zf.read(i) for i in infos}
    data[a], data[b] = data[b], data[a]
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w") as out:
        for info in infos:
            out.writestr(info, data[info.filename])
    tmp.replace(path)


def same_size_pair(folder: Path) -> tuple[Path, Path]:
    """Two PNGs of different characters with the same byte length and different bytes."""
    by_size: dict[int, Path] = {}
    for png in sorted(folder.rglob("*.png")):
        other = by_size.setdefault(png.stat().st_size, png)
        if other.parent != png.parent and other.read_bytes() != png.read_bytes():
            return other, png
    raise AssertionError(f"no two PNGs of equal size under {folder}")


@needs_data
def test_a_zip_changed_in_place_with_its_size_and_mtime_is_decoded_again(tmp_path, monkeypatch):
    # `cp -p`, `rsync -t` or `os.utime` keep the size and modification time of a changed file
    src, cache = small_zip(tmp_path / "images_background_small1.zip"), tmp_path / "cache"
    first = load_omniglot(tmp_path, cache_dir=cache)
    before = src.stat()
    with zipfile.ZipFile(src) as zf:
        names = [n for n in zf.namelist() if n.endswith(".png")]
    a = next(n for n in names if "/character01/" in n)
    b = next(n for n in names if "/character02/" in n)
    swap_members(src, a, b)
    os.utime(src, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = src.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    calls = count_decodes(monkeypatch)
    second = load_omniglot(tmp_path, cache_dir=cache)
    assert calls[0] == 480  # decoded again, not the stale cache
    fresh = load_omniglot(tmp_path, cache=False)
    assert torch.equal(second.images, fresh.images) and not torch.equal(second.images, first.images)
    # the two drawings traded places: same images, two positions exchanged
    i, j = (first.classes.index(f"Greek/{c}") for c in ("character01", "character02"))
    ia, ib = (int((first.labels == k).nonzero()[0]) for k in (i, j))
    assert torch.equal(second.images[ia], first.images[ib]) and torch.equal(second.images[ib], first.images[ia])
    # content-keyed: touching the file without changing it keeps the cache
    os.utime(src, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    load_omniglot(tmp_path, cache_dir=cache)
    assert calls[0] == 480 + 480  # the cache=False load above, then nothing


@needs_data
def test_a_folder_changed_in_place_with_sizes_and_mtimes_is_decoded_again(tmp_path, monkeypatch):
    with zipfile.ZipFile(small_zip(tmp_path / "g.zip")) as zf:
        zf.extractall(tmp_path / "x")
    root, cache = tmp_path / "x" / "images_background_small1", tmp_path / "cache"
    first = load_omniglot(root, cache_dir=cache)
    pa, pb = same_size_pair(root)
    sa, sb = pa.stat(), pb.stat()
    da, db = pa.read_bytes(), pb.read_bytes()
    pa.write_bytes(db)
    pb.write_bytes(da)
    for p, st in ((pa, sa), (pb, sb)):
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert (p.stat().st_size, p.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    calls = count_decodes(monkeypatch)
    second = load_omniglot(root, cache_dir=cache)
    assert calls[0] == 480
    fresh = load_omniglot(root, cache=False)
    assert torch.equal(second.images, fresh.images) and not torch.equal(second.images, first.images)
    # a renamed drawing is another content too (the relative path is hashed)
    pa.rename(pa.with_name("9999_99.png"))
    load_omniglot(root, cache_dir=cache)
    assert calls[0] == 3 * 480
    # touching every file without changing it keeps the cache
    for png in root.rglob("*.png"):
        os.utime(png, ns=(png.stat().st_atime_ns, png.stat().st_mtime_ns + 10**9))
    load_omniglot(root, cache_dir=cache)
    assert calls[0] == 3 * 480


@needs_data
@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped"])
def test_a_corrupt_cache_file_is_rebuilt(tmp_path, monkeypatch, damage):
    src, cache = small_zip(tmp_path / "g.zip"), tmp_path / "cache"
    good = load_omniglot(src, cache_dir=cache)
    (path,) = cache.glob("*.pt")
    raw = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not a torch file")
    elif damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    else:  # one pixel byte changed inside the stored tensor: only the checksum sees it
        blob = torch.load(path, weights_only=True)
        blob["images"][0, 0, 0, 0] ^= 1
        torch.save(blob, path)
    calls = count_decodes(monkeypatch)
    with pytest.warns(RuntimeWarning, match="corrupt"):
        rebuilt = load_omniglot(src, cache_dir=cache)
    assert calls[0] == 480 and torch.equal(rebuilt.images, good.images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_omniglot(src, cache_dir=cache)
    assert calls[0] == 480


def test_an_interrupted_write_leaves_nothing(tmp_path):
    def half_then_fail(f):
        f.write(b"x" * 1000)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        om._atomic_write(tmp_path / "out.pt", half_then_fail)
    assert list(tmp_path.iterdir()) == []
    om._atomic_write(tmp_path / "out.pt", lambda f: f.write(b"ok"))
    assert [p.name for p in tmp_path.iterdir()] == ["out.pt"] and (tmp_path / "out.pt").read_bytes() == b"ok"


# --------------------------------------------------------------------------- bad inputs


def test_wrong_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        load_omniglot(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no Omniglot data in .*empty"):
        load_omniglot(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="images_evaluation"):
        load_omniglot(tmp_path / "empty", sets=["images_evaluation"])
    with pytest.raises(ValueError, match="unknown Omniglot set 'images_train'"):
        load_omniglot(tmp_path / "empty", sets=["images_train"])


def test_a_zip_that_is_not_omniglot(tmp_path):
    path = tmp_path / "images_background.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hello")
        zf.writestr("cats/cat01.png", b"\x89PNG")
    with pytest.raises(ValueError, match=r"images_background\.zip' does not look like Omniglot"):
        load_omniglot(tmp_path, cache_dir=tmp_path / "cache")


def test_corrupt_zip_bytes(tmp_path):
    path = tmp_path / "images_evaluation.zip"
    path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"images_evaluation\.zip' is not a readable zip archive"):
        load_omniglot(tmp_path, cache=False)


@needs_data
def test_corrupt_member_of_a_zip(tmp_path):
    path = small_zip(tmp_path / "g.zip", stored=True)
    with zipfile.ZipFile(path) as zf:
        info = zf.infolist()[3]
    raw = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + info.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupt|not a readable PNG"):
        load_omniglot(path, cache=False)


def test_bad_options(tmp_path):
    with pytest.raises(ValueError, match="image_size must be >= 1, got 0"):
        load_omniglot(tmp_path, image_size=0)
    with pytest.raises(ValueError, match="unknown resample 'cubic'"):
        load_omniglot(tmp_path, resample="cubic")


# --------------------------------------------------------------------------- download


class _Quiet(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).requests.append(self.path)
        super().do_GET()


@pytest.fixture
def loopback(tmp_path, monkeypatch):
    """A local HTTP server on 127.0.0.1 serving a copy of small set 1 (never the internet)."""
    if not SMALL1.is_file():
        pytest.skip(f"{SMALL1} is not there")
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(SMALL1, served / SMALL1.name)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    _Quiet.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_download_verifies_and_skips_a_verified_file(loopback, tmp_path):
    dest = tmp_path / "data"
    (path,) = download_omniglot(dest, which="images_background_small1", base_url=loopback)
    assert path == dest / "images_background_small1.zip"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == om._CHECKSUMS["images_background_small1"][0]
    assert [p.name for p in dest.iterdir()] == ["images_background_small1.zip"]
    download_omniglot(dest, which=["images_background_small1.zip"], base_url=loopback)
    assert len(_Quiet.requests) == 1  # already there and verified: not fetched again
    assert load_omniglot(dest, cache=False).num_classes == 136


def test_download_checksum_mismatch_leaves_nothing(loopback, tmp_path):
    dest = tmp_path / "data"
    with pytest.raises(ValueError, match=r"SHA-256 mismatch for http://127\.0\.0\.1:\d+/images_background_small1\.zip"):
        download_omniglot(dest, which="images_background_small1", base_url=loopback,
                          sha256={"images_background_small1": "0" * 64})
    assert list(dest.iterdir()) == []


def test_download_missing_file_leaves_nothing(loopback, tmp_path):
    dest = tmp_path / "data"
    with pytest.raises(urllib.error.URLError, match="images_evaluation.zip"):
        download_omniglot(dest, which="images_evaluation", base_url=loopback)
    assert list(dest.iterdir()) == []
    with pytest.raises(ValueError, match="unknown Omniglot set 'omniglot'"):
        download_omniglot(dest, which="omniglot", base_url=loopback)


# --------------------------------------------------------------------------- imports


def test_import_robust_meta_loads_no_image_or_ml_extras():
    code = ("import sys, robust_meta, robust_meta.data, robust_meta.datasets; "
            "print(sorted(m for m in ('PIL', 'sklearn', 'torchmeta', 'matplotlib', 'torchvision') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_data_module_keeps_every_old_name():
    import robust_meta.data as D
    import robust_meta.datasets as DS

    for name in D.__all__:
        assert getattr(D, name) is getattr(DS, name) or name.startswith("_")
    for name in ("_int_arg", "_check_images", "_labels_tensor", "_as_class_list", "_TORCHMETA_DATASETS",
                 "_SPLIT_ALIASES", "_torchmeta_key", "_collate_torchmeta", "_SPLIT_NAMES"):
        assert hasattr(D, name), name
