"""What `robust_meta.evaluate` returns: per-task metrics with confidence intervals.

`Metric` (mean, 95% CI, std, n and the per-task values), `EvalResult` (metrics, settings,
sanity-check warnings; JSON/CSV round trips, RA-vs-ε curves, a text table) and
`confidence_interval`. Plain data and arithmetic: no torch work happens here. Re-exported
by `robust_meta.evaluation` (import them from there).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["EvalResult", "EvalWarning", "Metric", "confidence_interval", "metric_name"]


class EvalWarning(UserWarning):
    """A sanity check of `evaluate` failed: the numbers may not mean what they seem."""


def confidence_interval(values: Iterable[float]) -> tuple[float, float]:
    r"""Mean and half-width of the normal 95% confidence interval of per-task values.

    \(\mathrm{ci95} = 1.96 \cdot s / \sqrt{n}\) with `s` the sample standard
    deviation (``ddof=1``). With a single value the interval is undefined and ``nan``.

    Args:
        values: per-task numbers (e.g. accuracies in [0, 1]).

    Returns:
        ``(mean, ci95)``.

    Raises:
        ValueError: no values, or a value that is not finite.

    Example:
        >>> mean, ci = confidence_interval([0.2, 0.4, 0.6])  # 0.4 and 1.96·0.2/√3 ≈ 0.2263
    """
    m = Metric.from_values(values)
    return m.mean, m.ci95


@dataclass(frozen=True)
class Metric:
    """One metric over tasks.

    Attributes:
        mean: mean over tasks.
        ci95: ``1.96 · std / √n`` (``nan`` when ``n < 2``).
        std: sample standard deviation (``ddof=1``; ``nan`` when ``n < 2``).
        n: number of tasks.
        values: the per-task values, in task order.
    """

    mean: float
    ci95: float
    std: float
    n: int
    values: list[float] = field(repr=False)

    @classmethod
    def from_values(cls, values: Iterable[float]) -> Metric:
        """Build from per-task values (computed in float64 with ``math.fsum``)."""
        vals = [float(v) for v in values]
        if not vals:
            raise ValueError("no values: a metric needs at least one task")
        bad = [v for v in vals if not math.isfinite(v)]
        if bad:
            raise ValueError(f"metric values must be finite, got {bad[:3]}")
        n = len(vals)
        mean = math.fsum(vals) / n
        if n < 2:
            std = ci = float("nan")
        else:
            std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1))
            ci = 1.96 * std / math.sqrt(n)
        return cls(mean, ci, std, n, vals)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "ci95": self.ci95, "std": self.std, "n": self.n,
                "values": list(self.values)}


def metric_name(attack: str, eps: float) -> str:
    """The metric key of an (attack label, ε) pair: ``"ra[pgd@8/255]"``."""
    return f"ra[{attack}@{eps * 255:g}/255]"


@dataclass
class EvalResult:
    """What `evaluate` returns.

    Attributes:
        metrics: ``name -> Metric``. ``"sa"``; ``"ra"`` (the first attack at the first
            nonzero ε; absent when every ε is 0); ``"ra[<attack>@<ε·255>/255]"`` for every
            (attack, ε) pair, e.g. ``"ra[pgd@2/255]"``.
        settings: the evaluation settings (JSON-serialisable), with timing.
        warnings: messages of the sanity checks that failed.

    Example:
        >>> res = evaluate(model, tasks, eps=[0, 2/255, 4/255])
        >>> res.metrics["ra"].mean, res.metrics["ra"].ci95
        >>> print(res.table()); res.to_json("eval.json")
        >>> eps, means, cis = res.curve()
    """

    metrics: dict[str, Metric]
    settings: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    # ---------------------------------------------------------------- export / import
    def to_dict(self) -> dict[str, Any]:
        """Plain dict: ``{"metrics": {name: {mean, ci95, std, n, values}}, "settings", "warnings"}``."""
        return {
            "metrics": {k: m.to_dict() for k, m in self.metrics.items()},
            "settings": dict(self.settings),
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalResult:
        """Inverse of `to_dict` (statistics are recomputed from the per-task values)."""
        if "metrics" not in data:
            raise ValueError("not an EvalResult dict: no 'metrics' key")
        metrics = {k: Metric.from_values(v["values"]) for k, v in data["metrics"].items()}
        return cls(metrics, dict(data.get("settings", {})), list(data.get("warnings", [])))

    def to_json(self, path: str | Path) -> Path:
        """Write `to_dict` as JSON; returns the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str))
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> EvalResult:
        """Read a file written by `to_json`."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_csv(self, path: str | Path) -> Path:
        """Write one row per task: ``task, sa, ra, ra[...], ...``; returns the path."""
        path = Path(path)
        names = list(self.metrics)
        n = self.n_tasks
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["task", *names])
            for i in range(n):
                w.writerow([i, *(repr(self.metrics[k].values[i]) for k in names)])
        return path

    @classmethod
    def from_csv(cls, path: str | Path) -> EvalResult:
        """Read per-task rows written by `to_csv` (settings and warnings are not in it)."""
        with Path(path).open(newline="") as fh:
            rows = list(csv.reader(fh))
        if not rows or rows[0][:1] != ["task"]:
            raise ValueError(f"{path} is not an EvalResult CSV (no 'task' header)")
        names = rows[0][1:]
        cols = {k: [float(r[j + 1]) for r in rows[1:]] for j, k in enumerate(names)}
        return cls({k: Metric.from_values(v) for k, v in cols.items()})

    # ---------------------------------------------------------------- views
    @property
    def n_tasks(self) -> int:
        return next(iter(self.metrics.values())).n if self.metrics else 0

    def curve(self, attack: str | None = None) -> tuple[list[float], list[float], list[float]]:
        """The RA-vs-ε curve of one attack, sorted by ε.

        ε = 0 is SA: when the sweep has no 0, the point ``(0, SA)`` is added.

        Args:
            attack: attack label (default: the first one evaluated).

        Returns:
            ``(eps_list, means, ci95s)`` with ε in [0, 1] pixel units.

        Raises:
            KeyError: unknown attack label.
        """
        labels = list(self.settings.get("attacks", []))
        eps_list = [float(e) for e in self.settings.get("eps", [])]
        if not labels:  # e.g. read back from CSV: recover from metric names
            labels, seen = [], set()
            for k in self.metrics:
                if k.startswith("ra[") and "@" in k:
                    lab = k[3:k.rindex("@")]
                    if lab not in seen:
                        seen.add(lab)
                        labels.append(lab)
        if attack is None:
            if not labels:
                raise KeyError("no attack was evaluated")
            attack = labels[0]
        if attack not in labels:
            raise KeyError(f"unknown attack {attack!r}; evaluated: {labels}")
        if not eps_list:
            prefix = f"ra[{attack}@"
            eps_list = [float(k[len(prefix):-len("/255]")]) / 255 for k in self.metrics
                        if k.startswith(prefix)]
        pts = [(e, self.metrics[metric_name(attack, e)]) for e in eps_list]
        if not any(e == 0 for e, _ in pts) and "sa" in self.metrics:
            pts.append((0.0, self.metrics["sa"]))
        pts.sort(key=lambda p: p[0])
        return [e for e, _ in pts], [m.mean for _, m in pts], [m.ci95 for _, m in pts]

    def table(self) -> str:
        """A text table: one line per metric with mean, ±ci95 and n (in percent)."""
        width = max(len(k) for k in self.metrics) if self.metrics else 6
        lines = [f"{'metric':<{width}}  {'mean %':>8}  {'±ci95 %':>8}  {'n':>6}"]
        lines.append("-" * len(lines[0]))
        for k, m in self.metrics.items():
            lines.append(f"{k:<{width}}  {100 * m.mean:8.2f}  {100 * m.ci95:8.2f}  {m.n:6d}")
        for w in self.warnings:
            lines.append(f"WARNING: {w}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
