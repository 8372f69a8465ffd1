#!/usr/bin/env python
"""NAEE dynamic skipping on a testbed: fraction of expert calls skipped and held-out perplexity change.

    python scripts/dynamic_skip_report.py --testbed mixtral --threads 1 --out runs/skip
    python scripts/dynamic_skip_report.py --model DIR --methods naee reap --ratios 0.25 0.5

Protocol: the sweep's (moeprune/sweep.py): calibration statistics per corpus domain on the TRAIN
split (``--samples-per-domain`` x 256 tokens, merged exactly), held-out perplexity on the TEST split
(at most ``--eval-tokens`` tokens per domain, windows of 256). The skip thresholds beta_l come from
the statistics (moeprune.skipping.betas_from_stats), the skip is installed with
moeprune.skipping.install_dynamic_skip (what moeprune.load does for a --dynamic-skip checkpoint) and
its counter gives the fraction of routed expert calls skipped on the held-out tokens. Rows: the dense
model with and without skipping, and each --methods x --ratios pruned model (Method.compress, the
sweep's in-memory path) with and without skipping. Writes skip.json and skip.md to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from moeprune import api  # noqa: E402
from moeprune.arch import family_for_model_type  # noqa: E402
from moeprune.evaluation import load_checkpoint  # noqa: E402
from moeprune.evaluation.heldout import default_corpus_dir  # noqa: E402
from moeprune.methods import get_method  # noqa: E402
from moeprune.skipping import betas_from_stats, install_dynamic_skip  # noqa: E402
from moeprune.stats import merge_all  # noqa: E402
from moeprune.sweep import (  # noqa: E402
    SweepSettings,
    evaluate_streams,
    held_out_streams,
    relative_change,
)
from moeprune.testbed.corpus import DOMAINS  # noqa: E402
from moeprune.testbed.train import build_or_load_testbed  # noqa: E402
from _profiles_doc import run_options, start_run  # noqa: E402


def evaluate(model, family, betas, streams, settings, skip: bool) -> dict:
    """Held-out perplexity per domain (and the skipped fraction with ``skip``)."""
    state = install_dynamic_skip(model, family, betas) if skip else None
    try:
        ppl = evaluate_streams(model, streams, settings)
    finally:
        if state is not None:
            state.remove()
    row = {"ppl": ppl, "mean_ppl": math.exp(sum(math.log(v) for v in ppl.values()) / len(ppl))}  # SweepRow.mean_ppl
    if state is not None:
        row["skipped_fraction"] = state.counter.fraction
        row["skipped_fraction_per_layer"] = {str(k): v[1] / v[0] for k, v in state.counter.per_layer.items()}
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed", default="mixtral")
    ap.add_argument("--model", help="a local checkpoint instead of the testbed (evaluated on the testbed corpus)")
    ap.add_argument("--methods", nargs="*", default=[], help="also prune with these methods (then skip)")
    ap.add_argument("--ratios", nargs="*", type=float, default=[0.25, 0.5])
    ap.add_argument("--samples-per-domain", type=int, default=16)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    run_options(ap, "runs/skip")
    args = ap.parse_args(argv)
    start_run(args)
    started = time.time()
    settings = SweepSettings(samples_per_domain=args.samples_per_domain, eval_tokens=args.eval_tokens)
    model_dir = Path(args.model) if args.model else build_or_load_testbed(args.testbed, progress=not args.quiet)
    corpus = default_corpus_dir()
    observers = {"dynamic_skip"}
    for name in args.methods:
        observers |= set(api.statistics_for(name))
    stats = merge_all([api.collect(model_dir, corpus / domain / "train.jsonl", samples=settings.samples_per_domain,
                                   seq_len=settings.seq_len, observers=sorted(observers), progress=not args.quiet)
                       for domain in DOMAINS])
    betas = betas_from_stats(stats)
    model, tokenizer = load_checkpoint(model_dir)
    family = family_for_model_type(model.config.model_type)
    streams = held_out_streams(tokenizer, corpus, settings)
    rows = []
    for skip in (False, True):
        rows.append({"model": "dense", "ratio": 0.0, "skip": skip, **evaluate(model, family, betas, streams, settings, skip)})
    for name in args.methods:
        for ratio in args.ratios:
            compressed, _ = get_method(name).compress(model, model_dir, stats, ratio=ratio)
            for skip in (False, True):
                rows.append({"model": name, "ratio": ratio, "skip": skip,
                             **evaluate(compressed, family, betas, streams, settings, skip)})
            del compressed
    dense = rows[0]["ppl"]
    lines = [f"Dynamic skipping (NAEE) on {args.model or args.testbed}: betas "
             + ", ".join(f"layer {k} {v:.3f}" for k, v in betas.items())
             + f"; {time.time() - started:.0f} s on {torch.get_num_threads()} threads. Command: "
             f"`python scripts/dynamic_skip_report.py {' '.join(argv if argv is not None else sys.argv[1:])}`.", "",
             "| model | removed | skip | skipped calls | " + " | ".join(dense) + " | mean change vs dense |",
             "|---|---|---|---|" + "---|" * len(dense) + "---|"]
    for row in rows:
        skipped = f"{100 * row['skipped_fraction']:.1f}%" if row["skip"] else "-"
        row["mean_change"] = sum(relative_change(row["ppl"][d], dense[d]) for d in dense) / len(dense)  # as the sweep
        cells = " | ".join(f"{row['ppl'][d]:.2f}" for d in dense)
        lines.append(f"| {row['model']} | {100 * row['ratio']:.0f}% | {'yes' if row['skip'] else 'no'} | {skipped} | "
                     f"{cells} | {100 * row['mean_change']:+.2f}% |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "skip.json").write_text(json.dumps({"betas": {str(k): v for k, v in betas.items()}, "rows": rows}, indent=2) + "\n")
    (out / "skip.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
