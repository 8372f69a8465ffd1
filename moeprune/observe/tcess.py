"""``tcess``: PreMoe's task-conditioned expert specialisation score, in an exactly mergeable form.

PreMoe ("PreMoe: Lightening MoEs on Constrained Memory by Expert Pruning and Retrieval", Zhang et
al., 2025), v3: for each valid token t with router logits z_t [E], the pool P_t is its top-K_a
experts by logit, p_t = softmax over the pooled logits, f(z) = max(z, sigmoid(z)) (strictly
positive, so a never-pooled expert, score 0, cannot outrank a pooled one with a negative logit), and

    TCESS_j = sum_t 1[j in P_t and p_tj >= r] f(z_tj),   r = (1/T) sum_t max_j p_tj  (or a fixed r).

r depends on all the data, so TCESS itself is not a sum over tokens. moeprune therefore keeps, per
expert, a histogram of f over the pooled probability on a fixed grid of B bins on [0, 1]
(bin(p) = min(floor(p B), B - 1)):

    tcess_hist[j, b] = sum_t 1[j in P_t and bin(p_tj) = b] f(z_tj)      (combine: sum)
    tcess_pool_max_prob = sum_t max_j p_tj                                (combine: sum)

and derives, whenever statistics are finalised (collected, loaded, merged, or given a fixed r):

    TCESS_j = sum_{b >= bin(r)} tcess_hist[j, b]

that is, **p >= r with both on the 1/B grid**: the threshold is effectively lowered to
floor(r B) / B, by less than 1/B (B = 1024 by default). Every raw accumulator is a sum, so
statistics of disjoint token sets merge exactly, TCESS included.
"""

from __future__ import annotations

import math

import torch

from .base import DERIVED_ENTRIES, ROUTER_LOGITS, ROUTING, LayerForward, Observer, register_observer

#: Default number of probability bins B of the TCESS histogram.
TCESS_BINS = 1024


def tcess_transform(logits: torch.Tensor) -> torch.Tensor:
    """PreMoe's score transform f(s) = max(s, sigmoid(s)).

    Strictly positive, so an expert that is never pooled (score 0) cannot outrank a pooled expert
    with a negative logit (the flaw of the v1 reference code on sigmoid routers).
    """
    return torch.maximum(logits, torch.sigmoid(logits))


def tcess_pool_size(num_experts: int, top_k: int, tcess_pool: int | None = None) -> int:
    """PreMoe's pool size K_a: ``tcess_pool`` if given, else 2 x top_k, at most E."""
    return min(num_experts, tcess_pool or 2 * top_k)


def probability_bin(prob: torch.Tensor | float, bins: int):
    """bin(p) = min(floor(p B), B - 1) on the fixed grid of ``bins`` bins on [0, 1]."""
    if isinstance(prob, torch.Tensor):
        return torch.clamp(torch.floor(prob * bins).long(), min=0, max=bins - 1)
    return min(max(int(math.floor(prob * bins)), 0), bins - 1)


def tcess_accumulate(logits: torch.Tensor, pool: int, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Histogram [E, B] and sum of max pooled probabilities of the token logits ``logits`` [T, E]."""
    num_experts = logits.shape[-1]
    pool_logits, pool_idx = torch.topk(logits.double(), pool, dim=-1)
    pool_prob = torch.softmax(pool_logits, dim=-1)
    ids = pool_idx * bins + probability_bin(pool_prob, bins)
    hist = torch.zeros(num_experts * bins, dtype=torch.float64, device=logits.device)
    hist.index_add_(0, ids.reshape(-1), tcess_transform(pool_logits).reshape(-1))
    return hist.view(num_experts, bins), pool_prob.max(dim=-1).values.sum()


def tcess_threshold(pool_max_prob: torch.Tensor | float, tokens: torch.Tensor | float, fixed_r: float | None = None) -> float:
    """r: ``fixed_r`` if given, else the mean max pooled probability (1.0 without tokens)."""
    if fixed_r is not None:
        return float(fixed_r)
    tokens = float(tokens)
    return float(pool_max_prob) / tokens if tokens > 0 else 1.0


def tcess_from_histogram(hist: torch.Tensor, r: float) -> torch.Tensor:
    """TCESS_j = sum_{b >= bin(r)} hist[j, b] (float64 [E])."""
    return hist.double()[:, probability_bin(r, hist.shape[-1]):].sum(dim=-1)


def tcess_of_logits(logits: torch.Tensor, pool: int, r: float | None = None, bins: int = TCESS_BINS) -> torch.Tensor:
    """The TCESS sum of one token set [T, E] (the collector's ``tcess``, same grid definition)."""
    z = logits.detach().reshape(-1, logits.shape[-1])
    hist, max_prob = tcess_accumulate(z, min(pool, z.shape[-1]), bins)
    return tcess_from_histogram(hist, tcess_threshold(max_prob, z.shape[0], r))


def derive_tcess(entries: dict[str, torch.Tensor], fixed_r: float | None = None) -> dict[str, torch.Tensor]:
    """``tcess`` and ``tcess_r`` of a layer's raw entries (empty when they lack the histogram)."""
    if "tcess_hist" not in entries:
        return {}
    r = tcess_threshold(entries["tcess_pool_max_prob"], entries["tokens"], fixed_r)
    return {"tcess": tcess_from_histogram(entries["tcess_hist"], r), "tcess_r": torch.tensor(r, dtype=torch.float64)}


@register_observer
class TcessHistogram(Observer):
    name = "tcess"
    entries = {"tcess_hist": "sum", "tcess_pool_max_prob": "sum"}
    needs = frozenset({ROUTING, ROUTER_LOGITS})

    def __init__(self, context):
        super().__init__(context)
        self.hist = self.zeros(context.num_experts, context.tcess_bins)
        self.pool_max_prob = self.zeros()

    def update(self, forward: LayerForward) -> None:
        logits = forward.router_logits[forward.valid.to(forward.router_logits.device)]
        hist, max_prob = tcess_accumulate(logits, self.context.tcess_pool, self.context.tcess_bins)
        self.hist += hist.to(self.hist.device)
        self.pool_max_prob += max_prob.to(self.hist.device)

    def result(self):
        return {"tcess_hist": self.hist.cpu(), "tcess_pool_max_prob": self.pool_max_prob.cpu()}


DERIVED_ENTRIES.update({"tcess": TcessHistogram.name, "tcess_r": TcessHistogram.name})
