#!/usr/bin/env python
"""The quality sweep: every registered compression method x fractions of experts removed x testbeds.

    python scripts/quality_sweep.py                          # all three testbeds -> docs/sweep/
    python scripts/quality_sweep.py --testbeds mixtral --ratios 0 0.5 --out runs/sweep
    python scripts/quality_sweep.py --model DIR --name mine  # any local checkpoint + the corpus

Writes results.json, results.csv, results.md (tables, signal check, usage divergence) and one PNG
per testbed. Testbeds are trained on first use (moeprune.testbed.train.build_or_load_testbed).
The protocol is in moeprune/sweep.py; methods come from the registry
(moeprune.methods.methods()), so new methods join without edits here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402
from _profiles_doc import commit, run_options, start_run  # noqa: E402

from moeprune.sweep import DEFAULT_RATIOS, SweepSettings, sweep_model, write_results  # noqa: E402
from moeprune.evaluation.heldout import default_corpus_dir  # noqa: E402
from moeprune.testbed.train import build_or_load_testbed  # noqa: E402

TESTBEDS = ("mixtral", "qwen3moe", "deepseekv3")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbeds", nargs="+", default=list(TESTBEDS), help="testbed recipes (default: all three)")
    ap.add_argument("--model", help="a local checkpoint instead of testbeds (evaluated on the testbed corpus)")
    ap.add_argument("--name", default="model", help="label of --model in the tables")
    ap.add_argument("--ratios", nargs="+", type=float, default=list(DEFAULT_RATIOS))
    ap.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of stochastic methods")
    ap.add_argument("--samples-per-domain", type=int, default=16)
    ap.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens per domain")
    run_options(ap, "docs/sweep")
    args = ap.parse_args(argv)
    start_run(args)
    if args.quiet:  # transformers' own bars (loading weights) too, as `moeprune -q` does
        transformers.utils.logging.disable_progress_bar()
    ratios = tuple(sorted(set([0.0] + args.ratios)))
    settings = SweepSettings(ratios=ratios, methods=tuple(args.methods) if args.methods else None, seeds=tuple(args.seeds),
                             samples_per_domain=args.samples_per_domain, eval_tokens=args.eval_tokens)
    corpus = default_corpus_dir()
    targets = [(args.name, Path(args.model))] if args.model else [(t, None) for t in args.testbeds]
    rows, divergence, started = [], {}, time.time()
    with tempfile.TemporaryDirectory(prefix="moeprune-sweep-") as tmp:
        for name, model_dir in targets:
            model_dir = model_dir or build_or_load_testbed(name, progress=not args.quiet)
            r, d = sweep_model(name, model_dir, corpus, Path(tmp) / name, settings, progress=not args.quiet)
            rows += r
            divergence[name] = d
    header = (f"Quality sweep at commit {commit()} ({time.strftime('%Y-%m-%d')}, {time.time() - started:.0f} s on "
              f"{torch.get_num_threads()} threads). Command: `python scripts/quality_sweep.py "
              f"{' '.join(argv if argv is not None else sys.argv[1:])}`.")
    summary = write_results(rows, divergence, Path(args.out), settings, header=header)
    print((Path(args.out) / "results.md").read_text())
    failed = [t for t, c in summary["signal_check"].items() if not c["passed"]]
    if failed:
        print(f"signal check NOT passed on: {failed}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
