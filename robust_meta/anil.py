"""ANIL: fine-tune only the classifier head; the body runs once per task."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_batch, check_labels, check_steps
from .adapt import LossFn, StepSize, _step_sizes, inner_loop
from .params import Params, call_features, call_head, named_params

__all__ = ["ANILHead"]


class ANILHead:
    """Head-only inner loop (Raghu et al. 2019; R-MAML_out-ANIL in the paper, Sec. 4).

    The body computes the support features **once** per task; the K inner steps then run
    the head alone on those cached features. At meta-train the meta-gradient still reaches
    the body through the cached features (second order) and through the query forward pass.

    The head is chosen by module name (``head="classifier"``: the parameters under that
    prefix adapt, its input is the representation) or, by default, through the model's
    ``forward_features``/``forward_head`` methods with the head parameters given by
    ``head_prefix`` (default ``"classifier"``).

    Args:
        model: a plain ``nn.Module`` or torchmeta ``MetaModule``.
        head: name of the classifier submodule; ``None`` to use
            ``forward_features``/``forward_head``.
        head_prefix: parameter-name prefix of the head when ``head`` is ``None``.

    Example:
        >>> anil = ANILHead(model, head="classifier")
        >>> fast = anil.adapt(x_support, y_support, steps=5, step_size=0.01)
        >>> outer_loss += robust_loss(x_query, y_query, params=fast)
    """

    def __init__(self, model: nn.Module, head: str | None = None, *, head_prefix: str = "classifier"):
        params = named_params(model)
        self.model = model
        self.head = head
        prefix = (head if head is not None else head_prefix) + "."
        self.head_names = [n for n in params if n.startswith(prefix)]
        if not self.head_names:
            raise ValueError(
                f"no parameters under {prefix!r} in {type(model).__name__}; "
                f"parameter names are {list(params)[:10]}"
            )
        self.body_names = [n for n in params if n not in self.head_names]
        if head is None and not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
            raise TypeError(
                f"{type(model).__name__} has no forward_features/forward_head; pass head=<module name>"
            )

    def __repr__(self) -> str:
        return f"ANILHead(head={self.head!r}, head_params={self.head_names})"

    def features(self, inputs: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """The body's representation of ``inputs`` at ``params``."""
        return call_features(self.model, inputs, params, head=self.head)

    def logits(self, feats: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """The head applied to cached features."""
        return call_head(self.model, feats, params, head=self.head)

    def adapt(
        self,
        inputs: Tensor,
        targets: Tensor,
        *,
        steps: int,
        step_size: StepSize,
        first_order: bool = False,
        params: Mapping[str, Tensor] | None = None,
        loss_fn: LossFn | None = None,
    ) -> Params:
        """Same contract as `robust_meta.adapt`, adapting the head only.

        ``step_size`` may be a float or a dict over head parameter names (body names may
        appear only with 0.0: the body is never adapted).

        Raises:
            ValueError: a nonzero step size for a body parameter, and as `robust_meta.adapt`.

        Returns:
            All parameters: body entries are the starting weights, head entries adapted.
        """
        steps = check_steps(steps)
        check_batch(inputs, targets)
        loss_fn = F.cross_entropy if loss_fn is None else loss_fn
        start = named_params(self.model) if params is None else OrderedDict(params)
        if isinstance(step_size, Mapping):
            all_lrs = _step_sizes(step_size, list(start))
            body = [n for n, v in all_lrs.items() if n not in self.head_names
                    and not (isinstance(v, float) and v == 0.0)]
            if body:
                raise ValueError(
                    f"ANIL adapts the head only, but step_size gives body parameters {body[:5]} a "
                    "step size; leave them out (or set 0.0), or use robust_meta.adapt for full MAML"
                )
            lrs = {n: v for n, v in all_lrs.items() if n in self.head_names}
        else:
            lrs = _step_sizes(step_size, self.head_names)
        if steps == 0:
            return inner_loop(start, lrs, 0, first_order, lambda fast, k: fast)  # type: ignore[arg-type]
        feats = self.features(inputs, start)
        if first_order or not torch.is_grad_enabled():
            # The inner gradients are constants: the body graph is not needed inside the loop.
            feats = feats.detach()

        def loss_at(fast: Params, k: int) -> Tensor:
            logits = self.logits(feats, fast)
            if k == 0:
                check_labels(logits, targets)
            return loss_fn(logits, targets)

        return inner_loop(start, lrs, steps, first_order, loss_at)
