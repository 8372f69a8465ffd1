"""Held-out perplexity of a causal LM (in memory) on a list of documents, and per corpus domain.

Perplexity = exp(sum of next-token negative log-likelihoods / number of predicted tokens), the
standard definition (e.g. Jelinek et al. 1977; as in the HF transformers perplexity guide with
non-overlapping windows).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moeprune.testbed.corpus import DOMAINS

from .heldout import EvaluationError, check_positive, held_out_documents


def token_stream(tokenizer, texts: list[str]) -> list[int]:
    """All documents tokenized and joined with the eos token between them."""
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.append(tokenizer.eos_token_id)
    return stream


def held_out_stream(tokenizer, corpus_dir: str | os.PathLike, domain: str, split: str = "test",
                    max_tokens: int | None = None) -> list[int]:
    """:func:`token_stream` of a corpus domain's ``split`` documents, capped at ``max_tokens``."""
    check_positive("max_tokens", max_tokens)
    return token_stream(tokenizer, held_out_documents(corpus_dir, domain, split))[:max_tokens]


def model_device(model) -> torch.device:
    """Where a model's weights (or, without any, its buffers) live; the CPU for a weightless model."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (float64) and the number of predicted tokens.

    sum_t -log softmax(logits[:, t])[labels[:, t + 1]] over t = 0 .. T-2.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).double()
    shift_labels = labels[:, 1:].reshape(-1)
    return float(F.cross_entropy(shift_logits, shift_labels, reduction="sum")), int(shift_labels.numel())


def perplexity(model, tokenizer, texts: list[str], seq_len: int = 256, batch_size: int = 8, max_tokens: int | None = None,
               progress: bool = False) -> float:
    """exp(mean NLL) over consecutive non-overlapping ``seq_len`` windows of the joined documents.

    Every token but the first of each window is predicted once; ``max_tokens`` caps the stream.
    """
    check_positive("max_tokens", max_tokens)
    stream = token_stream(tokenizer, texts)
    if max_tokens is not None:
        stream = stream[:max_tokens]
    return stream_perplexity(model, stream, seq_len=seq_len, batch_size=batch_size, progress=progress)


@torch.no_grad()
def stream_perplexity(model, stream: Sequence[int], seq_len: int = 256, batch_size: int = 8,
                      progress: bool = False) -> float:
    """:func:`perplexity` of an already tokenized stream (tokenize once, evaluate many models)."""
    check_positive("batch_size", batch_size)
    if seq_len < 2:
        raise EvaluationError(f"seq_len must be at least 2 tokens, got {seq_len!r}")
    windows = [list(stream[i:i + seq_len]) for i in range(0, len(stream) - 1, seq_len)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise EvaluationError("not enough tokens to measure perplexity (need at least 2); pass more text")
    total, count = 0.0, 0
    model.eval()
    full = [w for w in windows if len(w) == seq_len]
    tail = [w for w in windows if len(w) != seq_len]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)] + [[w] for w in tail]
    for group in tqdm(groups, desc="perplexity", disable=not progress, leave=False):
        ids = torch.tensor(group, dtype=torch.long, device=model_device(model))
        nll, n = mean_nll(model(input_ids=ids, use_cache=False).logits, ids)
        total += nll
        count += n
    return math.exp(total / count)


@torch.no_grad()
def continuation_nll(model, windows: torch.Tensor, start: int, batch_size: int = 8) -> torch.Tensor:
    """Per-window summed next-token NLL (float64 [N]) of tokens ``start .. S-1`` of ``windows`` [N, S],
    each predicted from all tokens before it: ``sum_{t >= start} -log p(x_t | x_<t)``.

    Scores a continuation after a prompt of ``start`` tokens (the prompt itself is not scored).
    """
    check_positive("batch_size", batch_size)
    if not 0 < start < windows.shape[1]:
        raise EvaluationError(f"start must leave a prompt and a continuation: 0 < start < {windows.shape[1]}, got {start}")
    model.eval()
    sums = []
    for first in range(0, windows.shape[0], batch_size):
        ids = windows[first:first + batch_size].to(model_device(model))
        logits = model(input_ids=ids, use_cache=False).logits[:, start - 1:-1].double()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, start:].reshape(-1), reduction="none")
        sums.append(nll.reshape(ids.shape[0], -1).sum(dim=1).cpu())
    return torch.cat(sums)


def domain_perplexities(model, tokenizer, corpus_dir: str | os.PathLike, domains: Sequence[str] = DOMAINS,
                        split: str = "test", seq_len: int = 256, max_tokens: int | None = None,
                        batch_size: int = 8, progress: bool = False) -> dict[str, float]:
    """:func:`perplexity` of each domain's ``split`` documents of the corpus (``max_tokens`` per domain)."""
    if not domains:
        raise EvaluationError("no domains given; pass at least one of " + ", ".join(DOMAINS))
    streams = {domain: held_out_stream(tokenizer, corpus_dir, domain, split, max_tokens) for domain in domains}
    return {domain: stream_perplexity(model, stream, seq_len=seq_len, batch_size=batch_size, progress=progress)
            for domain, stream in tqdm(streams.items(), desc="domains", disable=not progress, leave=False)}
