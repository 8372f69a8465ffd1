"""The :class:`Profile`: one task's scores, kept experts, retrieval signature and window signatures,
with its validation and JSON form (the store writes and reads it)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from .. import __version__
from ..geometry import MoEGeometry
from ..plan import Plan, summarize_scores
from .settings import (_REBUILD, _REQUIRED_KEYS, _REQUIRED_METADATA, PROFILE_FORMAT, PROFILE_FORMAT_VERSION,
                       ProfileError, check_profile_name)


def _geometry_dict(geometry: MoEGeometry) -> dict:
    data = asdict(geometry)
    data.pop("extra", None)
    data["moe_layers"] = list(geometry.moe_layers)
    return data


def _geometry_from_dict(data: Mapping) -> MoEGeometry:
    try:
        return MoEGeometry(**{**data, "moe_layers": tuple(int(x) for x in data["moe_layers"])})
    except (TypeError, KeyError) as exc:
        raise ProfileError(f"the profile's metadata.geometry is malformed ({exc}); {_REBUILD}") from None


def _int_keys(mapping, what: str, where: str) -> dict[int, list]:
    if not isinstance(mapping, Mapping):
        raise ProfileError(f"{where}: {what} must be an object of layer -> list; {_REBUILD}")
    out = {}
    for key, value in mapping.items():
        try:
            layer = int(key)
        except (TypeError, ValueError):
            raise ProfileError(f"{where}: {what} has layer key {key!r}, not an integer; {_REBUILD}") from None
        if not isinstance(value, list):
            raise ProfileError(f"{where}: {what}[{key}] must be a list; {_REBUILD}")
        out[layer] = value
    return dict(sorted(out.items()))


@dataclass
class Profile:
    """One task's expert profile (see the module docstring).

    Attributes:
        task: the profile's name (its file name in a store).
        method: scoring method (``tcess``, ``easy_ep``, ``reap``, ...).
        budget: the budget as given, e.g. ``{"ratio": 0.5}``, ``{"keep": 4}``, ``{"union": [...]}``.
        scores: MoE layer -> one score per routed expert (higher = more important).
        kept: MoE layer -> sorted kept experts (original numbering; may differ in count per layer
            after union/intersection).
        signature: early MoE layer -> the task's mean TCESS vector (the retrieval key).
        metadata: model_fingerprint, architecture_fingerprint, family, num_experts, top_k,
            geometry, data_hash, data_file, samples, seq_len, num_tokens, tcess_pool, tcess_r,
            moeprune_version, created, format_version (and sources/combine for combined profiles).
        protected: MoE layer -> experts kept regardless of score (super experts).
        collapse_groups: the pruned model routes with n_group = topk_group = 1.
        windows: window length -> TCESS signatures [n, len(signature), E] of calibration windows of
            that many tokens (the ``windows`` and ``centroid`` matching rules and their fallback).
        logit_windows: window length -> mean router logits [n, len(signature), E] of the same windows
            (the ``classifier`` matching rule and its fallback).
    """

    task: str
    method: str
    budget: dict
    scores: dict[int, list[float]]
    kept: dict[int, list[int]]
    signature: dict[int, list[float]]
    metadata: dict
    protected: dict[int, list[int]] = field(default_factory=dict)
    collapse_groups: bool = False
    windows: dict[int, torch.Tensor] = field(default_factory=dict)
    logit_windows: dict[int, torch.Tensor] = field(default_factory=dict)

    # ---- queries -------------------------------------------------------------------------------

    @property
    def geometry(self) -> MoEGeometry:
        return _geometry_from_dict(self.metadata["geometry"])

    @property
    def signature_layers(self) -> list[int]:
        return sorted(self.signature)

    def kept_counts(self) -> dict[int, int]:
        return {layer: len(kept) for layer, kept in sorted(self.kept.items())}

    def signature_tensor(self, layers: Sequence[int] | None = None) -> torch.Tensor:
        """The signature of ``layers`` (default: all stored) as a float64 tensor [L, E]."""
        layers = self.signature_layers if layers is None else list(layers)
        missing = [layer for layer in layers if layer not in self.signature]
        if missing:
            raise ProfileError(f"profile {self.task!r} stores no signature for layers {missing} "
                               f"(it has {self.signature_layers}); {_REBUILD} with more --signature-layers")
        return torch.tensor([self.signature[layer] for layer in layers], dtype=torch.float64)

    def to_plan(self, model_fingerprint: str | None = None) -> Plan:
        """The pruning plan of this profile (for ``moeprune apply`` or the partial loader).

        ``model_fingerprint`` (default: the one the profile was built on) is recorded in the plan;
        pass the target checkpoint's fingerprint once :func:`check_profile_model` accepted it.
        """
        meta = self.metadata
        scores = {layer: torch.tensor(v, dtype=torch.float64) for layer, v in self.scores.items()}
        return Plan(
            layers={layer: list(k) for layer, k in sorted(self.kept.items())},
            method=self.method,
            budget=dict(self.budget),
            protected={layer: list(p) for layer, p in sorted(self.protected.items())},
            model_fingerprint=meta["model_fingerprint"] if model_fingerprint is None else model_fingerprint,
            family=meta["family"],
            num_experts=int(meta["num_experts"]),
            score_summary=summarize_scores(scores, self.kept),
            collapse_groups=self.collapse_groups,
            calibration={"profile": self.task, "profile_model_fingerprint": meta["model_fingerprint"],
                         **{k: meta.get(k) for k in ("data_hash", "samples", "seq_len", "num_tokens", "data_file")}},
        )

    # ---- validation and JSON -------------------------------------------------------------------

    def validate(self, where: str = "profile") -> None:
        """Raise ProfileError unless the profile is internally consistent (see :meth:`from_json`)."""
        check_profile_name(self.task)
        missing = [k for k in _REQUIRED_METADATA if k not in self.metadata]
        if missing:
            raise ProfileError(f"{where}: metadata lacks {missing}; {_REBUILD}")
        if self.metadata["format_version"] != PROFILE_FORMAT_VERSION:
            raise ProfileError(
                f"{where} has profile format version {self.metadata['format_version']!r}, this moeprune "
                f"({__version__}) reads version {PROFILE_FORMAT_VERSION}; {_REBUILD}"
            )
        geometry = self.geometry
        num = geometry.num_experts
        if int(self.metadata["num_experts"]) != num:
            raise ProfileError(f"{where}: metadata.num_experts disagrees with metadata.geometry; {_REBUILD}")
        moe = set(geometry.moe_layers)
        for what, mapping in (("scores", self.scores), ("kept", self.kept), ("signature", self.signature)):
            stray = sorted(set(mapping) - moe)
            if stray:
                raise ProfileError(f"{where}: {what} names layers {stray} that are not MoE layers {sorted(moe)}; {_REBUILD}")
        if set(self.kept) != set(self.scores):
            raise ProfileError(f"{where}: kept and scores cover different layers; {_REBUILD}")
        if not self.signature:
            raise ProfileError(f"{where}: the signature is empty; {_REBUILD}")
        for what, mapping in (("scores", self.scores), ("signature", self.signature)):
            for layer, values in mapping.items():
                if len(values) != num or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                    raise ProfileError(f"{where}: {what}[{layer}] must be {num} finite numbers; {_REBUILD}")
        for layer, kept in self.kept.items():
            if not all(isinstance(e, int) and 0 <= e < num for e in kept) or kept != sorted(set(kept)):
                raise ProfileError(f"{where}: kept[{layer}] must be sorted distinct expert indices in [0, {num}); {_REBUILD}")
            if len(kept) < geometry.top_k:
                raise ProfileError(f"{where}: layer {layer} keeps {len(kept)} experts < top_k={geometry.top_k}; {_REBUILD}")
        for kind, windows in (("tcess", self.windows), ("logits", self.logit_windows)):
            for length, tensor in windows.items():
                if tensor.dim() != 3 or tuple(tensor.shape[1:]) != (len(self.signature), num):
                    raise ProfileError(
                        f"{where}: {kind} window signatures of length {length} have shape {tuple(tensor.shape)}, "
                        f"expected [n, {len(self.signature)}, {num}]; {_REBUILD}"
                    )

    def to_json(self) -> dict:
        """A JSON-serialisable dict (without the window tensors, which :class:`ProfileStore` writes)."""
        return {
            "format": PROFILE_FORMAT,
            "format_version": PROFILE_FORMAT_VERSION,
            "task": self.task,
            "method": self.method,
            "budget": self.budget,
            "collapse_groups": self.collapse_groups,
            "kept": {str(k): v for k, v in sorted(self.kept.items())},
            "protected": {str(k): v for k, v in sorted(self.protected.items())},
            "scores": {str(k): [float(x) for x in v] for k, v in sorted(self.scores.items())},
            "signature": {str(k): [float(x) for x in v] for k, v in sorted(self.signature.items())},
            "metadata": {**self.metadata, "format_version": PROFILE_FORMAT_VERSION},
        }

    @classmethod
    def from_json(cls, data, where: str = "profile", windows: dict[int, torch.Tensor] | None = None,
                  logit_windows: dict[int, torch.Tensor] | None = None) -> "Profile":
        """Parse and validate :meth:`to_json` output; anything malformed is a ProfileError."""
        if not isinstance(data, Mapping) or data.get("format") != PROFILE_FORMAT:
            raise ProfileError(f"{where} is not a moeprune profile (no \"format\": \"{PROFILE_FORMAT}\"); {_REBUILD}")
        if data.get("format_version") != PROFILE_FORMAT_VERSION:
            raise ProfileError(
                f"{where} has profile format version {data.get('format_version')!r}, this moeprune "
                f"({__version__}) reads version {PROFILE_FORMAT_VERSION}; {_REBUILD}"
            )
        missing = [k for k in _REQUIRED_KEYS if k not in data]
        if missing:
            raise ProfileError(f"{where} lacks {missing}; the file is incomplete, {_REBUILD}")
        if not isinstance(data["metadata"], Mapping) or not isinstance(data["budget"], Mapping):
            raise ProfileError(f"{where}: metadata and budget must be objects; {_REBUILD}")
        profile = cls(
            task=data["task"],
            method=str(data["method"]),
            budget=dict(data["budget"]),
            scores=_int_keys(data["scores"], "scores", where),
            kept=_int_keys(data["kept"], "kept", where),
            signature=_int_keys(data["signature"], "signature", where),
            metadata=dict(data["metadata"]),
            protected=_int_keys(data.get("protected", {}), "protected", where),
            collapse_groups=bool(data.get("collapse_groups", False)),
            windows=dict(windows or {}),
            logit_windows=dict(logit_windows or {}),
        )
        profile.validate(where)
        return profile
