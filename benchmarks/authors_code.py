"""robust-meta's R-MAML_out-FGSM meta-step against the authors' ACTUAL research code.

Usage::

    python benchmarks/authors_code.py --authors-code PATH [--reps N] [--warmup N]
                                      [--rm-model mirror|learner|both] [--compile off|on|auto]
                                      [--mallopt on|off] [--threads N] [--device cpu|cuda]
                                      [--json out.json]
    python benchmarks/authors_code.py --tiny            # robust-meta side only (tests)

``PATH`` is a checkout of https://github.com/wangren09/MetaAdv that **you** provide (nothing
of it is shipped, downloaded or built here). From it this script imports, by putting ``PATH``
first on ``sys.path``: ``metafgsm.Meta`` (``--authors-module``, default ``metafgsm``: the
R-MAML_out FGSM-RS meta-learner of the MiniImageNet notebook ``trainfgsmrs.ipynb``), which
itself imports ``learner.Learner`` and ``attack.PGD`` from ``PATH``. The modules' SyntaxWarnings
(``name is 'conv2d'``) are silenced during the import.

**What is patched: nothing.** ``Meta(args, config, device)`` takes its device as an argument
and its ``forward`` only uses ``.to(self.device)``; the hard-coded ``torch.device('cuda:2')``
of ``attack.py`` are default arguments of ``clip_eta`` / ``PGD.__init__``, evaluated at import
(creating a device object touches no GPU) and used only by ``Meta.finetunning``, which is not
timed. ``args`` is a namespace with the notebook's values (``n_way=5, k_spt=1, k_qry=15,
imgsz=84, imgc=3, task_num=4, meta_lr=1e-3, update_lr=0.01, update_step=5,
update_step_test=10``); ``config`` is the notebook's Conv4 list (built by `authors_config`,
asserted equal to the notebook's literal list for 84×84×3, 32 filters, 5-way): 4 × (conv 3×3
stride 1 **padding 0** → ReLU (in place) → BN → max-pool 2, the last pool with stride 1),
flatten, linear 800 → 5.

**Contenders** (same initial weights, same 4 tasks of 5-way 1-shot 15-query 84×84×3 random
images, K = 5 inner steps of 0.01, first order), timed **interleaved** with
``bench.time_round_robin`` (after ``--warmup`` untimed rounds, every rep runs each contender
once, in a fixed order; median and min–max over ``--reps``; ratios taken per rep by
``bench.per_rep_ratio``, median and min–max reported, plus the ratio of the minimum wall
times). Each call's **process CPU time** (``time.process_time``, all threads) is recorded too,
with its per-rep ratios: on a shared machine other processes stretch wall times (a
2-thread step on 2 busy cores by 5–10×), CPU times much less. ``cpu_per_wall`` per call
(≈ the threads in use when the process had the cores to itself) and the 1-minute load
average after every round go into the JSON. With >= 2 threads a round counts as **quiet**
when every contender ran at cpu/wall >= 0.9 × threads (all its threads on the cores); the
per-rep ratios over the quiet rounds are reported as well (with 1 thread cpu/wall stays ~1
under contention, so no round is singled out).

* ``authors``: ``Meta.forward(x_spt, y_spt, x_qry, y_qry)`` of their code, unchanged.
* ``robust-meta eager``: the public API on `AuthorsConv4`, an ``nn.Module`` equal to their
  network (``nn.Conv2d(padding=0)``, ``nn.ReLU(inplace=True)``, ``nn.BatchNorm2d``,
  ``nn.MaxPool2d``, ``nn.Linear``, in their order, parameters in the order of their
  ``vars``; loaded with their initial weights; its logits are checked equal to their
  Learner's)::

      robust = robust_meta.RobustMetaUpdate(F.cross_entropy, model, attack="fgsm", eps=2/255, gamma_out=0.2)
      opt.zero_grad()
      loss = mean over tasks of robust(qx, qy, params=robust_meta.adapt(model, sx, sy, steps=5,
                                                step_size=0.01, first_order=True))
      loss.backward(); opt.step()            # one Adam, lr 1e-3

* ``robust-meta fast_paths``: the same step inside ``with robust_meta.fast_paths():``
  (``--compile`` passes ``compile=``; default: none, i.e. ``"auto"``, which does not compile
  on a CPU).
* ``--rm-model learner`` / ``both``: the same two robust-meta steps on *their* ``Learner``
  object itself (it runs under ``torch.func.functional_call``; its frozen ``vars_bn`` are not
  adapted). It has no ``nn.Conv2d`` submodule, so ``fast_paths``' automatic channels_last
  (``robust_meta.fast._layout`` requires one) does not apply to it.

**What differs between the two steps** (per task, K = 5; "fwd"/"bwd" = passes of the whole
network on the support (5 images) or query (75 images) set):

=====================  =================================  ==================================
                       their ``Meta.forward``             robust-meta
=====================  =================================  ==================================
support set            5 fwd + 5 bwd (w.r.t. weights)     5 fwd + 5 bwd (w.r.t. weights)
clean query, no grad   2 fwd (meta-weights; after step 1)  —
clean query, graph     4 fwd (after steps 2..5; only the  1 fwd (after step 5)
                       last is the outer loss), each with
                       softmax/argmax/``.item()``
FGSM-RS attack         1 fwd + 1 full ``loss.backward()``  1 fwd + 1 bwd w.r.t. the input only
                       (input *and* weights, filling the
                       meta-parameters' ``.grad``)
adversarial query      1 fwd with graph + ``.item()``     1 fwd with graph
=====================  =================================  ==================================

then, per meta-step: theirs: an unused ``torch.optim.SGD`` built, backward of the clean outer
loss + Adam (lr 1e-3), backward of the adversarial outer loss + a second Adam (lr 2e-4 = 0.2 ×
1e-3: their γ_out); robust-meta: one backward of ``clean + 0.2 · adversarial`` and one Adam
(lr 1e-3). Network passes per task, counted: theirs 13 fwd (25 + 8 × 75 images) and 8 bwd
(5 inner, 1 FGSM computing weight *and* input gradients, 2 through the two outer losses);
robust-meta 8 fwd (25 + 3 × 75 images) and 8 bwd (5 inner, 1 FGSM input-only, 2 through its
one outer loss). The backward work is nearly the same; theirs has 5 more forwards per task
(3 of them with a graph that is never used), the weight gradient of the FGSM backward, 7
``.item()`` calls (softmax + argmax + compare) per task and a second Adam step. The script counts the first
convolution's forward and backward calls of every contender in one step after a first one
(`PassCounter`; the first robust-meta step of a model runs one more support forward to check
the labels) and its FLOPs (``FlopCounterMode`` as ``bench.count_flops``), and prints them;
these two steps come before the timed warm-up.

The meta-updates are not the same update: theirs is Adam(clean) then Adam_0.2(adversarial)
with two separate Adam states, robust-meta's is one Adam on the γ_out-weighted sum. And their
``forward`` hard-codes ``eps, step = (4.0, 10)`` (ε = 4/255; the script reads it from the source
and records it); robust-meta runs ε = 2/255. ε does not change the work of either step.

**Checks before timing** (on copies): the logits of `AuthorsConv4` equal their Learner's at
the same weights, and their *clean* meta-gradient (captured at their first Adam step) equals
robust-meta's first-order MAML meta-gradient (``attack="none", gamma_out=0``) on the same
weights and tasks, to ``GRAD_TOL`` relative. (The adversarial halves are not compared: their
random start and ε differ.)

**Process-wide state.** All contenders share one process, so the glibc malloc tuning that
``fast_paths`` applies at its first entry (``robust_meta.tune_malloc``) is in force for *every*
contender during the timed reps, their code included; ``fast_paths`` vs eager here therefore
measures channels_last alone. ``--mallopt off`` sets ``ROBUST_META_MALLOPT=0`` (no contender
gets the tuning). A user's fresh process running their code has glibc's defaults.

Results on a 2-core KVM Intel Xeon (family 6 model 207), shared with another engineer's test
runs: ``results-authors-code-cpu.json`` (2 threads, the default), ``...-cpu-1thread.json``
(1 thread, ``--rm-model both``), ``...-cpu-learner.json`` (2 threads, robust-meta on their
Learner object).

``--tiny``: 48×48×3 images, 4 filters, 2 tasks, 3 queries per class, 1 rep — seconds, for
tests; the numbers mean nothing. Without ``--authors-code`` only the robust-meta contenders
run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
import types
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402  (benchmarks/bench.py: Config, make_tasks, time_round_robin, ...)
import research_baseline  # noqa: E402  (benchmarks/research_baseline.py: the authors' layout)

import robust_meta  # noqa: E402

EPS = 2 / 255
INNER_LR = 0.01
K_TRAIN = 5
K_TEST = 10
META_LR = 1e-3
GAMMA_OUT = 0.2
QUIET = 0.9  # a round is quiet when every contender's cpu/wall >= QUIET x threads
GRAD_TOL = 1e-4  # max |theirs - ours| / max |grad| of the clean meta-gradient
AUTHORS_MODULES = ("learner", "attack")  # what metafgsm.py imports from the checkout

#: their MiniImageNet setting (trainfgsmrs.ipynb): 84x84x3, 32 filters, 5-way 1-shot 15-query, 4 tasks
FULL = bench.Config("authors-conv4-84", 3, 84, 32, 5, 1, 15, 4)
TINY = bench.Config("tiny-48", 3, 48, 4, 5, 1, 3, 2)

#: trainfgsmrs.ipynb's config, verbatim (5-way)
NOTEBOOK_CONFIG = [
    ("conv2d", [32, 3, 3, 3, 1, 0]), ("relu", [True]), ("bn", [32]), ("max_pool2d", [2, 2, 0]),
    ("conv2d", [32, 32, 3, 3, 1, 0]), ("relu", [True]), ("bn", [32]), ("max_pool2d", [2, 2, 0]),
    ("conv2d", [32, 32, 3, 3, 1, 0]), ("relu", [True]), ("bn", [32]), ("max_pool2d", [2, 2, 0]),
    ("conv2d", [32, 32, 3, 3, 1, 0]), ("relu", [True]), ("bn", [32]), ("max_pool2d", [2, 1, 0]),
    ("flatten", []), ("linear", [5, 32 * 5 * 5]),
]


# ----------------------------------------------------------------------------- the network


def authors_config(cfg: bench.Config) -> list[tuple[str, list]]:
    """Their Conv4 config list for ``cfg``: (conv pad 0, ReLU, BN, pool 2) x 4, last pool stride 1.

    The layer names are interned string literals: their ``Learner`` compares them with ``is``.
    """
    return research_baseline.authors_layout(cfg)


class AuthorsConv4(nn.Module):
    """An ``nn.Module`` equal to their ``Learner(config)`` for conv2d/relu/bn/max_pool2d/flatten/linear
    configs: same layers, same order, parameters in the order of their ``vars``, BN with
    batch statistics in train mode (their ``bn_training=True``) and momentum 0.1."""

    def __init__(self, config: list[tuple[str, list]]):
        super().__init__()
        layers: list[nn.Module] = []
        for name, a in config:
            if name == "conv2d":
                layers.append(nn.Conv2d(a[1], a[0], (a[2], a[3]), stride=a[4], padding=a[5]))
            elif name == "relu":
                layers.append(nn.ReLU(inplace=a[0]))
            elif name == "bn":
                layers.append(nn.BatchNorm2d(a[0]))
            elif name == "max_pool2d":
                layers.append(nn.MaxPool2d(a[0], a[1], a[2]))
            elif name == "flatten":
                layers.append(nn.Flatten())
            elif name == "linear":
                layers.append(nn.Linear(a[1], a[0]))
            else:
                raise NotImplementedError(name)
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def load_from_learner(self, learner: nn.Module) -> AuthorsConv4:
        """Copy their Learner's ``vars`` (and BN running statistics ``vars_bn``) into this module."""
        src, dst = list(learner.vars), list(self.parameters())
        if len(src) != len(dst) or any(a.shape != b.shape for a, b in zip(src, dst)):
            raise ValueError("their Learner's weights do not line up with AuthorsConv4's")
        bns = [m for m in self.modules() if isinstance(m, nn.BatchNorm2d)]
        stats = list(learner.vars_bn)
        with torch.no_grad():
            for d, s in zip(dst, src):
                d.copy_(s)
            for i, bn in enumerate(bns):
                bn.running_mean.copy_(stats[2 * i])
                bn.running_var.copy_(stats[2 * i + 1])
        return self


# ----------------------------------------------------------------------------- their code


def _sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def load_authors(path: str, module: str = "metafgsm") -> tuple[types.ModuleType, dict]:
    """Import ``module`` (their meta-learner) from the checkout ``path``; return it and a record
    of what was imported (files, sha256, git revision when ``path`` is a git work tree, the ε
    hard-coded in ``Meta.forward``)."""
    path = os.path.abspath(path)
    files = [f"{module}.py", "learner.py", "attack.py"]
    missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise FileNotFoundError(f"--authors-code {path}: no {', '.join(missing)} there "
                                "(expected a checkout of github.com/wangren09/MetaAdv)")
    # a module of the same name imported from elsewhere must not shadow theirs
    for name in (module, *AUTHORS_MODULES):
        sys.modules.pop(name, None)
    sys.path.insert(0, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning: "is" with a literal; Variable deprecation
            mod = importlib.import_module(module)
    finally:
        sys.path.remove(path)
    for name in (module, *AUTHORS_MODULES):
        m = sys.modules.get(name)
        if m is not None and os.path.dirname(os.path.abspath(m.__file__)) != path:
            raise ImportError(f"{name} was imported from {m.__file__}, not from {path}")
    rev = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        p = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        rev = (p.stdout.strip() or None) if p.returncode == 0 else None
    with open(os.path.join(path, f"{module}.py")) as fh:
        m = re.search(r"eps,\s*step\s*=\s*\(\s*([0-9.]+)\s*,", fh.read().split("def finetunning")[0])
    info = {"path": path, "module": module, "git_rev": rev,
            "sha256": {f: _sha256(os.path.join(path, f)) for f in files},
            "hard_coded_eps_in_forward": f"{m.group(1)}/255" if m else None}
    return mod, info


def authors_args(cfg: bench.Config) -> types.SimpleNamespace:
    """The ``args`` of their notebook (argparse defaults of trainfgsmrs.ipynb) for ``cfg``."""
    return types.SimpleNamespace(
        epoch=60000, n_way=cfg.ways, k_spt=cfg.shots, k_qry=cfg.queries, imgsz=cfg.image_size,
        imgc=cfg.in_channels, task_num=cfg.tasks, meta_lr=META_LR, update_lr=INNER_LR,
        update_step=K_TRAIN, update_step_test=K_TEST,
    )


def stacked(tasks) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Their batch layout: ``[task_num, setsz, c, h, w]`` and ``[task_num, setsz]``."""
    return tuple(torch.stack([t[i] for t in tasks]) for i in range(4))  # type: ignore[return-value]


def authors_clean_meta_grad(meta: nn.Module, batch) -> tuple[list[Tensor], list[Tensor]]:
    """Run their ``forward`` once on a copy of ``meta``; return the meta-gradients present at
    their first (clean) and second (adversarial) Adam steps."""
    meta = copy.deepcopy(meta)
    seen: list[list[Tensor]] = []
    for opt in (meta.meta_optim, meta.meta_optim_adv):
        orig = opt.step

        def step(*a, _orig=orig, _opt=opt, **k):
            seen.append([p.grad.detach().clone() for g in _opt.param_groups for p in g["params"]])
            return _orig(*a, **k)

        opt.step = step
    meta(*batch)
    if len(seen) != 2:
        raise RuntimeError(f"expected 2 optimizer steps in their forward, saw {len(seen)}")
    return seen[0], seen[1]


# ----------------------------------------------------------------------------- robust-meta step


def make_rm_step(model: nn.Module, tasks, *, fgsm: bool = True,
                 context: Callable[[], contextlib.AbstractContextManager] | None = None) -> Callable[[], float]:
    """robust-meta's first-order R-MAML_out-FGSM meta-step (``fgsm=False``: plain MAML) on ``model``."""
    robust = robust_meta.RobustMetaUpdate(F.cross_entropy, model, attack="fgsm" if fgsm else "none", eps=EPS,
                                          gamma_out=GAMMA_OUT if fgsm else 0.0)
    opt = torch.optim.Adam(model.parameters(), lr=META_LR)

    def step() -> float:
        with context() if context is not None else contextlib.nullcontext():
            opt.zero_grad(set_to_none=True)
            losses = []
            for sx, sy, qx, qy in tasks:
                fast = robust_meta.adapt(model, sx, sy, steps=K_TRAIN, step_size=INNER_LR, first_order=True)
                losses.append(robust(qx, qy, params=fast))
            loss = torch.stack(losses).mean()
            loss.backward()
            opt.step()
        return float(loss.detach())

    return step


def rm_meta_grad(model: nn.Module, tasks) -> list[Tensor]:
    """robust-meta's first-order MAML meta-gradient (clean query loss, mean over tasks) on a copy."""
    model = copy.deepcopy(model)
    robust = robust_meta.RobustMetaUpdate(F.cross_entropy, model, attack="none", eps=EPS, gamma_out=0.0)
    losses = [robust(qx, qy, params=robust_meta.adapt(model, sx, sy, steps=K_TRAIN, step_size=INNER_LR,
                                                         first_order=True)) for sx, sy, qx, qy in tasks]
    torch.stack(losses).mean().backward()
    return [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- pass counting


class PassCounter(TorchDispatchMode):
    """Counts the network passes of a step by its **first** convolution (the one whose weight has
    ``in_channels`` input channels): forward calls (and images), backward calls, and how many of
    those computed the weight gradient / the input (image) gradient."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.c = in_channels
        self.counts = {"forward": 0, "forward_images": 0, "backward": 0, "backward_weight_grad": 0,
                       "backward_input_grad": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.convolution.default and args[1].dim() == 4 and args[1].shape[1] == self.c:
            self.counts["forward"] += 1
            self.counts["forward_images"] += int(args[0].shape[0])
        elif (func is torch.ops.aten.convolution_backward.default and args[2].dim() == 4
              and args[2].shape[1] == self.c):
            mask = args[-1] if len(args) >= 11 else kwargs.get("output_mask", [True, True, True])
            self.counts["backward"] += 1
            self.counts["backward_input_grad"] += int(bool(mask[0]))
            self.counts["backward_weight_grad"] += int(bool(mask[1]))
        return func(*args, **kwargs)


def count_step(fn: Callable[[], object], in_channels: int) -> tuple[int, dict]:
    """FLOPs (as ``bench.count_flops``) and `PassCounter` counts of one call of ``fn``, after
    one uncounted call (the first robust-meta step of a model runs once-per-model checks)."""
    fn()
    fc = FlopCounterMode(display=False)
    fc.mod_tracker = bench._GlobalOnly()  # as bench.count_flops
    pc = PassCounter(in_channels)
    with fc, pc:
        fn()
    return int(fc.get_total_flops()), pc.counts


# ----------------------------------------------------------------------------- driver


def max_rel_diff(a: list[Tensor], b: list[Tensor]) -> tuple[float, float]:
    diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
    scale = max(float(x.abs().max()) for x in a)
    return diff, scale


def robust_meta_source() -> dict:
    """Where the robust_meta measured was imported from, and its git revision / local edits there."""
    where = os.path.dirname(os.path.abspath(robust_meta.__file__))
    out: dict = {"path": where, "git_rev": None, "modified_files": None}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        rev = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if rev.returncode == 0:
            out["git_rev"] = rev.stdout.strip()
            st = subprocess.run(["git", "-C", where, "status", "--porcelain", "--", "."], capture_output=True,
                                text=True, timeout=10)
            out["modified_files"] = [ln[3:] for ln in st.stdout.splitlines()]
    return out


def cpu_details() -> dict:
    """Family / model / stepping and the vector ISA flags of /proc/cpuinfo (a VM may hide the model name)."""
    out: dict = {}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            text = fh.read().split("\n\n")[0]
        for key in ("vendor_id", "cpu family", "model", "stepping", "cache size"):
            m = re.search(rf"^{key}\s*:\s*(.+)$", text, re.M)
            if m:
                out[key] = m.group(1).strip()
        m = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        if m:
            flags = m.group(1).split()
            out["isa"] = [f for f in flags if f.startswith(("avx", "amx", "fma"))]
            out["hypervisor"] = "hypervisor" in flags
    return out


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def run(args) -> dict:
    device = torch.device(args.device)
    cfg = TINY if args.tiny else FULL
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mallopt == "off":
        os.environ["ROBUST_META_MALLOPT"] = "0"
    res: dict = {"argv": sys.argv, "config": dataclasses.asdict(cfg),
                 "machine": bench.machine_info(device), "uptime_before": uptime(),
                 "settings": {"eps": EPS, "inner_lr": INNER_LR, "K": K_TRAIN, "meta_lr": META_LR,
                              "gamma_out": GAMMA_OUT, "first_order": True, "reps": args.reps,
                              "warmup": args.warmup, "mallopt": args.mallopt, "compile": args.compile,
                              "rm_model": args.rm_model}}
    res["machine"]["robust_meta"] = robust_meta.__version__
    res["machine"]["cpu_details"] = cpu_details()
    res["robust_meta_source"] = robust_meta_source()
    if args.note:
        res["note"] = args.note
    print(f"{res['machine']['cpu']}, {res['machine']['cpu_count']} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {res['uptime_before']}", flush=True)

    config = authors_config(cfg)
    if cfg == FULL:
        assert config == NOTEBOOK_CONFIG, "authors_config drifted from trainfgsmrs.ipynb's config"
    tasks = bench.make_tasks(cfg, cfg.tasks, device, torch.float32, channels_last=False, seed=0)
    batch = stacked(tasks)

    torch.manual_seed(222)  # their notebook's seed
    meta = None
    if args.authors_code:
        mod, info = load_authors(args.authors_code, args.authors_module)
        res["authors"] = info
        meta = mod.Meta(authors_args(cfg), config, device).to(device)
        learner = meta.net
        print(f"their code: {info['path']} ({args.authors_module}.Meta; git {info['git_rev']}; "
              f"forward's hard-coded eps {info['hard_coded_eps_in_forward']})", flush=True)
    elif args.rm_model != "mirror":
        raise SystemExit("--rm-model learner/both needs --authors-code")
    mirror = AuthorsConv4(config).to(device)
    if meta is not None:
        mirror.load_from_learner(learner)

    # ---- checks
    if meta is not None:
        x = tasks[0][2]
        with torch.no_grad():
            a = copy.deepcopy(learner)(x, vars=None, bn_training=True)
            b = copy.deepcopy(mirror).train()(x)
        fwd = float((a - b).abs().max())
        theirs, theirs_adv = authors_clean_meta_grad(meta, batch)
        ours = rm_meta_grad(mirror, tasks)
        diff, scale = max_rel_diff(theirs, ours)
        ok = fwd <= 1e-5 * max(1.0, float(a.abs().max())) and diff <= GRAD_TOL * scale
        res["checks"] = {"logits_max_abs_diff": fwd, "clean_meta_grad_max_abs_diff": diff,
                         "clean_meta_grad_max_abs": scale, "rel": diff / scale, "ok": ok,
                         "their_adv_grad_max_abs": max(float(g.abs().max()) for g in theirs_adv)}
        print(f"check: logits |theirs - AuthorsConv4| {fwd:.2e}; clean meta-gradient |theirs - robust-meta| "
              f"{diff:.2e} of {scale:.3g} (rel {diff / scale:.1e}) -> {'OK' if ok else 'MISMATCH'}", flush=True)
        if not ok:
            raise SystemExit("the checks failed: the two networks/steps do not compute the same thing")

    # ---- contenders
    fp_kwargs = {} if args.compile is None else {"compile": {"on": True, "off": False}.get(args.compile, "auto")}
    fast_ctx = lambda: robust_meta.fast_paths(**fp_kwargs)  # noqa: E731
    fns: dict[str, Callable[[], object]] = {}
    if meta is not None:
        fns["authors"] = lambda: meta(*batch)
    models: dict[str, nn.Module] = {}
    if args.rm_model in ("mirror", "both"):
        models["AuthorsConv4"] = mirror
    if args.rm_model in ("learner", "both"):
        models["their Learner"] = learner
    for mname, model in models.items():
        suffix = "" if mname == "AuthorsConv4" else f" ({mname})"
        fns[f"robust-meta eager{suffix}"] = make_rm_step(copy.deepcopy(model), tasks)
        fns[f"robust-meta fast_paths{suffix}"] = make_rm_step(copy.deepcopy(model), tasks, context=fast_ctx)

    # FLOPs and passes of every contender: one step to warm up, then one step counted
    res["flops"], res["passes"] = {}, {}
    for name, fn in fns.items():
        res["flops"][name], res["passes"][name] = count_step(fn, cfg.in_channels)

    print(f"\ntiming {len(fns)} contenders interleaved: {args.warmup} warm-up round(s), {args.reps} reps ...",
          flush=True)
    # Per call, besides the wall time that bench.time_round_robin takes: the process's CPU time
    # (all threads; far less sensitive than wall time to other processes on a shared machine),
    # and after every round the 1-minute load average.
    loads: list[float] = []
    cpu: dict[str, list[float]] = {n: [] for n in fns}

    def with_cpu(name: str, fn: Callable[[], object], last: bool) -> Callable[[], object]:
        def call() -> object:
            c0 = time.process_time()
            out = fn()
            cpu[name].append(time.process_time() - c0)
            if last:
                with contextlib.suppress(OSError):
                    loads.append(os.getloadavg()[0])
            return out

        return call

    names = list(fns)
    fns = {n: with_cpu(n, f, n == names[-1]) for n, f in fns.items()}
    t0 = time.perf_counter()
    timing = bench.time_round_robin(fns, device, warmup=args.warmup, steps=args.reps)
    res["loadavg_1min_per_round"] = loads
    res["timing_wall_s"] = time.perf_counter() - t0
    res["uptime_after"] = uptime()
    res["times"] = timing
    cpu_times = {n: {"times_s": c[args.warmup:], "median_s": statistics.median(c[args.warmup:]),
                     "min_s": min(c[args.warmup:]), "max_s": max(c[args.warmup:])} for n, c in cpu.items()}
    res["cpu_times"] = cpu_times
    # cpu / wall per call: ~ the threads in use when the process had the cores to itself, less when not
    res["cpu_per_wall"] = {n: [c / w for c, w in zip(cpu_times[n]["times_s"], timing[n]["times_s"])] for n in names}
    # Quiet rounds: every contender ran with cpu/wall >= 0.9 x threads, i.e. had all its threads on
    # the cores (only meaningful with >= 2 threads: a contended 2-thread step drops to ~1).
    threads = torch.get_num_threads()
    quiet = ([i for i in range(args.reps) if min(res["cpu_per_wall"][n][i] for n in names) >= QUIET * threads]
             if threads > 1 else [])
    res["quiet_rounds"] = {"threshold_cpu_per_wall": QUIET * threads, "rounds": quiet,
                           "times_median_s": {n: statistics.median([timing[n]["times_s"][i] for i in quiet])
                                              for n in names} if quiet else {}}
    ratios: dict[str, dict] = {}
    pairs = []
    for mname in models:
        suffix = "" if mname == "AuthorsConv4" else f" ({mname})"
        eager, fast = f"robust-meta eager{suffix}", f"robust-meta fast_paths{suffix}"
        if "authors" in fns:
            pairs += [("authors", eager), ("authors", fast)]
        pairs.append((eager, fast))
    for num, den in pairs:
        key = f"{num} / {den}"
        ratios[key] = {**bench.per_rep_ratio(timing[num], timing[den]),
                       "ratio_of_min_wall": timing[num]["min_s"] / timing[den]["min_s"],
                       "cpu_time": bench.per_rep_ratio(cpu_times[num], cpu_times[den])}
        if quiet:
            sub = {n: {"times_s": [timing[n]["times_s"][i] for i in quiet]} for n in (num, den)}
            ratios[key]["quiet_rounds"] = bench.per_rep_ratio(sub[num], sub[den])
    res["ratios"] = ratios

    w = max(len(n) for n in names)
    print(f"\n{cfg.name}: 5-way {cfg.shots}-shot {cfg.queries}-query, {cfg.tasks} tasks, K={K_TRAIN}, FGSM-RS, "
          f"first order; {args.reps} reps interleaved; {torch.get_num_threads()} threads")
    print(f"{'contender':<{w}}  {'wall median ms':>14}  {'min–max ms':>13}  {'CPU median ms':>13}  {'GFLOP':>6}  "
          "conv1 fwd (images) / bwd (w, x)")
    for n in names:
        t, c, p = timing[n], cpu_times[n], res["passes"][n]
        print(f"{n:<{w}}  {1e3 * t['median_s']:14.0f}  {1e3 * t['min_s']:6.0f}–{1e3 * t['max_s']:<6.0f}  "
              f"{1e3 * c['median_s']:13.0f}  {res['flops'][n] / 1e9:6.1f}  {p['forward']} ({p['forward_images']}) / "
              f"{p['backward']} ({p['backward_weight_grad']}, {p['backward_input_grad']})")
    if quiet:
        print(f"quiet rounds (all contenders at cpu/wall >= {QUIET * threads:.1f}): {len(quiet)} of {args.reps}; "
              "wall medians there: " + ", ".join(f"{n} {1e3 * t:.0f} ms"
                                                 for n, t in res["quiet_rounds"]["times_median_s"].items()))
    elif threads > 1:
        print(f"quiet rounds (all contenders at cpu/wall >= {QUIET * threads:.1f}): none of {args.reps}")
    kw = max(len(k) for k in ratios)
    print(f"\n{'ratio':<{kw + 2}}  wall per rep: median [min–max]  min/min  CPU per rep: median [min–max]")
    for k, r in ratios.items():
        c = r["cpu_time"]
        q = r.get("quiet_rounds")
        print(f"  {k:<{kw}}  {r['median']:5.2f}× [{r['min']:.2f}–{r['max']:.2f}]{'':>12}{r['ratio_of_min_wall']:5.2f}×"
              f"  {c['median']:5.2f}× [{c['min']:.2f}–{c['max']:.2f}]"
              + (f"  quiet: {q['median']:5.2f}× [{q['min']:.2f}–{q['max']:.2f}]" if q else ""))
    if loads:
        print(f"\n1-min load average over the rounds: {min(loads):.2f}–{max(loads):.2f}")
    print(f"{res['uptime_after']}", flush=True)
    return res


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--authors-code", default=None, metavar="PATH",
                   help="a checkout of github.com/wangren09/MetaAdv (without it: robust-meta only)")
    p.add_argument("--authors-module", default="metafgsm", help="their meta-learner module (default metafgsm)")
    p.add_argument("--tiny", action="store_true", help="48x48x3, 4 filters, 2 tasks, 1 rep (seconds; for tests)")
    p.add_argument("--reps", type=int, default=None, help="timed reps per contender (default 10; --tiny 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--rm-model", choices=["mirror", "learner", "both"], default="mirror",
                   help="robust-meta runs AuthorsConv4 (default), their Learner object, or both")
    p.add_argument("--compile", choices=["off", "on", "auto"], default=None,
                   help="passed to fast_paths(compile=...) (default: fast_paths() as is)")
    p.add_argument("--mallopt", choices=["on", "off"], default="on",
                   help="off: ROBUST_META_MALLOPT=0 (fast_paths' process-wide malloc tuning off for all; "
                        "takes effect only before the process's first fast path)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--note", default=None, help="free text stored in the JSON (e.g. which robust-meta was measured)")
    args = p.parse_args(argv)
    if args.reps is None:
        args.reps = 1 if args.tiny else 10
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    t0 = time.perf_counter()
    threads, malloc_env = torch.get_num_threads(), os.environ.get("ROBUST_META_MALLOPT")
    try:
        res = run(args)
    finally:  # main() may run inside a test session: leave the process as it was
        torch.set_num_threads(threads)
        if args.mallopt == "off":
            if malloc_env is None:
                os.environ.pop("ROBUST_META_MALLOPT", None)
            else:
                os.environ["ROBUST_META_MALLOPT"] = malloc_env
    res["wall_s"] = time.perf_counter() - t0
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1, default=str)
    return res


if __name__ == "__main__":
    main()
