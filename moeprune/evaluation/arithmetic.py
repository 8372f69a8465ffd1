"""Exact match of greedy answers on the corpus's held-out arithmetic questions.

Each held-out math line ``Q: 37+48=? A: 85`` becomes the prompt ``Q: 37+48=? A:``
(:func:`moeprune.testbed.corpus.math_prompt`); the model continues greedily for at most
``max_new_tokens`` tokens, the continuation is cut at its first line break and its first integer
(:func:`moeprune.testbed.corpus.parse_math_answer`) is compared with the true answer.
accuracy = (number of exact matches) / n.
"""

from __future__ import annotations

import logging
import os

import torch
from tqdm.auto import tqdm

from moeprune.testbed.corpus import parse_math, parse_math_answer

from .heldout import EvaluationError, check_positive, held_out_documents
from .perplexity import model_device

logger = logging.getLogger(__name__)

#: Examples kept in the result for a human to look at.
N_EXAMPLES = 5


def math_questions(corpus_dir: str | os.PathLike, n: int, split: str = "test") -> list[tuple[str, int]]:
    """The first ``n`` ``(prompt, answer)`` pairs of the math domain's ``split``, in file order."""
    check_positive("n", n)
    pairs = [pair for doc in held_out_documents(corpus_dir, "math", split) for pair in parse_math(doc)]
    if not pairs:
        raise EvaluationError(f"no arithmetic questions in {corpus_dir}/math/{split}.jsonl; rebuild the corpus")
    if len(pairs) < n:
        logger.warning("only %d arithmetic questions in the %s split (asked for %d)", len(pairs), split, n)
    return pairs[:n]


def completion_answer(completion: str) -> int | None:
    """The integer a completion answers with: the first integer on its first line (None if none)."""
    return parse_math_answer(completion.split("\n", 1)[0])


def left_padded_batch(token_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` [B, max len], sequences right-aligned (left padding)."""
    width = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        if ids:
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[row, width - len(ids):] = 1
    return input_ids, mask


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int = 8, batch_size: int = 32,
                       progress: bool = False) -> list[str]:
    """Greedy (``do_sample=False``) continuations of ``prompts`` with ``model.generate``, batched with
    left padding; decoded without special tokens."""
    check_positive("max_new_tokens", max_new_tokens)
    check_positive("batch_size", batch_size)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    model.eval()
    out: list[str] = []
    for start in tqdm(range(0, len(encoded), batch_size), desc="arithmetic", disable=not progress, leave=False):
        input_ids, mask = left_padded_batch(encoded[start:start + batch_size], pad)
        device = model_device(model)
        input_ids, mask = input_ids.to(device), mask.to(device)
        generated = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                   do_sample=False, pad_token_id=pad, eos_token_id=eos)
        new = generated[:, input_ids.shape[1]:]
        out.extend(tokenizer.decode(row, skip_special_tokens=True) for row in new.tolist())
    return out


def arithmetic_exact_match(model, tokenizer, corpus_dir: str | os.PathLike, n: int = 200, split: str = "test",
                           max_new_tokens: int = 8, batch_size: int = 32, progress: bool = False) -> dict:
    """Exact match of greedy answers on the first ``n`` held-out arithmetic questions.

    Returns ``{"accuracy", "n", "correct", "examples"}``; ``examples`` holds the first
    :data:`N_EXAMPLES` questions with prompt, answer, completion and the parsed prediction.
    """
    pairs = math_questions(corpus_dir, n, split)
    completions = greedy_completions(model, tokenizer, [p for p, _ in pairs], max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, progress=progress)
    predicted = [completion_answer(c) for c in completions]
    hits = [pred == answer for pred, (_, answer) in zip(predicted, pairs)]
    examples = [{"prompt": prompt, "answer": answer, "completion": completion, "predicted": pred, "correct": hit}
                for (prompt, answer), completion, pred, hit in list(zip(pairs, completions, predicted, hits))[:N_EXAMPLES]]
    return {"accuracy": sum(hits) / len(hits), "n": len(hits), "correct": sum(hits), "examples": examples}
