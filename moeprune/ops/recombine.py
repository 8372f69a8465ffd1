"""The ``recombine_neurons`` op (DERN): kept experts rebuilt from weighted neurons of the layer's experts.

A :class:`~moeprune.plan.actions.RecombineNeurons` action lists, per recombined expert, terms
``(source expert, source neuron, target neuron, weight)``. Neuron k is the coupled unit of
:func:`moeprune.units.neuron_unit` (gate row k, up row k, down column k, gate/up bias entry k), over
the canonical tensors of :mod:`moeprune.layout` (GPT-OSS's interleaved gate/up is handled there), so::

    gate_new[t, :] = sum over terms with target t of weight * gate_src[n, :]     (up, biases alike)
    down_new[:, t] = sum over terms with target t of weight * down_src[:, n]

The down bias (per output channel, not per neuron) stays the expert's own. Experts not listed keep
their weights; the expert count changes only through the plan's keep_experts, so the output is a
vanilla checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from . import register_op
from .edit import Edit
from .recipe import ExpertRef, Recipe, Source, Take

#: canonical projection -> the axis its neurons lie along (see :func:`moeprune.units.neuron_unit`)
NEURON_AXIS = {"gate": 0, "up": 0, "down": 1, "gate_bias": 0, "up_bias": 0}


@dataclass(frozen=True, eq=False)
class NeuronCombination(Recipe):
    """``out`` (shape and dtype of ``proj`` of expert ``expert``) with ``out.select(axis, t) = sum of
    weight * source.select(axis, n)`` over the terms; computed in float64, one source expert at a time."""

    layer: int
    expert: int
    proj: str
    sources: tuple[int, ...]
    neurons: tuple[int, ...]
    targets: tuple[int, ...]
    weights: tuple[float, ...]

    @property
    def axis(self) -> int:
        return NEURON_AXIS[self.proj]

    def shape(self, source: Source) -> tuple[int, ...]:
        return tuple(source.shape(ExpertRef(self.layer, self.expert, self.proj)))

    def dtype(self, source: Source) -> torch.dtype:
        return source.dtype(ExpertRef(self.layer, self.expert, self.proj))

    def refs(self) -> Iterator[ExpertRef]:
        for expert in sorted(set(self.sources)):
            yield ExpertRef(self.layer, expert, self.proj)

    def evaluate(self, source: Source) -> torch.Tensor:
        out = torch.zeros(self.shape(source), dtype=torch.float64)
        sources = torch.tensor(self.sources, dtype=torch.long)
        neurons = torch.tensor(self.neurons, dtype=torch.long)
        targets = torch.tensor(self.targets, dtype=torch.long)
        weights = torch.tensor(self.weights, dtype=torch.float64)
        view = [1] * out.dim()
        view[self.axis] = -1
        for ref in self.refs():
            mask = sources == ref.expert
            tensor = source.read(ref).to(device="cpu", dtype=torch.float64)
            picked = tensor.index_select(self.axis, neurons[mask]) * weights[mask].view(view)
            out.index_add_(self.axis, targets[mask], picked)
        return out.to(self.dtype(source))


def recombined_expert(layer: int, expert: int, projections, mix) -> dict[str, Recipe]:
    """The recipes of one recombined expert (``mix``: a :class:`~moeprune.plan.actions.NeuronMix`)."""
    return {
        proj: NeuronCombination(layer, expert, proj, mix.sources, mix.neurons, mix.targets, mix.weights)
        if proj in NEURON_AXIS else Take(ExpertRef(layer, expert, proj))
        for proj in projections
    }


@register_op("recombine_neurons")
def _recombine_edit(family, layer: int, action, plan) -> Edit:
    """The layer's new routed experts (its kept ones, in order): recombined where the action lists
    them, whole otherwise. Runs after keep_experts (which sets the router rows and counts)."""
    layout = family.layout
    kept = plan.layers.get(layer, range(plan.num_experts))
    edit = Edit()
    edit.experts[layer] = [
        recombined_expert(layer, e, layout.projections, action.experts[e]) if e in action.experts
        else {proj: Take(ExpertRef(layer, e, proj)) for proj in layout.projections}
        for e in kept
    ]
    return edit
