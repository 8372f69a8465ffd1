#!/usr/bin/env python
"""Merge-versus-drop plots of quality-sweep results: mean perplexity increase against the fraction of
experts removed, one line per method, one PNG per testbed.

    python scripts/plot_sweep.py RUN/results.json [MORE/results.json ...] --out docs/sweep/{testbed}-rebuilt

Reads the ``aggregated`` rows of one or more ``results.json`` written by scripts/quality_sweep.py
(rows of the same testbed, method and ratio seen twice: the first wins) and writes
``<out>/merging-increase.png`` per testbed (``{testbed}`` in ``--out`` is replaced by its name).
The y value is the sweep's summary, the mean over domains of ppl_d / ppl_d(dense) - 1 (log scale).
Line styles: solid = a merge with the exact router (``@router=exact``), dashed = a merge with the
vanilla router, dash-dot = keep-experts plans of their own (STUN, DERN), and the references REAP
(black) and random dropping (grey, the mean over seeds). A method and its router variants share one
colour.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeprune.sweep import dense_row, parse_method_label, relative_change  # noqa: E402

PNG_NAME = "merging-increase.png"
#: Reference drop methods, drawn in fixed colours.
REFERENCES = {"reap": "black", "random": "grey"}
#: Methods whose plans carry a router mode (vanilla unless ``@router=exact``).
ROUTED_MERGES = ("hc_smoe", "m_smoe", "ream")


def load_aggregated(paths) -> list[dict]:
    """The ``aggregated`` rows of every results.json, the first of each (testbed, method, ratio) kept."""
    seen, rows = set(), []
    for path in paths:
        for row in json.loads(Path(path).read_text())["aggregated"]:
            key = (row["testbed"], row["method"], row["ratio"])
            if key not in seen:
                seen.add(key)
                rows.append(row)
    return rows


def mean_increase(row: dict, dense: dict) -> float:
    """Mean over domains of ppl_d / ppl_d(dense) - 1 (the sweep's summary column)."""
    return statistics.fmean(relative_change(row["ppl"][d], dense["ppl"][d]) for d in dense["ppl"])


def line_style(label: str) -> str:
    """'-' for an exact-router merge, '--' for a vanilla-router merge and the references, '-.' else."""
    name, options = parse_method_label(label)
    if name in ROUTED_MERGES:
        return "-" if options.get("router") == "exact" else "--"
    return "-" if name in REFERENCES else "-."


def plot_increase(aggregated, testbed: str, path: Path) -> None:
    """One PNG: mean perplexity increase (%) against % of experts removed for every method of ``testbed``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in aggregated if r["testbed"] == testbed and r["ratio"] > 0]
    dense = dense_row(aggregated, testbed)
    labels = sorted({r["method"] for r in rows}, key=lambda m: (parse_method_label(m)[0] not in REFERENCES, m))
    bases = sorted({parse_method_label(m)[0] for m in labels} - set(REFERENCES))
    palette = plt.get_cmap("tab10")
    colours = {**REFERENCES, **{b: palette(i % 10) for i, b in enumerate(bases)}}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label in labels:
        points = sorted((r["ratio"], mean_increase(r, dense)) for r in rows if r["method"] == label)
        name = parse_method_label(label)[0]
        ax.plot([100 * x for x, _ in points], [100 * max(y, 1e-4) for _, y in points], marker="o",
                linestyle=line_style(label), color=colours[name], linewidth=2.2 if name in REFERENCES else 1.4,
                label=label)
    ax.set_yscale("log")
    ax.set_xlabel("% of routed experts removed (dropped or merged)")
    ax.set_ylabel("mean held-out perplexity increase vs dense (%)")
    ax.set_title(f"{testbed}: merging vs dropping (solid: exact router, dashed: vanilla)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def summary_table(aggregated, testbed: str) -> str:
    """Markdown: mean perplexity increase per method (rows) and fraction removed (columns), with
    each merge's ratio to random dropping's increase (the issue's target: at most 0.5)."""
    rows = [r for r in aggregated if r["testbed"] == testbed and r["ratio"] > 0]
    dense = dense_row(aggregated, testbed)
    ratios = sorted({r["ratio"] for r in rows})
    value = {(r["method"], r["ratio"]): mean_increase(r, dense) for r in rows}
    labels = sorted({r["method"] for r in rows}, key=lambda m: (parse_method_label(m)[0] not in REFERENCES, m))
    lines = ["| method | " + " | ".join(f"{100 * x:.0f}% removed" for x in ratios) + " |",
             "|---|" + "---|" * len(ratios)]
    for label in labels:
        cells = []
        for x in ratios:
            if (label, x) not in value:
                cells.append("-")
                continue
            cell = f"{100 * value[label, x]:+.1f}%"
            random = value.get(("random", x))
            if label not in REFERENCES and random:
                cell += f" ({value[label, x] / random:.2f}x random)"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="results.json files of scripts/quality_sweep.py")
    ap.add_argument("--out", default="docs/sweep/{testbed}-rebuilt", help="output folder ({testbed} is replaced)")
    args = ap.parse_args(argv)
    aggregated = load_aggregated(args.results)
    for testbed in dict.fromkeys(r["testbed"] for r in aggregated):
        path = Path(args.out.format(testbed=testbed)) / PNG_NAME
        plot_increase(aggregated, testbed, path)
        print(f"### {testbed}\n\n{summary_table(aggregated, testbed)}\n\n![{testbed}]({path})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
