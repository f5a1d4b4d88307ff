r"""Robustness regularizers \(R(w; D) = \mathbb{E} \max_{\|\delta\|_\infty \le \epsilon} g(w; x+\delta, y)\).

* `ATRegularizer` — adversarial training: ``g`` is the task loss on the adversarial
  input (paper eq. 2 with λ = 0).
* `TradesRegularizer` — TRADES: ``g = KL(p(x) ‖ p(x+δ))``; needs no labels, so it
  also runs on unlabeled images (R-MAML_out-TRADES).

The adversarial examples are generated against the weights passed in (the adapted weights
in the meta-update) and are constants of the meta-gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from .attacks import AttackLike, _check_spec, check_objective, perturb, resolve_eps
from .params import call_model

__all__ = ["ATRegularizer", "RegularizerOutput", "RobustnessRegularizer", "TradesRegularizer", "trades_kl"]


@dataclass
class RegularizerOutput:
    """What a regularizer returns.

    Attributes:
        value: the scalar R, differentiable w.r.t. the weights it was given.
        adv_inputs: the adversarial examples of the labeled inputs (detached).
        adv_logits: the model's logits on ``adv_inputs`` (with graph).
    """

    value: Tensor
    adv_inputs: Tensor
    adv_logits: Tensor


def trades_kl(clean_logits: Tensor, adv_logits: Tensor) -> Tensor:
    r"""\(\frac1B\sum_b \mathrm{KL}(p(x_b)\,\|\,p(x_b+\delta_b))\), gradient through both sides.

    Shape:
        clean_logits, adv_logits: ``(B, C)`` -> scalar.
    """
    log_p = F.log_softmax(clean_logits, dim=1)
    log_q = F.log_softmax(adv_logits, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


class RobustnessRegularizer:
    """Base class: holds the attack configuration; subclasses define the objective.

    Args:
        attack: a name from `robust_meta.attacks.ATTACKS`, a `robust_meta.PGDAttack`, or a
            torchattacks attack class or instance (``[torchattacks]`` extra). An instance is
            never modified: robust-meta attacks with a private copy.
        eps: ℓ∞ radius in [0, 1] pixel units. With an attack instance, ``None`` means the
            instance's own ε; a different value is refused (``ValueError``).
        steps: attack iterations (default 10 for ``"pgd"``, 1 for ``"fgsm"``).
        step_size: attack step (default ``2.5·eps/steps``; ``1.25·eps`` for ``"fgsm"``).
        check_inputs: validate that images lie in [0, 1] and are finite.
    """

    objective = "ce"

    def __init__(
        self,
        attack: AttackLike = "pgd",
        *,
        eps: float | None = None,
        steps: int | None = None,
        step_size: float | None = None,
        check_inputs: bool = True,
    ):
        _check_spec(attack)
        check_objective(attack, self.objective)
        self.attack = attack.lower() if isinstance(attack, str) else attack
        self.eps = resolve_eps(attack, eps)
        if steps is not None and (not isinstance(steps, int) or steps < 1):
            raise ValueError(f"attack steps must be an int >= 1, got {steps!r}")
        self.steps = steps
        self.step_size = step_size
        self.check_inputs = check_inputs

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(attack={self.attack!r}, eps={self.eps:.5g}, "
            f"steps={self.steps}, step_size={self.step_size})"
        )

    def adversarial(
        self,
        model: nn.Module,
        params: Mapping[str, Tensor] | None,
        inputs: Tensor,
        targets: Tensor | None,
    ) -> Tensor:
        """Adversarial examples against ``model`` at ``params`` (detached)."""
        return perturb(
            self.attack, model, inputs, targets, params=params, eps=self.eps, steps=self.steps,
            step_size=self.step_size, objective=self.objective, check=self.check_inputs,
        )

    def __call__(
        self,
        model: nn.Module,
        params: Mapping[str, Tensor] | None,
        inputs: Tensor,
        targets: Tensor | None,
        *,
        logits: Tensor | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        unlabeled: Tensor | None = None,
    ) -> RegularizerOutput:  # pragma: no cover - abstract
        raise NotImplementedError


class ATRegularizer(RobustnessRegularizer):
    r"""Adversarial-training term \(R = \ell(w; x_{adv}, y)\) (paper eq. 2, λ = 0).

    Example:
        >>> reg = ATRegularizer("fgsm", eps=2/255)
        >>> out = reg(model, fast_weights, x_query, y_query)
        >>> out.value.backward()
    """

    objective = "ce"

    def __call__(self, model, params, inputs, targets, *, logits=None, loss_fn=None, unlabeled=None):
        if targets is None:
            raise ValueError("ATRegularizer needs labels; use TradesRegularizer for unlabeled data")
        if unlabeled is not None:
            raise ValueError(
                "ATRegularizer cannot use unlabeled images (it needs labels); "
                "use TradesRegularizer for R-MAML_out-TRADES"
            )
        loss_fn = F.cross_entropy if loss_fn is None else loss_fn
        adv = self.adversarial(model, params, inputs, targets)
        adv_logits = call_model(model, adv, params)
        return RegularizerOutput(loss_fn(adv_logits, targets), adv, adv_logits)


class TradesRegularizer(RobustnessRegularizer):
    r"""TRADES term \(R = \mathrm{KL}(p_w(x)\,\|\,p_w(x+\delta))\), δ maximising it in the ε-ball.

    Labels are not used, so extra **unlabeled** images of the task can be passed
    (``unlabeled=``): R is then the mean KL over labeled and unlabeled images together
    (each image counts once). Paper default weight: ``gamma_out=5``.

    **Batch statistics.** Each batch is run on its own: the clean labeled images (the same
    forward pass as the task loss), the clean unlabeled images, and the adversarial
    examples of each. Labeled and unlabeled images are never mixed into one batch-norm
    batch, so adding unlabeled data does not change the statistics the task loss sees
    (the reference code concatenated support, query and unlabeled images into one batch).

    Args:
        attack: ``"pgd"`` (multi-step KL ascent, default 10 steps) or ``"fgsm"`` (one step of
            1.25ε from a uniform random start), a `robust_meta.TradesAttack`, or
            ``torchattacks.TPGD``. Attacks on a labelled loss are refused (``ValueError``):
            TRADES needs the KL ascent.
        eps: ℓ∞ radius in [0, 1] pixel units.
        steps, step_size, check_inputs: as in `RobustnessRegularizer`.

    References:
        Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy",
        ICML 2019; Wang et al., ICLR 2021, Sec. 5 (R-MAML_out-TRADES).
    """

    objective = "kl"

    def __call__(self, model, params, inputs, targets, *, logits=None, loss_fn=None, unlabeled=None):
        if logits is None:
            logits = call_model(model, inputs, params)
        adv = self.adversarial(model, params, inputs, None)
        adv_logits = call_model(model, adv, params)
        value = trades_kl(logits, adv_logits)
        if unlabeled is not None and unlabeled.shape[0] > 0:
            if unlabeled.shape[1:] != inputs.shape[1:]:
                raise ValueError(
                    f"unlabeled images must have the shape of the inputs {tuple(inputs.shape[1:])}, "
                    f"got {tuple(unlabeled.shape[1:])}"
                )
            u_logits = call_model(model, unlabeled, params)
            u_adv = self.adversarial(model, params, unlabeled, None)
            u_value = trades_kl(u_logits, call_model(model, u_adv, params))
            n, m = inputs.shape[0], unlabeled.shape[0]
            value = (n * value + m * u_value) / (n + m)
        return RegularizerOutput(value, adv, adv_logits)

