"""Weight matching: permute one expert's neurons onto a reference expert's before merging them.

Neuron k of a SwiGLU expert is row k of ``gate`` and ``up`` plus column k of ``down`` (plus entry k
of ``gate_bias``/``up_bias`` where the family has biases): permuting the neurons of an expert leaves
its function unchanged, but averaging two experts neuron by neuron is meaningless unless their
neurons correspond. Weight matching (Ainsworth et al., Git Re-Basin, ICLR 2023; M-SMoE's alignment)
finds the permutation P maximising

    sum_k < u_k(reference), u_{P(k)}(member) >

over permutations, u_k = [gate row k, up row k, down column k, gate_bias k, up_bias k] (the
concatenated features of neuron k, float64), by ``scipy.optimize.linear_sum_assignment``. For a
member that is a neuron-permuted copy of the reference the inner product is maximal exactly at the
true permutation (Cauchy-Schwarz), so merging it returns the reference.

Everything works on canonical experts (:mod:`moeprune.layout`: ``gate``/``up`` [I, H], ``down``
[H, I]), so fused, interleaved or transposed storage (GPT-OSS) is the layout room's business.

A permutation ``perm`` is in ``index_select`` form: the aligned member's neuron k is the member's
neuron ``perm[k]`` (this is what :class:`moeprune.plan.MergeCluster` stores, and what
:func:`permuted_recipes` applies to all of an expert's tensors at once).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from scipy.optimize import linear_sum_assignment

from ..layout import CheckpointLayout
from .recipe import ExpertRef, Recipe, Select, Take

#: Canonical tensors whose dim 0 runs over neurons; ``down`` runs over neurons along dim 1;
#: ``down_bias`` [H] has no neuron axis.
NEURON_ROWS = ("gate", "up", "gate_bias", "up_bias")


def neuron_axis(proj: str) -> int | None:
    """Axis of canonical tensor ``proj`` that runs over the expert's neurons (None: ``down_bias``)."""
    if proj == "down":
        return 1
    if proj in NEURON_ROWS:
        return 0
    if proj == "down_bias":
        return None
    raise ValueError(f"{proj!r} is not a canonical expert tensor")


def neuron_features(expert: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[I, D] float64: per neuron k, [gate row k, up row k, down column k] (+ its gate/up bias; no gate row
    for ungated experts, Nemotron-H's down(relu2(up x)))."""
    parts = [expert[proj].double() for proj in ("gate", "up") if proj in expert] + [expert["down"].double().T]
    for proj in ("gate_bias", "up_bias"):
        if proj in expert:
            parts.append(expert[proj].double()[:, None])
    return torch.cat(parts, dim=1)


def match_neurons(reference: Mapping[str, torch.Tensor], member: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """The permutation aligning ``member``'s neurons to ``reference``'s (``index_select`` form):
    the maximum of sum_k <u_k(reference), u_perm[k](member)> (linear_sum_assignment)."""
    ref, mem = neuron_features(reference), neuron_features(member)
    if ref.shape != mem.shape:
        raise ValueError(f"cannot align experts of shapes {tuple(mem.shape)} and {tuple(ref.shape)} (neurons x features)")
    rows, cols = linear_sum_assignment((ref @ mem.T).numpy(), maximize=True)
    perm = [0] * len(rows)
    for k, m in zip(rows.tolist(), cols.tolist()):
        perm[k] = m
    return tuple(perm)


def is_identity(perm: Sequence[int] | None) -> bool:
    return perm is None or all(k == p for k, p in enumerate(perm))


def permute_expert(expert: Mapping[str, torch.Tensor], perm: Sequence[int] | None) -> dict[str, torch.Tensor]:
    """``expert`` with its neurons permuted (every tensor consistently; ``perm`` in index_select form)."""
    if is_identity(perm):
        return dict(expert)
    index = torch.tensor(list(perm), dtype=torch.long)
    out = {}
    for proj, tensor in expert.items():
        axis = neuron_axis(proj)
        out[proj] = tensor if axis is None else tensor.index_select(axis, index.to(tensor.device))
    return out


def permuted_recipes(layer: int, expert: int, projections: Sequence[str],
                     perm: Sequence[int] | None) -> dict[str, Recipe]:
    """Recipes of routed expert ``expert`` of ``layer`` with its neurons permuted by ``perm``
    (identity: plain :class:`Take` of each projection)."""
    out: dict[str, Recipe] = {}
    for proj in projections:
        recipe: Recipe = Take(ExpertRef(layer, expert, proj))
        axis = neuron_axis(proj)
        if axis is not None and not is_identity(perm):
            recipe = Select(recipe, axis, tuple(perm))
        out[proj] = recipe
    return out


def read_canonical_expert(layout: CheckpointLayout, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """Every canonical tensor of one routed expert, read from a checkpoint."""
    return {proj: layout.read_expert(layer, expert, proj) for proj in layout.family.projections}


def align_cluster(layout: CheckpointLayout, layer: int, members: Sequence[int]) -> tuple[tuple[int, ...] | None, ...]:
    """Permutations aligning every member of a cluster to its FIRST member (its dominant expert),
    read from the checkpoint one member at a time; None where the alignment is the identity."""
    if len(members) < 2:
        return (None,) * len(members)
    reference = read_canonical_expert(layout, layer, members[0])
    perms: list[tuple[int, ...] | None] = [None]
    for member in members[1:]:
        perm = match_neurons(reference, read_canonical_expert(layout, layer, member))
        perms.append(None if is_identity(perm) else perm)
    layout.forget()
    return tuple(perms)
