"""One-pass calibration statistics for every MoE layer (see :mod:`moeprune.stats` for the list).

The collector hooks the model's own modules, so every statistic follows the model's true routing:

* the router's forward hook receives the model's raw logits (TCESS);
* the experts module's forward is replaced, for the duration of the pass, by an instrumented twin
  that receives the model's selected experts and gate weights and runs the SAME operations as the
  transformers implementation in use (``grouped_mm`` by default, or ``eager``), so its output is
  bitwise identical while it also exposes each routed (token, expert) output f_j(x). Experts are
  evaluated on routed tokens only, never every expert on every token;
* a pre-hook on the post-attention norm captures the residual stream h_t (EASY-EP's token weight);
* forward hooks on shared experts record their largest output magnitude (super experts).

Padding tokens (attention mask 0) never count.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

from .arch import Family

logger = logging.getLogger(__name__)

EXACT_IMPLEMENTATIONS = ("grouped_mm", "eager")


@dataclass
class RoutedPairs:
    """Every (token, selected expert) pair of one forward: f = expert output before gating."""

    token: torch.Tensor  # [S] token row in the flattened batch
    expert: torch.Tensor  # [S]
    weight: torch.Tensor  # [S] gate weight the model multiplies by
    output: torch.Tensor  # [S, H] f_expert(x_token)


def tcess_transform(logits: torch.Tensor) -> torch.Tensor:
    """PreMoe's score transform f(s) = max(s, sigmoid(s)).

    Strictly positive, so an expert that is never pooled (score 0) cannot outrank a pooled expert
    with a negative logit (the flaw of the v1 reference code on sigmoid routers).
    """
    return torch.maximum(logits, torch.sigmoid(logits))


def easy_ep_token_weight(residual: torch.Tensor, routed_output: torch.Tensor) -> torch.Tensor:
    """EASY-EP token weight s_t = max(0, 1 - cos(h_t, h_t + sum_i g_i f_i(x_t))).

    ``residual`` is the residual stream before the MoE block adds its output; shared experts are
    excluded from ``routed_output``.
    """
    cos = F.cosine_similarity(residual.double(), (residual + routed_output).double(), dim=-1)
    return torch.clamp(1.0 - cos, min=0.0)


def _grouped_mm_pairs(experts: nn.Module, hidden_states, top_k_index, top_k_weights):
    """transformers' ``grouped_mm`` experts forward, step for step, also returning the routed pairs."""
    from transformers.integrations.moe import _grouped_linear

    num_top_k = top_k_index.size(-1)
    num_tokens, hidden_dim = hidden_states.shape
    sample_weights = top_k_weights.reshape(-1)
    expert_ids = top_k_index.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    selected = hidden_states[perm // num_top_k]
    sample_weights_g = sample_weights[perm]
    device = hidden_states.device
    histc_input = expert_ids_g.float() if device.type in ("cpu", "mps") else expert_ids_g.int()
    tokens_per_expert = torch.histc(histc_input, bins=experts.num_experts, min=0, max=experts.num_experts - 1)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
    if experts.has_gate:
        up_weights = experts.gate_up_proj
        up_bias = experts.gate_up_proj_bias[expert_ids_g] if experts.has_bias else None
    else:
        up_weights = experts.up_proj
        up_bias = experts.up_proj_bias[expert_ids_g] if experts.has_bias else None
    proj = _grouped_linear(selected, up_weights, offsets, bias=up_bias, is_transposed=experts.is_transposed)
    proj = experts._apply_gate(proj) if experts.has_gate else experts.act_fn(proj)
    down_bias = experts.down_proj_bias[expert_ids_g] if experts.has_bias else None
    proj = _grouped_linear(proj, experts.down_proj, offsets, bias=down_bias, is_transposed=experts.is_transposed)
    if experts.has_post_expert_norm:
        proj = experts.post_expert_norm(proj)
    weighted = proj * sample_weights_g.unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=device)
    final = weighted[inv_perm].view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)
    return final, RoutedPairs(perm // num_top_k, expert_ids_g, sample_weights_g, proj)


def _eager_pairs(experts: nn.Module, hidden_states, top_k_index, top_k_weights):
    """transformers' eager experts loop (one expert at a time), also returning the routed pairs."""
    final = torch.zeros_like(hidden_states)
    num_experts = experts.num_experts
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    tokens, ids, weights, outputs = [], [], [], []
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        if expert_idx == num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current = hidden_states[token_idx]
        if experts.is_transposed:
            gate_up = current @ experts.gate_up_proj[expert_idx]
        else:
            gate_up = F.linear(current, experts.gate_up_proj[expert_idx])
        if experts.has_bias:
            gate_up = gate_up + experts.gate_up_proj_bias[expert_idx]
        hidden = experts._apply_gate(gate_up)
        if experts.is_transposed:
            out = hidden @ experts.down_proj[expert_idx]
        else:
            out = F.linear(hidden, experts.down_proj[expert_idx])
        if experts.has_bias:
            out = out + experts.down_proj_bias[expert_idx]
        gate = top_k_weights[token_idx, top_k_pos]
        final.index_add_(0, token_idx, (out * gate[:, None]).to(final.dtype))
        tokens.append(token_idx)
        ids.append(torch.full_like(token_idx, int(expert_idx)))
        weights.append(gate)
        outputs.append(out)
    if not tokens:
        empty = torch.empty(0, dtype=torch.long, device=hidden_states.device)
        return final, RoutedPairs(empty, empty, top_k_weights.new_empty(0), hidden_states.new_empty(0, hidden_states.shape[-1]))
    return final, RoutedPairs(torch.cat(tokens), torch.cat(ids), torch.cat(weights), torch.cat(outputs))


def routed_expert_outputs(experts: nn.Module, hidden_states, top_k_index, top_k_weights):
    """(MoE routed output, routed pairs), computed exactly as the model's experts implementation."""
    implementation = getattr(getattr(experts, "config", None), "_experts_implementation", "eager") or "eager"
    if implementation == "grouped_mm":
        return _grouped_mm_pairs(experts, hidden_states, top_k_index, top_k_weights)
    return _eager_pairs(experts, hidden_states, top_k_index, top_k_weights)


def tcess_pool_size(num_experts: int, top_k: int, tcess_pool: int | None = None) -> int:
    """PreMoe's pool size K_a: ``tcess_pool`` if given, else 2 x top_k, at most E."""
    return min(num_experts, tcess_pool or 2 * top_k)


class LayerCollector:
    """Accumulates the statistics of one MoE layer over batches (float64, mergeable)."""

    def __init__(self, num_experts: int, top_k: int, num_shared: int, tcess_pool: int | None = None, tcess_r: float | None = None):
        self.num_experts = num_experts
        self.top_k = top_k
        self.tcess_pool = tcess_pool_size(num_experts, top_k, tcess_pool)
        self.tcess_r = tcess_r
        E = num_experts
        f64 = dict(dtype=torch.float64)
        self.tokens = torch.zeros((), **f64)
        self.frequency = torch.zeros(E, **f64)
        self.soft_count = torch.zeros(E, **f64)
        self.ean_sum = torch.zeros(E, **f64)
        self.reap_sum = torch.zeros(E, **f64)
        self.easy_ep = torch.zeros(E, **f64)
        self.coactivation = torch.zeros(E * E, **f64)
        self.max_abs_output = torch.zeros(E, **f64)
        self.shared_max_abs_output = torch.zeros(num_shared, **f64)
        self.pool_max_prob = torch.zeros((), **f64)
        self._tcess_chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        # set per forward by the hooks
        self.token_mask: torch.Tensor | None = None
        self._logits: torch.Tensor | None = None
        self._residual: torch.Tensor | None = None

    # -- per-forward inputs --------------------------------------------------------------------
    def valid(self, num_tokens: int) -> torch.Tensor:
        if self.token_mask is None:
            return torch.ones(num_tokens, dtype=torch.bool)
        if self.token_mask.numel() != num_tokens:
            raise RuntimeError(f"token mask has {self.token_mask.numel()} entries for {num_tokens} tokens")
        return self.token_mask

    def on_router_logits(self, logits: torch.Tensor) -> None:
        self._logits = logits.detach().reshape(-1, logits.shape[-1])

    def on_residual(self, residual: torch.Tensor) -> None:
        self._residual = residual.detach().reshape(-1, residual.shape[-1])

    def on_shared_output(self, index: int, output: torch.Tensor) -> None:
        flat = output.detach().reshape(-1, output.shape[-1])
        valid = self.valid(flat.shape[0]).to(flat.device)
        if valid.any():
            peak = flat[valid].abs().amax().double().cpu()
            self.shared_max_abs_output[index] = torch.maximum(self.shared_max_abs_output[index], peak)

    # -- the main update -------------------------------------------------------------------------
    def on_routed(self, top_k_index: torch.Tensor, pairs: RoutedPairs, routed_output: torch.Tensor) -> None:
        """Add one forward's routed pairs (routed_output = sum_i g_i f_i, shared experts excluded)."""
        E = self.num_experts
        num_tokens = top_k_index.shape[0]
        valid = self.valid(num_tokens).to(top_k_index.device)
        self.tokens += valid.sum().double().cpu()

        keep = valid[pairs.token]
        expert = pairs.expert[keep].cpu()
        gate = pairs.weight[keep].double().cpu()
        output = pairs.output[keep]
        norm = torch.linalg.vector_norm(output.double(), dim=-1).cpu()
        peak = output.abs().amax(dim=-1).double().cpu() if output.numel() else norm
        self.frequency += torch.bincount(expert, minlength=E).double()
        self.soft_count.index_add_(0, expert, gate)
        self.ean_sum.index_add_(0, expert, norm)
        self.reap_sum.index_add_(0, expert, gate * norm)
        self.max_abs_output = self.max_abs_output.scatter_reduce(0, expert, peak, reduce="amax")

        if self._residual is not None:
            token_weight = easy_ep_token_weight(self._residual, routed_output.detach()).cpu()
            self.easy_ep.index_add_(0, expert, gate * norm * token_weight[pairs.token[keep].cpu()])

        selected = top_k_index[valid].cpu()
        k = selected.shape[-1]
        pair_ids = (selected.unsqueeze(-1) * E + selected.unsqueeze(-2)).reshape(-1)
        self.coactivation += torch.bincount(pair_ids, minlength=E * E).double()

        if self._logits is not None:
            self._add_tcess(self._logits[valid.to(self._logits.device)])
        self._logits = None
        self._residual = None

    def _add_tcess(self, logits: torch.Tensor) -> None:
        """PreMoe TCESS: pool = top-K_a experts by logit, p = softmax over the pool."""
        pool_logits, pool_idx = torch.topk(logits.double(), self.tcess_pool, dim=-1)
        pool_prob = torch.softmax(pool_logits, dim=-1)
        self.pool_max_prob += pool_prob.max(dim=-1).values.sum().cpu()
        self._tcess_chunks.append((pool_idx.cpu(), pool_prob.cpu(), tcess_transform(pool_logits).cpu()))

    # -- result ------------------------------------------------------------------------------
    def result(self) -> dict[str, torch.Tensor]:
        """The layer's statistics; TCESS uses r = mean max pooled probability (v3) unless fixed."""
        r = self.tcess_r
        if r is None:
            r = float(self.pool_max_prob / self.tokens) if self.tokens > 0 else 1.0
        tcess = torch.zeros(self.num_experts, dtype=torch.float64)
        for idx, prob, score in self._tcess_chunks:
            tcess.index_add_(0, idx.reshape(-1), torch.where(prob >= r, score, 0.0).reshape(-1))
        E = self.num_experts
        out = {
            "tokens": self.tokens.clone(),
            "frequency": self.frequency.clone(),
            "soft_count": self.soft_count.clone(),
            "tcess": tcess,
            "tcess_r": torch.tensor(r, dtype=torch.float64),
            "tcess_pool_max_prob": self.pool_max_prob.clone(),
            "ean_sum": self.ean_sum.clone(),
            "reap_sum": self.reap_sum.clone(),
            "easy_ep": self.easy_ep.clone(),
            "coactivation": self.coactivation.reshape(E, E).clone(),
            "max_abs_output": self.max_abs_output.clone(),
        }
        if self.shared_max_abs_output.numel():
            out["shared_max_abs_output"] = self.shared_max_abs_output.clone()
        return out


class InstrumentedLayer:
    """Installs a :class:`LayerCollector`'s hooks on one decoder layer; ``remove()`` undoes them."""

    def __init__(self, family: Family, layer: nn.Module, collector: LayerCollector):
        self.family = family
        self.layer = layer
        self.collector = collector
        self.handles = []
        router = family.router(layer)
        experts = family.experts(layer)
        self.handles.append(router.register_forward_hook(self._router_hook))
        self.handles.append(family.residual_norm(layer).register_forward_pre_hook(self._residual_hook))
        for index, shared in enumerate(family.shared_experts(layer)):
            self.handles.append(shared.register_forward_hook(self._shared_hook(index)))
        self.experts = experts
        experts.forward = MethodType(_instrumented_experts_forward(collector), experts)

    def _router_hook(self, module, args, output):
        logits = output[0] if isinstance(output, tuple) else output
        self.collector.on_router_logits(logits)

    def _residual_hook(self, module, args):
        self.collector.on_residual(args[0])

    def _shared_hook(self, index):
        def hook(module, args, output):
            self.collector.on_shared_output(index, output)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if "forward" in self.experts.__dict__:
            del self.experts.forward


def _instrumented_experts_forward(collector: LayerCollector):
    def forward(self, hidden_states, top_k_index, top_k_weights):
        final, pairs = routed_expert_outputs(self, hidden_states, top_k_index, top_k_weights)
        collector.on_routed(top_k_index, pairs, final)
        return final

    return forward


def prepare_experts_implementation(model: nn.Module) -> str:
    """Make sure the model runs an experts implementation the collector mirrors exactly."""
    config = model.config
    implementation = getattr(config, "_experts_implementation", None) or "eager"
    if implementation not in EXACT_IMPLEMENTATIONS:
        logger.info("experts implementation %r -> grouped_mm for calibration", implementation)
        model.set_experts_implementation("grouped_mm")
        implementation = "grouped_mm"
    return implementation


def new_collector(family: Family, layer: nn.Module, config, tcess_pool=None, tcess_r=None) -> LayerCollector:
    return LayerCollector(
        num_experts=family.experts(layer).num_experts,
        top_k=family.top_k(config),
        num_shared=len(family.shared_experts(layer)),
        tcess_pool=tcess_pool,
        tcess_r=tcess_r,
    )


