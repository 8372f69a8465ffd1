"""The NAEE planner: per MoE layer, the expert subset of the budget's size with the least output error.

NAEE (Lu et al., "Not All Experts are Equal", ACL 2024, https://arxiv.org/abs/2402.14800): the kept
set of layer l is

    S_l = argmin over |S| = kept_l of  sum over calibration tokens of ||F(x) - F_S(x)||^2

read from the ``naee_error`` statistics (:mod:`moeprune.observe.naee`: one accumulated error per
subset, the family's routing re-applied to the logits of S). Candidates must contain the layer's
protected super experts (unless protection is off) and, for group-limited routing, keep the same
number of experts in every routing group (``moeprune prune``'s rule; ``collapse_groups`` is not
offered). Ties go to the subset with the smallest bitmask (the lowest expert indices). The kept
count is the same in every layer (``--ratio``), so the output is a vanilla checkpoint.
"""

from __future__ import annotations

import logging

import torch

from ..errors import PlanError, StatsError
from ..observe.naee import check_naee_experts, subset_mask
from ..super_experts import detect_super_experts
from .budgets import resolve_budget, validate_budget
from .model import Plan

logger = logging.getLogger(__name__)


def best_subset(errors: torch.Tensor, num_experts: int, kept: int, protected: set[int] = frozenset(),
                n_group: int = 1) -> tuple[list[int], float]:
    """``(sorted experts, error)`` of the subset of ``kept`` experts with the least ``errors[bitmask]``
    among those containing ``protected`` and keeping kept / n_group experts in each of the n_group
    contiguous routing groups."""
    masks = torch.arange(1 << num_experts, dtype=torch.int64)
    members = subset_mask(masks, num_experts)
    allowed = members.sum(dim=-1) == kept
    if protected:
        allowed &= members[:, sorted(protected)].all(dim=-1)
    if n_group > 1:
        per_group = members.view(-1, n_group, num_experts // n_group).sum(dim=-1)
        allowed &= (per_group == kept // n_group).all(dim=-1)
    if not bool(allowed.any()):
        raise PlanError(f"no subset of {kept} experts contains the protected experts {sorted(protected)}; "
                        "pass --no-protect-super-experts or give a larger budget")
    candidates = masks[allowed]
    values = errors.double()[candidates]
    best = int(torch.argmin(values))  # first minimum: the smallest bitmask
    chosen = int(candidates[best])
    return [j for j in range(num_experts) if chosen >> j & 1], float(values[best])


def plan_naee(info, stats, *, method, ratio, seed: int = 0, protect_super_experts: bool = True) -> Plan:
    """The NAEE plan of ``info``'s model at ``ratio`` (fraction of routed experts removed per layer)."""
    geometry = info.geometry
    for layer in geometry.moe_layers:
        check_naee_experts(geometry.experts_in(layer), layer)
    if ratio is None:
        raise PlanError(f"method {method.name!r} takes its budget as --ratio")
    counts = resolve_budget(geometry, ratio=ratio)
    validate_budget(geometry, counts)
    if stats is None:
        raise PlanError(f"method {method.name!r} needs calibration statistics: pass --data FILE or --stats STATS")
    protected = detect_super_experts(stats, geometry).routed_by_layer() if protect_super_experts else {}
    layers, summary = {}, {}
    for layer in geometry.moe_layers:
        num = geometry.experts_in(layer)
        entries = stats.layers.get(layer, {})
        if "naee_error" not in entries:
            raise StatsError(f"the statistics of layer {layer} lack naee_error: collect them for --method naee "
                             "(`moeprune prune --method naee --data FILE`)")
        errors = entries["naee_error"]
        if errors.numel() != 1 << num:
            raise StatsError(f"naee_error of layer {layer} has {errors.numel()} entries, expected 2^{num}; the statistics "
                             "belong to another model")
        if counts[layer] >= num:
            layers[layer] = list(range(num))
            continue
        kept, error = best_subset(errors, num, counts[layer], set(protected.get(layer, [])),
                                  geometry.n_group if geometry.grouped else 1)
        layers[layer] = kept
        tokens = float(entries.get("tokens", torch.tensor(0.0)))
        summary[layer] = {"naee_error": float(f"{error:.6g}"),
                          "naee_error_per_token": float(f"{error / tokens:.6g}") if tokens else 0.0}
    plan = Plan(layers=layers, method=method.name, budget={"ratio": ratio},
                protected={layer: sorted(p) for layer, p in sorted(protected.items()) if p},
                model_fingerprint=info.fingerprint, family=geometry.family, num_experts=geometry.num_experts,
                score_summary=summary)
    plan.calibration = {key: stats.metadata.get(key) for key in ("data_hash", "samples", "seq_len", "num_tokens", "data_file")}
    logger.info("plan (naee): keeping %s experts per layer", sorted({len(k) for k in layers.values()}))
    return plan
