"""``naee``: the MoE block's output reconstruction error of every candidate expert subset (NAEE).

NAEE ("Not All Experts are Equal: Efficient Expert Pruning and Skipping for Mixture-of-Experts Large
Language Models", Lu et al., ACL 2024, https://arxiv.org/abs/2402.14800) keeps, per MoE layer, the
expert subset S (|S| = the budget's kept count) that minimises

    err(S) = sum over valid calibration tokens x of ||F(x) - F_S(x)||^2

where F(x) = sum_i g_i(x) f_{e_i}(x) is the layer's routed output (the model's own selection and
gate weights) and F_S(x) the routed output when only the experts of S can be routed: the family's
routing rule (:func:`moeprune.routing.route`, bitwise equal to each family's router: renormalisation,
correction biases, groups) re-applied to the logits with the other experts masked out, exactly as the
pruned model routes. Shared experts are outside F: they stay, so they cancel in F - F_S.

Mergeable form (combine: sum): one float64 accumulator per candidate subset,

    naee_error[m] = err(S_m),   S_m = {j : bit j of m is set},   m in [0, 2^E)

so statistics of disjoint token sets add up exactly. **Which subsets**: every S with
top_k <= |S| <= E - 1 (every kept count a budget can ask for: fewer than top_k experts cannot
route a token; |S| = E is the unpruned layer, err = 0), so a pass serves every ratio (the sweep
plans 25% and 50% from one collection) and the planner filters the subsets it may keep (super
experts in S, equal counts per routing group). Entries outside that range stay 0. The number of
subsets, at most 2^E = 65,536, is the cap: enumeration runs only for layers with E <=
:data:`NAEE_MAX_EXPERTS` = 16 experts, and a pass over a model with more is refused before any
weight is read (:meth:`NaeeErrors.check_geometry`).

Cost per token: one routing of the E logits and one E x E quadratic form per subset,
O(2^E (E log E + E^2)), plus every expert on every token (``every_expert_output``, E / top_k
times the routed compute). The error is computed as d^T G d with G = [f_1 .. f_E][f_1 .. f_E]^T the
token's Gram matrix of expert outputs (float64) and d = g - g^S the difference of the dense gate
vectors, so a subset whose routing is unchanged for a token contributes exactly 0.
"""

from __future__ import annotations

import torch

from ..errors import MoePruneError
from ..routing import route
from .base import EVERY_EXPERT_OUTPUT, ROUTER_LOGITS, ROUTING, LayerForward, Observer, register_observer

#: Largest routed-expert count NAEE enumerates subsets for (2^16 accumulators per layer).
NAEE_MAX_EXPERTS = 16
#: (subset, token) rows routed at once (bounds the working memory to ~100 MB at E = 16).
NAEE_ROWS_PER_CHUNK = 1 << 18


def subset_mask(bitmasks: torch.Tensor, num_experts: int) -> torch.Tensor:
    """bool [C, E]: row c is True at the experts of subset ``bitmasks[c]`` (bit j = expert j)."""
    bits = torch.arange(num_experts, device=bitmasks.device)
    return (bitmasks[:, None] >> bits) & 1 == 1


def candidate_bitmasks(num_experts: int, top_k: int) -> torch.Tensor:
    """Every subset with top_k <= |S| <= E - 1, as int64 bitmasks in increasing order."""
    masks = torch.arange(1 << num_experts, dtype=torch.int64)
    sizes = subset_mask(masks, num_experts).sum(dim=-1)
    return masks[(sizes >= top_k) & (sizes <= num_experts - 1)]


def dense_gates(indices: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """float64 [..., E]: the gate weight of every expert (0 where not selected)."""
    out = torch.zeros(*indices.shape[:-1], num_experts, dtype=torch.float64, device=indices.device)
    return out.scatter_add_(-1, indices, weights.double())


def subset_errors(
    logits: torch.Tensor,
    outputs: torch.Tensor,
    gates: torch.Tensor,
    bitmasks: torch.Tensor,
    params,
    correction_bias: torch.Tensor | None = None,
    rows_per_chunk: int = NAEE_ROWS_PER_CHUNK,
    hidden_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """sum over the tokens of ||F(x) - F_S(x)||^2 for every subset of ``bitmasks`` (float64 [C]).

    ``logits`` [T, E]: raw router logits; ``outputs`` [T, E, H]: every expert's output on every token;
    ``gates`` [T, E] float64: the model's dense gate vector (F = gates @ outputs); ``params``: the
    family's :class:`~moeprune.routing.RoutingParams` (F_S routes with the other experts masked);
    ``hidden_dtype``: the router input's dtype (:func:`~moeprune.routing.route`).
    """
    num_tokens, num_experts = logits.shape
    result = torch.zeros(bitmasks.numel(), dtype=torch.float64, device=logits.device)
    if num_tokens == 0 or bitmasks.numel() == 0:
        return result
    outputs = outputs.double()
    gram = outputs @ outputs.transpose(1, 2)  # [T, E, E]
    chunk = max(1, rows_per_chunk // num_tokens)
    for start in range(0, bitmasks.numel(), chunk):
        masks = subset_mask(bitmasks[start:start + chunk].to(logits.device), num_experts)  # [C, E]
        count = masks.shape[0]
        rows = logits.unsqueeze(0).expand(count, -1, -1).reshape(-1, num_experts)
        row_masks = masks.unsqueeze(1).expand(-1, num_tokens, -1).reshape(-1, num_experts)
        weights, indices = route(rows, params, correction_bias, expert_mask=row_masks, hidden_dtype=hidden_dtype)
        diff = gates.unsqueeze(0) - dense_gates(indices, weights, num_experts).view(count, num_tokens, num_experts)
        diff = diff.transpose(0, 1)  # [T, C, E]
        result[start:start + count] = ((diff @ gram) * diff).sum(dim=(0, 2))
    return result


def check_naee_experts(num_experts: int, layer: int | str = "") -> None:
    """MoePruneError when a layer has more experts than NAEE enumerates."""
    if num_experts > NAEE_MAX_EXPERTS:
        where = f"MoE layer {layer} has" if layer != "" else "the model has"
        raise MoePruneError(
            f"NAEE enumerates expert subsets only for layers with at most {NAEE_MAX_EXPERTS} routed experts "
            f"(2^{NAEE_MAX_EXPERTS} subsets); {where} E={num_experts}; choose another method (e.g. reap)")


@register_observer
class NaeeErrors(Observer):
    name = "naee"
    entries = {"naee_error": "sum"}
    needs = frozenset({ROUTING, ROUTER_LOGITS, EVERY_EXPERT_OUTPUT})
    opt_in = True

    def __init__(self, context):
        super().__init__(context)
        check_naee_experts(context.num_experts)
        if context.routing is None:
            raise MoePruneError("the naee observer needs the family's routing rule (LayerContext.routing)")
        self.bitmasks = candidate_bitmasks(context.num_experts, context.top_k)
        self.error = self.zeros(1 << context.num_experts)

    @classmethod
    def check_geometry(cls, geometry) -> None:
        for layer in geometry.moe_layers:
            check_naee_experts(geometry.experts_in(layer), layer)

    def update(self, forward: LayerForward) -> None:
        valid = forward.valid.to(forward.router_logits.device)
        logits = forward.router_logits[valid]
        outputs = forward.every_expert_output[valid.to(forward.every_expert_output.device)]
        gates = dense_gates(forward.top_k_index[valid], forward.top_k_weights[valid], self.context.num_experts)
        bias = self.context.correction_bias
        errors = subset_errors(logits, outputs.to(logits.device), gates.to(logits.device), self.bitmasks,
                               self.context.routing, None if bias is None else bias.to(logits.device),
                               hidden_dtype=forward.every_expert_output.dtype)
        self.error.index_add_(0, self.bitmasks.to(self.error.device), errors.to(self.error.device))

    def result(self):
        return {"naee_error": self.error.cpu()}
