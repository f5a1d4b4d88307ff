"""Adversarial examples: robust-meta's own batched ℓ∞ attacks, and a bridge to torchattacks.

All ε and step sizes are in **[0, 1] pixel units** under the ℓ∞ norm: write ``8/255``, not
``8``. Inputs must lie in [0, 1]; normalisation belongs inside the model.

**Native attacks** (no extra dependency): ``"pgd"`` (PGD with a uniform random start, step
``2.5·ε/steps``, Madry et al.), ``"fgsm"`` (one step of ``1.25·ε`` from a uniform random start,
Wong et al. 2020) and their TRADES forms (the same ascent on
`KL(p(x) ‖ p(x+δ))`, used by `robust_meta.TradesRegularizer`). They are plain batched torch
ops (`linf_pgd`): one forward and one input-gradient per step for the whole batch. Their
random start is drawn from the global generator of the inputs' device, like ``torch.rand``
(or from ``generator=``), so a seeded loop is reproducible.

**torchattacks** (optional extra ``pip install "robust-meta[torchattacks]"``, imported only
when used) serves the long tail: ``"apgd"``, ``"autoattack"`` and any ``torchattacks.Attack``
class or instance. robust-meta never mutates an attack object it is given: it works on a
private copy whose ε is set to the ε asked for (sub-attacks of ``MultiAttack`` and
``AutoAttack`` included), and it runs every torchattacks attack on a forked random generator,
so the caller's global RNG state is the same after the call as before.

**Mode policy.** An attack runs the network in the same train/eval mode as the loss it
protects: the mode the model is in when the attack is called (MAML convention: train mode,
i.e. batch-norm statistics of the current batch). The attack never changes the model's mode,
parameters or buffers (running statistics moved by its forward passes are restored).
torchattacks' APGD, APGDT, FAB, Square, MultiAttack and AutoAttack attack only the part of the
batch that is still classified correctly; with batch-dependent normalisation (batch norm in
train mode) that would normalise with the statistics of a subset, so they are refused there
with a clear error: evaluate in eval mode (``train_mode=False``) or use ``"pgd"``.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_eps, check_pixels
from .params import ModelAt, preserved_buffers

__all__ = [
    "ATTACKS",
    "AttackLike",
    "PGDAttack",
    "TORCHATTACKS_EXTRA",
    "TradesAttack",
    "attack_eps",
    "check_objective",
    "is_torchattacks",
    "linf_pgd",
    "make_attack",
    "perturb",
    "resolve_eps",
]

#: Attack names accepted wherever ``attack=`` is.
ATTACKS = ("pgd", "fgsm", "none", "apgd", "autoattack")
#: Names served by robust-meta's own attacks (no torchattacks needed).
NATIVE_ATTACKS = ("pgd", "fgsm", "none")
#: How to install the optional torchattacks bridge.
TORCHATTACKS_EXTRA = 'pip install "robust-meta[torchattacks]"'
#: torchattacks classes that attack only the still-correct subset of a batch.
SUBSET_ATTACKS = frozenset({"APGD", "APGDT", "FAB", "Square", "MultiAttack", "AutoAttack"})

AttackLike = Any  # str | PGDAttack | type[torchattacks.Attack] | torchattacks.Attack


# ----------------------------------------------------------------------------- native
def linf_pgd(
    forward: Callable[[Tensor], Tensor],
    images: Tensor,
    labels: Tensor | None = None,
    *,
    eps: float,
    alpha: float,
    steps: int,
    random_start: str | None = "uniform",
    objective: str = "ce",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""ℓ∞ projected sign-gradient ascent on a batch: the op behind ``"pgd"`` and ``"fgsm"``.

    Each step: ``x ← clip_{[0,1]}(x₀ + clip_{[-ε,ε]}(x + α·sign(∇ₓ L) − x₀))`` with
    ``L`` the mean cross-entropy (``objective="ce"``, as torchattacks' PGD/FFGSM) or the summed
    `\mathrm{KL}(p(x_0)\,\|\,p(x))` (``objective="kl"``, TRADES; needs no labels). The
    random start is ``x₀ + U[-ε, ε]`` (``"uniform"``), ``x₀ + 0.001·N(0, 1)`` (``"normal"``, the
    TRADES reference code) or none, clipped to [0, 1].

    Args:
        forward: ``x -> logits``, e.g. a model (put it in the mode you want first).
        images: clean images in [0, 1].
        labels: class indices (``objective="ce"``); ignored for ``"kl"``.
        eps: ℓ∞ radius; alpha: step size; steps: number of steps (>= 1).
        random_start: ``"uniform"``, ``"normal"`` or ``None``.
        objective: ``"ce"`` or ``"kl"``.
        generator: draw the random start from it (default: the device's global generator).

    Returns:
        Adversarial images, detached, same shape and dtype as ``images``.

    Shape:
        images: ``(B, ...)``; labels: ``(B,)`` -> ``(B, ...)``.
    """
    x0 = images.detach()
    if objective == "kl":
        with torch.no_grad():
            p_clean = F.softmax(forward(x0), dim=1)
    elif objective == "ce":
        if labels is None:
            raise ValueError("labels are required for a cross-entropy attack")
        labels = labels.detach()
    else:
        raise ValueError(f"objective must be 'ce' or 'kl', got {objective!r}")
    if random_start == "uniform":
        noise = torch.empty_like(x0)
        noise = noise.uniform_(-eps, eps) if generator is None else noise.uniform_(-eps, eps, generator=generator)
        adv = (x0 + noise).clamp(0, 1)
    elif random_start == "normal":
        noise = torch.randn(x0.shape, dtype=x0.dtype, device=x0.device, generator=generator)
        adv = (x0 + 0.001 * noise).clamp(0, 1)
    elif random_start is None:
        adv = x0.clone()
    else:
        raise ValueError(f"random_start must be 'uniform', 'normal' or None, got {random_start!r}")
    for _ in range(steps):
        adv.requires_grad_(True)
        logits = forward(adv)
        if objective == "ce":
            cost = F.cross_entropy(logits, labels)
        else:
            cost = F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="sum")
        (grad,) = torch.autograd.grad(cost, adv)
        adv = adv.detach() + alpha * grad.sign()
        adv = (x0 + (adv - x0).clamp(-eps, eps)).clamp(0, 1)
    return adv.detach()


class PGDAttack:
    r"""robust-meta's own ℓ∞ PGD / FGSM-RS / TRADES-KL attack as an object (`linf_pgd`).

    ``PGDAttack(model, eps=ε, alpha=1.25*ε, steps=1)`` is FGSM with a uniform random start
    (Wong et al. 2020); ``steps=10, alpha=2.5*ε/10`` is PGD-10 (Madry et al.); with
    ``objective="kl"`` the ascent maximises the TRADES divergence instead of the cross-entropy.
    Called as ``attack(images, labels)``; the model is run as it is (its mode and buffers are the
    caller's business; `robust_meta.perturb` takes care of both).

    Passing an instance as ``attack=`` anywhere in robust-meta keeps its step size, steps,
    random start and objective, and replaces its ε by the ε asked for, on a private copy.

    Example:
        >>> fgsm = PGDAttack(model.eval(), eps=8/255, alpha=10/255, steps=1)
        >>> x_adv = fgsm(x, y)
        >>> evaluate(model, tasks, eps=[2/255, 8/255], attacks={"pgd20": PGDAttack(steps=20)})

    Args:
        model: the network (logits out); ``None`` for a specification passed as ``attack=``
            (robust-meta points a copy at the weights it attacks).
        eps: ℓ∞ radius in [0, 1] pixel units.
        alpha: step size (default ``2.5·eps/steps``).
        steps: number of sign-gradient steps.
        random_start: ``"uniform"``, ``"normal"`` or ``None``.
        objective: ``"ce"`` (cross-entropy) or ``"kl"`` (TRADES).
        generator: optional generator for the random start.
    """

    def __init__(
        self,
        model: Callable[[Tensor], Tensor] | None = None,
        *,
        eps: float = 8 / 255,
        alpha: float | None = None,
        steps: int = 10,
        random_start: str | None = "uniform",
        objective: str = "ce",
        generator: torch.Generator | None = None,
    ):
        if model is not None and not callable(model):
            raise TypeError(f"model must be callable or None, got {type(model).__name__}")
        self.eps = check_eps(eps)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"attack steps must be an int >= 1, got {steps!r}")
        if random_start not in ("uniform", "normal", None):
            raise ValueError(f"random_start must be 'uniform', 'normal' or None, got {random_start!r}")
        if objective not in ("ce", "kl"):
            raise ValueError(f"objective must be 'ce' or 'kl', got {objective!r}")
        self.model = model
        self.steps = int(steps)
        self.alpha = 2.5 * self.eps / self.steps if alpha is None else float(alpha)
        if not self.alpha >= 0:
            raise ValueError(f"attack step size must be >= 0, got {alpha!r}")
        self.random_start = random_start
        self.objective = objective
        self.generator = generator

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(eps={self.eps:.5g}, alpha={self.alpha:.5g}, steps={self.steps}, "
            f"random_start={self.random_start!r}, objective={self.objective!r})"
        )

    def __call__(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.model is None:
            raise ValueError(
                "this PGDAttack has no model: pass it as attack= to robust-meta (which attacks "
                "the adapted weights), or build it as PGDAttack(model, ...)"
            )
        return linf_pgd(
            self.model, images, labels, eps=self.eps, alpha=self.alpha, steps=self.steps,
            random_start=self.random_start, objective=self.objective, generator=self.generator,
        )

    def retarget(self, model: Callable[[Tensor], Tensor], eps: float) -> PGDAttack:
        """A copy against ``model`` at radius ``eps`` (the object itself is left as it is)."""
        new = copy.copy(self)
        new.model, new.eps = model, check_eps(eps)
        return new


class TradesAttack(PGDAttack):
    r"""ℓ∞ attack that maximises `\mathrm{KL}(p(x)\,\|\,p(x+\delta))` (TRADES); needs no labels.

    ``steps=1`` with ``random_start="uniform"`` and ``alpha=1.25·eps`` is the one-step fast
    variant (Wong et al. 2020 applied to the TRADES objective).

    Args:
        model: the network (logits out).
        eps: ℓ∞ radius in [0, 1] pixel units.
        alpha: step size.
        steps: number of sign-gradient steps.
        random_start: ``"uniform"`` (δ0 ~ U[-ε, ε]) or ``"normal"`` (δ0 ~ 0.001·N(0, 1), as in
            the TRADES reference code).
    """

    def __init__(self, model=None, eps=8 / 255, alpha=2 / 255, steps=10, random_start="uniform", *, generator=None):
        if random_start not in ("uniform", "normal"):
            raise ValueError(f"random_start must be 'uniform' or 'normal', got {random_start!r}")
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start,
                         objective="kl", generator=generator)


def _native(name: str, model, *, eps, steps, step_size, objective) -> PGDAttack:
    n = (1 if name == "fgsm" else 10) if steps is None else int(steps)
    if n < 1:
        raise ValueError(f"attack steps must be >= 1, got {steps}")
    if step_size is None:
        step_size = 1.25 * eps if name == "fgsm" else 2.5 * eps / n
    return PGDAttack(model, eps=eps, alpha=float(step_size), steps=n, random_start="uniform",
                     objective=objective)


# ------------------------------------------------------------------------ torchattacks
def _torchattacks():
    try:
        import torchattacks
    except ImportError as err:
        raise ImportError(
            "this attack needs torchattacks, an optional extra of robust-meta: "
            f"{TORCHATTACKS_EXTRA} (robust-meta's own 'pgd' and 'fgsm' need nothing more)"
        ) from err
    return torchattacks


def is_torchattacks(obj: object) -> bool:
    """Whether ``obj`` is a torchattacks attack class or instance (without importing it)."""
    ta = sys.modules.get("torchattacks")
    if ta is None:
        return False
    base = ta.attack.Attack
    return isinstance(obj, base) or (isinstance(obj, type) and issubclass(obj, base))


def _sub_attacks(att) -> list:
    """``att`` and every attack it holds (torchattacks tracks them in ``_attacks``)."""
    return [att, *att.__dict__.get("_attacks", {}).values()]


def _class_names(att) -> set[str]:
    return {c.__name__ for a in _sub_attacks(att) for c in type(a).__mro__}


def _private_copy(att):
    """Deep copy of a torchattacks attack (sub-attacks too) that shares the models, not copies them."""
    memo: dict[int, Any] = {}
    for a in _sub_attacks(att):
        for value in a.__dict__.values():
            if isinstance(value, (nn.Module, torch.Generator)):
                memo[id(value)] = value
    return copy.deepcopy(att, memo)


def _set_eps(att, eps: float) -> None:
    with_eps = [a for a in _sub_attacks(att) if hasattr(a, "eps")]
    if not with_eps:
        raise ValueError(
            f"attack {type(att).__name__} has no ℓ∞ radius (no .eps): robust-meta measures "
            "robustness at the ε it is given; use an ℓ∞ attack (PGD, FFGSM, APGD, AutoAttack, ...)"
        )
    for a in with_eps:
        a.eps = eps


def _torchattacks_attack(attack, model, *, eps, steps, objective, n_classes, seed):
    ta = _torchattacks()
    if isinstance(attack, str):
        name = attack.lower()
        n = 10 if steps is None else int(steps)
        if n < 1:
            raise ValueError(f"attack steps must be >= 1, got {steps}")
        seed = 0 if seed is None else int(seed)
        if name == "apgd":
            return ta.APGD(model, norm="Linf", eps=eps, steps=n, loss="ce", n_restarts=1, seed=seed)
        if n_classes is None:
            raise ValueError("attack 'autoattack' needs n_classes (the number of ways)")
        parts = [ta.APGD(model, norm="Linf", eps=eps, seed=seed, loss="ce", n_restarts=1)]
        if n_classes >= 4:  # the targeted DLR loss needs at least 4 classes
            parts += [
                ta.APGDT(model, norm="Linf", eps=eps, seed=seed, n_classes=n_classes, n_restarts=1),
                ta.FAB(model, norm="Linf", eps=eps, seed=seed, multi_targeted=True, n_classes=n_classes, n_restarts=1),
            ]
        parts.append(ta.Square(model, norm="Linf", eps=eps, seed=seed, n_queries=5000, n_restarts=1))
        return ta.MultiAttack(parts)
    base = ta.attack.Attack
    if isinstance(attack, type) and issubclass(attack, base):
        return attack(model, eps=eps)
    if isinstance(attack, base):
        att = _private_copy(attack)
        _set_eps(att, eps)
        att.set_model(model)
        return att
    raise TypeError(  # pragma: no cover - callers check the type first
        f"not a torchattacks attack: {type(attack).__name__}"
    )


def attack_eps(attack: AttackLike) -> float | None:
    """The ε an attack *instance* carries (the same for all its sub-attacks), else ``None``.

    Raises:
        ValueError: an instance whose sub-attacks disagree about ε.
    """
    if isinstance(attack, PGDAttack):
        return attack.eps
    if not is_torchattacks(attack) or isinstance(attack, type):
        return None
    values = sorted({float(a.eps) for a in _sub_attacks(attack) if hasattr(a, "eps")})
    if len(values) > 1:
        raise ValueError(
            f"attack {type(attack).__name__} holds sub-attacks with different ε {values}; "
            "give them one ε"
        )
    return values[0] if values else None


def resolve_eps(attack: AttackLike, eps: float | None) -> float:
    """The ε to attack with, given ``attack`` and the ``eps=`` the user passed.

    An attack instance's own ε is used when ``eps`` is ``None``; an ``eps`` that conflicts with
    it is refused (robust-meta never silently attacks at another radius than the one asked).

    Raises:
        ValueError: no ε anywhere, or a conflicting one.
    """
    own = attack_eps(attack)
    if eps is None:
        if own is None:
            raise ValueError("eps is required (in [0, 1] pixel units, e.g. eps=2/255)")
        return check_eps(own)
    eps = check_eps(eps)
    if own is not None and abs(own - eps) > 1e-12:
        raise ValueError(
            f"the attack instance {type(attack).__name__} has eps={own:.6g} ({own * 255:.4g}/255) "
            f"but eps={eps:.6g} ({eps * 255:.4g}/255) was passed; pass eps=None to use the "
            "attack's own, or build the attack with the ε you mean"
        )
    return eps


def check_objective(attack: AttackLike, objective: str) -> None:
    """Refuse an attack that cannot serve ``objective`` (``"kl"``: TRADES needs a KL attack).

    Raises:
        ValueError: a cross-entropy attack object for the KL objective, or a named attack
            without a KL form.
    """
    if objective == "ce":
        return
    if objective != "kl":
        raise ValueError(f"objective must be 'ce' or 'kl', got {objective!r}")
    if isinstance(attack, str):
        if attack.lower() not in ("pgd", "fgsm", "none"):
            raise ValueError(f"attack {attack!r} has no TRADES (KL) form; use 'pgd' or 'fgsm'")
        return
    if isinstance(attack, PGDAttack):
        if attack.objective != "kl":
            raise ValueError(
                "a TRADES regularizer needs an attack on the KL objective; this PGDAttack has "
                "objective='ce' (use objective='kl' or a TradesAttack)"
            )
        return
    if is_torchattacks(attack):
        tpgd = sys.modules["torchattacks"].TPGD
        if not ((isinstance(attack, type) and issubclass(attack, tpgd)) or isinstance(attack, tpgd)):
            name = attack.__name__ if isinstance(attack, type) else type(attack).__name__
            raise ValueError(
                f"a TRADES regularizer needs an attack on the KL objective; torchattacks {name} "
                "maximises a labelled loss. Use 'pgd', 'fgsm', a robust_meta.TradesAttack or "
                "torchattacks.TPGD"
            )


def _check_spec(attack: AttackLike) -> None:
    if isinstance(attack, str):
        if attack.lower() not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")
        return
    if isinstance(attack, PGDAttack) or is_torchattacks(attack):
        return
    raise TypeError(
        f"attack must be a name ({', '.join(ATTACKS)}), a robust_meta.PGDAttack, or a "
        f"torchattacks.Attack subclass or instance, got {type(attack).__name__}"
    )


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
    """Build an attack against ``model`` (usually a `ModelAt` view).

    Args:
        attack: a name from `ATTACKS`, a `PGDAttack` (copied, ε replaced), a torchattacks
            ``Attack`` subclass (built as ``cls(model, eps=eps)``) or instance (deep-copied
            with its sub-attacks, ε replaced, re-targeted at ``model``; the object passed in is
            never modified).
        model: the network to attack.
        eps: ℓ∞ radius in [0, 1] pixel units.
        steps: iterations for ``"pgd"`` (default 10) and ``"apgd"`` (default 10).
        step_size: PGD step; default ``2.5·eps/steps`` (Madry et al.). For ``"fgsm"`` the step
            is ``1.25·eps`` from a uniform random start (Wong et al. 2020) unless given.
        objective: ``"ce"`` (cross-entropy, adversarial training) or ``"kl"`` (TRADES).
        n_classes: number of classes, needed by ``"autoattack"`` (its targeted parts are
            skipped below 4 classes, where the targeted DLR loss is undefined).
        seed: seed of ``"apgd"`` / ``"autoattack"`` (default 0).

    Returns:
        A `PGDAttack` for ``"pgd"``/``"fgsm"`` and native instances, a torchattacks ``Attack``
        otherwise, or ``None`` for ``"none"``.

    Raises:
        ValueError: unknown name, ε outside [0, 1], bad steps, a non-KL attack for TRADES, an
            attack without an ε.
        ImportError: a torchattacks attack without the ``[torchattacks]`` extra installed.
    """
    eps = check_eps(eps)
    if objective not in ("ce", "kl"):
        raise ValueError(f"objective must be 'ce' or 'kl', got {objective!r}")
    _check_spec(attack)
    if isinstance(attack, str):
        name = attack.lower()
        if name == "none":
            return None
        if name in NATIVE_ATTACKS:
            return _native(name, model, eps=eps, steps=steps, step_size=step_size, objective=objective)
    check_objective(attack, objective)
    if isinstance(attack, PGDAttack):
        return attack.retarget(model, eps)
    return _torchattacks_attack(attack, model, eps=eps, steps=steps, objective=objective,
                                n_classes=n_classes, seed=seed)


def _batch_dependent(model: nn.Module, training: bool) -> bool:
    """Whether the model's output for one image depends on the rest of the batch in this mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if training or not m.track_running_stats or m.running_mean is None:
                return True
    return False


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
    seed: int | None = None,
) -> Tensor:
    """Adversarial examples for ``model`` at the weights ``params``, detached.

    The attack sees the weights detached (no gradient through the attack reaches the
    meta-parameters) and runs the model in ``training`` mode (default: its current mode);
    the model's buffers are restored afterwards.

    Native attacks (``"pgd"``, ``"fgsm"``, `PGDAttack`) draw their random start from the global
    generator of the inputs' device. torchattacks attacks run on a forked generator (seeded
    with ``seed``, or from a draw of the caller's generator that the fork then undoes): the
    caller's RNG state is the same after the call as before.

    Args:
        attack: a name from `ATTACKS`, a `PGDAttack`, or a torchattacks class or instance.
        model: the meta-model (plain ``nn.Module`` or torchmeta ``MetaModule``).
        inputs: images in [0, 1]; targets: labels (``None`` only for ``objective="kl"``).
        params: weights to attack (``None``: the model's own).
        eps, steps, step_size, objective, n_classes: see `make_attack`.
        training: the mode to run the model in (default: its current mode).
        check: validate that inputs are finite and in [0, 1].
        seed: seed of the torchattacks attacks (default: drawn from the caller's generator
            inside a fork, so it follows a seeded loop without moving it).

    Raises:
        ValueError: see `make_attack`; a torchattacks attack that attacks a subset of the batch
            (APGD, Square, MultiAttack, AutoAttack, ...) on a model with batch norm in train mode.

    Shape:
        inputs: ``(B, C, H, W)`` in [0, 1]; targets: ``(B,)`` -> ``(B, C, H, W)`` in
        [0, 1] with ``|x_adv - x|∞ <= eps``.
    """
    if check:
        check_pixels(inputs)
    eps = check_eps(eps)
    _check_spec(attack)
    if eps == 0 or (isinstance(attack, str) and attack.lower() == "none"):
        return inputs.detach()
    if targets is None and objective != "kl":
        raise ValueError("targets are required for a cross-entropy attack")
    view = ModelAt(model, params, training=training)
    native = isinstance(attack, PGDAttack) or (isinstance(attack, str) and attack.lower() in NATIVE_ATTACKS)
    devices = [inputs.device] if inputs.device.type == "cuda" else []
    if not native and seed is None:
        with torch.random.fork_rng(devices=devices):  # a draw the fork undoes
            seed = int(torch.randint(0, 2**31 - 1, (1,)))
    att = make_attack(
        attack, view, eps=eps, steps=steps, step_size=step_size, objective=objective,
        n_classes=n_classes, seed=seed,
    )
    if native:
        with preserved_buffers(model), torch.enable_grad():
            adv = att(inputs.detach(), None if targets is None else targets.detach())
    else:
        if SUBSET_ATTACKS & _class_names(att) and _batch_dependent(model, view.training):
            raise ValueError(
                f"attack {type(att).__name__} attacks only the images still classified correctly, "
                "so batch norm in train mode would normalise with the statistics of that subset "
                "(and fail on a single image). Run it in eval mode (evaluate(..., train_mode=False), "
                "model.eval(), robust-meta eval --mode eval), or use 'pgd'"
            )
        att.set_device(inputs.device)
        if targets is None:  # a KL attack (torchattacks.TPGD) ignores the labels
            targets = torch.zeros(inputs.shape[0], dtype=torch.long, device=inputs.device)
        with torch.random.fork_rng(devices=devices), preserved_buffers(model), torch.enable_grad():
            torch.manual_seed(seed)
            adv = att(inputs.detach(), targets.detach())
    adv = adv.detach()
    # torchattacks may return float32 for float64 inputs in a few attacks; keep the dtype.
    if adv.dtype != inputs.dtype:
        adv = adv.to(inputs.dtype)
    return adv
