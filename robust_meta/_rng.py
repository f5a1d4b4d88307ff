"""Random streams of a training run: per-step seeds, saving and restoring generator states.

The randomness of meta-step ``s`` is drawn from generators re-seeded from ``step_seed(seed, s)``,
so a run's trajectory depends on its config only. Re-exported by `robust_meta.train`
(``_seed_all``, ``_rng_state``, ``_set_rng_state`` and ``_forked_rng`` there are these functions).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["cuda_devices", "forked_rng", "isolated_torch_rng", "rng_state", "seed_all", "seed_torch", "set_rng_state", "step_seed"]


def step_seed(seed: int, step: int | str) -> int:
    """A 63-bit seed derived from ``(seed, step)`` (SHA-256; independent streams per step).

    Example:
        >>> step_seed(0, 1) != step_seed(0, 2) != step_seed(1, 1)
        True
    """
    digest = hashlib.sha256(f"robust-meta:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def cuda_devices(*devices: torch.device | str | None) -> list[torch.device]:
    """The CUDA devices among ``devices`` (with an index), for `torch.random.fork_rng`."""
    out: list[torch.device] = []
    for d in devices:
        if d is None:
            continue
        d = torch.device(d)
        if d.type == "cuda":
            d = torch.device("cuda", torch.cuda.current_device() if d.index is None else d.index)
            if d not in out:
                out.append(d)
    return out


def seed_torch(seed: int, *devices: torch.device | str | None) -> None:
    """Seed torch's CPU generator and the generator of each CUDA device in ``devices``, only.

    Unlike ``torch.manual_seed``, which seeds *every* CUDA device (and, before CUDA is
    initialised, queues that seeding for the process's first CUDA use), this touches exactly
    the generators named: CPU work never re-seeds a GPU, and work on ``cuda:0`` never
    re-seeds ``cuda:1``.
    """
    torch.default_generator.manual_seed(int(seed))
    for d in cuda_devices(*devices):
        with torch.cuda.device(d):
            torch.cuda.manual_seed(int(seed))


@contextlib.contextmanager
def isolated_torch_rng(*devices: torch.device | str | None) -> Iterator[None]:
    """Fork torch's CPU generator and those of ``devices`` *and* every initialised CUDA device.

    For code that is not ours (torchattacks seeds with ``torch.manual_seed``, i.e. every CUDA
    device): every generator it can touch is restored afterwards, and a CUDA seeding it queued
    for later (CUDA not initialised yet) is dropped, so it cannot fire at the caller's first
    CUDA use.
    """
    devs = cuda_devices(*devices)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devs = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    tracker = getattr(torch.cuda, "_lazy_seed_tracker", None)
    saved = None
    if tracker is not None and not torch.cuda.is_initialized():
        saved = (getattr(tracker, "manual_seed_all_cb", None), getattr(tracker, "manual_seed_cb", None),
                 list(getattr(tracker, "call_order", [])))
    with torch.random.fork_rng(devices=devs):
        try:
            yield
        finally:
            if saved is not None and not torch.cuda.is_initialized():
                tracker.manual_seed_all_cb, tracker.manual_seed_cb, tracker.call_order = saved


def seed_all(seed: int, *devices: torch.device | str | None) -> None:
    """Seed Python ``random``, NumPy's global generator, torch's CPU generator and ``devices``' own.

    CUDA devices not named are left alone (see `seed_torch`).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    seed_torch(seed, *devices)


def rng_state() -> dict[str, Any]:
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


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore generator states saved by `rng_state` (CUDA ones where they fit this machine)."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError, IndexError):
            torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def forked_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run with all global generators seeded by ``seed``; restore them afterwards."""
    py, npst = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=cuda_devices(device)):
        seed_all(seed, device)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npst)
