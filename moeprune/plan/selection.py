"""Selection: the experts each MoE layer keeps, from scores and a budget, and the plan built from them."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from ..errors import PlanError
from ..geometry import MoEGeometry
from .budgets import _check_moe_layer, resolve_budget, validate_budget
from .model import Plan, _layer_key

logger = logging.getLogger(__name__)

_PROTECT_HINT = "pass --no-protect-super-experts or give a larger budget"


def _ranked(candidates: list[int], scores: list[float]) -> list[int]:
    """``candidates`` by descending score; ties go to the lower index."""
    return sorted(candidates, key=lambda e: (-scores[e], e))


def _pick(candidates: list[int], scores: list[float], protected: set[int], count: int) -> list[int]:
    """``count`` experts of ``candidates``: all protected ones, then the best-scoring others."""
    chosen = [e for e in candidates if e in protected]
    others = _ranked([e for e in candidates if e not in protected], scores)
    return chosen + others[: count - len(chosen)]


def _layer_scores(scores: Mapping[int, torch.Tensor], layer: int, num: int) -> list[float]:
    if layer not in scores:
        raise PlanError(
            f"no scores for MoE layer {layer} (the statistics lack this layer); re-run "
            "`moeprune collect` on this model"
        )
    vector = torch.as_tensor(scores[layer]).detach().to(torch.float64).reshape(-1)
    if vector.numel() != num:
        raise PlanError(
            f"layer {layer} has {vector.numel()} scores but the model has {num} experts; the "
            "statistics belong to another model"
        )
    if not bool(torch.isfinite(vector).all()):
        raise PlanError(f"layer {layer} scores contain NaN/inf; re-run `moeprune collect`")
    return vector.tolist()


def _check_protected(
    geometry: MoEGeometry, protected: Mapping[int, list[int]]
) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for layer, experts in protected.items():
        _check_moe_layer(geometry, layer, "the protected experts")
        bad = [e for e in experts if not 0 <= e < geometry.num_experts]
        if bad:
            raise PlanError(
                f"protected experts {bad} of layer {layer} are out of range [0, "
                f"{geometry.num_experts})"
            )
        out[layer] = set(experts)
    return out


def select_experts(
    scores: Mapping[int, torch.Tensor],
    kept_counts: Mapping[int, int],
    geometry: MoEGeometry,
    protected: Mapping[int, list[int]] | None = None,
    collapse_groups: bool = False,
) -> dict[int, list[int]]:
    """Kept experts per MoE layer: the highest-scoring ones, protected experts always included.

    Protected experts count toward the budget (too many is a PlanError). Ties go to the lower
    index. For group-limited routing without ``collapse_groups`` each group keeps
    kept/n_group experts (its protected ones first). MoE layers absent from ``kept_counts`` (or
    keeping all E) keep every expert and need no scores. Returns ``{layer: sorted indices}`` for
    every MoE layer.
    """
    validate_budget(geometry, kept_counts, collapse_groups)
    guarded = _check_protected(geometry, protected or {})
    num = geometry.num_experts
    grouped = geometry.grouped and not collapse_groups
    result: dict[int, list[int]] = {}
    for layer in geometry.moe_layers:
        count = kept_counts.get(layer, num)
        if count >= num:
            result[layer] = list(range(num))
            continue
        layer_scores = _layer_scores(scores, layer, num)
        keep_safe = guarded.get(layer, set())
        if len(keep_safe) > count:
            raise PlanError(
                f"layer {layer} has {len(keep_safe)} protected experts {sorted(keep_safe)} but the "
                f"budget keeps only {count}; {_PROTECT_HINT}"
            )
        if not grouped:
            chosen = _pick(list(range(num)), layer_scores, keep_safe, count)
        else:
            per_group, size = count // geometry.n_group, geometry.experts_per_group
            chosen = []
            for group in range(geometry.n_group):
                members = list(range(group * size, (group + 1) * size))
                safe_here = keep_safe.intersection(members)
                if len(safe_here) > per_group:
                    raise PlanError(
                        f"layer {layer}, routing group {group} has {len(safe_here)} protected "
                        f"experts {sorted(safe_here)} but each group keeps only {per_group}; "
                        f"{_PROTECT_HINT} (or --collapse-groups)"
                    )
                chosen.extend(_pick(members, layer_scores, safe_here, per_group))
        result[layer] = sorted(chosen)
    return result


# --------------------------------------------------------------------------------------------------
# convenience


def _stats_summary(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return (0.0, 0.0, 0.0)
    return (min(values), max(values), sum(values) / len(values))


def _short(x: float) -> float:
    return float(f"{x:.6g}")


def summarize_scores(
    scores: Mapping[int, torch.Tensor], layers: Mapping[int, list[int]]
) -> dict[int, dict[str, float]]:
    """Per layer: min/max/mean of all scores and of the kept scores (6 significant digits)."""
    summary: dict[int, dict[str, float]] = {}
    for layer, kept in sorted(layers.items()):
        if layer not in scores:
            continue
        values = torch.as_tensor(scores[layer]).detach().to(torch.float64).reshape(-1).tolist()
        lo, hi, mean = _stats_summary(values)
        k_lo, k_hi, k_mean = _stats_summary([values[e] for e in kept if 0 <= e < len(values)])
        summary[layer] = {
            "min": _short(lo),
            "max": _short(hi),
            "mean": _short(mean),
            "kept_min": _short(k_lo),
            "kept_max": _short(k_hi),
            "kept_mean": _short(k_mean),
        }
    return summary


def build_plan(
    geometry: MoEGeometry,
    scores: Mapping[int, torch.Tensor],
    *,
    method: str,
    ratio: float | None = None,
    keep: int | None = None,
    per_layer: Mapping[int | str, int | float] | None = None,
    protected: Mapping[int, list[int]] | None = None,
    collapse_groups: bool = False,
    model_fingerprint: str = "",
) -> Plan:
    """Resolve the budget, validate it, select experts and return the filled-in :class:`Plan`."""
    if collapse_groups and not geometry.grouped:
        logger.info("--collapse-groups ignored: this model's routing has no groups")
        collapse_groups = False
    counts = resolve_budget(
        geometry, ratio=ratio, keep=keep, per_layer=per_layer, collapse_groups=collapse_groups
    )
    validate_budget(geometry, counts, collapse_groups)
    layers = select_experts(scores, counts, geometry, protected, collapse_groups)
    if ratio is not None:
        budget: dict = {"ratio": ratio}
    elif keep is not None:
        budget = {"keep": keep}
    else:
        mapping = per_layer or {}
        budget = {"per_layer": {_layer_key(k, "--per-layer"): v for k, v in mapping.items()}}
    plan = Plan(
        layers=layers,
        method=method,
        budget=budget,
        protected={layer: sorted(p) for layer, p in sorted((protected or {}).items()) if p},
        model_fingerprint=model_fingerprint,
        family=geometry.family,
        num_experts=geometry.num_experts,
        score_summary=summarize_scores(scores, layers),
        collapse_groups=collapse_groups,
    )
    removed = sum(geometry.num_experts - len(k) for k in layers.values())
    logger.info(
        "plan (%s): keeping %s experts per layer, %d of %d routed experts removed",
        method,
        sorted(set(len(k) for k in layers.values())),
        removed,
        geometry.num_experts * len(layers),
    )
    return plan
