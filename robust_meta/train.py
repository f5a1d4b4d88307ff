"""A complete meta-training loop for every method, with checkpoints, resume and logs.

`train` runs MAML / R-MAML_out / R-MAML_both / AQ / ANIL / CL / TRADES(+unlabeled)
from one `TrainConfig` (see `robust_meta.presets`), on the core pieces
(`robust_meta.adapt`, `robust_meta.RobustMetaUpdate`, `robust_meta.ANILHead`).
It is what ``robust-meta train`` and ``robust-meta demo`` call.

**Reproducibility and resume.** The randomness of meta-step ``s`` (its task batch, attack
random starts, augmentations) is drawn from generators re-seeded from ``(seed, s)`` at the
start of the step, and validation runs on its own forked generator. A run's trajectory is
therefore a function of the config alone: resuming from a checkpoint gives bitwise the
same weights as an uninterrupted run on the same CPU (on GPUs, up to the nondeterminism of
cuDNN kernels). Checkpoints also store the generator states (torch, numpy, Python
``random``) and restore them.

**Model selection** uses META-VALIDATION tasks (classes disjoint from the training and test
classes), never the test split. The criterion is ``config.select``: ``"sa+ra"`` (default:
clean accuracy plus PGD robust accuracy at the training ε, after standard fine-tuning),
``"sa"``, ``"ra"`` or ``"last"``.

**Catastrophic overfitting.** When the training attack is one-step (FGSM), validation also
measures the FGSM robust accuracy; `OverfittingMonitor` flags (``warnings.warn`` and
the ``catastrophic_overfitting`` log field) a collapse of PGD accuracy while the FGSM one
holds or rises (Wong et al., "Fast is better than free", ICLR 2020).

Files written in ``out_dir``: ``last.pt`` (full state, for ``resume``), ``best.pt`` (the
selected model), ``config.json``, ``log.jsonl`` and ``log.csv``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed as dist_
from .adapt import adapt
from .anil import ANILHead
from .attacks import ATTACKS, perturb
from .data import Task
from .meta import RobustMetaUpdate
from .params import call_model, preserved_buffers
from .presets import DATASET_PRESETS, dataset_preset, method_preset
from .regularizers import ATRegularizer, TradesRegularizer

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "OverfittingMonitor",
    "TrainConfig",
    "atomic_save",
    "build_model_for",
    "load_checkpoint",
    "model_from_checkpoint",
    "save_checkpoint",
    "step_seed",
    "train",
    "validate",
]

#: Value of the ``"format"`` key of every robust-meta checkpoint.
CHECKPOINT_FORMAT = "robust-meta-checkpoint"
CHECKPOINT_VERSION = 1
SELECT = ("sa+ra", "sa", "ra", "last")
#: Config keys that may change when a run is resumed (everything else must match).
RESUMABLE_CHANGES = frozenset({"meta_steps", "device"})


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, not ours, or for another model."""


# --------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Everything that defines a training run; ``None`` fields come from the presets.

    Call `resolved` to fill them from the method preset
    (`robust_meta.presets.METHOD_PRESETS`) and the dataset preset
    (`robust_meta.presets.DATASET_PRESETS`). The resolved config is what checkpoints
    store, as a plain dict.

    Attributes:
        method: ``maml``, ``rmaml-out``, ``rmaml-out-trades``, ``rmaml-both``, ``aq``,
            ``anil``, ``cl`` or ``trades-unlabeled``.
        dataset: ``digits``, ``omniglot``, ``miniimagenet``, ``cifar-fs``, ``fc100`` or
            ``tensor:PATH`` (a ``torch.save``'d ``(images, labels)``).
        data_folder: root folder of a torchmeta dataset.
        ways, shots, queries: task shape (queries per class).
        meta_batch: tasks per meta-update.
        meta_steps: number of meta-updates.
        inner_steps: K, inner steps at meta-training; test_inner_steps: at validation/test.
        inner_lr: α; meta_lr: Adam learning rate of the meta-update.
        first_order: FOMAML (inner gradients are constants) instead of second order.
        eps: ℓ∞ radius in [0, 1] pixel units (training and validation attack).
        attack: training attack, ``"pgd"`` or ``"fgsm"`` (R-MAML_out-FGSM).
        attack_steps, attack_step_size: training attack iterations and step (defaults:
            10 and 2.5ε/steps for PGD; 1 step of 1.25ε for FGSM).
        eval_attack_steps: PGD steps of the validation attack.
        gamma_out, gamma_in, gamma_cl: weights (see `robust_meta.presets.MethodPreset`).
        unlabeled: unlabeled images per task for TRADES.
        eval_every: meta-steps between validations (the last step is always validated).
        save_every: meta-steps between ``last.pt`` checkpoints (default: ``eval_every``).
        log_every: meta-steps between training log records.
        val_tasks: number of fixed meta-validation tasks.
        select: model-selection criterion (``"sa+ra"``, ``"sa"``, ``"ra"``, ``"last"``).
        seed: the run's seed.
        model: ``"conv4"``, ``"resnet12"`` or ``"resnet18"``; hidden: its width.
        image_size, in_channels: input shape (default from the dataset).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
    """

    method: str = "rmaml-out"
    dataset: str = "digits"
    data_folder: str | None = None
    ways: int | None = None
    shots: int | None = None
    queries: int | None = None
    meta_batch: int = 4
    meta_steps: int | None = None
    inner_steps: int = 5
    test_inner_steps: int = 10
    inner_lr: float = 0.01
    meta_lr: float = 1e-3
    first_order: bool = False
    eps: float | None = None
    attack: str = "pgd"
    attack_steps: int | None = None
    attack_step_size: float | None = None
    eval_attack_steps: int = 10
    gamma_out: float | None = None
    gamma_in: float | None = None
    gamma_cl: float | None = None
    unlabeled: int | None = None
    eval_every: int = 100
    save_every: int | None = None
    log_every: int = 1
    val_tasks: int = 100
    select: str = "sa+ra"
    seed: int = 0
    model: str = "conv4"
    hidden: int | None = None
    image_size: int | None = None
    in_channels: int | None = None
    device: str = "auto"

    # -- conversions --------------------------------------------------------------

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of all options."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """A config from a mapping (e.g. a parsed JSON/TOML file); ``-`` in keys reads as ``_``.

        Raises:
            ValueError: unknown keys (the message names them and lists the valid ones).
            TypeError: ``data`` is not a mapping.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"a config must be a mapping, got {type(data).__name__}")
        norm = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(norm) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys are {cls.field_names()}")
        return cls(**norm)

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` of primitive values (safe for JSON and ``weights_only`` loading)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some options changed (unknown names raise ``ValueError``)."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    # -- presets ------------------------------------------------------------------

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` option filled from the presets, validated.

        Raises:
            ValueError: unknown method/dataset/attack/model, out-of-range values,
                incompatible combinations (e.g. ANIL with γ_in > 0).
        """
        m = method_preset(self.method)
        d = dataset_preset(self.dataset)
        c = dataclasses.replace(self, method=m.name)
        fill = {
            "ways": d.ways, "shots": d.shots, "queries": d.queries, "meta_steps": d.meta_steps,
            "eps": d.eps, "gamma_out": m.gamma_out, "gamma_in": m.gamma_in,
            "gamma_cl": m.gamma_cl, "unlabeled": m.unlabeled, "hidden": d.hidden,
            "save_every": self.eval_every,
        }
        if d.image_size:
            fill["image_size"] = d.image_size
        if d.in_channels:
            fill["in_channels"] = d.in_channels
        for k, v in fill.items():
            if getattr(c, k) is None:
                setattr(c, k, v)
        if not c.dataset.lower().startswith("tensor:"):
            c.dataset = c.dataset.lower()
        c.attack = str(c.attack).lower()
        c.model = str(c.model).lower()
        c.select = str(c.select).lower()
        c.validate()
        return c

    def validate(self) -> None:
        """Check types and ranges of the set options.

        Raises:
            ValueError: an option out of range (the message names the option and value).
            TypeError: an option of the wrong type.
        """
        method_preset(self.method)
        dataset_preset(self.dataset)
        ints = {
            "ways": 2, "shots": 1, "queries": 1, "meta_batch": 1, "meta_steps": 0, "inner_steps": 0,
            "test_inner_steps": 0, "eval_attack_steps": 1, "eval_every": 1, "save_every": 1,
            "log_every": 1, "val_tasks": 1, "unlabeled": 0, "hidden": 1, "image_size": 1,
            "in_channels": 1, "attack_steps": 1,
        }
        for name, lo in ints.items():
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {v!r}")
            if v < lo:
                raise ValueError(f"{name} must be >= {lo}, got {v}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        for name in ("inner_lr", "meta_lr", "eps", "attack_step_size", "gamma_out", "gamma_in", "gamma_cl"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name} must be a number, got {v!r}")
            if math.isnan(v) or v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
            if math.isinf(v) and name != "gamma_out":
                raise ValueError(f"{name} must be finite, got {v}")
        if self.eps is not None and self.eps > 1:
            hint = f" (did you mean {self.eps:g}/255?)" if self.eps <= 255 else ""
            raise ValueError(f"eps must lie in [0, 1] pixel units, got {self.eps:g}{hint}")
        if self.attack not in ("pgd", "fgsm"):
            choices = ", ".join(a for a in ATTACKS if a in ("pgd", "fgsm"))
            raise ValueError(f"unknown training attack {self.attack!r}; choose from {choices}")
        if self.select not in SELECT:
            raise ValueError(f"unknown selection criterion {self.select!r}; choose from {', '.join(SELECT)}")
        if self.model not in ("conv4", "resnet12", "resnet18"):
            raise ValueError(f"unknown model {self.model!r}; choose from conv4, resnet12, resnet18")
        m = method_preset(self.method)
        if m.anil and self.gamma_in:
            raise ValueError("method 'anil' fine-tunes the head only; gamma_in > 0 is not supported with it")
        if self.gamma_in and m.regularizer == "none":
            raise ValueError(f"gamma_in > 0 needs a robust method; {self.method!r} has no regularizer")
        if self.gamma_out is not None and math.isinf(self.gamma_out) and m.regularizer == "trades":
            raise ValueError("gamma_out=inf (adversarial querying) needs the AT regularizer, not TRADES")
        if self.unlabeled and m.regularizer != "trades":
            raise ValueError(f"unlabeled images are used by the TRADES methods only, not {self.method!r}")

    @property
    def one_step_attack(self) -> bool:
        """Whether a robust method trains with a one-step attack (catastrophic overfitting is watched)."""
        return method_preset(self.method).robust and (self.attack == "fgsm" or self.attack_steps == 1)


# --------------------------------------------------------------------------- RNG


def step_seed(seed: int, step: int | str) -> int:
    """A 63-bit seed derived from ``(seed, step)`` (SHA-256; independent streams per step).

    Example:
        >>> step_seed(0, 1) != step_seed(0, 2) != step_seed(1, 1)
        True
    """
    digest = hashlib.sha256(f"robust-meta:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """Generator states as tensors and primitives (loadable with ``weights_only=True``)."""
    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError, IndexError):
            torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _forked_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run with all global generators seeded by ``seed``; restore them afterwards."""
    py, npst = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        _seed_all(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npst)


# --------------------------------------------------------------------------- checkpoints


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically: a temp file in the same folder, fsync, rename.

    If anything fails (disk full, interrupted, an exception in ``torch.save``), ``path``
    keeps its old content and the temp file is removed.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable (POSIX)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path


def _atomic_write_text(text: str, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _signature(model: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    config: TrainConfig | Mapping[str, Any],
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    aux: nn.Module | None = None,
    rng: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (see `atomic_save`).

    The file holds only tensors and primitive types, so it loads with
    ``torch.load(..., weights_only=True)``.

    Args:
        path: destination.
        model: the meta-model (its ``state_dict``: parameters and buffers).
        config: the resolved training config.
        step: number of completed meta-updates.
        optimizer: meta-optimizer (state saved for resume).
        aux: auxiliary module with parameters (e.g. ``ContrastiveAux``'s projection head).
        rng: generator states (default: the current global ones).
        extra: more primitive data (best score, validation metrics, ...).

    Returns:
        The path written.
    """
    cfg = config.to_dict() if isinstance(config, TrainConfig) else dict(config)
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "step": int(step),
        "config": cfg,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "signature": _signature(model),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "aux": None if aux is None else {k: v.detach().cpu() for k, v in aux.state_dict().items()},
        "rng": _rng_state() if rng is None else dict(rng),
        "extra": dict(extra or {}),
    }
    return atomic_save(state, path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a robust-meta checkpoint with ``torch.load(..., weights_only=True)`` on the CPU.

    The file is only read, never modified.

    Returns:
        The checkpoint dict (``format``, ``version``, ``step``, ``config``, ``model``,
        ``signature``, ``optimizer``, ``aux``, ``rng``, ``extra``).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not readable (corrupt, truncated, not a torch file, unsafe pickle)
            or not a robust-meta checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: the file is corrupt, truncated or not a "
            f"robust-meta checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})"
        ) from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is a torch file but not a robust-meta checkpoint")
    if ckpt.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} has checkpoint version {ckpt.get('version')}; this robust-meta reads "
            f"version {CHECKPOINT_VERSION} and older: upgrade robust-meta"
        )
    missing = [k for k in ("step", "config", "model") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{str(path)!r} lacks the entries {missing}")
    return ckpt


def _check_model_matches(model: nn.Module, ckpt: Mapping[str, Any], path: str | os.PathLike) -> None:
    want = _signature(model)
    have = {k: list(v.shape) for k, v in ckpt["model"].items()}
    if want == have:
        return
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    shapes = [f"{k}: {have[k]} in the checkpoint, {want[k]} in the model"
              for k in want if k in have and have[k] != want[k]]
    cfg = ckpt.get("config", {})
    desc = ", ".join(f"{k}={cfg.get(k)!r}" for k in ("model", "hidden", "in_channels", "image_size", "ways"))
    parts = []
    if shapes:
        parts.append("shape mismatch " + "; ".join(shapes[:3]))
    if missing:
        parts.append(f"missing {missing[:3]}")
    if unexpected:
        parts.append(f"unexpected {unexpected[:3]}")
    raise CheckpointError(
        f"checkpoint {str(path)!r} holds a different model ({desc}) than the one built here "
        f"({type(model).__name__}): " + "; ".join(parts)
    )


def build_model_for(config: TrainConfig) -> nn.Module:
    """The model a (resolved) config describes, from `robust_meta.models.build_model`."""
    from .models import build_model

    width = {"conv4": {"hidden": config.hidden}, "resnet18": {"width": config.hidden}}.get(config.model, {})
    return build_model(
        config.model, in_channels=config.in_channels, n_classes=config.ways,
        image_size=config.image_size, **width,
    )


def model_from_checkpoint(
    path: str | os.PathLike, *, device: str | torch.device | None = None
) -> tuple[nn.Module, TrainConfig, dict[str, Any]]:
    """Rebuild the model stored in a checkpoint.

    Returns:
        ``(model, config, checkpoint)``; the model is on ``device`` (default CPU), in train
        mode (MAML convention: batch statistics).

    Raises:
        FileNotFoundError, CheckpointError: see `load_checkpoint`; also when the stored
            weights do not fit the model its config describes.
    """
    ckpt = load_checkpoint(path)
    try:
        config = TrainConfig.from_dict(ckpt["config"]).resolved()
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} has an invalid config: {err}") from err
    model = build_model_for(config)
    _check_model_matches(model, ckpt, path)
    model.load_state_dict(ckpt["model"])
    if device is not None:
        model.to(device)
    return model, config, ckpt


# --------------------------------------------------------------------------- data


class _TaskSource:
    """Samples ``n`` tasks of one split reproducibly from a seed."""

    def __init__(self, sample: Callable[[int, int], list[Task]], name: str):
        self._sample = sample
        self.name = name

    def sample(self, n: int, seed: int) -> list[Task]:
        return self._sample(n, seed)


def build_task_sources(config: TrainConfig) -> dict[str, _TaskSource]:
    """``{"train", "val", "test"}`` task sources for a resolved config (disjoint classes).

    ``digits`` uses `robust_meta.data.digits_splits` (4 / 3 / 3 classes); a
    ``tensor:PATH`` dataset is split 60 / 20 / 20 % of its classes with seed 0; torchmeta
    datasets use their own meta-train / meta-val / meta-test splits.

    Raises:
        FileNotFoundError: the dataset's folder (``data_folder``) or tensor file is missing.
        ValueError: a split has fewer classes than ``ways``, or classes with too few images.
    """
    from . import data as D

    name = config.dataset
    if name in DATASET_PRESETS and DATASET_PRESETS[name].needs_folder:
        folder = config.data_folder
        if not folder:
            raise FileNotFoundError(
                f"dataset {name!r} needs --data-folder (the torchmeta root folder holding it)"
            )
        if not Path(folder).expanduser().is_dir():
            raise FileNotFoundError(f"data folder {folder!r} for dataset {name!r} does not exist")
        for split in ("train", "val", "test"):
            D.check_torchmeta_folder(name, folder, split=split)
        return _torchmeta_sources(config, D)
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


def _array_sources(config: TrainConfig, images: Tensor, labels: Tensor, splits: Any, D: Any) -> dict[str, _TaskSource]:
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

        sources[split_name] = _TaskSource(sample, split_name)
    return sources


def _torchmeta_sources(config: TrainConfig, D: Any) -> dict[str, _TaskSource]:
    sources = {}
    for split_name in ("train", "val", "test"):
        def sample(n: int, seed: int, split_name=split_name) -> list[Task]:
            return D.torchmeta_tasks(
                config.dataset, config.data_folder, split=split_name, ways=config.ways,
                shots=config.shots, queries=config.queries, n_tasks=n, seed=seed % 2**63,
                image_size=config.image_size,
            )

        sources[split_name] = _TaskSource(sample, split_name)
    return sources


# --------------------------------------------------------------------------- validation


def validate(
    model: nn.Module,
    tasks: Sequence[Task],
    *,
    eps: float,
    steps: int,
    step_size: float,
    attack_steps: int = 10,
    one_step: bool = False,
    anil: ANILHead | None = None,
) -> dict[str, float]:
    """Mean accuracies on tasks after standard fine-tuning (S-FT).

    For each task the model is fine-tuned on the support set (``steps`` steps of ``step_size``,
    head only with ``anil``), then scored on the clean query set (``sa``) and on its PGD
    adversarial examples (``ra``, ``attack_steps`` steps, radius ``eps``) against the
    fine-tuned weights. With ``one_step`` also ``ra_fgsm`` (FGSM with random start). The
    network runs in train mode (batch statistics, as during meta-training); its buffers are
    left untouched.

    Returns:
        ``{"sa": ..., "ra": ...[, "ra_fgsm": ...]}`` as floats in [0, 1].
    """
    was_training = model.training
    model.train()
    sums = {"sa": 0.0, "ra": 0.0, "ra_fgsm": 0.0}
    try:
        with preserved_buffers(model):
            for task in tasks:
                sx, sy, qx, qy = task.support_x, task.support_y, task.query_x, task.query_y
                with torch.no_grad():
                    if anil is not None:
                        fast = anil.adapt(sx, sy, steps=steps, step_size=step_size, first_order=True)
                    else:
                        fast = adapt(model, sx, sy, steps=steps, step_size=step_size, first_order=True)
                    sums["sa"] += _acc(call_model(model, qx, fast), qy)
                adv = perturb("pgd", model, qx, qy, params=fast, eps=eps, steps=attack_steps)
                with torch.no_grad():
                    sums["ra"] += _acc(call_model(model, adv, fast), qy)
                if one_step:
                    adv1 = perturb("fgsm", model, qx, qy, params=fast, eps=eps)
                    with torch.no_grad():
                        sums["ra_fgsm"] += _acc(call_model(model, adv1, fast), qy)
    finally:
        model.train(was_training)
    n = max(1, len(tasks))
    out = {"sa": sums["sa"] / n, "ra": sums["ra"] / n}
    if one_step:
        out["ra_fgsm"] = sums["ra_fgsm"] / n
    return out


def _acc(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


@dataclass
class OverfittingMonitor:
    """Flags catastrophic overfitting of one-step adversarial training (Wong et al. 2020).

    Feed it the validation PGD and FGSM robust accuracies after each validation. It flags a
    point where PGD accuracy has fallen to at most ``(1 - drop)`` of its best value so far (and
    by at least ``min_gap`` in absolute terms) while FGSM accuracy is at least what it was at
    that best point and exceeds PGD accuracy by ``min_gap``: the model has learned to defeat
    the one-step attack only.

    Args:
        drop: relative fall of PGD accuracy that counts as a collapse (default 0.5).
        min_gap: minimum absolute fall (default 0.05), so noise at tiny accuracies is ignored.

    Example:
        >>> mon = OverfittingMonitor()
        >>> mon.update(0.40, 0.45), mon.update(0.10, 0.80)
        (False, True)
    """

    drop: float = 0.5
    min_gap: float = 0.05
    best_pgd: float = -1.0
    fgsm_at_best: float = 0.0
    history: list[tuple[float, float]] = field(default_factory=list)

    def update(self, ra_pgd: float, ra_fgsm: float) -> bool:
        """Record one validation; returns whether it shows catastrophic overfitting."""
        self.history.append((float(ra_pgd), float(ra_fgsm)))
        if ra_pgd > self.best_pgd:
            self.best_pgd, self.fgsm_at_best = float(ra_pgd), float(ra_fgsm)
            return False
        fell = self.best_pgd - ra_pgd
        return (
            ra_pgd <= (1 - self.drop) * self.best_pgd
            and fell >= self.min_gap
            and ra_fgsm >= self.fgsm_at_best
            and ra_fgsm - ra_pgd >= self.min_gap
        )


# --------------------------------------------------------------------------- training


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}: {err}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return dev


def _build_objective(model: nn.Module, config: TrainConfig):
    """(RobustMetaUpdate, inner regularizer or None, ANILHead or None, aux module or None)."""
    m = method_preset(config.method)
    reg_kw = {"eps": config.eps, "steps": config.attack_steps, "step_size": config.attack_step_size}
    if config.attack == "fgsm" and config.attack_steps is None:
        reg_kw["steps"] = 1
    outer_reg = None
    if m.regularizer == "trades":
        outer_reg = TradesRegularizer(config.attack, **reg_kw)
    elif m.regularizer == "at":
        outer_reg = ATRegularizer(config.attack, **reg_kw)
    inner_reg = ATRegularizer(config.attack, **reg_kw) if config.gamma_in else None
    aux = None
    if config.gamma_cl:
        from .contrastive import ContrastiveAux

        aux = ContrastiveAux(model, weight=config.gamma_cl, projection=64)
    gamma_out = config.gamma_out if outer_reg is not None else 0.0
    update = RobustMetaUpdate(
        F.cross_entropy, model, eps=config.eps, gamma_out=gamma_out, regularizer=outer_reg, aux=aux,
    )
    anil = ANILHead(model) if m.anil else None
    return update, inner_reg, anil, aux


def _mean_stats(rows: list[dict[str, float]]) -> dict[str, float]:
    out = {}
    for k in rows[0]:
        vals = [r[k] for r in rows if not math.isnan(r[k])]
        out[k] = sum(vals) / len(vals) if vals else float("nan")
    return out


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _clean_json(rec: Mapping[str, Any]) -> dict[str, Any]:
    """NaN/inf become None so that log.jsonl is strict JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}


def _write_csv(records: list[dict[str, Any]], path: Path) -> None:
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, restval="")
    w.writeheader()
    for r in records:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    _atomic_write_text(buf.getvalue(), path)


def _read_log(path: Path, upto: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut by the interruption: everything after it is dropped
        if rec.get("step", 0) <= upto:
            out.append(rec)
    return out


def train(
    config: TrainConfig,
    *,
    out_dir: str | os.PathLike,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
) -> Path:
    """Meta-train ``config.method`` and return the path of the selected checkpoint.

    Each meta-step samples ``meta_batch`` training tasks, adapts the model on each support
    set (`robust_meta.adapt`, or `robust_meta.ANILHead` for ``anil``; with the
    AT inner term for ``rmaml-both``), adds the outer loss of
    `robust_meta.RobustMetaUpdate` on the query set, and takes one Adam step on the
    mean. Every ``eval_every`` steps (and at the last step) the model is scored on fixed
    meta-validation tasks (`validate`); the best by ``config.select`` is ``best.pt``.

    Args:
        config: the run (unset options come from the presets, see `TrainConfig.resolved`).
        out_dir: folder for checkpoints and logs (created).
        resume: continue from ``out_dir/last.pt`` (bitwise the same result as an uninterrupted
            run on the CPU). Without a checkpoint there, training starts from scratch.
        overwrite: allow starting afresh in a folder that already holds a checkpoint.
        progress: show a tqdm progress bar with the live loss and accuracies.
        callback: called as ``callback(step, record)`` after every meta-step (``record`` is
            the log record, with validation metrics on validation steps). An exception it
            raises stops training; a ``KeyboardInterrupt`` first saves ``last.pt``.

    Returns:
        Path of ``best.pt``.

    Raises:
        ValueError: invalid config; FileExistsError: ``out_dir`` holds a run and neither
            ``resume`` nor ``overwrite`` is set; CheckpointError: ``last.pt`` is unreadable or
            was written for another model or config; FileNotFoundError: missing data.

    Example:
        >>> best = train(TrainConfig(method="rmaml-out", attack="fgsm", meta_steps=200), out_dir="runs/x")
        >>> model, cfg, ckpt = model_from_checkpoint(best)
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    config = config.resolved()
    caller_rng = _rng_state()
    try:
        return _train(config, Path(out_dir), resume=resume, overwrite=overwrite, progress=progress,
                      callback=callback)
    finally:
        _set_rng_state(caller_rng)  # the caller's random streams are left as they were


def _train(
    config: TrainConfig,
    out: Path,
    *,
    resume: bool,
    overwrite: bool,
    progress: bool,
    callback: Callable[[int, dict[str, Any]], None] | None,
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    last_path, best_path = out / "last.pt", out / "best.pt"
    log_path, csv_path = out / "log.jsonl", out / "log.csv"
    device = _device(config.device)

    ckpt = None
    if resume and last_path.exists():
        ckpt = load_checkpoint(last_path)
        old = dict(ckpt["config"])
        diff = sorted(k for k in set(old) | set(config.to_dict())
                      if k not in RESUMABLE_CHANGES and old.get(k) != config.to_dict().get(k))
        if diff:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {getattr(config, k, None)!r}" for k in diff[:6])
            raise CheckpointError(
                f"cannot resume {str(last_path)!r}: the config differs in {details}; only "
                f"{sorted(RESUMABLE_CHANGES)} may change on resume"
            )
    elif resume:
        warnings.warn(f"resume: no checkpoint in {str(out)!r}; training from scratch", stacklevel=3)
    elif last_path.exists() and not overwrite:
        raise FileExistsError(
            f"{str(out)!r} already holds a run (last.pt); pass resume=True to continue it or "
            "overwrite=True to start again"
        )

    # torchrun: tasks of each meta-batch are sharded across ranks and the meta-gradient is
    # all-reduced; without torchrun this is one process (rank 0 of 1).
    rank, world = dist_.init_from_env()
    main_process = rank == 0
    sources = build_task_sources(config)
    _seed_all(step_seed(config.seed, "init"))
    model = build_model_for(config).to(device)
    model.train()
    if world > 1:
        dist_.broadcast_parameters(model)
    update, inner_reg, anil, aux = _build_objective(model, config)
    if aux is not None:
        aux.to(device)
    params = list(model.parameters()) + ([] if aux is None else list(aux.parameters()))
    optimizer = torch.optim.Adam(params, lr=config.meta_lr)

    with _forked_rng(step_seed(config.seed, "val-tasks"), device):
        val_tasks = [t.to(device) for t in sources["val"].sample(config.val_tasks, step_seed(config.seed, "val"))]

    start, best_score, best_step = 0, -math.inf, -1
    monitor = OverfittingMonitor()
    records: list[dict[str, Any]] = []
    if ckpt is not None:
        _check_model_matches(model, ckpt, last_path)
        model.load_state_dict(ckpt["model"])
        if ckpt.get("optimizer") is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        if aux is not None and ckpt.get("aux") is not None:
            aux.load_state_dict(ckpt["aux"])
        start = int(ckpt["step"])
        extra = ckpt.get("extra", {})
        best_score = float(extra.get("best_score", -math.inf))
        best_step = int(extra.get("best_step", -1))
        for pgd, fgsm in extra.get("monitor", []):
            monitor.update(pgd, fgsm)
        if ckpt.get("rng"):
            _set_rng_state(ckpt["rng"])
        records = _read_log(log_path, start)
        if main_process:
            _atomic_write_text("".join(json.dumps(r) + "\n" for r in records), log_path)
    elif main_process:
        for p in (log_path, csv_path, best_path):
            if p.exists():
                p.unlink()
    if main_process:  # only rank 0 writes files
        _atomic_write_text(json.dumps(config.to_dict(), indent=2, default=_json_default) + "\n", out / "config.json")

    def save_last(step: int) -> None:
        save_checkpoint(
            last_path, model=model, config=config, step=step, optimizer=optimizer, aux=aux,
            extra={"best_score": best_score, "best_step": best_step,
                   "monitor": [list(h) for h in monitor.history]},
        )

    bar = None
    if progress and main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.meta_steps, initial=start, desc=config.method, dynamic_ncols=True)
    t0 = time.perf_counter()
    completed = start  # the model and optimizer hold the state after this step...
    dirty = False  # ...unless a later optimizer step has run and its bookkeeping has not finished
    saved = start if ckpt is not None else -1
    try:
        with open(log_path if main_process else os.devnull, "a", encoding="utf-8") as log_file:
            for step in range(start + 1, config.meta_steps + 1):
                _seed_all(step_seed(config.seed, step))
                tasks = sources["train"].sample(config.meta_batch, step_seed(config.seed, f"tasks:{step}"))
                lo, hi = dist_.shard_bounds(len(tasks), rank, world)
                optimizer.zero_grad(set_to_none=True)
                rows = []
                for i in range(lo, hi):
                    # Each task's attack randomness depends on (seed, step, task) only, so a
                    # sharded run computes exactly what one process computes.
                    _seed_all(step_seed(config.seed, f"task:{step}:{i}"))
                    task = tasks[i].to(device)
                    if anil is not None:
                        fast = anil.adapt(task.support_x, task.support_y, steps=config.inner_steps,
                                          step_size=config.inner_lr, first_order=config.first_order)
                    else:
                        fast = adapt(model, task.support_x, task.support_y, steps=config.inner_steps,
                                     step_size=config.inner_lr, first_order=config.first_order,
                                     regularizer=inner_reg, gamma_in=config.gamma_in or 0.0)
                    unl = task.unlabeled if config.unlabeled else None
                    loss = update(task.query_x, task.query_y, params=fast, unlabeled=unl)
                    loss.backward()
                    rows.append(update.last.as_dict())
                # Sum over this rank's tasks -> mean over the whole meta-batch on every rank.
                dist_.all_reduce_grads(params, average_over=len(tasks))
                dirty = True
                optimizer.step()
                stats = _mean_stats(rows) if rows else {}  # a rank may hold no task
                rec: dict[str, Any] = {"step": step}
                rec.update(stats)

                if main_process and (step % config.eval_every == 0 or step == config.meta_steps):
                    with _forked_rng(step_seed(config.seed, f"val:{step}"), device):
                        val = validate(model, val_tasks, eps=config.eps, steps=config.test_inner_steps,
                                       step_size=config.inner_lr, attack_steps=config.eval_attack_steps,
                                       one_step=config.one_step_attack, anil=anil)
                    score = {"sa+ra": val["sa"] + val["ra"], "sa": val["sa"], "ra": val["ra"],
                             "last": float(step)}[config.select]
                    rec.update({f"val_{k}": v for k, v in val.items()})
                    rec["val_score"] = score
                    if config.one_step_attack:
                        co = monitor.update(val["ra"], val["ra_fgsm"])
                        rec["catastrophic_overfitting"] = co
                        if co:
                            warnings.warn(
                                f"step {step}: catastrophic overfitting - validation PGD robust accuracy "
                                f"fell to {val['ra']:.3f} (best {monitor.best_pgd:.3f}) while FGSM accuracy "
                                f"is {val['ra_fgsm']:.3f}; consider a smaller FGSM step, more attack steps "
                                "or the checkpoint selected before the collapse", RuntimeWarning, stacklevel=3,
                            )
                    rec["best"] = score > best_score
                    if score > best_score:
                        best_score, best_step = score, step
                        save_checkpoint(best_path, model=model, config=config, step=step,
                                        aux=aux, extra={"val": val, "score": score, "select": config.select})
                rec["time"] = round(time.perf_counter() - t0, 3)
                if main_process and (step % config.log_every == 0 or "val_score" in rec):
                    clean = _clean_json(rec)
                    records.append(clean)
                    log_file.write(json.dumps(clean) + "\n")
                    log_file.flush()
                if main_process and (step % config.save_every == 0 or step == config.meta_steps):
                    save_last(step)
                    saved = step
                    _write_csv(records, csv_path)
                if bar is not None:
                    post = {"loss": f"{stats['loss']:.3f}", "acc": f"{stats['clean_acc']:.2f}"}
                    if not math.isnan(stats["adv_acc"]):
                        post["adv"] = f"{stats['adv_acc']:.2f}"
                    if "val_sa" in rec:
                        post["val_sa"] = f"{rec['val_sa']:.2f}"
                        post["val_ra"] = f"{rec['val_ra']:.2f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                completed, dirty = step, False
                if callback is not None:
                    callback(step, rec)
    except KeyboardInterrupt:
        if main_process:
            if not dirty and completed > saved:
                save_last(completed)
            _write_csv(records, csv_path)
        raise
    finally:
        if bar is not None:
            bar.close()
    if not main_process:
        return best_path
    _write_csv(records, csv_path)
    if not best_path.exists():  # meta_steps == 0 or resumed after the end
        save_checkpoint(best_path, model=model, config=config, step=completed, aux=aux,
                        extra={"val": {}, "score": best_score, "select": config.select})
    return best_path
