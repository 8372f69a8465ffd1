"""Evaluation of a (pruned) causal LM on the held-out testbed corpus.

- :mod:`.perplexity`: held-out perplexity per corpus domain;
- :mod:`.arithmetic`: exact match of greedy answers on held-out arithmetic questions;
- :mod:`.harness`: lm-evaluation-harness, offline, on local tasks generated from the held-out data.

:func:`evaluate` runs them on a checkpoint folder or an in-memory model.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from moeprune.errors import MoePruneError
from moeprune.testbed.corpus import DOMAINS

from .heldout import EvaluationError, check_positive, default_corpus_dir, held_out_documents

logger = logging.getLogger(__name__)

__all__ = ["evaluate", "load_checkpoint", "default_corpus_dir", "EvaluationError"]


def load_checkpoint(model_dir: str | os.PathLike, *, device=None, dtype=None, tokenizer: str | os.PathLike | None = None):
    """``(model, tokenizer)`` of a local checkpoint folder: ``AutoModelForCausalLM`` (``moeprune.load``
    for a checkpoint with a ``moeprune`` config section: per-layer expert counts, compact widths, the
    exact router, dynamic skipping, ...) in eval mode on
    ``device`` in ``dtype`` (defaults as for calibration: the CPU in float32, a GPU in the
    checkpoint's own dtype; :mod:`moeprune.calibration.device`), and its tokenizer (from
    ``tokenizer``, a folder, when the checkpoint has no tokenizer files), both ``local_files_only``."""
    from transformers import AutoModelForCausalLM

    from moeprune.api import load_tokenizer
    from moeprune.arch import read_config
    from moeprune.calibration.device import resolve_device, resolve_dtype
    from moeprune.loader import load
    from moeprune.structure import read_section

    model_dir = Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise MoePruneError(f"model folder {model_dir} does not exist; pass a local checkpoint folder")
    if not (model_dir / "config.json").is_file():
        raise MoePruneError(f"{model_dir} has no config.json; pass a folder written by save_pretrained")
    device = resolve_device(device)
    config = read_config(model_dir)
    dtype = resolve_dtype(dtype, device, config)
    try:
        if read_section(config.to_dict()):  # structure a stock config cannot express: moeprune.load
            model = load(model_dir, dtype=dtype).to(device)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True).to(device)
        tokenizer = load_tokenizer(model_dir, "evaluation needs the model's tokenizer", tokenizer=tokenizer)
    except (OSError, ValueError) as exc:
        raise MoePruneError(f"cannot load {model_dir} with transformers ({exc}); it needs weights and a tokenizer "
                            "saved with save_pretrained") from exc
    return model.eval(), tokenizer


def evaluate(model_or_dir, corpus_dir: str | os.PathLike | None = None, *, tokenizer=None,
             domains: Sequence[str] = DOMAINS, split: str = "test", seq_len: int = 256, max_tokens: int | None = None,
             batch_size: int = 8, arithmetic: int | None = 200, lm_eval: bool = False, lm_eval_limit: int | None = None,
             lm_eval_tasks: Sequence[str] | None = None, device=None, dtype=None,
             tokenizer_dir: str | os.PathLike | None = None, progress: bool = False) -> dict:
    """Held-out perplexity per domain, arithmetic exact match and (``lm_eval=True``) lm-eval metrics.

    ``model_or_dir``: a checkpoint folder (loaded by :func:`load_checkpoint`) or an in-memory causal
    LM, which then needs ``tokenizer``. ``corpus_dir`` defaults to :func:`default_corpus_dir` (built
    when missing). ``max_tokens`` caps each domain's perplexity stream; ``arithmetic`` is the number
    of questions (0 or None: skipped); ``lm_eval_limit`` the documents per lm-eval task. ``device`` and
    ``dtype`` apply to a checkpoint folder (:func:`load_checkpoint`; ``tokenizer_dir`` for one without
    tokenizer files); an in-memory model stays where it is.
    Returns ``{"model", "corpus", "split", "seq_len", "max_tokens", "perplexity": {domain: ppl},
    "arithmetic": {...}, "lm_eval": {task: {metric: value}}, "seconds": {part: wall seconds}}``.
    """
    from .arithmetic import arithmetic_exact_match
    from .perplexity import domain_perplexities

    for name, value in (("seq_len", seq_len), ("max_tokens", max_tokens), ("batch_size", batch_size),
                        ("lm_eval_limit", lm_eval_limit)):
        check_positive(name, value)
    if arithmetic is not None and arithmetic != 0:
        check_positive("arithmetic", arithmetic)
    if lm_eval:
        from .harness import import_lm_eval

        import_lm_eval()  # fail before any work when the extra is missing
    corpus_dir = Path(corpus_dir).expanduser() if corpus_dir is not None else default_corpus_dir()
    for domain in list(domains) + (["math"] if arithmetic else []):
        held_out_documents(corpus_dir, domain, split)  # fail before loading the model
    if isinstance(model_or_dir, (str, os.PathLike)):
        label = str(model_or_dir)
        model, tokenizer = load_checkpoint(model_or_dir, device=device, dtype=dtype, tokenizer=tokenizer_dir)
    else:
        if tokenizer is None:
            raise MoePruneError("an in-memory model needs its tokenizer: evaluate(model, tokenizer=tokenizer)")
        label, model = type(model_or_dir).__name__, model_or_dir.eval()
    result: dict = {"model": label, "corpus": str(corpus_dir), "split": split, "seq_len": seq_len,
                    "max_tokens": max_tokens, "seconds": {}}
    start = time.perf_counter()
    result["perplexity"] = domain_perplexities(model, tokenizer, corpus_dir, domains, split=split, seq_len=seq_len,
                                               max_tokens=max_tokens, batch_size=batch_size, progress=progress)
    result["seconds"]["perplexity"] = round(time.perf_counter() - start, 2)
    logger.info("perplexity: %s", ", ".join(f"{d} {v:.3f}" for d, v in result["perplexity"].items()))
    if arithmetic:
        start = time.perf_counter()
        result["arithmetic"] = arithmetic_exact_match(model, tokenizer, corpus_dir, n=arithmetic, split=split,
                                                      progress=progress)
        result["seconds"]["arithmetic"] = round(time.perf_counter() - start, 2)
        logger.info("arithmetic exact match: %.3f (n=%d)", result["arithmetic"]["accuracy"], result["arithmetic"]["n"])
    if lm_eval:
        from .harness import run_lm_eval

        start = time.perf_counter()
        result["lm_eval"] = run_lm_eval(model, tokenizer, corpus_dir, tasks=lm_eval_tasks, limit=lm_eval_limit,
                                        batch_size=batch_size, split=split, domains=domains, progress=progress)
        result["seconds"]["lm_eval"] = round(time.perf_counter() - start, 2)
    return result


def format_results(result: dict) -> str:
    """A small plain-text table of an :func:`evaluate` result."""
    lines = [f"model: {result['model']}", f"corpus: {result['corpus']} ({result['split']} split)", ""]
    lines += ["| domain | perplexity |", "|---|---|"]
    lines += [f"| {domain} | {value:.3f} |" for domain, value in result["perplexity"].items()]
    if "arithmetic" in result:
        a = result["arithmetic"]
        lines += ["", f"arithmetic exact match: {a['accuracy']:.3f} ({a['correct']}/{a['n']})"]
    if "lm_eval" in result:
        lines += ["", "| lm-eval task | metric | value |", "|---|---|---|"]
        for task, metrics in result["lm_eval"].items():
            for metric, value in metrics.items():
                if not metric.endswith("_stderr") and metric != "n_docs":
                    lines.append(f"| {task} | {metric} | {value:.4f} |")
    return "\n".join(lines)
