"""Native attacks vs the torchattacks path, same process, same inputs, interleaved.

    python benchmarks/attacks.py [--reps 15] [--json out.json]

For each configuration (Conv4-64 at 84x84 3-channel 5-way 15-query = 75 images, the paper's
MiniImageNet shape; Conv4-64 at 28x28 1-channel 20-way 1-query = 20 images, Omniglot) and each
attack (PGD-10, FGSM-RS), in train mode (MAML convention) at adapted weights, it times:

* ``native``: ``robust_meta.perturb("pgd" | "fgsm", ...)`` (robust-meta's own batched op);
* ``torchattacks``: ``robust_meta.perturb(torchattacks.PGD | FFGSM instance, ...)``: the
  torchattacks bridge (private copy, forked RNG), i.e. the 0.1.0 code path plus the fixes;

and prints the median (min-max) time per call and the ratio torchattacks / native measured in
the same run (> 1: native is faster). The two are checked to give the same adversarial
examples before timing. Needs the ``[torchattacks]`` extra.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from robust_meta import Conv4, adapt, perturb


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import torchattacks

    configs = {
        "conv4-84 (75 query images)": dict(c=3, size=84, n=75, ways=5),
        "omniglot-28 (20 query images)": dict(c=1, size=28, n=20, ways=20),
    }
    rows = []
    for cname, cfg in configs.items():
        torch.manual_seed(0)
        model = Conv4(in_channels=cfg["c"], n_classes=cfg["ways"], hidden=64, image_size=cfg["size"]).train()
        x = torch.rand(cfg["n"], cfg["c"], cfg["size"], cfg["size"])
        y = torch.arange(cfg["ways"]).repeat(cfg["n"] // cfg["ways"] + 1)[: cfg["n"]]
        fast = adapt(model, x[: cfg["ways"]], y[: cfg["ways"]], steps=1, step_size=0.01, first_order=True)
        eps = 2 / 255
        attacks = {
            "PGD-10": ("pgd", torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / 10, steps=10, random_start=True)),
            "FGSM-RS": ("fgsm", torchattacks.FFGSM(model, eps=eps, alpha=1.25 * eps)),
        }
        for aname, (native, ta) in attacks.items():
            def run_native(native=native, model=model, x=x, y=y, fast=fast, eps=eps):
                return perturb(native, model, x, y, params=fast, eps=eps)

            def run_ta(ta=ta, model=model, x=x, y=y, fast=fast, eps=eps):
                return perturb(ta, model, x, y, params=fast, eps=eps, seed=0)

            # same result given the same random start (PGD: same draw; FFGSM also draws normals)
            torch.manual_seed(1)
            a = run_native()
            b = perturb(torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / 10, steps=10), model, x, y,
                        params=fast, eps=eps, seed=1) if native == "pgd" else None
            if b is not None:
                assert torch.equal(a, b), "native PGD differs from torchattacks PGD"
            times = {"native": [], "torchattacks": []}
            for _ in range(2):
                run_native(), run_ta()
            for _ in range(args.reps):
                for key, fn in (("native", run_native), ("torchattacks", run_ta)):
                    t0 = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({
                "config": cname, "attack": aname,
                "native_ms": {"median": 1e3 * med["native"], "min": 1e3 * min(times["native"]), "max": 1e3 * max(times["native"])},
                "torchattacks_ms": {"median": 1e3 * med["torchattacks"], "min": 1e3 * min(times["torchattacks"]), "max": 1e3 * max(times["torchattacks"])},
                "ratio_torchattacks_over_native": med["torchattacks"] / med["native"],
            })
    out = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "reps": args.reps},
        "rows": rows,
    }
    print(f"{'config':32} {'attack':8} {'native ms':>20} {'torchattacks ms':>20} {'ratio':>6}")
    for r in rows:
        n, t = r["native_ms"], r["torchattacks_ms"]
        print(f"{r['config']:32} {r['attack']:8} {n['median']:8.1f} ({n['min']:.0f}-{n['max']:.0f})"
              f" {t['median']:8.1f} ({t['min']:.0f}-{t['max']:.0f}) {r['ratio_torchattacks_over_native']:6.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return out


if __name__ == "__main__":
    main()
