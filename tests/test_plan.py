"""Budgets, selection, validation and the plan artifact (moeprune.plan)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from moeprune.errors import PlanError
from moeprune.geometry import MoEGeometry
from moeprune.plan import (
    PLAN_FILENAME,
    Plan,
    build_plan,
    kept_from_ratio,
    resolve_budget,
    select_experts,
    validate_budget,
    validate_plan,
)

# Mixtral-like: 4 decoder layers, all MoE, 8 experts, top-2.
FLAT = MoEGeometry(
    family="mixtral",
    model_type="mixtral",
    num_hidden_layers=4,
    moe_layers=(0, 1, 2, 3),
    num_experts=8,
    top_k=2,
)

# DeepSeek-V3-like: layer 0 dense, 16 experts in 4 groups of 4, 2 groups per token, top-4,
# groups scored by their top-2 experts (so >= 2 experts per group).
GROUPED = MoEGeometry(
    family="deepseek_v3",
    model_type="deepseek_v3",
    num_hidden_layers=3,
    moe_layers=(1, 2),
    num_experts=16,
    top_k=4,
    n_group=4,
    topk_group=2,
    min_experts_per_group=2,
    routing="sigmoid_group_topk",
)


def _scores(geometry: MoEGeometry, values: list[float]) -> dict[int, torch.Tensor]:
    return {layer: torch.tensor(values, dtype=torch.float64) for layer in geometry.moe_layers}


# ---- budgets -------------------------------------------------------------------------------------


def test_ratio_budgets() -> None:
    assert resolve_budget(FLAT, ratio=0) == {0: 8, 1: 8, 2: 8, 3: 8}
    assert resolve_budget(FLAT, ratio=0.5) == {0: 4, 1: 4, 2: 4, 3: 4}
    # 0.3 * 8 = 2.4 -> remove floor = 2 -> keep 6 (never removes more than asked)
    assert resolve_budget(FLAT, ratio=0.3)[0] == 6
    # 0.7 * 8 = 5.6 -> remove 5 -> keep 3
    assert resolve_budget(FLAT, ratio=0.7)[0] == 3
    # float error: 0.29 * 100 = 28.999999999999996 -> still removes 29
    assert kept_from_ratio(100, 0.29) == 71
    assert kept_from_ratio(10, 0.7) == 3


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5, float("nan")])
def test_ratio_out_of_range_rejected(ratio: float) -> None:
    with pytest.raises(PlanError, match=r"--ratio must be .*\[0, 1\)"):
        resolve_budget(FLAT, ratio=ratio)


def test_exactly_one_budget() -> None:
    with pytest.raises(PlanError, match="exactly one budget"):
        resolve_budget(FLAT)
    with pytest.raises(PlanError, match="exactly one budget.*--ratio, --keep"):
        resolve_budget(FLAT, ratio=0.5, keep=4)


def test_keep_budget_and_top_k() -> None:
    assert resolve_budget(FLAT, keep=3) == {0: 3, 1: 3, 2: 3, 3: 3}
    with pytest.raises(
        PlanError, match="keeping 1 experts in layer 0 but the router selects top_k=2.*at least 2"
    ):
        validate_budget(FLAT, resolve_budget(FLAT, keep=1))
    with pytest.raises(PlanError, match="only 8"):
        validate_budget(FLAT, resolve_budget(FLAT, keep=9))
    with pytest.raises(PlanError, match="at least 1"):
        resolve_budget(FLAT, keep=0)


def test_per_layer_budget() -> None:
    # int = count to keep, float = removal ratio (0.25 * 8 = 2 removed), absent layers keep all
    assert resolve_budget(FLAT, per_layer={1: 4, "2": 0.25}) == {0: 8, 1: 4, 2: 6, 3: 8}
    with pytest.raises(PlanError, match=r"layer 9, which is not a MoE layer.*\[0, 1, 2, 3\]"):
        resolve_budget(FLAT, per_layer={9: 4})
    with pytest.raises(PlanError, match="floats are removal ratios"):
        resolve_budget(FLAT, per_layer={1: 4.0})


def test_unknown_layer_in_budget_rejected() -> None:
    with pytest.raises(PlanError, match=r"layer 0, which is not a MoE layer.*\[1, 2\]"):
        validate_budget(GROUPED, {0: 8})


def test_grouped_ratio_rounds_up_to_group_multiple() -> None:
    assert resolve_budget(GROUPED, ratio=0.5) == {1: 8, 2: 8}
    # 0.6 * 16 = 9.6 -> remove 9 -> keep 7 -> rounded up to 8 (2 per group)
    assert resolve_budget(GROUPED, ratio=0.6) == {1: 8, 2: 8}
    # collapsed groups: no rounding
    assert resolve_budget(GROUPED, ratio=0.6, collapse_groups=True) == {1: 7, 2: 7}


def test_grouped_validation() -> None:
    validate_budget(GROUPED, {1: 8, 2: 16})
    with pytest.raises(PlanError, match="multiple of 4.*--collapse-groups"):
        validate_budget(GROUPED, resolve_budget(GROUPED, keep=10))
    # 0.75 -> keep 4 -> 1 per group < min_experts_per_group = 2
    with pytest.raises(PlanError, match="at least 2 per group.*--collapse-groups"):
        validate_budget(GROUPED, resolve_budget(GROUPED, ratio=0.75))
    validate_budget(GROUPED, {1: 4, 2: 4}, collapse_groups=True)
    validate_budget(GROUPED, {1: 10}, collapse_groups=True)
    # top_k = 6: 2 per group * topk_group 2 = 4 reachable experts < 6
    wide = replace(GROUPED, top_k=6)
    with pytest.raises(PlanError, match="hold only 4 experts < top_k=6.*--collapse-groups"):
        validate_budget(wide, {1: 8})
    validate_budget(wide, {1: 12})


# ---- selection -----------------------------------------------------------------------------------


def test_select_highest_scores_with_ties_to_lower_index() -> None:
    scores = _scores(FLAT, [0.1, 0.9, 0.5, 0.5, 0.5, 0.0, 0.8, 0.2])
    kept = select_experts(scores, {0: 4, 2: 2}, FLAT)
    assert kept[0] == [1, 2, 3, 6]  # 0.9, 0.8, then ties 0.5 at 2,3,4 -> 2 and 3
    assert kept[2] == [1, 6]
    assert kept[1] == list(range(8)) and kept[3] == list(range(8))  # absent -> all kept


def test_protected_always_kept() -> None:
    scores = _scores(FLAT, [0.1, 0.9, 0.5, 0.4, 0.3, 0.2, 0.8, 0.0])
    kept = select_experts(scores, {0: 3, 1: 3}, FLAT, protected={0: [7]})
    assert kept[0] == [1, 6, 7]  # 7 scores lowest but is protected; counts toward the 3
    assert kept[1] == [1, 2, 6]


def test_too_many_protected_rejected() -> None:
    scores = _scores(FLAT, [float(i) for i in range(8)])
    with pytest.raises(PlanError, match="3 protected experts.*only 2.*--no-protect-super-experts"):
        select_experts(scores, {0: 2}, FLAT, protected={0: [0, 1, 2]})
    with pytest.raises(PlanError, match="not a MoE layer"):
        select_experts(scores, {0: 2}, GROUPED, protected={0: [1]})


def test_grouped_selection_equal_per_group() -> None:
    # all the best scores sit in group 0 (experts 0-3), yet every group keeps 8 / 4 = 2
    values = [10.0, 9.0, 8.0, 7.0] + [1.0, 2.0, 3.0, 4.0] + [0.5] * 4 + [0.1, 0.4, 0.3, 0.2]
    kept = select_experts(_scores(GROUPED, values), {1: 8}, GROUPED)
    assert kept[1] == [0, 1, 6, 7, 8, 9, 13, 14]
    assert kept[2] == list(range(16))
    # protected expert 4 (score 1.0) takes one of group 1's two slots
    kept = select_experts(_scores(GROUPED, values), {1: 8}, GROUPED, protected={1: [4]})
    assert kept[1] == [0, 1, 4, 7, 8, 9, 13, 14]
    with pytest.raises(PlanError, match="routing group 1 has 3 protected"):
        select_experts(_scores(GROUPED, values), {1: 8}, GROUPED, protected={1: [4, 5, 6]})
    # collapsed: plain global top-7
    kept = select_experts(_scores(GROUPED, values), {1: 7}, GROUPED, collapse_groups=True)
    assert kept[1] == [0, 1, 2, 3, 5, 6, 7]


def test_grouped_selection_respects_min_per_group() -> None:
    with pytest.raises(PlanError, match="at least 2 per group"):
        select_experts(_scores(GROUPED, [1.0] * 16), {1: 4}, GROUPED)


def test_missing_scores_rejected() -> None:
    with pytest.raises(PlanError, match="no scores for MoE layer 3"):
        select_experts({0: torch.zeros(8)}, {0: 4, 3: 4}, FLAT)
    with pytest.raises(PlanError, match="7 scores but the model has 8"):
        select_experts({0: torch.zeros(7)}, {0: 4}, FLAT)


# ---- plan artifact -------------------------------------------------------------------------------


def _plan() -> Plan:
    scores = _scores(FLAT, [0.1, 0.9, 0.5, 0.4, 0.3, 0.2, 0.8, 0.0])
    return build_plan(
        FLAT, scores, method="reap", ratio=0.5, protected={2: [7]}, model_fingerprint="abc123"
    )


def test_build_plan_fields() -> None:
    plan = _plan()
    assert plan.layers == {0: [1, 2, 3, 6], 1: [1, 2, 3, 6], 2: [1, 2, 6, 7], 3: [1, 2, 3, 6]}
    assert plan.budget == {"ratio": 0.5}
    assert plan.protected == {2: [7]}
    assert (plan.family, plan.num_experts, plan.method) == ("mixtral", 8, "reap")
    assert plan.score_summary[0] == {
        "min": 0.0,
        "max": 0.9,
        "mean": 0.4,
        "kept_min": 0.4,
        "kept_max": 0.9,
        "kept_mean": 0.65,
    }
    assert plan.dropped()[2] == [0, 3, 4, 5]
    validate_plan(plan, FLAT, fingerprint="abc123")


def test_plan_json_round_trip(tmp_path) -> None:
    plan = _plan()
    data = plan.to_json()
    assert data["layers"] == {
        "0": [1, 2, 3, 6],
        "1": [1, 2, 3, 6],
        "2": [1, 2, 6, 7],
        "3": [1, 2, 3, 6],
    }
    assert Plan.from_json(json.loads(json.dumps(data))) == plan
    written = plan.save(tmp_path)
    assert written == tmp_path / PLAN_FILENAME
    on_disk = json.loads(written.read_text())
    assert on_disk["layers"]["2"] == [1, 2, 6, 7]
    assert Plan.load(written) == plan
    assert Plan.load(tmp_path) == plan
    assert [p.name for p in tmp_path.iterdir()] == [PLAN_FILENAME]  # no temp file left behind
    per_layer = build_plan(
        FLAT, _scores(FLAT, [float(i) for i in range(8)]), method="frequency", per_layer={1: 2}
    )
    reloaded = Plan.from_json(json.loads(json.dumps(per_layer.to_json())))
    assert reloaded.budget == {"per_layer": {1: 2}}


def test_corrupt_plan_rejected(tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"layers": {"0": [1, 2]')
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(bad)
    bad.write_text(json.dumps({"method": "reap"}))
    with pytest.raises(PlanError, match="lacks the required key 'layers'"):
        Plan.load(bad)
    bad.write_text(json.dumps({"method": "reap", "layers": {"zero": [1]}}))
    with pytest.raises(PlanError, match="'zero' is not a layer index"):
        Plan.load(bad)
    bad.write_text(json.dumps({"method": "reap", "layers": {"0": ["a", 1]}}))
    with pytest.raises(PlanError, match="integer expert indices"):
        Plan.load(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(PlanError, match="must be a JSON object"):
        Plan.load(bad)
    with pytest.raises(PlanError, match="not found"):
        Plan.load(tmp_path / "missing.json")


def test_validate_plan_rejections() -> None:
    plan = _plan()
    with pytest.raises(PlanError, match="made for model abc123"):
        validate_plan(plan, FLAT, fingerprint="other")
    with pytest.raises(PlanError, match="mixtral model, this is a deepseek_v3"):
        validate_plan(plan, GROUPED)
    with pytest.raises(PlanError, match=r"more than once"):
        validate_plan(replace(plan, layers={0: [1, 1, 2]}), FLAT)
    with pytest.raises(PlanError, match=r"\[8\].*\[0, 8\)"):
        validate_plan(replace(plan, layers={0: [1, 8]}), FLAT)
    with pytest.raises(PlanError, match="top_k=2"):
        validate_plan(replace(plan, layers={0: [1]}), FLAT)
    with pytest.raises(PlanError, match="not a MoE layer"):
        validate_plan(replace(plan, layers={7: [1, 2]}), FLAT)
    with pytest.raises(PlanError, match="drops protected experts \\[7\\] of layer 2"):
        validate_plan(replace(plan, layers={2: [1, 2, 6]}), FLAT)


def test_validate_plan_grouped_equal_counts() -> None:
    base = Plan(layers={1: [0, 1, 4, 5, 8, 9, 12, 13]}, method="manual", family="deepseek_v3")
    validate_plan(base, GROUPED)
    uneven = replace(base, layers={1: [0, 1, 2, 4, 8, 9, 12, 13]})  # groups keep 3, 1, 2, 2
    with pytest.raises(PlanError, match=r"keeps \[3, 1, 2, 2\].*same number"):
        validate_plan(uneven, GROUPED)
    validate_plan(replace(uneven, collapse_groups=True), GROUPED)


# ---- format 2: typed actions ----------------------------------------------------------------------

from moeprune.plan import (  # noqa: E402
    PLAN_FORMAT_VERSION,
    DropAttentionHeads,
    DropLayer,
    MergeCluster,
    MergeExperts,
    SliceChannels,
    SliceNeurons,
)

# written by moeprune before plan format 2 (format_version 1), verbatim
V1_PLAN = """{
  "format_version": 1,
  "method": "reap",
  "family": "qwen3_moe",
  "model_fingerprint": "",
  "num_experts": 8,
  "budget": {"ratio": 0.5},
  "collapse_groups": false,
  "layers": {"0": [0, 2, 5, 7], "1": [1, 2, 3, 6], "2": [0, 1, 4, 5]},
  "protected": {"1": [3]},
  "score_summary": {"0": {"min": 0.0, "max": 1.0, "mean": 0.5, "kept_min": 0.1, "kept_max": 1.0, "kept_mean": 0.6}},
  "calibration": {"samples": 4},
  "moeprune_version": "0.1.0",
  "created": "2026-11-01T10:00:00+00:00"
}
"""

WIDE = MoEGeometry(family="mixtral", model_type="mixtral", num_hidden_layers=4, moe_layers=(0, 1, 2, 3),
                   num_experts=8, top_k=2, expert_width=6, num_attention_heads=4, num_key_value_heads=2)


def _all_actions_plan() -> Plan:
    return Plan(
        layers={0: [0, 1, 2, 3, 4, 5]},
        method="manual",
        family="mixtral",
        num_experts=8,
        protected={1: [7]},
        actions={
            0: [SliceNeurons({1: (0, 2, 5), 4: (1,)})],
            1: [MergeExperts((MergeCluster((0, 1), (0.5, 0.5), (None, (5, 4, 3, 2, 1, 0))),
                              MergeCluster((2, 3, 4), (0.2, 0.3, 0.5)), MergeCluster((5, 6), (1.0, 1.0)),
                              MergeCluster((7,), (1.0,))), router="vanilla"),
                DropAttentionHeads(heads=(1,), kv_groups=())],
            2: [SliceChannels("dense_mlp", (0, 3, 4))],
            3: [DropLayer()],
        },
    )


def test_v1_plan_loads_unchanged(tmp_path) -> None:
    path = tmp_path / PLAN_FILENAME
    path.write_text(V1_PLAN)
    plan = Plan.load(path)
    assert plan.layers == {0: [0, 2, 5, 7], 1: [1, 2, 3, 6], 2: [0, 1, 4, 5]}
    assert plan.protected == {1: [3]} and plan.actions == {} and plan.drops_only
    assert (plan.method, plan.family, plan.budget, plan.created) == ("reap", "qwen3_moe", {"ratio": 0.5}, "2026-11-01T10:00:00+00:00")
    data = plan.to_json()  # a drop-only plan keeps its "layers" object in format 2
    assert data["format_version"] == PLAN_FORMAT_VERSION == 2
    assert data["layers"] == json.loads(V1_PLAN)["layers"] and "actions" not in data


def test_v1_plan_applies_to_identical_tensors(tiny_checkpoint, tmp_path) -> None:
    from safetensors.torch import load_file

    from moeprune import api

    source = tiny_checkpoint("qwen3_moe")
    path = tmp_path / "v1.json"
    path.write_text(V1_PLAN.replace('"protected": {"1": [3]}', '"protected": {}').replace('"2": [0, 1, 4, 5]', '"2": [0, 1, 4, 6]'))
    from_file = api.apply(source, path, tmp_path / "from_v1", progress=False)
    direct = Plan(layers={0: [0, 2, 5, 7], 1: [1, 2, 3, 6], 2: [0, 1, 4, 6]}, method="reap")
    from_object = api.apply(source, direct, tmp_path / "from_object", progress=False)
    a, b = load_file(from_file / "model.safetensors"), load_file(from_object / "model.safetensors")
    original = load_file(source / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["model.layers.2.mlp.experts.3.down_proj.weight"], original["model.layers.2.mlp.experts.6.down_proj.weight"])
    assert torch.equal(a["model.layers.2.mlp.gate.weight"], original["model.layers.2.mlp.gate.weight"][[0, 1, 4, 6]])


def test_typed_actions_round_trip_and_stay_readable(tmp_path) -> None:
    plan = _all_actions_plan()
    validate_plan(plan, WIDE)
    data = plan.to_json()
    assert "layers" not in data  # keep_experts moves into the actions
    assert data["actions"]["0"] == [{"op": "keep_experts", "experts": [0, 1, 2, 3, 4, 5]},
                                    {"op": "slice_neurons", "experts": {"1": "0,2,5", "4": "1"}}]
    assert data["actions"]["1"][0]["clusters"][0] == {"members": [0, 1], "weights": [0.5, 0.5],
                                                      "permutations": [None, [5, 4, 3, 2, 1, 0]]}
    assert data["actions"]["3"] == [{"op": "drop_layer"}]
    assert Plan.from_json(json.loads(json.dumps(data))) == plan
    written = plan.save(tmp_path)
    assert '"op": "merge_experts"' in written.read_text()  # indented, one key per line: reviewable
    assert Plan.load(written) == plan


def test_typed_action_validation() -> None:
    plan = _all_actions_plan()

    def with_actions(layer, *actions, **changes):
        return replace(plan, actions={**plan.actions, layer: list(actions)}, **changes)

    cluster = MergeCluster
    cases = [
        (with_actions(1, MergeExperts((cluster((0, 1), (1, 1)), cluster((1, 2, 3, 4, 5, 6, 7), (1,) * 7)))), r"\[1\] more than once"),
        (with_actions(1, MergeExperts((cluster(tuple(range(8)), (1,) * 8),)), protected={}), "1 merged experts.*top_k=2"),
        (with_actions(1, MergeExperts((cluster((0, 1), (1, 1)), cluster((2, 3), (1, 1)), cluster((4, 5, 6), (1,) * 3)))), r"missing \[7\]"),
        (with_actions(1, MergeExperts((cluster((0, 1, 2, 3), (1,) * 4), cluster((4, 5, 6, 7), (1,) * 4)))), "protected experts \\[7\\]"),
        (with_actions(1, MergeExperts((cluster((0, 1, 2, 3), (1,) * 3), cluster((4, 5, 6), (1,) * 3), cluster((7,), (1,))))), "one weight"),
        (with_actions(1, MergeExperts((cluster((0, 1, 2, 3), (1,) * 4, (None, (0, 1), None, None)), cluster((4, 5, 6), (1,) * 3),
                                       cluster((7,), (1,))))), "not a permutation of its 6 neurons"),
        (with_actions(0, SliceNeurons({1: (0, 6)})), r"\[6\] out of range.*\[0, 6\)"),
        (with_actions(0, SliceNeurons({7: (0,)})), "expert 7 is not"),
        (with_actions(0, SliceNeurons({1: ()})), "keeps no neuron"),
        (with_actions(1, DropAttentionHeads(heads=(4,))), r"heads has indices \[4\]"),
        (with_actions(1, DropAttentionHeads(kv_groups=(0, 1))), "every KV group"),
        (with_actions(2, SliceChannels("shared_experts", (0,))), "no shared experts"),
        (with_actions(3, DropLayer(), SliceChannels("dense_mlp", (1,))), "takes no other action"),
        (with_actions(5, DropLayer()), "layers 0..3"),
        (with_actions(0, SliceNeurons({1: (0,)}), SliceNeurons({2: (0,)})), "twice"),
    ]
    for bad, message in cases:
        with pytest.raises(PlanError, match=message):
            validate_plan(bad, WIDE)


def test_grouped_merge_validation() -> None:
    clusters = tuple(MergeCluster((g * 4 + a, g * 4 + a + 1), (0.5, 0.5)) for g in range(4) for a in (0, 2))
    plan = Plan(layers={}, method="manual", actions={1: [MergeExperts(clusters)]})
    validate_plan(plan, GROUPED)
    across = (MergeCluster((3, 4), (1, 1)),) + tuple(MergeCluster((e,), (1,)) for e in range(16) if e not in (3, 4))
    with pytest.raises(PlanError, match="spans several routing groups"):
        validate_plan(replace(plan, actions={1: [MergeExperts(across)]}), GROUPED)
    validate_plan(replace(plan, actions={1: [MergeExperts(across)]}, collapse_groups=True), GROUPED)


def test_unimplemented_actions_refused_before_writing(tiny_checkpoint, tmp_path) -> None:
    """Every action the plan format declares has its op; an action a later moeprune declares (here a
    throwaway one) is refused before anything is written."""
    from moeprune.ops import OP_BUILDERS
    from moeprune.plan.actions import ACTIONS, Action
    from moeprune.write import write_pruned_checkpoint

    assert all(cls.implemented and op in OP_BUILDERS for op, cls in ACTIONS.items())

    class Future(Action):
        op = "test_future"
        missing = "a later moeprune"

    plan = Plan(layers={}, method="manual", actions={1: [Future()]})
    with pytest.raises(PlanError, match="'test_future' is not implemented yet \\(missing: a later moeprune"):
        write_pruned_checkpoint(tiny_checkpoint("mixtral"), plan, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_plan_save_is_atomic_and_logs_the_final_path(tmp_path, caplog) -> None:
    plan = _plan()
    with caplog.at_level("INFO", logger="moeprune"):
        written = plan.save(tmp_path / "plans" / "p.json")
    assert written == tmp_path / "plans" / "p.json" and str(written) in caplog.text
    assert plan.save(written) == written  # replacing an existing plan is allowed
    assert sorted(p.name for p in written.parent.iterdir()) == ["p.json"]


def test_write_logs_name_the_final_folder(tiny_checkpoint, tmp_path, caplog) -> None:
    from moeprune.write import write_pruned_checkpoint

    plan = Plan(layers={layer: [0, 1, 2, 3] for layer in (0, 1, 2)}, method="manual")
    with caplog.at_level("INFO", logger="moeprune"):
        write_pruned_checkpoint(tiny_checkpoint("olmoe"), plan, tmp_path / "out", progress=False)
    assert ".tmp-" not in caplog.text and str(tmp_path / "out") in caplog.text


def test_geometry_per_layer_counts_and_widths() -> None:
    assert (FLAT.experts_in(2), FLAT.width_of(2, 5)) == (8, 0)  # defaults: the uniform values
    uneven = replace(WIDE, experts_per_layer={3: 4}, expert_widths={1: (6, 6, 3, 6, 6, 6, 6, 6)})
    assert (uneven.experts_in(0), uneven.experts_in(3), uneven.num_experts) == (8, 4, 8)
    assert (uneven.width_of(1, 2), uneven.width_of(1, 3), uneven.width_of(0, 2)) == (3, 6, 6)
    with pytest.raises(PlanError, match=r"\[5\] in layer 3; indices must be in \[0, 4\)"):
        validate_plan(Plan(layers={3: [0, 1, 5]}, method="manual"), uneven)
    plan = Plan(layers={}, method="manual", actions={1: [SliceNeurons({2: (0, 3)})]})
    with pytest.raises(PlanError, match=r"expert 2.*\[3\] out of range.*\[0, 3\)"):
        validate_plan(plan, uneven)
    validate_plan(plan, WIDE)


def test_logs_of_an_output_nested_in_another_name_final_paths(tiny_checkpoint, tmp_path, caplog) -> None:
    """The default job writes its pruned checkpoint inside its own temporary output folder: the log lines
    of that nested write name where it will end up, never the temporary folder."""
    from moeprune.io.output import final_path, prepared_output
    from moeprune.write import write_pruned_checkpoint

    plan = Plan(layers={layer: [0, 1, 2, 3] for layer in (0, 1, 2)}, method="manual")
    with caplog.at_level("INFO", logger="moeprune"):
        with prepared_output(tmp_path / "job") as work:
            assert final_path(work / "pruned" / "x.json") == tmp_path / "job" / "pruned" / "x.json"
            write_pruned_checkpoint(tiny_checkpoint("olmoe"), plan, work / "pruned", progress=False)
            plan.save(work / "plan.json")
    assert (tmp_path / "job" / "pruned" / PLAN_FILENAME).is_file()
    assert ".tmp-" not in caplog.text
    assert str(tmp_path / "job" / "pruned") in caplog.text and str(tmp_path / "job" / "plan.json") in caplog.text
    assert final_path(tmp_path / "elsewhere") == tmp_path / "elsewhere"
