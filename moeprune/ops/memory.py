"""The in-memory executor: apply an :class:`~moeprune.ops.edit.Edit` to a loaded model.

Evaluates the same recipes as the streaming writer (:mod:`moeprune.write`) against the model's own
parameters (:class:`~moeprune.ops.edit.ModelSource`), then swaps the results in: named tensors by
their in-memory name, routed experts fused as the family keeps them in memory
(:func:`moeprune.layout.set_expert_block`), then drops whole layers. Every recipe is evaluated
before anything is replaced, so a recipe may read a tensor another one replaces.
"""

from __future__ import annotations

from torch import nn

from ..arch import config_value, set_config_value
from ..compact import needs_compact, set_compact_experts
from ..layout import family_layout, set_expert_block, set_model_tensor
from ..structure import HANDLERS, SECTION, ordered_keys
from .edit import Edit, ModelSource


def apply_edit(model: nn.Module, family, edit: Edit) -> nn.Module:
    """Apply ``edit`` to ``model`` in place (tensors, expert blocks, module attributes, config); returns it."""
    layout = family_layout(family)
    source = ModelSource(model, family)
    held = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    tensors = {name: recipe.evaluate(source) for name, recipe in edit.tensors.items()
               if name not in edit.optional or layout.memory_name(name) in held}  # optional: where the model has it
    blocks = {
        layer: [{proj: recipe.evaluate(source) for proj, recipe in expert.items()} for expert in experts]
        for layer, experts in edit.experts.items()
    }
    for name, tensor in tensors.items():
        set_model_tensor(model, layout.memory_name(name), tensor.contiguous())
    for layer, experts in blocks.items():
        if needs_compact(experts):  # per-expert widths (neuron slicing), or a width grouped_mm cannot run
            set_compact_experts(model, family, layer, experts)
        else:
            set_expert_block(model, family, layer, experts)
    set_attributes(model, edit.attributes)
    drop_layers(model, edit.dropped_layers)
    set_config(model.config, edit.config)
    finish_structure(model, family, edit.config.get(SECTION) or {})
    return model


def finish_structure(model: nn.Module, family, section: dict) -> None:
    """Run the finishing step of each key of a ``moeprune`` config section the edit sets (e.g. the
    exact router's expert map), so the edited model behaves as ``moeprune.load`` of its output."""
    values = {key: value for key, value in section.items() if key != "format"}
    for key in ordered_keys(values):
        if HANDLERS[key].finish is not None:
            HANDLERS[key].finish(model, family, values[key])


def drop_layers(model: nn.Module, dropped: set[int]) -> None:
    """Remove decoder layers ``dropped`` (original numbering) and renumber every ``layer_idx`` (the
    cache index of attention / Mamba modules) of the kept ones."""
    if not dropped:
        return
    kept = [layer for index, layer in enumerate(model.model.layers) if index not in dropped]
    model.model.layers = nn.ModuleList(kept)
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index


def set_config(config, values: dict) -> None:
    """Set on a loaded model's ``config`` every key of ``values`` that differs."""
    before = config.to_dict()
    for key, value in values.items():
        if config_value(before, key) != value:
            set_config_value(config, key, value)  # a dotted key: in its sub-config (DBRX's ffn_config)


def set_attributes(model: nn.Module, attributes: dict[str, dict]) -> None:
    """Set module attributes (module path -> {attribute: value}); ``num_experts`` always, any other
    only where the module has it (DeepSeek routers' ``num_group``/``topk_group``)."""
    for path, values in attributes.items():
        module = model.get_submodule(path)
        for attribute, value in values.items():
            if attribute == "num_experts" or hasattr(module, attribute):
                setattr(module, attribute, value)
