"""Validation of a whole plan against a model, once, before any weight is read."""

from __future__ import annotations

from ..errors import PlanError
from ..geometry import MoEGeometry
from .actions import (ROUTER_MODES, ROUTER_ROWS, DropAttentionHeads, DropLayer, KeepExperts, MergeExperts, RecombineNeurons, SliceChannels,
                      SliceNeurons)
from .budgets import _COLLAPSE_HINT, _check_moe_layer, validate_budget
from .model import Plan


def validate_plan(plan: Plan, geometry: MoEGeometry, fingerprint: str | None = None) -> None:
    """Raise PlanError unless ``plan`` can be applied to the model described by ``geometry``.

    Checks the model fingerprint (when both the plan and ``fingerprint`` have one), family and
    expert count (when the plan records them), that every layer is a MoE layer, that indices are
    unique and in [0, E), that counts pass :func:`validate_budget`, that grouped routing keeps the
    same number in every group (unless ``plan.collapse_groups``), that protected experts are
    kept, and every typed action (:func:`validate_actions`). Runs before any weight is read.
    """
    if fingerprint and plan.model_fingerprint and plan.model_fingerprint != fingerprint:
        raise PlanError(
            f"the plan was made for model {plan.model_fingerprint}, not this model "
            f"({fingerprint}); make a new plan for this checkpoint"
        )
    if plan.family and plan.family != geometry.family:
        raise PlanError(
            f"the plan was made for a {plan.family} model, this is a {geometry.family} model; "
            "make a new plan for this checkpoint"
        )
    num = geometry.num_experts
    if plan.num_experts and plan.num_experts != num:
        raise PlanError(
            f"the plan was made for {plan.num_experts} experts per layer, this model has {num}; "
            "make a new plan for this checkpoint"
        )
    for layer, kept in sorted(plan.layers.items()):
        _check_moe_layer(geometry, layer, "the plan")
        if len(set(kept)) != len(kept):
            dupes = sorted({e for e in kept if kept.count(e) > 1})
            raise PlanError(f"the plan lists experts {dupes} of layer {layer} more than once")
        layer_num = geometry.experts_in(layer)
        bad = [e for e in kept if not 0 <= e < layer_num]
        if bad:
            raise PlanError(
                f"the plan keeps experts {bad} in layer {layer}; indices must be in [0, {layer_num})"
            )
    validate_budget(geometry, plan.kept_counts(), plan.collapse_groups)
    if geometry.grouped and not plan.collapse_groups:
        for layer, kept in sorted(plan.layers.items()):
            per_group = _count_per_group(geometry, kept)
            if len(set(per_group)) > 1:
                raise PlanError(
                    f"layer {layer} keeps {per_group} experts in its {geometry.n_group} routing "
                    f"groups; group-limited routing needs the same number in every group; "
                    f"{_COLLAPSE_HINT}"
                )
    for layer, protected in sorted(plan.protected.items()):
        if layer in plan.layers:
            lost = sorted(set(protected) - set(plan.layers[layer]))
            if lost:
                raise PlanError(
                    f"the plan drops protected experts {lost} of layer {layer}; keep them or "
                    "remove them from 'protected'"
                )
    validate_actions(plan, geometry)


def _count_per_group(geometry: MoEGeometry, experts: list[int]) -> list[int]:
    counts = [0] * geometry.n_group
    for expert in experts:
        counts[geometry.group_of(expert)] += 1
    return counts


def _unique_in_range(values, limit: int, what: str) -> None:
    """PlanError unless ``values`` are distinct and in [0, limit) (``limit`` 0 = unknown: only >= 0)."""
    seen = sorted(values)
    dupes = sorted({v for v in seen if seen.count(v) > 1})
    if dupes:
        raise PlanError(f"{what} lists {dupes} more than once")
    bad = [v for v in seen if v < 0 or (limit and v >= limit)]
    if bad:
        bound = f"[0, {limit})" if limit else ">= 0"
        raise PlanError(f"{what} has indices {bad} out of range; they must be {bound}")


def validate_actions(plan: Plan, geometry: MoEGeometry) -> None:
    """Raise PlanError unless every typed action of ``plan`` fits the model (before any weight is read).

    Per action: layers exist (MoE layers for expert actions); merge clusters are non-empty,
    disjoint and cover the layer's experts (its kept experts when the layer also keeps experts),
    have one finite weight and one neuron permutation (or null) per member, reach ``top_k``
    experts, keep group-limited routing valid (each cluster inside one group, the same number per
    group, unless ``collapse_groups``), and never merge a protected expert with another; kept
    neurons are distinct and within the expert's width; heads and KV groups are in range and leave
    at least one; a dropped layer carries no other action and at least one layer stays.
    """
    dropped_layers = 0
    for layer, actions in sorted(plan.actions.items()):
        if not 0 <= layer < geometry.num_hidden_layers:
            raise PlanError(f"the plan has actions for layer {layer}, but the model has layers 0..{geometry.num_hidden_layers - 1}")
        ops = [a.op for a in actions]
        if len(set(ops)) != len(ops):
            raise PlanError(f"layer {layer} lists the action {sorted(o for o in ops if ops.count(o) > 1)[0]!r} twice; merge them into one")
        for action in actions:
            where = f"layer {layer}, {action.op}"
            if isinstance(action, KeepExperts):
                raise PlanError(f"{where}: keep experts through Plan.layers, not Plan.actions")
            if isinstance(action, MergeExperts):
                if any(isinstance(a, SliceNeurons) for a in actions):
                    raise PlanError(f"{where}: merging and slicing neurons in one layer is not supported; do one per plan")
                _validate_merge(plan, geometry, layer, action, where)
            elif isinstance(action, SliceNeurons):
                _check_moe_layer(geometry, layer, f"the {action.op} action")
                experts = plan.layers.get(layer, range(geometry.experts_in(layer)))
                for expert, neurons in action.experts.items():
                    if expert not in experts:
                        raise PlanError(f"{where}: expert {expert} is not (kept) in this layer")
                    if not neurons:
                        raise PlanError(f"{where}: expert {expert} keeps no neuron; drop the expert instead")
                    _unique_in_range(neurons, geometry.width_of(layer, expert), f"{where}, expert {expert}")
            elif isinstance(action, DropAttentionHeads):
                _unique_in_range(action.heads, geometry.num_attention_heads, f"{where}, heads")
                _unique_in_range(action.kv_groups, geometry.num_key_value_heads, f"{where}, kv_groups")
                if geometry.num_key_value_heads and len(action.kv_groups) >= geometry.num_key_value_heads:
                    raise PlanError(f"{where}: drops every KV group; drop the layer instead")
                if geometry.num_attention_heads and len(action.heads) >= geometry.num_attention_heads:
                    raise PlanError(f"{where}: drops every head; drop the layer instead")
            elif isinstance(action, SliceChannels):
                if action.target == "shared_experts" and not geometry.has_shared_experts:
                    raise PlanError(f"{where}: this {geometry.family} model has no shared experts")
                if not action.kept:
                    raise PlanError(f"{where}: keeps no channel")
                _unique_in_range(action.kept, 0, f"{where}, kept")
            elif isinstance(action, DropLayer):
                if len(actions) > 1 or layer in plan.layers:
                    raise PlanError(f"{where}: a dropped layer takes no other action; remove the others")
                dropped_layers += 1
            elif isinstance(action, RecombineNeurons):
                _validate_recombine(plan, geometry, layer, action, actions, where)
    if dropped_layers and dropped_layers >= geometry.num_hidden_layers:
        raise PlanError("the plan drops every decoder layer; keep at least one")


def _validate_merge(plan: Plan, geometry: MoEGeometry, layer: int, action: MergeExperts, where: str) -> None:
    _check_moe_layer(geometry, layer, f"the {action.op} action")
    universe = sorted(plan.layers.get(layer, range(geometry.experts_in(layer))))
    members = [m for cluster in action.clusters for m in cluster.members]
    _unique_in_range(members, geometry.experts_in(layer), f"{where}, cluster members")
    if sorted(members) != universe:
        missing, extra = sorted(set(universe) - set(members)), sorted(set(members) - set(universe))
        raise PlanError(f"{where}: the clusters must cover the layer's {'kept ' if layer in plan.layers else ''}experts "
                        f"exactly once; missing {missing}, not in the layer {extra}")
    for i, cluster in enumerate(action.clusters):
        if not cluster.members:
            raise PlanError(f"{where}: cluster {i} has no member")
        if len(cluster.weights) != len(cluster.members) or len(cluster.permutations) != len(cluster.members):
            raise PlanError(f"{where}: cluster {i} needs one weight and one permutation (or null) per member")
        for member, perm in zip(cluster.members, cluster.permutations):
            width = geometry.width_of(layer, member)
            if perm is not None and (sorted(perm) != list(range(width)) if width else len(set(perm)) != len(perm)):
                raise PlanError(f"{where}: the permutation of expert {member} in cluster {i} is not a permutation of "
                                f"its {width or 'I'} neurons")
        if any(w < 0 for w in cluster.weights) or not sum(cluster.weights) > 0:
            raise PlanError(f"{where}: cluster {i} needs non-negative merge weights with a positive sum, got "
                            f"{list(cluster.weights)}")
    if action.router not in ROUTER_MODES or action.router_rows not in ROUTER_ROWS:
        raise PlanError(f"{where}: router must be one of {', '.join(ROUTER_MODES)} and router_rows one of "
                        f"{', '.join(ROUTER_ROWS)}, got {action.router!r} and {action.router_rows!r}")
    if action.router == "exact" and layer in plan.layers:
        raise PlanError(f"{where}: an exact router keeps every original logit, so it cannot follow a keep_experts "
                        "action in the same layer; put the dropped experts into clusters or use the vanilla router")
    count = len(action.clusters)
    if count < geometry.top_k:
        raise PlanError(f"{where}: {count} merged experts, but the router selects top_k={geometry.top_k}; keep at least {geometry.top_k}")
    protected = set(plan.protected.get(layer, []))
    for i, cluster in enumerate(action.clusters):
        guarded = protected.intersection(cluster.members)
        if guarded and len(cluster.members) > 1:
            raise PlanError(f"{where}: cluster {i} merges protected experts {sorted(guarded)} with others; "
                            "keep protected experts as clusters of their own")
    if geometry.grouped and not plan.collapse_groups and action.router == "vanilla":
        # (an exact router keeps every original logit, so the model's group-limited routing is unchanged)
        groups = [{geometry.group_of(m) for m in c.members} for c in action.clusters]
        if any(len(g) > 1 for g in groups):
            raise PlanError(f"{where}: a cluster spans several routing groups; {_COLLAPSE_HINT}, or use --router exact")
        order = [min(g) for g in groups]
        if order != sorted(order):
            raise PlanError(f"{where}: merged expert i takes router row i, so the clusters must be listed group by "
                            f"group (routing groups are contiguous); their groups are {order}")
        per_group = [sum(1 for g in groups if g == {k}) for k in range(geometry.n_group)]
        if len(set(per_group)) > 1:
            raise PlanError(f"{where}: the groups keep {per_group} merged experts; group-limited routing needs the "
                            f"same number in every group; {_COLLAPSE_HINT}")
        validate_budget(geometry, {layer: count}, plan.collapse_groups)



def _validate_recombine(plan: Plan, geometry: MoEGeometry, layer: int, action: RecombineNeurons, actions: list,
                        where: str) -> None:
    """A recombined expert is a kept expert of a MoE layer; its terms name experts of that layer and
    neurons within their widths; its targets lie within its own width; no merge or neuron slicing
    in the same layer."""
    _check_moe_layer(geometry, layer, f"the {action.op} action")
    if any(isinstance(a, (MergeExperts, SliceNeurons)) for a in actions):
        raise PlanError(f"{where}: recombining neurons and merging or slicing in one layer is not supported")
    kept = plan.layers.get(layer, range(geometry.experts_in(layer)))
    for expert, mix in action.experts.items():
        if expert not in kept:
            raise PlanError(f"{where}: expert {expert} is not (kept) in this layer; only kept experts are recombined")
        _unique_in_range(set(mix.sources), geometry.experts_in(layer), f"{where}, expert {expert}, sources")
        width = geometry.width_of(layer, expert)
        for source, neuron in zip(mix.sources, mix.neurons):
            limit = geometry.width_of(layer, source)
            if neuron < 0 or (limit and neuron >= limit):
                raise PlanError(f"{where}, expert {expert}: neuron {neuron} of expert {source} is out of range "
                                f"[0, {limit or 'I'})")
        bad = sorted({t for t in mix.targets if t < 0 or (width and t >= width)})
        if bad:
            raise PlanError(f"{where}, expert {expert}: target neurons {bad} are outside its width [0, {width or 'I'})")
