"""Calibration data: read local text files and turn them into fixed-shape token batches.

Only local files are read (never a hub). Supported inputs:

* ``.txt``: UTF-8 text; documents are separated by one or more blank lines (lines holding only
  whitespace count as blank). One document per file would be too coarse for packing choices and
  for ``pack=False``, and one per line would cut paragraphs and code apart.
* ``.jsonl``: one JSON object per line, the document in ``text_field`` (default ``"text"``).
  When chat templating is requested, a row may instead carry a ``"messages"`` field: a list of
  ``{"role": ..., "content": ...}`` dicts, rendered whole with the tokenizer's chat template.
* ``.parquet``: a column named ``text_field`` (or ``messages`` as above).
* ``.safetensors``: pre-tokenized data, ``input_ids`` [N, S] int64 and optionally
  ``attention_mask``, used row for row (:func:`load_pretokenized`; no tokenizer involved).
* a folder written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``: its ``"train"``
  split, or its only split), with the same column rules.

:func:`tokenize_and_pack` then builds a :class:`CalibrationBatch`. With packing (the default)
all documents are joined, with the eos token between them, into one stream that is cut into
consecutive ``seq_len`` blocks; without packing each document is one right-padded sample. In
both cases ``samples`` rows are picked with a seeded ``torch.Generator``, so the same data, seed
and tokenizer always give the same tokens and the same :attr:`CalibrationBatch.data_hash`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from safetensors import safe_open

from moeprune.errors import DataError

logger = logging.getLogger(__name__)

#: One chat turn as the tokenizer's chat template expects it.
Message = dict[str, str]
#: A calibration document: plain text, or a whole chat conversation (list of messages).
Document = Union[str, list[Message]]

MESSAGES_FIELD = "messages"
#: Calibration size for text data when the user gives none (:func:`resolve_text_sizes`).
DEFAULT_SAMPLES = 64
DEFAULT_SEQ_LEN = 512
SUPPORTED = ".txt, .jsonl, .parquet, or a folder written by datasets.Dataset.save_to_disk"


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _read_utf8(path: Path) -> str:
    """Return the file's text, refusing empty, binary (NUL bytes) and non-UTF-8 files."""
    data = path.read_bytes()
    if not data.strip():
        raise DataError(f"{path} is empty: put calibration text in it or point to another file.")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise DataError(
            f"{path} looks binary (NUL byte at offset {nul}): calibration files must be UTF-8 "
            f"text; pass a text file ({SUPPORTED})."
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not valid UTF-8 (bad byte at offset {exc.start}): it looks binary or uses "
            "another encoding; convert it to UTF-8 text (e.g. `iconv -t UTF-8`)."
        ) from None


def split_documents(text: str) -> list[str]:
    """Split text into documents at blank lines; whitespace-only documents are dropped.

    A document is a maximal run of non-blank lines joined by ``"\\n"``, so indentation inside a
    document (code) is kept while the surrounding blank lines are not.
    """
    documents: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            documents.append("\n".join(current))
            current = []
    if current:
        documents.append("\n".join(current))
    return documents


def _check_messages(value: Any, where: str) -> list[Message]:
    """Validate a chat conversation: a non-empty list of {"role": str, "content": str}."""
    ok = (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in value
        )
    )
    if not ok:
        raise DataError(
            f"{where}: field '{MESSAGES_FIELD}' must be a non-empty list of "
            '{"role": "...", "content": "..."} objects; fix that row or drop it.'
        )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _text_value(value: Any, field: str, where: str) -> str | None:
    """A text cell as a document: ``None`` when null or blank, DataError when not a string."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field '{field}' is a {type(value).__name__}, not a string; "
            "fix that row or choose another field with --text-field (text_field=...)."
        )
    return value if value.strip() else None


def _missing_field_error(fields: Sequence[str], text_field: str, where: str) -> DataError:
    """The error for a record/table without the text field, naming the fields it does have."""
    listed = ", ".join(repr(f) for f in fields) or "none"
    if MESSAGES_FIELD in fields:
        fix = (
            f"it holds a chat conversation in '{MESSAGES_FIELD}': pass --chat-template "
            "(chat_template=True) to use it, or choose a text field with --text-field"
        )
    else:
        fix = "choose one of them with --text-field (text_field=...)"
    return DataError(f"{where} has no '{text_field}' field (fields: {listed}); {fix}.")


def _document_from_row(
    row: dict[str, Any], text_field: str, allow_messages: bool, where: str
) -> Document | None:
    """Extract one document from a record; ``None`` when its text is empty or null."""
    if text_field in row:
        return _text_value(row[text_field], text_field, where)
    if allow_messages and MESSAGES_FIELD in row:
        return _check_messages(row[MESSAGES_FIELD], where)
    raise _missing_field_error(list(row), text_field, where)


def _read_txt(path: Path, text_field: str, allow_messages: bool) -> list[Document]:
    """Documents of a text file (``text_field``/``allow_messages`` do not apply to plain text)."""
    del text_field, allow_messages
    return list(split_documents(_read_utf8(path)))


def _read_jsonl(path: Path, text_field: str, allow_messages: bool) -> list[Document]:
    documents: list[Document] = []
    for number, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{where} is not valid JSON ({exc.msg}): every line of a .jsonl file must be one "
                f'JSON object such as {{"{text_field}": "..."}}; fix or remove that line.'
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"{where} is a JSON {type(row).__name__}, not an object: write one object per "
                f'line, such as {{"{text_field}": "..."}}.'
            )
        document = _document_from_row(row, text_field, allow_messages, where)
        if document is not None:
            documents.append(document)
    return documents


def _pick_column(columns: Sequence[str], text_field: str, allow_messages: bool, where: str) -> str:
    """Name of the column holding the documents, or a DataError listing the columns."""
    if text_field in columns:
        return text_field
    if allow_messages and MESSAGES_FIELD in columns:
        return MESSAGES_FIELD
    raise _missing_field_error(columns, text_field, where)


def _documents_from_column(values: Iterable[Any], column: str, where: str) -> list[Document]:
    """Documents of a table column: conversations for ``messages``, text otherwise."""
    documents: list[Document] = []
    for index, value in enumerate(values):
        row_where = f"{where} row {index}"
        if column == MESSAGES_FIELD and not isinstance(value, str):
            document: Document | None = _check_messages(value, row_where)
        else:
            document = _text_value(value, column, row_where)
        if document is not None:
            documents.append(document)
    return documents


def _read_parquet(path: Path, text_field: str, allow_messages: bool) -> list[Document]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises several types for non-parquet bytes
        raise DataError(
            f"{path} is not a readable parquet file ({exc}); re-export it with "
            "pandas.DataFrame.to_parquet or datasets.Dataset.to_parquet."
        ) from None
    column = _pick_column(schema.names, text_field, allow_messages, str(path))
    values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    return _documents_from_column(values, column, str(path))


def _read_saved_dataset(path: Path, text_field: str, allow_messages: bool) -> list[Document]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(
            f"{path} is a folder but not a saved dataset (no dataset_info.json / "
            f"dataset_dict.json): pass a folder written by datasets.Dataset.save_to_disk, "
            f"or a file ({SUPPORTED})."
        ) from None
    where = str(path)
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if "train" in loaded:
            split = "train"
        elif len(splits) == 1:
            split = splits[0]
        else:
            raise DataError(
                f"{path} is a DatasetDict with splits {splits} and no 'train' split: save the "
                "split to use on its own (dataset_dict[name].save_to_disk(...))."
            )
        loaded = loaded[split]
        where = f"{path} (split '{split}')"
    column = _pick_column(loaded.column_names, text_field, allow_messages, where)
    return _documents_from_column(loaded[column], column, where)


def read_documents(
    path: str | os.PathLike[str], text_field: str = "text", allow_messages: bool = False
) -> list[Document]:
    """Read calibration documents from a local file or saved-dataset folder.

    Like :func:`read_texts`, but with ``allow_messages`` a row without ``text_field`` may carry a
    ``"messages"`` chat conversation (list of role/content dicts), returned as that list, for
    :func:`tokenize_and_pack` with ``chat_template=True``.

    Raises:
        DataError: missing path, unsupported extension, empty/binary/non-UTF-8 file, bad JSON
            line, missing text field, or no non-empty document at all.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"calibration data {path} does not exist: check the path ({SUPPORTED}).")
    if path.is_dir():
        documents = _read_saved_dataset(path, text_field, allow_messages)
    else:
        readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}
        reader = readers.get(path.suffix.lower())
        if reader is None:
            raise DataError(
                f"{path} has unsupported extension '{path.suffix or '(none)'}': use {SUPPORTED}."
            )
        if path.stat().st_size == 0:
            raise DataError(
                f"{path} is empty: put calibration text in it or point to another file."
            )
        documents = reader(path, text_field, allow_messages)
    if not documents:
        raise DataError(
            f"{path} contains no non-empty text (field '{text_field}'): add calibration text "
            "or point to another file."
        )
    logger.info("read %d documents from %s", len(documents), path)
    return documents


def read_texts(path: str | os.PathLike[str], text_field: str = "text") -> list[str]:
    """Read the non-empty text documents of a local ``.txt``/``.jsonl``/``.parquet``/dataset folder.

    ``.txt`` files are split into documents at blank lines; the other formats give one document
    per row, from ``text_field``. Empty documents are dropped. See the module docstring.

    Raises:
        DataError: with a message naming the file and the fix (see :func:`read_documents`).
    """
    documents = read_documents(path, text_field, allow_messages=False)
    return [d for d in documents if isinstance(d, str)]  # all are: messages are not allowed


# --------------------------------------------------------------------------------------------
# Tokenizing
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class CalibrationBatch:
    """Calibration tokens: ``input_ids`` and ``attention_mask``, both int64 of shape [N, S].

    ``attention_mask`` is 1 on real tokens and 0 on padding; downstream statistics must never
    count masked positions.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.input_ids.shape != self.attention_mask.shape:
            raise ValueError(
                "input_ids and attention_mask must both be [N, S]; got "
                f"{tuple(self.input_ids.shape)} and {tuple(self.attention_mask.shape)}"
            )
        self.input_ids = self.input_ids.to(torch.long)
        self.attention_mask = self.attention_mask.to(torch.long)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        """Length S of every row."""
        return int(self.input_ids.shape[1])

    @property
    def num_tokens(self) -> int:
        """Number of real (unmasked) tokens."""
        return int(self.attention_mask.sum().item())

    @property
    def data_hash(self) -> str:
        """sha256 hex of the shape, the input ids and the mask (little-endian int64 bytes).

        Two runs on the same tokens agree; the shape is included so that e.g. 2x4 and 1x8
        batches of the same ids differ.
        """
        digest = hashlib.sha256()
        digest.update(f"{self.input_ids.shape[0]}x{self.input_ids.shape[1]};".encode())
        for tensor in (self.input_ids, self.attention_mask):
            digest.update(tensor.detach().cpu().contiguous().numpy().astype("<i8").tobytes())
        return digest.hexdigest()

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(input_ids, attention_mask)`` slices of at most ``batch_size`` rows, in order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            stop = start + batch_size
            yield self.input_ids[start:stop], self.attention_mask[start:stop]


def _choose(count: int, samples: int, seed: int) -> torch.Tensor:
    """Indices of ``samples`` of ``count`` items: first of a seeded permutation, sorted."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(count, generator=generator)[:samples].sort().values


def _render(documents: Sequence[Document], tokenizer: Any, chat_template: bool) -> list[str]:
    """Plain strings to tokenize: chat-templated when asked (text = one user message)."""
    if not chat_template:
        bad = next((i for i, d in enumerate(documents) if not isinstance(d, str)), None)
        if bad is not None:
            raise DataError(
                f"document {bad} is a chat conversation (a list of messages): pass "
                "--chat-template (chat_template=True) to render it."
            )
        return list(documents)  # type: ignore[arg-type]
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the tokenizer has no chat template: drop --chat-template (chat_template=False) "
            "or use a tokenizer/model that ships one."
        )
    rendered = []
    for document in documents:
        if isinstance(document, str):
            messages: list[Message] = [{"role": "user", "content": document}]
        else:
            messages = document
        rendered.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return rendered


def _tokenize(texts: list[str], tokenizer: Any, chat_template: bool) -> list[list[int]]:
    """Token ids per text, with the tokenizer's own special tokens unless a template added them."""
    encoded = tokenizer(texts, add_special_tokens=not chat_template, verbose=False)
    return [list(ids) for ids in encoded["input_ids"]]


def _join(token_lists: list[list[int]], eos_id: int) -> list[int]:
    """One token stream: the documents with ``eos_id`` between them.

    No eos is inserted after a document that already ends with one (tokenizers that append eos).
    """
    stream: list[int] = []
    for index, ids in enumerate(token_lists):
        if index and stream and stream[-1] != eos_id:
            stream.append(eos_id)
        stream.extend(ids)
    return stream


def _blocks(stream: list[int], seq_len: int) -> torch.Tensor:
    """Consecutive non-overlapping ``seq_len`` blocks of the stream, [blocks, seq_len]."""
    count = len(stream) // seq_len
    return torch.tensor(stream[: count * seq_len], dtype=torch.long).view(count, seq_len)


def _pad(token_lists: list[list[int]], pad_id: int, seq_len: int) -> CalibrationBatch:
    """One row per document, truncated to ``seq_len`` and right-padded with ``pad_id``."""
    input_ids = torch.full((len(token_lists), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), seq_len), dtype=torch.long)
    for row, ids in enumerate(token_lists):
        ids = ids[:seq_len]
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    return CalibrationBatch(input_ids, mask)


def tokenize_and_pack(
    texts: Sequence[Document],
    tokenizer: Any,
    seq_len: int,
    samples: int,
    seed: int = 0,
    chat_template: bool = False,
    pack: bool = True,
) -> CalibrationBatch:
    """Tokenize documents and pick ``samples`` rows of exactly ``seq_len`` tokens.

    With ``chat_template`` each text is first rendered as a single user message (a messages list
    is rendered as is) with ``tokenizer.apply_chat_template(..., tokenize=False)``; the template
    then supplies the special tokens, otherwise the tokenizer adds its usual ones (e.g. bos).

    ``pack=True``: documents are joined with the eos token between them and cut into consecutive
    non-overlapping ``seq_len`` blocks (the incomplete tail is dropped); the mask is all ones.
    ``pack=False``: each document with at least 2 tokens is one row, truncated to ``seq_len`` and
    right-padded with the pad token (eos if there is none), mask 0 on the padding.

    The rows are the first ``samples`` of a ``torch.Generator().manual_seed(seed)`` permutation,
    sorted by position, so the result depends only on the data, tokenizer, sizes and seed.

    Raises:
        DataError: ``seq_len < 2``, ``samples < 1``, no documents, too few tokens/documents for
            the request, a chat conversation without ``chat_template``, or no chat template.
    """
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}: raise --seq-len.")
    if samples < 1:
        raise DataError(f"samples must be at least 1, got {samples}: raise --samples.")
    if not texts:
        raise DataError("no calibration documents were given: add calibration text.")

    token_lists = _tokenize(_render(texts, tokenizer, chat_template), tokenizer, chat_template)
    if pack:
        eos_id = tokenizer.eos_token_id
        if eos_id is None:
            raise DataError(
                "the tokenizer defines no eos token to separate packed documents: set "
                "tokenizer.eos_token, or pass --no-pack (pack=False)."
            )
        stream = _join(token_lists, eos_id)
        blocks = _blocks(stream, seq_len)
        if blocks.shape[0] < samples:
            raise DataError(
                f"calibration data has {len(stream)} tokens ({blocks.shape[0]} blocks of "
                f"{seq_len}), but {samples} samples x {seq_len} tokens need "
                f"{samples * seq_len}: lower --samples or --seq-len, or add more data."
            )
        chosen = _choose(blocks.shape[0], samples, seed)
        batch = CalibrationBatch(blocks[chosen], torch.ones(samples, seq_len, dtype=torch.long))
    else:
        usable = [ids for ids in token_lists if len(ids) >= 2]
        if len(usable) < samples:
            raise DataError(
                f"only {len(usable)} documents have at least 2 tokens, but {samples} samples "
                "were asked without packing: lower --samples, add more documents, or drop "
                "--no-pack (pack=True)."
            )
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        chosen = _choose(len(usable), samples, seed)
        batch = _pad([usable[i] for i in chosen.tolist()], pad_id, seq_len)
    logger.info(
        "calibration batch: %d x %d, %d real tokens, data hash %s",
        len(batch),
        seq_len,
        batch.num_tokens,
        batch.data_hash[:16],
    )
    return batch


def load_calibration(
    path: str | os.PathLike[str],
    tokenizer: Any,
    seq_len: int = DEFAULT_SEQ_LEN,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    chat_template: bool = False,
    text_field: str = "text",
    pack: bool = True,
) -> CalibrationBatch:
    """Read a local calibration file/folder and tokenize it: :func:`read_documents` +
    :func:`tokenize_and_pack` (chat ``messages`` rows are accepted when ``chat_template``)."""
    documents = read_documents(path, text_field, allow_messages=chat_template)
    return tokenize_and_pack(
        documents,
        tokenizer,
        seq_len=seq_len,
        samples=samples,
        seed=seed,
        chat_template=chat_template,
        pack=pack,
    )


# --------------------------------------------------------------------------------------------
# Pre-tokenized data and the default sizes
# --------------------------------------------------------------------------------------------

PRETOKENIZED_SUFFIX = ".safetensors"


def is_pretokenized(path: str | os.PathLike[str]) -> bool:
    """True for a pre-tokenized calibration file (``.safetensors``)."""
    return Path(path).suffix.lower() == PRETOKENIZED_SUFFIX


def resolve_text_sizes(samples: int | None, seq_len: int | None) -> tuple[int, int]:
    """``(samples, seq_len)`` for text data: the given values, else 64 and 512."""
    return (DEFAULT_SAMPLES if samples is None else samples, DEFAULT_SEQ_LEN if seq_len is None else seq_len)


def load_pretokenized(
    path: str | os.PathLike[str],
    samples: int | None = None,
    seq_len: int | None = None,
    vocab_size: int | None = None,
) -> CalibrationBatch:
    """A pre-tokenized calibration set, used row for row.

    The file is a safetensors file with ``input_ids`` [N, S] (int64) and optionally
    ``attention_mask`` [N, S] (integer or bool, 0/1; default all ones), and no other tensor.
    ``samples``/``seq_len``, when given, must equal N and S (rows are never picked or cut). Token
    ids must lie in [0, ``vocab_size``) when it is given. The data hash covers the token ids and
    the mask, so two runs on the same file (or on the same rows) agree.

    Raises:
        DataError: missing or unreadable file, other keys, wrong dtype or shape, a mask that is not
            0/1, ids out of range, or sizes that differ from the file's.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pre-tokenized calibration file {path} does not exist: check the path.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises several types for damaged bytes
        raise DataError(f"{path} is not a readable safetensors file ({exc}); write it with "
                        "safetensors.torch.save_file({'input_ids': ids})") from None
    extra = sorted(set(tensors) - {"input_ids", "attention_mask"})
    if "input_ids" not in tensors or extra:
        raise DataError(f"{path} must hold 'input_ids' [N, S] and optionally 'attention_mask' [N, S], nothing else; "
                        f"it holds {sorted(tensors)}")
    input_ids = tensors["input_ids"]
    if input_ids.dtype != torch.int64 or input_ids.dim() != 2 or 0 in input_ids.shape:
        raise DataError(f"{path}: 'input_ids' must be a non-empty int64 tensor [N, S]; it is "
                        f"{str(input_ids.dtype).removeprefix('torch.')} {list(input_ids.shape)} "
                        "(convert with ids.to(torch.int64))")
    mask = tensors.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    else:
        if mask.shape != input_ids.shape or mask.is_floating_point() or mask.is_complex():
            raise DataError(f"{path}: 'attention_mask' must be an integer or bool tensor shaped like input_ids "
                            f"{list(input_ids.shape)}; it is {str(mask.dtype).removeprefix('torch.')} {list(mask.shape)}")
        mask = mask.to(torch.int64)
        if ((mask != 0) & (mask != 1)).any():
            raise DataError(f"{path}: 'attention_mask' must hold only 0 and 1")
    rows, length = input_ids.shape
    for name, given, actual in (("--samples", samples, rows), ("--seq-len", seq_len, length)):
        if given is not None and given != actual:
            raise DataError(f"{path} holds {rows} rows of {length} tokens, used row for row: {name} {given} does not "
                            f"match; pass {name} {actual} or leave it out")
    if length < 2:
        raise DataError(f"{path}: rows must hold at least 2 tokens, they hold {length}")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        raise DataError(f"{path}: token ids span [{low}, {high}], outside the model's vocabulary "
                        f"[0, {vocab_size}); was it tokenized for another model?")
    if not mask.any(dim=1).all():
        raise DataError(f"{path}: some rows have an all-zero attention_mask; drop them")
    batch = CalibrationBatch(input_ids, mask)
    logger.info("pre-tokenized calibration: %d x %d, %d real tokens, data hash %s",
                rows, length, batch.num_tokens, batch.data_hash[:16])
    return batch


#: Files any one of which makes a folder hold a tokenizer transformers can load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def tokenizer_files(folder: str | os.PathLike[str]) -> list[str]:
    """The tokenizer files present in ``folder`` (empty: it holds no tokenizer)."""
    folder = Path(folder)
    return [name for name in TOKENIZER_FILES if (folder / name).is_file()]


def check_seq_len_fits(seq_len: int, max_positions: int | None) -> None:
    """DataError when sequences of ``seq_len`` tokens exceed the model's ``max_position_embeddings``
    (the model was never trained on such positions: its statistics there would mislead)."""
    if max_positions and seq_len > int(max_positions):
        raise DataError(f"--seq-len {seq_len} is longer than the model's max_position_embeddings ({max_positions}); "
                        f"pass --seq-len {max_positions} or less")
