"""Ops: a plan's actions as tensor recipes (:mod:`.recipe`), gathered in one :class:`~.edit.Edit`.

:func:`plan_edit` turns a validated plan into the edit both executors run: the streaming writer
(:func:`moeprune.write.write_edit`) and the in-memory executor (:func:`.memory.apply_edit`). Actions
that later issues implement are refused here, before any weight is read, with a PlanError naming
what is missing.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import PlanError
from ..plan import Plan
from .edit import CheckpointSource, Edit, ModelSource
from ..structure import section_config
from .experts import EXPERTS_PER_LAYER, keep_experts
from .memory import apply_edit, set_attributes, set_config
from .recipe import Concat, ExpertRef, NewTensor, Recipe, Select, Take, WeightedSum

__all__ = [
    "CheckpointSource", "Concat", "Edit", "ExpertRef", "ModelSource", "NewTensor", "Recipe", "Select", "Take",
    "WeightedSum", "apply_edit", "config_edit", "set_attributes", "keep_experts", "plan_edit", "register_op", "set_config",
    "uniform_kept_count",
]

#: action op name (``Action.op``) -> ``build(family, layer, action, plan) -> Edit``.
OP_BUILDERS: dict[str, Callable] = {}


def register_op(action_op: str) -> Callable[[Callable], Callable]:
    """Decorator registering the builder of one plan action's :class:`Edit`: ``build(family, layer,
    action, plan) -> Edit`` (header facts only; no weight read). A new action type is one module in
    this package with one ``@register_op`` function, plus ``implemented = True`` on its class."""
    def register(build: Callable) -> Callable:
        if action_op in OP_BUILDERS:
            raise ValueError(f"an op for action {action_op!r} is already registered")
        OP_BUILDERS[action_op] = build
        return build

    return register


@register_op("keep_experts")
def _keep_experts_edit(family, layer: int, action, plan: Plan) -> Edit:
    return keep_experts(family.layout, layer, action.experts, collapse_groups=plan.collapse_groups)


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
    (no ``keep_experts`` action: it may slice, merge or prune dense blocks instead)."""
    if not plan.layers:
        return {}
    counts = plan.kept_counts()
    if len(set(counts.values())) == 1:
        values = {key: next(iter(counts.values())) for key in family.num_experts_keys}
    else:  # the stock keys keep the largest count; moeprune.load reads the per-layer counts
        values = {key: max(counts.values()) for key in family.num_experts_keys}
        values.update(section_config({EXPERTS_PER_LAYER: {str(layer): n for layer, n in counts.items()}}))
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
                    "moeprune can only write plans that keep experts for now"
                )


def plan_edit(family, plan: Plan) -> Edit:
    """The :class:`Edit` of a validated plan for a :class:`~moeprune.arch.Family` (header facts only)."""
    refuse_unimplemented(plan)
    edit = Edit()
    for layer, actions in plan.layer_actions().items():
        for action in actions:
            edit.update(OP_BUILDERS[action.op](family, layer, action, plan))
    edit.config.update(config_edit(family, plan))
    return edit


from . import neurons  # noqa: E402,F401  (registers the slice_neurons op and the expert_widths structure key)
