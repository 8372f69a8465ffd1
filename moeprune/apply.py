"""Former home of the pruning writer; kept so that existing imports keep working.

The writer is now :mod:`moeprune.write` (recipes -> sharded checkpoint) and the ops
:mod:`moeprune.ops` (a plan's actions as tensor recipes); the names below delegate to them.
"""

from __future__ import annotations

from torch import nn

from .arch import Family, family_for_model_type, text_model
from .ops import apply_edit, plan_edit, set_config, uniform_kept_count
from .plan import Plan
from .write import finish_output, pruned_config_dict, save_in_memory_pruned, write_config, write_pruned_checkpoint

__all__ = [
    "apply_plan_in_memory", "finish_output", "pruned_config_dict", "save_in_memory_pruned",
    "set_pruned_config", "uniform_kept_count", "write_config", "write_pruned_checkpoint",
]


def apply_plan_in_memory(model: nn.Module, plan: Plan) -> nn.Module:
    """Apply ``plan`` to a loaded model in place (the in-memory executor on the plan's recipes); returns it.

    A vanilla model holds one expert count, so the plan must keep the same number in every layer. A whole
    multimodal model (a wrapper's own class) is edited through its text decoder (:func:`~moeprune.arch.text_model`):
    its towers stay as they are and the expert counts go into its text config.
    """
    family = family_for_model_type(model.config.model_type)
    text = text_model(model)
    apply_edit(text, family, plan_edit(family, plan, model=text))
    return model


def set_pruned_config(config, family: Family, plan: Plan) -> None:
    """Set on a loaded model's ``config`` every key the plan changes."""
    set_config(config, pruned_config_dict(config.to_dict(), family, plan))
