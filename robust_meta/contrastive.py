"""Contrastive auxiliary loss of R-MAML_out-CL (paper Sec. 5, eq. 4).

[`nt_xent`][robust_meta.contrastive.nt_xent] is the SimCLR NT-Xent loss generalised to
``V >= 2`` views of each sample;
[`ContrastiveAux`][robust_meta.contrastive.ContrastiveAux] computes it on the representation
of the **adapted** model for the views ``[x, t(x), x_adv]`` of the query images and is passed
to ``RobustMetaUpdate`` as ``aux=``:

```python
aux = ContrastiveAux(model, weight=0.1, temperature=0.5)          # γ_CL = 0.1
robust_loss = RobustMetaUpdate(F.cross_entropy, model, attack="pgd", eps=2/255,
                               gamma_out=0.2, aux=aux)            # R-MAML_out-CL
```
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .augment import Augment
from .params import FeatureSpec, call_features

__all__ = ["ContrastiveAux", "nt_xent"]


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    t = float(temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def nt_xent(z: Tensor | Sequence[Tensor], *, temperature: float = 0.5) -> Tensor:
    r"""NT-Xent (normalised temperature-scaled cross-entropy) over ``V >= 2`` views.

    The ``N = V·B`` embeddings are L2-normalised; with \(s_{ij} = z_i^\top z_j / \tau\)
    (cosine similarity over the temperature), every embedding ``i`` is an anchor whose
    positives \(P(i)\) are the ``V - 1`` other views of the same sample and whose
    denominator runs over all ``N - 1`` other embeddings:

    \[
    \mathcal{L} = \frac{1}{N} \sum_i \frac{-1}{V-1} \sum_{p \in P(i)}
    \log \frac{\exp s_{ip}}{\sum_{k \ne i} \exp s_{ik}}
    \]

    For ``V = 2`` this is exactly SimCLR's loss (Chen et al. 2020, eq. 1, averaged over the
    ``2B`` anchors); for ``V > 2`` it is the multi-positive form of Khosla et al. (2020).

    Args:
        z: a tensor ``(V, B, D)`` or a sequence of ``V`` tensors ``(B, D)``; view ``v`` of
            sample ``b`` is ``z[v][b]``. Extra trailing dimensions are flattened.
        temperature: τ > 0.

    Returns:
        A scalar tensor (differentiable w.r.t. ``z``).

    Raises:
        ValueError: fewer than 2 views, views of different shapes, an empty batch,
            ``temperature <= 0``.
        TypeError: ``z`` is neither a tensor nor a sequence of tensors.

    Shape:
        z: ``(V, B, D)`` -> scalar.

    Example:
        >>> loss = nt_xent([proj(f(x)), proj(f(aug(x)))], temperature=0.5)
    """
    tau = _check_temperature(temperature)
    if isinstance(z, Tensor):
        views = z
    elif isinstance(z, Sequence) and all(isinstance(v, Tensor) for v in z):
        shapes = {tuple(v.shape) for v in z}
        if len(shapes) > 1:
            raise ValueError(f"all views must have the same shape, got {sorted(shapes)}")
        if not z:
            raise ValueError("nt_xent needs at least 2 views, got 0")
        views = torch.stack(list(z))
    else:
        raise TypeError(f"z must be a (V, B, D) tensor or a list of (B, D) tensors, got {type(z).__name__}")
    if views.dim() < 3:
        raise ValueError(f"z must have shape (V, B, D), got {tuple(views.shape)}")
    n_views, batch = views.shape[:2]
    if n_views < 2:
        raise ValueError(f"nt_xent needs at least 2 views, got {n_views}")
    if batch < 1:
        raise ValueError("nt_xent got an empty batch")
    flat = F.normalize(views.reshape(n_views * batch, -1), dim=1)
    sim = flat @ flat.T / tau
    n = flat.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=flat.device)
    sim = sim.masked_fill(eye, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    sample = torch.arange(n, device=flat.device) % batch
    positive = (sample[:, None] == sample[None, :]) & ~eye
    per_anchor = log_prob.masked_fill(~positive, 0.0).sum(dim=1) / (n_views - 1)
    return -per_anchor.mean()


def _infer_in_dim(model: nn.Module | None, features: FeatureSpec, head: str | None) -> int | None:
    """The representation width, when the model says it without a forward pass."""
    if model is None or features is not None:
        return None
    name = head if head is not None else "classifier"
    try:
        sub = model.get_submodule(name)
    except AttributeError:
        return None
    return sub.in_features if isinstance(sub, nn.Linear) else None


class ContrastiveAux(nn.Module):
    r"""Weighted contrastive term \(\gamma_{CL}\,\ell_{CL}(w'_c; p^+ \cup p^{adv})\) (eq. 4).

    Called by [`RobustMetaUpdate`][robust_meta.meta.RobustMetaUpdate] (the ``AuxLoss`` protocol) as
    ``aux(model, params, inputs, adv_inputs)`` with the query images, their adversarial
    examples and the **adapted** weights. The views of each query image are
    ``x``, an augmentation ``t(x)`` and, with ``adversarial_view=True``, ``x_adv`` as one
    more positive; their representations are taken at the adapted weights
    ([`call_features`][robust_meta.params.call_features]), optionally passed through a
    projection head, and scored with [`nt_xent`][robust_meta.contrastive.nt_xent].

    **Batch statistics.** Each view is run as its own batch (clean, augmented, adversarial),
    so the clean view sees the same batch-norm statistics as the task loss and the
    adversarial view those it was generated under.

    **Projection head.** With ``projection=d`` a 2-layer MLP ``Linear(in_dim, hidden) →
    ReLU → Linear(hidden, d)`` maps the representation before the loss (SimCLR). Its
    weights are meta-learned (not adapted in the inner loop): **put
    ``aux.parameters()`` in the meta-optimizer** next to the model's, e.g.
    ``Adam([*model.parameters(), *aux.parameters()])``. ``in_dim`` is taken from the
    argument, else from ``model``'s classifier ``nn.Linear`` (``head`` or ``"classifier"``),
    else the first layer is lazy (``nn.LazyLinear``) and is sized on the first call; the
    lazy parameter is already the object the optimizer holds, and it is created on the
    device and dtype of the representation.

    Args:
        model: the meta-model; used only to infer ``in_dim`` and check ``features`` (it is
            not stored: the model's parameters are not parameters of this module).
        weight: γ_CL >= 0 (paper: 0.1); 0 returns a zero without running the model.
        temperature: τ > 0 of NT-Xent.
        augment: ``t``; an [`Augment`][robust_meta.augment.Augment] (default ``Augment()``) is
            called with ``generator=``; any other callable as ``augment(x)``.
        projection: output width of the projection head; ``None``: no head (the
            representation itself is contrasted).
        in_dim: input width of the projection head (see above).
        hidden: hidden width of the projection head (default ``in_dim`` when known,
            else ``4·projection``).
        features: how to get the representation: ``None`` (``model.forward_features``),
            a submodule name (its flattened output), or ``callable(model, x, params)``.
        head: name of the classifier submodule, for models without ``forward_features``
            (the representation is that module's input), e.g. ``head="3"`` in a Sequential.
        adversarial_view: add the adversarial example as a third view.
        generator: random source for the augmentation (``None``: global RNG).

    Raises:
        ValueError: ``weight < 0``, ``temperature <= 0``, bad widths, unknown module name.
        TypeError: wrong argument types.

    Shape:
        inputs, adv_inputs: ``(B, C, H, W)`` in [0, 1] -> scalar.

    Example:
        >>> aux = ContrastiveAux(model, weight=0.1, projection=128)
        >>> robust_loss = RobustMetaUpdate(F.cross_entropy, model, eps=2/255, gamma_out=0.2, aux=aux)
        >>> opt = torch.optim.Adam([*model.parameters(), *aux.parameters()], lr=1e-3)

    References:
        Wang et al., ICLR 2021, eq. 4 (R-MAML_out-CL); Chen et al., "A Simple Framework for
        Contrastive Learning of Visual Representations", ICML 2020.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        weight: float = 0.1,
        temperature: float = 0.5,
        augment: Callable[..., Tensor] | None = None,
        projection: int | None = None,
        in_dim: int | None = None,
        hidden: int | None = None,
        features: FeatureSpec = None,
        head: str | None = None,
        adversarial_view: bool = True,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise TypeError(f"weight must be a number, got {type(weight).__name__}")
        if not (float(weight) >= 0 and math.isfinite(float(weight))):
            raise ValueError(f"weight (gamma_CL) must be a finite number >= 0, got {weight!r}")
        self.weight = float(weight)
        self.temperature = _check_temperature(temperature)
        if augment is not None and not callable(augment):
            raise TypeError(f"augment must be callable, got {type(augment).__name__}")
        self.augment = Augment() if augment is None else augment
        if features is not None and not isinstance(features, str) and not callable(features):
            raise TypeError(f"features must be None, a module name or a callable, got {type(features).__name__}")
        if model is not None:
            if not isinstance(model, nn.Module):
                raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
            for spec in (features, head):
                if isinstance(spec, str):
                    names = [n for n, _ in model.named_modules() if n]
                    if spec not in names:
                        raise ValueError(f"model {type(model).__name__} has no submodule {spec!r}; submodules are {names[:20]}")
        self.features = features
        self.head = head
        self.adversarial_view = bool(adversarial_view)
        self.generator = generator
        self.projection_head: nn.Module | None = None
        if projection is not None:
            for name, val in (("projection", projection), ("in_dim", in_dim), ("hidden", hidden)):
                if val is not None and (isinstance(val, bool) or not isinstance(val, numbers.Integral) or val < 1):
                    raise ValueError(f"{name} must be an int >= 1, got {val!r}")
            if in_dim is None:
                in_dim = _infer_in_dim(model, features, head)
            if hidden is None:
                hidden = in_dim if in_dim is not None else 4 * int(projection)
            first = nn.Linear(in_dim, hidden) if in_dim is not None else nn.LazyLinear(hidden)
            self.projection_head = nn.Sequential(first, nn.ReLU(), nn.Linear(hidden, int(projection)))
        elif in_dim is not None or hidden is not None:
            raise ValueError("in_dim/hidden are widths of the projection head: pass projection=<out dim> too")

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight:g}, temperature={self.temperature:g}, "
            f"adversarial_view={self.adversarial_view}, features={self.features!r}, head={self.head!r}"
        )

    def _view(self, x: Tensor) -> Tensor:
        if isinstance(self.augment, Augment):
            return self.augment(x, generator=self.generator)
        out = self.augment(x)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            raise ValueError(
                f"augment must return a tensor of the input shape {tuple(x.shape)}, got "
                f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}"
            )
        return out

    def project(self, feats: Tensor) -> Tensor:
        """The projection head applied to ``(B, D)`` features (identity without a head)."""
        feats = feats.flatten(1)
        if self.projection_head is None:
            return feats
        if any(isinstance(p, nn.parameter.UninitializedParameter) for p in self.projection_head.parameters()):
            self.projection_head.to(device=feats.device, dtype=feats.dtype)
        w = self.projection_head[0].weight
        if w.device != feats.device or w.dtype != feats.dtype:
            raise ValueError(
                f"the projection head is on {w.device}/{w.dtype} but the features are on "
                f"{feats.device}/{feats.dtype}: move it with aux.to(device, dtype) (and create the "
                "optimizer afterwards, or pass in_dim=None to build it on first use)"
            )
        return self.projection_head(feats)

    def embed(self, model: nn.Module, params: Mapping[str, Tensor] | None, x: Tensor) -> Tensor:
        """Projected representation of ``x`` at the weights ``params``."""
        feats = call_features(model, x, params, features=self.features, head=self.head)
        return self.project(feats)

    def forward(
        self,
        model: nn.Module,
        params: Mapping[str, Tensor] | None,
        inputs: Tensor,
        adv_inputs: Tensor | None = None,
    ) -> Tensor:
        """``weight · nt_xent([r(x), r(t(x))(, r(x_adv))])`` at the adapted weights.

        Args:
            model: the meta-model.
            params: the adapted weights (``None``: the model's own).
            inputs: query images in [0, 1].
            adv_inputs: their adversarial examples (required when ``adversarial_view``);
                treated as constants.

        Returns:
            The weighted scalar, differentiable w.r.t. the meta-parameters through
            ``params`` and w.r.t. the projection head.

        Raises:
            ValueError: ``adv_inputs`` missing or of another shape than ``inputs``.
        """
        if not isinstance(inputs, Tensor):
            raise TypeError(f"inputs must be a tensor, got {type(inputs).__name__}")
        if self.adversarial_view:
            if adv_inputs is None:
                raise ValueError("adversarial_view=True needs adv_inputs (the adversarial examples of inputs)")
            if adv_inputs.shape != inputs.shape:
                raise ValueError(
                    f"adv_inputs must have the shape of inputs {tuple(inputs.shape)}, got {tuple(adv_inputs.shape)}"
                )
        if self.weight == 0:
            return torch.zeros((), device=inputs.device, dtype=inputs.dtype)
        xs = [inputs, self._view(inputs.detach())]
        if self.adversarial_view:
            xs.append(adv_inputs.detach())
        views = [self.embed(model, params, x) for x in xs]
        return self.weight * nt_xent(views, temperature=self.temperature)
