"""Held-out documents of the testbed corpus for evaluation, with errors that say how to fix them."""

from __future__ import annotations

import os
from pathlib import Path

from moeprune.errors import DataError


class EvaluationError(DataError, ValueError):
    """Evaluation input is unusable: missing held-out split, too little text, bad counts.

    Also a ValueError, so callers of the former ``moeprune.evaluate.perplexity`` keep working.
    """


def default_corpus_dir() -> Path:
    """The default testbed corpus, ``<cache>/testbeds/corpus-v<format>-seed0`` (see
    :func:`moeprune.testbed.train.default_cache_root`), built when missing."""
    from moeprune.testbed.train import ensure_corpus

    return ensure_corpus()


def held_out_documents(corpus_dir: str | os.PathLike, domain: str, split: str = "test") -> list[str]:
    """The documents of ``corpus_dir/<domain>/<split>.jsonl``; EvaluationError when missing or empty."""
    from moeprune.testbed.corpus import DOMAINS, SPLITS, load_domain

    if split not in SPLITS:
        raise EvaluationError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    path = Path(corpus_dir) / domain / f"{split}.jsonl"
    if not path.is_file():
        raise EvaluationError(
            f"{path} not found: {corpus_dir} has no {split!r} split for domain {domain!r} (corpus domains: "
            f"{', '.join(DOMAINS)}); build the corpus with `python scripts/build_corpus.py --out DIR` and pass "
            "--corpus DIR, or leave --corpus out to use the default corpus"
        )
    docs = load_domain(corpus_dir, domain, split)
    if not docs:
        raise EvaluationError(f"{path} holds no documents; rebuild the corpus with `python scripts/build_corpus.py`")
    return docs


def check_positive(name: str, value: int | None) -> None:
    """EvaluationError unless ``value`` is None or a positive integer."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise EvaluationError(f"{name} must be a positive integer, got {value!r}")
