#!/usr/bin/env python
"""Plot dense structured-pruning sweeps: mean held-out perplexity increase vs dense against the
budget, one panel per unit (heads, shared, mlp: % of the unit's parameters removed; layers: layers
dropped), scored methods against dense_random (mean over seeds, min-max band, and half of its
mean dotted: the issue's target line).

    python scripts/plot_dense_sweep.py RUN_DIR [RUN_DIR ...] --out docs/sweep/qwen2moe/dense.png

Each RUN_DIR holds the results.json of one ``scripts/quality_sweep.py`` run with dense methods
(``--methods "flap@unit=heads" ...``); several runs of one testbed (heads, channels, layers) go
into one figure. The increase of a run is the mean over domains of ppl / dense ppl - 1, against
the dense row of its own results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics as pystats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeprune.sweep import parse_method_label, relative_change  # noqa: E402

UNITS = ("heads", "shared", "mlp", "layers")
LAYER_METHODS = ("angular", "replaceme")
BASELINE = "dense_random"


def point_of(label: str, ratio: float) -> tuple[str, str, float]:
    """(unit, series name, x) of a sweep row: ``flap@unit=heads,widths=uniform`` at 0.25 ->
    ("heads", "flap@widths=uniform", 25.0); ``replaceme@layers=2`` -> ("layers", "replaceme", 2)."""
    name, options = parse_method_label(label)
    unit = options.pop("unit", "layers" if name in LAYER_METHODS else "heads")
    depth = options.pop("layers", 1)
    series = name + ("@" + ",".join(f"{k}={v}" for k, v in options.items()) if options else "")
    if unit == "layers" or name in LAYER_METHODS:
        return "layers", series, float(depth)
    return unit, series, 100.0 * ratio


def dense_series(summaries: list[dict], testbed: str) -> dict[str, dict[str, list[tuple[float, float, float, float]]]]:
    """{unit: {series: [(x, mean increase, min, max over seeds), ...] sorted by x}} from sweep
    results.json contents (increases as fractions; each run against its own dense row)."""
    values: dict[tuple[str, str, float], list[float]] = {}
    for summary in summaries:
        rows = [r for r in summary["rows"] if r["testbed"] == testbed]
        dense = [r for r in rows if r["ratio"] == 0.0]
        if not dense:
            continue
        base = dense[0]["ppl"]
        for row in rows:
            if row["ratio"] == 0.0:
                continue
            change = pystats.fmean(relative_change(row["ppl"][d], base[d]) for d in base)
            values.setdefault(point_of(row["method"], row["ratio"]), []).append(change)
    out: dict[str, dict[str, list]] = {}
    for (unit, series, x), changes in sorted(values.items()):
        out.setdefault(unit, {}).setdefault(series, []).append((x, pystats.fmean(changes), min(changes), max(changes)))
    return out


def plot(series: dict, testbed: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = [u for u in UNITS if u in series]
    fig, axes = plt.subplots(1, len(units), figsize=(4.2 * len(units), 3.6), squeeze=False)
    for ax, unit in zip(axes[0], units):
        for name, points in sorted(series[unit].items(), key=lambda item: item[0].startswith(BASELINE)):
            xs = [p[0] for p in points]
            ys = [100 * p[1] for p in points]
            if name.startswith(BASELINE):
                line, = ax.plot(xs, ys, color="gray", marker="s", linestyle="--", label=f"{name} (mean, min-max)")
                ax.fill_between(xs, [100 * p[2] for p in points], [100 * p[3] for p in points], color="gray", alpha=0.2)
                ax.plot(xs, [y / 2 for y in ys], color="gray", linestyle=":", label="half of dense_random")
            else:
                ax.plot(xs, ys, marker="o", label=name)
        if max(100 * p[3] for points in series[unit].values() for p in points) > 200:
            ax.set_yscale("symlog", linthresh=10)  # a random drop of a vital layer costs 1000x the others
        ax.set_title(f"{testbed}: {unit}")
        ax.set_xlabel("layers dropped" if unit == "layers" else f"% of {unit} parameters removed")
        if unit == "layers":
            ax.set_xticks(sorted({p[0] for points in series[unit].values() for p in points}))
        ax.set_ylabel("mean perplexity increase vs dense (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="folders holding a sweep's results.json")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--testbed", default=None, help="testbed name in the results (default: the first found)")
    args = ap.parse_args(argv)
    summaries = [json.loads((Path(run) / "results.json").read_text()) for run in args.runs]
    testbed = args.testbed or next(r["testbed"] for s in summaries for r in s["rows"])
    series = dense_series(summaries, testbed)
    if not series:
        ap.error(f"no dense-method rows of testbed {testbed!r} in {args.runs}")
    plot(series, testbed, Path(args.out))
    for unit, by_name in series.items():
        for name, points in by_name.items():
            cells = ", ".join(f"{x:g}: {100 * mean:+.1f}%" for x, mean, _, _ in points)
            print(f"{testbed} {unit} {name}: {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
