"""Task sources of a training run: reproducible task batches of the train / val / test splits.

Re-exported by `robust_meta.train` (`build_task_sources`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._train_config import TrainConfig
from .data import Task
from .datasets._benchmark import BENCHMARKS
from .presets import DATASET_PRESETS

__all__ = ["build_task_sources", "data_identity", "omniglot_split_for"]


class _TaskSource:
    """Samples ``n`` tasks of one split reproducibly from a seed.

    ``identity`` says what the data are (see `data_identity`), the same for every split of
    one dataset.
    """

    def __init__(self, sample: Callable[[int, int], list[Task]], name: str, identity: dict[str, Any] | None = None):
        self._sample = sample
        self.name = name
        self.identity = identity

    def sample(self, n: int, seed: int) -> list[Task]:
        return self._sample(n, seed)


def _sha256_tensors(*tensors: Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}:{tuple(t.shape)}\0".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _array_identity(kind: str, images: Tensor, labels: Tensor, splits: Any) -> dict[str, Any]:
    """What an in-memory dataset is: a hash of its images and labels, and its class splits."""
    as_lists = {name: [str(c) for c in classes] for name, classes in zip(("train", "val", "test"), splits)}
    return {"kind": kind, "sha256": _sha256_tensors(images, labels), "splits": as_lists}


def _files_identity(kind: str, folder: Path) -> dict[str, Any]:
    """What a folder of (possibly huge) data files is: names, sizes, and a hash of each file's
    first and last MiB (a full hash of many GB would cost minutes at every start)."""
    files = []
    paths = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    for path in paths:
        h = hashlib.sha256()
        size = path.stat().st_size
        with path.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                h.update(fh.read())
        files.append([path.name if path == folder else str(path.relative_to(folder)), size, h.hexdigest()])
    return {"kind": kind, "files": files}


def data_identity(sources: dict[str, _TaskSource]) -> dict[str, Any] | None:
    """What the data of a training run are, independent of where they lie (JSON-able).

    In-memory datasets (digits, ``tensor:PATH``, Omniglot from the official zips): the SHA-256
    of the decoded images and labels and the class lists of the train / val / test splits
    (Omniglot: its alphabet split). torchmeta folders: every file's name, size and a hash of
    its first and last MiB. MiniImageNet / tieredImageNet / CIFAR-FS / FC100 read by
    `robust_meta.datasets.load_benchmark`: per split, a hash of every label, the class list and
    2048 evenly spaced images. Two folders with the same identity give the same tasks; a change
    of content, of the images present or of the split changes it. `robust_meta.train` stores
    it in ``last.pt`` and refuses to resume on other data (another path to the *same* data is
    fine); ``reproduce`` and ``eval --resume`` key their reuse on it.
    """
    return sources["train"].identity if "train" in sources else None


def build_task_sources(config: TrainConfig) -> dict[str, _TaskSource]:
    """``{"train", "val", "test"}`` task sources for a resolved config (disjoint classes).

    ``digits`` uses `robust_meta.data.digits_splits` (4 / 3 / 3 classes); ``omniglot`` is read
    by `robust_meta.datasets.load_omniglot` from ``data_folder`` (the official zips or their
    extracted folders) and split by alphabet (see `omniglot_split_for`), meta-training with
    the 90°/180°/270° rotation classes (a torchmeta root holding ``omniglot/data.hdf5`` is
    read by torchmeta with its own splits); a
    ``tensor:PATH`` dataset is split 60 / 20 / 20 % of its classes with seed 0; the other
    torchmeta datasets use their own meta-train / meta-val / meta-test splits.

    Raises:
        FileNotFoundError: the dataset's folder (``data_folder``) or tensor file is missing.
        ValueError: a split has fewer classes than ``ways``, or classes with too few images.
    """
    from . import data as D

    name = config.dataset
    if name == "omniglot" or name.startswith("omniglot-"):
        folder = Path(config.data_folder).expanduser() if config.data_folder else None
        if folder is not None and (folder / "omniglot" / "data.hdf5").is_file():
            # a torchmeta root (omniglot/data.hdf5): torchmeta's loader and Vinyals splits
            for split in ("train", "val", "test"):
                D.check_torchmeta_folder("omniglot", str(folder), split=split)
            return _torchmeta_sources(config, D, dataset="omniglot",
                                      identity=_files_identity("torchmeta:omniglot", folder / "omniglot"))
        return _omniglot_sources(config, D)
    if name in BENCHMARKS and config.data_folder:
        not_torchmeta = _torchmeta_mismatch(name, config.data_folder, D)
        if not_torchmeta is not None:
            return _benchmark_sources(config, not_torchmeta)
    if name in DATASET_PRESETS and DATASET_PRESETS[name].needs_folder:
        folder = config.data_folder
        if not folder:
            raise FileNotFoundError(
                f"dataset {name!r} needs --data-folder (the torchmeta root folder holding it)"
            )
        if not Path(folder).expanduser().is_dir():
            raise FileNotFoundError(f"data folder {folder!r} for dataset {name!r} does not exist")
        key = None
        for split in ("train", "val", "test"):
            key = D.check_torchmeta_folder(name, folder, split=split)
        from .datasets.torchmeta import _TORCHMETA_DATASETS

        sub = _TORCHMETA_DATASETS[key][1]
        return _torchmeta_sources(config, D, identity=_files_identity(f"torchmeta:{key}", Path(folder).expanduser() / sub))
    if name == "digits":
        images, labels = D.load_digits()
        splits = D.digits_splits(seed=0)
    else:
        path = name.split(":", 1)[1]
        if not Path(path).is_file():
            raise FileNotFoundError(f"tensor dataset file {path!r} does not exist")
        images, labels = D.load_tensor_dataset(path)
        splits = D.split_classes(labels, seed=0)
    return _array_sources(config, images, labels, splits, D)


def _torchmeta_mismatch(name: str, folder: str, D: Any) -> str | None:
    """``None`` if ``folder`` holds torchmeta's processed files of ``name`` (every split), else
    what is missing (torchmeta's own message)."""
    try:
        for split in ("train", "val", "test"):
            D.check_torchmeta_folder(name, folder, split=split)
    except (FileNotFoundError, ValueError) as err:
        return str(err)
    return None


def _split_fingerprint(part: Any, sample: int = 2048) -> str:
    """What one benchmark split is, by content and independent of where it lies: the SHA-256 of
    its shape, every label, its class list and ``sample`` evenly spaced images (hashing all of a
    memory-mapped tieredImageNet split, 9.5 GB, would read it whole at every start)."""
    n = len(part.labels)
    idx = torch.linspace(0, max(n - 1, 0), min(n, sample)).round().long().unique()
    h = hashlib.sha256(_sha256_tensors(part.images[idx], part.labels).encode())
    h.update(f"{tuple(part.images.shape)}\0{chr(10).join(part.classes)}".encode())
    return h.hexdigest()


def _benchmark_sources(config: TrainConfig, not_torchmeta: str = "") -> dict[str, _TaskSource]:
    """Task sources of MiniImageNet / tieredImageNet / CIFAR-FS / FC100 read by
    `robust_meta.datasets.load_benchmark` from the files in ``data_folder`` (any layout it reads;
    ``not_torchmeta``: why the folder is not a torchmeta root, for the error when it is neither).

    Images stay uint8 (memory-mapped where large) and become float per task.
    """
    from .data import TaskSampler
    from .datasets import LayoutError, load_benchmark

    root = Path(config.data_folder).expanduser()
    try:
        parts = {split: load_benchmark(config.dataset, root, split) for split in ("train", "val", "test")}
    except LayoutError as err:  # none of the files we read, nor torchmeta's: say both
        raise LayoutError(f"{err}\n  - or torchmeta's processed files ({not_torchmeta})") from None
    want = (config.in_channels, config.image_size, config.image_size)
    identity = {"kind": f"benchmark:{config.dataset}",
                "splits": {split: _split_fingerprint(p) for split, p in parts.items()},
                "classes": {split: list(p.classes) for split, p in parts.items()}}
    sources = {}
    for split, part in parts.items():
        if tuple(part.images.shape[1:]) != want:
            raise ValueError(
                f"{config.dataset} {split} images are {tuple(part.images.shape[1:])} (C, H, W) in "
                f"{str(root)!r} ({part.layout}), but the config asks for {want}: set image_size="
                f"{part.images.shape[-1]} and in_channels={part.images.shape[1]}"
            )
        if part.num_classes < config.ways:
            raise ValueError(f"the {split} split of {config.dataset!r} has {part.num_classes} classes, "
                             f"fewer than ways={config.ways}")
        sampler = TaskSampler(part.images, part.labels, ways=config.ways, shots=config.shots,
                              queries=config.queries, unlabeled=config.unlabeled if split == "train" else 0,
                              seed=0)

        def sample(n: int, seed: int, sampler=sampler) -> list[Task]:
            sampler.generator.manual_seed(seed)  # the stream of step s depends on (seed, s) only
            return sampler.sample(n)

        sources[split] = _TaskSource(sample, split, identity)
    return sources


def _array_sources(config: TrainConfig, images: Tensor, labels: Tensor, splits: Any, D: Any) -> dict[str, _TaskSource]:
    identity = _array_identity("tensors", images, labels, splits)
    sources = {}
    for split_name, classes in zip(("train", "val", "test"), splits):
        if len(classes) < config.ways:
            raise ValueError(
                f"the {split_name} split of {config.dataset!r} has {len(classes)} classes "
                f"({list(classes)}), fewer than ways={config.ways}"
            )
        sampler = D.TaskSampler(
            images, labels, ways=config.ways, shots=config.shots, queries=config.queries,
            classes=list(classes), unlabeled=config.unlabeled if split_name == "train" else 0, seed=0,
        )

        def sample(n: int, seed: int, sampler=sampler) -> list[Task]:
            sampler.generator.manual_seed(seed)  # the stream of step s depends on (seed, s) only
            return sampler.sample(n)

        sources[split_name] = _TaskSource(sample, split_name, identity)
    return sources


def _torchmeta_sources(config: TrainConfig, D: Any, dataset: str | None = None,
                       identity: dict[str, Any] | None = None) -> dict[str, _TaskSource]:
    sources = {}
    dataset = config.dataset if dataset is None else dataset
    for split_name in ("train", "val", "test"):
        def sample(n: int, seed: int, split_name=split_name) -> list[Task]:
            return D.torchmeta_tasks(
                dataset, config.data_folder, split=split_name, ways=config.ways,
                shots=config.shots, queries=config.queries, n_tasks=n, seed=seed % 2**63,
                image_size=config.image_size,
            )

        sources[split_name] = _TaskSource(sample, split_name, identity)
    return sources


def omniglot_split_for(data: Any) -> Any:
    """The alphabet split a training run on Omniglot uses (recorded in ``splits.json``).

    The official evaluation set (``images_evaluation``), when present, is the meta-test set
    (as in MAML); the background alphabets are split 80 / 20 % into meta-train / meta-val.
    Otherwise (e.g. the two "background small" sets: 8 alphabets) the alphabets are split
    50 / 25 / 25 % with seed 0 (4 / 2 / 2 of the 8 alphabets of the two small sets).
    """
    from .datasets import OmniglotSplits, omniglot_splits

    background = [a for a in data.alphabets if a not in _EVALUATION_ALPHABETS]
    evaluation = [a for a in data.alphabets if a in _EVALUATION_ALPHABETS]
    if evaluation and len(background) >= 2:
        import torch

        perm = torch.randperm(len(background), generator=torch.Generator().manual_seed(0), device="cpu").tolist()
        k = max(1, round(0.2 * len(background)))
        val = tuple(sorted(background[i] for i in perm[:k]))
        train = tuple(sorted(background[i] for i in perm[k:]))
        return OmniglotSplits(train=train, val=val, test=tuple(sorted(evaluation)), seed=0)
    return omniglot_splits(data, fractions=(0.5, 0.25, 0.25), seed=0)


#: The 20 alphabets of the official `images_evaluation` set (Lake et al.).
_EVALUATION_ALPHABETS = frozenset({
    "Angelic", "Atemayar_Qelisayer", "Atlantean", "Aurek-Besh", "Avesta", "Ge_ez", "Glagolitic",
    "Gurmukhi", "Kannada", "Keble", "Malayalam", "Manipuri", "Mongolian", "Old_Church_Slavonic_(Cyrillic)",
    "Oriya", "Sylheti", "Syriac_(Serto)", "Tengwar", "Tibetan", "ULOG",
})


def _omniglot_sources(config: TrainConfig, D: Any) -> dict[str, _TaskSource]:
    folder = config.data_folder
    if not folder:
        raise FileNotFoundError(
            f"dataset {config.dataset!r} needs --data-folder: a folder holding the official Omniglot zips "
            "(images_background.zip, images_evaluation.zip or images_background_small1/2.zip) "
            "or their extracted folders"
        )
    if not Path(folder).expanduser().exists():
        raise FileNotFoundError(f"data folder {folder!r} for dataset {config.dataset!r} does not exist")
    data = D.load_omniglot(Path(folder).expanduser(), image_size=config.image_size)
    splits = omniglot_split_for(data)
    identity = omniglot_identity(data, splits)
    sources = {}
    for split_name in ("train", "val", "test"):
        sampler = D.omniglot_task_sampler(
            data, splits, split_name, ways=config.ways, shots=config.shots, queries=config.queries,
            seed=0,
        )

        def sample(n: int, seed: int, sampler=sampler) -> list[Task]:
            sampler.generator.manual_seed(seed)  # the stream of step s depends on (seed, s) only
            return sampler.sample(n)

        sources[split_name] = _TaskSource(sample, split_name, identity)
    sources["train"].splits = splits  # type: ignore[attr-defined]
    return sources


def omniglot_identity(data: Any, splits: Any) -> dict[str, Any]:
    """`data_identity` of Omniglot read by `robust_meta.datasets.load_omniglot`: content + alphabet split."""
    return {"kind": "omniglot", "sha256": _sha256_tensors(data.images, data.labels),
            "classes": hashlib.sha256("\n".join(data.classes).encode()).hexdigest(),
            "splits": {k: list(v) for k, v in splits.to_dict().items() if k in ("train", "val", "test")}}
