"""Profiles that fold their dropped experts into the kept ones (``--action merge|dern``).

A task profile keeps the experts its scorer selects (:func:`moeprune.api.plan_pruning`, exactly as a
drop profile). Instead of discarding the others, a folding profile stores, per MoE layer, the plan
action that moves them into the kept experts, computed once at build time from the profile's own
domain statistics (and, for alignment and DERN, the weights):

* ``merge``: every dropped expert joins one kept expert (the kept experts are the clusters'
  dominants, the same experts and router rows as the drop profile), by the similarity
  ``similarity``:

  - ``output``: HC-SMoE's feature, the mean expert output over ALL calibration tokens
    ``o_j = (1/T) sum_t f_j(x_t)``; a dropped expert joins the kept expert at the smallest
    Euclidean distance ``||o_j - o_k||`` (HC-SMoE, ICML 2025, https://arxiv.org/abs/2410.08589);
  - ``router``: M-SMoE's router-logit similarity ``(cos(z_j, z_k) + 1) / 2``; a dropped expert joins
    the most similar kept expert, which is M-SMoE's assignment step with the profile's kept experts
    as the dominants (ICLR 2024, https://arxiv.org/abs/2310.01334).

  Each cluster is merged with frequency weights (equal when no member was routed), neurons aligned
  to the kept expert (``align``), as :func:`moeprune.plan.merging.assemble_plan` does for the merge
  methods. Routing groups (DeepSeek, vanilla router) are respected: a dropped expert joins a kept one
  of its own group. Protected super experts absorb nobody. ``router``: ``vanilla`` (a stock
  checkpoint) or ``exact`` (``moeprune.load``).
* ``dern``: DERN's neuron recombination (:func:`moeprune.plan.dern.recombine_layer`) with the
  profile's kept set in place of DERN's own drop step: the dropped experts' neuron segments move to
  the kept expert holding the most similar segment (cosine > ``tau``), and each receiving expert is
  reclustered to its width (weighted spherical k-means, point weights = the source expert's mean
  gate mass on the task's tokens, ``soft_count / tokens``).

Every option is validated by :func:`check_action` before any weight is read.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm

from ..errors import PlanError
from ..methods import get_method
from ..plan import Plan
from ..plan.actions import ROUTER_MODES, ROUTER_ROWS, RecombineNeurons
from ..plan.dern import check_dern, expert_importance, layer_weights, recombine_layer
from ..plan.merging import SWITCHES, assemble_plan, assign_to_dominants, routing_groups
from ..scoring.similarity import mean_expert_outputs, router_logit_similarity
from .settings import MERGE_OPTIONS, MERGE_SIMILARITIES, PROFILE_ACTIONS, ProfileError

logger = logging.getLogger(__name__)

#: statistics entries each folding action reads (beyond those of the scorer)
_NEEDS = {"output": ("frequency", "expert_mean_output", "tokens"), "router": ("frequency", "router_logit_gram"),
          "dern": ("soft_count", "tokens")}


def option_flag(option: str) -> str:
    """The ``profile build`` flag of an action option (``similarity`` -> ``--merge-similarity``)."""
    return "--merge-similarity" if option == "similarity" else "--" + option.replace("_", "-")


def action_defaults(action: str) -> dict:
    """The options of ``action`` with their defaults (``dern``: the registered dern method's)."""
    if action == "merge":
        return dict(MERGE_OPTIONS)
    if action == "dern":
        return dict(get_method("dern").options)
    return {}


def check_action(action: str, options: Mapping | None, info, *, collapse_groups: bool = False) -> dict:
    """The complete options of a folding ``action`` (defaults filled in); ProfileError for an unknown
    action, an option it does not take, a bad value, or a model it cannot fold. Reads no weight."""
    if action not in PROFILE_ACTIONS:
        raise ProfileError(f"unknown --action {action!r}; choose one of {', '.join(PROFILE_ACTIONS)}")
    options = dict(options or {})
    defaults = action_defaults(action)
    foreign = sorted(set(options) - set(defaults))
    if foreign:
        takes = ", ".join(map(option_flag, defaults)) or "no option"
        raise ProfileError(f"--action {action} does not take {', '.join(map(option_flag, foreign))} (it takes {takes})")
    values = {**defaults, **options}
    if action == "merge":
        for key, allowed in (("similarity", MERGE_SIMILARITIES), ("router", ROUTER_MODES), ("router_rows", ROUTER_ROWS),
                             ("align", ("on", "off"))):
            if values[key] not in allowed:
                raise ProfileError(f"{option_flag(key)} must be one of {', '.join(allowed)} for --action merge, "
                                   f"got {values[key]!r}")
        if collapse_groups:
            raise ProfileError("--action merge keeps the model's group-limited routing (merged experts stay in their "
                               "routing group); leave out --collapse-groups")
    elif action == "dern":
        try:
            check_dern(info, ratio=0.5, **values)  # the options only; the profile's own budget is checked by the build
        except PlanError as exc:
            raise ProfileError(str(exc)) from None
    return values


def needed_entries(action: str, options: Mapping) -> tuple[str, ...]:
    """Statistics entries the folding action reads (the opt-in ``expert_mean_output`` for merge by output)."""
    if action == "merge":
        return _NEEDS[options["similarity"]]
    return _NEEDS.get(action, ())


def _layer_entries(stats, layer: int, names) -> dict[str, torch.Tensor]:
    entries = stats.layers[layer]
    missing = [name for name in names if name not in entries]
    if missing:
        raise ProfileError(f"the statistics lack {missing} (layer {layer}); build the profile without --stats so "
                           "that they are collected, or collect them with these observers")
    return {name: torch.as_tensor(entries[name]).to(torch.float64) for name in names}


def merge_similarity(stats, layer: int, similarity: str) -> torch.Tensor:
    """[E, E] similarity (higher = closer) of one layer: minus the Euclidean distance of the mean
    expert outputs (``output``), or M-SMoE's router-logit similarity (``router``)."""
    entries = _layer_entries(stats, layer, _NEEDS[similarity])
    if similarity == "output":
        features = mean_expert_outputs(entries)
        return -torch.cdist(features, features)
    return router_logit_similarity(entries)


def merge_clusters(similarity: torch.Tensor, kept: list[int], groups: list[list[int]], protected=()) -> list[list[int]]:
    """Clusters of one layer, each a kept expert followed by the dropped experts that join it: within
    each routing group (``groups``), every dropped expert joins its most similar kept expert of the
    group (ties: the lower index); protected experts absorb nobody. Ordered by their kept expert."""
    clusters = []
    for group in groups:
        dominants = [e for e in group if e in kept]
        others = [e for e in group if e not in kept]
        closed = [e for e in dominants if e in set(protected)]
        clusters.extend(assign_to_dominants(similarity, dominants, others, closed=closed).values())
    return sorted(clusters, key=lambda c: c[0])


def fold_merge(info, stats, plan: Plan, options: Mapping) -> dict[int, list]:
    """MoE layer -> [MergeExperts] folding every dropped expert of ``plan`` (a keep plan) into a kept one."""
    router = options["router"]
    clusters = {}
    for layer, kept in sorted(plan.layers.items()):
        similarity = merge_similarity(stats, layer, options["similarity"])
        clusters[layer] = merge_clusters(similarity, kept, routing_groups(info, layer, router),
                                         plan.protected.get(layer, ()))
    name = SimpleNamespace(name=f"{plan.method}+merge")
    merged = assemble_plan(info, stats, name, plan.budget.get("ratio"), clusters, plan.protected,
                           router=options["router"], router_rows=options["router_rows"],
                           align=SWITCHES[options["align"]], options=dict(options))
    return merged.actions


def fold_dern(info, stats, plan: Plan, options: Mapping) -> dict[int, list]:
    """MoE layer -> [RecombineNeurons] for the layers where DERN moved segments into ``plan``'s kept
    experts (one layer's experts resident at a time)."""
    actions = {}
    for layer, kept in tqdm(sorted(plan.layers.items()), desc="dern", leave=False,
                            disable=not logger.isEnabledFor(logging.INFO)):
        entries = _layer_entries(stats, layer, _NEEDS["dern"])
        importance = expert_importance(entries["soft_count"], entries["tokens"])
        experts = layer_weights(info, layer)
        mixes, counts = recombine_layer(experts, kept, importance, tau=options["tau"],
                                        gate_in_similarity=options["gate_in_similarity"],
                                        iterations=options["kmeans_iterations"], init=options["kmeans_init"])
        if mixes:
            actions[layer] = [RecombineNeurons(mixes)]
        logger.debug("dern: layer %d: %d of %d dropped segments migrated", layer, counts["segments_migrated"],
                     counts["segments_dropped"])
    return actions


def fold_actions(info, stats, plan: Plan, action: str, options: Mapping) -> dict[int, list]:
    """The folding actions of ``action`` for the keep plan ``plan`` (empty for ``drop``)."""
    if action == "merge":
        return fold_merge(info, stats, plan, options)
    if action == "dern":
        return fold_dern(info, stats, plan, options)
    return {}


def refuse_folded(profiles, what: str) -> None:
    """ProfileError if any of ``profiles`` folds its dropped experts (its actions were computed for its
    own kept set and budget, so they cannot be re-selected or combined)."""
    folded = [p.task for p in profiles if p.folds]
    if folded:
        raise ProfileError(
            f"profile(s) {', '.join(folded)} fold their dropped experts (--action "
            f"{'/'.join(sorted({p.action for p in profiles if p.folds}))}), with merges computed for their own kept "
            f"sets; {what} works on drop profiles only. Build the profile you want directly with `moeprune profile "
            "build --action merge|dern` (its budget, and its data: e.g. the mixed domains for general)"
        )
