"""`robust-meta reproduce miniimagenet` / `cifar-fs` end to end on fabricated archives (--quick).

The benchmark files are fabricated in the layouts researchers have (MetaOptNet's CIFAR-FS
pickles, the MiniImageNet pickle cache) with every class of the papers' splits and a few random
images a class: the numbers mean nothing, the pipeline is what is checked (a row, a checkpoint,
an audit for every (method, K), the table, the plot, the wall-time estimate, the reuse).
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from test_benchmark_training import _metaoptnet_cifar_fs

from robust_meta.cli import main
from robust_meta.reproduce import (
    BENCHMARK_METHODS,
    BENCHMARK_SPECS,
    OMNIGLOT_METHODS,
    PAPER_NAMES,
    BenchmarkReproduction,
    reproduce_benchmark,
    results_table,
)
from robust_meta.train import model_from_checkpoint

pytestmark = [pytest.mark.filterwarnings("ignore:step .*catastrophic overfitting:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore::robust_meta.AuditWarning")]

PER_CLASS = 7  # 5-shot + 2 queries (the quick settings)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ROBUST_META_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The quick models are tiny: one thread is as fast, and far faster on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _mini_pickle_cache(folder: Path, per_class: int = PER_CLASS, seed: int = 0) -> Path:
    """mini-imagenet-cache-{train,validation,test}.pkl: 64 / 16 / 20 made-up wnids."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    first = 0
    for fname, n_classes in (("train", 64), ("validation", 16), ("test", 20)):
        wnids = [f"n{first + i:08d}" for i in range(n_classes)]
        first += n_classes
        images = rng.integers(0, 256, (n_classes * per_class, 84, 84, 3), dtype=np.uint8)
        class_dict = {w: list(range(i * per_class, (i + 1) * per_class)) for i, w in enumerate(wnids)}
        with open(folder / f"mini-imagenet-cache-{fname}.pkl", "wb") as fh:
            pickle.dump({"image_data": images, "class_dict": class_dict}, fh, protocol=4)
    return folder


def _cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return _metaoptnet_cifar_fs(tmp_path_factory.mktemp("cifar") / "data", per_class=PER_CLASS)


@pytest.fixture(scope="module")
def cifar_run(cifar, tmp_path_factory):
    """The whole CIFAR-FS comparison (every method, 1- and 5-shot) through the command."""
    out = tmp_path_factory.mktemp("repro") / "out"
    code, stdout, stderr = _cli(["reproduce", "cifar-fs", "--data-folder", str(cifar), "--out", str(out),
                                 "--quick", "--no-progress", "--workers", "1", "--device", "cpu"])
    assert code == 0, stderr
    return out, stdout


def test_quick_cifar_fs_writes_a_row_table_plot_and_checkpoint_for_every_method_and_shot(cifar_run):
    out, stdout = cifar_run
    doc = json.loads((out / "results.json").read_text())
    runs = doc["runs"]
    assert [(r["method"], r["shots"]) for r in runs] == [(m, k) for m in BENCHMARK_METHODS for k in (1, 5)]
    for r in runs:
        assert set(r) >= {"method", "ways", "shots", "learner", "checkpoint", "sa", "ra", "eps", "train_seconds",
                          "eval_seconds", "n_tasks", "attack", "protocol", "audit", "benchmark"}
        assert r["ways"] == 5 and r["eps"] == pytest.approx(8 / 255) and r["benchmark"] == "cifar-fs"
        assert r["n_tasks"] == BENCHMARK_SPECS["cifar-fs"].quick().test_tasks and r["attack"] == "PGD-2"
        assert 0 <= r["ra"]["mean"] <= r["sa"]["mean"] + 1e-9 <= 1 + 1e-9
        assert r["checkpoint"] == f"runs/{r['method']}-{r['shots']}shot/best.pt"
        a = r["audit"]
        assert 0 <= a["ra_worst"]["mean"] <= a["ra_protocol"]["mean"] + 1e-12
    model, config, _ = model_from_checkpoint(out / "runs" / "rmaml-out-anil-5shot" / "best.pt")
    assert config.method == "anil" and config.shots == 5 and config.dataset == "cifar-fs"
    assert config.test_inner_steps == doc["settings"]["test_inner_steps"]
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 5)
    fgsm = model_from_checkpoint(out / "runs" / "rmaml-out-fgsm-1shot" / "best.pt")[1]
    assert fgsm.attack == "fgsm" and fgsm.attack_steps == 1 and fgsm.gamma_out == pytest.approx(0.2)
    assert doc["settings"]["benchmark"] == "cifar-fs" and doc["settings"]["classes"] == {
        "train": 64, "val": 16, "test": 20}
    table = (out / "table.md").read_text()
    for m in BENCHMARK_METHODS:
        assert f"| {PAPER_NAMES[m]} |" in table
    assert "1-shot SA | 1-shot RA | 5-shot SA | 5-shot RA" in table and "Strong-attack audit" in table
    assert "CIFAR-FS test classes" in table and "5-way" in table
    assert table == results_table(doc)
    for ext in ("png", "svg"):
        assert (out / f"cifar-fs_shots.{ext}").stat().st_size > 1000
    # the estimate: printed before training, and recorded
    est = doc["settings"]["estimate"]
    assert "estimated total wall time:" in stdout and "s per meta-step for maml-1shot" in stdout
    assert stdout.index("estimated total wall time") < stdout.index("| method |")
    assert est["runs"] == 12 and est["total_seconds"] > 0 and est["timing_steps"] == 1
    assert set(est["seconds_per_meta_step"]) == {f"{m}-{k}shot" for m in BENCHMARK_METHODS for k in (1, 5)}
    assert all(v > 0 for v in est["seconds_per_meta_step"].values())


def test_a_second_call_redoes_nothing(cifar_run, cifar, capsys):
    out, _ = cifar_run
    first = json.loads((out / "results.json").read_text())
    ckpts = sorted((out / "runs").glob("*/best.pt"))
    assert len(ckpts) == 12
    before = {p: p.stat().st_mtime_ns for p in ckpts}
    results = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/result.json")}
    settings = BENCHMARK_SPECS["cifar-fs"].quick()
    doc = reproduce_benchmark("cifar-fs", cifar, out, settings=settings, device="cpu", progress=False)
    assert {p: p.stat().st_mtime_ns for p in ckpts} == before  # not retrained
    assert {p: p.stat().st_mtime_ns for p in results} == results  # not re-evaluated
    assert [(r["sa"], r["ra"]) for r in doc["runs"]] == [(r["sa"], r["ra"]) for r in first["runs"]]
    assert doc["settings"]["estimate"]["runs"] == 0
    assert "every run is finished" in capsys.readouterr().out
    # a setting that is no part of any result (the timing) reuses everything too
    again = reproduce_benchmark("cifar-fs", cifar, out, settings=settings.replace(estimate_steps=2),
                                device="cpu", progress=False, estimate=False)
    assert again["settings"]["estimate"] is None
    assert {p: p.stat().st_mtime_ns for p in ckpts} == before


def test_quick_miniimagenet_from_the_pickle_cache(tmp_path, capsys):
    data = _mini_pickle_cache(tmp_path / "mini")
    settings = BENCHMARK_SPECS["miniimagenet"].quick(methods=("maml", "rmaml-out-anil"), audit_tasks=1)
    doc = reproduce_benchmark("miniimagenet", data, tmp_path / "out", settings=settings, device="cpu",
                              progress=False)
    assert [(r["method"], r["shots"]) for r in doc["runs"]] == [
        ("maml", 1), ("maml", 5), ("rmaml-out-anil", 1), ("rmaml-out-anil", 5)]
    for r in doc["runs"]:
        assert r["eps"] == pytest.approx(2 / 255) and r["learner"] == "maml" and r["train_mode"] is True
    assert doc["settings"]["estimate"]["runs"] == 4 and "estimated total wall time" in capsys.readouterr().out
    assert (tmp_path / "out" / "miniimagenet_shots.png").is_file()
    assert "MiniImageNet test classes" in (tmp_path / "out" / "table.md").read_text()
    config = model_from_checkpoint(tmp_path / "out" / doc["runs"][-1]["checkpoint"])[1]
    assert config.image_size == 84 and config.eps == pytest.approx(2 / 255)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["reproduce", "tiered", "--quick"], "invalid choice"),
        (["reproduce", "cifar-fs", "--quick", "--methods", "maml,bogus"], "unknown methods"),
        (["reproduce", "cifar-fs", "--quick", "--ways", "5"], "--ways is for omniglot only"),
        (["reproduce", "omniglot", "--quick", "--shots", "1"], "--shots is for miniimagenet and cifar-fs only"),
        (["reproduce", "cifar-fs", "--quick", "--shots", "1,x"], "--shots must be comma-separated integers"),
        (["reproduce", "cifar-fs", "--quick", "--shots", "0"], "shots must be distinct integers"),
        (["reproduce", "cifar-fs", "--quick", "--shots", "9"], "fewer images than shots + queries"),
        (["reproduce", "miniimagenet", "--quick"], "MiniImageNet"),  # a CIFAR-FS folder
        (["reproduce", "cifar-fs", "--quick", "--data-folder", "/no/such/folder"], "/no/such/folder"),
    ],
)
def test_bad_input_is_a_clear_error(argv, match, cifar, tmp_path):
    if "--data-folder" not in argv:
        argv = [*argv, "--data-folder", str(cifar)]
    code, _, err = _cli([*argv, "--out", str(tmp_path / "o"), "--no-progress", "--device", "cpu"])
    assert code == 2
    assert match in err
    assert "Traceback" not in err


def test_the_specs_are_the_papers_settings():
    for name, eps, size in (("miniimagenet", 2 / 255, 84), ("cifar-fs", 8 / 255, 32)):
        s = BENCHMARK_SPECS[name]
        assert s.dataset == name and s.eps == pytest.approx(eps) and s.image_size == size
        assert s.shots == (1, 5) and s.ways == 5 and s.queries == 15 and s.meta_batch == 4
        assert s.inner_steps == 5 and s.test_inner_steps == 10 and s.inner_lr == 0.01 and s.meta_lr == 1e-3
        assert s.train_attack_steps == 10 and s.eval_attack_steps == 10 and s.test_tasks == 600
        assert s.meta_steps == 10000 and not s.first_order
        cfg = s.train_config("rmaml-out-at", 5, "/data")
        assert cfg.gamma_out == pytest.approx(0.2) and cfg.attack_steps == 10 and cfg.shots == 5
        assert cfg.model == "conv4" and cfg.in_channels == 3 and cfg.image_size == size
        assert s.train_config("rmaml-out-trades", 1, "/data").gamma_out == pytest.approx(5.0)
        assert s.train_config("aq", 1, "/data").gamma_out == float("inf")
        assert s.train_config("maml", 1, "/data").attack_steps is None
    assert set(OMNIGLOT_METHODS) <= set(BENCHMARK_METHODS)  # the shared names are the same methods
    assert all(BENCHMARK_METHODS[m] == OMNIGLOT_METHODS[m] for m in OMNIGLOT_METHODS)
    with pytest.raises(ValueError, match="unknown methods"):
        BENCHMARK_SPECS["cifar-fs"].replace(methods=("protonet",))
    with pytest.raises(ValueError, match="audit_tasks"):
        BENCHMARK_SPECS["cifar-fs"].replace(audit_tasks=601)
    with pytest.raises(ValueError, match="unknown benchmark"):
        reproduce_benchmark("omniglot", "/x", "/y")
    with pytest.raises(ValueError, match="settings are for 'cifar-fs'"):
        reproduce_benchmark("miniimagenet", "/x", "/y", settings=BENCHMARK_SPECS["cifar-fs"])
    with pytest.raises(TypeError, match="BenchmarkReproduction"):
        reproduce_benchmark("cifar-fs", "/x", "/y", settings=object())
    assert isinstance(BENCHMARK_SPECS["cifar-fs"].quick(), BenchmarkReproduction)


def test_two_worker_processes_do_every_run(cifar, tmp_path):
    settings = BENCHMARK_SPECS["cifar-fs"].quick(methods=("maml", "rmaml-out-fgsm"), audit_tasks=0)
    doc = reproduce_benchmark("cifar-fs", cifar, tmp_path / "out", settings=settings, device="cpu",
                              progress=False, workers=2, estimate=False)
    assert [(r["method"], r["shots"]) for r in doc["runs"]] == [
        ("maml", 1), ("maml", 5), ("rmaml-out-fgsm", 1), ("rmaml-out-fgsm", 5)]
    assert doc["settings"]["workers"] == 2 and doc["settings"]["estimate"] is None
    for r in doc["runs"]:
        assert (tmp_path / "out" / r["checkpoint"]).is_file() and "audit" not in r
    with pytest.raises(ValueError, match="workers"):
        reproduce_benchmark("cifar-fs", cifar, tmp_path / "out", settings=settings, workers=0)
