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
from ._rng import isolated_torch_rng, seed_torch
from .params import ModelAt, preserved_buffers, preserved_modes

__all__ = [
    "ATTACKS",
    "AttackLike",
    "PGDAttack",
    "TORCHATTACKS_EXTRA",
    "StrongAttack",
    "TradesAttack",
    "attack_eps",
    "attack_reach",
    "check_objective",
    "is_torchattacks",
    "linf_pgd",
    "make_attack",
    "perturb",
    "project_linf",
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
OBJECTIVES = ("ce", "kl", "margin")


def _eps_below(eps: float, like: Tensor) -> Tensor:
    """``eps`` in the dtype of ``like``, rounded *down* (never above the real ε)."""
    e = torch.tensor(eps, dtype=torch.float64, device="cpu").to(like.dtype)
    if float(e) > eps:
        e = torch.nextafter(e, torch.zeros_like(e))
    return e.to(like.device)


def project_linf(adv: Tensor, x0: Tensor, eps: float) -> Tensor:
    r"""Project ``adv`` onto the ℓ∞ ball of radius ``eps`` around ``x0``, intersected with [0, 1].

    The guarantee holds **as computed in the images' dtype**, with no rounding excess:
    ``((adv - x0).abs() <= eps).all()`` and ``0 <= adv <= 1`` for the returned tensor, whether
    ``eps`` is compared as a Python float (float64) or in the tensor's dtype. A plain
    ``x0 + (adv - x0).clamp(-eps, eps)`` can overshoot by one unit in the last place (float32,
    ε = 1e-3: 20% of the pixels); here ε is rounded down to the dtype and every pixel still
    outside after the clamp is moved one representable value towards ``x0`` (one pass always
    suffices; a second one is run without a host sync, for safety).

    Shape:
        adv, x0: the same shape -> that shape.
    """
    if eps == 0:
        return x0.clone()
    e = _eps_below(eps, x0)
    adv = torch.minimum(torch.maximum(adv, x0 - e), x0 + e).clamp(0, 1)
    for _ in range(2):
        d = adv - x0
        out = (d > e) | (d < -e)
        adv = torch.where(out, torch.nextafter(adv, x0), adv)
    return adv


def _margin_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed logit margin ``max_{j != y} z_j - z_y`` (Carlini & Wagner); > 0 means misclassified."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf")).amax(dim=1)
    return (other - true).sum()


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

    Each step: ``x ← Π(x + α·sign(∇ₓ L))`` with ``Π`` the projection onto the ε-ball around
    ``x₀`` intersected with [0, 1] (`project_linf`: exact in the images' dtype) and ``L`` the
    mean cross-entropy (``objective="ce"``, as torchattacks' PGD/FFGSM), the summed logit
    margin ``max_{j≠y} z_j − z_y`` (``"margin"``, Carlini & Wagner's loss; a second loss for
    audits) or the summed \(\mathrm{KL}(p(x_0)\,\|\,p(x))\) (``"kl"``, TRADES; needs no
    labels). The random start is ``x₀ + U[-ε, ε]`` (``"uniform"``), ``x₀ + 0.001·N(0, 1)``
    (``"normal"``, the TRADES reference code) or none, projected the same way.

    Gradients are enabled inside (an attack under ``torch.no_grad()`` works). Under
    ``torch.inference_mode()`` the images are copied out of inference mode; weights created
    in inference mode cannot take part in a backward pass, and that is reported clearly.

    Args:
        forward: ``x -> logits``, e.g. a model (put it in the mode you want first).
        images: clean images in [0, 1].
        labels: class indices (``objective="ce"`` or ``"margin"``); ignored for ``"kl"``.
        eps: ℓ∞ radius; alpha: step size; steps: number of steps (>= 1).
        random_start: ``"uniform"``, ``"normal"`` or ``None``.
        objective: ``"ce"``, ``"margin"`` or ``"kl"``.
        generator: draw the random start from it (default: the device's global generator).
            It may live on another device than the images (a CPU generator with CUDA
            images): the noise is drawn on the generator's device and moved.

    Returns:
        Adversarial images, detached, same shape and dtype as ``images``, with
        ``(adv - images).abs() <= eps`` and ``0 <= adv <= 1`` exactly (in that dtype).

    Shape:
        images: ``(B, ...)``; labels: ``(B,)`` -> ``(B, ...)``.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if torch.is_inference_mode_enabled():
        with torch.inference_mode(False):
            images = images.clone()
            labels = None if labels is None else labels.clone()
            return _inference_safe(_linf_pgd, forward, images, labels, eps=eps, alpha=alpha, steps=steps,
                                   random_start=random_start, objective=objective, generator=generator)
    with torch.enable_grad():
        return _linf_pgd(forward, images, labels, eps=eps, alpha=alpha, steps=steps,
                         random_start=random_start, objective=objective, generator=generator)


def _inference_safe(fn, *args, **kw) -> Tensor:
    """``fn(*args, **kw)`` out of inference mode, with a clear error where that cannot work."""
    try:
        with torch.enable_grad():
            return fn(*args, **kw)
    except RuntimeError as err:
        if "nference tensor" not in str(err):
            raise
        raise RuntimeError(
            "an attack needs input gradients, which torch.inference_mode() forbids for weights "
            "created inside it (here: the fast weights or the model). Run the evaluation under "
            "torch.no_grad() instead (robust-meta enables gradients for the attack itself), or "
            "create the weights outside inference mode"
        ) from None


def _random_noise(kind: str, x0: Tensor, eps: float, generator: torch.Generator | None) -> Tensor:
    dev = x0.device if generator is None else generator.device
    if kind == "uniform":
        noise = torch.empty(x0.shape, dtype=x0.dtype, device=dev)
        noise = noise.uniform_(-eps, eps) if generator is None else noise.uniform_(-eps, eps, generator=generator)
    else:
        noise = 0.001 * torch.randn(x0.shape, dtype=x0.dtype, device=dev, generator=generator)
    return noise.to(x0.device)


def _linf_pgd(forward, images, labels, *, eps, alpha, steps, random_start, objective, generator) -> Tensor:
    x0 = images.detach()
    if objective == "kl":
        with torch.no_grad():
            p_clean = F.softmax(forward(x0), dim=1)
    elif labels is None:
        raise ValueError(f"labels are required for a {'cross-entropy' if objective == 'ce' else 'margin'} attack")
    else:
        labels = labels.detach()
    if random_start in ("uniform", "normal"):
        adv = project_linf(x0 + _random_noise(random_start, x0, eps, generator), x0, eps)
    elif random_start is None:
        adv = x0.clone()
    else:
        raise ValueError(f"random_start must be 'uniform', 'normal' or None, got {random_start!r}")
    for _ in range(steps):
        adv.requires_grad_(True)
        logits = forward(adv)
        if objective == "ce":
            cost = F.cross_entropy(logits, labels)
        elif objective == "margin":
            cost = _margin_loss(logits, labels)
        else:
            cost = F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="sum")
        (grad,) = torch.autograd.grad(cost, adv)
        adv = project_linf(adv.detach() + alpha * grad.sign(), x0, eps)
    return adv.detach()


class PGDAttack:
    r"""robust-meta's own ℓ∞ PGD / FGSM-RS / TRADES-KL attack as an object (`linf_pgd`).

    ``PGDAttack(model, eps=ε, alpha=1.25*ε, steps=1)`` is FGSM with a uniform random start
    (Wong et al. 2020); ``steps=10`` (step ``2.5·ε/10`` by default) is PGD-10 (Madry et al.);
    with ``objective="kl"`` the ascent maximises the TRADES divergence instead of the
    cross-entropy, with ``"margin"`` the logit margin. Called as ``attack(images, labels)``; the
    model is run as it is (its mode and buffers are the caller's business;
    `robust_meta.perturb` takes care of both).

    **As a specification** (``attack=`` anywhere in robust-meta) an instance is used through a
    private copy (`retarget`): its steps, random start and objective are kept and its ε is
    replaced by the ε asked for. The step size **follows ε** (``2.5·ε/steps``) unless
    ``alpha`` was given explicitly, so an instance built at ε = 2/255 attacks at 8/255 with the
    step of 8/255. The copy draws its random start from robust-meta's random streams (the
    global generator of the images' device, which `robust_meta.evaluate` seeds per task and
    `robust_meta.train` per step), not from ``generator``: passing the object never advances
    its generator, and a task's values depend only on the seed and the task index.
    ``generator`` serves direct calls.

    Example:
        >>> fgsm = PGDAttack(model.eval(), eps=8/255, alpha=10/255, steps=1)
        >>> x_adv = fgsm(x, y)
        >>> evaluate(model, tasks, eps=[2/255, 8/255], attacks={"pgd20": PGDAttack(steps=20)})

    Args:
        model: the network (logits out); ``None`` for a specification passed as ``attack=``
            (robust-meta points a copy at the weights it attacks).
        eps: ℓ∞ radius in [0, 1] pixel units.
        alpha: step size (default ``2.5·eps/steps``, re-derived from each ε it is used at).
        steps: number of sign-gradient steps.
        random_start: ``"uniform"``, ``"normal"`` or ``None``.
        objective: ``"ce"`` (cross-entropy), ``"margin"`` (logit margin) or ``"kl"`` (TRADES).
        generator: optional generator for the random start of direct calls (any device).
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
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.model = model
        self.steps = int(steps)
        #: Whether ``alpha`` was given (kept at every ε) or follows ε (``2.5·ε/steps``).
        self.alpha_explicit = alpha is not None
        self.alpha = self._default_alpha(self.eps) if alpha is None else float(alpha)
        if not self.alpha >= 0:
            raise ValueError(f"attack step size must be >= 0, got {alpha!r}")
        self.random_start = random_start
        self.objective = objective
        self.generator = generator

    def _default_alpha(self, eps: float) -> float:
        return 2.5 * eps / self.steps

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(eps={self.eps:.5g}, alpha={self.alpha:.5g}, steps={self.steps}, "
            f"random_start={self.random_start!r}, objective={self.objective!r})"
        )

    @property
    def reach(self) -> float:
        """How far the ascent can travel from its start: ``steps × alpha`` (pixel units)."""
        return self.steps * self.alpha

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
        """A private copy against ``model`` at radius ``eps``; the object itself is left as it is.

        The copy's step size is ``2.5·eps/steps`` unless ``alpha`` was set explicitly, and it
        draws its random start from the global generator of the images' device (no
        ``generator``), so using the copy never advances this object's generator.
        """
        new = copy.copy(self)
        new.model, new.eps, new.generator = model, check_eps(eps), None
        if not self.alpha_explicit:
            new.alpha = new._default_alpha(new.eps)
        return new


class TradesAttack(PGDAttack):
    r"""ℓ∞ attack that maximises \(\mathrm{KL}(p(x)\,\|\,p(x+\delta))\) (TRADES); needs no labels.

    ``steps=1`` with ``random_start="uniform"`` and ``alpha=1.25·eps`` is the one-step fast
    variant (Wong et al. 2020 applied to the TRADES objective).

    Args:
        model: the network (logits out).
        eps: ℓ∞ radius in [0, 1] pixel units.
        alpha: step size (default ``2.5·eps/steps``, following ε as in `PGDAttack`; 2/255 at
            the default ε = 8/255 and 10 steps).
        steps: number of sign-gradient steps.
        random_start: ``"uniform"`` (δ0 ~ U[-ε, ε]) or ``"normal"`` (δ0 ~ 0.001·N(0, 1), as in
            the TRADES reference code).
    """

    def __init__(self, model=None, eps=8 / 255, alpha=None, steps=10, random_start="uniform", *, generator=None):
        if random_start not in ("uniform", "normal"):
            raise ValueError(f"random_start must be 'uniform' or 'normal', got {random_start!r}")
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start,
                         objective="kl", generator=generator)


class StrongAttack(PGDAttack):
    r"""A far stronger ℓ∞ attack for audits: many PGD steps, restarts, two losses, worst case.

    Runs PGD-``steps`` (step ``alpha``, default ε/4) from ``restarts`` uniform random starts
    for each objective in ``objectives`` (default the cross-entropy and the logit margin
    ``max_{j≠y} z_j − z_y``), and returns, per image, the first adversarial example that is
    misclassified (the image's worst case over all runs). When the network's output for one
    image depends on the rest of the batch (batch norm in train mode, the MAML protocol), a
    per-image combination is not the batch any run evaluated, so the batch with the fewest
    correct images among the combination and every single run is returned instead (never
    weaker than any run). Carlini et al. (2019), "On evaluating adversarial robustness": a
    robust accuracy means something only if a much stronger attack does not take it away.

    It is a `PGDAttack`: pass it as ``attack=`` / in ``attacks=`` anywhere (e.g.
    ``evaluate(..., attacks={"pgd": "pgd", "strong": StrongAttack()})``), or see
    `robust_meta.audit`.

    Args:
        model: the network (logits out), or ``None`` for a specification.
        eps: ℓ∞ radius in [0, 1] pixel units (replaced by the ε asked for when used as a spec).
        steps: PGD steps of every run (default 50).
        restarts: random restarts per objective (default 3).
        objectives: losses, among ``"ce"`` and ``"margin"``.
        alpha: step size (default ε/4, following ε when not given).
    """

    def __init__(
        self,
        model: Callable[[Tensor], Tensor] | None = None,
        *,
        eps: float = 8 / 255,
        steps: int = 50,
        restarts: int = 3,
        objectives: tuple[str, ...] = ("ce", "margin"),
        alpha: float | None = None,
        batch_dependent: bool | None = None,
    ):
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start="uniform", objective="ce")
        if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
            raise ValueError(f"restarts must be an int >= 1, got {restarts!r}")
        objectives = tuple(objectives)
        bad = [o for o in objectives if o not in ("ce", "margin")]
        if bad or not objectives:
            raise ValueError(f"objectives must be a non-empty subset of ('ce', 'margin'), got {objectives!r}")
        self.restarts = int(restarts)
        self.objectives = objectives
        self.batch_dependent = batch_dependent

    def _default_alpha(self, eps: float) -> float:
        return eps / 4

    @property
    def runs(self) -> int:
        """PGD runs per call: ``restarts × len(objectives)``."""
        return self.restarts * len(self.objectives)

    def __repr__(self) -> str:
        return (f"StrongAttack(eps={self.eps:.5g}, steps={self.steps}, restarts={self.restarts}, "
                f"objectives={self.objectives!r}, alpha={self.alpha:.5g})")

    def describe(self) -> str:
        """``"PGD-50 (step ε/4), 3 restarts × {ce, margin}, per-image worst case"``."""
        step = "ε/4" if not self.alpha_explicit else f"{self.alpha * 255:.3g}/255"
        return (f"PGD-{self.steps} (step {step}), {self.restarts} restarts × "
                f"{{{', '.join(self.objectives)}}}, per-image worst case")

    def __call__(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.model is None:
            raise ValueError("this StrongAttack has no model: pass it as attack= or build it as StrongAttack(model, ...)")
        if labels is None:
            raise ValueError("labels are required for a StrongAttack")
        forward = self.model
        x0 = images.detach()
        runs = []
        for objective in self.objectives:
            for _ in range(self.restarts):
                runs.append(linf_pgd(forward, x0, labels, eps=self.eps, alpha=self.alpha, steps=self.steps,
                                     random_start="uniform", objective=objective))

        def wrong(x: Tensor) -> Tensor:
            with torch.no_grad():
                return forward(x).argmax(dim=1) != labels

        best = x0.clone()
        fooled = wrong(x0)
        for adv in runs:
            new = wrong(adv) & ~fooled
            best = torch.where(new.view(-1, *([1] * (x0.dim() - 1))), adv, best)
            fooled = fooled | new
        dependent = self.batch_dependent
        if dependent is None:
            dependent = _batch_dependent(forward, None) if isinstance(forward, nn.Module) else True
        if not dependent:
            return best
        # Batch-dependent outputs: score the combination and every run as the batches they are.
        candidates = [best, *runs]
        n_wrong = torch.stack([wrong(c).sum() for c in candidates])
        return candidates[int(n_wrong.argmax())]


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


def attack_reach(
    attack: AttackLike, eps: float, *, steps: int | None = None, step_size: float | None = None
) -> float | None:
    """How far (ℓ∞, pixel units) ``attack``'s ascent can travel from its start when used at ``eps``.

    ``steps × step size`` of the attack robust-meta would run (`make_attack`): for ``"pgd"`` /
    ``"fgsm"`` with ``steps`` / ``step_size``, a `PGDAttack` as re-targeted at ``eps``, and
    torchattacks instances or classes with ``alpha`` and ``steps`` (PGD, BIM, TPGD, MIFGSM, ...;
    FFGSM: ``alpha``; FGSM: ``eps``). ``None`` where no such bound is defined (APGD's adaptive
    step, AutoAttack, Square, ...). An attack whose reach is below ε can never get to the edge
    of the ball from its start point, so the robust accuracy it measures is overstated;
    `robust_meta.evaluate`'s sanity checks flag it.
    """
    eps = check_eps(eps)
    if isinstance(attack, str):
        name = attack.lower()
        if name in ("pgd", "fgsm"):
            return _native(name, None, eps=eps, steps=steps, step_size=step_size, objective="ce").reach
        return None
    if isinstance(attack, PGDAttack):
        return attack.retarget(None, eps).reach
    if not is_torchattacks(attack):
        return None
    if isinstance(attack, type):
        try:
            att = attack(nn.Linear(1, 1), eps=eps)
        except Exception:  # noqa: BLE001 - a class we cannot build without a real model
            return None
    else:
        att = _private_copy(attack)
        if any(hasattr(a, "eps") for a in _sub_attacks(att)):
            _set_eps(att, eps)
    name = type(att).__name__
    if name == "FGSM":
        return float(att.eps)
    alpha = getattr(att, "alpha", None)
    if name == "FFGSM" and alpha is not None:
        return float(alpha)
    n = getattr(att, "steps", None)
    if alpha is None or n is None or name in SUBSET_ATTACKS:
        return None
    return float(alpha) * int(n)


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


def _batch_dependent(model: nn.Module, training: bool | None) -> bool:
    """Whether the model's output for one image depends on the rest of the batch.

    ``training``: the mode the whole model runs in, or ``None`` for each module's own mode. A
    `robust_meta.params.ModelAt` view is looked through (its model, its forced mode).
    """
    if isinstance(model, ModelAt):
        return _batch_dependent(model.model, model.forced_mode if training is None else training)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            mode = m.training if training is None else training
            if mode or not m.track_running_stats or m.running_mean is None:
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
    meta-parameters) and runs the model in ``training`` mode (default: every submodule in its
    current mode); the model's buffers and the mode of each submodule are restored afterwards.
    Gradients are enabled inside, so it works under ``torch.no_grad()``.

    **The ε-ball, exactly.** Whatever the attack (native or torchattacks), the result is
    projected onto the ball (`project_linf`): ``(x_adv - inputs).abs() <= eps`` and
    ``0 <= x_adv <= 1`` hold for every pixel as computed in the inputs' dtype, with no
    rounding excess. At ε = 0 (or ``"none"``) the result is a copy of ``inputs``, never a
    view sharing its storage.

    Native attacks (``"pgd"``, ``"fgsm"``, `PGDAttack`) draw their random start from the global
    generator of the inputs' device (a `PGDAttack`'s own ``generator`` is not used, see
    `PGDAttack.retarget`). torchattacks attacks run on forked generators (seeded with ``seed``,
    or from a draw of the caller's generator that the fork then undoes): the caller's RNG state,
    on the CPU and on every CUDA device, is the same after the call as before.

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
        return inputs.detach().clone()
    if torch.is_inference_mode_enabled():
        # Attacks need input gradients: leave inference mode (the result is a normal tensor).
        with torch.inference_mode(False):
            inputs = inputs.clone()
            targets = None if targets is None else targets.clone()
            return _inference_safe(
                lambda *a, **k: perturb(*a, **k), attack, model, inputs, targets, params=params,
                eps=eps, steps=steps, step_size=step_size, objective=objective,
                n_classes=n_classes, training=training, check=False, seed=seed,
            )
    if targets is None and objective != "kl":
        raise ValueError("targets are required for a cross-entropy attack")
    view = ModelAt(model, params, training=training)
    native = isinstance(attack, PGDAttack) or (isinstance(attack, str) and attack.lower() in NATIVE_ATTACKS)
    if not native and seed is None:
        with torch.random.fork_rng(devices=[]):  # a draw (of the CPU generator) the fork undoes
            seed = int(torch.randint(0, 2**31 - 1, (1,)))
    att = make_attack(
        attack, view, eps=eps, steps=steps, step_size=step_size, objective=objective,
        n_classes=n_classes, seed=seed,
    )
    if native:
        with preserved_buffers(model):
            adv = att(inputs.detach(), None if targets is None else targets.detach())
    else:
        if SUBSET_ATTACKS & _class_names(att) and _batch_dependent(view, None):
            raise ValueError(
                f"attack {type(att).__name__} attacks only the images still classified correctly, "
                "so batch norm in train mode would normalise with the statistics of that subset "
                "(and fail on a single image). Run it in eval mode (evaluate(..., train_mode=False), "
                "model.eval(), robust-meta eval --mode eval), or use 'pgd'"
            )
        att.set_device(inputs.device)
        if targets is None:  # a KL attack (torchattacks.TPGD) ignores the labels
            targets = torch.zeros(inputs.shape[0], dtype=torch.long, device=inputs.device)
        with isolated_torch_rng(inputs.device), preserved_buffers(model), preserved_modes(model), \
                torch.enable_grad():
            seed_torch(seed, inputs.device)
            adv = att(inputs.detach(), targets.detach())
        adv = adv.detach()
        # torchattacks may return float32 for float64 inputs in a few attacks; keep the dtype.
        if adv.dtype != inputs.dtype:
            adv = adv.to(inputs.dtype)
        # Its projection is not ours: hold every attack to the same exact ε-ball.
        adv = project_linf(adv, inputs.detach(), eps)
    return adv
