"""NAEE dynamic skipping: drop a token's second expert when its gate weight is small next to the first.

NAEE ("Not All Experts are Equal", Lu et al., ACL 2024, https://arxiv.org/abs/2402.14800): for top-2
routing with gate weights w1 >= w2, skip the second expert where

    w2 < beta_l * w1,    beta_l = median over calibration tokens of w2 / w1   (per MoE layer l)

(:mod:`moeprune.observe.skip` collects the median as a mergeable histogram). What a skipped token
gets: the second expert's weight becomes 0 and, in a family whose router renormalises the selected
weights (Mixtral, norm_topk_prob, GPT-OSS's softmax over the top-k), the first expert takes the
whole gate mass, w1' = w1 + w2, as the family's routing re-applied to the one remaining expert gives
(1 for Mixtral; the routed scaling factor for DeepSeek-V3); elsewhere w1 stays. That is the
renormalisation of METHODS.md and of NAEE's Mixtral code (its routing weights are normalised after
the skip); beta = 0 skips nothing and changes nothing.

Saved with a checkpoint as the ``dynamic_skip`` key of config.json's ``moeprune`` section
(:mod:`moeprune.structure`): ``{"<decoder layer>": beta}``. ``moeprune.load`` installs a forward
pre-hook on each listed layer's experts module that rewrites (top_k_index, top_k_weights) before the
experts run, exact for every family whose experts take them (all of moeprune's) and route top-2; a
vanilla ``from_pretrained`` ignores the section and runs the same weights without skipping.

The hook zeroes the skipped pair's weight (transformers' experts kernels still compute the pair and
multiply it by 0, so the output is exact but the compute saving needs a kernel that drops
zero-weight pairs); :class:`SkipCounter` counts skipped and total expert calls.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .arch import Family, decoder_layers
from .errors import MoePruneError, StatsError
from .observe.skip import beta_from_histogram, check_skip_top_k
from .routing import RoutingParams
from .structure import StructureHandler, register_structure

logger = logging.getLogger(__name__)

#: ``moeprune`` config section key: {decoder layer: beta}.
DYNAMIC_SKIP = "dynamic_skip"
#: Attribute of a model loaded with dynamic skipping: its :class:`DynamicSkip`.
MODEL_ATTRIBUTE = "moeprune_dynamic_skip"


def renormalises(params: RoutingParams) -> bool:
    """The family's selected weights sum to a fixed mass (renormalised top-k, or a softmax over the top-k)."""
    return bool(params.renormalize) or params.rule == "topk_softmax"


def skip_weights(weights: torch.Tensor, beta: float, renormalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(new weights [T, 2], skipped [T] bool)`` of top-2 gate weights under the skip rule.

    With w1 >= w2 the two weights of a token: skipped = w2 < beta * w1; a skipped token's second
    weight becomes 0 and, when ``renormalise``, its first becomes w1 + w2.
    """
    if weights.shape[-1] != 2:
        check_skip_top_k(weights.shape[-1])
    first = weights.argmax(dim=-1, keepdim=True)
    second = 1 - first
    w1 = weights.gather(-1, first)
    w2 = weights.gather(-1, second)
    skipped = (w2 < beta * w1).squeeze(-1)
    new_first = torch.where(skipped[:, None], w1 + w2, w1) if renormalise else w1
    new_second = torch.where(skipped[:, None], torch.zeros_like(w2), w2)
    out = weights.scatter(-1, first, new_first).scatter(-1, second, new_second)
    return out, skipped


def betas_from_stats(stats, layers=None) -> dict[int, float]:
    """beta per MoE layer from statistics holding ``skip_ratio_hist`` (the ``dynamic_skip`` observer)."""
    betas = {}
    for layer, entries in sorted(stats.layers.items()):
        if layers is not None and layer not in layers:
            continue
        if "skip_ratio_hist" not in entries:
            raise StatsError(f"the statistics of layer {layer} lack skip_ratio_hist: collect them with the "
                             "dynamic_skip observer: `moeprune prune --dynamic-skip --data FILE`, or in Python "
                             "api.collect(..., observers=[..., 'dynamic_skip'])")
        betas[layer] = beta_from_histogram(entries["skip_ratio_hist"])
    return betas


@dataclass
class SkipCounter:
    """Expert calls seen and skipped by a model's skip hooks (every token the experts receive)."""

    calls: int = 0
    skipped: int = 0
    per_layer: dict[int, list[int]] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        """Skipped expert calls over all routed expert calls."""
        return self.skipped / self.calls if self.calls else 0.0

    def reset(self) -> None:
        self.calls, self.skipped, self.per_layer = 0, 0, {}


@dataclass
class DynamicSkip:
    """The skip hooks installed on one model (``model.moeprune_dynamic_skip``)."""

    betas: dict[int, float]
    renormalise: bool
    counter: SkipCounter = field(default_factory=SkipCounter)
    handles: list = field(default_factory=list)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _skip_hook(layer: int, beta: float, state: DynamicSkip):
    def hook(module, args, kwargs):
        names = ("hidden_states", "top_k_index", "top_k_weights")
        bound = dict(zip(names, args), **kwargs)
        weights, skipped = skip_weights(bound["top_k_weights"], beta, state.renormalise)
        calls, skips = bound["top_k_index"].numel(), int(skipped.sum())
        state.counter.calls += calls
        state.counter.skipped += skips
        seen = state.counter.per_layer.setdefault(layer, [0, 0])
        seen[0] += calls
        seen[1] += skips
        bound["top_k_weights"] = weights
        positional = tuple(bound.pop(n) for n in names[:len(args)])
        return positional, bound

    return hook


def install_dynamic_skip(model: nn.Module, family: Family, betas: Mapping[int | str, float]) -> DynamicSkip:
    """Install the skip rule on ``model``'s MoE layers ``betas`` (decoder layer -> beta); returns the
    :class:`DynamicSkip` (also set as ``model.moeprune_dynamic_skip``; ``.remove()`` undoes it)."""
    config = getattr(model.config, "get_text_config", lambda: model.config)()
    family.check_method("dynamic_skip", None, dynamic_skip=True)
    check_skip_top_k(family.top_k(config))
    params = family.routing_params(config)
    existing = getattr(model, MODEL_ATTRIBUTE, None)
    if existing is not None:
        existing.remove()
    state = DynamicSkip({int(k): float(v) for k, v in betas.items()}, renormalises(params))
    layers = decoder_layers(model)
    for layer, beta in sorted(state.betas.items()):
        if not 0 <= layer < len(layers) or not family.is_moe_layer(layers[layer]):
            raise MoePruneError(f"dynamic skipping names layer {layer}, which is not a MoE layer of this model")
        if not 0.0 <= beta <= 1.0:
            raise MoePruneError(f"dynamic skipping threshold of layer {layer} is {beta}; it must lie in [0, 1]")
        experts = family.experts(layers[layer])
        state.handles.append(experts.register_forward_pre_hook(_skip_hook(layer, beta, state), with_kwargs=True))
    setattr(model, MODEL_ATTRIBUTE, state)
    logger.info("dynamic skipping on %d MoE layers (beta %s)", len(state.betas),
                ", ".join(f"{b:.3f}" for b in state.betas.values()))
    return state


def skip_section(betas: Mapping[int, float]) -> dict[str, dict[str, float]]:
    """The section value recording ``betas`` (``{DYNAMIC_SKIP: {"<layer>": beta}}``)."""
    return {DYNAMIC_SKIP: {str(layer): float(beta) for layer, beta in sorted(betas.items())}}


def _finish(model: nn.Module, family: Family, value) -> None:
    if not isinstance(value, Mapping) or not all(str(k).isdigit() for k in value):
        raise MoePruneError(f"config.json's moeprune.{DYNAMIC_SKIP} must map decoder layers to thresholds, got {value!r}")
    install_dynamic_skip(model, family, value)


register_structure(StructureHandler(DYNAMIC_SKIP, finish=_finish))
