"""The merge op: clusters of routed experts become single experts (``merge_experts`` actions).

Cluster i of a layer (:class:`moeprune.plan.MergeCluster`: members, merge weights p_j, neuron
permutations P_j, dominant member first) becomes routed expert i, per canonical tensor

    W_i = sum_j p_j P_j(W_j) / sum_j p_j          (gate, up, down and the biases alike)

as :class:`~moeprune.ops.recipe.WeightedSum` recipes over :class:`~moeprune.ops.recipe.Select`
permutations (:mod:`moeprune.ops.align`), so the streaming writer and the in-memory executor compute
the same tensors. A singleton cluster is its member taken whole: a merge plan of singletons writes
exactly the checkpoint of the keep_experts plan that keeps those experts.

The router after a merge (``MergeExperts.router``):

* ``vanilla``: one router row per cluster, the dominant member's (``router_rows="dominant"``) or
  the merge-weighted mean of the members' rows (``"mean"``); router biases and DeepSeek's
  ``e_score_correction_bias`` likewise. The config's expert count becomes the number of clusters:
  a stock checkpoint that loads in vanilla transformers (per-layer counts that differ: the
  ``experts_per_layer`` section and ``moeprune.load``).
* ``exact``: the router keeps all E rows and routes exactly as the original model (top-k over the
  original E logits, its own gate weights); each selected original expert is then mapped to its
  cluster, so the gates of members selected together add up on their merged expert. This equals the
  original model whose cluster members all carry the merged weights. The mapping is the
  :data:`EXPERT_MAP` key of the config's ``moeprune`` section, ``{layer: [cluster of each original
  expert]}``; :func:`moeprune.load` realises it (the stock keys hold the merged count, so a vanilla
  ``from_pretrained`` fails loudly on the router's E rows).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from ..errors import MoePruneError
from ..layout import FamilyLayout, layer_prefix, model_experts_module, model_router_module, model_tensor, set_model_tensor
from ..plan import MergeCluster, MergeExperts, Plan
from ..structure import StructureHandler, register_structure
from .align import is_identity, permuted_recipes
from .edit import Edit
from .experts import renumber_id_tables
from .recipe import Concat, ExpertRef, Recipe, Select, Take, WeightedSum

logger = logging.getLogger(__name__)

#: ``moeprune`` config section key: per MoE layer, the cluster (merged expert) of each original expert,
#: for a merge with the exact router.
EXPERT_MAP = "expert_map"


def normalized_weights(cluster: MergeCluster) -> tuple[float, ...]:
    """p_j / sum p (the validation guarantees p_j >= 0 and sum p > 0)."""
    total = float(sum(cluster.weights))
    return tuple(float(w) / total for w in cluster.weights)


def merged_expert_recipes(layout: FamilyLayout, layer: int, cluster: MergeCluster) -> dict[str, Recipe]:
    """Recipes of the merged expert of ``cluster``: sum_j p_j P_j(W_j) / sum p per canonical tensor; a
    singleton without permutation is its member taken whole."""
    projections = layout.projections
    if len(cluster.members) == 1 and is_identity(cluster.permutations[0]):
        return {proj: Take(ExpertRef(layer, cluster.members[0], proj)) for proj in projections}
    parts = [permuted_recipes(layer, member, projections, perm)
             for member, perm in zip(cluster.members, cluster.permutations)]
    weights = normalized_weights(cluster)
    return {proj: WeightedSum(tuple((w, part[proj]) for w, part in zip(weights, parts))) for proj in projections}


def router_row_recipe(name: str, clusters: Sequence[MergeCluster], rows: str, axis: int = 0) -> Recipe:
    """Router tensor ``name`` (weight [E, H], bias or correction bias [E]; experts along ``axis``) with
    one row per cluster: the dominant (first) member's row, or the merge-weighted mean of the members' rows."""
    if rows == "dominant" or all(len(c.members) == 1 for c in clusters):
        return Select(Take(name), axis, tuple(c.members[0] for c in clusters))
    parts = []
    for cluster in clusters:
        if len(cluster.members) == 1:
            parts.append(Select(Take(name), axis, (cluster.members[0],)))
        else:
            parts.append(WeightedSum(tuple((w, Select(Take(name), axis, (m,)))
                                           for w, m in zip(normalized_weights(cluster), cluster.members))))
    return Concat(tuple(parts), axis)


def merge_experts(layout: FamilyLayout, layer: int, action: MergeExperts, *, collapse_groups: bool = False) -> Edit:
    """The edit merging the clusters of ``action`` in MoE layer ``layer`` (header facts only)."""
    edit = Edit()
    edit.experts[layer] = [merged_expert_recipes(layout, layer, cluster) for cluster in action.clusters]
    if action.router == "vanilla":
        for name in layout.router_keys(layer):
            edit.tensors[name] = router_row_recipe(name, action.clusters, action.router_rows, layout.router_axis(name))
        for name in layout.optional_router_keys(layer):  # where the layer has them (DeepSeek-V4's correction bias)
            edit.tensors[name] = router_row_recipe(name, action.clusters, action.router_rows, layout.router_axis(name))
            edit.optional.add(name)
        renumber_id_tables(edit, layout, layer, {m: i for i, c in enumerate(action.clusters) for m in c.members})
        attributes = {"num_experts": len(action.clusters)}
        if collapse_groups:
            attributes.update(num_group=1, topk_group=1)
        edit.attributes[layer_prefix(layer) + layout.router_modules] = attributes
    return edit


def merged_counts(plan: Plan) -> dict[int, int]:
    """Routed experts after the plan's merges, per merged layer (the number of clusters)."""
    return {layer: len(action.clusters) for layer, actions in sorted(plan.actions.items())
            for action in actions if isinstance(action, MergeExperts)}


def expert_map(plan: Plan) -> dict[str, list[int]]:
    """:data:`EXPERT_MAP` of the plan's exact-router merges: ``{"layer": [cluster of expert e, ...]}``."""
    out: dict[str, list[int]] = {}
    for layer, actions in sorted(plan.actions.items()):
        for action in actions:
            if isinstance(action, MergeExperts) and action.router == "exact":
                mapping = {m: i for i, cluster in enumerate(action.clusters) for m in cluster.members}
                out[str(layer)] = [mapping[e] for e in range(len(mapping))]
    return out


# --------------------------------------------------------------------------------------------------
# the exact router: every original logit, mapped to its cluster


class ExpertRemap:
    """Forward pre-hook of an experts module: maps the selected original experts (``top_k_index``,
    positional argument 1 or keyword) to their clusters; the gate weights are untouched, so members
    selected together add their gates on the merged expert."""

    def __init__(self, mapping: Sequence[int]):
        self.mapping = torch.tensor(list(mapping), dtype=torch.long)

    def __call__(self, module, args, kwargs):
        if "top_k_index" in kwargs:
            kwargs = {**kwargs, "top_k_index": self._map(kwargs["top_k_index"])}
        elif len(args) > 1:
            args = (args[0], self._map(args[1]), *args[2:])
        else:
            raise MoePruneError("the experts module was called without top_k_index; the exact router remap cannot run")
        return args, kwargs

    def _map(self, index: torch.Tensor) -> torch.Tensor:
        if self.mapping.device != index.device:
            self.mapping = self.mapping.to(index.device)
        return self.mapping[index]


_HOOK_ATTRIBUTE = "_moeprune_expert_remap"


def install_expert_map(model, family, value: Mapping[str, Sequence[int]]) -> None:
    """Route every listed layer through :class:`ExpertRemap` (replacing an earlier remap) after
    checking the model holds ``len(map)`` router rows and ``max(map) + 1`` experts."""
    for key, mapping in value.items():
        layer = int(key)
        experts = model_experts_module(model, family, layer)
        router = model_router_module(model, family, layer)
        clusters = max(mapping) + 1
        rows = model_tensor(model, family.layout.memory_name(family.layout.router_keys(layer)[0])).shape[0]
        if experts.num_experts != clusters or rows != len(mapping):
            raise MoePruneError(f"MoE layer {layer} holds {experts.num_experts} experts and {rows} router rows, but its "
                                f"expert map needs {clusters} and {len(mapping)}; the checkpoint's files do not match "
                                "its config")
        old = getattr(experts, _HOOK_ATTRIBUTE, None)
        if old is not None:
            old.remove()
        handle = experts.register_forward_pre_hook(ExpertRemap(mapping), with_kwargs=True)
        object.__setattr__(experts, _HOOK_ATTRIBUTE, handle)
        if hasattr(router, "num_experts"):
            router.num_experts = len(mapping)


def _prepare_expert_map(model, family, value) -> set[str]:
    """On the meta skeleton (built with the merged count): give each listed layer's router its E
    original rows; claim the layer's experts (read by :func:`_fill_expert_map`), so the router is
    read whole."""
    claimed: set[str] = set()
    names = set(model.state_dict())
    for key, mapping in value.items():
        layer = int(key)
        for disk_name in family.layout.router_keys(layer):
            name = family.layout.memory_name(disk_name)
            old = model_tensor(model, name)
            shape = list(old.shape)
            shape[family.layout.router_axis(disk_name)] = len(mapping)
            set_model_tensor(model, name, torch.empty(shape, dtype=old.dtype, device="meta"))
        router = model_router_module(model, family, layer)
        if hasattr(router, "num_experts"):
            router.num_experts = len(mapping)
        prefix = family.layout.memory_experts_prefix(layer)
        claimed |= {name for name in names if name.startswith(prefix)}
    return claimed


def _fill_expert_map(model, layout, value, dtype) -> set[str]:
    """Read the merged experts of each listed layer (every expert the files hold)."""
    filled: set[str] = set()
    for key in value:
        layer = int(key)
        prefix = layout.family.memory_experts_prefix(layer)
        state = layout.read_layer_experts(layer, range(layout.num_experts(layer)), dtype)
        for name, tensor in state.items():
            if name.startswith(prefix):
                set_model_tensor(model, name, tensor)
                filled.add(name)
        model_experts_module(model, layout.family.family, layer).num_experts = layout.num_experts(layer)
    return filled


register_structure(StructureHandler(EXPERT_MAP, prepare=_prepare_expert_map, fill=_fill_expert_map,
                                    finish=install_expert_map))
