"""Smoke test of benchmarks/loading.py: every format at ``--tiny`` size, run as the lead runs it.

The tiny run writes the same JSON as the full run, so this checks what a full run produces:
every format read in its layout, every phase timed, peak RSS measured, tasks/s, and the
extrapolation (tiny is a fraction of the real size) marked as such.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "loading.py"
LAYOUTS = {
    "mini-csv": ("miniimagenet", "csv-images", 84),
    "mini-pickle": ("miniimagenet", "pickle-cache", 84),
    "mini-metaoptnet": ("miniimagenet", "metaoptnet", 84),
    "mini-torchmeta": ("miniimagenet", "torchmeta", 84),
    "cifar-tar": ("cifar-fs", "cifar-100-python", 32),
    "cifar-folder": ("cifar-fs", "cifar-100-python", 32),
    "cifar-metaoptnet": ("cifar-fs", "metaoptnet", 32),
    "tiered": ("tieredimagenet", "png-pickles", 84),
}
CACHED = {"mini-csv", "tiered"}  # the layouts decoded once into a cache


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _run(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "loading.json"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--workdir", str(tmp_path / "work"), "--json-out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout) == result  # the same JSON printed and written
    return result


def _check_format(fmt: str, row: dict) -> None:
    benchmark, layout, size = LAYOUTS[fmt]
    assert (row["benchmark"], row["layout"], row["split"]) == (benchmark, layout, "train"), fmt
    n = row["images"]
    assert row["tiny"] is True and row["measured_at_full_size"] is False
    assert 0 < row["scale"] < 1 and n < row["real_train_images"] <= row["real_all_splits_images"]
    assert _positive(row["fabricate"]["files_mb"]) and row["fabricate"]["seconds"] >= 0
    for name in ("first", "cached", "sample"):
        ph = row[name]
        assert _positive(ph["load_s"]), (fmt, name, ph)
        assert ph["images_shape"] == [n, 3, size, size], (fmt, name)
        for key in ("rss_after_imports_mb", "peak_rss_vmhwm_mb", "peak_rss_getrusage_mb"):
            assert _positive(ph[key]), (fmt, name, key, ph[key])
        assert ph["peak_rss_vmhwm_mb"] >= ph["rss_after_imports_mb"], (fmt, name)
        assert ph["peak_over_imports_mb"] >= 0
        assert ph["images_memory_mapped"] is (fmt == "tiered"), (fmt, name)
        assert ph["torch_threads"] == 1
    s = row["sample"]
    assert _positive(s["tasks_per_s"]) and s["tasks"] == 20 and s["sampler_keeps_uint8"] is True
    assert s["task_support_query_shapes"] == [[5, 3, size, size], [75, 3, size, size]]
    assert (row["cache_files_mb"] > 0) is (fmt in CACHED), (fmt, row["cache_files_mb"])
    ext = row["extrapolated_to_full_train_split"]
    assert "extrapolation" in ext["note"] and "not a measurement" in ext["note"]
    assert ext["images"] == row["real_train_images"]
    for key in ("first_load_s", "cached_load_s", "first_peak_rss_mb", "cached_peak_rss_mb", "files_mb"):
        assert _positive(ext[key]), (fmt, key, ext[key])
    assert ext["first_load_s"] >= row["first"]["load_s"]


def test_every_format_tiny(tmp_path):
    # fork: each phase is a fork of one interpreter that imported torch once (quick)
    result = _run(tmp_path, "--format", "all", "--isolation", "fork")
    assert result["schema"] == "robust-meta-loading-bench/1"
    m = result["machine"]
    assert m["torch"] and _positive(m["cpu_count"]) and _positive(m["torch_threads_default"]) and "cpu_model" in m
    assert result["config"]["isolation"] == "fork" and result["config"]["tiny"] is True
    assert list(result["formats"]) == list(LAYOUTS)
    for fmt, row in result["formats"].items():
        _check_format(fmt, row)
    assert result["formats"]["tiered"]["cached"]["content_hash_s"] > 0
    assert not (tmp_path / "work" / "tiered").exists()  # fabricated files removed without --keep


def test_fresh_interpreter_phases(tmp_path):
    # spawn (the default, what the full run uses): each phase in a new interpreter
    result = _run(tmp_path, "--format", "cifar-metaoptnet")
    assert result["config"]["isolation"] == "spawn"
    assert list(result["formats"]) == ["cifar-metaoptnet"]
    _check_format("cifar-metaoptnet", result["formats"]["cifar-metaoptnet"])


def test_refuses_when_the_disk_is_too_small(tmp_path):
    spec = importlib.util.spec_from_file_location("loading_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass looks its module up
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[spec.name]
    with pytest.raises(SystemExit, match="not enough disk space for tiered"):
        mod._check_space(tmp_path, 1 << 60, "tiered")
    mod._check_space(tmp_path, 1 << 20, "tiered")  # a MiB fits
