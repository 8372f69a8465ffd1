"""Where and in which precision a calibration pass runs (``--device``, ``--dtype``).

Defaults: the CPU, in float32 (the fastest CPU precision here); on a GPU, the checkpoint's own dtype
(``config.dtype`` / ``config.torch_dtype``, else the dtype of most weight bytes in the shard
headers). float16 on the CPU is allowed but slow (a warning says so). Statistics always accumulate
in float64, whatever the compute dtype.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

from ..errors import MoePruneError

logger = logging.getLogger(__name__)

#: ``--dtype`` names and their torch dtypes.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a torch.device (None: cpu); a MoePruneError for an unknown
    device, or for CUDA when this machine has none."""
    if device is None:
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise MoePruneError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from exc
    if resolved.type == "cpu":
        return torch.device("cpu")
    if resolved.type != "cuda":
        raise MoePruneError(f"unsupported device {device!r}: use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise MoePruneError(f"--device {device} asks for CUDA, but this torch sees no CUDA GPU; pass --device cpu")
    if resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise MoePruneError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                            f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return resolved


def checkpoint_dtype(config, checkpoint=None) -> torch.dtype:
    """The checkpoint's own floating dtype: ``config.dtype`` / ``config.torch_dtype`` when set, else
    the dtype of most floating-point weight bytes in the shard headers (float32 when unknown)."""
    for key in ("dtype", "torch_dtype"):
        value = getattr(config, key, None)
        if isinstance(value, str):
            value = DTYPES.get(value, getattr(torch, value, None))
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return value
    if checkpoint is not None:
        counts: Counter = Counter()
        for name in checkpoint.keys():
            dtype = checkpoint.dtype(name)
            if dtype.is_floating_point:
                counts[dtype] += checkpoint.nbytes(name)
        if counts:
            return counts.most_common(1)[0][0]
    return torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, config=None, checkpoint=None) -> torch.dtype:
    """The compute dtype: ``dtype`` when given (float32, bfloat16, float16, by name or as a torch
    dtype), else float32 on the CPU and the checkpoint's dtype on a GPU."""
    if dtype is None:
        if device.type == "cpu":
            return torch.float32
        return checkpoint_dtype(config, checkpoint)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise MoePruneError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise MoePruneError(f"unsupported dtype {dtype}: use one of {', '.join(DTYPES)}")
    if dtype == torch.float16 and device.type == "cpu":
        logger.warning("float16 on the CPU is slow; bfloat16 or float32 are faster there")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def to_device(value, device: torch.device):
    """``value`` (a tensor, or tuples/lists/dicts of them) on ``device``; other values unchanged."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value
