#!/usr/bin/env python
"""Build the offline multi-domain testbed corpus (see moeprune/testbed/corpus.py for the sources).

    python scripts/build_corpus.py --out runs/corpus [--seed 0] [--max-domain-bytes N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeprune.testbed.corpus import DOMAINS, build_corpus  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (<domain>/<split>.jsonl + manifest.json)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated math questions (default 0)")
    ap.add_argument("--max-domain-bytes", type=int, default=None,
                    help="cap every domain at this many bytes instead of the defaults (for quick tests)")
    args = ap.parse_args(argv)
    t0 = time.time()
    manifest = build_corpus(args.out, seed=args.seed, max_domain_bytes=args.max_domain_bytes)
    for d in DOMAINS:
        splits = manifest.domains[d]["splits"]
        desc = ", ".join(f"{s} {v['docs']} docs / {v['bytes'] / 1e6:.2f} MB" for s, v in splits.items())
        print(f"{d:6s} {desc}")
    print(f"corpus written to {args.out} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
