"""Ops: a plan's actions as tensor recipes (:mod:`.recipe`), gathered in one :class:`~.edit.Edit`.

:func:`plan_edit` turns a validated plan into the edit both executors run: the streaming writer
(:func:`moeprune.write.write_edit`) and the in-memory executor (:func:`.memory.apply_edit`). Actions
that later issues implement are refused here, before any weight is read, with a PlanError naming
what is missing.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import PlanError
from ..layout import layer_prefix
from ..plan import Plan
from .edit import CheckpointSource, Edit, ModelSource
from ..structure import section_config
from .experts import EXPERTS_PER_LAYER, add_router_tail, keep_experts
from .memory import apply_edit, set_attributes, set_config
from .merge import EXPERT_MAP, expert_map, merge_experts, merged_counts
from .recipe import Concat, ExpertRef, NewTensor, Recipe, Select, Take, WeightedSum

__all__ = [
    "CheckpointSource", "Concat", "Edit", "ExpertRef", "ModelSource", "NewTensor", "Recipe", "Select", "Take",
    "WeightedSum", "apply_edit", "config_edit", "set_attributes", "keep_experts", "plan_edit", "register_op", "set_config",
    "uniform_kept_count", "EXPERT_MAP", "merge_experts",
]

#: action op name (``Action.op``) -> ``build(family, layer, action, plan) -> Edit``.
OP_BUILDERS: dict[str, Callable] = {}
#: ops whose builder also takes ``context=`` (a :class:`.dense.DenseContext`: the model's config and
#: per-layer shapes), the dense ops
CONTEXT_OPS: set[str] = set()


def register_op(action_op: str, *, context: bool = False) -> Callable[[Callable], Callable]:
    """Decorator registering the builder of one plan action's :class:`Edit`: ``build(family, layer,
    action, plan) -> Edit`` (header facts only; no weight read). A new action type is one module in
    this package with one ``@register_op`` function, plus ``implemented = True`` on its class.
    ``context=True``: the builder is called with ``context=`` (:class:`.dense.DenseContext`)."""
    def register(build: Callable) -> Callable:
        if action_op in OP_BUILDERS:
            raise ValueError(f"an op for action {action_op!r} is already registered")
        OP_BUILDERS[action_op] = build
        if context:
            CONTEXT_OPS.add(action_op)
        return build

    return register


@register_op("keep_experts")
def _keep_experts_edit(family, layer: int, action, plan: Plan) -> Edit:
    return keep_experts(family.layout, layer, action.experts, collapse_groups=plan.collapse_groups)


@register_op("merge_experts")
def _merge_experts_edit(family, layer: int, action, plan: Plan) -> Edit:
    return merge_experts(family.layout, layer, action, collapse_groups=plan.collapse_groups)


def uniform_kept_count(plan: Plan) -> int:
    """The single number of experts every MoE layer keeps; non-uniform plans are refused."""
    counts = {len(kept) for kept in plan.layers.values()}
    if len(counts) != 1:
        raise PlanError(
            f"the plan keeps different numbers of experts per layer ({sorted(counts)}); a vanilla "
            "transformers checkpoint holds one expert count per model, so use a uniform --ratio/--keep"
        )
    return counts.pop()


def config_edit(family, plan: Plan) -> dict:
    """config.json keys a plan sets: every expert-count key old and new transformers read (a plan
    keeping different counts per layer: the largest, with the per-layer counts in the ``moeprune``
    section, :data:`EXPERTS_PER_LAYER`, for ``moeprune.load``), and
    n_group = topk_group = 1 with ``collapse_groups``; nothing for a plan that keeps every expert
    (no ``keep_experts`` action: it may slice, merge or prune dense blocks instead). Merged layers
    count their clusters; exact-router merges add their :data:`~.merge.EXPERT_MAP`."""
    counts = {**plan.kept_counts(), **merged_counts(plan)}  # a merge in a layer that also keeps: its clusters
    if not counts:
        return {}
    section = {}
    if family.expert_count_shared:  # the stock key also sizes other modules (JetMoE's attention experts): it stays
        values = {}
        if set(counts.values()) != {plan.num_experts}:
            section[EXPERTS_PER_LAYER] = {str(layer): n for layer, n in sorted(counts.items())}
    elif len(set(counts.values())) == 1:
        values = {key: next(iter(counts.values())) for key in family.num_experts_keys}
    else:  # the stock keys keep the largest count; moeprune.load reads the per-layer counts
        values = {key: max(counts.values()) for key in family.num_experts_keys}
        section[EXPERTS_PER_LAYER] = {str(layer): n for layer, n in sorted(counts.items())}
    if expert_map(plan):  # exact-router merges: every original logit mapped to its cluster
        section[EXPERT_MAP] = expert_map(plan)
    if section:
        values.update(section_config(section))
    if plan.collapse_groups:
        for key in ("n_group", "topk_group"):
            if key in family.spec["config"]:
                values[family.spec["config"][key]] = 1
    return values


def refuse_unimplemented(plan: Plan) -> None:
    """PlanError for the first action the ops cannot write yet, naming what is missing."""
    for layer, actions in plan.layer_actions().items():
        for action in actions:
            if not action.implemented or action.op not in OP_BUILDERS:
                raise PlanError(
                    f"layer {layer}: the action {action.op!r} is not implemented yet (missing: {action.missing}); "
                    "this moeprune cannot write it yet"
                )


def _config(config, model):
    return config if config is not None else getattr(model, "config", None)


def _router_tail(family, config, model) -> int:
    config = _config(config, model)
    if config is None:
        if family.layout.router_tail:
            raise PlanError(f"{family.name}: applying a plan needs the model's config (its router's tail rows)")
        return 0
    return family.router_tail(config)


def plan_edit(family, plan: Plan, *, config=None, model=None) -> Edit:
    """The :class:`Edit` of a validated plan for a :class:`~moeprune.arch.Family` (header facts only).

    Dense actions (heads, channels, layers) need the model's ``config`` (or the loaded ``model``):
    their shapes and config keys come from the modules it builds (:mod:`.dense`)."""
    refuse_unimplemented(plan)
    edit = Edit()
    needs_context = any(a.op in CONTEXT_OPS for actions in plan.actions.values() for a in actions)
    context = DenseContext.of(family, config=config, model=model) if needs_context else None
    for layer, actions in plan.layer_actions().items():
        for action in actions:
            build = OP_BUILDERS[action.op]
            edit.update(build(family, layer, action, plan, context=context) if action.op in CONTEXT_OPS
                        else build(family, layer, action, plan))
    tail = _router_tail(family, config, model)
    if tail:  # LongCat-Flash's identity experts, Inkling's shared experts: after the kept routed experts, never pruned
        for layer in edit.experts:
            add_router_tail(edit, family, layer, tail, family.num_experts(_config(config, model)))
    else:  # the modules' expert counts ([modules.counts]; JetMoE's input_linear / output_linear / router)
        for layer, experts in edit.experts.items():
            for path, values in family.count_attributes(len(experts), 0).items():
                edit.attributes.setdefault(layer_prefix(layer) + path, {}).update(values)
    edit.config.update(config_edit(family, plan))
    if context is not None:
        finish_dense_edit(family, plan, edit, context)
    return edit


# the dense ops register themselves; they import register_op from here
from .dense import DenseContext, finish_dense_edit  # noqa: E402
from . import recombine  # noqa: E402,F401  (registers the recombine_neurons op, DERN)
from . import neurons  # noqa: E402,F401  (registers the slice_neurons op and the expert_widths structure key)
