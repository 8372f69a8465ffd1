"""Multimodal wrappers (``[text] config`` in a routers/ spec): the text decoder of a supported family
nested beside vision/audio towers. The layout reads and writes the decoder under its on-disk prefix,
the writer copies every tower tensor byte for byte and sets the expert counts inside the text config,
and a whole multimodal model in memory is edited through its text decoder (towers kept)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import all_tensors, logits_of, vanilla
from moeprune import api
from moeprune.apply import apply_plan_in_memory, save_in_memory_pruned, write_pruned_checkpoint
from moeprune.arch import Family, extended_spec, known_families, text_config_of, text_model
from moeprune.errors import MoePruneError
from moeprune.layout import family_layout, layer_of, split_layer_name
from moeprune.ops.edit import Edit
from moeprune.write import write_config


def test_decoder_layer_names_under_a_prefix():
    """Decoder layers nested in a multimodal checkpoint are layers; a tower's own layers are not."""
    assert split_layer_name("model.language_model.layers.3.mlp.gate.weight") == ("model.language_model", 3, "mlp.gate.weight")
    assert layer_of("language_model.model.layers.12.feed_forward.router.weight") == 12
    assert layer_of("model.layers.2.x") == 2 and layer_of("backbone.layers.2.x") == 2
    for tower in ("vision_model.model.layers.0.mlp.fc1.weight", "model.visual.blocks.0.attn.qkv.weight",
                  "model.language_model.norm.weight", "model.layers.x.y"):
        assert layer_of(tower) is None, tower
    edit = Edit(dropped_layers={1})
    assert edit.renumber("model.language_model.layers.3.mlp.gate.weight") == "model.language_model.layers.2.mlp.gate.weight"
    assert edit.renumber("model.language_model.layers.1.mlp.gate.weight") is None
    assert edit.renumber("model.visual.blocks.3.norm1.weight") == "model.visual.blocks.3.norm1.weight"


def test_expert_counts_go_into_the_text_config(tmp_path):
    """write_config sets the values (and the aliases the sub-config uses) in the sub-config only."""
    source = {"model_type": "qwen3_5_moe", "num_experts": 99,  # a top-level key of that name is not the decoder's
              "text_config": {"model_type": "deepseek_v2", "n_routed_experts": 8, "num_experts": 8, "hidden_size": 32}}
    write_config(tmp_path / "config.json", source, {"n_routed_experts": 4}, sub_config="text_config")
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["num_experts"] == 99 and written["model_type"] == "qwen3_5_moe"
    assert written["text_config"] == {**source["text_config"], "n_routed_experts": 4, "num_experts": 4}


def test_extends_merges_the_named_spec():
    """A spec with ``extends`` is the named spec with its own tables merged in key by key."""
    base = {"family": "base", "model_types": ["base"], "routing": {"rule": "softmax_topk"},
            "disk": {"router": ["mlp.gate.weight"], "expert_layout": "fused"}}
    families = {"base": Family("base", ("base",), "", base)}
    wrapper = {"family": "wrap", "model_types": ["wrap"], "extends": "base", "text": {"config": "text_config"},
               "disk": {"model_prefix": "model.language_model."}}
    merged = extended_spec(wrapper, families)
    assert merged["routing"] == base["routing"] and merged["family"] == "wrap" and merged["text"] == wrapper["text"]
    assert merged["disk"] == {**base["disk"], "model_prefix": "model.language_model."}
    assert base["disk"] == {"router": ["mlp.gate.weight"], "expert_layout": "fused"}  # not modified
    families["wrap"] = Family("wrap", ("wrap",), "", merged | {"extends": "base"})
    with pytest.raises(MoePruneError, match="extends"):
        extended_spec({"family": "x", "extends": "wrap"}, families)
    with pytest.raises(MoePruneError, match="extends"):
        extended_spec({"family": "x", "extends": "no_such_family"}, families)


def test_wrapper_layout_maps_the_text_decoder():
    layout = family_layout("qwen3_5_moe")
    assert layout.router_keys(1) == ["model.language_model.layers.1.mlp.gate.weight"]
    assert layout.expert_file(2, 5, "up") == "model.language_model.layers.2.mlp.experts.5.up_proj.weight"
    assert layout.memory_name("model.language_model.layers.2.mlp.gate.weight") == "model.layers.2.mlp.gate.weight"
    assert layout.memory_name("model.language_model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert layout.disk_name("model.norm.weight") == "model.language_model.norm.weight"
    assert layout.disk_name("lm_head.weight") == "lm_head.weight"
    assert layout.is_text_tensor("lm_head.weight") and layout.is_text_tensor("model.language_model.norm.weight")
    assert not layout.is_text_tensor("model.visual.blocks.0.attn.qkv.weight")
    llama4 = family_layout("llama4")  # the whole causal LM under language_model.
    assert llama4.router_keys(1) == ["language_model.model.layers.1.feed_forward.router.weight"]
    assert llama4.fused_keys(1) == ["language_model.model.layers.1.feed_forward.experts.gate_up_proj",
                                    "language_model.model.layers.1.feed_forward.experts.down_proj"]
    assert llama4.memory_name("language_model.lm_head.weight") == "lm_head.weight"
    assert llama4.disk_name("lm_head.weight") == "language_model.lm_head.weight"
    assert llama4.disk_name("model.norm.weight") == "language_model.model.norm.weight"
    assert llama4.is_text_tensor("language_model.lm_head.weight")
    assert not llama4.is_text_tensor("vision_model.model.layers.0.mlp.fc1.weight")
    dots = family_layout("dots3_note")  # transformers saves the decoder under its causal-LM names
    assert dots.router_keys(1) == family_layout("dots3_note_text").router_keys(1)
    assert not dots.is_text_tensor("vision_encoder.blocks.0.mlp.experts.0.fc1.weight")


def test_text_config_of_a_wrapper(tiny_checkpoint):
    model = vanilla(tiny_checkpoint("qwen3_5_moe"))
    family = known_families()["qwen3_5_moe"]
    assert text_config_of(model.config) is model.config.text_config
    assert family.text_config(model.config.text_config) is model.config.text_config
    assert family.num_experts(model.config) == 8 and family.top_k(model.config) == 2
    view = text_model(model)
    assert view.model is model.model.language_model and view.lm_head is model.lm_head
    assert text_model(view.model) is view.model  # not a wrapper


def test_wrapper_drops_experts_only(tiny_checkpoint, family_stats):
    """Merges, neuron slices and the dense planners address causal-LM names: refused before any read."""
    source = tiny_checkpoint("qwen3_5_moe")
    for method in ("m_smoe", "random_neuron", "angular"):
        with pytest.raises(MoePruneError, match="beside vision/audio towers"):
            api.plan_pruning(source, method=method, ratio=0.5, stats=family_stats("qwen3_5_moe"))


@pytest.mark.parametrize("family_name", ["qwen3_5_moe", "qwen4_exp", "dots3_note", "llama4"])
def test_whole_multimodal_model_in_memory_keeps_its_towers(family_name, tiny_checkpoint, tmp_path):
    """A whole multimodal model (its own class) pruned in memory: the towers are untouched, the text logits
    are the streamed output's, and its save equals the streamed checkpoint tensor for tensor."""
    source = tiny_checkpoint(family_name)
    plan = api.plan_pruning(source, method="random", seed=3, ratio=0.5)
    streamed = write_pruned_checkpoint(source, plan, tmp_path / "streamed", progress=False)
    model = vanilla(source)
    text = known_families()[family_name].spec["text"]  # the decoder's in-memory paths in the wrapper
    towers = {name: tensor.clone() for name, tensor in model.state_dict().items()
              if not name.startswith((text["body"] + ".", text["head"] + "."))}
    assert towers
    assert apply_plan_in_memory(model, plan) is model
    after = model.state_dict()
    assert all(torch.equal(after[name], tensor) for name, tensor in towers.items())
    assert torch.equal(logits_of(model), logits_of(vanilla(streamed)))
    saved = save_in_memory_pruned(model, source, plan, tmp_path / "in_memory")
    a, b = all_tensors(streamed), all_tensors(saved)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    source_tensors = all_tensors(source)
    assert all(torch.equal(a[name], source_tensors[name]) for name in source_tensors
               if not known_families()[family_name].layout.is_text_tensor(name))
    volatile = {"transformers_version", "_name_or_path"}
    configs = [json.loads((out / "config.json").read_text()) for out in (streamed, saved)]
    assert [{k: v for k, v in c.items() if k not in volatile} for c in configs][0] == \
        [{k: v for k, v in c.items() if k not in volatile} for c in configs][1]


def test_per_layer_counts_of_a_wrapper_load_with_moeprune(tiny_checkpoint, tmp_path):
    """A plan keeping different counts per layer writes its moeprune section inside the text config;
    moeprune.load reads it there and equals the partial load of the same experts; vanilla transformers
    refuses the output (its router rows do not fit the config)."""
    import moeprune
    from moeprune.calibration.engine import load_full_model

    source = tiny_checkpoint("qwen3_5_moe")
    counts = {0: 8, 1: 2, 2: 6}
    plan = api.prune(source, tmp_path / "out", method="random", per_layer=counts, seed=1, progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["text_config"]["moeprune"] == {"format": 1, "experts_per_layer": {str(k): v for k, v in counts.items()}}
    assert "moeprune" not in config and config["text_config"]["num_experts"] == 8
    loaded = moeprune.load(tmp_path / "out")
    partial = moeprune.load_with_experts(source, plan.layers)
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, partial(input_ids=ids).logits)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        load_full_model(tmp_path / "out")
