"""Ops: a plan's actions as tensor recipes (:mod:`.recipe`), gathered in one :class:`~.edit.Edit`.

:func:`plan_edit` turns a validated plan into the edit both executors run: the streaming writer
(:func:`moeprune.write.write_edit`) and the in-memory executor (:func:`.memory.apply_edit`). Actions
that later issues implement are refused here, before any weight is read, with a PlanError naming
what is missing.
"""

from __future__ import annotations

from ..errors import PlanError
from ..plan import KeepExperts, Plan
from .edit import CheckpointSource, Edit, ModelSource
from .experts import keep_experts
from .memory import apply_edit, set_attributes, set_config
from .recipe import Concat, ExpertRef, NewTensor, Recipe, Select, Take, WeightedSum

__all__ = [
    "CheckpointSource", "Concat", "Edit", "ExpertRef", "ModelSource", "NewTensor", "Recipe", "Select", "Take",
    "WeightedSum", "apply_edit", "config_edit", "set_attributes", "keep_experts", "plan_edit", "set_config", "uniform_kept_count",
]


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
    """config.json keys a plan sets: every expert-count key old and new transformers read, and
    n_group = topk_group = 1 with ``collapse_groups``."""
    kept = uniform_kept_count(plan)
    values = {key: kept for key in family.num_experts_keys}
    if plan.collapse_groups:
        for key in ("n_group", "topk_group"):
            if key in family.spec["config"]:
                values[family.spec["config"][key]] = 1
    return values


def refuse_unimplemented(plan: Plan) -> None:
    """PlanError for the first action the ops cannot write yet, naming what is missing."""
    for layer, actions in plan.layer_actions().items():
        for action in actions:
            if not action.implemented:
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
            if isinstance(action, KeepExperts):
                edit.update(keep_experts(family.layout, layer, action.experts, collapse_groups=plan.collapse_groups))
    edit.config.update(config_edit(family, plan))
    return edit
