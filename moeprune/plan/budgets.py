"""Budgets: how many experts each MoE layer keeps, and whether routing still works with that many.

Routing constraints enforced here:

* every layer keeps at least ``top_k`` experts (otherwise the router cannot select top-k);
* group-limited routing (DeepSeek-V3, Kimi-K2, GLM-4.5: ``n_group > 1``) keeps the same number of
  experts in every group, at least ``min_experts_per_group`` each, and enough that the
  ``topk_group`` selectable groups still hold ``top_k`` experts -- unless ``collapse_groups`` is
  set, in which case the pruned model routes with ``n_group = topk_group = 1``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

from ..errors import PlanError
from ..geometry import MoEGeometry
from .model import _layer_key

logger = logging.getLogger(__name__)

_RATIO_EPS = 1e-9

_COLLAPSE_HINT = "use a different budget or pass --collapse-groups to set n_group = topk_group = 1"


def _check_moe_layer(geometry: MoEGeometry, layer: int, what: str) -> None:
    if layer not in geometry.moe_layers:
        raise PlanError(
            f"{what} names layer {layer}, which is not a MoE layer of this {geometry.family} "
            f"model; MoE layers: {list(geometry.moe_layers)}"
        )


def kept_from_ratio(num_experts: int, ratio: float) -> int:
    """Experts kept when removing the fraction ``ratio`` of ``num_experts``.

    removed = floor(ratio * E + 1e-9), kept = E - removed: never removes more than asked (E=8,
    ratio=0.3 -> 2.4 -> remove 2, keep 6); the 1e-9 absorbs float error (0.29 * 100 = 28.999...
    removes 29). At least one expert is kept.
    """
    removed = math.floor(ratio * num_experts + _RATIO_EPS)
    return max(1, num_experts - removed)


def _check_ratio(ratio: object, what: str = "--ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        raise PlanError(f"{what} must be a number in [0, 1): got {ratio!r}")
    if not 0.0 <= ratio < 1.0:
        raise PlanError(
            f"{what} must be in [0, 1): got {ratio} (the fraction of experts REMOVED; 0.5 removes "
            "half)"
        )
    return float(ratio)


def _round_to_groups(
    geometry: MoEGeometry, kept: int, layer: int | None, collapse_groups: bool
) -> int:
    """Round a ratio-derived count UP to a multiple of n_group for group-limited routing."""
    if not geometry.grouped or collapse_groups or kept % geometry.n_group == 0:
        return kept
    rounded = min(geometry.num_experts, math.ceil(kept / geometry.n_group) * geometry.n_group)
    logger.info(
        "%s: keeping %d experts instead of %d so that each of the %d routing groups keeps "
        "the same number (%d)",
        "every MoE layer" if layer is None else f"layer {layer}",
        rounded,
        kept,
        geometry.n_group,
        rounded // geometry.n_group,
    )
    return rounded


def _check_count(count: object, what: str) -> int:
    if isinstance(count, bool) or not isinstance(count, int):
        raise PlanError(f"{what} must be an integer number of experts to keep, got {count!r}")
    if count < 1:
        raise PlanError(f"{what} must keep at least 1 expert, got {count}")
    return count


def resolve_budget(
    geometry: MoEGeometry,
    *,
    ratio: float | None = None,
    keep: int | None = None,
    per_layer: Mapping[int | str, int | float] | None = None,
    collapse_groups: bool = False,
) -> dict[int, int]:
    """Number of experts to KEEP in every MoE layer, from exactly one kind of budget.

    Args:
        ratio: fraction of experts REMOVED in every layer, in [0, 1); kept = E - floor(ratio*E)
            (see :func:`kept_from_ratio`).
        keep: experts kept in every layer.
        per_layer: ``{layer: n}``; an int ``n`` is a count to keep, a float in [0, 1) a removal
            ratio. MoE layers not in the mapping keep all experts. Keys may be strings (JSON/CLI).
        collapse_groups: the pruned model will route with n_group = 1 (no per-group rounding).

    For group-limited routing (n_group > 1, not collapsed), counts derived from a ratio are rounded
    UP to a multiple of n_group (logged); explicit integer counts are used as given and checked by
    :func:`validate_budget`. The result is not validated; call :func:`validate_budget`.
    """
    options = (("--ratio", ratio), ("--keep", keep), ("--per-layer", per_layer))
    given = [name for name, value in options if value is not None]
    if len(given) != 1:
        raise PlanError(
            "give exactly one budget: --ratio (fraction removed), --keep (experts kept per layer) "
            f"or --per-layer; got {', '.join(given) if given else 'none'}"
        )
    num = geometry.num_experts
    if ratio is not None:
        kept = _round_to_groups(
            geometry, kept_from_ratio(num, _check_ratio(ratio)), None, collapse_groups
        )
        return {layer: kept for layer in geometry.moe_layers}
    if keep is not None:
        count = _check_count(keep, "--keep")
        return {layer: count for layer in geometry.moe_layers}

    assert per_layer is not None
    if not isinstance(per_layer, Mapping):
        raise PlanError(f"--per-layer must map layer index to a count or ratio, got {per_layer!r}")
    counts = {layer: num for layer in geometry.moe_layers}
    for key, value in per_layer.items():
        layer = _layer_key(key, "--per-layer")
        _check_moe_layer(geometry, layer, "--per-layer")
        if isinstance(value, float):
            what = f"--per-layer ratio for layer {layer} (floats are removal ratios)"
            layer_ratio = _check_ratio(value, what)
            counts[layer] = _round_to_groups(
                geometry, kept_from_ratio(num, layer_ratio), layer, collapse_groups
            )
        else:
            counts[layer] = _check_count(value, f"--per-layer count for layer {layer}")
    return counts


def validate_budget(
    geometry: MoEGeometry, kept_counts: Mapping[int, int], collapse_groups: bool = False
) -> None:
    """Raise PlanError unless keeping ``kept_counts[layer]`` experts leaves routing valid.

    Checks: each key is a MoE layer; top_k <= kept <= E; for group-limited routing without
    ``collapse_groups``: kept divisible by n_group, kept/n_group >= min_experts_per_group and
    (kept/n_group) * topk_group >= top_k.
    """
    top_k = geometry.top_k
    if geometry.routing == "softmax_skip_topk" and len(set(kept_counts.values())) > 1:
        raise PlanError(
            f"keeping {sorted(set(kept_counts.values()))} experts in different layers; a {geometry.family} router finds "
            "its skip class by config.json's one expert count (num_experts), so every MoE layer must keep the same "
            "number of experts (a uniform per-layer budget)"
        )
    for layer, kept in sorted(kept_counts.items()):
        _check_moe_layer(geometry, layer, "the budget")
        num = geometry.experts_in(layer)
        if kept > num:
            raise PlanError(
                f"keeping {kept} experts in layer {layer}, but the layer has only {num}; keep at "
                f"most {num}"
            )
        if kept < top_k:
            raise PlanError(
                f"keeping {kept} experts in layer {layer} but the router selects top_k={top_k} per "
                f"token; keep at least {top_k}"
            )
        if not geometry.grouped or collapse_groups:
            continue
        groups = geometry.n_group
        if kept % groups:
            raise PlanError(
                f"keeping {kept} experts in layer {layer}, but routing is group-limited with "
                f"n_group={groups}, so every group must keep the same number (a multiple of "
                f"{groups}); {_COLLAPSE_HINT}"
            )
        per_group = kept // groups
        if per_group < geometry.min_experts_per_group:
            raise PlanError(
                f"keeping {kept} experts in layer {layer} leaves {per_group} per routing group, "
                f"but the router needs at least {geometry.min_experts_per_group} per group; "
                f"{_COLLAPSE_HINT}"
            )
        if per_group * geometry.topk_group < top_k:
            raise PlanError(
                f"keeping {kept} experts in layer {layer} leaves {per_group} per group, so the "
                f"topk_group={geometry.topk_group} groups a token may use hold only "
                f"{per_group * geometry.topk_group} experts < top_k={top_k}; {_COLLAPSE_HINT}"
            )


