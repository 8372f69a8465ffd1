"""The one place that knows model families.

A family is described declaratively by a TOML spec under ``routers/`` (shipped inside the package as
``moeprune._routers``): which modules of a decoder layer hold the router, the experts and the shared
experts, which tensors are sliced along the expert axis in memory and on disk, which config keys hold
the number of experts, and which routing rule applies (:mod:`moeprune.routing`). Adding a family is
adding a file and a tiny-model test.

Where tensors live on disk and in memory (fused 3-D experts, per-expert files, GPT-OSS interleaved
and transposed gate/up with biases) is :mod:`moeprune.layout`'s business;
:meth:`Family.layer_state_dict` delegates to it so the sequential engine can materialise one layer
at a time.
"""

from __future__ import annotations

import functools
import json
import logging
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import MoePruneError, UnknownFamilyError
from .geometry import MoEGeometry
from .layout import CheckpointLayout, decoder_layer_list, family_layout
from .routing import RoutingParams

logger = logging.getLogger(__name__)

#: MoE model types of transformers that moeprune refuses, with the reason (found by reading their
#: modeling files; scripts/list_moe_families.py lists every MoE family of the installed transformers
#: with its status). "needs engine support" means the layer-by-layer engine cannot replay the model
#: exactly yet; "unsupported" means the spec format cannot describe it yet.
UNSUPPORTED: dict[str, str] = {
}


#: planners whose plans only keep experts (keep_experts actions, as the per-layer scorers' plans): STUN's
#: cluster representatives, NAEE's best subsets; a family with flattened experts (DBRX) runs them too
EXPERT_DROP_PLANNERS = ("moeprune.plan.stun:plan_stun", "moeprune.plan.naee:plan_naee")


@dataclass(frozen=True)
class Family:
    """One parsed routers/<family>.toml spec."""

    name: str
    model_types: tuple[str, ...]
    description: str
    spec: dict

    # -- config -----------------------------------------------------------------------------
    @property
    def num_experts_keys(self) -> list[str]:
        return list(self.spec["config"]["num_experts"])

    @property
    def text_key(self) -> str | None:
        """The sub-config holding the text decoder's config of a multimodal wrapper (``[text] config``:
        ``text_config``), None for a causal LM. The MoE keys live there; moeprune builds, calibrates and
        prunes the text decoder (the model transformers' causal-LM class builds from that sub-config)."""
        return self.spec.get("text", {}).get("config")

    def text_config(self, config):
        """The text decoder's config: ``config``'s ``[text] config`` sub-config for a multimodal wrapper's
        config, else ``config`` itself (already the text config, or a causal LM's)."""
        if self.text_key and getattr(config, "model_type", None) in self.model_types:
            return getattr(config, self.text_key)
        return config

    def num_experts(self, config) -> int:
        return int(_config_value(self.text_config(config), self.num_experts_keys[0]))

    def top_k(self, config) -> int:
        return int(_config_value(self.text_config(config), self.spec["config"]["top_k"]))

    def routing_params(self, config) -> RoutingParams:
        """The routing rule and its parameters, read from the model's config."""
        config = self.text_config(config)
        routing = self.spec["routing"]
        conf = self.spec["config"]
        rule = routing["rule"]
        if "rule_key" in routing:  # the config chooses the rule (Cohere2-MoE's expert_selection_fn)
            choice = getattr(config, routing["rule_key"], None)
            if choice not in routing["rules"]:
                raise MoePruneError(
                    f"{self.name}: config {routing['rule_key']}={choice!r} is not a routing moeprune reproduces "
                    f"(known: {', '.join(routing['rules'])})"
                )
            rule = routing["rules"][choice]
        renormalize = routing.get("renormalize")
        if renormalize is None:
            key = routing.get("renormalize_key", "norm_topk_prob")
            renormalize = bool(getattr(config, key, False))
        grouped = "n_group" in conf
        if rule == "sparsemixer" and self.top_k(config) != 2:
            raise MoePruneError(
                f"{self.name}: the SparseMixer router always picks exactly 2 experts, but the config says "
                f"{conf['top_k']}={self.top_k(config)}; moeprune cannot reproduce this model's routing"
            )
        if rule == "softmax_skip_topk" and self.top_k(config) != 1:
            raise MoePruneError(
                f"{self.name}: the router picks one class per token (a routed expert or the skip expert), but the "
                f"config says {conf['top_k']}={self.top_k(config)}; moeprune cannot reproduce this model's routing"
            )
        jitter_key = routing.get("jitter_eps_key")
        return RoutingParams(
            rule=rule,
            top_k=self.top_k(config),
            renormalize=bool(renormalize),
            n_group=int(getattr(config, conf["n_group"], 1) or 1) if grouped else 1,
            topk_group=int(getattr(config, conf["topk_group"], 1) or 1) if grouped else 1,
            topk_method=str(getattr(config, "topk_method", "greedy") or "greedy"),
            # scaling_key = "": the model scales the experts' output, not the gate weights (Laguna)
            routed_scaling_factor=float(getattr(config, routing.get("scaling_key", "routed_scaling_factor") or "-", 1.0) or 1.0),
            renormalize_epsilon=float(routing.get("renormalize_epsilon", 0.0)),
            weights_in_logits_dtype=bool(routing.get("weights_in_logits_dtype", True)),
            weights_in_hidden_dtype=bool(routing.get("weights_in_hidden_dtype", False)),
            jitter_eps=float(getattr(config, jitter_key, 0.0) or 0.0) if jitter_key else 0.0,
            topk_sorted=bool(routing.get("topk_sorted", False)),
            softmax_float32=bool(routing.get("softmax_float32", False)),
            sigmoid_float32=bool(routing.get("sigmoid_float32", True)),
            group_fill=float(routing.get("group_fill", float("-inf"))),
            selected_sigmoid_float32=bool(routing.get("selected_sigmoid_float32", False)),
            shared_in_router=int(getattr(config, conf["router_tail"], 0) or 0) if rule == "sigmoid_topk_shared_softmax" else 0,
            renormalize_min=float(getattr(config, routing["renormalize_min_key"], 0.0) or 0.0) if "renormalize_min_key" in routing else 0.0,
            norm_p=_norm_p(config, routing),
            score_fn=str(getattr(config, routing["score_fn_key"], "") or "") if "score_fn_key" in routing else "",
        )

    def group_limited(self, config) -> bool:
        """True when the router restricts selection to the best ``topk_group`` of ``n_group`` groups."""
        params = self.routing_params(config)
        if params.rule == "deepseek_v2":
            return params.topk_method == "group_limited_greedy" and params.n_group > 1
        return params.rule == "deepseek_v3" and params.n_group > 1

    # -- modules ----------------------------------------------------------------------------
    def router(self, layer: nn.Module) -> nn.Module:
        return _get_path(layer, self.spec["modules"]["router"])

    def experts(self, layer: nn.Module) -> nn.Module:
        return _get_path(layer, self.spec["modules"]["experts"])

    def shared_experts(self, layer: nn.Module) -> list[nn.Module]:
        return [_get_path(layer, path) for path in self.spec["modules"].get("shared", [])]

    def correction_bias(self, layer: nn.Module) -> torch.Tensor | None:
        """The router's selection bias (``e_score_correction_bias``) of a MoE layer, or None.

        It lives on the router (DeepSeek-V3) unless ``[modules] correction_bias`` names another path
        relative to the layer (MiniMax-M2 keeps it on the MoE block and passes it to the router)."""
        path = self.spec["modules"].get("correction_bias")
        if path is None:
            return getattr(self.router(layer), "e_score_correction_bias", None)
        owner, _, attribute = path.rpartition(".")
        return getattr(_get_path(layer, owner) if owner else layer, attribute, None)  # LFM2-MoE: optional

    def router_inputs(self, layer: nn.Module, hidden_states: torch.Tensor, token_ids: torch.Tensor | None = None) -> tuple:
        """Positional arguments of the router's forward for ``hidden_states`` [T, H] (MiniMax-M2's
        and AFMoE's routers also take the correction bias; a hash-routed layer's router, DeepSeek-V4's,
        the tokens' ids ``token_ids`` [T])."""
        routing = self.spec["routing"]
        if self.expert_table(layer) is not None:
            if token_ids is None:
                raise MoePruneError(f"{self.name}: this MoE layer routes by token id (hash routing): its router needs "
                                    "the tokens' ids")
            return (hidden_states, token_ids)
        if routing.get("router_input_batched", False) and hidden_states.dim() == 2:
            hidden_states = hidden_states.unsqueeze(0)  # AFMoE's router unpacks (batch, sequence, hidden)
        if routing.get("router_takes_bias", False):
            return (hidden_states, self.correction_bias(layer))
        return (hidden_states,)

    @property
    def gate_on_input(self) -> bool:
        """True when the router's weights scale each expert's INPUT, not its output (Llama 4: every
        expert runs on ``score * x`` for every token, ``score`` 0 off the top-k; ``[routing]
        gate_applies_to = "input"``). The router then returns dense scores [T, E] and the logits
        (output ``[routing] logits_output``), and the MoE block (``[modules] moe_block``) calls the
        experts on the scaled copies: :mod:`moeprune.collect` replaces that block's forward by an exact
        twin that also exposes the routing."""
        return self.spec["routing"].get("gate_applies_to", "output") == "input"

    def router_tail(self, config) -> int:
        """Router rows after the E routed experts' rows that pruning never removes: LongCat-Flash's
        zero-computation (identity) experts (``[config] identity_experts``), Inkling's shared experts
        (``[config] router_tail``); 0 for every other family. A pruned router keeps them after the kept
        routed experts' rows (in the router tensors ``[disk] router_tail`` names)."""
        key = self.spec["config"].get("identity_experts") or self.spec["config"].get("router_tail")
        if isinstance(key, int):  # a fixed number of rows (ZAYA's skip class: 1)
            return key
        return int(getattr(self.text_config(config), key, 0) or 0) if key else 0

    def expert_table(self, layer: nn.Module) -> torch.Tensor | None:
        """A hash-routed MoE layer's token-id -> expert-ids table [V, k] (DeepSeek-V4's ``tid2eid``; the
        path ``[modules] expert_table``), or None for a layer routed by its scores."""
        path = self.spec["modules"].get("expert_table")
        if path is None:
            return None
        owner, _, attribute = path.rpartition(".")
        try:
            return getattr(_get_path(layer, owner) if owner else layer, attribute, None)
        except AttributeError:
            return None

    @property
    def hash_routed(self) -> bool:
        """True when some MoE layers route by a token-id table (``[modules] expert_table``)."""
        return "expert_table" in self.spec["modules"]

    @property
    def skip_class(self) -> bool:
        """True when the router's last class is a skip expert (ZAYA, rule ``softmax_skip_topk``): a token
        routed to it gets no expert, but reaches the experts module as expert 0 with weight 0, so the
        statistics tell the two apart by the routing rule (:func:`moeprune.routing.route_with_skip`)."""
        return self.spec["routing"]["rule"] == "softmax_skip_topk"

    def router_scale(self, layer: nn.Module) -> torch.Tensor | None:
        """A learned scalar the router multiplies its weights by (Inkling's ``global_scale``;
        ``[modules] router_scale``), or None."""
        path = self.spec["modules"].get("router_scale")
        if path is None:
            return None
        owner, _, attribute = path.rpartition(".")
        return getattr(_get_path(layer, owner) if owner else layer, attribute)

    def block_route(self, layer: nn.Module):
        """The MoE block's own routing of router logits, ``(weights, indices) = route(logits)``, for families
        whose router returns the logits only (DBRX: ``ffn.route_tokens_to_experts``, ``[modules] route``);
        None where the router returns (logits, weights, indices) itself."""
        path = self.spec["modules"].get("route")
        if path is None:
            return None
        owner, _, attribute = path.rpartition(".")
        return getattr(_get_path(layer, owner) if owner else layer, attribute)

    def expert_count(self, layer: nn.Module) -> int:
        """Routed experts of a MoE layer as built (the experts module's ``[modules] experts_count``
        attribute, ``num_experts`` by default; a dotted path follows submodules: JetMoE's
        ``input_linear.num_experts``)."""
        return int(_get_path(self.experts(layer), self.spec["modules"].get("experts_count", "num_experts")))

    @property
    def sorted_dispatch(self) -> bool:
        """True when the router hands the experts the (token, expert) pairs grouped by expert (JetMoE:
        ``(index_sorted, batch_index, batch_gates, expert_size, logits)``, :func:`moeprune.routing.sorted_dispatch`;
        ``[routing] router_output = "sorted"``), not [T, k] indices and weights: the MoE block (``[modules]
        moe_block``) runs router and experts itself, and :mod:`moeprune.collect` replaces its forward by an
        exact twin that also exposes the routing."""
        return self.spec["routing"].get("router_output", "topk") == "sorted"

    @property
    def expert_count_shared(self) -> str:
        """What else the config's expert-count key sizes ("" when nothing: ``[config] num_experts_shared_with``;
        JetMoE: its attention experts, which moeprune keeps whole). Such a family's stock key keeps the
        original count and a pruned output records its routed-expert counts in the ``moeprune`` config
        section (``experts_per_layer``): it loads with ``moeprune.load``; vanilla ``from_pretrained`` refuses
        it (the expert tensors' shapes differ from the config's)."""
        return str(self.spec["config"].get("num_experts_shared_with", ""))

    def count_attributes(self, routed: int, tail: int) -> dict[str, dict[str, int]]:
        """Module attributes (path relative to the layer -> {attribute: value}) that count the experts
        of a layer keeping ``routed`` routed experts (``[modules.counts]``: "routed", or "all" = routed +
        the router's tail rows, :meth:`router_tail`)."""
        out: dict[str, dict[str, int]] = {}
        for path, which in self.spec["modules"].get("counts", {}).items():
            module, _, attribute = path.rpartition(".")
            out.setdefault(module, {})[attribute] = routed + (tail if which == "all" else 0)
        return out

    def check_method(self, method: str, planner: str | None, dynamic_skip: bool = False) -> None:
        """A MoePruneError, before any weight is read, when this family cannot run ``method`` exactly.

        Input-gated families (:attr:`gate_on_input`, Llama 4) and families with identity experts
        (LongCat-Flash) support dropping experts (every scorer without a planner) and the dense planners
        (``moeprune.plan.dense``: heads, channels, layers); merged experts (their exact router), compact
        neuron slices and dynamic skipping act on the transformers experts interface (indices, weights)
        that these families' experts do not implement. A spec's ``[dense] refused = "why"`` refuses the dense
        planners for its family (Nemotron-H). Families with flattened experts (DBRX) support dropping experts
        only: every scorer without a planner and the planners of :data:`EXPERT_DROP_PLANNERS`. Hash-routed
        families (DeepSeek-V4) support dropping (also STUN, DERN), merging (``moeprune.plan.merging``) and
        slicing experts (``moeprune.plan.neurons``); not NAEE, dynamic skipping or the dense planners.
        Skip-class families (:attr:`skip_class`, ZAYA) support dropping experts and slicing their neurons (the
        router is untouched) only. Families whose router groups the pairs by expert or whose expert-count key
        sizes other modules too (JetMoE) support dropping experts by a scorer only. Multimodal wrappers
        (:attr:`text_key`) drop experts by a scorer only: the other ops address the text decoder's tensors by
        their causal-LM names."""
        allowed = "moeprune.plan.dense:"  # the planners the family runs exactly, besides dropping experts
        advice = (", so merged experts, sliced neurons and skipped experts cannot be written exactly; drop experts "
                  "instead (e.g. method reap or frequency)")
        if self.text_key:
            reason = (f"its text decoder sits beside vision/audio towers (its config in {self.text_key}), and merging, "
                      "neuron slicing, the dense planners (heads, channels, layers) and dynamic skipping address the "
                      "causal LM's model.layers.N names")
            allowed = ()  # no planner
            advice = "; drop experts instead (e.g. method reap or frequency)"
        elif self.hash_routed:
            reason = ("its first MoE layers select experts by a frozen token-id -> expert-id table (hash routing, "
                      "tid2eid), which NAEE's re-routing and skipped experts do not model, and the dense planners do "
                      "not address its compressed attention and hyper-connection streams")
            allowed = ("moeprune.plan.neurons:", "moeprune.plan.merging:", "moeprune.plan.stun:", "moeprune.plan.dern:")
            advice = ("; drop experts (e.g. method reap or frequency: a hash layer's table is remapped to the kept "
                      "experts), merge them (hc_smoe, m_smoe, ream: a member's id becomes its cluster's) or slice "
                      "neurons instead")
        elif self.skip_class:  # neuron slices act on the experts only (a skip slot reaches them with weight 0)
            reason = ("its MLP router's last class is a skip expert and each layer's router adds the previous layer's "
                      "router state, so merged experts, skipped experts and dropped heads, channels or layers cannot be "
                      "written or replayed exactly")
            allowed = ("moeprune.plan.neurons:plan_neuron_slicing",)
            advice = "; drop experts (e.g. method reap or frequency) or slice their neurons (e.g. wanda_neuron) instead"
        elif self.sorted_dispatch or self.expert_count_shared:
            reason = ("its MLP experts run behind a router that groups the (token, expert) pairs by expert (not the "
                      "experts interface merges, neuron slices and skips act on), and its expert-count key also sizes "
                      f"{self.expert_count_shared or 'other modules'}, which moeprune keeps whole (no attention heads, "
                      "channels or layers to prune either)")
            allowed = ()  # no planner
            advice = "; drop experts instead (e.g. method reap or frequency)"
        elif self.gate_on_input:
            reason = ("its router's weights scale each expert's input and its experts run on dense score-scaled "
                      "copies of every token")
        elif self.layout.identity_experts:
            reason = ("its zero-computation (identity) experts share the router with the routed experts and run "
                      "in the experts module's own loop")
        elif self.spec.get("dense", {}).get("refused"):  # [dense] refused = "why" (Nemotron-H)
            if isinstance(planner, str) and planner.startswith("moeprune.plan.dense:"):
                raise MoePruneError(f"{self.name}: method {method!r} is not supported for this family: "
                                    f"{self.spec['dense']['refused']}; drop, merge or slice experts instead (e.g. "
                                    "method reap, hc_smoe or wanda_neuron)")
            return
        elif self.layout.router_tail:
            reason = ("its router also scores its shared experts (rows after the routed ones) and weighs them jointly "
                      "with the selected experts")
        elif self.layout.memory.flat:
            reason = ("its experts are flattened [E * I, H] row blocks (w1, v1, w2) run by its own per-expert loop, "
                      f"and its decoder layers sit at {self.layout.layers_path}.N: merging, neuron slicing, dynamic "
                      "skipping and the dense planners (heads, channels, layers) address fused expert blocks, its "
                      "fused Wqkv attention and model.layers.N names")
            allowed = EXPERT_DROP_PLANNERS
            advice = "; drop experts instead (e.g. method reap or frequency)"
        else:
            return
        runs = isinstance(planner, str) and planner.startswith(allowed)
        if (planner is not None and not runs) or dynamic_skip:
            what = "dynamic skipping" if dynamic_skip else f"method {method!r}"
            raise MoePruneError(f"{self.name}: {what} is not supported for this family: {reason}{advice}")

    def logits_of(self, router_output, num_experts: int) -> torch.Tensor:
        """The routed experts' logits from a router's output (its output ``[routing] logits_output``, 0 by
        default; Llama 4: 1), without the columns of experts past the ``num_experts`` routed ones
        (LongCat-Flash's identity experts)."""
        logits = router_output[self.spec["routing"].get("logits_output", 0)] if isinstance(router_output, tuple) else router_output
        return logits[..., :num_experts]

    def moe_block(self, layer: nn.Module) -> nn.Module:
        """The module holding router and experts (``[modules] moe_block``)."""
        return _get_path(layer, self.spec["modules"]["moe_block"])

    def residual_norm(self, layer: nn.Module) -> nn.Module:
        return _get_path(layer, self.spec["modules"]["residual_norm"])

    def is_moe_layer(self, layer: nn.Module) -> bool:
        try:
            self.experts(layer)
            self.router(layer)
        except AttributeError:
            return False
        return True

    @property
    def router_param_names(self) -> list[str]:
        return list(self.spec["memory"]["router"])

    @property
    def expert_param_names(self) -> list[str]:
        return list(self.spec["memory"]["experts"])

    @property
    def router_module_path(self) -> str:
        return self.spec["modules"]["router"]

    @property
    def experts_module_path(self) -> str:
        return self.spec["modules"]["experts"]

    # -- geometry ---------------------------------------------------------------------------
    def geometry(self, config, moe_layers: list[int]) -> MoEGeometry:
        params = self.routing_params(config)
        grouped = self.group_limited(config)
        model_type = config.model_type  # a multimodal wrapper's own (the MoE keys are its text config's)
        config = self.text_config(config)
        return MoEGeometry(
            family=self.name,
            model_type=model_type,
            num_hidden_layers=int(config.num_hidden_layers),
            moe_layers=tuple(moe_layers),
            num_experts=self.num_experts(config),
            top_k=params.top_k,
            n_group=params.n_group if grouped else 1,
            topk_group=params.topk_group if grouped else 1,
            min_experts_per_group=int(self.spec["config"].get("min_experts_per_group", 1)) if grouped else 1,
            has_shared_experts=bool(self.spec["modules"].get("shared")),
            routing=params.rule,
            expert_width=int(config_value(config, self.spec["config"].get("expert_width", "intermediate_size"), 0) or 0),
            num_attention_heads=_global_int(config, "num_attention_heads"),
            num_key_value_heads=_global_int(config, "num_key_value_heads"),
        )

    # -- layout (moeprune.layout is the one room for disk and memory names) ----------------
    @property
    def layout(self):
        """This family's :class:`~moeprune.layout.FamilyLayout`."""
        return family_layout(self)

    def layer_state_dict(self, checkpoint, layer: int, layer_module: nn.Module, dtype=None) -> dict:
        """One decoder layer's tensors in the in-memory (fused) layout, read lazily from disk.

        Keys are relative to the decoder layer; see :meth:`moeprune.layout.CheckpointLayout.layer_state_dict`.
        """
        moe = [layer] if self.is_moe_layer(layer_module) else []
        return CheckpointLayout.build(self, checkpoint, moe).layer_state_dict(layer, dtype)


def memory_name(family: Family, disk_name: str) -> str:
    """Map an on-disk tensor name (full, or relative to the layer) to its in-memory name."""
    return family_layout(family).memory_name(disk_name)


def _get_path(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _global_int(config, key: str) -> int:
    """``config.<key>`` as an int, 0 when absent or when the config holds it per layer (dots.3 note's
    heterogeneous configs raise on global access to a per-layer attribute)."""
    try:
        return int(getattr(config, key, 0) or 0)
    except RuntimeError:  # transformers' AmbiguousGlobalPerLayerAttributeError
        return 0


def config_value(config, key: str, default: Any = None) -> Any:
    """``config.<key>`` of a config object or config.json dict; a dotted key reads a nested sub-config
    (DBRX: ``ffn_config.moe_num_experts``). ``default`` where a part is missing."""
    value = config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
        if value is None:
            return default
    return value


def set_config_value(config, key: str, value: Any) -> None:
    """Set ``config.<key>`` of a config object or config.json dict (a dotted key: in its sub-config)."""
    *parents, last = key.split(".")
    for part in parents:
        config = config[part] if isinstance(config, dict) else getattr(config, part)
    if isinstance(config, dict):
        config[last] = value
    else:
        setattr(config, last, value)


def _norm_p(config, routing: dict) -> float | None:
    """``softmax_topk_pnorm``: the p of the Lp norm the top-k weights are divided by (``[routing] norm_p_key``;
    DBRX's ``ffn_config.moe_normalize_expert_weights``), None for no normalisation."""
    if "norm_p_key" not in routing:
        return None
    value = config_value(config, routing["norm_p_key"])
    return None if value is None else float(value)


def _config_value(config, key: str) -> Any:
    value = config_value(config, key)
    if value is None:
        raise MoePruneError(f"config.json has no {key!r}; is this a Mixture-of-Experts checkpoint?")
    return value


@functools.cache
def known_families() -> dict[str, Family]:
    """All specs under routers/, by family name."""
    families = {}
    for entry in sorted(resources.files("moeprune._routers").iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".toml"):
            continue
        spec = tomllib.loads(entry.read_text(encoding="utf-8"))
        family = Family(spec["family"], tuple(spec["model_types"]), spec.get("description", ""), spec)
        families[family.name] = family
    for name, family in list(families.items()):
        if "extends" in family.spec:
            families[name] = Family(family.name, family.model_types, family.description,
                                    extended_spec(family.spec, families))
    return families


def extended_spec(spec: dict, families: dict[str, Family]) -> dict:
    """A spec with ``extends = "<family>"`` (a multimodal wrapper reusing its text decoder's spec): the
    named family's spec with this one's tables merged in, key by key (this one's keys win)."""
    base = families.get(spec["extends"])
    if base is None or "extends" in base.spec:
        raise MoePruneError(f"routers/{spec['family']}.toml: extends {spec['extends']!r}, which is no family "
                            "spec of its own (extend a spec that extends nothing)")
    merged = {key: dict(value) if isinstance(value, dict) else value for key, value in base.spec.items()}
    for key, value in spec.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return merged


def family_for_model_type(model_type: str) -> Family:
    """The family spec for a config's ``model_type``; unknown types list the known ones."""
    for family in known_families().values():
        if model_type in family.model_types:
            return family
    known = ", ".join(sorted(t for f in known_families().values() for t in f.model_types))
    if model_type in UNSUPPORTED:
        raise UnknownFamilyError(
            f"model_type {model_type!r} cannot be pruned exactly by moeprune: {UNSUPPORTED[model_type]}. "
            f"Supported model types: {known}."
        )
    raise UnknownFamilyError(
        f"model_type {model_type!r} is not a supported MoE family; supported model types: {known}. "
        "To add one, write routers/<family>.toml and a tiny-model test."
    )


def read_config(model_dir: str | Path):
    """The transformers config of a local checkpoint folder (no hub access)."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise MoePruneError(
            f"{model_dir} is not a Hugging Face checkpoint folder (no config.json); pass a local folder "
            "written by save_pretrained"
        )
    try:
        model_type = json.loads((model_dir / "config.json").read_text())["model_type"]
    except (KeyError, json.JSONDecodeError) as exc:
        raise MoePruneError(f"{model_dir}/config.json is unreadable or has no model_type: {exc}") from exc
    family_for_model_type(model_type)
    return AutoConfig.from_pretrained(str(model_dir), local_files_only=True)


def build_skeleton(config, dtype: torch.dtype | None = None) -> nn.Module:
    """The full model with parameters on the meta device (no memory) and real buffers.

    Rotary ``inv_freq`` and similar non-persistent buffers are computed for real; parameters and
    persistent buffers are filled from disk one decoder layer at a time by the sequential engine.
    With ``dtype``, the model is built in it as ``from_pretrained(dtype=...)`` builds it, so each
    tensor a model creates in an explicit float32 is float32 (LFM2-MoE's expert_bias, Hunyuan's router).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = text_config_of(config)  # a multimodal wrapper: its text decoder's causal LM
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype is not None else {}))
    model.eval()
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return decoder_layer_list(text_model(model))


def text_config_of(config):
    """The text decoder's config of a multimodal wrapper's ``config`` (:meth:`Family.text_config`), else ``config``."""
    for family in known_families().values():
        if getattr(config, "model_type", None) in family.model_types:
            return family.text_config(config)
    return config


class TextView(nn.Module):
    """The text decoder of a whole multimodal model seen as a causal LM (``model`` = the decoder body,
    ``lm_head``, ``config`` = the text config): the same modules, not copies, so whatever the ops
    change through the view changes the multimodal model, whose towers stay as they are."""

    def __init__(self, body: nn.Module, head: nn.Module, config) -> None:
        super().__init__()
        self.model = body
        self.lm_head = head
        self.config = config


def text_model(model: nn.Module) -> nn.Module:
    """``model`` itself for a causal LM; for a whole multimodal wrapper (e.g. Qwen3_5MoeForConditionalGeneration
    loaded by transformers) a :class:`TextView` of its text decoder: the body at the in-memory path
    ``[text] body`` (``model.language_model``; Llama 4: ``language_model.model``) and the head at ``[text] head``."""
    config = getattr(model, "config", None)
    family = next((f for f in known_families().values() if getattr(config, "model_type", None) in f.model_types), None)
    if family is None or not family.text_key:
        return model
    text = family.spec["text"]
    return TextView(model.get_submodule(text["body"]), model.get_submodule(text["head"]), family.text_config(config))


def moe_layer_indices(family: Family, model: nn.Module) -> list[int]:
    return [i for i, layer in enumerate(decoder_layers(model)) if family.is_moe_layer(layer)]
