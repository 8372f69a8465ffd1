#!/usr/bin/env python
"""Combined budgets: at fixed totals of ALL the parameters, mixes of an expert action and a dense action
(issue 13, "Combined"), judged by held-out perplexity as the quality sweep judges methods.

    python scripts/combined_sweep.py --testbeds mixtral --totals 0.2 0.3 --experts heapr reap \\
        --dense heads=flap mlp=flap shared=flap layers=angular

For each testbed, expert method, total T and dense unit, the grid is: expert shares S (0, 0.25, 0.5,
0.75, 1 by default: the dense part aims at (1 - S) T), the dense part at its own ratios (--dense-ratios,
heads / mlp / shared: finer than the shares where a unit holds little of the model) or at N layers
(--layers). Every point is planned by moeprune.plan.combined.plan_combined (the dense part first and
counted, the experts fill the rest at their nearest count), applied in memory, and evaluated; a point
the model cannot take (a unit it lacks, a dense part bigger than its unit) is listed as refused with
the reason. Identical plans (two shares that round to the same layers) are evaluated once.

"Equal parameter counts": every row reports the fraction of ALL parameters it actually removed
(exact, from the ops' recipes); the best mix is chosen among the rows within --tolerance of T.

Protocol as scripts/quality_sweep.py (moeprune/sweep.py): calibration 16 x 256 tokens of each domain's
train split, statistics merged over domains; perplexity on each domain's test split (16384 tokens,
windows of 256); "change" = mean over domains of perplexity / dense - 1.

Writes <out>/combined.json, combined.md and combined.png per testbed (--out may contain {testbed}).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import statistics as pystats
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402
from _profiles_doc import commit, run_options, start_run  # noqa: E402

from moeprune.apply import apply_plan_in_memory  # noqa: E402
from moeprune.errors import MoePruneError  # noqa: E402
from moeprune.evaluation import load_checkpoint  # noqa: E402
from moeprune.evaluation.heldout import default_corpus_dir  # noqa: E402
from moeprune.plan.combined import join_passes, plan_combined  # noqa: E402
from moeprune.stats import merge_all  # noqa: E402
from moeprune.sweep import (SweepSettings, add_whole_set_stats, collect_domain_stats, evaluate_streams,  # noqa: E402
                            held_out_streams, parse_method_label, relative_change)
from moeprune.testbed.train import build_or_load_testbed  # noqa: E402

logger = logging.getLogger("combined_sweep")

DEFAULT_DENSE = ("heads=flap", "mlp=flap", "shared=flap", "layers=angular")


@dataclass(frozen=True)
class Point:
    """One requested mix: the expert method, the total, the dense unit and method, and how the dense
    part is sized (``form``: share, ratio or layers, with its ``value``)."""

    expert: str
    total: float
    unit: str
    dense: str
    form: str
    value: float

    @property
    def label(self) -> str:
        return {"share": f"share {self.value:g}", "ratio": f"{self.unit} ratio {self.value:g}",
                "layers": f"{int(self.value)} layer(s)"}[self.form]

    def request(self) -> dict:
        """Keyword arguments of plan_combined."""
        expert, expert_options = parse_method_label(self.expert)  # "heapr@layout=compact": a method with options
        out = dict(total_ratio=self.total, expert_method=expert, dense_method=self.dense, expert_options=expert_options)
        options = {} if self.unit == "layers" and self.dense != "dense_random" else {"unit": self.unit}
        if self.form == "share":
            out["expert_share"] = self.value
        elif self.form == "ratio":
            out["dense_ratio"] = self.value
        else:
            options["layers"] = int(self.value)
        out["dense_options"] = options
        return out


@dataclass
class Row:
    """An evaluated (or refused) point."""

    testbed: str
    point: Point
    refused: str = ""
    removed_fraction: float = 0.0
    expert_fraction: float = 0.0
    dense_fraction: float = 0.0
    expert_share: float = 0.0
    plan_method: str = ""
    ppl: dict[str, float] = field(default_factory=dict)
    change: float = math.nan


def grid(experts, totals, dense_units: dict[str, str], shares, dense_ratios, layers) -> list[Point]:
    """Every requested point: per expert method, total and unit, the shares, then the unit's own
    ratios (heads / mlp / shared) or layer counts (layers)."""
    points = []
    for expert in experts:
        for total in totals:
            for unit, dense in dense_units.items():
                points += [Point(expert, total, unit, dense, "share", s) for s in shares]
                extra = [("layers", n) for n in layers] if unit == "layers" else [("ratio", r) for r in dense_ratios]
                points += [Point(expert, total, unit, dense, form, v) for form, v in extra]
    return points


def plan_key(plan) -> str:
    """What makes two plans the same model: kept experts and actions (not their budgets)."""
    data = plan.to_json()
    return json.dumps({k: data.get(k) for k in ("layers", "actions")}, sort_keys=True)


def mean_change(ppl: dict[str, float], dense: dict[str, float]) -> float:
    """Mean over domains of perplexity / dense - 1."""
    return pystats.fmean(relative_change(ppl[d], dense[d]) for d in dense)


def comparable(row: Row, tolerance: float) -> bool:
    """Evaluated, and within ``tolerance`` (fraction of all parameters) of its total."""
    return not row.refused and abs(row.removed_fraction - row.point.total) <= tolerance


def best_mixes(rows: list[Row], tolerance: float) -> list[dict]:
    """Per (expert method, total): the best comparable row, the expert-only row (share 1) and the
    best comparable dense-only row (share 0), with their changes."""
    out = []
    keys = dict.fromkeys((r.point.expert, r.point.total) for r in rows)
    for expert, total in keys:
        group = [r for r in rows if r.point.expert == expert and r.point.total == total and comparable(r, tolerance)]
        if not group:
            continue
        best = min(group, key=lambda r: r.change)
        expert_only = [r for r in group if r.dense_fraction == 0]
        dense_only = [r for r in group if r.expert_fraction == 0]
        out.append({"expert": expert, "total": total, "best": best,
                    "expert_only": min(expert_only, key=lambda r: r.change) if expert_only else None,
                    "dense_only": min(dense_only, key=lambda r: r.change) if dense_only else None})
    return out


#: refusals that say the model lacks the unit (every point of that unit is refused the same way)
MISSING_UNIT = ("has no", "latent attention")


def describe(row: Row) -> str:
    """A mix in words: ``experts only`` or ``<unit> (<method>) <how it was asked>``."""
    if not row.refused and row.dense_fraction == 0:
        return "experts only"
    return f"{row.point.unit} ({row.point.dense}) {row.point.label}"


def markdown(testbed: str, rows: list[Row], dense_ppl: dict[str, float], tolerance: float, header: str) -> str:
    """The testbed's table (every point once: the experts-only mix once per expert method and total,
    refused points with their reason, units the model lacks in one line) and the best mixes."""
    domains = list(dense_ppl)
    missing = sorted({r.point.unit for r in rows if r.refused and any(m in r.refused for m in MISSING_UNIT)})
    lines = [header, "", f"### {testbed}", "",
             f"Dense model: {', '.join(f'{d} {v:.2f}' for d, v in dense_ppl.items())}. Fractions are of ALL the "
             f"parameters (exact counts); rows more than {100 * tolerance:g} points from their total are marked *."
             + (f" Units this model lacks (every point refused): {', '.join(missing)}." if missing else ""), "",
             "| expert | total | mix (dense unit, method, as asked) | removed | experts | dense | " + " | ".join(domains)
             + " | change vs dense |", "|---|---|---|---|---|---|" + "---|" * len(domains) + "---|"]
    shown = set()
    for row in sorted(rows, key=lambda r: (r.point.expert, r.point.total, -r.expert_share if not r.refused else 1,
                                           r.point.unit, r.point.label)):
        p = row.point
        if row.refused and p.unit in missing:
            continue
        name = describe(row)
        if name == "experts only":
            if (p.expert, p.total) in shown:
                continue
            shown.add((p.expert, p.total))
        start = f"| {p.expert} | {100 * p.total:g}% | {name} |"
        if row.refused:
            lines.append(f"{start} refused: {row.refused} |" + " |" * (2 + len(domains)) + " |")
            continue
        mark = "" if comparable(row, tolerance) else "*"
        cells = " | ".join(f"{row.ppl[d]:.2f}" for d in domains)
        lines.append(f"{start} {100 * row.removed_fraction:.1f}%{mark} | {100 * row.expert_fraction:.1f}% | "
                     f"{100 * row.dense_fraction:.1f}% | {cells} | {100 * row.change:+.1f}% |")
    lines += ["", "Best mix per expert method and total (comparable rows only):", "",
              "| expert | total | best mix | its change | experts only | dense only |", "|---|---|---|---|---|---|"]

    def cell(row):
        if row is None:
            return "none comparable"
        return f"{100 * row.change:+.1f}% ({'' if row.dense_fraction == 0 else row.point.unit + ', '}{100 * row.removed_fraction:.1f}% removed)"

    for entry in best_mixes(rows, tolerance):
        best = entry["best"]
        lines.append(f"| {entry['expert']} | {100 * entry['total']:g}% | {describe(best)}: experts "
                     f"{100 * best.expert_fraction:.1f}% + dense {100 * best.dense_fraction:.1f}% "
                     f"| {100 * best.change:+.1f}% | {cell(entry['expert_only'])} | {cell(entry['dense_only'])} |")
    return "\n".join(lines) + "\n"


def rows_from_json(summary: dict) -> list[Row]:
    """The rows of a combined.json (to re-render its table and plot without re-running)."""
    return [Row(**{**r, "point": Point(**r["point"])}) for r in summary["rows"]]


def plot(testbed: str, rows: list[Row], tolerance: float, path: Path) -> None:
    """One panel per total: change vs dense against the experts' actual share of what was removed, a
    line per (expert method, unit); hollow markers: rows off their total by more than ``tolerance``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluated = [r for r in rows if not r.refused]
    totals = sorted({r.point.total for r in evaluated})
    fig, axes = plt.subplots(1, len(totals), figsize=(5.2 * len(totals), 4), squeeze=False)
    series = sorted({(r.point.expert, r.point.unit) for r in evaluated})
    for ax, total in zip(axes[0], totals):
        for number, (expert, unit) in enumerate(series):
            points = sorted({(r.expert_share, r.change, comparable(r, tolerance), r.removed_fraction)
                             for r in evaluated if r.point.total == total and r.point.expert == expert and r.point.unit == unit})
            if not points:
                continue
            line, = ax.plot([100 * p[0] for p in points], [100 * p[1] for p in points], linestyle="-" if number % 2 == 0 else "--",
                            label=f"{expert} + {unit}")
            for share, change, ok, removed in points:
                ax.plot(100 * share, 100 * change, marker="o", color=line.get_color(),
                        markerfacecolor=line.get_color() if ok else "none")
                ax.annotate(f"{100 * removed:.0f}%", (100 * share, 100 * change), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_title(f"{testbed}: {100 * total:g}% of all parameters removed")
        ax.set_xlabel("experts' share of the parameters removed (%)")
        ax.set_ylabel("held-out perplexity change vs dense (%)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def run_testbed(testbed: str, model_dir: Path, points: list[Point], settings: SweepSettings, work: Path,
                progress: bool) -> tuple[list[Row], dict[str, float]]:
    """Statistics once (two passes over the same calibration rows, joined), the dense model, then
    every point (identical plans evaluated once)."""
    expert_methods = tuple(dict.fromkeys(parse_method_label(p.expert)[0] for p in points))
    dense_methods = tuple(dict.fromkeys(p.dense for p in points))
    corpus = default_corpus_dir()
    passes = []  # the expert methods' observers (gradients for HEAPr), then the dense methods' (every layer)
    for name, methods in (("experts", expert_methods), ("dense", dense_methods)):
        part = replace(settings, methods=methods)
        by_domain = collect_domain_stats(model_dir, corpus, work / name, part, progress=progress)
        passes.append(add_whole_set_stats(merge_all(list(by_domain.values())), model_dir, corpus, work / name, part, progress))
    stats = join_passes(passes)
    model, tokenizer = load_checkpoint(model_dir)
    streams = held_out_streams(tokenizer, corpus, settings)
    dense_ppl = evaluate_streams(model, streams, settings)
    rows, seen = [], {}
    for point in points:
        row = Row(testbed, point)
        try:
            plan = plan_combined(model_dir, stats=stats, **point.request())
        except MoePruneError as exc:
            row.refused = str(exc).split(";")[0]
            rows.append(row)
            logger.info("%s %s: refused (%s)", testbed, point, row.refused)
            continue
        split = plan.budget["split"]
        row.removed_fraction, row.expert_fraction = split["removed_fraction"], split["expert_fraction"]
        row.dense_fraction, row.expert_share, row.plan_method = split["dense_fraction"], split["expert_share"], plan.method
        key = plan_key(plan)
        if key not in seen:
            started = time.time()
            seen[key] = evaluate_streams(apply_plan_in_memory(copy.deepcopy(model), plan), streams, settings)
            logger.info("%s %s: removed %.1f%% (experts %.1f%%, dense %.1f%%) in %.0f s", testbed, point,
                        100 * row.removed_fraction, 100 * row.expert_fraction, 100 * row.dense_fraction, time.time() - started)
        row.ppl = seen[key]
        row.change = mean_change(row.ppl, dense_ppl)
        rows.append(row)
    return rows, dense_ppl


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbeds", nargs="+", default=["mixtral", "qwen3moe", "deepseekv3"])
    ap.add_argument("--model", help="a local checkpoint instead of testbeds (evaluated on the testbed corpus)")
    ap.add_argument("--name", default="model", help="label of --model in the tables and file names")
    ap.add_argument("--experts", nargs="+", default=["heapr@layout=compact"],
                    help="expert or neuron methods, with options as method@option=value (default heapr@layout=compact: "
                         "per-expert widths, the finest expert budget)")
    ap.add_argument("--dense", nargs="+", default=list(DEFAULT_DENSE),
                    help="unit=method pairs (default: heads=flap mlp=flap shared=flap layers=angular; units a model lacks "
                         "are listed as refused)")
    ap.add_argument("--totals", nargs="+", type=float, default=[0.2, 0.3], help="fractions of ALL parameters removed")
    ap.add_argument("--shares", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--dense-ratios", nargs="+", type=float, default=[0.25, 0.5])
    ap.add_argument("--layers", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--tolerance", type=float, default=0.01, help="a comparable row removes T +- this (default 0.01)")
    ap.add_argument("--samples-per-domain", type=int, default=16)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    run_options(ap, "docs/sweep/{testbed}-rebuilt", "output folder ({testbed} is replaced)")
    ap.add_argument("--render", action="store_true", help="only rewrite combined.md and combined.png from combined.json")
    args = ap.parse_args(argv)
    if args.render:
        for testbed in ([args.name] if args.model else args.testbeds):
            out = Path(args.out.format(testbed=testbed))
            summary = json.loads((out / "combined.json").read_text())
            rows = rows_from_json(summary)
            header = (out / "combined.md").read_text().split("\n", 1)[0]
            (out / "combined.md").write_text(markdown(testbed, rows, summary["dense"], summary["tolerance"], header))
            plot(testbed, rows, summary["tolerance"], out / "combined.png")
        return 0
    start_run(args)
    if args.quiet:
        transformers.utils.logging.disable_progress_bar()
    dense_units = dict(pair.split("=", 1) for pair in args.dense)
    points = grid(args.experts, args.totals, dense_units, args.shares, args.dense_ratios, args.layers)
    settings = SweepSettings(samples_per_domain=args.samples_per_domain, eval_tokens=args.eval_tokens)
    targets = [(args.name, Path(args.model))] if args.model else [(t, None) for t in args.testbeds]
    for testbed, model_dir in targets:
        started = time.time()
        model_dir = model_dir or build_or_load_testbed(testbed, progress=not args.quiet)
        with tempfile.TemporaryDirectory(prefix="moeprune-combined-") as tmp:
            rows, dense_ppl = run_testbed(testbed, model_dir, points, settings, Path(tmp), progress=not args.quiet)
        out = Path(args.out.format(testbed=testbed))
        out.mkdir(parents=True, exist_ok=True)
        header = (f"Combined-budget sweep at commit {commit()} ({time.strftime('%Y-%m-%d')}, {time.time() - started:.0f} s on "
                  f"{torch.get_num_threads()} thread(s)). Command: `python scripts/combined_sweep.py "
                  f"{' '.join(argv if argv is not None else sys.argv[1:])}` (testbed {testbed}).")
        summary = {"testbed": testbed, "dense": dense_ppl, "settings": asdict(settings), "tolerance": args.tolerance,
                   "rows": [{**asdict(r), "point": asdict(r.point)} for r in rows]}
        (out / "combined.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "combined.md").write_text(markdown(testbed, rows, dense_ppl, args.tolerance, header))
        plot(testbed, rows, args.tolerance, out / "combined.png")
        print((out / "combined.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
