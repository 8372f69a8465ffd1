#!/usr/bin/env python
"""Own-domain perplexity of task profiles that drop, merge or recombine (DERN) their dropped experts.

    python scripts/profile_actions.py                              # mixtral, 25% kept
    python scripts/profile_actions.py --testbed qwen3moe --kept 0.25 0.5

For each domain (code, prose, legal, math): one statistics pass on the domain's TRAIN split (the
profile build's data, 64 x 512 tokens, with the mean expert outputs that merging by output needs),
then one profile per action (`--actions`, `ACTION[@option=value,...]`) built from those same
statistics, so every action keeps the same experts and differs only in what it does with the others.
Each profile's plan is applied in memory to a copy of the model and evaluated on its own domain's
TEST split (first --max-tokens tokens, windows of --seq-len), the protocol of profile_quality.py.
Writes a section of docs/profiles.md.
"""

from __future__ import annotations

import copy
import time

from _profiles_doc import commit, finish, script_parser, testbed_dir, window_options

from moeprune.testbed.corpus import DOMAINS  # noqa: E402

from moeprune import api  # noqa: E402
from moeprune.apply import apply_plan_in_memory  # noqa: E402
from moeprune.evaluation import default_corpus_dir, load_checkpoint  # noqa: E402
from moeprune.evaluation.heldout import held_out_documents  # noqa: E402
from moeprune.evaluation.perplexity import perplexity  # noqa: E402
from moeprune.observe import resolve_observers  # noqa: E402
from moeprune.profiles import build_profile, profile_plan  # noqa: E402
from moeprune.profiles.build import profile_calibration  # noqa: E402

DEFAULT_ACTIONS = ["drop", "merge", "merge@router=exact", "merge@similarity=router", "dern", "dern@tau=0.3,kmeans_init=own"]


def parse_action(text: str) -> tuple[str, dict]:
    """``merge@similarity=router,align=off`` -> ("merge", {"similarity": "router", "align": "off"})."""
    action, _, rest = text.partition("@")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key] = float(value) if key == "tau" else int(value) if key == "kmeans_iterations" else value
        except ValueError:
            options[key] = value
    return action, options


def main() -> None:
    parser = script_parser(__doc__)
    window_options(parser)
    parser.set_defaults(kept=[0.25])
    parser.add_argument("--actions", nargs="+", default=DEFAULT_ACTIONS, help=f"default {' '.join(DEFAULT_ACTIONS)}")
    parser.add_argument("--method", default="tcess", help="scoring method of the profiles (default tcess)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--build-seq-len", type=int, default=512)
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS))
    args = parser.parse_args()
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    model_dir, corpus = testbed_dir(args.testbed), default_corpus_dir()
    model, tokenizer = load_checkpoint(model_dir)
    num = api.model_info(model_dir).geometry.num_experts
    start = time.perf_counter()
    results = {"testbed": args.testbed, "commit": commit(), "num_experts": num, "max_tokens": args.max_tokens,
               "seq_len": args.seq_len, "method": args.method, "kept": args.kept, "actions": args.actions,
               "dense": {}, "profiles": {}}
    observers = [*resolve_observers(None), "expert_mean_output"]
    for domain in args.domains:
        text = held_out_documents(corpus, domain, "test")
        results["dense"][domain] = perplexity(model, tokenizer, text, seq_len=args.seq_len, max_tokens=args.max_tokens)
        print(domain, "dense", results["dense"][domain], flush=True)
        data = corpus / domain / "train.jsonl"
        calibration = profile_calibration(model_dir, data, samples=args.samples, seq_len=args.build_seq_len)
        stats = api.collect(model_dir, calibration=calibration, observers=observers, progress=False)
        for fraction in args.kept:
            for spec in args.actions:
                action, options = parse_action(spec)
                profile = build_profile(model_dir, domain, data, method=args.method, keep=round(fraction * num),
                                        samples=args.samples, seq_len=args.build_seq_len, stats=stats,
                                        window_lengths=(16,), max_windows=2, window_samples=1, progress=False,
                                        action=action, action_options=options)
                pruned = apply_plan_in_memory(copy.deepcopy(model), profile_plan(profile, model_dir))
                value = perplexity(pruned, tokenizer, text, seq_len=args.seq_len, max_tokens=args.max_tokens)
                results["profiles"][f"{domain}@{fraction}@{spec}"] = {"kept": profile.kept, "perplexity": value}
                print(domain, fraction, spec, value, f"{value / results['dense'][domain]:.3f}x", flush=True)
                del pruned
    results["seconds"] = round(time.perf_counter() - start, 1)
    finish(args, f"actions {args.testbed}", results, format_table(results))


def format_table(results: dict) -> str:
    num, dense = results["num_experts"], results["dense"]
    domains = list(dense)
    lines = [
        f"Testbed `{results['testbed']}`, commit {results['commit']}, `python scripts/profile_actions.py --testbed "
        f"{results['testbed']} --kept {' '.join(map(str, results['kept']))} --actions {' '.join(results['actions'])}` "
        f"(OMP_NUM_THREADS=1, 1 thread, {results['seconds']:.0f} s): own-domain perplexity (test split, first "
        f"{results['max_tokens']} tokens, windows of {results['seq_len']}) as a ratio to dense; one {results['method']} "
        "profile per domain and action, all from the same statistics of the domain's train split (64 x 512 tokens), "
        "so every action keeps the same experts; applied in memory.",
        "",
        "| kept | action | " + " | ".join(domains) + " | mean |",
        "|---|---|" + "---|" * (len(domains) + 1),
        "| all | dense | " + " | ".join(f"{dense[d]:.3f}" for d in domains) + " | |",
    ]
    for fraction in results["kept"]:
        for spec in results["actions"]:
            ratios = [results["profiles"][f"{d}@{fraction}@{spec}"]["perplexity"] / dense[d] for d in domains]
            lines.append(f"| {round(fraction * num)}/{num} | {spec} | " + " | ".join(f"{r:.2f}x" for r in ratios)
                         + f" | {sum(ratios) / len(ratios):.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
