"""``expert_outputs``: magnitudes of the routed experts' outputs f_j(x) on their routed tokens.

* ``ean_sum[j] = sum over S_j of ||f_j(x)||``  (EAN, combine: sum)
* ``reap_sum[j] = sum over S_j of g_j(x) ||f_j(x)||``  (REAP, combine: sum)
* ``max_abs_output[j] = max over S_j and channels of |f_j(x)|``  (super experts, combine: max)

f_j is evaluated on routed tokens only, exactly as the model computes it (see
:func:`moeprune.collect.routed_expert_outputs`).
"""

from __future__ import annotations

from .base import EXPERT_OUTPUTS, ROUTING, LayerForward, Observer, register_observer


@register_observer
class ExpertOutputNorms(Observer):
    name = "expert_outputs"
    entries = {"ean_sum": "sum", "reap_sum": "sum", "max_abs_output": "max"}
    needs = frozenset({ROUTING, EXPERT_OUTPUTS})

    def __init__(self, context):
        super().__init__(context)
        self.ean_sum = self.zeros(context.num_experts)
        self.reap_sum = self.zeros(context.num_experts)
        self.max_abs_output = self.zeros(context.num_experts)

    def update(self, forward: LayerForward) -> None:
        device = self.ean_sum.device
        expert = forward.pair_expert.to(device)
        norm = forward.pair_norm.to(device)
        output = forward.pair_output
        peak = output.abs().amax(dim=-1).double().to(device) if output.numel() else norm
        self.ean_sum.index_add_(0, expert, norm)
        self.reap_sum.index_add_(0, expert, forward.pair_gate.to(device) * norm)
        self.max_abs_output = self.max_abs_output.scatter_reduce(0, expert, peak, reduce="amax")

    def result(self):
        return {"ean_sum": self.ean_sum.cpu(), "reap_sum": self.reap_sum.cpu(), "max_abs_output": self.max_abs_output.cpu()}
