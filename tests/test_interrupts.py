"""Fault injection: ``robust-meta train`` killed by SIGINT, SIGTERM and SIGKILL anywhere, then resumed.

A tiny run that still has everything that makes resuming hard (batch norm running statistics
and counters, an FGSM attack, validation with model selection, checkpoints every 4 steps
that do not line up with the validations every 3) is killed at chosen points of a meta-step
(through the test-only ``ROBUST_META_FAULT_INJECT`` hook, which signals the process from
inside the step: mid inner loop, before the outer backward, inside the optimizer step,
mid validation, after a log row, between the ``best.pt`` and ``last.pt`` writes, during
the emergency save) and at random moments, and resumed with ``--resume`` until it finishes.

After every kill the files on disk must be one consistent step boundary: ``last.pt`` equal,
tensor by tensor (parameters, every buffer including ``num_batches_tracked``, optimizer
state, generator states, model-selection state), to the state an uninterrupted run has at
that step; after SIGINT/SIGTERM also ``best.pt``, ``log.jsonl`` and ``log.csv`` of that
same step. The finished run must equal one uninterrupted run in every tensor and log row.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from robust_meta.train import FAULT_ENV, load_checkpoint

pytestmark = [
    pytest.mark.filterwarnings("ignore:step .*catastrophic overfitting:RuntimeWarning"),
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
]

ROOT = Path(__file__).resolve().parents[1]
# The smallest run with BN + FGSM + validation + checkpoints: 3-way 1-shot digits, Conv4 of
# width 4, 2 tasks a step, 12 steps, validation every 3, last.pt every 4.
OPTIONS = dict(
    method="rmaml-out", attack="fgsm", dataset="digits", ways=3, shots=1, queries=2, meta_batch=2,
    meta_steps=12, inner_steps=1, test_inner_steps=1, inner_lr=0.1, meta_lr=0.01, first_order=True,
    eval_every=3, save_every=4, val_tasks=2, eval_attack_steps=2, hidden=4, device="cpu", seed=3,
)
STEPS = OPTIONS["meta_steps"]


def _cli_args() -> list[str]:
    args = []
    for k, v in OPTIONS.items():
        flag = "--" + k.replace("_", "-")
        args += [flag] if v is True else [flag, str(v)]
    return args


def _env(fault: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONWARNINGS"] = "ignore"
    env["OMP_NUM_THREADS"] = "1"
    if fault:
        env[FAULT_ENV] = fault
    return env


def _cmd(out: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "robust_meta", "train", *_cli_args(), "--out", str(out), "--no-progress",
            *(["--resume"] if resume else [])]


def run_cli(out: Path, *, resume: bool, fault: str | None = None) -> int:
    proc = subprocess.run(_cmd(out, resume), env=_env(fault), capture_output=True, text=True, timeout=300)
    if proc.returncode not in (0, 130, 143, -signal.SIGKILL):
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc.returncode


# --------------------------------------------------------------------------- comparisons


def same(a, b, path="", ignore: tuple[str, ...] = ()) -> list[str]:
    """Paths where two nested checkpoint structures differ (exactly; NaN equals NaN)."""
    if path.endswith(ignore) and ignore:
        return []
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
              and a.shape == b.shape and torch.equal(a, b))
        return [] if ok else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path} keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in same(a[k], b[k], f"{path}/{k}", ignore)]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path} length"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in same(x, y, f"{path}/{i}", ignore)]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def without(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def log_rows(out: Path) -> list[dict]:
    path = out / "log.jsonl"
    return [without(json.loads(x), "time") for x in path.read_text().splitlines()] if path.exists() else []


def csv_rows(out: Path) -> list[dict]:
    path = out / "log.csv"
    if not path.exists():
        return []
    # (the columns depend on which rows are in: compare the filled cells)
    return [{k: v for k, v in r.items() if k != "time" and v != ""}
            for r in csv.DictReader(io.StringIO(path.read_text()))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """An uninterrupted CLI run, and the state of an uninterrupted run at every step boundary."""
    root = tmp_path_factory.mktemp("reference")
    assert run_cli(root / "cli", resume=False) == 0
    # The same run with last.pt written at every step (save_every changes no number), in a
    # subprocess like the runs under test (same threads, same kernels): its state at each step.
    per_step = root / "per-step"
    script = (
        "import shutil, sys\n"
        "from robust_meta.train import TrainConfig, train\n"
        f"opts = {dict(OPTIONS, save_every=1)!r}\n"
        "out = sys.argv[1]\n"
        "keep = lambda step, rec: shutil.copy(f'{out}/last.pt', f'{out}/step-{step}.pt')\n"
        "train(TrainConfig(**opts), out_dir=out, progress=False, callback=keep)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(per_step)], env=_env(None), check=True, timeout=300)
    states = {s: load_checkpoint(per_step / f"step-{s}.pt") for s in range(1, STEPS + 1)}
    return {"cli": root / "cli", "states": states, "rows": log_rows(root / "cli"), "csv": csv_rows(root / "cli")}


def check_at_rest(out: Path, reference: dict, graceful: bool) -> int:
    """The folder holds one consistent step boundary L of the uninterrupted run; returns L."""
    assert not list(out.glob(".*.tmp")) or not graceful, "a graceful stop left temporary files"
    if not (out / "last.pt").exists():
        assert not graceful or not log_rows(out)
        return 0
    last = load_checkpoint(out / "last.pt")
    step = last["step"]
    ref = reference["states"][step]
    # the per-step reference differs in config.save_every only
    diff = same(last, ref, ignore=("config/save_every",))
    assert not diff, f"last.pt at step {step} differs from the uninterrupted run: {diff[:5]}"
    rows = [r for r in reference["rows"] if r["step"] <= step]
    got = log_rows(out)
    assert got[: len(rows)] == rows, "log.jsonl lost or changed rows before the checkpoint"
    if graceful:
        assert got == rows, "log.jsonl holds rows beyond the checkpoint"
        assert csv_rows(out) == reference["csv"][: len(rows)]
        best = ref["extra"]["best"]
        if best is None:
            assert not (out / "best.pt").exists()
        else:
            diff = same(load_checkpoint(out / "best.pt"), best, ignore=("config/save_every",))
            assert not diff, f"best.pt is not the one of last.pt: {diff[:5]}"
            assert best["step"] == last["extra"]["best_step"]
    return step


def check_finished(out: Path, reference: dict) -> None:
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(reference["cli"] / name), load_checkpoint(out / name)
        diff = same(a, b)
        assert not diff, f"{name} differs from the uninterrupted run: {diff[:5]}"
    model = load_checkpoint(out / "last.pt")["model"]
    assert any(k.endswith("num_batches_tracked") for k in model)
    assert log_rows(out) == reference["rows"] and csv_rows(out) == reference["csv"]
    assert (out / "config.json").read_text() == (reference["cli"] / "config.json").read_text()
    assert not list(out.glob(".*.tmp"))


# --------------------------------------------------------------------------- the tests

# (fault spec, expected exit code, expected step of last.pt afterwards). Each entry runs
# with --resume on what the previous one left.
CHAIN = [
    ("SIGINT@2:task", 130, 1),  # mid-step: BN buffers already hold the first task's batches
    ("SIGTERM@3:validate", 143, 2),  # mid-validation (after the optimizer step): step 3 discarded
    ("SIGINT@3:log", 130, 3),  # while writing the log row: finished, then saved
    ("SIGTERM@5:optimizer", 143, 4),  # inside the optimizer step: it finishes, the step is discarded
    ("SIGKILL@8:save", -9, 4),  # between best.pt (step 6's) and last.pt: best.pt newer than last.pt
    ("SIGKILL@6:backward", -9, 4),  # log rows 5.. on disk beyond the checkpoint
    ("SIGTERM@7:backward,SIGKILL@6:emergency", -9, 4),  # killed while saving after SIGTERM
    ("SIGINT@10:boundary", 130, 10),  # between steps: step 10 saved although save_every=4
    ("SIGTERM@12:save", 143, 12),  # during the final write: the write finishes
    (None, 0, 12),
]


def test_kills_at_chosen_points_resume_bit_for_bit(tmp_path, reference):
    out = tmp_path / "run"
    for i, (fault, code, step) in enumerate(CHAIN):
        rc = run_cli(out, resume=i > 0, fault=fault)
        assert rc == code, (fault, rc)
        assert check_at_rest(out, reference, graceful=rc != -signal.SIGKILL) == step, fault
    check_finished(out, reference)


@pytest.mark.parametrize("seed", [0, 1])
def test_kills_at_random_moments_resume_bit_for_bit(tmp_path, reference, seed):
    rng = random.Random(seed)
    out = tmp_path / "run"
    kills = []
    for attempt in range(10):
        resume = attempt > 0
        # every fault point sleeps a little so that random signals land inside steps
        launched = time.time_ns()
        proc = subprocess.Popen(_cmd(out, resume), env=_env("sleep=0.02"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        sig = rng.choice([signal.SIGINT, signal.SIGTERM, signal.SIGKILL]) if attempt < 4 else None
        delay = rng.uniform(0.0, 1.5)  # after the loop starts; a step takes ~0.1 s
        if sig is not None:
            # config.json is (re)written just before the first step
            cfg = out / "config.json"
            while proc.poll() is None and not (cfg.exists() and cfg.stat().st_mtime_ns >= launched):
                time.sleep(0.01)
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
        rc = proc.returncode
        if rc in (-signal.SIGINT, -signal.SIGTERM):
            # only possible once the command has returned (interpreter teardown, no handler
            # left): the run must then be complete
            assert sig is not None and sig.value == -rc, err
            check_finished(out, reference)
            kills.append(f"{sig.name} after {delay:.2f} s: landed after the run had finished")
            rc = 0
        assert rc in (0, 130, 143, -signal.SIGKILL), err
        if rc == 0:
            break
        at = check_at_rest(out, reference, graceful=rc != -signal.SIGKILL)
        kills.append(f"{sig.name} after {delay:.2f} s: exit {rc}, last.pt at step {at}")
    assert rc == 0, kills
    check_finished(out, reference)
    print(f"seed {seed}:", "; ".join(kills))
    shutil.rmtree(out)
