"""The shape of a model's expert layers, as the planner and the scorers need it.

Produced by :func:`moeprune.arch.load_family` / ``Family.geometry(config)``; kept free of torch
modules so that plans can be validated before any weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MoEGeometry:
    """Facts about a checkpoint's routed-expert layers.

    Attributes:
        family: routers/ spec name (e.g. ``"mixtral"``).
        model_type: the config's ``model_type``.
        num_hidden_layers: decoder layers in the model.
        moe_layers: decoder-layer indices that hold routed experts (ascending).
        num_experts: routed experts per MoE layer (before pruning).
        top_k: experts selected per token.
        n_group: routing groups (1 when the router has no group limit).
        topk_group: groups a token may select experts from (1 when no group limit).
        min_experts_per_group: fewest experts a group may keep and still route (DeepSeek-V3 scores a
            group by the sum of its top-2 experts, so it needs 2; otherwise 1).
        has_shared_experts: the MoE block also runs always-on shared experts.
        routing: routing rule name (see ``moeprune.routing``).
        expert_width: intermediate size I of a routed expert (0 = unknown).
        experts_per_layer: MoE layer -> its routed-expert count, for layers that differ from
            ``num_experts`` (empty = every layer has ``num_experts``); see :meth:`experts_in`.
        expert_widths: MoE layer -> width of each of its experts, for layers whose experts differ
            from ``expert_width`` (empty = uniform); see :meth:`width_of`.
        num_attention_heads, num_key_value_heads: attention geometry (0 = unknown).
    """

    family: str
    model_type: str
    num_hidden_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    n_group: int = 1
    topk_group: int = 1
    min_experts_per_group: int = 1
    has_shared_experts: bool = False
    routing: str = "softmax_topk"
    expert_width: int = 0
    experts_per_layer: dict[int, int] = field(default_factory=dict, compare=False)
    expert_widths: dict[int, tuple[int, ...]] = field(default_factory=dict, compare=False)
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def grouped(self) -> bool:
        """True when routing is group-limited (experts must be pruned equally per group)."""
        return self.n_group > 1

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.n_group

    def group_of(self, expert: int) -> int:
        """Routing group of an expert (experts are laid out contiguously by group)."""
        return expert // self.experts_per_group

    def experts_in(self, layer: int) -> int:
        """Routed experts of MoE layer ``layer`` (``num_experts`` unless ``experts_per_layer`` says otherwise)."""
        return int(self.experts_per_layer.get(layer, self.num_experts))

    def width_of(self, layer: int, expert: int) -> int:
        """Intermediate width of one routed expert (``expert_width`` unless ``expert_widths`` says otherwise)."""
        widths = self.expert_widths.get(layer)
        return int(widths[expert]) if widths is not None else self.expert_width
