"""NAEE expert pruning and dynamic skipping (moeprune.observe.naee / .skip, moeprune.plan.naee,
moeprune.skipping): brute force with the model's own MoE block, hand-computed skip decisions, the
skip checkpoint loaded by moeprune.load against the original model with the rule applied by hand."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from conftest import logits_of, model_inputs, vanilla

import moeprune
from moeprune import api
from moeprune.arch import decoder_layers, family_for_model_type
from moeprune.calibration.data import CalibrationBatch
from moeprune.calibration.engine import collect_stats
from moeprune.errors import MoePruneError, PlanError
from moeprune.observe import naee as naee_observer
from moeprune.observe.naee import (
    NAEE_MAX_EXPERTS,
    candidate_bitmasks,
    dense_gates,
    pair_subset_errors,
    subset_errors,
)
from moeprune.observe.skip import beta_from_histogram, ratio_histogram, top2_ratio
from moeprune.plan.naee import best_subset
from moeprune.routing import RoutingParams, route
from moeprune.skipping import (
    DYNAMIC_SKIP,
    MODEL_ATTRIBUTE,
    install_dynamic_skip,
    skip_weights,
)
from moeprune.stats import merge_all


def bitmask(experts) -> int:
    return sum(1 << e for e in experts)


# --------------------------------------------------------------------------------------------------
# NAEE: the errors and the chosen subset against brute force with the model's own MoE block


def block_inputs(model, calibration) -> dict[int, torch.Tensor]:
    """The valid tokens entering each Mixtral MoE block ([T, H] per decoder layer)."""
    captured: dict[int, list[torch.Tensor]] = {}
    handles = [layer.mlp.register_forward_pre_hook(lambda m, args, i=i: captured.setdefault(i, []).append(args[0]))
               for i, layer in enumerate(decoder_layers(model))]
    with torch.no_grad():
        model(input_ids=calibration.input_ids, attention_mask=calibration.attention_mask, use_cache=False)
    for handle in handles:
        handle.remove()
    valid = calibration.attention_mask.reshape(-1).bool()
    return {i: torch.cat(x).reshape(-1, x[0].shape[-1])[valid] for i, x in captured.items()}


def pruned_block(block, kept: list[int]):
    """A copy of a Mixtral MoE block holding only the experts ``kept`` (its router rows, its weights)."""
    block = copy.deepcopy(block)
    block.gate.weight.data = block.gate.weight.data[kept]
    block.gate.num_experts = len(kept)
    block.experts.gate_up_proj.data = block.experts.gate_up_proj.data[kept]
    block.experts.down_proj.data = block.experts.down_proj.data[kept]
    block.experts.num_experts = len(kept)
    return block


def brute_force_errors(block, inputs: torch.Tensor, size: int) -> dict[tuple[int, ...], float]:
    """sum over tokens of ||F(x) - F_S(x)||^2 for every subset S of ``size`` experts, F_S = the pruned block."""
    with torch.no_grad():
        dense = block(inputs[None]).double()
        return {kept: float(((dense - pruned_block(block, list(kept))(inputs[None]).double()) ** 2).sum())
                for kept in itertools.combinations(range(block.experts.num_experts), size)}


@pytest.mark.parametrize("fast", [True, False], ids=["pair-path", "general-path"])
def test_naee_errors_and_choice_equal_brute_force(tiny_checkpoint, calibration, monkeypatch, fast):
    path = tiny_checkpoint("mixtral")
    batch = calibration("mixtral")
    if not fast:
        monkeypatch.setattr(naee_observer, "pair_rule", lambda params, num_experts: False)
    stats = collect_stats(path, batch, mode="sequential", observers=["naee"], progress=False)
    model = vanilla(path)
    inputs = block_inputs(model, batch)
    info = api.model_info(path)
    for layer, layer_inputs in inputs.items():
        block = decoder_layers(model)[layer].mlp
        expected = brute_force_errors(block, layer_inputs, 4)
        got = stats.layers[layer]["naee_error"]
        for kept, error in expected.items():
            assert float(got[bitmask(kept)]) == pytest.approx(error, rel=1e-4, abs=1e-6)
        chosen, error = best_subset(got, 8, 4)
        assert tuple(chosen) == min(expected, key=expected.get)
        assert error == pytest.approx(min(expected.values()), rel=1e-4)
    plan = api.plan_pruning(path, method="naee", ratio=0.5, stats=stats, protect_super_experts=False)
    assert plan.layers == {layer: best_subset(stats.layers[layer]["naee_error"], 8, 4)[0] for layer in inputs}
    assert info.geometry.num_experts == 8


def test_naee_all_sizes_enumerated_and_full_routing_costs_nothing(family_stats, tiny_checkpoint, calibration):
    stats = collect_stats(tiny_checkpoint("mixtral"), calibration("mixtral"), mode="whole", observers=["naee"],
                          progress=False)
    errors = stats.layers[0]["naee_error"]
    candidates = set(candidate_bitmasks(8, 2).tolist())
    sizes = {m: m.bit_count() for m in range(256)}
    assert candidates == {m for m, size in sizes.items() if 2 <= size <= 7}
    assert all(float(errors[m]) == 0.0 for m in range(256) if m not in candidates)  # |S| < 2 and the full set
    assert all(float(errors[m]) > 0.0 for m in candidates)


@pytest.mark.parametrize("params,bias", [
    (RoutingParams("softmax_topk", 2, renormalize=True, weights_in_logits_dtype=False), False),
    (RoutingParams("topk_softmax", 2), False),
    (RoutingParams("sigmoid_topk", 2, renormalize=True, routed_scaling_factor=2.5), True),
    (RoutingParams("deepseek_v3", 2, renormalize=True, routed_scaling_factor=2.5), True),
], ids=["softmax_topk", "topk_softmax", "sigmoid_topk", "deepseek_v3"])
def test_pair_path_equals_routing_every_subset(params, bias):
    """The fast path (best two of S by the router's order) == routing every subset with the rule."""
    generator = torch.Generator().manual_seed(3)
    tokens, experts, hidden = 12, 6, 5
    logits = torch.randn(tokens, experts, generator=generator)
    outputs = torch.randn(tokens, experts, hidden, generator=generator)
    correction = 0.3 * torch.randn(experts, generator=generator) if bias else None
    assert naee_observer.pair_rule(params, experts)
    weights, indices = route(logits, params, correction)
    gates = dense_gates(indices, weights, experts)
    masks = candidate_bitmasks(experts, 2)
    general = subset_errors(logits, outputs, gates, masks, params, correction)
    fast = pair_subset_errors(logits, outputs, gates, params, correction, tokens_per_chunk=5)
    # equal up to float32 rounding of the gate weights (routing with S or with its best two only)
    assert torch.allclose(fast[masks], general, rtol=1e-5, atol=1e-6)
    # one subset by hand: F_S from the routed output of S, in float64
    subset = torch.tensor([m for m in masks.tolist() if m.bit_count() == 3][4])
    keep = (subset >> torch.arange(experts)) & 1 == 1
    w_s, i_s = route(logits, params, correction, expert_mask=keep)
    diff = torch.einsum("te,teh->th", gates - dense_gates(i_s, w_s, experts), outputs.double())
    assert float(general[masks.tolist().index(int(subset))]) == pytest.approx(float((diff ** 2).sum()), rel=1e-12)


def test_best_subset_by_hand():
    errors = torch.full((16,), 100.0, dtype=torch.float64)
    errors[bitmask([0, 1])] = 1.0  # best overall
    errors[bitmask([1, 3])] = 2.0  # best containing the protected expert 3
    errors[bitmask([0, 3])] = 2.0  # tie: the smaller bitmask (0b1001 < 0b1010) wins
    errors[bitmask([0, 2])] = 0.5  # best with one expert per group of two (groups {0, 1}, {2, 3})
    errors[bitmask([0, 1, 2])] = 7.0
    assert best_subset(errors, 4, 2) == ([0, 2], 0.5)
    assert best_subset(errors, 4, 2, protected={3}) == ([0, 3], 2.0)
    assert best_subset(errors, 4, 2, n_group=2) == ([0, 2], 0.5)
    assert best_subset(errors, 4, 2, protected={1}, n_group=2)[0] in ([1, 2], [1, 3])
    assert best_subset(errors, 4, 3) == ([0, 1, 2], 7.0)
    with pytest.raises(PlanError, match="protected"):
        best_subset(errors, 4, 2, protected={0, 1, 2})


def test_naee_plan_keeps_super_experts_and_writes_a_vanilla_checkpoint(tiny_checkpoint, calibration, tmp_path):
    path = tiny_checkpoint("mixtral")
    stats = collect_stats(path, calibration("mixtral"), mode="whole",
                          observers=api.statistics_for("naee"), progress=False)
    free = api.plan_pruning(path, method="naee", ratio=0.5, stats=stats, protect_super_experts=False)
    layer = next(iter(free.layers))
    # pretend the least useful expert of the free choice is a super expert: it must be kept now
    dropped = min(set(range(8)) - set(free.layers[layer]))
    stats.layers[layer]["max_abs_output"] = torch.full((8,), 1.0, dtype=torch.float64)
    stats.layers[layer]["max_abs_output"][dropped] = 1e6
    guarded = api.plan_pruning(path, method="naee", ratio=0.5, stats=stats)
    assert dropped in guarded.layers[layer] and len(guarded.layers[layer]) == 4
    assert guarded.protected == {layer: [dropped]}
    out = api.prune(path, tmp_path / "out", method="naee", ratio=0.5, stats=stats, progress=False)
    assert {len(k) for k in out.layers.values()} == {4}
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "moeprune" not in config and config["num_local_experts"] == 4
    assert torch.isfinite(logits_of(vanilla(tmp_path / "out"))).all()


def test_naee_refuses_more_than_16_experts_before_reading_weights(tmp_path, calib_file, read_log):
    from moeprune.tiny import save_tiny_checkpoint

    path = save_tiny_checkpoint("mixtral", tmp_path / "wide", num_local_experts=NAEE_MAX_EXPERTS + 2)
    with pytest.raises(MoePruneError, match=rf"at most {NAEE_MAX_EXPERTS} routed experts.*E={NAEE_MAX_EXPERTS + 2}"):
        api.prune(path, tmp_path / "out", method="naee", ratio=0.5, data=calib_file, samples=2, seq_len=16,
                  progress=False)
    assert read_log == []
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# dynamic skipping


def test_skip_decision_by_hand():
    weights = torch.tensor([[0.6, 0.4], [0.2, 0.8], [0.9, 0.1], [0.5, 0.25]])
    # w2 / w1: 0.667, 0.25, 0.111, 0.5 -> beta 0.5 skips tokens 1 and 2 (0.5 is not < 0.5)
    renormalised, skipped = skip_weights(weights, 0.5, renormalise=True)
    assert skipped.tolist() == [False, True, True, False]
    assert torch.equal(renormalised, torch.tensor([[0.6, 0.4], [0.0, 1.0], [1.0, 0.0], [0.5, 0.25]]))
    kept, _ = skip_weights(weights, 0.5, renormalise=False)
    assert torch.equal(kept, torch.tensor([[0.6, 0.4], [0.0, 0.8], [0.9, 0.0], [0.5, 0.25]]))
    unchanged, none = skip_weights(weights, 0.0, renormalise=True)
    assert torch.equal(unchanged, weights) and not none.any()


def test_beta_is_the_median_on_the_bin_grid_and_merges():
    weights = torch.tensor([[0.9, 0.09], [0.3, 0.7], [0.5, 0.25], [0.1, 0.2], [0.4, 0.3]])
    # ratios 0.1, 0.4286, 0.5, 0.5, 0.75 -> bins (B = 10) 1, 4, 5, 5, 7; half of 5 tokens is reached at bin 5
    assert torch.allclose(top2_ratio(weights), torch.tensor([0.1, 3 / 7, 0.5, 0.5, 0.75], dtype=torch.float64))
    hist = ratio_histogram(weights, bins=10)
    assert hist.tolist() == [0, 1, 0, 0, 1, 2, 0, 1, 0, 0]
    assert beta_from_histogram(hist) == 0.5
    assert beta_from_histogram(torch.zeros(10)) == 0.0
    halves = ratio_histogram(weights[:2], bins=10) + ratio_histogram(weights[2:], bins=10)
    assert torch.equal(halves, hist)


def test_merged_halves_give_the_same_beta(tiny_checkpoint, calibration):
    path, batch = tiny_checkpoint("mixtral"), calibration("mixtral")
    halves = [CalibrationBatch(batch.input_ids[rows], batch.attention_mask[rows]) for rows in (slice(0, 2), slice(2, 4))]
    whole = collect_stats(path, batch, mode="whole", observers=["dynamic_skip"], progress=False)
    parts = merge_all([collect_stats(path, h, mode="whole", observers=["dynamic_skip"], progress=False) for h in halves])
    for layer, entries in whole.layers.items():
        assert torch.equal(parts.layers[layer]["skip_ratio_hist"], entries["skip_ratio_hist"])
        assert beta_from_histogram(entries["skip_ratio_hist"]) > 0


def reference_skip(model, betas):
    """The rule applied by hand on a vanilla model: zero the second weight where w2 < beta w1, give it to w1."""
    def hook(beta):
        def pre(module, args):
            hidden, index, weights = args
            out = weights.clone()
            for t in range(weights.shape[0]):
                hi, lo = (0, 1) if weights[t, 0] >= weights[t, 1] else (1, 0)
                if weights[t, lo] < beta * weights[t, hi]:
                    out[t, hi] = weights[t, hi] + weights[t, lo]
                    out[t, lo] = 0.0
            return hidden, index, out
        return pre

    for layer, beta in betas.items():
        decoder_layers(model)[layer].mlp.experts.register_forward_pre_hook(hook(beta))
    return model


def test_skip_checkpoint_loads_with_the_rule_and_vanilla_without(tiny_checkpoint, calib_file, tmp_path):
    path = tiny_checkpoint("mixtral")
    plan = api.prune(path, tmp_path / "skip", method="frequency", ratio=0.25, data=calib_file, samples=4, seq_len=32,
                     dynamic_skip=True, progress=False)
    api.prune(path, tmp_path / "plain", method="frequency", ratio=0.25, data=calib_file, samples=4, seq_len=32,
              progress=False)
    config = json.loads((tmp_path / "skip" / "config.json").read_text())
    betas = {int(k): v for k, v in config["moeprune"][DYNAMIC_SKIP].items()}
    assert sorted(betas) == sorted(plan.layers) and all(0 < b < 1 for b in betas.values())
    loaded = moeprune.load(tmp_path / "skip")
    plain = vanilla(tmp_path / "plain")
    # vanilla transformers: the same weights, no skipping (bitwise the plain pruned checkpoint)
    assert torch.equal(logits_of(vanilla(tmp_path / "skip")), logits_of(plain))
    skipped_logits = logits_of(loaded)
    expected = logits_of(reference_skip(plain, betas))
    assert torch.allclose(skipped_logits, expected, atol=1e-6, rtol=0)
    counter = getattr(loaded, MODEL_ATTRIBUTE).counter
    assert 0 < counter.skipped < counter.calls
    assert not torch.allclose(skipped_logits, logits_of(vanilla(tmp_path / "plain")), atol=1e-4)


def test_beta_zero_changes_nothing(tiny_checkpoint):
    model = vanilla(tiny_checkpoint("mixtral"))
    before = logits_of(model)
    family = family_for_model_type("mixtral")
    state = install_dynamic_skip(model, family, {0: 0.0, 1: 0.0, 2: 0.0})
    assert torch.equal(logits_of(model), before)
    assert state.counter.skipped == 0 and state.counter.calls == 2 * model_inputs()["input_ids"].numel() * 3
    state.remove()


def test_dynamic_skip_refuses_other_than_top2_before_reading_weights(tmp_path, calib_file, read_log):
    from moeprune.tiny import save_tiny_checkpoint

    path = save_tiny_checkpoint("mixtral", tmp_path / "top3", num_experts_per_tok=3)
    with pytest.raises(MoePruneError, match="top_k=3"):
        api.prune(path, tmp_path / "out", method="frequency", ratio=0.25, data=calib_file, samples=2, seq_len=16,
                  dynamic_skip=True, progress=False)
    assert read_log == []
    with pytest.raises(MoePruneError, match="needs calibration statistics"):
        api.prune(tiny_checkpoint_path(tmp_path), tmp_path / "out2", method="random", ratio=0.25, dynamic_skip=True)


def tiny_checkpoint_path(tmp_path):
    from moeprune.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint("mixtral", tmp_path / "plain-mixtral")


def test_cli_prune_dynamic_skip_with_naee(tiny_checkpoint, calib_file, tmp_path):
    from moeprune.cli import main

    out = tmp_path / "cli"
    code = main(["prune", str(tiny_checkpoint("mixtral")), "--method", "naee", "--ratio", "0.5", "--data",
                 str(calib_file), "--samples", "4", "--seq-len", "32", "--dynamic-skip", "--out", str(out), "-q"])
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == 4 and set(config["moeprune"][DYNAMIC_SKIP]) == {"0", "1", "2"}
    assert json.loads((out / "moeprune_plan.json").read_text())["method"] == "naee"
    assert torch.isfinite(logits_of(moeprune.load(out))).all()


def test_dynamic_skip_with_statistics_lacking_the_histogram_is_refused(tiny_checkpoint, family_stats, tmp_path):
    from moeprune.errors import StatsError

    with pytest.raises(StatsError, match="skip_ratio_hist.*--dynamic-skip"):
        api.prune(tiny_checkpoint("mixtral"), tmp_path / "out", method="frequency", ratio=0.25,
                  stats=family_stats("mixtral"), dynamic_skip=True, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family_name", ["qwen2_moe", "deepseek_v3", "phimoe", "gpt_oss"])
def test_naee_errors_of_other_routers_equal_their_masked_blocks(family_name, tiny_checkpoint, calibration):
    """Shared experts (qwen2_moe, deepseek_v3), sigmoid + bias + groups (deepseek_v3), SparseMixer
    (phimoe, the general path), router and expert biases (gpt_oss): the collected error of a subset
    equals ||block(x) - block_S(x)||^2 of the model's own MoE block with the router masked to S."""
    from conftest import moe_layers, patch_routers

    path, batch = tiny_checkpoint(family_name), calibration(family_name)
    stats = collect_stats(path, batch, mode="whole", observers=["naee"], progress=False)
    model = vanilla(path)
    family, layers = moe_layers(model)
    blocks = {index: layer.get_submodule(family.experts_module_path.rpartition(".")[0]) for index, layer in layers}
    captured = {}
    handles = [block.register_forward_pre_hook(lambda m, args, i=i: captured.__setitem__(i, args[0]))
               for i, block in blocks.items()]
    with torch.no_grad():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    for handle in handles:
        handle.remove()
    valid = batch.attention_mask.reshape(-1).bool()
    info = api.model_info(path)
    num, groups = info.geometry.num_experts, info.geometry.n_group if info.geometry.grouped else 1
    generator = torch.Generator().manual_seed(0)

    def block_output(index):
        with torch.no_grad():
            out = blocks[index](captured[index])
        out = out[0] if isinstance(out, tuple) else out
        return out.reshape(-1, out.shape[-1])[valid].double()

    dense = {index: block_output(index) for index in blocks}
    for _ in range(3):
        size = num // groups
        kept = sorted(g * size + int(e) for g in range(groups) for e in torch.randperm(size, generator=generator)[:size // 2])
        patch_routers(model, keep={index: kept for index in blocks})
        for index in blocks:
            expected = float(((dense[index] - block_output(index)) ** 2).sum())
            assert float(stats.layers[index]["naee_error"][bitmask(kept)]) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    plan = api.plan_pruning(path, method="naee", ratio=0.5, stats=stats, protect_super_experts=False)
    for kept in plan.layers.values():
        assert len(kept) == num // 2
        assert all(sum(1 for e in kept if e // (num // groups) == g) == num // 2 // groups for g in range(groups))
