"""Tests for moeprune.calibration.data: readers, packing, padding, determinism and errors."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from moeprune.calibration.data import (
    CalibrationBatch,
    load_calibration,
    read_documents,
    read_texts,
    split_documents,
    tokenize_and_pack,
)
from moeprune.errors import DataError
from moeprune.tokenizer import tiny_tokenizer

DOCS = [
    "The router sends each token to two experts.\nSome experts are rarely chosen.",
    "def f(x):\n    return x + 1\n\tprint(f(41))",
    "12+7=19 and 3*4=12",
    "Unicode: naïve café, 日本語, 🎉",
    "A short one.",
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# ---------------------------------------------------------------------------- file writers


def write_txt(path: Path, docs: list[str]) -> Path:
    # Blank separators of varying shape: several lines, whitespace-only lines.
    separators = ["\n\n", "\n\n\n", "\n   \n", "\n\t\n\n"]
    body = "\n\n"
    for i, doc in enumerate(docs):
        body += doc + separators[i % len(separators)]
    path.write_text(body, encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict], blank_lines: bool = True) -> Path:
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    if blank_lines:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def make_input(kind: str, tmp_path: Path, docs: list[str]) -> Path:
    if kind == "txt":
        return write_txt(tmp_path / "data.txt", docs)
    if kind == "jsonl":
        rows = [{"id": i, "text": d} for i, d in enumerate(docs)]
        return write_jsonl(tmp_path / "data.jsonl", rows)
    if kind == "parquet":
        columns = {"text": docs, "id": list(range(len(docs)))}
        return write_parquet(tmp_path / "data.parquet", columns)
    if kind == "dataset":
        datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "ds"))
        return tmp_path / "ds"
    if kind == "datasetdict":
        dd = datasets.DatasetDict(
            {
                "train": datasets.Dataset.from_dict({"text": docs}),
                "test": datasets.Dataset.from_dict({"text": ["not this split"]}),
            }
        )
        dd.save_to_disk(str(tmp_path / "dd"))
        return tmp_path / "dd"
    if kind == "datasetdict_single":
        dd = datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": docs})})
        dd.save_to_disk(str(tmp_path / "dd1"))
        return tmp_path / "dd1"
    raise AssertionError(kind)


# ---------------------------------------------------------------------------- reading


@pytest.mark.parametrize(
    "kind", ["txt", "jsonl", "parquet", "dataset", "datasetdict", "datasetdict_single"]
)
def test_every_format_reads_the_same_texts(kind, tmp_path):
    path = make_input(kind, tmp_path, DOCS)
    assert read_texts(path) == DOCS


def test_txt_splitting_rules(tmp_path):
    text = "\ufeff\n\nfirst line\r\n  indented second\r\n\r\n \t \r\nsecond doc\n\n\n"
    assert split_documents(text.replace("\ufeff", "")) == [
        "first line\n  indented second",
        "second doc",
    ]
    path = tmp_path / "bom.txt"
    path.write_bytes(text.encode("utf-8"))
    assert read_texts(path) == ["first line\n  indented second", "second doc"]


def test_empty_rows_are_dropped_and_text_field_is_used(tmp_path):
    rows = [{"body": "kept"}, {"body": ""}, {"body": "   "}, {"body": None}, {"body": "also"}]
    path = write_jsonl(tmp_path / "b.jsonl", rows)
    assert read_texts(path, text_field="body") == ["kept", "also"]
    pq_path = write_parquet(tmp_path / "b.parquet", {"body": ["x", None, "", "y"]})
    assert read_texts(pq_path, text_field="body") == ["x", "y"]


def test_messages_rows_need_chat_template(tok, tmp_path):
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation}, {"text": "plain"}])
    with pytest.raises(DataError, match="--chat-template"):
        read_texts(path)
    assert read_documents(path, allow_messages=True) == [conversation, "plain"]

    batch = load_calibration(path, tok, seq_len=64, samples=2, chat_template=True, pack=False)
    rows = [
        tok.decode(ids[mask.bool()]) for ids, mask in zip(batch.input_ids, batch.attention_mask)
    ]
    assert rows == [
        tok.apply_chat_template(conversation, tokenize=False),
        tok.apply_chat_template([{"role": "user", "content": "plain"}], tokenize=False),
    ]


def test_messages_column_in_parquet(tmp_path):
    conversation = [{"role": "user", "content": "from parquet"}]
    path = write_parquet(tmp_path / "m.parquet", {"messages": [conversation]})
    assert read_documents(path, allow_messages=True) == [conversation]


# ---------------------------------------------------------------------------- read errors


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_texts(tmp_path / "nope.txt")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text\nhello\n")
    supported = r"unsupported extension '\.csv'.*\.txt, \.jsonl, \.parquet"
    with pytest.raises(DataError, match=supported):
        read_texts(path)


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl", "empty.parquet", "blank.txt"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_text("" if name.startswith("empty") else "\n  \n\t\n")
    with pytest.raises(DataError, match="is empty"):
        read_texts(path)


def test_no_non_empty_text(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"text": "  "}])
    with pytest.raises(DataError, match="no non-empty text"):
        read_texts(path)
    ds_path = tmp_path / "eds"
    datasets.Dataset.from_dict({"text": ["", None]}).save_to_disk(str(ds_path))
    with pytest.raises(DataError, match="no non-empty text"):
        read_texts(ds_path)


def test_binary_nul_bytes(tmp_path):
    path = tmp_path / "bin.txt"
    path.write_bytes(b"hello\x00\x01\x02world")
    with pytest.raises(DataError, match="looks binary"):
        read_texts(path)


def test_undecodable_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match="not valid UTF-8.*convert it to UTF-8"):
        read_texts(path)
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match="not valid UTF-8"):
        read_texts(jsonl)


def test_jsonl_line_not_json(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_texts(path)


def test_jsonl_line_not_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('["a", "b"]\n')
    with pytest.raises(DataError, match="line 1 is a JSON list, not an object"):
        read_texts(path)


def test_jsonl_missing_text_field(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"text": "ok"}, {"content": "x", "id": 3}])
    with pytest.raises(
        DataError, match=r"line 3 has no 'text' field \(fields: 'content', 'id'\).*--text-field"
    ):
        read_texts(path)


def test_text_field_not_a_string(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [{"text": 42}], blank_lines=False)
    with pytest.raises(DataError, match="line 1: field 'text' is a int, not a string"):
        read_texts(path)


def test_parquet_and_dataset_missing_column(tmp_path):
    path = write_parquet(tmp_path / "c.parquet", {"content": ["x"]})
    with pytest.raises(DataError, match=r"no 'text' field \(fields: 'content'\)"):
        read_texts(path)
    ds_path = tmp_path / "cds"
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(ds_path))
    with pytest.raises(DataError, match=r"no 'text' field \(fields: 'body'\)"):
        read_texts(ds_path)


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "fake.parquet"
    path.write_text("just text")
    with pytest.raises(DataError, match="not a readable parquet file"):
        read_texts(path)


def test_folder_that_is_not_a_dataset(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.txt").write_text("hello")
    with pytest.raises(DataError, match="not a saved dataset"):
        read_texts(tmp_path / "folder")


def test_datasetdict_without_train_split(tmp_path):
    dd = datasets.DatasetDict(
        {
            "a": datasets.Dataset.from_dict({"text": ["x"]}),
            "b": datasets.Dataset.from_dict({"text": ["y"]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="no 'train' split"):
        read_texts(tmp_path / "dd")


# ---------------------------------------------------------------------------- packing


def stream_of(tok, docs: list[str]) -> list[int]:
    """The joined stream the packer is specified to build: documents with eos between them."""
    stream: list[int] = []
    for i, doc in enumerate(docs):
        if i:
            stream.append(tok.eos_token_id)
        stream.extend(tok.encode(doc))
    return stream


def many_docs(n: int = 60) -> list[str]:
    return [f"Document {i}: the router picks expert {i % 7} for token {i * 3}." for i in range(n)]


def test_packing_blocks_are_consecutive_slices(tok):
    docs = many_docs()
    seq_len = 16
    stream = stream_of(tok, docs)
    n_blocks = len(stream) // seq_len
    full = tokenize_and_pack(docs, tok, seq_len=seq_len, samples=n_blocks)
    assert full.input_ids.shape == (n_blocks, seq_len)
    assert full.input_ids.dtype == torch.long and full.attention_mask.dtype == torch.long
    assert full.input_ids.flatten().tolist() == stream[: n_blocks * seq_len]
    assert bool((full.attention_mask == 1).all())
    assert full.num_tokens == n_blocks * seq_len

    some = tokenize_and_pack(docs, tok, seq_len=seq_len, samples=5, seed=3)
    assert some.input_ids.shape == (5, seq_len)
    starts = []
    for row in some.input_ids.tolist():
        index = next(b for b in range(n_blocks) if stream[b * seq_len : (b + 1) * seq_len] == row)
        starts.append(index)
    assert starts == sorted(starts) and len(set(starts)) == 5


def test_packing_has_eos_between_documents(tok):
    seq_len = len(stream_of(tok, ["ab", "cd"]))
    batch = tokenize_and_pack(["ab", "cd"], tok, seq_len=seq_len, samples=1)
    assert batch.input_ids[0].tolist() == tok.encode("ab") + [tok.eos_token_id] + tok.encode("cd")


def test_determinism_and_seed(tok):
    docs = many_docs()
    a = tokenize_and_pack(docs, tok, seq_len=16, samples=4, seed=0)
    b = tokenize_and_pack(docs, tok, seq_len=16, samples=4, seed=0)
    c = tokenize_and_pack(docs, tok, seq_len=16, samples=4, seed=1)
    assert torch.equal(a.input_ids, b.input_ids) and a.data_hash == b.data_hash
    assert not torch.equal(a.input_ids, c.input_ids) and a.data_hash != c.data_hash
    p0 = tokenize_and_pack(docs, tok, seq_len=16, samples=4, seed=0, pack=False)
    p1 = tokenize_and_pack(docs, tok, seq_len=16, samples=4, seed=1, pack=False)
    assert torch.equal(p0.input_ids, tokenize_and_pack(docs, tok, 16, 4, 0, pack=False).input_ids)
    assert not torch.equal(p0.input_ids, p1.input_ids)


def test_too_few_tokens(tok):
    docs = ["one two three", "four five"]
    total = len(stream_of(tok, docs))
    assert tokenize_and_pack(docs, tok, seq_len=total, samples=1).input_ids.shape == (1, total)
    with pytest.raises(
        DataError,
        match=rf"has {total} tokens.*2 samples x {total} tokens need {2 * total}"
        r".*--samples or --seq-len",
    ):
        tokenize_and_pack(docs, tok, seq_len=total, samples=2)


@pytest.mark.parametrize(
    ("seq_len", "samples", "hint"),
    [(1, 4, "seq_len must be at least 2"), (8, 0, "samples must be at least 1")],
)
def test_bad_sizes(tok, seq_len, samples, hint):
    with pytest.raises(DataError, match=hint):
        tokenize_and_pack(["hello world"], tok, seq_len=seq_len, samples=samples)


def test_no_documents(tok):
    with pytest.raises(DataError, match="no calibration documents"):
        tokenize_and_pack([], tok, seq_len=8, samples=1)


# ---------------------------------------------------------------------------- no packing


def test_no_pack_padding_and_mask(tok):
    long = "the router picks experts for every token in this long line"
    docs = ["a", "hello there", long, "x+1"]
    seq_len = 12
    batch = tokenize_and_pack(docs, tok, seq_len=seq_len, samples=3, pack=False)
    kept = [tok.encode(d) for d in docs if len(tok.encode(d)) >= 2]
    assert len(tok.encode("a")) == 1 and len(kept) == 3  # the 1-token document is dropped
    assert batch.input_ids.shape == (3, seq_len)
    for row, ids in enumerate(kept):
        real = ids[:seq_len]
        assert batch.input_ids[row, : len(real)].tolist() == real
        assert batch.attention_mask[row].tolist() == [1] * len(real) + [0] * (seq_len - len(real))
        assert batch.input_ids[row, len(real) :].eq(tok.pad_token_id).all()
    assert batch.num_tokens == sum(min(len(ids), seq_len) for ids in kept)
    # The pad id never appears where the mask is 1, and always where it is 0.
    assert torch.equal(batch.attention_mask == 0, batch.input_ids == tok.pad_token_id)


def test_no_pack_too_few_documents(tok):
    with pytest.raises(DataError, match="only 1 documents have at least 2 tokens.*lower --samples"):
        tokenize_and_pack(["a", "hello there"], tok, seq_len=8, samples=2, pack=False)


def test_chat_template_requires_template(tok):
    no_template = tiny_tokenizer()
    no_template.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        tokenize_and_pack(["hi there"], no_template, seq_len=4, samples=1, chat_template=True)


def test_chat_template_wraps_text_as_user_message(tok):
    batch = tokenize_and_pack(
        ["what is 2+2?"], tok, seq_len=64, samples=1, chat_template=True, pack=False
    )
    real = batch.input_ids[0][batch.attention_mask[0].bool()].tolist()
    assert tok.decode(real) == "<|user|>\nwhat is 2+2?<|endoftext|>\n"


# ---------------------------------------------------------------------------- batch object


def test_calibration_batch_hash_count_and_batches():
    ids = torch.arange(20).view(5, 4)
    mask = torch.ones(5, 4, dtype=torch.long)
    mask[4, 2:] = 0
    batch = CalibrationBatch(ids, mask)
    assert len(batch) == 5 and batch.seq_len == 4
    assert batch.num_tokens == 18
    assert batch.data_hash == CalibrationBatch(ids.clone(), mask.clone()).data_hash
    assert len(batch.data_hash) == 64
    assert batch.data_hash != CalibrationBatch(ids, torch.ones(5, 4, dtype=torch.long)).data_hash
    assert batch.data_hash != CalibrationBatch(ids.view(4, 5), mask.view(4, 5)).data_hash
    chunks = list(batch.batches(2))
    assert [c[0].shape[0] for c in chunks] == [2, 2, 1]
    assert torch.equal(torch.cat([c[0] for c in chunks]), ids)
    assert torch.equal(torch.cat([c[1] for c in chunks]), mask)
    with pytest.raises(ValueError, match="batch_size"):
        list(batch.batches(0))
    with pytest.raises(ValueError, match=r"\[N, S\]"):
        CalibrationBatch(ids, mask[:, :2])


def test_load_calibration_matches_read_then_pack(tok, tmp_path):
    docs = many_docs(30)
    path = make_input("jsonl", tmp_path, docs)
    loaded = load_calibration(path, tok, seq_len=16, samples=6, seed=7)
    direct = tokenize_and_pack(read_texts(path), tok, seq_len=16, samples=6, seed=7)
    assert loaded.data_hash == direct.data_hash
    txt = load_calibration(make_input("txt", tmp_path, docs), tok, seq_len=16, samples=6, seed=7)
    assert txt.data_hash == loaded.data_hash


# --------------------------------------------------------------------------------------------
# pre-tokenized data


def _ids(rows: int = 3, length: int = 5) -> torch.Tensor:
    return torch.arange(rows * length, dtype=torch.int64).view(rows, length) % 50


def test_pretokenized_is_used_row_for_row(tmp_path):
    from safetensors.torch import save_file

    from moeprune.calibration.data import CalibrationBatch, is_pretokenized, load_pretokenized

    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    save_file({"input_ids": ids}, str(tmp_path / "plain.safetensors"))
    save_file({"input_ids": ids, "attention_mask": mask.to(torch.bool)}, str(tmp_path / "masked.safetensors"))
    assert is_pretokenized(tmp_path / "plain.safetensors") and not is_pretokenized(tmp_path / "a.jsonl")
    plain = load_pretokenized(tmp_path / "plain.safetensors")
    assert torch.equal(plain.input_ids, ids) and torch.equal(plain.attention_mask, torch.ones_like(ids))
    masked = load_pretokenized(tmp_path / "masked.safetensors", samples=3, seq_len=5, vocab_size=50)
    assert torch.equal(masked.attention_mask, mask) and masked.num_tokens == 13
    assert masked.data_hash == CalibrationBatch(ids, mask).data_hash != plain.data_hash
    other = ids.clone()
    other[0, 0] += 1
    save_file({"input_ids": other}, str(tmp_path / "other.safetensors"))
    assert load_pretokenized(tmp_path / "other.safetensors").data_hash != plain.data_hash  # the hash covers the ids


@pytest.mark.parametrize(
    "tensors,kwargs,fragment",
    [
        ({"input_ids": _ids()}, {"samples": 4}, "--samples 4 does not match; pass --samples 3"),
        ({"input_ids": _ids()}, {"seq_len": 8}, "--seq-len 8 does not match; pass --seq-len 5"),
        ({"input_ids": _ids().to(torch.int32)}, {}, "int64"),
        ({"input_ids": _ids().view(-1)}, {}, "int64 tensor [N, S]"),
        ({"ids": _ids()}, {}, "'input_ids'"),
        ({"input_ids": _ids(), "labels": _ids()}, {}, "nothing else"),
        ({"input_ids": _ids(), "attention_mask": torch.ones(3, 5)}, {}, "integer or bool"),
        ({"input_ids": _ids(), "attention_mask": torch.ones(3, 4, dtype=torch.int64)}, {}, "shaped like input_ids"),
        ({"input_ids": _ids(), "attention_mask": 2 * torch.ones(3, 5, dtype=torch.int64)}, {}, "only 0 and 1"),
        ({"input_ids": _ids(), "attention_mask": torch.zeros(3, 5, dtype=torch.int64)}, {}, "all-zero"),
        ({"input_ids": _ids()}, {"vocab_size": 10}, "vocabulary"),
        ({"input_ids": _ids(3, 1)}, {}, "at least 2 tokens"),
    ],
)
def test_pretokenized_bad_input(tensors, kwargs, fragment, tmp_path):
    from safetensors.torch import save_file

    from moeprune.calibration.data import load_pretokenized

    path = tmp_path / "ids.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(DataError) as info:
        load_pretokenized(path, **kwargs)
    assert fragment in str(info.value)


def test_pretokenized_missing_or_damaged(tmp_path):
    from moeprune.calibration.data import load_pretokenized

    with pytest.raises(DataError, match="does not exist"):
        load_pretokenized(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(DataError, match="not a readable safetensors"):
        load_pretokenized(tmp_path / "bad.safetensors")
