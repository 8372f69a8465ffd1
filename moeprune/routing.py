"""The routing rules of the supported MoE families, as pure functions of the router logits.

Each rule maps raw router logits z [T, E] (as the model's router computes them) to the gate weights
the model multiplies expert outputs by and the selected expert indices, both [T, k]. The operations
follow the model's own order, so the results are bitwise equal to the model's router outputs (a test
checks this for every family). ``expert_mask`` (bool [E], True = routable) removes experts from
selection exactly as pruning them would: the result equals the pruned model's routing, mapped back
to original expert numbering. Logits wider than the mask (LongCat-Flash's identity experts after the
E routed ones) keep their extra experts routable: they are never pruned.

Rules:

* ``softmax_topk`` (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): p = softmax(z); top-k of p; renormalise
  the k weights to sum 1 when the family does (Mixtral always, others iff ``norm_topk_prob``).
* ``topk_softmax`` (GPT-OSS, GraniteMoE, Aria, Cohere2-MoE): top-k of z (GPT-OSS's router has a bias);
  weights = softmax over the k logits (GraniteMoE: z in float32, weights cast back to the hidden
  states' dtype; Cohere2-MoE: the softmax taken in float32, ``softmax_float32``).
* ``topk_sigmoid`` (Cohere2-MoE with ``expert_selection_fn = "sigmoid"``, Kolibri-1, Llama 4): top-k of z
  (+ b, Kolibri-1's ``e_score_correction_bias``); weights = sigmoid of the k selected unbiased logits,
  renormalised to sum 1 iff ``norm_topk_prob``; ``selected_sigmoid_float32`` (Llama 4): the sigmoid is
  taken in float32 and cast back to the logits' dtype. Llama 4's router returns these weights as dense
  scores [T, E] (0 off the top-k: sigmoid(-inf)) and its experts scale their INPUT by them
  (:attr:`moeprune.arch.Family.gate_on_input`).
* ``deepseek_v2``: p = softmax(z); ``greedy`` top-k, or ``group_limited_greedy``: a group's score is
  its largest p, keep the ``topk_group`` best groups, top-k inside them; no renormalisation;
  weights x ``routed_scaling_factor``.
* ``deepseek_v3``: s = sigmoid(z); selection on s + b (``e_score_correction_bias``); a group's score
  is the sum of its top-2 biased scores; top-k inside the ``topk_group`` best groups (the other
  experts' selection score set to ``group_fill``: -inf, or 0 for A.X-K2, whose experts outside the
  groups can then beat negative biased scores); weights are the unbiased s of the selected experts,
  renormalised iff ``norm_topk_prob`` (+1e-20), x ``routed_scaling_factor``.
* ``sigmoid_topk`` (MiniMax-M2, AFMoE, Flint, Laguna): s = sigmoid(float32(z)); top-k of s + b (the
  MoE block's ``e_score_correction_bias`` / ``expert_bias``, or the router's; Flint has none; no
  groups); weights are the unbiased s of the selected experts, renormalised to sum 1 (MiniMax-M2,
  Laguna: no epsilon; AFMoE: + 1e-20; Flint: iff ``norm_topk_prob``), x the scaling factor (AFMoE's
  ``route_scale``; LFM2-MoE's ``routed_scaling_factor``; 1 otherwise). ``topk_sorted``: the model's
  top-k sorts its result (Flint, Laguna, LFM2-MoE, Beam's ``deepseek_v3``), which fixes the order of
  the k indices; ``sigmoid_float32 = False``: the sigmoid in the logits' dtype (LFM2-MoE).
* ``softmax_biased_topk`` (LongCat-Flash): p = softmax(z) (z in float32); top-k of p + b
  (``e_score_correction_bias``, unsorted); weights = the unbiased p of the selected x
  ``routed_scaling_factor``, cast to the logits' dtype. Its router scores E routed experts followed by
  Z zero-computation (identity) experts (output = input); moeprune never prunes those: their router
  rows stay, after the kept routed experts.
* ``sigmoid_topk_shared_softmax`` (Inkling): the router scores E routed then S shared experts (logits
  z in float32); top-k of sigmoid(z) + b over the routed experts (unsorted); the k selected and the S
  shared logits are weighed jointly: w = softmax(logsigmoid(z_sel, z_shared)) x ``route_scale`` x the
  router's learned ``global_scale``, cast to the hidden states' dtype; the first k are the routed
  weights, the last S the shared experts' gammas (:func:`route_with_shared`). The shared rows are
  never pruned (a pruned router keeps them after the kept routed rows).
* ``softmax_bias_topk`` (ERNIE-4.5-MoE): p = softmax(float32(z)); top-k (sorted) of p + b (the router's
  ``moe_statics.e_score_correction_bias`` [1, E]); weights are the unbiased p of the selected experts
  over max(their sum, ``moe_norm_min``), cast to the hidden states' dtype.
* ``softmax_skip_topk`` (ZAYA): the router's LAST class is a skip expert (no computation). p = softmax(z)
  over E + 1 classes (in the logits' dtype); top-k of float32(p) + b (the router's ``balancing_biases``
  [E + 1], unsorted); weights = p of the selected classes. A selected skip class reaches the experts as
  expert 0 with weight 0 (the model masks it so): :func:`route_with_skip` also returns which slots are
  skips, so that statistics never count them as uses of expert 0. The skip class is never pruned: its
  router row and bias stay, after the kept routed experts'. ZAYA's logits come from an MLP router
  (:func:`mlp_router_logits`) whose hidden state the next layer's router adds to its own.
* ``sparsemixer`` (PhiMoE, eval mode of SparseMixer, Liu et al. 2024, arXiv:2409.12136): exactly two
  experts. First: e1 = argmax z; experts with (z_max - z_j) / max(|z_j|, z_max) > 2 eps are masked
  (eps = ``router_jitter_noise``), w1 = softmax(masked z)[e1]. Second: z with e1 set to -inf, the
  same threshold around its maximum e2, w2 = softmax(...)[e2]. No renormalisation.
* ``softmax_topk_pnorm`` (DBRX): p = softmax(z) in the logits' dtype; top-k of p; the k weights divided
  by their Lp norm ||w||_p (p = ``moe_normalize_expert_weights``; None: no normalisation), in the
  logits' dtype. DBRX's router returns the logits only; its FFN block routes them
  (``route_tokens_to_experts``, ``[modules] route`` in the spec).
* ``deepseek_v4`` (DeepSeek-V4): s = score(z) with the config's ``scoring_func`` (``sqrtsoftplus``:
  sqrt(softplus(z)), or ``sigmoid``), z in the logits' dtype; top-k (unsorted) of s + b
  (``e_score_correction_bias``); weights = the unbiased s of the selected over (their sum + 1e-20),
  x ``routed_scaling_factor``. Its first MoE layers are hash-routed: the experts are a frozen
  token-id -> expert-ids table row (``tid2eid[input_ids]``, passed as ``expert_ids``), weighed as
  above. A pruned hash layer's table is remapped (:func:`remap_expert_ids`): a dropped expert in a
  token's row is replaced by the row's first kept expert (a repeat: the token keeps only its own
  kept experts, the dropped one's weight goes to that expert), or, in a row with no kept expert, by the
  next kept expert in expert order (cyclically). With ``expert_mask`` the rule remaps the rows the
  same way, so the masked original equals the pruned model.

Sorted dispatch (JetMoE, ``[routing] router_output = "sorted"``): the router applies ``topk_softmax``
(float32 logits, weights cast to the hidden states' dtype) and hands its experts the (token, expert)
pairs grouped by expert instead of [T, k] indices and weights: :func:`sorted_dispatch` makes that
grouping from the rule's indices and weights as the model's router does, :func:`topk_of_sorted_dispatch`
reads the [T, k] indices and weights back from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ROUTING_RULES = ("softmax_topk", "topk_softmax", "topk_sigmoid", "deepseek_v2", "deepseek_v3", "sigmoid_topk",
                 "sparsemixer", "softmax_biased_topk", "sigmoid_topk_shared_softmax", "softmax_bias_topk",
                 "softmax_topk_pnorm", "deepseek_v4", "softmax_skip_topk")


@dataclass(frozen=True)
class RoutingParams:
    """Everything a routing rule needs besides the logits (read from the model's config)."""

    rule: str
    top_k: int
    renormalize: bool = False
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "greedy"
    routed_scaling_factor: float = 1.0
    #: ``softmax_topk``: gate weights are cast back to the logits' dtype (Qwen2/3-MoE, OLMoE);
    #: transformers 5.x Mixtral returns them in float32.
    weights_in_logits_dtype: bool = True
    #: the router returns the weights in the hidden states' dtype (GraniteMoE); see :func:`route`
    weights_in_hidden_dtype: bool = False
    #: added to the sum of the top-k weights before renormalising (``sigmoid_topk``)
    renormalize_epsilon: float = 0.0
    #: ``sparsemixer``: the relative threshold eps (PhiMoE's ``router_jitter_noise``)
    jitter_eps: float = 0.0
    #: ``sigmoid_topk``: the top-k is sorted by score (``torch.topk(sorted=True)``), as the model's is
    topk_sorted: bool = False
    #: ``topk_softmax``: the softmax over the selected logits is taken in float32 (Cohere2-MoE)
    softmax_float32: bool = False
    #: ``sigmoid_topk``: the sigmoid is taken in float32 (False: in the logits' dtype, LFM2-MoE)
    sigmoid_float32: bool = True
    #: ``deepseek_v3``: the selection score given to experts outside the chosen groups (-inf; A.X-K2: 0)
    group_fill: float = float("-inf")
    #: ``topk_sigmoid``: the sigmoid of the selected logits in float32, cast back to the logits' dtype (Llama 4)
    selected_sigmoid_float32: bool = False
    #: ``sigmoid_topk_shared_softmax``: shared experts scored by the router after the routed ones (Inkling)
    shared_in_router: int = 0
    #: ``softmax_bias_topk``: the sum of the top-k weights is clamped to at least this before renormalising
    renormalize_min: float = 0.0
    #: ``softmax_topk_pnorm``: the top-k weights are divided by their Lp norm with this p (None: not normalised)
    norm_p: float | None = None
    #: ``deepseek_v4``: the score function of the logits (the config's ``scoring_func``)
    score_fn: str = ""


def _masked_logits(logits: torch.Tensor, expert_mask: torch.Tensor | None) -> torch.Tensor:
    if expert_mask is None:
        return logits
    return logits.masked_fill(~expert_mask.to(logits.device), float("-inf"))


def route(
    logits: torch.Tensor,
    params: RoutingParams,
    correction_bias: torch.Tensor | None = None,
    expert_mask: torch.Tensor | None = None,
    hidden_dtype: torch.dtype | None = None,
    router_scale: torch.Tensor | None = None,
    expert_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate weights and selected experts ([T, k] each) for router logits [T, E].

    ``hidden_dtype``: the dtype of the router's input; the weights are cast to it when the family's
    router does so (``params.weights_in_hidden_dtype``). ``router_scale``: the router's learned scalar
    (Inkling's ``global_scale``). ``expert_ids`` [T, k]: a hash-routed layer's experts of each token
    (DeepSeek-V4's ``tid2eid[input_ids]``), which replace the selection.
    """
    if expert_ids is not None:
        return _hash_route(logits, params, expert_ids, expert_mask)
    if params.rule == "softmax_skip_topk":
        weights, indices, _ = route_with_skip(logits, params, correction_bias, expert_mask)
        return weights, indices
    if params.rule == "sigmoid_topk_shared_softmax":
        weights, indices, _ = route_with_shared(logits, params, correction_bias, expert_mask, hidden_dtype, router_scale)
        return weights, indices
    weights, indices = _route(logits, params, correction_bias, full_mask(expert_mask, logits.shape[-1]))
    if params.weights_in_hidden_dtype and hidden_dtype is not None:
        weights = weights.to(hidden_dtype)
    return weights, indices


def full_mask(expert_mask: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """``expert_mask`` [E] extended to ``width`` logits: experts past E (identity experts) stay routable."""
    if expert_mask is None or expert_mask.shape[-1] == width:
        return expert_mask
    if expert_mask.shape[-1] > width:
        raise ValueError(f"an expert mask of {expert_mask.shape[-1]} entries for {width} router logits")
    return torch.cat([expert_mask.bool(), expert_mask.new_ones(width - expert_mask.shape[-1], dtype=torch.bool)])


def _route(logits, params, correction_bias, expert_mask):
    if params.rule == "softmax_topk":
        return _softmax_topk(logits, params, expert_mask)
    if params.rule == "topk_softmax":
        return _topk_softmax(logits, params, expert_mask)
    if params.rule == "topk_sigmoid":
        return _topk_sigmoid(logits, params, correction_bias, expert_mask)
    if params.rule == "deepseek_v2":
        return _deepseek_v2(logits, params, expert_mask)
    if params.rule == "deepseek_v3":
        return _deepseek_v3(logits, params, correction_bias, expert_mask)
    if params.rule == "sigmoid_topk":
        return _sigmoid_topk(logits, params, correction_bias, expert_mask)
    if params.rule == "sparsemixer":
        return _sparsemixer(logits, params, expert_mask)
    if params.rule == "softmax_biased_topk":
        return _softmax_biased_topk(logits, params, correction_bias, expert_mask)
    if params.rule == "softmax_bias_topk":
        return _softmax_bias_topk(logits, params, correction_bias, expert_mask)
    if params.rule == "softmax_topk_pnorm":
        return _softmax_topk_pnorm(logits, params, expert_mask)
    if params.rule == "deepseek_v4":
        return _deepseek_v4(logits, params, correction_bias, expert_mask)
    raise ValueError(f"unknown routing rule {params.rule!r}; known: {', '.join(ROUTING_RULES)}")


def _softmax_topk(logits, params, expert_mask):
    probs = F.softmax(_masked_logits(logits, expert_mask), dtype=torch.float, dim=-1)
    weights, indices = torch.topk(probs, params.top_k, dim=-1)
    if params.renormalize:
        weights /= weights.sum(dim=-1, keepdim=True)
    return (weights.to(logits.dtype) if params.weights_in_logits_dtype else weights), indices


def _topk_softmax(logits, params, expert_mask):
    top_logits, indices = torch.topk(_masked_logits(logits, expert_mask), params.top_k, dim=-1)
    weights = F.softmax(top_logits, dim=1, dtype=torch.float32 if params.softmax_float32 else top_logits.dtype)
    return weights, indices


def _topk_sigmoid(logits, params, correction_bias, expert_mask):
    choice = logits + correction_bias if correction_bias is not None else logits
    indices = torch.topk(_masked_logits(choice, expert_mask), params.top_k, dim=-1)[1]
    selected = logits.gather(1, indices)
    if params.selected_sigmoid_float32:
        weights = torch.sigmoid(selected.float()).to(logits.dtype)
    else:
        weights = torch.sigmoid(selected)
    if params.renormalize:
        weights = weights / torch.sum(weights, dim=-1, keepdim=True)
    return weights, indices


def _group_mask(group_scores: torch.Tensor, params: RoutingParams, num_experts: int) -> torch.Tensor:
    """[T, E] bool: experts inside the ``topk_group`` best-scoring groups of each token."""
    group_idx = torch.topk(group_scores, k=params.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    per_group = num_experts // params.n_group
    return group_mask.unsqueeze(-1).expand(-1, params.n_group, per_group).reshape(-1, num_experts).bool()


def _deepseek_v2(logits, params, expert_mask):
    num_experts = logits.shape[-1]
    scores = _masked_logits(logits, expert_mask).softmax(dim=-1, dtype=torch.float32)
    if params.topk_method == "group_limited_greedy":
        per_group = num_experts // params.n_group
        group_scores = scores.view(-1, params.n_group, per_group).max(dim=-1).values
        scores = scores.masked_fill(~_group_mask(group_scores, params, num_experts), 0.0)
    elif params.topk_method != "greedy":
        raise ValueError(f"unknown DeepSeek-V2 topk_method {params.topk_method!r}")
    weights, indices = torch.topk(scores, k=params.top_k, dim=-1, sorted=False)
    return weights * params.routed_scaling_factor, indices


def _deepseek_v3(logits, params, correction_bias, expert_mask):
    num_experts = logits.shape[-1]
    scores = logits.sigmoid()
    choice = scores + correction_bias if correction_bias is not None else scores
    if expert_mask is not None:
        choice = choice.masked_fill(~expert_mask.to(choice.device), float("-inf"))
    per_group = num_experts // params.n_group
    group_scores = choice.view(-1, params.n_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)
    choice = choice.masked_fill(~_group_mask(group_scores, params, num_experts), params.group_fill)
    indices = torch.topk(choice, k=params.top_k, dim=-1, sorted=params.topk_sorted)[1]
    weights = scores.gather(1, indices)
    if params.renormalize:
        weights /= weights.sum(dim=-1, keepdim=True) + 1e-20
    return weights * params.routed_scaling_factor, indices


def _sigmoid_topk(logits, params, correction_bias, expert_mask):
    scores = torch.sigmoid(logits.float() if params.sigmoid_float32 else logits)
    choice = scores + correction_bias if correction_bias is not None else scores
    if expert_mask is not None:
        choice = choice.masked_fill(~expert_mask.to(choice.device), float("-inf"))
    indices = torch.topk(choice, params.top_k, dim=-1, sorted=params.topk_sorted)[1]
    weights = scores.gather(1, indices)
    if params.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + params.renormalize_epsilon)
    return weights * params.routed_scaling_factor, indices


def route_with_shared(logits, params, correction_bias=None, expert_mask=None, hidden_dtype=None, router_scale=None):
    """``sigmoid_topk_shared_softmax`` (Inkling): (routed weights [T, k], indices [T, k], shared experts'
    gammas [T, S]) for logits [T, E + S] (float32), weighed jointly as the router does."""
    shared = params.shared_in_router
    num_routed = logits.shape[-1] - shared
    mask = full_mask(expert_mask, logits.shape[-1])
    scores = logits.sigmoid()
    choice = scores[..., :num_routed] + (correction_bias.float() if correction_bias is not None else 0.0)
    if mask is not None:
        choice = choice.masked_fill(~mask[:num_routed].to(choice.device), float("-inf"))
    indices = torch.topk(choice, params.top_k, dim=-1, sorted=params.topk_sorted)[1]
    selected = torch.cat([logits[..., :num_routed].gather(-1, indices), logits[..., num_routed:]], dim=-1)
    log_probs = F.logsigmoid(selected)
    weights = torch.exp(log_probs - torch.logsumexp(log_probs, dim=-1, keepdim=True))
    weights = weights * params.routed_scaling_factor * (router_scale.float() if router_scale is not None else 1.0)
    if params.weights_in_hidden_dtype and hidden_dtype is not None:
        weights = weights.to(hidden_dtype)
    return weights[..., :params.top_k].contiguous(), indices, weights[..., params.top_k:].contiguous()


def _softmax_biased_topk(logits, params, correction_bias, expert_mask):
    scores = _masked_logits(logits, expert_mask).softmax(dim=-1)  # a pruned router's softmax omits the dropped
    choice = scores + correction_bias.unsqueeze(0) if correction_bias is not None else scores
    if expert_mask is not None:
        choice = choice.masked_fill(~expert_mask.to(choice.device), float("-inf"))
    indices = torch.topk(choice, k=params.top_k, dim=-1, sorted=params.topk_sorted)[1]
    weights = scores.gather(1, indices) * params.routed_scaling_factor
    return weights.to(logits.dtype), indices


def _softmax_bias_topk(logits, params, correction_bias, expert_mask):
    """ERNIE-4.5-MoE: p = softmax(float32 z); top-k (sorted) of p + b; weights p of the selected experts
    over max(their sum, ``renormalize_min``)."""
    probs = F.softmax(_masked_logits(logits.float(), expert_mask), dim=1, dtype=torch.float)
    choice = probs + correction_bias if correction_bias is not None else probs
    if expert_mask is not None:
        choice = choice.masked_fill(~expert_mask.to(choice.device), float("-inf"))
    indices = torch.topk(choice, params.top_k, dim=-1)[1]
    weights = torch.gather(probs, dim=-1, index=indices)
    if params.renormalize:
        weights = weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=params.renormalize_min)
    return weights, indices


def _sparsemixer_pick(scores: torch.Tensor, candidates: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, index) [T, 1] of the best of ``candidates``: softmax over the candidates within the
    relative threshold 2 eps of their maximum, taken at the maximum (SparseMixer, eval mode)."""
    threshold, best = candidates.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=threshold)
    far = ((threshold - scores) / factor) > (2 * eps)
    gates = torch.softmax(candidates.masked_fill(far, float("-inf")), dim=-1)
    return gates.gather(dim=-1, index=best), best


def _sparsemixer(logits, params, expert_mask):
    scores = _masked_logits(logits, expert_mask)
    first_weight, first = _sparsemixer_pick(scores, scores, params.jitter_eps)
    second_weight, second = _sparsemixer_pick(scores, torch.scatter(scores, -1, first, float("-inf")), params.jitter_eps)
    return torch.cat((first_weight, second_weight), dim=-1), torch.cat((first, second), dim=-1)


def _softmax_topk_pnorm(logits, params, expert_mask):
    """DBRX (``DbrxFFN.route_tokens_to_experts``): p = softmax(z) in the logits' dtype; top-k of p; the
    k weights over their Lp norm (``norm_p``; None: unnormalised)."""
    probs = F.softmax(_masked_logits(logits, expert_mask), dim=1, dtype=logits.dtype)
    weights, indices = torch.topk(probs, params.top_k, dim=-1)
    if params.norm_p is not None:
        weights = weights / torch.norm(weights, p=params.norm_p, dim=-1, keepdim=True)
    return weights, indices


def _v4_scores(logits: torch.Tensor, params: RoutingParams) -> torch.Tensor:
    """DeepSeek-V4's router scores s = score_fn(z), transformers' ``ACT2FN[scoring_func]`` (elementwise:
    a pruned router gives the kept experts the same scores)."""
    if params.score_fn == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    if params.score_fn == "sigmoid":
        return torch.sigmoid(logits)
    raise ValueError(f"unknown DeepSeek-V4 scoring_func {params.score_fn!r}; known: sqrtsoftplus, sigmoid")


def _v4_weights(scores: torch.Tensor, indices: torch.Tensor, params: RoutingParams) -> torch.Tensor:
    weights = scores.gather(1, indices)
    weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * params.routed_scaling_factor


def _deepseek_v4(logits, params, correction_bias, expert_mask):
    """DeepSeek-V4's score-routed layers (``DeepseekV4TopKRouter``): top-k (unsorted) of s + b, weights =
    the unbiased s of the selected over (their sum + 1e-20) x ``routed_scaling_factor``."""
    scores = _v4_scores(logits, params)
    choice = scores + correction_bias if correction_bias is not None else scores
    if expert_mask is not None:
        choice = choice.masked_fill(~expert_mask.to(choice.device), float("-inf"))
    indices = torch.topk(choice, params.top_k, dim=-1, sorted=False).indices
    return _v4_weights(scores, indices, params), indices


def _hash_route(logits, params, expert_ids, expert_mask):
    """A hash-routed layer (``DeepseekV4HashRouter``): the experts are the token's table row, remapped
    under ``expert_mask`` (:func:`remap_expert_ids`); weights as :func:`_deepseek_v4`'s."""
    if params.rule != "deepseek_v4":
        raise ValueError(f"routing rule {params.rule!r} has no hash-routed layers")
    indices = expert_ids.long()
    if expert_mask is not None:
        indices = remap_expert_ids(indices, expert_mask)
    return _v4_weights(_v4_scores(logits, params), indices, params), indices


def remap_expert_ids(table: torch.Tensor, expert_mask: torch.Tensor) -> torch.Tensor:
    """A hash-routing table [..., k] of expert ids (DeepSeek-V4's ``tid2eid``) with the experts
    ``expert_mask`` drops (False) replaced, in the original numbering, so no dropped expert is selected.

    In each row, a dropped expert becomes the row's first kept expert (its weight then goes to the
    token's own kept expert); in a row with no kept expert, each dropped expert e becomes the first kept
    expert after e in expert order, cyclically. Rows without dropped experts are unchanged."""
    mask = expert_mask.to(device=table.device, dtype=torch.bool)
    kept = mask.nonzero().flatten()
    if kept.numel() == 0:
        raise ValueError("a hash-routed layer must keep at least one expert")
    num = mask.shape[0]
    # next kept expert at or after e, cyclically: kept ids past e, else the first kept
    after = torch.searchsorted(kept, torch.arange(num, device=table.device))
    next_kept = kept[after % kept.numel()]
    flat = table.reshape(-1, table.shape[-1])
    keeps = mask[flat]
    has_kept = keeps.any(dim=-1, keepdim=True)
    first_kept = flat.gather(1, keeps.long().argmax(dim=-1, keepdim=True))  # the first True of each row
    replacement = torch.where(has_kept, first_kept.expand_as(flat), next_kept[flat])
    return torch.where(keeps, flat, replacement).reshape(table.shape)


def renumber_expert_ids(table: torch.Tensor, new_ids) -> torch.Tensor:
    """A pruned or merged hash layer's table: each original expert e becomes ``new_ids[e]`` (a sequence of
    the kept experts in their new order, original numbering: the i-th becomes i; or a mapping original ->
    new id, a merge's member -> its cluster); experts without a new id are dropped, replaced first by
    :func:`remap_expert_ids`."""
    pairs = dict(new_ids) if isinstance(new_ids, Mapping) else {int(e): i for i, e in enumerate(new_ids)}
    num = max(int(table.max()) + 1 if table.numel() else 0, max(pairs) + 1)
    mask = torch.zeros(num, dtype=torch.bool)
    mask[list(pairs)] = True
    targets = torch.full((num,), -1, dtype=torch.long)
    targets[torch.tensor(list(pairs), dtype=torch.long)] = torch.tensor(list(pairs.values()), dtype=torch.long)
    remapped = remap_expert_ids(table.long(), mask)
    return targets.to(table.device)[remapped].to(table.dtype)


def route_with_skip(logits, params, correction_bias=None, expert_mask=None):
    """``softmax_skip_topk`` (ZAYA): (weights [T, k], indices [T, k], skip [T, k] bool) for logits
    [T, E + 1] whose last class is the skip expert, as the model's router hands them to its experts:
    a skip slot has index 0 and weight 0 (``skip`` says which slots those are; a real use of expert 0
    has ``skip`` False). ``expert_mask`` [E] masks routed experts; the skip class stays routable.

    p = softmax(z) in z's dtype; selection: top-k of float32(p) + b (``balancing_biases`` [E + 1]);
    weights: p of the selected classes."""
    skip_class = logits.shape[-1] - 1
    mask = full_mask(expert_mask, logits.shape[-1])
    probs = torch.softmax(_masked_logits(logits, mask), dim=-1)
    choice = probs.to(torch.float32) + correction_bias if correction_bias is not None else probs.to(torch.float32)
    if mask is not None:
        choice = choice.masked_fill(~mask.to(choice.device), float("-inf"))
    indices = torch.topk(choice, params.top_k, dim=-1)[1]
    weights = torch.gather(probs, dim=-1, index=indices)
    skip = indices == skip_class
    return weights.masked_fill(skip, 0), indices.masked_fill(skip, 0), skip


def _rms_norm(norm, hidden_states: torch.Tensor) -> torch.Tensor:
    """An RMSNorm module's forward (transformers' LlamaRMSNorm order): w * (x_32 / sqrt(mean(x_32^2) + eps)) in x's dtype."""
    variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
    return norm.weight * (hidden_states.to(torch.float32) * torch.rsqrt(variance + norm.variance_epsilon)).to(hidden_states.dtype)


def mlp_router_logits(router, hidden_states: torch.Tensor, router_states: torch.Tensor | None = None):
    """ZAYA's MLP router: (logits [..., E + 1], the state it hands to the next layer's router [..., R]).

    r = down_proj(x) (+ router_states x router_states_scale when the router has the scale: every layer
    but the first, given the previous layer's r); z = out_proj(gelu(fc2(gelu(fc1(rmsnorm(r)))))).
    ``router`` is the model's router module (its weights are read, its forward is not called)."""
    state = F.linear(hidden_states, router.down_proj.weight, router.down_proj.bias)
    scale = getattr(router, "router_states_scale", None)
    if scale is not None and router_states is not None:
        state = state + router_states * scale
    mlp = router.router_mlp
    h = _rms_norm(mlp.norm, state)
    h = F.gelu(F.linear(h, mlp.fc1.weight, mlp.fc1.bias))
    h = F.gelu(F.linear(h, mlp.fc2.weight, mlp.fc2.bias))
    return F.linear(h, mlp.out_proj.weight), state


# --------------------------------------------------------------------------------------------------
# sorted dispatch (JetMoE): the (token, expert) pairs grouped by expert


def sorted_dispatch(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int):
    """JetMoE's router output from [T, k] indices and weights, as ``JetMoeTopKGating.forward`` makes it:
    with p = t * k + slot the flat position of a pair, ``index_sorted`` [T k] orders the pairs by expert
    (``sort`` of the flat indices, as the model sorts them), ``batch_index`` = index_sorted // k (their
    tokens), ``batch_gates`` = w.flatten()[index_sorted] (their weights), ``expert_size`` [E] (pairs per
    expert, a list). Returns (index_sorted, batch_index, batch_gates, expert_size)."""
    top_k = top_k_index.shape[1]
    zeros = torch.zeros([top_k_weights.size(0), num_experts], dtype=top_k_weights.dtype, device=top_k_weights.device)
    expert_size = zeros.scatter(1, top_k_index, 1).long().sum(0).tolist()
    _, index_sorted = top_k_index.flatten().sort(0)
    return index_sorted, index_sorted.div(top_k, rounding_mode="trunc"), top_k_weights.flatten()[index_sorted], expert_size


def topk_of_sorted_dispatch(index_sorted: torch.Tensor, batch_gates: torch.Tensor, expert_size, top_k: int):
    """[T, k] indices and weights of a sorted dispatch (the inverse of :func:`sorted_dispatch`): the pair at
    sorted position q is expert e for the ``expert_size[e]`` positions of e's group, at flat position
    ``index_sorted[q]``."""
    sizes = torch.as_tensor(list(expert_size), dtype=torch.long, device=index_sorted.device)
    experts = torch.repeat_interleave(torch.arange(sizes.numel(), device=index_sorted.device), sizes)
    indices = torch.empty_like(index_sorted).scatter_(0, index_sorted, experts)
    weights = torch.empty_like(batch_gates).scatter_(0, index_sorted, batch_gates)
    return indices.view(-1, top_k), weights.view(-1, top_k)
