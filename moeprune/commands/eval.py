"""`moeprune eval MODEL`: held-out perplexity per domain, arithmetic exact match, optional lm-eval."""

from __future__ import annotations

import json

from moeprune.testbed.corpus import DOMAINS


def register(subparsers) -> None:
    """Add the ``eval`` subcommand (heavy imports happen in the handler)."""
    from moeprune.cli import add_device_options, add_tokenizer_option, at_least

    p = subparsers.add_parser("eval", help="held-out perplexity, arithmetic exact match and lm-eval tasks of a model")
    p.add_argument("model", help="local checkpoint folder (e.g. a pruned checkpoint)")
    p.add_argument("--corpus", help="testbed corpus folder (default: the cached default corpus, built if missing)")
    p.add_argument("--domains", nargs="+", default=list(DOMAINS), metavar="DOMAIN",
                   help=f"domains for perplexity and lm-eval (default: {' '.join(DOMAINS)})")
    p.add_argument("--split", default="test", choices=("test", "validation"), help="held-out split (default test)")
    p.add_argument("--max-tokens", type=at_least(1), help="cap on the tokens per domain for perplexity (default: all)")
    p.add_argument("--seq-len", type=at_least(2), default=256, help="perplexity window in tokens (default 256)")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="sequences per forward in perplexity and lm-eval (default 8)")
    p.add_argument("--arithmetic", type=at_least(0), default=200,
                   help="held-out arithmetic questions for exact match (default 200; 0 skips)")
    p.add_argument("--lm-eval", action="store_true", help="also run lm-evaluation-harness on the generated local tasks")
    p.add_argument("--lm-eval-limit", type=at_least(1), help="documents per lm-eval task (default: all, at most 200)")
    p.add_argument("--lm-eval-tasks", nargs="+", metavar="TASK", help="subset of the moeprune_* lm-eval tasks")
    add_device_options(p, where="where the model runs")
    add_tokenizer_option(p)
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--out", help="also write the results to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(handler=run_eval)


def run_eval(args) -> int:
    """Handler of ``moeprune eval``: evaluate, print a table (or JSON), optionally write ``--out``."""
    from moeprune.api import model_info
    from moeprune.calibration.data import check_seq_len_fits
    from moeprune.checks import check_output_writable
    from moeprune.evaluation import evaluate, format_results
    from moeprune.io.output import atomic_write_json

    if args.out:
        check_output_writable(args.out, args.overwrite, protect=[args.model])
    info = model_info(args.model)  # config, shard headers and tensor shapes, before loading the model
    check_seq_len_fits(args.seq_len, getattr(info.config, "max_position_embeddings", None))
    result = evaluate(args.model, args.corpus, domains=args.domains, split=args.split, seq_len=args.seq_len,
                      max_tokens=args.max_tokens, batch_size=args.batch_size, arithmetic=args.arithmetic,
                      lm_eval=args.lm_eval, lm_eval_limit=args.lm_eval_limit, lm_eval_tasks=args.lm_eval_tasks,
                      device=args.device, dtype=args.dtype, tokenizer_dir=args.tokenizer,
                      progress=not args.quiet)
    print(json.dumps(result, indent=2) if args.json else format_results(result))
    if args.out:
        atomic_write_json(args.out, result, overwrite=args.overwrite)
    return 0
