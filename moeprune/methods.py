"""Compression methods in one registry, so comparisons (the quality sweep, the main job) pick up
every method by themselves.

A :class:`CompressionMethod` turns a dense in-memory model, its calibration statistics and a
fraction of experts to remove into a compressed in-memory model plus the plan that describes it.
Every scorer registered in :mod:`moeprune.scoring` is a *drop* method here automatically (score,
select per layer at the budget with the same super-expert protection as ``moeprune prune``, then
:func:`moeprune.apply.apply_plan_in_memory`). Actions that are not drops (merging, neuron
recombination) register with :func:`register_method` and join every comparison without edits.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .errors import PlanError
from .plan import Plan
from .stats import RouterStats

CompressFn = Callable[..., tuple[nn.Module, Plan]]


@dataclass(frozen=True)
class CompressionMethod:
    """A registered way to remove a fraction of each MoE layer's experts.

    Attributes:
        name: method name (a scorer name for drop methods).
        kind: ``"drop"`` for scorer-driven expert dropping; other actions name themselves.
        compress: ``compress(model, model_dir, stats, *, ratio, seed, protect_super_experts)``
            returns ``(compressed model, plan)``; it never modifies ``model``.
        stochastic: results depend on ``seed`` (comparisons average several seeds).
        description: one line for tables and help texts.
    """

    name: str
    kind: str
    compress: CompressFn
    stochastic: bool = False
    description: str = ""


_REGISTERED: dict[str, CompressionMethod] = {}


def register_method(method: CompressionMethod) -> CompressionMethod:
    """Add a non-drop compression method (drop methods come from the scorer registry)."""
    from .scoring import SCORERS

    if method.name in _REGISTERED or method.name in SCORERS:
        raise ValueError(f"compression method {method.name!r} is already registered")
    _REGISTERED[method.name] = method
    return method


def _drop_method(scorer_name: str) -> CompressionMethod:
    from .scoring import SCORERS

    scorer = SCORERS[scorer_name]

    def compress(model: nn.Module, model_dir: str | Path, stats: RouterStats | None, *, ratio: float, seed: int = 0,
                 protect_super_experts: bool = True) -> tuple[nn.Module, Plan]:
        from .api import plan_pruning
        from .apply import apply_plan_in_memory

        plan = plan_pruning(model_dir, method=scorer_name, ratio=ratio, stats=stats, seed=seed,
                            protect_super_experts=protect_super_experts)
        return apply_plan_in_memory(copy.deepcopy(model), plan), plan

    return CompressionMethod(name=scorer_name, kind="drop", compress=compress, stochastic=scorer.stochastic,
                             description=scorer.description)


def compression_methods() -> dict[str, CompressionMethod]:
    """Every method known now: one drop method per registered scorer, then the registered others."""
    from .scoring import SCORERS

    methods = {name: _drop_method(name) for name in SCORERS}
    methods.update(_REGISTERED)
    return methods


def get_method(name: str) -> CompressionMethod:
    """The method ``name``; an unknown name is a PlanError listing the known ones."""
    methods = compression_methods()
    if name not in methods:
        raise PlanError(f"unknown compression method {name!r}; choose from: {', '.join(sorted(methods))}")
    return methods[name]
