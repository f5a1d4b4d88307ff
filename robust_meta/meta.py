"""RobustMetaUpdate: the robust outer loss of R-MAML (paper eq. 3 and 4)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from . import fast as _fast
from ._checks import DeferredChecks, check_batch
from .attacks import AttackLike, attack_eps
from .params import call_model, named_params
from .regularizers import ATRegularizer, RobustnessRegularizer

__all__ = ["AuxLoss", "MetaStepStats", "RobustMetaUpdate"]


class AuxLoss(Protocol):
    """An auxiliary outer term such as `robust_meta.ContrastiveAux`.

    Called with the model, the adapted weights, the query inputs and their adversarial
    examples; returns the **already weighted** scalar (γ_CL·ℓ_CL).
    """

    def __call__(
        self, model: nn.Module, params: Mapping[str, Tensor] | None, inputs: Tensor, adv_inputs: Tensor
    ) -> Tensor: ...


@dataclass
class MetaStepStats:
    """Diagnostics of the last call (detached tensors; `as_dict` gives floats).

    Attributes:
        loss: the returned total.
        clean_loss: ℓ on the clean query images.
        robust_loss: R (``nan`` when no attack ran).
        aux_loss: the weighted auxiliary term (0 without one).
        clean_acc, adv_acc: accuracy on clean and adversarial query images
            (``nan`` when targets are not class indices or no attack ran).
    """

    loss: Tensor
    clean_loss: Tensor
    robust_loss: Tensor
    aux_loss: Tensor
    clean_acc: Tensor
    adv_acc: Tensor
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        """The six numbers as floats, read from the device in one transfer."""
        keys = ("loss", "clean_loss", "robust_loss", "aux_loss", "clean_acc", "adv_acc")
        dev = self.loss.device
        vals = torch.stack([getattr(self, k).detach().reshape(()).to(device=dev, dtype=torch.float64)
                            for k in keys]).tolist()
        return dict(zip(keys, vals))


def _accuracy(logits: Tensor, targets: Tensor) -> Tensor:
    if logits.dim() != 2 or targets.is_floating_point():
        return torch.full((), float("nan"), device=logits.device)
    return (logits.detach().argmax(1) == targets).float().mean()


class RobustMetaUpdate:
    r"""Robust outer loss for one task: \(\ell(w'; D') + \gamma_{out} R(w'; D')\) [+ aux].

    Replace the cross-entropy line of an existing MAML loop by a call to this object, on
    the same query inputs, query targets and adapted weights. Adversarial examples are
    generated against the adapted weights ``params`` (Algorithm S1, line 8) and are
    constants of the meta-gradient; the loss itself stays differentiable w.r.t. the
    meta-parameters through ``params`` (second order when ``params`` carry a graph).

    * ``gamma_out = 0`` (and no ``aux``) returns exactly ``loss_fn(model(x, params), y)``:
      no attack is run.
    * ``gamma_out = float("inf")`` is adversarial querying (AQ): the adversarial loss alone.

    **Mode policy.** The attack runs the network in the mode the model is in when called:
    train mode (MAML convention: batch statistics) in a training loop, eval mode in an
    evaluation. The attack never moves the model's running statistics.

    Args:
        loss_fn: the user's outer loss, ``loss_fn(logits, targets) -> scalar``.
        model: the meta-model (plain ``nn.Module`` or torchmeta ``MetaModule``).
        attack: attack for the default AT regularizer: ``"pgd"``, ``"fgsm"`` (one step of
            1.25ε from a uniform random start), ``"none"``, a `robust_meta.PGDAttack`, or a
            torchattacks attack class or instance (``[torchattacks]`` extra; an instance is
            never modified).
        eps: ℓ∞ radius in [0, 1] pixel units (e.g. ``2/255``). Required unless
            ``regularizer`` is given or ``attack`` is an instance carrying its own ε (then
            ``None`` uses it, and a different value is refused with a ``ValueError``).
        gamma_out: weight γ_out of the robust term (paper: 0.2 for AT, 5 for TRADES);
            ``float("inf")`` for AQ.
        attack_steps: PGD iterations (default 10).
        attack_step_size: PGD step (default ``2.5·eps/steps``).
        regularizer: a `RobustnessRegularizer` (e.g. ``TradesRegularizer``); replaces
            ``attack``/``eps``.
        aux: an auxiliary term (e.g. ``ContrastiveAux``) added as is.
        check_inputs: validate shapes, labels, pixel range and NaN on every call.
        compile: ``True``/``"auto"``: run the forward passes of the call (clean, attack steps,
            adversarial) through ``torch.compile`` and on the faster memory layout
            (`robust_meta.fast_paths`; ``"auto"`` only where a compiler is available);
            ``False``: eager; ``None`` (default): whatever the enclosing `robust_meta.fast_paths`
            block (or `robust_meta.train`) says, eager outside one.

    Example:
        >>> robust_loss = RobustMetaUpdate(F.cross_entropy, model, attack="fgsm", eps=2/255, gamma_out=0.2)
        >>> outer_loss += robust_loss(x_query, y_query, params=fast_weights)

    References:
        Wang et al., "On Fast Adversarial Robustness Adaptation in Model-Agnostic
        Meta-Learning", ICLR 2021, eq. 3 (R-MAML_out: γ_in = 0) and Algorithm S1.
    """

    def __init__(
        self,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        model: nn.Module,
        *,
        attack: AttackLike = "pgd",
        eps: float | None = None,
        gamma_out: float,
        attack_steps: int | None = None,
        attack_step_size: float | None = None,
        regularizer: RobustnessRegularizer | None = None,
        aux: AuxLoss | None = None,
        check_inputs: bool = True,
        compile: bool | str | None = None,
    ):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        named_params(model)  # raises for a non-module or a model without parameters
        gamma_out = float(gamma_out)
        if math.isnan(gamma_out) or gamma_out < 0:
            raise ValueError(f"gamma_out must be >= 0 (or inf for AQ), got {gamma_out}")
        if regularizer is None:
            if eps is None and attack_eps(attack) is None:
                raise ValueError("eps is required (in [0, 1] pixel units, e.g. eps=2/255) unless regularizer= is given")
            # The pixel check runs once in __call__, not again inside the attack.
            regularizer = ATRegularizer(
                attack, eps=eps, steps=attack_steps, step_size=attack_step_size, check_inputs=False
            )
        elif not isinstance(regularizer, RobustnessRegularizer):
            raise TypeError(f"regularizer must be a RobustnessRegularizer, got {type(regularizer).__name__}")
        self.loss_fn = loss_fn
        self.model = model
        self.gamma_out = gamma_out
        self.regularizer = regularizer
        self.aux = aux
        self.check_inputs = check_inputs
        self.compile = compile
        if compile is not None and compile is not True and compile is not False and compile != "auto":
            raise ValueError(f"compile must be 'auto', True, False or None, got {compile!r}")
        # Resolved at call time, on the device the inputs are on: building the loss before
        # ``model.to("cuda")`` must not switch compilation off.
        self._fast_by_device: dict[str, bool] = {}
        self.last: MetaStepStats | None = None

    def __repr__(self) -> str:
        return (
            f"RobustMetaUpdate(gamma_out={self.gamma_out:g}, regularizer={self.regularizer!r}, "
            f"aux={self.aux!r})"
        )

    @property
    def is_aq(self) -> bool:
        """Whether this is adversarial querying (γ_out = ∞)."""
        return math.isinf(self.gamma_out)

    def __call__(
        self,
        inputs: Tensor,
        targets: Tensor,
        params: Mapping[str, Tensor] | None = None,
        *,
        unlabeled: Tensor | None = None,
        model: nn.Module | None = None,
    ) -> Tensor:
        """The outer loss of one task at the adapted weights ``params``.

        Args:
            inputs: query images in [0, 1].
            targets: query labels.
            params: adapted weights from `robust_meta.adapt` (or torchmeta's
                ``gradient_update_parameters``); ``None`` means the model's own weights.
            unlabeled: extra unlabeled images of this task (TRADES only).
            model: evaluate this module instead of the one given at construction, e.g. a
                learn2learn-style clone ``learner = maml.clone()`` adapted in place
                (then leave ``params=None``).

        Returns:
            A scalar tensor.

        Shape:
            inputs: ``(B, C, H, W)``; targets: ``(B,)``; unlabeled: ``(U, C, H, W)``.
        """
        if self.compile is None:
            return self._call(inputs, targets, params, unlabeled, model)
        dev = inputs.device if isinstance(inputs, torch.Tensor) else _fast._model_device(self.model)
        on = self._fast_by_device.get(str(dev))
        if on is None:
            on = self._fast_by_device[str(dev)] = _fast.resolve_compile(self.compile, dev)
        with _fast._use_policy(on, _fast._current_channels_last()):
            return self._call(inputs, targets, params, unlabeled, model)

    def _call(self, inputs: Tensor, targets: Tensor, params: Mapping[str, Tensor] | None,
              unlabeled: Tensor | None, model: nn.Module | None) -> Tensor:
        model = self.model if model is None else model
        needs_attack = self.gamma_out > 0 or self.aux is not None
        checks = DeferredChecks() if self.check_inputs else None
        if checks is not None:  # shapes and types now; values read once, after the clean forward
            check_batch(inputs, targets, finite=False)
            checks.finite(inputs, "inputs")
            checks.finite(targets, "targets")
            if unlabeled is not None:
                check_batch(unlabeled, None, "unlabeled", finite=False)
                checks.finite(unlabeled, "unlabeled")
            if needs_attack:
                checks.pixels(inputs)
                if unlabeled is not None:
                    checks.pixels(unlabeled, "unlabeled")
        if self.is_aq and not isinstance(self.regularizer, ATRegularizer):
            # TRADES needs clean predictions with gradient, so AQ is AT-only.
            raise ValueError("gamma_out=inf (adversarial querying) needs the AT regularizer")

        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.is_aq):
            # AQ: the clean pass only feeds the diagnostics.
            logits = call_model(model, inputs, params)
            if checks is not None:
                checks.labels(logits, targets)
                checks.raise_if_bad()  # before the loss and the attack use bad values
            clean = self.loss_fn(logits, targets)

        nan = torch.full((), float("nan"), device=logits.device)
        if unlabeled is not None and self.gamma_out == 0:
            raise ValueError("unlabeled images are only used by a robust term (gamma_out > 0)")
        if not needs_attack:
            self.last = MetaStepStats(clean.detach(), clean.detach(), nan, torch.zeros((), device=logits.device),
                                      _accuracy(logits, targets), nan)
            return clean

        if self.gamma_out > 0:
            reg = self.regularizer(model, params, inputs, targets, logits=logits,
                                   loss_fn=self.loss_fn, unlabeled=unlabeled)
            total = reg.value if self.is_aq else clean + self.gamma_out * reg.value
            adv_inputs, robust, adv_acc = reg.adv_inputs, reg.value.detach(), _accuracy(reg.adv_logits, targets)
        else:
            # Only the auxiliary term needs the adversarial view: attack, but skip R.
            label = targets if self.regularizer.objective == "ce" else None
            adv_inputs = self.regularizer.adversarial(model, params, inputs, label)
            total, robust, adv_acc = clean, nan, nan
        aux_value = torch.zeros((), device=total.device, dtype=total.dtype)
        if self.aux is not None:
            aux_value = self.aux(model, params, inputs, adv_inputs)
            total = total + aux_value
        self.last = MetaStepStats(
            total.detach(), clean.detach(), robust, aux_value.detach(),
            _accuracy(logits, targets), adv_acc,
        )
        return total
