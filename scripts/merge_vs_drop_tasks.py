#!/usr/bin/env python
"""Merging keeps multiple choice, dropping keeps generation? (the REAP paper's finding), on the testbeds.

    python scripts/merge_vs_drop_tasks.py --testbeds mixtral qwen3moe deepseekv3 --ratio 0.5 \
        --methods reap hc_smoe@router=exact ream@router=exact dern --threads 1 --out runs/merge-vs-drop

Per testbed: the quality sweep's statistics (moeprune/sweep.py: per-domain TRAIN calibration,
merged; super experts protected), then the dense model and every method at ``--ratio`` (planned
through the registry, applied in memory) judged on the held-out TEST split by

* generation: arithmetic exact match (greedy answer to ``Q: a+b=? A:``, moeprune.evaluation.arithmetic;
  at noise level on these testbeds, docs/results.md "Evaluation") and greedy continuation: from the
  same held-out contexts as the continuation tasks (``split_document``), ``--new-tokens`` greedy
  tokens, scored by the number of leading characters equal to the true text (mean over documents
  and the three domains);
* multiple choice (lm-eval, zero-shot, moeprune.evaluation.harness): ``moeprune_arith_mc`` (the same
  kind of question, 4 answers scored by log-likelihood) and ``moeprune_cont_<domain>`` (the true
  100-character continuation of a held-out document among 4), accuracy ``acc``.

Writes tasks.json and tasks.md into --out; the md table has one row per (testbed, method) and the
chance level of every multiple-choice task is 25%.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from moeprune.evaluation import load_checkpoint  # noqa: E402
from moeprune.evaluation.arithmetic import arithmetic_exact_match, greedy_completions  # noqa: E402
from moeprune.evaluation.harness import CONTINUATION_DOMAINS, TASK_PREFIX, run_lm_eval, split_document  # noqa: E402
from moeprune.evaluation.heldout import default_corpus_dir, held_out_documents  # noqa: E402
from moeprune.stats import merge_all  # noqa: E402
from moeprune.sweep import (SweepSettings, _runs, add_whole_set_stats, collect_domain_stats,  # noqa: E402
                            evaluate_streams, held_out_streams)
from moeprune.testbed.train import build_or_load_testbed  # noqa: E402
from _profiles_doc import run_options, start_run  # noqa: E402

TASKS = (f"{TASK_PREFIX}arith_mc", *(f"{TASK_PREFIX}cont_{d}" for d in CONTINUATION_DOMAINS))
logger = logging.getLogger("merge_vs_drop_tasks")


def common_prefix_length(a: str, b: str) -> int:
    """Number of leading characters ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def continuation_pairs(corpus, n: int) -> dict[str, list[tuple[str, str]]]:
    """Per continuation domain, the first ``n`` (context, true continuation) pairs of the TEST split."""
    out = {}
    for domain in CONTINUATION_DOMAINS:
        pairs = [p for p in map(split_document, held_out_documents(corpus, domain, "test")) if p is not None]
        out[domain] = pairs[:n]
    return out


def continuation_match(model, tokenizer, pairs: dict[str, list[tuple[str, str]]], new_tokens: int) -> dict[str, float]:
    """Per domain, the mean number of leading characters of the greedy continuation equal to the true text."""
    out = {}
    for domain, items in pairs.items():
        completions = greedy_completions(model, tokenizer, [c for c, _ in items], max_new_tokens=new_tokens)
        out[domain] = statistics.fmean(common_prefix_length(g, t) for g, (_, t) in zip(completions, items))
    return out


def evaluate_model(model, tokenizer, corpus, streams, settings, args) -> dict:
    """Held-out perplexity per domain, arithmetic exact match, greedy continuation match and the
    multiple-choice accuracies."""
    arith = arithmetic_exact_match(model, tokenizer, corpus, n=args.arithmetic)
    generated = continuation_match(model, tokenizer, continuation_pairs(corpus, args.limit), args.new_tokens)
    mc = run_lm_eval(model, tokenizer, corpus, tasks=list(TASKS), limit=args.limit, n_docs=args.limit,
                     bootstrap_iters=0)
    return {"ppl": evaluate_streams(model, streams, settings), "arith_em": arith["accuracy"], "generated": generated,
            "mc": {task.removeprefix(TASK_PREFIX): mc[task]["acc"] for task in TASKS}}


def summary_rows(results: list[dict]) -> list[dict]:
    """Per (testbed, method): generation EM, arith MC acc, mean continuation MC acc, mean MC acc
    over all four tasks, and each one's change vs the testbed's dense row (absolute points)."""
    dense = {r["testbed"]: r for r in results if r["method"] == "dense"}
    out = []
    for r in results:
        cont = statistics.fmean(v for k, v in r["mc"].items() if k.startswith("cont_"))
        base = dense[r["testbed"]]
        base_cont = statistics.fmean(v for k, v in base["mc"].items() if k.startswith("cont_"))
        gen, base_gen = statistics.fmean(r["generated"].values()), statistics.fmean(base["generated"].values())
        ppl = statistics.fmean(r["ppl"][d] / base["ppl"][d] - 1 for d in base["ppl"])
        out.append({"testbed": r["testbed"], "method": r["method"], "arith_em": r["arith_em"], "ppl_change": ppl,
                    "gen_chars": gen, "d_gen_chars": gen - base_gen,
                    "arith_mc": r["mc"]["arith_mc"], "cont_mc": cont, "mc_mean": statistics.fmean(r["mc"].values()),
                    "d_arith_em": r["arith_em"] - base["arith_em"], "d_arith_mc": r["mc"]["arith_mc"] - base["mc"]["arith_mc"],
                    "d_cont_mc": cont - base_cont})
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| testbed | method | mean ppl change | greedy continuation, matched chars | arith exact match | "
             "arith MC acc | continuation MC acc (mean of 3) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = (lambda key: "" if r["method"] == "dense" else f" ({100 * r[key]:+.1f})")
        gen = "" if r["method"] == "dense" else f" ({r['d_gen_chars']:+.2f})"
        lines.append(f"| {r['testbed']} | {r['method']} | {100 * r['ppl_change']:+.1f}% | {r['gen_chars']:.2f}{gen} | "
                     f"{100 * r['arith_em']:.1f}%{delta('d_arith_em')} | "
                     f"{100 * r['arith_mc']:.1f}%{delta('d_arith_mc')} | {100 * r['cont_mc']:.1f}%{delta('d_cont_mc')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbeds", nargs="+", default=["mixtral", "qwen3moe", "deepseekv3"])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--methods", nargs="+", default=["reap", "hc_smoe@router=exact", "ream@router=exact", "dern"])
    ap.add_argument("--arithmetic", type=int, default=200, help="held-out arithmetic questions (generation)")
    ap.add_argument("--limit", type=int, default=200, help="documents per multiple-choice task and per greedy domain")
    ap.add_argument("--new-tokens", type=int, default=16, help="greedy continuation length (tokens)")
    run_options(ap, "runs/merge-vs-drop")
    args = ap.parse_args(argv)
    start_run(args)
    started = time.time()
    settings = SweepSettings(ratios=(args.ratio,), methods=tuple(args.methods), seeds=(0,))
    corpus = default_corpus_dir()
    results = []
    for testbed in args.testbeds:
        model_dir = build_or_load_testbed(testbed, progress=not args.quiet)
        with tempfile.TemporaryDirectory(prefix="moeprune-tasks-") as tmp:
            by_domain = collect_domain_stats(model_dir, corpus, Path(tmp), settings, progress=not args.quiet)
            stats = add_whole_set_stats(merge_all(list(by_domain.values())), model_dir, corpus, Path(tmp), settings,
                                        progress=not args.quiet)
        model, tokenizer = load_checkpoint(model_dir)
        streams = held_out_streams(tokenizer, corpus, settings)
        results.append({"testbed": testbed, "method": "dense", **evaluate_model(model, tokenizer, corpus, streams, settings, args)})
        for run, ratio, seed in _runs(settings):
            compressed, _ = run.method.compress(model, model_dir, stats, ratio=ratio, seed=seed,
                                                protect_super_experts=settings.protect_super_experts, options=run.options)
            results.append({"testbed": testbed, "method": run.label,
                            **evaluate_model(compressed, tokenizer, corpus, streams, settings, args)})
            logger.info("%s %s: %s", testbed, run.label, results[-1])
            del compressed
    rows = summary_rows(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tasks.json").write_text(json.dumps({"args": vars(args), "results": results, "summary": rows}, indent=2) + "\n")
    text = (f"Merge vs drop on generation and multiple choice, {100 * args.ratio:.0f}% of experts removed "
            f"({time.time() - started:.0f} s, {torch.get_num_threads()} threads; {args.arithmetic} arithmetic "
            f"questions, {args.limit} documents per multiple-choice task, chance 25%; in brackets: points vs dense).\n\n"
            + markdown(rows) + "\n")
    (out / "tasks.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
