"""The neuron-slicing planner: score every neuron of every routed expert, choose which to keep.

``plan_neuron_slicing`` is the planner of the neuron methods (``camera_p``, ``wanda_neuron``,
``random_neuron``, ``heapr``; :mod:`moeprune.methods`): one scorer (``method.fn``,
:mod:`moeprune.scoring.neurons`) gives [E, I] scores per MoE layer, then:

* budget: ``ratio`` is the fraction of routed-expert neurons removed, n = round(ratio * N) of the
  N = sum over MoE layers of E * I neurons (protected experts count in N, as a dropped-expert
  budget counts them). Every neuron holds 3H parameters (gate row, up row, down column; +2 with
  biases), so it is also the fraction of routed-expert parameters removed; the plan's budget
  records the fraction of all parameters too.
* protection: super experts (detected from the statistics, as for expert dropping) keep every
  neuron unless ``protect_super_experts=False``; shared experts are never routed experts, so never
  sliced. Every expert keeps at least one neuron (its best).
* ``layout="uniform"``: every sliceable expert of the model keeps the same width w, its own top-w
  neurons by score. The width follows from the budget alone, w = I - round(n / M) over the M
  sliceable experts (so with protected experts the others lose slightly more, to remove the same n),
  rounded to a multiple of 8 when I is (and I >= 64): transformers' grouped_mm kernel needs 16-byte
  strides; the plan records the neurons really removed;
  the ranking decides which neurons each expert keeps. Within one expert the top-w set does not
  depend on how experts compare, so ``selection`` has no effect here. The output is a vanilla
  checkpoint (expert-width key edited) unless protected experts keep a larger width or the family's
  shared experts derive their width from the same key; then the widths go to the ``moeprune`` section.
* ``layout="compact"``: each expert keeps its own width. ``selection="global"`` (default): one
  ranking of all sliceable neurons of all layers, the n lowest go; ``"per_layer"``: round(ratio *
  E * I) lowest go in every layer. Ties go in (layer, expert, neuron) order.

Everything the request can get wrong (ratio, layout, selection, rho, compact on a family storing
fused experts on disk, a source whose experts already differ in width) is refused before any
weight is read (:func:`check_neuron_request`, also run by ``api.prune`` before calibration).
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from collections.abc import Mapping

import torch
from tqdm.auto import tqdm

from ..arch import build_skeleton
from ..errors import PlanError, StatsError
from ..scoring.neurons import DEFAULT_RHO, NeuronWeights
from ..super_experts import detect_super_experts
from .actions import SliceNeurons
from .model import Plan
from .selection import _short

logger = logging.getLogger(__name__)

LAYOUTS = ("uniform", "compact")
SELECTIONS = ("global", "per_layer")


# --------------------------------------------------------------------------------------------------
# checks (header facts only)


def source_width(layout) -> int:
    """The one intermediate width of every routed expert of a checkpoint (headers only); a source
    whose experts differ in width (already sliced compact) is a PlanError."""
    widths = {layout.expert_width(layer, e) for layer in layout.layers for e in range(layout.num_experts(layer))}
    if len(widths) != 1:
        raise PlanError(f"the checkpoint's routed experts have different widths {sorted(widths)}; neuron slicing needs "
                        "a source whose experts share one width (slice the original checkpoint instead)")
    return widths.pop()


def check_neuron_request(info, *, ratio, layout: str = "uniform", selection: str = "global", rho: float = DEFAULT_RHO,
                         **_) -> None:
    """PlanError for anything wrong with a neuron-slicing request, before any weight is read."""
    if ratio is None or isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise PlanError(f"neuron slicing needs --ratio in [0, 1) (the fraction of routed-expert neurons removed), got {ratio!r}")
    if layout not in LAYOUTS:
        raise PlanError(f"unknown layout {layout!r}; choose --layout {' or '.join(LAYOUTS)}")
    if selection not in SELECTIONS:
        raise PlanError(f"unknown selection {selection!r}; choose --selection {' or '.join(SELECTIONS)}")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 <= rho <= 1.0:
        raise PlanError(f"--rho must be a number in [0, 1], got {rho!r}")
    if layout == "compact" and not info.family.layout.per_expert_on_disk:
        raise PlanError(f"{info.family.name} stores its routed experts fused on disk (one tensor per layer), which cannot "
                        "hold experts of different widths; use --layout uniform (with --no-protect-super-experts if "
                        "super experts would keep their full width)")
    source_width(info.layout)


# --------------------------------------------------------------------------------------------------
# selection (pure)


def _round(x: float) -> int:
    """Round half up (Python's round() rounds half to even)."""
    return int(math.floor(x + 0.5))


def kept_top(scores: torch.Tensor, width: int) -> tuple[int, ...]:
    """The ``width`` best neurons of one expert's scores [I] (ties: lower index first), sorted."""
    order = torch.sort(-scores.to(torch.float64), stable=True).indices[:width]
    return tuple(sorted(int(k) for k in order))


#: Uniform widths are rounded to a multiple of this (when the source width is one and at least
#: :data:`ALIGN_FROM`): torch's grouped_mm, transformers' default experts kernel, needs 16-byte row
#: strides (8 bf16 values), and a width like 191 makes a vanilla checkpoint fail to run.
WIDTH_MULTIPLE = 8
ALIGN_FROM = 64


def width_multiple(width: int) -> int:
    """The multiple uniform widths are rounded to for a source of ``width`` (1: exact)."""
    return WIDTH_MULTIPLE if width >= ALIGN_FROM and width % WIDTH_MULTIPLE == 0 else 1


def uniform_width(width: int, sliceable: int, total: int, ratio: float, multiple: int = 1) -> int:
    """The width every sliceable expert keeps: I - round(round(ratio * total) / sliceable), rounded to
    the nearest multiple of ``multiple`` (half up)."""
    remove = _round(ratio * total)
    if remove and not sliceable:
        raise PlanError("every routed expert is protected (super experts); nothing can be sliced: pass "
                        "--no-protect-super-experts or a ratio of 0")
    per_expert = _round(remove / sliceable) if sliceable else 0
    kept = multiple * _round((width - per_expert) / multiple)
    if kept < 1:
        raise PlanError(f"--ratio {ratio} removes {remove} neurons, {per_expert} per sliceable expert, but each keeps at "
                        f"least {multiple} of its {width}; the largest ratio here is "
                        f"{(width - multiple) * sliceable / total:.4f}")
    return kept


def _removable(scores: torch.Tensor, protected: list[int]) -> torch.Tensor:
    """[E, I] scores with +inf where a neuron may not go: protected experts, and each expert's best
    neuron (ties: the lower index), so every expert keeps at least one."""
    out = scores.clone()
    best = torch.argmax(scores, dim=1)  # the first of equal maxima
    out[torch.arange(scores.shape[0]), best] = math.inf
    if protected:
        out[list(protected)] = math.inf
    return out


def lowest(scores: Mapping[int, torch.Tensor], protected: Mapping[int, list[int]], remove: int) -> dict[int, torch.Tensor]:
    """One ranking over every removable neuron of ``scores`` (layer -> [E, I]): a [E, I] bool mask per
    layer, True on the ``remove`` lowest (ties in layer, expert, neuron order); a PlanError if fewer
    are removable."""
    layers = sorted(scores)
    removable = [_removable(scores[layer].to(torch.float64), protected.get(layer, [])) for layer in layers]
    flat = torch.cat([r.reshape(-1) for r in removable])
    available = int(torch.isfinite(flat).sum())
    if remove > available:
        raise PlanError(f"the budget removes {remove} neurons but only {available} may go (each expert keeps its best "
                        "neuron; protected experts keep all); lower --ratio or pass --no-protect-super-experts")
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.sort(flat, stable=True).indices[:remove]] = True
    out, start = {}, 0
    for layer, r in zip(layers, removable):
        out[layer] = chosen[start:start + r.numel()].reshape(r.shape)
        start += r.numel()
    return out


def select_neurons(scores: Mapping[int, torch.Tensor], protected: Mapping[int, list[int]], *, ratio: float,
                   layout: str = "uniform", selection: str = "global") -> dict[int, dict[int, tuple[int, ...]]]:
    """Kept neurons per layer and expert (every expert listed) from [E, I] scores per MoE layer (see
    the module docstring for the rules)."""
    total = sum(s.numel() for s in scores.values())
    if layout == "uniform":
        width = {s.shape[1] for s in scores.values()}.pop()
        sliceable = sum(s.shape[0] - len(protected.get(layer, [])) for layer, s in scores.items())
        keep = uniform_width(width, sliceable, total, ratio, width_multiple(width))
        return {layer: {e: (tuple(range(width)) if e in protected.get(layer, []) else kept_top(s[e], keep))
                        for e in range(s.shape[0])} for layer, s in sorted(scores.items())}
    if selection == "global":
        removed = lowest(scores, protected, _round(ratio * total))
    else:
        removed = {}
        for layer, s in scores.items():
            removed.update(lowest({layer: s}, {layer: protected.get(layer, [])}, _round(ratio * s.numel())))
    return {layer: {e: tuple(int(k) for k in torch.nonzero(~mask[e]).reshape(-1)) for e in range(mask.shape[0])}
            for layer, mask in sorted(removed.items())}


# --------------------------------------------------------------------------------------------------
# the planner


def read_neuron_weights(layout, layer: int) -> NeuronWeights:
    """Down-projection column norms of one MoE layer's routed experts, one expert resident at a time."""
    downs = []
    for expert in range(layout.num_experts(layer)):
        down = layout.read_expert(layer, expert, "down").to(torch.float64)
        downs.append(down)
        layout.forget()
    return NeuronWeights.of_down(downs)


def layer_neuron_scores(method, layer_stats: Mapping[str, torch.Tensor], *, layer: int, seed: int,
                        weights: NeuronWeights, **options) -> torch.Tensor:
    """One MoE layer's [E, I] neuron scores by ``method``'s scorer, checked (entries, shape, finite)."""
    missing = [name for name in method.requires if name not in layer_stats]
    if missing:
        raise StatsError(f"layer {layer} statistics lack {missing}, which method {method.name!r} needs; collect "
                         f"statistics with the observers it names (`moeprune prune --data FILE` collects them)")
    scores = method.fn(layer_stats, layer=layer, seed=seed, weights=weights, num_experts=weights.shape[0],
                       **options).to(torch.float64)
    if tuple(scores.shape) != weights.shape:
        raise StatsError(f"layer {layer}: method {method.name!r} gave scores of shape {list(scores.shape)}, expected "
                         f"{list(weights.shape)} (experts x neurons); re-run `moeprune collect`")
    if not bool(torch.isfinite(scores).all()):
        raise StatsError(f"layer {layer}: method {method.name!r} gave non-finite neuron scores; re-run `moeprune collect`")
    return scores


def width_key_is_free(info, width: int) -> bool:
    """True when setting the family's expert-width key to ``width`` changes no tensor of a stock
    model but the routed experts' (False e.g. for DeepSeek, whose shared experts are
    ``moe_intermediate_size * n_shared_experts`` wide). Compared on meta skeletons."""
    key = info.family.spec["config"]["expert_width"]
    edited = copy.deepcopy(info.config)
    setattr(edited, key, width)
    layout = info.family.layout
    experts = tuple(layout.memory_experts_prefix(layer) for layer in info.geometry.moe_layers)

    def shapes(config) -> dict[str, tuple]:
        return {name: tuple(t.shape) for name, t in build_skeleton(config).state_dict().items() if not name.startswith(experts)}

    return shapes(info.config) == shapes(edited)


def _takes(fn, option: str) -> bool:
    return option in inspect.signature(fn).parameters


def plan_neuron_slicing(info, stats, *, method, ratio, seed: int = 0, protect_super_experts: bool = True,
                        layout: str = "uniform", selection: str = "global", rho: float = DEFAULT_RHO) -> Plan:
    """The :class:`Plan` slicing the routed experts' neurons by ``method``'s neuron scores (see the
    module docstring): ``SliceNeurons`` actions for every MoE layer, the budget with the layout, the
    removed neurons and parameter fractions."""
    check_neuron_request(info, ratio=ratio, layout=layout, selection=selection, rho=rho)
    geometry, checkpoint_layout = info.geometry, info.layout
    width = source_width(checkpoint_layout)
    protected = {}
    if stats is not None and protect_super_experts:
        protected = {layer: sorted(p) for layer, p in detect_super_experts(stats, geometry).routed_by_layer().items()
                     if layer in geometry.moe_layers and p}
    if layout == "uniform" and protected and not checkpoint_layout.family.per_expert_on_disk:
        experts = sum(checkpoint_layout.num_experts(layer) for layer in geometry.moe_layers)
        sliceable = experts - sum(len(p) for p in protected.values())
        if uniform_width(width, sliceable, experts * width, ratio, width_multiple(width)) < width:
            raise PlanError(f"{info.family.name} stores its routed experts fused on disk, so every expert must keep one "
                            f"width, but the super experts {protected} keep all {width} neurons; pass "
                            "--no-protect-super-experts")
    scores = {}
    quiet = not logger.isEnabledFor(logging.INFO)  # -q (logging at ERROR) silences the bar too
    for layer in tqdm(geometry.moe_layers, desc="neuron scores", leave=False, disable=quiet):
        layer_stats = stats.layers.get(layer, {}) if stats is not None else {}
        weights = read_neuron_weights(checkpoint_layout, layer)
        scores[layer] = layer_neuron_scores(method, layer_stats, layer=layer, seed=seed, weights=weights, rho=rho)
    kept = select_neurons(scores, protected, ratio=ratio, layout=layout, selection=selection)

    total = sum(s.numel() for s in scores.values())
    removed = total - sum(len(n) for experts in kept.values() for n in experts.values())
    widths = {len(n) for experts in kept.values() for n in experts.values()}
    vanilla = layout == "uniform" and len(widths) == 1 and (widths == {width} or width_key_is_free(info, next(iter(widths))))
    biases = checkpoint_layout.family.memory.has_biases
    hidden = checkpoint_layout.expert_shape(geometry.moe_layers[0], 0, "down")[0]
    per_neuron = 3 * hidden + (2 if biases else 0)  # gate row, up row, down column (+ gate/up bias entries)
    routed_params = total * per_neuron + (sum(s.shape[0] for s in scores.values()) * hidden if biases else 0)
    all_params = sum(math.prod(checkpoint_layout.checkpoint.shape(name)) for name in checkpoint_layout.checkpoint.keys())  # noqa: SIM118 (a LazyCheckpoint)
    budget = {"ratio": ratio, "layout": layout}
    if layout == "compact":
        budget["selection"] = selection
    if _takes(method.fn, "rho"):
        budget["rho"] = rho
    budget.update({
        "expert_width": width, "vanilla": vanilla, "routed_neurons": total, "removed_neurons": removed,
        "routed_expert_param_ratio": _short(removed * per_neuron / routed_params if routed_params else 0.0),
        "param_ratio": _short(removed * per_neuron / all_params if all_params else 0.0),
    })
    if layout == "uniform" and not vanilla:
        logger.warning("uniform widths written with the moeprune section (load with moeprune.load): %s",
                       "super experts keep their full width" if len(widths) > 1 else
                       f"{info.family.name}'s expert-width key also sizes other tensors")
    plan = Plan(
        layers={},
        method=method.name,
        budget=budget,
        protected=protected,
        model_fingerprint=info.fingerprint,
        family=geometry.family,
        num_experts=geometry.num_experts,
        score_summary=_summary(scores, kept),
        actions={layer: [SliceNeurons(experts)] for layer, experts in kept.items()},
    )
    logger.info("plan (%s, %s): %d of %d routed-expert neurons removed (%.1f%%), widths %s",
                method.name, layout, removed, total, 100.0 * removed / total if total else 0.0,
                sorted({len(n) for experts in kept.values() for n in experts.values()})[:8])
    return plan


def _summary(scores: Mapping[int, torch.Tensor], kept: Mapping[int, Mapping[int, tuple[int, ...]]]) -> dict:
    """Per layer: min/max/mean of all neuron scores and of the kept ones."""
    out = {}
    for layer, s in scores.items():
        mask = torch.zeros_like(s, dtype=torch.bool)
        for expert, neurons in kept[layer].items():
            mask[expert, list(neurons)] = True
        values, kept_values = s.reshape(-1), s[mask]
        out[layer] = {"min": _short(float(values.min())), "max": _short(float(values.max())),
                      "mean": _short(float(values.mean())), "kept_min": _short(float(kept_values.min())),
                      "kept_max": _short(float(kept_values.max())), "kept_mean": _short(float(kept_values.mean()))}
    return out

