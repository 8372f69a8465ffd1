"""Held-out perplexity of a causal LM (in memory) on a list of documents."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def token_stream(tokenizer, texts: list[str]) -> list[int]:
    """All documents tokenized and joined with the eos token between them."""
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.append(tokenizer.eos_token_id)
    return stream


def mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (float64) and the number of predicted tokens."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).double()
    shift_labels = labels[:, 1:].reshape(-1)
    return float(F.cross_entropy(shift_logits, shift_labels, reduction="sum")), int(shift_labels.numel())


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], seq_len: int = 256, batch_size: int = 8, max_tokens: int | None = None,
               progress: bool = False) -> float:
    """exp(mean NLL) over consecutive non-overlapping ``seq_len`` windows of the joined documents.

    Every token but the first of each window is predicted once; ``max_tokens`` caps the stream.
    """
    stream = token_stream(tokenizer, texts)
    if max_tokens is not None:
        stream = stream[:max_tokens]
    windows = [stream[i:i + seq_len] for i in range(0, len(stream) - 1, seq_len)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise ValueError("not enough tokens to measure perplexity")
    total, count = 0.0, 0
    model.eval()
    full = [w for w in windows if len(w) == seq_len]
    tail = [w for w in windows if len(w) != seq_len]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)] + [[w] for w in tail]
    for group in tqdm(groups, desc="perplexity", disable=not progress, leave=False):
        ids = torch.tensor(group, dtype=torch.long)
        nll, n = mean_nll(model(input_ids=ids, use_cache=False).logits, ids)
        total += nll
        count += n
    return math.exp(total / count)
