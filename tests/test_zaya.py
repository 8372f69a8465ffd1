"""ZAYA (routers/zaya.toml): the skip class and the carried router state, beyond the conformance suite.

* the routing rule by hand (a skip slot is index 0 with weight 0, and reported as a skip);
* statistics on a hand-built router where expert 0 and the skip expert share the tokens: the model hands
  every token to expert 0, yet only the true expert-0 tokens count (frequency, soft counts, EAN, REAP);
* the signature extractor (early layers only) carries the router state as the model body does;
* methods the family cannot run exactly are refused, before any weight is read.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import SAMPLES, model_inputs
from moeprune import api
from moeprune.arch import decoder_layers, family_for_model_type
from moeprune.calibration.engine import collect_stats, load_full_model
from moeprune.collect import InstrumentedLayer, new_observers
from moeprune.errors import MoePruneError, PlanError
from moeprune.profiles.signatures import SignatureExtractor
from moeprune.routing import RoutingParams, route, route_with_skip
from moeprune.skipping import install_dynamic_skip
from moeprune.tiny import build_tiny_model, save_tiny_checkpoint
from moeprune.tokenizer import tiny_tokenizer


def test_skip_rule_by_hand():
    # 3 routed experts + the skip class; probabilities are softmax(z), selection on p + b
    z = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4],     # skip wins (0.4 - 0.05 > 0.3)
                                [0.5, 0.1, 0.1, 0.3],     # expert 0 wins
                                [0.25, 0.25, 0.1, 0.4]])) # p + b: 0.25, 0.35, 0.1, 0.35 -> expert 1 (first of the tie)
    bias = torch.tensor([0.0, 0.1, 0.0, -0.05])
    params = RoutingParams(rule="softmax_skip_topk", top_k=1)
    weights, indices, skip = route_with_skip(z, params, bias)
    p = torch.softmax(z, dim=-1)
    assert indices.flatten().tolist() == [0, 0, 1] and skip.flatten().tolist() == [True, False, False]
    assert torch.equal(weights.flatten(), torch.stack([torch.tensor(0.0), p[1, 0], p[2, 1]]))
    # masking experts out (as pruning them would) renormalises p over the rest: without expert 0 the skip
    # class wins every token (token 2: 0.25/0.75 + 0.1 < 0.4/0.75 - 0.05); without expert 2 token 1 keeps expert 0
    masked_weights, masked_indices, masked_skip = route_with_skip(z, params, bias, torch.tensor([False, True, True]))
    assert masked_skip.all() and (masked_indices == 0).all() and (masked_weights == 0).all()
    masked_weights, masked_indices, masked_skip = route_with_skip(z, params, bias, torch.tensor([True, True, False]))
    assert masked_skip.flatten().tolist() == [True, False, True] and masked_indices.flatten().tolist() == [0, 0, 0]
    assert torch.allclose(masked_weights[1, 0], p[1, 0] / (1 - p[1, 2])) and masked_weights[[0, 2]].eq(0).all()
    assert torch.equal(route(z, params, bias)[1], indices)  # route() hands the experts what the model does


def _expert_zero_or_skip(model) -> None:
    """Every layer's router picks expert 0 or the skip class only, about half the tokens each: their
    out_proj rows are opposite, every other class is biased out."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in decoder_layers(model):
            router = layer.mlp.gate
            row = torch.randn(router.router_mlp.out_proj.weight.shape[1], generator=generator)
            router.router_mlp.out_proj.weight.zero_()
            router.router_mlp.out_proj.weight[0] = row
            router.router_mlp.out_proj.weight[-1] = -row
            router.balancing_biases.fill_(-10.0)
            router.balancing_biases[0] = -1.0  # as the skip class's (transformers' -1): the larger p wins
            router.balancing_biases[-1] = -1.0


def test_statistics_never_count_a_skip_as_expert_zero():
    model = build_tiny_model("zaya")
    _expert_zero_or_skip(model)
    family = family_for_model_type("zaya")
    layer = decoder_layers(model)[1]
    seen = {}
    handles = [layer.mlp.gate.register_forward_hook(lambda m, a, out: seen.update(logits=out[0], indices=out[2])),
               layer.mlp.experts.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))]
    instrumented = InstrumentedLayer(family, layer, new_observers(family, layer, model.config, ["routing", "expert_outputs"]))
    inputs = model_inputs()
    instrumented.token_mask = inputs["attention_mask"].reshape(-1).bool()
    with torch.no_grad():
        model(**inputs, use_cache=False)
    instrumented.remove()
    for handle in handles:
        handle.remove()
    stats = instrumented.result()

    # by hand: p = softmax(z); the class of each token is argmax(p + b); only class 0 is a use of expert 0
    valid = instrumented.token_mask
    p = torch.softmax(seen["logits"], dim=-1)
    chosen = (p.float() + layer.mlp.gate.balancing_biases).argmax(dim=-1)
    assert set(chosen.tolist()) == {0, 8}
    real = (chosen == 0) & valid
    assert 0 < real.sum() < valid.sum()  # expert 0 and the skip expert share the valid tokens
    assert (seen["indices"].flatten() == 0).all()  # ... which the model hands to expert 0 alike
    experts = layer.mlp.experts
    gate, up = F.linear(seen["x"], experts.gate_up_proj[0]).chunk(2, dim=-1)
    norm = torch.linalg.vector_norm(F.linear(experts.act_fn(gate) * up, experts.down_proj[0]).double(), dim=-1)
    gate0 = p[:, 0].double()
    expected = torch.zeros(8, dtype=torch.float64)
    assert torch.equal(stats["frequency"], expected.clone().index_put_((torch.tensor([0]),), real.sum().double()))
    for name, value in (("soft_count", gate0[real].sum()), ("ean_sum", norm[real].sum()),
                        ("reap_sum", (gate0 * norm)[real].sum())):
        assert torch.equal(stats[name][1:], expected[1:]), name
        torch.testing.assert_close(stats[name][0], value, rtol=1e-6, atol=0), name


def test_sequential_statistics_follow_the_carried_router_state(tmp_path, calibration):
    """The layer-by-layer pass (each layer's router given the previous layer's state) counts every token
    once: as a use of the expert the model picked, or as a skip (counted here on the whole model)."""
    source = save_tiny_checkpoint("zaya", tmp_path / "zaya")
    batch = calibration("zaya")
    stats = collect_stats(source, batch, mode="sequential", batch_size=SAMPLES, progress=False, observers=["routing"])
    model = load_full_model(source)
    family = family_for_model_type("zaya")
    params = family.routing_params(model.config)
    skips = {}
    for index, layer in enumerate(decoder_layers(model)):
        layer.mlp.gate.register_forward_hook(lambda m, a, out, i=index: skips.update(
            {i: int(route_with_skip(out[0], params, m.balancing_biases)[2].sum())}))
    with torch.no_grad():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    assert batch.attention_mask.all() and any(skips.values())
    for index, entries in stats.layers.items():
        assert entries["frequency"].sum().item() + skips[index] == batch.num_tokens


def test_signature_extractor_carries_the_router_state(tiny_checkpoint):
    source = tiny_checkpoint("zaya")
    model = load_full_model(source)
    inputs = model_inputs()
    captured = {}
    for index, layer in enumerate(decoder_layers(model)):
        layer.mlp.gate.register_forward_hook(lambda m, a, out, i=index: captured.update({i: out[0][..., :8]}))
    with torch.no_grad():
        model(**inputs, use_cache=False)
    extractor = SignatureExtractor(source, [1, 2], tcess_pool=2)
    logits = extractor.router_logits(inputs["input_ids"], inputs["attention_mask"])
    for index in (1, 2):  # layers 1 and 2 read the previous layers' router states
        assert torch.equal(logits[index].reshape(-1, 8), captured[index].reshape(-1, 8))


def test_a_skip_bias_transformers_overwrites_is_refused(tmp_path, calibration):
    model = build_tiny_model("zaya")
    with torch.no_grad():
        decoder_layers(model)[0].mlp.gate.balancing_biases[-1] = -0.5
    model.save_pretrained(tmp_path / "zaya")
    tiny_tokenizer().save_pretrained(tmp_path / "zaya")
    with pytest.raises(MoePruneError, match="sets it to -1.0 on every load"):
        collect_stats(tmp_path / "zaya", calibration("zaya"), mode="sequential", progress=False, observers=["routing"])


@pytest.mark.parametrize("method", ["hc_smoe", "m_smoe", "stun", "magnitude", "angular", "naee"])
def test_methods_zaya_cannot_run_exactly_are_refused(method, tiny_checkpoint, family_stats):
    with pytest.raises(MoePruneError, match="zaya: method .* is not supported for this family: its MLP router"):
        api.plan_pruning(tiny_checkpoint("zaya"), method=method, ratio=0.5, stats=family_stats("zaya"))


def test_signals_zaya_cannot_give_are_refused(tiny_checkpoint, calibration):
    for observers in (["naee"], ["heapr"]):  # every expert's output on every token; gradients
        with pytest.raises(MoePruneError, match="zaya"):
            collect_stats(tiny_checkpoint("zaya"), calibration("zaya"), observers=observers, progress=False)
    with pytest.raises(MoePruneError, match="zaya: dynamic skipping is not supported"):
        install_dynamic_skip(build_tiny_model("zaya"), family_for_model_type("zaya"), {0: 0.1})


def test_different_expert_counts_per_layer_are_refused(tiny_checkpoint, tmp_path):
    """A ZAYA router finds its skip class by config.json's one expert count: a layer keeping fewer experts
    than the largest would hand its skip slots to the experts as an index past them, with their weight
    (transformers' grouped_mm leaves such rows uninitialised): refused before any weight is read."""
    from moeprune.loader import load_with_experts
    from moeprune.plan import Plan

    source = tiny_checkpoint("zaya")
    kept = {0: [0, 2, 3, 5, 7], 1: [1, 2, 4, 5, 6, 7], 2: [0, 3, 4, 6]}
    plan = Plan(layers=kept, method="manual", family="zaya", num_experts=8)
    refused = "every MoE layer must keep the same number of experts"
    with pytest.raises(PlanError, match=refused):
        api.apply(source, plan, tmp_path / "pruned", progress=False)
    with pytest.raises(PlanError, match=refused):
        load_with_experts(source, kept)
    with pytest.raises(PlanError, match=refused):
        api.plan_pruning(source, method="random", per_layer={0: 0.25, 1: 0.5, 2: 0.5})
    assert not (tmp_path / "pruned").exists()
