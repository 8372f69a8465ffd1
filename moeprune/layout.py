"""The one room that knows how each family stores its tensors, on disk and in memory.

Everything else (the sequential engine, the partial loader, the ops and their writer, ``inspect``)
asks this module where a router, a routed expert or a shared expert lives; no other module walks
tensor names. The facts come from ``routers/<family>.toml``:

* ``[disk]``: ``expert_layout = "per_expert"`` (one file per expert and projection, named
  ``expert_prefix`` + ``gate``/``up``/``down``) or ``"fused"`` (3-D tensors, as in memory);
  ``moe_prefix_on_disk``/``moe_prefix_in_memory`` for modules renamed by transformers 5.x (Mixtral's
  ``block_sparse_moe`` -> ``mlp``); ``[disk.renames]`` for single tensors transformers renames when
  it loads them (EXAONE-MoE's ``mlp.e_score_correction_bias`` -> ``mlp.gate.e_score_correction_bias``;
  names relative to the decoder layer, applied after the MoE prefix); for fused layouts stored under
  other names than in memory (GraniteMoE: ``block_sparse_moe.input_linear.weight`` is the in-memory
  ``block_sparse_moe.experts.gate_up_proj``), ``experts_prefix`` (the disk module holding the block)
  and ``gate_up`` / ``down`` (the block's names under it, same layout as in memory unless
  ``gate_up_layout`` says otherwise: Inkling-2's ``w13_weight`` interleaves gate and up rows on disk).
* ``[experts]``: how a fused expert block is laid out (in memory, and on disk when fused):
  ``gate_up = "halves"`` (``gate_up_proj[e] = cat(gate_e, up_e)``) or ``"interleaved"`` (GPT-OSS:
  gate neuron k at column 2k, up neuron k at 2k+1); ``transposed`` (GPT-OSS: ``gate_up_proj`` is
  [E, H, 2I] and ``down_proj`` [E, I, H] instead of [E, 2I, H] and [E, H, I]; so the neuron axis of
  ``gate_up_proj`` is 2 when transposed, else 1, and that of ``down_proj`` is 1 when transposed,
  else 2); ``biases`` (GPT-OSS: ``gate_up_proj_bias`` [E, 2I], ``down_proj_bias`` [E, H]);
  ``gate_up = "none"`` for ungated experts (Nemotron-H: ``up_proj`` [E, I, H], canonical ``up`` and
  ``down`` only); ``identity = true`` (LongCat-Flash: zero-computation experts after the routed ones,
  whose per-expert files hold unused gate/up rows only; never pruned); ``gate_up_name`` / ``down_name``
  (the block's names relative to the experts module when they are not ``gate_up_proj`` / ``down_proj``;
  dotted paths reach a submodule: JetMoE's ``input_linear.weight`` / ``output_linear.weight`` of its ``mlp``).
* ``[disk] router_optional`` (router tensors only some MoE layers have: DeepSeek-V4's correction bias,
  absent from its hash-routed layers) and ``[disk] expert_id_tables`` (tensors whose values are expert
  ids: DeepSeek-V4's ``tid2eid``, remapped and renumbered when experts go,
  :func:`moeprune.routing.renumber_expert_ids`), both relative to the layer.
* ``[disk] model_prefix`` (Nemotron-H: ``backbone.``; ``model.`` in memory) and ``[disk] router_tail``
  (router tensors with rows after the routed experts' that pruning keeps after the kept rows:
  LongCat-Flash's identity experts, Inkling's shared experts).

* ``[attention]``, ``[dense_mlp]``, ``[shared_channels]``: the dense units (:class:`AttentionSpec`,
  :class:`ChannelSpec`): the attention module and its q/k/v/o projections (``kind = "gqa"``, or
  ``"mla"``: head pruning refused), how its q/k norms span the heads, per-head sinks, the config keys
  of the head counts; the dense MLP of non-MoE layers and the shared expert (gate/up/down names and
  the config key of their width). :func:`layer_facts` reads, per decoder layer of a (meta) model,
  which of these units the layer has and their sizes.

One routed expert is seen by the rest of the code in a *canonical* form, whatever the family:
``gate`` and ``up`` [I, H], ``down`` [H, I] (``nn.Linear`` orientation), and when the family has
biases ``gate_bias``, ``up_bias`` [I] and ``down_bias`` [H]. :class:`FusedFormat` converts between
canonical experts and a fused block (``split`` / ``join``); :class:`CheckpointLayout` classifies a
checkpoint's tensors from its headers (no tensor data read) and reads canonical experts or whole
in-memory layers; :func:`model_expert` and :func:`set_expert_block` do the same on a loaded model.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import MoePruneError
from .routing import renumber_expert_ids

logger = logging.getLogger(__name__)

LAYER_PREFIX = "model.layers.{layer}."

#: Canonical projections of one routed expert (``nn.Linear`` orientation).
PROJECTIONS = ("gate", "up", "down")
#: Canonical biases of one routed expert, for families whose experts have biases (GPT-OSS).
BIASES = ("gate_bias", "up_bias", "down_bias")


def layer_prefix(layer: int) -> str:
    """``model.layers.<layer>.``: the prefix of a decoder layer's tensors, on disk and in memory."""
    return LAYER_PREFIX.format(layer=layer)


#: what precedes ``.layers.N`` in the name of a decoder layer's tensor, on disk or in memory: ``model``
#: (Nemotron-H stores ``backbone.layers.N``, Inkling-2 ``model.llm.layers.N``; the multimodal wrappers nest
#: the text decoder, Qwen3.5-MoE's ``model.language_model.layers.N``, Llama 4's
#: ``language_model.model.layers.N``: ``[disk] model_prefix``). A tower's own layers (Llama 4's
#: ``vision_model.model.layers.N``) are no decoder layers.
MODEL_PREFIXES = ("model", "backbone", "model.llm", "model.language_model", "language_model.model")
#: decoder-layer lists under other names, on disk and in memory (``[modules] layers``; DBRX: ``transformer.blocks``)
OTHER_LAYER_LISTS = (("transformer", "blocks"),)
#: every decoder-layer list a tensor name may start with, with the part before the list's own name
LAYER_LISTS = tuple((prefix, f"{prefix}.layers") for prefix in MODEL_PREFIXES) + tuple(
    (head, f"{head}.{layers}") for head, layers in OTHER_LAYER_LISTS)


def split_layer_name(name: str) -> tuple[str, int, str] | None:
    """``(head, layer, rest)`` of a full name inside a decoder layer (``model.language_model.layers.3.mlp.x``
    -> ``("model.language_model", 3, "mlp.x")``; DBRX's ``transformer.blocks.3.x`` -> ``("transformer", 3,
    "x")``), None outside layers."""
    for head, layers in LAYER_LISTS:
        if name.startswith(layers + "."):
            number, dot, rest = name[len(layers) + 1:].partition(".")
            if number.isdigit() and dot:
                return head, int(number), rest
    return None


def layer_of(name: str) -> int | None:
    """Decoder-layer index of a full tensor name (``model.layers.3.x`` -> 3; also ``backbone.layers.3.x``
    on Nemotron-H's disk, ``model.llm.layers.3.x`` on Inkling-2's, ``model.language_model.layers.3.x`` in a
    multimodal checkpoint and DBRX's ``transformer.blocks.3.x``), None outside layers."""
    parts = split_layer_name(name)
    return parts[1] if parts is not None else None


def decoder_layer_list(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM: ``model.model.layers``, or a list ``[modules] layers`` names
    elsewhere (DBRX: ``model.transformer.blocks``)."""
    body = getattr(model, "model", None)
    if body is not None and hasattr(body, "layers"):
        return body.layers
    for head, layers in OTHER_LAYER_LISTS:
        found = getattr(getattr(model, head, None), layers, None)
        if isinstance(found, nn.ModuleList):
            return found
    raise MoePruneError(f"{type(model).__name__} has no decoder layers at model.layers or "
                        f"{', '.join('.'.join(pair) for pair in OTHER_LAYER_LISTS)}")


def model_body(model: nn.Module) -> nn.Module:
    """The model body holding embeddings, decoder layers and final norm (``model.model``; DBRX:
    ``model.transformer``, its ``base_model_prefix``)."""
    body = getattr(model, "model", None)
    return body if isinstance(body, nn.Module) else model.base_model


# --------------------------------------------------------------------------------------------------
# fused expert blocks


@dataclass(frozen=True)
class FusedFormat:
    """How one fused expert block stores its E experts (tensor names relative to the experts module).

    Canonical expert e (``gate``/``up`` [I, H], ``down`` [H, I], biases [I] / [H]) and the block:

    * halves, not transposed: ``gate_up[e] = cat(gate, up)`` [2I, H], ``down[e] = down`` [H, I];
    * interleaved: rows 2k and 2k+1 of the (untransposed) ``gate_up[e]`` are gate and up neuron k;
    * transposed: ``gate_up[e]`` and ``down[e]`` are stored transposed ([H, 2I], [I, H]);
    * biases: ``gate_up_bias[e]`` [2I] (gate/up split as the weight's rows), ``down_bias[e]`` [H].
    """

    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    gate_up_layout: str = "halves"
    transposed: bool = False
    gate_up_bias: str | None = None
    down_bias: str | None = None

    def __post_init__(self) -> None:
        if self.gate_up_layout not in ("halves", "interleaved", "none"):
            raise MoePruneError(f"gate_up layout {self.gate_up_layout!r} is not 'halves', 'interleaved' or 'none'; fix routers/*.toml")
        if self.gate_up_layout == "none" and self.gate_up_bias is not None:
            raise MoePruneError("ungated experts with biases are not supported; fix routers/*.toml")

    @property
    def gated(self) -> bool:
        """False for ungated experts (Nemotron-H: ``down(act(up(x)))``; ``gate_up = "none"``): the
        ``gate_up`` block then holds the up rows only ([E, I, H]) and experts have no canonical ``gate``."""
        return self.gate_up_layout != "none"

    @property
    def has_biases(self) -> bool:
        return self.gate_up_bias is not None

    @property
    def projections(self) -> tuple[str, ...]:
        """Canonical tensors of one expert in this format."""
        if not self.gated:
            return ("up", "down")
        return PROJECTIONS + (BIASES if self.has_biases else ())

    @property
    def names(self) -> tuple[str, ...]:
        """The block's tensor names (weights first, then biases)."""
        return (self.gate_up, self.down) + ((self.gate_up_bias, self.down_bias) if self.has_biases else ())

    @property
    def gate_up_neuron_axis(self) -> int:
        """Axis of the 3-D ``gate_up`` tensor that runs over gate/up neurons (2I entries)."""
        return 2 if self.transposed else 1

    @property
    def down_neuron_axis(self) -> int:
        """Axis of the 3-D ``down`` tensor that runs over neurons (I entries)."""
        return 1 if self.transposed else 2

    #: the experts are stacked along a leading expert axis (FlatFormat: flattened into the rows)
    flat = False

    def block_rows(self, experts: Sequence[int], num_experts: int, rows: int) -> list[int]:
        """Rows (axis 0) of a block tensor of ``rows`` rows holding ``experts``: the experts themselves."""
        return list(experts)

    def expert_slice(self, block: torch.Tensor, expert: int, num_experts: int | None = None) -> torch.Tensor:
        """Expert ``expert``'s slice of block tensor ``block`` (a view)."""
        return block[expert]

    def block_of(self, proj: str) -> str:
        """The block tensor holding canonical ``proj``."""
        return {"gate": self.gate_up, "up": self.gate_up, "down": self.down, "gate_bias": self.gate_up_bias,
                "up_bias": self.gate_up_bias, "down_bias": self.down_bias}[proj]

    def parts(self, name: str) -> tuple[str, ...]:
        """Canonical projections that block tensor ``name`` holds."""
        table = {self.gate_up: ("gate", "up") if self.gated else ("up",), self.down: ("down",)}
        if self.has_biases:
            table.update({self.gate_up_bias: ("gate_bias", "up_bias"), self.down_bias: ("down_bias",)})
        return table[name]

    def gate_up_positions(self, proj: str, neurons: Sequence[int], width: int) -> list[int]:
        """Positions along the gate_up neuron axis of gate (or up) neurons ``neurons`` of a width-I expert."""
        if proj not in ("gate", "up") or (not self.gated and proj != "up"):
            raise ValueError(f"{proj!r} is not {'gate or up' if self.gated else 'up (ungated experts)'}")
        if not self.gated:
            return list(neurons)
        if self.gate_up_layout == "interleaved":
            return [2 * k + (proj == "up") for k in neurons]
        return [k + (width if proj == "up" else 0) for k in neurons]

    # -- one expert <-> the block ----------------------------------------------------------------
    def _untransposed(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.transpose(-1, -2) if self.transposed else tensor

    def _pair(self, fused_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate, up) from the untransposed gate/up rows of one expert (2-D weight or 1-D bias)."""
        if self.gate_up_layout == "interleaved":
            return fused_rows[0::2], fused_rows[1::2]
        half = fused_rows.shape[0] // 2
        return fused_rows[:half], fused_rows[half:]

    def _unpair(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.gate_up_layout == "interleaved":
            return torch.stack([gate, up], dim=1).reshape(2 * gate.shape[0], *gate.shape[1:])
        return torch.cat([gate, up], dim=0)

    def split(self, expert_tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Canonical tensors of ONE expert from its slices of the block (``{name: block[e]}``)."""
        if not self.gated:
            return {"up": self._untransposed(expert_tensors[self.gate_up]), "down": self._untransposed(expert_tensors[self.down])}
        gate, up = self._pair(self._untransposed(expert_tensors[self.gate_up]))
        out = {"gate": gate, "up": up, "down": self._untransposed(expert_tensors[self.down])}
        if self.has_biases:
            out["gate_bias"], out["up_bias"] = self._pair(expert_tensors[self.gate_up_bias])
            out["down_bias"] = expert_tensors[self.down_bias]
        return out

    def fill(self, blocks: Mapping[str, torch.Tensor], index: int, expert: Mapping[str, torch.Tensor]) -> None:
        """Copy canonical ``expert`` into slot ``index`` of preallocated ``blocks`` (no temporaries:
        :meth:`split` of a slot returns views)."""
        for proj, view in self.split({name: blocks[name][index] for name in self.names}).items():
            view.copy_(expert[proj])

    def fill_gate_up(self, blocks: Mapping[str, torch.Tensor], index: int, expert: Mapping[str, torch.Tensor]) -> None:
        """Copy the gate and up rows of ``expert`` into slot ``index`` of the ``gate_up`` block only (an
        identity expert's unused rows: the ``down`` block has no slot for it)."""
        gate, up = self._pair(self._untransposed(blocks[self.gate_up][index]))
        gate.copy_(expert["gate"])
        up.copy_(expert["up"])

    def join_one(self, name: str, experts: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
        """Block tensor ``name`` [E', ...] holding the canonical ``experts`` in order (contiguous)."""
        if name == self.gate_up:
            rows = [self._untransposed(self._unpair(e["gate"], e["up"]) if self.gated else e["up"]) for e in experts]
        elif name == self.down:  # identity experts (LongCat-Flash) have gate/up rows only
            rows = [self._untransposed(e["down"]) for e in experts if "down" in e]
        elif self.has_biases and name == self.gate_up_bias:
            rows = [self._unpair(e["gate_bias"], e["up_bias"]) for e in experts]
        elif self.has_biases and name == self.down_bias:
            rows = [e["down_bias"] for e in experts]
        else:
            raise KeyError(f"{name!r} is not a tensor of this expert block ({', '.join(self.names)})")
        return torch.stack(rows).contiguous()

    def block_as(self, name: str, block: torch.Tensor, target: FusedFormat) -> torch.Tensor:
        """Block tensor ``name`` of this format (any number of experts, expert axis first) as ``target``
        stores it: only the order of the gate/up rows may differ (Inkling-2: interleaved on disk, halves
        in memory, as transformers' ``Interleave`` converts them on load)."""
        if name not in (self.gate_up, self.gate_up_bias) or self.gate_up_layout == target.gate_up_layout:
            return block
        if not (self.gated and target.gated) or self.transposed != target.transposed:
            raise MoePruneError(f"cannot convert a {self.gate_up_layout} expert block to {target.gate_up_layout}")
        axis = self.gate_up_neuron_axis if name == self.gate_up else 1
        gate, up = self._pair(block.movedim(axis, 0))
        return target._unpair(gate, up).movedim(0, axis).contiguous()

    def join(self, experts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Every block tensor for the canonical ``experts``."""
        return {name: self.join_one(name, experts) for name in self.names}

    def canonical_shape(self, name_shapes: Mapping[str, tuple[int, ...]], proj: str) -> tuple[int, ...]:
        """Shape of canonical ``proj`` of one expert, from the block tensors' shapes (expert axis first)."""
        gate_up = name_shapes[self.gate_up]
        two_i, hidden = (gate_up[2], gate_up[1]) if self.transposed else (gate_up[1], gate_up[2])
        inter = two_i // 2 if self.gated else two_i
        return {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter),
                "gate_bias": (inter,), "up_bias": (inter,), "down_bias": (hidden,)}[proj]

    def block_shape(self, name: str, num_experts: int, inter: int, hidden: int) -> tuple[int, ...]:
        """Shape of block tensor ``name`` for ``num_experts`` experts of width ``inter``."""
        if name == self.gate_up:
            rows = 2 * inter if self.gated else inter
            return (num_experts, hidden, rows) if self.transposed else (num_experts, rows, hidden)
        if name == self.down:
            return (num_experts, inter, hidden) if self.transposed else (num_experts, hidden, inter)
        if name == self.gate_up_bias:
            return (num_experts, 2 * inter)
        if name == self.down_bias:
            return (num_experts, hidden)
        raise KeyError(name)


@dataclass(frozen=True)
class FlatFormat:
    """Experts flattened into the rows of one matrix per projection (DBRX: ``mlp.w1``, ``mlp.v1`` and
    ``mlp.w2``, each [E * I, H]; ``[experts] flat``): expert e is the block of rows ``e*I .. (e+1)*I - 1``
    of each, in memory as on disk. Canonical expert e: ``gate`` = its w1 rows, ``up`` = its v1 rows
    [I, H], ``down`` = its w2 rows transposed [H, I] (the model computes ``(act(x w1_e^T) * x v1_e^T) w2_e``).
    Keeping or dropping experts selects row blocks; names are relative to the experts module."""

    gate: str = "mlp.w1"
    up: str = "mlp.v1"
    down: str = "mlp.w2"

    flat = True
    gated = True
    has_biases = False
    gate_up_layout = "flat"
    gate_up_bias = None
    down_bias = None

    @property
    def projections(self) -> tuple[str, ...]:
        return PROJECTIONS

    @property
    def names(self) -> tuple[str, ...]:
        return (self.gate, self.up, self.down)

    def block_as(self, name: str, block: torch.Tensor, target) -> torch.Tensor:
        """Rows of block tensor ``name`` as ``target`` stores them: flat experts are the same in memory."""
        return block

    def parts(self, name: str) -> tuple[str, ...]:
        return ({self.gate: "gate", self.up: "up", self.down: "down"}[name],)

    def block_of(self, proj: str) -> str:
        return {"gate": self.gate, "up": self.up, "down": self.down}[proj]

    def block_rows(self, experts: Sequence[int], num_experts: int, rows: int) -> list[int]:
        """Rows of a [E * I, H] block holding ``experts`` (I = rows / E rows each, in order)."""
        width = rows // num_experts
        return [e * width + i for e in experts for i in range(width)]

    def expert_slice(self, block: torch.Tensor, expert: int, num_experts: int | None = None) -> torch.Tensor:
        """Expert ``expert``'s [I, H] rows of a [E * I, H] block of ``num_experts`` experts (a view)."""
        return block.view(num_experts, -1, block.shape[-1])[expert]

    def split(self, expert_tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Canonical tensors of ONE expert from its [I, H] row blocks (``{name: rows}``)."""
        return {"gate": expert_tensors[self.gate], "up": expert_tensors[self.up], "down": expert_tensors[self.down].T}

    def fill(self, blocks: Mapping[str, torch.Tensor], index: int, expert: Mapping[str, torch.Tensor]) -> None:
        width = expert["gate"].shape[0]
        rows = {name: blocks[name][index * width:(index + 1) * width] for name in self.names}
        for proj, view in self.split(rows).items():
            view.copy_(expert[proj])

    def join_one(self, name: str, experts: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
        """Block tensor ``name`` [E' * I, H] holding the canonical ``experts`` in order."""
        if name == self.down:
            return torch.cat([e["down"].T for e in experts]).contiguous()
        proj = self.parts(name)[0]
        return torch.cat([e[proj] for e in experts]).contiguous()

    def join(self, experts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {name: self.join_one(name, experts) for name in self.names}

    def canonical_shape(self, name_shapes: Mapping[str, tuple[int, ...]], proj: str) -> tuple[int, ...]:
        """Shape of canonical ``proj`` from the per-expert shapes (E, I, H) of the blocks."""
        _, inter, hidden = name_shapes[self.gate]
        return {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}[proj]

    def block_shape(self, name: str, num_experts: int, inter: int, hidden: int) -> tuple[int, ...]:
        if name not in self.names:
            raise KeyError(name)
        return (num_experts * inter, hidden)


@dataclass(frozen=True)
class PerExpertFormat:
    """Experts stored one tensor per expert and projection, canonical orientation (names relative
    to the decoder layer; ``prefix`` holds ``{expert}``)."""

    prefix: str
    files: Mapping[str, str]  # canonical projection -> name after the prefix
    layer_base: str = LAYER_PREFIX  # a decoder layer's prefix on disk (Nemotron-H: backbone.layers.{layer}.)

    @property
    def projections(self) -> tuple[str, ...]:
        return tuple(self.files)

    def name(self, layer: int, expert: int, proj: str) -> str:
        return self.layer_base.format(layer=layer) + self.prefix.format(expert=expert) + self.files[proj]

    def parse(self, layer: int, name: str) -> tuple[int, str] | None:
        """(expert, projection) of a full tensor name of this layer, or None if it is no expert file."""
        head, tail = (self.layer_base.format(layer=layer) + self.prefix).split("{expert}")
        if not name.startswith(head):
            return None
        number, found, rest = name[len(head):].partition(tail)
        if not found or not number.isdigit():
            return None
        for proj, file in self.files.items():
            if rest == file:
                return int(number), proj
        return None


# --------------------------------------------------------------------------------------------------
# dense (non-expert) units: attention heads, dense MLP and shared-expert channels

#: ``qk_norm`` values: no q/k norms; norms over head_dim shared by every head (untouched by head
#: pruning); norms over the whole projection (OLMoE: every head's normalisation depends on the others).
QK_NORMS = ("none", "per_head", "across_heads")


@dataclass(frozen=True)
class AttentionSpec:
    """``[attention]`` of a routers/ spec: the self-attention module of a decoder layer.

    ``kind`` "gqa": q/k/v/o projections (module names relative to ``module``), query head h of a layer
    with H heads and KV heads reads KV group ``h // (H / KV)``; ``q_rows_per_head`` q rows blocks of
    head_dim per head (Qwen3-Next: 2, the query then its output gate); ``sinks`` a per-head parameter.
    ``kind`` "mla": multi-head latent attention (DeepSeek-V2/V3): declared, head pruning refused.
    ``head_dim_v4`` "key" when transformers 4.x reads the head size from ``head_dim_key`` too, "derived"
    when 4.x computes it as hidden_size / heads (a head-pruned output then loads in transformers 5 only).
    """

    kind: str
    module: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    qk_norm: str = "none"
    q_rows_per_head: int = 1
    sinks: str | None = None
    heads_key: str = "num_attention_heads"
    kv_heads_key: str = "num_key_value_heads"
    head_dim_key: str = "head_dim"
    head_dim_v4: str = "key"

    @classmethod
    def from_spec(cls, family: str, spec: Mapping) -> AttentionSpec:
        kind = spec.get("kind")
        if kind not in ("gqa", "mla"):
            raise MoePruneError(f"routers/{family}.toml: [attention] kind must be 'gqa' or 'mla', got {kind!r}")
        if spec.get("qk_norm", "none") not in QK_NORMS:
            raise MoePruneError(f"routers/{family}.toml: [attention] qk_norm must be one of {', '.join(QK_NORMS)}")
        if spec.get("head_dim_v4", "key") not in ("key", "derived"):
            raise MoePruneError(f"routers/{family}.toml: [attention] head_dim_v4 must be 'key' or 'derived'")
        return cls(**{k: v for k, v in spec.items()})

    def name(self, layer: int, proj: str, param: str = "weight") -> str:
        """Full name of ``param`` of projection ``proj`` (q, k, v, o) of layer ``layer`` (``sinks``: the parameter)."""
        if proj == "sinks":
            return f"{layer_prefix(layer)}{self.module}.{self.sinks}"
        return f"{layer_prefix(layer)}{self.module}.{getattr(self, proj)}.{param}"


@dataclass(frozen=True)
class ChannelSpec:
    """``[dense_mlp]`` or ``[shared_channels]``: a gated MLP (``down(act(gate(x)) * up(x))``) whose
    intermediate channel c is gate row c, up row c and down column c. ``width_key`` is the config key
    of its width ("" when no key holds it alone, e.g. DeepSeek's shared experts)."""

    module: str
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    width_key: str = ""

    def name(self, layer: int, proj: str, param: str = "weight") -> str:
        """Full name of ``param`` of projection ``proj`` (gate, up, down) of layer ``layer``."""
        return f"{layer_prefix(layer)}{self.module}.{getattr(self, proj)}.{param}"


@dataclass(frozen=True)
class AttentionFacts:
    """One layer's attention as built: heads, KV heads, head_dim and which projections have biases."""

    heads: int
    kv_heads: int
    head_dim: int
    q_rows_per_head: int
    biases: frozenset[str]  # of "q", "k", "v", "o"
    sinks: bool

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.kv_heads

    def group_of(self, head: int) -> int:
        """KV group read by query head ``head`` (transformers' repeat_kv repeats each KV head in turn)."""
        return head // self.heads_per_group


@dataclass(frozen=True)
class LayerFacts:
    """The dense units of one decoder layer of a built model (None: the layer has no such unit)."""

    layer: int
    attention: AttentionFacts | None
    dense_width: int | None
    shared_width: int | None
    #: parameters of the whole layer (its routed experts included)
    parameters: int
    hidden_size: int
    #: output projections (o_proj, dense and shared down_proj; paths relative to the layer) that have a bias
    output_biases: frozenset[str] = frozenset()
    #: routed experts of the layer (0: not a MoE layer)
    experts: int = 0


def _linear(layer_module: nn.Module, path: str) -> nn.Module | None:
    try:
        return layer_module.get_submodule(path)
    except AttributeError:
        return None


def _attention_facts(spec: AttentionSpec, layer_module: nn.Module, config) -> AttentionFacts | None:
    q = _linear(layer_module, f"{spec.module}.{spec.q}")
    if spec.kind != "gqa" or q is None:
        return None
    k, o = _linear(layer_module, f"{spec.module}.{spec.k}"), _linear(layer_module, f"{spec.module}.{spec.o}")
    head_dim = getattr(layer_module.get_submodule(spec.module), "head_dim", None) or getattr(config, spec.head_dim_key, None)
    if not head_dim:
        head_dim = config.hidden_size // getattr(config, spec.heads_key)
    heads = o.weight.shape[1] // head_dim
    biases = frozenset(p for p in ("q", "k", "v", "o")
                       if getattr(_linear(layer_module, f"{spec.module}.{getattr(spec, p)}"), "bias", None) is not None)
    return AttentionFacts(heads, k.weight.shape[0] // head_dim, int(head_dim), spec.q_rows_per_head, biases,
                          spec.sinks is not None and hasattr(layer_module.get_submodule(spec.module), spec.sinks))


def _width(spec: ChannelSpec | None, layer_module: nn.Module, module: str | None = None) -> int | None:
    if spec is None:
        return None
    gate = _linear(layer_module, f"{module or spec.module}.{spec.gate}")
    return None if gate is None or not hasattr(gate, "weight") else int(gate.weight.shape[0])


def layer_facts(family, model: nn.Module) -> dict[int, LayerFacts]:
    """Per decoder layer of ``model`` (a meta skeleton is enough): its attention heads, dense-MLP and
    shared-expert widths, read from the modules as built (so hybrid layers without attention, dense
    first layers and per-layer shapes of a ``moeprune.load`` model are all seen as they are)."""
    layout = family_layout(family)
    outputs = [f"{spec.module}.{getattr(spec, proj)}" for spec, proj in
               ((layout.attention, "o"), (layout.dense_mlp, "down"), (layout.shared_channels, "down")) if spec is not None]
    out = {}
    for index, layer_module in enumerate(decoder_layer_list(model)):
        attention = _attention_facts(layout.attention, layer_module, model.config) if layout.attention else None
        shared = layout.shared_channels.module if layout.shared_channels else None
        biased = frozenset(path for path in outputs if getattr(_linear(layer_module, path), "bias", None) is not None)
        experts = _linear(layer_module, layout.experts_module)
        if layout.memory.flat:
            count = int(getattr(experts, "num_experts", 0)) if experts is not None else 0
        else:
            block = module_attribute(experts, layout.memory.gate_up) if experts is not None else None
            count = block.shape[0] if block is not None else 0
        out[index] = LayerFacts(
            index, attention, _width(layout.dense_mlp, layer_module),
            _width(layout.shared_channels, layer_module, shared) if shared else None,
            sum(p.numel() for p in layer_module.parameters()), int(model.config.hidden_size), biased, int(count),
        )
    return out


# --------------------------------------------------------------------------------------------------
# one family's layout


@dataclass(frozen=True)
class FamilyLayout:
    """Disk and memory layout of one family, parsed from its routers/ spec."""

    family: str
    memory: FusedFormat | FlatFormat
    disk: FusedFormat | FlatFormat | PerExpertFormat
    router_modules: str  # memory path of the router, relative to the layer
    experts_module: str  # memory path of the experts module, relative to the layer
    shared_modules: tuple[str, ...]
    disk_router: tuple[str, ...]  # router tensor names on disk, relative to the layer
    moe_prefix_on_disk: str = ""
    moe_prefix_in_memory: str = ""
    #: on-disk name -> in-memory name of single tensors, relative to the decoder layer
    renames: tuple[tuple[str, str], ...] = ()
    #: fused on disk under another module than in memory: that module's path (relative to the layer)
    disk_experts_module: str = ""
    #: on-disk router tensors (relative to the layer) whose expert axis is not 0 (ERNIE-4.5's [1, E]
    #: correction bias ``mlp.moe_statics.e_score_correction_bias``: axis 1), from ``[disk] router_axes``
    router_axes: tuple[tuple[str, int], ...] = ()
    #: ``[disk] conversions = "transformers"``: tensors outside the routers and routed experts are read
    #: into memory through transformers' own checkpoint conversion mapping (:class:`TransformersConversions`)
    transformers_conversions: bool = False
    #: dense units (``[attention]``, ``[dense_mlp]``, ``[shared_channels]``); None where the spec lacks them
    attention: AttentionSpec | None = None
    dense_mlp: ChannelSpec | None = None
    shared_channels: ChannelSpec | None = None
    #: zero-computation (identity) experts follow the routed ones (LongCat-Flash): on disk their files
    #: hold gate/up rows only; they are never pruned (``[experts] identity``)
    identity_experts: bool = False
    #: the model's first name part on disk (``[disk] model_prefix``; Nemotron-H: ``backbone.``), ``model.`` in memory
    model_prefix: str = "model."
    #: router tensors (on-disk names relative to the layer) holding rows after the routed experts' that
    #: pruning keeps (``[disk] router_tail``: LongCat-Flash's identity experts, Inkling's shared experts)
    router_tail: tuple[str, ...] = ()
    #: in-memory path of the decoder-layer list (``[modules] layers``; DBRX: ``transformer.blocks``, the
    #: same on disk); ``model.layers`` for every other family
    layers_path: str = "model.layers"
    #: router tensors (on-disk names relative to the layer) only some MoE layers have (``[disk] router_optional``)
    router_optional: tuple[str, ...] = ()
    #: tensors (on-disk names relative to the layer) whose values are expert ids (``[disk] expert_id_tables``)
    expert_id_tables: tuple[str, ...] = ()
    #: what precedes ``lm_head.`` on disk (``[disk] head_prefix``; Llama 4's multimodal checkpoints:
    #: ``language_model.``), nothing in memory
    head_prefix: str = ""

    @classmethod
    def from_spec(cls, spec: dict) -> FamilyLayout:
        experts = spec.get("experts", {})
        biases = bool(experts.get("biases", False))
        memory: FusedFormat | FlatFormat = FlatFormat(**experts["flat"]) if "flat" in experts else FusedFormat(
            # [experts] gate_up_name / down_name: the block under other names (JetMoE's mlp.input_linear.weight)
            gate_up=experts.get("gate_up_name", "up_proj" if experts.get("gate_up") == "none" else "gate_up_proj"),
            down=experts.get("down_name", "down_proj"),
            gate_up_layout=experts.get("gate_up", "halves"),
            transposed=bool(experts.get("transposed", False)),
            gate_up_bias="gate_up_proj_bias" if biases else None,
            down_bias="down_proj_bias" if biases else None,
        )
        disk_spec = spec["disk"]
        if disk_spec["expert_layout"] == "per_expert":
            files = {proj: disk_spec[proj] for proj in PROJECTIONS + BIASES if proj in disk_spec}
            disk: FusedFormat | PerExpertFormat = PerExpertFormat(
                disk_spec["expert_prefix"], files, disk_spec.get("model_prefix", "model.") + "layers.{layer}.")
        elif disk_spec["expert_layout"] == "fused":
            disk = memory
            if "gate_up" in disk_spec and not memory.flat:  # the same block under other names on disk
                disk = FusedFormat(
                    gate_up=disk_spec["gate_up"], down=disk_spec["down"],
                    gate_up_layout=disk_spec.get("gate_up_layout", memory.gate_up_layout),
                    transposed=memory.transposed, gate_up_bias=disk_spec.get("gate_up_bias"),
                    down_bias=disk_spec.get("down_bias"),
                )
                if disk.has_biases != memory.has_biases:
                    raise MoePruneError(f"routers/{spec['family']}.toml: [disk] names biases iff [experts] has them")
        else:
            raise MoePruneError(f"routers/{spec['family']}.toml: unknown expert_layout {disk_spec['expert_layout']!r}")
        return cls(
            family=spec["family"],
            memory=memory,
            disk=disk,
            router_modules=spec["modules"]["router"],
            experts_module=spec["modules"]["experts"],
            shared_modules=tuple(spec["modules"].get("shared", [])),
            disk_router=tuple(disk_spec["router"]),
            moe_prefix_on_disk=disk_spec.get("moe_prefix_on_disk", ""),
            moe_prefix_in_memory=disk_spec.get("moe_prefix_in_memory", ""),
            renames=tuple(disk_spec.get("renames", {}).items()),
            disk_experts_module=disk_spec.get("experts_prefix", "").rstrip("."),
            transformers_conversions=_conversions_key(spec) == "transformers",
            router_axes=tuple((name, int(axis)) for name, axis in disk_spec.get("router_axes", {}).items()),
            attention=AttentionSpec.from_spec(spec["family"], spec["attention"]) if "attention" in spec else None,
            dense_mlp=ChannelSpec(**spec["dense_mlp"]) if "dense_mlp" in spec else None,
            shared_channels=_shared_channels(spec),
            identity_experts=bool(experts.get("identity", False)),
            model_prefix=disk_spec.get("model_prefix", "model."),
            router_tail=tuple(disk_spec.get("router_tail", ())),
            layers_path=spec["modules"].get("layers", "model.layers"),
            router_optional=tuple(disk_spec.get("router_optional", ())),
            expert_id_tables=tuple(disk_spec.get("expert_id_tables", ())),
            head_prefix=disk_spec.get("head_prefix", ""),
        )

    # -- names -----------------------------------------------------------------------------------
    @property
    def per_expert_on_disk(self) -> bool:
        return isinstance(self.disk, PerExpertFormat)

    @property
    def projections(self) -> tuple[str, ...]:
        """Canonical tensors of one routed expert of this family."""
        return self.memory.projections

    def memory_name(self, disk_name: str) -> str:
        """In-memory name of an on-disk tensor name (full or relative to the layer; only the MoE
        module may be renamed)."""
        if self.model_prefix != "model." and disk_name.startswith(self.model_prefix):  # Nemotron-H: backbone.
            disk_name = "model." + disk_name[len(self.model_prefix):]
        elif self.head_prefix and disk_name.startswith(self.head_prefix + "lm_head."):  # Llama 4: language_model.lm_head
            disk_name = disk_name[len(self.head_prefix):]
        layer = layer_of(disk_name)
        prefix = self.memory_layer_prefix(layer) if layer is not None else ""
        relative = disk_name[len(prefix):]
        if self.moe_prefix_on_disk and relative.startswith(self.moe_prefix_on_disk + "."):
            relative = self.moe_prefix_in_memory + relative[len(self.moe_prefix_on_disk):]
        relative = dict(self.renames).get(relative, relative)
        if self.disk_experts_module and relative.startswith(self.disk_experts_module + "."):
            block = relative[len(self.disk_experts_module) + 1:]
            if block in self.disk.names:
                relative = self.experts_module + "." + self.memory_block_name(block)
        return prefix + relative

    def memory_block_name(self, disk_block: str) -> str:
        """In-memory name of a fused block tensor stored as ``disk_block`` (relative to the experts module)."""
        return self.memory.names[self.disk.names.index(disk_block)]

    def disk_name(self, memory_name: str) -> str:
        """The on-disk name of a tensor outside the MoE modules (embeddings, norms) from its in-memory name."""
        if self.model_prefix != "model." and memory_name.startswith("model."):
            return self.model_prefix + memory_name[len("model."):]
        if self.head_prefix and memory_name.startswith("lm_head."):
            return self.head_prefix + memory_name
        return memory_name

    def is_text_tensor(self, disk_name: str) -> bool:
        """True for an on-disk tensor of the (text) causal LM, False for a multimodal tower's (a vision or
        audio encoder, a projector: stored beside the text decoder, copied through untouched)."""
        return disk_name.startswith(self.model_prefix) or disk_name.startswith(self.head_prefix + "lm_head.")

    def disk_layer_prefix(self, layer: int) -> str:
        """The prefix of a decoder layer's tensors on disk (``model.layers.3.``; Nemotron-H: ``backbone.layers.3.``;
        DBRX: ``transformer.blocks.3.``, as in memory)."""
        if self.layers_path != "model.layers":
            return f"{self.layers_path}.{layer}."
        return self.model_prefix + f"layers.{layer}."

    def memory_layer_prefix(self, layer: int) -> str:
        """The prefix of a decoder layer's tensors in memory (``model.layers.3.``; DBRX: ``transformer.blocks.3.``)."""
        return f"{self.layers_path}.{layer}."

    def router_tail_keys(self, layer: int) -> list[str]:
        """On-disk names of the router tensors with rows after the routed experts' (``[disk] router_tail``)."""
        return [self.disk_layer_prefix(layer) + name for name in self.router_tail]

    def router_keys(self, layer: int) -> list[str]:
        """On-disk names of a MoE layer's router tensors (weight, bias, correction bias)."""
        return [self.disk_layer_prefix(layer) + name for name in self.disk_router]

    def optional_router_keys(self, layer: int) -> list[str]:
        """On-disk names of the router tensors only some MoE layers have (``[disk] router_optional``)."""
        return [self.disk_layer_prefix(layer) + name for name in self.router_optional]

    def expert_id_table_keys(self, layer: int) -> list[str]:
        """On-disk names of a MoE layer's possible expert-id tables (``[disk] expert_id_tables``)."""
        return [self.disk_layer_prefix(layer) + name for name in self.expert_id_tables]

    def router_axis(self, disk_name: str) -> int:
        """The expert axis of a router tensor (full on-disk name or relative to the layer): 0 unless
        ``[disk] router_axes`` says otherwise. The same axis holds the experts in memory."""
        parts = split_layer_name(disk_name)
        relative = parts[2] if parts is not None else disk_name
        return dict(self.router_axes).get(relative, 0)

    def fused_keys(self, layer: int) -> list[str]:
        """On-disk names of a fused expert block ([] for per-expert layouts)."""
        if self.per_expert_on_disk:
            return []
        return [self.disk_experts_prefix(layer) + name for name in self.disk.names]

    def disk_experts_prefix(self, layer: int) -> str:
        """On-disk prefix of the experts module of a layer (``model.layers.3.mlp.experts.``)."""
        if self.disk_experts_module:
            return self.disk_layer_prefix(layer) + self.disk_experts_module + "."
        path = self.experts_module
        if self.moe_prefix_on_disk and path.startswith(self.moe_prefix_in_memory + "."):
            path = self.moe_prefix_on_disk + path[len(self.moe_prefix_in_memory):]
        return self.disk_layer_prefix(layer) + path + "."

    def memory_experts_prefix(self, layer: int) -> str:
        return self.memory_layer_prefix(layer) + self.experts_module + "."

    def expert_file(self, layer: int, expert: int, proj: str) -> str:
        """On-disk name of one projection of one expert (per-expert layouts only)."""
        if not self.per_expert_on_disk:
            raise MoePruneError(f"{self.family} stores its experts fused on disk; there is no file per expert")
        return self.disk.name(layer, expert, proj)

    def shared_expert_prefixes(self, layer: int) -> list[str]:
        """In-memory (= on-disk) prefixes of a layer's shared experts."""
        return [self.memory_layer_prefix(layer) + path + "." for path in self.shared_modules]


@functools.cache
def _layout_of(family_name: str) -> FamilyLayout:
    from .arch import known_families

    return FamilyLayout.from_spec(known_families()[family_name].spec)


def family_layout(family) -> FamilyLayout:
    """The :class:`FamilyLayout` of a :class:`~moeprune.arch.Family` (or family name), parsed once."""
    return _layout_of(family if isinstance(family, str) else family.name)


def _conversions_key(spec: dict) -> str:
    value = spec["disk"].get("conversions", "renames")
    if value not in ("renames", "transformers"):
        raise MoePruneError(f"routers/{spec['family']}.toml: [disk] conversions must be 'renames' or 'transformers', got {value!r}")
    return value


def _shared_channels(spec: dict) -> ChannelSpec | None:
    """``[shared_channels]`` on the one shared-expert module of ``[modules] shared``."""
    if "shared_channels" not in spec:
        return None
    modules = spec["modules"].get("shared", [])
    if len(modules) != 1:
        raise MoePruneError(f"routers/{spec['family']}.toml: [shared_channels] needs exactly one [modules] shared path")
    return ChannelSpec(module=modules[0], **spec["shared_channels"])


# --------------------------------------------------------------------------------------------------
# transformers' own checkpoint conversions (the tensors outside the routers and routed experts)


@dataclass
class ConvertedGroup:
    """In-memory tensors made from on-disk tensors when a checkpoint is loaded.

    ``first`` is the in-memory name the group is filed under (a WeightConverter's first target, or the
    renamed tensor); ``sources`` the on-disk names with the converter's source pattern each matched, in
    the order transformers collects them; ``converter`` the transformers ``WeightConverter`` whose
    operations (Concatenate, Split, Chunk, ...) make the targets (None: one tensor renamed).
    """

    first: str
    sources: list[tuple[str, str]]
    converter: object | None = None

    @property
    def targets(self) -> list[str]:
        """The in-memory names this group fills."""
        if self.converter is None:
            return [self.first]
        patterns = self.converter.target_patterns
        return [self.first.replace(patterns[0], pattern, 1) for pattern in patterns]

    @property
    def disk_names(self) -> list[str]:
        return [name for name, _ in self.sources]


class TransformersConversions:
    """transformers' checkpoint conversion mapping of one model (``transformers.conversion_mapping``:
    ``WeightRenaming`` and ``WeightConverter`` with Concatenate / Split / Chunk operations), applied to
    on-disk names and tensors exactly as ``from_pretrained`` applies it (the same key renaming, grouping
    and operations; transformers reverses it in ``save_pretrained``).

    A family opts in with ``[disk] conversions = "transformers"`` for the tensors outside its routers and
    routed experts (Kimi-Linear's q/k/v short convolutions concatenated on load, Lara-mini's fused
    Gated DeltaNet ``in_proj`` split on load, Sarvam-MoE's ``query_key_value`` split into q/k/v, renamed
    embeddings): those are copied through untouched when experts are pruned, and read into memory
    here. ``model`` is a meta skeleton (the Split operation sizes its pieces by the model's parameters).
    """

    def __init__(self, model: nn.Module) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        mapping = get_model_conversion_mapping(model)  # as from_pretrained calls it (no key mapping, no quantizer)
        self.model = model
        self.renamings = [entry for entry in mapping if isinstance(entry, WeightRenaming)]
        self.converters = [entry for entry in mapping if isinstance(entry, WeightConverter)]
        self.by_pattern = {pattern: converter for converter in self.converters for pattern in converter.source_patterns}
        self.memory_names = dict.fromkeys(model.state_dict().keys(), True)  # transformers looks names up with .get
        self._renamed: dict[str, tuple[str, str | None]] = {}  # each on-disk name is renamed once (~0.2 ms each)

    def memory_name(self, disk_name: str) -> tuple[str, str | None]:
        """(in-memory name, matched converter source pattern or None) of an on-disk name, as
        ``convert_and_load_state_dict_in_model`` renames it (the base-model prefix added or dropped)."""
        from transformers.core_model_loading import rename_source_key

        if disk_name not in self._renamed:
            prefix = self.model.base_model_prefix
            renamed, pattern = rename_source_key(disk_name, self.renamings, self.converters, prefix, self.memory_names)
            if renamed not in self.memory_names and disk_name in self.memory_names:
                renamed, pattern = rename_source_key(disk_name, [], [], prefix, self.memory_names)
            self._renamed[disk_name] = (renamed, pattern)
        return self._renamed[disk_name]

    def groups(self, disk_names: Sequence[str]) -> list[ConvertedGroup]:
        """The on-disk tensors grouped into what each makes in memory (names the model lacks are left out)."""
        from transformers.core_model_loading import dot_natural_key

        groups: dict[str, ConvertedGroup] = {}
        for name in sorted(disk_names, key=dot_natural_key):  # transformers' collection order
            renamed, pattern = self.memory_name(name)
            if renamed not in self.memory_names:
                logger.debug("ignoring tensor %s: the model has no parameter %s", name, renamed)
                continue
            if pattern is None:
                groups[renamed] = ConvertedGroup(renamed, [(name, name)])
            else:
                groups.setdefault(renamed, ConvertedGroup(renamed, [], self.by_pattern[pattern])).sources.append((name, pattern))
        return list(groups.values())

    def convert(self, group: ConvertedGroup, read: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
        """The group's in-memory tensors from its on-disk tensors (``read(name)``), by the converter's operations."""
        if group.converter is None:
            return {group.first: read(group.sources[0][0])}
        converter = copy.deepcopy(group.converter)  # a converter collects its tensors: one instance per group
        for name, pattern in group.sources:
            converter.add_tensor(group.first, name, pattern, functools.partial(read, name))
        out = converter.convert(group.first, model=self.model, config=self.model.config)
        return {name: (tensor[0] if isinstance(tensor, list) else tensor) for name, tensor in out.items()}


@functools.lru_cache(maxsize=4)
def _conversions_of(model_dir: str, config_stamp: int) -> TransformersConversions:
    from .arch import build_skeleton, read_config

    return TransformersConversions(build_skeleton(read_config(model_dir)))


def checkpoint_conversions(checkpoint) -> TransformersConversions:
    """The :class:`TransformersConversions` of a checkpoint folder's model (meta skeleton, built once
    per folder and config.json)."""
    path = Path(checkpoint.path)
    return _conversions_of(str(path.resolve()), (path / "config.json").stat().st_mtime_ns)


# --------------------------------------------------------------------------------------------------
# one checkpoint, classified from its headers


@dataclass
class MoELayerTensors:
    """Where one MoE layer's router and routed experts live in a checkpoint (on-disk names)."""

    layer: int
    router: list[str]
    fused: list[str]  # fused block tensors (fused layouts)
    per_expert: dict[int, dict[str, str]]  # expert -> canonical projection -> file (per-expert layouts)
    #: identity experts (after the routed ones) -> their gate/up files (LongCat-Flash; never pruned)
    identity: dict[int, dict[str, str]] = field(default_factory=dict)
    #: tensors whose values are expert ids (DeepSeek-V4's hash-routing table ``tid2eid``), on-disk names
    id_tables: list[str] = field(default_factory=list)

    @property
    def expert_keys(self) -> list[str]:
        """Every on-disk tensor holding this layer's routed (and identity) experts."""
        return [*self.fused, *(name for files in [*self.per_expert.values(), *self.identity.values()]
                               for name in files.values())]

    def identity_rows(self) -> list[int]:
        """Router rows of the identity experts (after the routed experts' rows)."""
        return sorted(self.identity)


def _refuse_unknown_expert_tensors(layout: FamilyLayout, checkpoint, layers: Mapping[int, MoELayerTensors],
                                   others: Sequence[str]) -> None:
    """A MoePruneError when a fused expert block of a MoE layer has tensors beside the ones the layout
    names (quantisation scales such as Inkling-2's MXFP8 ``w13_weight_scale``): they hold one slice per
    expert, and copying them whole beside pruned experts would write a wrong checkpoint. A tensor of the
    experts module that extends a block's name (``w13_weight_scale``) or holds one row per expert is one;
    others (JetMoE's block-level ``mlp.bias``, its experts module being the MoE block) are copied whole."""
    for name in others:
        layer = layer_of(name)
        if layer not in layers or not name.startswith(layout.disk_experts_prefix(layer)):
            continue
        relative = name[len(layout.disk_experts_prefix(layer)):]
        blocks = layers[layer].fused
        shape = checkpoint.shape(name)
        per_expert = bool(blocks) and len(shape) > 1 and shape[0] == checkpoint.shape(blocks[0])[0]
        if any(relative.startswith(block) for block in layout.disk.names) or per_expert:
            raise MoePruneError(
                f"{checkpoint.path}: MoE layer {layer} stores expert tensor {name!r}, which moeprune does not know "
                f"(it reads {', '.join(layout.disk.names)}): quantised expert blocks (scales beside the weights, "
                "e.g. Inkling-2's MXFP8 / NVFP4 experts) are not supported yet (their scales would have to be pruned "
                "with the weights, and the experts dequantised for calibration as transformers does on load); "
                "prune an unquantised checkpoint (e.g. one from_pretrained loaded with dequantisation and "
                "save_pretrained wrote) and quantise the result"
            )


@dataclass
class CheckpointLayout:
    """A checkpoint's tensors classified by the family layout, from the headers only.

    ``layers`` has one entry per MoE layer (its router and routed-expert tensors); every other tensor
    (embeddings, attention, norms, dense MLPs, shared experts, lm head) is in ``others``. Reading
    methods read only what they need.
    """

    family: FamilyLayout
    checkpoint: object  # LazyCheckpoint
    layers: dict[int, MoELayerTensors]
    others: list[str]
    _cache: dict = field(default_factory=dict, repr=False)
    _groups: list[ConvertedGroup] | None = field(default=None, repr=False)

    @classmethod
    def build(cls, family, checkpoint, moe_layers: Sequence[int]) -> CheckpointLayout:
        layout = family_layout(family)
        moe = set(moe_layers)
        layers: dict[int, MoELayerTensors] = {
            layer: MoELayerTensors(layer, layout.router_keys(layer), layout.fused_keys(layer), {}) for layer in moe
        }
        owned: set[str] = set()
        for entry in layers.values():  # router tensors and id tables only some layers have: where present
            entry.router += [name for name in layout.optional_router_keys(entry.layer) if name in checkpoint]
            entry.id_tables = [name for name in layout.expert_id_table_keys(entry.layer) if name in checkpoint]
            owned.update(entry.router, entry.fused, entry.id_tables)
        if layout.per_expert_on_disk:
            for name in checkpoint.keys():
                layer = layer_of(name)
                if layer in moe:
                    parsed = layout.disk.parse(layer, name)
                    if parsed is not None:
                        layers[layer].per_expert.setdefault(parsed[0], {})[parsed[1]] = name
                        owned.add(name)
        for entry in layers.values():
            entry.per_expert = dict(sorted(entry.per_expert.items()))
            if layout.identity_experts:  # gate/up only, after every complete (routed) expert
                entry.identity = {e: files for e, files in entry.per_expert.items() if set(files) == {"gate", "up"}}
                entry.per_expert = {e: files for e, files in entry.per_expert.items() if e not in entry.identity}
                if entry.identity and entry.per_expert and min(entry.identity) <= max(entry.per_expert):
                    raise MoePruneError(f"{checkpoint.path}: MoE layer {entry.layer} has identity experts {sorted(entry.identity)} "
                                        "before routed ones; they must follow the routed experts")
            absent = [name for name in [*entry.router, *entry.fused] if name not in checkpoint]
            incomplete = [e for e, files in entry.per_expert.items() if set(files) != set(layout.disk.projections)]
            if layout.per_expert_on_disk and not entry.per_expert:
                absent.append(layout.expert_file(entry.layer, 0, layout.disk.projections[0]))
            if absent and any(name.startswith(f"layers.{entry.layer}.") for name in checkpoint.keys()):
                raise MoePruneError(
                    f"{checkpoint.path} stores its decoder layers as layers.N.* without the {layout.model_prefix!r} "
                    "prefix (the original release's names); moeprune reads the names transformers' save_pretrained "
                    f"writes ({layout.model_prefix}layers.N.*): load it once with AutoModelForCausalLM.from_pretrained "
                    "and save_pretrained it, then prune the saved folder"
                )
            if absent or incomplete:
                what = repr(absent[0]) if absent else f"a projection of expert {incomplete[0]}"
                raise MoePruneError(
                    f"{checkpoint.path} lacks tensor {what} of MoE layer {entry.layer}; the checkpoint does not "
                    "match its config.json (re-save or re-download it)"
                )
        others = [name for name in checkpoint.keys() if name not in owned]
        if not layout.per_expert_on_disk:
            _refuse_unknown_expert_tensors(layout, checkpoint, layers, others)
        return cls(layout, checkpoint, layers, others)

    # -- header facts ----------------------------------------------------------------------------
    def num_experts(self, layer: int) -> int:
        """Routed experts of a MoE layer in the checkpoint."""
        entry = self.layers[layer]
        if entry.per_expert:
            return len(entry.per_expert)
        if self.family.disk.flat:  # DBRX: the experts are row blocks; the router has one row per expert
            return int(self.checkpoint.shape(entry.router[0])[0])
        return int(self.checkpoint.shape(entry.fused[0])[0])

    def expert_block_rows(self, layer: int, name: str, experts: Sequence[int]) -> list[int]:
        """Rows of fused block tensor ``name`` (on-disk name) holding ``experts``."""
        return self.family.disk.block_rows(experts, self.num_experts(layer), self.checkpoint.shape(name)[0])

    def _block_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        """Per-expert shapes (expert axis first) of a fused layer's block tensors, by block name."""
        entry = self.layers[layer]
        shapes = {self._block_name(name): tuple(self.checkpoint.shape(name)) for name in entry.fused}
        if self.family.disk.flat:
            count = self.num_experts(layer)
            shapes = {name: (count, shape[0] // count, *shape[1:]) for name, shape in shapes.items()}
        return shapes

    def _files(self, layer: int, expert: int) -> dict[str, str]:
        """The per-expert files of a routed or identity expert."""
        entry = self.layers[layer]
        return entry.per_expert[expert] if expert in entry.per_expert else entry.identity[expert]

    def expert_shape(self, layer: int, expert: int, proj: str) -> tuple[int, ...]:
        """Canonical shape of one projection of one expert (header only)."""
        entry = self.layers[layer]
        if entry.per_expert:
            return tuple(self.checkpoint.shape(self._files(layer, expert)[proj]))
        return self.family.disk.canonical_shape(self._block_shapes(layer), proj)

    def expert_width(self, layer: int, expert: int) -> int:
        """Intermediate width I of one routed expert."""
        return self.expert_shape(layer, expert, "up")[0]

    def expert_dtype(self, layer: int, expert: int, proj: str) -> torch.dtype:
        entry = self.layers[layer]
        if entry.per_expert:
            return self.checkpoint.dtype(self._files(layer, expert)[proj])
        return self.checkpoint.dtype(self._fused_key(layer, proj))

    def router_rows(self, layer: int, name: str, kept: Sequence[int]) -> list[int]:
        """Rows of router tensor ``name`` a layer keeping routed experts ``kept`` holds: the kept rows, then
        (tensors ``[disk] router_tail`` names) every row after the routed experts', never pruned."""
        kept = list(kept)
        if name not in self.family.router_tail_keys(layer):
            return kept
        return kept + list(range(self.num_experts(layer), self.checkpoint.shape(name)[0]))

    def expert_nbytes(self, layer: int, experts: Sequence[int] | None = None, dtype: torch.dtype | None = None) -> int:
        """Bytes of a layer's routed experts (all, or ``experts``), as stored or in ``dtype``; with the
        identity experts' (unused) gate/up rows, which the experts block keeps whatever is pruned
        (LongCat-Flash)."""
        entry = self.layers[layer]
        count = self.num_experts(layer)
        chosen = list(range(count)) if experts is None else list(experts)

        def size(name: str) -> int:
            item = dtype.itemsize if dtype is not None else self.checkpoint.dtype(name).itemsize
            return math.prod(self.checkpoint.shape(name)) * item

        total = sum(size(name) // count * len(chosen) for name in entry.fused)
        for expert in chosen:
            total += sum(size(name) for name in entry.per_expert.get(expert, {}).values())
        return total + sum(size(name) for files in entry.identity.values() for name in files.values())

    def router_nbytes(self, layer: int, rows: int | None = None, dtype: torch.dtype | None = None) -> int:
        """Bytes of a layer's router tensors (all rows, or ``rows`` routed experts' rows of them, plus the
        rows after the routed experts' that pruning keeps: ``[disk] router_tail``)."""
        total = 0
        count = self.num_experts(layer)
        for name in self.layers[layer].router:
            item = dtype.itemsize if dtype is not None else self.checkpoint.dtype(name).itemsize
            shape = self.checkpoint.shape(name)
            total += math.prod(shape[1:]) * ((count if rows is None else rows) + shape[0] - count) * item
        return total

    def _block_name(self, disk_name: str) -> str:
        """Name of a fused block tensor relative to the on-disk experts module."""
        return disk_name[len(self.family.disk_experts_prefix(layer_of(disk_name))):]

    def _fused_key(self, layer: int, proj: str) -> str:
        return self.family.disk_experts_prefix(layer) + self.family.disk.block_of(proj)

    def owner(self, name: str) -> int | None:
        """The MoE layer whose routed experts ``name`` holds, or None."""
        layer = layer_of(name)
        if layer in self.layers and name in self._expert_key_set(layer):
            return layer
        return None

    def _expert_key_set(self, layer: int) -> set[str]:
        key = ("keys", layer)
        if key not in self._cache:
            self._cache[key] = set(self.layers[layer].expert_keys)
        return self._cache[key]

    # -- reading ---------------------------------------------------------------------------------
    def read_expert(self, layer: int, expert: int, proj: str) -> torch.Tensor:
        """Canonical ``proj`` of one routed expert (per-expert: its file; fused: row ``expert`` of the
        block, read once and kept until :meth:`forget`)."""
        entry = self.layers[layer]
        if entry.per_expert:
            return self.checkpoint.get(self._files(layer, expert)[proj])
        key = ("expert", layer, expert)
        if key not in self._cache:
            fmt = self.family.disk
            rows = {self._block_name(name): fmt.expert_slice(self.checkpoint.get_rows(name, self.expert_block_rows(layer, name, [expert])), 0, 1)
                    for name in entry.fused}
            self.forget()  # one fused expert resident at a time
            self._cache[key] = self.family.disk.split(rows)
        return self._cache[key][proj]

    def read_expert_rows(self, layer: int, expert: int, proj: str, rows: Sequence[int]) -> torch.Tensor:
        """Rows ``rows`` of canonical ``proj`` (per-expert files: only those rows are read)."""
        entry = self.layers[layer]
        if entry.per_expert:
            return self.checkpoint.get_rows(self._files(layer, expert)[proj], list(rows))
        return self.read_expert(layer, expert, proj).index_select(0, torch.tensor(list(rows), dtype=torch.long))

    def forget(self) -> None:
        """Drop the cached fused expert rows (call between output tensors)."""
        self._cache = {k: v for k, v in self._cache.items() if k[0] == "keys"}

    def read_router_rows(self, name: str, kept: Sequence[int]) -> torch.Tensor:
        """Router tensor ``name`` at experts ``kept`` along its expert axis (axis 0: only those rows are read)."""
        axis = self.family.router_axis(name)
        if axis == 0:
            return self.checkpoint.get_rows(name, list(kept))
        return self.checkpoint.get(name).index_select(axis, torch.tensor(list(kept), dtype=torch.long)).contiguous()

    def read_layer_experts(self, layer: int, kept: Sequence[int], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Router rows and the ``kept`` experts of one MoE layer in the in-memory layout, full memory names.

        Fused on disk: only the kept rows of each block tensor are read (one ``get_rows`` each).
        Per expert: only the kept experts' files are read, copied into preallocated fused tensors.
        """
        entry = self.layers[layer]
        kept = list(kept)
        identity = entry.identity_rows()  # never pruned: their gate/up rows follow the kept experts'
        state = {self.family.memory_name(name): cast_float(self.read_router_rows(name, self.router_rows(layer, name, kept)), dtype)
                 for name in entry.router}
        for name in entry.id_tables:  # expert ids of the kept experts, renumbered (dropped ones remapped)
            state[self.family.memory_name(name)] = renumber_expert_ids(self.checkpoint.get(name), kept)
        mem_prefix = self.family.memory_experts_prefix(layer)
        if not entry.per_expert:
            for name in entry.fused:
                block = self._block_name(name)
                rows = self.family.disk.block_as(block, self.checkpoint.get_rows(name, self.expert_block_rows(layer, name, kept)),
                                                 self.family.memory)
                state[mem_prefix + self.family.memory_block_name(block)] = cast_float(rows, dtype)
            return state
        missing = [e for e in kept if e not in entry.per_expert]
        if missing:
            raise MoePruneError(f"{self.checkpoint.path} has no tensors for experts {missing} of MoE layer {layer}")
        fmt = self.family.memory
        widths = {self.expert_width(layer, e) for e in kept}
        if len(widths) > 1:
            raise MoePruneError(f"MoE layer {layer} has experts of different widths {sorted(widths)}; a fused "
                                "in-memory block needs one width")
        inter = widths.pop() if widths else 0
        hidden = self.expert_shape(layer, kept[0], "up")[1] if kept else 0
        out_dtype = (dtype or self.expert_dtype(layer, kept[0], "up")) if kept else dtype
        blocks = {name: torch.empty(fmt.block_shape(name, len(kept) + (len(identity) if name == fmt.gate_up else 0),
                                                    inter, hidden), dtype=out_dtype) for name in fmt.names}
        for i, expert in enumerate(kept):
            fmt.fill(blocks, i, {proj: self.checkpoint.get(entry.per_expert[expert][proj]) for proj in fmt.projections})
        for i, expert in enumerate(identity, start=len(kept)):
            fmt.fill_gate_up(blocks, i, {proj: self.checkpoint.get(entry.identity[expert][proj]) for proj in ("gate", "up")})
        state.update({mem_prefix + name: tensor for name, tensor in blocks.items()})
        return state

    # -- the other tensors (outside the routers and routed experts) --------------------------------
    def other_groups(self) -> list[ConvertedGroup]:
        """The tensors outside the routers and routed experts, grouped by what each makes in memory:
        renamed one to one (``[disk.renames]``, the MoE prefix), or with ``[disk] conversions =
        "transformers"`` as transformers' own conversion mapping makes them (header only)."""
        if self._groups is None:
            if self.family.transformers_conversions:
                self._groups = checkpoint_conversions(self.checkpoint).groups(self.others)
            else:
                self._groups = [ConvertedGroup(self.family.memory_name(name), [(name, name)]) for name in self.others]
        return self._groups

    def read_group(self, group: ConvertedGroup, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The in-memory tensors of one group (full in-memory names), in ``dtype`` if floating point."""
        if group.converter is None:
            return {group.first: cast_float(self.checkpoint.get(group.sources[0][0]), dtype)}
        made = checkpoint_conversions(self.checkpoint).convert(group, self.checkpoint.get)
        return {name: cast_float(tensor, dtype) for name, tensor in made.items()}

    def read_memory(self, wanted: Collection[str], dtype: torch.dtype | None = None, progress: bool = False) -> dict[str, torch.Tensor]:
        """The in-memory tensors named in ``wanted`` that the other tensors make, read in shard order
        (groups whose targets the model lacks are not read)."""
        wanted = set(wanted)
        groups = [group for group in self.other_groups() if wanted.intersection(group.targets)]
        ignored = [group.first for group in self.other_groups() if not wanted.intersection(group.targets)]
        if ignored:
            logger.debug("ignoring tensors %s: the model has no such parameter", ignored[:5])
        groups.sort(key=lambda group: str(self.checkpoint.shard_of(group.sources[0][0])))
        tensors: dict[str, torch.Tensor] = {}
        for group in tqdm(groups, desc="shared weights", disable=not progress, leave=False):
            tensors.update({name: tensor for name, tensor in self.read_group(group, dtype).items() if name in wanted})
        return tensors

    def module_state_dict(self, module: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Every tensor of the module at in-memory path ``module`` (e.g. ``model.embed_tokens``) that
        the other tensors make, names relative to the module."""
        prefix = module + "."
        state: dict[str, torch.Tensor] = {}
        for group in self.other_groups():
            if any(target.startswith(prefix) for target in group.targets):
                state.update({name[len(prefix):]: tensor for name, tensor in self.read_group(group, dtype).items()
                              if name.startswith(prefix)})
        return state

    def layer_state_dict(self, layer: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Every tensor of decoder layer ``layer`` in the in-memory layout, names relative to the layer."""
        prefix = self.family.memory_layer_prefix(layer)
        state = self.module_state_dict(prefix[:-1], dtype)
        if layer in self.layers:
            full = self.read_layer_experts(layer, range(self.num_experts(layer)), dtype)
            state.update({name[len(prefix):]: tensor for name, tensor in full.items()})
        return state


def read_module(family, checkpoint, module: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the module at in-memory path ``module`` outside the decoder layers (the input
    embedding, the final norm), names relative to it, whatever name the checkpoint stores them under."""
    return CheckpointLayout.build(family, checkpoint, []).module_state_dict(module, dtype)


def cast_float(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` in ``dtype`` if it is floating point and a dtype is given, else unchanged."""
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


# --------------------------------------------------------------------------------------------------
# a loaded model


def module_attribute(module: nn.Module, path: str):
    """Attribute ``path`` of ``module``, dotted paths followed (a fused block under a submodule: JetMoE's
    ``input_linear.weight`` of its ``mlp``); None when absent."""
    for part in path.split("."):
        module = getattr(module, part, None)
    return module


def _module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def model_experts_module(model: nn.Module, family, layer: int) -> nn.Module:
    """The experts module of a MoE layer of a loaded model."""
    layout = family_layout(family)
    return _module(model, layout.memory_layer_prefix(layer) + layout.experts_module)


def model_router_module(model: nn.Module, family, layer: int) -> nn.Module:
    layout = family_layout(family)
    return _module(model, layout.memory_layer_prefix(layer) + layout.router_modules)


def model_expert(model: nn.Module, family, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """Canonical tensors of one routed expert of a loaded model (views of its parameters)."""
    layout = family_layout(family)
    experts = model_experts_module(model, family, layer)
    fmt = layout.memory
    if layout.identity_experts and expert >= getattr(experts, fmt.down).shape[0]:  # an identity expert: gate/up rows only
        gate, up = fmt._pair(fmt._untransposed(getattr(experts, fmt.gate_up)[expert]))
        return {"gate": gate, "up": up}
    count = getattr(experts, "num_experts", None)
    return fmt.split({name: fmt.expert_slice(module_attribute(experts, name), expert, count) for name in fmt.names})


def model_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """A parameter or buffer of a loaded model by full in-memory name."""
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    value = getattr(module, attribute, None)
    if not isinstance(value, torch.Tensor):
        raise MoePruneError(f"the model has no parameter or buffer {name!r}")
    return value


def set_model_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace parameter or buffer ``name`` (full in-memory name) by ``tensor``; the shape may change."""
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attribute in module._parameters:
        old = module._parameters[attribute]
        module._parameters[attribute] = nn.Parameter(tensor, requires_grad=old.requires_grad if old is not None else False)
    elif attribute in module._buffers:
        module._buffers[attribute] = tensor
    else:
        raise MoePruneError(f"the model has no parameter or buffer {name!r}; is config.json the one of these weights?")


def set_expert_block(model: nn.Module, family, layer: int, experts: Sequence[Mapping[str, torch.Tensor]]) -> None:
    """Replace a MoE layer's routed experts by the canonical ``experts`` (fused as the family keeps them
    in memory) and set the experts module's ``num_experts``."""
    layout = family_layout(family)
    module = model_experts_module(model, family, layer)
    prefix = layout.memory_experts_prefix(layer)
    for name in layout.memory.names:
        set_model_tensor(model, prefix + name, layout.memory.join_one(name, experts))
    module.num_experts = sum(1 for e in experts if "down" in e)  # identity experts (gate/up only) are not counted
