"""Planners of dense structured pruning: attention KV groups, dense-MLP and shared-expert channels,
whole decoder layers (registry entries in :mod:`moeprune.methods`; scores in
:mod:`moeprune.scoring.dense`; statistics in :mod:`moeprune.observe.dense`).

Budgets. ``unit`` heads / mlp / shared: ``ratio`` is the fraction of that unit's parameters removed
(heads: of the attention projections q/k/v/o of the layers that have them; mlp: of the dense MLPs;
shared: of the shared experts; biases and norms are not counted). ``widths="uniform"`` removes the
same number of units from every layer (round(ratio x units), at least one unit kept: a vanilla
config holds one width); ``widths="global"`` standardises each layer's scores ((s - mean) / std,
FLAP) and removes the lowest units of the whole model until the removed parameters reach the budget
(non-uniform widths; every layer keeps one unit at least). ``unit`` layers (angular, replaceme,
dense_random): ``layers`` = n consecutive decoder layers dropped.

The plans carry the dense-ops actions (:class:`DropAttentionHeads` with ``kv_groups``: a KV group
takes its query heads with it; :class:`SliceChannels`; :class:`DropLayer`) plus, here,
the ``output_bias`` of those actions (FLAP's bias compensation) and :class:`TransformMlpOutput` (ReplaceMe's fold).
Combined budgets (an expert and a dense action under one budget): :mod:`moeprune.plan.combined`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..arch import build_skeleton, decoder_layers
from ..errors import PlanError, StatsError
from ..layout import layer_prefix
from ..observe.dense import dense_paths, shared_indices
from ..units import check_attention, model_facts
from ..scoring.dense import (
    CHANNELS,
    HEADS,
    UnitInputs,
    angular_run_distances,
    best_run,
    dense_random_scores,
    flap_bias,
    flap_scores,
    magnitude_scores,
    removed_channels,
    replaceme_residual,
    replaceme_transform,
    standardize,
    taylor_scores,
    wanda_sp_scores,
)
from .actions import (
    DropAttentionHeads,
    DropLayer,
    SliceChannels,
    TransformMlpOutput,
)
from .model import Plan

logger = logging.getLogger(__name__)

UNITS = ("heads", "mlp", "shared", "layers")
WIDTHS = ("uniform", "global")
#: unit -> (UnitInputs kind, SliceChannels target, dense statistics prefix)
_UNIT_KINDS = {"heads": (HEADS, "attention", "attn"), "mlp": (CHANNELS, "dense_mlp", "mlp"),
               "shared": (CHANNELS, "shared_experts", "shared")}
#: method name -> unit scorer (``UnitInputs -> [units]``)
UNIT_SCORERS = {"magnitude": magnitude_scores, "wanda_sp": wanda_sp_scores, "flap": flap_scores,
                "dense_random": dense_random_scores, "taylor": taylor_scores}


@dataclass
class LayerUnits:
    """One layer's units of the chosen kind, with what scoring them needs (the weights are read when
    the layer is reached and dropped after it: one layer's weights resident)."""

    layer: int
    inputs: UnitInputs
    unit_params: int  # parameters of one unit (weights only)
    output_name: str  # on-disk name of the output projection (o_proj / down_proj) weight


# -- reading the model ------------------------------------------------------------------------------

def model_dense_paths(info) -> dict[int, dict[str, str]]:
    """:func:`moeprune.observe.dense.dense_paths` of every decoder layer (meta-device skeleton)."""
    skeleton = build_skeleton(info.config)
    return {index: dense_paths(info.family, layer) for index, layer in enumerate(decoder_layers(skeleton))}


def _stats_for(stats, layer: int, prefix: str) -> dict[str, torch.Tensor]:
    """The layer's dense entries under the generic names of :class:`UnitInputs`."""
    entries = (stats.dense.get(layer, {}) if stats is not None else {})
    out = {}
    for generic, name in (("in_sumsq", f"{prefix}_in_sumsq"), ("out_sum", f"{prefix}_{'o' if prefix == 'attn' else 'down'}_sum"),
                          ("out_sumsq", f"{prefix}_{'o' if prefix == 'attn' else 'down'}_sumsq"), ("tokens", "dense_tokens"),
                          ("taylor", f"{prefix}_taylor")):
        if name in entries:
            value = entries[name]
            out[generic] = value[0] if prefix == "shared" and name != "dense_tokens" else value
    return out


def iter_units(info, stats, unit: str, seed: int = 0) -> Iterator[LayerUnits]:
    """Every layer's units of ``unit`` (heads, mlp, shared), one layer at a time, weights read from
    the checkpoint; a PlanError when the model has none (or MLA attention for heads)."""
    _, _, prefix = _UNIT_KINDS[unit]
    checkpoint = info.layout.checkpoint
    config = info.config
    found_any = False
    for layer, paths in model_dense_paths(info).items():
        def name(role: str) -> str:
            return layer_prefix(layer) + paths[role] + ".weight"

        def weight(role: str) -> torch.Tensor:
            return checkpoint.get(name(role))

        if unit == "heads":
            _refuse_unsplit_attention(info, layer, paths)
            if "q" not in paths:
                continue
            weights = {role: weight(role) for role in "qkvo"}
            heads = int(config.num_attention_heads)
            kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
            inputs = UnitInputs(HEADS, weights, _stats_for(stats, layer, prefix), heads, kv_heads, layer, seed)
        else:
            if unit == "mlp" and "mlp_down" not in paths:
                continue
            if unit == "shared":
                found = shared_indices(paths)
                if not found:
                    continue
                if len(found) > 1:
                    raise PlanError(f"layer {layer} has {len(found)} shared-expert modules; slicing shared-expert "
                                    "channels supports one per layer")
            role = "mlp_" if unit == "mlp" else "shared.0."
            weights = {proj: weight(role + proj) for proj in ("gate", "up", "down")}
            inputs = UnitInputs(CHANNELS, weights, _stats_for(stats, layer, prefix), layer=layer, seed=seed)
        total = sum(w.numel() for w in weights.values())
        found_any = True
        yield LayerUnits(layer, inputs, total // inputs.num_units, name("o" if unit == "heads" else role + "down"))
    if not found_any:
        what = {"heads": "attention with q/k/v/o projections", "mlp": "dense MLP layers", "shared": "shared experts"}[unit]
        raise PlanError(f"this {info.family.name} model has no {what}; choose another --unit")


# -- selection --------------------------------------------------------------------------------------

def uniform_removal(scores: dict[int, torch.Tensor], ratio: float) -> dict[int, list[int]]:
    """round(ratio x units) lowest-scoring units of every layer (ties: the higher index goes first),
    keeping one unit at least."""
    out = {}
    for layer, s in scores.items():
        count = min(round(ratio * s.numel()), s.numel() - 1)
        order = sorted(range(s.numel()), key=lambda u: (float(s[u]), -u))
        out[layer] = sorted(order[:count])
    return out


def global_removal(scores: dict[int, torch.Tensor], unit_params: dict[int, int], ratio: float) -> dict[int, list[int]]:
    """FLAP's global threshold: scores standardised per layer, then the lowest units of the whole
    model removed while the removed parameters stay within ratio x total (+ half a unit: the closest
    count), every layer keeping one unit at least."""
    budget = ratio * sum(unit_params[layer] * s.numel() for layer, s in scores.items())
    ranked = sorted(((float(z), layer, u) for layer, s in scores.items() for u, z in enumerate(standardize(s))),
                    key=lambda t: (t[0], t[1], -t[2]))
    removed: dict[int, list[int]] = {layer: [] for layer in scores}
    total = 0
    for _, layer, u in ranked:
        params = unit_params[layer]
        if total + params > budget + params / 2:
            continue
        if len(removed[layer]) + 1 >= scores[layer].numel():
            continue
        removed[layer].append(u)
        total += params
    return {layer: sorted(units) for layer, units in removed.items()}


# -- planners ---------------------------------------------------------------------------------------

def _plan(info, method_name: str, budget: dict, actions: dict, stats) -> Plan:
    plan = Plan(layers={}, method=method_name, budget=budget, model_fingerprint=info.fingerprint,
                family=info.family.name, num_experts=info.geometry.num_experts,
                actions={layer: list(a) for layer, a in sorted(actions.items()) if a})
    if stats is not None:
        plan.calibration = {k: stats.metadata.get(k) for k in ("data_hash", "samples", "seq_len", "num_tokens", "data_file")}
    return plan


def _check_ratio(ratio) -> float:
    if ratio is None or not 0.0 <= float(ratio) < 1.0:
        raise PlanError(f"dense pruning takes --ratio R in [0, 1): the fraction of the unit's parameters removed, got {ratio}")
    return float(ratio)


def check_unit_choice(method: str, unit: str, widths: str | None) -> None:
    """PlanError unless ``unit`` is one of :data:`UNITS`, ``layers`` only for dense_random (the scorers
    score heads and channels), and ``widths`` (None: the method's default) one of :data:`WIDTHS`."""
    if unit not in UNITS:
        raise PlanError(f"--unit must be one of {', '.join(UNITS)}, got {unit!r}")
    if unit == "layers" and method != "dense_random":
        raise PlanError(f"method {method!r} scores heads, mlp or shared channels (--unit heads|mlp|shared), not {unit!r}; "
                        "drop layers with --method angular, replaceme or dense_random")
    if unit != "layers" and widths is not None and widths not in WIDTHS:
        raise PlanError(f"--widths must be one of {', '.join(WIDTHS)}, got {widths!r}")


def plan_units(info, stats, *, method, ratio, seed: int = 0, protect_super_experts: bool = True,
               unit: str = "heads", layers: int = 1, widths: str | None = None, compensate: bool = False) -> Plan:
    """Plan of a unit scorer (magnitude, wanda_sp, flap, taylor, dense_random): remove the lowest-scoring
    units (``unit`` heads / mlp / shared) at ``ratio`` of their parameters; ``unit="layers"`` is
    dense_random's random run of ``layers`` layers. ``compensate``: FLAP's bias compensation."""
    check_unit_choice(method.name, unit, widths)
    if unit == "layers":
        return plan_random_layers(info, stats, method=method, seed=seed, layers=layers)
    widths = widths or ("global" if method.name == "flap" else "uniform")
    ratio = _check_ratio(ratio)
    scorer = UNIT_SCORERS[method.name]
    units: dict[int, LayerUnits] = {}
    scores: dict[int, torch.Tensor] = {}
    for u in iter_units(info, stats, unit, seed):
        scores[u.layer] = scorer(u.inputs)
        units[u.layer] = u
        if not compensate:
            u.inputs.weights = {}  # only the output projection is read again, for the compensation
    params = {layer: u.unit_params for layer, u in units.items()}
    removed = (uniform_removal(scores, ratio) if widths == "uniform" else global_removal(scores, params, ratio))
    _, target, _ = _UNIT_KINDS[unit]
    actions: dict[int, list] = {}
    removed_params = 0
    for layer, u in units.items():
        gone = removed[layer]
        if not gone:
            continue
        removed_params += len(gone) * u.unit_params
        bias: tuple[float, ...] = ()
        if compensate:
            mean = u.inputs.stat("out_sum") / float(u.inputs.stat("tokens"))
            out_weight = info.layout.checkpoint.get(u.output_name)
            bias = tuple(float(b) for b in flap_bias(out_weight, mean, removed_channels(u.inputs, gone, out_weight.shape[1])))
        if unit == "heads":
            actions[layer] = [DropAttentionHeads(heads=(), kv_groups=tuple(gone), output_bias=bias)]
        else:
            kept = tuple(c for c in range(scores[layer].numel()) if c not in set(gone))
            actions[layer] = [SliceChannels(target, kept, output_bias=bias)]
    total = sum(u.unit_params * scores[layer].numel() for layer, u in units.items())
    budget = {"ratio": ratio, "unit": unit, "widths": widths, "removed_params": removed_params, "unit_params": total,
              "removed_fraction": removed_params / total if total else 0.0,
              "units_removed": {str(layer): len(g) for layer, g in removed.items()}}
    if compensate:
        budget["bias_compensation"] = True
    return _plan(info, method.name, budget, actions, stats)


def _check_depth(info, layers) -> int:
    total = info.geometry.num_hidden_layers
    if not isinstance(layers, int) or isinstance(layers, bool) or not 1 <= layers < total:
        raise PlanError(f"--layers must be an integer in [1, {total - 1}] (this model has {total} decoder layers), got {layers!r}")
    return layers


def _drop_run(start: int, depth: int) -> dict[int, list]:
    return {layer: [DropLayer()] for layer in range(start, start + depth)}


def plan_random_layers(info, stats, *, method, seed: int = 0, layers: int = 1, **_) -> Plan:
    """dense_random with ``unit="layers"``: a uniformly random run of ``layers`` consecutive layers."""
    depth = _check_depth(info, layers)
    generator = torch.Generator().manual_seed(int(seed))
    start = int(torch.randint(0, info.geometry.num_hidden_layers - depth + 1, (1,), generator=generator))
    return _plan(info, method.name, {"unit": "layers", "layers": depth, "start": start}, _drop_run(start, depth), stats)


def _require_dense(stats, what: str):
    if stats is None or not stats.dense:
        raise StatsError(f"{what} needs dense statistics; collect them with the observers of the method "
                         "(moeprune prune --data FILE does; or api.collect(..., observers=[\"angular\", \"replaceme\"]))")
    return stats.dense


def plan_angular(info, stats, *, method, ratio=None, seed: int = 0, protect_super_experts: bool = True,
                 layers: int = 1) -> Plan:
    """Drop the run of ``layers`` consecutive layers whose input and output hidden states are the
    closest in angular distance (Gromov et al. 2024; decoder-layer outputs, final norm excluded)."""
    depth = _check_depth(info, layers)
    distances = angular_run_distances(_require_dense(stats, "angular layer drop"), depth)
    start = best_run(distances)
    budget = {"unit": "layers", "layers": depth, "start": start, "angular_distance": distances[start]}
    return _plan(info, method.name, budget, _drop_run(start, depth), stats)


def plan_replaceme(info, stats, *, method, ratio=None, seed: int = 0, protect_super_experts: bool = True,
                   layers: int = 1, ridge: float = 1e-6) -> Plan:
    """ReplaceMe: among the cuts with statistics, the run of ``layers`` layers with the smallest
    angular distance goes; the last kept layer's block output is multiplied by the least-squares T
    (folded into its down projections by the transform_mlp_output op, :mod:`moeprune.ops.dense`)."""
    depth = _check_depth(info, layers)
    dense = _require_dense(stats, "ReplaceMe")
    collected = stats.metadata.get("replaceme_depth")
    if collected != depth:
        raise StatsError(f"the statistics hold ReplaceMe sums for cuts of {collected} layers, not {depth}; re-collect "
                         f"them with DenseSettings(replaceme_depth={depth}) (moeprune prune --data does it)")
    candidates = {s for s, entries in dense.items() if "replaceme_mtm" in entries}
    if not candidates:
        raise StatsError("the statistics hold no ReplaceMe sums; collect them with the 'replaceme' observer")
    distances = {s: d for s, d in angular_run_distances(dense, depth).items() if s in candidates}
    start = best_run(distances)
    entries = dense[start]
    transform = replaceme_transform(entries["replaceme_mtm"], entries["replaceme_mtr"], ridge)
    before = float(entries["replaceme_rr"])
    after = replaceme_residual(entries["replaceme_mtm"], entries["replaceme_mtr"], entries["replaceme_rr"], transform)
    kept_layer = start - 1
    block = "moe" if kept_layer in info.geometry.moe_layers else "dense_mlp"
    actions = _drop_run(start, depth)
    # the block output row y @ T is the column T^T y: the action's matrix is T^T
    actions[kept_layer] = [TransformMlpOutput(transform.T.float().contiguous())]
    budget = {"unit": "layers", "layers": depth, "start": start, "block": block, "angular_distance": distances[start], "ridge": ridge,
              "residual_without_transform": before, "residual_with_transform": after}
    return _plan(info, method.name, budget, actions, stats)


# -- combined budgets: moved to moeprune.plan.combined (re-exported here) ------------------------------

_COMBINED = ("combine_plans", "model_parameters", "plan_combined", "routed_expert_parameters", "split_budget",
             "unit_parameters")


def __getattr__(name: str):
    """The combined-budget names, now in :mod:`moeprune.plan.combined` (imported on first use: that
    module imports this one)."""
    if name in _COMBINED:
        import importlib

        return getattr(importlib.import_module("moeprune.plan.combined"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_units(info, *, ratio=None, unit: str = "heads", layers: int = 1, widths: str | None = None,
                method: str = "dense_random", **_) -> None:
    """A unit method's request (magnitude, wanda_sp, flap, taylor, dense_random), before any weight is read
    or calibration starts: a unit the method scores and the model has, heads only where moeprune prunes
    them exactly (PlanError: no [attention] keys, latent or linear attention, q/k norms across heads)."""
    check_unit_choice(method, unit, widths)
    if unit == "layers":
        return
    _check_ratio(ratio)
    facts = model_facts(info.family, info.config)
    if unit == "heads":
        attention = [fact for fact in facts.values() if fact.attention is not None]
        if not attention:
            check_attention(info.family, next(iter(facts.values())))  # says why (MLA, no [attention] keys)
        for fact in attention:
            check_attention(info.family, fact)
        for layer, paths in model_dense_paths(info).items():
            _refuse_unsplit_attention(info, layer, paths)
    elif not any((fact.dense_width if unit == "mlp" else fact.shared_width) for fact in facts.values()):
        what = "dense MLP layers" if unit == "mlp" else "shared experts"
        raise PlanError(f"this {info.family.name} model has no {what}; choose another --unit")


def _refuse_unsplit_attention(info, layer: int, paths: dict[str, str]) -> None:
    if "mla" in paths:
        raise PlanError(f"layer {layer}'s attention ({info.family.name}) has no separate per-head q/k/v/o projections "
                        "(multi-head latent attention, or linear attention such as MiniMax's lightning layers), so "
                        "moeprune does not prune its heads exactly; prune --unit mlp, shared or layers instead")


def _unit_validator(name: str):
    """The :func:`check_units` of method ``name`` (the registry's ``validator``)."""
    def check(info, **request) -> None:
        check_units(info, method=name, **request)
    return check


check_magnitude, check_wanda_sp, check_flap, check_dense_random, check_taylor = (
    _unit_validator(name) for name in ("magnitude", "wanda_sp", "flap", "dense_random", "taylor"))
