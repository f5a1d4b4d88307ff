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

__all__ = ["forked_rng", "rng_state", "seed_all", "set_rng_state", "step_seed"]


def step_seed(seed: int, step: int | str) -> int:
    """A 63-bit seed derived from ``(seed, step)`` (SHA-256; independent streams per step).

    Example:
        >>> step_seed(0, 1) != step_seed(0, 2) != step_seed(1, 1)
        True
    """
    digest = hashlib.sha256(f"robust-meta:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seed_all(seed: int) -> None:
    """Seed Python ``random``, NumPy's global generator and torch (all devices) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        seed_all(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npst)
