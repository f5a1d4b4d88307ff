"""The ``robust-meta`` command: ``demo``, ``train``, ``eval``, ``plot``, ``presets``, ``reproduce``.

Run ``robust-meta --help`` (or ``python -m robust_meta --help``). Every subcommand exits with
code 0 on success, 2 with a one-line message (no traceback) for a user error — a missing
data folder, a bad or mismatched checkpoint, an unknown method or attack, a bad option — and
130 when interrupted (``train`` first saves ``last.pt``; continue with ``--resume``). Set
``ROBUST_META_DEBUG=1`` to get the full traceback instead.

Example:
    .. code-block:: bash

        robust-meta demo --out runs/demo
        robust-meta train --method rmaml-out --attack fgsm --eps 8/255 --dataset cifar-fs \\
            --data-folder ~/data --out runs/cifar --config cfg.toml
        robust-meta eval runs/cifar/best.pt --tasks 2400 --eps 0,2/255,4/255,8/255 --out eval.json
        robust-meta plot runs/demo/results.json eval.json --out ra_vs_eps.png
        robust-meta reproduce omniglot --data-folder ~/data/omniglot --out runs/omniglot
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import signal
import sys
import time
import types
import typing
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from ._checkpoint_eval import eval_checkpoint as _eval_checkpoint
from ._checkpoint_eval import eval_setup as _eval_setup
from ._errors import UsageError
from ._signals import Interrupted
from .demo import DEFAULT_DEMO_METHODS, DEMO_METHODS, demo_config, run_demo
from .demo import demo_table as _demo_table
from .presets import DATASET_PRESETS, METHOD_PRESETS

# Kept importable here (the demo and the checkpoint evaluation have their own modules).
_REEXPORTED = (DEFAULT_DEMO_METHODS, _eval_setup)

__all__ = ["DEMO_METHODS", "demo_config", "main", "parse_number", "run_demo"]

PROG = "robust-meta"


# --------------------------------------------------------------------------- parsing helpers


def parse_number(text: str | float | int) -> float:
    """A float from ``"0.1"``, ``"8/255"``, ``"inf"`` or a number.

    Raises:
        ValueError: not a number or fraction.

    Example:
        >>> parse_number("8/255") == 8 / 255
        True
    """
    if isinstance(text, bool):
        raise ValueError(f"expected a number, got {text!r}")
    if isinstance(text, (int, float)):
        return float(text)
    s = str(text).strip()
    if s.lower() in ("inf", "+inf", "infinity"):
        return math.inf
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            return float(Fraction(num.strip())) / float(Fraction(den.strip()))
        return float(s)
    except (ValueError, ZeroDivisionError) as err:
        raise ValueError(f"expected a number or a fraction like 8/255, got {text!r}") from err


def _number_arg(text: str) -> float:
    try:
        return parse_number(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _eps_list_arg(text: str) -> list[float]:
    return [_number_arg(t) for t in text.split(",") if t.strip()]


def _field_kind(tp: Any) -> type:
    """int, float, bool or str for a TrainConfig annotation (``X | None`` unwrapped)."""
    if isinstance(tp, str):
        tp = eval(tp, {"__builtins__": {}}, {"int": int, "float": float, "bool": bool, "str": str, "None": None})  # noqa: S307
    args = typing.get_args(tp) if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union else ()
    if args:
        tp = next(a for a in args if a is not type(None))
    return tp


def _coerce_config(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Coerce values from a config file to the option types (``"8/255"`` for floats, ...)."""
    from .train import TrainConfig

    kinds = {f.name: _field_kind(f.type) for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, value in data.items():
        k = str(key).replace("-", "_")
        if k not in kinds:
            raise UsageError(f"{source}: unknown option {key!r}; valid options are {', '.join(kinds)}")
        kind = kinds[k]
        if value is None:
            out[k] = None
        elif kind is float:
            try:
                out[k] = parse_number(value)
            except ValueError as err:
                raise UsageError(f"{source}: option {key!r}: {err}") from None
        elif kind is int:
            if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit())):
                raise UsageError(f"{source}: option {key!r} must be an integer, got {value!r}")
            out[k] = int(value)
        elif kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                value = value.lower() in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise UsageError(f"{source}: option {key!r} must be true or false, got {value!r}")
            out[k] = value
        else:
            out[k] = str(value)
    return out


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Options from a JSON or TOML file (a flat table; a ``[train]`` table is also accepted).

    Raises:
        UsageError: missing or unreadable file, unknown option, bad value.
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                try:
                    import tomli as tomllib
                except ImportError as err:
                    raise UsageError("reading a TOML config on Python 3.10 needs tomli: pip install tomli") from err
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except UsageError:
        raise
    except Exception as err:  # JSONDecodeError, TOMLDecodeError
        raise UsageError(f"cannot parse config file {str(p)!r}: {err}") from None
    if isinstance(data, dict) and "train" in data and isinstance(data["train"], dict):
        data = data["train"]
    if not isinstance(data, dict):
        raise UsageError(f"config file {str(p)!r} must hold a table of options")
    return _coerce_config(data, str(p))


# --------------------------------------------------------------------------- parser


def _add_train_options(p: argparse.ArgumentParser) -> None:
    from .train import TrainConfig

    helps = {
        "method": f"method preset: {', '.join(METHOD_PRESETS)}",
        "dataset": f"dataset: {', '.join(DATASET_PRESETS)} or tensor:PATH",
        "eps": "attack radius in [0, 1] pixel units; fractions allowed (8/255)",
        "attack": "training attack: pgd or fgsm (R-MAML_out-FGSM)",
        "first_order": "first-order MAML (inner gradients as constants)",
        "select": "model selection on meta-validation tasks: sa+ra, sa, ra or last",
        "device": "auto, cpu, cuda, cuda:1, ...",
        "compile": "torch.compile the first-order meta-step's forward passes: off (default), on, or "
                   "auto (on with CUDA and triton when >= 200 steps remain)",
    }
    g = p.add_argument_group("training options (override the config file and the presets)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _field_kind(f.type)
        names = [flag, "--preset"] if f.name == "method" else [flag]
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": helps.get(f.name)}
        if kind is bool:
            g.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
        elif kind is float:
            g.add_argument(*names, type=_number_arg, metavar="X", **kw)
        elif kind is int:
            g.add_argument(*names, type=int, metavar="N", **kw)
        else:
            if f.name == "method":
                kw["metavar"] = "METHOD"
            g.add_argument(*names, type=str, **kw)


def build_parser() -> argparse.ArgumentParser:
    """The ``robust-meta`` argument parser."""
    from ._version import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Adversarially robust few-shot meta-learning (R-MAML, Wang et al. ICLR 2021).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser("demo", help="train MAML vs R-MAML_out on the embedded digits; table + plot",
                       description="Train MAML and R-MAML_out (FGSM) - optionally AQ and TRADES - on "
                       "scikit-learn's 8x8 digits, evaluate on unseen classes, print SA/RA with 95% "
                       "CIs, write results.json and an RA-versus-eps plot.")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("--quick", action="store_true", help="a reduced setting that runs in seconds (tests)")
    d.add_argument("--methods", default=",".join(DEFAULT_DEMO_METHODS),
                   help=f"comma-separated, from {', '.join(DEMO_METHODS)} (default maml,rmaml-out)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--test-tasks", type=int, default=None, help="test tasks per method (default 600; 40 with --quick)")
    d.add_argument("--meta-steps", type=int, default=None, help="meta-updates per method")
    d.add_argument("--no-progress", dest="progress", action="store_false")

    t = sub.add_parser("train", help="meta-train one method; checkpoints and logs in --out",
                       description="Meta-train one method. Options come from the presets, then the "
                       "--config file, then the command line (the command line wins).")
    t.add_argument("--config", help="JSON or TOML file of training options")
    t.add_argument("--out", required=True, help="output folder (last.pt, best.pt, log.jsonl, log.csv)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--overwrite", action="store_true", help="start afresh even if OUT holds a run")
    t.add_argument("--no-progress", dest="progress", action="store_false")
    _add_train_options(t)

    e = sub.add_parser("eval", help="evaluate a checkpoint on unseen test tasks (SA/RA with 95%% CIs)")
    e.add_argument("checkpoint", help="a .pt written by train (best.pt or last.pt)")
    e.add_argument("--tasks", type=int, default=600, help="number of test tasks (default 600; paper 2400)")
    e.add_argument("--split", choices=("test", "val"), default="test")
    e.add_argument("--attack", default="pgd", help="attack(s), comma-separated: pgd, fgsm, apgd, autoattack, none")
    e.add_argument("--eps", type=_eps_list_arg, default=None,
                   help="radius or comma-separated sweep, fractions allowed (default: the training eps)")
    e.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: the config's test_inner_steps)")
    e.add_argument("--step-size", type=_number_arg, default=None, help="fine-tuning step (default: inner_lr)")
    e.add_argument("--attack-steps", type=int, default=10, help="PGD iterations (default 10)")
    e.add_argument("--finetune", choices=("standard", "adversarial"), default="standard")
    e.add_argument("--mode", choices=("train", "eval"), default=None,
                   help="network mode for fine-tuning, attack and scoring: train (batch statistics, "
                        "the MAML convention; the default for MAML learners) or eval (running "
                        "statistics; the default for protonet and r2d2, as their papers; needed by "
                        "apgd and autoattack, which attack a subset of the batch)")
    e.add_argument("--data-folder", default=None, help="override the dataset folder stored in the checkpoint")
    e.add_argument("--device", default="auto")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", default=None, help="write the result as JSON (and CSV next to it), atomically")
    e.add_argument("--resume", action="store_true",
                   help="if OUT already holds this evaluation (same checkpoint file and options), do not redo it")
    e.add_argument("--workers", default="1",
                   help="processes evaluating tasks at once on this CPU: an integer or auto (one per "
                        "core); the per-task values are the same for any number (default 1)")
    e.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the fine-tuning and attack steps: auto (default: on CUDA "
                        "with triton and >= 100 tasks per worker; never on a CPU), on, off")
    e.add_argument("--no-progress", dest="progress", action="store_false")

    pl = sub.add_parser("plot", help="plot RA versus eps from results/eval JSON files")
    pl.add_argument("results", nargs="+", help="results.json (demo) or eval JSON files")
    pl.add_argument("--out", required=True, help="output .png/.svg (both are written)")
    pl.add_argument("--title", default=None)

    sub.add_parser("presets", help="list the method and dataset presets")

    r = sub.add_parser(
        "reproduce",
        help="reproduce a paper comparison: 'omniglot' (MAML/AQ/R-MAML_out, 1-shot 5-20 way), "
             "'miniimagenet' or 'cifar-fs' (Tables 1-3 / S2-S3: 5-way 1- and 5-shot)",
        description="omniglot: train maml, aq, rmaml-out-at, rmaml-out-trades and rmaml-out-fgsm on the "
                    "meta-train alphabets of Omniglot and evaluate each at 1-shot 5/10/15/20-way "
                    "on the held-out alphabets (SA; RA under PGD-10 at eps = 10/255; 95% CIs); writes "
                    "OUT/omniglot_ways.png/.svg. miniimagenet / cifar-fs: the same methods and "
                    "rmaml-out-anil, Conv4, 5-way 1-shot and 5-shot, eps = 2/255 / 8/255, S-FT with 10 "
                    "steps, RA under PGD-10 (sized for a GPU: the wall time is measured and estimated "
                    "first); writes OUT/<benchmark>_shots.png/.svg. Every RA is audited with a strong "
                    "attack. Writes OUT/results.json and OUT/table.md; a second call resumes and skips "
                    "finished runs.",
    )
    r.add_argument("benchmark", choices=["omniglot", "miniimagenet", "cifar-fs"], help="which comparison")
    r.add_argument("--data-folder", required=True,
                   help="Omniglot: the official zips (images_background*.zip, images_evaluation.zip) "
                        "or their extracted folders; miniimagenet / cifar-fs: any layout "
                        "robust_meta.datasets.load_benchmark reads")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--quick", action="store_true", help="a few-minute run (tiny model, few steps/tasks)")
    r.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    r.add_argument("--ways", default=None, help="omniglot only: comma-separated N values (default 5,10,15,20)")
    r.add_argument("--shots", default=None,
                   help="miniimagenet / cifar-fs only: comma-separated K values (default 1,5)")
    r.add_argument("--meta-steps", type=int, default=None)
    r.add_argument("--test-tasks", type=int, default=None)
    r.add_argument("--audit-tasks", type=int, default=None,
                   help="test tasks of the strong-attack audit of every RA (default 25; 0: none)")
    r.add_argument("--device", default="auto")
    r.add_argument("--workers", default="auto",
                   help="runs at once, each in its own process (default auto: 2 on a CPU with >= 2 "
                        "cores, else 1)")
    r.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


# --------------------------------------------------------------------------- commands


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    options: dict[str, Any] = {}
    if args.config:
        options.update(load_config_file(args.config))
    names = TrainConfig.field_names()
    options.update({k: v for k, v in vars(args).items() if k in names})
    config = TrainConfig.from_dict(options).resolved()
    out = Path(args.out)
    try:
        best = train(config, out_dir=out, resume=args.resume, overwrite=args.overwrite, progress=args.progress)
    except FileExistsError:
        raise UsageError(
            f"{str(out)!r} already holds a run (last.pt): add --resume to continue it or --overwrite "
            "to start again"
        ) from None
    except KeyboardInterrupt as err:
        from ._signals import exit_code

        why = f" by {signal.Signals(err.signum).name}" if isinstance(err, Interrupted) else ""
        print(f"{PROG} train: interrupted{why}; {_saved_step(out)}continue with --resume --out {out}",
              file=sys.stderr)
        return exit_code(err)
    print(f"best checkpoint: {best}")
    return 0


def _saved_step(out: Path) -> str:
    """``"last.pt holds step N; "`` for the interruption message (empty when unreadable)."""
    from .train import load_checkpoint

    try:
        return f"last.pt holds step {load_checkpoint(out / 'last.pt')['step']}; "
    except Exception:  # no checkpoint yet, or a damaged one: the resume will say so
        return ""


def _workers_arg(value: str, device: str) -> int:
    """``--workers``: an integer >= 1, or ``auto`` (one per usable core on a CPU, 1 on a GPU).

    The usable cores are those this process may run on: its CPU affinity (``taskset``, Slurm)
    and its cgroup quota (Kubernetes, ``docker --cpus``), not the machine's core count.
    """
    from ._cpus import usable_cpus
    from .train import _device

    if value == "auto":
        return usable_cpus() if _device(device).type == "cpu" else 1
    try:
        workers = int(value)
    except ValueError:
        raise UsageError(f"--workers must be an integer or 'auto', got {value!r}") from None
    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    return workers


def _eval_request(args: argparse.Namespace, attacks: Sequence[str], data_id: Any = None,
                  device: Any = None) -> dict[str, Any]:
    """What an ``eval`` computes: the checkpoint's SHA-256, the data's identity (content and
    split, not the folder's path), the device, the evaluation protocol and every option that
    changes a number."""
    from ._checkpoint import file_sha256
    from .evaluation import EVAL_PROTOCOL, _device_name

    return {
        "checkpoint_sha256": file_sha256(args.checkpoint), "tasks": args.tasks, "split": args.split,
        "attacks": list(attacks), "eps": None if args.eps is None else [float(e) for e in args.eps],
        "steps": args.steps, "step_size": args.step_size, "attack_steps": args.attack_steps,
        "finetune": args.finetune, "data": data_id, "seed": args.seed,
        "mode": args.mode, "compile": args.compile, "protocol": EVAL_PROTOCOL,
        "device": None if device is None else str(device),
        "device_name": None if device is None else _device_name(device),
    }


def _finished_eval(out: Path, request: dict[str, Any]):
    """The `EvalResult` in ``out`` when it was computed for exactly ``request``, else ``None``."""
    from .evaluation import EvalResult

    if not (out.is_file() and out.with_suffix(".csv").is_file()):
        return None
    try:
        res = EvalResult.from_json(out)
    except (ValueError, KeyError, TypeError):  # not ours, or from an older robust-meta
        return None
    return res if res.settings.get("request") == json.loads(json.dumps(request)) else None


def write_eval_result(result: Any, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write an `EvalResult` as ``out`` (JSON) and ``out`` with suffix ``.csv``, atomically.

    The CSV is written first and the JSON last: a JSON file next to its CSV marks a finished
    evaluation (``robust-meta eval --resume`` relies on it). Killed at any moment, neither file
    is ever half-written.

    Returns:
        ``(json_path, csv_path)``.
    """
    from ._io import atomic_write_text

    out = Path(out)
    csv_path = out.with_suffix(".csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf)
    names = list(result.metrics)
    w.writerow(["task", *names])
    for i in range(result.n_tasks):
        w.writerow([i, *(repr(result.metrics[k].values[i]) for k in names)])
    atomic_write_text(buf.getvalue(), csv_path)
    atomic_write_text(json.dumps(result.to_dict(), indent=2, default=str), out)
    return out, csv_path


def _cmd_eval(args: argparse.Namespace) -> int:
    from ._signals import SignalGuard
    from .attacks import ATTACKS

    attacks = [a.strip().lower() for a in args.attack.split(",") if a.strip()]
    bad = [a for a in attacks if a not in ATTACKS]
    if bad or not attacks:
        raise UsageError(f"unknown attack {(bad or [args.attack])[0]!r}; choose from {', '.join(ATTACKS)}")
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {args.checkpoint!r} does not exist")
    out = Path(args.out) if args.out else None
    workers = _workers_arg(args.workers, args.device)
    from .train import _device

    if workers > 1 and _device(args.device).type != "cpu":
        raise UsageError(
            f"--workers {args.workers} runs CPU processes, but the model would go to "
            f"{_device(args.device)}: on a GPU use one process (--workers 1), or add --device cpu "
            "to evaluate on this machine's CPU cores"
        )
    setup = _eval_setup(args.checkpoint, tasks=args.tasks, split=args.split, data_folder=args.data_folder,
                        device=args.device, seed=args.seed)
    request = _eval_request(args, attacks, data_id=setup[3], device=setup[4])
    if args.mode is None:  # what the checkpoint's learner implies, so that --resume compares it
        request["mode"] = "train" if setup[5] is None else "eval"
    if out is not None and args.resume:
        done = _finished_eval(out, request)
        if done is not None:
            print(f"{out} already holds this evaluation (same checkpoint and options); not redone")
            print(done.table())
            return 0
    # SIGINT/SIGTERM stop the evaluation; the result files are written atomically, so a kill
    # at any moment leaves either the previous files or the complete new ones.
    with SignalGuard() as guard:
        result, config = _eval_checkpoint(
            args.checkpoint, tasks=args.tasks, split=args.split, attacks=attacks, eps=args.eps,
            steps=args.steps, step_size=args.step_size, attack_steps=args.attack_steps,
            finetune=args.finetune, data_folder=args.data_folder, device=args.device, seed=args.seed,
            progress=args.progress, mode=args.mode, workers=workers,
            compile=args.compile, setup=setup,
        )
        result.settings["request"] = request
        print(f"{config.method} on {config.dataset} ({args.split} split, {result.n_tasks} tasks)")
        print(result.table())
        if out is not None:
            with guard.critical():
                json_path, csv_path = write_eval_result(result, out)
            print(f"wrote {json_path} and {csv_path}")
    return 0


def _curves_from_file(path: Path) -> dict[str, Any]:
    """``name -> EvalResult or (eps, means, cis)`` from a demo results.json or an eval JSON."""
    from .evaluation import EvalResult

    if not path.is_file():
        raise UsageError(f"results file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UsageError(f"{str(path)!r} is not valid JSON: {err}") from None
    if isinstance(data, dict) and data and all(
        isinstance(v, dict) and {"eps", "mean", "ci95"} <= set(v) for v in data.values()
    ):  # curves.json written by the demo
        return {name: (c["eps"], c["mean"], c["ci95"]) for name, c in data.items()}
    if isinstance(data, dict) and isinstance(data.get("methods"), dict):
        sibling = path.parent / "curves.json"
        curves = json.loads(sibling.read_text(encoding="utf-8")) if sibling.is_file() else {}
        out = {}
        for name, m in data["methods"].items():
            curve = curves.get(name)
            if curve:
                out[name] = (curve["eps"], curve["mean"], curve["ci95"])
            else:
                out[name] = ([0.0, data.get("settings", {}).get("eps", 0.0)],
                             [m["sa"]["mean"], m["ra"]["mean"]], [m["sa"]["ci95"], m["ra"]["ci95"]])
        return out
    if isinstance(data, dict) and "metrics" in data:
        res = EvalResult.from_dict(data)
        name = str(res.settings.get("method") or path.stem)
        return {name: res}
    raise UsageError(f"{str(path)!r} is neither a demo results.json nor an eval JSON")


def _cmd_plot(args: argparse.Namespace) -> int:
    from .visualize import plot_ra_vs_eps

    curves: dict[str, Any] = {}
    for f in args.results:
        for name, c in _curves_from_file(Path(f)).items():
            key, i = name, 2
            while key in curves:
                key, i = f"{name} ({i})", i + 1
            curves[key] = c
    paths = plot_ra_vs_eps(curves, args.out, title=args.title)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    print("methods:")
    for m in METHOD_PRESETS.values():
        print(f"  {m.name:<18} {m.paper_name:<20} {m.description}")
    from .metric import LEARNERS

    print(f"learners (--learner): {', '.join(LEARNERS)}  (maml: gradient steps; protonet, r2d2: closed-form heads)")
    print("datasets:")
    for d in DATASET_PRESETS.values():
        print(f"  {d.name:<18} eps={d.eps * 255:g}/255  {d.in_channels}x{d.image_size}x{d.image_size}  {d.description}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    methods = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in DEMO_METHODS]
    if bad or not methods:
        raise UsageError(f"unknown demo method {(bad or [args.methods])[0]!r}; choose from {', '.join(DEMO_METHODS)}")
    doc = run_demo(args.out, methods=methods, quick=args.quick, seed=args.seed,
                   test_tasks=args.test_tasks, meta_steps=args.meta_steps, progress=args.progress)
    print(_demo_table(doc))
    print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'ra_vs_eps.png'} (.svg)")
    return 0


# --------------------------------------------------------------------------- main

def _cmd_reproduce(args: argparse.Namespace) -> int:
    from .reproduce import (
        OmniglotReproduction,
        benchmark_spec,
        reproduce_benchmark,
        reproduce_omniglot,
        results_table,
    )

    omniglot = args.benchmark == "omniglot"
    changes: dict[str, Any] = {}
    if args.methods:
        changes["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    for option, axis, allowed in (("ways", "N", omniglot), ("shots", "K", not omniglot)):
        value = getattr(args, option)
        if not value:
            continue
        if not allowed:
            other = "miniimagenet and cifar-fs" if option == "shots" else "omniglot"
            fixed = ("1-shot" if option == "shots" else f"{benchmark_spec(args.benchmark).ways}-way")
            raise UsageError(f"--{option} is for {other} only: the {args.benchmark} reproduction is {fixed}")
        try:
            changes[option] = tuple(int(n) for n in value.split(",") if n.strip())
        except ValueError:
            raise UsageError(f"--{option} must be comma-separated integers ({axis} values), got {value!r}") from None
    if args.meta_steps is not None:
        changes["meta_steps"] = args.meta_steps
    if args.test_tasks is not None:
        changes["test_tasks"] = args.test_tasks
    if args.audit_tasks is not None:
        changes["audit_tasks"] = args.audit_tasks
    if omniglot:
        settings = OmniglotReproduction.quick(**changes) if args.quick else OmniglotReproduction(**changes)
        plot = "omniglot_ways.png"
    else:
        spec = benchmark_spec(args.benchmark)
        settings = spec.quick(**changes) if args.quick else spec.replace(**changes)
        plot = f"{spec.dataset}_shots.png"
    if args.workers == "auto":
        from ._cpus import usable_cpus
        from .train import _device

        workers = 2 if _device(args.device).type == "cpu" and usable_cpus() >= 2 else 1
    else:
        try:
            workers = int(args.workers)
        except ValueError:
            raise UsageError(f"--workers must be an integer or 'auto', got {args.workers!r}") from None
    out = Path(args.out)
    t0 = time.perf_counter()
    try:
        if omniglot:
            doc = reproduce_omniglot(args.data_folder, out, settings=settings, device=args.device,
                                     progress=args.progress, workers=workers)
        else:
            doc = reproduce_benchmark(args.benchmark, args.data_folder, out, settings=settings,
                                      device=args.device, progress=args.progress, workers=workers)
    except KeyboardInterrupt as err:
        from ._signals import exit_code

        print(f"{PROG} reproduce: interrupted; finished runs are kept, the current one resumes "
              f"from its last.pt: run the same command again", file=sys.stderr)
        return exit_code(err)
    print(results_table(doc), end="")
    print(f"({time.perf_counter() - t0:.0f} s) wrote {out / 'results.json'}, {out / 'table.md'}, "
          f"{out / plot} (.svg)")
    return 0


_COMMANDS = {"demo": _cmd_demo, "train": _cmd_train, "eval": _cmd_eval, "plot": _cmd_plot,
             "presets": _cmd_presets, "reproduce": _cmd_reproduce}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``robust-meta``; returns the exit code (0 ok, 2 user error, 130 interrupted).

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).
    """
    from .train import CheckpointError

    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exit_:  # --help, --version, argparse usage errors (code 2)
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    debug = os.environ.get("ROBUST_META_DEBUG", "") not in ("", "0")
    from ._signals import SignalGuard
    from .fast import tune_malloc

    # This process is the command's own: keep freed tensor memory for reuse (1.6-2.2x faster
    # CPU evaluation; ROBUST_META_MALLOPT=0 turns it off). A library call never does this.
    tune_malloc()

    try:
        # SIGTERM is handled like SIGINT for the whole command (train/eval/reproduce install
        # their own, finer guards inside): a cluster's SIGTERM never kills a command mid-write.
        with SignalGuard():
            return _COMMANDS[args.command](args)
    except KeyboardInterrupt as err:
        from ._signals import exit_code

        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return exit_code(err)
    except (UsageError, CheckpointError, FileNotFoundError, FileExistsError, ValueError, TypeError, ImportError) as err:
        if debug:
            raise
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
