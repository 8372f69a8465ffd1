"""``easy_ep[j] = sum over S_j of g_j(x) ||f_j(x)|| s_t`` (EASY-EP, combine: sum).

s_t = max(0, 1 - cos(h_t, h_t + sum_i g_i f_i(x_t))) is the token weight: how much the routed experts
turn the residual stream h_t (shared experts excluded). EASY-EP: "Domain-Specific Pruning of Large
Mixture-of-Experts Models with Few-shot Demonstrations" (Dong et al., 2025).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import EXPERT_OUTPUTS, RESIDUAL, ROUTING, LayerForward, Observer, register_observer


def easy_ep_token_weight(residual: torch.Tensor, routed_output: torch.Tensor) -> torch.Tensor:
    """EASY-EP token weight s_t = max(0, 1 - cos(h_t, h_t + sum_i g_i f_i(x_t))).

    ``residual`` is the residual stream before the MoE block adds its output; shared experts are
    excluded from ``routed_output``.
    """
    cos = F.cosine_similarity(residual.double(), (residual + routed_output).double(), dim=-1)
    return torch.clamp(1.0 - cos, min=0.0)


@register_observer
class EasyEP(Observer):
    name = "easy_ep"
    entries = {"easy_ep": "sum"}
    needs = frozenset({ROUTING, EXPERT_OUTPUTS, RESIDUAL})

    def __init__(self, context):
        super().__init__(context)
        self.easy_ep = self.zeros(context.num_experts)

    def update(self, forward: LayerForward) -> None:
        device = self.easy_ep.device
        token_weight = easy_ep_token_weight(forward.residual, forward.routed_output)
        weight = token_weight[forward.pairs.token[forward.valid_pair_mask]]
        contribution = (forward.pair_gate * forward.pair_norm * weight).to(device)
        self.easy_ep.index_add_(0, forward.pair_expert.to(device), contribution)

    def result(self):
        return {"easy_ep": self.easy_ep.cpu()}
