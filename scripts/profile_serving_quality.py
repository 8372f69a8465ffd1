#!/usr/bin/env python
"""Perplexity with retrieval in the loop: each prompt served by the profile the matcher picks for it.

    python scripts/profile_serving_quality.py                        # default testbed, shipped profiles/
    python scripts/profile_serving_quality.py --testbed deepseekv3   # profiles from runs/profiles/deepseekv3

Every domain's TEST split (first --max-tokens tokens, documents joined with eos) is cut into
non-overlapping windows of --seq-len tokens. The first --prompt-tokens of a window are the prompt: the
default matcher (`ProfileMatcher`, with the fallback to `general`) picks a profile from them, as
`moeprune serve` does per request. The rest of the window is the continuation, scored (perplexity,
given the whole prefix) by the dense model and by profile models applied in memory at each kept
fraction (--kept): the one retrieved for that window (`retrieved`), the window's own domain profile
(`oracle`) and the mixed profile (`general`). Writes a section of docs/profiles.md.
"""

from __future__ import annotations

import copy
import json
import time

from _profiles_doc import (commit, finish, parse_window_args, script_parser, setup, test_windows,
                           window_options, window_perplexity)

from moeprune.testbed.corpus import DOMAINS  # noqa: E402

import torch  # noqa: E402

from moeprune.apply import apply_plan_in_memory  # noqa: E402
from moeprune.evaluation import load_checkpoint  # noqa: E402
from moeprune.evaluation.perplexity import continuation_nll  # noqa: E402
from moeprune.profiles import GENERAL, ProfileMatcher, profile_plan, rebudget_profile  # noqa: E402


def main() -> None:
    parser = script_parser(__doc__)
    window_options(parser, prompt_tokens=True)
    args = parse_window_args(parser)
    model_dir, profiles, corpus = setup(args)
    model, tokenizer = load_checkpoint(model_dir)
    matcher = ProfileMatcher(model_dir, list(profiles.values()))
    start_time = time.perf_counter()
    windows, chosen = {}, {}
    for domain in DOMAINS:
        windows[domain] = test_windows(tokenizer, corpus, domain, args.max_tokens, args.seq_len)
        count = windows[domain].shape[0]
        prompts = windows[domain][:, :args.prompt_tokens]
        signatures = matcher.signatures_of_ids(prompts)
        chosen[domain] = [m.profile for m in matcher.match_signatures(signatures, [args.prompt_tokens] * count)]
    predicted = (args.seq_len - args.prompt_tokens) * sum(w.shape[0] for w in windows.values())

    def nll_of(m) -> dict[str, torch.Tensor]:
        return {d: continuation_nll(m, windows[d], args.prompt_tokens) for d in DOMAINS}

    dense = nll_of(model)
    num = profiles[GENERAL].geometry.num_experts
    results = {"testbed": args.testbed, "commit": commit(), "num_experts": num, "max_tokens": args.max_tokens,
               "seq_len": args.seq_len, "prompt_tokens": args.prompt_tokens, "predicted_tokens": predicted,
               "reference": matcher.reference, "retrieved": {d: {n: chosen[d].count(n) for n in sorted(set(chosen[d]))}
                                                              for d in DOMAINS},
               "perplexity": {"dense": {d: window_perplexity(dense[d], args.seq_len - args.prompt_tokens)
                                        for d in DOMAINS}}}
    for fraction in args.kept:
        keep = round(fraction * num)
        nll = {}
        for name, profile in profiles.items():
            pruned = apply_plan_in_memory(copy.deepcopy(model), profile_plan(rebudget_profile(profile, keep=keep), model_dir))
            nll[name] = nll_of(pruned)
            del pruned
        rows = {}
        for domain in DOMAINS:
            per_window = {
                "retrieved": torch.stack([nll[name][domain][i] for i, name in enumerate(chosen[domain])]),
                "oracle": nll[domain][domain],
                GENERAL: nll[GENERAL][domain],
            }
            rows[domain] = {key: window_perplexity(v, args.seq_len - args.prompt_tokens)
                            for key, v in per_window.items()}
        results["perplexity"][f"{keep}/{num}"] = rows
        print(fraction, json.dumps(rows), flush=True)
    results["seconds"] = round(time.perf_counter() - start_time, 1)
    finish(args, f"serving {args.testbed}", results, format_table(results))


def format_table(results: dict) -> str:
    ppl = results["perplexity"]
    dense = ppl["dense"]
    budgets = [key for key in ppl if key != "dense"]
    continuation = results["seq_len"] - results["prompt_tokens"]
    lines = [
        f"Testbed `{results['testbed']}`, commit {results['commit']}, `python scripts/profile_serving_quality.py "
        f"--testbed {results['testbed']}`: each domain's test split (first {results['max_tokens']} tokens) in windows "
        f"of {results['seq_len']}; the first {results['prompt_tokens']} tokens of a window pick its profile "
        f"(`{results['reference']}` rule, fallback to `general`), perplexity of the other {continuation}. "
        "`retrieved` = the profile picked per window, `oracle` = the window's own domain profile, `general` = the "
        "mixed profile; ratio to dense.",
        "",
        "| domain | windows sent to (count) | dense | " + " | ".join(
            f"retrieved {b} | oracle {b} | general {b}" for b in budgets) + " |",
        "|---|---|---|" + "---|---|---|" * len(budgets),
    ]
    for domain in DOMAINS:
        sent = ", ".join(f"{name} {count}" for name, count in sorted(results["retrieved"][domain].items(),
                                                                        key=lambda kv: -kv[1]))
        cells = []
        for budget in budgets:
            row = ppl[budget][domain]
            cells += [f"{row[key]:.2f} ({row[key] / dense[domain]:.2f}x)" for key in ("retrieved", "oracle", GENERAL)]
        lines.append(f"| {domain} | {sent} | {dense[domain]:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
