"""ReplaceMe's fold: the recipes that multiply one decoder layer's MLP / MoE block output by T.

:class:`~moeprune.plan.actions.ReplaceLayers` on layer l (the last kept layer before a cut) says:
the block output M of layer l becomes M T. Every term of M is linear in its down projection
(dense MLP: W_down h; MoE: sum_j g_j(x) W_down,j h_j plus the shared experts' W_down h_s, gated or
not), so M T is exact by folding T into every down projection: W_down <- T^T W_down (and a down
bias b <- T^T b). The dropped layers themselves go with the plan's DropLayer actions (the layer-drop
op); this op is only the fold, so it composes with keep_experts on the same layer (the kept experts
are folded, in the plan's order).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import PlanError
from ..layout import layer_prefix
from ..plan.actions import DropLayer, ReplaceLayers
from . import register_op
from .edit import Edit
from .recipe import ExpertRef, Recipe, Source, Take

#: A dense layer's MLP down projection (transformers' name, also the stock on-disk name).
DENSE_MLP_DOWN = "mlp.down_proj.weight"


@dataclass(frozen=True, eq=False)
class LeftMultiply(Recipe):
    """``matrix @ base`` in float64, cast to the base's dtype (a [H, H] map applied to the output
    rows of a [H, I] weight or to a [H] bias)."""

    matrix: torch.Tensor
    base: Recipe

    def shape(self, source: Source) -> tuple[int, ...]:
        shape = self.base.shape(source)
        if shape[0] != self.matrix.shape[1]:
            raise PlanError(f"cannot fold a {list(self.matrix.shape)} transform into a tensor of shape {list(shape)}")
        return (self.matrix.shape[0], *shape[1:])

    def dtype(self, source: Source) -> torch.dtype:
        return self.base.dtype(source)

    def refs(self) -> Iterator:
        return self.base.refs()

    def evaluate(self, source: Source) -> torch.Tensor:
        tensor = self.base.evaluate(source)
        return (self.matrix.to(device=tensor.device, dtype=torch.float64) @ tensor.double()).to(tensor.dtype)


def fold_transform(family, layer: int, transform: torch.Tensor, plan, *, moe: bool) -> Edit:
    """The edit folding ``transform`` T into every down projection of decoder layer ``layer``:
    W_down <- T^T W_down, b_down <- T^T b_down (routed experts kept by ``plan``, shared experts),
    or the dense MLP's down_proj for a dense layer."""
    t_transposed = transform.detach().double().T.contiguous()
    layout = family.layout
    edit = Edit()
    prefix = layer_prefix(layer)
    if not moe:
        name = prefix + DENSE_MLP_DOWN
        edit.tensors[name] = LeftMultiply(t_transposed, Take(name))
        return edit
    kept = plan.layers.get(layer)
    if kept is None:
        if not plan.num_experts:
            raise PlanError("a replace_layers plan must record num_experts to fold into a MoE layer")
        kept = range(plan.num_experts)
    downs = {proj for proj in layout.projections if proj.startswith("down")}
    edit.experts[layer] = [
        {proj: LeftMultiply(t_transposed, Take(ExpertRef(layer, e, proj))) if proj in downs
         else Take(ExpertRef(layer, e, proj)) for proj in layout.projections}
        for e in kept
    ]
    for path in layout.shared_modules:
        name = f"{prefix}{path}.down_proj.weight"
        edit.tensors[name] = LeftMultiply(t_transposed, Take(name))
    return edit


def check_cut(layer: int, action: ReplaceLayers, plan) -> None:
    """PlanError unless the action sits on the layer just before its cut and the plan drops the cut."""
    dropped = list(action.dropped)
    if not dropped or dropped != list(range(dropped[0], dropped[0] + len(dropped))) or dropped[0] != layer + 1:
        raise PlanError(f"layer {layer}: replace_layers must list consecutive dropped layers starting at {layer + 1}, "
                        f"got {dropped}")
    missing = [d for d in dropped if not any(isinstance(a, DropLayer) for a in plan.actions.get(d, []))]
    if missing:
        raise PlanError(f"layer {layer}: replace_layers stands in for layers {dropped}, but the plan does not drop "
                        f"{missing}; add drop_layer actions there")


@register_op("replace_layers")
def _replace_layers_edit(family, layer: int, action: ReplaceLayers, plan) -> Edit:
    check_cut(layer, action, plan)
    return fold_transform(family, layer, action.transform, plan, moe=action.block == "moe")
