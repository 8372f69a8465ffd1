"""Locally trained byte-level BPE tokenizers, for tests, demos and synthetic test models.

Nothing here touches the network: the tokenizer is trained on the texts it is given with the
``tokenizers`` library and wrapped as a ``transformers`` fast tokenizer, so that a tiny model
built by :mod:`moeprune.testbed` can be saved and loaded like any Hugging Face checkpoint.

Design choices, and why:

* Byte-level BPE (GPT-2 style) covers every byte, so no text is ever out of vocabulary and
  ``decode(encode(x)) == x`` for any string; there is no normalizer, because normalizing
  (e.g. NFC) would break that round trip.
* With ``split_digits`` every digit is its own token (a ``Digits(individual_digits=True)``
  pre-tokenizer runs before the byte-level one), as in Llama / DeepSeek / Qwen tokenizers; it
  makes arithmetic calibration text tokenize the same way regardless of number grouping.
* ``<|endoftext|>`` is the bos, eos and unk token (the GPT-2 convention: byte-level BPE never
  needs unk, but some code expects one to be set) and ``<|pad|>`` is a separate pad token, so
  padding can never be confused with a document boundary.
* Nothing is added automatically around encoded text (no bos/eos post-processing), so
  ``encode`` returns exactly the tokens of the string.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from moeprune.errors import DataError

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)

#: Vocabulary the model cannot do without: the 256 byte symbols plus the special tokens.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

TINY_VOCAB_SIZE = 512

#: A minimal chat format: each message is ``<|role|>\n content <|endoftext|>\n``, and a
#: generation prompt opens an assistant turn. The role markers are plain text, not special tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _pre_tokenizer(split_digits: bool) -> pre_tokenizers.PreTokenizer:
    """Byte-level pre-tokenizer, preceded by a one-token-per-digit split when asked."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if not split_digits:
        return byte_level
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level]
    )


def _train_raw(texts: Iterable[str], vocab_size: int, split_digits: bool) -> Tokenizer:
    """Train the bare ``tokenizers.Tokenizer`` (deterministic for the same texts and settings)."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(
            f"vocab_size={vocab_size} is too small for a byte-level tokenizer: it needs at least "
            f"{MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens); "
            "pass a larger vocab_size."
        )
    texts = [text for text in texts if text]
    if not texts:
        raise DataError(
            "cannot train a tokenizer on no text: pass at least one non-empty string."
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = _pre_tokenizer(split_digits)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    logger.debug(
        "trained byte-level BPE on %d texts: vocab %d (asked %d)",
        len(texts),
        tokenizer.get_vocab_size(),
        vocab_size,
    )
    return tokenizer


def _wrap(raw: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    """Wrap a trained ``tokenizers.Tokenizer`` as a transformers fast tokenizer."""
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    split_digits: bool = True,
    model_max_length: int = 2048,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and return it as a transformers tokenizer.

    The result round-trips any string (``decode(encode(x)) == x``), has ``<|endoftext|>`` as
    bos/eos/unk and ``<|pad|>`` as pad, and a simple chat template so ``apply_chat_template``
    works. With ``split_digits`` every digit is a separate token. The same texts and settings
    always give the same tokenizer. The vocabulary may come out smaller than ``vocab_size`` when
    the texts are too small to support that many merges.

    Raises:
        DataError: ``vocab_size`` is below 258, or ``texts`` holds no non-empty string.
    """
    raw = _train_raw(texts, vocab_size, split_digits)
    return _wrap(raw, model_max_length)


_WORDS = (
    "the model routes each token to a few experts and the router learns which expert fits "
    "best while the other experts stay idle so pruning removes experts that rarely help "
    "a small language model can still write code count numbers and answer questions about "
    "data layers weights tokens and memory when training ends we measure how often every "
    "expert was chosen then we keep the useful ones because quality should not drop after "
    "compression people ask simple questions like what is the capital of france or how many "
    "days are in a week and good answers are short clear correct and friendly this morning "
    "the weather was warm my friend walked to the market bought bread apples cheese and "
    "coffee then went home to read a book about history science music and travel"
).split()
_NAMES = ("x", "y", "total", "count", "value", "items", "result", "index")


def _tiny_corpus(lines: int = 300, seed: int = 1234) -> list[str]:
    """A fixed, deterministic mix of English-ish prose, Python-ish code and arithmetic."""
    rng = random.Random(seed)
    corpus: list[str] = []
    for i in range(lines):
        kind = i % 3
        if kind == 0:
            words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 14))]
            corpus.append(" ".join(words).capitalize() + ".")
        elif kind == 1:
            name, other = rng.choice(_NAMES), rng.choice(_NAMES)
            number = rng.randint(0, 99)
            corpus.append(
                f"def f_{i}({name}):\n    {other} = {name} + {number}\n    return {other}\n"
            )
        else:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            op = rng.choice("+-*")
            result = {"+": a + b, "-": a - b, "*": a * b}[op]
            corpus.append(f"{a}{op}{b}={result}")
    return corpus


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    """Serialized tiny tokenizer, trained once per process (the wrapper is rebuilt per call)."""
    return _train_raw(_tiny_corpus(), TINY_VOCAB_SIZE, split_digits=True).to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A small (vocab 512) byte-level BPE tokenizer trained on a fixed built-in text sample.

    Meant for tests and demos: it is deterministic, takes a fraction of a second, and needs no
    files or network. Each call returns a fresh object, so callers may modify it freely.
    """
    raw = Tokenizer.from_str(_tiny_tokenizer_json())
    return _wrap(raw, model_max_length=2048)
