"""The ``dern`` planner: DERN (Dropping Experts, Recombining Neurons; EMNLP 2025 Findings).

No public code exists; this follows METHODS.md ("Merging") and states every choice in
docs/methods.md ("dern"). Per MoE layer:

1. drop experts by I_j = mean over tokens of 1[j selected] g_j(x) = soft_count_j / tokens (the
   budgeted per-layer selection every drop method uses; super experts are kept);
2. split every dropped expert into neuron segments s = [W_gate row k, W_up row k, W_down column k];
3. move each segment to the kept expert holding its most cosine-similar segment when that cosine is
   > tau (the gate part optionally left out of the similarity), else discard it;
4. inside each kept expert that received segments, weighted spherical k-means over its own and the
   migrated segments with K = its width (:func:`weighted_spherical_kmeans`), point weights = the
   source expert's I_j; each cluster becomes one neuron (:func:`cluster_coefficients`).

The result is a keep-experts plan plus one :class:`~moeprune.plan.actions.RecombineNeurons`
action per layer (weights computed here, replayed by ``moeprune apply`` through
:mod:`moeprune.ops.recombine`); every expert keeps its width, so the output is a vanilla checkpoint.
"""

from __future__ import annotations

import logging
import math

import torch
from tqdm.auto import tqdm

from ..errors import PlanError
from ..super_experts import detect_super_experts
from .actions import NeuronMix, RecombineNeurons
from .budgets import _check_ratio, resolve_budget, validate_budget
from .model import Plan
from .selection import build_plan

logger = logging.getLogger(__name__)

#: Initial k-means centroids: "magnitude" = the K segments (own and migrated) with the largest
#: max |W_gate row| (|W_up row| for ungated experts); "own" = the expert's own K segments.
INITS = ("magnitude", "own")
_CHUNK = 1024  # dropped segments compared with every kept segment at a time


def expert_importance(soft_count: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """I_j = (1 / T) sum over tokens of 1[j selected] g_j(x) = soft_count_j / T (float64; 0 when T = 0)."""
    total = float(tokens.reshape(()))
    soft = soft_count.detach().to(torch.float64)
    return soft / total if total > 0 else torch.zeros_like(soft)


def neuron_segments(gate: torch.Tensor | None, up: torch.Tensor, down: torch.Tensor, *, with_gate: bool = True) -> torch.Tensor:
    """Segment k = [gate[k, :], up[k, :], down[:, k]] ([I, 3H]; without the gate part, or for ungated
    experts (``gate`` None, Nemotron-H), [I, 2H])."""
    parts = ([gate] if with_gate and gate is not None else []) + [up, down.transpose(0, 1)]
    return torch.cat([p.to(torch.float32) for p in parts], dim=1)


def _unit(rows: torch.Tensor) -> torch.Tensor:
    norms = rows.norm(dim=1, keepdim=True)
    return rows / torch.where(norms > 0, norms, torch.ones_like(norms))


def best_matches(dropped: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``dropped``, the index of the most cosine-similar row of ``kept`` and that
    cosine (ties: the first); zero rows have cosine 0 with everything."""
    kept_unit = _unit(kept)
    best_sim, best_index = [], []
    for start in range(0, dropped.shape[0], _CHUNK):
        sims = _unit(dropped[start:start + _CHUNK]) @ kept_unit.T
        value, index = sims.max(dim=1)
        best_sim.append(value.clamp(-1.0, 1.0))
        best_index.append(index)
    if not best_sim:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return torch.cat(best_index), torch.cat(best_sim)


def magnitude_init(gate_rows: torch.Tensor, k: int) -> list[int]:
    """The ``k`` points with the largest max |W_gate row| (ties: smaller index), in index order."""
    peak = gate_rows.abs().amax(dim=1).tolist()
    order = sorted(range(len(peak)), key=lambda i: (-peak[i], i))
    return sorted(order[:k])


def _fill_empty(assignment: torch.Tensor, sims: torch.Tensor, k: int) -> torch.Tensor:
    """Give every empty cluster (in index order) the point least similar to its own centroid among
    clusters holding two or more points (ties: smaller index)."""
    assignment = assignment.clone()
    counts = torch.bincount(assignment, minlength=k)
    own = sims.gather(1, assignment.view(-1, 1)).view(-1)
    for cluster in torch.nonzero(counts == 0).view(-1).tolist():
        movable = torch.nonzero(counts[assignment] >= 2).view(-1)
        point = int(movable[torch.argmin(own[movable])])  # argmin returns the first minimum
        counts[assignment[point]] -= 1
        assignment[point] = cluster
        counts[cluster] += 1
        own[point] = sims[point, cluster]
    return assignment


def weighted_spherical_kmeans(points: torch.Tensor, weights: torch.Tensor, init: list[int],
                              iterations: int) -> torch.Tensor:
    """Cluster of each row of ``points`` under weighted spherical k-means (K = len(init)).

    u_i = points_i / ||points_i||; centroids start at u_init; then: assign each point to the centroid
    of largest cosine (ties: smaller index; empty clusters refilled, :func:`_fill_empty`), update
    c_k = normalise(sum over i in k of w_i u_i), and repeat ``iterations`` times or until the
    assignment stops changing. ``iterations = 0``: the assignment to the initial centroids.
    """
    units = _unit(points.to(torch.float64))
    w = weights.to(torch.float64)
    k = len(init)
    centroids = units[list(init)]

    def assign(centroids: torch.Tensor) -> torch.Tensor:
        sims = units @ centroids.T
        return _fill_empty(sims.argmax(dim=1), sims, k)

    assignment = assign(centroids)
    for _ in range(iterations):
        sums = torch.zeros(k, units.shape[1], dtype=torch.float64).index_add_(0, assignment, units * w.view(-1, 1))
        centroids = torch.where(sums.norm(dim=1, keepdim=True) > 0, _unit(sums), centroids)
        updated = assign(centroids)
        if torch.equal(updated, assignment):
            break
        assignment = updated
    return assignment


def cluster_coefficients(norms: torch.Tensor, weights: torch.Tensor, assignment: torch.Tensor, k: int) -> torch.Tensor:
    """Per point, its coefficient in its cluster's new neuron (norms equalised within the cluster).

    In cluster C with importance weights w_i (all ones if they sum to 0) and segment norms n_i, each
    member is rescaled to the cluster's weighted mean norm R = sum w_i n_i / sum w_i before the
    weighted average: new = sum_i (w_i / W) (R / n_i) s_i, so coefficient_i = w_i R / (W n_i)
    (0 for a zero segment). A cluster of one segment returns it unchanged.
    """
    n = norms.to(torch.float64)
    w = weights.to(torch.float64)
    totals = torch.zeros(k, dtype=torch.float64).index_add_(0, assignment, w)
    w = torch.where(totals[assignment] > 0, w, torch.ones_like(w))
    totals = torch.zeros(k, dtype=torch.float64).index_add_(0, assignment, w)
    mean_norm = torch.zeros(k, dtype=torch.float64).index_add_(0, assignment, w * n) / totals
    safe = torch.where(n > 0, n, torch.ones_like(n))
    return torch.where(n > 0, w * mean_norm[assignment] / (totals[assignment] * safe), torch.zeros_like(n))


def check_dern(info, *, ratio, tau=0.6, gate_in_similarity=True, kmeans_iterations=10, kmeans_init="magnitude",
               **_) -> float:
    """PlanError unless a dern request can be planned (options and the per-layer budget); returns the
    ratio. Reads no weight."""
    ratio = _check_options(ratio, tau, gate_in_similarity, kmeans_iterations, kmeans_init)
    validate_budget(info.geometry, resolve_budget(info.geometry, ratio=ratio))
    return ratio


def _check_options(ratio, tau, gate_in_similarity, iterations, init) -> float:
    if ratio is None:
        raise PlanError("dern takes its budget as --ratio (the fraction of experts removed per layer)")
    ratio = _check_ratio(ratio)
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or not 0.0 <= tau <= 1.0:
        raise PlanError(f"dern: tau (the cosine a segment must exceed to migrate) must be in [0, 1], got {tau!r}")
    if not isinstance(gate_in_similarity, bool):
        raise PlanError(f"dern: gate_in_similarity must be true or false, got {gate_in_similarity!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise PlanError(f"dern: kmeans_iterations must be an integer >= 0, got {iterations!r}")
    if init not in INITS:
        raise PlanError(f"dern: kmeans_init must be one of {', '.join(INITS)}, got {init!r}")
    return ratio


def recombine_layer(experts: dict[int, dict[str, torch.Tensor]], kept: list[int], importance: torch.Tensor, *,
                    tau: float, gate_in_similarity: bool, iterations: int, init: str) -> tuple[dict[int, NeuronMix], dict]:
    """DERN steps 2-4 for one layer. ``experts``: expert -> its canonical ``gate``/``up``/``down`` (no ``gate``
    for ungated experts: their segments are [up row, down column], the k-means starts from the up rows).

    Returns (kept expert -> NeuronMix, for the experts that received segments; counts for the summary).
    """
    dropped = [e for e in sorted(experts) if e not in kept]
    full = {e: neuron_segments(t.get("gate"), t["up"], t["down"]) for e, t in experts.items()}
    feature = full if gate_in_similarity else {
        e: neuron_segments(t.get("gate"), t["up"], t["down"], with_gate=False) for e, t in experts.items()}
    input_rows = "gate" if all("gate" in t for t in experts.values()) else "up"  # the rows the activation reads
    owners = [(e, n) for e in kept for n in range(feature[e].shape[0])]
    received: dict[int, list[tuple[int, int]]] = {e: [] for e in kept}
    migrated = 0
    if dropped and kept:
        candidates = [(e, n) for e in dropped for n in range(feature[e].shape[0])]
        index, sims = best_matches(torch.cat([feature[e] for e in dropped]), torch.cat([feature[e] for e in kept]))
        for (source, neuron), match, sim in zip(candidates, index.tolist(), sims.tolist()):
            if sim > tau:
                received[owners[match][0]].append((source, neuron))
                migrated += 1
    mixes: dict[int, NeuronMix] = {}
    for expert in kept:
        if not received[expert]:
            continue  # K = its width and its own segments as points: the clustering is the identity
        width = experts[expert]["up"].shape[0]
        points = [(expert, n) for n in range(width)] + received[expert]
        segments = torch.cat([full[expert], torch.stack([full[e][n] for e, n in received[expert]])])
        gate_rows = torch.cat([experts[expert][input_rows],
                               torch.stack([experts[e][input_rows][n] for e, n in received[expert]])])
        weights = torch.tensor([float(importance[e]) for e, _ in points], dtype=torch.float64)
        start = list(range(width)) if init == "own" else magnitude_init(gate_rows, width)
        assignment = weighted_spherical_kmeans(segments, weights, start, iterations)
        coefficients = cluster_coefficients(segments.to(torch.float64).norm(dim=1), weights, assignment, width)
        mixes[expert] = NeuronMix(tuple(e for e, _ in points), tuple(n for _, n in points),
                                  tuple(assignment.tolist()), tuple(coefficients.tolist()))
    total = sum(feature[e].shape[0] for e in dropped)
    return mixes, {"segments_dropped": float(total), "segments_migrated": float(migrated)}


def layer_weights(info, layer: int) -> dict[int, dict[str, torch.Tensor]]:
    """Every routed expert's canonical weights ``gate``/``up``/``down`` of MoE ``layer`` (no ``gate`` for
    ungated experts; biases left out), read through the checkpoint layout; the layout's cache is freed."""
    projections = [p for p in ("gate", "up", "down") if p in info.family.layout.projections]
    experts = {e: {p: info.layout.read_expert(layer, e, p) for p in projections}
               for e in range(info.geometry.experts_in(layer))}
    info.layout.forget()
    return experts


def plan_dern(info, stats, *, method, ratio, seed=0, protect_super_experts=True, tau=0.6, gate_in_similarity=True,
              kmeans_iterations=10, kmeans_init="magnitude", **_) -> Plan:
    """DERN (see the module docstring). ``tau``: cosine a segment must exceed to migrate (1: nothing
    migrates, the plan equals plain dropping by I_j); ``gate_in_similarity``: include the gate row in
    the migration cosine; ``kmeans_iterations``: k-means steps; ``kmeans_init``: :data:`INITS`. Deterministic (no
    seed). Everything is validated before any weight is read."""
    ratio = check_dern(info, ratio=ratio, tau=tau, gate_in_similarity=gate_in_similarity,
                       kmeans_iterations=kmeans_iterations, kmeans_init=kmeans_init)
    geometry = info.geometry
    missing = [e for e in ("soft_count", "tokens") if any(e not in stats.layers.get(layer, {})
                                                          for layer in geometry.moe_layers)]
    if missing:
        raise PlanError(f"dern reads the statistics entries {', '.join(missing)}: collect them with the routing and "
                        "tokens observers (moeprune prune --data FILE collects them)")
    importance = {layer: expert_importance(stats.layers[layer]["soft_count"], stats.layers[layer]["tokens"])
                  for layer in geometry.moe_layers}
    protected = detect_super_experts(stats, geometry).routed_by_layer() if protect_super_experts else {}
    plan = build_plan(geometry, importance, method=method.name, ratio=ratio, protected=protected,
                      model_fingerprint=info.fingerprint)
    plan.calibration = {key: stats.metadata.get(key) for key in ("data_hash", "samples", "seq_len", "num_tokens", "data_file")}
    for layer in tqdm(geometry.moe_layers, desc="dern", leave=False, disable=not logger.isEnabledFor(logging.INFO)):
        experts = layer_weights(info, layer)
        mixes, counts = recombine_layer(experts, plan.layers[layer], importance[layer], tau=tau,
                                        gate_in_similarity=gate_in_similarity, iterations=kmeans_iterations,
                                        init=kmeans_init)
        plan.score_summary.setdefault(layer, {}).update(counts)
        if mixes:
            plan.actions[layer] = [RecombineNeurons(mixes)]
        logger.debug("dern: layer %d: %d of %d dropped segments migrated", layer, counts["segments_migrated"],
                     counts["segments_dropped"])
    return plan
