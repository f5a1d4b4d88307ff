"""The report of a reproduction: ``table.md`` and the plots (re-exported by `robust_meta.reproduce`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Display names (the paper's).
PAPER_NAMES = {
    "maml": "MAML",
    "aq": "AQ",
    "rmaml-out-at": "R-MAML_out (AT)",
    "rmaml-out-trades": "R-MAML_out (TRADES)",
    "rmaml-out-fgsm": "R-MAML_out-FGSM",
    "rmaml-out-anil": "R-MAML_out-ANIL",
    "protonet": "ProtoNet",
    "protonet-aq": "ProtoNet-AQ",
    "rprotonet-out-at": "R-ProtoNet_out (AT)",
    "rprotonet-out-trades": "R-ProtoNet_out (TRADES)",
    "rprotonet-out-fgsm": "R-ProtoNet_out-FGSM",
}


def results_table(doc: dict[str, Any]) -> str:
    """A Markdown table of ``results.json``: SA and RA (mean ± 95% CI, %) per method and N
    (Omniglot) or per method and K (a benchmark's ``results.json``), and the audit table."""
    runs = doc["runs"]
    bench = (doc.get("settings") or {}).get("benchmark")
    if bench is None:
        return _markdown_table(runs, "ways", "way", "of held-out alphabets", "; 1-shot; train time summed "
                               "over the N-way runs.")
    name = doc["settings"].get("name", bench)
    n_way = runs[0]["ways"] if runs else doc["settings"].get("ways")
    return _markdown_table(runs, "shots", "shot", f"of the {name} test classes",
                           f"; {n_way}-way; train time summed over the K-shot runs.")


def _markdown_table(runs: list[dict[str, Any]], axis: str, unit: str, tasks_of: str, tail: str) -> str:
    """The results and audit tables, one column pair per value of the ``axis`` key of the runs."""
    values = sorted({r[axis] for r in runs})
    methods = list(dict.fromkeys(r["method"] for r in runs))
    by = {(r["method"], r[axis]): r for r in runs}
    eps = runs[0]["eps"] if runs else float("nan")
    head = "| method | " + " | ".join(f"{n}-{unit} SA | {n}-{unit} RA" for n in values) + " | train time |"
    sep = "|---|" + "---|---|" * len(values) + "---|"
    lines = [head, sep]
    for m in methods:
        cells = []
        total = 0.0
        for n in values:
            r = by.get((m, n))
            if r is None:
                cells += ["–", "–"]
                continue
            total += r["train_seconds"]
            cells += [f"{100 * r['sa']['mean']:.1f} ± {100 * r['sa']['ci95']:.1f}",
                      f"{100 * r['ra']['mean']:.1f} ± {100 * r['ra']['ci95']:.1f}"]
        lines.append(f"| {PAPER_NAMES.get(m, m)} | " + " | ".join(cells) + f" | {total / 60:.1f} min |")
    n_tasks = runs[0]["n_tasks"] if runs else 0
    attack = runs[0].get("attack", "PGD") if runs else "PGD"
    lines.append("")
    lines.append(
        f"SA / RA in %, mean ± 95% CI over {n_tasks} test tasks {tasks_of}; "
        f"RA under {attack} at ε = {eps * 255:.3g}/255{tail}"
    )
    audited = [r for r in runs if r.get("audit")]
    if audited:
        a0 = audited[0]["audit"]
        lines += ["", "Strong-attack audit: RA under the protocol's attack → worst case with a far stronger one "
                  f"({a0['strong_attack']}), on the first {a0['n_tasks']} test tasks (drop in points ± 95% CI):", ""]
        lines.append("| method | " + " | ".join(f"{n}-{unit}" for n in values) + " |")
        lines.append("|---|" + "---|" * len(values))
        for m in methods:
            cells = []
            for n in values:
                a = (by.get((m, n)) or {}).get("audit")
                if not a:
                    cells.append("–")
                    continue
                flag = " ⚠" if a["flagged"] else ""
                cells.append(f"{100 * a['ra_protocol']['mean']:.1f} → {100 * a['ra_worst']['mean']:.1f} "
                             f"(−{100 * a['drop']['mean']:.1f} ± {100 * a['drop']['ci95']:.1f}){flag}")
            lines.append(f"| {PAPER_NAMES.get(m, m)} | " + " | ".join(cells) + " |")
        tol = a0.get("tolerance", 0.03)
        flagged = [r for r in audited if r["audit"]["flagged"]]
        lines.append("")
        lines.append(f"⚠: the drop exceeds {100 * tol:g} points ({len(flagged)} of {len(audited)} runs): "
                     "that RA overstates robustness; the worst case is the one to report." if flagged else
                     f"No drop exceeds {100 * tol:g} points.")
    return "\n".join(lines) + "\n"


def plot_ways(doc: dict[str, Any], path: str | Path) -> tuple[Path, Path]:
    """SA and RA versus N (one line per method, 95% CI bands), as PNG and SVG (the Fig. S3 analogue)."""
    from .visualize import _matplotlib

    Figure, FigureCanvasAgg = _matplotlib()
    runs = doc["runs"]
    fig = Figure(figsize=(9, 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    methods = list(dict.fromkeys(r["method"] for r in runs))
    for ax, metric, title in ((axes[0], "ra", "RA (PGD)"), (axes[1], "sa", "SA")):
        for m in methods:
            rs = sorted((r for r in runs if r["method"] == m), key=lambda r: r["ways"])
            x = [r["ways"] for r in rs]
            y = [100 * r[metric]["mean"] for r in rs]
            c = [100 * r[metric]["ci95"] for r in rs]
            (line,) = ax.plot(x, y, marker="o", label=PAPER_NAMES.get(m, m))
            ax.fill_between(x, [a - b for a, b in zip(y, c)], [a + b for a, b in zip(y, c)],
                            color=line.get_color(), alpha=0.2)
        ax.set_xlabel("N (ways), 1-shot")
        ax.set_ylabel(f"{title} %")
        ax.set_title(f"Omniglot: {title}")
        ax.set_xticks(sorted({r["ways"] for r in runs}))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save_figure(fig, path)


def plot_shots(doc: dict[str, Any], path: str | Path) -> tuple[Path, Path]:
    """A benchmark's RA and SA per method, one bar per K-shot setting (95% CI error bars), as PNG
    and SVG (the paper's Tables 2–3 / S2–S3 as a figure)."""
    from .visualize import _matplotlib

    Figure, FigureCanvasAgg = _matplotlib()
    runs = doc["runs"]
    settings = doc.get("settings") or {}
    name = settings.get("name", settings.get("benchmark", ""))
    methods = list(dict.fromkeys(r["method"] for r in runs))
    shots = sorted({r["shots"] for r in runs})
    by = {(r["method"], r["shots"]): r for r in runs}
    fig = Figure(figsize=(max(9, 1.6 * len(methods) * 2), 3.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    width = 0.8 / max(1, len(shots))
    for ax, metric, title in ((axes[0], "ra", f"RA ({runs[0]['attack'] if runs else 'PGD'})"), (axes[1], "sa", "SA")):
        for i, k in enumerate(shots):
            xs = [j + (i - (len(shots) - 1) / 2) * width for j, m in enumerate(methods) if (m, k) in by]
            rs = [by[(m, k)] for m in methods if (m, k) in by]
            ax.bar(xs, [100 * r[metric]["mean"] for r in rs], width, yerr=[100 * r[metric]["ci95"] for r in rs],
                   capsize=2, label=f"{k}-shot")
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels([PAPER_NAMES.get(m, m) for m in methods], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(f"{title} %")
        ax.set_title(f"{name}: {title}" + (f", {runs[0]['ways']}-way" if runs else ""))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    return _save_figure(fig, path)


def _save_figure(fig: Any, path: str | Path) -> tuple[Path, Path]:
    """Write ``fig`` as ``path``'s ``.png`` and ``.svg``, atomically."""
    import io

    from ._io import atomic_write_bytes

    fig.tight_layout()
    path = Path(path)
    png, svg = path.with_suffix(".png"), path.with_suffix(".svg")
    for target, fmt in ((png, "png"), (svg, "svg")):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=120)
        atomic_write_bytes(buf.getvalue(), target)
    return png, svg

