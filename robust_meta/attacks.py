"""Attack names -> torchattacks objects, with the ε conventions and the mode policy.

All ε and step sizes are in **[0, 1] pixel units** under the ℓ∞ norm: write ``8/255``, not
``8``. Inputs must lie in [0, 1]; normalisation belongs inside the model.

**Mode policy.** An attack runs the network in the same train/eval mode as the loss it
protects: the mode the model is in when the attack is called (MAML convention: train mode,
i.e. batch-norm statistics of the current batch). The attack never changes the model's mode,
parameters or buffers (running statistics moved by its forward passes are restored).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_eps, check_pixels
from .params import ModelAt, preserved_buffers

__all__ = ["ATTACKS", "AttackLike", "TradesAttack", "make_attack", "perturb"]

#: Attack names accepted wherever ``attack=`` is.
ATTACKS = ("pgd", "fgsm", "none", "apgd", "autoattack")

AttackLike = Any  # str | type[torchattacks.Attack] | torchattacks.Attack


def _torchattacks():
    try:
        import torchattacks
    except ImportError as err:  # pragma: no cover - core dependency
        raise ImportError(
            "robust-meta generates attacks with torchattacks: pip install torchattacks"
        ) from err
    return torchattacks


def _base_class():
    return _torchattacks().attack.Attack


class TradesAttack(_base_class()):
    r"""ℓ∞ attack that maximises `\mathrm{KL}(p(x)\,\|\,p(x+\delta))` (TRADES).

    Needs no labels. ``steps=1`` with ``random_start="uniform"`` and ``alpha=1.25·eps`` is the
    one-step fast variant (Wong et al. 2020 applied to the TRADES objective).

    Args:
        model: the network (logits out).
        eps: ℓ∞ radius in [0, 1] pixel units.
        alpha: step size.
        steps: number of sign-gradient steps.
        random_start: ``"uniform"`` (δ0 ~ U[-ε, ε]) or ``"normal"`` (δ0 ~ 0.001·N(0, 1), as in
            the TRADES reference code).
    """

    def __init__(self, model, eps=8 / 255, alpha=2 / 255, steps=10, random_start="uniform"):
        super().__init__("TradesAttack", model)
        if random_start not in ("uniform", "normal"):
            raise ValueError(f"random_start must be 'uniform' or 'normal', got {random_start!r}")
        self.eps, self.alpha, self.steps, self.random_start = eps, alpha, steps, random_start
        self.supported_mode = ["default"]

    def forward(self, images, labels=None):
        images = images.detach()
        with torch.no_grad():
            p_clean = F.softmax(self.get_logits(images), dim=1)
        if self.random_start == "uniform":
            adv = images + torch.empty_like(images).uniform_(-self.eps, self.eps)
        else:
            adv = images + 0.001 * torch.randn_like(images)
        adv = adv.clamp(0, 1)
        for _ in range(self.steps):
            adv.requires_grad_(True)
            log_p_adv = F.log_softmax(self.get_logits(adv), dim=1)
            cost = F.kl_div(log_p_adv, p_clean, reduction="sum")
            (grad,) = torch.autograd.grad(cost, adv)
            adv = adv.detach() + self.alpha * grad.sign()
            adv = (images + (adv - images).clamp(-self.eps, self.eps)).clamp(0, 1)
        return adv.detach()


def make_attack(
    attack: AttackLike,
    model: nn.Module,
    *,
    eps: float,
    steps: int | None = None,
    step_size: float | None = None,
    objective: str = "ce",
    n_classes: int | None = None,
    seed: int | None = None,
):
    """Build a torchattacks attack against ``model`` (usually a `ModelAt` view).

    Args:
        attack: a name from `ATTACKS`, a torchattacks ``Attack`` subclass (built as
            ``cls(model, eps=eps)``), or an instance (copied and re-targeted at ``model``).
        model: the network to attack.
        eps: ℓ∞ radius in [0, 1] pixel units.
        steps: iterations for ``"pgd"`` (default 10) and ``"apgd"`` (default 10).
        step_size: PGD step; default ``2.5·eps/steps`` (Madry et al.). For ``"fgsm"`` the step
            is ``1.25·eps`` from a uniform random start (Wong et al. 2020) unless given.
        objective: ``"ce"`` (cross-entropy, adversarial training) or ``"kl"`` (TRADES).
        n_classes: number of classes, needed by ``"autoattack"`` (its targeted parts are
            skipped below 4 classes, where the targeted DLR loss is undefined).
        seed: seed for attacks that take one (APGD, AutoAttack).

    Returns:
        A torchattacks ``Attack``, or ``None`` for ``"none"``.

    Raises:
        ValueError: unknown name, ε outside [0, 1], bad steps.
    """
    ta = _torchattacks()
    eps = check_eps(eps)
    if objective not in ("ce", "kl"):
        raise ValueError(f"objective must be 'ce' or 'kl', got {objective!r}")
    if isinstance(attack, str):
        name = attack.lower()
        if name not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")
        if name == "none":
            return None
        n = (1 if name == "fgsm" else 10) if steps is None else int(steps)
        if n < 1:
            raise ValueError(f"attack steps must be >= 1, got {steps}")
        if name == "fgsm":
            alpha = 1.25 * eps if step_size is None else float(step_size)
            if objective == "kl":
                return TradesAttack(model, eps=eps, alpha=alpha, steps=1, random_start="uniform")
            return ta.FFGSM(model, eps=eps, alpha=alpha)
        if name == "pgd":
            alpha = 2.5 * eps / n if step_size is None else float(step_size)
            if objective == "kl":
                return TradesAttack(model, eps=eps, alpha=alpha, steps=n, random_start="uniform")
            return ta.PGD(model, eps=eps, alpha=alpha, steps=n, random_start=True)
        if objective == "kl":
            raise ValueError(f"attack {name!r} has no TRADES (KL) form; use 'pgd' or 'fgsm'")
        if name == "apgd":
            return ta.APGD(model, norm="Linf", eps=eps, steps=n, loss="ce", n_restarts=1, seed=seed or 0)
        if name == "autoattack":
            if n_classes is None:
                raise ValueError("attack 'autoattack' needs n_classes (the number of ways)")
            parts = [ta.APGD(model, norm="Linf", eps=eps, seed=seed or 0, loss="ce", n_restarts=1)]
            if n_classes >= 4:
                parts += [
                    ta.APGDT(model, norm="Linf", eps=eps, seed=seed or 0, n_classes=n_classes, n_restarts=1),
                    ta.FAB(model, norm="Linf", eps=eps, seed=seed or 0, multi_targeted=True, n_classes=n_classes, n_restarts=1),
                ]
            parts.append(ta.Square(model, norm="Linf", eps=eps, seed=seed or 0, n_queries=5000, n_restarts=1))
            return ta.MultiAttack(parts)
    base = _base_class()
    if isinstance(attack, type) and issubclass(attack, base):
        return attack(model, eps=eps)
    if isinstance(attack, base):
        att = copy.copy(attack)
        att.set_model(model)
        return att
    raise TypeError(
        f"attack must be a name ({', '.join(ATTACKS)}), a torchattacks.Attack subclass or "
        f"instance, got {type(attack).__name__}"
    )


def perturb(
    attack: AttackLike,
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None,
    *,
    params: Mapping[str, Tensor] | None = None,
    eps: float,
    steps: int | None = None,
    step_size: float | None = None,
    objective: str = "ce",
    n_classes: int | None = None,
    training: bool | None = None,
    check: bool = True,
) -> Tensor:
    """Adversarial examples for ``model`` at the weights ``params``, detached.

    The attack sees the weights detached (no gradient through the attack reaches the
    meta-parameters) and runs the model in ``training`` mode (default: its current mode);
    the model's buffers are restored afterwards.

    Shape:
        inputs: ``(B, C, H, W)`` in [0, 1]; targets: ``(B,)`` -> ``(B, C, H, W)`` in
        [0, 1] with ``|x_adv - x|∞ <= eps``.
    """
    if check:
        check_pixels(inputs)
    eps = check_eps(eps)
    if eps == 0 or (isinstance(attack, str) and attack.lower() == "none"):
        if isinstance(attack, str) and attack.lower() not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")
        return inputs.detach()
    view = ModelAt(model, params, training=training)
    att = make_attack(
        attack, view, eps=eps, steps=steps, step_size=step_size, objective=objective,
        n_classes=n_classes,
    )
    att.set_device(inputs.device)
    if targets is None:
        if objective != "kl":
            raise ValueError("targets are required for a cross-entropy attack")
        targets = torch.zeros(inputs.shape[0], dtype=torch.long, device=inputs.device)
    with preserved_buffers(model), torch.enable_grad():
        adv = att(inputs.detach(), targets.detach())
    adv = adv.detach()
    # torchattacks may return float32 for float64 inputs in a few attacks; keep the dtype.
    if adv.dtype != inputs.dtype:
        adv = adv.to(inputs.dtype)
    return adv
