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
from .layout import CheckpointLayout, family_layout
from .routing import RoutingParams

logger = logging.getLogger(__name__)

#: MoE model types of transformers that moeprune refuses, with the reason (found by reading their
#: modeling files; scripts/list_moe_families.py lists every MoE family of the installed transformers
#: with its status). "needs engine support" means the layer-by-layer engine cannot replay the model
#: exactly yet; "unsupported" means the spec format cannot describe it yet.
UNSUPPORTED: dict[str, str] = {
    "dbrx": "unsupported: its decoder layers are transformer.blocks.N (not model.layers.N, on disk and in memory), "
            "its router returns logits only (the FFN block routes: softmax, top-k, then Lp-normalised weights) and "
            "its experts are flattened [E * I, H] matrices (w1, v1 and w2, all [E * I, H]) behind a per-expert GLU "
            "loop, not transformers' experts(hidden_states, top_k_index, top_k_weights) interface",
    "jetmoe": "unsupported: one config key, num_local_experts, sizes both its MLP experts and its attention experts "
              "(mixture of attention heads: JetMoeMoA), so no vanilla config can hold a pruned MLP expert count; its "
              "MLP experts also route through a sorted (index, batch_index, gates, expert_size) router, not transformers' "
              "experts(hidden_states, top_k_index, top_k_weights) interface",
    "deepseek_v4": "unsupported: its first MoE layers route by a frozen token-id to expert-id table (tid2eid, "
                   "hash routing: a dropped expert would still be selected; moeprune's rule would keep those layers' "
                   "experts whole), and its checkpoints store the original DeepSeek names (layers.N.ffn.experts.E.w1/w2/w3, "
                   "embed, head, hc_*; no model. prefix) that transformers renames and fuses on load; the layout does "
                   "not map them yet",
    "zaya": "unsupported: its router is an MLP (down_proj, router_mlp) whose last class is a skip expert: a skip slot "
            "reaches the experts as expert 0 with weight 0, so statistics cannot tell it from expert 0 without "
            "re-deriving the router's choice, and its router hands its hidden state to the next layer "
            "(prev_router_hidden_states)",
    "inkling2_text": "needs engine support: its decoder layers take block_states (the inputs of the previous "
                     "block-boundary layers, which the model body accumulates and passes positionally), and its "
                     "checkpoints store the original names (model.llm.*, w13 interleaved experts, padded vocabulary) "
                     "that transformers renames on load; the layout does not map them yet",
    "inkling2_loop_text": "needs engine support: as inkling2_text (block_states between layers, original "
                          "checkpoint names), and its loop layers run more than once per forward (each pass reads "
                          "the previous pass's messages) with quantised experts that transformers dequantises on load",
}



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

    def router_inputs(self, layer: nn.Module, hidden_states: torch.Tensor) -> tuple:
        """Positional arguments of the router's forward for ``hidden_states`` [T, H] (MiniMax-M2's
        and AFMoE's routers also take the correction bias)."""
        routing = self.spec["routing"]
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
        return int(getattr(self.text_config(config), key, 0) or 0) if key else 0

    def router_scale(self, layer: nn.Module) -> torch.Tensor | None:
        """A learned scalar the router multiplies its weights by (Inkling's ``global_scale``;
        ``[modules] router_scale``), or None."""
        path = self.spec["modules"].get("router_scale")
        if path is None:
            return None
        owner, _, attribute = path.rpartition(".")
        return getattr(_get_path(layer, owner) if owner else layer, attribute)

    def expert_count(self, layer: nn.Module) -> int:
        """Routed experts of a MoE layer as built (the experts module's ``[modules] experts_count``
        attribute, ``num_experts`` by default)."""
        return int(getattr(self.experts(layer), self.spec["modules"].get("experts_count", "num_experts")))

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
        planners for its family (Nemotron-H). Multimodal wrappers (:attr:`text_key`) drop experts only: the
        other ops address the text decoder's tensors by their causal-LM names."""
        if self.text_key and (planner is not None or dynamic_skip):
            what = "dynamic skipping" if dynamic_skip else f"method {method!r}"
            raise MoePruneError(
                f"{self.name}: {what} is not supported for this family: its text decoder sits beside vision/audio "
                f"towers (its config in {self.text_key}), and merging, neuron slicing, the dense "
                "planners (heads, channels, layers) and dynamic skipping address the causal LM's model.layers.N "
                "names; drop experts instead (e.g. method reap or frequency)"
            )
        if self.gate_on_input:
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
        else:
            return
        dense = isinstance(planner, str) and planner.startswith("moeprune.plan.dense:")
        if (planner is not None and not dense) or dynamic_skip:
            what = "dynamic skipping" if dynamic_skip else f"method {method!r}"
            raise MoePruneError(
                f"{self.name}: {what} is not supported for this family: {reason}, so merged experts, sliced "
                "neurons and skipped experts cannot be written exactly; drop experts instead (e.g. method reap or "
                "frequency)"
            )

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
            expert_width=int(getattr(config, self.spec["config"].get("expert_width", "intermediate_size"), 0) or 0),
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


def _config_value(config, key: str) -> Any:
    value = getattr(config, key, None)
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
    return text_model(model).model.layers


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
