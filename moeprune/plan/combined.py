"""Combined budgets: ONE budget of all the model's parameters, split between an expert action and a
dense action (issue 13, "Combined budgets").

* The expert action is any expert or neuron method of the registry (:mod:`moeprune.methods`,
  granularity ``experts`` or ``neurons``): dropping (reap, frequency, ...), merging (hc_smoe, m_smoe,
  ream, ...) or slicing neurons (heapr, camera_p, ...); its ratio is the fraction of the
  routed-expert parameters it removes.
* The dense action is a dense method (granularity ``dense``, :mod:`moeprune.plan.dense`): attention
  KV groups, dense-MLP or shared-expert channels (``unit`` heads / mlp / shared: magnitude, wanda_sp,
  flap, taylor, dense_random) or whole decoder layers (angular, replaceme, dense_random ``unit=layers``).

The request: ``total_ratio`` T, the fraction of ALL the checkpoint's parameters removed (every
stored tensor: embeddings, norms and routers included), and the size of the dense part, given ONE way:

* ``expert_share`` S in [0, 1]: the dense part aims at (1 - S) x T of the parameters (heads / mlp /
  shared: its ratio is that over the unit's weights; layers: the whole number of decoder layers
  nearest to it, at least one);
* ``dense_ratio`` R: the dense method's own ratio of its unit's weights (heads / mlp / shared);
* ``layers`` N among the dense method's options (layer units).

Planning: the dense part goes first, because its units are the coarse ones (a KV group is 1/KV of a
layer's attention, a layer a whole layer); what it removes is COUNTED (:func:`parameters_removed`)
and the expert part is asked for the rest, T x all - dense removed, as a fraction of the routed-expert
parameters of the layers left. Every mix of one total so removes the same number of parameters up to
the expert method's own rounding (drop methods: the nearest count per layer the routing allows,
equal counts per routing group; neuron methods round each expert's width). S = 0 plans no expert part (dense
only), S = 1 no dense part (experts only); with R or N the experts always fill the rest.

Accounting: the output's parameters are counted on the ops' recipes from the checkpoint's headers
(:func:`output_parameters`, no weight read): exactly the tensors the written checkpoint holds, router
rows of dropped experts and new bias tensors (FLAP's compensation) included. The plan's budget
records the request, each part's own budget and ``split`` (exact counts, fractions of the total).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .. import api
from ..apply import apply_plan_in_memory
from ..checks import check_number
from ..errors import PlanError
from ..layout import CheckpointLayout, layer_of
from ..methods import Method, get_method
from ..observe import OBSERVERS, dense_settings_for
from ..observe.base import GRADIENTS, signals_needed
from ..observe.dense import is_dense_observer
from ..ops import plan_edit
from ..stats import RouterStats
from ..write import edit_entries
from . import dense
from .actions import DropLayer
from .budgets import resolve_budget, validate_budget
from .model import Plan
from .validation import validate_plan

logger = logging.getLogger(__name__)

#: granularities of the methods that may be the expert action (:data:`moeprune.methods.GRANULARITIES`)
EXPERT_GRANULARITIES = ("experts", "neurons")


# -- counting (header shapes only) ------------------------------------------------------------------

def model_parameters(info) -> int:
    """Every parameter of the checkpoint (every stored tensor, header shapes)."""
    checkpoint = info.layout.checkpoint
    return sum(math.prod(checkpoint.shape(name)) for name in checkpoint.keys())  # noqa: SIM118 (not a dict)


def output_parameters(info, plan: Plan | None) -> int:
    """Parameters of the checkpoint ``plan`` writes (a validated plan; None: the model's own), counted
    on the ops' recipes (:func:`moeprune.write.edit_entries`, the streaming writer's own list of
    output tensors) from header shapes: no weight is read."""
    if plan is None:
        return model_parameters(info)
    edit = plan_edit(info.family, plan, config=info.config)
    layout = CheckpointLayout.build(info.family, info.layout.checkpoint, sorted(edit.experts))
    return sum(math.prod(spec.shape) for spec, _ in edit_entries(layout, edit))


def parameters_removed(info, plan: Plan | None) -> int:
    """Parameters the checkpoint loses under ``plan`` (net: new tensors such as FLAP's output
    biases count against it)."""
    return model_parameters(info) - output_parameters(info, plan)


def routed_expert_parameters(info, skip: set[int] | frozenset[int] = frozenset()) -> int:
    """Weights of every routed expert of the model (header shapes), the MoE layers in ``skip`` left out."""
    layout = info.layout
    return sum(math.prod(layout.expert_shape(layer, expert, proj))
               for layer in info.geometry.moe_layers if layer not in skip for expert in range(layout.num_experts(layer))
               for proj in layout.family.projections)


def unit_parameters(info, unit: str) -> int:
    """Weights of every unit of ``unit`` (heads: q/k/v/o; mlp: dense MLPs; shared: shared experts)
    in the model, from the checkpoint's headers (no weight read): what a dense ``ratio`` refers to."""
    checkpoint = info.layout.checkpoint
    total = 0
    for layer, paths in dense.model_dense_paths(info).items():
        if unit == "heads":
            chosen = [paths[r] for r in ("q", "k", "v", "o") if r in paths]
        elif unit == "mlp":
            chosen = [paths[r] for r in ("mlp_gate", "mlp_up", "mlp_down") if r in paths]
        else:
            chosen = [path for role, path in paths.items() if role.startswith("shared.")]
        total += sum(math.prod(checkpoint.shape(f"model.layers.{layer}.{path}.weight")) for path in chosen)
    return total


def layer_parameters(info) -> dict[int, int]:
    """Parameters stored under each decoder layer (``model.layers.<L>.``; layers past
    ``num_hidden_layers``, e.g. multi-token-prediction layers, left out)."""
    checkpoint = info.layout.checkpoint
    out = {layer: 0 for layer in range(info.geometry.num_hidden_layers)}
    for name in checkpoint.keys():  # noqa: SIM118 (not a dict)
        layer = layer_of(name)
        if layer in out:
            out[layer] += math.prod(checkpoint.shape(name))
    return out


def dropped_layers(plan: Plan | None) -> set[int]:
    """Decoder layers ``plan`` drops whole."""
    if plan is None:
        return set()
    return {layer for layer, actions in plan.actions.items() if any(isinstance(a, DropLayer) for a in actions)}


# -- the request ------------------------------------------------------------------------------------

def split_budget(info, total_ratio: float, expert_share: float, unit: str) -> tuple[float, float]:
    """The nominal ``(expert ratio, dense ratio)`` removing ``total_ratio`` of all the model's
    parameters, the share ``expert_share`` of them from routed experts (fraction of the routed-expert
    parameters) and the rest from the dense ``unit`` heads / mlp / shared (fraction of its weights);
    a PlanError when a part would have to remove all it holds. (:func:`plan_combined` plans the dense
    part at its ratio and gives the experts what it leaves, counted.)"""
    if not 0.0 <= expert_share <= 1.0 or not 0.0 < total_ratio < 1.0:
        raise PlanError(f"a combined budget needs total_ratio in (0, 1) and expert_share in [0, 1], got {total_ratio}, "
                        f"{expert_share}")
    target = total_ratio * model_parameters(info)
    experts, units = routed_expert_parameters(info), unit_parameters(info, unit)
    if expert_share < 1.0 and not units:
        raise PlanError(f"this {info.family.name} model has no {unit} units (no weights to take the dense part from); "
                        "choose another --unit or --expert-share 1")
    expert_ratio = expert_share * target / experts if experts else 0.0
    dense_ratio = (1 - expert_share) * target / units if units else 0.0
    if expert_ratio >= 1.0 or dense_ratio >= 1.0:
        raise PlanError(f"removing {total_ratio:.0%} of the parameters with {expert_share:.0%} from experts needs expert "
                        f"ratio {expert_ratio:.2f} and {unit} ratio {dense_ratio:.2f} ({unit} weights are "
                        f"{units / model_parameters(info):.1%} of the model, routed experts {experts / model_parameters(info):.1%}); "
                        "both must stay below 1: change the share or the total")
    return expert_ratio, dense_ratio


def _unit_of(method: Method, given: Mapping) -> str:
    """The dense method's unit: its ``unit`` option (given or default), ``layers`` for layer methods."""
    options = dict(method.options)
    return str(given.get("unit", options["unit"])) if "unit" in options else "layers"


def split_options(expert_method: str, dense_method: str, given: Mapping | None) -> tuple[dict, dict]:
    """The method options of a combined request (one flag set, as the CLI gathers it) split between
    the expert method and the dense method by which of them takes each; an option neither takes, or
    both take, is a PlanError."""
    expert, dense_spec = get_method(expert_method), get_method(dense_method)
    mine, theirs = dict(expert.options), dict(dense_spec.options)
    expert_options, dense_options = {}, {}
    for key, value in (given or {}).items():
        if key in mine and key in theirs:
            raise PlanError(f"the option {key!r} is taken by both {expert.name!r} and {dense_spec.name!r}; set it through "
                            "the API (options= / dense_options=)")
        if key not in mine and key not in theirs:
            raise PlanError(f"neither {expert.name!r} (takes: {', '.join(mine) or 'none'}) nor {dense_spec.name!r} (takes: "
                            f"{', '.join(theirs) or 'none'}) takes the option {key!r}")
        (expert_options if key in mine else dense_options)[key] = value
    return expert_options, dense_options


@dataclass(frozen=True)
class CombinedRequest:
    """A checked combined-budget request (:func:`check_combined`).

    Attributes:
        expert, dense: the two registry methods.
        total_ratio: fraction of all the parameters removed.
        expert_share: the share asked for the experts (None: the dense part sized by ``dense_ratio``
            or ``layers``).
        unit: the dense unit (heads, mlp, shared, layers).
        dense_ratio: the ratio the dense part is planned at (heads / mlp / shared; 0: no dense part).
        layers: decoder layers the dense part drops (unit layers; 0: no dense part).
        expert_options, dense_options: each method's options as given (the dense part's ``layers``
            and ``unit`` set).
        fill: the expert part takes what the dense part leaves of the budget (False: dense only).
        collapse_groups: the expert part may set n_group = topk_group = 1 (drop methods).
    """

    expert: Method
    dense: Method
    total_ratio: float
    expert_share: float | None
    unit: str
    dense_ratio: float
    layers: int
    expert_options: dict
    dense_options: dict
    fill: bool
    collapse_groups: bool = False

    @property
    def has_dense_part(self) -> bool:
        """The dense part removes something (a ratio above 0 or at least one layer)."""
        return self.dense_ratio > 0 or self.layers > 0

    def observer_passes(self, protect_super_experts: bool = True) -> list[tuple[str, ...]]:
        """The observers both parts need (:func:`moeprune.api.statistics_for`), as calibration passes
        over the same data: one, or two when gradient observers (HEAPr, the layer-by-layer backward
        pass) meet forward observers of every decoder layer (FLAP, angular...), which one pass cannot
        run (the engine refuses it): the second pass runs those dense observers
        (:func:`join_passes` puts the statistics together)."""
        names = tuple(dict.fromkeys([*api.statistics_for(self.expert.name, protect_super_experts),
                                     *api.statistics_for(self.dense.name, False)]))
        forward_dense = tuple(n for n in names if is_dense_observer(n) and GRADIENTS not in OBSERVERS[n].needs)
        if not forward_dense or GRADIENTS not in signals_needed(names):
            return [names]
        return [tuple(n for n in names if n not in forward_dense), forward_dense]

    @property
    def dense_settings(self):
        """Collection-time settings of the dense part (ReplaceMe's depth: the layers it drops)."""
        return dense_settings_for(self.dense.name, self.dense_options)

    def to_budget(self) -> dict:
        """The request as the plan's budget records it."""
        out = {"total_ratio": self.total_ratio, "expert_method": self.expert.name, "dense_method": self.dense.name,
               "unit": self.unit}
        if self.expert_share is not None:
            out["expert_share"] = self.expert_share
        out.update({"layers": self.layers} if self.unit == "layers" else {"dense_ratio": self.dense_ratio})
        return out


def check_combined(info, *, expert_method: str, dense_method: str, total_ratio: float, expert_share: float | None = None,
                   dense_ratio: float | None = None, expert_options: Mapping | None = None,
                   dense_options: Mapping | None = None, collapse_groups: bool = False) -> CombinedRequest:
    """The whole request checked against the model before any weight is read (headers only): the
    methods (an expert or neuron method, a dense method), their options, the dense unit the model
    must have, one way of sizing the dense part, both parts within what they hold, and the expert
    method's own budget checks at its nominal ratio. Returns the :class:`CombinedRequest`."""
    check_number("total_ratio", total_ratio, minimum=0.0, integer=False, optional=False)
    if not 0.0 < total_ratio < 1.0:
        raise PlanError(f"--total-ratio must be in (0, 1): the fraction of ALL the model's parameters removed, got {total_ratio}")
    check_number("expert_share", expert_share, minimum=0.0, maximum=1.0, integer=False)
    check_number("dense_ratio", dense_ratio, minimum=0.0, integer=False)
    expert, dense_spec = get_method(expert_method), get_method(dense_method)
    expert.check_implemented()
    if expert.granularity not in EXPERT_GRANULARITIES:
        raise PlanError(f"with a combined budget --method names the expert action: an expert or neuron method (e.g. reap, "
                        f"hc_smoe, heapr), and {expert.name!r} is a {expert.granularity} method; pass it as --dense-method")
    if dense_spec.granularity != "dense":
        raise PlanError(f"--dense-method names the dense action (heads, channels or layers: e.g. flap, wanda_sp, angular), "
                        f"and {dense_spec.name!r} is an {dense_spec.granularity} method")
    given_expert, given_dense = dict(expert_options or {}), dict(dense_options or {})
    expert.method_options(given_expert)  # an option a method does not take: PlanError
    dense_spec.method_options(given_dense)
    unit = _unit_of(dense_spec, given_dense)
    if unit not in dense.UNITS:
        raise PlanError(f"--unit must be one of {', '.join(dense.UNITS)}, got {unit!r}")
    forms = [name for name, given in (("--expert-share", expert_share is not None), ("--dense-ratio", dense_ratio is not None),
                                      ("--layers", unit == "layers" and "layers" in given_dense)) if given]
    if len(forms) != 1:
        how = "--expert-share S or --layers N" if unit == "layers" else "--expert-share S or --dense-ratio R"
        raise PlanError(f"give the size of the dense part one way ({how}), got {', '.join(forms) or 'none'}")
    if unit == "layers" and dense_ratio is not None:
        raise PlanError(f"{dense_spec.name} drops whole layers: size the dense part with --layers N or --expert-share S, "
                        "not --dense-ratio")
    total = model_parameters(info)
    target = total_ratio * total
    per_layer = layer_parameters(info)
    mean_layer = sum(per_layer.values()) / len(per_layer)
    layers, ratio = 0, 0.0
    if unit == "layers":
        if expert_share is not None:
            if expert_share < 1.0:
                layers = round((1 - expert_share) * target / mean_layer)
                if layers < 1:
                    raise PlanError(f"the dense part ({(1 - expert_share) * total_ratio:.1%} of the parameters) is less than "
                                    f"half a decoder layer ({mean_layer / total:.1%} on average); lower --expert-share "
                                    "or choose a finer --unit")
        else:
            layers = given_dense["layers"]
        if layers:
            dense._check_depth(info, layers)
        nominal = layers * mean_layer
    else:
        units = unit_parameters(info, unit)
        if unit == "heads" and dense_spec.validator is None:
            dense.check_taylor(info, ratio=0.0, unit="heads")  # the heads request check: not MLA, [attention] keys
        if not units:
            raise PlanError(f"this {info.family.name} model has no {unit} units to take the dense part from; choose another "
                            "--unit")
        if expert_share is not None:
            ratio = (1 - expert_share) * target / units
            if ratio >= 1.0:
                raise PlanError(f"removing {(1 - expert_share) * total_ratio:.1%} of the parameters from {unit} needs more than "
                                f"all of them ({unit} weights are {units / total:.1%} of the model); raise --expert-share, "
                                "lower --total-ratio, or choose another --unit")
        else:
            ratio = float(dense_ratio)
            if ratio >= 1.0:
                raise PlanError(f"--dense-ratio must be in [0, 1), got {ratio}")
        nominal = ratio * units
        if ratio > 0:
            dense_spec.validate_request(info, ratio=ratio, options=given_dense)
    if expert_share is None and nominal > target:
        raise PlanError(f"the dense part alone removes about {nominal / total:.1%} of the parameters, more than --total-ratio "
                        f"{total_ratio}; lower it or raise the total")
    fill = expert_share is None or expert_share > 0
    dense_given = {**given_dense, **({"layers": layers} if unit == "layers" and layers else {})}
    if "unit" in dict(dense_spec.options):
        dense_given["unit"] = unit
    request = CombinedRequest(expert, dense_spec, float(total_ratio), None if expert_share is None else float(expert_share),
                              unit, ratio, layers, given_expert, dense_given, fill, collapse_groups)
    if fill and target > nominal:
        left = routed_expert_parameters(info) * (1 - layers / max(1, info.geometry.num_hidden_layers))
        _check_expert_ratio(info, request, (target - nominal) / left if left else math.inf)
    return request


def nearest_drop_ratio(geometry, ratio: float, collapse_groups: bool = False) -> float:
    """The ratio of a drop method (experts kept per layer, :func:`~moeprune.plan.budgets.resolve_budget`)
    whose removal is NEAREST to ``ratio`` among the budgets the routing allows (at least top_k kept,
    equal counts per routing group unless ``collapse_groups``): r/E for r experts removed per layer.
    (A plain ratio floors the count, and a group rounds it up: always below the budget.) Ties go to
    the smaller removal."""
    experts = geometry.num_experts
    best, best_gap = None, math.inf
    for removed in range(experts):
        candidate = removed / experts
        try:
            kept = resolve_budget(geometry, ratio=candidate, collapse_groups=collapse_groups)
            validate_budget(geometry, kept, collapse_groups=collapse_groups)
        except PlanError:
            continue
        actual = sum(geometry.experts_in(layer) - k for layer, k in kept.items()) / sum(geometry.experts_in(layer) for layer in kept)
        if abs(actual - ratio) < best_gap - 1e-12:
            best, best_gap = candidate, abs(actual - ratio)
    if best is None:
        raise PlanError(f"no expert budget of this {geometry.family} model fits its routing; lower the experts' share")
    return best


def _check_expert_ratio(info, request: CombinedRequest, ratio: float) -> float:
    """The ratio the expert part is planned at for ``ratio`` of the routed-expert parameters: checked
    (below 1, the expert method's own budget rules) and, for a drop method (kept experts per layer),
    the nearest count the routing allows (:func:`nearest_drop_ratio`)."""
    if ratio >= 1.0:
        raise PlanError(f"the experts would have to remove {ratio:.0%} of the routed-expert parameters left to reach "
                        f"--total-ratio {request.total_ratio}; lower the total or give the dense part more")
    if request.expert.planner is not None:
        request.expert.validate_request(info, ratio=ratio, options=request.expert_options)
        return ratio
    return nearest_drop_ratio(info.geometry, ratio, request.collapse_groups)


def join_passes(parts: list[RouterStats]) -> RouterStats:
    """One RouterStats from passes with different observers over the SAME calibration data
    (:meth:`CombinedRequest.observer_passes`): the first pass's entries and metadata, the others'
    entries added (dense-observer settings and observer lists too). Not a merge of disjoint data
    (:meth:`RouterStats.merge` is)."""
    joined = parts[0]
    for other in parts[1:]:
        for layer, entries in other.dense.items():
            joined.dense.setdefault(layer, {}).update(entries)
        for layer, entries in other.layers.items():
            for name, value in entries.items():
                joined.layers.setdefault(layer, {}).setdefault(name, value)
        joined.metadata.update({k: v for k, v in other.metadata.items() if k.startswith(("dense_", "replaceme_"))})
        joined.metadata["observers"] = list(dict.fromkeys([*(joined.metadata.get("observers") or ()),
                                                           *(other.metadata.get("observers") or ())]))
    return joined


# -- planning ---------------------------------------------------------------------------------------

def combine_plans(info, expert_plan: Plan | None, dense_plan: Plan | None) -> Plan:
    """One plan doing both: the expert plan's kept experts and actions and the dense plan's actions
    (a layer the dense plan drops takes no other action, so the expert choices there go), validated;
    its budget holds both parts' budgets and ``split``: the parameters removed in all, by the dense
    part (its plan alone) and by the experts (the rest), exact counts (:func:`output_parameters`) and
    fractions of the model's total. Either plan may be None (that part removes nothing)."""
    if expert_plan is None and dense_plan is None:
        raise PlanError("a combined plan needs an expert plan, a dense plan, or both")
    dropped = dropped_layers(dense_plan)
    expert = expert_plan or Plan(layers={}, method="")
    layers = {layer: list(kept) for layer, kept in expert.layers.items() if layer not in dropped}
    actions: dict[int, list] = {}
    for layer, listed in expert.actions.items():
        if layer not in dropped:
            actions.setdefault(layer, []).extend(listed)
    for layer, listed in (dense_plan.actions if dense_plan is not None else {}).items():
        actions.setdefault(layer, []).extend(listed)
    calibration = (expert_plan.calibration if expert_plan is not None else {}) or (dense_plan.calibration if dense_plan else {})
    plan = Plan(layers=layers, method="+".join(p.method for p in (expert_plan, dense_plan) if p is not None),
                protected={k: v for k, v in expert.protected.items() if k not in dropped},
                model_fingerprint=info.fingerprint, family=info.family.name, num_experts=info.geometry.num_experts,
                score_summary={k: v for k, v in expert.score_summary.items() if k not in dropped},
                collapse_groups=expert.collapse_groups, calibration=dict(calibration), actions=dict(sorted(actions.items())))
    validate_plan(plan, info.geometry, fingerprint=info.fingerprint)
    total = model_parameters(info)
    removed = total - output_parameters(info, plan)
    dense_removed = parameters_removed(info, dense_plan)
    plan.budget = {"expert": expert_plan.budget if expert_plan is not None else None,
                   "dense": dense_plan.budget if dense_plan is not None else None,
                   "split": split_summary(total, removed - dense_removed, dense_removed)}
    return plan


def split_summary(total: int, expert_removed: int, dense_removed: int) -> dict:
    """``split`` of a combined plan's budget: exact counts, and fractions of the model's ``total``
    parameters (``expert_share``: the experts' part of what was removed)."""
    removed = expert_removed + dense_removed
    return {"total_params": total, "removed_params": removed, "expert_params_removed": expert_removed,
            "dense_params_removed": dense_removed, "removed_fraction": removed / total if total else 0.0,
            "expert_fraction": expert_removed / total if total else 0.0,
            "dense_fraction": dense_removed / total if total else 0.0,
            "expert_share": expert_removed / removed if removed else 0.0}


def plan_request(model_dir: str | Path, request: CombinedRequest, *, stats: str | Path | RouterStats | None = None,
                 seed: int = 0, protect_super_experts: bool = True) -> Plan:
    """The combined plan of a checked request (see the module docstring): the dense part planned
    first (:func:`moeprune.api.plan_pruning`) and counted, then the expert part at the ratio of the
    routed-expert parameters left that brings the total to ``total_ratio`` (none when the dense part
    already reached it, or for a dense-only request), both combined by :func:`combine_plans`."""
    info = api.model_info(model_dir)
    if isinstance(stats, (str, Path)):
        stats = RouterStats.load(stats)
    needing = [spec.name for spec, used in ((request.dense, request.has_dense_part), (request.expert, request.fill))
               if used and spec.needs_stats]
    if stats is None and needing:
        raise PlanError(f"{' and '.join(needing)} need(s) calibration statistics: pass --data FILE or --stats STATS")
    target = request.total_ratio * model_parameters(info)
    dense_plan = None
    if request.has_dense_part:
        dense_plan = api.plan_pruning(model_dir, method=request.dense.name, ratio=request.dense_ratio if request.unit != "layers" else None,
                                      stats=stats, seed=seed, protect_super_experts=protect_super_experts,
                                      options=request.dense_options)
    dense_removed = parameters_removed(info, dense_plan)
    expert_plan = None
    if request.fill and target - dense_removed > 0:
        left = routed_expert_parameters(info, skip=dropped_layers(dense_plan))
        ratio = _check_expert_ratio(info, request, (target - dense_removed) / left if left else math.inf)
        expert_plan = api.plan_pruning(model_dir, method=request.expert.name, ratio=ratio, stats=stats, seed=seed,
                                       protect_super_experts=protect_super_experts,
                                       collapse_groups=request.collapse_groups, options=request.expert_options or None)
    if expert_plan is None and dense_plan is None:
        raise PlanError("this combined budget removes nothing (the dense part rounds to no unit and the experts get no "
                        "share); raise --total-ratio or change the split")
    plan = combine_plans(info, expert_plan, dense_plan)
    plan.budget = {**request.to_budget(), **plan.budget}
    split = plan.budget["split"]
    logger.info("combined plan %s: removed %d of %d parameters (%.1f%%, asked %.1f%%): experts %.1f%%, %s %.1f%%",
                plan.method, split["removed_params"], split["total_params"], 100 * split["removed_fraction"],
                100 * request.total_ratio, 100 * split["expert_fraction"], request.unit, 100 * split["dense_fraction"])
    return plan


def plan_combined(model_dir: str | Path, *, total_ratio: float, expert_method: str, dense_method: str,
                  expert_share: float | None = None, dense_ratio: float | None = None,
                  stats: str | Path | RouterStats | None = None, unit: str | None = None, seed: int = 0,
                  protect_super_experts: bool = True, collapse_groups: bool = False,
                  expert_options: Mapping | None = None, dense_options: Mapping | None = None) -> Plan:
    """One plan removing ``total_ratio`` of ALL the parameters with ``expert_method`` (any expert or
    neuron method) and ``dense_method`` (on ``unit``, or the unit in ``dense_options``), the dense part
    sized by ``expert_share``, ``dense_ratio`` or ``dense_options["layers"]`` (one of them; see the
    module docstring). The budget's ``split`` says what each part took (exact counts)."""
    info = api.model_info(model_dir)
    options = {**(dense_options or {}), **({"unit": unit} if unit is not None else {})}
    request = check_combined(info, expert_method=expert_method, dense_method=dense_method, total_ratio=total_ratio,
                             expert_share=expert_share, dense_ratio=dense_ratio, expert_options=expert_options,
                             dense_options=options, collapse_groups=collapse_groups)
    return plan_request(model_dir, request, stats=stats, seed=seed, protect_super_experts=protect_super_experts)


def compress_combined(model, model_dir: str | Path, stats, **request):
    """``(compressed copy of model, plan)``: :func:`plan_combined` (keyword arguments ``request``),
    then the plan applied in memory to a copy (the sweep's executor; ``model`` is not modified)."""
    plan = plan_combined(model_dir, stats=stats, **request)
    return apply_plan_in_memory(copy.deepcopy(model), plan), plan
