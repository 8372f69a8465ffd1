#!/usr/bin/env python
"""DERN ablation: the migration threshold tau and the k-means initialisation on a testbed.

    python scripts/dern_ablation.py --testbed mixtral --ratios 0.25 0.5 --threads 1 --out runs/dern

Same protocol as the quality sweep (moeprune/sweep.py: per-domain TRAIN statistics merged, super
experts protected, held-out TEST perplexity per domain, geometric mean over domains); every row is
``dern`` planned through the registry and applied in memory (``Method.compress``). tau = 1 migrates
nothing, i.e. plain dropping by I_j (the baseline row). Writes ablation.json and ablation.md to --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from moeprune.evaluation import load_checkpoint  # noqa: E402
from moeprune.evaluation.heldout import default_corpus_dir  # noqa: E402
from moeprune.methods import get_method  # noqa: E402
from moeprune.stats import merge_all  # noqa: E402
from moeprune.sweep import SweepSettings, collect_domain_stats, evaluate_streams, held_out_streams  # noqa: E402
from moeprune.testbed.train import build_or_load_testbed  # noqa: E402
from _profiles_doc import run_options, start_run  # noqa: E402

DEFAULT_TAUS = (1.0, 0.8, 0.6, 0.4, 0.2, 0.0)


def geometric_mean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed", default="mixtral")
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5])
    ap.add_argument("--taus", nargs="+", type=float, default=list(DEFAULT_TAUS))
    ap.add_argument("--inits", nargs="+", default=["magnitude", "own"])
    ap.add_argument("--kmeans-iterations", type=int, default=10)
    ap.add_argument("--gate-in-similarity", choices=["yes", "no"], default="yes")
    run_options(ap, "runs/dern-ablation")
    args = ap.parse_args(argv)
    start_run(args)
    started = time.time()
    settings = SweepSettings(ratios=tuple(args.ratios), methods=("dern",))
    model_dir = build_or_load_testbed(args.testbed, progress=not args.quiet)
    corpus = default_corpus_dir()
    with tempfile.TemporaryDirectory(prefix="moeprune-dern-") as tmp:
        stats = merge_all(list(collect_domain_stats(model_dir, corpus, Path(tmp), settings,
                                                    progress=not args.quiet).values()))
    model, tokenizer = load_checkpoint(model_dir)
    streams = held_out_streams(tokenizer, corpus, settings)
    dern = get_method("dern")
    rows = [{"ratio": 0.0, "tau": None, "init": None, "ppl": evaluate_streams(model, streams, settings)}]
    for ratio in args.ratios:
        for tau in args.taus:
            for init in (args.inits[:1] if tau >= 1.0 else args.inits):  # tau = 1: nothing to initialise
                options = {"tau": tau, "kmeans_init": init, "kmeans_iterations": args.kmeans_iterations,
                           "gate_in_similarity": args.gate_in_similarity == "yes"}
                compressed, plan = dern.compress(model, model_dir, stats, ratio=ratio, options=options)
                migrated = sum(s.get("segments_migrated", 0.0) for s in plan.score_summary.values())
                dropped = sum(s.get("segments_dropped", 0.0) for s in plan.score_summary.values())
                rows.append({"ratio": ratio, "tau": tau, "init": init if tau < 1.0 else "-",
                             "migrated": migrated / dropped if dropped else 0.0,
                             "ppl": evaluate_streams(compressed, streams, settings)})
                logging.getLogger("dern_ablation").info("ratio %.2f tau %.2f init %s: mean ppl %.3f", ratio, tau, init,
                             geometric_mean(rows[-1]["ppl"].values()))
                del compressed
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(rows, indent=2) + "\n")
    dense = geometric_mean(rows[0]["ppl"].values())
    domains = list(rows[0]["ppl"])
    lines = [f"DERN ablation on the {args.testbed} testbed ({time.time() - started:.0f} s, {torch.get_num_threads()} "
             f"threads; k-means iterations {args.kmeans_iterations}, gate in similarity {args.gate_in_similarity}). "
             f"Dense mean perplexity {dense:.3f}.", "",
             "| removed | tau | init | segments migrated | mean ppl | vs dense | " + " | ".join(domains) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(domains)]
    for row in rows[1:]:
        mean = geometric_mean(row["ppl"].values())
        lines.append(f"| {row['ratio']:.0%} | {row['tau']:.2f} | {row['init']} | {row['migrated']:.0%} | {mean:.3f} | "
                     f"{mean / dense - 1:+.1%} | " + " | ".join(f"{row['ppl'][d]:.2f}" for d in domains) + " |")
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
