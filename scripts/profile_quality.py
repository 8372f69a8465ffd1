#!/usr/bin/env python
"""Held-out perplexity under task profiles vs the dense model.

    python scripts/profile_quality.py                        # default testbed, shipped profiles/
    python scripts/profile_quality.py --testbed deepseekv3   # profiles from runs/profiles/deepseekv3

Every profile (code, prose, legal, math and the mixed `general`) is re-selected from its stored scores
at each kept fraction (--kept, default 25% and 50% of the experts), applied in memory to a copy of the
model (moeprune.apply.apply_plan_in_memory) and evaluated on every domain's TEST split (at most
--max-tokens tokens per domain, windows of --seq-len). Writes a section of docs/profiles.md.
"""

from __future__ import annotations

import copy
import time

from _profiles_doc import commit, finish, parse_window_args, script_parser, setup, window_options

from moeprune.testbed.corpus import DOMAINS  # noqa: E402

from moeprune.apply import apply_plan_in_memory  # noqa: E402
from moeprune.evaluation import load_checkpoint  # noqa: E402
from moeprune.evaluation.heldout import held_out_documents  # noqa: E402
from moeprune.evaluation.perplexity import perplexity  # noqa: E402
from moeprune.profiles import GENERAL, profile_plan, rebudget_profile  # noqa: E402

TARGET = 1.10  # the domain profile at 25% kept should stay within 10% of dense perplexity


def main() -> None:
    parser = script_parser(__doc__)
    window_options(parser)
    args = parse_window_args(parser)
    model_dir, profiles, corpus = setup(args)
    names = [*DOMAINS, GENERAL]
    model, tokenizer = load_checkpoint(model_dir)
    texts = {d: held_out_documents(corpus, d, "test") for d in DOMAINS}

    def ppl(m) -> dict[str, float]:
        return {d: perplexity(m, tokenizer, texts[d], seq_len=args.seq_len, max_tokens=args.max_tokens) for d in DOMAINS}

    start = time.perf_counter()
    num = profiles[GENERAL].geometry.num_experts
    results = {"testbed": args.testbed, "commit": commit(), "num_experts": num, "max_tokens": args.max_tokens,
               "seq_len": args.seq_len, "method": profiles[GENERAL].method, "dense": ppl(model), "profiles": {}}
    print("dense", results["dense"], flush=True)
    for fraction in args.kept:
        keep = round(fraction * num)
        for name in names:
            profile = rebudget_profile(profiles[name], keep=keep)
            pruned = apply_plan_in_memory(copy.deepcopy(model), profile_plan(profile, model_dir))
            results["profiles"][f"{name}@{fraction}"] = {"keep": keep, "perplexity": ppl(pruned)}
            print(name, fraction, results["profiles"][f"{name}@{fraction}"], flush=True)
            del pruned
    results["seconds"] = round(time.perf_counter() - start, 1)
    finish(args, f"quality {args.testbed}", results, format_tables(results, args.kept))


def format_tables(results: dict, fractions: list[float]) -> str:
    dense, table = results["dense"], results["profiles"]
    num = results["num_experts"]
    head = "| domain | dense | " + " | ".join(
        f"own {round(f * num)}/{num} | general {round(f * num)}/{num}" for f in fractions) + " |"
    lines = [
        f"Testbed `{results['testbed']}`, commit {results['commit']}, `python scripts/profile_quality.py --testbed "
        f"{results['testbed']}`: perplexity on each domain's test split (first {results['max_tokens']} tokens, "
        f"windows of {results['seq_len']}); profiles scored with {results['method']}, experts re-selected from the "
        "stored scores at each budget, applied in memory. `own` = the domain's profile, `general` = the EASY-EP mix "
        "of the four.",
        "",
        head,
        "|---|---|" + "---|---|" * len(fractions),
    ]
    for d in DOMAINS:
        cells = []
        for f in fractions:
            for name in (d, GENERAL):
                value = table[f"{name}@{f}"]["perplexity"][d]
                cells.append(f"{value:.3f} ({value / dense[d]:.2f}x)")
        lines.append(f"| {d} | {dense[d]:.3f} | " + " | ".join(cells) + " |")
    low = min(fractions)
    ok = [d for d in DOMAINS if table[f"{d}@{low}"]["perplexity"][d] <= TARGET * dense[d]]
    lines += ["", f"Target (own profile at {round(low * num)}/{num} kept within {round(100 * (TARGET - 1))}% of dense "
              f"perplexity on its domain): met for {len(ok)}/{len(DOMAINS)} domains"
              + (f" ({', '.join(ok)})" if ok else "") + ".", "",
              f"Every profile on every domain at {round(low * num)}/{num} kept (rows: profile; ratio to dense):", "",
              "| profile | " + " | ".join(DOMAINS) + " |", "|---|" + "---|" * len(DOMAINS)]
    for name in (*DOMAINS, GENERAL):
        values = table[f"{name}@{low}"]["perplexity"]
        lines.append(f"| {name} | " + " | ".join(f"{values[d] / dense[d]:.2f}x" for d in DOMAINS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
