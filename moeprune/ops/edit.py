"""An :class:`Edit`: everything one plan does to a model, as tensor recipes (no weight read yet).

Built by the ops (:mod:`moeprune.ops.experts`) from a plan and the family layout; evaluated by the
streaming writer (:func:`moeprune.write.write_edit`) or in memory (:func:`moeprune.ops.memory.apply_edit`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..layout import CheckpointLayout, family_layout, model_expert, model_tensor, split_layer_name
from .recipe import ExpertRef, Recipe, Ref


@dataclass
class Edit:
    """Recipes for every tensor a plan changes, plus the config and module attributes it sets.

    Attributes:
        tensors: full on-disk name -> recipe of the tensor that replaces it (same name, the shape may
            change; a name the checkpoint lacks is a new tensor). Tensors absent keep their value.
        experts: MoE layer -> its new routed experts, in order, each ``{canonical projection:
            recipe}`` (see :mod:`moeprune.layout`). The layer's old routed experts all go.
        config: config.json keys to set (every key old and new transformers read).
        attributes: in-memory module path -> attributes to set (``num_experts`` always; others only
            where the module has them, e.g. DeepSeek's ``num_group``/``topk_group``).
        optional: names in ``tensors`` that only some checkpoints' layers hold (DeepSeek-V4's correction
            bias and hash table: score-routed or hash-routed layers only); an executor skips such a
            recipe where the source lacks the tensor.
        dropped_layers: decoder layers removed whole. Every other key of the edit (tensor names,
            ``experts`` layers, attribute paths, the layers of ``config``'s moeprune section) uses the
            ORIGINAL numbering, as the plan does; the executors renumber the kept layers 0..L'-1 at the
            end (:meth:`renumber`), so no op has to know which other layers go.
    """

    tensors: dict[str, Recipe] = field(default_factory=dict)
    experts: dict[int, list[dict[str, Recipe]]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    attributes: dict[str, dict[str, Any]] = field(default_factory=dict)
    dropped_layers: set[int] = field(default_factory=set)
    optional: set[str] = field(default_factory=set)

    def update(self, other: Edit) -> None:
        """Merge another edit in (the other's entries win)."""
        self.tensors.update(other.tensors)
        self.experts.update(other.experts)
        self.config.update(other.config)
        for path, values in other.attributes.items():
            self.attributes.setdefault(path, {}).update(values)
        self.dropped_layers |= other.dropped_layers
        self.optional |= other.optional

    def new_index(self, layer: int) -> int | None:
        """Index of original decoder layer ``layer`` after the drops (None: it is dropped)."""
        if layer in self.dropped_layers:
            return None
        return layer - sum(1 for dropped in self.dropped_layers if dropped < layer)

    def renumber(self, name: str) -> str | None:
        """A full tensor name (or module path with a trailing part) after the layer drops: layers after
        a dropped one move down; None for a name inside a dropped layer; names outside layers unchanged.
        Layers past ``num_hidden_layers`` (DeepSeek-V3's multi-token-prediction layers) move down too."""
        parts = split_layer_name(name)  # head: model (Nemotron-H's backbone, a multimodal model_prefix on disk)
        if parts is None or not self.dropped_layers:
            return name
        _, layer, rest = parts
        new = self.new_index(layer)
        layer_list = name[: len(name) - len(rest) - len(str(layer)) - 2]  # model.layers (DBRX: transformer.blocks)
        return None if new is None else f"{layer_list}.{new}.{rest}"


class CheckpointSource:
    """Recipe sources read from a checkpoint (through its :class:`~moeprune.layout.CheckpointLayout`)."""

    def __init__(self, layout: CheckpointLayout):
        self.layout = layout
        self.checkpoint = layout.checkpoint

    def shape(self, ref: Ref) -> tuple[int, ...]:
        if isinstance(ref, ExpertRef):
            return self.layout.expert_shape(ref.layer, ref.expert, ref.proj)
        return tuple(self.checkpoint.shape(ref))

    def dtype(self, ref: Ref) -> torch.dtype:
        if isinstance(ref, ExpertRef):
            return self.layout.expert_dtype(ref.layer, ref.expert, ref.proj)
        return self.checkpoint.dtype(ref)

    def read(self, ref: Ref) -> torch.Tensor:
        if isinstance(ref, ExpertRef):
            return self.layout.read_expert(ref.layer, ref.expert, ref.proj)
        return self.checkpoint.get(ref)

    def read_rows(self, ref: Ref, rows: list[int]) -> torch.Tensor:
        if isinstance(ref, ExpertRef):
            return self.layout.read_expert_rows(ref.layer, ref.expert, ref.proj, rows)
        return self.checkpoint.get_rows(ref, rows)


class ModelSource:
    """Recipe sources read from a loaded model (on-disk names mapped to its parameters)."""

    def __init__(self, model, family):
        self.model = model
        self.family = family
        self.layout = family_layout(family)

    def read(self, ref: Ref) -> torch.Tensor:
        if isinstance(ref, ExpertRef):
            return model_expert(self.model, self.family, ref.layer, ref.expert)[ref.proj].detach()
        return model_tensor(self.model, self.layout.memory_name(ref)).detach()

    def shape(self, ref: Ref) -> tuple[int, ...]:
        return tuple(self.read(ref).shape)

    def dtype(self, ref: Ref) -> torch.dtype:
        return self.read(ref).dtype

    def read_rows(self, ref: Ref, rows: list[int]) -> torch.Tensor:
        tensor = self.read(ref)
        return tensor.index_select(0, torch.tensor(rows, dtype=torch.long, device=tensor.device))
