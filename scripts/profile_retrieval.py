#!/usr/bin/env python
"""Top-1 retrieval accuracy of task profiles on held-out prompts, for several signature choices.

    python scripts/profile_retrieval.py                      # default testbed, shipped profiles/
    python scripts/profile_retrieval.py --testbed deepseekv3 # profiles from runs/profiles/deepseekv3

For every domain the first --docs TEST-split documents with at least N tokens are cut to their first N
tokens (N in --lengths) and matched against the four domain profiles. Variants: signature of the first
MoE layer / the first 2 / all stored layers, L2 / cosine distance. Accuracy = nearest profile is the
prompt's own domain (no fallback). The fallback rule is measured twice with the default matcher: on
in-domain prompts (false fallbacks) and with the prompt's own domain left out of the store (a prompt
far from every remaining profile should fall back to `general`). Writes a section of docs/profiles.md.
"""

from __future__ import annotations

import json

from _profiles_doc import DOMAINS, commit, script_parser, setup, write_section

from moeprune.evaluation.heldout import held_out_documents  # noqa: E402
from moeprune.profiles import GENERAL, ProfileMatcher, SignatureExtractor  # noqa: E402


def prompts_of_length(extractor: SignatureExtractor, docs: list[str], length: int, count: int) -> list[str]:
    """The first ``count`` documents with at least ``length`` tokens (the matcher cuts them to ``length``)."""
    chosen = []
    for doc, ids in zip(docs, extractor.encode(docs)):
        if len(ids) >= length:
            chosen.append(doc)
        if len(chosen) == count:
            break
    return chosen


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--docs", type=int, default=100, help="held-out prompts per domain (default 100)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 128], help="prompt lengths in tokens")
    args = parser.parse_args()
    model, profiles, corpus = setup(args)
    domain_profiles = [profiles[d] for d in DOMAINS]
    general = profiles[GENERAL]
    stored = domain_profiles[0].signature_layers
    extractor = SignatureExtractor(model, stored, tcess_pool=general.metadata["tcess_pool"],
                                   tcess_r=general.metadata.get("tcess_r"))
    layer_choices = sorted({1, min(2, len(stored)), len(stored)})
    results = {"testbed": args.testbed, "commit": commit(), "stored_layers": stored, "accuracy": [], "fallback": []}
    signatures = {}
    for length in args.lengths:
        for domain in DOMAINS:
            texts = prompts_of_length(extractor, held_out_documents(corpus, domain, "test"), length, args.docs)
            signatures[length, domain] = extractor.signatures(texts, max_tokens=length)
    for length in args.lengths:
        for count in layer_choices:
            for metric in ("l2", "cosine"):
                matcher = ProfileMatcher(model, domain_profiles + [general], layers=count, metric=metric,
                                         extractor=extractor)
                row = {"length": length, "layers": count, "metric": metric, "accuracy": {}, "fallback": {}, "n": {}}
                for domain in DOMAINS:
                    sigs, tokens = signatures[length, domain]
                    matches = matcher.match_signatures(sigs[:, :count], tokens)
                    row["n"][domain] = len(matches)
                    row["accuracy"][domain] = sum(m.nearest == domain for m in matches) / len(matches)
                    row["fallback"][domain] = sum(m.fallback for m in matches) / len(matches)
                results["accuracy"].append(row)
                print(json.dumps(row), flush=True)
        for domain in DOMAINS:  # leave the prompt's own domain out: default matcher
            others = [p for p in domain_profiles if p.task != domain] + [general]
            matcher = ProfileMatcher(model, others, layers=1, metric="l2", extractor=extractor)
            sigs, tokens = signatures[length, domain]
            matches = matcher.match_signatures(sigs[:, :1], tokens)
            results["fallback"].append({"length": length, "domain": domain,
                                        "rate": sum(m.fallback for m in matches) / len(matches)})
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    if not args.no_doc:
        write_section(f"retrieval {args.testbed}", format_tables(results, args))
    print(format_tables(results, args))


def format_tables(results: dict, args) -> str:
    rows = results["accuracy"]
    counts = {row["length"]: row["n"] for row in rows}
    lines = [
        f"Testbed `{results['testbed']}`, commit {results['commit']}, `python scripts/profile_retrieval.py "
        f"--testbed {results['testbed']}`; held-out test prompts per domain ("
        + " / ".join(f"{length} tokens" for length in counts) + "): "
        + ", ".join(f"{d} " + "/".join(str(n[d]) for n in counts.values()) for d in DOMAINS)
        + f"; the profiles store signatures of MoE layers {results['stored_layers']}.",
        "",
        "Top-1 retrieval accuracy (nearest profile = the prompt's domain), and the fraction of in-domain "
        "prompts the default fallback rule sends to `general`:",
        "",
        "| tokens | layers | metric | " + " | ".join(DOMAINS) + " | mean | in-domain fallback |",
        "|---|---|---|" + "---|" * len(DOMAINS) + "---|---|",
    ]
    for row in rows:
        acc = [row["accuracy"][d] for d in DOMAINS]
        fallback = sum(row["fallback"][d] * row["n"][d] for d in DOMAINS) / sum(row["n"].values())
        lines.append(f"| {row['length']} | {row['layers']} | {row['metric']} | "
                     + " | ".join(f"{100 * a:.1f}%" for a in acc) + f" | {100 * sum(acc) / len(acc):.1f}% | "
                     f"{100 * fallback:.1f}% |")
    lines += ["", "Fallback rate when the prompt's own domain is left out of the store (default matcher: first MoE "
              "layer, L2; higher is better):", "",
              "| tokens | " + " | ".join(DOMAINS) + " |", "|---|" + "---|" * len(DOMAINS)]
    for length in args.lengths:
        rates = {r["domain"]: r["rate"] for r in results["fallback"] if r["length"] == length}
        lines.append(f"| {length} | " + " | ".join(f"{100 * rates[d]:.1f}%" for d in DOMAINS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
