"""Calibration statistics: the artifact between calibration and scoring.

A :class:`RouterStats` holds, per MoE decoder layer, a plain dict of float64 tensors. Every entry
combines across batches and processes by addition, except the ``max_*`` entries, which combine by
maximum. The names and their meaning (E = routed experts of the layer, S_j = valid tokens whose
selected set contains expert j, g_j(x) = the gate weight the model really multiplies expert j's
output by, f_j(x) = expert j's output before gating):

==========================  =======  ==========================================================
name                        shape    value
==========================  =======  ==========================================================
tokens                      []       number of valid (non-padding) tokens seen
frequency                   [E]      |S_j|
soft_count                  [E]      sum over S_j of g_j(x)
tcess                       [E]      sum over tokens of PreMoe's per-token score (see collector)
tcess_pool_max_prob         []       sum over tokens of the largest pooled probability (v3 r)
ean_sum                     [E]      sum over S_j of ||f_j(x)||
reap_sum                    [E]      sum over S_j of g_j(x) ||f_j(x)||
easy_ep                     [E]      sum over tokens of g_j ||f_j|| * s_t (EASY-EP)
coactivation                [E, E]   tokens selecting both i and j (diagonal = frequency)
max_abs_output              [E]      max over S_j and channels of |f_j(x)|   (combine: max)
shared_max_abs_output       [n]      same for the layer's shared experts     (combine: max)
==========================  =======  ==========================================================

Saved as one safetensors file: tensors named ``layers.<layer>.<name>``, and the metadata (model
fingerprint, data hash, samples, seq len, moeprune version, ...) as JSON in the header, so that a
researcher can re-score without re-running calibration.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .errors import StatsError

STATS_FORMAT_VERSION = 1
MAX_COMBINED = ("max_abs_output", "shared_max_abs_output")
REQUIRED_ENTRIES = (
    "tokens",
    "frequency",
    "soft_count",
    "tcess",
    "ean_sum",
    "reap_sum",
    "easy_ep",
    "coactivation",
    "max_abs_output",
)


def combine_entry(name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Combine one statistic from two disjoint token sets: maximum for ``max_*``, else sum."""
    if name in MAX_COMBINED:
        return torch.maximum(a, b)
    return a + b


@dataclass
class RouterStats:
    """Per-layer statistics plus the metadata that says where they came from."""

    layers: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    def merge(self, other: "RouterStats") -> "RouterStats":
        """Statistics of the union of two disjoint token sets (same model, same layers)."""
        if set(self.layers) != set(other.layers):
            raise StatsError("cannot merge statistics over different MoE layers")
        fp_a, fp_b = self.metadata.get("model_fingerprint"), other.metadata.get("model_fingerprint")
        if fp_a and fp_b and fp_a != fp_b:
            raise StatsError("cannot merge statistics collected on different models")
        merged = {
            layer: {
                name: combine_entry(name, values, other.layers[layer][name])
                for name, values in entries.items()
                if name in other.layers[layer]
            }
            for layer, entries in self.layers.items()
        }
        metadata = dict(self.metadata)
        metadata["samples"] = self.metadata.get("samples", 0) + other.metadata.get("samples", 0)
        metadata["data_hash"] = "+".join(
            h for h in (self.metadata.get("data_hash"), other.metadata.get("data_hash")) if h
        )
        return RouterStats(merged, metadata)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the statistics to ``path`` (a .safetensors file), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"layers.{layer}.{name}": value.detach().to(torch.float64).contiguous()
            for layer, entries in self.layers.items()
            for name, value in entries.items()
        }
        metadata = dict(self.metadata)
        metadata.setdefault("moeprune_version", __version__)
        metadata["format_version"] = STATS_FORMAT_VERSION
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"moeprune": json.dumps(metadata, sort_keys=True)})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RouterStats":
        """Read statistics written by :meth:`save`; a foreign or corrupt file is a StatsError."""
        path = Path(path)
        if not path.is_file():
            raise StatsError(f"statistics file not found: {path} (create it with `moeprune collect`)")
        try:
            with safe_open(str(path), framework="pt") as handle:
                raw_meta = (handle.metadata() or {}).get("moeprune")
                if raw_meta is None:
                    raise StatsError(f"{path} is a safetensors file but not moeprune statistics")
                metadata = json.loads(raw_meta)
                layers: dict[int, dict[str, torch.Tensor]] = {}
                for key in handle.keys():
                    _, layer, name = key.split(".", 2)
                    layers.setdefault(int(layer), {})[name] = handle.get_tensor(key)
        except StatsError:
            raise
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise StatsError(f"cannot read statistics from {path}: {exc}") from exc
        if metadata.get("format_version") != STATS_FORMAT_VERSION:
            raise StatsError(
                f"{path} has statistics format {metadata.get('format_version')}, this moeprune reads "
                f"{STATS_FORMAT_VERSION}; re-run `moeprune collect`"
            )
        for layer, entries in layers.items():
            missing = [name for name in REQUIRED_ENTRIES if name not in entries]
            if missing:
                raise StatsError(f"{path}: layer {layer} lacks {missing}; re-run `moeprune collect`")
        return cls(dict(sorted(layers.items())), metadata)

    def check_model(self, fingerprint: str) -> None:
        """Raise unless these statistics were collected on the model with ``fingerprint``."""
        mine = self.metadata.get("model_fingerprint")
        if mine != fingerprint:
            raise StatsError(
                f"statistics were collected on model {mine}, not on this model ({fingerprint}); "
                "collect statistics for this checkpoint with `moeprune collect`"
            )
