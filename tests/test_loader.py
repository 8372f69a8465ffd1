"""Partial load (moeprune.loader): only the kept experts are read, and the model equals prune-then-load
(for every family: tests/test_conformance.py)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeprune import api
from moeprune.apply import apply_plan_in_memory, write_pruned_checkpoint
from moeprune.errors import MoePruneError, PlanError
from moeprune.loader import KEPT_CONFIG_KEY, expert_nbytes, load_shared_weights, load_with_experts
from moeprune.plan import Plan

IDS = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(3))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_non_uniform_equals_in_memory_slicing(family, tiny_checkpoint):
    checkpoint = tiny_checkpoint(family)
    geometry = api.model_info(checkpoint).geometry
    first, last = geometry.moe_layers[0], geometry.moe_layers[-1]
    if geometry.grouped:  # 16 experts in 4 groups: keep 2 and 3 per group
        kept = {first: [e for e in range(16) if e % 4 < 2], last: [e for e in range(16) if e % 4 != 2]}
    else:
        kept = {first: [0, 3, 5], last: [1, 2, 4, 6, 7]}
    model = load_with_experts(checkpoint, kept)

    reference = AutoModelForCausalLM.from_pretrained(str(checkpoint), local_files_only=True).eval()
    for layer, experts in kept.items():  # one single-layer (hence uniform) plan at a time
        apply_plan_in_memory(reference, Plan(layers={layer: experts}, method="manual"))
    assert torch.equal(_logits(model), _logits(reference))
    assert [model.model.layers[layer].mlp.experts.num_experts for layer in (first, last)] == [len(kept[first]), len(kept[last])]
    expected = {str(layer): kept.get(layer, list(range(geometry.num_experts))) for layer in geometry.moe_layers}
    assert getattr(model.config, KEPT_CONFIG_KEY) == expected
    with pytest.raises(MoePruneError, match="cannot describe"):
        model.save_pretrained("/nonexistent/never-written")


def test_layers_absent_keep_all_experts_and_generate(tiny_checkpoint):
    checkpoint = tiny_checkpoint("mixtral")
    full = AutoModelForCausalLM.from_pretrained(str(checkpoint), local_files_only=True).eval()
    model = load_with_experts(checkpoint, {})
    assert torch.equal(_logits(model), _logits(full))
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(IDS[:1], **options), full.generate(IDS[:1], **options))


def test_shared_weights_share_storage(tiny_checkpoint, read_log):
    checkpoint = tiny_checkpoint("qwen2_moe")
    shared = load_shared_weights(checkpoint)
    read_log.clear()
    a = load_with_experts(checkpoint, {1: [0, 1, 2, 3]}, shared=shared)
    b = load_with_experts(checkpoint, {1: [4, 5, 6, 7], 2: [0, 2]}, shared=shared)
    # with shared weights, nothing but routers and experts is read
    assert read_log and all(".mlp.experts." in name or name.endswith(".mlp.gate.weight") for name, _ in read_log)
    assert torch.equal(_logits(a), _logits(load_with_experts(checkpoint, {1: [0, 1, 2, 3]})))
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert set(shared.tensors) <= set(pa)
    for name in shared.tensors:
        assert pa[name].data_ptr() == pb[name].data_ptr() == shared.tensors[name].data_ptr()
    assert pa["model.layers.1.mlp.experts.down_proj"].data_ptr() != pb["model.layers.1.mlp.experts.down_proj"].data_ptr()
    assert "model.layers.1.mlp.gate.weight" not in shared.tensors
    assert "model.layers.1.mlp.shared_expert.up_proj.weight" in shared.tensors
    assert shared.nbytes == sum(t.numel() * 4 for t in shared.tensors.values())


def test_expert_nbytes_matches_loaded_tensors(tiny_checkpoint):
    checkpoint = tiny_checkpoint("deepseek_v3")
    kept = {1: [0, 1, 4, 5, 8, 9, 12, 13]}
    model = load_with_experts(checkpoint, kept)
    shared = load_shared_weights(checkpoint)
    loaded = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if n not in shared.tensors)
    assert expert_nbytes(checkpoint, kept) == loaded


def test_collapse_groups_equals_pruned_checkpoint(tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint("deepseek_v3")
    kept = {layer: [0, 1, 2, 3, 5, 9] for layer in (1, 2)}  # unequal per group: needs collapse
    with pytest.raises(PlanError, match="collapse"):
        load_with_experts(checkpoint, kept)
    plan = Plan(layers=kept, method="manual", collapse_groups=True)
    out = write_pruned_checkpoint(checkpoint, plan, tmp_path / "pruned", progress=False)
    reference = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    model = load_with_experts(checkpoint, kept, collapse_groups=True)
    assert torch.equal(_logits(model), _logits(reference))
    assert model.config.n_group == 1 and model.model.layers[1].mlp.gate.num_group == 1


@pytest.mark.parametrize(
    "kept, message",
    [
        ({1: [0]}, "top_k=2"),
        ({1: [0, 0, 1]}, "more than once"),
        ({1: [0, 8]}, r"indices must be in \[0, 8\)"),
        ({7: [0, 1]}, "not a MoE layer"),
        ({1: "01"}, "must list"),
        ({"one": [0, 1]}, "must be an integer"),
        ({1: [0.5, 1]}, "must be an integer"),
    ],
)
def test_bad_kept_fails_before_reading(tiny_checkpoint, read_log, kept, message):
    with pytest.raises(PlanError, match=message):
        load_with_experts(tiny_checkpoint("mixtral"), kept)
    assert read_log == []


def test_bad_inputs(tiny_checkpoint, tmp_path):
    mixtral, olmoe = tiny_checkpoint("mixtral"), tiny_checkpoint("olmoe")
    with pytest.raises(MoePruneError, match="no config.json"):
        load_with_experts(tmp_path, {})
    shared = load_shared_weights(olmoe)
    with pytest.raises(MoePruneError, match="load_shared_weights on this checkpoint"):
        load_with_experts(mixtral, {}, shared=shared)
    with pytest.raises(MoePruneError, match="same dtype"):
        load_with_experts(olmoe, {}, shared=shared, dtype=torch.bfloat16)
    # a checkpoint missing one kept expert's tensor
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in mixtral.iterdir():
        (broken / item.name).symlink_to(item)
    (broken / "config.json").unlink()
    config = json.loads((mixtral / "config.json").read_text())
    config["num_hidden_layers"] = 4
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoePruneError, match="lacks"):
        load_with_experts(broken, {})
