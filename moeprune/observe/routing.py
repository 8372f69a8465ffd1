"""``routing``: how often and how strongly the router picks each expert (combine: sum).

With S_j the valid tokens whose selected set contains expert j and g_j(x) the gate weight the model
really multiplies expert j's output by (after renormalisation and scaling, as the model applies it):

* ``frequency[j] = |S_j|``
* ``soft_count[j] = sum over S_j of g_j(x)``
"""

from __future__ import annotations

import torch

from .base import ROUTING, LayerForward, Observer, register_observer


@register_observer
class RoutingCounts(Observer):
    name = "routing"
    entries = {"frequency": "sum", "soft_count": "sum"}
    needs = frozenset({ROUTING})

    def __init__(self, context):
        super().__init__(context)
        self.frequency = self.zeros(context.num_experts)
        self.soft_count = self.zeros(context.num_experts)

    def update(self, forward: LayerForward) -> None:
        valid = forward.valid
        expert = forward.top_k_index[valid].reshape(-1).to(self.frequency.device)
        gate = forward.top_k_weights[valid].reshape(-1).double().to(self.frequency.device)
        routed = expert < self.context.num_experts  # identity slots (LongCat-Flash) point past the experts
        expert, gate = expert[routed], gate[routed]
        self.frequency += torch.bincount(expert, minlength=self.context.num_experts).double()
        self.soft_count.index_add_(0, expert, gate)

    def result(self):
        return {"frequency": self.frequency.cpu(), "soft_count": self.soft_count.cpu()}
