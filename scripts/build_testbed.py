#!/usr/bin/env python
"""Train a testbed MoE model from scratch on the offline corpus and save it as an HF checkpoint.

    python scripts/build_testbed.py --recipe mixtral --out runs/mixtral [--steps N] [--corpus DIR]
    python scripts/build_testbed.py --recipe mixtral --cache            # build_or_load_testbed
    python scripts/build_testbed.py --benchmark 20 --threads 2          # tokens/s of every recipe

Recipes: see moeprune/testbed/models.py; the training procedure, the measured speeds and the
chosen step counts: moeprune/testbed/train.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeprune.testbed.corpus import build_corpus, corpus_is_built  # noqa: E402
from moeprune.testbed.models import list_recipes  # noqa: E402
from moeprune.testbed.train import build_or_load_testbed, measure_throughput, train_testbed  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="mixtral", choices=list_recipes())
    ap.add_argument("--out", help="checkpoint folder to write")
    ap.add_argument("--steps", type=int, default=None, help="override the recipe's fixed step count")
    ap.add_argument("--corpus", default=None,
                    help="corpus folder (built there if missing; default: a temporary folder next to --out)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the run")
    ap.add_argument("--cache", action="store_true",
                    help="build or load the cached testbed (~/.cache/moeprune/testbeds) and print its path")
    ap.add_argument("--cache-dir", default=None, help="cache root for --cache")
    ap.add_argument("--benchmark", type=int, default=0, metavar="STEPS",
                    help="measure training tokens/s over STEPS steps for --recipe (or all with --all)")
    ap.add_argument("--all", action="store_true", help="with --benchmark: every recipe")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    if args.cache:
        path = build_or_load_testbed(args.recipe, cache_dir=args.cache_dir, seed=args.seed,
                                     progress=not args.no_progress, threads=args.threads)
        print(path)
        return 0

    if args.benchmark or args.out:
        corpus = args.corpus
        if corpus is None:
            base = Path(args.out).parent if args.out else Path(tempfile.gettempdir())
            corpus = str(base / f"corpus-seed{args.seed}")
        if not corpus_is_built(corpus):
            print(f"building corpus in {corpus} ...", file=sys.stderr)
            build_corpus(corpus, seed=args.seed)

    if args.benchmark:
        names = list_recipes() if args.all else [args.recipe]
        for name in names:
            res = measure_throughput(name, corpus, steps=args.benchmark, threads=args.threads or 2, seed=args.seed)
            print(json.dumps(res), flush=True)
        return 0

    if not args.out:
        ap.error("--out is required (or use --cache / --benchmark)")
    path = train_testbed(args.recipe, corpus, args.out, steps=args.steps, seed=args.seed,
                         threads=args.threads, progress=not args.no_progress)
    info = json.loads((Path(path) / "testbed.json").read_text())
    print(json.dumps({k: info[k] for k in ("recipe", "steps", "tokens_seen", "final_train_loss",
                                           "validation_loss", "train_seconds")}, indent=2))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
