"""Coupled units: what must change together when one expert, one neuron, one KV group or one layer goes.

Defined once, over the canonical tensors of :mod:`moeprune.layout` (``gate``/``up`` [I, H], ``down``
[H, I], biases) and full on-disk names, so that every op (and every scorer that needs the groups)
agrees on them whatever the family's storage:

* expert j of layer L: its canonical projections (and biases), whole, plus row j of every router
  tensor (weight, bias, ``e_score_correction_bias``);
* neuron k of expert j: gate row k, up row k, down column k, and gate/up bias entry k (the down bias
  is per output channel, not per neuron). :func:`locate_in_block` maps it into a fused block: on
  GPT-OSS (interleaved, transposed) gate_up_proj[j, :, 2k] and [j, :, 2k+1], down_proj[j, k, :],
  gate_up_proj_bias[j, 2k] and [j, 2k+1];
* a KV group and a decoder layer are declared; the KV group needs attention keys the routers/ specs
  do not have yet (refused with "not implemented yet").
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PlanError
from .layout import CheckpointLayout, FusedFormat, family_layout, layer_of
from .ops.recipe import ExpertRef, Ref


@dataclass(frozen=True)
class TensorSlice:
    """Entries ``index`` along ``dim`` of tensor ``ref``; the whole tensor when ``dim`` is None."""

    ref: Ref
    dim: int | None = None
    index: tuple[int, ...] = ()


@dataclass(frozen=True)
class Unit:
    """A coupled group of tensor slices that an op must remove (or merge) together."""

    kind: str
    layer: int
    slices: tuple[TensorSlice, ...]


def expert_unit(family, layer: int, expert: int) -> Unit:
    """Expert ``expert`` of MoE layer ``layer``: its canonical tensors whole and its router rows."""
    layout = family_layout(family)
    slices = [TensorSlice(ExpertRef(layer, expert, proj)) for proj in layout.projections]
    slices += [TensorSlice(name, 0, (expert,)) for name in layout.router_keys(layer)]
    return Unit("expert", layer, tuple(slices))


def neuron_unit(family, layer: int, expert: int, neuron: int) -> Unit:
    """Neuron ``neuron`` of expert ``expert``: gate row, up row, down column, gate/up bias entries."""
    layout = family_layout(family)
    slices = [
        TensorSlice(ExpertRef(layer, expert, "gate"), 0, (neuron,)),
        TensorSlice(ExpertRef(layer, expert, "up"), 0, (neuron,)),
        TensorSlice(ExpertRef(layer, expert, "down"), 1, (neuron,)),
    ]
    if layout.memory.has_biases:
        slices += [TensorSlice(ExpertRef(layer, expert, "gate_bias"), 0, (neuron,)),
                   TensorSlice(ExpertRef(layer, expert, "up_bias"), 0, (neuron,))]
    return Unit("neuron", layer, tuple(slices))


@dataclass(frozen=True)
class BlockEntry:
    """Where a canonical slice lies in a fused block: ``tensor[expert]`` along ``axis`` (an axis of
    the block tensor, expert axis 0 included) at ``positions``."""

    tensor: str
    expert: int
    axis: int
    positions: tuple[int, ...]


def locate_in_block(fmt: FusedFormat, piece: TensorSlice, width: int) -> BlockEntry:
    """Block coordinates of a neuron slice of a canonical expert tensor (``width`` = its I)."""
    ref = piece.ref
    if not isinstance(ref, ExpertRef) or piece.dim is None:
        raise ValueError("only slices of one expert's canonical tensors along one dim can be located")
    neurons = list(piece.index)
    if ref.proj in ("gate", "up") and piece.dim == 0:
        return BlockEntry(fmt.gate_up, ref.expert, fmt.gate_up_neuron_axis,
                          tuple(fmt.gate_up_positions(ref.proj, neurons, width)))
    if ref.proj == "down" and piece.dim == 1:
        return BlockEntry(fmt.down, ref.expert, fmt.down_neuron_axis, tuple(neurons))
    if ref.proj in ("gate_bias", "up_bias") and fmt.has_biases:
        return BlockEntry(fmt.gate_up_bias, ref.expert, 1,
                          tuple(fmt.gate_up_positions(ref.proj.removesuffix("_bias"), neurons, width)))
    raise ValueError(f"cannot locate a slice of {ref.proj} along dim {piece.dim} in a fused block")


def kv_group_unit(family, layer: int, group: int) -> Unit:
    """KV group ``group`` of layer ``layer`` (its k/v rows, its query heads' q rows and o columns).

    Declared only: the routers/ specs have no attention keys yet, so this always refuses.
    """
    name = getattr(family, "name", family)
    raise PlanError(f"KV-group units are not implemented yet: routers/{name}.toml has no [attention] keys "
                    "(q/k/v/o names, head dim, GQA layout)")


def layer_unit(layout: CheckpointLayout, layer: int) -> Unit:
    """Decoder layer ``layer``: every tensor stored under ``model.layers.<layer>.``, whole."""
    names = [name for name in layout.checkpoint.keys() if layer_of(name) == layer]
    if not names:
        raise PlanError(f"the checkpoint has no decoder layer {layer}")
    return Unit("layer", layer, tuple(TensorSlice(name) for name in names))
