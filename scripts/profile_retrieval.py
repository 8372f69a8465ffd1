#!/usr/bin/env python
"""Top-1 retrieval accuracy of task profiles on held-out prompts, for several signature choices.

    python scripts/profile_retrieval.py                      # default testbed, shipped profiles/
    python scripts/profile_retrieval.py --testbed deepseekv3 # profiles from runs/profiles/deepseekv3

For every domain the first --docs documents with at least N tokens of the VALIDATION and of the TEST
split are cut to their first N tokens (N in --lengths) and matched against the four domain profiles.
Variants: signature of the first MoE layer / the first 2 / all stored layers; rules: the classifier
(logistic regression on the profiles' calibration windows, mean router logits), the 5 nearest
calibration windows (TCESS) or the profile's signature (centroid, PreMoe), with L2 / cosine distance
for the two distance rules. Accuracy = chosen profile is the prompt's own domain (no fallback). The
validation split picks the default variant; the test split reports it. The fallback rule is measured
on in-domain test prompts (false fallbacks), with the prompt's own domain left out of the store, and on
random-token prompts (both should fall back to `general`). Writes a section of docs/profiles.md.
"""

from __future__ import annotations

import json

from _profiles_doc import commit, finish, script_parser, setup

from moeprune.testbed.corpus import DOMAINS  # noqa: E402

from moeprune.evaluation.heldout import held_out_documents  # noqa: E402
import torch  # noqa: E402

from moeprune.profiles import (GENERAL, METRICS, REFERENCES, SIGNATURE_KINDS, ProfileMatcher,  # noqa: E402
                               SignatureExtractor)


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
    splits = ("validation", "test")
    args = parser.parse_args()
    model, profiles, corpus = setup(args)
    domain_profiles = [profiles[d] for d in DOMAINS]
    general = profiles[GENERAL]
    stored = domain_profiles[0].signature_layers
    extractor = SignatureExtractor(model, stored, tcess_pool=general.metadata["tcess_pool"],
                                   tcess_r=general.metadata.get("tcess_r"))
    layer_choices = sorted({1, min(2, len(stored)), len(stored)})
    results = {"testbed": args.testbed, "commit": commit(), "stored_layers": stored, "accuracy": [], "fallback": []}
    signatures = {}  # (split, length, domain, kind) -> (signatures, token counts)
    vocab = extractor.tokenizer.vocab_size
    generator = torch.Generator().manual_seed(0)
    for length in args.lengths:
        for split in splits:
            for domain in DOMAINS:
                texts = prompts_of_length(extractor, held_out_documents(corpus, domain, split), length, args.docs)
                for kind in SIGNATURE_KINDS:
                    signatures[split, length, domain, kind] = extractor.signatures(texts, max_tokens=length, kind=kind)
        random_ids = torch.randint(0, vocab, (args.docs, length), generator=generator)
        both = extractor.signatures_of_ids(random_ids, kinds=SIGNATURE_KINDS)
        for kind in SIGNATURE_KINDS:
            signatures["test", length, "random", kind] = (both[kind], [length] * args.docs)

    def matcher(candidates, count, metric, reference):
        return ProfileMatcher(model, candidates + [general], layers=count, metric=metric, reference=reference,
                              extractor=extractor)

    def matches(chosen, split, length, domain, count):
        sigs, tokens = signatures[split, length, domain, chosen.kind]
        return chosen.match_signatures(sigs[:, :count], tokens)

    for length in args.lengths:
        for reference in REFERENCES:
            for count in layer_choices:
                # the classifier's choice does not depend on the metric (it only measures the fallback distance)
                for metric in (METRICS[:1] if reference == "classifier" else METRICS):
                    chosen = matcher(domain_profiles, count, metric, reference)
                    row = {"length": length, "layers": count, "metric": metric, "reference": reference,
                           "accuracy": {}, "validation": {}, "fallback": {}, "n": {}}
                    for domain in DOMAINS:
                        found = matches(chosen, "test", length, domain, count)
                        row["n"][domain] = len(found)
                        row["accuracy"][domain] = sum(m.nearest == domain for m in found) / len(found)
                        row["fallback"][domain] = sum(m.fallback for m in found) / len(found)
                        found = matches(chosen, "validation", length, domain, count)
                        row["validation"][domain] = sum(m.nearest == domain for m in found) / len(found)
                    results["accuracy"].append(row)
                    print(json.dumps(row), flush=True)
        for reference in REFERENCES:  # the fallback rule, first MoE layer and all stored layers, L2
            for count in sorted({1, len(stored)}):
                row = {"length": length, "reference": reference, "layers": count, "rate": {}}
                for domain in DOMAINS:  # the prompt's own domain left out of the store
                    others = [p for p in domain_profiles if p.task != domain]
                    found = matches(matcher(others, count, "l2", reference), "test", length, domain, count)
                    row["rate"][domain] = sum(m.fallback for m in found) / len(found)
                found = matches(matcher(domain_profiles, count, "l2", reference), "test", length, "random", count)
                row["rate"]["random"] = sum(m.fallback for m in found) / len(found)
                results["fallback"].append(row)
    finish(args, f"retrieval {args.testbed}", results, format_tables(results, args))


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
        "Top-1 retrieval accuracy on the test prompts (chosen profile = the prompt's domain; `classifier`: "
        "logistic regression on the calibration windows' mean router logits, the metric only measures its "
        "fallback distance; `windows`: mean distance to the 5 nearest calibration windows (TCESS); `centroid`: "
        "distance to the profile's TCESS signature, PreMoe), the mean on the validation prompts (which picks "
        "the default), and the fraction of in-domain test prompts the fallback rule sends to `general`:",
        "",
        "| tokens | reference | layers | metric | " + " | ".join(DOMAINS) + " | test mean | validation mean | "
        "in-domain fallback |",
        "|---|---|---|---|" + "---|" * len(DOMAINS) + "---|---|---|",
    ]
    for row in rows:
        acc = [row["accuracy"][d] for d in DOMAINS]
        validation = [row["validation"][d] for d in DOMAINS]
        fallback = sum(row["fallback"][d] * row["n"][d] for d in DOMAINS) / sum(row["n"].values())
        lines.append(f"| {row['length']} | {row['reference']} | {row['layers']} | {row['metric']} | "
                     + " | ".join(f"{100 * a:.1f}%" for a in acc) + f" | {100 * sum(acc) / len(acc):.1f}% | "
                     f"{100 * sum(validation) / len(validation):.1f}% | {100 * fallback:.1f}% |")
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
