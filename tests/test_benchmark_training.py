"""`robust-meta train` / `eval` on a benchmark folder read by `load_benchmark` (fabricated files).

The loaders themselves are tested in tests/test_benchmarks_mini_cifar.py and
tests/test_benchmarks_tiered.py; this is the seam between them and training: the uint8 images
become float tasks of the right split, the run is keyed by the data, and a size mismatch is a
clear error.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from robust_meta.cli import main
from robust_meta.datasets import load_benchmark
from robust_meta.datasets.cifar import cifar100_names, cifar_fs_classes
from robust_meta.train import TrainConfig, build_task_sources, data_identity, load_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:step .*catastrophic overfitting:RuntimeWarning")


def _metaoptnet_cifar_fs(folder, per_class=4, seed=0):
    """MetaOptNet's CIFAR_FS_{train,val,test}.pickle: uint8 N×32×32×3, CIFAR-100 fine ids."""
    rng = np.random.default_rng(seed)
    fine = list(cifar100_names()["fine"])
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        ids = [fine.index(c) for c in cifar_fs_classes(split)]
        labels = [i for i in ids for _ in range(per_class)]
        data = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
        with open(folder / f"CIFAR_FS_{split}.pickle", "wb") as fh:
            pickle.dump({"data": data, "labels": labels}, fh, protocol=2)
    return folder


def test_tasks_are_float_images_of_their_own_split(tmp_path):
    root = _metaoptnet_cifar_fs(tmp_path / "cifar")
    cfg = TrainConfig(dataset="cifar-fs", data_folder=str(root), ways=5, shots=1, queries=2).resolved()
    sources = build_task_sources(cfg)
    for split in ("train", "val", "test"):
        part = load_benchmark("cifar-fs", root, split)
        pixels = {part.images[i].numpy().tobytes(): part.classes[int(part.labels[i])] for i in range(len(part))}
        for task in sources[split].sample(3, seed=1):
            assert task.support_x.dtype == torch.float32 and task.support_x.shape == (5, 3, 32, 32)
            for x in torch.cat([task.support_x, task.query_x]):
                raw = (x * 255).round().to(torch.uint8).numpy().tobytes()
                assert raw in pixels  # an image of this split, exactly /255
            names = [part.classes[int(c)] for c in task.classes]
            assert set(names) <= set(cifar_fs_classes(split))
    ident = data_identity(sources)
    assert ident["kind"] == "benchmark:cifar-fs" and len(ident["classes"]["train"]) == 64
    # the same files elsewhere, next to unrelated ones: the same identity (content, not path)
    import shutil

    copy = shutil.copytree(root, tmp_path / "elsewhere" / "cifar")
    (copy.parent / "unrelated.bin").write_bytes(b"x" * 10)
    assert data_identity(build_task_sources(cfg.replace(data_folder=str(copy)))) == ident
    # other pixels, same names and sizes: another identity (a resume onto them is refused)
    other = _metaoptnet_cifar_fs(tmp_path / "other", seed=1)
    assert data_identity(build_task_sources(cfg.replace(data_folder=str(other)))) != ident


def test_a_size_mismatch_is_a_clear_error(tmp_path):
    root = _metaoptnet_cifar_fs(tmp_path / "cifar")
    cfg = TrainConfig(dataset="cifar-fs", data_folder=str(root), image_size=28).resolved()
    with pytest.raises(ValueError, match=r"\(3, 32, 32\).*image_size=32"):
        build_task_sources(cfg)


def test_train_and_eval_commands_on_a_benchmark_folder(tmp_path, capsys):
    root = _metaoptnet_cifar_fs(tmp_path / "cifar")
    out = tmp_path / "run"
    code = main(["train", "--dataset", "cifar-fs", "--data-folder", str(root), "--method", "rmaml-out",
                 "--attack", "fgsm", "--ways", "5", "--shots", "1", "--queries", "2", "--meta-batch", "2",
                 "--meta-steps", "2", "--inner-steps", "1", "--test-inner-steps", "1", "--first-order",
                 "--eval-every", "2", "--val-tasks", "2", "--eval-attack-steps", "1", "--hidden", "4",
                 "--device", "cpu", "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert load_checkpoint(out / "last.pt")["extra"]["data"]["kind"] == "benchmark:cifar-fs"
    code = main(["eval", str(out / "best.pt"), "--tasks", "2", "--attack-steps", "1",
                 "--out", str(tmp_path / "ev.json"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["metrics"]["sa"]["n"] == 2 and ev["settings"]["split"] == "test"
