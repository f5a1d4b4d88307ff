"""Training loop, checkpoints, resume, presets (robust_meta.train / robust_meta.presets)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

import robust_meta.train as T
from robust_meta.presets import DATASET_PRESETS, METHOD_PRESETS, method_preset
from robust_meta.regularizers import ATRegularizer, TradesRegularizer
from robust_meta.train import (
    CheckpointError,
    OverfittingMonitor,
    TrainConfig,
    atomic_save,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    train,
)

# Tiny runs on a few validation images trip the catastrophic-overfitting watch by chance.
pytestmark = pytest.mark.filterwarnings("ignore:step .*catastrophic overfitting:RuntimeWarning")

# A tiny run: 3-way 1-shot digits, 4-channel Conv4, 2 tasks a batch, first order.
TINY = dict(
    method="rmaml-out", attack="fgsm", dataset="digits", ways=3, shots=1, queries=2, meta_batch=2,
    meta_steps=4, inner_steps=1, test_inner_steps=1, inner_lr=0.1, meta_lr=0.01, first_order=True,
    eval_every=2, val_tasks=2, eval_attack_steps=2, hidden=4, device="cpu", seed=3,
)


def tiny(**kw) -> TrainConfig:
    return TrainConfig(**{**TINY, **kw})


def params_of(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- config / presets


def test_resolved_fills_from_presets_and_keeps_explicit_values():
    c = TrainConfig(method="aq", dataset="miniimagenet").resolved()
    assert math.isinf(c.gamma_out) and c.gamma_in == 0
    assert c.eps == pytest.approx(2 / 255) and c.image_size == 84 and c.in_channels == 3
    assert (c.ways, c.shots, c.queries, c.meta_batch, c.inner_lr, c.meta_lr) == (5, 1, 15, 4, 0.01, 1e-3)
    assert (c.inner_steps, c.test_inner_steps) == (5, 10)
    c = TrainConfig(method="rmaml-out-trades", dataset="cifar-fs", eps=4 / 255, gamma_out=1.0).resolved()
    assert c.eps == pytest.approx(4 / 255) and c.gamma_out == 1.0
    assert TrainConfig(dataset="omniglot").resolved().eps == pytest.approx(10 / 255)
    assert DATASET_PRESETS["cifar-fs"].eps == pytest.approx(8 / 255)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(method="mamll"), "unknown method 'mamll'; choose from maml"),
        (dict(attack="pgdd"), "unknown training attack 'pgdd'"),
        (dict(eps=8.0), r"did you mean 8/255"),
        (dict(dataset="imagenet"), "unknown dataset 'imagenet'"),
        (dict(method="anil", gamma_in=0.2), "head only"),
        (dict(method="maml", unlabeled=5), "TRADES"),
        (dict(select="best"), "unknown selection criterion"),
        (dict(ways=1), "ways must be >= 2"),
    ],
)
def test_bad_config_raises_naming_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw).resolved()


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown config keys \['epsilon'\]"):
        TrainConfig.from_dict({"epsilon": 0.1})
    assert TrainConfig.from_dict({"meta-steps": 7}).meta_steps == 7


def test_every_method_preset_maps_to_the_core_knobs():
    expect = {
        "maml": dict(gamma_out=0.0, reg=None, inner=False, anil=False, aux=False),
        "rmaml-out": dict(gamma_out=0.2, reg=ATRegularizer, inner=False, anil=False, aux=False),
        "rmaml-out-trades": dict(gamma_out=5.0, reg=TradesRegularizer, inner=False, anil=False, aux=False),
        "rmaml-both": dict(gamma_out=0.2, reg=ATRegularizer, inner=True, anil=False, aux=False),
        "aq": dict(gamma_out=math.inf, reg=ATRegularizer, inner=False, anil=False, aux=False),
        "anil": dict(gamma_out=0.2, reg=ATRegularizer, inner=False, anil=True, aux=False),
        "cl": dict(gamma_out=0.2, reg=ATRegularizer, inner=False, anil=False, aux=True),
        "trades-unlabeled": dict(gamma_out=5.0, reg=TradesRegularizer, inner=False, anil=False, aux=False),
    }
    assert set(expect) == set(METHOD_PRESETS)
    for name, e in expect.items():
        cfg = tiny(method=name).resolved()
        model = T.build_model_for(cfg)
        update, inner_reg, anil, aux = T._build_objective(model, cfg)
        assert update.gamma_out == e["gamma_out"], name
        if e["reg"] is not None:
            assert type(update.regularizer) is e["reg"], name
            assert update.regularizer.attack == "fgsm" and update.regularizer.eps == cfg.eps
        assert (inner_reg is not None) == e["inner"] and (anil is not None) == e["anil"], name
        assert (aux is not None) == e["aux"], name
    assert tiny(method="rmaml-both").resolved().gamma_in == 0.2
    assert tiny(method="cl").resolved().gamma_cl == 0.1
    assert tiny(method="trades-unlabeled").resolved().unlabeled > 0
    assert method_preset("RMAML-OUT").name == "rmaml-out"


def test_step_seed_is_deterministic_and_distinct():
    assert T.step_seed(0, 5) == T.step_seed(0, 5)
    seeds = {T.step_seed(s, k) for s in range(3) for k in range(50)}
    assert len(seeds) == 150 and all(0 <= s < 2**63 for s in seeds)


# --------------------------------------------------------------------------- monitor


def test_overfitting_monitor_flags_pgd_collapse_with_rising_fgsm():
    m = OverfittingMonitor()
    assert [m.update(p, f) for p, f in [(0.2, 0.3), (0.4, 0.5), (0.35, 0.55)]] == [False] * 3
    assert m.update(0.10, 0.70) is True  # PGD -75 % of its best, FGSM up: catastrophic overfitting
    m2 = OverfittingMonitor()
    m2.update(0.4, 0.5)
    assert m2.update(0.10, 0.30) is False  # both fell: plain divergence, not CO
    m3 = OverfittingMonitor()
    m3.update(0.04, 0.1)
    assert m3.update(0.0, 0.5) is False  # a fall below min_gap is noise


# --------------------------------------------------------------------------- checkpoints


def _small_state():
    model = torch.nn.Linear(3, 2)
    return model


def test_checkpoint_round_trip_is_weights_only(tmp_path):
    model = _small_state()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path / "c.pt", model=model, config=tiny().resolved(), step=3, optimizer=opt)
    raw = torch.load(path, weights_only=True)  # no arbitrary pickles inside
    assert raw["format"] == T.CHECKPOINT_FORMAT and raw["step"] == 3
    assert raw["config"]["hidden"] == 4 and isinstance(raw["config"], dict)
    assert_same_state(raw["model"], model.state_dict())
    assert set(raw["rng"]) >= {"torch", "numpy", "python"}
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_rng_state_round_trip_restores_all_generators():
    import random

    import numpy as np

    st = T._rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    T._set_rng_state(st)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_atomic_save_keeps_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"format": T.CHECKPOINT_FORMAT, "x": torch.arange(3)}, path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"x": torch.zeros(5)}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pt"]  # the temp file is gone


def test_corrupt_checkpoint_gives_clear_error_and_is_left_intact(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, model=_small_state(), config=tiny().resolved(), step=1)
    good = path.read_bytes()
    for bad in (good[: len(good) // 2], b"not a checkpoint at all", b""):
        path.write_bytes(bad)
        with pytest.raises(CheckpointError, match="corrupt, truncated"):
            load_checkpoint(path)
        assert path.read_bytes() == bad
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a robust-meta checkpoint"):
        load_checkpoint(other)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoint_with_arbitrary_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": T.CHECKPOINT_FORMAT, "step": 0, "config": {}, "model": {}, "x": _Evil()}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path)


def test_mismatched_checkpoint_is_refused_with_shapes_named(tmp_path):
    cfg = tiny().resolved()
    model = T.build_model_for(cfg)
    path = save_checkpoint(tmp_path / "best.pt", model=model, config=cfg, step=0)
    bigger = T.build_model_for(cfg.replace(hidden=6).resolved())
    ckpt = load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"different model .*hidden=4.*shape mismatch features.0.0.weight"):
        T._check_model_matches(bigger, ckpt, path)
    # a checkpoint whose weights do not fit its own config (edited by hand) is refused too
    ckpt["config"]["hidden"] = 6
    torch.save(ckpt, path)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="shape mismatch"):
        model_from_checkpoint(path)
    assert path.read_bytes() == before


# --------------------------------------------------------------------------- training


@pytest.fixture()
def spy_splits(monkeypatch):
    """Record which splits the training loop samples tasks from."""
    seen = []
    real = T.build_task_sources

    def build(config):
        sources = real(config)
        for name, src in sources.items():
            orig = src.sample

            def sample(n, seed, orig=orig, name=name):
                seen.append(name)
                return orig(n, seed)

            src.sample = sample
        return sources

    monkeypatch.setattr(T, "build_task_sources", build)
    return seen


def test_train_writes_logs_checkpoints_and_selects_on_validation(tmp_path, spy_splits):
    torch.manual_seed(7)
    expected_next = torch.rand(2)
    torch.manual_seed(7)
    best = train(tiny(), out_dir=tmp_path, progress=False)
    assert torch.equal(torch.rand(2), expected_next)  # the caller's RNG stream is left as it was
    assert best == tmp_path / "best.pt"
    assert set(spy_splits) == {"train", "val"}  # never the test split
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    val = [r for r in lines if "val_score" in r]
    assert [r["step"] for r in val] == [2, 4]
    for r in val:
        assert r["val_score"] == pytest.approx(r["val_sa"] + r["val_ra"])
        assert 0 <= r["val_ra"] <= 1 and "val_ra_fgsm" in r and r["catastrophic_overfitting"] in (True, False)
    best_rec = max(val, key=lambda r: r["val_score"])  # first max wins ties
    assert load_checkpoint(best)["step"] == best_rec["step"]
    header = (tmp_path / "log.csv").read_text().splitlines()[0].split(",")
    assert {"step", "loss", "clean_acc", "adv_acc", "val_sa", "val_ra"} <= set(header)
    assert json.loads((tmp_path / "config.json").read_text())["hidden"] == 4
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 4
    with pytest.raises(FileExistsError, match="resume=True"):
        train(tiny(), out_dir=tmp_path, progress=False)


class Stop(Exception):
    pass


def _interrupt_at(k, exc=KeyboardInterrupt):
    def cb(step, rec):
        if step == k:
            raise exc()

    return cb


@pytest.mark.parametrize("stop_at, save_every", [(2, 2), (3, 2)])
def test_interrupt_then_resume_equals_uninterrupted_run(tmp_path, stop_at, save_every):
    cfg = tiny(save_every=save_every, method="rmaml-out")
    train(cfg, out_dir=tmp_path / "a", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out_dir=tmp_path / "b", progress=False, callback=_interrupt_at(stop_at))
    # KeyboardInterrupt saves the last completed step even between checkpoints
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == stop_at
    torch.manual_seed(1234)  # the caller's RNG state must not matter
    train(cfg, out_dir=tmp_path / "b", resume=True, progress=False)
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert_same_state(a["model"], b["model"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    for k in sa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[k][name], sb[k][name])
    assert_same_state(params_of(tmp_path / "a" / "best.pt"), params_of(tmp_path / "b" / "best.pt"))
    la = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    drop = ("time",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in la] == [
        {k: v for k, v in r.items() if k not in drop} for r in lb
    ]


def test_other_exception_keeps_the_last_regular_checkpoint(tmp_path):
    with pytest.raises(Stop):
        train(tiny(), out_dir=tmp_path, progress=False, callback=_interrupt_at(3, Stop))
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2


def test_trajectory_does_not_depend_on_validation_frequency(tmp_path):
    train(tiny(eval_every=1), out_dir=tmp_path / "a", progress=False)
    train(tiny(eval_every=4), out_dir=tmp_path / "b", progress=False)
    assert_same_state(params_of(tmp_path / "a" / "last.pt"), params_of(tmp_path / "b" / "last.pt"))


def test_resume_refuses_a_different_config_or_model_and_corrupt_file(tmp_path):
    train(tiny(meta_steps=2), out_dir=tmp_path, progress=False)
    last = tmp_path / "last.pt"
    before = last.read_bytes()
    with pytest.raises(CheckpointError, match=r"config differs in hidden: 4 -> 8"):
        train(tiny(hidden=8), out_dir=tmp_path, resume=True, progress=False)
    assert last.read_bytes() == before
    last.write_bytes(before[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        train(tiny(), out_dir=tmp_path, resume=True, progress=False)
    assert last.read_bytes() == before[:100]


def test_resume_may_extend_meta_steps(tmp_path):
    train(tiny(meta_steps=4), out_dir=tmp_path / "a", progress=False)
    train(tiny(meta_steps=2), out_dir=tmp_path / "b", progress=False)
    train(tiny(meta_steps=4), out_dir=tmp_path / "b", resume=True, progress=False)
    assert_same_state(params_of(tmp_path / "a" / "last.pt"), params_of(tmp_path / "b" / "last.pt"))


def test_colour_images_train_on_channels_last_and_resume_bit_for_bit(tmp_path, monkeypatch):
    """32×32×3 images take the channels_last fast path inside train(); a resume is still exact."""
    from robust_meta import fast

    g = torch.Generator().manual_seed(0)
    images = torch.rand(15 * 4, 3, 32, 32, generator=g)  # 15 classes: >= 3 in each 60/20/20 split
    labels = torch.arange(15).repeat_interleave(4)
    torch.save({"images": images, "labels": labels}, tmp_path / "colour.pt")
    layouts = []
    real = fast._layout

    def spy(model, x, setting, params=None):
        out = real(model, x, setting, params)
        layouts.append(out.is_contiguous(memory_format=torch.channels_last))
        return out

    monkeypatch.setattr(fast, "_layout", spy)
    cfg = tiny(dataset=f"tensor:{tmp_path / 'colour.pt'}", image_size=32, in_channels=3, meta_steps=4)
    train(cfg, out_dir=tmp_path / "a", progress=False)
    assert layouts and all(layouts), "train() did not feed the colour images in channels_last"
    train(cfg.replace(meta_steps=2), out_dir=tmp_path / "b", progress=False)
    train(cfg, out_dir=tmp_path / "b", resume=True, progress=False)
    assert_same_state(params_of(tmp_path / "a" / "last.pt"), params_of(tmp_path / "b" / "last.pt"))


@pytest.mark.parametrize("method", sorted(METHOD_PRESETS))
def test_every_method_runs_a_meta_step_and_changes_the_weights(tmp_path, method):
    cfg = tiny(method=method, meta_steps=1, eval_every=1, val_tasks=1)
    model0 = T.build_model_for(cfg.resolved())
    train(cfg, out_dir=tmp_path, progress=False)
    model, config, ckpt = model_from_checkpoint(tmp_path / "last.pt")
    assert config.method == method and ckpt["step"] == 1
    changed = [k for k, v in model.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, model0.state_dict()[k])]
    assert changed
    rec = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert math.isfinite(rec["loss"])
    if method == "cl":
        assert rec["aux_loss"] > 0 and load_checkpoint(tmp_path / "last.pt")["aux"]
    if method in ("maml",):
        assert rec["adv_acc"] is None  # no attack ran


def test_catastrophic_overfitting_warns_and_logs(tmp_path, monkeypatch):
    vals = iter([{"sa": 0.9, "ra": 0.4, "ra_fgsm": 0.45}, {"sa": 0.9, "ra": 0.05, "ra_fgsm": 0.8}])
    monkeypatch.setattr(T, "validate", lambda *a, **k: next(vals))
    with pytest.warns(RuntimeWarning, match="catastrophic overfitting"):
        train(tiny(eval_every=2), out_dir=tmp_path, progress=False)
    val = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r.get("catastrophic_overfitting") for r in val if "val_score" in r] == [False, True]


def test_missing_data_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="needs --data-folder"):
        train(tiny(dataset="omniglot"), out_dir=tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match=r"data folder .*nope.* does not exist"):
        train(tiny(dataset="omniglot", data_folder=str(tmp_path / "nope")), out_dir=tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="tensor dataset file"):
        train(tiny(dataset=f"tensor:{tmp_path / 'x.pt'}"), out_dir=tmp_path, progress=False)


# --------------------------------------------------------------------------- signals (issue 12)


def test_sigterm_is_handled_like_sigint_and_the_handlers_are_restored(tmp_path):
    import signal

    from robust_meta.train import Interrupted

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    def cb(step, rec):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted) as info:
        train(tiny(), out_dir=tmp_path, progress=False, callback=cb)
    assert info.value.signum == signal.SIGTERM and info.value.exit_code == 143
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["step"] == 3 and last["extra"]["log_rows"] == 3
    assert [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert load_checkpoint(tmp_path / "best.pt")["step"] == last["extra"]["best_step"] == 2


@pytest.mark.parametrize("point", ["task", "backward", "validate"])
def test_a_signal_mid_step_discards_the_partial_step(tmp_path, monkeypatch, point):
    """Batch-norm buffers (num_batches_tracked included) and weights are those of step 3."""
    train(tiny(meta_steps=3, eval_every=2), out_dir=tmp_path / "ref", progress=False)
    monkeypatch.setenv(T.FAULT_ENV, f"SIGINT@4:{point}")
    with pytest.raises(KeyboardInterrupt):
        train(tiny(meta_steps=4, eval_every=2), out_dir=tmp_path / "run", progress=False)
    ref, got = load_checkpoint(tmp_path / "ref" / "last.pt"), load_checkpoint(tmp_path / "run" / "last.pt")
    assert got["step"] == 3
    assert any(k.endswith("num_batches_tracked") for k in got["model"])
    assert_same_state(ref["model"], got["model"])
    for k, st in ref["optimizer"]["state"].items():
        assert_same_state(st, got["optimizer"]["state"][k])
    assert torch.equal(ref["rng"]["torch"], got["rng"]["torch"])


def test_train_in_a_thread_leaves_signals_alone(tmp_path):
    import signal
    import threading

    before = signal.getsignal(signal.SIGTERM)
    errors = []

    def work():
        try:
            train(tiny(meta_steps=1, eval_every=1), out_dir=tmp_path, progress=False)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert not errors and load_checkpoint(tmp_path / "last.pt")["step"] == 1
    assert signal.getsignal(signal.SIGTERM) == before


def test_resume_repairs_files_left_ahead_of_last_pt(tmp_path, monkeypatch):
    """As after a SIGKILL: log rows, log.csv and best.pt newer than last.pt, a stale temp file."""
    cfg = tiny(meta_steps=4, eval_every=1, save_every=2, select="last")
    train(cfg, out_dir=tmp_path / "ref", progress=False)
    run = tmp_path / "run"
    train(cfg.replace(meta_steps=3), out_dir=run, progress=False)  # last.pt and best.pt at step 3
    last3 = (run / "last.pt").read_bytes()
    train(cfg, out_dir=run, resume=True, progress=False)  # ... then pretend step 4's last.pt was lost:
    (run / "last.pt").write_bytes(last3)
    (run / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    assert load_checkpoint(run / "best.pt")["step"] == 4
    with monkeypatch.context() as m:  # resume, and fail in step 4 before anything is written
        m.setattr(T, "validate", lambda *a, **k: (_ for _ in ()).throw(Stop()))
        with pytest.raises(Stop):
            train(cfg, out_dir=run, resume=True, progress=False)
    # ...back to a consistent step-3 state: best.pt, log.jsonl and log.csv of step 3
    assert load_checkpoint(run / "best.pt")["step"] == 3
    assert [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert len((run / "log.csv").read_text().splitlines()) == 4
    assert not list(run.glob(".*.tmp"))
    train(cfg, out_dir=run, resume=True, progress=False)
    for name in ("last.pt", "best.pt"):
        assert_same_state(params_of(tmp_path / "ref" / name), params_of(run / name))
    la = [json.loads(x) for x in (tmp_path / "ref" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lb] == [1, 2, 3, 4]
    assert [{k: v for k, v in r.items() if k != "time"} for r in la] == [
        {k: v for k, v in r.items() if k != "time"} for r in lb]
