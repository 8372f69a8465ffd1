"""Dense structured pruning: hand-computed scores, dense statistics (exactness: sequential == whole,
merged halves == whole, against the model's own activations), plans (JSON round trip, validation)
for mixtral / qwen2_moe / deepseek_v3, and ReplaceMe's fold op."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import assert_written_equals_in_memory

from moeprune import api
from moeprune.arch import decoder_layers
from moeprune.calibration.data import CalibrationBatch
from moeprune.calibration.engine import collect_stats, load_full_model
from moeprune.cli import build_parser, method_options
from moeprune.errors import PlanError, StatsError
from moeprune.io.checkpoint import LazyCheckpoint
from moeprune.methods import get_method
from moeprune.observe import DenseSettings, dense_settings_for
from moeprune.observe.dense import angular_distance, last_token_index
from moeprune.apply import apply_plan_in_memory
from moeprune.plan import Plan, validate_plan
from moeprune.plan.actions import DropAttentionHeads, DropLayer, SliceChannels, TransformMlpOutput
from moeprune.plan.dense import (
    combine_plans,
    global_removal,
    plan_combined,
    split_budget,
    uniform_removal,
    unit_parameters,
)
from moeprune.scoring.dense import (
    CHANNELS,
    HEADS,
    UnitInputs,
    angular_run_distances,
    best_run,
    dense_random_scores,
    flap_bias,
    flap_scores,
    fluctuation,
    magnitude_scores,
    removed_channels,
    replaceme_residual,
    replaceme_transform,
    standardize,
    wanda_sp_scores,
)
from moeprune.stats import RouterStats

DENSE_OBSERVERS = ["dense_channels", "angular", "replaceme"]


# -- hand-computed scores -------------------------------------------------------------------------

def _channels() -> UnitInputs:
    """H = 2, I = 2: gate/up rows and down columns chosen so every score is a small integer."""
    weights = {"gate": torch.tensor([[1.0, 0.0], [0.0, 2.0]]), "up": torch.tensor([[0.0, 1.0], [1.0, 1.0]]),
               "down": torch.tensor([[1.0, 0.0], [0.0, 3.0]])}
    stats = {"in_sumsq": torch.tensor([4.0, 9.0]), "out_sum": torch.tensor([2.0, 0.0]),
             "out_sumsq": torch.tensor([16.0, 1.0]), "tokens": torch.tensor(4.0)}
    return UnitInputs(CHANNELS, weights, stats)


def _heads() -> UnitInputs:
    """4 query heads, 2 KV groups, head_dim 1, H = 2."""
    weights = {"q": torch.ones(4, 2), "k": 2 * torch.ones(2, 2), "v": torch.zeros(2, 2),
               "o": torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, 1.0]])}
    stats = {"in_sumsq": torch.tensor([1.0, 4.0]), "out_sum": torch.zeros(4), "out_sumsq": torch.tensor([3.0, 6.0, 3.0, 0.0]),
             "tokens": torch.tensor(3.0)}
    return UnitInputs(HEADS, weights, stats, num_heads=4, num_kv_heads=2)


def test_magnitude_by_hand():
    # channel 0: |gate row|^2 1 + |up row|^2 1 + |down col|^2 1; channel 1: 4 + 2 + 9
    assert torch.allclose(magnitude_scores(_channels()), torch.tensor([math.sqrt(3), math.sqrt(15)], dtype=torch.float64))
    # group 0: q rows 0,1 (2 + 2) + k row 0 (8) + v 0 + o cols 0,1 (1 + 1); group 1: 4 + 8 + 0 + (4 + 1)
    assert torch.allclose(magnitude_scores(_heads()), torch.tensor([math.sqrt(14), math.sqrt(17)], dtype=torch.float64))


def test_wanda_sp_by_hand():
    # input norms [2, 3]; o/down column norms [4, 1]
    # channel 0: gate 1*2 + up 1*3 + down 1*4 = 9; channel 1: gate 2*3 + up (2 + 3) + down 3*1 = 14
    assert torch.allclose(wanda_sp_scores(_channels()), torch.tensor([9.0, 14.0], dtype=torch.float64))
    # heads: input norms [1, 2]; every q row |.| @ [1, 2] = 3, k rows 6, v 0; o column norms sqrt([3, 6, 3, 0])
    o_norm = [math.sqrt(3), math.sqrt(6), math.sqrt(3), 0.0]
    group0 = 3 + 3 + 6 + (1 * o_norm[0] + 1 * o_norm[1])
    group1 = 3 + 3 + 6 + (2 * o_norm[2] + 1 * o_norm[3])
    assert torch.allclose(wanda_sp_scores(_heads()), torch.tensor([group0, group1], dtype=torch.float64))


def test_flap_by_hand():
    # variances (16 - 2^2/4) / 3 = 5 and (1 - 0) / 3; squared down-column norms 1 and 9
    assert torch.allclose(flap_scores(_channels()), torch.tensor([5.0, 3.0], dtype=torch.float64))
    # o channels: variances [1.5, 3, 1.5, 0] x squared column norms [1, 1, 4, 1] = [1.5, 3, 6, 0]; group mean
    assert torch.allclose(flap_scores(_heads()), torch.tensor([2.25, 3.0], dtype=torch.float64))
    assert fluctuation(torch.tensor([1.0]), torch.tensor([1.0]), 1).tolist() == [0.0]
    # bias compensation: the removed channel 0's mean input (2 / 4) through down column 0 ([1, 0])
    assert flap_bias(_channels().weights["down"], torch.tensor([0.5, 0.0]), [0]).tolist() == [0.5, 0.0]
    assert flap_bias(_channels().weights["down"], torch.tensor([0.5, 0.0]), []).tolist() == [0.0, 0.0]
    # a KV group's channels: group 1 of 2 over 4 o_proj channels (2 query heads x head_dim 1)
    assert removed_channels(_heads(), [1], 4) == [2, 3] and removed_channels(_channels(), [1, 0], 2) == [0, 1]


def test_standardize_and_selection_by_hand():
    assert torch.allclose(standardize(torch.tensor([1.0, 2.0, 3.0])), torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))
    assert standardize(torch.tensor([2.0, 2.0])).tolist() == [0.0, 0.0]
    scores = {0: torch.tensor([3.0, 1.0, 2.0, 4.0]), 1: torch.tensor([1.0, 1.0, 5.0, 0.0])}
    # layer 1: units 0 and 1 tie; the higher index goes first
    assert uniform_removal(scores, 0.5) == {0: [1, 2], 1: [1, 3]}
    assert uniform_removal(scores, 0.99) == {0: [0, 1, 2], 1: [0, 1, 3]}  # one unit kept at least
    # global: standardised scores, layer 0: [0.39, -1.16, -0.39, 1.16], layer 1: [-0.34, -0.34, 1.47, -0.79];
    # layer-0 units hold 1 parameter, layer-1 units 10; budget 0.5 x (4 + 40) = 22 (+ half a unit).
    # Ascending: L0u1 (total 1), L1u3 (11), L0u2 (12), L1u1 (22), L1u0 (32: over), L0u0 (23: over 22.5), ...
    assert global_removal(scores, {0: 1, 1: 10}, 0.5) == {0: [1, 2], 1: [1, 3]}
    assert global_removal(scores, {0: 1, 1: 10}, 0.0) == {0: [], 1: []}


def test_random_and_layer_scores_by_hand():
    a, b = dense_random_scores(_channels()), dense_random_scores(_channels())
    assert torch.equal(a, b) and a.shape == (2,)
    assert not torch.equal(a, dense_random_scores(UnitInputs(CHANNELS, _channels().weights, seed=1)))
    # angular distance: orthogonal vectors 1/2, equal 0, opposite 1
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([[0.0, 2.0], [2.0, 2.0], [-3.0, 0.0]])
    assert torch.allclose(angular_distance(x, y), torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64))
    assert last_token_index(torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])).tolist() == [1, 2, -1]
    dense = {0: {"angular_sum": torch.tensor([1.0, 3.0]), "angular_count": torch.tensor([4.0, 4.0])},
             1: {"angular_sum": torch.tensor([0.5, 0.0]), "angular_count": torch.tensor([4.0, 0.0])}}
    assert angular_run_distances(dense, 1) == {0: 0.25, 1: 0.125}
    assert angular_run_distances(dense, 2) == {0: 0.75}  # the run from 1 passes the last layer
    assert best_run(angular_run_distances(dense, 1)) == 1
    with pytest.raises(StatsError, match="up to 2 layers"):
        angular_run_distances(dense, 3)


def test_replaceme_transform_by_hand():
    # M = diag(sqrt 2, 2) rows, target r = M T_true with T_true = [[1, 2], [0, 1]]
    mtm = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    mtr = mtm @ torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    transform = replaceme_transform(mtm, mtr, ridge=0.0)
    assert torch.allclose(transform, torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64))
    rr = torch.tensor(float((torch.tensor([[1.0, 2.0], [0.0, 1.0]]) * mtr).sum()))  # ||M T||^2 = tr(T^T M^T M T)
    assert abs(replaceme_residual(mtm, mtr, rr, transform)) < 1e-9


# -- statistics -----------------------------------------------------------------------------------

def _padded(family, n=6, length=10, seed=0) -> CalibrationBatch:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 500, (n, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[4, 3:] = 0
    return CalibrationBatch(ids, mask)


def _collect(checkpoint, calibration, mode="whole", **kw):
    return collect_stats(checkpoint, calibration, mode=mode, batch_size=2, observers=DENSE_OBSERVERS, progress=False,
                         dense=DenseSettings(max_depth=3, replaceme_depth=1), **kw)


def _assert_close_dense(a: RouterStats, b: RouterStats, rtol=1e-5, atol=1e-6):
    assert set(a.dense) == set(b.dense)
    for layer, entries in a.dense.items():
        assert set(entries) == set(b.dense[layer]), layer
        for name, value in entries.items():
            assert torch.allclose(value, b.dense[layer][name], rtol=rtol, atol=atol), (layer, name)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_dense_statistics_sequential_equals_whole_and_halves_merge(family, tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint(family)
    calibration = _padded(family)
    whole = _collect(checkpoint, calibration, "whole")
    sequential = _collect(checkpoint, calibration, "sequential")
    _assert_close_dense(whole, sequential)
    halves = [CalibrationBatch(calibration.input_ids[s], calibration.attention_mask[s]) for s in (slice(0, 4), slice(4, 6))]
    merged = _collect(checkpoint, halves[0]).merge(_collect(checkpoint, halves[1]))
    _assert_close_dense(whole, merged)
    # every decoder layer, not only the MoE ones; the file round trip keeps them
    assert set(whole.dense) == set(range(3))
    whole.save(tmp_path / "stats.safetensors")
    _assert_close_dense(whole, RouterStats.load(tmp_path / "stats.safetensors"), rtol=0, atol=0)
    if family == "deepseek_v3":  # dense first layer: its MLP statistics; no attention entries under MLA
        assert "mlp_down_sumsq" in whole.dense[0] and "attn_o_sum" not in whole.dense[0]
        assert "shared_down_sum" in whole.dense[1]


def test_dense_statistics_equal_the_models_own_activations(tiny_checkpoint):
    """o_proj inputs, q inputs, angular distances and ReplaceMe sums recomputed from a vanilla forward
    (hooks and output_hidden_states), padding excluded."""
    checkpoint = tiny_checkpoint("qwen2_moe")
    calibration = _padded("qwen2_moe")
    stats = _collect(checkpoint, calibration)
    model = load_full_model(checkpoint)
    layers = decoder_layers(model)
    captured: dict[str, list] = {"o": [], "q": [], "m": [], "y": [], "out": []}
    hooks = [layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: captured["o"].append(a[0])),
             layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: captured["q"].append(a[0])),
             layers[1].mlp.register_forward_hook(lambda m, a, o: captured["m"].append(o[0] if isinstance(o, tuple) else o)),
             layers[1].post_attention_layernorm.register_forward_pre_hook(lambda m, a: captured["y"].append(a[0])),
             layers[2].register_forward_hook(lambda m, a, o: captured["out"].append(o[0] if isinstance(o, tuple) else o))]
    with torch.no_grad():
        out = model.model(input_ids=calibration.input_ids, attention_mask=calibration.attention_mask,
                          output_hidden_states=True, use_cache=False)
    for hook in hooks:
        hook.remove()
    valid = calibration.attention_mask.reshape(-1).bool()
    o = captured["o"][0].reshape(-1, captured["o"][0].shape[-1])[valid].double()
    assert torch.allclose(stats.dense[0]["attn_o_sum"], o.sum(0), atol=1e-4)
    assert torch.allclose(stats.dense[0]["attn_o_sumsq"], o.square().sum(0), atol=1e-4)
    q = captured["q"][0].reshape(-1, captured["q"][0].shape[-1])[valid].double()
    assert torch.allclose(stats.dense[0]["attn_in_sumsq"], q.square().sum(0), atol=1e-4)
    assert float(stats.dense[0]["dense_tokens"]) == float(valid.sum())
    # angular: x_l = hidden_states[l] (a decoder input), run 0..1 ends at hidden_states[2]; last real tokens
    last = last_token_index(calibration.attention_mask)
    rows = torch.arange(len(last))
    hs = out.hidden_states
    expected = angular_distance(hs[0][rows, last], hs[2][rows, last]).sum()
    assert torch.allclose(stats.dense[0]["angular_sum"][1], expected, atol=1e-6)
    assert float(stats.dense[0]["angular_count"][1]) == len(last)
    # the run ending at the last layer compares with the last decoder OUTPUT, not the final-normed state
    unnormed = angular_distance(hs[0][rows, last], captured["out"][0][rows, last]).sum()
    assert torch.allclose(stats.dense[0]["angular_sum"][2], unnormed, atol=1e-6)
    assert not torch.allclose(stats.dense[0]["angular_sum"][2], angular_distance(hs[0][rows, last], hs[3][rows, last]).sum())
    # ReplaceMe at cut start 2: M, y of layer 1, h_end = output of layer 2, valid tokens only
    m = captured["m"][0].reshape(-1, 32)[valid].double()
    y = captured["y"][0].reshape(-1, 32)[valid].double()
    h_end = captured["out"][0].reshape(-1, 32)[valid].double()
    assert torch.allclose(stats.dense[2]["replaceme_mtm"], m.T @ m, atol=1e-4)
    assert torch.allclose(stats.dense[2]["replaceme_mtr"], m.T @ (h_end - y), atol=1e-4)
    # the fitted T solves the least-squares problem on those activations
    transform = replaceme_transform(stats.dense[2]["replaceme_mtm"], stats.dense[2]["replaceme_mtr"], ridge=0.0)
    reference = torch.linalg.lstsq(m, h_end - y).solution
    assert torch.allclose(transform, reference, atol=1e-5)


# -- plans ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dense_stats(tiny_checkpoint):
    cache = {}

    def make(family):
        if family not in cache:
            cache[family] = _collect(tiny_checkpoint(family), _padded(family))
        return cache[family]

    return make


def _round_trip(plan: Plan, checkpoint) -> Plan:
    again = Plan.from_json(json.loads(json.dumps(plan.to_json())))
    validate_plan(again, api.model_info(checkpoint).geometry)
    assert again.to_json() == plan.to_json()
    return again


@pytest.mark.parametrize("method", ["magnitude", "wanda_sp", "flap", "dense_random"])
def test_head_plans(method, tiny_checkpoint, dense_stats):
    checkpoint = tiny_checkpoint("mixtral")
    plan = api.plan_pruning(checkpoint, method=method, ratio=0.5, stats=dense_stats("mixtral"), options={"unit": "heads"})
    _round_trip(plan, checkpoint)
    assert plan.budget["removed_fraction"] == 0.5 and plan.layers == {}
    for layer in range(3):
        drop = plan.actions[layer][0]
        assert isinstance(drop, DropAttentionHeads) and len(drop.kv_groups) == 1 and drop.heads == ()
    if method == "flap":  # global threshold (widths may differ) + compensation on o_proj
        assert plan.budget["widths"] == "global"
        assert all(len(plan.actions[layer][0].output_bias) == 32 for layer in range(3))  # hidden size
    else:
        assert plan.budget["widths"] == "uniform"


def test_flap_bias_equals_removed_channels_mean_contribution(tiny_checkpoint, dense_stats):
    checkpoint = tiny_checkpoint("mixtral")
    stats = dense_stats("mixtral")
    plan = api.plan_pruning(checkpoint, method="flap", ratio=0.5, stats=stats, options={"unit": "heads", "widths": "uniform"})
    o = LazyCheckpoint(checkpoint).get("model.layers.1.self_attn.o_proj.weight").double()
    group = plan.actions[1][0].kv_groups[0]
    width = o.shape[1] // 2  # 2 KV groups
    channels = list(range(group * width, (group + 1) * width))
    mean = stats.dense[1]["attn_o_sum"] / stats.dense[1]["dense_tokens"]
    expected = o[:, channels] @ mean[channels]
    assert torch.allclose(torch.tensor(plan.actions[1][0].output_bias, dtype=torch.float64), expected)


def test_channel_plans_shared_and_dense(tiny_checkpoint, dense_stats):
    qwen = tiny_checkpoint("qwen2_moe")
    plan = api.plan_pruning(qwen, method="wanda_sp", ratio=0.25, stats=dense_stats("qwen2_moe"), options={"unit": "shared"})
    _round_trip(plan, qwen)
    for layer in range(3):
        slice_ = plan.actions[layer][0]
        assert isinstance(slice_, SliceChannels) and slice_.target == "shared_experts" and len(slice_.kept) == 18  # 24 - 6
    deepseek = tiny_checkpoint("deepseek_v3")
    plan = api.plan_pruning(deepseek, method="magnitude", ratio=0.5, options={"unit": "mlp"})
    _round_trip(plan, deepseek)
    assert list(plan.actions) == [0] and plan.actions[0][0].target == "dense_mlp" and len(plan.actions[0][0].kept) == 12
    with pytest.raises(PlanError, match="multi-head latent attention"):
        api.plan_pruning(deepseek, method="magnitude", ratio=0.5, options={"unit": "heads"})
    with pytest.raises(PlanError, match="no dense MLP"):
        api.plan_pruning(tiny_checkpoint("mixtral"), method="magnitude", ratio=0.5, options={"unit": "mlp"})
    with pytest.raises(PlanError, match="does not take the option"):
        api.plan_pruning(deepseek, method="angular", ratio=0.5, stats=dense_stats("deepseek_v3"), options={"unit": "mlp"})


def test_layer_plans(tiny_checkpoint, dense_stats):
    checkpoint = tiny_checkpoint("deepseek_v3")
    stats = dense_stats("deepseek_v3")
    plan = api.plan_pruning(checkpoint, method="angular", stats=stats, options={"layers": 2})
    _round_trip(plan, checkpoint)
    distances = angular_run_distances(stats.dense, 2)
    start = min(distances, key=distances.get)
    assert plan.actions == {start: [DropLayer()], start + 1: [DropLayer()]}
    plan = api.plan_pruning(checkpoint, method="dense_random", seed=3, options={"unit": "layers", "layers": 1})
    assert len(plan.actions) == 1
    with pytest.raises(PlanError, match="--layers must be"):
        api.plan_pruning(checkpoint, method="angular", stats=stats, options={"layers": 3})
    with pytest.raises(StatsError, match="cuts of 1 layers, not 2"):
        api.plan_pruning(checkpoint, method="replaceme", stats=stats, options={"layers": 2})
    plan = api.plan_pruning(checkpoint, method="replaceme", stats=stats, options={"layers": 1})
    again = _round_trip(plan, checkpoint)
    start = plan.budget["start"]
    replace = again.actions[start - 1][0]
    assert isinstance(replace, TransformMlpOutput) and again.actions[start] == [DropLayer()]
    assert torch.equal(replace.matrix, plan.actions[start - 1][0].matrix)
    assert plan.budget["residual_with_transform"] < plan.budget["residual_without_transform"]


def _block_output_and_input(model, layer: int, calibration):
    """(M, y) of decoder layer ``layer``: its MLP block output and residual input."""
    layers = decoder_layers(model)
    seen = {}
    def keep(name, value):  # a hook returning a value would replace the module's output
        seen.setdefault(name, value)

    hooks = [layers[layer].mlp.register_forward_hook(lambda m, a, o: keep("m", o[0] if isinstance(o, tuple) else o)),
             layers[layer].post_attention_layernorm.register_forward_pre_hook(lambda m, a: keep("y", a[0]))]
    with torch.no_grad():
        model.model(input_ids=calibration.input_ids, attention_mask=calibration.attention_mask, use_cache=False)
    for hook in hooks:
        hook.remove()
    return seen["m"], seen["y"]


@pytest.mark.parametrize("family, kept_layer", [("mixtral", 1), ("qwen2_moe", 1), ("gpt_oss", 1), ("deepseek_v3", 0)])
def test_replaceme_plan_multiplies_the_block_output_by_t(family, kept_layer, tiny_checkpoint, dense_stats):
    """The planner's action makes the kept layer's block output M T (row vectors) on the same inputs:
    its matrix is T^T in the column convention of transform_mlp_output (tests/test_dense_ops.py tests
    the fold itself)."""
    checkpoint = tiny_checkpoint(family)
    calibration = _padded(family)
    model = load_full_model(checkpoint)
    m, _ = _block_output_and_input(model, kept_layer, calibration)
    transform = torch.randn(32, 32, generator=torch.Generator().manual_seed(0)) / 6
    info = api.model_info(checkpoint)
    plan = Plan(layers={}, method="replaceme", num_experts=info.geometry.num_experts,
                actions={kept_layer: [TransformMlpOutput(transform.T.contiguous())]})
    validate_plan(plan, info.geometry)
    apply_plan_in_memory(model, plan)
    folded, _ = _block_output_and_input(model, kept_layer, calibration)
    assert torch.allclose(folded.double(), m.double() @ transform.double(), atol=1e-4)


def test_combined_plan_reports_the_split(tiny_checkpoint, dense_stats, family_stats):
    checkpoint = tiny_checkpoint("mixtral")
    info = api.model_info(checkpoint)
    expert = api.plan_pruning(checkpoint, method="frequency", ratio=0.25, stats=family_stats("mixtral"))
    dense = api.plan_pruning(checkpoint, method="magnitude", ratio=0.5, options={"unit": "heads"})
    combined = combine_plans(info, expert, dense)
    _round_trip(combined, checkpoint)
    split = combined.budget["split"]
    # 3 MoE layers x 2 dropped experts x (gate + up + down: 3 x 16 x 32, and the router row: 32)
    assert split["expert_params_removed"] == 3 * 2 * (3 * 16 * 32 + 32)
    assert split["dense_params_removed"] == dense.budget["removed_params"]
    assert combined.layers == expert.layers and combined.actions == dense.actions
    assert math.isclose(split["removed_fraction"], (split["expert_params_removed"] + split["dense_params_removed"])
                        / split["total_params"])


def test_combined_budget_split(tiny_checkpoint, dense_stats, family_stats):
    checkpoint = tiny_checkpoint("mixtral")
    info = api.model_info(checkpoint)
    # mixtral tiny: 3 layers x q [32, 32], k/v [16, 32], o [32, 32]
    assert unit_parameters(info, "heads") == 3 * (32 * 32 * 2 + 16 * 32 * 2)
    experts = 3 * 8 * 3 * 16 * 32
    total = sum(math.prod(info.layout.checkpoint.shape(n)) for n in info.layout.checkpoint.keys())  # noqa: SIM118
    expert_ratio, dense_ratio = split_budget(info, 0.2, 0.75, "heads")
    assert math.isclose(expert_ratio * experts, 0.75 * 0.2 * total)
    assert math.isclose(dense_ratio * unit_parameters(info, "heads"), 0.25 * 0.2 * total)
    with pytest.raises(PlanError, match="must stay below 1"):
        split_budget(info, 0.9, 0.0, "heads")
    plan = plan_combined(checkpoint, total_ratio=0.2, expert_share=0.75, expert_method="frequency",
                         dense_method="magnitude", stats=family_stats("mixtral"), unit="heads")
    assert plan.layers and plan.actions and plan.budget["expert_share"] == 0.75


def test_cli_flags_reach_the_method():
    args = build_parser().parse_args(["prune", "m", "--method", "angular", "--layers", "2", "--out", "o"])
    assert method_options(args) == {"layers": 2}
    args = build_parser().parse_args(["prune", "m", "--method", "flap", "--unit", "shared", "--widths", "uniform",
                                      "--ratio", "0.5", "--out", "o"])
    assert method_options(args) == {"unit": "shared", "widths": "uniform"}
    assert get_method("flap").method_options(method_options(args))["compensate"] is True
    # prune --data collects ReplaceMe's sums at the depth it plans for
    assert dense_settings_for("replaceme", {"layers": 2}).replaceme_depth == 2
    assert dense_settings_for("flap", {"unit": "heads"}) is None


@pytest.mark.parametrize("family, method, options", [
    ("qwen2_moe", "flap", {"unit": "heads"}),      # non-uniform heads + new o_proj biases: moeprune.load
    ("qwen2_moe", "flap", {"unit": "shared"}),     # shared-expert channels behind Qwen2-MoE's gate
    ("deepseek_v3", "wanda_sp", {"unit": "mlp"}),  # the dense first layer, uniform: vanilla
    ("mixtral", "replaceme", {"layers": 1}),       # a dropped layer and the fold: vanilla
])
def test_dense_methods_write_checkpoints_that_load(family, method, options, tiny_checkpoint, dense_stats, tmp_path):
    """From statistics to a checkpoint: the planner's plan written by the streaming writer and loaded
    by moeprune.load gives the logits of the same plan applied in memory to the original model."""
    checkpoint = tiny_checkpoint(family)
    ratio = None if method == "replaceme" else 0.5
    plan = api.prune(checkpoint, tmp_path / "out", method=method, ratio=ratio, stats=dense_stats(family), options=options,
                     progress=False)
    assert_written_equals_in_memory(checkpoint, tmp_path / "out", plan)
