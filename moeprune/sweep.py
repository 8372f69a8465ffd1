"""The quality sweep: every registered compression method x fractions of experts removed x testbeds,
judged by held-out perplexity per corpus domain (the research ablation of issue 3).

Protocol (the same for every method, so the comparison is fair):

* Calibration: ``samples_per_domain`` packed sequences of ``seq_len`` tokens from the TRAIN split of
  each corpus domain, collected once per domain; the mixed statistics every method scores are the
  exact sum of the per-domain statistics (:meth:`RouterStats.merge`).
* Selection: per MoE layer at a uniform budget, super experts protected for every method (random
  included), DeepSeek groups pruned equally (``moeprune prune`` defaults).
* Evaluation: perplexity on the TEST split of each domain (never seen in training or calibration),
  at most ``eval_tokens`` tokens per domain, non-overlapping windows of ``eval_seq_len``.
* Stochastic methods (random) run with several seeds; tables show their mean.

The per-domain statistics also give the expert-usage divergence between domains (Jensen-Shannon,
base 2, in [0, 1]): a testbed whose domains route alike cannot show task-specific effects.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics as pystats
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from .stats import RouterStats, merge_all

if TYPE_CHECKING:
    from .methods import Method

logger = logging.getLogger(__name__)

DEFAULT_RATIOS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)


@dataclass
class SweepSettings:
    """What the sweep measures; the defaults are the documented protocol (docs/results.md)."""

    ratios: tuple[float, ...] = DEFAULT_RATIOS
    methods: tuple[str, ...] | None = None
    """Compression methods to compare (None: every registered one, see :mod:`moeprune.methods`)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds of stochastic methods (deterministic methods run once, with the first seed)."""
    samples_per_domain: int = 16
    seq_len: int = 256
    eval_tokens: int = 16384
    eval_seq_len: int = 256
    domains: tuple[str, ...] | None = None
    """Corpus domains (None: all of them)."""
    protect_super_experts: bool = True


# --------------------------------------------------------------------------------------------------
# expert usage and its divergence between domains (pure)


def expert_usage(stats: RouterStats) -> dict[int, torch.Tensor]:
    """Per MoE layer, the share of routed slots each expert receives: frequency_j / sum_i frequency_i."""
    usage = {}
    for layer, entries in stats.layers.items():
        frequency = torch.as_tensor(entries["frequency"], dtype=torch.float64)
        total = float(frequency.sum())
        usage[layer] = frequency / total if total > 0 else frequency
    return usage


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence in bits: JS(p, q) = (KL(p || m) + KL(q || m)) / 2, m = (p + q) / 2.

    In [0, 1]; 0 for identical distributions, 1 for disjoint supports. scipy's ``jensenshannon``
    returns the square root of this (the JS distance).
    """
    from scipy.spatial.distance import jensenshannon

    return float(jensenshannon(p.double().numpy(), q.double().numpy(), base=2) ** 2)


def usage_divergence(stats_by_domain: Mapping[str, RouterStats]) -> dict[int, dict[str, float]]:
    """Per MoE layer, JS divergence of expert usage for every pair of domains (``"a|b"`` keys)."""
    usage = {domain: expert_usage(stats) for domain, stats in stats_by_domain.items()}
    layers = sorted(next(iter(usage.values())))
    return {
        layer: {f"{a}|{b}": js_divergence(usage[a][layer], usage[b][layer]) for a, b in combinations(usage, 2)}
        for layer in layers
    }


# --------------------------------------------------------------------------------------------------
# results (pure)


@dataclass
class SweepRow:
    """One evaluated model: a method at a fraction of experts removed (ratio 0 is the dense model)."""

    testbed: str
    method: str
    ratio: float
    seed: int | None
    experts_kept: int
    ppl: dict[str, float]
    kept: dict[int, list[int]] = field(default_factory=dict)
    #: fraction of the routed-expert parameters kept (neuron slicing keeps every expert, thinner)
    routed_kept: float | None = None

    @property
    def mean_ppl(self) -> float:
        """Geometric mean of the per-domain perplexities (= exp of the mean per-domain NLL)."""
        return math.exp(sum(math.log(v) for v in self.ppl.values()) / len(self.ppl))


def relative_change(value: float, dense: float) -> float:
    """value / dense - 1 (0.07 = 7% worse than dense)."""
    return value / dense - 1.0


def aggregate(rows: Sequence[SweepRow]) -> list[dict]:
    """Rows averaged over seeds: one dict per (testbed, method, ratio) with per-domain mean
    perplexity, its min/max over seeds and the number of seeds."""
    groups: dict[tuple, list[SweepRow]] = {}
    for row in rows:
        groups.setdefault((row.testbed, row.method, row.ratio), []).append(row)
    out = []
    for (testbed, method, ratio), members in groups.items():
        domains = list(members[0].ppl)
        out.append({
            "testbed": testbed, "method": method, "ratio": ratio, "experts_kept": members[0].experts_kept,
            "routed_kept": members[0].routed_kept,
            "seeds": len(members),
            "ppl": {d: pystats.fmean(m.ppl[d] for m in members) for d in domains},
            "ppl_min": {d: min(m.ppl[d] for m in members) for d in domains},
            "ppl_max": {d: max(m.ppl[d] for m in members) for d in domains},
            "mean_ppl": pystats.fmean(m.mean_ppl for m in members),
        })
    return out


def dense_row(aggregated: Sequence[dict], testbed: str) -> dict:
    """The ratio-0 (dense) entry of a testbed."""
    for row in aggregated:
        if row["testbed"] == testbed and row["ratio"] == 0.0:
            return row
    raise KeyError(f"no dense row for testbed {testbed!r}")


def signal_check(aggregated: Sequence[dict], ratio: float = 0.5, methods: Sequence[str] = ("frequency", "reap"),
                 baseline: str = "random") -> dict[str, dict]:
    """Per testbed at ``ratio``: mean relative perplexity change vs dense (over domains) of each of
    ``methods`` and of the seed-averaged ``baseline``; ``passed`` when some method's change is below
    half of the baseline's (a clear win, not noise)."""
    result = {}
    for testbed in dict.fromkeys(r["testbed"] for r in aggregated):
        dense = dense_row(aggregated, testbed)["ppl"]
        changes = {}
        for row in aggregated:
            if row["testbed"] == testbed and row["ratio"] == ratio and row["method"] in (*methods, baseline):
                changes[row["method"]] = pystats.fmean(relative_change(row["ppl"][d], dense[d]) for d in dense)
        if baseline not in changes:
            continue
        best = min((changes[m] for m in methods if m in changes), default=math.inf)
        result[testbed] = {"ratio": ratio, "change": changes,
                           "passed": best < 0.5 * changes[baseline]}
    return result


def markdown_table(aggregated: Sequence[dict], testbed: str) -> str:
    """Perplexity per domain for every method and ratio of one testbed, with the mean change vs dense."""
    dense = dense_row(aggregated, testbed)
    domains = list(dense["ppl"])
    lines = ["| method | removed | experts kept | " + " | ".join(domains) + " | mean change vs dense |",
             "|---|---|---|" + "---|" * len(domains) + "---|"]
    rows = sorted((r for r in aggregated if r["testbed"] == testbed),
                  key=lambda r: (r["ratio"], r["ratio"] > 0 and r["method"]))
    for row in rows:
        name = "dense" if row["ratio"] == 0 else row["method"] + (f" (mean of {row['seeds']})" if row["seeds"] > 1 else "")
        change = pystats.fmean(relative_change(row["ppl"][d], dense["ppl"][d]) for d in domains)
        cells = " | ".join(f"{row['ppl'][d]:.2f}" for d in domains)
        kept = row["experts_kept"]
        if row.get("routed_kept") is not None and row["routed_kept"] < 1 and row["ratio"] > 0 and kept == dense["experts_kept"]:
            kept = f"{kept} ({100 * row['routed_kept']:.0f}% of routed params)"  # neuron slicing: every expert, thinner
        lines.append(f"| {name} | {100 * row['ratio']:g}% | {kept} | {cells} | {100 * change:+.1f}% |")
    return "\n".join(lines)


def divergence_table(divergence: Mapping[str, Mapping[int, Mapping[str, float]]]) -> str:
    """Mean and max pairwise JS divergence of expert usage between domains, per testbed and layer."""
    lines = ["| testbed | MoE layer | mean JS (bits) | max JS | most different pair |", "|---|---|---|---|---|"]
    for testbed, layers in divergence.items():
        for layer, pairs in layers.items():
            worst = max(pairs, key=pairs.get)
            lines.append(f"| {testbed} | {layer} | {pystats.fmean(pairs.values()):.3f} | {pairs[worst]:.3f} | {worst} |")
    return "\n".join(lines)


def write_csv(rows: Sequence[SweepRow], path: Path) -> None:
    """One line per evaluated model and domain."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["testbed", "method", "ratio", "seed", "experts_kept", "domain", "ppl"])
        for row in rows:
            for domain, value in row.ppl.items():
                writer.writerow([row.testbed, row.method, row.ratio, "" if row.seed is None else row.seed,
                                 row.experts_kept, domain, f"{value:.6f}"])


def plot_testbed(aggregated: Sequence[dict], testbed: str, path: Path) -> None:
    """One panel per domain: perplexity against % of routed-expert parameters removed (experts dropped
    or merged, or neurons sliced: the same share at the same ratio), a line per method (stochastic
    methods: mean with their min-max band over seeds; line styles cycle so that many methods stay
    apart), the legend beside the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    rows = [r for r in aggregated if r["testbed"] == testbed]
    dense = dense_row(aggregated, testbed)
    domains = list(dense["ppl"])
    methods = sorted({r["method"] for r in rows if r["ratio"] > 0})
    fig, axes = plt.subplots(1, len(domains), figsize=(4 * len(domains), 3.6), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, domain in zip(axes[0], domains):
        for number, method in enumerate(methods):
            points = sorted([(0.0, dense)] + [(r["ratio"], r) for r in rows if r["method"] == method and r["ratio"] > 0],
                            key=lambda p: p[0])
            xs = [100 * x for x, _ in points]
            line, = ax.plot(xs, [r["ppl"][domain] for _, r in points], marker="o", label=method,
                            linestyle=styles[(number // 10) % len(styles)])
            if any(r["seeds"] > 1 for _, r in points):
                ax.fill_between(xs, [r["ppl_min"][domain] for _, r in points], [r["ppl_max"][domain] for _, r in points],
                                color=line.get_color(), alpha=0.15)
        ax.set_yscale("log")
        for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.set_title(f"{testbed}: {domain}")
        ax.set_xlabel("% of routed-expert parameters removed")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out perplexity")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# running


def sweep_observers(settings: SweepSettings) -> tuple[str, ...] | None:
    """The observers the sweep's methods need: every default one (None) plus the opt-in ones the
    methods of ``settings`` read (:func:`moeprune.api.statistics_for`)."""
    from .api import statistics_for
    from .observe import OBSERVERS

    wanted = {name for method, _, _ in _runs(settings) for name in statistics_for(method.name)}
    opt_in = {name for name in wanted if OBSERVERS[name].opt_in and name not in whole_set_observers(settings)}
    if not opt_in:
        return None
    return tuple(name for name, cls in OBSERVERS.items() if not cls.opt_in or name in opt_in)


def whole_set_observers(settings: SweepSettings) -> tuple[str, ...]:
    """The observers the sweep's methods need whose statistics do not merge across domains
    (``mergeable = False``: the ``taylor`` saliencies): collected in one pass over every domain's
    calibration rows (:func:`add_whole_set_stats`), not per domain."""
    from .api import statistics_for
    from .observe import OBSERVERS

    wanted = {name for method, _, _ in _runs(settings) for name in statistics_for(method.name)}
    return tuple(name for name in OBSERVERS if name in wanted and not getattr(OBSERVERS[name], "mergeable", True))


def add_whole_set_stats(stats: RouterStats, model_dir: str | Path, corpus_dir: str | Path, work: Path,
                        settings: SweepSettings, progress: bool = True) -> RouterStats:
    """``stats`` (the merged per-domain statistics) with the dense entries of :func:`whole_set_observers`
    added, from one pass over the same calibration rows as the per-domain passes, concatenated."""
    from . import api
    from .calibration.data import CalibrationBatch
    from .testbed.corpus import DOMAINS

    names = whole_set_observers(settings)
    if not names:
        return stats
    parts = [api.calibration_data(model_dir, Path(corpus_dir) / domain / "train.jsonl", samples=settings.samples_per_domain,
                                  seq_len=settings.seq_len) for domain in settings.domains or DOMAINS]
    calibration = CalibrationBatch(torch.cat([p.input_ids for p in parts]), torch.cat([p.attention_mask for p in parts]))
    whole = api.collect(model_dir, calibration=calibration, observers=names, progress=progress,
                        out=work / "stats-whole-set.safetensors", overwrite=True)
    for layer, entries in whole.dense.items():
        stats.dense.setdefault(layer, {}).update(entries)
    return stats


def collect_domain_stats(model_dir: str | Path, corpus_dir: str | Path, work: Path, settings: SweepSettings,
                         progress: bool = True, observers: tuple[str, ...] | None = None,
                         replaceme_depth: int | None = None) -> dict[str, RouterStats]:
    """One statistics collection per domain, on the corpus's TRAIN split file (``<domain>/train.jsonl``,
    a ``text`` field per line; held-out splits stay unseen), kept in memory and saved under ``work``.
    ``observers``: default :func:`sweep_observers`; ``replaceme_depth``: the ReplaceMe cut depth
    (default: the first of :func:`replaceme_depths`, else 1)."""
    from . import api
    from .observe import DenseSettings
    from .testbed.corpus import DOMAINS

    work.mkdir(parents=True, exist_ok=True)
    observers = observers or sweep_observers(settings)
    depth = replaceme_depth or next(iter(replaceme_depths(settings)), 1)
    tag = "" if replaceme_depth is None else f"-replaceme{depth}"
    out = {}
    for domain in settings.domains or DOMAINS:
        out[domain] = api.collect(model_dir, Path(corpus_dir) / domain / "train.jsonl", samples=settings.samples_per_domain, seq_len=settings.seq_len,
                                  out=work / f"stats-{domain}{tag}.safetensors", overwrite=True, progress=progress,
                                  observers=observers, dense=DenseSettings(replaceme_depth=depth))
    return out


def replaceme_depths(settings: SweepSettings) -> tuple[int, ...]:
    """The cut depths (``layers``) of the sweep's ReplaceMe runs, ascending: its statistics depend on
    the depth, so each depth after the first is collected again (:func:`replaceme_stats_by_depth`)."""
    return tuple(sorted({int((run.options or {}).get("layers", 1)) for run, _, _ in _runs(settings)
                         if run.name == "replaceme"}))


def replaceme_stats_by_depth(stats: RouterStats, model_dir: str | Path, corpus_dir: str | Path, work: Path,
                             settings: SweepSettings, progress: bool = True) -> dict[int, RouterStats]:
    """``stats`` for every ReplaceMe depth of the sweep: the first depth's are ``stats`` itself; each
    other depth's are ``stats`` with the ReplaceMe sums replaced by a per-domain collection (same
    calibration rows, merged) at that depth."""
    depths = replaceme_depths(settings)
    out = {depths[0]: stats} if depths else {}
    for depth in depths[1:]:
        merged = merge_all(list(collect_domain_stats(model_dir, corpus_dir, work, settings, progress,
                                                     observers=("replaceme",), replaceme_depth=depth).values()))
        dense = {layer: {**{k: v for k, v in entries.items() if not k.startswith("replaceme_")}, **merged.dense.get(layer, {})}
                 for layer, entries in stats.dense.items()}
        out[depth] = RouterStats(stats.layers, {**stats.metadata, "replaceme_depth": depth}, dense)
    return out


def held_out_streams(tokenizer, corpus_dir: str | Path, settings: SweepSettings) -> dict[str, list[int]]:
    """Per domain, the TEST split tokenized once and capped at ``eval_tokens`` (shared by every model
    a comparison evaluates)."""
    from .evaluation.perplexity import held_out_stream
    from .testbed.corpus import DOMAINS

    return {d: held_out_stream(tokenizer, corpus_dir, d, max_tokens=settings.eval_tokens)
            for d in settings.domains or DOMAINS}


def evaluate_streams(model, streams: Mapping[str, list[int]], settings: SweepSettings) -> dict[str, float]:
    """Held-out perplexity per domain (the sweep's metric)."""
    from .evaluation.perplexity import stream_perplexity

    return {domain: stream_perplexity(model, stream, seq_len=settings.eval_seq_len) for domain, stream in streams.items()}


def parse_method_label(label: str) -> tuple[str, dict]:
    """``"camera_p@layout=compact,selection=per_layer"`` -> ("camera_p", {"layout": "compact", ...}):
    a method with its options (integers parsed as int, other numbers as float, true/false as bool),
    so one sweep compares a method's variants."""
    name, _, given = label.partition("@")
    options = {}
    for item in filter(None, given.split(",")):
        key, _, value = item.partition("=")
        options[key] = _option_value(value)
    return name, options


def _option_value(text: str):
    """``"2"`` -> 2, ``"0.6"`` -> 0.6, ``"false"`` -> False, anything else the text itself."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@dataclass(frozen=True)
class Run:
    """One compared variant: a registered method with its options, shown as ``label``."""

    label: str
    method: Method
    options: dict | None = None

    @property
    def name(self) -> str:
        """The registered method's name."""
        return self.method.name


def _runs(settings: SweepSettings) -> list[tuple[Run, float, int]]:
    """(run, ratio, seed) of every run: ``settings.methods`` (a name, or ``name@option=value,...``:
    :func:`parse_method_label`) or, when None, every expert and neuron method of the registry
    (:mod:`moeprune.methods`; dense methods, whose ratio removes a share of another unit, only when
    named); deterministic methods run with the first seed only."""
    from .methods import methods

    registered = methods()
    labels = settings.methods or tuple(name for name, method in registered.items() if method.granularity != "dense")
    parsed = [(label, *parse_method_label(label)) for label in labels]
    unknown = [name for _, name, _ in parsed if name not in registered]
    if unknown:
        from .errors import PlanError

        raise PlanError(f"unknown compression method(s) {unknown}; choose from: {', '.join(sorted(registered))}")
    for _, name, options in parsed:
        registered[name].method_options(options)  # an option the method does not take: refused now
    return [(Run(label, registered[name], options or None), ratio, seed) for ratio in settings.ratios if ratio > 0
            for label, name, options in parsed
            for seed in (settings.seeds if registered[name].stochastic else settings.seeds[:1])]


def kept_summary(plan, num_experts: int) -> tuple[int, float]:
    """(routed experts left per MoE layer, fraction of routed-expert parameters kept) of a plan:
    experts kept or merged (the mean, rounded, when a global budget makes the counts differ: the
    total is what the methods share), or neurons sliced (every expert kept,
    ``budget["routed_expert_param_ratio"]`` removed)."""
    from .ops.merge import merged_counts

    counts = {**plan.kept_counts(), **merged_counts(plan)}
    if counts:
        return round(sum(counts.values()) / len(counts)), sum(counts.values()) / (len(counts) * num_experts)
    return num_experts, 1.0 - float(plan.budget.get("routed_expert_param_ratio", 0.0))


def evaluate_methods(testbed: str, model_dir: str | Path, stats: RouterStats, corpus_dir: str | Path,
                     settings: SweepSettings, progress: bool = True,
                     replaceme_stats: Mapping[int, RouterStats] | None = None) -> list[SweepRow]:
    """The dense model and every method x ratio (x seed) of ``settings``, scored on ``stats``
    (ReplaceMe runs: on ``replaceme_stats[depth]`` when given, :func:`replaceme_stats_by_depth`)."""
    from .evaluation import load_checkpoint

    model, tokenizer = load_checkpoint(model_dir)
    streams = held_out_streams(tokenizer, corpus_dir, settings)
    num_experts = next(iter(stats.layers.values()))["frequency"].numel()
    rows = [SweepRow(testbed, "dense", 0.0, None, num_experts, evaluate_streams(model, streams, settings))]
    for run, ratio, seed in tqdm(_runs(settings), desc=f"methods on {testbed}", disable=not progress):
        method, label = run.method, run.label
        run_stats = stats
        if method.name == "replaceme" and replaceme_stats:
            run_stats = replaceme_stats.get(int((run.options or {}).get("layers", 1)), stats)
        compressed, plan = method.compress(model, model_dir, run_stats, ratio=ratio, seed=seed,
                                           protect_super_experts=settings.protect_super_experts, options=run.options)
        ppl = evaluate_streams(compressed, streams, settings)
        experts_kept, routed_kept = kept_summary(plan, num_experts)
        rows.append(SweepRow(testbed, label, ratio, seed if method.stochastic else None,
                             experts_kept, ppl, dict(plan.layers), routed_kept))
        logger.info("%s %s %.0f%% seed %s: %s", testbed, label, 100 * ratio, seed,
                    ", ".join(f"{d} {v:.2f}" for d, v in ppl.items()))
        del compressed
    return rows


def sweep_model(testbed: str, model_dir: str | Path, corpus_dir: str | Path, work: Path, settings: SweepSettings,
                progress: bool = True) -> tuple[list[SweepRow], dict[int, dict[str, float]]]:
    """Per-domain statistics, then every method x ratio on one checkpoint: the evaluated rows and
    the expert-usage divergence between domains."""
    by_domain = collect_domain_stats(model_dir, corpus_dir, work, settings, progress=progress)
    stats = add_whole_set_stats(merge_all(list(by_domain.values())), model_dir, corpus_dir, work, settings, progress)
    replaceme_stats = replaceme_stats_by_depth(stats, model_dir, corpus_dir, work, settings, progress)
    rows = evaluate_methods(testbed, model_dir, stats, corpus_dir, settings, progress, replaceme_stats)
    return rows, usage_divergence(by_domain)


def write_results(rows: Sequence[SweepRow], divergence: Mapping[str, Mapping[int, Mapping[str, float]]],
                  out_dir: Path, settings: SweepSettings, header: str = "") -> dict:
    """results.json, results.csv, results.md and one PNG per testbed into ``out_dir``; returns the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    aggregated = aggregate(rows)
    checks = signal_check(aggregated)
    testbeds = list(dict.fromkeys(r.testbed for r in rows))
    summary = {"settings": asdict(settings), "rows": [asdict(r) | {"mean_ppl": r.mean_ppl} for r in rows],
               "aggregated": aggregated, "signal_check": checks,
               "divergence": {t: {str(k): v for k, v in d.items()} for t, d in divergence.items()}}
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_csv(rows, out_dir / "results.csv")
    parts = [header] if header else []
    for testbed in testbeds:
        plot_testbed(aggregated, testbed, out_dir / f"{testbed}.png")
        parts.append(f"### {testbed}\n\n{markdown_table(aggregated, testbed)}\n\n![{testbed}]({testbed}.png)")
        if testbed in checks:
            c = checks[testbed]
            verdict = "passed" if c["passed"] else "NOT passed"
            parts.append(f"Signal check at {int(100 * c['ratio'])}% removed ({verdict}): mean perplexity change vs dense "
                         + ", ".join(f"{m} {100 * v:+.1f}%" for m, v in c["change"].items()))
    if divergence:
        parts.append("### Expert-usage divergence between domains\n\n" + divergence_table(divergence))
    (out_dir / "results.md").write_text("\n\n".join(parts) + "\n")
    return summary
