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
from .base import (
    EVERY_EXPERT_OUTPUT,
    ROUTER_LOGITS,
    ROUTING,
    LayerForward,
    Observer,
    register_observer,
)

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


#: Rules whose top-k is the k best experts of S in one per-token order, with gate weights that depend
#: only on the selected experts (renormalised): F_S is a function of the two best experts of S.
ORDER_RULES = ("softmax_topk", "topk_softmax", "sigmoid_topk", "deepseek_v3")


def pair_rule(params, num_experts: int) -> bool:
    """The fast path applies: top-2 routing by a fixed per-token order with renormalised weights
    (Mixtral, Qwen with norm_topk_prob, GPT-OSS-style softmax over the top-k, sigmoid routers
    without groups)."""
    renormalised = params.renormalize or params.rule == "topk_softmax"
    ungrouped = params.rule != "deepseek_v3" or params.n_group == 1
    return params.top_k == 2 and params.rule in ORDER_RULES and renormalised and ungrouped and num_experts <= 16


def choice_scores(logits: torch.Tensor, params, correction_bias: torch.Tensor | None) -> torch.Tensor:
    """The per-token scores a :data:`ORDER_RULES` router takes its top-k of (logits, or sigmoid + bias)."""
    if params.rule in ("softmax_topk", "topk_softmax"):
        return logits
    scores = torch.sigmoid(logits.float() if params.rule == "sigmoid_topk" else logits)
    return scores + correction_bias if correction_bias is not None else scores


def best_two_ranks(ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every subset bitmask m in [0, 2^E): the ranks of the best and second-best expert of m
    (``ranks`` [T, E]: 0 = the token's best expert), as uint8 [T, 2^E] (E where m has fewer members).
    Built bit by bit: adding expert b to a subset of the experts < b changes its best two to
    (min(r1, rb), r1 if rb < r1 else min(r2, rb))."""
    num_tokens, num_experts = ranks.shape
    best = torch.full((num_tokens, 1 << num_experts), num_experts, dtype=torch.uint8, device=ranks.device)
    second = best.clone()
    ranks = ranks.to(torch.uint8)
    for b in range(num_experts):
        low = 1 << b
        rank_b = ranks[:, b:b + 1]
        r1, r2 = best[:, :low], second[:, :low]
        best[:, low:2 * low] = torch.minimum(r1, rank_b)
        second[:, low:2 * low] = torch.where(rank_b < r1, r1, torch.minimum(r2, rank_b))
    return best, second


def pair_subset_errors(logits: torch.Tensor, outputs: torch.Tensor, gates: torch.Tensor, params,
                       correction_bias: torch.Tensor | None = None, hidden_dtype: torch.dtype | None = None,
                       tokens_per_chunk: int = 64) -> torch.Tensor:
    """The errors of :func:`subset_errors` for EVERY bitmask [2^E] on a :func:`pair_rule` family.

    For such a router F_S(x) depends only on the two best experts (a, b) of S in the token's choice
    order, and its weights are the rule applied with only a and b routable (renormalised weights
    depend on the selected experts alone; equal to routing with S up to float rounding). So per
    token the error of each of the E (E - 1) ordered pairs is computed once (d^T G d), and every
    subset reads the error of its best pair (:func:`best_two_ranks`): O(E^3 + 2^E) per token instead of
    routing every subset. Subsets with fewer than 2 experts get 0.
    """
    num_tokens, num_experts = logits.shape
    result = torch.zeros(1 << num_experts, dtype=torch.float64, device=logits.device)
    if num_tokens == 0:
        return result
    gram = outputs.double() @ outputs.double().transpose(1, 2)  # [T, E, E]
    experts = torch.arange(num_experts, device=logits.device)
    a, b = (x.reshape(-1) for x in torch.meshgrid(experts, experts, indexing="ij"))  # every (a, b), a == b included
    pairs = torch.arange(a.numel(), device=logits.device)
    pair_masks = torch.zeros(a.numel(), num_experts, dtype=torch.bool, device=logits.device)
    pair_masks[pairs, a] = True
    pair_masks[pairs, b] = True
    distinct = a != b
    orders = torch.argsort(choice_scores(logits, params, correction_bias), dim=-1, descending=True)  # expert of rank r
    ranks = torch.argsort(orders, dim=-1)  # rank of expert j
    for start in range(0, num_tokens, tokens_per_chunk):
        chunk = slice(start, start + tokens_per_chunk)
        count = logits[chunk].shape[0]
        rows = logits[chunk].unsqueeze(1).expand(-1, a.numel(), -1).reshape(-1, num_experts)
        masks = pair_masks.unsqueeze(0).expand(count, -1, -1).reshape(-1, num_experts)
        weights, indices = route(rows, params, correction_bias, expert_mask=masks, hidden_dtype=hidden_dtype)
        diff = gates[chunk].unsqueeze(1) - dense_gates(indices, weights, num_experts).view(count, a.numel(), num_experts)
        pair_error = ((diff @ gram[chunk]) * diff).sum(dim=-1)  # [t, E*E]: error when (a, b) are the best two
        pair_error = torch.where(distinct, pair_error, torch.zeros_like(pair_error))
        table = torch.cat((pair_error.view(count, num_experts, num_experts),
                           torch.zeros(count, num_experts, 1, dtype=torch.float64, device=logits.device)), dim=2)
        table = torch.cat((table, torch.zeros(count, 1, num_experts + 1, dtype=torch.float64, device=logits.device)), dim=1)
        # the table in rank space: row r1, column r2 = the pair of the token's r1-th and r2-th experts
        order = torch.cat((orders[chunk], torch.full_like(orders[chunk][:, :1], num_experts)), dim=1)  # [t, E + 1]
        by_rank = table.gather(1, order.unsqueeze(-1).expand(-1, -1, num_experts + 1))
        by_rank = by_rank.gather(2, order.unsqueeze(1).expand(-1, num_experts + 1, -1))
        best, second = best_two_ranks(ranks[chunk])
        index = (best.to(torch.int16) * (num_experts + 1) + second).long()
        result += by_rank.reshape(count, -1).gather(1, index).sum(dim=0)
    return result


#: routing rules NAEE cannot re-run from the router's logits: Inkling's router weighs the selected experts
#: jointly with its shared experts, whose logits it does not return
NAEE_REFUSED_RULES = ("sigmoid_topk_shared_softmax",)
#: DeepSeek-V4's hash-routed layers select experts by token id, not from the logits
NAEE_HASH_RULES = ("deepseek_v4",)


def check_naee_routing(rule: str) -> None:
    """A MoePruneError when NAEE cannot re-route a model whose routing rule is ``rule``."""
    if rule in NAEE_REFUSED_RULES:
        raise MoePruneError(f"NAEE re-routes every candidate expert subset from the router's logits; routing rule {rule!r} "
                            "also weighs shared experts whose logits the router does not return, so NAEE cannot run on "
                            "this model; choose another method")
    if rule in NAEE_HASH_RULES:
        raise MoePruneError(f"NAEE re-routes every candidate expert subset from the router's logits; routing rule {rule!r} "
                            "selects the experts of its first MoE layers by token id (hash routing, tid2eid), not from "
                            "the logits, so NAEE cannot run on this model; choose another method")


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
        check_naee_routing(context.routing.rule)
        self.bitmasks = candidate_bitmasks(context.num_experts, context.top_k)
        self.error = self.zeros(1 << context.num_experts)
        self.candidates = torch.zeros(1 << context.num_experts, dtype=torch.bool, device=self.error.device)
        self.candidates[self.bitmasks.to(self.error.device)] = True

    @classmethod
    def check_geometry(cls, geometry) -> None:
        check_naee_routing(geometry.routing)
        for layer in geometry.moe_layers:
            check_naee_experts(geometry.experts_in(layer), layer)

    def update(self, forward: LayerForward) -> None:
        valid = forward.valid.to(forward.router_logits.device)
        logits = forward.router_logits[valid]
        outputs = forward.every_expert_output[valid.to(forward.every_expert_output.device)]
        gates = dense_gates(forward.top_k_index[valid], forward.top_k_weights[valid], self.context.num_experts)
        bias = self.context.correction_bias
        bias = None if bias is None else bias.to(logits.device)
        params, dtype = self.context.routing, forward.every_expert_output.dtype
        if pair_rule(params, self.context.num_experts):
            errors = pair_subset_errors(logits, outputs.to(logits.device), gates.to(logits.device), params, bias, dtype)
            self.error += torch.where(self.candidates, errors.to(self.error.device), 0.0)
            return
        errors = subset_errors(logits, outputs.to(logits.device), gates.to(logits.device), self.bitmasks, params, bias,
                               hidden_dtype=dtype)
        self.error.index_add_(0, self.bitmasks.to(self.error.device), errors.to(self.error.device))

    def result(self):
        return {"naee_error": self.error.cpu()}
