"""Neuron op: recipes keeping some intermediate neurons of each routed expert (``slice_neurons``).

Neuron k of routed expert j is gate row k, up row k, down column k and gate/up bias entry k
(:func:`moeprune.units.neuron_unit`, the one definition); the recipes select those slices of the
canonical expert tensors (:mod:`moeprune.layout`), so the same recipes hold whether the family
stores its experts per expert, fused, interleaved (GPT-OSS: gate k at 2k, up k at 2k+1) or
transposed: the layout converts canonical experts to and from its storage.

config.json: when every routed expert of the model keeps the same width w (``layout=uniform``) and
the family's expert-width key (``[config] expert_width`` of routers/<family>.toml) sets nothing but
the routed experts' width, the key becomes w: a vanilla checkpoint. Otherwise (``layout=compact``,
super experts kept whole, or a family whose shared experts' width derives from the same key, such as
DeepSeek's ``moe_intermediate_size * n_shared_experts``) the stock keys stay and the per-expert widths
go to the ``moeprune`` section (:data:`moeprune.compact.EXPERT_WIDTHS`), loaded by ``moeprune.load``.
Families storing their experts fused on disk (GPT-OSS) cannot hold experts of different widths: the
op refuses that case.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..compact import EXPERT_WIDTHS
from ..errors import PlanError
from ..layout import layer_prefix
from ..plan import Plan, SliceNeurons
from ..structure import section_config
from .. import units  # a module reference: moeprune.units imports moeprune.ops (recipes)
from . import register_op
from .edit import Edit
from .recipe import ExpertRef, Recipe, Select, Take

#: plan.budget["layout"] values.
LAYOUTS = ("uniform", "compact")


def kept_neuron_recipes(family, layer: int, expert: int, kept: Sequence[int] | None) -> dict[str, Recipe]:
    """Canonical tensors of expert ``expert`` keeping neurons ``kept`` (in this order; None: all)."""
    recipes: dict[str, Recipe] = {proj: Take(ExpertRef(layer, expert, proj)) for proj in family.layout.projections}
    if kept is None:
        return recipes
    for piece in units.neuron_unit(family, layer, expert, 0).slices:  # which tensors a neuron spans, along which dim
        recipes[piece.ref.proj] = Select(Take(piece.ref), piece.dim, tuple(kept))
    return recipes


def neuron_widths(plan: Plan) -> dict[int, list[int]]:
    """Per sliced MoE layer, the width of each routed expert after the plan (experts not listed keep
    the source width, ``plan.budget["expert_width"]``)."""
    if not plan.num_experts:
        raise PlanError("a plan that slices neurons must record num_experts (the routed experts per layer)")
    source = int(plan.budget.get("expert_width") or 0)
    out = {}
    for layer, actions in sorted(plan.actions.items()):
        for action in actions:
            if isinstance(action, SliceNeurons):
                widths = action.widths()
                if len(widths) < plan.num_experts and not source:
                    raise PlanError(f"layer {layer}: slice_neurons lists {len(widths)} of {plan.num_experts} experts; list "
                                    "every expert or record the source width in the plan's budget (expert_width)")
                out[layer] = [widths.get(e, source) for e in range(plan.num_experts)]
    return out


def is_vanilla(plan: Plan) -> bool:
    """The plan's widths fit a stock config: one width everywhere, the uniform layout, and a family
    whose expert-width key sets nothing else (the planner's ``budget["vanilla"]``)."""
    widths = {w for layer in neuron_widths(plan).values() for w in layer}
    return (plan.budget.get("layout", "uniform") == "uniform" and plan.budget.get("vanilla", True)
            and len(widths) == 1)


def neuron_config(family, plan: Plan) -> dict:
    """config.json keys of a neuron-slicing plan: the family's expert-width key (vanilla), or the
    ``moeprune`` section's per-expert widths; a PlanError where the family cannot store them."""
    widths = neuron_widths(plan)
    if is_vanilla(plan):
        return {family.spec["config"]["expert_width"]: next(iter(widths.values()))[0]}
    if not family.layout.per_expert_on_disk:
        raise PlanError(f"{family.name} stores its routed experts fused on disk (one tensor per layer), which cannot "
                        "hold experts of different widths; slice with --layout uniform (and --no-protect-super-experts "
                        "if super experts would keep their full width)")
    return section_config({EXPERT_WIDTHS: {str(layer): w for layer, w in widths.items()}})


def widths_summary(plan: Plan) -> str:
    """Model-card lines of a neuron-slicing plan: per sliced layer, the experts' widths (empty for others)."""
    if not any(isinstance(a, SliceNeurons) for actions in plan.actions.values() for a in actions):
        return ""
    lines = []
    for layer, widths in neuron_widths(plan).items():
        lines.append(f"layer {layer}: widths {min(widths)}-{max(widths)} (mean {sum(widths) / len(widths):.1f}) "
                     f"of {plan.budget.get('expert_width', '?')}")
    return ", ".join(lines)


@register_op("slice_neurons")
def slice_neurons_edit(family, layer: int, action: SliceNeurons, plan: Plan) -> Edit:
    """The edit keeping ``action``'s neurons of each routed expert of MoE layer ``layer``."""
    if layer in plan.layers:
        raise PlanError(f"layer {layer} both keeps experts and slices neurons; do one per plan")
    layout = plan.budget.get("layout", "uniform")
    if layout not in LAYOUTS:
        raise PlanError(f"the plan's budget has layout {layout!r}; one of {', '.join(LAYOUTS)}")
    edit = Edit()
    edit.experts[layer] = [kept_neuron_recipes(family, layer, e, action.experts.get(e)) for e in range(plan.num_experts)]
    edit.config.update(neuron_config(family, plan))
    widths = set(neuron_widths(plan)[layer])
    if len(widths) == 1:  # transformers' experts modules record their width (unused by their forward)
        width = widths.pop()
        edit.attributes[layer_prefix(layer) + family.layout.experts_module] = {"intermediate_dim": width,
                                                                               "intermediate_size": width}
    return edit
