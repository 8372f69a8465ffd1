"""LLM-Pruner first-order Taylor saliencies of the dense units, in the layer-by-layer backward pass.

:class:`TaylorCallback` is a :class:`~.backward.LayerGradientCallback` on every decoder layer that has
a dense unit (:mod:`moeprune.units`: KV groups with their query heads, dense-MLP channels, shared-expert
channels). Only those units' tensors require gradients (the routed experts' do not), so the pass
costs one more matmul per attention / dense-MLP / shared-expert weight and holds one layer's
gradients of them. When the layer is done, its parameters' ``.grad`` is dL/dW over the whole
calibration set (summed over the batches by autograd, in the pass's dtype), and each unit's score
sum |w * dL/dw| (:func:`moeprune.scoring.dense.taylor_unit_scores`) is stored as the entries of
:mod:`moeprune.observe.taylor` (float64). Nothing else is kept: the statistics are one number per
unit, but they do not merge across data shards (see that module).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops as _ops  # noqa: F401  (before units: units imports ops, whose neuron op imports units)
from ..errors import MoePruneError, PlanError
from ..layout import layer_prefix
from ..scoring.dense import taylor_unit_scores
from ..units import TensorSlice, Unit, channel_slices, channel_spec_and_width, check_attention, kv_group_unit, model_facts
from .backward import LayerGradientCallback


def unit_entries(family, facts) -> dict[str, str | None]:
    """The Taylor entries one decoder layer (its :class:`~moeprune.layout.LayerFacts`) has, each with
    its channel target (None: KV groups, where :func:`~moeprune.units.check_attention` accepts the
    attention)."""
    entries: dict[str, str | None] = {}
    try:
        check_attention(family, facts)
        entries["attn_taylor"] = None
    except PlanError:
        pass
    for entry, target in (("mlp_taylor", "dense_mlp"), ("shared_taylor", "shared_experts")):
        try:
            channel_spec_and_width(family, facts, target)
        except PlanError:
            continue
        entries[entry] = target
    return entries


def layer_units(family, facts) -> dict[str, list[Unit]]:
    """The units each Taylor entry of one decoder layer scores: its KV groups (with their query heads),
    or the channels of its dense MLP / shared expert (the slices of :func:`~moeprune.units.channel_unit`,
    built at once)."""
    out: dict[str, list[Unit]] = {}
    for entry, target in unit_entries(family, facts).items():
        if target is None:
            out[entry] = [kv_group_unit(family, facts, g) for g in range(facts.attention.kv_heads)]
            continue
        _, width = channel_spec_and_width(family, facts, target)
        every = channel_slices(family, facts, target, range(width))
        out[entry] = [Unit("channel", facts.layer, tuple(TensorSlice(s.ref, s.dim, (c,)) for s in every)) for c in range(width)]
    return out


class TaylorCallback(LayerGradientCallback):
    """Computes the ``taylor`` entries of every layer with dense units (``results[layer]``)."""

    weight_grads = True

    def __init__(self, family, config):
        self.family = family
        self.facts = {layer: facts for layer, facts in model_facts(family, config).items() if unit_entries(family, facts)}
        self.results: dict[int, dict[str, torch.Tensor]] = {}
        self._current: tuple[int, dict[str, list[Unit]]] | None = None

    def needs_layer(self, index: int) -> bool:
        return index in self.facts

    def units(self, index: int) -> dict[str, list[Unit]]:
        """:func:`layer_units` of layer ``index`` (built when the layer is reached, one layer's kept)."""
        if self._current is None or self._current[0] != index:
            self._current = (index, layer_units(self.family, self.facts[index]))
        return self._current[1]

    def _names(self, index: int) -> set[str]:
        """On-disk names (= in-memory names, :func:`~moeprune.layout.layer_prefix`) of the layer's unit tensors."""
        return {piece.ref for units in self.units(index).values() for unit in units for piece in unit.slices}

    def weight_grad_parameters(self, index: int, layer: nn.Module) -> set[str]:
        prefix = layer_prefix(index)
        return {name.removeprefix(prefix) for name in self._names(index)}

    def end_layer(self, index: int, layer: nn.Module) -> None:
        prefix = layer_prefix(index)
        parameters = dict(layer.named_parameters())
        weights, grads = {}, {}
        for name in self._names(index):
            parameter = parameters.get(name.removeprefix(prefix))
            if parameter is None:
                raise MoePruneError(f"layer {index} has no parameter {name.removeprefix(prefix)}: the Taylor pass needs the "
                                    "checkpoint's tensor names to be the module's")
            weights[name] = parameter.detach()
            grads[name] = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
        entries = {entry: taylor_unit_scores(weights, grads, units) for entry, units in self.units(index).items()}
        if "shared_taylor" in entries:  # [1, I_s], as the other shared-expert entries ([S, ...])
            entries["shared_taylor"] = entries["shared_taylor"].reshape(1, -1)
        self.results[index] = entries
        self._current = None
        for parameter in parameters.values():
            parameter.grad = None
