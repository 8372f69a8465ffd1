"""DBRX (issue 14): decoder layers at transformer.blocks.N, a router that returns logits only (the FFN
block routes: softmax, top-k, Lp-normalised weights), experts flattened into [E * I, H] row blocks of
w1 / v1 / w2. The conformance suite covers the six checks on the tiny default (p = 1); these tests add
the other p-norm variants, the flat layout by hand, statistics against the model's own routing, and
the methods this family refuses."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_routing_is_the_models, assert_written_equals_in_memory, logits_of, moe_layers, vanilla
from moeprune import api
from moeprune.apply import write_pruned_checkpoint
from moeprune.arch import config_value, known_families, set_config_value
from moeprune.calibration.engine import collect_stats, load_full_model
from moeprune.collect import InstrumentedLayer, check_signals, new_observers
from moeprune.errors import MoePruneError
from moeprune.io.checkpoint import LazyCheckpoint
from moeprune.layout import CheckpointLayout, FlatFormat, family_layout, model_expert, set_expert_block
from moeprune.plan import Plan
from moeprune.routing import RoutingParams, route
from moeprune.tiny import build_tiny_model

P_KEY = "ffn_config.moe_normalize_expert_weights"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("norm_p", [1.0, 2.0, 0.5, None], ids=["p1", "p2", "p0.5", "none"])
def test_routing_equals_the_block_routing_for_every_p(norm_p, dtype):
    model = build_tiny_model("dbrx", **{P_KEY: norm_p}).to(dtype)
    assert known_families()["dbrx"].routing_params(model.config).norm_p == norm_p
    assert_routing_is_the_models(model)


def test_softmax_topk_pnorm_by_hand():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    p = torch.softmax(logits[0], dim=0)
    top = torch.stack([p[3], p[2]])
    for norm_p, expected in ((1.0, top / top.sum()), (2.0, top / top.pow(2).sum().sqrt()), (None, top)):
        weights, indices = route(logits, RoutingParams(rule="softmax_topk_pnorm", top_k=2, norm_p=norm_p))
        assert indices.tolist() == [[3, 2]]
        torch.testing.assert_close(weights[0], expected, rtol=0, atol=1e-7)
    # a dropped expert leaves the softmax: the pruned router's probabilities over the kept experts
    weights, indices = route(logits, RoutingParams(rule="softmax_topk_pnorm", top_k=2, norm_p=None),
                             expert_mask=torch.tensor([True, True, True, False]))
    kept = torch.softmax(logits[0, :3], dim=0)
    assert indices.tolist() == [[2, 1]]
    torch.testing.assert_close(weights[0], torch.stack([kept[2], kept[1]]), rtol=0, atol=1e-7)


def test_dotted_config_keys():
    config = build_tiny_model("dbrx").config
    family = known_families()["dbrx"]
    assert family.num_experts(config) == 8 and family.top_k(config) == 2
    assert config_value(config, "ffn_config.moe_num_experts") == 8 and config_value({"a": {"b": 3}}, "a.b") == 3
    as_dict = config.to_dict()
    set_config_value(as_dict, "ffn_config.moe_num_experts", 4)
    assert as_dict["ffn_config"]["moe_num_experts"] == 4 and config.ffn_config.moe_num_experts == 8


def test_flat_experts_are_row_blocks():
    """Canonical expert e = rows e*I..(e+1)*I-1 of w1 (gate), v1 (up) and w2 (down, transposed); joining
    experts back gives the original matrices; keeping experts selects their row blocks."""
    model = build_tiny_model("dbrx")
    layout = family_layout("dbrx")
    assert isinstance(layout.memory, FlatFormat) and layout.memory_layer_prefix(1) == "transformer.blocks.1."
    assert layout.router_keys(1) == ["transformer.blocks.1.ffn.router.layer.weight"]
    assert layout.fused_keys(1) == [f"transformer.blocks.1.ffn.experts.mlp.{n}" for n in ("w1", "v1", "w2")]
    assert layout.memory_name("transformer.blocks.1.ffn.experts.mlp.w2") == "transformer.blocks.1.ffn.experts.mlp.w2"
    mlp = model.transformer.blocks[1].ffn.experts.mlp
    width = 16
    experts = [model_expert(model, "dbrx", 1, e) for e in range(8)]
    for e, expert in enumerate(experts):
        rows = slice(e * width, (e + 1) * width)
        assert torch.equal(expert["gate"], mlp.w1[rows]) and torch.equal(expert["up"], mlp.v1[rows])
        assert torch.equal(expert["down"], mlp.w2[rows].T) and expert["down"].shape == (32, width)
    assert torch.equal(layout.memory.join_one("mlp.w2", experts), mlp.w2)
    kept = [6, 1, 3]
    rows = layout.memory.block_rows(kept, 8, 8 * width)
    assert rows[:2] == [6 * width, 6 * width + 1] and len(rows) == 3 * width
    original = {name: getattr(mlp, name.split(".")[1]).detach().clone() for name in layout.memory.names}
    set_expert_block(model, "dbrx", 1, [experts[e] for e in kept])
    for name, tensor in original.items():
        assert torch.equal(getattr(mlp, name.split(".")[1]), tensor[rows])
    assert model.transformer.blocks[1].ffn.experts.num_experts == 3


def test_checkpoint_layout_reads_row_blocks(tiny_checkpoint):
    source = tiny_checkpoint("dbrx")
    model = vanilla(source)
    layout = CheckpointLayout.build("dbrx", LazyCheckpoint(source), [0, 1, 2])
    assert layout.num_experts(2) == 8 and layout.expert_shape(2, 5, "down") == (32, 16)
    for proj, tensor in model_expert(model, "dbrx", 2, 5).items():
        assert torch.equal(layout.read_expert(2, 5, proj), tensor)
    state = layout.read_layer_experts(2, [7, 0])
    w1 = model.transformer.blocks[2].ffn.experts.mlp.w1
    assert torch.equal(state["transformer.blocks.2.ffn.experts.mlp.w1"], torch.cat([w1[112:128], w1[0:16]]))
    assert torch.equal(state["transformer.blocks.2.ffn.router.layer.weight"],
                       model.transformer.blocks[2].ffn.router.layer.weight[[7, 0]])


def test_instrumented_experts_are_exact_and_statistics_follow_the_models_routing(tiny_checkpoint, calibration):
    """The instrumented twin of DBRX's experts loop gives the model's logits bitwise; frequency, soft
    counts and REAP / EAN sums equal those computed from the block's own routing (route_tokens_to_experts)
    and each expert's own output on its tokens."""
    source = tiny_checkpoint("dbrx")
    family = known_families()["dbrx"]
    model = load_full_model(source)
    reference = logits_of(model)
    _, layers = moe_layers(model)
    instrumented = [InstrumentedLayer(family, layer, new_observers(family, layer, model.config, ["routing", "expert_outputs"]))
                    for _, layer in layers]
    assert torch.equal(logits_of(model), reference)
    for inst in instrumented:
        inst.remove()

    batch = calibration("dbrx")
    stats = collect_stats(source, batch, mode="whole", batch_size=2, progress=False, observers=["routing", "expert_outputs"])
    expected = {index: {k: torch.zeros(8, dtype=torch.float64) for k in ("frequency", "soft_count", "reap_sum", "ean_sum")}
                for index, _ in layers}

    def oracle(index):
        def hook(module, args):
            x = args[0].reshape(-1, 32)
            ffn = model.transformer.blocks[index].ffn
            weights, indices = ffn.route_tokens_to_experts(ffn.router(x))
            for t in range(x.shape[0]):
                for w, e in zip(weights[t].tolist(), indices[t].tolist()):
                    expert = model_expert(model, "dbrx", index, e)
                    f = torch.nn.functional.linear(torch.nn.functional.silu(x[t] @ expert["gate"].T) * (x[t] @ expert["up"].T),
                                                   expert["down"])
                    entry = expected[index]
                    entry["frequency"][e] += 1
                    entry["soft_count"][e] += w
                    entry["ean_sum"][e] += f.norm().item()
                    entry["reap_sum"][e] += w * f.norm().item()
        return hook

    handles = [model.transformer.blocks[index].ffn.register_forward_pre_hook(oracle(index)) for index, _ in layers]
    with torch.no_grad():
        for input_ids, attention_mask in batch.batches(2):
            assert attention_mask.all()  # packed: every token counts
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    for handle in handles:
        handle.remove()
    routing_only = collect_stats(source, batch, mode="whole", batch_size=2, progress=False, observers=["routing"])
    for index, entries in expected.items():  # the experts' pre-hook (no twin) sees the same routing
        for name in ("frequency", "soft_count"):
            assert torch.equal(routing_only.layers[index][name], stats.layers[index][name])
        assert torch.equal(stats.layers[index]["frequency"], entries["frequency"])
        assert entries["frequency"].sum() == batch.num_tokens * 2
        for name in ("soft_count", "ean_sum", "reap_sum"):
            torch.testing.assert_close(stats.layers[index][name], entries[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["stun", "naee"])
def test_expert_drop_planners_write_vanilla_checkpoints(method, tiny_checkpoint, calibration, tmp_path):
    source = tiny_checkpoint("dbrx")
    stats = collect_stats(source, calibration("dbrx"), mode="whole", batch_size=2, progress=False,
                          observers=["routing", "expert_outputs", "coactivation" if method == "stun" else "naee"])
    plan = api.prune(source, tmp_path / "out", method=method, ratio=0.5, stats=stats, progress=False)
    assert all(len(kept) == 4 for kept in plan.layers.values())
    pruned = vanilla(tmp_path / "out")
    assert pruned.config.ffn_config.moe_num_experts == 4
    assert all(block.ffn.experts.mlp.w1.shape == (4 * 16, 32) for block in pruned.transformer.blocks)


@pytest.mark.parametrize("method", ["hc_smoe", "m_smoe", "ream", "dern", "random_neuron", "camera_p", "heapr",
                                    "dense_random", "magnitude", "angular"])
def test_methods_the_flat_layout_cannot_serve_are_refused(method, tiny_checkpoint):
    """Merging, neuron slicing and the dense planners are refused before any weight is read, naming why."""
    with pytest.raises(MoePruneError, match="flattened"):
        api.plan_pruning(tiny_checkpoint("dbrx"), method=method, ratio=0.5)


def test_dynamic_skip_and_gradients_are_refused():
    family = known_families()["dbrx"]
    with pytest.raises(MoePruneError, match="dynamic skipping"):
        family.check_method("reap", None, dynamic_skip=True)
    with pytest.raises(MoePruneError, match="gradients"):
        check_signals(family, {"gradients"})
    family.check_method("reap", None)  # dropping experts is served


def test_different_expert_counts_per_layer_load_with_moeprune(tiny_checkpoint, tmp_path):
    """A plan keeping 2, 6 and 4 experts: the stock key holds the largest count (vanilla transformers refuses
    the row blocks of the smaller layers loudly), moeprune.load builds each layer's row blocks and equals the
    plan applied in memory."""
    source = tiny_checkpoint("dbrx")
    plan = Plan(layers={0: [1, 5], 1: [0, 2, 3, 4, 6, 7], 2: [7, 6, 1, 0]}, method="manual", family="dbrx", num_experts=8)
    out = write_pruned_checkpoint(source, plan, tmp_path / "out", progress=False)
    assert_written_equals_in_memory(source, out, plan)
    config = json.loads((out / "config.json").read_text())
    assert config["ffn_config"]["moe_num_experts"] == 6 and config["moeprune"]["experts_per_layer"] == {"0": 2, "1": 6, "2": 4}
    with pytest.raises(Exception, match="(?i)size|shape"):
        vanilla(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_flat_experts_twin_is_exact(dtype):
    """The instrumented twin of DBRX's experts loop returns the experts' output bitwise, with exactly the
    selected (token, expert) pairs, the block's gate weights, and outputs whose gated sum is the MoE output."""
    model = build_tiny_model("dbrx").to(dtype)
    family, layers = moe_layers(model)
    generator = torch.Generator().manual_seed(2)
    for index, layer in layers:
        experts = family.experts(layer)
        x = torch.randn(1, 61, 32, generator=generator).to(dtype)
        seen = {}
        instrumented = InstrumentedLayer(family, layer, new_observers(family, layer, model.config, ["expert_outputs"]))
        instrumented.on_routed = lambda index_, weights_, pairs, routed, every=None: seen.update(pairs=pairs, routed=routed)
        with torch.no_grad():
            weights, indices = family.block_route(layer)(family.router(layer)(x))
            ours = experts(x, indices, weights)
            instrumented.remove()
            expected = experts(x, indices, weights)
        assert "forward" not in experts.__dict__ and torch.equal(ours, expected), index
        pairs = seen["pairs"]
        assert sorted(zip(pairs.token.tolist(), pairs.expert.tolist())) == sorted(
            (t, e) for t in range(61) for e in indices[t].tolist())
        gate = {(t, e): w for t in range(61) for e, w in zip(indices[t].tolist(), weights[t])}
        assert all(torch.equal(gate[(t, e)], w) for t, e, w in zip(pairs.token.tolist(), pairs.expert.tolist(), pairs.weight))
        rebuilt = torch.zeros(61, 32, dtype=torch.float64).index_add_(0, pairs.token, (pairs.output * pairs.weight[:, None]).double())
        tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
        torch.testing.assert_close(rebuilt, expected[0].double(), **tolerance)
        assert torch.equal(seen["routed"], expected[0])
