"""Similarity features of experts (merging methods): mergeable sums over valid tokens (combine: sum).

* ``expert_mean_output[j] = sum over ALL valid tokens x of f_j(x)`` [E, H]: expert j's output on
  every token, routed or not (HC-SMoE's feature o_j = this sum / ``tokens``; REAM's output
  similarity). It needs every expert on every token (the ``every_expert_output`` signal): E / top_k
  times the routed expert compute, so the observer is opt-in and runs only for the methods that read
  it (``hc_smoe``, ``ream``); the cost is logged when it starts.
* ``router_logit_gram[i, j] = sum over valid tokens x of z_i(x) z_j(x)`` [E, E] of the raw router
  logits z(x): the Gram matrix of the experts' logit columns over tokens, from which the cosine of
  two columns follows exactly (:func:`moeprune.scoring.similarity.router_logit_similarity`; M-SMoE's
  router similarity, REAM's gate-logit similarity). Cheap (E^2 per token), so it runs in every pass.

* ``expert_gated_mean_output[j] = sum over ALL valid tokens x of p_j(x) f_j(x)`` [E, H], p(x) the
  softmax of the raw router logits (REAM's output feature, gated as its reference does); opt-in, it
  shares the every-expert forward of ``expert_mean_output``.

All are plain sums, so the statistics of disjoint token sets add up exactly; padding tokens never
count.
"""

from __future__ import annotations

import logging

import torch

from .base import EVERY_EXPERT_OUTPUT, ROUTER_LOGITS, LayerForward, Observer, register_observer

logger = logging.getLogger(__name__)

#: (E, top_k) pairs whose every-expert cost was already logged (once per process, not per layer).
_COST_LOGGED: set[tuple[int, int]] = set()


def every_expert_cost(num_experts: int, top_k: int) -> float:
    """How many times the routed expert compute one every-expert forward costs: E / top_k."""
    return num_experts / max(top_k, 1)


@register_observer
class ExpertMeanOutput(Observer):
    """Sum over every valid token of every expert's output (HC-SMoE; opt-in, E / top_k times the
    routed expert compute)."""

    name = "expert_mean_output"
    entries = {"expert_mean_output": "sum"}
    needs = frozenset({EVERY_EXPERT_OUTPUT})
    opt_in = True

    def __init__(self, context):
        super().__init__(context)
        self.total = None  # [E, H] float64, sized on the first forward (H is not in the context)
        key = (context.num_experts, context.top_k)
        if key not in _COST_LOGGED:
            _COST_LOGGED.add(key)
            logger.info("expert_mean_output runs every expert on every token: %.1fx the routed expert compute "
                        "(E=%d / top_k=%d) in each MoE layer", every_expert_cost(*key), *key)

    def update(self, forward: LayerForward) -> None:
        outputs = forward.every_expert_output  # [T, E, H]
        summed = outputs[forward.valid.to(outputs.device)].double().sum(dim=0).to(self.context.device)
        self.total = summed if self.total is None else self.total + summed

    def result(self):
        if self.total is None:
            raise RuntimeError("expert_mean_output saw no forward")
        return {"expert_mean_output": self.total.cpu()}


@register_observer
class RouterLogitGram(Observer):
    """Gram matrix of the raw router logits over valid tokens, sum_t z(x_t) z(x_t)^T (M-SMoE, REAM)."""

    name = "router_logit_gram"
    entries = {"router_logit_gram": "sum"}
    needs = frozenset({ROUTER_LOGITS})

    def __init__(self, context):
        super().__init__(context)
        self.gram = self.zeros(context.num_experts, context.num_experts)

    def update(self, forward: LayerForward) -> None:
        logits = forward.router_logits
        z = logits[forward.valid.to(logits.device)].double().to(self.gram.device)  # [T_valid, E]
        self.gram += z.T @ z

    def result(self):
        return {"router_logit_gram": self.gram.cpu()}


@register_observer
class ExpertGatedMeanOutput(Observer):
    """Sum over every valid token of every expert's output times its router probability,
    sum_x softmax(z(x))_j f_j(x) [E, H] (REAM's gated output feature; opt-in, the same every-expert
    forward as ``expert_mean_output``)."""

    name = "expert_gated_mean_output"
    entries = {"expert_gated_mean_output": "sum"}
    needs = frozenset({EVERY_EXPERT_OUTPUT, ROUTER_LOGITS})
    opt_in = True

    def __init__(self, context):
        super().__init__(context)
        self.total = None  # [E, H] float64, sized on the first forward

    def update(self, forward: LayerForward) -> None:
        outputs = forward.every_expert_output  # [T, E, H]
        valid = forward.valid.to(outputs.device)
        probs = forward.router_logits.to(outputs.device)[valid].double().softmax(dim=-1)  # [T_valid, E]
        summed = torch.einsum("te,teh->eh", probs, outputs[valid].double()).to(self.context.device)
        self.total = summed if self.total is None else self.total + summed

    def result(self):
        if self.total is None:
            raise RuntimeError("expert_gated_mean_output saw no forward")
        return {"expert_gated_mean_output": self.total.cpu()}
