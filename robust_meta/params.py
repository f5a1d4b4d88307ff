"""Running any model at a given set of weights.

Adapted weights are a ``dict[str, Tensor]`` keyed like ``model.named_parameters()``.
Two kinds of model are supported without importing torchmeta:

* **torchmeta MetaModules** (duck-typed: anything with ``meta_named_parameters``) are
  called as ``model(x, params=params)``;
* **plain nn.Modules** are called through `torch.func.functional_call`, with the
  module's own buffers for every name the dict does not hold.

The user's module and its ``.data`` are never rewritten in place.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from . import fast as _fast

Params = dict[str, Tensor]
FeatureSpec = str | Callable[..., Tensor] | None

__all__ = [
    "Params",
    "ModelAt",
    "call_model",
    "call_features",
    "call_head",
    "is_meta_module",
    "module_modes",
    "named_params",
    "preserved_buffers",
    "preserved_modes",
    "set_modes",
]


def is_meta_module(model: nn.Module) -> bool:
    """Whether ``model`` is a torchmeta ``MetaModule`` (duck-typed, no import)."""
    return hasattr(model, "meta_named_parameters")


def named_params(model: nn.Module) -> Params:
    """The model's own parameters as an ordered ``name -> tensor`` dict (no copies).

    Raises:
        ValueError: if the model has no parameters.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if is_meta_module(model):
        params = OrderedDict(model.meta_named_parameters())
    else:
        params = OrderedDict(model.named_parameters())
    if not params:
        raise ValueError(
            f"model {type(model).__name__} has no parameters: there is nothing to meta-learn"
        )
    return params


class _MethodCall(nn.Module):
    """Calls ``getattr(inner, method)`` so that functional_call can run any method."""

    def __init__(self, inner: nn.Module, method: str):
        super().__init__()
        self.inner = inner
        self.method = method

    def forward(self, *args, **kwargs):  # noqa: D401
        return getattr(self.inner, self.method)(*args, **kwargs)


def _functional(model: nn.Module, method: str, params: Mapping[str, Tensor], args: tuple) -> Tensor:
    if method == "forward":
        return torch.func.functional_call(model, dict(params), args, strict=False)
    wrapper = _MethodCall(model, method)
    prefixed = {f"inner.{k}": v for k, v in params.items()}
    return torch.func.functional_call(wrapper, prefixed, args, strict=False)


#: Floating dtypes below float32: images stay float32 and are cast only at the network's input.
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _network_input(model: nn.Module, x: Tensor, params: Mapping[str, Tensor] | None) -> Tensor:
    """``x`` cast to a half-precision model's dtype (the only place images are cast)."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dtype in LOW_PRECISION:
        return x
    first = next(iter(params.values()), None) if params is not None else next(model.parameters(), None)
    if first is not None and first.dtype in LOW_PRECISION:
        return x.to(first.dtype)
    return x


def call_model(model: nn.Module, x: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
    """``model(x)`` at the weights ``params`` (``None``: the model's own weights).

    For a half-precision model (float16 / bfloat16 weights) float32 images are cast to its
    dtype here, at the network's input only: the clean images, the perturbation and the
    ε-ball projection stay in float32, so an attack's ε-ball holds exactly (in bf16 a pixel
    near 1 can only move in steps of 1/256, so a projection done in bf16 overshoots ε).

    Shape:
        x: ``(B, ...)`` -> logits ``(B, C)``.
    """
    x = _network_input(model, x, params)
    if is_meta_module(model):
        return model(x) if params is None else model(x, params=params)
    if _fast._active():
        out = _fast._fast_call(model, x, params)
        if out is not None:
            return out
    if params is None:
        return model(x)
    return _functional(model, "forward", params, (x,))


class _StopForward(Exception):
    def __init__(self, value: Tensor):
        self.value = value


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        names = [n for n, _ in model.named_modules() if n]
        raise ValueError(
            f"model {type(model).__name__} has no submodule {name!r}; submodules are {names[:20]}"
        ) from err


def call_features(
    model: nn.Module,
    x: Tensor,
    params: Mapping[str, Tensor] | None = None,
    *,
    features: FeatureSpec = None,
    head: str | None = None,
) -> Tensor:
    """The representation (the input of the classifier) of ``x`` at weights ``params``.

    How the representation is found, in order:

    * ``features`` is a callable: ``features(model, x, params)``;
    * ``features`` is a module name: the output of that submodule, flattened to ``(B, -1)``;
    * ``head`` is a module name: the input of that submodule (the forward pass stops there,
      so the head is not computed);
    * otherwise ``model.forward_features(x)`` (timm convention).

    Shape:
        x: ``(B, ...)`` -> ``(B, D)`` (or whatever the model's features are).
    """
    if callable(features) and not isinstance(features, str):
        return features(model, x, params)
    if isinstance(features, str):
        sub = _submodule(model, features)

        def grab(_m, _inp, out):
            raise _StopForward(out)

        handle = sub.register_forward_hook(grab)
        try:
            call_model(model, x, params)
        except _StopForward as stop:
            return stop.value.flatten(1)
        finally:
            handle.remove()
        raise RuntimeError(f"submodule {features!r} was not called by model.forward")
    if head is not None:
        sub = _submodule(model, head)

        def grab_in(_m, args):
            raise _StopForward(args[0])

        handle = sub.register_forward_pre_hook(grab_in)
        try:
            call_model(model, x, params)
        except _StopForward as stop:
            return stop.value
        finally:
            handle.remove()
        raise RuntimeError(f"head submodule {head!r} was not called by model.forward")
    if not hasattr(model, "forward_features"):
        raise TypeError(
            f"{type(model).__name__} has no forward_features(); pass features=<module name or "
            "callable> or head=<classifier module name> to say where the representation is"
        )
    if params is None:
        return model.forward_features(x)
    if is_meta_module(model):
        return model.forward_features(x, params=params)
    return _functional(model, "forward_features", params, (x,))


def call_head(
    model: nn.Module,
    feats: Tensor,
    params: Mapping[str, Tensor] | None = None,
    *,
    head: str | None = None,
) -> Tensor:
    """The classifier applied to a representation, at weights ``params``.

    With ``head`` (a module name) the submodule is run with the ``head.``-prefixed entries of
    ``params``; otherwise ``model.forward_head(feats)``.
    """
    if head is not None:
        sub = _submodule(model, head)
        if params is None:
            return sub(feats)
        prefix = head + "."
        sub_params = {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}
        if is_meta_module(sub):
            return sub(feats, params=sub_params)
        return torch.func.functional_call(sub, sub_params, (feats,), strict=False)
    if not hasattr(model, "forward_head"):
        raise TypeError(
            f"{type(model).__name__} has no forward_head(); pass head=<classifier module name>"
        )
    if params is None:
        return model.forward_head(feats)
    if is_meta_module(model):
        return model.forward_head(feats, params=params)
    return _functional(model, "forward_head", params, (feats,))


@contextlib.contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Run with private copies of every buffer of ``model`` (e.g. batch-norm statistics).

    Attacks run many forward passes; in train mode each one would move the running
    statistics. Inside this context the buffers are clones; on exit the original tensor
    objects are put back untouched (no in-place write, so autograd graphs that saved them
    stay valid).
    """
    swapped = []
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                swapped.append((module, name, buf))
                module._buffers[name] = buf.clone()
    try:
        yield
    finally:
        for module, name, buf in swapped:
            module._buffers[name] = buf


def module_modes(model: nn.Module) -> dict[str, bool]:
    """The train/eval mode of every submodule, by name (``""`` is the model itself).

    "The mode" of a model means this: a model in train mode with one batch norm frozen in
    eval mode is *not* in train mode, and robust-meta restores it exactly.
    """
    return {name: m.training for name, m in model.named_modules(remove_duplicate=False)}


def set_modes(model: nn.Module, modes: Mapping[str, bool]) -> None:
    """Put every submodule back in the mode `module_modes` recorded (no ``.train()`` cascade)."""
    for name, m in model.named_modules(remove_duplicate=False):
        if name in modes:
            m.training = modes[name]


@contextlib.contextmanager
def preserved_modes(model: nn.Module, training: bool | None = None) -> Iterator[None]:
    """Run with ``model.train(training)`` (``None``: the modes as they are); restore every module's mode.

    ``model.train(prev)`` after a block is *not* a restore: it overwrites the mode of every
    submodule, e.g. it unfreezes a batch norm the user had put in eval mode. This restores the
    mode of each submodule exactly.
    """
    modes = module_modes(model)
    try:
        if training is not None and any(v != bool(training) for v in modes.values()):
            model.train(bool(training))
        yield
    finally:
        set_modes(model, modes)


class ModelAt(nn.Module):
    """An ``nn.Module`` view of "``model`` at the weights ``params``", for attack libraries.

    The weights are detached (an attack needs gradients w.r.t. the input only, and the
    adversarial example must be a constant of the meta-gradient). Its train/eval mode is
    fixed at construction: ``train()``/``eval()`` calls made by an attack library are
    ignored, so the attack runs the network in exactly the mode the loss uses.

    Args:
        model: a plain ``nn.Module`` or a torchmeta ``MetaModule``.
        params: the weights; ``None`` means the model's own weights (detached).
        training: the mode to run the whole model in; ``None`` keeps the mode of every
            submodule as it is (a frozen eval-mode batch norm inside a train-mode model stays
            frozen). Each submodule's own mode is restored after every call.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Mapping[str, Tensor] | None = None,
        *,
        training: bool | None = None,
    ):
        super().__init__()
        # Stored outside nn.Module registration so that .train() does not reach the user's model.
        object.__setattr__(self, "_model", model)
        src = named_params(model) if params is None else params
        object.__setattr__(self, "_params", {k: v.detach() for k, v in src.items()})
        #: The forced mode, or ``None`` (every submodule keeps its own).
        self.forced_mode = None if training is None else bool(training)
        self._mode = model.training if training is None else bool(training)
        # torchattacks reads the device from next(model.parameters()).
        first = next(iter(self._params.values()))
        self._anchor = nn.Parameter(torch.empty(0, device=first.device, dtype=first.dtype), requires_grad=False)
        self.training = self._mode

    def train(self, mode: bool = True) -> ModelAt:  # noqa: D401 - fixed mode by design
        self.training = self._mode
        return self

    @property
    def model(self) -> nn.Module:
        """The viewed model."""
        return self._model

    def forward(self, x: Tensor) -> Tensor:
        if self.forced_mode is None:
            return call_model(self._model, x, self._params)
        with preserved_modes(self._model, self.forced_mode):
            return call_model(self._model, x, self._params)
