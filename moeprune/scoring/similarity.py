"""Expert similarities for the merging methods: pure functions of one layer's statistics.

Inputs are the sums the observers of :mod:`moeprune.observe.similarity` accumulate (float64, exact
over the whole calibration set); outputs are float64 matrices [E, E] (or features [E, H]). Formulas
and papers: docs/methods.md, sections hc-smoe, m-smoe and ream.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import StatsError


def _entry(stats: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in stats:
        raise StatsError(f"the statistics lack {name!r}; collect them for this method (moeprune collect with its "
                         "observers, or pass --data)")
    return torch.as_tensor(stats[name]).detach().to(device="cpu", dtype=torch.float64)


def cosine_matrix(rows: torch.Tensor) -> torch.Tensor:
    """cos(a_i, a_j) of the rows of ``rows`` [E, D] -> [E, E]; a zero row has cosine 0 with every
    other row and 1 with itself."""
    rows = rows.to(torch.float64)
    norms = torch.linalg.vector_norm(rows, dim=1)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    unit = rows / safe[:, None]
    cos = (unit @ unit.T).clamp(-1.0, 1.0)
    cos.fill_diagonal_(1.0)
    return cos


def gram_cosine(gram: torch.Tensor) -> torch.Tensor:
    """cos of two columns from their Gram matrix: G_ij / sqrt(G_ii G_jj) (0 where a column is zero,
    1 on the diagonal)."""
    gram = gram.to(torch.float64)
    diag = gram.diagonal().clamp_min(0.0).sqrt()
    denom = diag[:, None] * diag[None, :]
    cos = torch.where(denom > 0, gram / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(gram))
    cos = cos.clamp(-1.0, 1.0)
    cos.fill_diagonal_(1.0)
    return cos


def router_logit_similarity(stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """M-SMoE's router similarity [E, E] in [0, 1]: (cos(z_i, z_j) + 1) / 2, where z_j is expert j's
    column of raw router logits over every valid calibration token (from ``router_logit_gram`` =
    sum_t z(x_t) z(x_t)^T, so cos = G_ij / sqrt(G_ii G_jj) exactly).

    Merge, Then Compress (M-SMoE, ICLR 2024), https://arxiv.org/abs/2310.01334."""
    return (gram_cosine(_entry(stats, "router_logit_gram")) + 1.0) / 2.0


def mean_expert_outputs(stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """HC-SMoE's feature o_j = mean over ALL valid calibration tokens of f_j(x) [E, H]
    (``expert_mean_output`` / ``tokens``).

    Retraining-Free Merging of Sparse MoE via Hierarchical Clustering (HC-SMoE, ICML 2025),
    https://arxiv.org/abs/2410.08589."""
    total = _entry(stats, "expert_mean_output")
    tokens = float(_entry(stats, "tokens"))
    if tokens <= 0:
        raise StatsError("the statistics saw no valid token; calibrate on some data")
    return total / tokens


def ream_distance(stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """REAM's expert distance [E, E] in [0, 1.5]:

        d_ij = ((1 - cos(o_i, o_j)) + (1 - s_ij)) / 2

    with o_j the mean output over all tokens (:func:`mean_expert_outputs`) and s_ij the router-logit
    similarity (:func:`router_logit_similarity`, in [0, 1]); d_ii = 0. The reference's "distance =
    (output cosine + gate-logit similarity) / 2" is this as one minus a similarity.

    REAM (2026), https://github.com/SamsungSAILMontreal/ream."""
    output_cos = cosine_matrix(mean_expert_outputs(stats))
    distance = ((1.0 - output_cos) + (1.0 - router_logit_similarity(stats))) / 2.0
    distance.fill_diagonal_(0.0)
    return distance
