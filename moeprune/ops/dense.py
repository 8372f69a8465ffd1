"""Dense ops: drop attention heads (whole KV groups with their query heads), slice the channels of
dense MLPs and shared experts, drop whole decoder layers, fold a linear map into a layer's
feed-forward output (ReplaceMe).

The units are :mod:`moeprune.units` (one definition; the ops select their complement). Each op is a
set of :class:`~.recipe.Select` recipes over on-disk tensor names (weights and biases; rows of
q/k/v and gate/up, columns of o and down, entries of GPT-OSS sinks) plus the module attributes the
in-memory executor updates (``num_key_value_groups``, Linear sizes). What the config says is decided
once for the whole plan (:func:`finish_dense_edit`):

* the same head counts (or width) in every layer that has the unit: the stock keys (heads, KV heads,
  ``head_dim`` written explicitly so that it is never re-derived from hidden_size / heads; the
  dense-MLP or shared-expert intermediate size): a vanilla checkpoint;
* different counts per layer (FLAP's global threshold), or a width no config key holds alone
  (DeepSeek's shared experts: moe_intermediate_size x n_shared_experts; Jamba's dense MLP shares
  ``intermediate_size`` with its experts): the stock keys keep the source's values and the
  ``moeprune`` section records ``attention_heads`` {layer: [heads, kv_heads]}, ``mlp_widths`` or
  ``shared_widths`` {layer: width}; :func:`moeprune.load` resizes those modules on the meta skeleton
  (the handlers below) and reads the tensors by name. A vanilla ``from_pretrained`` of such a
  checkpoint fails on the shape mismatch (tested);
* ``output_bias`` (FLAP's compensation of the removed units' mean output): summed into the o_proj /
  down_proj bias where it exists (GPT-OSS o_proj: vanilla), else a new bias recorded in the section's
  ``output_biases`` {layer: [projection paths]}, which :func:`moeprune.load` creates; vanilla
  ``from_pretrained`` reports the new biases as unexpected keys and runs without them;
* dropped layers: ``num_hidden_layers``, every per-layer list (``layer_types``, ``mlp_layer_types``,
  ``layers_block_type``, ``layer_rope_theta``) loses the dropped entries, index lists
  (``mlp_only_layers``) and layer thresholds (``first_k_dense_replace``, ``num_dense_layers``,
  ``max_window_layers``) are renumbered, ``decoder_sparse_step`` > 1 becomes an explicit
  ``mlp_only_layers``, Jamba's (period, offset) pairs get the smallest pair that describes the kept
  layers (:func:`periodic_pattern`); the per-layer keys of the
  ``moeprune`` section are renumbered; tensors of later layers are renamed by the executors
  (:meth:`~.edit.Edit.renumber`). A plan's layer indices are always the ORIGINAL numbering.

Every config edit is verified before any weight is read (:func:`verify_structure`): the model the
new config builds must have, layer for layer, the modules, shapes and attention types the edit
produces; anything a config cannot express (a Jamba layer pattern no period describes, DeepSeek's
moe_layer_freq > 1, an unknown per-layer list) is refused with a PlanError.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import units
from ..errors import PlanError
from ..layout import LayerFacts, decoder_layer_list, family_layout, layer_prefix
from ..plan import Plan
from ..structure import (
    SECTION,
    StructureHandler,
    read_section,
    register_structure,
    section_config,
)
from . import register_op
from .edit import Edit, ModelSource
from .recipe import ExpertRef, NewTensor, Recipe, Select, Source, Take, WeightedSum

logger = logging.getLogger(__name__)

#: ``moeprune`` section keys (per decoder layer, final numbering).
ATTENTION_HEADS = "attention_heads"  # {layer: [num_attention_heads, num_key_value_heads]}
MLP_WIDTHS = "mlp_widths"  # {layer: dense-MLP intermediate size}
SHARED_WIDTHS = "shared_widths"  # {layer: shared-expert intermediate size}
OUTPUT_BIASES = "output_biases"  # {layer: [output projections given a bias, e.g. "self_attn.o_proj"]}

#: config keys listing one entry per decoder layer (dropped entries go with the layer)
PER_LAYER_LISTS = ("layer_types", "mlp_layer_types", "layers_block_type", "layer_rope_theta")
#: config keys listing decoder-layer indices (renumbered)
INDEX_LISTS = ("mlp_only_layers",)
#: config keys meaning "layers below this index" (become the number of kept layers below it)
LAYER_THRESHOLDS = ("first_k_dense_replace", "num_dense_layers", "max_window_layers")
#: (period, offset) config keys: layer i has the feature iff i % period == offset (Jamba)
PERIODIC = (("attn_layer_period", "attn_layer_offset"), ("expert_layer_period", "expert_layer_offset"))
#: module attributes compared layer by layer when a config is verified
BEHAVIOUR_ATTRIBUTES = ("attention_type", "layer_type", "sliding_window", "is_sliding", "use_sliding_window")


@dataclass
class DenseContext:
    """What the dense ops need beyond the plan: the model's config and per-layer facts (as built)."""

    config: Any
    facts: dict[int, LayerFacts]

    @classmethod
    def of(cls, family, *, config=None, model: nn.Module | None = None) -> DenseContext:
        if model is not None:
            return cls(model.config, units.model_facts(family, model))
        if config is None:
            raise PlanError("dense actions (heads, channels, layers) need the model's config; pass config= or model=")
        return cls(config, units.model_facts(family, config))


def _recipes(slices) -> dict[str, Recipe]:
    return {piece.ref: Select(Take(piece.ref), piece.dim, piece.index) for piece in slices}


@dataclass(frozen=True, eq=False)
class ValueLike(Recipe):
    """A tensor given by value, in the dtype of source tensor ``like`` (a new bias of a weight)."""

    value: torch.Tensor
    like: str

    def shape(self, source: Source) -> tuple[int, ...]:
        return tuple(self.value.shape)

    def dtype(self, source: Source) -> torch.dtype:
        return source.dtype(self.like)

    def refs(self):
        yield self.like

    def evaluate(self, source: Source) -> torch.Tensor:
        return self.value.to(self.dtype(source))


def output_bias_edit(fact: LayerFacts, path: str, bias: tuple[float, ...], where: str) -> Edit:
    """Add ``bias`` [hidden] to the output bias of projection ``path`` (relative to the layer): summed
    in float64 with the existing bias, or a new bias in the weight's dtype (recorded in the section's
    ``output_biases`` by :func:`dense_config`)."""
    if len(bias) != fact.hidden_size:
        raise PlanError(f"{where}: output_bias has {len(bias)} entries; the layer's hidden size is {fact.hidden_size}")
    name = f"{layer_prefix(fact.layer)}{path}.bias"
    value = torch.tensor(bias, dtype=torch.float64)
    if path in fact.output_biases:
        return Edit(tensors={name: WeightedSum(((1.0, Take(name)), (1.0, NewTensor(value))))})
    return Edit(tensors={name: ValueLike(value, f"{layer_prefix(fact.layer)}{path}.weight")})


def kept_heads(attention, action, layer: int) -> tuple[list[int], list[int]]:
    """(kept query heads, kept KV groups) after ``action`` (original numbering). A group whose every
    query head goes is dropped with them; the kept groups must keep the same number of query heads
    (transformers' grouped-query attention repeats every KV head equally)."""
    if any(not 0 <= g < attention.kv_heads for g in action.kv_groups) or any(not 0 <= h < attention.heads for h in action.heads):
        raise PlanError(f"layer {layer}, {action.op}: this layer has heads 0..{attention.heads - 1} and KV groups "
                        f"0..{attention.kv_heads - 1}; the plan names {list(action.heads)} / {list(action.kv_groups)}")
    gone = set(action.heads)
    heads = [h for h in range(attention.heads) if h not in gone and attention.group_of(h) not in set(action.kv_groups)]
    if not heads:
        raise PlanError(f"layer {layer}, {action.op}: drops every head; drop the layer instead")
    per_group = Counter(attention.group_of(h) for h in heads)
    if len(set(per_group.values())) > 1:
        raise PlanError(f"layer {layer}, {action.op}: the kept KV groups would keep {dict(sorted(per_group.items()))} query "
                        "heads; grouped-query attention needs the same number in every group (drop whole KV groups, or "
                        "the same number of heads in each)")
    return heads, sorted(per_group)


def _resize_attributes(path: str, spec, heads: int, kv_heads: int, head_dim: int, rows_per_head: int) -> dict[str, dict]:
    """Module attributes of an attention module holding ``heads`` query and ``kv_heads`` KV heads."""
    return {
        path: {"num_key_value_groups": heads // kv_heads, "num_heads": heads, "num_key_value_heads": kv_heads},
        f"{path}.{spec.q}": {"out_features": heads * rows_per_head * head_dim},
        f"{path}.{spec.k}": {"out_features": kv_heads * head_dim},
        f"{path}.{spec.v}": {"out_features": kv_heads * head_dim},
        f"{path}.{spec.o}": {"in_features": heads * head_dim},
    }


@register_op("drop_attention_heads", context=True)
def drop_attention_heads(family, layer: int, action, plan: Plan, *, context: DenseContext) -> Edit:
    """Keep the query heads and KV groups ``action`` does not drop (q/k/v rows, o columns, biases, sinks)."""
    fact = context.facts[layer]
    attention = units.check_attention(family, fact)
    heads, groups = kept_heads(attention, action, layer)
    spec = family_layout(family).attention
    edit = Edit(tensors=_recipes(units.head_slices(family, fact, heads, groups)))
    edit.attributes.update(_resize_attributes(layer_prefix(layer) + spec.module, spec, len(heads), len(groups),
                                              attention.head_dim, attention.q_rows_per_head))
    if action.output_bias:
        edit.update(output_bias_edit(fact, f"{spec.module}.{spec.o}", action.output_bias, f"layer {layer}, {action.op}"))
    return edit


@register_op("slice_channels", context=True)
def slice_channels(family, layer: int, action, plan: Plan, *, context: DenseContext) -> Edit:
    """Keep channels ``action.kept`` of the layer's dense MLP or shared expert (gate/up rows, down columns)."""
    fact = context.facts[layer]
    spec, width = units.channel_spec_and_width(family, fact, action.target)
    bad = [c for c in action.kept if not 0 <= c < width]
    if bad:
        raise PlanError(f"layer {layer}, {action.op}: {action.target} has channels 0..{width - 1}; the plan keeps {bad}")
    edit = Edit(tensors=_recipes(units.channel_slices(family, fact, action.target, action.kept)))
    edit.attributes.update(_width_attributes(layer_prefix(layer) + spec.module, spec, len(action.kept)))
    if action.output_bias:
        edit.update(output_bias_edit(fact, f"{spec.module}.{spec.down}", action.output_bias, f"layer {layer}, {action.op}"))
    return edit


def _width_attributes(path: str, spec, width: int) -> dict[str, dict]:
    return {path: {"intermediate_size": width}, f"{path}.{spec.gate}": {"out_features": width},
            f"{path}.{spec.up}": {"out_features": width}, f"{path}.{spec.down}": {"in_features": width}}


@dataclass(frozen=True, eq=False)
class LeftMultiply(Recipe):
    """``matrix @ base`` in float64, cast to the base's dtype (a down projection [H, I] or bias [H])."""

    matrix: torch.Tensor
    base: Recipe

    def shape(self, source: Source) -> tuple[int, ...]:
        shape = tuple(self.base.shape(source))
        if shape[0] != self.matrix.shape[1]:
            raise PlanError(f"a {tuple(self.matrix.shape)} matrix cannot multiply a tensor of shape {shape}")
        return shape

    def dtype(self, source: Source) -> torch.dtype:
        return self.base.dtype(source)

    def refs(self):
        return self.base.refs()

    def evaluate(self, source: Source) -> torch.Tensor:
        base = self.base.evaluate(source)
        return (self.matrix.to(base.device) @ base.double()).to(base.dtype)


@register_op("transform_mlp_output", context=True)
def transform_mlp_output(family, layer: int, action, plan: Plan, *, context: DenseContext) -> Edit:
    """y <- M y for the layer's feed-forward output: every down projection (dense MLP, shared expert,
    each kept routed expert) and its bias becomes M @ W, M @ b. Exact because the block output is a
    (gated, weighted) sum of down-projection outputs (ReplaceMe's fold, arXiv 2505.02819)."""
    fact = context.facts[layer]
    layout = family_layout(family)
    matrix = torch.as_tensor(action.matrix).double()
    where = f"layer {layer}, {action.op}"
    if tuple(matrix.shape) != (fact.hidden_size, fact.hidden_size):
        raise PlanError(f"{where}: the matrix is {tuple(matrix.shape)}; the hidden size is {fact.hidden_size}")
    if any(a.op in ("merge_experts", "slice_neurons") for a in plan.actions.get(layer, [])):
        raise PlanError(f"{where}: combine it with merges or neuron slicing in separate plans")
    if fact.experts and layout.shared_modules and layout.shared_channels is None:
        raise PlanError(f"{where}: routers/{layout.family}.toml has no [shared_channels] keys, so the shared experts' "
                        "output cannot be transformed with the routed experts'")
    edit = Edit()
    for spec, width in ((layout.dense_mlp, fact.dense_width), (layout.shared_channels, fact.shared_width)):
        if spec is not None and width:
            name = spec.name(layer, "down")
            edit.tensors[name] = LeftMultiply(matrix, Take(name))
            if f"{spec.module}.{spec.down}" in fact.output_biases:
                edit.tensors[spec.name(layer, "down", "bias")] = LeftMultiply(matrix, Take(spec.name(layer, "down", "bias")))
    if fact.experts:
        kept = plan.layers.get(layer, range(fact.experts))
        folded = ("down", "down_bias")
        edit.experts[layer] = [{proj: LeftMultiply(matrix, Take(ExpertRef(layer, e, proj))) if proj in folded
                                else Take(ExpertRef(layer, e, proj)) for proj in layout.projections} for e in kept]
    elif not edit.tensors:
        raise PlanError(f"{where}: layer {layer} has no feed-forward block moeprune knows (no experts, no [dense_mlp])")
    return edit


@register_op("drop_layer", context=True)
def drop_layer(family, layer: int, action, plan: Plan, *, context: DenseContext) -> Edit:
    """Remove decoder layer ``layer`` whole (the executors renumber the later layers)."""
    if layer not in context.facts:
        raise PlanError(f"the model has no decoder layer {layer}")
    return Edit(dropped_layers={layer})


# -- the whole plan: config keys, the moeprune section, verification --------------------------------


def _new_shapes(plan: Plan, context: DenseContext, edit: Edit) -> dict[int, tuple]:
    """Original layer -> (attention (heads, kv_heads) or None, dense width, shared width) after the plan,
    for kept layers."""
    out = {}
    for layer, fact in context.facts.items():
        if layer in edit.dropped_layers:
            continue
        attention = (fact.attention.heads, fact.attention.kv_heads) if fact.attention else None
        dense, shared = fact.dense_width, fact.shared_width
        for action in plan.actions.get(layer, []):
            if action.op == "drop_attention_heads":
                heads, groups = kept_heads(fact.attention, action, layer)
                attention = (len(heads), len(groups))
            elif action.op == "slice_channels" and action.target == "dense_mlp":
                dense = len(action.kept)
            elif action.op == "slice_channels":
                shared = len(action.kept)
        out[layer] = (attention, dense, shared)
    return out


def _uniform(values: list) -> bool:
    return len(set(values)) == 1


def _width_config(family, key: str, spec, slot: int, shapes: dict, context: DenseContext, touched: bool,
                  force_section: bool) -> tuple[dict, dict]:
    """(config keys, section entries) for the dense-MLP (slot 1) or shared-expert (slot 2) widths."""
    if not touched:
        return {}, {}
    source = {layer: (f.dense_width, f.shared_width)[slot - 1] for layer, f in context.facts.items()}
    widths = {layer: s[slot] for layer, s in shapes.items() if s[slot] is not None}
    expert_key = family.spec["config"].get("expert_width", "intermediate_size")
    if not force_section and spec.width_key and spec.width_key != expert_key and _uniform(list(widths.values())):
        return {spec.width_key: next(iter(widths.values()))}, {}
    return {}, {key: {str(layer): w for layer, w in widths.items() if w != source[layer]}}


def dense_config(family, plan: Plan, context: DenseContext, edit: Edit, force_section: bool = False) -> tuple[dict, dict]:
    """(stock config keys, ``moeprune`` section entries, original numbering) of the plan's head and width
    changes; ``force_section``: record even uniform changes in the section (for a stock key that other
    modules also read, e.g. MiniMax's lightning-attention layers read num_attention_heads too)."""
    layout = family_layout(family)
    shapes = _new_shapes(plan, context, edit)
    ops = {(a.op, getattr(a, "target", None)) for actions in plan.actions.values() for a in actions}
    values: dict = {}
    section: dict = {}
    if ("drop_attention_heads", None) in ops:
        spec = layout.attention
        counts = {layer: s[0] for layer, s in shapes.items() if s[0] is not None}
        head_dims = {context.facts[layer].attention.head_dim for layer in counts}
        if not force_section and _uniform(list(counts.values())) and len(head_dims) == 1:
            heads, kv_heads = next(iter(counts.values()))
            values.update({spec.heads_key: heads, spec.kv_heads_key: kv_heads, spec.head_dim_key: head_dims.pop()})
            if spec.head_dim_v4 == "derived":
                logger.warning("transformers 4.x computes %s's head size as hidden_size / %s, so this head-pruned "
                               "checkpoint loads in transformers 5 only (4.x refuses it with a size mismatch)",
                               family.name, spec.heads_key)
        else:
            source = {layer: (f.attention.heads, f.attention.kv_heads) for layer, f in context.facts.items() if f.attention}
            section[ATTENTION_HEADS] = {str(layer): list(c) for layer, c in counts.items() if c != source[layer]}
    for slot, key, spec, target in ((1, MLP_WIDTHS, layout.dense_mlp, "dense_mlp"),
                                    (2, SHARED_WIDTHS, layout.shared_channels, "shared_experts")):
        more_values, more_section = _width_config(family, key, spec, slot, shapes, context, ("slice_channels", target) in ops,
                                                  force_section)
        values.update(more_values)
        section.update(more_section)
    new_biases = _new_output_biases(family, plan, context)
    if new_biases:
        section[OUTPUT_BIASES] = new_biases
    return values, section


def _new_output_biases(family, plan: Plan, context: DenseContext) -> dict[str, list[str]]:
    """{layer: output projections the plan gives a bias they do not have}."""
    layout = family_layout(family)
    out: dict[str, list[str]] = {}
    for layer, actions in plan.actions.items():
        for action in actions:
            if not getattr(action, "output_bias", ()):
                continue
            if action.op == "drop_attention_heads":
                path = f"{layout.attention.module}.{layout.attention.o}"
            else:
                spec = layout.dense_mlp if action.target == "dense_mlp" else layout.shared_channels
                path = f"{spec.module}.{spec.down}"
            if path not in context.facts[layer].output_biases:
                out.setdefault(str(layer), []).append(path)
    return out


def drop_layers_config(config_dict: Mapping, edit: Edit) -> dict:
    """The config keys that change when ``edit.dropped_layers`` go (see the module docstring)."""
    dropped = edit.dropped_layers
    total = int(config_dict["num_hidden_layers"])
    values: dict = {"num_hidden_layers": total - len(dropped)}
    for key, value in config_dict.items():
        if key in PER_LAYER_LISTS and isinstance(value, list):
            if len(value) != total:
                raise PlanError(f"config.json's {key!r} has {len(value)} entries for {total} layers; fix the config first")
            values[key] = [v for i, v in enumerate(value) if i not in dropped]
        elif key in INDEX_LISTS and isinstance(value, list):
            values[key] = [edit.new_index(i) for i in value if i not in dropped]
        elif key in LAYER_THRESHOLDS and isinstance(value, int) and not isinstance(value, bool):
            values[key] = sum(1 for i in range(min(value, total)) if i not in dropped)
        elif isinstance(value, list) and len(value) == total and total > 1 and key not in values:
            raise PlanError(f"config.json's {key!r} looks like a per-layer list moeprune does not know; it cannot keep it "
                            "consistent when dropping layers")
    for period_key, offset_key in PERIODIC:
        period, offset = config_dict.get(period_key), config_dict.get(offset_key)
        if isinstance(period, int) and isinstance(offset, int) and period > 0:
            kept = [i % period == offset for i in range(total) if i not in dropped]
            found = periodic_pattern(kept)
            if found is not None:
                values[period_key], values[offset_key] = found
    step = config_dict.get("decoder_sparse_step")
    if isinstance(step, int) and step > 1 and "mlp_only_layers" in config_dict:
        dense = set(config_dict.get("mlp_only_layers") or [])
        moe = [i for i in range(total) if i not in dense and (i + 1) % step == 0]
        values["decoder_sparse_step"] = 1
        values["mlp_only_layers"] = [edit.new_index(i) for i in range(total) if i not in dropped and i not in moe]
    return values


def periodic_pattern(members: list[bool]) -> tuple[int, int] | None:
    """The smallest (period, offset) with ``members[i] == (i % period == offset)`` for every i, or None
    (then the config cannot say which layers have the feature, and verification refuses the plan)."""
    for period in range(1, len(members) + 2):
        for offset in range(period):
            if all(member == (i % period == offset) for i, member in enumerate(members)):
                return period, offset
    return None


def renumber_section(section: Mapping, edit: Edit) -> dict:
    """The section's per-layer entries (``{"<layer>": ...}``) in the numbering after the layer drops."""
    out = {}
    for key, value in section.items():
        if isinstance(value, Mapping) and value and all(str(k).isdigit() for k in value):
            value = {str(edit.new_index(int(k))): v for k, v in value.items() if edit.new_index(int(k)) is not None}
        out[key] = value
    return out


def finish_dense_edit(family, plan: Plan, edit: Edit, context: DenseContext) -> None:
    """Set ``edit.config`` for the plan's dense actions and layer drops (section renumbered), then
    verify the result (:func:`verify_structure`); when the stock keys cannot express a uniform change
    (another module reads them too), the section records it instead; a PlanError before any weight
    is read when neither loads as pruned."""
    base = dict(edit.config)
    try:
        _set_dense_config(family, plan, edit, context, force_section=False)
    except PlanError as first:
        edit.config = base
        _set_dense_config(family, plan, edit, context, force_section=True)
        logger.info("the stock config keys cannot express this plan (%s); the moeprune section records it", first)


def _set_dense_config(family, plan: Plan, edit: Edit, context: DenseContext, force_section: bool) -> None:
    values, section = dense_config(family, plan, context, edit, force_section)
    source_dict = context.config.to_dict()
    if edit.dropped_layers:
        values.update(drop_layers_config(source_dict, edit))
    existing = read_section(source_dict)
    merged = {**existing, **edit.config.get(SECTION, {}), **section}
    merged.pop("format", None)
    merged = {k: v for k, v in renumber_section(merged, edit).items() if v != {}}
    edit.config.update(values)
    edit.config.pop(SECTION, None)
    if merged:
        edit.config.update(section_config(merged))
    verify_structure(family, context, edit)


def _signature(module: nn.Module) -> dict[str, Any]:
    """Parameter names -> shapes, and the behaviour attributes of every submodule, of one decoder layer."""
    out: dict[str, Any] = {name: tuple(p.shape) for name, p in module.named_parameters()}
    for name, sub in module.named_modules():
        for attribute in BEHAVIOUR_ATTRIBUTES:
            value = getattr(sub, attribute, None)
            if isinstance(value, (str, int, bool)):
                out[f"{name}:{attribute}"] = value
    return out


def _config_with(config, values: Mapping):
    """A fresh config of the same class from ``config`` with ``values`` set (as from_pretrained reads it)."""
    data = {**config.to_dict(), **values}
    if SECTION not in values:
        data.pop(SECTION, None)
    return type(config).from_dict(data)


def verify_structure(family, context: DenseContext, edit: Edit) -> None:
    """PlanError unless the config the edit writes builds (with ``moeprune.load``'s handlers) a model
    whose every kept layer has exactly the parameters, shapes and attention behaviour the edit gives
    that layer (routed-expert and router shapes are the expert ops' business and not compared)."""
    old = units.prepared_skeleton(family, context.config)
    new_config = _config_with(context.config, edit.config)
    new = units.prepared_skeleton(family, new_config)
    layout = family_layout(family)
    source = ModelSource(old, family)
    expected_shapes = {layout.memory_name(name): recipe.shape(source) for name, recipe in edit.tensors.items()}
    new_layers = new.model.layers
    if len(new_layers) != len(old.model.layers) - len(edit.dropped_layers):
        raise PlanError(f"the edited config builds {len(new_layers)} layers, not {len(old.model.layers) - len(edit.dropped_layers)}")
    skip = (layout.experts_module + ".", layout.router_modules + ".")
    for index, layer_module in enumerate(old.model.layers):
        new_index = edit.new_index(index)
        if new_index is None:
            continue
        prefix = layer_prefix(index)
        want = _signature(layer_module)
        for name, shape in expected_shapes.items():
            if name.startswith(prefix) and not name[len(prefix):].startswith(skip):
                want[name[len(prefix):]] = tuple(shape)
        have = _signature(new_layers[new_index])
        for name in set(want) | set(have):
            if name.startswith(skip) and ":" not in name:  # the expert ops' business (compact widths: other names)
                continue
            if want.get(name) != have.get(name):
                raise PlanError(
                    f"layer {index} (layer {new_index} after the plan) would not load as pruned: {name} is "
                    f"{have.get(name, 'absent')} in the model the edited {context.config.model_type} config builds, "
                    f"{want.get(name, 'absent')} in the pruned weights; moeprune cannot express this change in the config "
                    "(drop other layers, or keep widths uniform)"
                )


# -- moeprune.load: resize modules on the meta skeleton ------------------------------------------------


def _replace_linear(parent: nn.Module, name: str, in_features: int, out_features: int) -> None:
    old = getattr(parent, name)
    weight = old.weight
    setattr(parent, name, nn.Linear(in_features, out_features, bias=old.bias is not None, device=weight.device,
                                    dtype=weight.dtype))


def prepare_attention_heads(model: nn.Module, family, value: Mapping) -> set[str]:
    """Resize listed layers' q/k/v/o (and sinks) to [heads, kv_heads] on the meta skeleton."""
    spec = family_layout(family).attention
    facts = units.model_facts(family, model)
    for layer, (heads, kv_heads) in value.items():
        fact = facts[int(layer)]
        attention = units.check_attention(family, fact)
        module = decoder_layer_list(model)[int(layer)].get_submodule(spec.module)
        hidden, d, f = fact.hidden_size, attention.head_dim, attention.q_rows_per_head
        _replace_linear(module, spec.q, hidden, heads * f * d)
        _replace_linear(module, spec.k, hidden, kv_heads * d)
        _replace_linear(module, spec.v, hidden, kv_heads * d)
        _replace_linear(module, spec.o, heads * d, hidden)
        if attention.sinks:
            old = getattr(module, spec.sinks)
            setattr(module, spec.sinks, nn.Parameter(torch.empty(heads, device=old.device, dtype=old.dtype)))
        for attribute, number in _resize_attributes("", spec, heads, kv_heads, d, f)[""].items():
            if hasattr(module, attribute):
                setattr(module, attribute, number)
    return set()


def _prepare_widths(target: str):
    def prepare(model: nn.Module, family, value: Mapping) -> set[str]:
        facts = units.model_facts(family, model)
        for layer, width in value.items():
            fact = facts[int(layer)]
            spec, _ = units.channel_spec_and_width(family, fact, target)
            module = decoder_layer_list(model)[int(layer)].get_submodule(spec.module)
            _replace_linear(module, spec.gate, fact.hidden_size, width)
            _replace_linear(module, spec.up, fact.hidden_size, width)
            _replace_linear(module, spec.down, width, fact.hidden_size)
            if hasattr(module, "intermediate_size"):
                module.intermediate_size = width
        return set()

    return prepare


def prepare_output_biases(model: nn.Module, family, value: Mapping) -> set[str]:
    """Give the listed output projections a (meta) bias, filled from the checkpoint by name."""
    for layer, paths in value.items():
        for path in paths:
            linear = decoder_layer_list(model)[int(layer)].get_submodule(path)
            weight = linear.weight
            linear.bias = nn.Parameter(torch.empty(weight.shape[0], device=weight.device, dtype=weight.dtype))
    return set()


HANDLERS_PREPARE = {ATTENTION_HEADS: prepare_attention_heads, MLP_WIDTHS: _prepare_widths("dense_mlp"),
                    SHARED_WIDTHS: _prepare_widths("shared_experts"), OUTPUT_BIASES: prepare_output_biases}
for _key, _prepare in HANDLERS_PREPARE.items():  # new biases after the resizes (which replace the Linear modules)
    register_structure(StructureHandler(_key, prepare=_prepare,
                                        after=(ATTENTION_HEADS, MLP_WIDTHS, SHARED_WIDTHS) if _key == OUTPUT_BIASES else ()))
