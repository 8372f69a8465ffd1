"""``moeprune.load`` and the ``moeprune`` section of config.json (:mod:`moeprune.structure`)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import moeprune
from moeprune.calibration.engine import load_full_model
from moeprune.errors import MoePruneError
from moeprune.layout import model_experts_module
from moeprune.structure import HANDLERS, SECTION, StructureHandler, ordered_keys, read_section, register_structure, section_config


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _with_section(source, folder, section):
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    config[SECTION] = section
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def handler():
    """A throwaway handler ``test_scale``: claims MoE layer 1's experts, fills them from the
    checkpoint scaled by ``value``, and marks the model in ``finish``."""
    from moeprune.arch import family_for_model_type

    def prepare(model, family, value):
        prefix = family.layout.memory_experts_prefix(1)
        return {name for name in model.state_dict() if name.startswith(prefix)}

    def fill(model, layout, value, dtype):
        from moeprune.layout import set_model_tensor

        state = {name: t for name, t in layout.read_layer_experts(1, range(layout.num_experts(1)), dtype).items()
                 if name.startswith(layout.family.memory_experts_prefix(1))}
        for name, tensor in state.items():
            set_model_tensor(model, name, tensor * value)
        return set(state)

    def finish(model, family, value):
        model.test_scale_finished = value

    registered = register_structure(StructureHandler("test_scale", prepare, fill, finish))
    assert family_for_model_type("mixtral") is not None
    yield registered
    del HANDLERS["test_scale"]


def test_vanilla_checkpoint_loads_as_transformers_does(tiny_checkpoint):
    source = tiny_checkpoint("mixtral")
    ids = torch.arange(12).reshape(2, 6)
    assert torch.equal(_logits(moeprune.load(source), ids), _logits(load_full_model(source), ids))


def test_section_handler_prepares_fills_and_finishes(tiny_checkpoint, tmp_path, handler):
    source = tiny_checkpoint("mixtral")
    folder = _with_section(source, tmp_path / "scaled", {"format": 1, "test_scale": 1.0})
    model = moeprune.load(folder)
    ids = torch.arange(12).reshape(2, 6)
    reference = load_full_model(source)
    assert torch.equal(_logits(model, ids), _logits(reference, ids))  # scale 1: the same model
    assert model.test_scale_finished == 1.0
    assert getattr(model.config, SECTION) == {"format": 1, "test_scale": 1.0}

    doubled = moeprune.load(_with_section(source, tmp_path / "doubled", {"format": 1, "test_scale": 2.0}))
    fam = reference.config.model_type
    from moeprune.arch import family_for_model_type

    family = family_for_model_type(fam)
    got = model_experts_module(doubled, family, 1).gate_up_proj
    assert torch.equal(got, 2 * model_experts_module(reference, family, 1).gate_up_proj)
    assert torch.equal(model_experts_module(doubled, family, 0).gate_up_proj,
                       model_experts_module(reference, family, 0).gate_up_proj)


@pytest.mark.parametrize("section, message", [
    ({"format": 2, "x": 1}, "format 2"),
    ({"format": 1, "no_such_key": 1}, "no_such_key"),
    ([1, 2], "must be an object"),
])
def test_unknown_sections_are_refused(tiny_checkpoint, tmp_path, section, message):
    folder = _with_section(tiny_checkpoint("mixtral"), tmp_path / "bad", section)
    with pytest.raises(MoePruneError, match=message):
        moeprune.load(folder)


def test_section_helpers(handler):
    assert read_section({}) == {}
    assert section_config({"test_scale": 3}) == {SECTION: {"format": 1, "test_scale": 3}}
    with pytest.raises(MoePruneError, match="no structure handler"):
        section_config({"other": 1})
    with pytest.raises(ValueError, match="already registered"):
        register_structure(StructureHandler("test_scale"))
    register_structure(StructureHandler("test_first"))
    register_structure(StructureHandler("test_after", after=("test_first",)))
    try:
        assert ordered_keys({"test_after": 1, "test_first": 1}) == ["test_first", "test_after"]
    finally:
        del HANDLERS["test_first"], HANDLERS["test_after"]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_per_layer_expert_counts_round_trip(family, tiny_checkpoint, tmp_path):
    """A plan keeping different numbers of experts per layer writes the largest count in the stock
    keys and the per-layer counts in the section; ``moeprune.load`` equals the partial load of the
    same experts; vanilla transformers refuses it (its router rows do not fit the config)."""
    from moeprune import api
    from moeprune.api import model_info

    source = tiny_checkpoint(family)
    info = model_info(source)
    layers = info.geometry.moe_layers
    top_k = info.geometry.top_k
    counts = {layer: info.geometry.num_experts - (i % 2) * (info.geometry.num_experts - top_k) for i, layer in enumerate(layers)}
    assert len(set(counts.values())) == 2
    plan = api.prune(source, tmp_path / "out", method="random", per_layer=counts, seed=1)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config[SECTION] == {"format": 1, "experts_per_layer": {str(k): v for k, v in counts.items()}}
    loaded = moeprune.load(tmp_path / "out")
    partial = moeprune.load_with_experts(source, plan.layers)
    ids = torch.arange(12).reshape(2, 6) % loaded.config.vocab_size
    assert torch.equal(_logits(loaded, ids), _logits(partial, ids))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        load_full_model(tmp_path / "out")
    from moeprune.evaluation import load_checkpoint

    evaluated, _ = load_checkpoint(tmp_path / "out")  # evaluation loads it through moeprune.load
    assert torch.equal(_logits(evaluated, ids), _logits(loaded, ids))
