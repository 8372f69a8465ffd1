"""`moeprune stats merge A B [...] --out C`: statistics of disjoint data shards, merged exactly."""

from __future__ import annotations


def register(subparsers) -> None:
    """Add the ``stats`` subcommand and its ``merge`` sub-subcommand (heavy imports in the handler)."""
    from moeprune.cli import common_options

    p = subparsers.add_parser("stats", help="work with statistics files (merge shards)")
    sub = p.add_subparsers(dest="stats_command", required=True)
    merge = sub.add_parser("merge", parents=[common_options()],
                           help="merge statistics of disjoint calibration shards into the statistics of their union")
    merge.add_argument("inputs", nargs="+", metavar="STATS", help="statistics files from `moeprune collect` (two or more)")
    merge.add_argument("--out", required=True, help="merged statistics file to write (.safetensors)")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    merge.set_defaults(handler=run_merge)


def run_merge(args) -> int:
    """Handler of ``moeprune stats merge``: load every input, merge, write ``--out`` atomically."""
    from pathlib import Path

    from moeprune.checks import check_output_writable
    from moeprune.errors import StatsError
    from moeprune.stats import RouterStats, merge_all

    if len(args.inputs) < 2:
        raise StatsError("give at least two statistics files to merge")
    out = check_output_writable(args.out, args.overwrite)
    if any(Path(p).resolve() == out.resolve() for p in args.inputs):
        raise StatsError(f"--out {out} is one of the inputs; choose another --out")
    merged = merge_all([RouterStats.load(path) for path in args.inputs])
    merged.save(out, overwrite=args.overwrite)
    print(f"merged {len(args.inputs)} statistics files ({merged.metadata.get('num_tokens')} tokens, "
          f"{len(merged.layers)} MoE layers) into {out}")
    return 0
