"""A strong-attack audit of a robust accuracy: does a far stronger attack take it away?

Carlini et al. (2019), "On Evaluating Adversarial Robustness": a robust accuracy (RA) means
something only if a much stronger attack does not lower it — otherwise the model masks
gradients, or the attack is too weak, and the RA overstates robustness. `audit` re-evaluates
a model on (a subset of) its test tasks with the protocol's attack *and* a `StrongAttack`
(many more steps, several random restarts, a second loss — the logit margin — and the
per-image worst case over all of them), on the same per-task random streams as
`robust_meta.evaluate` with the same ``seed``: the protocol RA it reports on task ``i`` is the
value ``evaluate`` reported for task ``i``.

Example:
    >>> res = audit(model, tasks[:100], eps=8/255, steps=10, step_size=0.01, seed=0)
    >>> print(res.summary())     # RA 45.0 ± 1.2 % -> worst case 43.1 ± 1.2 % (drop 1.9 ± 0.4)
    >>> res.flagged              # drop above `tolerance`: report the strong RA instead
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ._checks import check_eps
from ._metrics import EvalWarning, Metric, metric_name
from .attacks import AttackLike, StrongAttack

__all__ = ["AuditResult", "AuditWarning", "audit"]


class AuditWarning(EvalWarning):
    """The strong attack lowered RA by more than the tolerance: the protocol's RA overstates it."""


@dataclass(frozen=True)
class AuditResult:
    """What `audit` returns (all accuracies in [0, 1], per-task values in task order).

    Attributes:
        protocol: RA under the protocol's attack on the audited tasks.
        strong: RA under the strong attack alone.
        worst: per-task worst case of the two (the robust accuracy that survives both).
        drop: per-task ``protocol - worst`` (>= 0): how much RA the stronger attack takes away.
        sa: clean accuracy on the audited tasks.
        eps: the radius (pixel units).
        attack: the protocol attack's label; strong_attack: the strong attack, in words.
        tolerance: the drop above which the audit is `flagged`.
        warnings: the audit's own warning (if flagged) and evaluate's sanity checks.
    """

    protocol: Metric
    strong: Metric
    worst: Metric
    drop: Metric
    sa: Metric
    eps: float
    attack: str
    strong_attack: str
    tolerance: float
    warnings: list[str] = field(default_factory=list)

    @property
    def n_tasks(self) -> int:
        return self.protocol.n

    @property
    def flagged(self) -> bool:
        """Whether the mean drop exceeds ``tolerance`` (the protocol's RA is not to be trusted)."""
        return self.drop.mean > self.tolerance

    def summary(self) -> str:
        """One line: protocol RA -> worst-case RA, and the drop, in percent with 95% CIs."""
        def pc(m: Metric) -> str:
            return f"{100 * m.mean:.1f} ± {100 * m.ci95:.1f} %"

        flag = "  <-- FLAGGED" if self.flagged else ""
        return (f"RA ({self.attack}) {pc(self.protocol)} -> worst case {pc(self.worst)} "
                f"(strong alone {pc(self.strong)}; drop {100 * self.drop.mean:.1f} ± "
                f"{100 * self.drop.ci95:.1f} points, {self.n_tasks} tasks, ε = {self.eps * 255:g}/255){flag}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: means and CIs of every metric, settings, warnings (no per-task values)."""
        def m(x: Metric) -> dict[str, float]:
            return {"mean": x.mean, "ci95": x.ci95}

        return {"n_tasks": self.n_tasks, "eps": self.eps, "attack": self.attack,
                "strong_attack": self.strong_attack, "tolerance": self.tolerance,
                "sa": m(self.sa), "ra_protocol": m(self.protocol), "ra_strong": m(self.strong),
                "ra_worst": m(self.worst), "drop": m(self.drop), "flagged": self.flagged,
                "warnings": list(self.warnings)}


def audit(
    model: nn.Module,
    tasks: Iterable[Any] | Mapping[str, Any],
    *,
    eps: float,
    attack: AttackLike = "pgd",
    strong: StrongAttack | None = None,
    tolerance: float = 0.03,
    max_tasks: int | None = None,
    **evaluate_kwargs: Any,
) -> AuditResult:
    """Evaluate ``model`` under the protocol's attack and a far stronger one; report the drop.

    One `robust_meta.evaluate` call with ``attacks={attack_label: attack, "strong": strong}``
    at ``eps``: the same fine-tuning, the same per-task random streams (the protocol attack
    draws first, so with the same ``seed`` its values are those of an ``evaluate`` with that
    attack alone), then the strong attack on the same fine-tuned weights.

    Args:
        model: the meta-model.
        tasks: test tasks (a subset is fine: the audit costs ``strong.runs × strong.steps``
            attack steps a task).
        eps: the radius the RA is claimed at.
        attack: the protocol's attack (default ``"pgd"``: PGD-``attack_steps``).
        strong: the strong attack (default `StrongAttack()`: PGD-50, 3 restarts × {CE, margin}).
        tolerance: a mean drop above this (default 0.03: 3 points) flags the audit with an
            `AuditWarning`.
        max_tasks: audit only the first ``max_tasks`` tasks.
        **evaluate_kwargs: passed to `robust_meta.evaluate` (``steps``, ``step_size``,
            ``attack_steps``, ``seed``, ``train_mode``, ``anil``, ``finetune``, ...).

    Returns:
        `AuditResult`.

    Raises:
        ValueError: ε = 0, a bad tolerance, or any error of `robust_meta.evaluate`.
    """
    from .evaluation import evaluate

    eps = check_eps(eps)
    if eps == 0:
        raise ValueError("an audit needs eps > 0 (at ε = 0 there is nothing to attack)")
    tolerance = float(tolerance)
    if not 0 <= tolerance <= 1:
        raise ValueError(f"tolerance must lie in [0, 1], got {tolerance}")
    strong = StrongAttack() if strong is None else strong
    if not isinstance(strong, StrongAttack):
        raise TypeError(f"strong must be a StrongAttack, got {type(strong).__name__}")
    label = attack.lower() if isinstance(attack, str) else type(attack).__name__.lower()
    if label == "strong":
        label = "protocol"
    for key in ("eps", "attacks"):
        if key in evaluate_kwargs:
            raise TypeError(f"audit() sets {key!r} itself")
    res = evaluate(model, tasks, eps=eps, attacks={label: attack, "strong": strong}, max_tasks=max_tasks,
                   **evaluate_kwargs)
    prot = res.metrics[metric_name(label, eps)]
    strg = res.metrics[metric_name("strong", eps)]
    worst = Metric.from_values(min(a, b) for a, b in zip(prot.values, strg.values))
    drop = Metric.from_values(a - w for a, w in zip(prot.values, worst.values))
    name = f"PGD-{evaluate_kwargs.get('attack_steps', 10)}" if label == "pgd" else label
    msgs = [w for w in res.warnings if "stronger attack" not in w]
    result = AuditResult(prot, strg, worst, drop, res.metrics["sa"], eps, name, strong.describe(), tolerance, msgs)
    if result.flagged:
        msg = (f"audit: the strong attack ({strong.describe()}) lowers RA by "
               f"{100 * drop.mean:.1f} ± {100 * drop.ci95:.1f} points at ε = {eps * 255:g}/255 "
               f"(RA {100 * prot.mean:.1f} % -> {100 * worst.mean:.1f} %, {prot.n} tasks), more than "
               f"the tolerance of {100 * tolerance:g} points: the {name} RA overstates robustness "
               "(a weak attack or gradient masking); report the worst-case RA")
        warnings.warn(msg, AuditWarning, stacklevel=2)
        result.warnings.insert(0, msg)
    return result
