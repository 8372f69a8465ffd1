#!/usr/bin/env python
"""Top-1 retrieval accuracy of task profiles on held-out prompts, for several signature choices.

    python scripts/profile_retrieval.py                      # default testbed, shipped profiles/
    python scripts/profile_retrieval.py --testbed deepseekv3 # profiles from runs/profiles/deepseekv3

For every domain the first --docs TEST-split documents with at least N tokens are cut to their first N
tokens (N in --lengths) and matched against the four domain profiles. Variants: signature of the first
MoE layer / the first 2 / all stored layers, L2 / cosine distance. Accuracy = nearest profile is the
prompt's own domain (no fallback); references: the profile's signature (centroid, PreMoe) or its 5
nearest calibration windows. The fallback rule is measured on in-domain prompts (false fallbacks),
with the prompt's own domain left out of the store, and on random-token prompts (both should fall
back to `general`). Writes a section of docs/profiles.md.
"""

from __future__ import annotations

import json

from _profiles_doc import DOMAINS, commit, script_parser, setup, write_section

from moeprune.evaluation.heldout import held_out_documents  # noqa: E402
import torch  # noqa: E402

from moeprune.profiles import GENERAL, METRICS, REFERENCES, ProfileMatcher, SignatureExtractor  # noqa: E402


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
    vocab = extractor.tokenizer.vocab_size
    generator = torch.Generator().manual_seed(0)
    for length in args.lengths:
        for domain in DOMAINS:
            texts = prompts_of_length(extractor, held_out_documents(corpus, domain, "test"), length, args.docs)
            signatures[length, domain] = extractor.signatures(texts, max_tokens=length)
        random_ids = torch.randint(0, vocab, (args.docs, length), generator=generator)
        signatures[length, "random"] = (extractor.signatures_of_ids(random_ids), [length] * args.docs)

    def matcher(candidates, count, metric, reference):
        return ProfileMatcher(model, candidates + [general], layers=count, metric=metric, reference=reference,
                              extractor=extractor)

    for length in args.lengths:
        for reference in REFERENCES:
            for count in layer_choices:
                for metric in METRICS:
                    chosen = matcher(domain_profiles, count, metric, reference)
                    row = {"length": length, "layers": count, "metric": metric, "reference": reference,
                           "accuracy": {}, "fallback": {}, "n": {}}
                    for domain in DOMAINS:
                        sigs, tokens = signatures[length, domain]
                        matches = chosen.match_signatures(sigs[:, :count], tokens)
                        row["n"][domain] = len(matches)
                        row["accuracy"][domain] = sum(m.nearest == domain for m in matches) / len(matches)
                        row["fallback"][domain] = sum(m.fallback for m in matches) / len(matches)
                    results["accuracy"].append(row)
                    print(json.dumps(row), flush=True)
        for reference in REFERENCES:  # the fallback rule, first MoE layer and all stored layers, L2
            for count in sorted({1, len(stored)}):
                row = {"length": length, "reference": reference, "layers": count, "rate": {}}
                for domain in DOMAINS:  # the prompt's own domain left out of the store
                    others = [p for p in domain_profiles if p.task != domain]
                    sigs, tokens = signatures[length, domain]
                    matches = matcher(others, count, "l2", reference).match_signatures(sigs[:, :count], tokens)
                    row["rate"][domain] = sum(m.fallback for m in matches) / len(matches)
                sigs, tokens = signatures[length, "random"]
                matches = matcher(domain_profiles, count, "l2", reference).match_signatures(sigs[:, :count], tokens)
                row["rate"]["random"] = sum(m.fallback for m in matches) / len(matches)
                results["fallback"].append(row)
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
        "Top-1 retrieval accuracy (nearest profile = the prompt's domain; `centroid`: distance to the profile's "
        "signature, PreMoe; `windows`: mean distance to the 5 nearest calibration windows), and the fraction of "
        "in-domain prompts the fallback rule sends to `general`:",
        "",
        "| tokens | reference | layers | metric | " + " | ".join(DOMAINS) + " | mean | in-domain fallback |",
        "|---|---|---|---|" + "---|" * len(DOMAINS) + "---|---|",
    ]
    for row in rows:
        acc = [row["accuracy"][d] for d in DOMAINS]
        fallback = sum(row["fallback"][d] * row["n"][d] for d in DOMAINS) / sum(row["n"].values())
        lines.append(f"| {row['length']} | {row['reference']} | {row['layers']} | {row['metric']} | "
                     + " | ".join(f"{100 * a:.1f}%" for a in acc) + f" | {100 * sum(acc) / len(acc):.1f}% | "
                     f"{100 * fallback:.1f}% |")
    lines += ["", "Fallback rate (L2; higher is better) for prompts whose own domain is left out of the store, and for "
              f"{args.docs} prompts of uniformly random tokens:", "",
              "| tokens | reference | layers | " + " | ".join(f"{d} left out" for d in DOMAINS) + " | random tokens |",
              "|---|---|---|" + "---|" * (len(DOMAINS) + 1)]
    for row in results["fallback"]:
        lines.append(f"| {row['length']} | {row['reference']} | {row['layers']} | "
                     + " | ".join(f"{100 * row['rate'][d]:.1f}%" for d in (*DOMAINS, "random")) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
