"""Typed plan actions (plan format 2): what a plan does to one decoder layer.

Each action is a small frozen dataclass with a JSON form ``{"op": <name>, ...}`` that a person can
read and edit. Implemented by the ops: :class:`KeepExperts`, :class:`MergeExperts`,
:class:`SliceNeurons`, :class:`RecombineNeurons`, and the dense actions :class:`DropAttentionHeads`,
:class:`SliceChannels`, :class:`DropLayer`, :class:`TransformMlpOutput` (:mod:`moeprune.ops.dense`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import PlanError

#: Router modes of a merge: "exact" remaps the router so a merged expert receives the summed gate
#: of its members; "vanilla" keeps one router row per cluster (a stock checkpoint).
ROUTER_MODES = ("exact", "vanilla")
#: Router rows of a vanilla merge: the dominant member's row, or the merge-weighted mean of the rows.
ROUTER_ROWS = ("dominant", "mean")
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
    permutation of its neurons aligning it to the cluster (None = identity).

    The FIRST member is the cluster's dominant (reference) expert: the others' neurons are aligned
    to it, and a vanilla router with ``router_rows="dominant"`` keeps its router row. The merged
    expert is sum_j w_j P_j(W_j) / sum_j w_j per tensor; a permutation is in ``index_select`` form
    (aligned neuron k = the member's neuron ``perm[k]``, see :mod:`moeprune.ops.align`)."""

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
    """Merge clusters of routed experts: cluster i becomes expert i of the layer.

    ``router``: ``"vanilla"`` (one router row per cluster, a stock checkpoint) or ``"exact"``
    (every original logit kept and mapped to its cluster; ``moeprune.load``). ``router_rows``
    (vanilla only): each cluster's row is its dominant (first) member's row, ``"dominant"``, or the
    members' rows averaged with the merge weights, ``"mean"``; router biases and correction biases
    likewise. See :mod:`moeprune.ops.merge`.
    """

    op: ClassVar[str] = "merge_experts"
    implemented: ClassVar[bool] = True
    missing: ClassVar[str] = "the merge op (weighted sums of aligned experts and the router remap)"
    clusters: tuple[MergeCluster, ...]
    router: str = "vanilla"
    router_rows: str = "dominant"

    def to_json(self) -> dict:
        return {"op": self.op, "router": self.router, "router_rows": self.router_rows,
                "clusters": [c.to_json() for c in self.clusters]}

    @classmethod
    def from_json(cls, data: Mapping, where: str) -> MergeExperts:
        raw = data.get("clusters")
        if not isinstance(raw, list) or not raw:
            raise PlanError(f"{where}.clusters must be a non-empty list of clusters")
        router = data.get("router", "vanilla")
        if router not in ROUTER_MODES:
            raise PlanError(f"{where}.router must be one of {', '.join(ROUTER_MODES)}, got {router!r}")
        rows = data.get("router_rows", "dominant")
        if rows not in ROUTER_ROWS:
            raise PlanError(f"{where}.router_rows must be one of {', '.join(ROUTER_ROWS)}, got {rows!r}")
        return cls(tuple(MergeCluster.from_json(c, f"{where}.clusters[{i}]") for i, c in enumerate(raw)), router, rows)


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
    """Drop query heads and/or whole KV groups (original numbering; a KV group takes its query heads
    with it, a group left without query heads goes too; the kept groups must keep equal numbers of
    query heads)."""

    op: ClassVar[str] = "drop_attention_heads"
    implemented: ClassVar[bool] = True
    heads: tuple[int, ...] = ()
    kv_groups: tuple[int, ...] = ()
    #: [hidden] added to o_proj's output bias (created where o_proj has none): FLAP's compensation
    #: of the removed heads' mean output; () = none
    output_bias: tuple[float, ...] = ()

    def to_json(self) -> dict:
        return {"op": self.op, "heads": list(self.heads), "kv_groups": list(self.kv_groups), **_bias_json(self.output_bias)}

    @classmethod
    def from_json(cls, data: Mapping, where: str) -> DropAttentionHeads:
        return cls(tuple(sorted(_ints(data.get("heads", []), f"{where}.heads"))),
                   tuple(sorted(_ints(data.get("kv_groups", []), f"{where}.kv_groups"))),
                   _floats(data.get("output_bias", []), f"{where}.output_bias"))


def _bias_json(bias: tuple[float, ...]) -> dict:
    return {"output_bias": list(bias)} if bias else {}


@dataclass(frozen=True)
class SliceChannels(Action):
    """Keep these intermediate channels of the layer's dense MLP or shared experts."""

    op: ClassVar[str] = "slice_channels"
    implemented: ClassVar[bool] = True
    target: str
    kept: tuple[int, ...]
    #: [hidden] added to down_proj's output bias (created where down_proj has none): FLAP's
    #: compensation of the removed channels' mean output; () = none
    output_bias: tuple[float, ...] = ()

    def to_json(self) -> dict:
        return {"op": self.op, "target": self.target, "kept": list(self.kept), **_bias_json(self.output_bias)}

    @classmethod
    def from_json(cls, data: Mapping, where: str) -> SliceChannels:
        target = data.get("target")
        if target not in CHANNEL_TARGETS:
            raise PlanError(f"{where}.target must be one of {', '.join(CHANNEL_TARGETS)}, got {target!r}")
        return cls(target, tuple(sorted(_ints(data.get("kept"), f"{where}.kept"))),
                   _floats(data.get("output_bias", []), f"{where}.output_bias"))


@dataclass(frozen=True)
class DropLayer(Action):
    """Remove the whole decoder layer (later layers are renumbered in the output; plans always use
    the original numbering)."""

    op: ClassVar[str] = "drop_layer"
    implemented: ClassVar[bool] = True

    def to_json(self) -> dict:
        return {"op": self.op}

    @classmethod
    def from_json(cls, data: Mapping, where: str) -> DropLayer:
        return cls()


def _tensor_to_json(tensor: torch.Tensor) -> dict:
    """A float32 tensor as JSON: shape, base64 of its little-endian bytes, and their sha256."""
    data = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().astype("<f4").tobytes()
    return {"dtype": "float32", "shape": list(tensor.shape), "sha256": hashlib.sha256(data).hexdigest(),
            "base64": base64.b64encode(data).decode("ascii")}


def _tensor_from_json(value: object, where: str) -> torch.Tensor:
    value = _object(value, where)
    try:
        data = base64.b64decode(value["base64"], validate=True)
        shape = [int(n) for n in value["shape"]]
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise PlanError(f"{where} must be {{dtype, shape, sha256, base64}} of a float32 tensor ({exc})") from None
    if value.get("dtype") != "float32" or hashlib.sha256(data).hexdigest() != value.get("sha256") \
            or len(data) != 4 * math.prod(shape):
        raise PlanError(f"{where}: the tensor's bytes do not match its dtype, shape or sha256 (the plan is damaged)")
    return torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(shape).clone()


@dataclass(frozen=True, eq=False)
class TransformMlpOutput(Action):
    """Multiply the layer's feed-forward output (dense MLP, or MoE block with its shared experts) by
    ``matrix`` [hidden, hidden] (y <- matrix @ y), folded into every down projection and its bias:
    ReplaceMe's linear map replacing a dropped run of layers after this one (their
    :class:`DropLayer` actions are separate). Stored in the plan as float32 bytes (base64, with their
    sha256 checked on load): 4 H^2 bytes, a third more as base64."""

    op: ClassVar[str] = "transform_mlp_output"
    implemented: ClassVar[bool] = True
    matrix: torch.Tensor

    def to_json(self) -> dict:
        return {"op": self.op, "matrix": _tensor_to_json(self.matrix)}

    @classmethod
    def from_json(cls, data: Mapping, where: str) -> TransformMlpOutput:
        matrix = _tensor_from_json(data.get("matrix"), f"{where}.matrix")
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise PlanError(f"{where}.matrix must be a square [H, H] matrix, got shape {list(matrix.shape)}")
        return cls(matrix)


@dataclass(frozen=True)
class NeuronMix:
    """How one recombined expert is built (DERN): output neuron ``targets[i]`` receives
    ``weights[i]`` times neuron ``neurons[i]`` of expert ``sources[i]`` (gate row, up row, down column,
    gate/up bias entries; original numbering, same layer). Its down bias stays its own."""

    sources: tuple[int, ...]
    neurons: tuple[int, ...]
    targets: tuple[int, ...]
    weights: tuple[float, ...]

    def to_json(self) -> dict:
        return {"sources": list(self.sources), "neurons": list(self.neurons), "targets": list(self.targets),
                "weights": list(self.weights)}

    @classmethod
    def from_json(cls, data: object, where: str) -> NeuronMix:
        data = _object(data, where)
        mix = cls(_ints(data.get("sources"), f"{where}.sources"), _ints(data.get("neurons"), f"{where}.neurons"),
                  _ints(data.get("targets"), f"{where}.targets"), _floats(data.get("weights"), f"{where}.weights"))
        if not len(mix.sources) == len(mix.neurons) == len(mix.targets) == len(mix.weights):
            raise PlanError(f"{where}: sources, neurons, targets and weights must have one entry each per term")
        return mix


@dataclass(frozen=True)
class RecombineNeurons(Action):
    """Rebuild kept experts from weighted neurons of the layer's experts (DERN, :mod:`moeprune.ops.recombine`);
    experts not listed stay as they are. Keys: original expert numbers (kept experts)."""

    op: ClassVar[str] = "recombine_neurons"
    implemented: ClassVar[bool] = True
    experts: Mapping[int, NeuronMix] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"op": self.op, "experts": {str(e): mix.to_json() for e, mix in sorted(self.experts.items())}}

    @classmethod
    def from_json(cls, data: Mapping, where: str) -> RecombineNeurons:
        raw = _object(data.get("experts"), f"{where}.experts")
        experts = {}
        for key, mix in raw.items():
            if not str(key).isdigit():
                raise PlanError(f"{where}.experts: key {key!r} is not an expert index")
            experts[int(key)] = NeuronMix.from_json(mix, f"{where}.experts[{key}]")
        return cls(dict(sorted(experts.items())))


#: JSON op name -> action class.
ACTIONS: dict[str, type[Action]] = {
    cls.op: cls for cls in (KeepExperts, MergeExperts, SliceNeurons, DropAttentionHeads, SliceChannels, DropLayer,
                            TransformMlpOutput, RecombineNeurons)
}


def action_from_json(data: object, where: str) -> Action:
    """One action from its JSON object; unknown ops list the known ones."""
    data = _object(data, where)
    op = data.get("op")
    if op not in ACTIONS:
        raise PlanError(f"{where}: unknown action {op!r}; known actions: {', '.join(ACTIONS)}")
    return ACTIONS[op].from_json(data, where)
