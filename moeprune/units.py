"""Coupled units: what must change together when one expert, one neuron, one KV group or one layer goes.

Defined once, over the canonical tensors of :mod:`moeprune.layout` (``gate``/``up`` [I, H], ``down``
[H, I], biases) and full on-disk names, so that every op (and every scorer that needs the groups)
agrees on them whatever the family's storage:

* expert j of layer L: its canonical projections (and biases), whole, plus row j of every router
  tensor (weight, bias, ``e_score_correction_bias``);
* neuron k of expert j: gate row k, up row k, down column k, and gate/up bias entry k (the down bias
  is per output channel, not per neuron). :func:`locate_in_block` maps it into a fused block: on
  GPT-OSS (interleaved, transposed) gate_up_proj[j, :, 2k] and [j, :, 2k+1], down_proj[j, k, :],
  gate_up_proj_bias[j, 2k] and [j, 2k+1];
* KV group g of a grouped-query attention layer with H query heads, KV heads and head_dim d (the
  ``[attention]`` keys of routers/<family>.toml, shapes from :func:`moeprune.layout.layer_facts`): k/v
  rows g*d..(g+1)*d-1 (and bias entries), and for each query head h of the group (h // (H/KV) == g)
  q rows h*f*d..(h+1)*f*d-1 (f = ``q_rows_per_head``, 2 on Qwen3-Next: query and output gate), q bias
  entries, o columns h*d..(h+1)*d-1 and the head's sink logit (GPT-OSS). q_norm/k_norm weigh head_dim
  and are shared by every head: not part of any group. Multi-head latent attention (DeepSeek-V2/V3),
  q/k norms across all heads (OLMoE) and layers without attention (hybrids) refuse with a PlanError;
* channel c of a dense MLP or a shared expert: gate row c, up row c, down column c (a shared-expert
  gate such as Qwen2-MoE's ``shared_expert_gate`` reads the hidden state: untouched);
* decoder layer L: every tensor stored under ``model.layers.<L>.``, whole.

:func:`unit_parameters` counts the parameters of each unit (for equal-parameter budgets).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from .errors import PlanError
from .layout import CheckpointLayout, FusedFormat, LayerFacts, family_layout, layer_facts, layer_of
from .ops.recipe import ExpertRef, Ref


@dataclass(frozen=True)
class TensorSlice:
    """Entries ``index`` along ``dim`` of tensor ``ref``; the whole tensor when ``dim`` is None."""

    ref: Ref
    dim: int | None = None
    index: tuple[int, ...] = ()


@dataclass(frozen=True)
class Unit:
    """A coupled group of tensor slices that an op must remove (or merge) together."""

    kind: str
    layer: int
    slices: tuple[TensorSlice, ...]


def expert_unit(family, layer: int, expert: int) -> Unit:
    """Expert ``expert`` of MoE layer ``layer``: its canonical tensors whole and its router rows."""
    layout = family_layout(family)
    slices = [TensorSlice(ExpertRef(layer, expert, proj)) for proj in layout.projections]
    slices += [TensorSlice(name, layout.router_axis(name), (expert,)) for name in layout.router_keys(layer)]
    return Unit("expert", layer, tuple(slices))


def neuron_unit(family, layer: int, expert: int, neuron: int) -> Unit:
    """Neuron ``neuron`` of expert ``expert``: gate row, up row, down column, gate/up bias entries (no gate
    row for ungated experts, Nemotron-H's down(relu2(up x)))."""
    layout = family_layout(family)
    rows = ("gate", "up") if layout.memory.gated else ("up",)
    slices = [TensorSlice(ExpertRef(layer, expert, proj), 0, (neuron,)) for proj in rows]
    slices.append(TensorSlice(ExpertRef(layer, expert, "down"), 1, (neuron,)))
    if layout.memory.has_biases:
        slices += [TensorSlice(ExpertRef(layer, expert, "gate_bias"), 0, (neuron,)),
                   TensorSlice(ExpertRef(layer, expert, "up_bias"), 0, (neuron,))]
    return Unit("neuron", layer, tuple(slices))


@dataclass(frozen=True)
class BlockEntry:
    """Where a canonical slice lies in a fused block: ``tensor[expert]`` along ``axis`` (an axis of
    the block tensor, expert axis 0 included) at ``positions``."""

    tensor: str
    expert: int
    axis: int
    positions: tuple[int, ...]


def locate_in_block(fmt: FusedFormat, piece: TensorSlice, width: int) -> BlockEntry:
    """Block coordinates of a neuron slice of a canonical expert tensor (``width`` = its I)."""
    ref = piece.ref
    if not isinstance(ref, ExpertRef) or piece.dim is None:
        raise ValueError("only slices of one expert's canonical tensors along one dim can be located")
    neurons = list(piece.index)
    if ref.proj in ("gate", "up") and piece.dim == 0:
        return BlockEntry(fmt.gate_up, ref.expert, fmt.gate_up_neuron_axis,
                          tuple(fmt.gate_up_positions(ref.proj, neurons, width)))
    if ref.proj == "down" and piece.dim == 1:
        return BlockEntry(fmt.down, ref.expert, fmt.down_neuron_axis, tuple(neurons))
    if ref.proj in ("gate_bias", "up_bias") and fmt.has_biases:
        return BlockEntry(fmt.gate_up_bias, ref.expert, 1,
                          tuple(fmt.gate_up_positions(ref.proj.removesuffix("_bias"), neurons, width)))
    raise ValueError(f"cannot locate a slice of {ref.proj} along dim {piece.dim} in a fused block")


def model_facts(family, model_or_config) -> dict[int, LayerFacts]:
    """:func:`~moeprune.layout.layer_facts` of a loaded model, or of a config (built on the meta device,
    with the shapes its ``moeprune`` section records: per-layer heads and widths of a pruned model)."""
    if isinstance(model_or_config, nn.Module):
        return layer_facts(family, model_or_config)
    return layer_facts(family, prepared_skeleton(family, model_or_config))


def prepared_skeleton(family, config) -> nn.Module:
    """The meta-device model of ``config`` with its ``moeprune`` section's modules prepared, as
    :func:`moeprune.load` builds it before reading weights."""
    from .arch import build_skeleton
    from .structure import HANDLERS, ordered_keys, read_section

    values = read_section(config.to_dict())
    model = build_skeleton(config)
    for key in ordered_keys(values):
        if HANDLERS[key].prepare is not None:
            HANDLERS[key].prepare(model, family, values[key])
    return model


def check_attention(family, facts: LayerFacts):
    """The layer's :class:`~moeprune.layout.AttentionFacts`, or a PlanError saying why its heads cannot
    be pruned (no [attention] keys, multi-head latent attention, q/k norms across heads, no attention)."""
    layout = family_layout(family)
    spec, name = layout.attention, layout.family
    if spec is None:
        raise PlanError(f"routers/{name}.toml has no [attention] keys: moeprune cannot prune {name} attention heads "
                        "(add them, see docs/layout-and-plans.md)")
    if spec.kind == "mla":
        raise PlanError(f"{name} uses multi-head latent attention (heads share one compressed key/value projection); "
                        "moeprune does not prune its heads: prune experts, channels or layers instead")
    if spec.qk_norm == "across_heads":
        raise PlanError(f"{name}'s q_norm/k_norm normalise the whole q/k projection across heads, so dropping a head "
                        "changes every other head; moeprune does not prune its heads")
    if facts.attention is None:
        raise PlanError(f"layer {facts.layer} of this {name} model has no self-attention (a linear-attention or Mamba "
                        "layer of a hybrid); drop heads only in attention layers")
    return facts.attention


def head_slices(family, facts: LayerFacts, heads: Sequence[int], groups: Sequence[int]) -> tuple[TensorSlice, ...]:
    """The slices of query heads ``heads`` and KV groups ``groups`` of one attention layer (see the
    module docstring): selecting them keeps those heads, in this order."""
    attention = check_attention(family, facts)
    spec, layer = family_layout(family).attention, facts.layer
    d, f = attention.head_dim, attention.q_rows_per_head
    q_rows = tuple(h * f * d + i for h in heads for i in range(f * d))
    kv_rows = tuple(g * d + i for g in groups for i in range(d))
    o_columns = tuple(h * d + i for h in heads for i in range(d))
    slices = [TensorSlice(spec.name(layer, "q"), 0, q_rows), TensorSlice(spec.name(layer, "k"), 0, kv_rows),
              TensorSlice(spec.name(layer, "v"), 0, kv_rows), TensorSlice(spec.name(layer, "o"), 1, o_columns)]
    rows = {"q": q_rows, "k": kv_rows, "v": kv_rows}
    slices += [TensorSlice(spec.name(layer, p, "bias"), 0, rows[p]) for p in ("q", "k", "v") if p in attention.biases]
    if attention.sinks:
        slices.append(TensorSlice(spec.name(layer, "sinks"), 0, tuple(heads)))
    return tuple(slices)


def kv_group_unit(family, facts: LayerFacts, group: int) -> Unit:
    """KV group ``group`` of the layer ``facts`` describes (:func:`model_facts`): its k/v rows, its
    query heads' q rows and o columns, their biases and sinks."""
    attention = check_attention(family, facts)
    if not 0 <= group < attention.kv_heads:
        raise PlanError(f"layer {facts.layer} has KV groups 0..{attention.kv_heads - 1}, not {group}")
    heads = [h for h in range(attention.heads) if attention.group_of(h) == group]
    return Unit("kv_group", facts.layer, head_slices(family, facts, heads, [group]))


def channel_spec_and_width(family, facts: LayerFacts, target: str):
    """(ChannelSpec, width) of the layer's dense MLP (``target`` "dense_mlp") or shared expert
    ("shared_experts"); a PlanError when the spec lacks the keys or the layer has no such block."""
    layout = family_layout(family)
    spec, width = ((layout.dense_mlp, facts.dense_width) if target == "dense_mlp"
                   else (layout.shared_channels, facts.shared_width))
    section = "[dense_mlp]" if target == "dense_mlp" else "[shared_channels]"
    if spec is None:
        raise PlanError(f"routers/{layout.family}.toml has no {section} keys: moeprune cannot slice {layout.family} "
                        f"{target} channels (add them, see docs/layout-and-plans.md)")
    if width is None:
        what = "dense MLP (it is a MoE layer)" if target == "dense_mlp" else "shared expert"
        raise PlanError(f"layer {facts.layer} of this {layout.family} model has no {what}; slice {target} channels "
                        "only where the layer has them")
    return spec, width


def channel_slices(family, facts: LayerFacts, target: str, channels: Sequence[int]) -> tuple[TensorSlice, ...]:
    """Gate rows, up rows and down columns ``channels`` of the layer's dense MLP or shared expert."""
    spec, _ = channel_spec_and_width(family, facts, target)
    index = tuple(channels)
    return (TensorSlice(spec.name(facts.layer, "gate"), 0, index), TensorSlice(spec.name(facts.layer, "up"), 0, index),
            TensorSlice(spec.name(facts.layer, "down"), 1, index))


def channel_unit(family, facts: LayerFacts, target: str, channel: int) -> Unit:
    """Channel ``channel`` of the layer's dense MLP (``target`` "dense_mlp") or shared expert ("shared_experts")."""
    _, width = channel_spec_and_width(family, facts, target)
    if not 0 <= channel < width:
        raise PlanError(f"layer {facts.layer}'s {target} has channels 0..{width - 1}, not {channel}")
    return Unit("channel", facts.layer, channel_slices(family, facts, target, [channel]))


@dataclass(frozen=True)
class UnitParameters:
    """Parameters of one unit of each kind in one decoder layer (0 where the layer has no such unit).

    ``kv_group``: one KV group with its query heads (q rows, k/v rows, o columns, their biases and sinks);
    ``dense_channel`` / ``shared_channel``: one channel (gate row + up row + down column);
    ``layer``: the whole decoder layer, routed experts included."""

    kv_group: int
    dense_channel: int
    shared_channel: int
    layer: int


def unit_parameters(family, facts) -> dict[int, UnitParameters]:
    """Per decoder layer, the parameter count of each of its units, for equal-parameter budgets: a head
    group costs ``kv_group``, a channel ``dense_channel`` or ``shared_channel``, the layer ``layer``.
    ``facts``: :func:`model_facts` output, or a loaded model or a config (read with it)."""
    if not isinstance(facts, dict):
        facts = model_facts(family, facts)
    out = {}
    for layer, fact in facts.items():
        group = 0
        attention = fact.attention
        if attention is not None:
            d, per_group = attention.head_dim, attention.heads_per_group
            hidden = fact.hidden_size  # each q/k/v row reads, each o column writes, hidden_size entries
            q_rows, kv_rows = per_group * attention.q_rows_per_head * d, 2 * d
            group = (q_rows + kv_rows) * hidden + per_group * d * hidden
            group += sum({"q": q_rows, "k": d, "v": d}[p] for p in ("q", "k", "v") if p in attention.biases)
            group += per_group if attention.sinks else 0
        channel = 3 * fact.hidden_size
        out[layer] = UnitParameters(group, channel if fact.dense_width else 0, channel if fact.shared_width else 0,
                                    fact.parameters)
    return out


def layer_unit(layout: CheckpointLayout, layer: int) -> Unit:
    """Decoder layer ``layer``: every tensor stored under ``model.layers.<layer>.``, whole."""
    names = [name for name in layout.checkpoint.keys() if layer_of(name) == layer]
    if not names:
        raise PlanError(f"the checkpoint has no decoder layer {layer}")
    return Unit("layer", layer, tuple(TensorSlice(name) for name in names))
