#!/usr/bin/env python
"""Kept experts from bfloat16 statistics against float32 statistics, on a testbed.

    python scripts/dtype_overlap.py --testbed mixtral --threads 1 [--method reap --ratios 0.25 0.5 0.75]

Collects the sweep's calibration (``--samples-per-domain`` rows of 256 tokens from each corpus
domain's train split, merged exactly) once in float32 and once in bfloat16 on the CPU, plans the
method at each ratio from both, and reports the fraction of kept experts the two plans share (per
layer and overall). Prints a markdown table and writes JSON (``--json``) with the git commit.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from _profiles_doc import commit  # noqa: E402

from moeprune import api  # noqa: E402
from moeprune.evaluation.heldout import default_corpus_dir  # noqa: E402
from moeprune.stats import merge_all  # noqa: E402
from moeprune.testbed.corpus import DOMAINS  # noqa: E402
from moeprune.testbed.train import build_or_load_testbed  # noqa: E402


def kept_overlap(a: dict[int, list[int]], b: dict[int, list[int]]) -> dict[int, float]:
    """Per layer, |kept_a & kept_b| / |kept_a| (both plans keep the same number per layer)."""
    return {layer: len(set(a[layer]) & set(b[layer])) / len(a[layer]) for layer in a}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed", default="mixtral")
    ap.add_argument("--method", default="reap")
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    ap.add_argument("--samples-per-domain", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = build_or_load_testbed(args.testbed, progress=False)
    corpus = default_corpus_dir()
    stats = {}
    with tempfile.TemporaryDirectory(prefix="moeprune-dtype-") as tmp:
        for dtype in ("float32", "bfloat16"):
            stats[dtype] = merge_all([
                api.collect(model_dir, Path(corpus) / d / "train.jsonl", samples=args.samples_per_domain,
                            seq_len=args.seq_len, dtype=dtype, progress=False,
                            out=Path(tmp) / f"{dtype}-{d}.safetensors")
                for d in DOMAINS])
    rows = []
    for ratio in args.ratios:
        plans = {dtype: api.plan_pruning(model_dir, method=args.method, ratio=ratio, stats=s).layers
                 for dtype, s in stats.items()}
        per_layer = kept_overlap(plans["float32"], plans["bfloat16"])
        shared = sum(len(set(plans["float32"][l]) & set(plans["bfloat16"][l])) for l in per_layer)
        total = sum(len(k) for k in plans["float32"].values())
        rows.append({"ratio": ratio, "shared": shared, "kept": total, "per_layer": per_layer})
    result = {"commit": commit(), "testbed": args.testbed, "method": args.method, "threads": torch.get_num_threads(),
              "samples_per_domain": args.samples_per_domain, "seq_len": args.seq_len, "rows": rows}
    print(f"{args.method} on {args.testbed}, bfloat16 vs float32 statistics (commit {result['commit']}):\n")
    print("| removed | kept experts shared | per layer |\n|---|---|---|")
    for row in rows:
        layers = ", ".join(f"{v:.2f}" for v in row["per_layer"].values())
        print(f"| {int(round(100 * row['ratio']))}% | {row['shared']} / {row['kept']} | {layers} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
