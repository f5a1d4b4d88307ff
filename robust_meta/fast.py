"""Fast paths: ``torch.compile``'d forward passes and an automatic ``channels_last`` layout.

Every forward pass robust-meta runs at a set of weights goes through
`robust_meta.params.call_model`: the inner-loop (fine-tuning) steps, the attack steps
(forward + input gradient) and the outer forward of the meta-step. Inside `fast_paths`
that call is, where eligible,

* **compiled** (``torch.compile``, inductor): one compiled function per model, taking the
  weights and buffers as *inputs*, so new fast weights (a new task) reuse the compiled
  graph; a graph is compiled once per input shape, train/eval mode and gradient need
  (e.g. attack: input gradient; fine-tuning: weight gradient; measurement: no gradient);
* run on **channels_last** inputs where that layout was measured faster (see
  `channels_last_wins`) **and the model was seen to accept it**: the first time a model
  meets a channels_last input of a given shape, robust-meta runs it on both layouts (no
  gradient, same random stream, buffers restored) and keeps channels_last only when both
  give the same output to float tolerance. A model that fails on it (``x.view(x.size(0), -1)``,
  the flatten of the MAML reference code, needs contiguous memory) or computes something
  else is run on contiguous inputs from then on, with one `LayoutWarning` that names the
  switch (``channels_last=False``).

Not eligible, hence always eager: torchmeta MetaModules, the forward passes of a
second-order inner loop (their gradient is differentiated again, which compiled graphs do
not support), calls inside a graph being compiled. A compilation that fails (no C++
compiler, an unsupported op) falls back to eager for that model, with one `CompileWarning`.
Results agree with eager to floating-point tolerance, not bit for bit: a compiled kernel
sums in another order (and an attack's ``sign`` of a gradient that is almost 0 can flip).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import itertools
import os
import shutil
import sys
import types
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "CompileWarning",
    "FastPathWarning",
    "LayoutWarning",
    "channels_last_wins",
    "compile_available",
    "fast_paths",
    "resolve_compile",
    "tune_malloc",
]

CompileSetting = bool | str | None


class FastPathWarning(RuntimeWarning):
    """A fast path could not be used for a model; robust-meta runs the plain computation."""


class CompileWarning(FastPathWarning):
    """``torch.compile`` failed on a model; robust-meta runs it eagerly instead."""


class LayoutWarning(FastPathWarning):
    """A model fails on (or computes differently with) channels_last inputs; they stay contiguous."""


@dataclass(frozen=True)
class _Policy:
    compile: bool
    channels_last: bool | str  # True, False or "auto"
    cuda_only: bool = False  # compile="auto": compile CUDA inputs only


_POLICY: contextvars.ContextVar[_Policy | None] = contextvars.ContextVar("robust_meta_fast", default=None)
_EAGER: contextvars.ContextVar[bool] = contextvars.ContextVar("robust_meta_eager", default=False)

# model -> compiled forward; models whose compilation failed.
_COMPILED: weakref.WeakKeyDictionary[nn.Module, Callable] = weakref.WeakKeyDictionary()
_BROKEN: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def compile_available(device: torch.device | str = "cpu") -> bool:
    """Whether ``torch.compile`` (inductor) can run on ``device`` here.

    CPU needs a C++ compiler (``$CXX``, ``g++``, ``c++`` or ``clang++``); CUDA needs triton.
    ``ROBUST_META_COMPILE=0`` in the environment turns compilation off everywhere.
    """
    if os.environ.get("ROBUST_META_COMPILE", "").strip() == "0":
        return False
    if sys.platform == "win32" or not hasattr(torch, "compile"):
        return False
    try:
        import torch._dynamo as dynamo

        if not dynamo.is_dynamo_supported():
            return False
    except Exception:  # pragma: no cover - very old or stripped torch
        return False
    kind = torch.device(device).type
    if kind == "cuda":
        return importlib.util.find_spec("triton") is not None
    if kind == "cpu":
        cxx = os.environ.get("CXX")
        return any(shutil.which(c) for c in ([cxx] if cxx else []) + ["g++", "c++", "clang++"])
    return False


def resolve_compile(
    setting: CompileSetting, device: torch.device | str, *, work: int | None = None, min_work: int = 0
) -> bool:
    """Turn ``compile="auto"|True|False`` into a decision.

    ``True`` compiles whenever possible (and falls back to eager with a warning if not);
    ``"auto"`` compiles only on CUDA, where `compile_available`, and when the workload is
    known to repay the compilation (``work >= min_work``, e.g. tasks to evaluate or meta-steps
    to train); ``False``/``None`` never compiles. On a CPU ``"auto"`` does not compile: there
    the compiled Conv4 steps were measured *slower* than the eager channels_last path with 2
    threads (docs/performance.md) and cost 30–80 s of compilation per process.

    Raises:
        ValueError: any other value.
    """
    if setting is None or setting is False:
        return False
    if setting is True:
        if not compile_available(device):
            warnings.warn(
                f"compile=True but torch.compile is not available on {torch.device(device).type} here "
                "(no C++ compiler / triton, or ROBUST_META_COMPILE=0): running eagerly",
                CompileWarning,
                stacklevel=3,
            )
            return False
        return True
    if setting == "auto":
        if torch.device(device).type != "cuda" or not compile_available(device):
            return False
        return work is None or work >= min_work
    raise ValueError(f"compile must be 'auto', True or False, got {setting!r}")


_MALLOC_TUNED: list[bool] = []
MALLOC_ENV = "ROBUST_META_MALLOPT"


def tune_malloc() -> bool:
    """Keep freed CPU tensor memory in the process instead of unmapping it (glibc; process-wide).

    PyTorch's CPU tensors come from ``malloc``. glibc serves blocks above its mmap threshold
    (128 KiB at start) with fresh ``mmap`` pages and unmaps them on free, and gives memory at
    the top of the heap back above its trim threshold (128 KiB), so every large activation of
    every forward and backward pass is page-faulted and zero-filled anew. Raising the mmap
    threshold to 32 MiB (glibc's maximum), the trim threshold to 1 GiB and the top pad to
    16 MiB keeps that memory for reuse: measured 1.6–2.2× faster evaluation of Conv4 on
    84×84 images on a 2-core CPU (docs/performance.md). The numbers computed are unaffected.

    **It changes the host process for good**: the settings cannot be read back (glibc has no
    getter) and stay in force for the rest of the process, so up to 1 GiB of freed memory
    stays resident instead of going back to the system (measured: after one `evaluate` of
    Conv4 on 84×84 images, ~70 MiB freed and kept; docs/performance.md). So a library call
    never does it behind your back: `robust_meta.evaluate`, `robust_meta.train` and
    `fast_paths` leave malloc alone unless ``ROBUST_META_MALLOPT=1`` is set; the
    ``robust-meta`` command (whose process is its own) and robust-meta's own worker
    processes call it. Call it yourself once in a long job to opt in. ``ROBUST_META_MALLOPT=0``
    turns it off everywhere, the command included. Not glibc (macOS, musl, Windows): nothing
    is done.

    Returns:
        Whether the settings are in force.
    """
    if _MALLOC_TUNED:
        return _MALLOC_TUNED[0]
    ok = False
    if os.environ.get(MALLOC_ENV, "").strip() != "0" and sys.platform.startswith("linux"):
        try:
            import ctypes
            import platform

            if platform.libc_ver()[0] == "glibc":
                mallopt = ctypes.CDLL(None).mallopt
                mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                # M_MMAP_THRESHOLD = -3, M_TRIM_THRESHOLD = -1, M_TOP_PAD = -2 (malloc.h)
                ok = all(mallopt(opt, val) == 1 for opt, val in ((-3, 32 << 20), (-1, 1 << 30), (-2, 16 << 20)))
        except (OSError, AttributeError):  # pragma: no cover - no mallopt in this libc
            ok = False
    _MALLOC_TUNED.append(ok)
    return ok


def _library_malloc() -> None:
    """What a library entry point does about malloc: nothing, unless ``ROBUST_META_MALLOPT=1``."""
    if os.environ.get(MALLOC_ENV, "").strip() == "1":
        tune_malloc()


def _check_channels_last(value: bool | str) -> bool | str:
    if value is True or value is False or value == "auto":
        return value
    raise ValueError(f"channels_last must be 'auto', True or False, got {value!r}")


@contextlib.contextmanager
def fast_paths(compile: CompileSetting = "auto", channels_last: bool | str = "auto") -> Iterator[None]:
    """Run robust-meta's forward passes on the fast paths inside this block.

    Args:
        compile: ``True``: compile every eligible forward pass (``torch.compile``, once per
            model, shape, mode and gradient need; eager with a `CompileWarning` where it
            fails); ``"auto"``: the same for CUDA inputs when triton is available (not on a
            CPU, see `resolve_compile`); ``False``: eager.
        channels_last: ``"auto"``: 4-D inputs of convolutional models on the layout
            `channels_last_wins` picks; ``True``: always channels_last for 4-D inputs;
            ``False``: leave the inputs as they are.

    Example:
        >>> with robust_meta.fast_paths(compile=True):
        ...     for step in range(steps):
        ...         meta_step(...)   # adapt + RobustMetaUpdate, as before

    Second-order inner loops and torchmeta MetaModules stay eager inside the block. The
    process's allocator is left alone: `tune_malloc` is a separate, process-wide opt-in.
    """
    if compile == "auto":
        resolved = _Policy(compile_available("cuda"), _check_channels_last(channels_last), cuda_only=True)
    else:
        resolved = _Policy(resolve_compile(compile, "cpu"), _check_channels_last(channels_last))
    _library_malloc()
    token = _POLICY.set(resolved)
    try:
        yield
    finally:
        _POLICY.reset(token)


@contextlib.contextmanager
def _use_policy(compile: bool, channels_last: bool | str) -> Iterator[None]:
    """Internal: enter an already resolved policy (entry points resolve ``"auto"`` themselves)."""
    _library_malloc()
    token = _POLICY.set(_Policy(bool(compile), _check_channels_last(channels_last)))
    try:
        yield
    finally:
        _POLICY.reset(token)


@contextlib.contextmanager
def _eager() -> Iterator[None]:
    """Internal: force eager forward passes (second-order inner loops)."""
    token = _EAGER.set(True)
    try:
        yield
    finally:
        _EAGER.reset(token)


def _current_channels_last() -> bool | str:
    """The enclosing policy's ``channels_last`` setting (``"auto"`` outside any)."""
    p = _POLICY.get()
    return "auto" if p is None else p.channels_last


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for an empty model)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def _active() -> bool:
    """Whether a fast-path policy is in force here."""
    p = _POLICY.get()
    return p is not None and (p.compile or p.channels_last is not False) and not _EAGER.get()


# ----------------------------------------------------------------------------- layout
_CONV: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _has_conv2d(model: nn.Module) -> bool:
    has = _CONV.get(model)
    if has is None:
        has = _CONV[model] = any(isinstance(m, nn.Conv2d) for m in model.modules())
    return has


def channels_last_wins(x: Tensor) -> bool:
    """The ``channels_last="auto"`` rule: whether NHWC is faster for this input.

    Measured with ``benchmarks/memory_format.py`` (Conv4, forward + input or weight gradient,
    2-core CPU, docs/performance.md): colour images of 32×32 pixels and up run 1.3–1.8×
    faster in channels_last; one-channel 28×28 images (Omniglot) run at the same speed or
    slower (0.70–1.08×). So: CPU, ≥ 3 channels and both sides ≥ 32. CUDA inputs are left as they
    are until a GPU measurement (``benchmarks/gpu.sh``) says otherwise.
    """
    if x.dim() != 4 or x.device.type != "cpu":
        return False
    return x.shape[1] >= 3 and min(x.shape[2], x.shape[3]) >= 32


# model -> {(input shape without batch, dtype, device type): channels_last accepted}
_LAYOUT_SEEN: weakref.WeakKeyDictionary[nn.Module, dict[tuple, bool]] = weakref.WeakKeyDictionary()


def _layout(model: nn.Module, x: Tensor, setting: bool | str, params: Mapping[str, Tensor] | None = None) -> Tensor:
    if setting is False or x.dim() != 4 or x.is_contiguous(memory_format=torch.channels_last):
        return x
    if setting == "auto" and not channels_last_wins(x):
        return x
    if not _has_conv2d(model):
        return x
    xl = x.contiguous(memory_format=torch.channels_last)
    return xl if _layout_accepted(model, x, xl, params) else x


def _run_eager(model: nn.Module, x: Tensor, params: Mapping[str, Tensor] | None) -> Tensor:
    return model(x) if params is None else torch.func.functional_call(model, dict(params), (x,), strict=False)


def _layout_accepted(model: nn.Module, x: Tensor, xl: Tensor, params: Mapping[str, Tensor] | None) -> bool:
    """Whether ``model`` gives the same output on channels_last ``xl`` as on ``x`` (checked once)."""
    seen = _LAYOUT_SEEN.setdefault(model, {})
    key = (tuple(x.shape[1:]), x.dtype, x.device.type)
    ok = seen.get(key)
    if ok is not None:
        return ok
    from ._rng import cuda_devices
    from .params import preserved_buffers

    devices = cuda_devices(x.device)
    with torch.no_grad(), torch.random.fork_rng(devices=devices), preserved_buffers(model):
        cpu_state = torch.get_rng_state()
        cuda_state = [torch.cuda.get_rng_state(d) for d in devices]
        try:
            ref = _run_eager(model, x, params)
        except Exception:  # noqa: BLE001 - a real error: the caller's own call raises it
            return False
        torch.set_rng_state(cpu_state)
        for d, st in zip(devices, cuda_state):
            torch.cuda.set_rng_state(st, d)
        why = None
        try:
            out = _run_eager(model, xl, params)
        except Exception as err:  # noqa: BLE001 - the layout is what fails
            first = str(err).splitlines()[0][:160] if str(err) else ""
            why = f"it raises {type(err).__name__}: {first}"
        else:
            if not isinstance(ref, Tensor) or not isinstance(out, Tensor):
                why = None if type(ref) is type(out) else "its output type changes"
            elif ref.shape != out.shape:
                why = f"its output shape changes ({tuple(ref.shape)} -> {tuple(out.shape)})"
            else:
                scale = float(ref.detach().abs().max()) if ref.numel() else 0.0
                diff = float((ref.detach() - out.detach()).abs().max()) if ref.numel() else 0.0
                if not diff <= 1e-3 * max(1.0, scale):
                    why = f"its output changes by up to {diff:.3g} (of {scale:.3g})"
    ok = seen[key] = why is None
    if not ok:
        warnings.warn(
            f"channels_last: {type(model).__name__} does not accept channels_last inputs of shape "
            f"{tuple(x.shape[1:])} ({why}; e.g. x.view(x.size(0), -1) needs contiguous memory: "
            "x.flatten(1) works with both). Running it on contiguous inputs; pass "
            "channels_last=False (evaluate, fast_paths) to skip this check",
            LayoutWarning,
            stacklevel=5,
        )
    return ok


# ----------------------------------------------------------------------------- compile
_FORWARD_IDS = itertools.count()


def _compiled_forward(model: nn.Module) -> Callable:
    fn = _COMPILED.get(model)
    if fn is None:
        ref = weakref.ref(model)

        def forward(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
            return torch.func.functional_call(ref(), {**buffers, **params}, (x,), strict=False)

        # One code object per model: dynamo caches graphs on the code object and stops
        # compiling it after `recompile_limit` (8) variants, so a shared function would let
        # every model of the process (all the ways of a reproduction) share those 8.
        code = forward.__code__.replace(co_name=f"robust_meta_forward_{next(_FORWARD_IDS)}")
        forward = types.FunctionType(code, forward.__globals__, code.co_name, None, forward.__closure__)
        fn = torch.compile(forward, dynamic=False)
        _COMPILED[model] = fn
    return fn


def _not_a_compile_failure(exc: BaseException) -> bool:
    """Errors that must reach the caller as they are, not be taken for a compile failure."""
    from .params import _StopForward

    chain = [exc, exc.__cause__, exc.__context__]
    return any(isinstance(e, (_StopForward, torch.OutOfMemoryError)) for e in chain)


def _recompile_limit_hit(exc: BaseException) -> bool:
    fail = getattr(importlib.import_module("torch._dynamo.exc"), "FailOnRecompileLimitHit", ())
    return isinstance(exc, fail) if fail else False


def _fast_call(model: nn.Module, x: Tensor, params: Mapping[str, Tensor] | None) -> Tensor | None:
    """``model(x)`` at ``params`` on the fast path, or ``None`` when the call is not eligible."""
    p = _POLICY.get()
    if p is None or _EAGER.get() or not isinstance(x, Tensor):
        return None
    if torch.compiler.is_compiling():
        return None
    x = _layout(model, x, p.channels_last, params)
    if not p.compile or model in _BROKEN or (p.cuda_only and x.device.type != "cuda"):
        return torch.func.functional_call(model, dict(params), (x,), strict=False) if params is not None \
            else model(x)
    weights = dict(model.named_parameters()) if params is None else dict(params)
    own = dict(model.named_buffers())
    # The compiled graph updates (batch-norm) buffers with a copy_ that bumps their autograd
    # version, which would invalidate a second-order graph that saved them; eager kernels
    # update them in place without a bump. So: clones in, values written back through .data.
    buffers = {k: b.clone() for k, b in own.items()}
    try:
        # Past dynamo's recompile limit a call would silently run eagerly: make it an error
        # here, so that the fallback below says so.
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            out = _compiled_forward(model)(weights, buffers, x)
    except Exception as exc:  # a compile failure, or a real error that eager raises again
        if _not_a_compile_failure(exc):  # call_features' stop signal, out of memory: not ours
            raise
        err = exc
    else:
        with torch.no_grad():
            for k, b in own.items():
                b.data.copy_(buffers[k])
        return out
    # Outside the except block, so that a real error is not chained to the compiler's.
    out = torch.func.functional_call(model, {**own, **weights}, (x,), strict=False)
    _BROKEN.add(model)
    first_line = str(err).splitlines()[0][:200] if str(err) else ""
    if _recompile_limit_hit(err):
        limit = torch._dynamo.config.recompile_limit
        why = (f"it needed more than torch._dynamo.config.recompile_limit = {limit} graphs (input "
               "shapes x modes x gradient needs); raise that limit to compile them all")
    else:
        why = f"{type(err).__name__}: {first_line}"
    warnings.warn(
        f"torch.compile failed on {type(model).__name__} ({why}); running it eagerly",
        CompileWarning,
        stacklevel=3,
    )
    return out
