"""The default job (``moeprune demo``, behind ``make run``): build or load the default testbed,
collect statistics once, prune it with the default method, and compare held-out perplexity per
corpus domain against the dense model and the mean of three random drops.

The testbed (a Mixtral-style MoE trained on the offline corpus, :mod:`moeprune.testbed`) is trained
on first use into ``~/.cache/moeprune/testbeds`` (or ``$MOEPRUNE_CACHE``) with a progress bar and
an estimate, and loaded from there afterwards. The protocol is the quality sweep's
(:mod:`moeprune.sweep`), at one ratio; the pruned checkpoint is written with the streaming writer
and the reported perplexity of the method is measured on that saved checkpoint, loaded with vanilla
transformers.
"""

from __future__ import annotations

import logging
from pathlib import Path

from . import api
from .io.output import check_output, prepared_output
from .super_experts import format_table
from .sweep import (SweepSettings, collect_domain_stats, evaluate_methods, evaluate_streams, held_out_streams,
                    markdown_table, merge_all, usage_divergence, write_results)

logger = logging.getLogger(__name__)


def run_demo(out: str | Path, *, method: str = "reap", ratio: float = 0.5, testbed: str = "mixtral",
             model_dir: str | Path | None = None, corpus_dir: str | Path | None = None, overwrite: bool = False,
             samples_per_domain: int = 16, eval_tokens: int = 8192, random_seeds: tuple[int, ...] = (0, 1, 2),
             progress: bool = True) -> dict:
    """Run the default job into ``out``, print the comparison table, and return the results summary.

    ``model_dir``/``corpus_dir`` replace the testbed and its corpus (tests use a tiny model).
    """
    from .evaluation import load_checkpoint
    from .evaluation.heldout import default_corpus_dir
    from .testbed.train import build_or_load_testbed

    out = check_output(out, overwrite)
    name = testbed if model_dir is None else Path(model_dir).name
    model_dir = Path(model_dir) if model_dir is not None else build_or_load_testbed(testbed, progress=progress)
    corpus_dir = Path(corpus_dir) if corpus_dir is not None else default_corpus_dir()
    settings = SweepSettings(ratios=(0.0, ratio), methods=tuple(dict.fromkeys([method, "random"])), seeds=random_seeds,
                             samples_per_domain=samples_per_domain, eval_tokens=eval_tokens)
    with prepared_output(out, overwrite=overwrite) as work:
        by_domain = collect_domain_stats(model_dir, corpus_dir, work / "calibration", settings, progress=progress)
        stats = merge_all(list(by_domain.values()))
        stats.save(work / "stats.safetensors")
        print(format_table(api.super_experts(model_dir, stats)))
        seed = settings.seeds[0]  # the sweep's seed of a deterministic method and first seed of a stochastic one
        plan = api.plan_pruning(model_dir, method=method, ratio=ratio, stats=stats, seed=seed)
        pruned_dir = work / f"pruned-{method}"
        api.apply(model_dir, plan, pruned_dir, progress=progress)
        rows = evaluate_methods(name, model_dir, stats, corpus_dir, settings, progress=progress)
        pruned, tokenizer = load_checkpoint(pruned_dir)
        saved = evaluate_streams(pruned, held_out_streams(tokenizer, corpus_dir, settings), settings)
        for row in rows:
            if row.method == method and row.ratio == ratio and row.seed in (None, seed):  # the saved checkpoint's row
                drift = max(abs(saved[d] / row.ppl[d] - 1) for d in saved)
                if drift > 1e-4:
                    logger.warning("saved checkpoint perplexity differs from in-memory pruning by %.2g", drift)
                row.ppl = saved
        summary = write_results(rows, {name: usage_divergence(by_domain)}, work, settings,
                                header=f"Default job: {name}, {method} vs random at {int(100 * ratio)}% of experts removed.")
    print(markdown_table(summary["aggregated"], name))
    print(f"\nwrote {out}: pruned checkpoint pruned-{method}/, results.md, {name}.png, statistics")
    return summary
