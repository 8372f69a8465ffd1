"""Lazy, header-only access to a Hugging Face safetensors checkpoint folder.

:class:`LazyCheckpoint` parses every shard's safetensors header once (8 bytes of length plus a JSON
header; no tensor data) so that names, shapes, dtypes, byte sizes and the model fingerprint are
available without reading weights. Tensor data is read only by :meth:`LazyCheckpoint.get` and
:meth:`LazyCheckpoint.get_rows`, one tensor (or a few rows of one tensor) at a time.

File handles: the reader keeps **at most one** ``safe_open`` handle, the one of the shard read most
recently, and closes it when a tensor of another shard is requested (or on :meth:`close`). Opening a
shard memory-maps it and re-parses its header, which for shards with thousands of tensors is not
free; pruning reads tensors shard by shard (see :meth:`LazyCheckpoint.keys_by_shard`), so caching the
current handle makes that cost once per shard, while never holding more than one mapping keeps the
number of open descriptors and mapped files bounded whatever the model size. The reader is not
thread-safe; use one instance per thread.

The module also holds the safetensors format facts shared with :mod:`moeprune.io.writer`: the dtype
name table and :func:`read_safetensors_header`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import safe_open

from moeprune.errors import CheckpointError, MoePruneError

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

#: Largest header we accept; real headers are well below this (a sanity bound against corruption).
_MAX_HEADER_BYTES = 100 * 1024 * 1024

#: Config keys that change when an identical model is merely re-saved; left out of the fingerprint.
_VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "_name_or_path"})


def _build_dtype_table() -> dict[str, torch.dtype]:
    """Return the safetensors dtype name -> torch dtype table for the dtypes this torch has."""
    table: dict[str, torch.dtype] = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "C64": torch.complex64,
    }
    optional = {
        "U16": "uint16",
        "U32": "uint32",
        "U64": "uint64",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "F8_E4M3FNUZ": "float8_e4m3fnuz",
        "F8_E5M2FNUZ": "float8_e5m2fnuz",
        "F8_E8M0": "float8_e8m0fnu",
    }
    for st_name, torch_name in optional.items():
        dtype = getattr(torch, torch_name, None)
        if isinstance(dtype, torch.dtype):
            table[st_name] = dtype
    return table


#: safetensors dtype name -> torch dtype.
DTYPE_FROM_SAFETENSORS: dict[str, torch.dtype] = _build_dtype_table()
#: torch dtype -> safetensors dtype name.
SAFETENSORS_FROM_DTYPE: dict[torch.dtype, str] = {v: k for k, v in DTYPE_FROM_SAFETENSORS.items()}


def safetensors_dtype_name(dtype: torch.dtype) -> str:
    """Return the safetensors name (``"BF16"``, ...) of ``dtype``; ValueError if it has none."""
    try:
        return SAFETENSORS_FROM_DTYPE[dtype]
    except KeyError:
        supported = ", ".join(str(d).removeprefix("torch.") for d in SAFETENSORS_FROM_DTYPE)
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors (supported: {supported})") from None


FINGERPRINT_SAMPLE_BYTES = 64


def read_safetensors_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """Read one safetensors file's JSON header without touching tensor data.

    Returns ``(header, data_start)``: the decoded header (including ``__metadata__`` when present)
    and the absolute file offset where the tensor byte buffer begins. Raises MoePruneError when the
    file is truncated or not a safetensors file.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise _corrupt(path, "it is shorter than 8 bytes")
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_HEADER_BYTES or 8 + length > size:
            raise _corrupt(path, f"its header length ({length} bytes) does not fit the file ({size} bytes)")
        raw = fh.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, f"its header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    return header, 8 + length


def _corrupt(path: Path, why: str) -> MoePruneError:
    """Build the error for an unreadable safetensors file."""
    return CheckpointError(
        f"{path} is not a valid safetensors file: {why}; re-download or re-save the checkpoint "
        "(the file may be truncated or still downloading)"
    )


@dataclass(frozen=True)
class _Entry:
    """What the header says about one tensor."""

    shard: Path
    dtype_name: str
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0  # absolute file offset of the tensor's first byte


def _parse_entries(path: Path, header: dict[str, Any], data_start: int = 0, file_size: int | None = None) -> dict[str, _Entry]:
    """Turn one shard header into ``{name: _Entry}``; MoePruneError on unknown dtypes or bad fields.

    With ``file_size``, every tensor's data offsets must lie inside the file and span exactly
    ``prod(shape) * itemsize`` bytes (a truncated download fails here, naming the tensor, instead of
    deep inside a later read).
    """
    entries: dict[str, _Entry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name = str(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"the header entry of tensor {name!r} is malformed") from None
        if dtype_name not in DTYPE_FROM_SAFETENSORS:
            raise MoePruneError(
                f"tensor {name!r} in {path} has dtype {dtype_name}, which this torch ({torch.__version__}) "
                "cannot represent; upgrade torch or convert the checkpoint to a standard dtype"
            )
        if file_size is not None:
            _check_span(path, name, shape, DTYPE_FROM_SAFETENSORS[dtype_name], begin, end, data_start, file_size)
        entries[name] = _Entry(path, dtype_name, shape, end - begin, data_start + begin)
    return entries


def _check_span(path: Path, name: str, shape: tuple[int, ...], dtype: torch.dtype, begin: int, end: int,
                data_start: int, file_size: int) -> None:
    """MoePruneError unless tensor ``name``'s bytes ``[data_start + begin, data_start + end)`` lie in
    the file and hold ``prod(shape) * itemsize`` bytes."""
    expected = math.prod(shape) * dtype.itemsize
    if begin < 0 or end < begin or end - begin != expected:
        raise _corrupt(path, f"tensor {name!r} {list(shape)} needs {expected} bytes but its header gives "
                             f"offsets [{begin}, {end})")
    if data_start + end > file_size:
        raise _corrupt(path, f"tensor {name!r} ends at byte {data_start + end}, past the end of the file "
                             f"({file_size} bytes)")


class MissingTensorError(MoePruneError, KeyError):
    """A tensor name that the checkpoint does not contain."""

    def __str__(self) -> str:  # KeyError would show the repr of the message
        return str(self.args[0]) if self.args else ""


def _no_safetensors_error(folder: Path) -> MoePruneError:
    """Build the error for a folder with no safetensors weights."""
    return MoePruneError(
        f"{folder} contains no *.safetensors weights; moeprune requires safetensors checkpoints. "
        "Re-save the model with model.save_pretrained(folder, safe_serialization=True) and pass that folder"
    )


def _discover_shards(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """Find the weight files of ``folder``: index first, then model.safetensors, then all *.safetensors.

    Returns the ordered shard paths and, when an index exists, its weight_map.
    """
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = {str(k): str(v) for k, v in index["weight_map"].items()}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise MoePruneError(
                f"{index_path} is not a valid safetensors index ({exc!r}); re-download it, or delete it if "
                "the folder holds a single model.safetensors"
            ) from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise MoePruneError(
                f"{index_path} lists shard(s) missing from {folder}: {', '.join(missing)}; "
                "finish downloading the checkpoint"
            )
        if not names:
            raise _no_safetensors_error(folder)
        return [folder / n for n in names], weight_map
    single = folder / SINGLE_NAME
    if single.is_file():
        return [single], None
    shards = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if not shards:
        raise _no_safetensors_error(folder)
    return shards, None


class LazyCheckpoint:
    """A Hugging Face safetensors checkpoint folder whose tensors are read only when asked.

    Accepts a folder with a single ``model.safetensors``, a sharded checkpoint with
    ``model.safetensors.index.json``, or several ``*.safetensors`` without index (all headers are
    read and the names must be unique across files). Usable as a context manager; :meth:`close`
    releases the one cached file handle.
    """

    def __init__(self, path: str | Path) -> None:
        folder = Path(path).expanduser()
        if not folder.exists():
            raise MoePruneError(f"checkpoint folder {folder} does not exist; check the path")
        if not folder.is_dir():
            raise MoePruneError(
                f"{folder} is a file, not a checkpoint folder; pass the folder that contains it "
                "(with its config.json)"
            )
        self.path: Path = folder
        self._shards, weight_map = _discover_shards(folder)
        self._entries: dict[str, _Entry] = {}
        self._metadata: dict[Path, dict[str, str]] = {}
        for shard in self._shards:
            header, data_start = read_safetensors_header(shard)
            self._metadata[shard] = dict(header.get("__metadata__") or {})
            size = shard.stat().st_size
            for name, entry in _parse_entries(shard, header, data_start, size).items():
                if weight_map is not None and weight_map.get(name) != shard.name:
                    continue  # the index is authoritative, as for transformers
                if name in self._entries:
                    raise MoePruneError(
                        f"tensor {name!r} appears in both {self._entries[name].shard.name} and {shard.name} "
                        f"in {folder}; remove the stray file or add a {INDEX_NAME}"
                    )
                self._entries[name] = entry
        if weight_map is not None:
            absent = sorted(n for n in weight_map if n not in self._entries)
            if absent:
                raise MoePruneError(
                    f"{folder / INDEX_NAME} maps {len(absent)} tensor(s) to shards that do not contain "
                    f"them (first: {absent[0]!r} -> {weight_map[absent[0]]}); the checkpoint is "
                    "inconsistent, re-download it"
                )
        self._keys = sorted(self._entries)
        self._fingerprint: str | None = None
        self._open_shard: Path | None = None
        self._open_handle: Any = None
        logger.debug("opened %s: %d tensors in %d shard(s)", folder, len(self._keys), len(self._shards))

    # ----------------------------------------------------------------- header-only queries
    def keys(self) -> list[str]:
        """All tensor names, sorted."""
        return list(self._keys)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"LazyCheckpoint({str(self.path)!r}, tensors={len(self._keys)}, shards={len(self._shards)})"

    def _entry(self, name: str) -> _Entry:
        """Return the header entry of ``name``; MissingTensorError when absent."""
        try:
            return self._entries[name]
        except KeyError:
            raise MissingTensorError(
                f"tensor {name!r} is not in checkpoint {self.path}; the checkpoint does not match the "
                "expected architecture (check the model folder and its config.json)"
            ) from None

    def shard_of(self, name: str) -> Path:
        """The shard file that stores ``name``."""
        return self._entry(name).shard

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of ``name``, from the header."""
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """Torch dtype of ``name``, from the header."""
        return DTYPE_FROM_SAFETENSORS[self._entry(name).dtype_name]

    def nbytes(self, name: str) -> int:
        """Size in bytes of ``name``'s data, from the header."""
        return self._entry(name).nbytes

    def keys_with_prefix(self, prefix: str) -> list[str]:
        """Sorted tensor names that start with ``prefix``."""
        return [k for k in self._keys if k.startswith(prefix)]

    def keys_by_shard(self) -> dict[Path, list[str]]:
        """Sorted tensor names grouped by shard, shards in :meth:`shard_files` order (best read order)."""
        grouped: dict[Path, list[str]] = {s: [] for s in self._shards}
        for name in self._keys:
            grouped[self._entries[name].shard].append(name)
        return grouped

    def total_bytes(self) -> int:
        """Sum of all tensors' data sizes in bytes (the index's ``total_size``; headers excluded)."""
        return sum(e.nbytes for e in self._entries.values())

    def shard_files(self) -> list[Path]:
        """The weight files, ordered by file name (``model-00001-of-...`` first)."""
        return list(self._shards)

    def shard_metadata(self, shard: str | Path) -> dict[str, str]:
        """The ``__metadata__`` of one shard (by path or file name); empty dict when absent."""
        name = Path(shard).name
        for path, meta in self._metadata.items():
            if path.name == name:
                return dict(meta)
        raise KeyError(f"{name} is not a shard of {self.path}")

    def read_config(self) -> dict[str, Any] | None:
        """The parsed config.json of the folder, or None when there is none."""
        return read_config_json(self.path)

    def fingerprint(self) -> str:
        """A stable 16-hex-digit identity of the model, cheap to compute.

        sha256 over config.json (parsed and re-serialised with sorted keys, leaving out
        ``transformers_version`` and ``_name_or_path``, which change on a mere re-save; raw bytes if it
        is not JSON), the sorted ``(name, shape, dtype)`` list, and the first
        ``FINGERPRINT_SAMPLE_BYTES`` bytes of every tensor's data, so that a fine-tune of the same
        architecture gets another fingerprint. Shard layout does not enter it, so the same weights
        re-sharded keep their fingerprint.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256(b"moeprune-fingerprint-v1\0")
            digest.update(config_bytes(self.path / CONFIG_NAME))
            digest.update(b"\0")
            listing = [[n, list(self._entries[n].shape), self._entries[n].dtype_name] for n in self._keys]
            digest.update(json.dumps(listing, separators=(",", ":")).encode("utf-8"))
            handles: dict[Path, Any] = {}
            try:
                for name in self._keys:  # sorted names: independent of the shard layout
                    entry = self._entries[name]
                    handle = handles.get(entry.shard) or handles.setdefault(entry.shard, open(entry.shard, "rb"))
                    handle.seek(entry.offset)
                    digest.update(handle.read(min(entry.nbytes, FINGERPRINT_SAMPLE_BYTES)))
            finally:
                for handle in handles.values():
                    handle.close()
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    # ----------------------------------------------------------------- data access
    def _handle(self, shard: Path) -> Any:
        """Return an open safe_open handle on ``shard``, closing the previously cached one."""
        if self._open_shard != shard:
            self.close()
            handle = safe_open(str(shard), framework="pt", device="cpu")
            self._open_handle = handle.__enter__()
            self._open_shard = shard
        return self._open_handle

    def get(self, name: str) -> torch.Tensor:
        """Read tensor ``name`` (only that tensor) into memory."""
        entry = self._entry(name)
        return self._handle(entry.shard).get_tensor(name)

    def get_rows(self, name: str, indices: list[int]) -> torch.Tensor:
        """Return ``get(name).index_select(0, indices)`` while reading only those rows.

        ``indices`` may be in any order and repeat; each maximal run of consecutive rows is read
        with one slice of safe_open's ``get_slice``. Falls back to a full read if slicing fails.
        """
        entry = self._entry(name)
        if not entry.shape:
            raise ValueError(f"tensor {name!r} is 0-dimensional; it has no rows to select")
        rows = entry.shape[0]
        index_list = [int(i) for i in indices]
        bad = [i for i in index_list if not 0 <= i < rows]
        if bad:
            raise IndexError(f"row index {bad[0]} out of range for tensor {name!r} with {rows} rows")
        if not index_list:
            return torch.empty((0, *entry.shape[1:]), dtype=self.dtype(name))
        unique = sorted(set(index_list))
        handle = self._handle(entry.shard)
        try:
            view = handle.get_slice(name)
            block = torch.cat([view[start:stop] for start, stop in _runs(unique)], dim=0)
        except Exception:  # noqa: BLE001 - slicing unsupported for this dtype/version: read it whole
            logger.debug("get_slice failed for %s; reading the whole tensor", name, exc_info=True)
            return handle.get_tensor(name).index_select(0, torch.tensor(index_list, dtype=torch.long))
        if index_list == unique:
            return block
        position = {row: k for k, row in enumerate(unique)}
        return block.index_select(0, torch.tensor([position[i] for i in index_list], dtype=torch.long))

    def close(self) -> None:
        """Close the cached file handle, if any (the object stays usable)."""
        if self._open_handle is not None:
            handle, self._open_handle, self._open_shard = self._open_handle, None, None
            handle.__exit__(None, None, None)

    def __enter__(self) -> LazyCheckpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _runs(sorted_unique: list[int]) -> list[tuple[int, int]]:
    """Split sorted distinct integers into half-open ``(start, stop)`` runs of consecutive values."""
    runs: list[tuple[int, int]] = []
    start = prev = sorted_unique[0]
    for value in sorted_unique[1:]:
        if value != prev + 1:
            runs.append((start, prev + 1))
            start = value
        prev = value
    runs.append((start, prev + 1))
    return runs


def read_config_json(folder: str | Path) -> dict[str, Any] | None:
    """The parsed config.json of ``folder`` (None when there is none); CheckpointError when it is
    not valid JSON or not a JSON object."""
    config = Path(folder) / CONFIG_NAME
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config} is not valid JSON ({exc}); fix or re-download it") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{config} holds a JSON {type(value).__name__}, not an object; fix or re-download it")
    return value


def config_bytes(config: Path) -> bytes:
    """Canonical bytes of config.json for fingerprinting (b"" when absent)."""
    if not config.is_file():
        return b""
    raw = config.read_bytes()
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return raw
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in _VOLATILE_CONFIG_KEYS}
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")
