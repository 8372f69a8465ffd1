"""The conformance suite: the same six guarantees for every family that has a routers/*.toml spec
(issue 14). It is generated from the spec list: a spec without a tiny config (moeprune/tiny.py) fails
the first test, and every other test is parametrised over all families.

1. moeprune's routing (moeprune.routing) equals the model's own router output bitwise on random inputs.
2. Pruning nothing changes nothing (identical logits and byte-identical tensors).
3. A 50% REAP (and frequency) prune loads in vanilla transformers with no missing or unexpected keys;
   every kept expert's tensors and router rows (weight, bias, correction bias) equal the original's
   at the kept indices; its logits equal the original model with the dropped experts masked out of
   routing. A family whose expert-count key also sizes modules moeprune keeps whole (``[config]
   num_experts_shared_with``: JetMoE's attention experts) writes its counts in the ``moeprune`` section:
   vanilla transformers must refuse the output loudly and ``moeprune.load`` give those logits.
4. Sequential and whole-model statistics are identical (packed and padded data, activations on disk).
5. Streaming and in-memory apply give identical tensors and expert-count config keys.
6. Partial load (``load_with_experts``) equals prune-then-load, reading only the kept experts.

Extra cases of one family (config overrides, bf16 routing, collapsed groups) stay in test_core.py.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import (
    PRUNE_CASES,
    REPO,
    SEQ_LEN,
    all_tensors,
    as_loaded_in,
    assert_output_folder,
    assert_routing_is_the_models,
    assert_same_stats,
    check_expert_counts_in_config,
    check_vanilla_case,
    load_output,
    logits_of,
    model_inputs,
    moe_layers,
    num_experts_in_config,
    patch_routers,
    per_group_counts,
    router_spec,
    uniform_kept,
    vanilla,
)
from moeprune import api
from moeprune.loader import load as moeprune_load
from moeprune.apply import apply_plan_in_memory, save_in_memory_pruned, write_pruned_checkpoint
from moeprune.arch import UNSUPPORTED, build_skeleton, config_value, family_for_model_type, known_families, moe_layer_indices, read_config
from moeprune.calibration import engine
from moeprune.calibration.data import read_texts, tokenize_and_pack
from moeprune.calibration.engine import collect_stats, load_full_model
from moeprune.errors import CheckpointError, MoePruneError, UnknownFamilyError
from moeprune.io.checkpoint import LazyCheckpoint
from moeprune.layout import CheckpointLayout, TransformersConversions, family_layout
from moeprune.loader import KEPT_CONFIG_KEY, load_with_experts
from moeprune.plan import PLAN_FILENAME, Plan
from moeprune.routing import RoutingParams, route
from moeprune.tiny import TINY_FAMILIES, build_tiny_model

FAMILIES = sorted(known_families())


def test_every_spec_has_a_tiny_config():
    """The suite covers every spec: each routers/*.toml family has a tiny model, and vice versa."""
    assert set(FAMILIES) == set(TINY_FAMILIES)
    for name in FAMILIES:
        model = build_tiny_model(name)
        family, layers = moe_layers(model)
        assert family.name == name and layers


# --------------------------------------------------------------------------------------------------
# 1. routing is bitwise the model's


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family_name", FAMILIES)
def test_routing_equals_the_model_router(family_name, dtype):
    assert_routing_is_the_models(as_loaded_in(build_tiny_model(family_name), dtype))


# --------------------------------------------------------------------------------------------------
# 2. pruning nothing changes nothing


def test_pruning_nothing_changes_nothing(family_checkpoint, tmp_path):
    family_name, source = family_checkpoint
    reference = logits_of(vanilla(source))

    out = tmp_path / "ratio0"
    plan = api.prune(source, out, method="random", ratio=0.0, progress=False)
    num = known_families()[family_name].num_experts(vanilla(source).config)
    assert plan.layers and all(kept == list(range(num)) for kept in plan.layers.values())
    assert_output_folder(out, plan, source)
    assert num_experts_in_config(family_name, json.loads((out / "config.json").read_text())) == [num] * len(
        known_families()[family_name].num_experts_keys
    )
    assert torch.equal(logits_of(vanilla(out)), reference)

    # applying a plan that keeps every expert (the saved one) is the identity too
    applied = tmp_path / "applied"
    api.apply(source, out / PLAN_FILENAME, applied, progress=False)
    assert torch.equal(logits_of(vanilla(applied)), reference)
    before = all_tensors(source)
    for folder in (out, applied):  # byte-identical weights under the same names
        after = all_tensors(folder)
        assert after.keys() == before.keys()
        assert all(after[key].dtype == before[key].dtype and torch.equal(after[key], before[key]) for key in before)


# --------------------------------------------------------------------------------------------------
# 3. a 50% prune is a vanilla checkpoint holding the kept experts, equal to the masked original


def assert_kept_tensors_equal(family_name: str, source, out, plan: Plan) -> None:
    """Every kept expert's canonical tensors and the router rows equal the original's at the kept indices."""
    family = known_families()[family_name]
    layers = sorted(plan.layers)
    before = CheckpointLayout.build(family, LazyCheckpoint(source), layers)
    after = CheckpointLayout.build(family, LazyCheckpoint(out), layers)
    if family.text_key:  # a multimodal wrapper: every tower tensor byte-identical, under its own name
        towers = [name for name in before.checkpoint.keys() if not family.layout.is_text_tensor(name)]
        assert towers and towers == [name for name in after.checkpoint.keys() if not family.layout.is_text_tensor(name)]
        for name in towers:
            a, b = before.checkpoint.get(name), after.checkpoint.get(name)
            assert a.dtype == b.dtype and torch.equal(a, b), name
    for layer, kept in plan.layers.items():
        assert after.num_experts(layer) == len(kept)
        for new, old in enumerate(kept):
            for proj in family.layout.projections:
                assert torch.equal(after.read_expert(layer, new, proj), before.read_expert(layer, old, proj)), (layer, old, proj)
        identity = before.layers[layer].identity_rows()  # LongCat-Flash: identity experts after the kept ones
        assert after.layers[layer].identity_rows() == list(range(len(kept), len(kept) + len(identity)))
        for old in identity:  # the identity experts' (unused) gate/up rows are kept
            new = old - before.num_experts(layer) + len(kept)
            for proj in ("gate", "up"):
                assert torch.equal(after.read_expert(layer, new, proj), before.read_expert(layer, old, proj))
        assert after.layers[layer].router == before.layers[layer].router
        for name in before.layers[layer].router:  # kept rows along the expert axis (ERNIE-4.5's [1, E] bias: 1), then
            expected = before.read_router_rows(name, before.router_rows(layer, name, kept))  # any tail rows (LongCat, Inkling)
            assert torch.equal(after.checkpoint.get(name), expected), name


@pytest.mark.parametrize("family_name,method", PRUNE_CASES)
def test_pruned_checkpoint_is_vanilla_and_equals_masked_original(family_name, method, vanilla_pruned, tiny_checkpoint):
    case = vanilla_pruned[f"{family_name}-{method}"]
    config = check_vanilla_case(case, tiny_checkpoint)
    plan = case["plan"]
    source = tiny_checkpoint(family_name)
    num = known_families()[family_name].num_experts(vanilla(source).config)
    assert plan.method == method
    assert all(len(kept) == num // 2 for kept in plan.layers.values())
    assert_kept_tensors_equal(family_name, source, case["out"], plan)
    if family_name == "deepseek_v3":  # 16 experts in 4 groups, keep 8: every group keeps 2
        assert config["n_group"] == 4 and config["topk_group"] == 2
        assert all(per_group_counts(kept, 4, 4) == [2, 2, 2, 2] for kept in plan.layers.values())


# --------------------------------------------------------------------------------------------------
# 4. sequential == whole-model statistics


@pytest.mark.parametrize("family_name", FAMILIES)
def test_sequential_and_whole_statistics_are_identical(family_name, tiny_checkpoint, calibration, calib_file, tmp_path, monkeypatch):
    source = tiny_checkpoint(family_name)
    family = known_families()[family_name]
    top_k = family.top_k(vanilla(source).config)
    packed = calibration(family_name)
    tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    padded = tokenize_and_pack(read_texts(calib_file), tokenizer, seq_len=SEQ_LEN, samples=6, seed=3, pack=False)
    lengths = padded.attention_mask.sum(dim=1)
    assert (lengths < SEQ_LEN).any() and (lengths > 0).all()  # some rows are padded

    offload = tmp_path / "activations"
    on_disk = []
    original_setitem = engine.ActivationStore.__setitem__

    def spy(self, index, tensor):
        original_setitem(self, index, tensor)
        on_disk.append(isinstance(self._items[index], str))

    monkeypatch.setattr(engine.ActivationStore, "__setitem__", spy)

    for batch, options in ((packed, {}), (padded, {"offload_dir": offload})):
        on_disk.clear()
        whole = collect_stats(source, batch, mode="whole", batch_size=2, progress=False)
        sequential = collect_stats(source, batch, mode="sequential", batch_size=2, progress=False, **options)
        assert_same_stats(whole, sequential)
        assert on_disk and any(on_disk) == ("offload_dir" in options)
        for layer, entries in whole.layers.items():  # padding never counts; Inkling-2-Loop's looped layers sum their passes
            tokens = batch.num_tokens * engine.layer_passes(family, vanilla(source).config, layer)
            assert entries["tokens"].item() == tokens
            if family.layout.identity_experts:  # LongCat-Flash: identity-expert slots are not counted (some were picked)
                assert 0 < entries["frequency"].sum().item() < tokens * top_k
            elif family.skip_class:  # ZAYA: skip slots are not counted (test_zaya.py counts them exactly)
                assert 0 < entries["frequency"].sum().item() <= tokens * top_k
            else:
                assert entries["frequency"].sum().item() == tokens * top_k
            assert torch.equal(entries["coactivation"].diagonal(), entries["frequency"])
        assert whole.metadata["data_hash"] == batch.data_hash
    assert offload.is_dir() and not any(offload.iterdir())  # the on-disk activations were removed


# --------------------------------------------------------------------------------------------------
# 5. streaming apply == in-memory apply

APPLY_CASES = [(name, {"ratio": 0.5}) for name in FAMILIES] + [("deepseek_v3", {"keep": 6, "collapse_groups": True})]


@pytest.mark.parametrize("family_name,budget", APPLY_CASES, ids=[f"{n}-{'-'.join(map(str, b.values()))}" for n, b in APPLY_CASES])
def test_streaming_and_in_memory_apply_are_identical(family_name, budget, tiny_checkpoint, tmp_path):
    source = tiny_checkpoint(family_name)
    family = known_families()[family_name]
    plan = api.plan_pruning(source, method="random", seed=5, **budget)

    streamed = write_pruned_checkpoint(source, plan, tmp_path / "streamed", progress=False)
    model = load_full_model(source)
    apply_plan_in_memory(model, plan)
    in_memory = save_in_memory_pruned(model, source, plan, tmp_path / "in_memory")

    a, b = all_tensors(streamed), all_tensors(in_memory)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    written = CheckpointLayout.build(family, LazyCheckpoint(streamed), sorted(plan.layers))
    assert any(written.owner(key) is not None for key in a)  # routed experts are among the tensors

    config_a = json.loads((streamed / "config.json").read_text())
    config_b = json.loads((in_memory / "config.json").read_text())
    toml_keys = router_spec(family_name)["config"]["num_experts"]
    assert toml_keys == family.num_experts_keys
    if family_name == "qwen3_moe":
        assert {"num_experts", "num_local_experts"} <= set(toml_keys)
    for config in (config_a, config_b):  # every key old and new transformers read (or the moeprune section;
        # a multimodal wrapper: in its text config)
        check_expert_counts_in_config(family_name, config, {k: len(v) for k, v in plan.layers.items()}, plan.num_experts)
        if budget.get("collapse_groups"):
            assert config["n_group"] == 1 and config["topk_group"] == 1
    volatile = {"transformers_version", "_name_or_path"}
    assert stable_config(config_a, volatile) == stable_config(config_b, volatile)
    for out in (streamed, in_memory):
        assert_output_folder(out, plan, source)
    assert torch.equal(logits_of(load_output(family_name, streamed)), logits_of(load_output(family_name, in_memory)))


def stable_config(config: dict, volatile: set[str]) -> dict:
    """config.json without its ``volatile`` keys, nor the ``dtype`` of nested sub-configs (DBRX's attn_config /
    ffn_config: transformers' save_pretrained of a model loaded in float32 writes it there, the source has null)."""
    return {k: ({kk: vv for kk, vv in v.items() if kk != "dtype"} if isinstance(v, dict) else v)
            for k, v in config.items() if k not in volatile}


# --------------------------------------------------------------------------------------------------
# 6. partial load == prune, save, load


def test_partial_load_equals_prune_save_load(family_checkpoint, tmp_path, read_log):
    family, checkpoint = family_checkpoint
    info = api.model_info(checkpoint)
    kept = uniform_kept(info.geometry)
    plan = Plan(layers=kept, method="manual", family=info.geometry.family, num_experts=info.geometry.num_experts)
    out = write_pruned_checkpoint(checkpoint, plan, tmp_path / "pruned", progress=False)
    reference = load_output(family, out)  # vanilla from_pretrained (moeprune.load where the family needs it)

    read_log.clear()
    model = load_with_experts(checkpoint, kept)
    reads = list(read_log)

    assert torch.equal(logits_of(model), logits_of(reference))
    assert not model.training
    config = model.config.to_dict()  # nested sub-configs as dicts (DBRX's ffn_config)
    config.update({key: config_value(model.config, key) for key in info.family.num_experts_keys if "." not in key})
    check_expert_counts_in_config(family, config, {k: len(v) for k, v in kept.items()}, info.geometry.num_experts)
    assert getattr(model.config, KEPT_CONFIG_KEY) == {str(k): v for k, v in kept.items()}
    # only kept experts were read; router and fused tensors only their kept rows; each tensor once
    names = [name for name, _ in reads]
    assert len(names) == len(set(names))
    layout = CheckpointLayout.build(info.family, LazyCheckpoint(checkpoint), info.geometry.moe_layers)
    dropped_files = set()
    for layer, experts in kept.items():
        entry = layout.layers[layer]
        if entry.per_expert:
            read_experts = {e for e, files in entry.per_expert.items() if set(files.values()) <= set(names)}
            assert read_experts == set(experts)
            dropped_files.update(f for e, files in entry.per_expert.items() if e not in experts for f in files.values())
        for key in entry.router + entry.fused:  # a router tensor with experts along axis 1 ([1, E]) is read whole
            whole = key in entry.router and layout.family.router_axis(key) != 0
            # + tail rows (LongCat, Inkling); DBRX's flattened experts: their row blocks
            rows = layout.router_rows(layer, key, experts) if key in entry.router else layout.expert_block_rows(layer, key, experts)
            assert dict(reads)[key] == (None if whole else tuple(rows))
    all_keys = set(LazyCheckpoint(checkpoint).keys())
    if info.family.text_key:  # a multimodal wrapper: the towers are not the text decoder's, not read
        all_keys = {key for key in all_keys if layout.family.is_text_tensor(key)}
    assert set(names) == all_keys - dropped_files


# --------------------------------------------------------------------------------------------------
# layout and routing extensions made for the new families, by hand


def test_disk_renames_map_single_tensors_to_memory():
    layout = family_layout("exaone_moe")
    assert layout.memory_name("model.layers.2.mlp.e_score_correction_bias") == "model.layers.2.mlp.gate.e_score_correction_bias"
    assert layout.memory_name("mlp.e_score_correction_bias") == "mlp.gate.e_score_correction_bias"
    assert layout.memory_name("model.layers.2.mlp.gate.weight") == "model.layers.2.mlp.gate.weight"
    assert layout.router_keys(2) == ["model.layers.2.mlp.gate.weight", "model.layers.2.mlp.e_score_correction_bias"]


def test_sigmoid_topk_by_hand():
    """MiniMax-M2: choose on sigmoid + bias, weigh by the unbiased sigmoid, renormalise."""
    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0]])
    bias = torch.tensor([0.0, 0.0, 3.0, 0.0])
    params = RoutingParams(rule="sigmoid_topk", top_k=2, renormalize=True)
    weights, indices = route(logits, params, bias)
    s = torch.sigmoid(logits[0])
    assert sorted(indices[0].tolist()) == [2, 3]  # expert 2 only through its bias
    expected = {2: s[2] / (s[2] + s[3]), 3: s[3] / (s[2] + s[3])}
    for w, e in zip(weights[0], indices[0].tolist()):
        torch.testing.assert_close(w, expected[e], rtol=0, atol=1e-7)
    masked_weights, masked = route(logits, params, bias, expert_mask=torch.tensor([True, True, False, True]))
    assert sorted(masked[0].tolist()) == [1, 3]
    torch.testing.assert_close(masked_weights.sum(), torch.tensor(1.0))


def test_sparsemixer_by_hand():
    """PhiMoE: top-1 by a softmax within the relative threshold 2 eps, then the same on the rest."""
    logits = torch.tensor([[2.0, 1.9, 0.0, -1.0]])
    weights, indices = route(logits, RoutingParams(rule="sparsemixer", top_k=2, jitter_eps=0.5), None)
    e = torch.exp
    # first: gaps (2 - z) / max(|z|, 2) = 0, .05, 1, 1.5; only expert 3 exceeds 2 eps = 1
    w1 = e(torch.tensor(2.0)) / (e(torch.tensor(2.0)) + e(torch.tensor(1.9)) + 1)
    # second, without expert 0: gaps (1.9 - z) / max(|z|, 1.9) = 0, 1, 1.53 for experts 1, 2, 3
    w2 = e(torch.tensor(1.9)) / (e(torch.tensor(1.9)) + 1)
    assert indices.tolist() == [[0, 1]]
    torch.testing.assert_close(weights, torch.stack([w1, w2])[None], rtol=0, atol=1e-6)
    # a small threshold keeps only the maximum: weights 1
    weights, _ = route(logits, RoutingParams(rule="sparsemixer", top_k=2, jitter_eps=0.01), None)
    assert weights.tolist() == [[1.0, 1.0]]
    # the router picks exactly two experts: another top_k cannot be reproduced
    model = build_tiny_model("phimoe")
    model.config.num_experts_per_tok = 3
    with pytest.raises(MoePruneError, match="exactly 2"):
        known_families()["phimoe"].routing_params(model.config)


def test_fused_blocks_under_other_disk_names():
    """GraniteMoE stores the in-memory block under its pre-5.x names on disk."""
    layout = family_layout("granitemoe")
    assert layout.fused_keys(1) == ["model.layers.1.block_sparse_moe.input_linear.weight",
                                    "model.layers.1.block_sparse_moe.output_linear.weight"]
    assert layout.memory_name("model.layers.1.block_sparse_moe.input_linear.weight") == \
        "model.layers.1.block_sparse_moe.experts.gate_up_proj"
    assert layout.memory_name("model.layers.1.block_sparse_moe.router.layer.weight") == \
        "model.layers.1.block_sparse_moe.router.weight"
    assert layout.memory_block_name("output_linear.weight") == "down_proj"
    assert layout.router_keys(1) == ["model.layers.1.block_sparse_moe.router.layer.weight"]


def test_weights_in_hidden_dtype():
    """GraniteMoE: float32 logits, weights = softmax of the top-k logits, cast to the input's dtype."""
    logits = torch.tensor([[0.5, 2.0, 1.0]])
    params = RoutingParams(rule="topk_softmax", top_k=2, weights_in_hidden_dtype=True)
    weights, indices = route(logits, params, None, hidden_dtype=torch.bfloat16)
    assert indices.tolist() == [[1, 2]] and weights.dtype == torch.bfloat16
    assert torch.equal(weights, torch.softmax(torch.tensor([[2.0, 1.0]]), dim=-1).to(torch.bfloat16))
    assert route(logits, params, None)[0].dtype == torch.float32  # no input dtype given: unchanged


# --------------------------------------------------------------------------------------------------
# the family list: refused families name their reason, docs/families.md is current for the specs


def test_refused_families_name_the_reason(monkeypatch):
    """A model type in arch.UNSUPPORTED (none in transformers 5.24.0: a future release's family moeprune knows
    it cannot prune exactly) is refused with its reason; an unknown one with how to add a spec."""
    assert not any(model_type in family.model_types for family in known_families().values() for model_type in UNSUPPORTED)
    monkeypatch.setitem(UNSUPPORTED, "future_moe", "unsupported: its router is new")
    with pytest.raises(UnknownFamilyError, match="'future_moe' cannot be pruned exactly by moeprune: unsupported: its router is new"):
        family_for_model_type("future_moe")
    with pytest.raises(UnknownFamilyError, match="not a supported MoE family.*write routers/<family>.toml"):
        family_for_model_type("another_moe")


def test_family_table_lists_every_spec_and_refusal():
    """The generated table of docs/families.md marks every spec's model types supported and every
    refusal with its reason (scripts/list_moe_families.py --check compares the whole table)."""
    text = (REPO / "docs" / "families.md").read_text(encoding="utf-8")
    text = text.split("<!-- families:begin", 1)[1].split("<!-- families:end -->", 1)[0]  # the generated table
    rows = {line.split("|")[1].strip(): line.split("|")[4].strip() for line in text.splitlines()
            if line.startswith("| ") and line.count("|") == 5}
    for family in known_families().values():
        for model_type in family.model_types:
            assert rows[model_type].startswith("supported"), model_type
    for model_type, reason in UNSUPPORTED.items():
        assert rows[model_type] == reason, model_type


def test_topk_sigmoid_by_hand():
    """Cohere2-MoE, expert_selection_fn = "sigmoid": top-k of the logits, sigmoid of the selected,
    renormalised iff norm_topk_prob."""
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.0]])
    weights, indices = route(logits, RoutingParams(rule="topk_sigmoid", top_k=2, renormalize=True), None)
    s = torch.sigmoid(torch.tensor([2.0, 1.0]))
    assert indices.tolist() == [[1, 3]]
    torch.testing.assert_close(weights[0], s / s.sum(), rtol=0, atol=1e-7)
    weights, _ = route(logits, RoutingParams(rule="topk_sigmoid", top_k=2), None)
    assert torch.equal(weights[0], s)
    masked, masked_indices = route(logits, RoutingParams(rule="topk_sigmoid", top_k=2), None,
                                   expert_mask=torch.tensor([True, False, True, True]))
    assert masked_indices.tolist() == [[3, 0]]
    # Kolibri-1: selection on logits + bias, weights = sigmoid of the unbiased selected logits
    biased, biased_indices = route(logits, RoutingParams(rule="topk_sigmoid", top_k=2), torch.tensor([0.0, 0.0, 4.0, 0.0]))
    assert biased_indices.tolist() == [[2, 1]]
    assert torch.equal(biased[0], torch.sigmoid(torch.tensor([-1.0, 2.0])))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("norm", [True, False])
def test_cohere2_moe_sigmoid_selection_is_the_models(dtype, norm):
    """The config's expert_selection_fn chooses the rule; an unknown one is refused."""
    model = build_tiny_model("cohere2_moe", expert_selection_fn="sigmoid", norm_topk_prob=norm).to(dtype)
    assert known_families()["cohere2_moe"].routing_params(model.config).rule == "topk_sigmoid"
    assert_routing_is_the_models(model)
    model.config.expert_selection_fn = "entmax"
    with pytest.raises(MoePruneError, match="expert_selection_fn='entmax'"):
        known_families()["cohere2_moe"].routing_params(model.config)


def test_laguna_soft_capped_logits_route_as_the_model():
    """Laguna soft-caps the logits inside its router; the rule applies to the router's (capped) logits."""
    model = build_tiny_model("laguna", moe_router_logit_softcapping=0.5)
    family, layers = moe_layers(model)
    params = family.routing_params(model.config)
    x = 3 * torch.randn(50, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for _, layer in layers:
        logits, weights, indices = family.router(layer)(x)
        assert logits.abs().max() <= 0.5
        ours = route(logits, params, family.correction_bias(layer), hidden_dtype=x.dtype)
        assert torch.equal(ours[1], indices) and torch.equal(ours[0], weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lfm2_moe_without_expert_bias_routes_as_the_model(dtype):
    """LFM2-MoE with use_expert_bias = False has no bias buffer: plain sigmoid top-k."""
    model = build_tiny_model("lfm2_moe", use_expert_bias=False).to(dtype)
    family, layers = moe_layers(model)
    assert all(family.correction_bias(layer) is None for _, layer in layers)
    assert_routing_is_the_models(model)


def test_group_fill_zero_by_hand():
    """A.X-K2 fills the experts outside the chosen groups with 0, not -inf: where the biased scores
    inside the chosen group are negative, an expert of another group wins the second slot."""
    logits = torch.tensor([[4.0, 3.0, -6.0, -7.0]])  # groups {0, 1} (chosen: 0.94 > 0.003) and {2, 3}
    bias = torch.tensor([0.0, -1.0, 0.0, 0.0])  # s + b of expert 1 is about -0.05
    params = RoutingParams(rule="deepseek_v3", top_k=2, n_group=2, topk_group=1)
    _, indices = route(logits, params, bias)
    assert sorted(indices[0].tolist()) == [0, 1]  # -inf: both from the chosen group
    zero = dataclasses.replace(params, group_fill=0.0)
    weights, indices = route(logits, zero, bias)
    assert indices[0, 0].item() == 0 and indices[0, 1].item() in (2, 3)  # a 0 beats -0.05
    s = torch.sigmoid(logits[0])
    torch.testing.assert_close(weights[0], torch.stack([s[0], s[indices[0, 1]]]), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Llama 4 (text): the router's weights scale each expert's input (Family.gate_on_input)


def test_selected_sigmoid_float32_by_hand():
    """Llama 4: top-k of the logits, sigmoid of the selected logits in float32 cast back, no renormalisation."""
    logits = torch.tensor([[0.3, 2.0, -1.0, 1.1]], dtype=torch.bfloat16)
    params = RoutingParams(rule="topk_sigmoid", top_k=2, selected_sigmoid_float32=True)
    weights, indices = route(logits, params, None)
    assert indices.tolist() == [[1, 3]] and weights.dtype == torch.bfloat16
    assert torch.equal(weights[0], torch.sigmoid(logits[0, [1, 3]].float()).to(torch.bfloat16))
    masked, masked_indices = route(logits, params, None, expert_mask=torch.tensor([True, False, True, True]))
    assert masked_indices.tolist() == [[3, 0]]
    assert torch.equal(masked[0], torch.sigmoid(logits[0, [3, 0]].float()).to(torch.bfloat16))


def run_instrumented(model, observers: list[str]):
    """Instrument every MoE layer of ``model`` with ``observers``, run it once and check that its logits
    are the uninstrumented model's, bitwise. Returns (each layer's on_routed arguments, the instrumented layers)."""
    from moeprune.collect import InstrumentedLayer, new_observers

    family, layers = moe_layers(model)
    with torch.no_grad():
        reference = model(**model_inputs(), use_cache=False).logits
    seen, instrumented = [], []
    for _, layer in layers:
        inst = InstrumentedLayer(family, layer, new_observers(family, layer, model.config, observers))
        original = inst.on_routed
        inst.on_routed = lambda *args, _original=original, **kwargs: (seen.append(args), _original(*args, **kwargs))
        instrumented.append(inst)
    with torch.no_grad():
        logits = model(**model_inputs(), use_cache=False).logits
    assert torch.equal(logits, reference)
    assert len(seen) == len(layers)
    return seen, instrumented


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_input_gated_block_twin_is_exact(dtype):
    """The collector's twin of Llama 4's MoE block gives the model's logits bitwise; its routed pairs
    (contribution E_j(s x), gate 1) sum to the routed output, and its routing is the router's scores."""
    model = build_tiny_model("llama4_text").to(dtype)
    family, _ = moe_layers(model)
    assert family.gate_on_input
    with torch.no_grad():
        reference = model(**model_inputs(), use_cache=False).logits
    seen, instrumented = run_instrumented(model, ["expert_outputs", "neurons", "shared_outputs", "tcess"])
    top_k = family.top_k(model.config)
    for top_k_index, top_k_weights, pairs, routed in seen:
        assert top_k_index.shape == (40, top_k) and (top_k_weights > 0).all()
        assert torch.equal(pairs.weight, torch.ones_like(pairs.weight))
        summed = torch.zeros_like(routed).index_add_(0, pairs.token, pairs.output)
        assert torch.equal(summed, routed)
        assert pairs.intermediate.shape == (40 * top_k, model.config.intermediate_size)
    for inst in instrumented:
        assert inst.result()["reap_sum"].sum() > 0
        inst.remove()
    with torch.no_grad():
        assert torch.equal(model(**model_inputs(), use_cache=False).logits, reference)  # the hooks are gone


def test_input_gated_family_refuses_what_it_cannot_do(tiny_checkpoint, calibration, family_stats):
    """Every-expert outputs (NAEE), gradients (HEAPr), merges, neuron slices and dynamic skipping are
    refused for Llama 4 before any weight is read, with the reason."""
    from moeprune.skipping import install_dynamic_skip

    source = tiny_checkpoint("llama4_text")
    for observers in (["naee"], ["heapr"]):
        with pytest.raises(MoePruneError, match="scale each expert's input"):
            collect_stats(source, calibration("llama4_text"), observers=observers, progress=False)
    stats = family_stats("llama4_text")
    for method in ("m_smoe", "stun", "random_neuron"):
        with pytest.raises(MoePruneError, match="not supported for this family"):
            api.plan_pruning(source, method=method, ratio=0.5, stats=stats)
    with pytest.raises(MoePruneError, match="dynamic skipping"):
        install_dynamic_skip(vanilla(source), known_families()["llama4_text"], {1: 0.1})
    plan = api.plan_pruning(source, method="reap", ratio=0.5, stats=stats)  # dropping experts is fine
    assert all(len(kept) == 4 for kept in plan.layers.values())


# --------------------------------------------------------------------------------------------------
# LongCat-Flash: zero-computation (identity) experts share the router; they are never pruned


def test_softmax_biased_topk_by_hand():
    """Softmax over routed + identity logits, top-k of p + b, weights = unbiased p x scale; a mask over
    the routed experts leaves the identity experts routable and renormalises the softmax over the rest."""
    logits = torch.tensor([[1.0, 0.0, 2.0, 0.5, 1.5]])  # experts 0..2 routed, 3..4 identity
    bias = torch.tensor([0.0, 0.5, 0.0, 0.0, 0.0])
    params = RoutingParams(rule="softmax_biased_topk", top_k=2, routed_scaling_factor=2.0)
    p = torch.softmax(logits[0], dim=-1)
    weights, indices = route(logits, params, bias)
    assert sorted(indices[0].tolist()) == [1, 2]  # p = .16 .06 .43 .10 .26; p + b = .16 .56 .43 .10 .26
    torch.testing.assert_close(weights[0], 2.0 * p[indices[0]], rtol=0, atol=0)
    masked_weights, masked = route(logits, params, bias, expert_mask=torch.tensor([True, True, False]))
    q = torch.softmax(logits[0, [0, 1, 3, 4]], dim=-1)  # the pruned router: expert 2's row gone
    assert sorted(masked[0].tolist()) == [1, 4]  # q + b = .28 .60 .17 .46 for experts 0, 1, 3, 4 (identity 4 stays)
    expected = {1: 2.0 * q[1], 4: 2.0 * q[3]}
    for w, e in zip(masked_weights[0], masked[0].tolist()):
        torch.testing.assert_close(w, expected[e], rtol=0, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_identity_experts_twin_is_exact(dtype):
    """The collector's twin of LongCat-Flash's experts loop gives the model's logits bitwise; observers
    see the routed experts only (identity slots past the last expert, no pairs), and the routed pairs
    sum to the routed output."""
    model = build_tiny_model("longcat_flash").to(dtype)
    family, _ = moe_layers(model)
    num_routed, identity = family.num_experts(model.config), family.router_tail(model.config)
    assert identity == 4 and family.layout.identity_experts
    seen, instrumented = run_instrumented(model, ["routing", "expert_outputs", "coactivation", "neurons", "tcess"])
    picked_identity = 0
    for top_k_index, top_k_weights, pairs, routed in seen:
        assert top_k_index.max() <= num_routed and (pairs.expert < num_routed).all()
        picked_identity += int((top_k_index == num_routed).sum())
        assert pairs.expert.numel() == int((top_k_index < num_routed).sum())
        summed = torch.zeros_like(routed).index_add_(0, pairs.token, (pairs.weight[:, None] * pairs.output).to(routed.dtype))
        assert torch.equal(summed, routed)  # the same products added in the same order
    assert picked_identity > 0  # the identity experts were exercised
    for inst in instrumented:
        result = inst.result()
        assert result["frequency"].shape == (num_routed,)
        assert torch.equal(result["coactivation"].diagonal(), result["frequency"])
        inst.remove()


def test_identity_expert_family_refuses_what_it_cannot_do(tiny_checkpoint, calibration, family_stats):
    from moeprune.skipping import install_dynamic_skip

    source = tiny_checkpoint("longcat_flash")
    for observers in (["naee"], ["heapr"]):
        with pytest.raises(MoePruneError, match="identity"):
            collect_stats(source, calibration("longcat_flash"), observers=observers, progress=False)
    stats = family_stats("longcat_flash")
    for method in ("m_smoe", "random_neuron"):
        with pytest.raises(MoePruneError, match="not supported for this family"):
            api.plan_pruning(source, method=method, ratio=0.5, stats=stats)
    with pytest.raises(MoePruneError, match="dynamic skipping"):
        install_dynamic_skip(vanilla(source), known_families()["longcat_flash"], {0: 0.1})


# --------------------------------------------------------------------------------------------------
# Nemotron-H: ungated experts (up/down only), checkpoints stored under backbone.


def test_ungated_fused_format_by_hand():
    """An ungated block holds the up rows only: split / join are inverse, neuron k is up row k."""
    from moeprune.layout import FusedFormat

    fmt = family_layout("nemotron_h").memory
    assert not fmt.gated and fmt.gate_up == "up_proj" and fmt.projections == ("up", "down")
    experts = [{"up": torch.randn(3, 5), "down": torch.randn(5, 3)} for _ in range(2)]
    blocks = fmt.join(experts)
    assert blocks["up_proj"].shape == fmt.block_shape("up_proj", 2, 3, 5) == (2, 3, 5)
    assert blocks["down_proj"].shape == fmt.block_shape("down_proj", 2, 3, 5) == (2, 5, 3)
    for e, expert in enumerate(experts):
        split = fmt.split({name: blocks[name][e] for name in fmt.names})
        assert split.keys() == expert.keys() and all(torch.equal(split[p], expert[p]) for p in expert)
    assert fmt.canonical_shape({"up_proj": (2, 3, 5), "down_proj": (2, 5, 3)}, "up") == (3, 5)
    assert fmt.gate_up_positions("up", [2, 0], 3) == [2, 0]
    with pytest.raises(ValueError, match="ungated"):
        fmt.gate_up_positions("gate", [0], 3)
    with pytest.raises(MoePruneError, match="ungated experts with biases"):
        FusedFormat(gate_up="up_proj", gate_up_layout="none", gate_up_bias="b", down_bias="c")


def test_backbone_prefix_on_disk():
    """Nemotron-H's checkpoints name the model backbone.*: the layout reads and writes those names."""
    from moeprune.ops.edit import Edit

    layout = family_layout("nemotron_h")
    assert layout.router_keys(1) == ["backbone.layers.1.mixer.gate.weight", "backbone.layers.1.mixer.gate.e_score_correction_bias"]
    assert layout.expert_file(3, 5, "up") == "backbone.layers.3.mixer.experts.5.up_proj.weight"
    assert layout.disk.parse(3, "backbone.layers.3.mixer.experts.5.down_proj.weight") == (5, "down")
    assert layout.disk.parse(3, "model.layers.3.mixer.experts.5.down_proj.weight") is None
    assert layout.memory_name("backbone.layers.3.mixer.gate.weight") == "model.layers.3.mixer.gate.weight"
    assert layout.memory_name("backbone.norm_f.weight") == "model.norm_f.weight"
    assert layout.disk_name("model.embeddings.weight") == "backbone.embeddings.weight"
    edit = Edit(dropped_layers={1})
    assert edit.renumber("backbone.layers.3.norm.weight") == "backbone.layers.2.norm.weight"
    assert edit.renumber("model.layers.3.norm.weight") == "model.layers.2.norm.weight"
    assert edit.renumber("backbone.layers.1.norm.weight") is None


def test_ungated_family_refuses_what_it_cannot_do(tiny_checkpoint, calibration, family_stats):
    """The dense planners address model.layers.N names: refused for Nemotron-H (stored under backbone.)
    before any weight is read. Its neuron statistics read h = relu2(up x), forward and backward (the
    backward pass reads the backbone.* names through the layout)."""
    source = tiny_checkpoint("nemotron_h")
    stats = family_stats("nemotron_h")
    for method in ("angular", "magnitude"):
        with pytest.raises(MoePruneError, match="not supported for this family"):
            api.plan_pruning(source, method=method, ratio=0.5, stats=stats)
    for observer, entry in (("neurons", "neuron_h2_sum"), ("heapr", "heapr_h2_sum")):
        found = collect_stats(source, calibration("nemotron_h"), observers=[observer], progress=False)
        assert all(entries[entry].shape == (8, 16) and entries[entry].sum() > 0 for entries in found.layers.values())


# --------------------------------------------------------------------------------------------------
# Inkling (text): the router scores its shared experts after the routed ones and weighs them jointly


def test_sigmoid_topk_shared_softmax_by_hand():
    """Top-k of sigmoid + bias over the routed experts; the selected and the shared logits weighed by a
    softmax of their log-sigmoids x route_scale x global_scale; a mask leaves the shared logits in."""
    from moeprune.routing import route_with_shared

    logits = torch.tensor([[1.0, -1.0, 0.5, 2.0, 0.0]])  # routed experts 0..3, then shared expert 4
    bias = torch.tensor([0.0, 0.9, 0.0, 0.0])
    params = RoutingParams(rule="sigmoid_topk_shared_softmax", top_k=2, routed_scaling_factor=2.0, shared_in_router=1)
    scale = torch.tensor([1.5])

    def expected(chosen):
        probs = torch.sigmoid(logits[0, [*chosen, 4]])
        return 2.0 * 1.5 * probs / probs.sum()  # softmax of log-sigmoids = sigmoids normalised

    weights, indices, shared = route_with_shared(logits, params, bias, router_scale=scale)
    assert sorted(indices[0].tolist()) == [1, 3]  # sigmoid + b: .73, .27 + .9 = 1.17, .62, .88
    want = expected(indices[0].tolist())
    torch.testing.assert_close(torch.cat([weights[0], shared[0]]), want, rtol=0, atol=1e-6)
    assert torch.equal(route(logits, params, bias, router_scale=scale)[0], weights)
    masked, masked_indices, masked_shared = route_with_shared(logits, params, bias, torch.tensor([True, False, True, True]),
                                                             router_scale=scale)
    assert sorted(masked_indices[0].tolist()) == [0, 3]
    torch.testing.assert_close(torch.cat([masked[0], masked_shared[0]]), expected(masked_indices[0].tolist()), rtol=0, atol=1e-6)


def test_shared_in_router_family_refuses_naee(tiny_checkpoint, calibration, family_stats):
    """NAEE re-routes from the router's logits, which lack Inkling's shared logits: refused; merges and
    neuron slices too (the router's joint weighting)."""
    source = tiny_checkpoint("inkling_text")
    with pytest.raises(MoePruneError, match="shared experts whose logits"):
        collect_stats(source, calibration("inkling_text"), observers=["naee"], progress=False)
    for method in ("naee", "m_smoe", "random_neuron"):
        with pytest.raises(MoePruneError, match="not supported for this family"):
            api.plan_pruning(source, method=method, ratio=0.5, stats=family_stats("inkling_text"))


def test_softmax_bias_topk_by_hand():
    """ERNIE-4.5-MoE: select on softmax + bias, weigh by the unbiased softmax over max(sum, norm_min)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([[0.0, 0.0, 0.5, 0.0]])  # [1, E], as the model stores it
    p = torch.softmax(logits[0], dim=-1)
    params = RoutingParams(rule="softmax_bias_topk", top_k=2, renormalize=True, renormalize_min=1e-12)
    weights, indices = route(logits, params, bias)
    assert indices.tolist() == [[0, 2]]  # p + b = .64, .24, .09 + .5, .03: expert 2 beats expert 1 through its bias
    torch.testing.assert_close(weights[0], torch.stack([p[0], p[2]]) / (p[0] + p[2]), rtol=0, atol=1e-7)
    clamped, _ = route(logits, dataclasses.replace(params, renormalize_min=10.0), bias)
    torch.testing.assert_close(clamped[0], torch.stack([p[0], p[2]]) / 10.0, rtol=0, atol=1e-7)
    # a dropped expert is never selected, whatever its bias; the softmax runs over the kept experts
    masked_weights, masked = route(logits, params, bias, expert_mask=torch.tensor([True, True, False, True]))
    q = torch.softmax(logits[0, [0, 1, 3]], dim=-1)
    assert masked.tolist() == [[0, 1]]
    torch.testing.assert_close(masked_weights[0], q[:2] / q[:2].sum(), rtol=0, atol=1e-7)


def test_router_axes_and_transformers_conversions():
    """ERNIE-4.5 slices its [1, E] correction bias along axis 1; the converted families read the
    tensors outside their routers and experts as transformers' conversion mapping makes them."""
    layout = family_layout("ernie4_5_moe")
    assert layout.router_axis("model.layers.1.mlp.moe_statics.e_score_correction_bias") == 1
    assert layout.router_axis("model.layers.1.mlp.gate.weight") == 0
    assert not family_layout("mixtral").transformers_conversions and family_layout("kimi_linear").transformers_conversions


def test_concatenated_and_split_tensors_by_hand(tiny_checkpoint):
    """Kimi-Linear's q/k/v short convolutions are concatenated (dim 0) into one conv1d; Lara-mini's fused
    in_proj is split (dim 0) into in_proj_qkv / z / b / a sized as the model's parameters."""
    kimi = CheckpointLayout.build(known_families()["kimi_linear"], LazyCheckpoint(tiny_checkpoint("kimi_linear")), [])
    disk = kimi.checkpoint
    state = kimi.layer_state_dict(0)
    parts = [disk.get(f"model.layers.0.self_attn.{p}_conv1d.weight") for p in "qkv"]
    assert torch.equal(state["self_attn.conv1d.weight"], torch.cat(parts, dim=0))
    assert torch.equal(state["self_attn.forget_gate.A_log"], disk.get("model.layers.0.self_attn.A_log"))
    assert not any("q_conv1d" in name for name in state)

    lara = CheckpointLayout.build(known_families()["lara_mini"], LazyCheckpoint(tiny_checkpoint("lara_mini")), [])
    state = lara.layer_state_dict(0)
    pieces = [state[f"linear_attn.in_proj_{p}.weight"] for p in ("qkv", "z", "b", "a")]
    assert [t.shape[0] for t in pieces] == [64, 32, 4, 4]  # 2 x (2 x 8) + 4 x 8 query/key/value rows; z; b, a per head
    assert torch.equal(torch.cat(pieces, dim=0), lara.checkpoint.get("model.layers.0.linear_attn.in_proj.weight"))
    (group,) = [g for g in lara.other_groups() if g.first == "model.layers.0.linear_attn.in_proj_qkv.weight"]
    assert group.disk_names == ["model.layers.0.linear_attn.in_proj.weight"]
    assert group.targets == [f"model.layers.0.linear_attn.in_proj_{p}.weight" for p in ("qkv", "z", "b", "a")]


@pytest.mark.parametrize("family_name", FAMILIES)
def test_spec_names_agree_with_transformers_conversion_mapping(family_name, tiny_checkpoint):
    """transformers' own conversion mapping (what from_pretrained applies) names every router tensor
    as the spec's [disk] renames do, and, for the families that keep their hand renames, every tensor
    outside the routers and routed experts too: the hand mappings are transformers' mapping, and the
    families with ``conversions = "transformers"`` are read through the mapping itself."""
    family = known_families()[family_name]
    source = tiny_checkpoint(family_name)
    model = build_skeleton(read_config(source))
    layout = CheckpointLayout.build(family, LazyCheckpoint(source), moe_layer_indices(family, model))
    conversions = TransformersConversions(model)
    for entry in layout.layers.values():
        for name in entry.router:
            assert conversions.memory_name(name) == (family.layout.memory_name(name), None), name
    if not family.layout.transformers_conversions:
        by_transformers = {group.first: group.disk_names for group in conversions.groups(layout.others)}
        by_spec = {family.layout.memory_name(name): [name] for name in layout.others}
        assert by_transformers == {name: names for name, names in by_spec.items() if name in conversions.memory_names}


UNGATED_METHODS = [("hc_smoe", {}), ("hc_smoe", {"router": "exact"}), ("m_smoe", {"budget": "per_layer"}), ("ream", {}),
                   ("dern", {"tau": 0.0}), ("heapr", {}), ("camera_p", {"layout": "compact"}),
                   ("wanda_neuron", {}), ("random_neuron", {})]


@pytest.mark.parametrize("method,options", UNGATED_METHODS, ids=[m + "".join(f"-{v}" for v in o.values()) for m, o in UNGATED_METHODS])
def test_ungated_family_merges_and_slices_neurons(method, options, tiny_checkpoint, calibration, tmp_path):
    """Nemotron-H's ungated experts (down(relu2(up x))) merge, recombine and lose neurons like gated ones
    (a neuron is up row k and down column k): the written checkpoint loads (in vanilla transformers, or
    moeprune.load where no stock config holds it) with the logits of the in-memory executor."""
    source = tiny_checkpoint("nemotron_h")
    stats = collect_stats(source, calibration("nemotron_h"), observers=api.statistics_for(method), progress=False)
    plan = api.plan_pruning(source, method=method, ratio=0.25 if method.endswith(("neuron", "_p", "heapr")) else 0.5,
                            stats=stats, options=options)
    assert method != "dern" or plan.actions  # tau 0: dropped neurons moved into kept experts
    out = api.apply(source, plan, tmp_path / method, progress=False)
    section = json.loads((out / "config.json").read_text()).get("moeprune")
    loaded = moeprune_load(out) if section else vanilla(out)
    in_memory = apply_plan_in_memory(load_full_model(source), plan)
    torch.testing.assert_close(logits_of(in_memory), logits_of(loaded), rtol=0, atol=1e-6)
    assert not torch.allclose(logits_of(loaded), logits_of(vanilla(source)), atol=1e-4)  # the plan changed the model


# --------------------------------------------------------------------------------------------------
# Inkling-2 (text): block_states between layers ([engine] accumulate), original checkpoint names


def test_interleaved_disk_block_is_transformers_interleave():
    """Inkling-2's w13_weight interleaves gate and up rows: the layout's conversion to the in-memory halves
    is transformers' own Interleave(dim=1) (the load direction) and its inverse (the save direction)."""
    from transformers.core_model_loading import Interleave

    layout = family_layout("inkling2_text")
    disk, memory = layout.disk, layout.memory
    assert (disk.gate_up, disk.down, disk.gate_up_layout, memory.gate_up_layout) == ("w13_weight", "w2_weight", "interleaved", "halves")
    block = torch.randn(3, 8, 5)
    loaded = Interleave(dim=1).convert({"w": block}, ["w"], ["m"])["m"]
    assert torch.equal(disk.block_as("w13_weight", block, memory), loaded)
    assert torch.equal(memory.block_as("gate_up_proj", loaded, disk), block)
    assert disk.block_as("w2_weight", block, memory) is block
    expert = disk.split({"w13_weight": block[1], "w2_weight": torch.zeros(5, 4)})  # neuron k: rows 2k (gate), 2k + 1 (up)
    assert torch.equal(expert["gate"], block[1, 0::2]) and torch.equal(expert["up"], block[1, 1::2])


@pytest.mark.parametrize("family_name", ["inkling2_text", "inkling2_loop_text"])
def test_inkling2_layout_reads_what_from_pretrained_loads(family_name, tiny_checkpoint):
    """Every decoder layer read through the layout (model.llm.* names, interleaved w13, the router bias
    renamed, the block attention queries stored under model.llm.attn_res; Inkling-2-Loop's message gates
    stored as controllers.*) equals the layer vanilla transformers loads, bitwise; the final input module
    and Inkling-2-Loop's message queries (two tensors on disk, merged on load) too."""
    source = tiny_checkpoint(family_name)
    family = known_families()[family_name]
    model = vanilla(source)
    checkpoint = LazyCheckpoint(source)
    layout = CheckpointLayout.build(family, checkpoint, moe_layer_indices(family, model))
    assert layout.layers[1].router == ["model.llm.layers.1.mlp.gate.weight", "model.llm.layers.1.mlp.gate.bias"]
    assert layout.layers[1].fused == ["model.llm.layers.1.mlp.experts.w13_weight", "model.llm.layers.1.mlp.experts.w2_weight"]
    assert family.layout.memory_name("model.llm.layers.1.mlp.gate.bias") == "model.layers.1.mlp.gate.e_score_correction_bias"
    for index, layer in enumerate(model.model.layers):
        state = layout.layer_state_dict(index)
        expected = layer.state_dict()
        assert state.keys() == expected.keys(), index
        assert all(torch.equal(state[name], expected[name]) for name in expected), index
    assert "attention_input.query" in layout.layer_state_dict(1) and "attention_input.query" not in layout.layer_state_dict(0)
    final = layout.module_state_dict("model.final_input")
    assert torch.equal(final["query"], model.model.final_input.query)
    if family_name == "inkling2_loop_text":
        assert torch.equal(layout.module_state_dict("model.message_input")["query"], model.model.message_input.query)
        assert "q_message_gate.down_proj.weight" in layout.layer_state_dict(2)


def test_loop_visits_by_hand():
    """Inkling-2-Loop's layers 2 and 3 run 3 times: the engine visits them pass after pass, a loop once
    entered runs whole, and a looped layer's statistics count its passes."""
    loop = engine.LayerLoop(start=2, end=4, passes=3, messages="message_input")
    assert loop.visits(1) == [(0, 1), (1, 1)]
    assert loop.visits(2) == [(0, 1), (1, 1), (2, 1), (3, 1), (2, 2), (3, 2), (2, 3), (3, 3)]
    assert loop.visits(5)[-3:] == [(3, 3), (4, 1), (5, 1)]
    assert [loop.passes_of(layer) for layer in range(6)] == [1, 1, 3, 3, 1, 1]
    config = build_tiny_model("inkling2_loop_text").config
    assert [engine.layer_passes(known_families()["inkling2_loop_text"], config, i) for i in range(6)] == [1, 1, 3, 3, 1, 1]
    assert engine.layer_passes(known_families()["inkling2_text"], build_tiny_model("inkling2_text").config, 1) == 1


def test_inkling2_output_keeps_the_checkpoint_names(tiny_checkpoint, family_stats, tmp_path):
    """A 50% prune is written under the checkpoint's own names (model.llm.*, w13_weight interleaved, the
    unembedding padded to vocab_size), with half the experts, and vanilla from_pretrained reads it."""
    source = tiny_checkpoint("inkling2_text")
    out = tmp_path / "pruned"
    plan = api.prune(source, out, method="frequency", ratio=0.5, stats=family_stats("inkling2_text"), progress=False)
    before, after = all_tensors(source), all_tensors(out)
    assert after.keys() == before.keys()
    for name, tensor in after.items():
        if ".mlp.experts." in name or ".mlp.gate." in name:
            assert tensor.shape[0] == 4 and before[name].shape[0] == 8, name
        else:
            assert torch.equal(tensor, before[name]), name
    assert after["model.llm.unembed.weight"].shape[0] == 512  # padded on disk; 500 rows in memory
    for layer, kept in plan.layers.items():
        w13 = f"model.llm.layers.{layer}.mlp.experts.w13_weight"
        assert torch.equal(after[w13], before[w13][kept])
    assert vanilla(out).lm_head.weight.shape[0] == 500


def test_inkling2_refuses_what_it_cannot_do_exactly(tiny_checkpoint, calibration, family_stats):
    """The dense planners address model.layers.N names (and attention modules moeprune has no spec of):
    refused before any weight is read; merges and uniform neuron slices run (tests/test_merge.py,
    tests/test_neurons.py); gradient statistics (the backward pass does not carry the block_states
    gradients) refused."""
    source = tiny_checkpoint("inkling2_text")
    with pytest.raises(MoePruneError, match="not supported for this family.*'model.llm.'.*dense planners"):
        api.plan_pruning(source, method="angular", ratio=0.5, stats=family_stats("inkling2_text"))
    with pytest.raises(MoePruneError, match="does not carry yet"):
        collect_stats(source, calibration("inkling2_text"), observers=["heapr"], progress=False)


def test_inkling2_exact_router_merge_equals_the_model_whose_members_carry_the_merged_weights(tiny_checkpoint, tmp_path):
    """A merge with the exact router (uneven clusters, permuted members) on Inkling-2: moeprune.load of the
    written checkpoint equals the original model whose members carry their cluster's merged weights (in
    float32: Inkling-2's router casts its input to float32, so the model cannot run in float64 as the
    other families' test does), and the in-memory executor builds the same model."""
    from moeprune import load as moeprune_load
    from moeprune.layout import model_expert, set_expert_block
    from moeprune.ops.merge import EXPERT_MAP
    from moeprune.plan import MergeCluster, MergeExperts
    from moeprune.structure import SECTION

    source = tiny_checkpoint("inkling2_text")
    info = api.model_info(source)
    E, width = info.geometry.num_experts, info.geometry.expert_width
    groups = [[0, E - 1, 3], [1], [2, 4], *[[e] for e in range(5, E - 1)]]
    clusters = [MergeCluster(tuple(g), tuple(float(i + 1) for i in range(len(g))),
                             tuple(None if i == 0 else tuple(reversed(range(width))) for i in range(len(g)))) for g in groups]
    layers = info.geometry.moe_layers
    plan = Plan(layers={}, method="manual", family=info.geometry.family, num_experts=E,
                actions={layer: [MergeExperts(tuple(clusters), router="exact")] for layer in layers})
    out = write_pruned_checkpoint(source, plan, tmp_path / "exact", progress=False)
    mapping = json.loads((out / "config.json").read_text())[SECTION][EXPERT_MAP]
    loaded = moeprune_load(out)
    reference = load_full_model(source)
    for layer in layers:
        merged = [model_expert(loaded, info.family, layer, c) for c in range(len(clusters))]
        set_expert_block(reference, info.family, layer, [{p: t.clone() for p, t in merged[mapping[str(layer)][e]].items()}
                                                         for e in range(E)])
    torch.testing.assert_close(logits_of(loaded), logits_of(reference), rtol=1e-5, atol=1e-5)
    assert torch.equal(logits_of(apply_plan_in_memory(load_full_model(source), plan)), logits_of(moeprune_load(out)))


@pytest.mark.parametrize("family_name,extra", [("inkling2_text", "w13_weight_scale"), ("inkling2_loop_text", "w2_weight_amax")])
def test_quantised_expert_blocks_are_refused(family_name, extra, tiny_checkpoint, tmp_path):
    """A fused expert block with tensors the layout does not name (the released checkpoints' MXFP8 / NVFP4
    scales, which transformers dequantises on load) cannot be pruned exactly: refused before any write."""
    import shutil

    from safetensors.torch import save_file

    source = tiny_checkpoint(family_name)
    copy = tmp_path / "quantised"
    shutil.copytree(source, copy)
    tensors = all_tensors(copy)
    tensors[f"model.llm.layers.2.mlp.experts.{extra}"] = torch.zeros(8)
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MoePruneError, match=f"{extra}.*quantised expert blocks"):
        api.prune(copy, tmp_path / "out", method="random", ratio=0.5, progress=False)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# JetMoE: a sorted-dispatch router, one expert-count key for the MLP and the attention experts


def test_sorted_dispatch_by_hand():
    """The (token, expert) pairs grouped by expert: flat pair p = t * k + slot, sorted by expert; tokens
    p // k; gates w[p]; pairs per expert. The inverse gives back the [T, k] indices and weights."""
    from moeprune.routing import sorted_dispatch, topk_of_sorted_dispatch

    indices = torch.tensor([[2, 0], [0, 3], [3, 2]])
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
    index_sorted, batch_index, batch_gates, expert_size = sorted_dispatch(indices, weights, 4)
    # flat experts 2 0 0 3 3 2: expert 0 at pairs 1, 2; expert 2 at 0, 5; expert 3 at 3, 4
    assert sorted(index_sorted[:2].tolist()) == [1, 2] and sorted(index_sorted[2:4].tolist()) == [0, 5]
    assert sorted(index_sorted[4:].tolist()) == [3, 4]
    assert torch.equal(batch_index, index_sorted // 2) and expert_size == [2, 0, 2, 2]
    assert torch.equal(batch_gates, weights.flatten()[index_sorted])
    back_indices, back_weights = topk_of_sorted_dispatch(index_sorted, batch_gates, expert_size, 2)
    assert torch.equal(back_indices, indices) and torch.equal(back_weights, weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sorted_dispatch_block_twin_is_exact(dtype):
    """The collector's twin of JetMoE's MoE block gives the model's logits bitwise; its routing is the
    router's (moeprune's rule on the router's logits), its pairs are the selected (token, expert) pairs
    with the model's gates, and their gated outputs add up to the routed output (the block's output
    without its bias)."""
    model = build_tiny_model("jetmoe").to(dtype)
    family, layers = moe_layers(model)
    assert family.sorted_dispatch and family.expert_count_shared
    params = family.routing_params(model.config)
    logits_seen = []
    hooks = [family.router(layer).register_forward_hook(lambda m, a, out: logits_seen.append(out[4])) for _, layer in layers]
    seen, instrumented = run_instrumented(model, ["routing", "expert_outputs", "coactivation", "neurons", "tcess"])
    for hook in hooks:
        hook.remove()
    for (top_k_index, top_k_weights, pairs, routed), logits in zip(seen, logits_seen[len(layers):]):
        weights, indices = route(logits, params, None, hidden_dtype=dtype)
        assert torch.equal(top_k_index, indices) and torch.equal(top_k_weights, weights)
        got = sorted(zip(pairs.token.tolist(), pairs.expert.tolist()))
        assert got == sorted((t, e) for t in range(indices.shape[0]) for e in indices[t].tolist())
        assert torch.equal(pairs.weight, weights[pairs.token, (indices[pairs.token] == pairs.expert[:, None]).int().argmax(1)])
        summed = torch.zeros_like(routed).index_add(0, pairs.token, pairs.output * pairs.weight[:, None])
        assert torch.equal(summed, routed)  # the same products added in the same order
    for inst in instrumented:
        assert torch.equal(inst.result()["coactivation"].diagonal(), inst.result()["frequency"])
        inst.remove()
    assert all("forward" not in layer.mlp.__dict__ for _, layer in layers)


def test_jetmoe_output_needs_moeprune_load(tiny_checkpoint, family_stats, tmp_path):
    """num_local_experts also sizes the attention experts (kept whole): a pruned output keeps it and records
    the MLP expert counts in the moeprune section. moeprune.load rebuilds the model exactly (every layer's
    expert tensors and counts, attention experts whole; logits equal the in-memory prune's, i.e. the original
    with the dropped experts masked, test 3); vanilla from_pretrained refuses it loudly, also with counts
    that differ per layer; the model card says how to load it."""
    import moeprune

    source = tiny_checkpoint("jetmoe")
    original = vanilla(source)
    plan = Plan(layers={0: [0, 2, 5, 7], 1: [1, 2, 3, 4, 6, 7], 2: [3, 6]}, method="manual", family="jetmoe", num_experts=8)
    out = write_pruned_checkpoint(source, plan, tmp_path / "pruned", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == 8 and config["moeprune"] == {"format": 1, "experts_per_layer": {"0": 4, "1": 6, "2": 2}}
    with pytest.raises(RuntimeError, match="mismatch"):
        AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    loaded = moeprune.load(out)
    for index, layer in enumerate(loaded.model.layers):
        kept = plan.layers[index]
        for module in (layer.mlp.input_linear, layer.mlp.output_linear, layer.mlp.router):
            assert module.num_experts == len(kept)
        before = original.model.layers[index]
        assert torch.equal(layer.mlp.input_linear.weight, before.mlp.input_linear.weight[kept])
        assert torch.equal(layer.mlp.output_linear.weight, before.mlp.output_linear.weight[kept])
        assert torch.equal(layer.mlp.router.layer.weight, before.mlp.router.layer.weight[kept])
        assert torch.equal(layer.mlp.bias, before.mlp.bias)
        for name, tensor in before.self_attention.state_dict().items():  # the attention experts stay whole
            assert torch.equal(layer.self_attention.state_dict()[name], tensor), name
        assert layer.self_attention.experts.router.num_experts == 8
    in_memory = apply_plan_in_memory(load_full_model(source), plan)
    assert torch.equal(logits_of(loaded), logits_of(in_memory))
    masked = logits_of(patch_routers(vanilla(source), keep=plan.layers))
    torch.testing.assert_close(logits_of(loaded), masked, atol=1e-5, rtol=1e-4)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "moeprune.load" in card and "attention experts" in card
    with pytest.raises(CheckpointError, match="'moeprune' section"):  # not an input for moeprune yet: said so
        api.model_info(out)


def test_jetmoe_refuses_what_it_cannot_do(tiny_checkpoint, calibration, family_stats):
    """Merges, neuron slices, the dense planners and dynamic skipping act on the experts interface or on
    standard attention: refused before any weight is read; so are every expert's output on every token
    and gradients. Dropping experts works."""
    from moeprune.skipping import install_dynamic_skip

    source = tiny_checkpoint("jetmoe")
    for observers in (["naee"], ["heapr"]):
        with pytest.raises(MoePruneError, match="groups the .token, expert. pairs"):
            collect_stats(source, calibration("jetmoe"), observers=observers, progress=False)
    stats = family_stats("jetmoe")
    for method in ("m_smoe", "random_neuron", "angular"):
        with pytest.raises(MoePruneError, match="not supported for this family"):
            api.plan_pruning(source, method=method, ratio=0.5, stats=stats)
    with pytest.raises(MoePruneError, match="dynamic skipping"):
        install_dynamic_skip(vanilla(source), known_families()["jetmoe"], {0: 0.1})
    assert all(len(kept) == 4 for kept in api.plan_pruning(source, method="reap", ratio=0.5, stats=stats).layers.values())


def test_jetmoe_layers_are_placed_whole(tiny_checkpoint, calibration, family_stats):
    """JetMoE's fused experts live on its MoE block (with the block's bias and router), not on an experts
    module the engine can split over devices: a layer is placed whole, whatever the budgets, and the
    statistics are the unsplit pass's."""
    source, batch = tiny_checkpoint("jetmoe"), calibration("jetmoe")
    placed = collect_stats(source, batch, mode="sequential", batch_size=2, progress=False,
                           expert_devices=["cpu", "cpu"], device_budgets=[1, 1])
    assert_same_stats(placed, collect_stats(source, batch, mode="whole", batch_size=2, progress=False))
