"""Omniglot from the official zips or extracted folders, with alphabet-disjoint meta-splits.

No torchmeta, no torchvision: the official archives of Lake et al. (brendenlake/omniglot,
folder `python/`) are read as they are (`images_background.zip`, `images_evaluation.zip`,
`images_background_small1.zip`, `images_background_small2.zip`) or from their extracted
folders, laid out as `<set>/<Alphabet>/character<NN>/<id>_<drawer>.png` (105x105, mode
`"1"`, white background). Decoded, resized images are cached on disk, so that a second
load reads one small tensor file instead of thousands of PNGs.

Example:
    >>> data = load_omniglot("~/data/omniglot")           # folder holding the official zips
    >>> splits = omniglot_splits(data, seed=0)             # alphabet-disjoint, JSON-serialisable
    >>> train = data.split(splits, "train")                # + 90/180/270-degree classes
    >>> sampler = TaskSampler(train.images, train.labels, ways=5, shots=1, queries=15)
    >>> test_sampler = omniglot_task_sampler(data, splits, "test", ways=5, shots=1, queries=15)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .._io import atomic_write
from ._tasks import TaskSampler, _int_arg, split_classes

__all__ = [
    "OMNIGLOT_SETS",
    "OmniglotDataset",
    "OmniglotSplits",
    "download_omniglot",
    "load_omniglot",
    "omniglot_splits",
    "omniglot_task_sampler",
]

#: The official archive names (without `.zip`), in the order they are read.
OMNIGLOT_SETS = (
    "images_background",
    "images_evaluation",
    "images_background_small1",
    "images_background_small2",
)

DEFAULT_OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"

# Published checksums of the official archives: (sha256, md5). The authors publish none; the
# MD5 sums of the two full archives are the ones torchvision has verified for years, the
# SHA-256 sums of the small sets are those of the copies checked into this project's data.
_CHECKSUMS: dict[str, tuple[str | None, str | None]] = {
    "images_background": (None, "68d2efa1b9178cc56df9314c21c6e718"),
    "images_evaluation": (None, "6b91aef0f799c5bb55b94e3f2daec811"),
    "images_background_small1": ("f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4", None),
    "images_background_small2": ("3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f", None),
}

_CACHE_FORMAT = 2  # 2: sources keyed by content (SHA-256), not by size and mtime
# <anything>/<Alphabet>/character<NN>/<file>.png
_ENTRY = re.compile(r"(?:^|/)([^/]+)/(character\d+)/([^/]+\.png)$", re.IGNORECASE)
_RESAMPLE = ("lanczos", "box", "bilinear", "bicubic", "nearest")
_SPLITS = ("train", "val", "test")
_ALL_ROTATIONS = (0, 90, 180, 270)


# --------------------------------------------------------------------------- the dataset


class OmniglotDataset(NamedTuple):
    """Omniglot images with their classes (`Alphabet/characterNN`) and alphabets.

    A named tuple: unpack it (`images, labels, classes, alphabets = data`) or read its
    fields. Note that `len(data)` is 4 (the tuple's length); the number of images is
    `len(data.images)`.

    Attributes:
        images: float32 pixels in [0, 1], white background = 1 (official polarity).
        labels: class index of every image, into `classes`.
        classes: class names, sorted: `"Alphabet/characterNN"`, plus a `"/rot90"`,
            `"/rot180"` or `"/rot270"` suffix for rotation classes (see `subset`).
        alphabets: the sorted alphabet names present.

    Shape:
        images: `(N, 1, H, W)`; labels: `(N,)`.
    """

    images: Tensor
    labels: Tensor
    classes: list[str]
    alphabets: list[str]

    @property
    def num_classes(self) -> int:
        """Number of classes (rotation classes included)."""
        return len(self.classes)

    @property
    def class_alphabets(self) -> list[str]:
        """The alphabet of every class, aligned with `classes`."""
        return [c.split("/", 1)[0] for c in self.classes]

    def subset(self, alphabets: Iterable[str], *, rotations: Sequence[int] = (0,)) -> OmniglotDataset:
        """The classes of some alphabets, relabelled `0..C-1`, optionally with rotation classes.

        The MAML convention (Finn et al. 2017, after Santoro et al. 2016): each character
        rotated by 90, 180 or 270 degrees counts as a new class. The images of class
        `"A/character01/rot90"` are `torch.rot90(x, 1, dims=(-2, -1))` of those of
        `"A/character01"` (counter-clockwise).

        Args:
            alphabets: the alphabets to keep (each must be present).
            rotations: angles in degrees, a non-empty subset of `(0, 90, 180, 270)`; `(0,)`
                keeps the originals only; without `0` only rotated classes are kept.

        Returns:
            A new `OmniglotDataset` whose classes are grouped per character (all rotations of
            a character are consecutive class indices).

        Raises:
            ValueError: an alphabet that is not present, bad rotations, or an empty selection.
        """
        rotations = _check_rotations(rotations)
        wanted = _alphabet_list(alphabets, "alphabets")
        missing = sorted(set(wanted) - set(self.alphabets))
        if missing:
            raise ValueError(f"alphabets {missing} are not in this dataset (it has {self.alphabets})")
        if not wanted:
            raise ValueError("alphabets is empty")
        keep = set(wanted)
        base = [i for i, a in enumerate(self.class_alphabets) if a in keep]
        labels = self.labels
        parts, new_labels, names = [], [], []
        for i in base:
            idx = (labels == i).nonzero().flatten()
            x = self.images[idx]
            for r in rotations:
                parts.append(torch.rot90(x, r // 90, dims=(-2, -1)) if r else x)
                new_labels.append(torch.full((len(idx),), len(names), dtype=torch.long))
                names.append(self.classes[i] if r == 0 else f"{self.classes[i]}/rot{r}")
        return OmniglotDataset(
            torch.cat(parts).contiguous(), torch.cat(new_labels), names, sorted(keep)
        )

    def split(
        self,
        splits: OmniglotSplits,
        name: str = "train",
        *,
        rotations: Sequence[int] | None = None,
    ) -> OmniglotDataset:
        """The meta-train, meta-val or meta-test part of the data (`subset` of its alphabets).

        Args:
            splits: alphabet-disjoint splits, from `omniglot_splits`.
            name: `"train"`, `"val"` or `"test"`.
            rotations: angles of the rotation classes; default `(0, 90, 180, 270)` for
                `"train"` (the MAML convention) and `(0,)` for `"val"` and `"test"`.

        Returns:
            The split's `OmniglotDataset`.

        Raises:
            ValueError: unknown split name, an empty split, alphabets of the split missing.
        """
        if not isinstance(splits, OmniglotSplits):
            raise TypeError(f"splits must be an OmniglotSplits (from omniglot_splits), got {type(splits).__name__}")
        if name not in _SPLITS:
            raise ValueError(f"unknown split {name!r}; choose from train, val, test")
        alphabets = getattr(splits, name)
        if not alphabets:
            raise ValueError(f"the {name} split has no alphabet")
        if rotations is None:
            rotations = _ALL_ROTATIONS if name == "train" else (0,)
        return self.subset(alphabets, rotations=rotations)


@dataclass(frozen=True)
class OmniglotSplits:
    """Alphabet-disjoint meta-train / meta-val / meta-test splits, serialisable to JSON.

    Test alphabets are never seen in meta-training: a stricter protocol than splitting
    characters (the Vinyals et al. split mixes characters of one alphabet across splits).
    Build one with `omniglot_splits` (seeded), or by hand, e.g. Lake et al.'s
    background / evaluation protocol.

    Attributes:
        train, val, test: sorted alphabet names of each split (`val` may be empty).
        seed: the seed `omniglot_splits` used (`None` for a hand-made split).

    Raises:
        ValueError: an alphabet in two splits, or no train or test alphabet.

    Example:
        >>> text = splits.to_json()                 # record it next to the checkpoint
        >>> OmniglotSplits.from_json(text) == splits
        True
    """

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    seed: int | None = field(default=None)

    def __post_init__(self) -> None:
        for name in _SPLITS:
            object.__setattr__(self, name, tuple(sorted(_alphabet_list(getattr(self, name), name))))
        if not self.train or not self.test:
            raise ValueError(f"an Omniglot split needs train and test alphabets, got {self.to_dict()}")
        seen: dict[str, str] = {}
        for name in _SPLITS:
            for a in getattr(self, name):
                if a in seen:
                    raise ValueError(f"alphabet {a!r} is in both the {seen[a]} and the {name} split")
                seen[a] = name
        if self.seed is not None:
            object.__setattr__(self, "seed", _int_arg(self.seed, "seed", minimum=0))

    def to_dict(self) -> dict[str, Any]:
        """`{"train": [...], "val": [...], "test": [...], "seed": ...}`."""
        return {"train": list(self.train), "val": list(self.val), "test": list(self.test), "seed": self.seed}

    def to_json(self, *, indent: int | None = 2) -> str:
        """The split as JSON text (see `from_json`)."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OmniglotSplits:
        """The inverse of `to_dict`.

        Raises:
            ValueError: missing or unknown keys.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"an Omniglot split must be a mapping, got {type(data).__name__}")
        unknown = set(data) - {"train", "val", "test", "seed"}
        if unknown or not {"train", "test"} <= set(data):
            raise ValueError(f"an Omniglot split needs keys train, val, test (and seed), got {sorted(data)}")
        return cls(data["train"], data.get("val", ()), data["test"], data.get("seed"))

    @classmethod
    def from_json(cls, text: str) -> OmniglotSplits:
        """The inverse of `to_json`."""
        return cls.from_dict(json.loads(text))


def _alphabet_list(values: object, name: str) -> list[str]:
    if isinstance(values, str):
        raise TypeError(f"{name} must be a sequence of alphabet names, not a single string {values!r}")
    try:
        items = list(values)  # type: ignore[call-overload]
    except TypeError as err:
        raise TypeError(f"{name} must be a sequence of alphabet names, got {type(values).__name__}") from err
    bad = [v for v in items if not isinstance(v, str) or not v]
    if bad:
        raise TypeError(f"{name} must hold alphabet names (non-empty strings), got {bad[:3]}")
    if len(set(items)) != len(items):
        raise ValueError(f"{name} lists an alphabet twice: {items}")
    return items


def _check_rotations(rotations: object) -> tuple[int, ...]:
    try:
        rots = tuple(rotations)  # type: ignore[call-overload]
    except TypeError as err:
        raise TypeError(f"rotations must be a sequence of angles, got {type(rotations).__name__}") from err
    if not rots or any(isinstance(r, bool) or r not in _ALL_ROTATIONS for r in rots) or len(set(rots)) != len(rots):
        raise ValueError(f"rotations must be distinct angles among (0, 90, 180, 270), got {rotations!r}")
    return tuple(int(r) for r in rots)


def omniglot_splits(
    data: OmniglotDataset | Sequence[str],
    *,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    counts: Sequence[int] | None = None,
    seed: int = 0,
) -> OmniglotSplits:
    """Seeded, alphabet-disjoint meta-train / meta-val / meta-test splits.

    The sorted alphabets are shuffled with `seed` and cut in that order (as `split_classes`
    does with classes): the same alphabets and seed always give the same split.

    Args:
        data: an `OmniglotDataset`, or the list of alphabet names.
        fractions: shares of the **alphabets** for train / val / test (largest remainder
            rounding); ignored when `counts` is given.
        counts: exact numbers of alphabets per split; their sum may be less than the number
            of alphabets.
        seed: seed of the shuffle.

    Returns:
        `OmniglotSplits` (alphabet names per split, and `seed`).

    Raises:
        ValueError: too few alphabets for the asked split, bad fractions or counts.

    Example:
        >>> omniglot_splits(data, counts=(5, 1, 2), seed=0).test
        ('Early_Aramaic', 'Sanskrit')
    """
    alphabets = sorted(set(data.alphabets if isinstance(data, OmniglotDataset) else _alphabet_list(data, "data")))
    seed = _int_arg(seed, "seed", minimum=0)
    try:
        idx = split_classes(torch.arange(len(alphabets)), fractions=fractions, counts=counts, seed=seed)
    except ValueError as err:
        raise ValueError(f"cannot split {len(alphabets)} alphabets {alphabets}: {err}") from err
    train, val, test = ([alphabets[i] for i in part] for part in idx)
    return OmniglotSplits(tuple(train), tuple(val), tuple(test), seed)


def omniglot_task_sampler(
    data: OmniglotDataset,
    splits: OmniglotSplits,
    split: str = "train",
    *,
    ways: int,
    shots: int,
    queries: int,
    rotations: Sequence[int] | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> TaskSampler:
    """A `TaskSampler` of N-way K-shot tasks over the classes of one alphabet split.

    Args:
        data: from `load_omniglot`.
        splits: from `omniglot_splits`.
        split: `"train"`, `"val"` or `"test"`.
        ways, shots, queries: N, K and query images per class (Omniglot has 20 drawings
            per character, so `shots + queries <= 20`).
        rotations: as in `OmniglotDataset.split` (default: all four for `"train"`).
        seed: the sampler's seed.
        **kwargs: passed to `TaskSampler` (`unlabeled=`, `unlabeled_pool=`).

    Returns:
        The sampler; `Task.classes` index `data.split(splits, split, rotations=...).classes`.

    Raises:
        ValueError: a split with fewer classes than `ways` (the message names the split and
            its alphabets), and `TaskSampler`'s own errors.
    """
    part = data.split(splits, split, rotations=rotations)
    ways = _int_arg(ways, "ways", minimum=1)
    if ways > part.num_classes:
        raise ValueError(
            f"ways={ways} is more than the {part.num_classes} classes of the Omniglot {split} split "
            f"(alphabets {list(getattr(splits, split))})"
        )
    return TaskSampler(part.images, part.labels, ways=ways, shots=shots, queries=queries, seed=seed, **kwargs)


# --------------------------------------------------------------------------- reading the sources


@dataclass
class _Source:
    kind: str  # "zip" or "dir"
    path: Path
    entries: list[tuple[str, str, str, str]] = field(default_factory=list)  # (alphabet, char, file, member)

    def fingerprint(self) -> list[Any]:
        """What the decoded images depend on, by content: the cache key of this source.

        A zip: the SHA-256 of its bytes. A folder: the SHA-256 over every PNG member's
        relative path and bytes (each framed by its length), in sorted order. Names, sizes
        and modification times are not used: `cp -p`, `rsync -t` or `os.utime` can keep them
        across a change of content, and a mere `touch` need not invalidate the cache.
        """
        h = hashlib.sha256()
        if self.kind == "zip":
            try:
                with open(self.path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
            except OSError as err:
                raise ValueError(f"cannot read {str(self.path)!r} ({err})") from err
            return ["zip", h.hexdigest()]
        for _, _, _, member in self.scan():
            try:
                data = (self.path / member).read_bytes()
            except OSError as err:
                raise ValueError(f"cannot read {member!r} from {str(self.path)!r} ({err})") from err
            name = member.encode()
            h.update(b"%d\0%s\0%d\0" % (len(name), name, len(data)))
            h.update(data)
        return ["dir", len(self.entries), h.hexdigest()]

    def scan(self) -> list[tuple[str, str, str, str]]:
        """The `(alphabet, character, file, member)` PNG entries of the source."""
        if self.entries:
            return self.entries
        if self.kind == "zip":
            try:
                with zipfile.ZipFile(self.path) as zf:
                    names = zf.namelist()
            except (zipfile.BadZipFile, OSError, EOFError) as err:
                raise ValueError(f"{str(self.path)!r} is not a readable zip archive ({err})") from err
        else:
            names = []
            for dirpath, _, files in os.walk(self.path):
                rel = os.path.relpath(dirpath, self.path).replace(os.sep, "/")
                names.extend(f if rel == "." else f"{rel}/{f}" for f in files)
        out = []
        for name in names:
            if "__MACOSX" in name or name.rsplit("/", 1)[-1].startswith("."):
                continue
            m = _ENTRY.search(name)
            if m:
                out.append((m[1], m[2], m[3], name))
        if not out:
            what = "zip" if self.kind == "zip" else "folder"
            raise ValueError(
                f"{what} {str(self.path)!r} does not look like Omniglot: it holds no "
                "<Alphabet>/character<NN>/*.png entries (expected the official images_background.zip, "
                "images_evaluation.zip or images_background_small1/2.zip layout)"
            )
        self.entries = sorted(out)
        return self.entries


def _find_sources(root: str | os.PathLike, sets: Sequence[str] | None) -> list[_Source]:
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a path, got {type(root).__name__}")
    path = Path(os.path.expanduser(os.fspath(root)))
    if not path.exists():
        raise FileNotFoundError(f"Omniglot path {str(path)!r} does not exist")
    wanted = _set_names(sets)
    if path.is_file():
        if sets is not None:
            raise ValueError(f"sets= selects archives inside a folder; root {str(path)!r} is a file")
        return [_Source("zip", path)]
    found = []
    for base in (path, path / "omniglot-py"):
        for name in wanted:
            if (base / name).is_dir():
                found.append(_Source("dir", base / name))
            elif (base / f"{name}.zip").is_file():
                found.append(_Source("zip", base / f"{name}.zip"))
        if found:
            break
    if sets is not None and len(found) < len(wanted):
        got = {s.path.name.removesuffix(".zip") for s in found}
        lacking = [n for n in wanted if n not in got]
        raise FileNotFoundError(
            f"folder {str(path)!r} has neither {lacking[0]}.zip nor an extracted {lacking[0]}/ folder "
            f"(asked sets={list(wanted)})"
        )
    if found:
        return found
    # a folder of <Alphabet>/character<NN>/*.png itself (e.g. an extracted images_background/)
    if any(p.is_dir() and any(c.is_dir() and re.fullmatch(r"character\d+", c.name, re.IGNORECASE)
                              for c in p.iterdir()) for p in path.iterdir()):
        return [_Source("dir", path)]
    raise FileNotFoundError(
        f"no Omniglot data in {str(path)!r}: expected {', '.join(n + '.zip' for n in OMNIGLOT_SETS)} "
        "(or their extracted folders), or a folder of <Alphabet>/character<NN>/*.png; "
        "download_omniglot(root) fetches the official zips"
    )


def _set_names(sets: Sequence[str] | str | None) -> tuple[str, ...]:
    if sets is None:
        return OMNIGLOT_SETS
    items = [sets] if isinstance(sets, str) else list(sets)
    names = []
    for s in items:
        if not isinstance(s, str):
            raise TypeError(f"sets must hold archive names, got {s!r}")
        n = s.removesuffix(".zip")
        if n not in OMNIGLOT_SETS:
            raise ValueError(f"unknown Omniglot set {s!r}; choose from {', '.join(OMNIGLOT_SETS)}")
        if n not in names:
            names.append(n)
    if not names:
        raise ValueError("sets is empty")
    return tuple(names)


def _pil_image():
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError(
            'the Omniglot loader decodes PNGs with Pillow: pip install "robust-meta[omniglot]"'
        ) from err
    return Image


def _resample_filter(resample: str) -> int:
    Image = _pil_image()

    return {"lanczos": Image.LANCZOS, "box": Image.BOX, "bilinear": Image.BILINEAR,
            "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[resample]


def _decode_png(data: bytes, image_size: int, resample: str) -> Any:
    """One PNG's bytes -> `(image_size, image_size)` uint8 numpy array (0 = stroke, 255 = paper)."""
    import numpy as np

    Image = _pil_image()
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L")
        if im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), _resample_filter(resample))
        return np.asarray(im, dtype=np.uint8)


def _decode_all(sources: list[_Source], image_size: int, resample: str) -> dict[str, Any]:
    import numpy as np

    # (alphabet, character, file) -> (source, member); the first source wins on duplicates
    # (the small sets share Greek and Latin, byte-identical; the full background set holds both)
    items: dict[tuple[str, str, str], tuple[_Source, str]] = {}
    for src in sources:
        for alphabet, char, fname, member in src.scan():
            items.setdefault((alphabet, char, fname), (src, member))
    keys = sorted(items)
    classes = sorted({f"{a}/{c}" for a, c, _ in keys})
    class_index = {c: i for i, c in enumerate(classes)}
    out = np.empty((len(keys), 1, image_size, image_size), dtype=np.uint8)
    labels = torch.empty(len(keys), dtype=torch.long)
    zips: dict[Path, zipfile.ZipFile] = {}
    try:
        for i, key in enumerate(keys):
            src, member = items[key]
            try:
                if src.kind == "zip":
                    if src.path not in zips:
                        zips[src.path] = zipfile.ZipFile(src.path)
                    data = zips[src.path].read(member)
                else:
                    data = (src.path / member).read_bytes()
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
                raise ValueError(f"cannot read {member!r} from {str(src.path)!r}: the archive is corrupt ({err})") from err
            try:
                out[i, 0] = _decode_png(data, image_size, resample)
            except (OSError, ValueError, SyntaxError) as err:
                raise ValueError(f"{member!r} in {str(src.path)!r} is not a readable PNG ({err})") from err
            labels[i] = class_index[f"{key[0]}/{key[1]}"]
    finally:
        for zf in zips.values():
            zf.close()
    return {
        "images": torch.from_numpy(out),
        "labels": labels,
        "classes": classes,
        "alphabets": sorted({c.split("/", 1)[0] for c in classes}),
    }


# --------------------------------------------------------------------------- the on-disk cache


def _default_cache_dir() -> Path:
    base = os.environ.get("ROBUST_META_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "robust_meta"
    )
    return Path(base) / "omniglot"


def _digest(images: Tensor, labels: Tensor, classes: list[str]) -> str:
    h = hashlib.sha256()
    h.update(images.contiguous().numpy().tobytes())
    h.update(labels.contiguous().numpy().tobytes())
    h.update("\n".join(classes).encode())
    return h.hexdigest()


def _read_cache(path: Path, key: str, image_size: int) -> dict[str, Any] | None:
    """The cached payload, or `None` when absent; a corrupt or stale file is reported and ignored."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != _CACHE_FORMAT or blob.get("key") != key:
            raise ValueError("unexpected contents")
        images, labels, classes = blob["images"], blob["labels"], list(blob["classes"])
        if (images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (1, image_size, image_size)
                or labels.shape != (len(images),) or blob["digest"] != _digest(images, labels, classes)):
            raise ValueError("shapes or checksum do not match")
        return {"images": images, "labels": labels, "classes": classes, "alphabets": list(blob["alphabets"])}
    except Exception as err:  # truncated zip container, unpickling error, bad digest, ...
        warnings.warn(f"Omniglot cache {str(path)!r} is corrupt ({err}); rebuilding it", RuntimeWarning, stacklevel=3)
        return None


# temp file in the same folder, fsync, os.replace, fsync of the folder (shared with train/eval)
_atomic_write = atomic_write


def load_omniglot(
    root: str | os.PathLike,
    *,
    sets: Sequence[str] | str | None = None,
    image_size: int = 28,
    resample: str = "lanczos",
    cache_dir: str | os.PathLike | None = None,
    cache: bool = True,
) -> OmniglotDataset:
    """Omniglot characters from the official zips or their extracted folders.

    `root` may be one zip, a folder holding some of the official zips (or their extracted
    folders, also under `omniglot-py/` as torchvision leaves them), or an extracted set folder
    (`<Alphabet>/character<NN>/*.png`). Every set found is read and merged; a character
    present in two sets (the small sets share Greek and Latin) is kept once, keyed
    `"Alphabet/characterNN"`. Images are resized with an antialiasing PIL filter and kept
    in the official polarity (white background = 1, strokes = 0).

    Decoded images are cached as one uint8 tensor file in `cache_dir`, keyed by the content
    of the sources (the SHA-256 of each zip's bytes; for a folder, of every PNG's relative
    path and bytes), `image_size` and `resample`: a second call does not decode a PNG, and a
    changed source is decoded again, even one whose size and modification time were kept
    (`cp -p`, `rsync -t`), while touching an unchanged source keeps the cache. Hashing
    reads every source byte on each call: about 1.5 ms per small-set zip and 50 ms per
    extracted small-set folder (~3000 PNGs) on a 2-core machine, files in the page cache.
    The cache file is written atomically (temporary file, fsync, rename); a corrupt one is
    detected by a checksum, reported with a `RuntimeWarning` and rebuilt.

    Args:
        root: a zip file or a folder, as above.
        sets: when `root` is a folder, the archives to read, among `OMNIGLOT_SETS` (e.g.
            `["images_background"]`); default all that are there.
        image_size: side of the square output images (105 keeps the originals).
        resample: PIL filter, `"lanczos"` (default), `"box"`, `"bilinear"`, `"bicubic"` or
            `"nearest"`.
        cache_dir: where to cache; default `$ROBUST_META_CACHE/omniglot`, else
            `~/.cache/robust_meta/omniglot`.
        cache: `False` decodes every time and writes nothing.

    Returns:
        `OmniglotDataset` `(images, labels, classes, alphabets)`; images float32 in [0, 1].

    Raises:
        FileNotFoundError: `root` does not exist, or holds no Omniglot data (or lacks a set
            asked in `sets`).
        ValueError: a zip that is corrupt or not Omniglot, an unreadable PNG, bad options.

    Shape:
        images: `(N, 1, image_size, image_size)`; labels: `(N,)`. The two small sets give
        N = 242 x 20 = 4840; the full background set 964 x 20.

    Example:
        >>> images, labels, classes, alphabets = load_omniglot("images_background_small1.zip")
        >>> classes[0]
        'Balinese/character01'
    """
    image_size = _int_arg(image_size, "image_size", minimum=1)
    if resample not in _RESAMPLE:
        raise ValueError(f"unknown resample {resample!r}; choose from {', '.join(_RESAMPLE)}")
    sources = _find_sources(root, sets)
    payload = None
    cache_path = None
    if cache:
        fingerprint = {"format": _CACHE_FORMAT, "image_size": image_size, "resample": resample,
                       "sources": [s.fingerprint() for s in sources]}
        key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
        folder = _default_cache_dir() if cache_dir is None else Path(os.path.expanduser(os.fspath(cache_dir)))
        cache_path = folder / f"omniglot-{image_size}-{key[:24]}.pt"
        payload = _read_cache(cache_path, key, image_size)
    if payload is None:
        payload = _decode_all(sources, image_size, resample)
        if cache_path is not None:
            blob = dict(payload, format=_CACHE_FORMAT, key=key,
                        digest=_digest(payload["images"], payload["labels"], payload["classes"]))
            try:
                _atomic_write(cache_path, lambda f: torch.save(blob, f))
            except OSError as err:
                warnings.warn(f"could not write the Omniglot cache {str(cache_path)!r}: {err}", RuntimeWarning,
                              stacklevel=2)
    images = payload["images"].float().div_(255.0)
    return OmniglotDataset(images, payload["labels"], payload["classes"], payload["alphabets"])


# --------------------------------------------------------------------------- download


def download_omniglot(
    root: str | os.PathLike,
    *,
    which: Sequence[str] | str = ("images_background", "images_evaluation"),
    base_url: str | None = None,
    sha256: Mapping[str, str] | None = None,
    overwrite: bool = False,
    timeout: float = 60.0,
) -> list[Path]:
    """Download official Omniglot zips into `root`, verified, written atomically.

    Each archive is streamed from `<base_url>/<name>.zip` into a temporary file next to its
    destination while its SHA-256 (and MD5) is computed; only a file whose checksum matches
    is renamed into place, so an interrupted or corrupted download leaves nothing behind.
    An archive already in `root` that passes the check is not downloaded again.

    Expected checksums: the SHA-256 in `sha256` when given, else the built-in one (known for
    the two small sets); for the full sets the authors publish none, so the MD5 sums that
    torchvision verifies are checked instead. Pass `sha256=` to pin them.

    Args:
        root: destination folder (created).
        which: names among `OMNIGLOT_SETS` (with or without `.zip`).
        base_url: where the zips are; default `$ROBUST_META_OMNIGLOT_URL`, else the
            authors' GitHub folder.
        sha256: expected SHA-256 hex digests by set name, overriding the built-in ones.
        overwrite: download again even when a verified file is present.
        timeout: socket timeout in seconds.

    Returns:
        The paths of the zips, in the order of `which`; pass `root` to `load_omniglot`.

    Raises:
        ValueError: a checksum mismatch (the message gives the URL, expected and actual
            digests), an unknown set name.
        OSError: the download failed (`urllib.error.URLError` with the URL).
    """
    import urllib.error
    import urllib.request

    names = _set_names(which)
    base = (base_url or os.environ.get("ROBUST_META_OMNIGLOT_URL") or DEFAULT_OMNIGLOT_URL).rstrip("/")
    pinned = dict(sha256 or {})
    for k in pinned:
        if k.removesuffix(".zip") not in OMNIGLOT_SETS:
            raise ValueError(f"sha256 has an unknown set {k!r}; choose from {', '.join(OMNIGLOT_SETS)}")
    pinned = {k.removesuffix(".zip"): v.lower() for k, v in pinned.items()}
    folder = Path(os.path.expanduser(os.fspath(root)))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        want_sha, want_md5 = _CHECKSUMS[name]
        if name in pinned:
            want_sha, want_md5 = pinned[name], None
        dest = folder / f"{name}.zip"
        url = f"{base}/{name}.zip"
        if dest.is_file() and not overwrite and _file_matches(dest, want_sha, want_md5):
            paths.append(dest)
            continue

        def fetch(f, url=url, want_sha=want_sha, want_md5=want_md5):
            h_sha, h_md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    while chunk := resp.read(1 << 20):
                        h_sha.update(chunk)
                        h_md5.update(chunk)
                        f.write(chunk)
            except urllib.error.URLError as err:
                raise urllib.error.URLError(f"downloading {url} failed: {err.reason}") from err
            _verify(url, h_sha.hexdigest(), h_md5.hexdigest(), want_sha, want_md5)

        _atomic_write(dest, fetch)
        paths.append(dest)
    return paths


def _verify(what: str, got_sha: str, got_md5: str, want_sha: str | None, want_md5: str | None) -> None:
    if want_sha is not None and got_sha != want_sha:
        raise ValueError(f"SHA-256 mismatch for {what}: expected {want_sha}, got {got_sha}")
    if want_md5 is not None and got_md5 != want_md5:
        raise ValueError(f"MD5 mismatch for {what}: expected {want_md5}, got {got_md5}")


def _file_matches(path: Path, want_sha: str | None, want_md5: str | None) -> bool:
    h_sha, h_md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h_sha.update(chunk)
            h_md5.update(chunk)
    try:
        _verify(str(path), h_sha.hexdigest(), h_md5.hexdigest(), want_sha, want_md5)
    except ValueError:
        return False
    return True
