"""Placement of one decoder layer that does not fit one device: its routed experts spread over
several devices (expert parallel within the layer), the rest of the layer on the main device.

The sequential engine keeps one decoder layer resident. When that layer's bytes exceed the main
device's budget, :func:`place_layer` cuts the routed experts into contiguous ranges, filling the
devices in order (the main device first, after the layer's other weights), and the layer runs with
:func:`sharded_grouped_mm_pairs`: the (token, expert) pairs are sorted by expert exactly as
transformers' ``grouped_mm`` experts forward sorts them, so each device's experts own one contiguous
block of pairs; for each of the two grouped linear layers, each block goes to its device, through that
device's slice of the fused weights, and comes back in the same order (the activation runs once over
every pair on the main device). Every expert computes on exactly the rows it computes on in the
unsplit layer, so the layer's output and statistics are those of the unsplit ``grouped_mm`` forward
(a split layer always runs that forward, also when the model is configured for ``eager`` experts).

Budgets: on CUDA, 80% of each device's free memory (:func:`cuda_budgets`); the CPU is never split
unless budgets are given (tests use fake small ones). Data-parallel ranks never split over other
ranks' GPUs: a rank places its layer on its own device only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import MethodType

import torch
from torch import nn

from ..errors import MoePruneError
from ..observe import RoutedPairs

logger = logging.getLogger(__name__)

#: Share of a CUDA device's free memory a layer may take (the rest: activations, kernels' workspace).
CUDA_BUDGET_FRACTION = 0.8
#: Attribute of an experts module whose routed experts are split (a list of :class:`ExpertShard`).
SHARDS_ATTRIBUTE = "moeprune_expert_shards"


@dataclass
class ExpertShard:
    """Routed experts ``start`` .. ``stop - 1`` of a layer on ``device``; ``weights`` holds their
    slices of the experts module's fused parameters (name -> tensor [stop - start, ...])."""

    device: torch.device
    start: int
    stop: int
    weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class LayerPlacement:
    """Where one decoder layer runs: everything on ``main`` unless ``shards`` split its experts."""

    main: torch.device
    shards: tuple[ExpertShard, ...] = ()

    @property
    def split(self) -> bool:
        return bool(self.shards)


def place_layer(rest_bytes: int, expert_bytes: int, num_experts: int, devices: Sequence[torch.device],
                budgets: Sequence[int]) -> LayerPlacement:
    """Placement of a layer of ``rest_bytes`` (attention, norms, router, shared experts) plus
    ``num_experts`` routed experts of ``expert_bytes`` each on ``devices`` with byte ``budgets``.

    The whole layer on ``devices[0]`` when it fits its budget; otherwise the experts in contiguous
    ranges, greedily: device 0 takes as many as fit after ``rest_bytes``, then device 1, and so on.
    A MoePruneError when even all devices together cannot hold the layer.
    """
    if not devices or len(devices) != len(budgets):
        raise ValueError("give one budget per device, and at least one device")
    main = torch.device(devices[0])
    if rest_bytes + num_experts * expert_bytes <= budgets[0]:
        return LayerPlacement(main)
    shards, start = [], 0
    for index, (device, budget) in enumerate(zip(devices, budgets)):
        room = budget - (rest_bytes if index == 0 else 0)
        count = min(num_experts - start, max(room, 0) // max(expert_bytes, 1))
        if count > 0:
            shards.append(ExpertShard(torch.device(device), start, start + count))
            start += count
        if start == num_experts:
            return LayerPlacement(main, tuple(shards))
    gib = 2**30
    raise MoePruneError(
        f"one decoder layer needs {(rest_bytes + num_experts * expert_bytes) / gib:.2f} GiB "
        f"({num_experts} experts of {expert_bytes / gib:.3f} GiB), more than the "
        f"{sum(budgets) / gib:.2f} GiB the device(s) {', '.join(map(str, devices))} can hold; "
        "use more devices, a smaller --dtype, or --device cpu"
    )


def cuda_budgets(devices: Sequence[torch.device]) -> list[int]:
    """:data:`CUDA_BUDGET_FRACTION` of each CUDA device's free memory (free on the device plus what
    torch's caching allocator holds unused), in bytes."""
    budgets = []
    for device in devices:
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budgets.append(int(free * CUDA_BUDGET_FRACTION))
    return budgets


def node_devices(main: torch.device, data_parallel: bool) -> list[torch.device]:
    """The devices a layer may spread over: ``main`` first, then, on CUDA and outside a
    data-parallel pass, every other visible CUDA device."""
    if main.type != "cuda" or data_parallel:
        return [main]
    others = [torch.device("cuda", i) for i in range(torch.cuda.device_count()) if i != (main.index or 0)]
    return [torch.device("cuda", main.index or 0), *others]


def module_path(root: nn.Module, module: nn.Module) -> str:
    """Dotted name of ``module`` inside ``root``."""
    for name, candidate in root.named_modules():
        if candidate is module:
            return name
    raise ValueError("module is not inside root")


def layer_bytes(layer: nn.Module, experts: nn.Module, num_experts: int) -> tuple[int, int]:
    """(bytes of everything but the routed experts, bytes of one routed expert) of a loaded layer."""
    expert_params = {id(p) for p in experts.parameters(recurse=False)}
    rest = sum(t.numel() * t.element_size() for t in [*layer.parameters(), *layer.buffers()]
               if id(t) not in expert_params)
    fused = sum(p.numel() * p.element_size() for p in experts.parameters(recurse=False))
    return rest, fused // max(num_experts, 1)


def module_shard(experts: nn.Module) -> ExpertShard:
    """The experts module's own fused parameters as one shard holding every expert."""
    weights = dict(experts.named_parameters(recurse=False))
    device = next(iter(weights.values())).device
    return ExpertShard(device, 0, experts.num_experts, weights)


def experts_shards(experts: nn.Module) -> list[ExpertShard]:
    """The shards an experts module computes with: its split ones, else itself as one shard."""
    return getattr(experts, SHARDS_ATTRIBUTE, None) or [module_shard(experts)]


def layer_placement(layer: nn.Module, experts: nn.Module, devices: Sequence[torch.device],
                    budgets: Sequence[int] | None) -> LayerPlacement:
    """Placement of a loaded MoE layer on ``devices`` (the main one first): with ``budgets`` given,
    :func:`place_layer` on them; else on CUDA with the devices' free memory; else (CPU) unsplit."""
    devices = [torch.device(d) for d in devices]
    if budgets is None and devices[0].type != "cuda":
        return LayerPlacement(devices[0])
    rest, per_expert = layer_bytes(layer, experts, experts.num_experts)
    if budgets is None:  # the other GPUs are asked (a CUDA context each) only when the main one is too small
        main_budget = cuda_budgets(devices[:1])[0]
        fits = rest + experts.num_experts * per_expert <= main_budget
        budgets = [main_budget, *([0] * (len(devices) - 1) if fits else cuda_budgets(devices[1:]))]
    placement = place_layer(rest, per_expert, experts.num_experts, devices, budgets)
    if placement.split:
        logger.info("layer does not fit %s: its %d experts split over %s", devices[0], experts.num_experts,
                    ", ".join(f"{s.device} [{s.start}, {s.stop})" for s in placement.shards))
    return placement


def split_experts(layer: nn.Module, experts: nn.Module, placement: LayerPlacement) -> None:
    """Move a loaded (CPU) layer to its placement: the routed experts' fused parameters sliced over
    the shards' devices, the rest of the layer on the main device; the experts module then runs
    :func:`sharded_grouped_mm_pairs` (also when nothing instruments it)."""
    names = [name for name, _ in experts.named_parameters(recurse=False)]
    shards = [ExpertShard(s.device, s.start, s.stop,
                          {name: getattr(experts, name).detach()[s.start:s.stop].to(s.device) for name in names})
              for s in placement.shards]
    for name in names:
        del experts._parameters[name]
    layer.to(placement.main)
    setattr(experts, SHARDS_ATTRIBUTE, shards)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return sharded_grouped_mm_pairs(self, shards, hidden_states, top_k_index, top_k_weights)[0]

    experts.forward = MethodType(forward, experts)


def release_experts(experts: nn.Module) -> None:
    """Drop a split layer's expert shards (and the forward that reads them)."""
    experts.__dict__.pop(SHARDS_ATTRIBUTE, None)
    experts.__dict__.pop("forward", None)


def sharded_grouped_mm_pairs(experts: nn.Module, shards: Sequence[ExpertShard], hidden_states, top_k_index,
                             top_k_weights):
    """transformers' ``grouped_mm`` experts forward with the experts spread over ``shards``
    (contiguous expert ranges covering every expert), also returning the routed pairs.

    Step for step the single-device forward: the pairs sorted by expert; for each of the two grouped
    linear layers, each shard's contiguous block of pairs through its own weights on its own device
    (offsets relative to the block) and the blocks concatenated back in order; the activation, the
    gate weights and the per-token sum on the input's device.
    """
    from transformers.integrations.moe import _grouped_linear

    num_top_k = top_k_index.size(-1)
    num_tokens, hidden_dim = hidden_states.shape
    sample_weights = top_k_weights.reshape(-1)
    expert_ids = top_k_index.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    selected = hidden_states[perm // num_top_k]
    sample_weights_g = sample_weights[perm]
    device = hidden_states.device
    histc_input = expert_ids_g.float() if device.type in ("cpu", "mps") else expert_ids_g.int()
    tokens_per_expert = torch.histc(histc_input, bins=experts.num_experts, min=0, max=experts.num_experts - 1)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
    up_name = "gate_up_proj" if experts.has_gate else "up_proj"
    blocks = []  # (shard, rows begin, rows end, offsets relative to the block, local expert ids)
    for shard in shards:
        begin = int(offsets[shard.start - 1]) if shard.start else 0
        end = int(offsets[shard.stop - 1])
        if end > begin:
            blocks.append((shard, begin, end, (offsets[shard.start:shard.stop] - begin).to(shard.device),
                           (expert_ids_g[begin:end] - shard.start).to(shard.device)))

    def project(name, inputs):
        """One grouped linear layer, block by block on the blocks' devices, concatenated back in order."""
        out = []
        for (shard, begin, end, local_offsets, local_ids), rows in zip(blocks, inputs):
            bias = shard.weights[f"{name}_bias"][local_ids] if experts.has_bias else None
            out.append(_grouped_linear(rows.to(shard.device), shard.weights[name], local_offsets, bias=bias,
                                       is_transposed=experts.is_transposed).to(device))
        return out[0] if len(out) == 1 else torch.cat(out)

    # the activation runs once over every pair, on the input's device, as in the unsplit forward (a
    # CPU's vectorised exp/sigmoid can round the last elements of a shorter tensor differently)
    proj = project(up_name, [selected[begin:end] for _, begin, end, _, _ in blocks])
    proj = experts._apply_gate(proj) if experts.has_gate else experts.act_fn(proj)
    intermediate = proj
    proj = project("down_proj", [proj[begin:end] for _, begin, end, _, _ in blocks])
    if experts.has_post_expert_norm:
        proj = experts.post_expert_norm(proj)
    weighted = proj * sample_weights_g.unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=device)
    final = weighted[inv_perm].view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)
    return final, RoutedPairs(perm // num_top_k, expert_ids_g, sample_weights_g, proj, intermediate)
