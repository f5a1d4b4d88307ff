"""The robust-meta command (robust_meta.cli): demo, train, eval, plot, errors, config precedence."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys

import pytest
import torch

from robust_meta.cli import load_config_file, main, parse_number
from robust_meta.train import load_checkpoint

# Tiny runs on a few validation images trip the catastrophic-overfitting watch by chance.
pytestmark = pytest.mark.filterwarnings("ignore:step .*catastrophic overfitting:RuntimeWarning")

TINY_ARGS = [
    "--dataset", "digits", "--ways", "3", "--shots", "1", "--queries", "2", "--meta-batch", "2",
    "--inner-steps", "1", "--test-inner-steps", "1", "--inner-lr", "0.1", "--first-order",
    "--eval-every", "2", "--val-tasks", "2", "--eval-attack-steps", "2", "--hidden", "4",
    "--device", "cpu", "--no-progress",
]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_parse_number_accepts_fractions_and_inf():
    assert parse_number("8/255") == 8 / 255
    assert parse_number(" 0.25 ") == 0.25 and parse_number(3) == 3.0
    assert parse_number("inf") == float("inf")
    for bad in ("eight", "1/0", "1/x"):
        with pytest.raises(ValueError, match="fraction like 8/255"):
            parse_number(bad)


def test_demo_quick_end_to_end_writes_results_and_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, err = run(capsys, "demo", "--quick", "--out", str(out), "--no-progress", "--test-tasks", "12")
    assert code == 0, err
    doc = json.loads((out / "results.json").read_text())
    assert set(doc) == {"methods", "settings"}
    assert list(doc["methods"]) == ["maml", "rmaml-out"]
    for m in doc["methods"].values():
        assert set(m) == {"sa", "ra"}
        for metric in m.values():
            assert set(metric) == {"mean", "ci95"}
            assert all(isinstance(v, float) for v in metric.values())
            assert 0 <= metric["mean"] <= 1 and metric["ci95"] >= 0
        assert m["ra"]["mean"] <= m["sa"]["mean"] + 1e-9
    s = doc["settings"]
    assert s["test_tasks"] == 12 and s["split"].startswith("test") and s["eps"] == 0.1
    assert s["per_method"]["rmaml-out"]["attack"] == "fgsm"
    png = (out / "ra_vs_eps.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert (out / "ra_vs_eps.svg").stat().st_size > 1000
    # the table printed has one line per method, with CIs
    assert "maml" in stdout and "rmaml-out" in stdout and "±" in stdout
    # plot re-draws from the saved results (curves.json next to results.json)
    code, _, err = run(capsys, "plot", str(out / "results.json"), "--out", str(tmp_path / "again.png"))
    assert code == 0, err
    assert (tmp_path / "again.png").stat().st_size > 1000 and (tmp_path / "again.svg").exists()


def test_demo_rejects_unknown_method(tmp_path, capsys):
    code, _, err = run(capsys, "demo", "--quick", "--out", str(tmp_path), "--methods", "maml,foo")
    assert code == 2 and "unknown demo method 'foo'" in err and "Traceback" not in err


def test_train_resume_eval_plot(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["train", *TINY_ARGS, "--method", "rmaml-out", "--attack", "fgsm", "--eps", "8/255"]
    assert run(capsys, *common, "--meta-steps", "4", "--out", str(a))[0] == 0
    assert run(capsys, *common, "--meta-steps", "2", "--out", str(b))[0] == 0
    # starting again in a used folder needs --resume or --overwrite
    code, _, err = run(capsys, *common, "--meta-steps", "4", "--out", str(b))
    assert code == 2 and "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert run(capsys, *common, "--meta-steps", "4", "--out", str(b), "--resume")[0] == 0
    pa, pb = load_checkpoint(a / "last.pt")["model"], load_checkpoint(b / "last.pt")["model"]
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert load_checkpoint(b / "last.pt")["config"]["eps"] == pytest.approx(8 / 255)

    code, out, err = run(capsys, "eval", str(a / "best.pt"), "--tasks", "3", "--eps", "0,4/255,8/255",
                         "--attack", "pgd,fgsm", "--out", str(tmp_path / "ev.json"), "--no-progress")
    assert code == 0, err
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["metrics"]["sa"]["n"] == 3 and "ra[fgsm@8/255]" in ev["metrics"]
    assert ev["settings"]["split"] == "test" and (tmp_path / "ev.csv").exists()
    code, _, err = run(capsys, "plot", str(tmp_path / "ev.json"), "--out", str(tmp_path / "p.svg"))
    assert code == 0, err
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_config_file_then_command_line_precedence(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"eps": "4/255", "hidden": 4, "meta-steps": 1, "method": "maml", "val_tasks": 1}))
    out = tmp_path / "run"
    args = ["train", *TINY_ARGS, "--config", str(cfg), "--out", str(out)]
    args.remove("--hidden"), args.remove("4")  # hidden comes from the file only
    code, _, err = run(capsys, *args, "--eps", "8/255", "--method", "rmaml-out")
    assert code == 0, err
    saved = json.loads((out / "config.json").read_text())
    assert saved["eps"] == pytest.approx(8 / 255)  # command line wins over the file
    assert saved["method"] == "rmaml-out"
    assert saved["hidden"] == 4 and saved["meta_steps"] == 1 and saved["val_tasks"] == 2  # file; CLI wins
    assert saved["gamma_out"] == 0.2  # preset fills what neither gave
    toml = tmp_path / "cfg.toml"
    toml.write_text('[train]\neps = "2/255"\nfirst_order = true\nmeta_steps = 3\n')
    assert load_config_file(toml) == {"eps": 2 / 255, "first_order": True, "meta_steps": 3}


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"epsilon": 0.1}', "unknown option 'epsilon'"),
        ('{"meta_steps": "many"}', "must be an integer"),
        ('{"eps": "big"}', "fraction like 8/255"),
        ("{not json", "cannot parse config file"),
    ],
)
def test_bad_config_file_is_a_clear_error(tmp_path, capsys, content, match):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(content)
    code, _, err = run(capsys, "train", "--config", str(cfg), "--out", str(tmp_path / "o"))
    assert code == 2 and match in err and "Traceback" not in err


def test_missing_data_folder_is_a_clear_error(tmp_path, capsys):
    code, _, err = run(capsys, "train", "--dataset", "omniglot", "--data-folder", str(tmp_path / "nowhere"),
                       "--out", str(tmp_path / "o"))
    assert code == 2 and "does not exist" in err and "nowhere" in err and "Traceback" not in err
    code, _, err = run(capsys, "train", "--dataset", "miniimagenet", "--out", str(tmp_path / "o"))
    assert code == 2 and "needs --data-folder" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "train", "--dataset", "cifar-fs", "--data-folder", str(tmp_path / "empty"),
                       "--out", str(tmp_path / "o"))
    # names the files of every layout robust-meta reads, torchmeta's among them
    assert code == 2 and "holds no CIFAR" in err and "CIFAR_FS_{train,val,test}.pickle" in err
    assert "cifar-100-python" in err and "torchmeta" in err and "data not found" in err and "Traceback" not in err


def test_bad_or_missing_checkpoint_is_a_clear_error_and_file_untouched(tmp_path, capsys):
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"\x00garbage" * 10)
    before = bad.read_bytes()
    code, _, err = run(capsys, "eval", str(bad), "--tasks", "2")
    assert code == 2 and "corrupt" in err and "Traceback" not in err
    assert bad.read_bytes() == before
    code, _, err = run(capsys, "eval", str(tmp_path / "none.pt"))
    assert code == 2 and "does not exist" in err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["train", "--method", "mamll", "--out", "X"], "unknown method 'mamll'"),
        (["train", "--preset", "foo", "--out", "X"], "unknown method 'foo'"),
        (["train", "--attack", "pgdd", "--out", "X"], "unknown training attack 'pgdd'"),
        (["train", "--eps", "8", "--out", "X"], "did you mean 8/255"),
        (["train", "--eps", "abc", "--out", "X"], "fraction like 8/255"),
        (["eval", "CKPT", "--attack", "pgdd"], "unknown attack 'pgdd'"),
        (["eval", "CKPT", "--compile", "maybe"], "invalid choice: 'maybe'"),
        (["train", "--compile", "maybe", "--out", "X"], "unknown compile setting 'maybe'"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_user_errors_exit_2_without_traceback(tmp_path, capsys, argv, match):
    argv = [a.replace("X", str(tmp_path / "o")).replace("CKPT", str(tmp_path / "c.pt")) for a in argv]
    code, _, err = run(capsys, *argv)
    assert code == 2 and match in err and "Traceback" not in err


def test_presets_and_help(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0 and "trades-unlabeled" in out and "miniimagenet" in out and "eps=2/255" in out
    code, out, _ = run(capsys, "train", "--help")
    assert code == 0 and "--gamma-out" in out and "--resume" in out and "--preset" in out


@pytest.mark.slow  # a fresh interpreter imports torch: seconds on an idle machine
@pytest.mark.filterwarnings("ignore:'robust_meta.cli' found in sys.modules:RuntimeWarning")
def test_python_dash_m_runs_the_cli(monkeypatch, capsys):
    proc = subprocess.run([sys.executable, "-m", "robust_meta", "presets"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "rmaml-out" in proc.stdout
    # `python -m robust_meta.cli` too (run in-process: the module's __main__ guard)
    monkeypatch.setattr(sys, "argv", ["robust_meta.cli", "presets"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("robust_meta.cli", run_name="__main__")
    assert exit_.value.code == 0 and "rmaml-out" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:RA .* is above SA")  # 3 tasks of an untrained model
def test_eval_writes_atomically_and_resume_skips_finished_work(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    assert run(capsys, "train", *TINY_ARGS, "--method", "maml", "--meta-steps", "2", "--out", str(run_dir))[0] == 0
    ev = tmp_path / "ev.json"
    args = ["eval", str(run_dir / "best.pt"), "--tasks", "3", "--out", str(ev), "--no-progress", "--resume"]
    code, _, err = run(capsys, *args)
    assert code == 0, err
    first = ev.read_text()
    assert json.loads(first)["settings"]["request"]["tasks"] == 3
    import robust_meta.cli as cli

    calls = []
    real = cli._eval_checkpoint
    monkeypatch.setattr(cli, "_eval_checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    code, out, err = run(capsys, *args)  # same checkpoint and options: not redone
    assert code == 0 and "not redone" in out and not calls and ev.read_text() == first
    code, out, _ = run(capsys, *args[:-1])  # without --resume: recomputed
    assert code == 0 and calls == [1]
    code, out, _ = run(capsys, *args[:3], "4", *args[4:])  # other options: recomputed
    assert code == 0 and calls == [1, 1] and json.loads(ev.read_text())["metrics"]["sa"]["n"] == 4

    # a write that fails (or is killed) leaves the previous files whole, and no temp file
    before = ev.read_text(), ev.with_suffix(".csv").read_text()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("robust_meta._io.os.replace", boom)
    code, _, err = run(capsys, *args[:3], "5", *args[4:])
    assert code == 130 and "interrupted" in err
    assert (ev.read_text(), ev.with_suffix(".csv").read_text()) == before
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow  # spawns two worker processes
@pytest.mark.filterwarnings("ignore:RA .* is above SA")
def test_eval_workers_give_the_values_of_one_process(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run(capsys, "train", *TINY_ARGS, "--method", "maml", "--meta-steps", "2", "--out", str(run_dir))[0] == 0
    results = {}
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}.json"
        code, _, err = run(capsys, "eval", str(run_dir / "best.pt"), "--tasks", "5", "--eps", "0,8/255",
                           "--workers", workers, "--out", str(out), "--no-progress")
        assert code == 0, err
        results[workers] = json.loads(out.read_text())
    assert results["2"]["settings"]["workers"] == 2
    for name, metric in results["1"]["metrics"].items():
        assert results["2"]["metrics"][name]["values"] == metric["values"], name
    for bad, match in (("0", "--workers must be >= 1"), ("many", "--workers must be an integer or 'auto'")):
        code, _, err = run(capsys, "eval", str(run_dir / "best.pt"), "--tasks", "2", "--workers", bad)
        assert code == 2 and match in err and "Traceback" not in err


def test_train_interrupted_by_sigterm_exits_143_and_resumes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ROBUST_META_FAULT_INJECT", "SIGTERM@2:backward")
    out = tmp_path / "run"
    common = ["train", *TINY_ARGS, "--method", "rmaml-out", "--attack", "fgsm", "--meta-steps", "3", "--out", str(out)]
    code, _, err = run(capsys, *common)
    assert code == 143 and "interrupted by SIGTERM" in err and "last.pt holds step 1" in err and "--resume" in err
    monkeypatch.delenv("ROBUST_META_FAULT_INJECT")
    assert run(capsys, *common, "--resume")[0] == 0
    assert load_checkpoint(out / "last.pt")["step"] == 3
