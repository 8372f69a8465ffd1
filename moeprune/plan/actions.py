"""Typed plan actions (plan format 2): what a plan does to one decoder layer.

Each action is a small frozen dataclass with a JSON form ``{"op": <name>, ...}`` that a person can
read and edit. Implemented by the ops today: :class:`KeepExperts`, :class:`SliceNeurons`. Declared (JSON round-trip and
validation), refused by the ops with "not implemented yet" until a later issue lands them:
:class:`MergeExperts`, :class:`DropAttentionHeads`, :class:`SliceChannels`,
:class:`DropLayer`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from ..errors import PlanError

#: Router modes of a merge: "exact" remaps the router so a merged expert receives the summed gate
#: of its members; "vanilla" keeps one router row per cluster (a stock checkpoint).
ROUTER_MODES = ("exact", "vanilla")
#: Channel-slicing targets.
CHANNEL_TARGETS = ("dense_mlp", "shared_experts")


def _ints(value: object, where: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise PlanError(f"{where} must be a list of integers, got {value!r}")
    return tuple(value)


def _floats(value: object, where: str) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
    ):
        raise PlanError(f"{where} must be a list of finite numbers, got {value!r}")
    return tuple(float(v) for v in value)


def _object(value: object, where: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise PlanError(f"{where} must be a JSON object, got {value!r}")
    return value


class Action:
    """Base class; ``op`` is the JSON name."""

    op: ClassVar[str] = ""
    #: the ops can write this action today
    implemented: ClassVar[bool] = False
    #: what a later issue must add before the ops can write this action (for the refusal message)
    missing: ClassVar[str] = ""

    def to_json(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_json(cls, data: Mapping, where: str) -> Action:
        raise NotImplementedError


@dataclass(frozen=True)
class KeepExperts(Action):
    """Keep these routed experts (original numbering), renumbered 0..E'-1 in this order (sorted)."""

    op: ClassVar[str] = "keep_experts"
    implemented: ClassVar[bool] = True
    experts: tuple[int, ...]

    def to_json(self) -> dict:
        return {"op": self.op, "experts": list(self.experts)}

    @classmethod
    def from_json(cls, data: Mapping, where: str) -> KeepExperts:
        return cls(tuple(sorted(_ints(data.get("experts"), f"{where}.experts"))))


@dataclass(frozen=True)
class MergeCluster:
    """One merged expert: its members (original numbering), their merge weights and, per member, a
    permutation of its neurons aligning it to the cluster (None = identity)."""

    members: tuple[int, ...]
    weights: tuple[float, ...]
    permutations: tuple[tuple[int, ...] | None, ...] = ()

    def __post_init__(self) -> None:
        if not self.permutations:
            object.__setattr__(self, "permutations", (None,) * len(self.members))

    def to_json(self) -> dict:
        data: dict = {"members": list(self.members), "weights": list(self.weights)}
        if any(p is not None for p in self.permutations):
            data["permutations"] = [None if p is None else list(p) for p in self.permutations]
        return data

    @classmethod
    def from_json(cls, data: object, where: str) -> MergeCluster:
        data = _object(data, where)
        members = _ints(data.get("members"), f"{where}.members")
        weights = _floats(data.get("weights"), f"{where}.weights")
        raw = data.get("permutations")
        if raw is None:
            perms: tuple = ()
        elif isinstance(raw, list):
            perms = tuple(None if p is None else _ints(p, f"{where}.permutations[{i}]") for i, p in enumerate(raw))
        else:
            raise PlanError(f"{where}.permutations must be a list (one permutation or null per member)")
        return cls(members, weights, perms)


@dataclass(frozen=True)
class MergeExperts(Action):
    """Merge clusters of routed experts: cluster i becomes expert i of the layer."""

    op: ClassVar[str] = "merge_experts"
    missing: ClassVar[str] = "the merge op (weighted sums of aligned experts and the router remap)"
    clusters: tuple[MergeCluster, ...]
    router: str = "exact"

    def to_json(self) -> dict:
        return {"op": self.op, "router": self.router, "clusters": [c.to_json() for c in self.clusters]}

    @classmethod
    def from_json(cls, data: Mapping, where: str) -> MergeExperts:
        raw = data.get("clusters")
        if not isinstance(raw, list) or not raw:
            raise PlanError(f"{where}.clusters must be a non-empty list of clusters")
        router = data.get("router", "exact")
        if router not in ROUTER_MODES:
            raise PlanError(f"{where}.router must be one of {', '.join(ROUTER_MODES)}, got {router!r}")
        return cls(tuple(MergeCluster.from_json(c, f"{where}.clusters[{i}]") for i, c in enumerate(raw)), router)


def neuron_ranges(neurons: tuple[int, ...]) -> str:
    """Sorted neuron indices as a compact, editable string of ranges: (0, 1, 2, 5, 7, 8) -> "0-2,5,7-8"."""
    parts: list[str] = []
    start = previous = None
    for n in sorted(neurons):
        if start is None:
            start = previous = n
        elif n == previous + 1:
            previous = n
        else:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
            start = previous = n
    if start is not None:
        parts.append(str(start) if start == previous else f"{start}-{previous}")
    return ",".join(parts)


def parse_neuron_ranges(text: str, where: str) -> tuple[int, ...]:
    """The indices of a :func:`neuron_ranges` string ("0-2,5" -> (0, 1, 2, 5)); malformed -> PlanError."""
    out: list[int] = []
    for part in text.split(",") if text.strip() else []:
        low, dash, high = part.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()) or (dash and int(high) < int(low)):
            raise PlanError(f"{where}: {part!r} is not a neuron index or an ascending range like '4-9'")
        out.extend(range(int(low), int(high) + 1) if dash else [int(low)])
    return tuple(out)


@dataclass(frozen=True)
class SliceNeurons(Action):
    """Keep these intermediate neurons of each listed expert (original numbering); widths may differ.

    Neuron k of a routed expert is gate row k, up row k and down column k (and gate/up bias entry k;
    :func:`moeprune.units.neuron_unit`). Experts not listed keep every neuron. JSON: each expert's
    kept neurons as a string of ranges (``"0-4,7,9-12"``, compact for wide experts) or as a list.
    """

    op: ClassVar[str] = "slice_neurons"
    implemented: ClassVar[bool] = True
    experts: Mapping[int, tuple[int, ...]] = field(default_factory=dict)

    def widths(self) -> dict[int, int]:
        """Kept neurons per listed expert."""
        return {expert: len(neurons) for expert, neurons in self.experts.items()}

    def to_json(self) -> dict:
        return {"op": self.op, "experts": {str(e): neuron_ranges(n) for e, n in sorted(self.experts.items())}}

    @classmethod
    def from_json(cls, data: Mapping, where: str) -> SliceNeurons:
        raw = _object(data.get("experts"), f"{where}.experts")
        experts = {}
        for key, neurons in raw.items():
            if not str(key).isdigit():
                raise PlanError(f"{where}.experts: key {key!r} is not an expert index")
            kept = (parse_neuron_ranges(neurons, f"{where}.experts[{key}]") if isinstance(neurons, str)
                    else _ints(neurons, f"{where}.experts[{key}]"))
            experts[int(key)] = tuple(sorted(kept))
        return cls(dict(sorted(experts.items())))


@dataclass(frozen=True)
class DropAttentionHeads(Action):
    """Drop query heads and/or whole KV groups (a KV group takes its query heads with it)."""

    op: ClassVar[str] = "drop_attention_heads"
    missing: ClassVar[str] = "attention keys in routers/<family>.toml and the attention op"
    heads: tuple[int, ...] = ()
    kv_groups: tuple[int, ...] = ()

    def to_json(self) -> dict:
        return {"op": self.op, "heads": list(self.heads), "kv_groups": list(self.kv_groups)}

    @classmethod
    def from_json(cls, data: Mapping, where: str) -> DropAttentionHeads:
        return cls(tuple(sorted(_ints(data.get("heads", []), f"{where}.heads"))),
                   tuple(sorted(_ints(data.get("kv_groups", []), f"{where}.kv_groups"))))


@dataclass(frozen=True)
class SliceChannels(Action):
    """Keep these intermediate channels of the layer's dense MLP or shared experts."""

    op: ClassVar[str] = "slice_channels"
    missing: ClassVar[str] = "dense-MLP and shared-expert keys in routers/<family>.toml and the dense op"
    target: str
    kept: tuple[int, ...]

    def to_json(self) -> dict:
        return {"op": self.op, "target": self.target, "kept": list(self.kept)}

    @classmethod
    def from_json(cls, data: Mapping, where: str) -> SliceChannels:
        target = data.get("target")
        if target not in CHANNEL_TARGETS:
            raise PlanError(f"{where}.target must be one of {', '.join(CHANNEL_TARGETS)}, got {target!r}")
        return cls(target, tuple(sorted(_ints(data.get("kept"), f"{where}.kept"))))


@dataclass(frozen=True)
class DropLayer(Action):
    """Remove the whole decoder layer (later layers are renumbered)."""

    op: ClassVar[str] = "drop_layer"
    missing: ClassVar[str] = "the layer-drop op (renumbering layers and per-layer config lists)"

    def to_json(self) -> dict:
        return {"op": self.op}

    @classmethod
    def from_json(cls, data: Mapping, where: str) -> DropLayer:
        return cls()


#: JSON op name -> action class.
ACTIONS: dict[str, type[Action]] = {
    cls.op: cls for cls in (KeepExperts, MergeExperts, SliceNeurons, DropAttentionHeads, SliceChannels, DropLayer)
}


def action_from_json(data: object, where: str) -> Action:
    """One action from its JSON object; unknown ops list the known ones."""
    data = _object(data, where)
    op = data.get("op")
    if op not in ACTIONS:
        raise PlanError(f"{where}: unknown action {op!r}; known actions: {', '.join(ACTIONS)}")
    return ACTIONS[op].from_json(data, where)
