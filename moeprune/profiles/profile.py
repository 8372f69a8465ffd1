"""The :class:`Profile`: one task's scores, kept experts, retrieval signature and window signatures,
with its validation and JSON form (the store writes and reads it)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from .. import __version__
from ..geometry import MoEGeometry
from ..errors import PlanError
from ..plan import Plan, summarize_scores
from ..plan.actions import Action, MergeExperts, RecombineNeurons, action_from_json
from .settings import (_FOLD_KEYS, _REBUILD, _REQUIRED_KEYS, _REQUIRED_METADATA, FOLD_FORMAT_VERSION, PROFILE_ACTIONS,
                       PROFILE_FORMAT, PROFILE_FORMAT_VERSION, READABLE_FORMAT_VERSIONS, ProfileError,
                       check_profile_name)


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


def _actions_from_json(mapping, where: str) -> dict[int, list[Action]]:
    try:
        return {layer: [action_from_json(a, f"{where}: actions[{layer}][{i}]") for i, a in enumerate(raw)]
                for layer, raw in _int_keys(mapping, "actions", where).items()}
    except PlanError as exc:
        raise ProfileError(f"{exc}; {_REBUILD}") from None


#: the plan action each folding profile action stores per layer
_FOLD_OPS = {"merge": MergeExperts, "dern": RecombineNeurons}


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
        action: what happens to the experts not kept (:data:`~.settings.PROFILE_ACTIONS`): ``drop``,
            ``merge`` (each joins a kept expert) or ``dern`` (their neurons are recombined into the
            kept experts); the kept set is the same for all three.
        action_options: the folding action's settings (e.g. ``similarity``, ``router``, ``tau``).
        actions: MoE layer -> the plan actions that fold the dropped experts in (one
            :class:`~moeprune.plan.MergeExperts` per layer for ``merge``, whose clusters' first members
            are the kept experts; a :class:`~moeprune.plan.RecombineNeurons` for each layer where DERN
            moved segments); empty for ``drop``. Computed at build time from the profile's own-domain
            statistics and weights, so export and loading replay them without statistics.
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
    action: str = "drop"
    action_options: dict = field(default_factory=dict)
    actions: dict[int, list[Action]] = field(default_factory=dict)

    # ---- queries

    @property
    def folds(self) -> bool:
        """True for a profile that folds its dropped experts into the kept ones (merge, dern)."""
        return self.action != "drop"

    @property
    def format_version(self) -> int:
        """1 for a drop profile (the original format), 2 for a folding one."""
        return FOLD_FORMAT_VERSION if self.folds else PROFILE_FORMAT_VERSION

    # ---- queries (kept sets and signatures) ------------------------------------------------------

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
        merged = self.action == "merge"  # the clusters hold every expert: no keep_experts step
        return Plan(
            layers={} if merged else {layer: list(k) for layer, k in sorted(self.kept.items())},
            actions={layer: list(actions) for layer, actions in sorted(self.actions.items())},
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
        if self.metadata["format_version"] not in READABLE_FORMAT_VERSIONS:
            raise ProfileError(
                f"{where} has profile format version {self.metadata['format_version']!r}, this moeprune "
                f"({__version__}) reads versions {', '.join(map(str, READABLE_FORMAT_VERSIONS))}; {_REBUILD}"
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
        self._validate_actions(where)
        for kind, windows in (("tcess", self.windows), ("logits", self.logit_windows)):
            for length, tensor in windows.items():
                if tensor.dim() != 3 or tuple(tensor.shape[1:]) != (len(self.signature), num):
                    raise ProfileError(
                        f"{where}: {kind} window signatures of length {length} have shape {tuple(tensor.shape)}, "
                        f"expected [n, {len(self.signature)}, {num}]; {_REBUILD}"
                    )

    def _validate_actions(self, where: str) -> None:
        """The folding actions agree with the action and the kept sets (their full check against the
        model is :func:`moeprune.plan.validate_plan`, run by export and load)."""
        if self.action not in PROFILE_ACTIONS:
            raise ProfileError(f"{where}: unknown action {self.action!r} (known: {', '.join(PROFILE_ACTIONS)}); {_REBUILD}")
        if not self.folds:
            if self.actions or self.action_options:
                raise ProfileError(f"{where}: a drop profile holds no folding actions; {_REBUILD}")
            return
        op = _FOLD_OPS[self.action]
        stray = sorted(set(self.actions) - set(self.kept))
        if stray:
            raise ProfileError(f"{where}: actions name layers {stray} the profile keeps no experts of; {_REBUILD}")
        for layer, actions in self.actions.items():
            if len(actions) != 1 or not isinstance(actions[0], op):
                raise ProfileError(f"{where}: layer {layer} must hold one {op.op} action for --action {self.action}; "
                                   f"{_REBUILD}")
            if self.action == "merge":
                dominants = [c.members[0] for c in actions[0].clusters]  # merged expert i = kept expert i
                if dominants != self.kept[layer]:
                    raise ProfileError(f"{where}: layer {layer} merges into experts {dominants}, but keeps "
                                       f"{self.kept[layer]} (in this order); {_REBUILD}")
            elif not set(actions[0].experts) <= set(self.kept[layer]):
                raise ProfileError(f"{where}: layer {layer} recombines experts it does not keep; {_REBUILD}")
        if self.action == "merge" and set(self.actions) != set(self.kept):
            raise ProfileError(f"{where}: a merge profile needs a merge action in every MoE layer; {_REBUILD}")

    def to_json(self) -> dict:
        """A JSON-serialisable dict (without the window tensors, which :class:`ProfileStore` writes).

        A drop profile is written in format version 1, exactly as before the folding actions
        existed; a folding profile in version 2, with ``action`` (its name and options) and
        ``actions`` (layer -> plan actions, as in a plan file)."""
        data = {
            "format": PROFILE_FORMAT,
            "format_version": self.format_version,
            "task": self.task,
            "method": self.method,
            "budget": self.budget,
            "collapse_groups": self.collapse_groups,
            "kept": {str(k): v for k, v in sorted(self.kept.items())},
            "protected": {str(k): v for k, v in sorted(self.protected.items())},
            "scores": {str(k): [float(x) for x in v] for k, v in sorted(self.scores.items())},
            "signature": {str(k): [float(x) for x in v] for k, v in sorted(self.signature.items())},
            "metadata": {**self.metadata, "format_version": self.format_version},
        }
        if self.folds:
            data["action"] = {"op": self.action, **self.action_options}
            data["actions"] = {str(layer): [a.to_json() for a in actions] for layer, actions in sorted(self.actions.items())}
        return data

    @classmethod
    def from_json(cls, data, where: str = "profile", windows: dict[int, torch.Tensor] | None = None,
                  logit_windows: dict[int, torch.Tensor] | None = None) -> "Profile":
        """Parse and validate :meth:`to_json` output; anything malformed is a ProfileError."""
        if not isinstance(data, Mapping) or data.get("format") != PROFILE_FORMAT:
            raise ProfileError(f"{where} is not a moeprune profile (no \"format\": \"{PROFILE_FORMAT}\"); {_REBUILD}")
        version = data.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS:
            raise ProfileError(
                f"{where} has profile format version {version!r}, this moeprune ({__version__}) reads versions "
                f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}; {_REBUILD}"
            )
        missing = [k for k in _REQUIRED_KEYS + (_FOLD_KEYS if version == FOLD_FORMAT_VERSION else ()) if k not in data]
        if missing:
            raise ProfileError(f"{where} lacks {missing}; the file is incomplete, {_REBUILD}")
        if not isinstance(data["metadata"], Mapping) or not isinstance(data["budget"], Mapping):
            raise ProfileError(f"{where}: metadata and budget must be objects; {_REBUILD}")
        action = dict(data.get("action", {"op": "drop"})) if isinstance(data.get("action", {}), Mapping) else None
        if action is None or (version == FOLD_FORMAT_VERSION) != (action.get("op") not in ("drop", None)):
            raise ProfileError(f"{where}: format version {version} does not match its action "
                               f"{data.get('action')!r} (version 1: drop, version 2: merge or dern); {_REBUILD}")
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
            action=str(action.pop("op", "drop")),
            action_options=action,
            actions=_actions_from_json(data.get("actions", {}), where),
        )
        profile.validate(where)
        return profile
