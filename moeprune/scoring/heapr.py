"""HEAPr neuron scores (Second-order pruning of atomic experts; HEAPr, ICLR 2026).

Neuron k of routed expert j is an "atomic expert" (row k of W_gate and W_up, column k of W_down).
HEAPr estimates the loss increase of removing it with an OBS-style second-order term on the expert's
output, using the Fisher M_j = E_{x in S_j}[g g^T] of g = dL/df_j (f_j the expert's output before
gating; the gate weight enters g through the chain rule):

    S_jk = E_{x in S_j}[h_k(x)^2] * w_k^T M_j w_k
         = E_{x in S_j}[h_k(x)^2] * E_{x in S_j}[(dL/dh_k(x))^2]        (w_k = column k of W_down)

since w_k^T M_j w_k = E[(w_k^T g)^2] and w_k^T g = dL/dh_k. The factorised form needs O(I) memory per
expert instead of the reference's d x d matrix M_j. With the statistics of :mod:`moeprune.observe.heapr`
and N_j = ``frequency[j]`` (routed valid tokens):

    S_jk = (heapr_h2_sum[j, k] / N_j) * (heapr_g2_sum[j, k] / N_j)

Experts with N_j = 0 score -1 (below every routed neuron, whose score is >= 0), as in the reference.
The loss of the gradients is the next-token cross-entropy summed over the calibration set's valid
predicted tokens (:mod:`moeprune.calibration.backward`): the whole-set mean would multiply every score
by the same constant 1 / N_pred^2, so rankings (global or per layer) are identical.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import StatsError

#: Statistics :func:`heapr_scores` reads (observers ``heapr`` and ``routing``).
HEAPR_REQUIRES = ("frequency", "heapr_h2_sum", "heapr_g2_sum")
#: Score of every neuron of an expert no calibration token was routed to.
UNROUTED_SCORE = -1.0


def heapr_scores(layer_stats: Mapping[str, torch.Tensor], **_) -> torch.Tensor:
    """HEAPr score [E, I] (float64, higher = more important) of every routed-expert neuron of one layer:
    (h2_sum / N_j) * (g2_sum / N_j); -1 for every neuron of an expert with N_j = 0."""
    missing = [name for name in HEAPR_REQUIRES if name not in layer_stats]
    if missing:
        raise StatsError(f"HEAPr needs the statistics {missing}: collect them with observers=['heapr'] "
                         "(api.collect), which runs the layer-by-layer backward pass")
    h2 = layer_stats["heapr_h2_sum"].double()
    g2 = layer_stats["heapr_g2_sum"].double()
    count = layer_stats["frequency"].double().reshape(-1, 1)
    if h2.shape != g2.shape or h2.dim() != 2 or h2.shape[0] != count.shape[0]:
        raise StatsError(f"HEAPr statistics disagree: heapr_h2_sum {tuple(h2.shape)}, heapr_g2_sum "
                         f"{tuple(g2.shape)}, frequency {tuple(count.shape[:1])}")
    per_token = count.clamp(min=1.0)
    scores = (h2 / per_token) * (g2 / per_token)
    return torch.where(count > 0, scores, torch.full_like(scores, UNROUTED_SCORE))
