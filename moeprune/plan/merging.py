"""Merge planners: HC-SMoE, M-SMoE and REAM build plans of :class:`~moeprune.plan.MergeExperts` actions.

Each planner follows the registry's planner contract (:mod:`moeprune.methods`): ``planner(info,
stats, *, method, ratio, seed, protect_super_experts, **options) -> Plan``. The budget ``ratio``
is the fraction of routed experts REMOVED, as for dropping (:func:`~moeprune.plan.kept_from_ratio`),
so a merge and a drop at the same ratio leave the same number of experts. Super experts (when
protected) stay singleton clusters that no other expert joins; shared experts are never touched.

The clusterers are small pure functions (:func:`hierarchical_clusters`, :func:`assign_to_dominants`,
:func:`bounded_assignment`, :func:`global_dominants`); the similarities come from
:mod:`moeprune.scoring.similarity`. Each cluster lists its dominant (reference) expert first; the
merge weights are the members' routing frequencies (equal weights when no member was routed); with
``align`` every member's neurons are matched to the dominant's (:mod:`moeprune.ops.align`).
Formulas, papers and every design choice: docs/methods.md (hc-smoe, m-smoe, ream).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from scipy.cluster.hierarchy import cut_tree, linkage as scipy_linkage

from ..errors import PlanError
from ..ops.align import align_cluster
from ..scoring import reap_scores
from ..scoring.similarity import REAM_OUTPUTS, mean_expert_outputs, ream_distance, router_logit_similarity
from ..super_experts import detect_super_experts
from .actions import ROUTER_MODES, ROUTER_ROWS, MergeCluster, MergeExperts
from .budgets import _check_ratio, kept_from_ratio, validate_budget
from .model import Plan
from .validation import validate_plan

logger = logging.getLogger(__name__)

#: scipy linkages HC-SMoE may run (Euclidean distance on the mean outputs).
LINKAGES = ("average", "single", "complete", "ward")
#: How M-SMoE spreads its budget: the same count in every layer, or one global ranking.
BUDGETS = ("per_layer", "global")
#: HC-SMoE's dominant member (alignment target, vanilla router row): the member nearest the cluster's
#: mean feature (the reference's rule when no dominant criterion is set) or the most frequent one.
HC_DOMINANTS = ("center", "frequency")
#: REAM's grouping: salient centroids first take their nearest experts (the reference), or every
#: (expert, centroid) pair nearest first under the same size bound.
REAM_ASSIGN = ("greedy", "nearest")
#: REAM's merge weights: the REAP saliencies (the reference) or the routing frequencies.
MERGE_WEIGHTS = ("saliency", "frequency")
SWITCHES = {"on": True, "off": False, True: True, False: False}


# --------------------------------------------------------------------------------------------------
# clusterers (pure functions)


def hierarchical_clusters(features: torch.Tensor, n_clusters: int, linkage: str = "average") -> list[list[int]]:
    """Agglomerative clustering of the rows of ``features`` [n, D] (Euclidean, scipy ``linkage``), cut
    so that exactly ``n_clusters`` clusters remain; clusters as sorted row lists, ordered by their
    first row. An unknown linkage is a PlanError (never a silent fallback to another algorithm)."""
    if linkage not in LINKAGES:
        raise PlanError(f"unknown linkage {linkage!r}; choose one of {', '.join(LINKAGES)}")
    n = features.shape[0]
    if not 1 <= n_clusters <= max(n, 1):
        raise PlanError(f"cannot cut {n} experts into {n_clusters} clusters")
    if n_clusters == n:
        return [[i] for i in range(n)]
    tree = scipy_linkage(features.to(torch.float64).numpy(), method=linkage, metric="euclidean")
    labels = cut_tree(tree, n_clusters=n_clusters).reshape(-1)
    groups: dict[int, list[int]] = {}
    for row, label in enumerate(labels.tolist()):
        groups.setdefault(label, []).append(row)
    return sorted(groups.values(), key=lambda g: g[0])


def assign_to_dominants(similarity: torch.Tensor, dominants: Sequence[int], others: Sequence[int],
                        closed: Sequence[int] = ()) -> dict[int, list[int]]:
    """Each expert of ``others`` joins the dominant it is most similar to (``similarity[j, d]``
    largest; ties: the lower index); dominants in ``closed`` (super experts) take nobody.
    Returns ``{dominant: [dominant, members...]}``."""
    open_ = [d for d in dominants if d not in set(closed)]
    if others and not open_:
        raise PlanError("every kept expert is a protected super expert, so no expert can be merged into another; "
                        "keep more experts (a smaller --ratio) or pass --no-protect-super-experts")
    clusters = {d: [d] for d in dominants}
    for j in others:
        best = max(open_, key=lambda d: (float(similarity[j, d]), -d))
        clusters[best].append(j)
    return clusters


def bounded_assignment(distance: torch.Tensor, centroids: Sequence[int], others: Sequence[int], group_size: int,
                       closed: Sequence[int] = ()) -> dict[int, list[int]]:
    """Assign ``others`` to ``centroids`` nearest first with at most ``group_size`` experts per group
    (the centroid included): every (expert, centroid) pair in increasing ``distance[j, c]`` (ties:
    lower expert, then lower centroid) is accepted while the expert is unassigned and the centroid's
    group has room. Without the bound this is nearest-centroid assignment. Centroids in ``closed``
    take nobody. Returns ``{centroid: [centroid, members...]}``."""
    open_ = [c for c in centroids if c not in set(closed)]
    if len(others) > len(open_) * (group_size - 1):
        raise PlanError(f"{len(others)} experts cannot join {len(open_)} centroids of at most {group_size} experts each; "
                        "raise --group-size or keep more experts")
    pairs = sorted((float(distance[j, c]), j, c) for j in others for c in open_)
    clusters = {c: [c] for c in centroids}
    assigned: set[int] = set()
    for _, j, c in pairs:
        if j not in assigned and len(clusters[c]) < group_size:
            clusters[c].append(j)
            assigned.add(j)
    return clusters


def salient_first_groups(distance: torch.Tensor, centroids: Sequence[int], others: Sequence[int], group_size: int,
                         closed: Sequence[int] = ()) -> dict[int, list[int]]:
    """REAM's grouping ("pseudo-pruning"): ``centroids`` are visited in the given order (most salient
    first); each takes the ``group_size - 1`` unassigned experts of ``others`` nearest to it
    (``distance[c, j]`` ascending, ties: the lower index), until every expert has a group. Salient
    centroids thus absorb whole neighbourhoods while the last ones may stay alone. Centroids in
    ``closed`` take nobody. Returns ``{centroid: [centroid, members...]}``."""
    open_ = [c for c in centroids if c not in set(closed)]
    if len(others) > len(open_) * (group_size - 1):
        raise PlanError(f"{len(others)} experts cannot join {len(open_)} centroids of at most {group_size} experts each; "
                        "raise --group-size or keep more experts")
    clusters = {c: [c] for c in centroids}
    free = list(others)
    for c in open_:
        if not free:
            break
        nearest = sorted(free, key=lambda j: (float(distance[c, j]), j))[:group_size - 1]
        clusters[c].extend(sorted(nearest))
        free = [j for j in free if j not in set(nearest)]
    return clusters


def ream_merge_weights(saliency: torch.Tensor) -> torch.Tensor:
    """REAM's merge weights: the REAP saliencies, a zero one (an expert never routed) replaced by
    min(0.5, the smallest positive one) so that every member counts (all zero: unchanged, and the
    merge falls back to equal weights)."""
    weights = saliency.to(torch.float64).clone()
    positive = weights[weights > 0]
    if positive.numel():
        weights[weights <= 0] = min(0.5, float(positive.min()))
    return weights


def nearest_to_center(features: torch.Tensor, members: Sequence[int]) -> int:
    """The member whose feature row is nearest (Euclidean) to the unweighted mean of the members'
    rows (ties: the lower index)."""
    rows = features[list(members)].to(torch.float64)
    distances = torch.linalg.vector_norm(rows - rows.mean(dim=0, keepdim=True), dim=1).tolist()
    return min(zip(distances, members))[1]


def top_experts(scores: torch.Tensor, count: int, among: Sequence[int]) -> list[int]:
    """The ``count`` experts of ``among`` with the highest scores (ties: the lower index)."""
    return sorted(among, key=lambda e: (-float(scores[e]), e))[:max(count, 0)]


def global_dominants(frequencies: Mapping[int, torch.Tensor], total: int, minimum: int,
                     protected: Mapping[int, Sequence[int]]) -> dict[int, list[int]]:
    """M-SMoE's global choice of dominant experts: every layer's frequencies normalised by its largest
    (each layer's top expert scores 1), then one ranking over all layers. Each layer first keeps its
    protected experts and its ``minimum`` most frequent ones; the remaining slots of ``total`` go to
    the highest normalised frequencies (ties: lower layer, then lower index)."""
    chosen: dict[int, set[int]] = {}
    normalised: dict[int, torch.Tensor] = {}
    for layer, freq in frequencies.items():
        top = float(freq.max()) if freq.numel() else 0.0
        normalised[layer] = freq / top if top > 0 else torch.zeros_like(freq)
        chosen[layer] = set(protected.get(layer, ())) | set(top_experts(freq, minimum, range(freq.numel())))
    forced = sum(len(c) for c in chosen.values())
    if forced > total:
        raise PlanError(f"the global budget keeps {total} experts, but the layers need {forced} (at least {minimum} each "
                        "plus the protected super experts); keep more experts (a smaller --ratio)")
    ranking = sorted(((-float(normalised[layer][e]), layer, e) for layer in frequencies
                      for e in range(frequencies[layer].numel()) if e not in chosen[layer]))
    for _, layer, e in ranking[:total - forced]:
        chosen[layer].add(e)
    return {layer: sorted(experts) for layer, experts in chosen.items()}


# --------------------------------------------------------------------------------------------------
# shared plan assembly


def _option(value, allowed, name: str):
    if value not in allowed:
        raise PlanError(f"--{name.replace('_', '-')} must be one of {', '.join(map(str, allowed))}, got {value!r}")
    return value


def _switch(value, name: str) -> bool:
    if value not in SWITCHES:
        raise PlanError(f"--{name} must be on or off, got {value!r}")
    return SWITCHES[value]


def _entry(stats, layer: int, name: str) -> torch.Tensor:
    entries = stats.layers[layer]
    if name not in entries:
        raise PlanError(f"the statistics lack {name!r} (layer {layer}); collect them for this method (pass --data, or "
                        f"`moeprune collect --observers` with the observer of {name!r})")
    return torch.as_tensor(entries[name]).to(torch.float64)


def _budget(info, ratio, router: str) -> dict[int, int]:
    """Experts left per MoE layer at ``ratio`` (removed fraction), checked against routing (an exact
    router keeps the model's own group-limited routing, so its counts need not split over groups)."""
    if ratio is None:
        raise PlanError("merging methods take their budget as --ratio (the fraction of experts removed)")
    ratio = _check_ratio(ratio)
    geometry = info.geometry
    counts = {layer: kept_from_ratio(geometry.experts_in(layer), ratio) for layer in geometry.moe_layers}
    validate_budget(geometry, counts, collapse_groups=router == "exact")
    return counts


def routing_groups(info, layer: int, router: str) -> list[list[int]]:
    """The expert sets clustered separately: each routing group with a vanilla router on
    group-limited routing (a merged expert must stay in its group, every group keeping the same
    number), else the whole layer."""
    geometry = info.geometry
    experts = list(range(geometry.experts_in(layer)))
    if router != "vanilla" or not geometry.grouped:
        return [experts]
    size = geometry.experts_per_group
    return [experts[g * size:(g + 1) * size] for g in range(geometry.n_group)]


def _per_group(info, layer: int, count: int, router: str, protected: Sequence[int], cluster) -> list[list[int]]:
    """Clusters of one layer: ``cluster(experts, guarded, budget)`` run on each routing group
    (:func:`routing_groups`) with its share of ``count``; ``guarded`` = the group's super experts."""
    groups = routing_groups(info, layer, router)
    share = count // len(groups)
    out: list[list[int]] = []
    for experts in groups:
        guarded = sorted(e for e in protected if e in experts)
        if len(experts) > len(guarded) and share - len(guarded) < 1:
            raise PlanError(f"layer {layer}: {len(guarded)} protected super experts fill the budget of {share} "
                            f"{'per routing group ' if len(groups) > 1 else ''}; keep more experts (a smaller --ratio) "
                            "or pass --no-protect-super-experts")
        out.extend(cluster(experts, guarded, share))
    return out


def _protected(info, stats, protect: bool) -> dict[int, list[int]]:
    if not protect:
        return {}
    return detect_super_experts(stats, info.geometry).routed_by_layer()


def _ordered(group: Sequence[int], dominant: int) -> list[int]:
    return [dominant] + sorted(m for m in group if m != dominant)


def _merge_cluster(info, layer: int, members: Sequence[int], weight: torch.Tensor, align: bool) -> MergeCluster:
    """A cluster (dominant first) with merge weights ``weight[m]`` (frequencies or saliencies; equal
    when all are zero) and, with ``align``, the permutations matching every member to the dominant."""
    weights = tuple(float(weight[m]) for m in members)
    if not sum(weights) > 0:
        weights = (1.0,) * len(members)
    perms = align_cluster(info.layout, layer, members) if align else ()
    return MergeCluster(tuple(members), weights, perms)


def assemble_plan(info, stats, method, ratio, clusters: Mapping[int, Sequence[Sequence[int]]],
                  protected: Mapping[int, Sequence[int]], *, router: str, router_rows: str, align: bool,
                  options: Mapping, weights: Mapping[int, torch.Tensor] | None = None) -> Plan:
    """The validated merge plan of ``clusters`` (per layer, each cluster dominant first), merged with
    per-expert ``weights`` (default: the routing frequencies)."""
    actions = {}
    for layer, groups in sorted(clusters.items()):
        weight = weights[layer] if weights is not None else _entry(stats, layer, "frequency")
        ordered = sorted(groups, key=lambda g: g[0])  # cluster i = expert i, in the dominants' order
        merged = tuple(_merge_cluster(info, layer, g, weight, align) for g in ordered)
        actions[layer] = [MergeExperts(merged, router=router, router_rows=router_rows)]
    plan = Plan(layers={}, method=method.name, budget={"ratio": ratio, "options": dict(options)},
                protected={layer: list(p) for layer, p in protected.items() if p},
                model_fingerprint=info.fingerprint, family=info.family.name, num_experts=info.geometry.num_experts,
                actions=actions)
    plan.calibration = {key: stats.metadata.get(key) for key in ("data_hash", "samples", "seq_len", "num_tokens", "data_file")}
    validate_plan(plan, info.geometry, fingerprint=info.fingerprint)
    counts = {layer: len(groups) for layer, groups in clusters.items()}
    logger.info("%s: %d merged experts in all (%s per layer), router %s", method.name, sum(counts.values()),
                "/".join(str(counts[layer]) for layer in sorted(counts)), router)
    return plan


def _common(router, router_rows) -> None:
    _option(router, ROUTER_MODES, "router")
    _option(router_rows, ROUTER_ROWS, "router_rows")


# --------------------------------------------------------------------------------------------------
# the planners


def plan_hc_smoe(info, stats, *, method, ratio, seed=0, protect_super_experts=True, router="vanilla",
                 router_rows="dominant", linkage="average", align="on", dominant="center") -> Plan:
    """HC-SMoE (ICML 2025): hierarchical clustering of the mean outputs o_j over all tokens (Euclidean,
    ``linkage``), cut at exactly the per-layer budget; dominant = the member nearest the cluster's mean
    feature (``dominant="frequency"``: the most frequent member); frequency-weighted merge, neurons
    aligned to the dominant (``align="off"``: the paper's plain average)."""
    _common(router, router_rows)
    _option(linkage, LINKAGES, "linkage")
    _option(dominant, HC_DOMINANTS, "dominant")
    align_on = _switch(align, "align")
    counts = _budget(info, ratio, router)
    protected = _protected(info, stats, protect_super_experts)
    logger.info("hc_smoe: hierarchical clustering, %s linkage, Euclidean distance on the mean expert outputs", linkage)
    clusters = {}
    for layer, count in counts.items():
        frequency = _entry(stats, layer, "frequency")
        features = mean_expert_outputs({"expert_mean_output": _entry(stats, layer, "expert_mean_output"),
                                        "tokens": stats.layers[layer]["tokens"]})

        def cluster(experts, guarded, share, features=features, frequency=frequency):
            rest = [e for e in experts if e not in guarded]
            if not rest:
                return [[e] for e in guarded]
            cut = hierarchical_clusters(features[rest], min(share - len(guarded), len(rest)), linkage)
            groups = [[rest[i] for i in group] for group in cut]
            lead = (lambda g: nearest_to_center(features, g)) if dominant == "center" else \
                (lambda g: top_experts(frequency, 1, g)[0])
            return [[e] for e in guarded] + [_ordered(g, lead(g)) for g in groups]

        clusters[layer] = _per_group(info, layer, count, router, protected.get(layer, []), cluster)
    return assemble_plan(info, stats, method, ratio, clusters, protected, router=router, router_rows=router_rows,
                         align=align_on, options={"router": router, "router_rows": router_rows, "linkage": linkage,
                                                  "align": "on" if align_on else "off", "dominant": dominant})


def plan_m_smoe(info, stats, *, method, ratio, seed=0, protect_super_experts=True, router="vanilla",
                router_rows="dominant", budget="global", align="on") -> Plan:
    """M-SMoE (ICLR 2024): dominant experts by routing frequency (``budget``: one global ranking of
    per-layer-normalised frequencies, at least top_k per layer, or the same count per layer); every
    other expert joins its most router-logit-similar dominant, its neurons aligned to THAT dominant;
    frequency-weighted merge."""
    _common(router, router_rows)
    _option(budget, BUDGETS, "budget")
    align_on = _switch(align, "align")
    counts = _budget(info, ratio, router)
    protected = _protected(info, stats, protect_super_experts)
    frequencies = {layer: _entry(stats, layer, "frequency") for layer in counts}
    grouped = any(len(routing_groups(info, layer, router)) > 1 for layer in counts)
    if budget == "global" and grouped:
        raise PlanError("m_smoe's global budget gives layers different counts, which group-limited routing cannot "
                        "split over its groups with the vanilla router; pass --budget per_layer or --router exact")
    if budget == "global":
        dominants = global_dominants(frequencies, sum(counts.values()), info.geometry.top_k, protected)
        counts = {layer: len(chosen) for layer, chosen in dominants.items()}
    clusters = {}
    for layer, count in counts.items():
        similarity = router_logit_similarity({"router_logit_gram": _entry(stats, layer, "router_logit_gram")})
        frequency = frequencies[layer]

        def cluster(experts, guarded, share, similarity=similarity, frequency=frequency, layer=layer):
            if budget == "global":
                chosen = [e for e in dominants[layer] if e in experts]
            else:
                chosen = guarded + top_experts(frequency, share - len(guarded), [e for e in experts if e not in guarded])
            others = [e for e in experts if e not in chosen]
            groups = assign_to_dominants(similarity, sorted(chosen), others, closed=guarded)
            return [_ordered(g, d) for d, g in groups.items()]

        clusters[layer] = _per_group(info, layer, count, router, protected.get(layer, []), cluster)
    return assemble_plan(info, stats, method, ratio, clusters, protected, router=router, router_rows=router_rows,
                         align=align_on, options={"router": router, "router_rows": router_rows, "budget": budget,
                                                  "align": "on" if align_on else "off"})


def plan_ream(info, stats, *, method, ratio, seed=0, protect_super_experts=True, router="vanilla",
              router_rows="dominant", group_size=16, align="on", assign="greedy", merge_weights="saliency",
              outputs="gated") -> Plan:
    """REAM (2026): the REAP-most-salient experts are centroids; from the most salient down, each
    centroid takes its ``group_size - 1`` nearest unassigned experts (``assign="nearest"``: every
    pair nearest first) under d = 1 - ((cos(o_i, o_j) + 1) / 2 + gate-logit similarity) / 2, o_j the
    router-gated mean outputs (``outputs="plain"``: ungated); neuron-aligned merge weighted by the
    REAP saliencies (``merge_weights="frequency"``: by routing frequency)."""
    _common(router, router_rows)
    _option(assign, REAM_ASSIGN, "assign")
    _option(merge_weights, MERGE_WEIGHTS, "merge_weights")
    _option(outputs, REAM_OUTPUTS, "outputs")
    align_on = _switch(align, "align")
    try:
        group_size = int(group_size)
    except (TypeError, ValueError):
        raise PlanError(f"--group-size must be an integer >= 2, got {group_size!r}") from None
    if group_size < 2:
        raise PlanError(f"--group-size must be an integer >= 2, got {group_size!r}")
    counts = _budget(info, ratio, router)
    protected = _protected(info, stats, protect_super_experts)
    output_entry = "expert_gated_mean_output" if outputs == "gated" else "expert_mean_output"
    grouping = salient_first_groups if assign == "greedy" else bounded_assignment
    clusters, weights = {}, {}
    for layer, count in counts.items():
        entries = {name: _entry(stats, layer, name) for name in
                   ("frequency", "reap_sum", output_entry, "router_logit_gram", "tokens")}
        saliency, distance = reap_scores(entries), ream_distance(entries, outputs=outputs)
        weights[layer] = ream_merge_weights(saliency) if merge_weights == "saliency" else entries["frequency"]

        def cluster(experts, guarded, share, saliency=saliency, distance=distance):
            free = [e for e in experts if e not in guarded]
            centroids = top_experts(saliency, share - len(guarded), free)  # most salient first
            order = sorted(guarded) + centroids
            others = [e for e in experts if e not in order]
            groups = grouping(distance, order, others, group_size, closed=guarded)
            return [_ordered(g, c) for c, g in groups.items()]

        clusters[layer] = _per_group(info, layer, count, router, protected.get(layer, []), cluster)
    return assemble_plan(info, stats, method, ratio, clusters, protected, router=router, router_rows=router_rows,
                         align=align_on, weights=weights,
                         options={"router": router, "router_rows": router_rows, "group_size": group_size,
                                  "align": "on" if align_on else "off", "assign": assign,
                                  "merge_weights": merge_weights, "outputs": outputs})
