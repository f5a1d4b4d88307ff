"""robust-meta against a re-implementation of the authors' research-code meta-step (issue 13).

Usage::

    python benchmarks/research_baseline.py [--quick | --tiny] [--reps N] [--warmup N]
                                           [--arch conv4|authors] [--compile off|on|auto]
                                           [--no-fast-paths] [--device cpu|cuda] [--json out.json]

What is compared, in one process, on the same tasks, timed **interleaved** (for every rep each
contender runs once, in a fixed order A B [C] A B [C] ..., after warm-up; median and min–max
over ``--reps``; the ratio baseline / robust-meta is taken per rep, and its median reported):

1. **R-MAML_out-FGSM meta-step, first order** (the paper's setting: Conv4 with 32 filters,
   84×84×3, 5-way 1-shot 15-query, 4 tasks, K = 5 inner steps of 0.01, ε = 2/255, FGSM step
   1.25ε from a uniform random start, γ_out = 0.2):

   * ``research``: `ResearchStyleMeta`, written here after the structure of the authors'
     research code (wangren09/MetaAdv, ``metafgsm.py`` / ``learner.py``; our own code, none
     of theirs is copied): a `Learner` holding a flat list of weights and a functional
     forward (``F.conv2d`` / ``F.batch_norm(training=True)`` / ``F.relu`` /
     ``F.max_pool2d`` / ``F.linear``); a loop over tasks with the inner update through
     ``torch.autograd.grad`` and a list comprehension over the weights; the query-set
     bookkeeping of MAML-Pytorch (loss and accuracy before and after the first inner step
     without a graph, then after every further step *with* a graph); the FGSM-RS
     adversarial query of their code (random start, a full ``loss.backward()`` that also
     fills the meta-parameters' ``.grad``, one signed step of 1.25ε, projection) against
     the final fast weights; the outer losses summed over tasks / task_num, and **two**
     backward passes and **two** Adam steps (clean loss at lr 1e-3, adversarial loss at
     lr 2e-4 — the ratio 0.2 is the γ_out of the robust-meta side). Per task, with K = 5:

     ====================  ==========================================================
     support set           5 forwards + 5 backwards (gradients w.r.t. the weights)
     clean query, no grad  2 forwards (meta-weights; after inner step 1) + accuracy
     clean query, graph    4 forwards (after inner steps 2..5; only the last one is
                           the outer loss) + accuracy (``.item()`` each)
     FGSM attack           1 forward + 1 full backward (noise *and* weights)
     adversarial query     1 forward with graph (the adversarial outer loss) + accuracy
     ====================  ==========================================================

     then, once per meta-step, backward of the clean outer loss + Adam, backward of the
     adversarial outer loss + Adam.

   * ``robust-meta``: the same step through the public API — ``robust_meta.adapt(...,
     first_order=True)`` and ``robust_meta.RobustMetaUpdate(F.cross_entropy, model,
     attack="fgsm", eps=2/255, gamma_out=0.2)`` on ``robust_meta.Conv4(3, 5, hidden=32,
     image_size=84)``, the mean over tasks, one backward, one Adam step (lr 1e-3) — eagerly,
     and (when ``robust_meta.fast_paths`` exists) inside ``robust_meta.fast_paths(compile=...)``,
     entered around every step (the first, compiling, calls fall in the warm-up).

2. **Plain MAML meta-step, first order**: the same research-style step without the attack
   (as the authors' ``MAMLMeta.py``: one backward, one Adam step) against robust-meta's
   (``RobustMetaUpdate(..., attack="none", gamma_out=0)``).

3. **Evaluation** (S-FT 10 steps of 0.01 on the support set, SA on the query, PGD-10 with
   ε = 2/255, step 2.5ε/10, uniform random start, against the fine-tuned weights, RA): a
   plain eager per-task loop (`plain_eval_loop`, ``torch.func.functional_call``) against
   ``robust_meta.evaluate(model, tasks, eps=2/255, steps=10, step_size=0.01,
   attacks=("pgd",), attack_steps=10, seed=0, progress=False)``: tasks/s, SA and RA of both.
   The loop draws its random starts like ``robust_meta.linf_pgd`` from the same seeds, so its
   SA and RA should equal evaluate's. The fast-path variant runs ``evaluate`` inside
   ``fast_paths(compile=...)`` and passes it ``compile=`` too (evaluate resolves its own
   setting; with ``"auto"`` it compiles only for many tasks — see ``--eval-tasks``).

**Architecture.** ``--arch conv4`` (default) gives the `Learner` the layer layout of
``robust_meta.Conv4`` (conv 3×3 pad 1 → BN → ReLU → 2×2 max-pool, ×4, linear): the same
network, the same FLOPs per forward; only the step around it differs. ``--arch authors``
uses the authors' MiniImageNet layout (conv 3×3 pad 0 → ReLU → BN → max-pool, the last pool
with stride 1, linear 800 → 5): the same parameter shapes, slightly *fewer* FLOPs per
forward than robust-meta's Conv4. FLOPs per step are printed for every contender.

**Correctness.** Before timing, with the same initial weights and the same tasks, the
research-style MAML step and robust-meta's MAML step must give the same meta-gradient, and
so must the research-style R-MAML_out-FGSM step at ε = 0 (clean gradient + 0.2 ×
adversarial gradient) and robust-meta's (``eps=0``): the max abs differences are printed and
must stay below ``GRAD_TOL`` times the largest gradient entry.

``--quick``: 3 reps, 4 evaluation tasks. ``--tiny``: 28×28×1 images, hidden 8, 2 tasks,
1 rep (a test runs it in seconds; the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402  (benchmarks/bench.py, next to this file: its Config)

import robust_meta  # noqa: E402

EPS = 2 / 255
INNER_LR = 0.01
K_TRAIN = 5
META_LR = 1e-3
GAMMA_OUT = 0.2
# The research code takes a second Adam step on the adversarial loss at 2e-4 = 0.2 x 1e-3.
ADV_META_LR = GAMMA_OUT * META_LR
FGSM_STEP = 1.25  # x eps
EVAL_STEPS = 10
PGD_STEPS = 10
PGD_STEP = 2.5 * EPS / PGD_STEPS
# max |research - robust-meta| / max |grad|: float32 sums over ~10^5 terms per conv-weight
# gradient, in a different order when the two outer losses are backpropagated together.
GRAD_TOL = 1e-4
TARGET_FGSM = 4.0  # issue 13: R-MAML_out-FGSM meta-step >= 4x the research code's ...
FLOOR_FGSM = 3.0  # ... at least 3x
TARGET_WORKERS = 1.3
TARGET_EVAL = 2.0  # evaluate() >= 2x the tasks/s of a plain eager per-task loop


# ----------------------------------------------------------------------------- setup


@dataclass
class Setup(bench.Config):
    """``bench.Config`` (network, images, tasks per meta-step) plus the evaluation tasks."""

    eval_tasks: int


FULL = Setup(**asdict(bench.CONFIGS["conv4-84"]), eval_tasks=10)
TINY = Setup("tiny-28", 1, 28, 8, 5, 1, 15, 2, 4)


def make_tasks(s: Setup, n: int, device: torch.device, seed: int) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """``n`` tasks whose classes are noisy copies of a random prototype image (learnable, so
    SA is above chance and RA below SA)."""
    g = torch.Generator().manual_seed(seed)
    shape = (s.in_channels, s.image_size, s.image_size)
    out = []
    for _ in range(n):
        protos = torch.rand(s.ways, *shape, generator=g)

        def draw(per_class: int, protos: Tensor = protos) -> tuple[Tensor, Tensor]:
            y = torch.arange(s.ways).repeat_interleave(per_class)
            x = (protos[y] + 0.1 * torch.randn(len(y), *shape, generator=g)).clamp(0, 1)
            return x.to(device), y.to(device)

        sx, sy = draw(s.shots)
        qx, qy = draw(s.queries)
        out.append((sx, sy, qx, qy))
    return out


def stacked(tasks) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The research code's batch layout: ``[task_num, setsz, c, h, w]`` and ``[task_num, setsz]``."""
    return tuple(torch.stack([t[i] for t in tasks]) for i in range(4))  # type: ignore[return-value]


# ----------------------------------------------------------------------------- research-style step


def conv4_layout(s: Setup) -> list[tuple[str, list]]:
    """robust_meta.Conv4's layers as a Learner config: (conv pad 1, BN, ReLU, pool 2) x 4, linear."""
    cfg: list[tuple[str, list]] = []
    cin, size = s.in_channels, s.image_size
    for _ in range(4):
        cfg += [("conv2d", [s.hidden, cin, 3, 3, 1, 1]), ("bn", [s.hidden]), ("relu", [True])]
        if size >= 2:  # Conv4 skips the pool once the map is 1 pixel wide
            cfg.append(("max_pool2d", [2, 2, 0]))
            size //= 2
        cin = s.hidden
    return cfg + [("flatten", []), ("linear", [s.ways, s.hidden * size * size])]


def authors_layout(s: bench.Config) -> list[tuple[str, list]]:
    """The authors' MiniImageNet layout: (conv pad 0, ReLU, BN, pool) x 4, last pool stride 1.

    Any `bench.Config` (``in_channels``, ``image_size``, ``hidden``, ``ways``); also used by
    ``benchmarks/authors_code.py``.
    """
    cfg: list[tuple[str, list]] = []
    cin, size = s.in_channels, s.image_size
    for block in range(4):
        stride = 1 if block == 3 else 2
        cfg += [("conv2d", [s.hidden, cin, 3, 3, 1, 0]), ("relu", [True]), ("bn", [s.hidden]),
                ("max_pool2d", [2, stride, 0])]
        size = (size - 2 - 2) // stride + 1
        if size < 1:
            raise ValueError(f"the authors' Conv4 needs images larger than {s.image_size}x{s.image_size}")
        cin = s.hidden
    return cfg + [("flatten", []), ("linear", [s.ways, s.hidden * size * size])]


class Learner(nn.Module):
    """A network as a flat list of weights plus a functional forward over a layer config
    (the shape of MAML-Pytorch's / the authors' ``Learner``). Batch norm always normalises
    with the batch statistics and updates running statistics kept outside ``vars``."""

    def __init__(self, config: list[tuple[str, list]]):
        super().__init__()
        self.config = config
        self.vars = nn.ParameterList()
        self.vars_bn: list[Tensor] = []
        for name, arg in config:
            if name in ("conv2d", "linear"):
                shape = arg[:4] if name == "conv2d" else arg
                w = nn.Parameter(torch.empty(*shape))
                nn.init.kaiming_normal_(w)
                self.vars.extend([w, nn.Parameter(torch.zeros(arg[0]))])
            elif name == "bn":
                self.vars.extend([nn.Parameter(torch.ones(arg[0])), nn.Parameter(torch.zeros(arg[0]))])
                self.vars_bn += [torch.zeros(arg[0]), torch.ones(arg[0])]

    def _apply(self, fn, recurse=True):  # move the running statistics with .to(device)
        out = super()._apply(fn, recurse)
        self.vars_bn = [fn(t) for t in self.vars_bn]
        return out

    def parameters(self, recurse: bool = True):  # a list, as in the research code
        return self.vars

    def forward(self, x: Tensor, vars: Sequence[Tensor] | None = None, bn_training: bool = True) -> Tensor:
        weights = self.vars if vars is None else vars
        i = j = 0
        for name, arg in self.config:
            if name == "conv2d":
                x = F.conv2d(x, weights[i], weights[i + 1], stride=arg[4], padding=arg[5])
                i += 2
            elif name == "linear":
                x = F.linear(x, weights[i], weights[i + 1])
                i += 2
            elif name == "bn":
                x = F.batch_norm(x, self.vars_bn[j], self.vars_bn[j + 1], weight=weights[i],
                                 bias=weights[i + 1], training=bn_training)
                i += 2
                j += 2
            elif name == "relu":
                x = F.relu(x, inplace=arg[0])
            elif name == "max_pool2d":
                x = F.max_pool2d(x, arg[0], arg[1], arg[2])
            elif name == "flatten":
                x = x.view(x.size(0), -1)
            else:
                raise NotImplementedError(name)
        assert i == len(weights) and j == len(self.vars_bn)
        return x

    def load_from(self, model: nn.Module) -> Learner:
        """Copy ``model``'s parameters (same order and shapes) into ``vars``."""
        src = list(model.parameters())
        if len(src) != len(self.vars) or any(a.shape != b.shape for a, b in zip(src, self.vars)):
            raise ValueError("the Learner's weights do not line up with the model's")
        with torch.no_grad():
            for dst, p in zip(self.vars, src):
                dst.copy_(p)
        return self


def _n_correct(logits: Tensor, y: Tensor) -> int:
    # as the research code: softmax, argmax, compare, .item() (a device sync per call)
    return torch.eq(F.softmax(logits, dim=1).argmax(dim=1), y).sum().item()


class ResearchStyleMeta:
    """One first-order meta-step in the manner of the authors' research code.

    ``adversarial=True``: R-MAML_out with FGSM-RS on the query set (``metafgsm.py``);
    ``False``: plain MAML (``MAMLMeta.py`` with its attack switched off). See the module
    docstring for the passes it makes. ``capture`` (a list) receives a copy of the
    meta-gradient after each outer backward (for the correctness check; off when timing).
    """

    def __init__(self, learner: Learner, *, adversarial: bool, eps: float = EPS,
                 update_lr: float = INNER_LR, update_step: int = K_TRAIN):
        if update_step < 2:
            raise ValueError("the research-style step needs update_step >= 2")
        self.net = learner
        self.adversarial = adversarial
        self.eps = eps
        self.update_lr = update_lr
        self.update_step = update_step
        self.meta_optim = torch.optim.Adam(self.net.parameters(), lr=META_LR)
        self.meta_optim_adv = torch.optim.Adam(self.net.parameters(), lr=ADV_META_LR) if adversarial else None

    def _fgsm_rs(self, qx: Tensor, qy: Tensor, fast: list[Tensor]) -> Tensor:
        """The research code's adversarial query: random start, one full backward, one step."""
        eps = self.eps
        self.net.eval()  # no effect on the functional forward (bn_training=True), as there
        noise = torch.zeros_like(qx).uniform_(-eps, eps)
        noise_leaf = noise.detach().requires_grad_(True)
        start = (qx + noise_leaf).clamp_(0, 1)
        loss = F.cross_entropy(self.net(start, fast, bn_training=True), qy)
        loss.backward()  # fills noise_leaf.grad *and* the meta-parameters' .grad
        noise = (noise + FGSM_STEP * eps * torch.sign(noise_leaf.grad)).clamp_(-eps, eps)
        adv = (qx + noise).clamp_(0, 1)
        self.net.train()
        return adv

    def __call__(self, x_spt: Tensor, y_spt: Tensor, x_qry: Tensor, y_qry: Tensor,
                 capture: list | None = None) -> tuple[list[float], list[float]]:
        task_num, query_size = x_spt.size(0), x_qry.size(1)
        K, lr = self.update_step, self.update_lr
        losses_q = [0.0 for _ in range(K + 1)]  # losses_q[k]: query loss after k inner steps
        corrects = [0 for _ in range(K + 1)]
        losses_q_adv = [0.0 for _ in range(K + 1)]
        corrects_adv = [0 for _ in range(K + 1)]
        meta_weights = self.net.parameters()
        # built (and left unused) at every call, as in the research code
        torch.optim.SGD(meta_weights, lr=self.update_lr, momentum=0.9, weight_decay=5e-4)

        for i in range(task_num):
            sx, sy, qx, qy = x_spt[i], y_spt[i], x_qry[i], y_qry[i]
            # inner step 1, from the meta-weights
            loss = F.cross_entropy(self.net(sx, vars=None, bn_training=True), sy)
            grads = torch.autograd.grad(loss, meta_weights)
            fast = [w - lr * g for g, w in zip(grads, meta_weights)]

            # query loss and accuracy before and after step 1, without a graph
            with torch.no_grad():
                for slot, weights in ((0, meta_weights), (1, fast)):
                    logits_q = self.net(qx, weights, bn_training=True)
                    losses_q[slot] += F.cross_entropy(logits_q, qy)
                    corrects[slot] += _n_correct(logits_q, qy)

            for k in range(1, K):
                loss = F.cross_entropy(self.net(sx, fast, bn_training=True), sy)
                grads = torch.autograd.grad(loss, fast)
                fast = [w - lr * g for g, w in zip(grads, fast)]

                last = k == K - 1
                if self.adversarial and last:
                    adv = self._fgsm_rs(qx, qy, fast)
                    logits_q_adv = self.net(adv, fast, bn_training=True)
                    losses_q_adv[k + 1] += F.cross_entropy(logits_q_adv, qy)

                # with a graph at every step; only the last one is used by the outer loss
                logits_q = self.net(qx, fast, bn_training=True)
                losses_q[k + 1] += F.cross_entropy(logits_q, qy)
                with torch.no_grad():
                    corrects[k + 1] += _n_correct(logits_q, qy)
                    if self.adversarial and last:
                        corrects_adv[k + 1] += _n_correct(logits_q_adv, qy)

        self.meta_optim.zero_grad()
        (losses_q[-1] / task_num).backward()
        if capture is not None:
            capture.append([p.grad.detach().clone() for p in meta_weights])
        self.meta_optim.step()
        if self.adversarial:
            self.meta_optim_adv.zero_grad()
            (losses_q_adv[-1] / task_num).backward()
            if capture is not None:
                capture.append([p.grad.detach().clone() for p in meta_weights])
            self.meta_optim_adv.step()

        accs = [c / (query_size * task_num) for c in corrects]
        accs_adv = [c / (query_size * task_num) for c in corrects_adv]
        return accs, accs_adv


# ----------------------------------------------------------------------------- robust-meta step


class RobustMetaStep:
    """The same meta-step through robust-meta's public API (first order, one Adam step)."""

    def __init__(self, model: nn.Module, tasks, *, adversarial: bool, eps: float = EPS,
                 context: Callable[[], contextlib.AbstractContextManager] | None = None):
        self.model, self.tasks, self.context = model, tasks, context
        self.robust = robust_meta.RobustMetaUpdate(
            F.cross_entropy, model, attack="fgsm" if adversarial else "none", eps=eps,
            gamma_out=GAMMA_OUT if adversarial else 0.0,
        )
        self.opt = torch.optim.Adam(model.parameters(), lr=META_LR)

    def __call__(self) -> float:
        with self.context() if self.context is not None else contextlib.nullcontext():
            self.opt.zero_grad(set_to_none=True)
            losses = []
            for sx, sy, qx, qy in self.tasks:
                fast = robust_meta.adapt(self.model, sx, sy, steps=K_TRAIN, step_size=INNER_LR, first_order=True)
                losses.append(self.robust(qx, qy, params=fast))
            loss = torch.stack(losses).mean()
            loss.backward()
            self.opt.step()
        return float(loss.detach())


# ----------------------------------------------------------------------------- evaluation


def plain_eval_loop(model: nn.Module, tasks, *, seed: int = 0) -> dict:
    """A plain eager per-task loop: S-FT 10 steps, SA, PGD-10 against the fine-tuned weights, RA.

    Runs ``model`` as it is (train mode: batch statistics) through
    ``torch.func.functional_call``. Random starts are drawn like ``robust_meta.linf_pgd``
    (``empty_like(x).uniform_(-eps, eps)``) after ``manual_seed(seed + i)`` for task ``i``, in
    a forked RNG, as ``evaluate(seed=...)`` does (one private stream per task).
    """
    from torch.func import functional_call

    meta = {n: p.detach() for n, p in model.named_parameters()}
    sa, ra = [], []
    for i, (sx, sy, qx, qy) in enumerate(tasks):
        with torch.random.fork_rng(devices=[qx.device] if qx.device.type == "cuda" else []):
            torch.manual_seed(seed + i)
            fast = meta
            for _ in range(EVAL_STEPS):
                fast = {n: w.detach().requires_grad_(True) for n, w in fast.items()}
                loss = F.cross_entropy(functional_call(model, fast, (sx,)), sy)
                grads = torch.autograd.grad(loss, list(fast.values()))
                fast = {n: w.detach() - INNER_LR * g for (n, w), g in zip(fast.items(), grads)}
            with torch.no_grad():
                sa.append(float((functional_call(model, fast, (qx,)).argmax(1) == qy).float().mean()))
            x0 = qx.detach()
            adv = (x0 + torch.empty_like(x0).uniform_(-EPS, EPS)).clamp(0, 1)
            for _ in range(PGD_STEPS):
                adv.requires_grad_(True)
                loss = F.cross_entropy(functional_call(model, fast, (adv,)), qy)
                (g,) = torch.autograd.grad(loss, adv)
                adv = adv.detach() + PGD_STEP * g.sign()
                adv = (x0 + (adv - x0).clamp(-EPS, EPS)).clamp(0, 1)
            with torch.no_grad():
                ra.append(float((functional_call(model, fast, (adv,)).argmax(1) == qy).float().mean()))
    return {"sa": statistics.fmean(sa), "ra": statistics.fmean(ra), "sa_values": sa, "ra_values": ra}


#: ``evaluate`` as robust-meta 0.1 ran it: no compilation, inputs as given.
EAGER_EVAL = {"compile": False, "channels_last": False}


def rm_evaluate(model: nn.Module, tasks, context=None, **extra) -> dict:
    with context() if context is not None else contextlib.nullcontext():
        res = robust_meta.evaluate(model, tasks, eps=EPS, steps=EVAL_STEPS, step_size=INNER_LR,
                                   attacks=("pgd",), attack_steps=PGD_STEPS, seed=0, progress=False, **extra)
    sa, ra = res.metrics["sa"], res.metrics["ra"]
    return {"sa": sa.mean, "ra": ra.mean, "sa_values": list(sa.values), "ra_values": list(ra.values),
            "warnings": list(res.warnings)}


# ----------------------------------------------------------------------------- measurement


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int,
                reps: int) -> tuple[dict[str, list[float]], dict[str, object]]:
    """Warm every contender up, then time them round-robin (A B C A B C ...): one call each
    per rep, in the same order every rep. Returns the times and each contender's last result."""
    last: dict[str, object] = {}
    for _ in range(warmup):
        for name, fn in fns.items():
            last[name] = fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            last[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times, last


def summary(ts: Sequence[float]) -> dict:
    return {"median": statistics.median(ts), "min": min(ts), "max": max(ts), "values": list(ts)}


def ratios(base: Sequence[float], other: Sequence[float]) -> dict:
    """Per-rep ``base / other`` (> 1: ``other`` is faster), median and min–max."""
    return summary([b / o for b, o in zip(base, other)])


class _GlobalOnly:
    """FlopCounterMode's ModuleTracker breaks ``autograd.grad(..., inputs=<leaf>)``; totals suffice."""

    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def count_flops(fn: Callable[[], object]) -> int | None:
    from torch.utils.flop_counter import FlopCounterMode

    try:
        fc = FlopCounterMode(display=False)
        fc.mod_tracker = _GlobalOnly()
        with fc:
            fn()
        return int(fc.get_total_flops())
    except Exception as err:  # noqa: BLE001 - FLOPs are informative only
        print(f"  (FLOP count failed: {type(err).__name__}: {str(err)[:100]})", flush=True)
        return None


def machine_info(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "robust_meta": robust_meta.__version__, "platform": platform.platform(),
            "cores": os.cpu_count(), "threads": torch.get_num_threads(), "device": str(device)}
    try:
        with open("/proc/cpuinfo") as fh:
            m = re.search(r"model name\s*:\s*(.+)", fh.read())
        info["cpu"] = m.group(1).strip() if m else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError, AttributeError):
        info["loadavg"] = os.getloadavg()
    return info


# ----------------------------------------------------------------------------- correctness


def max_abs_diff(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def gradient_check(base: nn.Module, layout, tasks, device) -> dict:
    """Same weights, same tasks: research-style vs robust-meta meta-gradients (MAML, and
    R-MAML_out-FGSM at eps = 0, where the adversarial query is the clean one)."""
    out = {}
    xs = stacked(tasks)
    for label, adversarial in (("maml", False), ("fgsm_eps0", True)):
        learner = Learner(layout).to(device).load_from(base)
        captured: list[list[Tensor]] = []
        ResearchStyleMeta(learner, adversarial=adversarial, eps=0.0)(*xs, capture=captured)
        ref = captured[0] if not adversarial else [c + GAMMA_OUT * a for c, a in zip(*captured)]
        model = copy.deepcopy(base)
        RobustMetaStep(model, tasks, adversarial=adversarial, eps=0.0)()
        ours = [p.grad for p in model.parameters()]
        diff = max_abs_diff(ref, ours)
        scale = max(float(g.abs().max()) for g in ref)
        out[label] = {"max_abs_diff": diff, "max_abs_grad": scale, "rel_diff": diff / scale,
                      "ok": diff <= GRAD_TOL * scale}
    return out


# ----------------------------------------------------------------------------- driver


def compile_value(setting: str) -> bool | str:
    return {"on": True, "off": False}.get(setting, setting)


def fast_paths_context(setting: str) -> Callable[[], contextlib.AbstractContextManager]:
    fp = robust_meta.fast_paths
    value = compile_value(setting)
    return lambda: fp(compile=value)


def run(args) -> dict:
    s = copy.copy(TINY if args.tiny else FULL)
    if args.quick:
        s.eval_tasks = 4
    if args.eval_tasks is not None:
        s.eval_tasks = args.eval_tasks
    device = torch.device(args.device)
    layout = conv4_layout(s) if args.arch == "conv4" else authors_layout(s)
    torch.manual_seed(0)
    base = robust_meta.Conv4(s.in_channels, s.ways, hidden=s.hidden, image_size=s.image_size).to(device).train()
    tasks = make_tasks(s, s.tasks, device, seed=0)
    eval_tasks = make_tasks(s, s.eval_tasks, device, seed=1)
    res: dict = {"machine": machine_info(device), "setup": asdict(s), "arch": args.arch,
                 "reps": args.reps, "warmup": args.warmup, "first_order": True, "k": K_TRAIN,
                 "eps": EPS, "gamma_out": GAMMA_OUT}
    m = res["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} threads, "
          f"device {m['device']}{', ' + m['gpu'] if 'gpu' in m else ''}", flush=True)
    print(f"setup: Conv4 hidden {s.hidden}, {s.image_size}x{s.image_size}x{s.in_channels}, {s.ways}-way "
          f"{s.shots}-shot {s.queries}-query, {s.tasks} tasks/step, K={K_TRAIN}, first order; research "
          f"Learner layout: {args.arch}; {args.reps} reps interleaved after {args.warmup} warm-up", flush=True)

    # ---- correctness (needs the conv4 layout: the same function as robust_meta.Conv4)
    check_layout = conv4_layout(s)
    res["gradient_check"] = gradient_check(base, check_layout, tasks, device)
    for label, c in res["gradient_check"].items():
        print(f"check {label}: meta-gradient max|research - robust-meta| = {c['max_abs_diff']:.3g} "
              f"(max|grad| {c['max_abs_grad']:.3g}, relative {c['rel_diff']:.2g}) "
              f"{'OK' if c['ok'] else 'FAILED'}", flush=True)
    if not all(c["ok"] for c in res["gradient_check"].values()):
        raise SystemExit(f"gradient check failed (relative tolerance {GRAD_TOL})")

    fast_ctx = None
    setting = None
    if args.compile is not None:
        setting = args.compile
    elif not args.no_fast_paths and hasattr(robust_meta, "fast_paths"):
        setting = "auto"
    if setting is not None:
        fast_ctx = fast_paths_context(setting)
        res["fast_paths"] = f"compile={setting}"
    else:
        res["fast_paths"] = "not measured" if args.no_fast_paths else "robust_meta.fast_paths not available"
    fp_name = f"robust-meta fast_paths({res['fast_paths']})"
    xs = stacked(tasks)

    # ---- meta-steps
    res["steps"] = {}
    for label, adversarial in (("R-MAML_out-FGSM", True), ("MAML", False)):
        learner = Learner(layout).to(device).load_from(base)
        research = ResearchStyleMeta(learner, adversarial=adversarial)
        fns: dict[str, Callable[[], object]] = {
            "research": lambda research=research: research(*xs),
            "robust-meta eager": RobustMetaStep(copy.deepcopy(base), tasks, adversarial=adversarial),
        }
        if fast_ctx is not None:
            fns[fp_name] = RobustMetaStep(copy.deepcopy(base), tasks, adversarial=adversarial, context=fast_ctx)
        flops = {name: count_flops(fn) for name, fn in fns.items() if name != fp_name}  # also a warm-up
        times, _ = interleaved(fns, device, warmup=args.warmup, reps=args.reps)
        row: dict = {"times_s": {n: summary(t) for n, t in times.items()}, "flops": flops}
        row["speedup"] = {n: ratios(times["research"], t) for n, t in times.items() if n != "research"}
        res["steps"][label] = row
        print(f"\n{label} meta-step ({args.reps} reps, interleaved):", flush=True)
        for n, t in row["times_s"].items():
            f = flops.get(n)
            line = (f"  {n:<40} {t['median'] * 1e3:9.1f} ms  [{t['min'] * 1e3:.1f}–{t['max'] * 1e3:.1f}]"
                    f"{'' if f is None else f'  {f / 1e9:7.2f} GFLOP'}")
            if n in row["speedup"]:
                r = row["speedup"][n]
                line += f"  research/this {r['median']:.2f}x [{r['min']:.2f}–{r['max']:.2f}]"
            print(line, flush=True)
        if flops.get("research") and flops.get("robust-meta eager"):
            row["flop_ratio"] = flops["research"] / flops["robust-meta eager"]
            print(f"  FLOP ratio research/robust-meta: {row['flop_ratio']:.2f}", flush=True)
        if adversarial:
            best = max(r["median"] for r in row["speedup"].values())
            verdict = ("meets the target" if best >= TARGET_FGSM else
                       "meets the floor only" if best >= FLOOR_FGSM else "below the floor")
            row["target"] = {"target": TARGET_FGSM, "floor": FLOOR_FGSM, "best_median": best, "verdict": verdict}
            print(f"  issue-13 target >= {TARGET_FGSM:g}x (floor {FLOOR_FGSM:g}x): best {best:.2f}x -> {verdict}",
                  flush=True)

    # ---- evaluation
    fns = {
        "plain loop": lambda: plain_eval_loop(copy.deepcopy(base), eval_tasks, seed=0),
        "evaluate eager": lambda: rm_evaluate(base, eval_tasks, **EAGER_EVAL),
    }
    if fast_ctx is not None:
        # evaluate() takes compile= (and channels_last=) itself; "auto" compiles only for many
        # tasks, so the fast contender passes the setting through.
        fast_kw = {"compile": compile_value(setting), "channels_last": "auto"}
        res["eval_fast_kwargs"] = {k: str(v) for k, v in fast_kw.items()}
        fns["evaluate fast"] = lambda: rm_evaluate(base, eval_tasks, **fast_kw)
        if args.eval_workers > 1:
            fns[f"evaluate fast workers={args.eval_workers}"] = lambda: rm_evaluate(
                base, eval_tasks, workers=args.eval_workers, **fast_kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", robust_meta.EvalWarning)
        times, last = interleaved(fns, device, warmup=args.warmup, reps=args.reps)
    n = len(eval_tasks)
    ev: dict = {"n_tasks": n, "times_s": {k: summary(t) for k, t in times.items()},
                "tasks_per_s": {k: n / statistics.median(t) for k, t in times.items()},
                "speedup": {k: ratios(times["plain loop"], t) for k, t in times.items() if k != "plain loop"},
                "sa": {k: v["sa"] for k, v in last.items()}, "ra": {k: v["ra"] for k, v in last.items()},
                "per_task": {k: {"sa": v["sa_values"], "ra": v["ra_values"]} for k, v in last.items()},
                "warnings": last["evaluate eager"]["warnings"]}
    loop = last["plain loop"]
    ev["agreement"] = {
        k: {"sa_max_abs_diff": max_abs_diff_f(loop["sa_values"], v["sa_values"]),
            "ra_max_abs_diff": max_abs_diff_f(loop["ra_values"], v["ra_values"])}
        for k, v in last.items() if k != "plain loop"
    }
    res["eval"] = ev
    print(f"\nevaluation (S-FT {EVAL_STEPS} + PGD-{PGD_STEPS}, {n} tasks, {args.reps} reps, interleaved):", flush=True)
    for k, t in ev["times_s"].items():
        line = (f"  {k:<40} {ev['tasks_per_s'][k]:7.2f} tasks/s  [{n / t['max']:.2f}–{n / t['min']:.2f}]  "
                f"SA {100 * ev['sa'][k]:5.1f}%  RA {100 * ev['ra'][k]:5.1f}%")
        if k in ev["speedup"]:
            r = ev["speedup"][k]
            line += f"  x loop {r['median']:.2f} [{r['min']:.2f}–{r['max']:.2f}]"
        print(line, flush=True)
    for k, a in ev["agreement"].items():
        print(f"  per-task |loop - {k}|: SA {a['sa_max_abs_diff']:.3g}, RA {a['ra_max_abs_diff']:.3g}", flush=True)
    wname = f"evaluate fast workers={args.eval_workers}"
    if wname in times:
        r = ratios(times["evaluate fast"], times[wname])
        ev["workers_speedup"] = {**r, "target": TARGET_WORKERS,
                                 "verdict": "meets the target" if r["median"] >= TARGET_WORKERS else "below the target"}
        print(f"  issue-13 target workers={args.eval_workers} >= {TARGET_WORKERS:g}x workers=1 (same fast paths): "
              f"{r['median']:.2f}x [{r['min']:.2f}–{r['max']:.2f}] -> {ev['workers_speedup']['verdict']} "
              "(each call spawns its processes: included)", flush=True)
    best = max(r["median"] for r in ev["speedup"].values())
    ev["target"] = {"target": TARGET_EVAL, "best_median": best,
                    "verdict": "meets the target" if best >= TARGET_EVAL else "below the target"}
    print(f"  issue-13 target evaluate >= {TARGET_EVAL:g}x the loop: best {best:.2f}x -> {ev['target']['verdict']}",
          flush=True)
    return res


def max_abs_diff_f(a: Sequence[float], b: Sequence[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="3 reps, 4 evaluation tasks")
    size.add_argument("--tiny", action="store_true", help="28x28x1, hidden 8, 2 tasks, 1 rep (seconds; for tests)")
    p.add_argument("--reps", type=int, default=None, help="timed reps per contender (default 5; --quick 3; --tiny 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of every contender first (default 1)")
    p.add_argument("--arch", choices=["conv4", "authors"], default="conv4",
                   help="layer layout of the research-style Learner (default: robust_meta.Conv4's)")
    p.add_argument("--compile", choices=["off", "on", "auto"], default=None,
                   help="time robust-meta inside robust_meta.fast_paths(compile=...) (needs that API); "
                        "default: eager, plus fast_paths(compile='auto') when it exists")
    p.add_argument("--no-fast-paths", action="store_true", help="time robust-meta eagerly only")
    p.add_argument("--eval-tasks", type=int, default=None,
                   help="evaluation tasks per timed call (default 10; --quick and --tiny 4)")
    p.add_argument("--eval-workers", type=int, default=None,
                   help="also time evaluate(workers=N) on the fast paths (default: 2 on a CPU with "
                        ">= 2 cores, else off; 1 turns it off)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.reps is None:
        args.reps = 1 if args.tiny else 3 if args.quick else 5
    if args.reps < 1 or args.warmup < 0 or (args.eval_tasks is not None and args.eval_tasks < 1):
        p.error("--reps and --eval-tasks must be >= 1, --warmup >= 0")
    if args.compile is not None and args.no_fast_paths:
        p.error("--compile and --no-fast-paths exclude each other")
    if args.compile is not None and not hasattr(robust_meta, "fast_paths"):
        p.error(f"--compile {args.compile}: this robust_meta ({robust_meta.__version__}, "
                f"{os.path.dirname(robust_meta.__file__)}) has no robust_meta.fast_paths")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    if args.eval_workers is None:
        args.eval_workers = 2 if args.device == "cpu" and (os.cpu_count() or 1) >= 2 and not args.tiny else 1
    if args.eval_workers < 1:
        p.error("--eval-workers must be >= 1")
    t0 = time.perf_counter()
    res = run(args)
    res["wall_s"] = time.perf_counter() - t0
    print(f"\ntotal {res['wall_s']:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1, default=str)
    return res


if __name__ == "__main__":
    main()
