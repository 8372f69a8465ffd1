#!/usr/bin/env python
"""Kept sets chosen per text window (from its own routing) against the domain profile.

    python scripts/profile_window_selection.py                        # default testbed, shipped profiles/
    python scripts/profile_window_selection.py --testbed deepseekv3   # profiles from runs/profiles/deepseekv3

The windows are those of scripts/profile_serving_quality.py: every domain's TEST split (first
--max-tokens tokens, documents joined with eos) in non-overlapping windows of --seq-len tokens, the
first --prompt-tokens a prompt, the rest the continuation whose perplexity is scored. At each kept
fraction (--kept) the continuation is served by:

- `own`: the window's domain profile (the issue's quality target is on this one);
- `prompt-selected`: a kept set chosen for this window alone, from the TCESS of the prompt's own
  tokens at every MoE layer under dense routing (what a per-request selector without a store sees);
- `whole-window`: the same, from the TCESS of the whole window, continuation included: selected on
  the very tokens it is scored on (in-sample), the most a per-text TCESS selection could know. It is
  not an upper bound for every selector: 256 tokens are fewer than a profile's calibration data.

All three keep the profiles' protected experts and select exactly as `moeprune prune` does
(`moeprune.plan.build_plan`). Writes a section of docs/profiles.md.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time

from _profiles_doc import (commit, finish, parse_window_args, script_parser, setup, test_windows,
                           window_options, window_perplexity)

from moeprune.testbed.corpus import DOMAINS  # noqa: E402
from profile_quality import TARGET  # noqa: E402  (own profile at 25% kept within 10% of dense)

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from moeprune.apply import apply_plan_in_memory  # noqa: E402
from moeprune.evaluation import load_checkpoint  # noqa: E402
from moeprune.evaluation.perplexity import continuation_nll  # noqa: E402
from moeprune.plan import build_plan  # noqa: E402
from moeprune.profiles import GENERAL, SignatureExtractor, profile_plan, rebudget_profile, tcess_signature  # noqa: E402

SELECTORS = ("own", "prompt-selected", "whole-window")


def main() -> None:
    parser = script_parser(__doc__)
    window_options(parser, prompt_tokens=True)
    args = parse_window_args(parser)
    model_dir, profiles, corpus = setup(args)
    model, tokenizer = load_checkpoint(model_dir)
    general = profiles[GENERAL]
    pool, r = general.metadata["tcess_pool"], general.metadata.get("tcess_r")
    extractor = SignatureExtractor(model_dir, sorted(general.scores), tcess_pool=pool, tcess_r=r)
    continuation = args.seq_len - args.prompt_tokens
    start_time = time.perf_counter()
    windows = {d: test_windows(tokenizer, corpus, d, args.max_tokens, args.seq_len) for d in DOMAINS}

    def window_scores(ids: torch.Tensor) -> dict[str, dict[int, torch.Tensor]]:
        """TCESS per MoE layer of the window's prompt and of the whole window (dense routing)."""
        logits = extractor.router_logits(ids[None], torch.ones_like(ids[None]))
        return {"prompt-selected": {layer: tcess_signature(z[0, :args.prompt_tokens], pool, r) for layer, z in logits.items()},
                "whole-window": {layer: tcess_signature(z[0], pool, r) for layer, z in logits.items()}}

    scores = {d: [window_scores(ids) for ids in windows[d]] for d in DOMAINS}
    num = general.geometry.num_experts
    dense = {d: continuation_nll(model, windows[d], args.prompt_tokens) for d in DOMAINS}
    results = {"testbed": args.testbed, "commit": commit(), "num_experts": num, "max_tokens": args.max_tokens,
               "seq_len": args.seq_len, "prompt_tokens": args.prompt_tokens,
               "windows": {d: int(windows[d].shape[0]) for d in DOMAINS},
               "perplexity": {"dense": {d: window_perplexity(dense[d], continuation) for d in DOMAINS}}}
    for fraction in args.kept:
        keep = round(fraction * num)
        template = profile_plan(rebudget_profile(general, keep=keep), model_dir)
        rows = {}
        for domain in DOMAINS:
            own = apply_plan_in_memory(copy.deepcopy(model), profile_plan(rebudget_profile(profiles[domain], keep=keep), model_dir))
            nll = {"own": continuation_nll(own, windows[domain], args.prompt_tokens)}
            del own
            for selector in SELECTORS[1:]:
                per_window = []
                for ids, window in tqdm(list(zip(windows[domain], scores[domain])), desc=f"{domain} {selector} {keep}/{num}",
                                        leave=False):
                    kept = build_plan(general.geometry, window[selector], method="tcess", keep=keep,
                                      protected=general.protected, collapse_groups=general.collapse_groups).layers
                    pruned = apply_plan_in_memory(copy.deepcopy(model), dataclasses.replace(template, layers=kept))
                    per_window.append(continuation_nll(pruned, ids[None], args.prompt_tokens)[0])
                nll[selector] = torch.stack(per_window)
            rows[domain] = {key: window_perplexity(v, continuation) for key, v in nll.items()}
        results["perplexity"][f"{keep}/{num}"] = rows
        print(fraction, json.dumps(rows), flush=True)
    results["seconds"] = round(time.perf_counter() - start_time, 1)
    finish(args, f"window selection {args.testbed}", results, format_table(results))


def format_table(results: dict) -> str:
    ppl = results["perplexity"]
    dense = ppl["dense"]
    budgets = [key for key in ppl if key != "dense"]
    lines = [
        f"Testbed `{results['testbed']}`, commit {results['commit']}, `python scripts/profile_window_selection.py "
        f"--testbed {results['testbed']}`: the windows of the serving table (" + ", ".join(
            f"{d} {n}" for d, n in results["windows"].items()) + f" windows of {results['seq_len']} tokens), perplexity "
        f"of the last {results['seq_len'] - results['prompt_tokens']} tokens as a ratio to dense. `own` = the domain "
        f"profile, `prompt-selected` = a kept set per window from the TCESS of its first {results['prompt_tokens']} "
        "tokens, `whole-window` = a kept set per window from the TCESS of the whole window (in-sample: it has seen "
        "the scored tokens).",
        "",
        "| domain | dense | " + " | ".join(f"{s} {b}" for b in budgets for s in SELECTORS) + " |",
        "|---|---|" + "---|" * (len(budgets) * len(SELECTORS)),
    ]
    for domain in DOMAINS:
        cells = [f"{ppl[b][domain][s] / dense[domain]:.2f}x" for b in budgets for s in SELECTORS]
        lines.append(f"| {domain} | {dense[domain]:.2f} | " + " | ".join(cells) + " |")
    low = budgets[0]
    within = {s: [d for d in DOMAINS if ppl[low][d][s] <= TARGET * dense[d]] for s in SELECTORS}
    lines += ["", f"Within {round(100 * (TARGET - 1))}% of dense at {low} kept: " + "; ".join(
        f"{s} {len(within[s])}/{len(DOMAINS)}" + (f" ({', '.join(within[s])})" if within[s] else "") for s in SELECTORS) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
