"""benchmarks/authors_code.py: the harness against the authors' research code.

The authors' code is not part of this repository. These tests run the harness's robust-meta
side in its tiny configuration (seconds; the numbers mean nothing); the side-by-side run with
their code happens only when ``ROBUST_META_AUTHORS_CODE`` names a checkout of
github.com/wangren09/MetaAdv, and is skipped otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _load():
    key = "_benchmarks_authors_code"
    if key not in sys.modules:  # registered first: dataclasses look their module up
        spec = importlib.util.spec_from_file_location(key, BENCH / "authors_code.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


def test_config_is_the_notebooks_and_the_module_matches_it():
    ac = _load()
    assert ac.authors_config(ac.FULL) == ac.NOTEBOOK_CONFIG
    model = ac.AuthorsConv4(ac.NOTEBOOK_CONFIG)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(c.padding == (0, 0) for c in convs)
    assert sum(p.numel() for p in model.parameters()) == 32901
    assert model.train()(torch.rand(2, 3, 84, 84)).shape == (2, 5)
    with pytest.raises(ValueError, match="needs images larger"):
        ac.authors_config(ac.bench.Config("x", 3, 40, 4, 5, 1, 1, 1))


def test_robust_meta_side_tiny(tmp_path):
    ac = _load()
    out = tmp_path / "tiny.json"
    res = ac.main(["--tiny", "--threads", "1", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["times"]) == {"robust-meta eager", "robust-meta fast_paths"}
    assert "authors" not in saved and "checks" not in saved
    for t in saved["times"].values():
        assert len(t["times_s"]) == 1 and t["median_s"] > 0
    assert set(saved["ratios"]) == {"robust-meta eager / robust-meta fast_paths"}
    r = saved["ratios"]["robust-meta eager / robust-meta fast_paths"]
    assert r["cpu_time"]["median"] > 0 and r["ratio_of_min_wall"] > 0
    assert all(len(c["times_s"]) == 1 and c["median_s"] > 0 for c in saved["cpu_times"].values())
    assert all(len(v) == 1 for v in saved["cpu_per_wall"].values())
    assert saved["quiet_rounds"]["rounds"] == []  # 1 thread: no round is singled out
    m = saved["machine"]
    assert m["cpu"] and m["torch"] == torch.__version__ and m["threads"] >= 1 and "loadavg" in m
    assert len(saved["loadavg_1min_per_round"]) == 2  # warm-up + 1 rep
    cfg, k = ac.TINY, ac.K_TRAIN
    support, query = cfg.ways * cfg.shots, cfg.ways * cfg.queries
    for passes in res["passes"].values():
        # per task: K support forwards, clean query, FGSM forward, adversarial query
        assert passes["forward"] == cfg.tasks * (k + 3)
        assert passes["forward_images"] == cfg.tasks * (k * support + 3 * query)
        # per task: K inner backwards, the FGSM input gradient, 2 through the outer loss
        assert passes["backward"] == cfg.tasks * (k + 3)
        assert passes["backward_input_grad"] == cfg.tasks
    assert res["flops"]["robust-meta eager"] > 0


def test_authors_code_path_is_checked(tmp_path):
    ac = _load()
    with pytest.raises(FileNotFoundError, match="MetaAdv"):
        ac.load_authors(str(tmp_path))
    with pytest.raises(SystemExit):
        ac.main(["--tiny", "--rm-model", "learner"])


def test_against_authors_code_tiny(tmp_path):
    path = os.environ.get("ROBUST_META_AUTHORS_CODE")
    if not path:
        pytest.skip("set ROBUST_META_AUTHORS_CODE to a checkout of github.com/wangren09/MetaAdv")
    ac = _load()
    res = ac.main(["--tiny", "--threads", "1", "--authors-code", path, "--rm-model", "both"])
    assert res["checks"]["ok"]
    assert res["checks"]["clean_meta_grad_max_abs"] > 0
    cfg, k = ac.TINY, ac.K_TRAIN
    theirs = res["passes"]["authors"]
    assert theirs["forward"] == cfg.tasks * (k + 8)  # 5 support, 2 + 4 clean query, FGSM, adversarial
    assert theirs["backward_weight_grad"] == theirs["backward"] == cfg.tasks * (k + 3)
    assert "authors / robust-meta fast_paths" in res["ratios"]


def test_main_leaves_the_thread_count_alone():
    ac = _load()
    before = torch.get_num_threads()
    ac.main(["--tiny", "--threads", "1", "--warmup", "0"])
    assert torch.get_num_threads() == before
