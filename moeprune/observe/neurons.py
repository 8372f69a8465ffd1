"""``neurons``: per-neuron activation energy of the routed experts (atomic experts, opt-in).

Neuron k of routed expert j ("atomic expert": gate row k, up row k, down column k) carries, on a
routed token x, the intermediate value h_k(x) = act(gate_k x) * (up_k x), the input of down_proj.
With S_j the valid tokens routed to j and g_j(x) the gate weight the model really multiplies
expert j's output by:

* ``neuron_gh2_sum[j, k] = sum over x in S_j of (g_j(x) h_k(x))^2``  (combine: sum)
* ``neuron_h2_sum[j, k]  = sum over x in S_j of h_k(x)^2``          (combine: sum)
* ``neuron_gh2_max[j, k] = max over x in S_j of (g_j(x) h_k(x))^2``  (combine: max)

Each is [E, I] per MoE layer, float64: fixed size whatever the amount of calibration data, so the
statistics of disjoint token sets merge exactly. Tokens not routed to j contribute nothing
(g_j = 0 there, as CAMERA-P's sum over all tokens with g_j = 0 where j is not selected), and
padding never counts. Read by CAMERA-P (sum and max), the Wanda-style neuron score (sum) and
HEAPr's E[h_k^2] (``neuron_h2_sum / frequency``). Opt-in: I floats per expert per layer, and the
experts' forward must expose h (the ``expert_intermediate`` signal).
"""

from __future__ import annotations

import torch

from .base import EXPERT_INTERMEDIATE, ROUTING, LayerForward, Observer, register_observer


def neuron_energy(expert: torch.Tensor, gate: torch.Tensor, intermediate: torch.Tensor, num_experts: int,
                  width: int) -> dict[str, torch.Tensor]:
    """The three accumulators of one forward's valid routed pairs (``expert`` [P], ``gate`` [P],
    ``intermediate`` h [P, I]): sums and maximum of (g h_k)^2 and the sum of h_k^2 per expert, [E, I]
    float64 on ``intermediate``'s device."""
    h2 = intermediate.double().square()
    gh2 = h2 * gate.double().square()[:, None]
    index = expert.to(h2.device)
    zeros = torch.zeros(num_experts, width, dtype=torch.float64, device=h2.device)
    rows = index[:, None].expand(-1, width)
    return {
        "neuron_gh2_sum": zeros.index_add(0, index, gh2),
        "neuron_h2_sum": zeros.index_add(0, index, h2),
        "neuron_gh2_max": zeros.scatter_reduce(0, rows, gh2, reduce="amax"),
    }


@register_observer
class NeuronEnergy(Observer):
    """Per-neuron sums and maximum of the (gate-weighted) squared intermediate activation."""

    name = "neurons"
    entries = {"neuron_gh2_sum": "sum", "neuron_h2_sum": "sum", "neuron_gh2_max": "max"}
    needs = frozenset({ROUTING, EXPERT_INTERMEDIATE})
    opt_in = True

    def __init__(self, context):
        super().__init__(context)
        # I is known at the first forward (the width of h); every forward of the layer exposes it,
        # even one where no token is routed (h is then [0, I])
        self.state: dict[str, torch.Tensor] | None = None

    def update(self, forward: LayerForward) -> None:
        intermediate = forward.pair_intermediate
        width = int(forward.pairs.intermediate.shape[-1])
        part = neuron_energy(forward.pair_expert, forward.pair_gate, intermediate, self.context.num_experts, width)
        part = {name: value.to(self.context.device) for name, value in part.items()}
        if self.state is None:
            self.state = part
            return
        self.state["neuron_gh2_sum"] += part["neuron_gh2_sum"]
        self.state["neuron_h2_sum"] += part["neuron_h2_sum"]
        self.state["neuron_gh2_max"] = torch.maximum(self.state["neuron_gh2_max"], part["neuron_gh2_max"])

    def result(self):
        if self.state is None:  # the layer never ran: no neuron seen
            empty = self.zeros(self.context.num_experts, 0)
            return {name: empty.clone().cpu() for name in self.entries}
        return {name: value.cpu() for name, value in self.state.items()}
