"""Neuron ("atomic expert") slicing: the neurons observer, the neuron scorers, the planner, the
slice_neurons op (uniform: vanilla checkpoint; compact: moeprune.load) and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SAMPLES, SEQ_LEN, logits_of, vanilla

import moeprune
from moeprune import api
from moeprune.apply import apply_plan_in_memory
from moeprune.calibration.data import CalibrationBatch
from moeprune.calibration.engine import collect_stats, load_full_model
from moeprune.cli import main
from moeprune.compact import EXPERT_WIDTHS, is_compact
from moeprune.errors import MoePruneError, PlanError
from moeprune.layout import model_expert, model_experts_module
from moeprune.methods import get_method
from moeprune.observe import LayerContext, LayerForward, RoutedPairs
from moeprune.observe.neurons import NeuronEnergy
from moeprune.plan import Plan, SliceNeurons
from moeprune.plan.actions import neuron_ranges, parse_neuron_ranges
from moeprune.plan.neurons import select_neurons, uniform_width, width_multiple
from moeprune.scoring.neurons import UNROUTED, NeuronWeights, camera_p_scores, random_neuron_scores, wanda_neuron_scores
from moeprune.stats import RouterStats

# --------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def neuron_stats(tiny_checkpoint, calibration):
    """Factory ``neuron_stats(family) -> RouterStats`` with the neurons observer (cached)."""
    cache = {}

    def make(family: str) -> RouterStats:
        if family not in cache:
            observers = api.statistics_for("camera_p")
            cache[family] = collect_stats(tiny_checkpoint(family), calibration(family), mode="whole", batch_size=2,
                                          observers=observers, progress=False)
        return cache[family]

    return make


def _masked_dense(source, plan: Plan):
    """The dense model with every removed neuron's down column zeroed (its contribution is then 0)."""
    model = load_full_model(source)
    family = moeprune.arch.family_for_model_type(model.config.model_type)
    with torch.no_grad():
        for layer, actions in plan.actions.items():
            for action in actions:
                for expert, kept in action.experts.items():
                    down = model_expert(model, family, layer, expert)["down"]  # a view of the block
                    removed = sorted(set(range(down.shape[1])) - set(kept))
                    down[:, removed] = 0
    return model


# --------------------------------------------------------------------------------------------------
# observer


def _forward(valid, tokens, experts, weights, h) -> LayerForward:
    pairs = RoutedPairs(torch.tensor(tokens), torch.tensor(experts), torch.tensor(weights, dtype=torch.float32),
                        torch.zeros(len(tokens), 2), torch.tensor(h, dtype=torch.float32))
    return LayerForward(valid=torch.tensor(valid), top_k_index=torch.zeros(len(valid), 1, dtype=torch.long),
                        top_k_weights=torch.zeros(len(valid), 1), pairs=pairs)


def test_observer_hand_computed_padding_and_merge():
    # 3 tokens (token 2 is padding), 2 experts, I = 2; pairs (token, expert, gate, h)
    pairs = dict(tokens=[0, 0, 1, 2], experts=[0, 1, 0, 1], weights=[0.5, 0.5, 1.0, 1.0],
                 h=[[2.0, -1.0], [1.0, 3.0], [1.0, 4.0], [100.0, 100.0]])
    whole = NeuronEnergy(LayerContext(num_experts=2, top_k=1))
    whole.update(_forward([True, True, False], **pairs))
    out = whole.result()
    # expert 0: token 0 (g=0.5, h=(2,-1)) and token 1 (g=1, h=(1,4)); expert 1: token 0 (g=0.5, h=(1,3)); padding ignored
    torch.testing.assert_close(out["neuron_gh2_sum"], torch.tensor([[1.0 + 1.0, 0.25 + 16.0], [0.25, 2.25]], dtype=torch.float64))
    torch.testing.assert_close(out["neuron_h2_sum"], torch.tensor([[4.0 + 1.0, 1.0 + 16.0], [1.0, 9.0]], dtype=torch.float64))
    torch.testing.assert_close(out["neuron_gh2_max"], torch.tensor([[1.0, 16.0], [0.25, 2.25]], dtype=torch.float64))
    halves = NeuronEnergy(LayerContext(num_experts=2, top_k=1))  # two forwards of one token each == one of both
    halves.update(_forward([True], [0, 0], [0, 1], [0.5, 0.5], [[2.0, -1.0], [1.0, 3.0]]))
    halves.update(_forward([True], [0], [0], [1.0], [[1.0, 4.0]]))
    for name, value in halves.result().items():
        torch.testing.assert_close(value, out[name], rtol=0, atol=0)


def test_observer_statistics_of_halves_merge_to_the_whole(tiny_checkpoint, calibration):
    batch = calibration("mixtral")
    observers = api.statistics_for("camera_p")
    run = lambda b: collect_stats(tiny_checkpoint("mixtral"), b, mode="whole", batch_size=2, observers=observers,
                                  progress=False)
    half = SAMPLES // 2
    mask = batch.attention_mask.clone()
    mask[-1, -5:] = 0  # some padding, which must not count
    batch = CalibrationBatch(batch.input_ids, mask)
    first = run(CalibrationBatch(batch.input_ids[:half], mask[:half]))
    second = run(CalibrationBatch(batch.input_ids[half:], mask[half:]))
    whole = run(batch)
    merged = first.merge(second)
    for layer, entries in whole.layers.items():
        assert entries["neuron_gh2_sum"].shape == (8, 16)
        for name in ("neuron_gh2_sum", "neuron_h2_sum", "neuron_gh2_max"):
            torch.testing.assert_close(merged.layers[layer][name], entries[name], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# scorers


WEIGHTS = NeuronWeights(torch.tensor([[1.0, 4.0], [2.0, 0.5], [3.0, 3.0]], dtype=torch.float64),
                        torch.tensor([[1.0, 2.0], [3.0, 1.0], [1.0, 1.0]], dtype=torch.float64))
LAYER = {"frequency": torch.tensor([3.0, 1.0, 0.0]),
         "neuron_gh2_sum": torch.tensor([[4.0, 9.0], [16.0, 1.0], [0.0, 0.0]]),
         "neuron_gh2_max": torch.tensor([[2.0, 5.0], [16.0, 1.0], [0.0, 0.0]])}


def test_neuron_scorers_hand_computed():
    camera = camera_p_scores(LAYER, weights=WEIGHTS, rho=0.5)
    # ||w||^2 * (0.5 sum + 0.5 max); expert 2 unrouted -> UNROUTED
    expected = torch.tensor([[1 * (2 + 1), 4 * (4.5 + 2.5)], [2 * (8 + 8), 0.5 * (0.5 + 0.5)], [UNROUTED, UNROUTED]])
    torch.testing.assert_close(camera, expected.double(), rtol=0, atol=1e-12)
    default = camera_p_scores(LAYER, weights=WEIGHTS)  # rho = 0.9
    torch.testing.assert_close(default[0, 0], torch.tensor(1 * (0.1 * 4 + 0.9 * 2), dtype=torch.float64))
    wanda = wanda_neuron_scores(LAYER, weights=WEIGHTS, rho=0.5)  # options it does not take are ignored
    expected = torch.tensor([[1 * 2.0, 2 * 3.0], [3 * 4.0, 1 * 1.0], [UNROUTED, UNROUTED]])
    torch.testing.assert_close(wanda, expected.double(), rtol=0, atol=1e-12)
    a = random_neuron_scores(LAYER, weights=WEIGHTS, seed=1, layer=2)
    assert torch.equal(a, random_neuron_scores(LAYER, weights=WEIGHTS, seed=1, layer=2))
    assert not torch.equal(a, random_neuron_scores(LAYER, weights=WEIGHTS, seed=2, layer=2))
    assert bool((a[:2] > 0).all() and (a[:2] <= 1).all()) and bool((a[2] == UNROUTED).all())
    with pytest.raises(moeprune.errors.StatsError, match="neuron_gh2_sum has shape"):
        wanda_neuron_scores({**LAYER, "neuron_gh2_sum": torch.zeros(3, 5)}, weights=WEIGHTS)


def test_neuron_weights_are_down_column_norms():
    down = torch.tensor([[1.0, -2.0], [3.0, 0.5]])  # [H, I]: column k = neuron k
    weights = NeuronWeights.of_down([down, 2 * down])
    torch.testing.assert_close(weights.down_sq_norm, torch.tensor([[10.0, 4.25], [40.0, 17.0]], dtype=torch.float64))
    torch.testing.assert_close(weights.down_l1, torch.tensor([[4.0, 2.5], [8.0, 5.0]], dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
# selection


SCORES = {1: torch.tensor([[5.0, 1.0, 2.0, 8.0], [0.5, 0.4, 9.0, 7.0]], dtype=torch.float64),
          3: torch.tensor([[3.0, 6.0, 0.1, 0.2], [UNROUTED] * 4], dtype=torch.float64)}


def test_global_and_per_layer_selection_hand_checked():
    # 16 neurons, ratio 0.25 -> 4 go. Global: lowest removable (each expert's best stays):
    # unrouted (3,1): 3 of 4 removable (-1, -1, -1, its best = neuron 0 stays), then 0.1 at (3,0,2)
    kept = select_neurons(SCORES, {}, ratio=0.25, layout="compact", selection="global")
    assert kept == {1: {0: (0, 1, 2, 3), 1: (0, 1, 2, 3)}, 3: {0: (0, 1, 3), 1: (0,)}}
    # per layer: 2 go in each: layer 1 -> 0.4 (1,1) and 0.5 (1,0); layer 3 -> two of the unrouted
    kept = select_neurons(SCORES, {}, ratio=0.25, layout="compact", selection="per_layer")
    assert kept == {1: {0: (0, 1, 2, 3), 1: (2, 3)}, 3: {0: (0, 1, 2, 3), 1: (0, 3)}}
    # protecting the unrouted (3, 1): the 4 lowest removable are then 0.1, 0.2 (3, 0) and 0.4, 0.5 (1, 1)
    kept = select_neurons(SCORES, {3: [1]}, ratio=0.25, layout="compact", selection="global")
    assert kept == {1: {0: (0, 1, 2, 3), 1: (2, 3)}, 3: {0: (0, 1), 1: (0, 1, 2, 3)}}


def test_uniform_width_and_kept_neurons():
    # 16 neurons, ratio 0.5 -> 8 go, 4 experts -> 2 each: each keeps its top-2
    kept = select_neurons(SCORES, {}, ratio=0.5, layout="uniform")
    assert kept == {1: {0: (0, 3), 1: (2, 3)}, 3: {0: (0, 1), 1: (0, 1)}}
    # a protected expert keeps all 4; the other 3 lose round(8 / 3) = 3 each
    kept = select_neurons(SCORES, {1: [0]}, ratio=0.5, layout="uniform")
    assert kept[1][0] == (0, 1, 2, 3) and {len(n) for e, n in kept[3].items()} == {1} and kept[1][1] == (2,)
    assert uniform_width(16, 8, 128, 0.25) == 12 and uniform_width(16, 8, 128, 0.0) == 16
    # 4096 of 64 x 256 go, 63 sliceable experts: 65 each -> 191, rounded to 192 (grouped_mm needs 16-byte strides)
    assert width_multiple(256) == 8 and width_multiple(16) == 1 and width_multiple(250) == 1
    assert uniform_width(256, 63, 64 * 256, 0.25, width_multiple(256)) == 192
    with pytest.raises(PlanError, match="largest ratio"):
        uniform_width(4, 2, 8, 0.9)


def test_slice_neurons_json_ranges_round_trip():
    assert neuron_ranges((0, 1, 2, 5, 7, 8)) == "0-2,5,7-8" and parse_neuron_ranges("0-2,5,7-8", "x") == (0, 1, 2, 5, 7, 8)
    action = SliceNeurons({0: (0, 1, 2, 9), 3: (4,)})
    plan = Plan(layers={}, method="manual", num_experts=4, actions={1: [action]})
    again = Plan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again.actions == plan.actions
    assert Plan.from_json({"method": "m", "actions": {"1": [{"op": "slice_neurons", "experts": {"0": [2, 1]}}]}}
                          ).actions[1][0].experts == {0: (1, 2)}  # lists still load
    with pytest.raises(PlanError, match="ascending range"):
        parse_neuron_ranges("3-1", "x")


# --------------------------------------------------------------------------------------------------
# plans applied: identity, uniform (vanilla), compact (moeprune.load), streaming == in-memory


def test_keeping_every_neuron_is_the_identity(tiny_checkpoint, neuron_stats, tmp_path):
    source = tiny_checkpoint("mixtral")
    plan = api.plan_pruning(source, method="camera_p", ratio=0.0, stats=neuron_stats("mixtral"))
    assert plan.budget["removed_neurons"] == 0 and plan.budget["vanilla"]
    reference = logits_of(load_full_model(source))
    assert torch.equal(logits_of(apply_plan_in_memory(load_full_model(source), plan)), reference)
    out = api.apply(source, plan, tmp_path / "same", progress=False)
    assert torch.equal(logits_of(vanilla(out)), reference)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss", "nemotron_h"])
def test_uniform_checkpoint_is_vanilla_and_equals_the_masked_dense_model(family, tiny_checkpoint, neuron_stats, tmp_path):
    source = tiny_checkpoint(family)
    plan = api.plan_pruning(source, method="wanda_neuron", ratio=0.25, stats=neuron_stats(family),
                            protect_super_experts=False)
    assert plan.budget["vanilla"] and plan.budget["removed_neurons"] == plan.budget["routed_neurons"] // 4
    out = api.apply(source, plan, tmp_path / "uniform", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert "moeprune" not in config and config[get_family(family).spec["config"]["expert_width"]] == 12
    expected = logits_of(_masked_dense(source, plan))
    loaded = vanilla(out)
    torch.testing.assert_close(logits_of(loaded), expected, rtol=1e-5, atol=1e-5)
    in_memory = apply_plan_in_memory(load_full_model(source), plan)  # streaming == in-memory
    torch.testing.assert_close(logits_of(in_memory), logits_of(loaded), rtol=0, atol=1e-6)


def get_family(name):
    from moeprune.arch import known_families

    return known_families()[name]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "nemotron_h"])
def test_compact_checkpoint_loads_and_equals_the_masked_dense_model(family, tiny_checkpoint, neuron_stats, tmp_path):
    source = tiny_checkpoint(family)
    stats = neuron_stats(family)
    plan = api.plan_pruning(source, method="camera_p", ratio=0.3, stats=stats, options={"layout": "compact"})
    widths = {len(n) for actions in plan.actions.values() for n in actions[0].experts.values()}
    assert len(widths) > 1 and min(widths) >= 1
    out = api.apply(source, plan, tmp_path / "compact", progress=False)
    section = json.loads((out / "config.json").read_text())["moeprune"]
    assert set(section[EXPERT_WIDTHS]) == {str(layer) for layer in plan.actions}
    assert f"layer {min(plan.actions)}: widths" in (out / "README.md").read_text()  # the model card says what was sliced
    model = moeprune.load(out)
    assert all(is_compact(model_experts_module(model, get_family(family), layer)) for layer in plan.actions)
    loaded = logits_of(model)
    torch.testing.assert_close(loaded, logits_of(_masked_dense(source, plan)), rtol=1e-5, atol=1e-5)
    in_memory = apply_plan_in_memory(load_full_model(source), plan)  # streaming == in-memory
    assert torch.equal(logits_of(in_memory), loaded)
    with pytest.raises(MoePruneError, match="different widths"):
        model.save_pretrained(tmp_path / "again")
    with pytest.raises(RuntimeError):  # vanilla transformers refuses loudly (it cannot stack experts of different widths)
        vanilla(out)


def test_super_experts_untouched_and_deepseek_uniform_needs_the_loader(tiny_checkpoint, neuron_stats, tmp_path):
    source = tiny_checkpoint("deepseek_v3")
    stats = neuron_stats("deepseek_v3")
    plan = api.plan_pruning(source, method="camera_p", ratio=0.25, stats=stats)
    assert plan.protected  # the tiny model has a super expert
    for layer, experts in plan.protected.items():
        for expert in experts:
            assert plan.actions[layer][0].experts[expert] == tuple(range(16))
    # shared experts are sized by moe_intermediate_size * n_shared_experts: no vanilla config fits
    plan = api.plan_pruning(source, method="camera_p", ratio=0.25, stats=stats, protect_super_experts=False)
    assert not plan.budget["vanilla"]
    out = api.apply(source, plan, tmp_path / "uniform", progress=False)
    with pytest.raises(RuntimeError, match="mismatched"):  # mismatched sizes: vanilla transformers refuses
        vanilla(out)
    torch.testing.assert_close(logits_of(moeprune.load(out)), logits_of(_masked_dense(source, plan)), rtol=1e-5, atol=1e-5)


def test_bad_requests_get_one_clear_error(tiny_checkpoint, neuron_stats, tmp_path, calib_file):
    source = tiny_checkpoint("mixtral")
    stats = neuron_stats("mixtral")
    for ratio in (1.0, -0.1, None):
        with pytest.raises(PlanError, match=r"--ratio in \[0, 1\)"):
            api.plan_pruning(source, method="camera_p", ratio=ratio, stats=stats)
    with pytest.raises(PlanError, match="unknown layout 'diagonal'"):
        api.plan_pruning(source, method="camera_p", ratio=0.25, stats=stats, options={"layout": "diagonal"})
    with pytest.raises(PlanError, match="does not take the option.*rho"):
        api.plan_pruning(source, method="wanda_neuron", ratio=0.25, stats=stats, options={"rho": 0.5})
    with pytest.raises(PlanError, match="gpt_oss stores its routed experts fused on disk"):
        api.plan_pruning(tiny_checkpoint("gpt_oss"), method="random_neuron", ratio=0.25, options={"layout": "compact"})
    with pytest.raises(PlanError, match="keep all 16 neurons; pass --no-protect-super-experts"):  # GPT-OSS: one width
        api.plan_pruning(tiny_checkpoint("gpt_oss"), method="camera_p", ratio=0.25, stats=neuron_stats("gpt_oss"))
    with pytest.raises(PlanError, match="unknown selection"):  # refused before calibration starts
        api.prune(source, tmp_path / "out", method="camera_p", ratio=0.25, data=calib_file,
                  options={"selection": "sideways"}, progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_prune_compact_end_to_end(tiny_checkpoint, calib_file, tmp_path, capsys):
    source = tiny_checkpoint("qwen3_moe")
    out = tmp_path / "pruned"
    code = main(["-q", "prune", str(source), "--method", "camera_p", "--ratio", "0.25", "--layout", "compact",
                 "--selection", "per_layer", "--rho", "0.5", "--data", str(calib_file), "--samples", str(SAMPLES),
                 "--seq-len", str(SEQ_LEN), "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "routed-expert neurons" in printed and "compact layout" in printed
    plan = Plan.load(out)
    assert plan.budget["layout"] == "compact" and plan.budget["selection"] == "per_layer" and plan.budget["rho"] == 0.5
    per_layer = {layer: sum(len(n) for n in actions[0].experts.values()) for layer, actions in plan.actions.items()}
    assert set(per_layer.values()) == {8 * 16 - 32}  # the same fraction in every layer
    assert logits_of(moeprune.load(out)).isfinite().all()
    assert main(["prune", str(source), "--method", "camera_p", "--ratio", "0.25", "--layout", "nope",
                 "--data", str(calib_file), "--out", str(tmp_path / "x")]) == 2


def test_sweep_row_of_a_neuron_plan(tiny_checkpoint, neuron_stats):
    from moeprune.sweep import kept_summary

    source = tiny_checkpoint("mixtral")
    plan = api.plan_pruning(source, method="random_neuron", ratio=0.5, stats=neuron_stats("mixtral"))
    assert kept_summary(plan, 8) == (8, pytest.approx(1 - plan.budget["routed_expert_param_ratio"]))
    drop = api.plan_pruning(source, method="frequency", ratio=0.5, stats=neuron_stats("mixtral"))
    assert kept_summary(drop, 8) == (4, 0.5)
    assert get_method("random_neuron").stochastic


def test_bench_compact_compares_models_of_equal_size(tmp_path):
    """scripts/bench_compact.py smoke run: the uniform and compact models hold the same routed
    parameters (half the dense model's at ratio 0.5); timings are reported, never checked here."""
    import importlib
    import sys
    from pathlib import Path

    scripts = str(Path(__file__).resolve().parents[1] / "scripts")
    sys.path.insert(0, scripts)
    try:
        bench = importlib.import_module("bench_compact")
    finally:
        sys.path.remove(scripts)
    out = tmp_path / "bench.json"
    assert bench.main(["--hidden", "32", "--width", "16", "--layers", "1", "--seq", "4", "--batch", "1",
                       "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    params = result["routed_params"]
    assert params["uniform"] == params["compact"] == params["uniform_eager"] == params["dense"] // 2
    assert set(result["seconds"]) == {"prefill", "decode"} and "compact_over_uniform_min" in result["seconds"]["prefill"]


@pytest.mark.parametrize("layout", ["uniform", "compact"])
def test_heapr_end_to_end(layout, tiny_checkpoint, calib_file, tmp_path):
    """`prune --method heapr --data`: the calibration pass is the layer-by-layer backward pass, the
    neuron planner ranks HEAPr's scores, and the output loads (vanilla for uniform, moeprune.load for
    compact) and equals the original model with the removed neurons zeroed."""
    source = tiny_checkpoint("qwen3_moe")
    out = tmp_path / layout
    plan = api.prune(source, out, method="heapr", ratio=0.25, data=calib_file, samples=SAMPLES, seq_len=SEQ_LEN,
                     options={"layout": layout}, protect_super_experts=False, progress=False)
    assert plan.method == "heapr" and plan.budget["layout"] == layout
    assert plan.calibration["num_tokens"] > 0
    loaded = vanilla(out) if layout == "uniform" else moeprune.load(out)
    assert torch.allclose(logits_of(loaded), logits_of(_masked_dense(source, plan)), atol=1e-5, rtol=1e-4)
