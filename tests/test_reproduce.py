"""`robust-meta reproduce omniglot` end to end on the real Omniglot small sets, and Omniglot as a
train/eval dataset."""

import json
import math
from pathlib import Path

import pytest
import torch

from robust_meta.cli import main
from robust_meta.presets import DATASET_PRESETS
from robust_meta.reproduce import OMNIGLOT_METHODS, OmniglotReproduction, reproduce_omniglot
from robust_meta.train import model_from_checkpoint

OMNIGLOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"
needs_data = pytest.mark.skipif(not (OMNIGLOT / "images_background_small1.zip").is_file(),
                                reason=f"the Omniglot small sets are not at {OMNIGLOT}")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ROBUST_META_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro") / "out"
    code = main(["reproduce", "omniglot", "--data-folder", str(OMNIGLOT), "--out", str(out),
                 "--quick", "--no-progress"])
    return code, out


@needs_data
def test_quick_reproduction_writes_results_table_plot_and_loadable_checkpoints(quick_run, capsys):
    code, out = quick_run
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    runs = doc["runs"]
    assert {(r["method"], r["ways"]) for r in runs} == {(m, n) for m in OMNIGLOT_METHODS for n in (5, 10, 15, 20)}
    for r in runs:
        assert set(r) >= {"method", "ways", "shots", "checkpoint", "sa", "ra", "eps", "train_seconds"}
        assert r["shots"] == 1 and r["eps"] == pytest.approx(10 / 255)
        for metric in ("sa", "ra"):
            assert 0 <= r[metric]["mean"] <= 1 and r[metric]["ci95"] >= 0
        assert r["ra"]["mean"] <= r["sa"]["mean"] + 1e-9
        assert r["train_seconds"] > 0 and not Path(r["checkpoint"]).is_absolute()
    model, config, _ = model_from_checkpoint(out / runs[-1]["checkpoint"])
    assert config.ways == runs[-1]["ways"] and config.dataset.startswith("omniglot")
    assert config.inner_lr == doc["settings"]["inner_lr"] and config.test_inner_steps == doc["settings"]["test_inner_steps"]
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, runs[-1]["ways"])
    splits = doc["settings"]["splits"]
    assert not set(splits["test"]) & (set(splits["train"]) | set(splits["val"]))
    assert not set(splits["train"]) & set(splits["val"])
    table = (out / "table.md").read_text()
    assert all(name in table for name in ("MAML", "AQ", "R-MAML_out (AT)", "R-MAML_out (TRADES)", "R-MAML_out-FGSM"))
    for ext in ("png", "svg"):
        assert (out / f"omniglot_ways.{ext}").stat().st_size > 1000


@needs_data
def test_a_second_call_redoes_nothing_and_a_lost_result_is_re_evaluated_only(quick_run):
    _, out = quick_run
    first = json.loads((out / "results.json").read_text())
    ckpt = out / "runs" / "aq-10way" / "best.pt"
    before = ckpt.stat().st_mtime_ns
    (out / "runs" / "aq-10way" / "result.json").unlink()
    settings = OmniglotReproduction.quick()
    doc = reproduce_omniglot(OMNIGLOT, out, settings=settings, progress=False)
    assert ckpt.stat().st_mtime_ns == before  # not retrained
    again = {(r["method"], r["ways"]): r for r in doc["runs"]}
    for r in first["runs"]:
        other = again[(r["method"], r["ways"])]
        assert other["sa"] == r["sa"] and other["ra"] == r["ra"]  # same numbers (seeded evaluation)


@needs_data
def test_a_finished_run_saved_before_the_learner_option_is_reused_as_maml(quick_run):
    """A last.pt written before `TrainConfig.learner` existed holds a MAML run: reused, not redone."""
    from robust_meta.reproduce import _training_state
    from robust_meta.train import TrainConfig, load_checkpoint

    _, out = quick_run
    run = out / "runs" / "maml-5way"
    last = load_checkpoint(run / "last.pt")
    assert last["config"].pop("learner") == "maml"
    torch.save(last, run / "last.pt")
    before = (run / "best.pt").stat().st_mtime_ns
    reproduce_omniglot(OMNIGLOT, out, settings=OmniglotReproduction.quick(), progress=False)
    assert (run / "best.pt").stat().st_mtime_ns == before  # not retrained
    cfg = TrainConfig.from_dict(last["config"])  # learner: the default, maml
    assert _training_state(run, cfg, last["extra"]["data"]) == "finished"
    assert _training_state(run, cfg.replace(learner="protonet"), last["extra"]["data"]) == "other"


@needs_data
def test_an_interrupted_run_resumes(tmp_path):
    settings = OmniglotReproduction.quick(methods=("rmaml-out-fgsm",), ways=(5,), meta_steps=4, eval_every=2)
    out = tmp_path / "out"
    calls = {"n": 0}

    import robust_meta.train as T

    original = T._train

    def interrupt_once(*args, **kwargs):
        cb = kwargs.get("callback")

        def stop(step, record):
            if step == 2 and calls["n"] == 0:
                calls["n"] += 1
                raise KeyboardInterrupt
            if cb:
                cb(step, record)

        kwargs["callback"] = stop
        return original(*args, **kwargs)

    T._train = interrupt_once
    try:
        with pytest.raises(KeyboardInterrupt):
            reproduce_omniglot(OMNIGLOT, out, settings=settings, progress=False)
    finally:
        T._train = original
    run = out / "runs" / "rmaml-out-fgsm-5way"
    assert (run / "last.pt").is_file() and not (run / "result.json").exists()
    assert not (out / "results.json").exists()
    doc = reproduce_omniglot(OMNIGLOT, out, settings=settings, progress=False)
    fresh = reproduce_omniglot(OMNIGLOT, tmp_path / "fresh", settings=settings, progress=False)
    assert doc["runs"][0]["sa"] == fresh["runs"][0]["sa"] and doc["runs"][0]["ra"] == fresh["runs"][0]["ra"]


@needs_data
def test_two_worker_processes_do_every_run(tmp_path):
    settings = OmniglotReproduction.quick(methods=("maml", "rmaml-out-fgsm"), ways=(5, 10))
    doc = reproduce_omniglot(OMNIGLOT, tmp_path / "out", settings=settings, progress=False, workers=2)
    assert [(r["method"], r["ways"]) for r in doc["runs"]] == [
        ("maml", 5), ("maml", 10), ("rmaml-out-fgsm", 5), ("rmaml-out-fgsm", 10)]
    assert doc["settings"]["workers"] == 2
    for r in doc["runs"]:
        assert (tmp_path / "out" / r["checkpoint"]).is_file() and 0 <= r["ra"]["mean"] <= r["sa"]["mean"] + 1e-9
    with pytest.raises(ValueError, match="workers"):
        reproduce_omniglot(OMNIGLOT, tmp_path / "out", settings=settings, workers=0)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--data-folder", "/no/such/folder"], "no/such/folder"),
        (["--methods", "maml,bogus"], "unknown methods"),
        (["--ways", "5,x"], "--ways"),
        (["--ways", "60"], "fewer than ways=60"),
        (["--workers", "many"], "--workers"),
    ],
)
def test_bad_input_is_a_clear_error(argv, match, tmp_path, capsys):
    if "--data-folder" not in argv:
        if not OMNIGLOT.is_dir():
            pytest.skip("needs the Omniglot data")
        argv = ["--data-folder", str(OMNIGLOT), *argv]
    code = main(["reproduce", "omniglot", "--out", str(tmp_path / "o"), "--quick", "--no-progress", *argv])
    assert code == 2
    assert match in capsys.readouterr().err


def test_omniglot_presets_are_the_papers_setting():
    for n in (5, 10, 15, 20):
        p = DATASET_PRESETS[f"omniglot-{n}way"]
        assert p.ways == n and p.shots == 1 and p.eps == pytest.approx(10 / 255)
        assert p.image_size == 28 and p.in_channels == 1
    with pytest.raises(ValueError, match="20 drawings"):
        OmniglotReproduction(queries=20)


def test_full_official_sets_test_on_the_evaluation_alphabets():
    from types import SimpleNamespace

    from robust_meta._train_data import _EVALUATION_ALPHABETS, omniglot_split_for

    background = [f"Bg{i:02d}" for i in range(30)]
    data = SimpleNamespace(alphabets=sorted(background + list(_EVALUATION_ALPHABETS)))
    s = omniglot_split_for(data)
    assert set(s.test) == _EVALUATION_ALPHABETS
    assert len(s.train) == 24 and len(s.val) == 6 and not set(s.train) & set(s.val)


@needs_data
def test_train_and_eval_commands_on_omniglot(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--dataset", "omniglot-5way", "--data-folder", str(OMNIGLOT), "--out", str(out),
                 "--method", "rmaml-out", "--attack", "fgsm", "--meta-steps", "2", "--hidden", "8",
                 "--queries", "2", "--val-tasks", "2", "--eval-every", "2", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    code = main(["eval", str(out / "best.pt"), "--tasks", "3", "--attack-steps", "2", "--no-progress",
                 "--out", str(tmp_path / "e.json")])
    assert code == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["settings"]["n_tasks"] == 3 and not math.isnan(res["metrics"]["sa"]["mean"])
    assert code == 0


# ---------------------------------------------------------------------------- issue 17: reuse keys
def _folder_with(tmp_path: Path, name: str, zips: tuple[str, ...]) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for z in zips:
        (folder / z).symlink_to(OMNIGLOT / z)
    return folder


@needs_data
def test_adding_an_archive_changes_the_split_and_retrains_never_scoring_on_training_alphabets(tmp_path):
    """Defect 2: a finished run was reused after small2.zip joined small1.zip (test leakage)."""
    folder = _folder_with(tmp_path, "data", ("images_background_small1.zip",))
    settings = OmniglotReproduction.quick(methods=("maml",), ways=(5,), audit_tasks=0)
    out = tmp_path / "out"
    first = reproduce_omniglot(folder, out, settings=settings, progress=False)
    (folder / "images_background_small2.zip").symlink_to(OMNIGLOT / "images_background_small2.zip")
    second = reproduce_omniglot(folder, out, settings=settings, progress=False)
    assert first["settings"]["splits"] != second["settings"]["splits"]
    from robust_meta.train import load_checkpoint

    ckpt = load_checkpoint(out / second["runs"][0]["checkpoint"])
    trained = ckpt["extra"]["data"]["splits"]
    assert trained == {k: second["settings"]["splits"][k] for k in ("train", "val", "test")}
    assert not set(trained["train"]) & set(second["settings"]["splits"]["test"])


@needs_data
def test_a_result_of_an_older_evaluation_protocol_is_re_evaluated(tmp_path, monkeypatch):
    """Defect 7: results carry the protocol version; another version is recomputed (not retrained)."""
    import robust_meta.evaluation as ev

    settings = OmniglotReproduction.quick(methods=("maml",), ways=(5,), audit_tasks=0)
    out = tmp_path / "out"
    monkeypatch.setattr(ev, "EVAL_PROTOCOL", ev.EVAL_PROTOCOL - 1)
    old = reproduce_omniglot(OMNIGLOT, out, settings=settings, progress=False)
    assert old["runs"][0]["protocol"] == ev.EVAL_PROTOCOL
    best = out / old["runs"][0]["checkpoint"]
    before = best.stat().st_mtime_ns
    monkeypatch.undo()
    new = reproduce_omniglot(OMNIGLOT, out, settings=settings, progress=False)
    assert new["runs"][0]["protocol"] == ev.EVAL_PROTOCOL  # re-evaluated ...
    assert best.stat().st_mtime_ns == before  # ... on the same, not retrained, model


@needs_data
def test_resume_through_another_path_to_the_same_data_and_never_onto_other_data(tmp_path):
    """Defect 12 (and 2 for train): compare what the data is, not where it lies."""
    from robust_meta.train import CheckpointError, TrainConfig, train

    both = ("images_background_small1.zip", "images_background_small2.zip")
    a, b = _folder_with(tmp_path, "a", both), _folder_with(tmp_path, "b", both)
    other = _folder_with(tmp_path, "c", both[:1])
    cfg = TrainConfig(method="maml", dataset="omniglot-5way", data_folder=str(a), queries=2, hidden=4,
                      meta_steps=2, val_tasks=2, eval_every=2, first_order=True).resolved()
    run = tmp_path / "run"
    train(cfg, out_dir=run, progress=False)
    train(cfg.replace(meta_steps=3, data_folder=str(b)), out_dir=run, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="data differ"):
        train(cfg.replace(meta_steps=4, data_folder=str(other)), out_dir=run, resume=True, progress=False)


@needs_data
def test_eval_resume_is_keyed_by_the_data_not_its_path(tmp_path, capsys):
    both = ("images_background_small1.zip", "images_background_small2.zip")
    a, b = _folder_with(tmp_path, "a", both), _folder_with(tmp_path, "b", both)
    other = _folder_with(tmp_path, "c", both[:1])
    run = tmp_path / "run"
    assert main(["train", "--dataset", "omniglot-5way", "--data-folder", str(a), "--out", str(run),
                 "--method", "maml", "--meta-steps", "1", "--hidden", "4", "--queries", "2",
                 "--val-tasks", "2", "--eval-every", "1", "--no-progress"]) == 0
    ev = ["eval", str(run / "best.pt"), "--tasks", "2", "--attack-steps", "1", "--no-progress",
          "--out", str(tmp_path / "e.json"), "--resume"]
    assert main([*ev, "--data-folder", str(a)]) == 0
    capsys.readouterr()
    assert main([*ev, "--data-folder", str(b)]) == 0
    assert "not redone" in capsys.readouterr().out
    assert main([*ev, "--data-folder", str(other)]) == 2
    assert "trained on other data" in capsys.readouterr().err
    res = json.loads((tmp_path / "e.json").read_text())
    req = res["settings"]["request"]
    assert req["data"]["kind"] == "omniglot" and req["device"] == "cpu" and "protocol" in req


@needs_data
def test_the_audit_reuses_the_protocol_streams_and_is_in_results_and_table(quick_run):
    _, out = quick_run
    doc = json.loads((out / "results.json").read_text())
    for r in doc["runs"]:
        a = r["audit"]
        assert a["n_tasks"] == OmniglotReproduction.quick().audit_tasks
        assert 0 <= a["ra_worst"]["mean"] <= a["ra_protocol"]["mean"] + 1e-12
        assert a["drop"]["mean"] >= 0 and a["strong_attack"].startswith("PGD-")
    assert "Strong-attack audit" in (out / "table.md").read_text()


@needs_data
def test_protonet_rows_train_evaluate_and_audit_with_running_statistics(tmp_path):
    """Issue 18, item 4: ProtoNet rows selectable with --methods; each row says its learner."""
    out = tmp_path / "out"
    code = main(["reproduce", "omniglot", "--data-folder", str(OMNIGLOT), "--out", str(out), "--quick",
                 "--methods", "maml,protonet,rprotonet-out-fgsm", "--ways", "5", "--no-progress"])
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in doc["runs"]}
    assert rows["maml"]["learner"] == "maml" and rows["maml"]["train_mode"] is True
    for m in ("protonet", "rprotonet-out-fgsm"):
        assert rows[m]["learner"] == "protonet" and rows[m]["train_mode"] is False
        assert 0 <= rows[m]["ra"]["mean"] <= rows[m]["sa"]["mean"] + 1e-9 and "audit" in rows[m]
    assert "R-ProtoNet_out-FGSM" in (out / "table.md").read_text()
