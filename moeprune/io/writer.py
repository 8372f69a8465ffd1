"""Streaming writer of sharded safetensors checkpoints, one tensor in memory at a time.

The shard layout is planned from :class:`TensorSpec` entries alone (name, shape, dtype), so every
header can be written before any tensor exists. Each shard file is then written as the safetensors
format defines it:

* 8 bytes: little-endian u64 ``N``, the header length;
* ``N`` bytes: a JSON object ``{"__metadata__": {"format": "pt"}, name: {"dtype", "shape",
  "data_offsets": [begin, end]}, ...}``, padded with spaces so that ``N`` is a multiple of 8;
* the tensors' raw little-endian bytes, back to back, in plan order (offsets relative to the end
  of the header).

Tensors come from a caller's ``produce(name)`` callable, one at a time, in plan order; each is
checked against its spec, written, and dropped. With more than one shard the Hugging Face index
``model.safetensors.index.json`` is written too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moeprune.errors import MoePruneError, OutputExistsError
from moeprune.io.checkpoint import INDEX_NAME, SINGLE_NAME, safetensors_dtype_name
from moeprune.io.output import atomic_write_json

logger = logging.getLogger(__name__)

#: Default largest shard: 5 GiB.
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(value: int | str) -> int:
    """Parse a byte size: an int, or a string like ``"5GB"`` (10^9), ``"5GiB"`` (2^30), ``"500MB"``.

    Units follow the Hugging Face convention: KB/MB/GB/TB are decimal, KiB/MiB/GiB/TiB binary, a
    bare number or ``B`` means bytes. Raises MoePruneError for anything else or a size <= 0.
    """
    if isinstance(value, bool):
        raise MoePruneError(f"invalid size {value!r}; give a number of bytes or a string like '5GB' or '500MB'")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.match(str(value))
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise MoePruneError(
                f"invalid size {value!r}; write a number with an optional unit "
                "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '5GB' or '500MB'"
            )
        size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise MoePruneError(f"invalid size {value!r}; the shard size must be positive, e.g. '5GB'")
    return size


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor to write."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"tensor name must be a non-empty string, got {self.name!r}")
        shape = tuple(int(d) for d in self.shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"tensor {self.name!r} has a negative dimension in shape {shape}")
        object.__setattr__(self, "shape", shape)
        safetensors_dtype_name(self.dtype)  # ValueError if the dtype cannot be stored

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        """The spec matching an existing tensor."""
        return cls(name, tuple(tensor.shape), tensor.dtype)

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the data in bytes."""
        return self.numel * self.dtype.itemsize


def plan_shards(
    specs: Sequence[TensorSpec], max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES
) -> list[list[TensorSpec]]:
    """Split ``specs`` (kept in order) into shards of at most ``max_shard_bytes`` of tensor data.

    Greedy, like ``save_pretrained``: a tensor opens a new shard when it would overflow the current,
    non-empty one; a single tensor larger than the limit gets a shard of its own. Returns [] for no
    specs. Raises ValueError on duplicate names.
    """
    limit = parse_size(max_shard_bytes)
    seen: set[str] = set()
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    current_bytes = 0
    for spec in specs:
        if spec.name in seen:
            raise ValueError(f"tensor name {spec.name!r} appears twice in the write plan")
        seen.add(spec.name)
        if current and current_bytes + spec.nbytes > limit:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(spec)
        current_bytes += spec.nbytes
    if current:
        shards.append(current)
    return shards


def shard_file_names(count: int) -> list[str]:
    """Hugging Face shard names: ``model.safetensors`` for one, else ``model-00001-of-0000N.safetensors``."""
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def build_header(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None) -> bytes:
    """The serialized safetensors header (length prefix included) for ``specs`` laid out in order."""
    meta = {"format": "pt"}
    if metadata:
        meta.update({str(k): str(v) for k, v in metadata.items()})
    header: dict[str, object] = {"__metadata__": meta}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": safetensors_dtype_name(spec.dtype),
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    body = json.dumps(header, separators=(",", ":")).encode("utf-8")
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body


def _check_tensor(spec: TensorSpec, tensor: object) -> torch.Tensor:
    """Return ``tensor`` as a contiguous CPU tensor after checking it against ``spec``."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"produce({spec.name!r}) returned {type(tensor).__name__}, not a torch.Tensor")
    if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
        raise ValueError(
            f"produce({spec.name!r}) returned shape {tuple(tensor.shape)} dtype {tensor.dtype}, "
            f"but the plan says shape {spec.shape} dtype {spec.dtype}"
        )
    if tensor.requires_grad:
        tensor = tensor.detach()
    return tensor.to("cpu").contiguous()  # both return the tensor itself when already so


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous CPU tensor (any dtype, 0-dim and empty included)."""
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    raw = flat.view(torch.uint8)
    if sys.byteorder == "big" and flat.element_size() > 1:
        raw = raw.view(-1, flat.element_size()).flip(1).reshape(-1)
    return memoryview(raw.numpy()).cast("B")


def _write_shard(
    path: Path,
    specs: Sequence[TensorSpec],
    produce: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str] | None,
    bar: tqdm,
) -> None:
    """Write one shard file, pulling its tensors from ``produce`` one at a time."""
    header = build_header(specs, metadata)
    expected = len(header) + sum(s.nbytes for s in specs)
    with path.open("xb") as fh:
        fh.write(header)
        for spec in specs:
            tensor = _check_tensor(spec, produce(spec.name))
            fh.write(tensor_bytes(tensor))
            del tensor
            bar.update(1)
        fh.flush()
        os.fsync(fh.fileno())
        written = fh.tell()
    if written != expected:  # pragma: no cover - guards against a logic error above
        raise RuntimeError(f"{path}: wrote {written} bytes, expected {expected}")


def write_sharded(
    out_dir: str | Path,
    specs: Sequence[TensorSpec],
    produce: Callable[[str], torch.Tensor],
    max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write ``specs`` as a (possibly sharded) Hugging Face safetensors checkpoint in ``out_dir``.

    ``produce(name)`` is called once per tensor, in plan order, and must return a tensor of exactly
    the spec's shape and dtype (ValueError/TypeError otherwise); only one produced tensor is held at
    a time. ``metadata`` adds string entries to each header's ``__metadata__`` (``format`` is "pt").
    Writes ``model.safetensors.index.json`` when there is more than one shard. Returns the shard
    paths in order. On any error the files written by this call are removed. ``out_dir`` is created
    if needed; OutputExistsError if it already holds a target file.
    """
    if not specs:
        raise ValueError("nothing to write: the tensor list is empty")
    out = Path(out_dir)
    shards = plan_shards(specs, max_shard_bytes)
    names = shard_file_names(len(shards))
    out.mkdir(parents=True, exist_ok=True)
    targets = [out / n for n in names] + [out / SINGLE_NAME, out / INDEX_NAME]
    clash = next((t for t in targets if t.exists()), None)
    if clash is not None:
        raise OutputExistsError(
            f"{clash} already exists; write the checkpoint into an empty folder (pass --overwrite to "
            "replace the output, or choose another --out)"
        )
    paths = [out / n for n in names]
    written: list[Path] = []
    try:
        with tqdm(total=len(specs), unit="tensor", desc="writing", disable=not progress) as bar:
            for path, shard in zip(paths, shards):
                written.append(path)
                _write_shard(path, shard, produce, metadata, bar)
                logger.info("wrote %s (%d tensors, %d bytes)", path.name, len(shard), path.stat().st_size)
        if len(paths) > 1:
            weight_map = {spec.name: path.name for path, shard in zip(paths, shards) for spec in shard}
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in specs)},
                "weight_map": dict(sorted(weight_map.items())),
            }
            written.append(out / INDEX_NAME)
            atomic_write_json(out / INDEX_NAME, index)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return paths
