"""Expert ops: recipes that keep a subset of a MoE layer's routed experts.

What changes together when experts go (original numbering ``kept``): the routed experts (kept ones
renumbered 0..E'-1; on disk per-expert files renamed, fused blocks sliced along the expert axis),
the router's rows (weight, bias, ``e_score_correction_bias``: every router tensor the family lists),
the router/experts modules' ``num_experts``, and every config key old and new transformers read for
the expert count (with ``collapse_groups``: n_group = topk_group = 1).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import MoePruneError, PlanError
from ..layout import FamilyLayout, model_experts_module
from ..structure import StructureHandler, register_structure
from .edit import Edit
from .recipe import ExpertRef, RenumberExpertIds, Select, Take

#: ``moeprune`` config section key: routed experts per MoE layer when they differ across layers.
EXPERTS_PER_LAYER = "experts_per_layer"


def keep_experts(layout: FamilyLayout, layer: int, kept: Sequence[int], *, collapse_groups: bool = False) -> Edit:
    """The edit keeping routed experts ``kept`` (in this order) of MoE layer ``layer``."""
    kept = [int(e) for e in kept]
    edit = Edit()
    for name in layout.router_keys(layer):
        edit.tensors[name] = Select(Take(name), layout.router_axis(name), tuple(kept))
    for name in layout.optional_router_keys(layer):  # where the layer has them (DeepSeek-V4's correction bias)
        edit.tensors[name] = Select(Take(name), layout.router_axis(name), tuple(kept))
        edit.optional.add(name)
    renumber_id_tables(edit, layout, layer, {e: i for i, e in enumerate(kept)})
    edit.experts[layer] = [{proj: Take(ExpertRef(layer, e, proj)) for proj in layout.projections} for e in kept]
    attributes = {"num_experts": len(kept)}
    if collapse_groups:
        attributes.update(num_group=1, topk_group=1)
    edit.attributes[layout.memory_layer_prefix(layer) + layout.router_modules] = attributes
    return edit


def renumber_id_tables(edit: Edit, layout: FamilyLayout, layer: int, new_ids: dict[int, int]) -> None:
    """Where the layer has an expert-id table (DeepSeek-V4's hash-routing ``tid2eid``): every original
    expert's new id (``new_ids``: a kept expert's index, a merged member's cluster), dropped ones remapped."""
    for name in layout.expert_id_table_keys(layer):
        edit.tensors[name] = RenumberExpertIds(Take(name), tuple(new_ids.items()))
        edit.optional.add(name)


def add_router_tail(edit: Edit, family, layer: int, tail: int, num_experts: int) -> None:
    """The router rows after the routed experts' (``tail`` of them: LongCat-Flash's zero-computation
    experts, Inkling's shared experts) are never pruned: after a layer's new routed experts (already in
    ``edit``, from :func:`keep_experts`), the router tensors ``[disk] router_tail`` names keep rows
    ``num_experts .. num_experts + tail - 1`` after the kept rows; LongCat-Flash's experts block keeps the
    identity experts' (unused) gate/up rows; the modules' expert counts (``[modules.counts]``) follow."""
    layout = family.layout
    if not any(name in edit.tensors for name in layout.router_tail_keys(layer)):
        return  # the router keeps every row (ZAYA's neuron slices keep every expert): its tail stays as it is
    rows = tuple(range(num_experts, num_experts + tail))
    routed = len(edit.experts[layer])
    for name in layout.router_tail_keys(layer):
        select = edit.tensors.get(name)
        if not (isinstance(select, Select) and select.dim == 0 and isinstance(select.base, Take)):
            raise PlanError(f"{family.name}: layer {layer}'s router rows are not a selection of kept experts; only "
                            "dropping experts keeps its identity experts exact")
        edit.tensors[name] = Select(select.base, 0, select.index + rows)
    if layout.identity_experts:
        edit.experts[layer] = [*edit.experts[layer], *({proj: Take(ExpertRef(layer, e, proj)) for proj in ("gate", "up")}
                                                       for e in rows)]
    for path, values in family.count_attributes(routed, tail).items():
        edit.attributes.setdefault(layout.memory_layer_prefix(layer) + path, {}).update(values)


def _check_expert_counts(model, family, value) -> None:
    """After ``moeprune.load``: every MoE layer holds the number of experts the section records."""
    for layer, count in value.items():
        held = model_experts_module(model, family, int(layer)).num_experts
        if held != count:
            raise MoePruneError(f"MoE layer {layer} holds {held} experts but config.json's moeprune section says {count}; "
                                "the checkpoint's files do not match its config")


# per-layer expert counts need nothing beyond the generic load (counts come from the files); the
# handler checks them against the section
register_structure(StructureHandler(EXPERTS_PER_LAYER, finish=_check_expert_counts))
