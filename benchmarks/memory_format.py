"""channels_last vs contiguous for robust-meta's Conv4 passes: the data behind the rule.

``robust_meta.channels_last_wins`` decides where ``channels_last="auto"`` converts the inputs.
This benchmark times, for a grid of input shapes, the two passes that dominate a step:
forward + input gradient (an attack step) and forward + weight gradient (an inner-loop step),
in both layouts, interleaved in one process (median of ``--reps``), and prints whether the rule
picks the faster layout for each shape.

Usage::

    python benchmarks/memory_format.py [--reps 7] [--threads N] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from robust_meta import Conv4, channels_last_wins

# (in_channels, image size, hidden, batch): Omniglot (28×28×1) and MiniImageNet/CIFAR-like
# (84×84×3, 64×64×3, 32×32×3) support and query batches.
GRID = [
    (1, 28, 64, 5), (1, 28, 64, 20), (1, 28, 64, 75), (1, 28, 32, 25),
    (3, 32, 32, 75), (3, 64, 32, 75),
    (3, 84, 32, 5), (3, 84, 32, 75), (3, 84, 64, 75),
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(cin: int, size: int, hidden: int, batch: int, *, wgrad: bool, reps: int,
            device: torch.device) -> dict:
    torch.manual_seed(0)
    model = Conv4(cin, 5, hidden=hidden, image_size=size).to(device).train()
    params = {k: v.detach().clone().requires_grad_(wgrad) for k, v in model.named_parameters()}
    x = torch.rand(batch, cin, size, size, device=device)
    y = torch.randint(0, 5, (batch,), device=device)
    inputs = {False: x, True: x.contiguous(memory_format=torch.channels_last)}
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(reps + 1):  # round 0 warms up
        for cl in (False, True):
            xx = inputs[cl].detach().requires_grad_(not wgrad)
            _sync(device)
            t = time.perf_counter()
            loss = F.cross_entropy(torch.func.functional_call(model, params, (xx,)), y)
            torch.autograd.grad(loss, list(params.values()) if wgrad else [xx])
            _sync(device)
            if r:
                times[cl].append(time.perf_counter() - t)
    contiguous, channels_last = statistics.median(times[False]), statistics.median(times[True])
    return {
        "shape": [batch, cin, size, size], "hidden": hidden, "grad": "weights" if wgrad else "input",
        "contiguous_ms": 1e3 * contiguous, "channels_last_ms": 1e3 * channels_last,
        "speedup": contiguous / channels_last,
        "rule_picks_channels_last": channels_last_wins(x),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}, median of {args.reps}")
    print(f"{'shape':>18} {'hidden':>6} {'grad':>7} {'contig ms':>10} {'cl ms':>8} {'cl speedup':>10} "
          f"{'rule':>5} {'agrees':>6}")
    rows = []
    for cin, size, hidden, batch in GRID:
        for wgrad in (False, True):
            r = measure(cin, size, hidden, batch, wgrad=wgrad, reps=args.reps, device=device)
            # The rule agrees when it picks channels_last exactly where that is >= 5% faster
            # (within 5% either way counts as a tie).
            faster = r["speedup"] >= 1.05
            tie = abs(r["speedup"] - 1) < 0.05
            r["rule_agrees"] = tie or faster == r["rule_picks_channels_last"]
            rows.append(r)
            print(f"{'x'.join(map(str, r['shape'])):>18} {hidden:>6} {r['grad']:>7} {r['contiguous_ms']:>10.1f} "
                  f"{r['channels_last_ms']:>8.1f} {r['speedup']:>10.2f} "
                  f"{'cl' if r['rule_picks_channels_last'] else '-':>5} {'yes' if r['rule_agrees'] else 'NO':>6}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(),
                       "device": str(device), "rows": rows}, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
