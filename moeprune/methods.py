"""THE method registry: one entry per compression method, read by every place that offers methods.

``moeprune prune --method`` and ``moeprune demo --method`` (their choices), ``moeprune profile build
--method``, the Python API (:func:`moeprune.api.plan_pruning`, :func:`moeprune.api.prune`), the
quality sweep (:mod:`moeprune.sweep`) and the default job all read this registry, so a method
registered here appears everywhere at once.

A :class:`Method` says what a method needs and does:

* ``requires``: the statistics entries it reads (:mod:`moeprune.stats`; a calibration pass runs
  the observers that produce them, :func:`moeprune.api.statistics_for`); empty for a method that
  needs no calibration statistics (``random``), which then plans without any; ``optional``: entries
  read when present;
* ``scorer``: the pure function from one layer's statistics to one score per expert
  (:mod:`moeprune.scoring`), given as ``"module:function"`` and imported on first use, so that this
  module, and the CLI's ``--help`` that lists the methods, never import torch;
* ``selector``: how scores become a decision (:data:`SELECTORS`; today ``topk_per_layer``, the
  budgeted per-layer selection of :func:`moeprune.plan.build_plan`);
* ``op``: what the decision does to the weights (:data:`OPS`; today ``drop``, replayed by
  :func:`moeprune.apply.write_pruned_checkpoint` / ``moeprune apply``);
* ``planner``: for a method that is not "score experts, keep the top ones per layer" (neuron
  slicing, merging, dense pruning), the function that builds its whole plan, given as
  ``"module:function"``: ``planner(info, stats, *, method, ratio, seed, protect_super_experts,
  **options) -> Plan`` (``info``: :class:`moeprune.api.ModelInfo`; ``stats``: a RouterStats or
  None; ``method``: this :class:`Method`, so one planner can serve several scorers); the
  method's own keyword ``options`` (``--layout``, ``--router``, ...) are listed in ``options``;
* ``stochastic``, ``description`` and ``reference`` (the paper and its URL, as mergekit's
  ``reference_url``).

Register a new method with :func:`register_method` (or, for a drop method whose scorer lives in your
own code, the :func:`moeprune.scoring.register_scorer` decorator). Formulas: docs/methods.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import PlanError

#: How a method without its own ``planner`` turns scores into a decision, and what that decision does
#: to the weights: the generic path scores experts and keeps the top-k per layer (``drop``). Methods that
#: select or act otherwise (global rankings, clustering, merges, neurons, dense units) bring a
#: ``planner``; a planner-less method declaring an unimplemented pair is refused when it plans.
SELECTORS: tuple[str, ...] = ("topk_per_layer", "global_ranking", "clustering")
IMPLEMENTED_SELECTORS: tuple[str, ...] = ("topk_per_layer",)
OPS: tuple[str, ...] = ("drop", "merge")
IMPLEMENTED_OPS: tuple[str, ...] = ("drop",)
#: What a method's ``--ratio`` removes (:attr:`Method.granularity`).
GRANULARITIES: tuple[str, ...] = ("experts", "neurons", "dense")
#: Statistics entries that exist only when calibration computed the routed experts' outputs.
OUTPUT_ENTRIES: frozenset[str] = frozenset({"ean_sum", "reap_sum", "easy_ep"})


@dataclass(frozen=True)
class Method:
    """One registered compression method (see the module docstring).

    Attributes:
        name: the method name (``--method NAME``).
        scorer: ``"module:function"`` (imported on first use) or the function itself:
            ``fn(layer_stats, *, seed, layer, num_experts) -> Tensor[E]`` (float64, higher = more
            important); None for a method that scores nothing (e.g. a future clustering method).
        requires: statistics entries the scorer reads (checked before it runs); empty: the method
            needs no calibration statistics.
        optional: entries the scorer reads when the statistics hold them (random zeroes the scores
            of unrouted experts when ``frequency`` is there); a calibration pass collects them too.
        selector: one of :data:`SELECTORS`.
        op: one of :data:`OPS`.
        stochastic: results depend on ``seed`` (comparisons average several seeds).
        description: one line for help texts and tables.
        reference: the paper (title, venue/year) and its URL.
        planner: ``"module:function"`` (or the function) building the whole plan (see the module
            docstring); None: the scorer/selector/op path of drop methods.
        options: keyword options the planner accepts, with their defaults (``(("layout",
            "uniform"), ...)``); the API refuses others.
        granularity: what ``--ratio`` removes, one of :data:`GRANULARITIES`: ``experts`` (a fraction of
            the routed experts), ``neurons`` (a fraction of the routed experts' neurons: the same routed-
            expert parameters as ``experts`` at the same ratio, so the sweep compares them directly) or
            ``dense`` (a fraction of the parameters of a non-expert unit; not in the expert sweep's
            default set).
    """

    name: str
    scorer: str | Callable[..., Any] | None
    requires: tuple[str, ...] = ("frequency",)
    optional: tuple[str, ...] = ()
    selector: str = "topk_per_layer"
    op: str = "drop"
    stochastic: bool = False
    description: str = ""
    reference: str = ""
    planner: str | Callable[..., Any] | None = None
    options: tuple[tuple[str, Any], ...] = ()
    granularity: str = "experts"
    #: ``"module:function"`` (or the function) checking a planner method's request before any
    #: weight is read: ``validator(info, *, ratio, **options)`` raises PlanError (None: no check)
    validator: str | Callable[..., Any] | None = None

    @property
    def needs_stats(self) -> bool:
        """The method reads calibration statistics (``requires`` is not empty)."""
        return bool(self.requires)

    @property
    def needs_outputs(self) -> bool:
        """The method reads statistics of expert outputs (:data:`OUTPUT_ENTRIES`), which calibration
        gathers only when expert outputs are computed."""
        return bool(OUTPUT_ENTRIES.intersection(self.requires))

    @property
    def fn(self) -> Callable[..., Any]:
        """The scorer function (imported now if the registry names it by ``"module:function"``)."""
        if self.scorer is None:
            raise PlanError(f"method {self.name!r} has no per-expert scorer (selector {self.selector!r})")
        return _resolve(self.scorer)

    @property
    def plan_fn(self) -> Callable[..., Any] | None:
        """The planner function (imported now), or None for a drop method planned by its scores."""
        return None if self.planner is None else _resolve(self.planner)

    def method_options(self, given: dict[str, Any] | None) -> dict[str, Any]:
        """This method's options: its defaults updated with ``given``; an option the method does not
        take is a PlanError naming the ones it takes."""
        defaults = dict(self.options)
        unknown = sorted(set(given or {}) - set(defaults))
        if unknown:
            takes = ", ".join(defaults) or "none"
            raise PlanError(f"method {self.name!r} does not take the option(s) {', '.join(unknown)} (it takes: {takes})")
        return {**defaults, **(given or {})}

    def validate_request(self, info, *, ratio, options: dict[str, Any] | None = None) -> None:
        """Run the method's ``validator`` (if any) on a request: PlanError before any weight is read."""
        if self.validator is not None:
            _resolve(self.validator)(info, ratio=ratio, **self.method_options(options))

    def check_implemented(self) -> None:
        """Raise PlanError unless this moeprune can run the method's selector and op."""
        if self.planner is not None:
            return
        if self.selector not in IMPLEMENTED_SELECTORS or self.op not in IMPLEMENTED_OPS or self.scorer is None:
            raise PlanError(
                f"method {self.name!r} (selector {self.selector!r}, op {self.op!r}) is not implemented yet in this "
                f"moeprune; implemented: selectors {', '.join(IMPLEMENTED_SELECTORS)}, ops "
                f"{', '.join(IMPLEMENTED_OPS)}"
            )

    def compress(self, model, model_dir, stats, *, ratio: float, seed: int = 0, protect_super_experts: bool = True,
                 options: dict[str, Any] | None = None):
        """``(compressed copy of model, plan)``: plan with :func:`moeprune.api.plan_pruning` on
        ``stats`` (None for a method that needs none), then apply the plan's op in memory; ``model``
        itself is never modified."""
        import copy

        from .api import plan_pruning
        from .apply import apply_plan_in_memory

        self.check_implemented()
        plan = plan_pruning(model_dir, method=self.name, ratio=ratio, stats=stats, seed=seed,
                            protect_super_experts=protect_super_experts, options=options)
        return apply_plan_in_memory(copy.deepcopy(model), plan), plan


def _resolve(spec: str | Callable[..., Any]) -> Callable[..., Any]:
    """A function given as itself or as ``"module:function"`` (imported now)."""
    if callable(spec):
        return spec
    module, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module), attribute)


#: The registry (name -> method), in registration order. Use the functions below, not this dict.
_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method``; a taken name, an unknown selector or op, or a bad scorer spec is a ValueError."""
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    if method.selector not in SELECTORS:
        raise ValueError(f"method {method.name!r}: unknown selector {method.selector!r}; one of {', '.join(SELECTORS)}")
    if method.granularity not in GRANULARITIES:
        raise ValueError(f"method {method.name!r}: unknown granularity {method.granularity!r}; one of {', '.join(GRANULARITIES)}")
    if method.op not in OPS:
        raise ValueError(f"method {method.name!r}: unknown op {method.op!r}; one of {', '.join(OPS)}")
    for what in ("scorer", "planner"):
        spec = getattr(method, what)
        if isinstance(spec, str) and ":" not in spec:
            raise ValueError(f"method {method.name!r}: {what} must be 'module:function', got {spec!r}")
    _METHODS[method.name] = method
    return method


def unregister_method(name: str) -> Method:
    """Remove and return method ``name`` (KeyError if it is not registered)."""
    return _METHODS.pop(name)


def methods() -> dict[str, Method]:
    """Every registered method by name (a copy, in registration order)."""
    return dict(_METHODS)


def method_names() -> list[str]:
    """Every registered method name, sorted (the CLI's ``--method`` choices)."""
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    """The method ``name``; an unknown name is a PlanError listing the known ones."""
    try:
        return _METHODS[name]
    except KeyError:
        raise PlanError(f"unknown method {name!r}; choose one of: {', '.join(method_names())}") from None


# --------------------------------------------------------------------------------------------------
# the built-in methods (scorers: moeprune.scoring; formulas and papers: docs/methods.md)

_SCORING = "moeprune.scoring"
_REAP = "REAP: Router-weighted Expert Activation Pruning (Lasby et al., Cerebras 2025), https://arxiv.org/abs/2510.13999"

for _method in (
    Method("random", f"{_SCORING}:random_scores", requires=(), optional=("frequency",), stochastic=True,
           description="uniform random baseline (seeded)",
           reference="random-expert baseline of 'Unveiling Super Experts in Mixture-of-Experts Large Language "
                     "Models' (2025), https://arxiv.org/abs/2507.23279"),
    Method("frequency", f"{_SCORING}:frequency_scores", requires=("frequency",),
           description="routed-token count |S_j|",
           reference="frequency baseline of M-SMoE, 'Merge, Then Compress' (ICLR 2024), "
                     "https://arxiv.org/abs/2310.01334"),
    Method("soft_count", f"{_SCORING}:soft_count_scores", requires=("frequency", "soft_count"),
           description="sum of gate weights over routed tokens",
           reference="DERN's expert importance (EMNLP 2025 Findings); METHODS.md 'Router statistics'"),
    Method("tcess", f"{_SCORING}:tcess_scores", requires=("frequency", "tcess", "tokens"),
           description="PreMoe TCESS: mean task-conditioned expected selection score",
           reference="PreMoe: Lightening MoEs on Constrained Memory by Expert Pruning and Retrieval (2025), "
                     "https://arxiv.org/abs/2505.17639"),
    Method("ean", f"{_SCORING}:ean_scores", requires=("frequency", "ean_sum"),
           description="EAN: sum of expert-output norms over routed tokens", reference=f"EAN baseline of {_REAP}"),
    Method("ean_mean", f"{_SCORING}:ean_mean_scores", requires=("frequency", "ean_sum"),
           description="mean expert-output norm over routed tokens", reference=f"EAN variant of {_REAP}"),
    Method("reap", f"{_SCORING}:reap_scores", requires=("frequency", "reap_sum"),
           description="REAP: mean gate-weighted expert-output norm over routed tokens", reference=_REAP),
    Method("easy_ep", f"{_SCORING}:easy_ep_scores", requires=("frequency", "easy_ep"),
           description="EASY-EP: gate-weighted output norm times token hidden-state change",
           reference="EASY-EP: Domain-Specific Pruning of Large Mixture-of-Experts Models with Few-shot "
                     "Demonstrations (2025), https://arxiv.org/abs/2504.06792"),
):
    register_method(_method)
del _method

# merging methods (planners: moeprune.plan.merging; formulas: docs/methods.md, hc-smoe, m-smoe, ream)
_MERGING = "moeprune.plan.merging"
_ROUTER_OPTIONS = (("router", "vanilla"), ("router_rows", "dominant"))
for _method in (
    Method("hc_smoe", None, requires=("frequency", "expert_mean_output"), selector="clustering", op="merge",
           planner=f"{_MERGING}:plan_hc_smoe", options=(*_ROUTER_OPTIONS, ("linkage", "average"), ("align", "on"),
                                                         ("dominant", "center")),
           description="HC-SMoE: hierarchical clustering of mean expert outputs, frequency-weighted merge",
           reference="Retraining-Free Merging of Sparse MoE via Hierarchical Clustering (HC-SMoE, ICML 2025), "
                     "https://arxiv.org/abs/2410.08589"),
    Method("m_smoe", None, requires=("frequency", "router_logit_gram"), selector="clustering", op="merge",
           planner=f"{_MERGING}:plan_m_smoe", options=(*_ROUTER_OPTIONS, ("budget", "global"), ("align", "on")),
           description="M-SMoE: frequent experts dominate, others join the most router-similar one; aligned merge",
           reference="Merge, Then Compress: Demystify Efficient SMoE with Hints from Its Routing Policy (M-SMoE, "
                     "ICLR 2024), https://arxiv.org/abs/2310.01334"),
    Method("ream", None, requires=("frequency", "reap_sum", "expert_gated_mean_output", "router_logit_gram"),
           optional=("expert_mean_output",), selector="clustering", op="merge", planner=f"{_MERGING}:plan_ream",
           options=(*_ROUTER_OPTIONS, ("group_size", 16), ("align", "on"), ("assign", "greedy"),
                    ("merge_weights", "saliency"), ("outputs", "gated")),
           description="REAM: REAP-salient centroids take their nearest experts by output and logit similarity",
           reference="REAM (2026), https://github.com/SamsungSAILMontreal/ream"),
):
    register_method(_method)
del _method

# --------------------------------------------------------------------------------------------------
# dense structured pruning (attention KV groups, dense-MLP / shared-expert channels, whole layers):
# planners in moeprune.plan.dense, scores in moeprune.scoring.dense, docs/methods.md. ``dense_random``
# is the random baseline of these units (``random`` drops experts).

_DENSE = "moeprune.plan.dense"
_FLAP = ("FLAP: Fluctuation-based Adaptive Structured Pruning for Large Language Models (AAAI 2024), "
         "https://arxiv.org/abs/2312.11983")
_UNIT_OPTIONS = (("unit", "heads"), ("layers", 1), ("widths", None))

for _method in (
    Method("magnitude", None, granularity="dense", requires=(), planner=f"{_DENSE}:plan_units", options=_UNIT_OPTIONS,
           description="dense units (--unit heads|mlp|shared) by the norm of their weights",
           reference="magnitude baseline of LLM-Pruner (NeurIPS 2023), https://arxiv.org/abs/2305.11627"),
    Method("wanda_sp", None, granularity="dense", requires=("dense_tokens",), planner=f"{_DENSE}:plan_units", options=_UNIT_OPTIONS,
           description="dense units by sum |W| x input-activation norm (structured Wanda)",
           reference=f"Wanda-sp as defined by {_FLAP}; Wanda (ICLR 2024), https://arxiv.org/abs/2306.11695"),
    Method("flap", None, granularity="dense", requires=("dense_tokens",), planner=f"{_DENSE}:plan_units",
           options=(("unit", "heads"), ("widths", None), ("compensate", True)),
           description="FLAP: input fluctuation x output-column norm, standardised, one global threshold, bias compensation",
           reference=_FLAP),
    Method("taylor", None, granularity="dense", requires=("attn_taylor",), planner=f"{_DENSE}:plan_units",
           validator=f"{_DENSE}:check_taylor", options=(("unit", "heads"), ("widths", None)),
           description="LLM-Pruner first-order Taylor: dense units by sum |w x dL/dw| (layer-by-layer backward pass)",
           reference="LLM-Pruner: On the Structural Pruning of Large Language Models (NeurIPS 2023), "
                     "https://arxiv.org/abs/2305.11627"),
    Method("dense_random", None, granularity="dense", requires=(), stochastic=True, planner=f"{_DENSE}:plan_units", options=_UNIT_OPTIONS,
           description="random dense units (or a random run of --layers N layers) at the same budget (seeded)",
           reference="random baseline of FLAP and of layer-drop studies, https://arxiv.org/abs/2312.11983"),
    Method("angular", None, granularity="dense", requires=("angular_sum", "angular_count"), planner=f"{_DENSE}:plan_angular",
           options=(("layers", 1),),
           description="drop the --layers N consecutive layers with the smallest angular distance",
           reference="The Unreasonable Ineffectiveness of the Deeper Layers (Gromov et al., 2024), "
                     "https://arxiv.org/abs/2403.17887"),
    Method("replaceme", None, granularity="dense", requires=("angular_sum", "replaceme_mtm"), planner=f"{_DENSE}:plan_replaceme",
           options=(("layers", 1), ("ridge", 1e-6)),
           description="drop --layers N layers and fold a least-squares linear map into the previous layer",
           reference="ReplaceMe: Network Simplification via Layer Pruning and Linear Transformations (2025), "
                     "https://arxiv.org/abs/2505.02819"),
):
    register_method(_method)
del _method
# STUN and DERN (merging issue): methods with their own planners (moeprune.plan.stun, moeprune.plan.dern)
register_method(Method(
    "stun", None, requires=("frequency",), optional=("coactivation",), selector="clustering", op="drop",
    planner="moeprune.plan.stun:plan_stun", validator="moeprune.plan.stun:check_stun", options=(("distance", "router"), ("normalize", False)),
    description="STUN: greedy complete-linkage clusters of router rows under one global threshold; keep the "
                "member nearest each cluster's mean weights (non-uniform counts per layer)",
    reference="STUN: Structured-Then-Unstructured Pruning for Scalable MoE Pruning (Lee et al., ACL 2025), "
              "https://arxiv.org/abs/2409.06211"))
register_method(Method(
    "dern", None, requires=("frequency", "soft_count", "tokens"), selector="clustering", op="drop",
    planner="moeprune.plan.dern:plan_dern", validator="moeprune.plan.dern:check_dern",
    options=(("tau", 0.6), ("gate_in_similarity", True), ("kmeans_iterations", 10), ("kmeans_init", "magnitude")),
    description="DERN: drop experts by mean gate mass, migrate their neuron segments to the most similar kept "
                "expert (cosine > tau), recluster each kept expert to its width (weighted spherical k-means)",
    reference="DERN: Dropping Experts, Recombining Neurons (EMNLP 2025 Findings); no public code, "
              "implemented from the paper (docs/methods.md 'dern')"))
register_method(Method(
    "naee", None, requires=("frequency", "naee_error"), planner="moeprune.plan.naee:plan_naee",
    description="NAEE: per layer, the expert subset with the least MoE-output reconstruction error (E <= 16)",
    reference="Not All Experts are Equal: Efficient Expert Pruning and Skipping for Mixture-of-Experts Large "
              "Language Models (Lu et al., ACL 2024), https://arxiv.org/abs/2402.14800"))

# --------------------------------------------------------------------------------------------------
# neuron ("atomic expert") slicing: scorers moeprune.scoring.neurons, planner moeprune.plan.neurons

_NEURONS = "moeprune.scoring.neurons"
_NEURON_PLANNER = "moeprune.plan.neurons:plan_neuron_slicing"
_NEURON_OPTIONS = (("layout", "uniform"), ("selection", "global"))
_NEURON_CHECK = "moeprune.plan.neurons:check_neuron_request"

for _method in (
    Method("camera_p", f"{_NEURONS}:camera_p_scores", requires=("frequency", "neuron_gh2_sum", "neuron_gh2_max"),
           planner=_NEURON_PLANNER, validator=_NEURON_CHECK, granularity="neurons", options=_NEURON_OPTIONS + (("rho", 0.9),),
           description="CAMERA-P: ||W_down[:,k]||^2 ((1-rho) sum + rho max of (g h_k)^2) per neuron",
           reference="CAMERA: Multi-Matrix Joint Compression for MoE Models via Micro-Expert Redundancy Analysis "
                     "(AAAI 2026), https://arxiv.org/abs/2508.02322"),
    Method("wanda_neuron", f"{_NEURONS}:wanda_neuron_scores", requires=("frequency", "neuron_gh2_sum"),
           planner=_NEURON_PLANNER, validator=_NEURON_CHECK, granularity="neurons", options=_NEURON_OPTIONS,
           description="Wanda-style: ||W_down[:,k]||_1 sqrt(sum over routed tokens of (g h_k)^2) per neuron",
           reference="Wanda, 'A Simple and Effective Pruning Approach for Large Language Models' (ICLR 2024), "
                     "https://arxiv.org/abs/2306.11695, per neuron of a routed expert"),
    Method("random_neuron", f"{_NEURONS}:random_neuron_scores", requires=(), optional=("frequency",), stochastic=True,
           planner=_NEURON_PLANNER, validator=_NEURON_CHECK, granularity="neurons", options=_NEURON_OPTIONS,
           description="uniform random neurons of the routed experts (seeded)",
           reference="random baseline at neuron granularity (METHODS.md 'Atomic (neuron) pruning')"),
    Method("heapr", "moeprune.scoring.heapr:heapr_scores", requires=("frequency", "heapr_h2_sum", "heapr_g2_sum"),
           planner=_NEURON_PLANNER, validator=_NEURON_CHECK, granularity="neurons", options=_NEURON_OPTIONS,
           description="HEAPr: E[h_k^2] E[(dL/dh_k)^2] per neuron, from a layer-by-layer backward pass",
           reference="HEAPr: Hessian-based Efficient Atomic Expert Pruning in Output Space (ICLR 2026), "
                     "https://arxiv.org/abs/2509.22299"),
):
    register_method(_method)
del _method
