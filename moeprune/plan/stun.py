"""The ``stun`` planner: STUN's expert stage (ACL 2025) as a keep-experts plan with per-layer counts.

Per MoE layer, experts are clustered greedily under ONE global distance threshold (complete-linkage
condition, :func:`moeprune.scoring.stun.greedy_clusters`); the threshold is searched so that the
number of clusters over all layers equals the budget (:func:`~moeprune.scoring.stun.search_threshold`),
so layers keep different numbers of experts (each at least top_k). Each cluster keeps its member
nearest the cluster's mean weights and drops the rest; the router keeps that member's row. Super
experts are never merged (their own representative); shared experts are untouched. The result is an
ordinary keep-experts plan: non-uniform counts are written with the ``experts_per_layer`` section
and loaded by ``moeprune.load``.
"""

from __future__ import annotations

import logging

from tqdm.auto import tqdm

from ..errors import PlanError
from ..scoring.stun import (
    DISTANCES,
    coactivation_distances,
    combined_distances,
    representative,
    router_distances,
    search_threshold,
)
from ..super_experts import detect_super_experts
from .budgets import _check_ratio, kept_from_ratio
from .model import Plan

logger = logging.getLogger(__name__)


def check_stun(info, *, ratio, distance="router", normalize=False, **_) -> float:
    """PlanError unless a stun request can be planned (options, routing, the budget's floor without
    super experts); returns the ratio. Reads no weight."""
    ratio = _check_options(ratio, distance, normalize)
    geometry = info.geometry
    if geometry.grouped:
        raise PlanError(f"stun keeps different numbers of experts per layer and per routing group, which "
                        f"group-limited routing ({geometry.family}: n_group={geometry.n_group}) cannot route; "
                        "use a per-layer method (e.g. reap) for this model")
    _check_floor(geometry, ratio, {})
    return ratio


def _check_floor(geometry, ratio: float, protected: dict) -> int:
    """The total number of experts kept, or PlanError if the layers cannot go that low."""
    layers = list(geometry.moe_layers)
    target = sum(kept_from_ratio(geometry.experts_in(layer), ratio) for layer in layers)
    floor = sum(minimum_kept(geometry.experts_in(layer), geometry.top_k, len(protected.get(layer, ())))
                for layer in layers)
    if target < floor:
        raise PlanError(f"stun: --ratio {ratio} keeps {target} experts in total, but the {len(layers)} MoE layers "
                        f"must keep at least {floor} (top_k={geometry.top_k} each, super experts never merged); "
                        "use a smaller --ratio")
    return target


def _check_options(ratio, distance, normalize) -> float:
    if ratio is None:
        raise PlanError("stun takes its budget as --ratio (the fraction of all routed experts removed)")
    ratio = _check_ratio(ratio)
    if distance not in DISTANCES:
        raise PlanError(f"stun: distance must be one of {', '.join(DISTANCES)}, got {distance!r}")
    if not isinstance(normalize, bool):
        raise PlanError(f"stun: normalize must be true or false, got {normalize!r}")
    return ratio


def minimum_kept(num_experts: int, top_k: int, fixed: int) -> int:
    """Fewest experts a layer can keep: top_k, and never fewer than its super experts plus one
    cluster of the others."""
    return max(top_k, fixed + (1 if num_experts > fixed else 0))


def plan_stun(info, stats, *, method, ratio, seed=0, protect_super_experts=True, distance="router",
              normalize=False, **_) -> Plan:
    """STUN's expert stage (see the module docstring); ``distance``: ``router`` (router-row distance),
    ``coactivation`` (1 - a_ij / sqrt(f_i f_j)) or ``both`` (their mean on a [0, 1] scale);
    ``normalize``: unit-norm router rows first (default: the paper's raw rows). Everything is
    validated before any weight is read."""
    ratio = check_stun(info, ratio=ratio, distance=distance, normalize=normalize)
    geometry, layout = info.geometry, info.layout
    layers = list(geometry.moe_layers)
    if distance != "router" and (stats is None or any("coactivation" not in stats.layers.get(layer, {})
                                                      for layer in layers)):
        raise PlanError(f"stun with distance={distance!r} reads co-activation counts: collect statistics with the "
                        "'coactivation' observer (moeprune prune --data FILE collects them)")
    protected = (detect_super_experts(stats, geometry).routed_by_layer()
                 if protect_super_experts and stats is not None else {})
    target = _check_floor(geometry, ratio, protected)

    distances = {}
    for layer in layers:
        weight_name = layout.family.router_keys(layer)[0]
        d_router = router_distances(layout.checkpoint.get(weight_name), normalize=normalize)
        if distance == "router":
            distances[layer] = d_router
            continue
        d_coact = coactivation_distances(stats.layers[layer]["coactivation"], stats.layers[layer]["frequency"])
        distances[layer] = d_coact if distance == "coactivation" else combined_distances(
            d_router, d_coact, normalized_rows=normalize)
    search = search_threshold(distances, target, fixed=protected, min_clusters=geometry.top_k)
    if search.exact:
        logger.info("stun: global threshold %.6g keeps %d experts in total", search.threshold, search.total)
    else:
        logger.warning("stun: keeping %d experts instead of %d: %s", search.total, target, search.reason)

    total = sum(geometry.experts_in(layer) for layer in layers)
    kept: dict[int, list[int]] = {}
    summary: dict[int, dict[str, float]] = {}
    for layer in tqdm(layers, desc="stun representatives", leave=False, disable=not logger.isEnabledFor(logging.INFO)):
        clusters = search.clusters[layer]
        kept[layer] = sorted(representative(c, lambda e, p, layer=layer: layout.read_expert(layer, e, p),
                                            layout.family.projections) for c in clusters)
        layout.forget()
        summary[layer] = {"threshold": search.threshold, "clusters": float(len(clusters)),
                          "largest_cluster": float(max(len(c) for c in clusters))}
        logger.debug("stun: layer %d clusters %s keep %s", layer, clusters, kept[layer])
    plan = Plan(
        layers=kept, method=method.name, budget={"ratio": ratio},
        protected={layer: sorted(p) for layer, p in sorted(protected.items()) if p},
        model_fingerprint=info.fingerprint, family=geometry.family, num_experts=geometry.num_experts,
        score_summary=summary,
    )
    if stats is not None:
        plan.calibration = {key: stats.metadata.get(key) for key in
                            ("data_hash", "samples", "seq_len", "num_tokens", "data_file")}
    logger.info("plan (stun): keeping %s experts per layer, %d of %d routed experts removed",
                [len(kept[layer]) for layer in layers], total - search.total, total)
    return plan
