"""``coactivation[i, j]``: valid tokens whose selected set contains both i and j (combine: sum).

The diagonal equals ``frequency``.
"""

from __future__ import annotations

import torch

from .base import ROUTING, LayerForward, Observer, register_observer


@register_observer
class Coactivation(Observer):
    name = "coactivation"
    entries = {"coactivation": "sum"}
    needs = frozenset({ROUTING})

    def __init__(self, context):
        super().__init__(context)
        self.counts = self.zeros(context.num_experts * context.num_experts)

    def update(self, forward: LayerForward) -> None:
        E = self.context.num_experts
        selected = forward.top_k_index[forward.valid].to(self.counts.device)
        pair_ids = (selected.unsqueeze(-1) * E + selected.unsqueeze(-2)).reshape(-1)
        routed = ((selected.unsqueeze(-1) < E) & (selected.unsqueeze(-2) < E)).reshape(-1)  # identity slots skipped
        self.counts += torch.bincount(pair_ids[routed], minlength=E * E).double()

    def result(self):
        E = self.context.num_experts
        return {"coactivation": self.counts.reshape(E, E).cpu()}
