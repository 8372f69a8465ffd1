"""Expert-importance scorers: registered pure functions from statistics to one score per expert.

A scorer maps one MoE layer's statistics (the plain dict of tensors described in
:mod:`moeprune.stats`) to a float64 tensor ``[E]``; **higher means more important** (kept first).
Scorers never touch a model, so a researcher can re-score a saved statistics file with any method.

Conventions shared by every scorer:

* Scores are ``>= 0`` and an expert with no routed tokens (``frequency == 0``) scores exactly ``0``,
  so unused experts are never ranked above used ones (they can only tie with a used expert whose
  score is itself exactly zero; selection then breaks ties by the lower index).
* Divisions by the routed-token count use ``0`` where the count is ``0`` (no ``0/0`` NaN).

The scorers here are plain functions; the method registry (:mod:`moeprune.methods`) names them
with their statistics, selector, op and paper, and is the only registry. Add a drop method from your
own code with::

    @register_scorer("name", needs_outputs=False, description="one line for --help")
    def name_scores(stats: Mapping[str, torch.Tensor], *, seed: int, layer: int, num_experts: int,
                    **_) -> torch.Tensor: ...

Formulas, papers and what moeprune does differently: docs/methods.md.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping

import torch

from ..errors import PlanError, StatsError
from ..methods import OUTPUT_ENTRIES, Method, methods, register_method
from ..stats import RouterStats

logger = logging.getLogger(__name__)

ScoreFn = Callable[..., torch.Tensor]

#: A registered scorer is a :class:`moeprune.methods.Method` (name, fn, requires, needs_outputs,
#: description, stochastic, reference); the registry is :mod:`moeprune.methods`.
Scorer = Method


class _ScorerView(Mapping):
    """Read-only live view of the registered methods that score experts (name -> Method); methods with
    their own planner (neuron slicing, ...) score other units and are left out.

    The one registry is :mod:`moeprune.methods`; this view keeps ``SCORERS[name]`` working."""

    def _scoring(self) -> dict[str, Method]:
        return {name: m for name, m in methods().items() if m.scorer is not None and m.planner is None}

    def __getitem__(self, name: str) -> Method:
        return self._scoring()[name]

    def __iter__(self):
        return iter(self._scoring())

    def __len__(self) -> int:
        return len(self._scoring())


SCORERS: Mapping[str, Method] = _ScorerView()


def register_scorer(
    name: str,
    needs_outputs: bool = False,
    description: str = "",
    requires: tuple[str, ...] = ("frequency",),
    stochastic: bool = False,
    reference: str = "",
) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator that registers ``fn`` as a drop method ``name`` in :mod:`moeprune.methods`.

    ``fn(layer_stats, *, seed, layer, num_experts) -> Tensor[E]``. ``description`` defaults to the
    first line of the function's docstring; ``needs_outputs`` must agree with ``requires`` (it is
    true exactly when ``requires`` names an expert-output entry, :data:`moeprune.methods.OUTPUT_ENTRIES`).
    Remove it again with :func:`moeprune.methods.unregister_method`.
    """

    def decorate(fn: ScoreFn) -> ScoreFn:
        doc_line = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        method = Method(name=name, scorer=fn, requires=tuple(requires), stochastic=stochastic,
                        description=description or doc_line, reference=reference)
        if method.needs_outputs != bool(needs_outputs):
            raise ValueError(f"scorer {name!r}: needs_outputs={needs_outputs} but requires={tuple(requires)}; list the "
                             f"expert-output entries it reads ({', '.join(sorted(OUTPUT_ENTRIES))}) in requires")
        register_method(method)
        return fn

    return decorate


def get_scorer(name: str) -> Method:
    """The registered scoring method ``name``; an unknown name is a PlanError listing the known ones."""
    try:
        return SCORERS[name]
    except KeyError:
        raise PlanError(
            f"unknown scoring method {name!r}; choose one of: {', '.join(sorted(SCORERS))}"
        ) from None


# --------------------------------------------------------------------------------------------------
# small helpers


def _entry(stats: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """One statistic as float64 (the scorers' working precision)."""
    return torch.as_tensor(stats[name]).detach().to(device="cpu", dtype=torch.float64)


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` elementwise, ``0`` where ``denominator == 0``."""
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, numerator / safe, torch.zeros_like(numerator))


def _zero_unused(scores: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """Set the score of experts with no routed tokens to 0 (they must rank lowest)."""
    return torch.where(frequency > 0, scores, torch.zeros_like(scores))


def _layer_seed(seed: int, layer: int) -> int:
    """A 63-bit generator seed that is a fixed function of ``(seed, layer)``.

    Hashing (rather than e.g. ``seed + layer``) keeps different (seed, layer) pairs from sharing a
    random stream.
    """
    digest = hashlib.sha256(f"moeprune-random:{int(seed)}:{int(layer)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# --------------------------------------------------------------------------------------------------
# scorers


def random_scores(stats: Mapping[str, torch.Tensor], *, seed: int = 0, layer: int = 0,
                  num_experts: int | None = None) -> torch.Tensor:
    """Uniform random baseline: score_j = 1 - u_j, u_j ~ U[0, 1), i.e. score_j in (0, 1].

    Drawn from a ``torch.Generator`` seeded by a hash of ``(seed, layer)``: reproducible for a given
    seed and different in every layer. Needs no statistics (``num_experts`` gives E); when ``stats``
    holds ``frequency``, experts with no routed tokens score 0 (lowest), as for every scorer. The
    random-expert baseline of "Unveiling Super Experts in MoE LLMs" (2025) and of the
    expert-pruning literature in general.
    """
    if num_experts is None:
        num_experts = _entry(stats, "frequency").numel()
    generator = torch.Generator(device="cpu").manual_seed(_layer_seed(seed, layer))
    draws = 1.0 - torch.rand((num_experts,), generator=generator, dtype=torch.float64)
    return _zero_unused(draws, _entry(stats, "frequency")) if "frequency" in stats else draws


def frequency_scores(stats: Mapping[str, torch.Tensor], **_: int) -> torch.Tensor:
    """Routing frequency: score_j = |S_j|, the number of tokens that select expert j.

    The frequency-pruning baseline used by M-SMoE (ICLR 2024), HC-SMoE (ICML 2025) and REAP
    (Cerebras 2025).
    """
    return _entry(stats, "frequency")


def soft_count_scores(stats: Mapping[str, torch.Tensor], **_: int) -> torch.Tensor:
    """Soft count: score_j = sum over x in S_j of g_j(x), g_j the gate weight the model applies.

    Frequency weighted by routing confidence (METHODS.md "Router statistics"); the mean of
    1[j selected] g_j over tokens is DERN's (EMNLP 2025 Findings) expert importance I_j, which ranks
    identically.
    """
    return _zero_unused(_entry(stats, "soft_count"), _entry(stats, "frequency"))


def tcess_scores(stats: Mapping[str, torch.Tensor], **_: int) -> torch.Tensor:
    """PreMoe TCESS / PEU: score_j = tcess_j / tokens (mean over all task tokens).

    Per token the collector pools the top-K_a experts by logit, p = softmax over the pool, and adds
    f(z_j) = max(z_j, sigmoid(z_j)) where j is pooled and p_j >= r (PreMoe, 2025). An expert that
    was pooled but never actually routed scores 0 here (unused experts rank lowest).
    """
    tokens = _entry(stats, "tokens").reshape(())
    tcess = _entry(stats, "tcess")
    mean = tcess / tokens if float(tokens) > 0 else torch.zeros_like(tcess)
    return _zero_unused(mean, _entry(stats, "frequency"))


def ean_scores(stats: Mapping[str, torch.Tensor], **_: int) -> torch.Tensor:
    """Expert activation norm (sum): score_j = sum over x in S_j of ||f_j(x)||_2.

    The EAN baseline of the REAP paper (Cerebras 2025).
    """
    return _zero_unused(_entry(stats, "ean_sum"), _entry(stats, "frequency"))


def ean_mean_scores(stats: Mapping[str, torch.Tensor], **_: int) -> torch.Tensor:
    """Expert activation norm (mean): score_j = ean_sum_j / |S_j| (0 where |S_j| = 0).

    The per-token variant of the REAP paper's (Cerebras 2025) EAN baseline.
    """
    return _safe_divide(_entry(stats, "ean_sum"), _entry(stats, "frequency"))


def reap_scores(stats: Mapping[str, torch.Tensor], **_: int) -> torch.Tensor:
    """REAP: score_j = (1/|S_j|) sum over x in S_j of g_j(x) ||f_j(x)||_2 (0 where |S_j| = 0).

    Router-weighted Expert Activation Pruning (Cerebras 2025); g_j is the weight the model really
    multiplies by (renormalised over the selected set where the model renormalises).
    """
    return _safe_divide(_entry(stats, "reap_sum"), _entry(stats, "frequency"))


def easy_ep_scores(stats: Mapping[str, torch.Tensor], **_: int) -> torch.Tensor:
    """EASY-EP: score_j = sum over tokens t with j selected of g_j(x_t) ||f_j(x_t)|| * s_t.

    s_t = max(0, 1 - cos(h_t, h_t + sum_i g_i f_i)) weighs a token by how much the MoE block turns
    the residual stream (EASY-EP, 2025); shared experts are excluded.
    """
    return _zero_unused(_entry(stats, "easy_ep"), _entry(stats, "frequency"))


# --------------------------------------------------------------------------------------------------
# entry points


def _check_inputs(scorer: Method, layer_stats: Mapping[str, torch.Tensor], layer: int,
                  num_experts: int | None = None) -> int:
    """Raise unless ``layer_stats`` holds what ``scorer`` reads; return E (from ``frequency`` when the
    statistics hold it, else ``num_experts``)."""
    missing = [name for name in scorer.requires if name not in layer_stats]
    if missing:
        hint = (
            "collect statistics with expert outputs enabled (`moeprune collect`)"
            if scorer.needs_outputs
            else "re-run `moeprune collect`"
        )
        raise StatsError(
            f"layer {layer} statistics lack {missing}, which method {scorer.name!r} needs; {hint}"
        )
    if "frequency" not in layer_stats:
        if num_experts is None or num_experts < 1:
            raise StatsError(f"layer {layer}: no statistics and no expert count to score method {scorer.name!r}")
        return int(num_experts)
    frequency = torch.as_tensor(layer_stats["frequency"])
    if frequency.dim() != 1 or frequency.numel() == 0:
        raise StatsError(
            f"layer {layer}: 'frequency' must be a non-empty vector [E], got shape "
            f"{tuple(frequency.shape)}; re-run `moeprune collect`"
        )
    return int(frequency.numel())


def score_layer(
    name: str, layer_stats: Mapping[str, torch.Tensor], *, seed: int = 0, layer: int = 0,
    num_experts: int | None = None,
) -> torch.Tensor:
    """Scores ``[E]`` (float64, higher = more important) of one layer's statistics by ``name``.

    ``layer_stats`` may be empty for a method that needs no statistics (``random``); ``num_experts``
    then gives E. Raises PlanError for an unknown method and StatsError for statistics that lack an
    entry the method reads or that give non-finite or mis-shaped scores.
    """
    scorer = get_scorer(name)
    num_experts = _check_inputs(scorer, layer_stats, layer, num_experts)
    scores = scorer.fn(layer_stats, seed=seed, layer=layer, num_experts=num_experts).to(torch.float64)
    if scores.shape != (num_experts,):
        raise StatsError(
            f"layer {layer}: method {name!r} produced scores of shape {tuple(scores.shape)}, "
            f"expected ({num_experts},); the statistics entries disagree in size, re-run "
            "`moeprune collect`"
        )
    if not bool(torch.isfinite(scores).all()):
        raise StatsError(
            f"layer {layer}: method {name!r} produced non-finite scores (NaN/inf in the "
            "statistics); re-run `moeprune collect`, in float32 if it ran in half precision"
        )
    return scores


def _outputs_missing(layers: Mapping[int, Mapping[str, torch.Tensor]], scorer: Method) -> bool:
    """True when routed tokens exist but every output statistic the scorer reads is all zero.

    A collector run without expert outputs leaves those entries at zero; scoring them would rank
    experts by index only.
    """
    output_entries = [n for n in scorer.requires if n in OUTPUT_ENTRIES]
    routed = any(float(torch.as_tensor(e["frequency"]).sum()) > 0 for e in layers.values() if "frequency" in e)
    if not output_entries or not routed:
        return False
    return all(
        not bool(torch.as_tensor(entries[n]).any())
        for entries in layers.values()
        for n in output_entries
        if n in entries
    )


def score_layers(name: str, layers: Mapping[int, Mapping[str, torch.Tensor]], *, seed: int = 0,
                 num_experts: int | None = None) -> dict[int, torch.Tensor]:
    """Scores of every MoE layer of ``layers`` (layer -> statistics entries, empty mappings for a
    method that needs no statistics, with ``num_experts``) by method ``name``: ``{layer: Tensor[E]}``."""
    scorer = get_scorer(name)
    if not layers:
        raise StatsError("the statistics hold no MoE layer; re-run `moeprune collect`")
    if scorer.needs_outputs and _outputs_missing(layers, scorer):
        raise StatsError(
            f"method {name!r} needs expert-output statistics, but they are all zero in these "
            "statistics (collected without expert outputs?); re-collect with outputs enabled or "
            "use a router-only method: "
            + ", ".join(n for n, s in sorted(SCORERS.items()) if not s.needs_outputs)
        )
    scores = {
        layer: score_layer(name, layers[layer], seed=seed, layer=layer, num_experts=num_experts)
        for layer in sorted(layers)
    }
    logger.debug("scored %d layers with %s", len(scores), name)
    return scores


def score_all(name: str, stats: RouterStats, seed: int = 0) -> dict[int, torch.Tensor]:
    """Scores of every MoE layer in ``stats`` by method ``name``: ``{layer: Tensor[E]}``."""
    return score_layers(name, stats.layers, seed=seed)
