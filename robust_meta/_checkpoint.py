"""Checkpoint I/O: the robust-meta checkpoint format, atomic writes, rebuilding models.

A checkpoint is a ``torch.save``'d dict of tensors and primitive types only (it loads with
``torch.load(..., weights_only=True)``): ``format``, ``version``, ``step``, ``config`` (the
resolved `robust_meta.train.TrainConfig` as a dict), ``model`` (its
``state_dict``: parameters and buffers), ``signature`` (shapes), ``optimizer``, ``aux``,
``rng`` (generator states) and ``extra``. Files are written atomically
(`robust_meta._io.atomic_save`). Re-exported by `robust_meta.train`;
``robust_meta.train.model_from_checkpoint`` is the public way to load a trained model.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import atomic_save
from ._rng import rng_state
from ._train_config import TrainConfig

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "atomic_save",
    "build_model_for",
    "checkpoint_state",
    "file_sha256",
    "load_checkpoint",
    "model_from_checkpoint",
    "save_checkpoint",
]

#: Value of the ``"format"`` key of every robust-meta checkpoint.
CHECKPOINT_FORMAT = "robust-meta-checkpoint"
#: Newest checkpoint version this robust-meta writes and reads.
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, not ours, or for another model."""


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (identifies a checkpoint independently of its path)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    state = checkpoint_state(model=model, config=config, step=step, optimizer=optimizer, aux=aux,
                             rng=rng, extra=extra)
    return atomic_save(state, path)


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` (nested dicts, lists, tuples) with ``fn`` applied to every tensor in it."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def _on_cpu(obj: Any) -> Any:
    """A copy of ``obj`` with every tensor copied to the CPU (one copy each, no GPU-side deep
    copy first), so a checkpoint opens on a CPU-only machine with a plain ``torch.load``."""
    return _map_tensors(obj, lambda t: t.detach().to("cpu", copy=True))


def _device_copy(obj: Any) -> Any:
    """A copy of ``obj`` whose tensors are clones on their own device."""
    return _map_tensors(obj, lambda t: t.detach().clone())


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor that is not on the CPU moved there (CPU tensors are kept as they are)."""
    return _map_tensors(obj, lambda t: t if t.device.type == "cpu" else t.detach().to("cpu"))


def checkpoint_state(
    *,
    model: nn.Module,
    config: TrainConfig | Mapping[str, Any],
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    aux: nn.Module | None = None,
    rng: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    on_device: bool = False,
) -> dict[str, Any]:
    """The dict `save_checkpoint` writes, as an in-memory snapshot (arguments as there).

    Every tensor is a copy on the CPU (model, aux and optimizer state; ``load_state_dict``
    moves the optimizer state back to the parameters' device), so the
    snapshot stays valid while training goes on; ``torch.save`` it (`atomic_save`) to get
    the file `save_checkpoint` would have written at this moment. With ``on_device`` the
    copies stay where the tensors live (a GPU-side clone: no host transfer, no sync — the
    per-step snapshot of `robust_meta.train`); `to_cpu` them before saving.
    """
    cfg = config.to_dict() if isinstance(config, TrainConfig) else dict(config)
    copy_ = _device_copy if on_device else _on_cpu
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "step": int(step),
        "config": cfg,
        "model": copy_(model.state_dict()),
        "signature": _signature(model),
        "optimizer": None if optimizer is None else copy_(optimizer.state_dict()),
        "aux": None if aux is None else copy_(aux.state_dict()),
        "rng": rng_state() if rng is None else dict(rng),
        "extra": dict(extra or {}),
    }


def _cpu_copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


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
