#!/usr/bin/env python
"""Where sequential collection spends its time: cProfile of one `api.collect` on the benchmark model.

    python scripts/bench_collect.py --threads 1          # builds runs/bench/mixtral-bench
    python scripts/profile_collect.py [--model runs/bench/mixtral-bench] [--top 15]

A warm-up collection runs first (file cache, lazy imports), then the profiled one; prints the
functions with the most own time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/bench/mixtral-bench")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from moeprune import api
    from moeprune.calibration.data import CalibrationBatch

    tokens = torch.load(f"{args.model}/tokens.pt")
    calibration = CalibrationBatch(tokens["input_ids"], tokens["attention_mask"])
    api.collect(args.model, calibration=calibration, batch_size=4, progress=False)
    profiler = cProfile.Profile()
    profiler.enable()
    api.collect(args.model, calibration=calibration, batch_size=4, progress=False)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
