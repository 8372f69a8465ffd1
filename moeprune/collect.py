"""The signals of one MoE layer's forward, gathered for its observers (:mod:`moeprune.observe`).

:class:`InstrumentedLayer` hooks the model's own modules, so every statistic follows the model's
true routing, and gathers only the signals its observers need:

* the router's forward hook receives the model's raw logits (TCESS);
* routing: the selected experts and the gate weights the experts module really receives;
* routed expert outputs (and their intermediate h = act(gate) * up): the experts module's forward is replaced, for the duration of the pass, by
  an instrumented twin that runs the SAME operations as the transformers implementation in use
  (``grouped_mm`` by default, or ``eager``), so its output is bitwise identical while it also
  exposes each routed (token, expert) output f_j(x). Experts are evaluated on routed tokens only;
  every expert on every token (:func:`every_expert_output`) only for an observer that asks for it
  (``every_expert_output``: HC-SMoE, NAEE); without an observer of outputs the experts run untouched;
* families whose experts do not implement transformers' experts interface get their own exact twin:
  Llama 4's MoE block (the gate scales each expert's input; a pair's output is the contribution
  E_j(s x) with gate 1) and LongCat-Flash's loop (identity-expert slots are shown to the observers as
  one past the last routed expert, with no pair), DBRX's loop over flattened [E * I, H] row blocks
  (its router returns logits only: the experts module receives the block's true routing) and JetMoE's
  block (its router groups the pairs by expert);
* a pre-hook on the post-attention norm captures the residual stream h_t (EASY-EP's token weight);
* forward hooks on shared experts capture their outputs (super experts).

Padding tokens (attention mask 0) never count.
"""

from __future__ import annotations

import logging
from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

from .arch import Family
from .layout import module_attribute
from .calibration.placement import SHARDS_ATTRIBUTE, experts_shards, sharded_grouped_mm_pairs
from .observe import (
    OBSERVERS,
    LayerContext,
    LayerForward,
    Observer,
    RoutedPairs,
    easy_ep_token_weight,  # noqa: F401  (re-exported)
    is_dense_observer,
    resolve_observers,
    signals_needed,
    tcess_pool_size,
    tcess_transform,  # noqa: F401  (re-exported)
)
from .errors import MoePruneError
from .routing import route_with_skip, topk_of_sorted_dispatch
from .observe.base import EVERY_EXPERT_OUTPUT, EXPERTS_FORWARD_SIGNALS, GRADIENTS, RESIDUAL, ROUTER_LOGITS, SHARED_OUTPUTS
from .observe.tcess import TCESS_BINS

logger = logging.getLogger(__name__)

EXACT_IMPLEMENTATIONS = ("grouped_mm", "eager")


def _grouped_mm_pairs(experts: nn.Module, hidden_states, top_k_index, top_k_weights):
    """transformers' ``grouped_mm`` experts forward, step for step, also returning the routed pairs
    (:func:`moeprune.calibration.placement.sharded_grouped_mm_pairs`, with the module's own weights
    as one shard, or the shards of a layer split over several devices)."""
    return sharded_grouped_mm_pairs(experts, experts_shards(experts), hidden_states, top_k_index, top_k_weights)


def expert_forward(experts: nn.Module, expert: int, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, f)`` of one expert on ``inputs`` [N, H], as transformers' eager experts loop computes
    them: h = act(gate) * up [N, I] (the input of down_proj), f = down(h) [N, H] before gating."""
    if not getattr(experts, "has_gate", True):  # ungated experts (Nemotron-H): h = act(up(x))
        hidden = experts.act_fn(_expert_linear(experts, "up_proj", expert, inputs))
    elif not hasattr(experts, "_apply_gate"):  # a plain eager loop without transformers' decorator (Inkling)
        gate, up = _expert_linear(experts, "gate_up_proj", expert, inputs).chunk(2, dim=-1)
        hidden = experts.act_fn(gate) * up
    else:
        hidden = experts._apply_gate(_expert_linear(experts, "gate_up_proj", expert, inputs))
    return hidden, _expert_linear(experts, "down_proj", expert, hidden)


def _expert_linear(experts: nn.Module, name: str, expert: int, inputs: torch.Tensor) -> torch.Tensor:
    """One expert's projection ``name`` (``[in, out]`` when the block is transposed, as GPT-OSS's)
    plus its bias where the block has biases."""
    weight = getattr(experts, name)[expert]
    out = inputs @ weight if getattr(experts, "is_transposed", False) else F.linear(inputs, weight)
    return out + getattr(experts, f"{name}_bias")[expert] if getattr(experts, "has_bias", False) else out


def every_expert_output(experts: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """f_j(x) [T, E, H] of every expert j on every token x (the eager computation of
    :func:`expert_forward`); E / top_k times the routed compute, for the observers that need it."""
    return torch.stack([expert_forward(experts, j, hidden_states)[1] for j in range(experts.num_experts)], dim=1)


def _eager_pairs(experts: nn.Module, hidden_states, top_k_index, top_k_weights, accumulate_dtype=None):
    """transformers' eager experts loop (one expert at a time), also returning the routed pairs;
    ``accumulate_dtype``: the loop sums in that dtype (Nemotron-H: the gate weights'), cast back at the end."""
    final = torch.zeros_like(hidden_states, dtype=accumulate_dtype or hidden_states.dtype)
    num_experts = experts.num_experts
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    tokens, ids, weights, outputs, intermediates = [], [], [], [], []
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        if expert_idx == num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        hidden, out = expert_forward(experts, expert_idx, hidden_states[token_idx])
        gate = top_k_weights[token_idx, top_k_pos]
        final.index_add_(0, token_idx, (out * gate[:, None]).to(final.dtype))
        tokens.append(token_idx)
        ids.append(torch.full_like(token_idx, int(expert_idx)))
        weights.append(gate)
        outputs.append(out)
        intermediates.append(hidden)
    if not tokens:
        empty = torch.empty(0, dtype=torch.long, device=hidden_states.device)
        width = experts.down_proj.shape[-2] if getattr(experts, "is_transposed", False) else experts.down_proj.shape[-1]
        return final.to(hidden_states.dtype), RoutedPairs(empty, empty, top_k_weights.new_empty(0),
                                                          hidden_states.new_empty(0, hidden_states.shape[-1]),
                                                          hidden_states.new_empty(0, width))
    return final.to(hidden_states.dtype), RoutedPairs(torch.cat(tokens), torch.cat(ids), torch.cat(weights), torch.cat(outputs),
                                                      torch.cat(intermediates))


def eager_accumulate_dtype(family: Family, top_k_weights: torch.Tensor) -> torch.dtype | None:
    """The dtype a family's eager experts loop sums in when it is not the hidden states' (``[experts]
    eager_accumulate = "weights"``: Nemotron-H sums in the gate weights' dtype), else None."""
    return top_k_weights.dtype if family.spec.get("experts", {}).get("eager_accumulate") == "weights" else None


def routed_expert_outputs(experts: nn.Module, hidden_states, top_k_index, top_k_weights, accumulate_dtype=None):
    """(MoE routed output, routed pairs), computed exactly as the model's experts implementation
    (``accumulate_dtype``: :func:`eager_accumulate_dtype`)."""
    implementation = getattr(getattr(experts, "config", None), "_experts_implementation", "eager") or "eager"
    if implementation == "grouped_mm" or hasattr(experts, SHARDS_ATTRIBUTE):
        return _grouped_mm_pairs(experts, hidden_states, top_k_index, top_k_weights)
    return _eager_pairs(experts, hidden_states, top_k_index, top_k_weights, accumulate_dtype)


class InstrumentedLayer:
    """Feeds one decoder layer's forwards to its observers; ``remove()`` undoes every hook.

    Only the signals the observers need are gathered. When one of them needs routed expert outputs,
    the experts module's forward is replaced by its exact instrumented twin
    (:func:`routed_expert_outputs`); otherwise a pre-hook only reads the model's own routing (selected
    experts and applied gate weights) and the experts run untouched. The observers are updated once
    per forward, when the decoder layer returns; set :attr:`token_mask` ([T] bool, True on real
    tokens) before each forward, or every token counts.
    """

    def __init__(self, family: Family, layer: nn.Module, observers: list[Observer]):
        self.family = family
        self.layer = layer
        self.observers = observers
        self.signals = signals_needed(type(o).name for o in observers)
        self.token_mask: torch.Tensor | None = None
        self.deferred: list | None = None  # see defer()
        self.defer_key = None
        self.handles = []
        self._reset()
        experts = family.experts(layer)
        self.experts = experts
        self.num_experts = family.expert_count(layer)
        self.skip_class = family.skip_class  # ZAYA: skip slots reach the experts as expert 0 with weight 0
        if family.skip_class:
            check_signals(family, self.signals)
            self.routing = family.routing_params(_config_of(experts, layer))
            self.selection_bias = family.correction_bias(layer)
            check_skip_bias(family, self.selection_bias)
        if ROUTER_LOGITS in self.signals or family.skip_class:
            self.handles.append(family.router(layer).register_forward_hook(self._router_hook))
        if RESIDUAL in self.signals:
            self.handles.append(family.residual_norm(layer).register_forward_pre_hook(self._residual_hook))
        if SHARED_OUTPUTS in self.signals:
            for shared in family.shared_experts(layer):
                self.handles.append(shared.register_forward_hook(self._shared_hook))
        if family.gate_on_input:  # Llama 4: the block's exact twin exposes the routing (and the pairs)
            check_signals(family, self.signals)
            self.block = family.moe_block(layer)
            self.block.forward = MethodType(_input_gated_block_forward(self, family.top_k(_config_of(experts, layer))),
                                            self.block)
        elif family.sorted_dispatch:  # JetMoE: the block's exact twin reads the routing back from the sorted pairs
            check_signals(family, self.signals)
            self.block = family.moe_block(layer)
            self.block.forward = MethodType(_sorted_dispatch_block_forward(self), self.block)
        elif family.layout.identity_experts:  # LongCat-Flash: its own loop, identity slots hidden from observers
            check_signals(family, self.signals)
            experts.forward = MethodType(_identity_experts_forward(self), experts)
        elif family.layout.memory.flat and EXPERTS_FORWARD_SIGNALS & self.signals:  # DBRX: its own row-block loop
            experts.forward = MethodType(_flat_experts_forward(self), experts)
        elif EXPERTS_FORWARD_SIGNALS & self.signals:
            experts.forward = MethodType(_instrumented_experts_forward(self), experts)
        else:
            self.handles.append(experts.register_forward_pre_hook(self._routing_hook, with_kwargs=True))
        self.handles.append(layer.register_forward_hook(self._layer_hook))

    def _reset(self) -> None:
        self._signals: dict = {"shared_outputs": []}

    def _router_hook(self, module, args, output):
        if self.skip_class:
            self._signals["skip"] = skip_slots(output, self.routing, self.selection_bias)
        logits = self.family.logits_of(output, self.num_experts)  # identity experts' logits (LongCat-Flash) are not observed
        self._signals["router_logits"] = logits.detach().reshape(-1, logits.shape[-1])

    def _residual_hook(self, module, args):
        self._signals["residual"] = args[0].detach().reshape(-1, args[0].shape[-1])

    def _shared_hook(self, module, args, output):
        self._signals["shared_outputs"].append(output.detach().reshape(-1, output.shape[-1]))

    def _routing_hook(self, module, args, kwargs):
        bound = dict(zip(("hidden_states", "top_k_index", "top_k_weights"), args), **kwargs)
        self._signals["top_k_index"] = bound["top_k_index"].detach()
        self._signals["top_k_weights"] = bound["top_k_weights"].detach()

    def on_routed(self, top_k_index, top_k_weights, pairs: RoutedPairs, routed_output: torch.Tensor,
                  every_output: torch.Tensor | None = None) -> None:
        self._signals.update(top_k_index=top_k_index.detach(), top_k_weights=top_k_weights.detach(),
                             pairs=pairs, routed_output=routed_output.detach(), every_expert_output=every_output)

    def valid(self, num_tokens: int, device) -> torch.Tensor:
        """[T] True on the tokens that count (all of them without a mask)."""
        if self.token_mask is None:
            return torch.ones(num_tokens, dtype=torch.bool, device=device)
        if self.token_mask.numel() != num_tokens:
            raise RuntimeError(f"token mask has {self.token_mask.numel()} entries for {num_tokens} tokens")
        return self.token_mask.reshape(-1).to(device=device, dtype=torch.bool)

    def _layer_hook(self, module, args, output):
        signals, self._signals = self._signals, {"shared_outputs": []}
        if self.skip_class:  # skip slots: one past the last expert (never counted), and no routed pair
            signals.update(without_skips(signals.pop("skip"), signals, self.num_experts))
        top_k_index = signals["top_k_index"]
        forward = LayerForward(valid=self.valid(top_k_index.shape[0], top_k_index.device), **signals)
        if self.deferred is not None:  # a looped layer in the sequential engine: fed in the model body's order later
            self.deferred.append((self.defer_key, forward))
            return
        for observer in self.observers:
            observer.update(forward)

    def defer(self) -> None:
        """Hold every forward (keyed by :attr:`defer_key`) until :meth:`replay`: the sequential engine runs a
        looped layer's passes one after the other over all batches, the model body every pass of one batch
        before the next; replaying in key order (batch, pass) gives the observers the model body's order,
        so their float64 sums are bitwise the whole-model pass's. The forwards (per-token signals) are kept
        in memory until then."""
        self.deferred, self.defer_key = [], None

    def replay(self) -> None:
        """Feed the held forwards to the observers in key order (a stable sort) and stop holding."""
        deferred, self.deferred = sorted(self.deferred or [], key=lambda item: item[0]), None
        for _, forward in deferred:
            for observer in self.observers:
                observer.update(forward)

    def result(self) -> dict[str, torch.Tensor]:
        """Every observer's raw entries (float64, CPU), in observer order."""
        entries: dict[str, torch.Tensor] = {}
        for observer in self.observers:
            entries.update(observer.result())
        return entries

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if "forward" in self.experts.__dict__:
            del self.experts.forward
        if getattr(self, "block", None) is not None:
            self.block.__dict__.pop("forward", None)


#: the skip class's balancing bias transformers sets on every load (ZayaPreTrainedModel._init_weights)
SKIP_BIAS = -1.0


def check_skip_bias(family: Family, selection_bias: torch.Tensor | None) -> None:
    """A MoePruneError when a skip-class router's skip bias is not -1: transformers overwrites it with -1
    on every load, whatever the checkpoint stores, so a layer read from the files (the sequential engine)
    would route differently from the model transformers runs."""
    if selection_bias is not None and selection_bias[-1].item() != SKIP_BIAS:
        raise MoePruneError(
            f"{family.name}: this checkpoint stores {selection_bias[-1].item()} as the skip expert's balancing bias, "
            f"but transformers sets it to {SKIP_BIAS} on every load, so the model it runs routes differently from "
            "the files; collect statistics with mode='whole' (the model as transformers loads it)"
        )


def skip_slots(router_output: tuple, params, selection_bias: torch.Tensor | None) -> torch.Tensor:
    """[T, k] bool: the slots whose selected class is the skip expert (ZAYA), re-derived from the router's
    logits (its output 0, [T, E + 1]) by the routing rule (:func:`moeprune.routing.route_with_skip`, bitwise
    the router's own choice; checked against the indices it returned, output 2)."""
    logits, indices = router_output[0], router_output[2]
    _, ours, skip = route_with_skip(logits.detach().reshape(-1, logits.shape[-1]), params, selection_bias)
    if not torch.equal(ours, indices.detach().reshape(ours.shape)):
        raise MoePruneError("the router's selection differs from moeprune's routing rule for it (softmax_skip_topk); "
                            "the statistics cannot tell its skip slots from expert 0")
    return skip


def without_skips(skip: torch.Tensor, signals: dict, num_experts: int) -> dict:
    """The routing signals of a layer whose skip slots ``skip`` [T, 1] reached the experts as expert 0 with
    weight 0: their index becomes ``num_experts`` (one past the last expert, which the routing observers
    skip) and their (token, expert 0) pairs are removed (one class per token: a skip token has no other
    pair). The routed output is unchanged: a skip slot added 0 x f_0(x) to it."""
    out = {"top_k_index": signals["top_k_index"].masked_fill(skip.to(signals["top_k_index"].device), num_experts)}
    pairs = signals.get("pairs")
    if pairs is not None:
        keep = ~skip.to(pairs.token.device)[pairs.token, 0]
        out["pairs"] = RoutedPairs(pairs.token[keep], pairs.expert[keep], pairs.weight[keep], pairs.output[keep],
                                   None if pairs.intermediate is None else pairs.intermediate[keep],
                                   None if pairs.intermediate_grad is None else pairs.intermediate_grad[keep])
    return out


def _instrumented_experts_forward(instrumented: InstrumentedLayer):
    def forward(self, hidden_states, top_k_index, top_k_weights):
        final, pairs = routed_expert_outputs(self, hidden_states, top_k_index, top_k_weights,
                                             eager_accumulate_dtype(instrumented.family, top_k_weights))
        every = every_expert_output(self, hidden_states) if EVERY_EXPERT_OUTPUT in instrumented.signals else None
        instrumented.on_routed(top_k_index, top_k_weights, pairs, final, every)
        return final

    return forward


#: signals an input-gated family (:attr:`moeprune.arch.Family.gate_on_input`) cannot give: every expert on
#: every token recombined with output gates (NAEE, HC-SMoE), and the layer-by-layer backward pass
INPUT_GATED_REFUSED = frozenset({EVERY_EXPERT_OUTPUT, GRADIENTS})


def check_signals(family: Family, signals) -> None:
    """A MoePruneError when ``family``'s experts cannot give ``signals`` exactly (before any weight is read)."""
    if family.layout.memory.flat and GRADIENTS in set(signals):
        raise MoePruneError(
            f"{family.name}: its experts are flattened [E * I, H] row blocks run by its own loop, which the "
            "layer-by-layer backward pass does not replay, so moeprune cannot provide gradients for it; choose an "
            "expert-drop method without gradients such as reap or frequency"
        )
    if family.skip_class and (INPUT_GATED_REFUSED & set(signals)):
        raise MoePruneError(
            f"{family.name}: its router's last class is a skip expert and each layer's router adds the previous "
            f"layer's router state, so moeprune cannot provide {', '.join(sorted(INPUT_GATED_REFUSED & set(signals)))} "
            "for it exactly (every expert's output on every token re-routed, gradients through the carried router "
            "state); choose an expert-drop method such as reap or frequency"
        )
    if family.layout.identity_experts and (INPUT_GATED_REFUSED & set(signals)):
        raise MoePruneError(
            f"{family.name}: its zero-computation (identity) experts share the router with the routed experts, so "
            f"moeprune cannot provide {', '.join(sorted(INPUT_GATED_REFUSED & set(signals)))} for it exactly (every "
            "expert's output on every token, gradients); choose an expert-drop method such as reap or frequency"
        )
    if family.sorted_dispatch and (INPUT_GATED_REFUSED & set(signals)):
        raise MoePruneError(
            f"{family.name}: its MLP experts run behind a router that groups the (token, expert) pairs by expert, so "
            f"moeprune does not provide {', '.join(sorted(INPUT_GATED_REFUSED & set(signals)))} for it (every expert's "
            "output on every token, gradients); choose an expert-drop method such as reap or frequency"
        )
    refused = sorted(INPUT_GATED_REFUSED & set(signals)) if family.gate_on_input else []
    if refused:
        raise MoePruneError(
            f"{family.name}: the router's weights scale each expert's input (E_j(s * x)), not its output, so "
            f"moeprune cannot provide {', '.join(refused)} for it exactly (methods that recombine every expert's "
            "output with gates, NAEE / HC-SMoE, or need gradients); choose an expert-drop method such as reap or frequency"
        )


def _config_of(experts: nn.Module, layer: nn.Module):
    config = getattr(experts, "config", None) or getattr(getattr(layer, "self_attn", None), "config", None)
    if config is None:
        raise MoePruneError(f"{type(layer).__name__}: cannot find the model config on the layer")
    return config


def input_gated_experts(experts: nn.Module, routed_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama 4's experts forward on the score-scaled copies ``routed_in`` [E * T, H], step for step
    (``Llama4TextExperts.forward``), also returning h = up * act(gate) [E, T, I]: (outputs [E * T, H], h)."""
    hidden = experts.gate_up_proj.shape[-2]
    gate_up = torch.bmm(routed_in.view(experts.gate_up_proj.shape[0], -1, hidden), experts.gate_up_proj)
    gate, up = gate_up.chunk(2, dim=-1)
    intermediate = up * experts.act_fn(gate)
    return torch.bmm(intermediate, experts.down_proj).view(-1, hidden), intermediate


def _input_gated_block_forward(instrumented: InstrumentedLayer, top_k: int):
    """Exact twin of Llama 4's MoE block (``Llama4TextMoe.forward``): the same operations in the same
    order, plus the routing (the router's own top-k of its logits, read back from its dense scores) and
    the routed pairs. A pair's output is the expert's contribution E_j(s * x) and its gate 1 (the gate
    already scaled the input); ``top_k_weights`` are the router's scores s."""
    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_scores, router_logits = self.router(hidden_states)
        num_experts = router_scores.shape[1]
        routed_in = hidden_states.repeat(num_experts, 1)
        routed_in = routed_in * router_scores.transpose(0, 1).reshape(-1, 1)
        routed_out, intermediate = input_gated_experts(self.experts, routed_in)
        out = self.shared_expert(hidden_states)
        out.add_(routed_out.reshape(num_experts, -1, routed_out.shape[-1]).sum(dim=0))
        indices = torch.topk(router_logits, top_k, dim=1)[1]
        weights = router_scores.gather(1, indices)
        pairs, routed = None, None
        if EXPERTS_FORWARD_SIGNALS & instrumented.signals:
            tokens = torch.arange(hidden_states.shape[0], device=indices.device).repeat_interleave(top_k)
            experts = indices.reshape(-1)
            per_expert = routed_out.view(num_experts, hidden_states.shape[0], -1)
            pairs = RoutedPairs(tokens, experts, torch.ones(experts.shape[0], dtype=routed_out.dtype, device=routed_out.device),
                                per_expert[experts, tokens], intermediate[experts, tokens])
            routed = per_expert.sum(dim=0)
        instrumented.on_routed(indices, weights, pairs, routed) if pairs is not None else \
            instrumented._signals.update(top_k_index=indices.detach(), top_k_weights=weights.detach())
        return out, router_logits

    return forward


def flat_expert_forward(experts: nn.Module, expert: int, inputs: torch.Tensor, fmt) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, f)`` of one expert of a flattened block (:class:`moeprune.layout.FlatFormat`, DBRX's
    ``DbrxExpertGLU``) on ``inputs`` [N, H], step for step: h = act(x w1_e^T) * (x v1_e^T), f = h w2_e."""
    count = experts.num_experts
    w1, v1, w2 = (fmt.expert_slice(module_attribute(experts, name), expert, count) for name in fmt.names)
    activation = experts.get_submodule(fmt.gate.rpartition(".")[0]).activation_fn
    hidden = activation(inputs.matmul(w1.T)) * inputs.matmul(v1.T)
    return hidden, hidden.matmul(w2)


def _flat_experts_forward(instrumented: InstrumentedLayer):
    """Exact twin of DBRX's experts loop (``DbrxExperts.forward``: each hit expert's row blocks of the
    flattened w1 / v1 / w2 on its tokens, weighted, summed with ``index_add_``), also giving the routed
    pairs (and every expert on every token when an observer asks for it)."""
    fmt = instrumented.family.layout.memory

    def forward(self, hidden_states, top_k_index, top_k_weights):
        batch_size = hidden_states.shape[0]
        hidden_states = hidden_states.reshape(-1, self.hidden_size)
        next_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        tokens, ids, weights, outputs, intermediates = [], [], [], [], []
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            idx, token_idx = torch.where(expert_mask[expert_idx])
            hidden, out = flat_expert_forward(self, int(expert_idx), hidden_states[token_idx], fmt)
            gate = top_k_weights[token_idx, idx]
            next_states.index_add_(0, token_idx, out.view(-1, self.hidden_size) * top_k_weights[token_idx, idx, None])
            tokens.append(token_idx)
            ids.append(torch.full_like(token_idx, int(expert_idx)))
            weights.append(gate)
            outputs.append(out)
            intermediates.append(hidden)
        if tokens:
            pairs = RoutedPairs(torch.cat(tokens), torch.cat(ids), torch.cat(weights), torch.cat(outputs), torch.cat(intermediates))
        else:
            empty = torch.empty(0, dtype=torch.long, device=hidden_states.device)
            pairs = RoutedPairs(empty, empty, top_k_weights.new_empty(0), hidden_states.new_empty(0, self.hidden_size),
                                hidden_states.new_empty(0, self.ffn_hidden_size))
        every = None
        if EVERY_EXPERT_OUTPUT in instrumented.signals:
            every = torch.stack([flat_expert_forward(self, j, hidden_states, fmt)[1] for j in range(self.num_experts)], dim=1)
        instrumented.on_routed(top_k_index, top_k_weights, pairs, next_states, every)
        return next_states.view(batch_size, -1, self.hidden_size)

    return forward


def _sorted_dispatch_block_forward(instrumented: InstrumentedLayer):
    """Exact twin of JetMoE's MoE block (``JetMoeMoE.forward``): the same operations in the same order, plus
    the routing read back from the router's sorted pairs (:func:`moeprune.routing.topk_of_sorted_dispatch`)
    and, for the observers that need them, the routed pairs (token ``batch_index``, expert, gate
    ``batch_gates``, f_j(x) before gating, h = act(gate) * up). The routed output is the gated sum before
    the block's bias (shared by all experts)."""
    def forward(self, layer_input):
        bsz, length, emb_size = layer_input.size()
        layer_input = layer_input.reshape(-1, emb_size)
        index_sorted, batch_index, batch_gates, expert_size, _ = self.router(layer_input)
        hidden_states = self.input_linear(layer_input[batch_index], expert_size)
        chunked = hidden_states.chunk(2, dim=-1)
        hidden_states = self.activation(chunked[0]) * chunked[1]
        expert_outputs = self.output_linear(hidden_states, expert_size)
        gated = expert_outputs * batch_gates[:, None]
        zeros = torch.zeros((bsz * length, self.input_size), dtype=gated.dtype, device=gated.device)
        routed = zeros.index_add(0, batch_index, gated)
        top_k_index, top_k_weights = topk_of_sorted_dispatch(index_sorted, batch_gates, expert_size, self.router.top_k)
        if EXPERTS_FORWARD_SIGNALS & instrumented.signals:
            pairs = RoutedPairs(batch_index, top_k_index.flatten()[index_sorted], batch_gates, expert_outputs, hidden_states)
            instrumented.on_routed(top_k_index, top_k_weights, pairs, routed)
        else:
            instrumented._signals.update(top_k_index=top_k_index.detach(), top_k_weights=top_k_weights.detach())
        return routed.view(bsz, length, self.input_size) + self.bias

    return forward


def _identity_experts_forward(instrumented: InstrumentedLayer):
    """Exact twin of LongCat-Flash's experts loop (``LongcatFlashExperts.forward``: routed experts
    ``0 .. num_routed_experts - 1``, then identity experts whose output is their input), also giving the
    routed pairs. The observers see the routed experts only: identity slots of ``top_k_index`` become
    ``num_routed_experts`` (one past the last expert, which the routing observers skip), and the
    routed output sums the routed experts' contributions only."""
    def forward(self, hidden_states, top_k_index, top_k_weights):
        final_hidden_states = torch.zeros_like(hidden_states)
        routed_output = torch.zeros_like(hidden_states)
        tokens, ids, weights, outputs, intermediates = [], [], [], [], []
        if top_k_index.numel() == 0:
            return final_hidden_states
        expert_mask = F.one_hot(top_k_index, num_classes=self.total_experts).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero(as_tuple=False)
        for expert_idx_tensor in expert_hit:
            expert_idx = int(expert_idx_tensor.item())
            selection_idx, token_idx = torch.where(expert_mask[expert_idx].squeeze(0))
            if token_idx.numel() == 0:
                continue
            current_state = hidden_states[token_idx]
            routed = not (expert_idx >= self.num_routed_experts or self.gate_up_proj is None)
            if not routed:
                current_hidden_states = self.identity_expert(current_state)
            else:
                gate, up = F.linear(current_state, self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
                intermediate = self.act_fn(gate) * up
                current_hidden_states = F.linear(intermediate, self.down_proj[expert_idx])
                tokens.append(token_idx)
                ids.append(torch.full_like(token_idx, expert_idx))
                weights.append(top_k_weights[token_idx, selection_idx])
                outputs.append(current_hidden_states)
                intermediates.append(intermediate)
            current_hidden_states = current_hidden_states * top_k_weights[token_idx, selection_idx, None]
            final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(hidden_states.dtype))
            if routed:
                routed_output.index_add_(0, token_idx, current_hidden_states.to(hidden_states.dtype))
        if tokens:
            pairs = RoutedPairs(torch.cat(tokens), torch.cat(ids), torch.cat(weights), torch.cat(outputs), torch.cat(intermediates))
        else:
            empty = torch.empty(0, dtype=torch.long, device=hidden_states.device)
            pairs = RoutedPairs(empty, empty, top_k_weights.new_empty(0), hidden_states.new_empty(0, hidden_states.shape[-1]),
                                hidden_states.new_empty(0, self.down_proj.shape[-1]))
        observed = top_k_index.masked_fill(top_k_index >= self.num_routed_experts, self.num_routed_experts)
        instrumented.on_routed(observed, top_k_weights, pairs, routed_output)
        return final_hidden_states

    return forward


def new_observers(
    family: Family,
    layer: nn.Module,
    config,
    names=None,
    *,
    tcess_pool: int | None = None,
    tcess_bins: int = TCESS_BINS,
    device: torch.device | str = "cpu",
) -> list[Observer]:
    """Fresh observers ``names`` (None: all; see :func:`moeprune.observe.resolve_observers`) of one MoE layer."""
    num_experts = family.expert_count(layer)
    top_k = family.top_k(config)
    context = LayerContext(
        num_experts=num_experts,
        top_k=top_k,
        num_shared=len(family.shared_experts(layer)),
        tcess_pool=tcess_pool_size(num_experts, top_k, tcess_pool),
        tcess_bins=tcess_bins,
        device=torch.device(device),
        routing=family.routing_params(config),
        correction_bias=family.correction_bias(layer),
    )
    # dense observers (every decoder layer) are fed by observe.dense.DenseInstrumentation instead
    return [OBSERVERS[name](context) for name in resolve_observers(names) if not is_dense_observer(name)]


def prepare_experts_implementation(model: nn.Module) -> str:
    """Make sure the model runs an experts implementation the collector mirrors exactly."""
    config = model.config
    implementation = getattr(config, "_experts_implementation", None) or "eager"
    if implementation not in EXACT_IMPLEMENTATIONS:
        logger.info("experts implementation %r -> grouped_mm for calibration", implementation)
        model.set_experts_implementation("grouped_mm")
        implementation = "grouped_mm"
    return implementation
