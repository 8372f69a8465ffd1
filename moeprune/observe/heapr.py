"""``heapr``: per-neuron sums for HEAPr (ICLR 2026) second-order neuron scores (opt-in; combine: sum).

For routed expert j, neuron k ("atomic expert": row k of W_gate and W_up, column k of W_down), with
h = act(x W_gate^T) * (x W_up^T) the expert's intermediate activation (the input of down_proj) and
S_j the valid tokens routed to j:

* ``heapr_h2_sum[j, k] = sum over S_j of h_k(x)^2``
* ``heapr_g2_sum[j, k] = sum over S_j of (dL/dh_k(x))^2``

where dL/dh is the exact gradient of the calibration loss (next-token cross-entropy, summed over the
valid predicted tokens: see :mod:`moeprune.calibration.backward`) with respect to the pair's h; it
carries the gate weight and everything the model does after the expert (dL/dh = W_down^T dL/df_j).
Both are plain sums over (token, expert) pairs, so shards of the data merge exactly; ``frequency``
(``routing``) gives |S_j|. Needs the gradients signal: the pass runs the layer-by-layer backward.
Width I is taken from the first forward.
"""

from __future__ import annotations

import torch

from ..errors import MoePruneError
from .base import EXPERT_INTERMEDIATE, GRADIENTS, ROUTING, LayerForward, Observer, register_observer


@register_observer
class HeaprSums(Observer):
    name = "heapr"
    entries = {"heapr_h2_sum": "sum", "heapr_g2_sum": "sum"}
    needs = frozenset({ROUTING, EXPERT_INTERMEDIATE, GRADIENTS})
    opt_in = True

    def __init__(self, context):
        super().__init__(context)
        self.h2_sum: torch.Tensor | None = None
        self.g2_sum: torch.Tensor | None = None

    def update(self, forward: LayerForward) -> None:
        h = forward.pair_intermediate
        if self.h2_sum is None:
            self.h2_sum = self.zeros(self.context.num_experts, h.shape[-1])
            self.g2_sum = self.zeros(self.context.num_experts, h.shape[-1])
        device = self.h2_sum.device
        expert = forward.pair_expert.to(device)
        self.h2_sum.index_add_(0, expert, h.double().to(device).square())
        self.g2_sum.index_add_(0, expert, forward.pair_intermediate_grad.double().to(device).square())

    def result(self):
        if self.h2_sum is None:
            raise MoePruneError("the heapr observer saw no forward of its layer (no calibration batch reached it)")
        return {"heapr_h2_sum": self.h2_sum.cpu(), "heapr_g2_sum": self.g2_sum.cpu()}
