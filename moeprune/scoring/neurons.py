"""Neuron ("atomic expert") scorers: one score per intermediate neuron of every routed expert.

Neuron k of routed expert j is gate row k, up row k and down column k (:func:`moeprune.units.neuron_unit`).
A neuron scorer is a pure function::

    fn(layer_stats, *, layer, seed, weights: NeuronWeights, **_) -> Tensor[E, I]  (float64)

``layer_stats``: one MoE layer's statistics (:mod:`moeprune.stats`, with the ``neurons`` observer's
entries, :mod:`moeprune.observe.neurons`); ``weights``: the down-projection column norms the planner
reads from the checkpoint (:class:`NeuronWeights`). **Higher means more important** (kept first).
Scores of routed experts are ``>= 0``; every neuron of an expert with no routed token scores
:data:`UNROUTED` (-1), strictly below every routed neuron, so unused experts are sliced first.
Scorers ignore keyword options they do not take (``**_``), so one planner passes the same options
(``rho``) to all of them. Formulas and papers: docs/methods.md ("camera-p", "wanda-neurons").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import StatsError
from . import _entry, _layer_seed

#: Score of every neuron of an expert that received no routed token (below every routed neuron).
UNROUTED = -1.0
#: CAMERA-P's default mix of the max and the sum (the shipped script's rho).
DEFAULT_RHO = 0.9


@dataclass(frozen=True)
class NeuronWeights:
    """Per-neuron facts of one MoE layer's routed experts, read from the checkpoint's down projections.

    Attributes:
        down_sq_norm: [E, I] ||W_down[:, k]||_2^2 of neuron k of expert j (float64).
        down_l1: [E, I] ||W_down[:, k]||_1 (float64).
    """

    down_sq_norm: torch.Tensor
    down_l1: torch.Tensor

    @classmethod
    def of_down(cls, downs: list[torch.Tensor]) -> NeuronWeights:
        """From each expert's canonical down projection [H, I] (column k = neuron k), in expert order."""
        columns = torch.stack([d.detach().to(torch.float64) for d in downs])  # [E, H, I]
        return cls(columns.square().sum(dim=1), columns.abs().sum(dim=1))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.down_sq_norm.shape)


def _routed(stats: Mapping[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    """[E, 1] True for experts with routed tokens (all True when the statistics lack ``frequency``)."""
    if "frequency" not in stats:
        return torch.ones(shape[0], 1, dtype=torch.bool)
    frequency = _entry(stats, "frequency")
    if frequency.shape != (shape[0],):
        raise StatsError(f"frequency has shape {tuple(frequency.shape)} but the checkpoint has {shape[0]} experts; "
                         "the statistics belong to another model, re-run `moeprune collect`")
    return (frequency > 0)[:, None]


def _neuron_entry(stats: Mapping[str, torch.Tensor], name: str, shape: tuple[int, int]) -> torch.Tensor:
    """One [E, I] neuron statistic, float64, checked against the checkpoint's experts."""
    value = _entry(stats, name)
    if tuple(value.shape) != tuple(shape):
        raise StatsError(f"{name} has shape {list(value.shape)} but the checkpoint's experts are {list(shape)} "
                         "(experts x neurons); the statistics belong to another model, re-run `moeprune collect`")
    return value


def _unrouted_lowest(scores: torch.Tensor, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``scores`` with every neuron of an unrouted expert set to :data:`UNROUTED`."""
    return torch.where(_routed(stats, tuple(scores.shape)), scores, torch.full_like(scores, UNROUTED))


def camera_p_scores(stats: Mapping[str, torch.Tensor], *, weights: NeuronWeights, rho: float = DEFAULT_RHO,
                    **_) -> torch.Tensor:
    """CAMERA-P: score_jk = ||W_down[:,k]||^2 ((1 - rho) sum_t (g_j h_k)^2 + rho max_t (g_j h_k)^2).

    Sum and max over the calibration tokens, with g_j(t) = 0 where expert j is not selected (so a
    rarely routed expert's neurons score low). rho = 0.9 as in the CAMERA reference script
    ("CAMERA: Multi-Matrix Joint Compression for MoE Models via Micro-Expert Redundancy Analysis",
    AAAI 2026, https://arxiv.org/abs/2508.02322).
    """
    rho = float(rho)
    if not 0.0 <= rho <= 1.0:
        raise StatsError(f"rho must be in [0, 1], got {rho}")
    shape = weights.shape
    energy = (1.0 - rho) * _neuron_entry(stats, "neuron_gh2_sum", shape) + rho * _neuron_entry(stats, "neuron_gh2_max", shape)
    return _unrouted_lowest(weights.down_sq_norm * energy, stats)


def wanda_neuron_scores(stats: Mapping[str, torch.Tensor], *, weights: NeuronWeights, **_) -> torch.Tensor:
    """Wanda-style: score_jk = ||W_down[:,k]||_1 * sqrt(sum over routed tokens of (g_j h_k)^2).

    Wanda's |weight| x input-activation norm ("A Simple and Effective Pruning Approach for Large
    Language Models", ICLR 2024, https://arxiv.org/abs/2306.11695), taken per neuron of a routed
    expert: the down projection's column k sees the gate-weighted input g_j h_k.
    """
    shape = weights.shape
    return _unrouted_lowest(weights.down_l1 * _neuron_entry(stats, "neuron_gh2_sum", shape).sqrt(), stats)


def random_neuron_scores(stats: Mapping[str, torch.Tensor], *, weights: NeuronWeights, seed: int = 0, layer: int = 0,
                         **_) -> torch.Tensor:
    """Random neurons: score_jk = 1 - u_jk, u_jk ~ U[0, 1), from a generator seeded by (seed, layer).

    The same per-layer seed as the random expert baseline (:func:`moeprune.scoring.random_scores`);
    unrouted experts lowest when the statistics hold ``frequency``.
    """
    generator = torch.Generator(device="cpu").manual_seed(_layer_seed(seed, layer))
    draws = 1.0 - torch.rand(weights.shape, generator=generator, dtype=torch.float64)
    return _unrouted_lowest(draws, stats)
