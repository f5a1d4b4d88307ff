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
attack saw it. The model's running statistics, parameters and mode (of every submodule: a
batch norm frozen in eval mode inside a train-mode model stays frozen) are left untouched.

**Protocol version.** `EVAL_PROTOCOL` numbers the way values are computed; it is recorded in
``EvalResult.settings["protocol"]``, and ``robust-meta eval --resume`` / ``reproduce`` redo a
result stored under another one. 1: robust-meta 0.1 (one random stream for all tasks);
2: per-task streams ``seed + i``; 3: the exact ε-ball projection (`robust_meta.project_linf`)
and step sizes of `PGDAttack` instances that follow ε.

Sanity checks modelled on AutoAttack's ``autoattack/checks.py`` append to
`EvalResult.warnings` and are emitted as `EvalWarning`. For a robust accuracy you report, also
run `robust_meta.audit`: a far stronger attack must not take it away.
"""

from __future__ import annotations

import contextlib
import itertools
import numbers
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import fast as _fast
from ._checks import check_eps, check_steps
from ._eval_tasks import FINETUNE, _attack_steps, _EvalJob, _parallel, _serial, finetune
from ._metrics import EvalResult, EvalWarning, Metric, confidence_interval, metric_name
from .adapt import LossFn, StepSize
from .anil import ANILHead
from .attacks import AttackLike, PGDAttack, _check_spec, attack_reach, is_torchattacks
from .data import Task, iter_tasks
from .fast import resolve_compile
from .params import module_modes, named_params

__all__ = [
    "AUTO_COMPILE_MIN_TASKS",
    "EVAL_PROTOCOL",
    "EvalResult",
    "EvalWarning",
    "Metric",
    "confidence_interval",
    "evaluate",
    "finetune",
    "metric_name",
]

#: ``evaluate(compile="auto")`` compiles (on CUDA) when at least this many tasks per process
#: are known to be coming, so that the compilation (tens of seconds) pays for itself.
AUTO_COMPILE_MIN_TASKS = 100

#: The version of the way `evaluate` computes its values (see the module docstring); results
#: stored under another version are recomputed by ``eval --resume`` and ``reproduce``.
EVAL_PROTOCOL = 3

# Attacks whose strength is ordered (same ε): a stronger one must not give a higher RA.
_STRENGTH = {"none": 0, "fgsm": 1, "pgd": 2, "apgd": 3, "autoattack": 4}

_finetune = finetune  # ``evaluate`` has a parameter named ``finetune``


# ------------------------------------------------------------------------- attacks and ε
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


def _jsonable(x: Any) -> Any:
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, Tensor) and x.numel() == 1:
        return float(x)
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    return repr(x)


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
    learner: Any = None,
    attacks: AttackLike | Sequence[AttackLike] | Mapping[str, AttackLike] = ("pgd",),
    attack_steps: int = 10,
    attack_step_size: float | None = None,
    loss_fn: LossFn | None = None,
    train_mode: bool | None = None,
    max_tasks: int | None = None,
    progress: bool = True,
    checks: bool = True,
    threats: Sequence[str] = ("query",),
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
        learner: a metric learner of ``model`` — `robust_meta.ProtoNetHead`,
            `robust_meta.R2D2Head` or its name ``"protonet"``/``"r2d2"`` — whose head weights
            come from the support set in closed form instead of fine-tuning steps. Their
            papers evaluate with running batch-norm statistics: pass ``train_mode=False``.
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
        train_mode: mode for fine-tune, attack and measurement (``model.train(train_mode)``
            for the call); ``None``: the model's modes as they are, submodule by submodule.
        max_tasks: stop after this many tasks (needed for an endless task stream).
        progress: show a tqdm progress bar (if tqdm is installed).
        checks: run the sanity checks (see below).
        threats: what the adversary perturbs: ``"query"`` (the default; ``ra[...]``),
            ``"support"`` (the support images, by PGD-``attack_steps`` on the clean query's
            loss *after* adaptation, the gradient taken through the adaptation — closed form
            for metric learners, the unrolled steps for MAML: ``ra_support[pgd@ε]``, accuracy
            on the clean query) and ``"both"`` (the poisoned support, then each query attack
            against the weights it gave: ``ra_both[<attack>@ε]``). See
            `robust_meta.support_attacks`.
        seed: seed of the random starts of the attacks: task ``i`` is evaluated on a private
            random stream seeded with ``seed + i``, so its values do not depend on the other
            tasks, on ``workers`` or on `robust_meta.distributed.evaluate_distributed`. ``None``
            takes the base seed from the current state of torch's global generator (so a
            ``torch.manual_seed`` before the call makes it reproducible, and two calls from
            the same state give the same values). The global RNG state is left as it was.
        workers: evaluate the tasks in this many processes on this machine (CPU; each gets
            ``threads // workers`` torch threads). The per-task values are the same as with
            ``workers=1``. The model, ``loss_fn`` and attacks must be picklable (no lambdas) and
            importable by a new process: a class defined in a notebook or ``python -c`` is
            refused with a ValueError (move it into a ``.py`` module, or use ``workers=1``).
        compile: ``True``: run the fine-tuning steps, attack steps and measurements through
            ``torch.compile`` (see `robust_meta.fast_paths`); ``"auto"``: the same on CUDA
            when triton is available and at least `AUTO_COMPILE_MIN_TASKS` tasks per process
            are known to be coming (never on a CPU, where it was measured slower than the
            eager channels_last path); ``False``: eager. Values agree with eager to
            floating-point tolerance.
        channels_last: ``"auto"``: feed convolutional models channels_last images where that
            layout is measured faster (`robust_meta.channels_last_wins`) and the model gives
            the same output on it (checked once per model and input shape; a model that fails
            on it, e.g. with ``x.view(x.size(0), -1)``, runs on contiguous inputs with a
            `robust_meta.fast.LayoutWarning`); ``True``/``False``: always (same check)/never.

    Returns:
        `EvalResult` with ``metrics["sa"]``, ``metrics["ra"]`` and
        ``metrics["ra[<attack>@<ε·255>/255]"]``, each a `Metric` with ``mean``,
        ``ci95 = 1.96·std/√n`` (``std`` with ``ddof=1``), ``std``, ``n``, ``values``.

    Raises:
        ValueError: no tasks, bad ε, unknown attack or fine-tuning mode, A-FT with only ε = 0.
        TypeError: wrong argument types.

    Sanity checks (``checks=True``; appended to ``result.warnings`` and emitted as
    `EvalWarning`): before any task, an attack that cannot travel ε from its start point
    (steps × step size < ε, `robust_meta.attacks.attack_reach`: a `PGDAttack` with an explicit
    small ``alpha``, a torchattacks PGD built for a smaller ε, the A-FT attack too; emitted at
    once); after the tasks, RA above SA; RA that rises with ε or with a stronger named attack
    (fgsm < pgd < apgd < autoattack) beyond the 95% CI of the paired per-task difference;
    on the first task: zero input gradients (gradient masking), outputs that look like
    probabilities rather than logits, a model that is not deterministic between two calls.

    **Host process.** `evaluate` changes nothing process-wide: the global RNG states (CPU and
    every CUDA device) are as before, and malloc is left alone (see
    `robust_meta.fast.tune_malloc` for the opt-in that makes CPU evaluation 1.6–2.2× faster).

    Shape:
        task images ``(B, C, H, W)`` in [0, 1]; labels ``(B,)`` in ``0..ways-1``.

    Example:
        >>> res = evaluate(model, sampler.sample(600), eps=[0, 2/255, 4/255, 8/255],
        ...                steps=10, step_size=0.01, attacks=("pgd", "fgsm"))
        >>> print(res.table())
        >>> res.metrics["ra[pgd@2/255]"].mean
    """
    anil = _anil_head(model, anil)
    learner = _learner(model, learner, anil, finetune)
    eps_list = _eps_list(eps)
    table = _attack_table(attacks)
    job = _build_job(
        model, eps_list, table, steps=steps, step_size=step_size, first_order=first_order,
        finetune=finetune, finetune_attack=finetune_attack, finetune_eps=finetune_eps,
        finetune_gamma=finetune_gamma, anil=anil, learner=learner, attack_steps=attack_steps,
        attack_step_size=attack_step_size, loss_fn=loss_fn, train_mode=train_mode, checks=checks,
        compile=compile, channels_last=channels_last, workers=workers,
        known=_known_tasks(tasks, max_tasks), threats=threats,
    )
    base_seed = _base_seed(seed)
    early = _reach_checks(job) if checks else []
    for msg in early:  # before hours of work: say it now
        warnings.warn(msg, EvalWarning, stacklevel=2)

    values, messages, n, elapsed = _run_tasks(model, job, tasks, base_seed, max_tasks=max_tasks,
                                              workers=workers, progress=progress)
    metrics = _aggregate(values, job)
    late = messages + (_metric_checks(metrics, table, eps_list) if checks else [])
    settings = _settings(model, job, seed=seed, base_seed=base_seed, workers=workers,
                         channels_last=channels_last, n=n, elapsed=elapsed)
    for msg in late:
        warnings.warn(msg, EvalWarning, stacklevel=2)
    return EvalResult(metrics, settings, early + late)


# ------------------------------------------------------------------------- evaluate's steps
def _anil_head(model: nn.Module, anil: ANILHead | str | None) -> ANILHead | None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(anil, str):
        anil = ANILHead(model, head=anil)
    elif anil is not None and not isinstance(anil, ANILHead):
        raise TypeError(f"anil must be an ANILHead, a head module name or None, got {type(anil).__name__}")
    if anil is not None and anil.model is not model:
        raise ValueError("anil must be an ANILHead built on the model being evaluated")
    return anil


def _learner(model: nn.Module, learner: Any, anil: ANILHead | None, finetune: str) -> Any:
    """A metric head (or ``None``), built from its name if need be, checked against the options."""
    if learner is None:
        return None
    if isinstance(learner, str):
        from .metric import build_learner

        learner = build_learner(learner, model)
        if learner is None:  # "maml": gradient steps, the default
            return None
    if not callable(getattr(learner, "adapt", None)):
        raise TypeError(f"learner must be a metric head with .adapt (ProtoNetHead, R2D2Head) or its name, "
                        f"got {type(learner).__name__}")
    if getattr(learner, "model", model) is not model:
        raise ValueError("learner must be built on the model being evaluated")
    if anil is not None:
        raise ValueError("pass anil or learner, not both: each decides how the support set becomes weights")
    if finetune != "standard":
        raise ValueError(f"{learner!r} has no fine-tuning steps: finetune='adversarial' needs a gradient learner")
    return learner


def _known_tasks(tasks: Any, max_tasks: int | None) -> int | None:
    """How many tasks are known to be coming (``None``: a stream of unknown length)."""
    if max_tasks is not None:
        max_tasks = check_steps(max_tasks, "max_tasks")
        if max_tasks < 1:
            raise ValueError(f"max_tasks must be >= 1, got {max_tasks}")
    known = len(tasks) if isinstance(tasks, Sequence) else None
    if max_tasks is not None:
        known = max_tasks if known is None else min(known, max_tasks)
    return known


def _build_job(
    model: nn.Module, eps_list: list[float], table: list[tuple[str, AttackLike]], *, steps: int,
    step_size: StepSize, first_order: bool, finetune: str, finetune_attack: AttackLike,
    finetune_eps: float | None, finetune_gamma: float, anil: ANILHead | None, learner: Any, attack_steps: int,
    attack_step_size: float | None, loss_fn: LossFn | None, train_mode: bool | None, checks: bool,
    compile: bool | str, channels_last: bool | str, workers: int, known: int | None,
    threats: Sequence[str] = ("query",),
) -> _EvalJob:
    """Validate the options and resolve them into the picklable per-task job."""
    if finetune not in FINETUNE:
        raise ValueError(f"unknown finetune {finetune!r}; choose from {', '.join(FINETUNE)}")
    steps = check_steps(steps)
    attack_steps = check_steps(attack_steps, "attack_steps")
    if attack_steps < 1:
        raise ValueError(f"attack_steps must be >= 1, got {attack_steps}")
    if finetune == "adversarial":
        if finetune_eps is None:
            nonzero = [e for e in eps_list if e > 0]
            if not nonzero:
                raise ValueError("adversarial fine-tuning needs finetune_eps (every evaluation ε is 0)")
            finetune_eps = nonzero[0]
        finetune_eps = check_eps(finetune_eps, "finetune_eps")
    first_param = next(iter(named_params(model).values()))
    device, dtype = first_param.device, first_param.dtype
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    if workers > 1 and device.type != "cpu":
        raise ValueError(
            f"workers > 1 runs CPU processes, but the model is on {device}; on a GPU use one "
            "process per device (robust_meta.distributed.evaluate_distributed)"
        )
    from .support_attacks import THREATS

    if isinstance(threats, str):
        threats = (threats,)
    threats = tuple(str(t).lower() for t in threats)
    bad = [t for t in threats if t not in THREATS]
    if bad or not threats:
        raise ValueError(f"unknown threats {bad or threats!r}; choose from {', '.join(THREATS)}")
    per_process = None if known is None else -(-known // workers)
    _fast._check_channels_last(channels_last)
    return _EvalJob(
        steps=steps, step_size=step_size, first_order=first_order, finetune=finetune,
        finetune_attack=finetune_attack, finetune_eps=finetune_eps, finetune_gamma=finetune_gamma,
        attack_steps=attack_steps, attack_step_size=attack_step_size, anil=anil, loss_fn=loss_fn,
        learner=learner, table=table, eps_list=eps_list, mode=None if train_mode is None else bool(train_mode),
        checks=checks, threats=threats,
        compile=resolve_compile(compile, device, work=per_process, min_work=AUTO_COMPILE_MIN_TASKS),
        channels_last=channels_last, device=device, dtype=dtype,
    )


def _base_seed(seed: int | None) -> int:
    """Task ``i`` runs on stream ``base + i``; ``None`` draws the base without moving the caller's RNG."""
    if seed is None:
        with torch.random.fork_rng(devices=[]):
            return int(torch.randint(0, 2**62, (), dtype=torch.int64))
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    return int(seed)


def _reach_checks(job: _EvalJob) -> list[str]:
    """Attacks that cannot travel ε from their start (steps × step size < ε): RA overstated."""
    out: list[str] = []
    pairs = [(label, spec, *_attack_steps(spec, job.attack_steps, job.attack_step_size), e)
             for label, spec in job.table for e in job.eps_list if e > 0]
    if job.finetune == "adversarial" and job.finetune_eps:
        pairs.append(("the A-FT attack (finetune_attack)", job.finetune_attack,
                      *_attack_steps(job.finetune_attack, job.attack_steps, job.attack_step_size),
                      job.finetune_eps))
    for label, spec, a_steps, a_lr, e in pairs:
        reach = attack_reach(spec, e, steps=a_steps, step_size=a_lr)
        if reach is not None and reach < e * (1 - 1e-9):
            out.append(
                f"attack {label!r} cannot reach the edge of the ε-ball at ε = {e * 255:g}/255: "
                f"steps × step size = {reach * 255:.4g}/255 < ε, so from its start it never gets "
                "to where the strongest perturbations are and RA is overstated. Give it more "
                "steps or a step size that follows ε (PGDAttack(alpha=None): 2.5·ε/steps)."
            )
    return out


def _run_tasks(model: nn.Module, job: _EvalJob, tasks: Any, base_seed: int, *, max_tasks: int | None,
               workers: int, progress: bool) -> tuple[dict[str, list[float]], list[str], int, float]:
    """Per-task values of every metric, the first-task messages, the task count and the time."""
    from .support_attacks import support_metric_name

    values: dict[str, list[float]] = OrderedDict(sa=[])
    for label, _ in job.table:
        for e in job.eps_list:
            values[metric_name(label, e)] = []
    for e in (e for e in job.eps_list if e > 0):
        if "support" in job.threats:
            values[support_metric_name("support", "pgd", e)] = []
        if "both" in job.threats:
            for label, _ in job.table:
                values[support_metric_name("both", label, e)] = []
    messages: list[str] = []
    source: Iterable[Task] = iter_tasks(tasks)
    if max_tasks is not None:
        source = itertools.islice(source, max_tasks)
    bar = _progress_bar(_known_tasks(tasks, max_tasks)) if progress else None
    t0 = time.perf_counter()
    n = 0
    try:
        results = (_serial(model, job, source, base_seed) if workers == 1
                   else _parallel(model, job, source, base_seed, workers))
        with contextlib.closing(results):  # an error here shuts the worker pool down at once
            for row, msgs in results:
                for k, v in row.items():
                    values[k].append(v)
                messages += msgs
                n += 1
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if n == 0:
        raise ValueError("no tasks to evaluate: the task source is empty")
    return values, messages, n, time.perf_counter() - t0


def _progress_bar(total: int | None):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a core dependency
        return None
    return tqdm(total=total, desc="evaluate", unit="task", leave=False)


def _aggregate(values: Mapping[str, list[float]], job: _EvalJob) -> dict[str, Metric]:
    """``sa``, ``ra`` (first attack, first nonzero ε) and every ``ra[...]``, from per-task values."""
    metrics: dict[str, Metric] = OrderedDict()
    metrics["sa"] = Metric.from_values(values["sa"])
    nonzero = [e for e in job.eps_list if e > 0]
    if nonzero:
        metrics["ra"] = Metric.from_values(values[metric_name(job.table[0][0], nonzero[0])])
    for k, v in values.items():
        if k != "sa":
            metrics[k] = Metric.from_values(v)
    return metrics


def _settings(model: nn.Module, job: _EvalJob, *, seed: int | None, base_seed: int, workers: int,
              channels_last: bool | str, n: int, elapsed: float) -> dict[str, Any]:
    """The JSON-serialisable record of how the numbers were computed."""
    modes = module_modes(model)
    mode = model.training if job.mode is None else job.mode
    settings = {
        "protocol": EVAL_PROTOCOL,
        "n_tasks": n,
        "attacks": [label for label, _ in job.table],
        "attack_specs": {label: _jsonable(spec) for label, spec in job.table},
        "eps": job.eps_list,
        "attack_steps": job.attack_steps,
        "attack_step_size": job.attack_step_size,
        "finetune": job.finetune,
        "finetune_steps": job.steps,
        "finetune_step_size": _jsonable(job.step_size),
        "first_order": job.first_order,
        "finetune_attack": _jsonable(job.finetune_attack) if job.finetune == "adversarial" else None,
        "finetune_eps": job.finetune_eps if job.finetune == "adversarial" else None,
        "finetune_gamma": job.finetune_gamma if job.finetune == "adversarial" else None,
        "anil": None if job.anil is None else repr(job.anil),
        "learner": "maml" if job.learner is None else repr(job.learner),
        "train_mode": mode,
        "threats": list(job.threats),
        "seed": seed,
        "base_seed": base_seed,
        "workers": workers,
        "compile": job.compile,
        "channels_last": channels_last,
        "device": str(job.device),
        "device_name": _device_name(job.device),
        "dtype": str(job.dtype),
        "elapsed_s": elapsed,
        "tasks_per_s": n / elapsed if elapsed > 0 else float("inf"),
    }
    if job.mode is None:
        other = sorted(k for k, v in modes.items() if v != mode)
        if other:  # the modules that ran in the other mode
            settings["modules_in_" + ("eval" if mode else "train") + "_mode"] = other
    return settings


def _device_name(device: torch.device) -> str:
    """``"cpu"``, or the GPU's name (CUDA random streams and kernels differ between GPUs)."""
    if device.type == "cuda":
        try:
            return torch.cuda.get_device_name(device)
        except (RuntimeError, AssertionError):  # pragma: no cover - no driver
            return "cuda"
    return device.type
