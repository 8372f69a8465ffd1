"""Pruning plans: the artifact, typed actions, budgets, expert selection and validation.

A :class:`Plan` says what to do to each decoder layer: which routed experts to KEEP (indices in the
original numbering) and, from plan format 2, other typed actions (:mod:`moeprune.plan.actions`).
It is produced from scores (:mod:`moeprune.scoring`) and a budget, validated against the model's
:class:`~moeprune.geometry.MoEGeometry` before any weight is read, and saved as JSON
(``moeprune_plan.json``) so that a prune can be reviewed, edited by hand and replayed.

Modules: :mod:`.model` (the plan and its JSON), :mod:`.actions`, :mod:`.budgets`,
:mod:`.selection`, :mod:`.validation`.
"""

from .actions import (
    ACTIONS,
    Action,
    DropAttentionHeads,
    DropLayer,
    KeepExperts,
    MergeCluster,
    MergeExperts,
    SliceChannels,
    SliceNeurons,
    TransformMlpOutput,
    action_from_json,
)
from .budgets import kept_from_ratio, resolve_budget, validate_budget
from .model import PLAN_FILENAME, PLAN_FORMAT_VERSION, Plan, utc_timestamp
from .selection import build_plan, select_experts, summarize_scores
from .validation import validate_actions, validate_plan

__all__ = [
    "ACTIONS", "Action", "DropAttentionHeads", "DropLayer", "KeepExperts", "MergeCluster", "MergeExperts",
    "PLAN_FILENAME", "PLAN_FORMAT_VERSION", "Plan", "SliceChannels", "SliceNeurons", "TransformMlpOutput",
    "action_from_json",
    "build_plan", "kept_from_ratio", "resolve_budget", "select_experts", "summarize_scores", "utc_timestamp",
    "validate_actions", "validate_budget", "validate_plan",
]
