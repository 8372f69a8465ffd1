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


def _per_token(stats: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """Entry ``name`` (a sum over valid tokens) divided by the number of valid tokens."""
    tokens = float(_entry(stats, "tokens"))
    if tokens <= 0:
        raise StatsError("the statistics saw no valid token; calibrate on some data")
    return _entry(stats, name) / tokens


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
    return _per_token(stats, "expert_mean_output")


def gated_mean_expert_outputs(stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """REAM's output feature o_j = mean over ALL valid calibration tokens of p_j(x) f_j(x) [E, H],
    p(x) = softmax of the raw router logits over every expert (``expert_gated_mean_output`` /
    ``tokens``; the reference's ``gated_sim``)."""
    return _per_token(stats, "expert_gated_mean_output")


def ream_gate_similarity(stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """REAM's gate-logit similarity [E, E] in [0, 1]: the Euclidean distance between the unit-normalised
    logit columns, d_ij = ||z_i / |z_i| - z_j / |z_j| ||, scaled by the layer's largest and turned
    into a similarity, 1 - d_ij / max_kl d_kl (the reference's ``dist2sim``; 1 on the diagonal, all 1
    when every column coincides). From ``router_logit_gram``: d_ij^2 = n_i + n_j - 2 cos_ij with
    n_i = 1 for a nonzero column, 0 for a zero column (which stays the zero vector, as the
    reference's normalisation leaves it)."""
    gram = _entry(stats, "router_logit_gram")
    nonzero = (gram.diagonal() > 0).to(torch.float64)
    cos = gram_cosine(gram) * nonzero[:, None] * nonzero[None, :]
    cos.fill_diagonal_(0.0)
    cos = cos + torch.diag(nonzero)
    squared = nonzero[:, None] + nonzero[None, :] - 2.0 * cos
    distance = squared.clamp_min(0.0).sqrt()
    distance.fill_diagonal_(0.0)
    top = float(distance.max()) if distance.numel() else 0.0
    return torch.ones_like(distance) if top <= 0 else 1.0 - distance / top


#: REAM's output features: the router-gated mean outputs (the reference's default) or the plain ones
#: (HC-SMoE's feature).
REAM_OUTPUTS = ("gated", "plain")


def ream_distance(stats: Mapping[str, torch.Tensor], outputs: str = "gated") -> torch.Tensor:
    """REAM's expert distance [E, E] in [0, 1]:

        d_ij = 1 - (s_out_ij + s_gate_ij) / 2,    s_out_ij = (cos(o_i, o_j) + 1) / 2

    with o_j the router-gated mean output over all tokens (:func:`gated_mean_expert_outputs`;
    ``outputs="plain"``: :func:`mean_expert_outputs`) and s_gate the gate-logit similarity
    (:func:`ream_gate_similarity`); d_ii = 0. As the reference's ``pseudo_group``.

    REAM (2026), https://github.com/SamsungSAILMontreal/ream."""
    if outputs not in REAM_OUTPUTS:
        raise ValueError(f"outputs must be one of {REAM_OUTPUTS}, got {outputs!r}")
    features = gated_mean_expert_outputs(stats) if outputs == "gated" else mean_expert_outputs(stats)
    output_similarity = (cosine_matrix(features) + 1.0) / 2.0
    distance = 1.0 - (output_similarity + ream_gate_similarity(stats)) / 2.0
    distance.fill_diagonal_(0.0)
    return distance
