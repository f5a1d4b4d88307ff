r"""Metric-based learners as heads: ProtoNet and R2-D2 turn a support set into head weights.

A *learner* is the inner step that turns a task's support set into the weights its query is
scored with: `robust_meta.adapt` (MAML), `robust_meta.ANILHead` (head only) and, here, the
metric-based learners, which need no gradient steps at all. Both heads below compute the
weights of the model's **linear classifier** in closed form from the support embeddings and
return them in the same ``params`` dict every other piece takes, so `RobustMetaUpdate`,
the regularizers, `ContrastiveAux`, `perturb` and `evaluate` work with them unchanged:

* the meta-gradient flows through the computed head weights into the backbone;
* an attack on the query sees those weights detached, as it sees fast weights (the
  prototypes are constants of the attack).

**ProtoNet** (Snell et al. 2017). Prototypes \(c_k\) = the mean support embedding of
class \(k\); logits \(-\|f - c_k\|^2 = 2 c_k^\top f - \|c_k\|^2 - \|f\|^2\). The
last term is the same for every class of one query, so the softmax (and the argmax) equals
that of the linear head \(W = 2C\), \(b = -\|c_k\|^2\): those are the weights
`ProtoNetHead.adapt` puts in ``params``.

**R2-D2** (Bertinetto et al. 2019, "Meta-learning with differentiable closed-form solvers").
Ridge regression of the one-hot support labels \(Y\) on the support embeddings
\(X\) (\(n \times D\)): \(W = (X^\top X + \lambda I)^{-1} X^\top Y\), computed as
\(X^\top (X X^\top + \lambda I)^{-1} Y\) (Woodbury) when \(n < D\) — an
\(n \times n\) solve instead of \(D \times D\); logits \(\alpha\, f^\top W + \beta\)
with the meta-learned scale \(\alpha\), bias \(\beta\) and regulariser
\(\lambda\) of the paper (`R2D2Head` is an ``nn.Module`` holding them: give its
parameters to the meta-optimizer).

Both need a model whose classifier is an ``nn.Linear`` over the representation: ``head=``
names it (default ``"classifier"``, as robust-meta's `Conv4`/`ResNet12`/`ResNet18`), and
the representation is its input (or ``model.forward_features``). Its output size must be at
least the number of ways of the tasks.

Example:
    >>> proto = ProtoNetHead(model)                      # Conv4(..., n_classes=ways)
    >>> robust_loss = RobustMetaUpdate(F.cross_entropy, model, attack="fgsm", eps=2/255, gamma_out=0.2)
    >>> params = proto.adapt(x_support, y_support)       # prototypes as head weights
    >>> outer_loss = robust_loss(x_query, y_query, params=params)
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_batch
from .params import Params, call_features, named_params

__all__ = ["LEARNERS", "METRIC_LEARNERS", "ProtoNetHead", "R2D2Head", "build_learner", "class_means", "learner_from_checkpoint"]


def class_means(feats: Tensor, targets: Tensor, ways: int) -> Tensor:
    """Mean embedding of each class ``0..ways-1`` (ProtoNet's prototypes).

    Raises:
        ValueError: a class with no support example.

    Shape:
        feats: ``(n, D)``; targets: ``(n,)`` -> ``(ways, D)``.
    """
    onehot = F.one_hot(targets, ways).to(feats.dtype)  # (n, ways)
    counts = onehot.sum(dim=0)
    if bool((counts == 0).any()):
        missing = [int(k) for k in torch.nonzero(counts == 0).flatten()]
        raise ValueError(f"classes {missing} have no support example (labels must cover 0..{ways - 1})")
    return (onehot.t() @ feats) / counts[:, None]


class _LinearHeadLearner:
    """What both heads share: finding the linear classifier and writing its weights."""

    def __init__(self, model: nn.Module, head: str = "classifier"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        try:
            linear = model.get_submodule(head)
        except AttributeError as err:
            raise ValueError(f"{type(model).__name__} has no submodule {head!r}: pass head=<its linear classifier>") from err
        if not isinstance(linear, nn.Linear) and not (hasattr(linear, "in_features") and hasattr(linear, "out_features")):
            raise TypeError(
                f"the head {head!r} of {type(model).__name__} is a {type(linear).__name__}; a metric "
                "learner writes the weights of a linear classifier (nn.Linear) over the representation"
            )
        names = set(named_params(model))
        self.weight_name, self.bias_name = f"{head}.weight", f"{head}.bias"
        if self.weight_name not in names or self.bias_name not in names:
            raise ValueError(f"the head {head!r} needs a weight and a bias (nn.Linear(..., bias=True))")
        # Not registered as a submodule (R2D2Head is an nn.Module): its parameters stay its own.
        object.__setattr__(self, "model", model)
        self.head = head
        self.max_ways = int(linear.out_features)
        self.head_names = [self.weight_name, self.bias_name]

    def features(self, inputs: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """The representation (the classifier's input) of ``inputs`` at ``params``."""
        return call_features(self.model, inputs, params, head=self.head).flatten(1)

    def _ways(self, targets: Tensor) -> int:
        if targets.is_floating_point() or targets.dim() != 1 or targets.numel() == 0:
            raise ValueError("support labels must be a non-empty 1-D tensor of class indices")
        ways = int(targets.max()) + 1
        if int(targets.min()) < 0 or ways > self.max_ways:
            raise ValueError(
                f"support labels must lie in [0, {self.max_ways}) (the classifier has {self.max_ways} "
                f"outputs), got [{int(targets.min())}, {ways - 1}]"
            )
        return ways

    def _write(self, start: Params, weight: Tensor, bias: Tensor) -> Params:
        """``start`` with the head replaced (classes beyond the task's ways get -inf-like logits)."""
        ways = weight.shape[0]
        if ways < self.max_ways:  # unused outputs: zero weights, a very negative bias
            pad = self.max_ways - ways
            weight = torch.cat([weight, weight.new_zeros(pad, weight.shape[1])])
            bias = torch.cat([bias, bias.new_full((pad,), -1e9 if bias.dtype != torch.float16 else -6e4)])
        out = OrderedDict(start)
        out[self.weight_name] = weight
        out[self.bias_name] = bias
        return out

    def _start(self, params: Mapping[str, Tensor] | None) -> Params:
        return named_params(self.model) if params is None else OrderedDict(params)


class ProtoNetHead(_LinearHeadLearner):
    r"""Prototypical Networks (Snell et al. 2017) as head weights in the ``params`` slot.

    `adapt` returns the model's weights with the linear classifier replaced by
    \(W = 2C\), \(b = -\|c_k\|^2\) (\(C\): the class prototypes, mean support
    embeddings): the same softmax as the negative squared Euclidean distance. With
    ``distance="cosine"`` the classifier is \(W = \tau\, c_k / \|c_k\|\), \(b = 0\)
    with a meta-learned temperature \(\tau\) (`temperature`, a parameter of this head) on
    embeddings the model is expected to L2-normalise itself; without that normalisation it is
    a scaled dot product against normalised prototypes.

    Args:
        model: a network with a linear classifier ``head`` over its representation.
        head: the classifier's module name (default ``"classifier"``).
        distance: ``"euclidean"`` (default) or ``"cosine"``.
        temperature: initial \(\tau\) of the cosine variant (default 10).

    Example:
        >>> proto = ProtoNetHead(model)
        >>> params = proto.adapt(x_support, y_support)
        >>> logits = call_model(model, x_query, params)   # = -||f - c_k||^2 + const
    """

    def __init__(self, model: nn.Module, head: str = "classifier", *, distance: str = "euclidean",
                 temperature: float = 10.0):
        super().__init__(model, head)
        if distance not in ("euclidean", "cosine"):
            raise ValueError(f"distance must be 'euclidean' or 'cosine', got {distance!r}")
        self.distance = distance
        p = next(iter(named_params(model).values()))
        self.temperature = nn.Parameter(torch.tensor(float(temperature), dtype=p.dtype, device=p.device))

    def parameters(self) -> list[nn.Parameter]:
        """The head's own meta-parameters (the cosine temperature; none for Euclidean)."""
        return [self.temperature] if self.distance == "cosine" else []

    def __repr__(self) -> str:
        return f"ProtoNetHead(head={self.head!r}, distance={self.distance!r})"

    def adapt(self, inputs: Tensor, targets: Tensor, *, params: Mapping[str, Tensor] | None = None,
              **_unused: object) -> Params:
        """The model's weights with the classifier set from the support set's prototypes.

        Accepts (and ignores) `robust_meta.adapt`'s ``steps``/``step_size``/``first_order``, so
        it can stand where an inner loop stands.

        Shape:
            inputs: ``(n, C, H, W)`` support images; targets: ``(n,)`` in ``0..ways-1``.
        """
        check_batch(inputs, targets)
        ways = self._ways(targets)
        start = self._start(params)
        protos = class_means(self.features(inputs, start), targets, ways)
        if self.distance == "euclidean":
            weight, bias = 2 * protos, -(protos * protos).sum(dim=1)
        else:
            weight = self.temperature.to(protos.dtype) * F.normalize(protos, dim=1)
            bias = protos.new_zeros(ways)
        return self._write(start, weight, bias)


class R2D2Head(_LinearHeadLearner, nn.Module):
    r"""R2-D2 (Bertinetto et al. 2019): a differentiable ridge-regression head.

    `adapt` solves \(\min_W \|XW - Y\|^2 + \lambda \|W\|^2\) on the support embeddings
    \(X\) and one-hot labels \(Y\) in closed form — through the \(n \times n\)
    system \(W = X^\top (X X^\top + \lambda I)^{-1} Y\) (Woodbury) when the support set is
    smaller than the embedding (\(n < D\), the usual few-shot case), else
    \(W = (X^\top X + \lambda I)^{-1} X^\top Y\) — and writes \(\alpha W^\top\) and
    \(\beta\) into the classifier. \(\lambda\) (kept positive as
    \(e^{\log\lambda}\)), \(\alpha\) and \(\beta\) are meta-learned, as in the
    paper. Starting values (the paper does not fix them): \(\lambda = 1\),
    \(\alpha = 1\), \(\beta = 0\). A scale that is too large at the start saturates
    the softmax on unnormalised embeddings; ``scale=`` sets it.

    It is an ``nn.Module``: pass ``list(model.parameters()) + list(head.parameters())`` to the
    meta-optimizer, and save its ``state_dict`` with the model.

    Args:
        model: a network with a linear classifier ``head`` over its representation.
        head: the classifier's module name (default ``"classifier"``).
        lam: initial ridge regulariser \(\lambda\) (> 0).
        scale: initial \(\alpha\); bias: initial \(\beta\).

    Example:
        >>> r2d2 = R2D2Head(model)
        >>> opt = torch.optim.Adam([*model.parameters(), *r2d2.parameters()], lr=1e-3)
        >>> params = r2d2.adapt(x_support, y_support)
    """

    def __init__(self, model: nn.Module, head: str = "classifier", *, lam: float = 1.0, scale: float = 1.0,
                 bias: float = 0.0):
        nn.Module.__init__(self)
        _LinearHeadLearner.__init__(self, model, head)
        if not (isinstance(lam, (int, float)) and lam > 0 and math.isfinite(lam)):
            raise ValueError(f"lam must be a positive number, got {lam!r}")
        p = next(iter(named_params(model).values()))
        kw = {"dtype": p.dtype, "device": p.device}
        self.log_lam = nn.Parameter(torch.tensor(math.log(lam), **kw))
        self.scale = nn.Parameter(torch.tensor(float(scale), **kw))
        self.bias = nn.Parameter(torch.tensor(float(bias), **kw))

    def __repr__(self) -> str:
        lam, scale, bias = (float(t.detach()) for t in (self.log_lam.exp(), self.scale, self.bias))
        return f"R2D2Head(head={self.head!r}, lam={lam:.4g}, scale={scale:.4g}, bias={bias:.4g})"

    @property
    def lam(self) -> Tensor:
        r"""The ridge regulariser \(\lambda = e^{\log\lambda}\) (> 0)."""
        return self.log_lam.exp()

    def ridge(self, feats: Tensor, targets: Tensor, ways: int) -> Tensor:
        r"""The ridge solution \(W\) (``(D, ways)``) for embeddings ``feats`` and labels ``targets``."""
        y = F.one_hot(targets, ways).to(feats.dtype)
        n, d = feats.shape
        lam = self.lam.to(feats.dtype)
        if n < d:  # Woodbury: an n x n system
            gram = feats @ feats.t() + lam * torch.eye(n, dtype=feats.dtype, device=feats.device)
            return feats.t() @ torch.linalg.solve(gram, y)
        gram = feats.t() @ feats + lam * torch.eye(d, dtype=feats.dtype, device=feats.device)
        return torch.linalg.solve(gram, feats.t() @ y)

    def adapt(self, inputs: Tensor, targets: Tensor, *, params: Mapping[str, Tensor] | None = None,
              **_unused: object) -> Params:
        """The model's weights with the classifier set to the scaled ridge solution.

        Accepts (and ignores) `robust_meta.adapt`'s ``steps``/``step_size``/``first_order``.

        Shape:
            inputs: ``(n, C, H, W)`` support images; targets: ``(n,)`` in ``0..ways-1``.
        """
        check_batch(inputs, targets)
        ways = self._ways(targets)
        start = self._start(params)
        feats = self.features(inputs, start)
        w = self.ridge(feats, targets, ways)  # (D, ways)
        scale = self.scale.to(feats.dtype)
        weight = scale * w.t()
        bias = self.bias.to(feats.dtype).expand(ways)
        return self._write(start, weight, bias)


#: Learner names accepted by `robust_meta.train.TrainConfig` (``learner=``) and ``--learner``:
#: ``"maml"`` is gradient-based adaptation (`robust_meta.adapt`, or `robust_meta.ANILHead` with
#: the ``anil`` method); the others are the metric heads of this module.
LEARNERS = ("maml", "protonet", "r2d2")
#: The closed-form learners (no inner steps; meta-test in eval mode, as their papers do).
METRIC_LEARNERS = {"protonet": ProtoNetHead, "r2d2": R2D2Head}


def build_learner(name: str, model: nn.Module, *, head: str = "classifier") -> ProtoNetHead | R2D2Head | None:
    """The head for learner ``name`` on ``model`` (``None`` for ``"maml"``: gradient steps).

    Raises:
        ValueError: an unknown name (the message lists `LEARNERS`).
    """
    name = str(name).lower()
    if name == "maml":
        return None
    if name not in METRIC_LEARNERS:
        raise ValueError(f"unknown learner {name!r}; choose from {', '.join(LEARNERS)}")
    return METRIC_LEARNERS[name](model, head)


def _learner_state(learner: object) -> dict[str, Tensor] | None:
    """A copy of a learner head's own meta-parameters (R2-D2's λ, scale, bias), or ``None``."""
    if isinstance(learner, nn.Module):
        return {k: v.detach().clone() for k, v in learner.state_dict().items()}
    return None


def learner_from_checkpoint(model: nn.Module, config: object, checkpoint: Mapping[str, object]):
    """The learner head a checkpoint's config names, on ``model``, with its stored meta-parameters.

    Args:
        model: the model from `robust_meta.train.model_from_checkpoint`.
        config: its `robust_meta.train.TrainConfig`.
        checkpoint: the checkpoint dict (the third value of ``model_from_checkpoint``).

    Returns:
        ``None`` for ``learner="maml"``, else a `ProtoNetHead` or an `R2D2Head` (on the model's
        device, with the λ/scale/bias the checkpoint holds).

    Example:
        >>> model, cfg, ckpt = model_from_checkpoint("runs/proto/best.pt")
        >>> head = learner_from_checkpoint(model, cfg, ckpt)
        >>> res = evaluate(model, tasks, eps=8/255, learner=head, train_mode=False)
    """
    learner = build_learner(getattr(config, "learner", "maml"), model)
    state = (checkpoint.get("extra") or {}).get("learner") if isinstance(checkpoint, Mapping) else None
    if isinstance(learner, nn.Module):
        p = next(iter(named_params(model).values()))
        learner.to(device=p.device, dtype=p.dtype)
        if state:
            learner.load_state_dict(state)
    return learner
