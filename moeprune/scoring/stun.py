"""STUN's expert stage as pure functions: expert distances, greedy complete-linkage agglomeration
under one threshold, the threshold search that hits a global expert budget, and the representative.

STUN: Structured-Then-Unstructured Pruning for Scalable MoE Pruning (Lee et al., ACL 2025),
https://arxiv.org/abs/2409.06211 (METHODS.md, "Merging"). The planner is
:mod:`moeprune.plan.stun`; docs/methods.md ("stun") states every choice made here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

#: What the expert distance is built from (the ``distance`` option of the ``stun`` method).
DISTANCES = ("router", "coactivation", "both")


def router_distances(router_weight: torch.Tensor, *, normalize: bool = False) -> torch.Tensor:
    """d_ij = ||W_r[i] - W_r[j]||_2 between router rows ([E, H] -> [E, E], float64).

    With ``normalize`` every row is first scaled to unit L2 norm (d in [0, 2]), so that one global
    threshold means the same thing in every layer whatever the scale of its router; a zero row stays
    zero.
    """
    rows = router_weight.detach().to(torch.float64)
    if normalize:
        norms = rows.norm(dim=1, keepdim=True)
        rows = rows / torch.where(norms > 0, norms, torch.ones_like(norms))
    return torch.cdist(rows, rows).fill_diagonal_(0.0)


def coactivation_distances(coactivation: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """d_ij = 1 - a_ij / sqrt(|S_i| |S_j|) (a_ij: tokens selecting both i and j; [E, E], float64).

    0 when i and j are always selected together, 1 when never; an expert that was never routed is at
    distance 1 from every other expert (0 from itself).
    """
    a = coactivation.detach().to(torch.float64)
    f = frequency.detach().to(torch.float64).reshape(-1)
    scale = torch.sqrt(torch.outer(f, f))
    ratio = torch.where(scale > 0, a / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(a))
    return (1.0 - ratio.clamp(0.0, 1.0)).fill_diagonal_(0.0)


def combined_distances(router: torch.Tensor, coactivation: torch.Tensor, *, normalized_rows: bool) -> torch.Tensor:
    """``distance="both"``: the mean of the router distance mapped to [0, 1] and the co-activation
    distance (already in [0, 1]). Unit rows: d_router / 2; raw rows: d_router / (the layer's
    largest router distance), the only way raw distances share a scale with the co-activation term."""
    scale = 2.0 if normalized_rows else float(router.max())
    scaled = router / scale if scale > 0 else torch.zeros_like(router)
    return (scaled + coactivation) / 2.0


def greedy_clusters(distance: torch.Tensor, threshold: float, *, fixed: Iterable[int] = (),
                    min_clusters: int = 1) -> list[list[int]]:
    """STUN's greedy agglomeration of one layer's experts under ``threshold``.

    Pairs (i, j), i < j, are visited by increasing d_ij (ties: by (i, j)); while d_ij < threshold and
    i, j lie in different clusters, the two clusters merge iff EVERY cross pair (a in one, b in the
    other) has d_ab < threshold (the complete-linkage condition). Experts in ``fixed`` (super experts)
    never merge. Merging stops once ``min_clusters`` clusters remain (the layer keeps top_k experts).

    Returns the clusters, each sorted, ordered by their smallest member.
    """
    d = distance.tolist()  # plain floats: the loop runs in Python
    return _greedy(d, _sorted_pairs(d, set(fixed)), threshold, min_clusters)


def _sorted_pairs(d: list[list[float]], fixed: set[int]) -> list[tuple[float, int, int]]:
    """(d_ij, i, j) for i < j, neither in ``fixed``, by increasing distance then index."""
    num = len(d)
    return sorted((d[i][j], i, j) for i in range(num) for j in range(i + 1, num) if i not in fixed and j not in fixed)


def _greedy(d: list[list[float]], pairs: list[tuple[float, int, int]], threshold: float,
            min_clusters: int) -> list[list[int]]:
    """:func:`greedy_clusters` on plain floats and pre-sorted pairs (the search reuses them)."""
    num = len(d)
    owner = list(range(num))
    members: dict[int, list[int]] = {e: [e] for e in range(num)}
    count = num
    for dij, i, j in pairs:
        if dij >= threshold or count <= min_clusters:
            break
        a, b = owner[i], owner[j]
        if a == b:
            continue
        if all(d[x][y] < threshold for x in members[a] for y in members[b]):
            for x in members[b]:
                owner[x] = a
            members[a] = sorted(members[a] + members.pop(b))
            count -= 1
    return sorted(members.values())


@dataclass(frozen=True)
class ThresholdSearch:
    """The outcome of :func:`search_threshold`.

    Attributes:
        threshold: the global distance threshold chosen.
        clusters: layer -> its clusters at that threshold.
        total: experts kept over all layers (the number of clusters).
        target: the total asked for.
        exact: ``total == target``.
        reason: why not exact ("" when exact).
    """

    threshold: float
    clusters: dict[int, list[list[int]]]
    total: int
    target: int
    exact: bool
    reason: str = ""


def search_threshold(distances: Mapping[int, torch.Tensor], target: int, *,
                     fixed: Mapping[int, Iterable[int]] | None = None, min_clusters: int = 1) -> ThresholdSearch:
    """One global threshold over every layer's distances giving ``target`` clusters in total.

    The total is a step function of the threshold that changes only just above a distance value,
    so the candidates are ``nextafter(d, inf)`` of every distinct distance (plus 0: no merge);
    bisection over them finds the smallest threshold whose total is <= ``target``. When no threshold
    gives exactly ``target`` (several merges become allowed at one distance, i.e. ties, or the
    complete-linkage condition blocks the one merge that would be needed), the threshold just below
    is returned instead (total > target: never more experts removed than asked), with the reason.
    """
    fixed = {layer: set(values) for layer, values in (fixed or {}).items()}

    plain = {layer: d.tolist() for layer, d in distances.items()}
    pairs = {layer: _sorted_pairs(d, fixed.get(layer, set())) for layer, d in plain.items()}

    def cluster_all(threshold: float) -> dict[int, list[list[int]]]:
        return {layer: _greedy(d, pairs[layer], threshold, min_clusters) for layer, d in plain.items()}

    def total(clusters: dict[int, list[list[int]]]) -> int:
        return sum(len(c) for c in clusters.values())

    values = sorted({float(v) for d in distances.values() for v in d.flatten().tolist()})
    candidates = [0.0] + [math.nextafter(v, math.inf) for v in values]
    cache: dict[int, dict[int, list[list[int]]]] = {}

    def at(index: int) -> dict[int, list[list[int]]]:
        if index not in cache:
            cache[index] = cluster_all(candidates[index])
        return cache[index]

    # smallest candidate index whose total is <= target (totals fall as the threshold grows)
    low, high = 0, len(candidates) - 1
    if total(at(high)) > target:
        clusters = at(high)
        return ThresholdSearch(candidates[high], clusters, total(clusters), target, False,
                               "even the largest threshold keeps more experts (each layer keeps at least "
                               f"{min_clusters}, super experts are never merged, and the complete-linkage condition "
                               "blocks further merges)")
    while low < high:
        middle = (low + high) // 2
        if total(at(middle)) <= target:
            high = middle
        else:
            low = middle + 1
    clusters = at(low)
    if total(clusters) == target:
        return ThresholdSearch(candidates[low], clusters, target, target, True)
    previous = at(low - 1) if low > 0 else clusters
    reason = (f"no global threshold gives exactly {target}: raising it past distance "
              f"{values[low - 1] if low > 0 else 0.0:.6g} takes the total from {total(previous)} to {total(clusters)} "
              "at once (tied distances, or merges unlocked together by the complete-linkage condition)")
    return ThresholdSearch(candidates[low - 1] if low > 0 else 0.0, previous, total(previous), target, False, reason)


def representative(members: Sequence[int], read: Callable[[int, str], torch.Tensor],
                   projections: Sequence[str]) -> int:
    """The member m minimising ||w_m - mean_n w_n||^2 over the cluster's flattened weights (every
    projection in ``projections``, read with ``read(expert, proj)``); ties go to the smaller index.

    Two passes over the members (sum, then distances, in float64): the cluster's mean and one member
    are resident at a time, never the whole cluster.
    """
    members = list(members)
    if len(members) == 1:
        return members[0]
    sums: dict[str, torch.Tensor] = {}
    for member in members:
        for proj in projections:
            weight = read(member, proj).detach().to(torch.float64)
            sums[proj] = weight.clone() if proj not in sums else sums[proj] + weight
    means = {proj: total / len(members) for proj, total in sums.items()}
    distances = []
    for member in members:
        distances.append(sum(float(((read(member, proj).detach().to(torch.float64) - means[proj]) ** 2).sum())
                             for proj in projections))
    return members[min(range(len(members)), key=lambda i: (distances[i], members[i]))]
