"""Calibration statistics: the artifact between calibration and scoring.

A :class:`RouterStats` holds, per MoE decoder layer, a plain dict of float64 tensors, produced by
the observers of :mod:`moeprune.observe`. Every raw entry combines across batches, data shards and
processes by addition, except the ``max_*`` entries, which combine by maximum (each observer
declares its rule), so :meth:`RouterStats.merge` of the statistics of disjoint token sets equals
the statistics of their union. The names and their meaning (E = routed experts of the layer, S_j =
valid tokens whose selected set contains expert j, g_j(x) = the gate weight the model really
multiplies expert j's output by, f_j(x) = expert j's output before gating, B = TCESS bins):

==========================  =======  ==========================================================
name                        shape    value
==========================  =======  ==========================================================
tokens                      []       number of valid (non-padding) tokens seen
frequency                   [E]      |S_j|
soft_count                  [E]      sum over S_j of g_j(x)
tcess_hist                  [E, B]   PreMoe f(z) summed per pooled-probability bin (see observe.tcess)
tcess_pool_max_prob         []       sum over tokens of the largest pooled probability (v3 r)
ean_sum                     [E]      sum over S_j of ||f_j(x)||
reap_sum                    [E]      sum over S_j of g_j(x) ||f_j(x)||
easy_ep                     [E]      sum over tokens of g_j ||f_j|| * s_t (EASY-EP)
coactivation                [E, E]   tokens selecting both i and j (diagonal = frequency)
expert_mean_output          [E, H]   sum over ALL valid tokens of f_j(x) (opt-in; HC-SMoE, REAM)
router_logit_gram           [E, E]   sum over valid tokens of z(x) z(x)^T, raw router logits
max_abs_output              [E]      max over S_j and channels of |f_j(x)|   (combine: max)
shared_max_abs_output       [n]      same for the layer's shared experts     (combine: max)
naee_error                  [2^E]    sum over tokens of ||F - F_S||^2 per expert subset bitmask
                                     (NAEE, opt-in: :mod:`moeprune.observe.naee`)
skip_ratio_hist             [B]      tokens per bin of w2 / w1 on [0, 1] (dynamic skipping,
                                     opt-in: :mod:`moeprune.observe.skip`)
tcess (derived)             [E]      sum_{b >= bin(r)} tcess_hist[:, b]: PreMoe's TCESS, p >= r on
                                     the 1/B grid (:mod:`moeprune.observe.tcess`)
tcess_r (derived)           []       r: the fixed ``tcess_r`` of the metadata, else
                                     tcess_pool_max_prob / tokens
==========================  =======  ==========================================================

A pass that ran only some observers holds only their entries (``metadata["observers"]``).
The dense observers (:mod:`moeprune.observe.dense`) read EVERY decoder layer, not only MoE ones:
their entries are in :attr:`RouterStats.dense` (decoder layer -> entries), saved as
``dense.<layer>.<name>``, merged by the same rules.

Saved as one safetensors file (format version 2): the raw entries as tensors named
``layers.<layer>.<name>`` (derived entries are recomputed on load), and the metadata (model
fingerprint, data hash, samples, seq len, observers, tcess_pool, tcess_r, tcess_bins, dtype,
moeprune version, ...) as JSON under the header key ``moeprune``, so that a researcher can re-score,
re-threshold (:meth:`RouterStats.with_tcess_r`) or merge without re-running calibration.
Format-1 files (whose ``tcess`` was saved already thresholded) still load; they cannot be merged
while they carry TCESS (re-collect them).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from . import __version__
from .errors import StatsError
from .io.output import atomic_write_safetensors
from .observe import ENTRY_OWNERS, ENTRY_RULES, OBSERVERS, derive_tcess

STATS_FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
#: Entries computed from the raw ones (never saved in format 2).
DERIVED = ("tcess", "tcess_r")
MAX_COMBINED = tuple(name for name, rule in ENTRY_RULES.items() if rule == "max")
#: Entries every format-1 file holds.
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
#: The shape of each known entry, in E (routed experts of the layer); "*" is any length (the shared
#: experts' count, TCESS bins). Checked on load, so that a damaged file fails there, naming the entry.
ENTRY_SHAPES = {
    "tokens": (), "tcess_pool_max_prob": (), "frequency": ("E",), "soft_count": ("E",), "tcess": ("E",),
    "ean_sum": ("E",), "reap_sum": ("E",), "easy_ep": ("E",), "max_abs_output": ("E",),
    "shared_max_abs_output": ("*",), "tcess_hist": ("E", "*"), "coactivation": ("E", "E"),
    "expert_mean_output": ("E", "*"), "router_logit_gram": ("E", "E"),
}
#: Metadata that must agree for two statistics to be merged.
MERGE_MUST_AGREE = ("model_fingerprint", "family", "observers", "tcess_pool", "tcess_r", "tcess_bins", "dtype",
                    "dense_max_depth", "replaceme_depth", "replaceme_starts")


def combine_entry(name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Combine one raw statistic from two disjoint token sets by its observer's rule (max or sum)."""
    if ENTRY_RULES.get(name, "sum") == "max":
        return torch.maximum(a, b)
    return a + b


def _raw(entries: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A layer's raw entries: without the derived ones when they can be re-derived."""
    if "tcess_hist" not in entries:
        return dict(entries)
    return {name: value for name, value in entries.items() if name not in DERIVED}


def _derived(layers: dict[int, dict[str, torch.Tensor]], tcess_r: float | None) -> dict[int, dict[str, torch.Tensor]]:
    """Raw layers plus their derived entries (TCESS at the fixed ``tcess_r`` or the data's r)."""
    out = {}
    for layer, entries in layers.items():
        raw = _raw(entries)
        out[layer] = {**raw, **derive_tcess(raw, tcess_r)}
    return out


@dataclass
class RouterStats:
    """Per-layer statistics plus the metadata that says where they came from."""

    layers: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    #: dense observers' entries of every decoder layer (:mod:`moeprune.observe.dense`)
    dense: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def from_raw(cls, layers: dict[int, dict[str, torch.Tensor]], metadata: dict,
                 dense: dict[int, dict[str, torch.Tensor]] | None = None) -> "RouterStats":
        """Statistics from raw observer entries; derived entries use ``metadata["tcess_r"]``."""
        return cls(_derived(layers, metadata.get("tcess_r")), dict(metadata), dict(dense or {}))

    def with_tcess_r(self, r: float | None) -> "RouterStats":
        """The same statistics with TCESS thresholded at the fixed ``r`` (None: the data's mean max
        pooled probability), without re-running calibration."""
        if r is not None and not 0.0 <= float(r) <= 1.0:
            raise StatsError(f"tcess_r must be a probability in [0, 1], got {r}")
        if any("tcess" in e and "tcess_hist" not in e for e in self.layers.values()):
            raise StatsError("these statistics (format 1) hold TCESS at a fixed threshold only; "
                             "re-collect them with `moeprune collect` to change tcess_r")
        metadata = {**self.metadata, "tcess_r": None if r is None else float(r)}
        return RouterStats.from_raw(self.layers, metadata, self.dense)

    def merge(self, other: "RouterStats") -> "RouterStats":
        """Statistics of the union of two disjoint token sets (same model, layers and settings).

        Exact: every raw entry combines by its observer's rule and TCESS is re-derived from the
        merged histogram. Statistics of format 1 that carry TCESS cannot be merged (StatsError).
        """
        if set(self.layers) != set(other.layers):
            raise StatsError(
                f"cannot merge statistics over different MoE layers ({sorted(self.layers)} vs {sorted(other.layers)})"
            )
        differing = [key for key in MERGE_MUST_AGREE if self.metadata.get(key) != other.metadata.get(key)]
        if differing:
            detail = ", ".join(f"{k}: {self.metadata.get(k)!r} vs {other.metadata.get(k)!r}" for k in differing)
            raise StatsError(f"cannot merge statistics collected with different settings ({detail}); "
                             "collect every part with the same model and options")
        for stats in (self, other):
            if any("tcess" in e and "tcess_hist" not in e for e in stats.layers.values()):
                raise StatsError("statistics of format 1 hold TCESS at a data-dependent threshold, which cannot "
                                 "be merged exactly; re-collect them with this moeprune (`moeprune collect`)")
        for stats in (self, other):
            check_mergeable(stats)
        merged = {}
        dense = _merge_dense(self.dense, other.dense)
        for layer, entries in self.layers.items():
            mine, theirs = _raw(entries), _raw(other.layers[layer])
            if set(mine) != set(theirs):
                raise StatsError(f"cannot merge: layer {layer} holds {sorted(mine)} in one file and "
                                 f"{sorted(theirs)} in the other; collect both with the same observers")
            for name in mine:
                if mine[name].shape != theirs[name].shape:
                    raise StatsError(f"cannot merge: layer {layer} {name} has shapes {tuple(mine[name].shape)} "
                                     f"and {tuple(theirs[name].shape)}")
            merged[layer] = {name: combine_entry(name, mine[name], theirs[name]) for name in mine}
        return RouterStats.from_raw(merged, merge_metadata(self.metadata, other.metadata), dense)

    def save(self, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """Write the raw statistics to ``path`` (a .safetensors file, format 2), atomically."""
        tensors = {
            f"layers.{layer}.{name}": value.detach().to(device="cpu", dtype=torch.float64).contiguous()
            for layer, entries in self.layers.items()
            for name, value in _raw(entries).items()
        }
        tensors.update({f"dense.{layer}.{name}": value.detach().to(device="cpu", dtype=torch.float64).contiguous()
                        for layer, entries in self.dense.items() for name, value in entries.items()})
        metadata = dict(self.metadata)
        metadata.setdefault("moeprune_version", __version__)
        metadata["format_version"] = STATS_FORMAT_VERSION
        return atomic_write_safetensors(
            path, tensors, {"moeprune": json.dumps(metadata, sort_keys=True)}, overwrite=overwrite
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RouterStats":
        """Read statistics written by :meth:`save` (format 1 or 2); a foreign or corrupt file is a StatsError."""
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
                dense: dict[int, dict[str, torch.Tensor]] = {}
                for key in handle.keys():
                    prefix, layer, name = key.split(".", 2)
                    if prefix == "dense":
                        dense.setdefault(int(layer), {})[name] = handle.get_tensor(key)
                        continue
                    if prefix != "layers":
                        raise StatsError(f"{path}: tensor {key!r} is not a moeprune statistic; re-run `moeprune collect`")
                    layers.setdefault(int(layer), {})[name] = handle.get_tensor(key)
        except StatsError:
            raise
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise StatsError(f"cannot read statistics from {path}: {exc}") from exc
        if not isinstance(metadata, dict):
            raise StatsError(f"{path}: the moeprune metadata is not a JSON object; re-run `moeprune collect`")
        version = metadata.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS:
            raise StatsError(
                f"{path} has statistics format {version}, this moeprune reads "
                f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}; re-run `moeprune collect`"
            )
        if version == 1:
            required = REQUIRED_ENTRIES
        else:
            observers = metadata.get("observers") or list(OBSERVERS)
            required = [entry for name in observers if name in OBSERVERS and getattr(OBSERVERS[name], "kind", "moe") == "moe"
                        for entry in OBSERVERS[name].entries if entry != "shared_max_abs_output"]
        for layer, entries in layers.items():
            missing = [name for name in required if name not in entries]
            if missing:
                raise StatsError(f"{path}: layer {layer} lacks {missing}; re-run `moeprune collect`")
            check_entry_shapes(entries, f"{path}: layer {layer}")
        metadata.pop("format_version")
        stats = cls.from_raw(dict(sorted(layers.items())), metadata, dict(sorted(dense.items())))
        stats.metadata["format_version"] = version
        return stats

    def check_model(self, fingerprint: str) -> None:
        """Raise unless these statistics were collected on the model with ``fingerprint``."""
        mine = self.metadata.get("model_fingerprint")
        if mine != fingerprint:
            raise StatsError(
                f"statistics were collected on model {mine}, not on this model ({fingerprint}); "
                "collect statistics for this checkpoint with `moeprune collect`"
            )


def check_entry_shapes(entries: dict[str, torch.Tensor], where: str, num_experts: int | None = None) -> int:
    """E of one layer's entries after checking each known entry against :data:`ENTRY_SHAPES` (all
    agreeing on E, which must equal ``num_experts`` when given) and that it is floating point; a
    StatsError names the entry, its shape and the expected one."""
    experts = num_experts
    for name, value in entries.items():
        pattern = ENTRY_SHAPES.get(name)
        if pattern is None:
            continue
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise StatsError(f"{where}: {name} must be a floating-point tensor; re-run `moeprune collect`")
        shape = tuple(value.shape)
        if experts is None and "E" in pattern and len(shape) == len(pattern):
            experts = shape[pattern.index("E")]
        expected = tuple(experts if d == "E" else n for d, n in zip(pattern, shape)) if len(shape) == len(pattern) else None
        if expected != shape:
            want = "[" + ", ".join(str(experts) if d == "E" else "any" for d in pattern) + "]"
            raise StatsError(f"{where}: {name} has shape {list(shape)}, expected {want} "
                             f"({experts} routed experts); the file is damaged or belongs to another model, "
                             "re-run `moeprune collect`")
    return experts or 0


def check_mergeable(stats: RouterStats) -> None:
    """StatsError when ``stats`` hold entries of an observer that does not merge (``mergeable =
    False``: LLM-Pruner's |w * dL/dw|, where |.| of a sum is not the sum of |.|)."""
    held = {name for entries in (*stats.layers.values(), *stats.dense.values()) for name in entries}
    owners = {ENTRY_OWNERS[name] for name in held if name in ENTRY_OWNERS}
    owners |= {name for name in stats.metadata.get("observers") or () if name in OBSERVERS}
    refused = sorted(name for name in owners if not getattr(OBSERVERS[name], "mergeable", True))
    if refused:
        raise StatsError(f"statistics of the observer(s) {refused} cannot be merged: they are |w * dL/dw| of the whole "
                         "calibration set's gradient, and |a + b| != |a| + |b|; collect them in one pass over all the "
                         "data instead")


def _merge_dense(a: dict[int, dict[str, torch.Tensor]], b: dict[int, dict[str, torch.Tensor]]) -> dict:
    """Dense entries of two disjoint token sets, combined by their rules (same layers and entries)."""
    if set(a) != set(b) or any(set(a[layer]) != set(b[layer]) for layer in a):
        raise StatsError("cannot merge: the two statistics hold different dense entries; collect both with the same "
                         "observers and dense settings")
    return {layer: {name: combine_entry(name, a[layer][name], b[layer][name]) for name in a[layer]} for layer in a}


def merge_metadata(a: dict, b: dict) -> dict:
    """Metadata of merged statistics: counts add up, data hashes and files are listed with ``+``."""
    metadata = dict(a)
    metadata.pop("format_version", None)
    for key in ("samples", "num_tokens"):
        metadata[key] = (a.get(key) or 0) + (b.get(key) or 0)
    for key in ("data_hash", "data_file"):
        parts = [v for v in (a.get(key), b.get(key)) if v]
        metadata[key] = "+".join(parts) if parts else a.get(key)
    for key in ("seq_len", "mode", "batch_size", "device"):
        if a.get(key) != b.get(key):
            metadata[key] = None
    return metadata


def merge_all(parts: list[RouterStats]) -> RouterStats:
    """Statistics of the union of several disjoint token sets (``parts[0] + parts[1] + ...``)."""
    if not parts:
        raise StatsError("nothing to merge: give at least one statistics file")
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)
    return merged
