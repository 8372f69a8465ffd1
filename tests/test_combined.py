"""Combined budgets (moeprune.plan.combined): one budget of all the parameters split between an expert
action and a dense action. The accounting is checked by hand on the tiny Mixtral (H = 32, 3 layers,
8 experts of width 16, 4 query heads and 2 KV groups of head_dim 8) and against the tensors the written
checkpoint holds; written == in memory; vanilla transformers loads uniform outputs; the CLI refuses
inconsistent requests before any weight is read."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
import torch
from conftest import assert_written_equals_in_memory, logits_of, script_module, vanilla

from moeprune import api
from moeprune.apply import apply_plan_in_memory
from moeprune.calibration.engine import collect_stats, load_full_model
from moeprune.cli import main
from moeprune.errors import MoePruneError, PlanError
from moeprune.io.checkpoint import LazyCheckpoint
from moeprune.observe import DenseSettings
from moeprune.plan import Plan, validate_plan
from moeprune.plan.actions import DropAttentionHeads, DropLayer
from moeprune.plan.combined import (
    check_combined,
    combine_plans,
    layer_parameters,
    model_parameters,
    nearest_drop_ratio,
    output_parameters,
    parameters_removed,
    plan_combined,
    split_options,
)

H, EXPERTS, WIDTH = 32, 8, 16
EXPERT = 3 * WIDTH * H + H           # gate, up [16, 32], down [32, 16] + its router row [32]
KV_GROUP = 16 * H + 2 * 8 * H + H * 16  # 2 query heads' q rows, its k and v rows, their o columns
LAYER = (H * H * 2 + 16 * H * 2) + EXPERTS * (3 * WIDTH * H) + EXPERTS * H + 2 * H  # attention, experts, router, 2 norms


def stored_parameters(folder) -> int:
    """Parameters of the tensors a checkpoint folder holds (safetensors headers)."""
    checkpoint = LazyCheckpoint(folder)
    return sum(math.prod(checkpoint.shape(name)) for name in checkpoint.keys())  # noqa: SIM118 (not a dict)


@pytest.fixture(scope="module")
def mixtral(tiny_checkpoint):
    return tiny_checkpoint("mixtral")


@pytest.fixture(scope="module")
def dense_stats(tiny_checkpoint, calibration):
    """Router and dense statistics (the observers of frequency / reap and of flap / angular)."""
    cache = {}

    def make(family):
        if family not in cache:
            observers = ["routing", "expert_outputs", "shared_outputs", "dense_channels", "angular"]
            cache[family] = collect_stats(tiny_checkpoint(family), calibration(family), mode="whole", batch_size=2,
                                          observers=observers, progress=False, dense=DenseSettings(max_depth=2))
        return cache[family]

    return make


def test_counts_by_hand(mixtral):
    info = api.model_info(mixtral)
    assert layer_parameters(info) == {0: LAYER, 1: LAYER, 2: LAYER}
    assert model_parameters(info) == 3 * LAYER + 2 * 512 * H + H  # + embeddings, lm_head (vocab 512), final norm
    plan = Plan(layers={layer: [0, 1, 2, 3, 4, 5] for layer in range(3)}, method="manual", num_experts=EXPERTS,
                actions={layer: [DropAttentionHeads(kv_groups=(1,))] for layer in range(3)})
    validate_plan(plan, info.geometry)
    assert parameters_removed(info, plan) == 3 * (2 * EXPERT + KV_GROUP)
    dropped = Plan(layers={}, method="manual", num_experts=EXPERTS, actions={1: [DropLayer()]})
    assert parameters_removed(info, dropped) == LAYER
    assert output_parameters(info, None) == model_parameters(info)


def test_combine_plans_counts_each_part(mixtral):
    info = api.model_info(mixtral)
    expert = Plan(layers={layer: [0, 2, 3, 5, 6, 7] for layer in range(3)}, method="frequency", num_experts=EXPERTS)
    dense = Plan(layers={}, method="angular", num_experts=EXPERTS, actions={2: [DropLayer()]}, budget={"layers": 1})
    plan = combine_plans(info, expert, dense)
    assert plan.layers == {0: [0, 2, 3, 5, 6, 7], 1: [0, 2, 3, 5, 6, 7]}  # the dropped layer's choice goes
    split = plan.budget["split"]
    assert split["dense_params_removed"] == LAYER
    assert split["expert_params_removed"] == 2 * 2 * EXPERT
    assert split["removed_params"] == LAYER + 4 * EXPERT
    assert math.isclose(split["removed_fraction"], (LAYER + 4 * EXPERT) / model_parameters(info))
    assert math.isclose(split["expert_share"], 4 * EXPERT / (LAYER + 4 * EXPERT))
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))).to_json() == plan.to_json()


def test_nearest_drop_ratio(tiny_checkpoint):
    geometry = api.model_info(tiny_checkpoint("mixtral")).geometry  # 8 experts, top-2
    assert nearest_drop_ratio(geometry, 0.30) == 2 / 8   # 0.25 is 0.05 away, 0.375 is 0.075 away
    assert nearest_drop_ratio(geometry, 0.33) == 3 / 8
    assert nearest_drop_ratio(geometry, 0.99) == 6 / 8   # top-2: at most 6 of 8 go
    grouped = api.model_info(tiny_checkpoint("deepseek_v3")).geometry  # 16 experts in 4 groups: 4 at a time
    assert nearest_drop_ratio(grouped, 0.30) == 4 / 16
    assert nearest_drop_ratio(grouped, 0.40) == 8 / 16
    assert nearest_drop_ratio(grouped, 0.40, collapse_groups=True) == 6 / 16


def test_prune_combined_heads_is_vanilla_and_counted(mixtral, dense_stats, tmp_path):
    """reap + magnitude on heads at 30% of all parameters, 80% of them from experts: the dense part
    (6% of the model = 52% of the attention weights) rounds to one KV group per layer, the experts take
    the rest at the nearest count; the written checkpoint holds exactly the parameters the plan says."""
    info = api.model_info(mixtral)
    total = model_parameters(info)
    plan = api.prune(mixtral, tmp_path / "out", method="reap", dense_method="magnitude", dense_options={"unit": "heads"},
                     total_ratio=0.3, expert_share=0.8, stats=dense_stats("mixtral"), progress=False)
    split = plan.budget["split"]
    assert plan.budget["expert_share"] == 0.8 and plan.budget["unit"] == "heads"
    assert all(len(plan.actions[layer][0].kv_groups) == 1 for layer in range(3))
    dropped = sum(EXPERTS - len(kept) for kept in plan.layers.values())
    assert split["dense_params_removed"] == 3 * KV_GROUP
    assert split["expert_params_removed"] == dropped * EXPERT
    # the experts' count is the nearest to the rest of the budget: 0.3 x total - 3 KV groups
    rest = 0.3 * total - 3 * KV_GROUP
    assert all(abs(n * 3 * EXPERT - rest) >= abs(dropped * EXPERT - rest) for n in range(7))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| Pruning ratio | 0.3 |" in card and "1 KV groups (with their query heads) dropped" in card  # of all parameters
    assert stored_parameters(tmp_path / "out") == total - split["removed_params"]
    in_memory = apply_plan_in_memory(load_full_model(mixtral), plan)
    assert sum(p.numel() for p in in_memory.parameters()) == total - split["removed_params"]
    assert torch.allclose(logits_of(vanilla(tmp_path / "out")), logits_of(in_memory), atol=1e-5, rtol=1e-4)
    # moeprune apply replays the saved plan into the same tensors
    api.apply(mixtral, tmp_path / "out" / "moeprune_plan.json", tmp_path / "again", progress=False)
    first, again = LazyCheckpoint(tmp_path / "out"), LazyCheckpoint(tmp_path / "again")
    assert sorted(first.keys()) == sorted(again.keys())
    assert all(torch.equal(first.get(name), again.get(name)) for name in first.keys())  # noqa: SIM118


def test_prune_combined_layers_fills_with_experts(mixtral, dense_stats, tmp_path):
    """angular drops --layers 1 (19.6% of this model), the experts fill the rest of 30%."""
    info = api.model_info(mixtral)
    total = model_parameters(info)
    plan = api.prune(mixtral, tmp_path / "out", method="frequency", dense_method="angular", dense_options={"layers": 1},
                     total_ratio=0.3, stats=dense_stats("mixtral"), progress=False)
    split = plan.budget["split"]
    (gone,) = [layer for layer, actions in plan.actions.items() if isinstance(actions[0], DropLayer)]
    assert gone not in plan.layers and len(plan.layers) == 2
    assert split["dense_params_removed"] == LAYER
    assert split["expert_params_removed"] == sum(EXPERTS - len(k) for k in plan.layers.values()) * EXPERT > 0
    assert stored_parameters(tmp_path / "out") == total - split["removed_params"]
    vanilla(tmp_path / "out")  # a stock config: one layer fewer, uniform expert counts
    assert_written_equals_in_memory(mixtral, tmp_path / "out", plan)


def test_prune_combined_non_uniform_loads_with_moeprune(tiny_checkpoint, dense_stats, tmp_path):
    """Dropped experts + FLAP on Qwen2-MoE's shared experts (global widths, new output biases): moeprune.load."""
    checkpoint = tiny_checkpoint("qwen2_moe")
    info = api.model_info(checkpoint)
    plan = api.prune(checkpoint, tmp_path / "out", method="frequency", dense_method="flap",
                     dense_options={"unit": "shared"}, total_ratio=0.2, dense_ratio=0.5, stats=dense_stats("qwen2_moe"),
                     progress=False)
    split = plan.budget["split"]
    assert split["dense_params_removed"] > 0 and split["expert_params_removed"] > 0
    assert stored_parameters(tmp_path / "out") == model_parameters(info) - split["removed_params"]
    assert plan.actions[1][0].output_bias != ()  # FLAP's compensation: a new down_proj bias
    assert_written_equals_in_memory(checkpoint, tmp_path / "out", plan)


def test_expert_share_extremes(mixtral, dense_stats):
    stats = dense_stats("mixtral")
    only_dense = plan_combined(mixtral, total_ratio=0.05, expert_share=0.0, expert_method="reap", dense_method="magnitude",
                               unit="heads", stats=stats)
    assert only_dense.layers == {} and only_dense.budget["expert"] is None
    assert only_dense.budget["split"]["expert_params_removed"] == 0
    only_experts = plan_combined(mixtral, total_ratio=0.3, expert_share=1.0, expert_method="reap", dense_method="magnitude",
                                 unit="heads", stats=stats)
    assert only_experts.actions == {} and only_experts.budget["dense"] is None


def test_split_options():
    assert split_options("heapr", "flap", {"layout": "compact", "unit": "shared"}) == ({"layout": "compact"}, {"unit": "shared"})
    with pytest.raises(PlanError, match="neither"):
        split_options("reap", "magnitude", {"router": "exact"})


@pytest.mark.parametrize("request_, message", [
    (dict(expert_method="flap", dense_method="reap", total_ratio=0.3, expert_share=0.5), "expert or neuron method"),
    (dict(expert_method="reap", dense_method="hc_smoe", total_ratio=0.3, expert_share=0.5), "names the dense action"),
    (dict(expert_method="reap", dense_method="magnitude", total_ratio=0.3), "one way"),
    (dict(expert_method="reap", dense_method="magnitude", total_ratio=0.3, expert_share=0.5, dense_ratio=0.5), "one way"),
    (dict(expert_method="reap", dense_method="magnitude", total_ratio=0.3, expert_share=0.0), "more than all"),
    (dict(expert_method="reap", dense_method="angular", total_ratio=0.3, dense_ratio=0.5), "one way|not --dense-ratio"),
    (dict(expert_method="reap", dense_method="angular", total_ratio=0.1, dense_options={"layers": 1}), "more than --total-ratio"),
    (dict(expert_method="reap", dense_method="magnitude", total_ratio=1.0, expert_share=0.5), "total-ratio"),
    (dict(expert_method="reap", dense_method="magnitude", total_ratio=0.3, expert_share=0.5, dense_options={"unit": "mlp"}),
     "no mlp units"),
])
def test_bad_requests_are_refused_before_any_read(mixtral, read_log, request_, message):
    info = api.model_info(mixtral)
    options = request_.pop("dense_options", {"unit": "heads"} if request_["dense_method"] == "magnitude" else None)
    with pytest.raises(MoePruneError, match=message):
        check_combined(info, dense_options=options, **request_)
    assert read_log == []


def test_mla_heads_are_refused(tiny_checkpoint):
    info = api.model_info(tiny_checkpoint("deepseek_v3"))
    with pytest.raises(PlanError, match="latent attention"):
        check_combined(info, expert_method="reap", dense_method="wanda_sp", total_ratio=0.2, expert_share=0.9,
                       dense_options={"unit": "heads"})


def test_cli_combined(mixtral, dense_stats, tmp_path, capsys, read_log):
    stats_file = tmp_path / "stats.safetensors"
    dense_stats("mixtral").save(stats_file)
    base = ["prune", str(mixtral), "--stats", str(stats_file), "-q"]
    refusals = [
        (["--method", "reap", "--dense-method", "magnitude", "--unit", "heads", "--total-ratio", "0.3", "--ratio", "0.5",
          "--expert-share", "0.5"], "not --ratio"),
        (["--method", "reap", "--total-ratio", "0.3", "--expert-share", "0.5"], "needs both"),
        (["--method", "reap", "--dense-method", "magnitude", "--unit", "heads", "--router", "exact", "--total-ratio", "0.3",
          "--expert-share", "0.9"], "neither"),
    ]
    read_log.clear()
    for flags, message in refusals:
        assert main([*base, *flags, "--out", str(tmp_path / "refused")]) == 2
        assert message in capsys.readouterr().err
    assert read_log == [] and not (tmp_path / "refused").exists()
    assert main([*base, "--method", "reap", "--dense-method", "magnitude", "--unit", "heads", "--total-ratio", "0.3",
                 "--expert-share", "0.8", "--out", str(tmp_path / "out")]) == 0
    assert main(["apply", str(mixtral), "--plan", str(tmp_path / "out" / "moeprune_plan.json"),
                 "--out", str(tmp_path / "again"), "-q"]) == 0
    plan = Plan.load(tmp_path / "out")
    assert plan.method == "reap+magnitude" and plan.budget["split"]["removed_params"] > 0
    assert stored_parameters(tmp_path / "again") == stored_parameters(tmp_path / "out")


def test_neuron_expert_part_is_counted(mixtral, tmp_path):
    """Neuron slicing as the expert action (random_neuron, no statistics) beside half the KV groups:
    the written checkpoint holds what the plan reports, and the total lands within half a neuron per
    expert of the budget (one neuron of every expert: 24 x 96 parameters)."""
    info = api.model_info(mixtral)
    total = model_parameters(info)
    plan = api.prune(mixtral, tmp_path / "out", method="random_neuron", dense_method="magnitude",
                     dense_options={"unit": "heads"}, total_ratio=0.3, dense_ratio=0.5, progress=False)
    split = plan.budget["split"]
    assert split["dense_params_removed"] == 3 * KV_GROUP
    assert stored_parameters(tmp_path / "out") == total - split["removed_params"]
    assert abs(split["removed_params"] - 0.3 * total) <= 24 * 3 * H / 2


@pytest.fixture(scope="module")
def combined_sweep():
    yield from script_module("combined_sweep")


def test_sweep_grid_and_best_mix(combined_sweep):
    sweep = combined_sweep
    points = sweep.grid(["heapr"], [0.3], {"heads": "flap", "layers": "angular"}, [0.0, 1.0], [0.5], [1])
    assert [(p.unit, p.form, p.value) for p in points] == [
        ("heads", "share", 0.0), ("heads", "share", 1.0), ("heads", "ratio", 0.5),
        ("layers", "share", 0.0), ("layers", "share", 1.0), ("layers", "layers", 1)]
    assert points[2].request() == dict(total_ratio=0.3, expert_method="heapr", dense_method="flap", dense_ratio=0.5,
                                       dense_options={"unit": "heads"}, expert_options={})
    compact = sweep.Point("heapr@layout=compact", 0.3, "heads", "flap", "share", 0.5).request()
    assert compact["expert_method"] == "heapr" and compact["expert_options"] == {"layout": "compact"}
    assert points[5].request()["dense_options"] == {"layers": 1}
    dense = {"a": 10.0, "b": 20.0}
    assert math.isclose(sweep.mean_change({"a": 11.0, "b": 30.0}, dense), (0.1 + 0.5) / 2)

    def row(point, removed, expert, change):
        return sweep.Row("t", point, removed_fraction=removed, expert_fraction=expert, dense_fraction=removed - expert,
                         change=change, ppl={"a": 10.0 * (1 + change), "b": 20.0 * (1 + change)})

    rows = [row(points[1], 0.300, 0.300, 0.05),   # experts only
            row(points[2], 0.305, 0.280, 0.50),   # heads + experts
            row(points[5], 0.330, 0.110, 0.01),   # off the total by 3 points: not comparable
            row(points[3], 0.296, 0.0, 0.20),     # layers only
            sweep.Row("t", points[0], refused="too small")]
    (entry,) = sweep.best_mixes(rows, tolerance=0.01)
    assert entry["best"] is rows[0] and entry["expert_only"] is rows[0] and entry["dense_only"] is rows[3]
    lacking = sweep.Point("heapr", 0.3, "mlp", "flap", "share", 0.5)
    rows.append(sweep.Row("t", lacking, refused="this model has no mlp units to take the dense part from"))
    table = sweep.markdown("t", rows, dense, 0.01, "header")
    assert "33.0%*" in table and "refused: too small" in table
    assert "lacks (every point refused): mlp." in table and "mlp (flap)" not in table
    assert table.count("| heapr | 30% | experts only |") == 1
    again = sweep.rows_from_json(json.loads(json.dumps({"rows": [{**asdict(r), "point": asdict(r.point)} for r in rows]})))
    assert repr(again) == repr(rows)  # (NaN changes of refused rows: compared as text)


def test_compact_neurons_beside_a_dropped_layer(mixtral, tmp_path):
    """Per-expert widths (compact neurons, the moeprune section) with a layer dropped: the section is
    renumbered and the structure check leaves the experts module to the expert ops (it refused this
    plan before: the compact module's parameter names differ from the stock experts')."""
    plan = plan_combined(mixtral, total_ratio=0.3, expert_method="random_neuron", dense_method="dense_random",
                         expert_options={"layout": "compact"}, dense_options={"unit": "layers", "layers": 1})
    assert plan.budget["split"]["dense_params_removed"] == LAYER
    api.apply(mixtral, plan, tmp_path / "out", progress=False)
    assert stored_parameters(tmp_path / "out") == plan.budget["split"]["total_params"] - plan.budget["split"]["removed_params"]
    assert_written_equals_in_memory(mixtral, tmp_path / "out", plan)


def test_two_calibration_passes_for_gradients_and_dense_observers(mixtral, calib_file, tmp_path):
    """HEAPr (gradient observers) + FLAP (forward observers of every layer) cannot share one pass:
    prune --data runs two over the same rows and joins them."""
    info = api.model_info(mixtral)
    request = check_combined(info, expert_method="heapr", dense_method="flap", total_ratio=0.3, dense_ratio=0.5,
                             dense_options={"unit": "heads"})
    first, second = request.observer_passes()
    assert "heapr" in first and second == ("dense_channels",)
    plan = api.prune(mixtral, tmp_path / "out", method="heapr", dense_method="flap", dense_options={"unit": "heads"},
                     total_ratio=0.3, dense_ratio=0.5, data=calib_file, samples=4, seq_len=16, progress=False)
    assert plan.method == "heapr+flap" and plan.budget["split"]["dense_params_removed"] > 0
    assert plan.budget["split"]["expert_params_removed"] > 0
