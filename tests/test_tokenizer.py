"""Tests for moeprune.tokenizer: round trip, digit splitting, determinism, specials, chat."""

from __future__ import annotations

import time

import pytest
from transformers import AutoTokenizer

from moeprune.errors import DataError
from moeprune.tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    _tiny_corpus,
    _train_raw,
    tiny_tokenizer,
    train_bpe_tokenizer,
)

ROUND_TRIP = [
    "Hello, world!\nSecond line.\n\n  Indented after a blank line.\n",
    "naïve café — 日本語のテキスト, emoji 🎉🚀, math ∑x² ≤ ∞",
    "def add(x, y):\n\treturn x + y  # tab-indented\n\nprint(add(2, 40))\n",
    "  leading and trailing spaces  ",
    "12+7=19\n3.14159 * 2 = 6.28318\n",
    "",
    "\r\nwindows line\r\n",
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text


def test_digits_are_one_token_each(tok):
    ids = tok.encode("12345")
    assert len(ids) == 5
    assert tok.convert_ids_to_tokens(ids) == ["1", "2", "3", "4", "5"]
    in_context = tok.convert_ids_to_tokens(tok.encode("x = 2024"))
    assert [t for t in in_context if t.isdigit()] == ["2", "0", "2", "4"]
    assert all(len(t) == 1 for t in in_context if any(c.isdigit() for c in t))


def test_split_digits_false_merges_numbers():
    texts = ["12345 67890 12345"] * 50
    merged = train_bpe_tokenizer(texts, vocab_size=300, split_digits=False)
    split = train_bpe_tokenizer(texts, vocab_size=300, split_digits=True)
    assert len(merged.encode("12345")) < 5
    assert len(split.encode("12345")) == 5


def test_training_is_deterministic():
    texts = _tiny_corpus(120)
    a = train_bpe_tokenizer(texts, vocab_size=400)
    b = train_bpe_tokenizer(texts, vocab_size=400)
    assert a.get_vocab() == b.get_vocab()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    sample = "the router picks 3 experts"
    assert a.encode(sample) == b.encode(sample)


def test_special_tokens(tok):
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == PAD_TOKEN
    assert tok.bos_token_id == tok.eos_token_id
    assert tok.eos_token_id != tok.pad_token_id
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    # Special tokens in text map to their single id; nothing is added around plain text.
    assert tok.encode("a" + EOS_TOKEN + "b")[1:-1] == [tok.eos_token_id]
    assert tok.encode("ab") == tok("ab", add_special_tokens=True)["input_ids"]


def test_chat_template(tok):
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|user|>\nWhat is 2+2?<|endoftext|>\n<|assistant|>\n4<|endoftext|>\n"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")
    assert tok.decode(tok.encode(text)) == text


def test_tiny_tokenizer_size_speed_and_freshness():
    start = time.perf_counter()
    _train_raw(_tiny_corpus(), 512, split_digits=True)
    assert time.perf_counter() - start < 2.0
    a, b = tiny_tokenizer(), tiny_tokenizer()
    assert len(a) == 512
    assert a is not b
    a.model_max_length = 7
    assert b.model_max_length == 2048


def test_model_max_length_and_save_load(tmp_path):
    tok = train_bpe_tokenizer(_tiny_corpus(60), vocab_size=300, model_max_length=128)
    assert tok.model_max_length == 128
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = ROUND_TRIP[2]
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
    assert loaded.pad_token == PAD_TOKEN and loaded.eos_token == EOS_TOKEN
    assert loaded.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    ) == tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_bad_training_input():
    with pytest.raises(DataError, match="at least 258"):
        train_bpe_tokenizer(["some text"], vocab_size=100)
    with pytest.raises(DataError, match="non-empty string"):
        train_bpe_tokenizer(["", ""])
