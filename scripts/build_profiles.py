#!/usr/bin/env python
"""Build the task profiles of a testbed: code, prose, legal, math (each from its TRAIN split) and
general (the EASY-EP mix of the four). For the default testbed they are the profiles shipped in
profiles/ (package moeprune._profiles), rebuilt by exactly this command:

    python scripts/build_profiles.py

Other testbeds (``--testbed deepseekv3``) go to runs/profiles/<testbed>/ unless --out is given. The
testbed is trained on first use and cached (moeprune.testbed.train.build_or_load_testbed).
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from _profiles_doc import DEFAULT_TESTBED, default_store, testbed_dir

from moeprune.testbed.corpus import DOMAINS  # noqa: E402

from moeprune.evaluation import default_corpus_dir  # noqa: E402
from moeprune.profiles import DEFAULT_WINDOW_SAMPLES, GENERAL, ProfileStore, build_profile, mix_profiles  # noqa: E402

README = """# Task profiles of the default testbed

Built by `python scripts/build_profiles.py` for the `{testbed}` testbed (model fingerprint
`{fingerprint}`, architecture `{architecture}`): {method}, {budget}, {samples} x {seq_len} tokens
of each domain's train split (the matcher's calibration windows: {window_samples} x {seq_len}). `general` is the EASY-EP mix of the four domain profiles and is the
fallback of `moeprune profile match`. Format and rules: docs/profiles.md.

| profile | kept experts per MoE layer |
|---|---|
{rows}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--testbed", default=DEFAULT_TESTBED, help="testbed recipe or checkpoint folder (default mixtral)")
    parser.add_argument("--out", help="profile store (default profiles/ for mixtral, runs/profiles/<testbed> otherwise)")
    parser.add_argument("--method", default="tcess", help="scoring method (default tcess)")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of experts removed (default 0.5)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--window-samples", type=int, default=DEFAULT_WINDOW_SAMPLES,
                        help=f"rows the matcher's calibration windows are cut from (default {DEFAULT_WINDOW_SAMPLES})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    model = testbed_dir(args.testbed)
    corpus = default_corpus_dir()
    store = ProfileStore(args.out or default_store(args.testbed))
    built = []
    for domain in DOMAINS:
        start = time.perf_counter()
        profile = build_profile(model, domain, corpus / domain / "train.jsonl", method=args.method, ratio=args.ratio,
                                samples=args.samples, seq_len=args.seq_len, window_samples=args.window_samples,
                                progress=False)
        profile.metadata["data_file"] = f"{corpus.name}/{domain}/train.jsonl"
        store.save(profile, overwrite=True)
        built.append(profile)
        print(f"{domain}: kept {profile.kept} ({time.perf_counter() - start:.1f} s)", flush=True)
    general = mix_profiles(built, name=GENERAL)
    store.save(general, overwrite=True)
    print(f"{GENERAL}: kept {general.kept}")
    if store.folder.name == "profiles":
        meta = built[0].metadata
        rows = "\n".join(f"| {p.task} | {'; '.join(f'{layer}: {k}' for layer, k in p.kept.items())} |"
                         for p in [*built, general])
        (store.folder / "README.md").write_text(README.format(
            testbed=args.testbed, fingerprint=meta["model_fingerprint"], architecture=meta["architecture_fingerprint"],
            method=args.method, budget=f"{int(args.ratio * 100)}% of experts removed per layer", samples=args.samples,
            seq_len=args.seq_len, window_samples=args.window_samples, rows=rows), encoding="utf-8")
    print(f"wrote {len(built) + 1} profiles to {store.folder}")


if __name__ == "__main__":
    main()
