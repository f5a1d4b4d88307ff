"""Meta-test evaluation: fine-tune on each task's support set, measure SA and RA on its query.

Protocol (paper Sec. 3–4, Table 1, Figures 1/3/S2): for every test task the meta-model is
fine-tuned on the support set — standard fine-tuning (S-FT), adversarial fine-tuning (A-FT)
or head-only (ANIL) — and the **fine-tuned** model is scored on the query set:

* **SA** (standard accuracy): accuracy on the clean query images;
* **RA** (robust accuracy): accuracy on query images attacked against the fine-tuned
  weights, for every attack and every ε of a sweep (ε = 0 is SA).

Results are reported as the mean over tasks with a 95% confidence interval
(``1.96 · std / √n``, ``std`` with ``ddof=1``), like the paper's 2400-task tables.

**Batch-norm / mode policy.** One train/eval mode is used for the fine-tuning, the attack
*and* the measurement (``train_mode``; default: the mode the model is in). In train mode
batch norm uses the statistics of the batch it sees (the MAML convention, and the authors'
protocol): the attacked query batch is normalised with its own statistics, exactly as the
attack saw it. The model's running statistics, parameters and mode are left untouched.

Sanity checks modelled on AutoAttack's ``autoattack/checks.py`` append to
`EvalResult.warnings` and are emitted as `EvalWarning`.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import math
import numbers
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import fast as _fast
from ._checks import check_eps, check_steps
from ._eval_tasks import _EvalJob, _parallel, _serial
from .adapt import LossFn, StepSize, adapt
from .anil import ANILHead
from .attacks import AttackLike, PGDAttack, _check_spec, is_torchattacks
from .data import Task, iter_tasks
from .fast import resolve_compile
from .params import Params, call_model, named_params
from .regularizers import ATRegularizer

__all__ = [
    "EvalResult",
    "EvalWarning",
    "Metric",
    "confidence_interval",
    "evaluate",
    "finetune",
    "metric_name",
    "AUTO_COMPILE_MIN_TASKS",
]

#: ``evaluate(compile="auto")`` compiles (on CUDA) when at least this many tasks per process
#: are known to be coming, so that the compilation (tens of seconds) pays for itself.
AUTO_COMPILE_MIN_TASKS = 100

FINETUNE = ("standard", "adversarial")

# Attacks whose strength is ordered (same ε): a stronger one must not give a higher RA.
_STRENGTH = {"none": 0, "fgsm": 1, "pgd": 2, "apgd": 3, "autoattack": 4}


class EvalWarning(UserWarning):
    """A sanity check of `evaluate` failed: the numbers may not mean what they seem."""


def confidence_interval(values: Iterable[float]) -> tuple[float, float]:
    r"""Mean and half-width of the normal 95% confidence interval of per-task values.

    `\mathrm{ci95} = 1.96 \cdot s / \sqrt{n}` with `s` the sample standard
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


# ------------------------------------------------------------------------- fine-tuning
def finetune(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    steps: int,
    step_size: StepSize,
    first_order: bool = True,
    mode: str = "standard",
    attack: AttackLike = "pgd",
    eps: float | None = None,
    gamma: float = 1.0,
    attack_steps: int | None = None,
    attack_step_size: float | None = None,
    anil: ANILHead | None = None,
    loss_fn: LossFn | None = None,
) -> Params:
    r"""Meta-test fine-tuning of ``model`` on a support set; returns the fast weights.

    * ``mode="standard"`` (S-FT): ``steps`` gradient steps on the clean loss
      (`robust_meta.adapt`, or ``anil.adapt`` for head-only fine-tuning).
    * ``mode="adversarial"`` (A-FT, Table 1): steps on
      `\ell(w; D) + \gamma\,\ell(w; D_{adv})` with adversarial examples generated
      against the current fast weights at every step (``ATRegularizer`` with
      ``gamma_in=gamma``); ``gamma=math.inf`` fine-tunes on the adversarial loss only
      (AQ-style). With ``anil`` only the head adapts.

    Runs in the model's current train/eval mode; call it under ``torch.no_grad()`` to get
    detached weights (the values do not depend on ``first_order``).

    Args:
        model: plain ``nn.Module`` or torchmeta ``MetaModule``.
        inputs, targets: the support set.
        steps, step_size, first_order, loss_fn: as in `robust_meta.adapt`.
        mode: ``"standard"`` or ``"adversarial"``.
        attack, eps, attack_steps, attack_step_size: the A-FT attack (``eps`` required).
        gamma: weight of the adversarial term (> 0; ``inf`` for adversarial loss only).
        anil: an `robust_meta.ANILHead` of ``model`` to fine-tune the head only.

    Returns:
        ``dict[str, Tensor]`` of all parameters.

    Raises:
        ValueError: unknown ``mode``, A-FT without ``eps``, ``gamma <= 0``, an ``anil`` head
            of another model.

    Shape:
        inputs: ``(N·K, C, H, W)`` in [0, 1]; targets: ``(N·K,)``.
    """
    if mode not in FINETUNE:
        raise ValueError(f"unknown finetune mode {mode!r}; choose from {', '.join(FINETUNE)}")
    if anil is not None and anil.model is not model:
        raise ValueError("anil must be an ANILHead built on the model being evaluated")
    if mode == "standard":
        if anil is not None:
            return anil.adapt(inputs, targets, steps=steps, step_size=step_size,
                              first_order=first_order, loss_fn=loss_fn)
        return adapt(model, inputs, targets, steps=steps, step_size=step_size,
                     first_order=first_order, loss_fn=loss_fn)
    if eps is None:
        raise ValueError("adversarial fine-tuning needs eps (finetune_eps)")
    eps = check_eps(eps, "finetune eps")
    gamma = float(gamma)
    if not gamma > 0:
        raise ValueError(f"finetune gamma must be > 0 (or inf), got {gamma}")
    if isinstance(step_size, Mapping) or anil is None:
        lr = step_size
    else:
        lr = {n: step_size for n in anil.head_names}
    if isinstance(lr, Mapping) and anil is not None:
        lr = {n: v for n, v in lr.items() if n in anil.head_names}
    att_steps, att_lr = _attack_steps(attack, attack_steps, attack_step_size)
    reg = ATRegularizer(attack, eps=eps, steps=att_steps, step_size=att_lr)
    return adapt(model, inputs, targets, steps=steps, step_size=lr, first_order=first_order,
                 loss_fn=loss_fn, regularizer=reg, gamma_in=gamma)


_finetune = finetune  # ``evaluate`` has a parameter named ``finetune``


def _attack_steps(attack: AttackLike, steps: int | None, step_size: float | None):
    """Iteration settings that apply to a named attack (PGD: steps + step; APGD: steps)."""
    if isinstance(attack, str):
        name = attack.lower()
        if name == "pgd":
            return steps, step_size
        if name == "apgd":
            return steps, None
    return None, None


# ------------------------------------------------------------------------- evaluation
def _attack_label(spec: AttackLike) -> str:
    if isinstance(spec, str):
        return spec.lower()
    if isinstance(spec, type):
        return spec.__name__.lower()
    return type(spec).__name__.lower()


def _attack_table(attacks: Any) -> list[tuple[str, AttackLike]]:
    if isinstance(attacks, Mapping):
        items = []
        for label, spec in attacks.items():
            if not isinstance(label, str) or not label:
                raise TypeError(f"attack labels must be non-empty strings, got {label!r}")
            items.append((label, spec))
    elif isinstance(attacks, (str, PGDAttack)) or is_torchattacks(attacks):
        items = [(_attack_label(attacks), attacks)]
    elif isinstance(attacks, Iterable):
        items = [(_attack_label(a), a) for a in attacks]
    else:
        raise TypeError(f"attacks must be a name, an attack, a sequence or a dict, got {type(attacks).__name__}")
    if not items:
        raise ValueError("attacks is empty: give at least one attack (e.g. 'pgd' or 'none')")
    labels = [lab for lab, _ in items]
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        raise ValueError(f"duplicate attack labels {dup}; pass a dict label -> attack")
    for label, spec in items:
        try:
            _check_spec(spec)
        except TypeError as err:
            raise TypeError(f"attack {label!r}: {err}") from None
    return items


def _eps_list(eps: float | Sequence[float]) -> list[float]:
    if isinstance(eps, (numbers.Real, Tensor)) and not isinstance(eps, bool):
        vals = [check_eps(eps)]
    elif isinstance(eps, Sequence) and not isinstance(eps, str):
        vals = [check_eps(e, f"eps[{i}]") for i, e in enumerate(eps)]
    else:
        raise TypeError(f"eps must be a number or a sequence of numbers, got {type(eps).__name__}")
    if not vals:
        raise ValueError("eps is empty")
    names = [f"{e * 255:g}" for e in vals]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"eps values repeat (as ε·255: {dup})")
    return vals


def _accuracy(logits: Tensor, targets: Tensor) -> float:
    return float((logits.argmax(dim=1) == targets).double().mean())


def _jsonable(x: Any) -> Any:
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, Tensor) and x.numel() == 1:
        return float(x)
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    return repr(x)


def _first_task_checks(
    model: nn.Module, fast: Params, task: Task, loss_fn: Callable[[Tensor, Tensor], Tensor]
) -> list[str]:
    """AutoAttack-style checks on one task: probabilities out, determinism, zero gradients."""
    out: list[str] = []
    x, y = task.query_x, task.query_y
    with torch.no_grad():
        a = call_model(model, x, fast)
        b = call_model(model, x, fast)
    if a.dim() == 2 and a.shape[1] > 1:
        rows = a.double().sum(dim=1)
        if bool(a.min() >= 0) and bool(a.max() <= 1) and bool(torch.allclose(rows, torch.ones_like(rows), atol=1e-5)):
            out.append(
                "the model's outputs lie in [0, 1] and sum to 1: it seems to return probabilities, "
                "not logits; attacks on the cross-entropy of probabilities are weak (AutoAttack "
                "check_range_output). Remove the final softmax."
            )
    if not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
        out.append(
            "the model is not deterministic: two calls on the same input in the evaluation mode "
            f"differ by up to {float((a - b).abs().max()):.3g} (dropout or another random "
            "layer?). RA of a randomised model needs EOT attacks; these numbers may overstate it."
        )
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(call_model(model, xg, fast), y)
        (g,) = torch.autograd.grad(loss, xg, allow_unused=True)
    if g is None:
        zero = x.shape[0]
    else:
        zero = int((g.detach().flatten(1).abs().sum(dim=1) == 0).sum())
    if zero:
        out.append(
            f"{zero} of {x.shape[0]} query images have a zero input gradient at the fine-tuned "
            "weights (first task): gradient-based attacks cannot move them; RA may be "
            "overestimated by gradient masking (AutoAttack check_zero_gradients)."
        )
    return out


def _metric_checks(
    metrics: Mapping[str, Metric],
    attacks: list[tuple[str, AttackLike]],
    eps_list: list[float],
) -> list[str]:
    out: list[str] = []
    sa = metrics["sa"]

    def rises(lo: Metric, hi: Metric) -> tuple[bool, float]:
        """Whether ``hi`` (stronger setting) is above ``lo`` beyond the paired 95% CI."""
        diff = Metric.from_values(h - v for h, v in zip(hi.values, lo.values))
        noise = 0.0 if diff.n < 2 else diff.ci95
        return diff.mean > noise + 1e-12, diff.mean

    for label, _ in attacks:
        for e in eps_list:
            m = metrics[metric_name(label, e)]
            if e > 0 and m.mean > sa.mean + 1e-12:
                out.append(
                    f"RA {metric_name(label, e)} = {m.mean:.4f} is above SA = {sa.mean:.4f}: an "
                    "attack should never help; check the attack, ε units and the model mode."
                )
        ordered = sorted(eps_list)
        for e0, e1 in zip(ordered, ordered[1:]):
            up, d = rises(metrics[metric_name(label, e0)], metrics[metric_name(label, e1)])
            if up:
                out.append(
                    f"RA of {label!r} rises with ε: {metric_name(label, e1)} is {d:.4f} above "
                    f"{metric_name(label, e0)} (beyond the 95% CI of the paired difference); the "
                    "attack is not converging (too few steps, too small a step, gradient masking?)."
                )
    named = [(lab, spec.lower()) for lab, spec in attacks if isinstance(spec, str)]
    for lab_w, weak in named:
        for lab_s, strong in named:
            if _STRENGTH[strong] <= _STRENGTH[weak]:
                continue
            for e in eps_list:
                if e == 0:
                    continue
                up, d = rises(metrics[metric_name(lab_w, e)], metrics[metric_name(lab_s, e)])
                if up:
                    out.append(
                        f"the stronger attack {lab_s!r} gives a higher RA than {lab_w!r} at "
                        f"ε = {e * 255:g}/255 (by {d:.4f}, beyond the 95% CI): a sign of "
                        "gradient masking or a misconfigured attack."
                    )
    return out


def evaluate(
    model: nn.Module,
    tasks: Iterable[Any] | Mapping[str, Any],
    *,
    eps: float | Sequence[float],
    steps: int = 10,
    step_size: StepSize = 0.01,
    first_order: bool = True,
    finetune: str = "standard",
    finetune_attack: AttackLike = "pgd",
    finetune_eps: float | None = None,
    finetune_gamma: float = 1.0,
    anil: ANILHead | str | None = None,
    attacks: AttackLike | Sequence[AttackLike] | Mapping[str, AttackLike] = ("pgd",),
    attack_steps: int = 10,
    attack_step_size: float | None = None,
    loss_fn: LossFn | None = None,
    train_mode: bool | None = None,
    max_tasks: int | None = None,
    progress: bool = True,
    checks: bool = True,
    seed: int | None = None,
    workers: int = 1,
    compile: bool | str = "auto",
    channels_last: bool | str = "auto",
) -> EvalResult:
    r"""Meta-test a meta-model: fine-tune on each task's support set, score SA and RA on its query.

    For each task: fine-tune (S-FT, A-FT or ANIL) on the support set to get fast weights
    `w'`; SA = accuracy of `w'` on the clean query; for every attack and every
    ε, RA = accuracy of `w'` on the query attacked against `w'`
    (`robust_meta.perturb` with ``n_classes`` = the task's ways). The meta-model's
    parameters, buffers and mode are left as they were.

    **Mode policy.** ``train_mode`` (default: the model's current mode) is used for the
    fine-tuning, the attack and the measurement alike. In train mode batch norm normalises
    each batch with its own statistics (the MAML protocol): the clean and the attacked
    query batches are each normalised with their own statistics, as the attack saw them.
    Running statistics are never changed.

    Args:
        model: the meta-model (plain ``nn.Module`` or torchmeta ``MetaModule``), logits out.
        tasks: an iterable of `robust_meta.Task`, ``(sx, sy, qx, qy)`` tuples or
            torchmeta batch dicts (see `robust_meta.iter_tasks`); moved to the model's
            device and floating dtype.
        eps: ℓ∞ radius in [0, 1] pixel units, or a sequence of radii (an ε sweep: the
            RA-vs-ε curve in one call; ε = 0 gives SA).
        steps: fine-tuning steps K (paper: 10 at meta-test).
        step_size: fine-tuning step α (float or per-parameter dict).
        first_order: passed to the inner loop; fine-tuning runs without a meta-graph, so the
            values do not depend on it.
        finetune: ``"standard"`` (S-FT) or ``"adversarial"`` (A-FT).
        finetune_attack, finetune_eps, finetune_gamma: the A-FT attack, its ε (default: the
            first nonzero evaluation ε) and the weight γ of the adversarial loss
            (``math.inf``: adversarial loss only, AQ-style). See `finetune`.
        anil: an `robust_meta.ANILHead` of ``model`` (or the head's module name) to
            fine-tune the classifier head only.
        attacks: attack(s) to evaluate: names from `robust_meta.ATTACKS`,
            torchattacks classes or instances, a sequence of them, or a dict
            ``label -> attack``. ``"pgd"`` is PGD-``attack_steps`` with random start.
            A class is built as ``cls(model, eps=ε)``; an instance keeps its own settings
            except ``eps``, which is set to each ε of the sweep on a private copy (every
            sub-attack of a ``MultiAttack``/``AutoAttack`` too; the object passed in is never
            modified). torchattacks' APGD/Square/MultiAttack/AutoAttack need
            ``train_mode=False`` on a model with batch norm.
        attack_steps: iterations of ``"pgd"`` and ``"apgd"`` (default 10: PGD-10).
        attack_step_size: PGD step (default ``2.5·ε/attack_steps``).
        loss_fn: fine-tuning loss ``loss_fn(logits, targets)``; default cross-entropy.
        train_mode: mode for fine-tune, attack and measurement; ``None``: ``model.training``.
        max_tasks: stop after this many tasks (needed for an endless task stream).
        progress: show a tqdm progress bar (if tqdm is installed).
        checks: run the sanity checks (see below).
        seed: seed of the random starts of the attacks: task ``i`` is evaluated on a private
            random stream seeded with ``seed + i``, so its values do not depend on the other
            tasks, on ``workers`` or on `robust_meta.distributed.evaluate_distributed`. ``None``
            takes the base seed from the current state of torch's global generator (so a
            ``torch.manual_seed`` before the call makes it reproducible, and two calls from
            the same state give the same values). The global RNG state is left as it was.
        workers: evaluate the tasks in this many processes on this machine (CPU; each gets
            ``threads // workers`` torch threads). The per-task values are the same as with
            ``workers=1``. The model, ``loss_fn`` and attacks must be picklable (no lambdas).
        compile: ``True``: run the fine-tuning steps, attack steps and measurements through
            ``torch.compile`` (see `robust_meta.fast_paths`); ``"auto"``: the same on CUDA
            when triton is available and at least `AUTO_COMPILE_MIN_TASKS` tasks per process
            are known to be coming (never on a CPU, where it was measured slower than the
            eager channels_last path); ``False``: eager. Values agree with eager to
            floating-point tolerance.
        channels_last: ``"auto"``: feed convolutional models channels_last images where that
            layout is measured faster (`robust_meta.channels_last_wins`); ``True``/``False``:
            always/never.

    Returns:
        `EvalResult` with ``metrics["sa"]``, ``metrics["ra"]`` and
        ``metrics["ra[<attack>@<ε·255>/255]"]``, each a `Metric` with ``mean``,
        ``ci95 = 1.96·std/√n`` (``std`` with ``ddof=1``), ``std``, ``n``, ``values``.

    Raises:
        ValueError: no tasks, bad ε, unknown attack or fine-tuning mode, A-FT with only ε = 0.
        TypeError: wrong argument types.

    Sanity checks (``checks=True``; appended to ``result.warnings`` and emitted as
    `EvalWarning`): RA above SA; RA that rises with ε or with a stronger named attack
    (fgsm < pgd < apgd < autoattack) beyond the 95% CI of the paired per-task difference;
    on the first task: zero input gradients (gradient masking), outputs that look like
    probabilities rather than logits, a model that is not deterministic between two calls.

    Shape:
        task images ``(B, C, H, W)`` in [0, 1]; labels ``(B,)`` in ``0..ways-1``.

    Example:
        >>> res = evaluate(model, sampler.sample(600), eps=[0, 2/255, 4/255, 8/255],
        ...                steps=10, step_size=0.01, attacks=("pgd", "fgsm"))
        >>> print(res.table())
        >>> res.metrics["ra[pgd@2/255]"].mean
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if finetune not in FINETUNE:
        raise ValueError(f"unknown finetune {finetune!r}; choose from {', '.join(FINETUNE)}")
    steps = check_steps(steps)
    attack_steps = check_steps(attack_steps, "attack_steps")
    if attack_steps < 1:
        raise ValueError(f"attack_steps must be >= 1, got {attack_steps}")
    if max_tasks is not None:
        max_tasks = check_steps(max_tasks, "max_tasks")
        if max_tasks < 1:
            raise ValueError(f"max_tasks must be >= 1, got {max_tasks}")
    eps_list = _eps_list(eps)
    table = _attack_table(attacks)
    if isinstance(anil, str):
        anil = ANILHead(model, head=anil)
    elif anil is not None and not isinstance(anil, ANILHead):
        raise TypeError(f"anil must be an ANILHead, a head module name or None, got {type(anil).__name__}")
    if anil is not None and anil.model is not model:
        raise ValueError("anil must be an ANILHead built on the model being evaluated")
    if finetune == "adversarial":
        if finetune_eps is None:
            nonzero = [e for e in eps_list if e > 0]
            if not nonzero:
                raise ValueError("adversarial fine-tuning needs finetune_eps (every evaluation ε is 0)")
            finetune_eps = nonzero[0]
        finetune_eps = check_eps(finetune_eps, "finetune_eps")
    first_param = next(iter(named_params(model).values()))
    device, dtype = first_param.device, first_param.dtype
    prev_mode = model.training
    mode = prev_mode if train_mode is None else bool(train_mode)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    if workers > 1 and device.type != "cpu":
        raise ValueError(
            f"workers > 1 runs CPU processes, but the model is on {device}; on a GPU use one "
            "process per device (robust_meta.distributed.evaluate_distributed)"
        )
    known = len(tasks) if isinstance(tasks, Sequence) else None
    if max_tasks is not None:
        known = max_tasks if known is None else min(known, max_tasks)
    per_process = None if known is None else -(-known // workers)
    _fast._check_channels_last(channels_last)
    job = _EvalJob(
        steps=steps, step_size=step_size, first_order=first_order, finetune=finetune,
        finetune_attack=finetune_attack, finetune_eps=finetune_eps, finetune_gamma=finetune_gamma,
        attack_steps=attack_steps, attack_step_size=attack_step_size, anil=anil, loss_fn=loss_fn,
        table=table, eps_list=eps_list, mode=mode, checks=checks,
        compile=resolve_compile(compile, device, work=per_process, min_work=AUTO_COMPILE_MIN_TASKS),
        channels_last=channels_last, device=device, dtype=dtype,
    )
    if seed is None:
        # Drawn from the caller's generator, which is then put back: evaluate never moves it.
        with torch.random.fork_rng(devices=[]):
            base_seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    else:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        base_seed = int(seed)

    values: dict[str, list[float]] = OrderedDict(sa=[])
    for label, _ in table:
        for e in eps_list:
            values[metric_name(label, e)] = []
    messages: list[str] = []

    source: Iterable[Task] = iter_tasks(tasks)
    if max_tasks is not None:
        source = itertools.islice(source, max_tasks)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm is a core dependency
            tqdm = None
        if tqdm is not None:
            bar = tqdm(total=known, desc="evaluate", unit="task", leave=False)

    t0 = time.perf_counter()
    n = 0
    try:
        if workers == 1:
            results = _serial(model, job, source, base_seed)
        else:
            results = _parallel(model, job, source, base_seed, workers)
        with contextlib.closing(results):  # an error here shuts the worker pool down at once
            for row, msgs in results:
                for k, v in row.items():
                    values[k].append(v)
                messages += msgs
                n += 1
                if bar is not None:
                    bar.update(1)
    finally:
        model.train(prev_mode)
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    if n == 0:
        raise ValueError("no tasks to evaluate: the task source is empty")

    metrics: dict[str, Metric] = OrderedDict()
    metrics["sa"] = Metric.from_values(values["sa"])
    nonzero = [e for e in eps_list if e > 0]
    if nonzero:
        metrics["ra"] = Metric.from_values(values[metric_name(table[0][0], nonzero[0])])
    for k, v in values.items():
        if k != "sa":
            metrics[k] = Metric.from_values(v)
    if checks:
        messages += _metric_checks(metrics, table, eps_list)

    settings = {
        "n_tasks": n,
        "attacks": [label for label, _ in table],
        "attack_specs": {label: _jsonable(spec) for label, spec in table},
        "eps": eps_list,
        "attack_steps": attack_steps,
        "attack_step_size": attack_step_size,
        "finetune": finetune,
        "finetune_steps": steps,
        "finetune_step_size": _jsonable(step_size),
        "first_order": first_order,
        "finetune_attack": _jsonable(finetune_attack) if finetune == "adversarial" else None,
        "finetune_eps": finetune_eps if finetune == "adversarial" else None,
        "finetune_gamma": finetune_gamma if finetune == "adversarial" else None,
        "anil": None if anil is None else repr(anil),
        "train_mode": mode,
        "seed": seed,
        "base_seed": base_seed,
        "workers": workers,
        "compile": job.compile,
        "channels_last": channels_last,
        "device": str(device),
        "dtype": str(dtype),
        "elapsed_s": elapsed,
        "tasks_per_s": n / elapsed if elapsed > 0 else float("inf"),
    }
    for msg in messages:
        warnings.warn(msg, EvalWarning, stacklevel=2)
    return EvalResult(metrics, settings, messages)


def _prepare(raw: Task, device: torch.device, dtype: torch.dtype) -> Task:
    task = raw.to(device)

    def cast(t: Tensor | None) -> Tensor | None:
        if t is not None and t.is_floating_point() and t.dtype != dtype:
            return t.to(dtype)
        return t

    return Task(cast(task.support_x), task.support_y, cast(task.query_x), task.query_y,
                cast(task.unlabeled), task.classes)
