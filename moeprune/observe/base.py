"""Observers: each calibration statistic is a small accumulator over the forwards of one MoE layer.

An observer declares

* ``name``: how a pass asks for it (``collect_stats(..., observers=[name, ...])``);
* ``entries``: the statistics it produces, each with its combine rule, ``"sum"`` or ``"max"``:
  the statistic of two disjoint token sets is the sum (maximum) of theirs, so statistics of data
  shards merge exactly (:meth:`moeprune.stats.RouterStats.merge`) and a data-parallel pass is one
  all-reduce;
* ``needs``: the signals of the forward it reads (:data:`SIGNALS`); the engine computes only what
  the selected observers need (no routed expert outputs when nobody reads them);

and implements ``update(forward)`` (one forward of the layer, a :class:`LayerForward`) and
``result()`` (float64 tensors on the CPU). Observers never keep per-token lists: their state has a
fixed size, whatever the amount of calibration data. Padding tokens (attention mask 0) never count:
every observer reads only the valid tokens of a forward.

Adding a statistic is one module in this package with a ``@register_observer`` class, plus its test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar, Iterable

import torch

from ..errors import MoePruneError

# -- signals a forward can expose ------------------------------------------------------------------
ROUTER_LOGITS = "router_logits"  #: raw router logits z [T, E] (the router module's output)
ROUTING = "routing"  #: selected experts [T, k] and the gate weights the model applies [T, k]
EXPERT_OUTPUTS = "expert_outputs"  #: f_j(x) [P, H] of every routed (token, expert) pair, before gating
RESIDUAL = "residual"  #: the residual stream h_t [T, H] before the MoE block adds its output
SHARED_OUTPUTS = "shared_outputs"  #: each shared expert's output [T, H]
EXPERT_INTERMEDIATE = "expert_intermediate"  #: h = act(gate) * up [P, I] of every routed pair
#: f_j(x) of EVERY expert on EVERY token [T, E, H] (HC-SMoE features, NAEE): E / top_k times the
#: routed expert compute, so only observers that cannot do without it ask for it
EVERY_EXPERT_OUTPUT = "every_expert_output"
#: gradients of the calibration loss (next-token cross-entropy): an observer needing them runs in the
#: layer-by-layer backward pass (:mod:`moeprune.calibration.backward`), on the recomputed forward
#: (``RoutedPairs.intermediate_grad`` = dL/dh of every routed pair)
GRADIENTS = "gradients"
# declared for later issues; the engine refuses observers that need them until they land
BLOCK_INPUT = "block_input"  #: hidden states entering the decoder layer
BLOCK_OUTPUT = "block_output"  #: hidden states leaving the decoder layer

SIGNALS = (ROUTER_LOGITS, ROUTING, EXPERT_OUTPUTS, RESIDUAL, SHARED_OUTPUTS,
           EXPERT_INTERMEDIATE, EVERY_EXPERT_OUTPUT, BLOCK_INPUT, BLOCK_OUTPUT, GRADIENTS)
#: Signals the calibration engine provides today.
SUPPORTED_SIGNALS = frozenset({ROUTER_LOGITS, ROUTING, EXPERT_OUTPUTS, RESIDUAL, SHARED_OUTPUTS,
                               EXPERT_INTERMEDIATE, EVERY_EXPERT_OUTPUT, GRADIENTS})
#: Signals computed by the instrumented twin of the experts forward (not by a hook).
EXPERTS_FORWARD_SIGNALS = frozenset({EXPERT_OUTPUTS, EXPERT_INTERMEDIATE, EVERY_EXPERT_OUTPUT})

COMBINE_RULES = ("sum", "max")


@dataclass
class RoutedPairs:
    """Every (token, selected expert) pair of one forward: f = expert output before gating."""

    token: torch.Tensor  # [P] token row in the flattened batch
    expert: torch.Tensor  # [P]
    weight: torch.Tensor  # [P] gate weight the model multiplies by
    output: torch.Tensor  # [P, H] f_expert(x_token)
    intermediate: torch.Tensor | None = None  # [P, I] h = act(gate) * up, the input of down_proj
    intermediate_grad: torch.Tensor | None = None  # [P, I] dL/dh (backward pass only, signal GRADIENTS)


@dataclass(frozen=True)
class LayerContext:
    """What an observer knows about its layer before the first forward."""

    num_experts: int
    top_k: int
    num_shared: int = 0
    tcess_pool: int = 0
    tcess_bins: int = 1024
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: the family's routing rule (:class:`moeprune.routing.RoutingParams`) and the router's selection
    #: bias, for observers that re-route (NAEE); None where the pass does not provide them
    routing: object | None = None
    correction_bias: torch.Tensor | None = None


@dataclass(eq=False)
class LayerForward:
    """The signals of one forward of one MoE layer (flattened tokens T = batch x sequence).

    Fields an observer did not ask for may be ``None``. ``valid`` is True on real tokens.
    """

    valid: torch.Tensor  # [T] bool
    top_k_index: torch.Tensor  # [T, k]
    top_k_weights: torch.Tensor  # [T, k]
    router_logits: torch.Tensor | None = None  # [T, E]
    pairs: RoutedPairs | None = None
    routed_output: torch.Tensor | None = None  # [T, H] sum_i g_i f_i(x), shared experts excluded
    residual: torch.Tensor | None = None  # [T, H]
    shared_outputs: list[torch.Tensor] = field(default_factory=list)  # each [T, H]
    every_expert_output: torch.Tensor | None = None  # [T, E, H] f_j(x) of every expert on every token

    @cached_property
    def num_valid(self) -> torch.Tensor:
        """Number of valid tokens, float64 scalar."""
        return self.valid.sum().double()

    @cached_property
    def valid_pair_mask(self) -> torch.Tensor:
        """[P] True for routed pairs of valid tokens."""
        return self.valid[self.pairs.token]

    @cached_property
    def pair_expert(self) -> torch.Tensor:
        """Expert of every valid routed pair."""
        return self.pairs.expert[self.valid_pair_mask]

    @cached_property
    def pair_gate(self) -> torch.Tensor:
        """Gate weight g_j(x) of every valid routed pair (float64)."""
        return self.pairs.weight[self.valid_pair_mask].double()

    @cached_property
    def pair_output(self) -> torch.Tensor:
        """f_j(x) of every valid routed pair."""
        return self.pairs.output[self.valid_pair_mask]

    @cached_property
    def pair_intermediate(self) -> torch.Tensor:
        """h(x) = act(gate) * up [P_valid, I] of every valid routed pair (needs ``expert_intermediate``)."""
        return self.pairs.intermediate[self.valid_pair_mask]

    @cached_property
    def pair_intermediate_grad(self) -> torch.Tensor:
        """dL/dh [P_valid, I] of every valid routed pair (needs ``gradients``: backward pass only)."""
        return self.pairs.intermediate_grad[self.valid_pair_mask]

    @cached_property
    def pair_norm(self) -> torch.Tensor:
        """||f_j(x)|| of every valid routed pair (computed in float64)."""
        return torch.linalg.vector_norm(self.pair_output.double(), dim=-1)


class Observer:
    """Base class: subclasses set the class attributes and implement ``update`` and ``result``."""

    name: ClassVar[str] = ""
    entries: ClassVar[dict[str, str]] = {}  # entry name -> combine rule ("sum" or "max")
    needs: ClassVar[frozenset[str]] = frozenset()
    #: runs only when asked for by name (or by a method's statistics), never in a pass that runs
    #: "every observer": costly ones (every expert on every token, per-neuron sums)
    opt_in: ClassVar[bool] = False

    def __init__(self, context: LayerContext):
        self.context = context

    def zeros(self, *shape: int) -> torch.Tensor:
        """A float64 accumulator on the layer's device."""
        return torch.zeros(shape, dtype=torch.float64, device=self.context.device)

    def update(self, forward: LayerForward) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def result(self) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def check_geometry(cls, geometry) -> None:
        """Raise a MoePruneError when this observer cannot serve a model of this
        :class:`~moeprune.geometry.MoEGeometry` (called before any weight is read); default: any."""


OBSERVERS: dict[str, type[Observer]] = {}
#: entry name -> combine rule, over every registered observer.
ENTRY_RULES: dict[str, str] = {}
#: entry name -> the observer producing it.
ENTRY_OWNERS: dict[str, str] = {}
#: derived entries (computed from raw ones when statistics are finalised) -> the observer they need.
DERIVED_ENTRIES: dict[str, str] = {}


def register_observer(cls: type[Observer]) -> type[Observer]:
    """Class decorator adding an observer to :data:`OBSERVERS` (names and entries must be new)."""
    if not cls.name or cls.name in OBSERVERS:
        raise ValueError(f"observer name {cls.name!r} is empty or already registered")
    unknown = set(cls.needs) - set(SIGNALS)
    if unknown:
        raise ValueError(f"observer {cls.name!r} needs unknown signals {sorted(unknown)}")
    for entry, rule in cls.entries.items():
        if rule not in COMBINE_RULES:
            raise ValueError(f"entry {entry!r}: combine rule must be one of {COMBINE_RULES}, not {rule!r}")
        if entry in ENTRY_OWNERS:
            raise ValueError(f"entry {entry!r} is already produced by observer {ENTRY_OWNERS[entry]!r}")
    OBSERVERS[cls.name] = cls
    for entry, rule in cls.entries.items():
        ENTRY_RULES[entry] = rule
        ENTRY_OWNERS[entry] = cls.name
    return cls


#: The observer every pass runs (the token count every statistic is normalised by).
ALWAYS = ("tokens",)


def observer_names() -> list[str]:
    """Every registered observer, in registration order."""
    return list(OBSERVERS)


def resolve_observers(names: Iterable[str] | None) -> tuple[str, ...]:
    """The observers a pass runs: every one that is not ``opt_in`` for ``None``; else ``names`` plus
    :data:`ALWAYS`, in registration order. Unknown names are a MoePruneError listing the known ones."""
    if names is None:
        return tuple(name for name, cls in OBSERVERS.items() if not cls.opt_in)
    names = set(names)
    unknown = sorted(names - set(OBSERVERS))
    if unknown:
        raise MoePruneError(f"unknown observer(s) {unknown}; choose from {', '.join(OBSERVERS)}")
    names |= set(ALWAYS)
    return tuple(n for n in OBSERVERS if n in names)


def observers_for_entries(entries: Iterable[str]) -> tuple[str, ...]:
    """The observers producing the statistics ``entries`` (e.g. ``scoring.Scorer.requires``).

    Derived entries (``tcess``, ``tcess_r``) map to the observer of their raw accumulators.
    """
    names = set()
    for entry in entries:
        owner = ENTRY_OWNERS.get(entry) or DERIVED_ENTRIES.get(entry)
        if owner is None:
            raise MoePruneError(f"no observer produces the statistic {entry!r}; known: {', '.join(sorted(ENTRY_OWNERS))}")
        names.add(owner)
    return resolve_observers(names)


def check_observers_fit(names: Iterable[str], geometry) -> None:
    """Every observer of ``names`` accepts the model's geometry (:meth:`Observer.check_geometry`)."""
    for name in resolve_observers(names):
        OBSERVERS[name].check_geometry(geometry)


def signals_needed(names: Iterable[str]) -> frozenset[str]:
    """Union of the signals the observers ``names`` need; a MoePruneError for signals the engine
    cannot provide yet."""
    needed = frozenset().union(*(OBSERVERS[n].needs for n in names))
    missing = sorted(needed - SUPPORTED_SIGNALS)
    if missing:
        raise MoePruneError(f"signals {missing} are not implemented yet in the calibration engine")
    return needed
