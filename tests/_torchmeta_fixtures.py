"""Tiny fabricated datasets in the exact on-disk layout torchmeta 1.8.0 reads.

No download: each writer produces the files that torchmeta's ``_check_integrity`` looks for
(``download=False``), with random uint8 images, so that torchmeta's own loaders,
``ClassSplitter`` and ``BatchMetaDataLoader`` run for real.

* Omniglot: ``<root>/omniglot/data.hdf5`` (groups ``images_background|images_evaluation/
  <alphabet>/<character>``, ``(n, 105, 105)`` uint8) and ``vinyals_{split}_labels.json``
  (sorted ``[group, alphabet, character]`` triples).
* MiniImageNet: ``<root>/miniimagenet/{split}_data.hdf5`` (group ``datasets/<class>``,
  ``(n, 84, 84, 3)`` uint8) and ``{split}_labels.json`` (sorted class names).
* CIFAR-FS / FC100: ``<root>/cifar100/data.hdf5`` (``<coarse>/<fine>``, ``(n, 32, 32, 3)``
  uint8), ``fine_names.json`` and ``cifar-fs|fc100/{split}_labels.json``
  (``[coarse, fine]`` pairs).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def write_omniglot(root: str | Path, *, n_classes: int = 6, n_images: int = 4, size: int = 105,
                   seed: int = 0) -> Path:
    """Omniglot with ``n_classes`` characters in each of the train/val/test splits."""
    import h5py

    folder = Path(root) / "omniglot"
    folder.mkdir(parents=True, exist_ok=True)
    rng = _rng(seed)
    with h5py.File(folder / "data.hdf5", "w") as f:
        for split in SPLITS:
            group = "images_evaluation" if split == "test" else "images_background"
            labels = []
            for c in range(n_classes):
                alphabet, character = f"Alphabet_{split}", f"character{c:02d}"
                data = rng.integers(0, 256, size=(n_images, size, size), dtype=np.uint8)
                f.create_dataset(f"{group}/{alphabet}/{character}", data=data)
                labels.append([group, alphabet, character])
            (folder / f"vinyals_{split}_labels.json").write_text(json.dumps(sorted(labels)))
    return folder


def write_miniimagenet(root: str | Path, *, n_classes: int = 6, n_images: int = 4, size: int = 84,
                       seed: int = 0) -> Path:
    """MiniImageNet with ``n_classes`` classes per split (``{split}_data.hdf5`` + json)."""
    import h5py

    folder = Path(root) / "miniimagenet"
    folder.mkdir(parents=True, exist_ok=True)
    rng = _rng(seed)
    for split in SPLITS:
        names = [f"n{split[:2]}{c:06d}" for c in range(n_classes)]
        with h5py.File(folder / f"{split}_data.hdf5", "w") as f:
            group = f.create_group("datasets")
            for name in names:
                group.create_dataset(
                    name, data=rng.integers(0, 256, size=(n_images, size, size, 3), dtype=np.uint8)
                )
        (folder / f"{split}_labels.json").write_text(json.dumps(sorted(names)))
    return folder


def write_cifar100(root: str | Path, *, n_classes: int = 6, n_images: int = 4, seed: int = 0,
                   subfolders: tuple[str, ...] = ("cifar-fs", "fc100")) -> Path:
    """CIFAR-100 derived sets (CIFAR-FS, FC100) with ``n_classes`` fine classes per split."""
    import h5py

    folder = Path(root) / "cifar100"
    folder.mkdir(parents=True, exist_ok=True)
    rng = _rng(seed)
    fine_names: dict[str, list[str]] = {}
    split_labels: dict[str, list[list[str]]] = {}
    with h5py.File(folder / "data.hdf5", "w") as f:
        for split in SPLITS:
            coarse = f"coarse_{split}"
            fine = [f"fine_{split}_{c}" for c in range(n_classes)]
            for name in fine:
                f.create_dataset(
                    f"{coarse}/{name}", data=rng.integers(0, 256, size=(n_images, 32, 32, 3), dtype=np.uint8)
                )
            fine_names[coarse] = fine
            split_labels[split] = [[coarse, name] for name in fine]
    (folder / "fine_names.json").write_text(json.dumps(fine_names))
    for sub in subfolders:
        (folder / sub).mkdir(exist_ok=True)
        for split in SPLITS:
            (folder / sub / f"{split}_labels.json").write_text(json.dumps(split_labels[split]))
    return folder
