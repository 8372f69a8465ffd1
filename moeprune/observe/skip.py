"""``dynamic_skip``: a histogram of w2 / w1 (second over first gate weight), for NAEE's dynamic skipping.

NAEE (Lu et al., ACL 2024, https://arxiv.org/abs/2402.14800), section "dynamic skipping": per MoE
layer, beta_l = median over calibration tokens of w2 / w1, where w1 >= w2 are the two largest gate
weights the model applies to a token (top-2 routing); at inference the second expert is skipped
where w2 < beta_l * w1 (:mod:`moeprune.skipping`).

A median is not a sum, so moeprune keeps a fixed-size histogram of the ratio on B bins of [0, 1]
(bin(r) = min(floor(r B), B - 1), the grid of :mod:`.tcess`):

    skip_ratio_hist[b] = number of valid tokens with bin(w2 / w1) = b      (combine: sum)

and reads the median on that grid (:func:`beta_from_histogram`): beta = b*/B, the lower edge of the
first bin b* whose cumulative count reaches half the tokens. beta is therefore within 1/B below
the exact (lower) median; with the default B = 1024 the resolution is 1/1024 ~ 0.001. Histograms of
disjoint token sets add up, so merged statistics give exactly the beta of the union.
Tokens whose largest weight is 0 have no ratio and do not count.
"""

from __future__ import annotations

import torch

from ..errors import MoePruneError
from .base import ROUTING, LayerForward, Observer, register_observer
from .tcess import probability_bin

#: Number of bins B of the w2 / w1 histogram.
SKIP_BINS = 1024
#: The routing width dynamic skipping is defined for (the paper's Mixtral: top-2).
SKIP_TOP_K = 2


def top2_ratio(weights: torch.Tensor) -> torch.Tensor:
    """w2 / w1 (float64 [T]) of gate weights [T, k >= 2]: second largest over largest; NaN where w1 = 0."""
    top = torch.topk(weights.double(), 2, dim=-1).values
    return torch.where(top[:, 0] > 0, top[:, 1] / top[:, 0], torch.full_like(top[:, 0], float("nan")))


def ratio_histogram(weights: torch.Tensor, bins: int = SKIP_BINS) -> torch.Tensor:
    """float64 [B]: counts of w2 / w1 per bin of [0, 1] over the tokens of ``weights`` [T, k]."""
    ratio = top2_ratio(weights)
    ratio = ratio[~torch.isnan(ratio)]
    hist = torch.zeros(bins, dtype=torch.float64, device=weights.device)
    return hist.index_add_(0, probability_bin(ratio, bins), torch.ones_like(ratio))


def beta_from_histogram(hist: torch.Tensor) -> float:
    """beta = b*/B with b* the first bin whose cumulative count reaches half the total (0 without tokens)."""
    hist = hist.double().reshape(-1)
    total = float(hist.sum())
    if total <= 0:
        return 0.0
    reached = torch.nonzero(torch.cumsum(hist, 0) >= total / 2)
    return int(reached[0]) / hist.numel()


def check_skip_top_k(top_k: int) -> None:
    """MoePruneError unless the model routes top-2 (the rule skips the second of two experts)."""
    if top_k != SKIP_TOP_K:
        raise MoePruneError(
            f"dynamic skipping (NAEE) skips the second of the two experts a token is routed to; this model routes "
            f"top_k={top_k} experts per token, for which the rule is not defined: drop --dynamic-skip")


@register_observer
class SkipRatioHistogram(Observer):
    name = "dynamic_skip"
    entries = {"skip_ratio_hist": "sum"}
    needs = frozenset({ROUTING})
    opt_in = True

    def __init__(self, context):
        super().__init__(context)
        check_skip_top_k(context.top_k)
        self.hist = self.zeros(SKIP_BINS)

    @classmethod
    def check_geometry(cls, geometry) -> None:
        check_skip_top_k(geometry.top_k)

    def update(self, forward: LayerForward) -> None:
        weights = forward.top_k_weights[forward.valid.to(forward.top_k_weights.device)]
        self.hist += ratio_histogram(weights).to(self.hist.device)

    def result(self):
        return {"skip_ratio_hist": self.hist.cpu()}
