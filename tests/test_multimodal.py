"""Multimodal wrappers (``[text] config`` in a routers/ spec): the text decoder of a supported family
nested beside vision/audio towers. The layout reads and writes the decoder under its on-disk prefix,
the writer copies every tower tensor byte for byte and sets the expert counts inside the text config,
and a whole multimodal model in memory is edited through its text decoder (towers kept)."""

from __future__ import annotations

import json

import pytest

from moeprune.arch import Family, extended_spec
from moeprune.errors import MoePruneError
from moeprune.layout import layer_of, split_layer_name
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
