"""STUN (expert stage) and DERN: hand-checked pieces, planner invariants, the recombine_neurons op
(streaming == in-memory, identity mix == keep), vanilla and moeprune.load loads, and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import all_tensors, logits_of, vanilla

import moeprune
import moeprune.methods
from moeprune import api
from moeprune.apply import apply_plan_in_memory
from moeprune.calibration.engine import load_full_model
from moeprune.errors import PlanError
from moeprune.layout import model_expert
from moeprune.plan import Plan
from moeprune.plan.actions import NeuronMix, RecombineNeurons
from moeprune.plan.dern import (
    _fill_empty,
    best_matches,
    cluster_coefficients,
    expert_importance,
    magnitude_init,
    neuron_segments,
    weighted_spherical_kmeans,
)
from moeprune.plan.stun import minimum_kept
from moeprune.scoring.stun import (
    coactivation_distances,
    combined_distances,
    greedy_clusters,
    representative,
    router_distances,
    search_threshold,
)
from moeprune.super_experts import detect_super_experts

# --------------------------------------------------------------------------------------------------
# STUN: pure pieces, by hand


def test_router_distances_by_hand():
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    raw = router_distances(weight, normalize=False)
    assert raw.dtype == torch.float64
    assert math.isclose(raw[0, 1], math.sqrt(2)) and math.isclose(raw[0, 2], 1.0) and math.isclose(raw[1, 2], math.sqrt(5))
    unit = router_distances(weight, normalize=True)
    assert unit[0, 2] == 0.0 and math.isclose(unit[0, 1], math.sqrt(2)) and torch.equal(unit, unit.T)


def test_coactivation_distances_by_hand():
    coactivation = torch.tensor([[4.0, 2.0, 0.0], [2.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    d = coactivation_distances(coactivation, torch.tensor([4.0, 2.0, 0.0]))
    assert math.isclose(d[0, 1], 1 - 2 / math.sqrt(8))
    assert d[0, 2] == 1.0 and d[1, 2] == 1.0  # expert 2 was never routed
    assert torch.equal(torch.diagonal(d), torch.zeros(3, dtype=torch.float64))
    both = combined_distances(torch.full((3, 3), 1.0, dtype=torch.float64), d, normalized_rows=True)
    assert math.isclose(both[0, 1], (0.5 + d[0, 1]) / 2)


def _four() -> torch.Tensor:
    """d01 = 1, d12 = 2, d23 = 3, d02 = 5, d13 = 6, d03 = 7."""
    d = torch.zeros(4, 4, dtype=torch.float64)
    for (i, j), value in {(0, 1): 1, (1, 2): 2, (2, 3): 3, (0, 2): 5, (1, 3): 6, (0, 3): 7}.items():
        d[i, j] = d[j, i] = value
    return d


def test_greedy_clusters_need_every_cross_pair_under_the_threshold():
    d = _four()
    # t = 4: {0,1} (d=1); {0,1}+{2} refused (d02 = 5); {2,3} (d=3)
    assert greedy_clusters(d, 4.0) == [[0, 1], [2, 3]]
    # t = 10: {0,1}, then {0,1,2}, then everything
    assert greedy_clusters(d, 10.0) == [[0, 1, 2, 3]]
    # ... but a layer keeps min_clusters (top_k)
    assert greedy_clusters(d, 10.0, min_clusters=2) == [[0, 1, 2], [3]]
    # a super expert never merges
    assert greedy_clusters(d, 4.0, fixed={1}) == [[0], [1], [2, 3]]
    # the threshold is strict
    assert greedy_clusters(d, 1.0) == [[0], [1], [2], [3]]


def test_threshold_search_hits_the_budget_or_says_why():
    ties = torch.ones(3, 3, dtype=torch.float64).fill_diagonal_(0.0)  # three experts, all at distance 1
    distances = {0: _four(), 1: ties}
    exact = search_threshold(distances, 4)
    # just above 1: layer 0 merges {0,1}, layer 1 merges everything (ties) -> 3 + 1
    assert exact.exact and exact.total == 4 and exact.threshold == math.nextafter(1.0, math.inf)
    assert exact.clusters == {0: [[0, 1], [2], [3]], 1: [[0, 1, 2]]}
    # 5 is out of reach: at distance 1 the total falls from 7 to 4 at once; never remove more than asked
    near = search_threshold(distances, 5)
    assert not near.exact and near.total == 7 and near.target == 5 and "tied" in near.reason
    # min_clusters bounds the reachable total
    floor = search_threshold(distances, 2, min_clusters=2)
    assert not floor.exact and floor.total == 4 and "at least 2" in floor.reason


def test_representative_is_the_member_nearest_the_mean_weights():
    weights = {0: {"a": torch.tensor([0.0]), "b": torch.tensor([[0.0, 0.0]])},
               1: {"a": torch.tensor([1.0]), "b": torch.tensor([[1.0, 0.0]])},
               5: {"a": torch.tensor([5.0]), "b": torch.tensor([[2.0, 0.0]])}}
    read = lambda e, p: weights[e][p]
    # a only: mean 2 -> squared distances 4, 1, 9; with b (mean 1): 4+1, 1+0, 9+1
    assert representative([0, 1, 5], read, ["a"]) == 1
    assert representative([0, 1, 5], read, ["a", "b"]) == 1
    assert representative([0, 5], read, ["a"]) == 0  # a tie goes to the smaller index
    assert representative([5], read, ["a"]) == 5
    assert minimum_kept(8, 2, 0) == 2 and minimum_kept(8, 2, 3) == 4 and minimum_kept(3, 2, 3) == 3


# --------------------------------------------------------------------------------------------------
# STUN: the planner


def test_stun_plan_hits_the_global_budget_and_loads(tiny_checkpoint, family_stats, tmp_path):
    source = tiny_checkpoint("mixtral")
    stats = family_stats("mixtral")
    info = api.model_info(source)
    geometry = info.geometry
    protected = detect_super_experts(stats, geometry).routed_by_layer()
    for distance in ("router", "coactivation", "both"):
        plan = api.plan_pruning(source, method="stun", ratio=0.5, stats=stats, options={"distance": distance})
        counts = plan.kept_counts()
        assert sum(counts.values()) == len(geometry.moe_layers) * geometry.num_experts // 2, distance
        assert min(counts.values()) >= geometry.top_k
        for layer, experts in protected.items():
            assert set(experts) <= set(plan.layers[layer])
    out = tmp_path / "stun"
    plan = api.prune(source, out, method="stun", ratio=0.5, stats=stats, options={"distance": "coactivation"})
    assert len(set(plan.kept_counts().values())) > 1, "this case is meant to exercise per-layer counts"
    loaded = moeprune.load(out)
    partial = moeprune.load_with_experts(source, plan.layers)
    assert torch.equal(logits_of(loaded), logits_of(partial))
    config = json.loads((out / "config.json").read_text())
    assert config["moeprune"]["experts_per_layer"] == {str(k): v for k, v in plan.kept_counts().items()}
    with pytest.raises(RuntimeError):
        load_full_model(out)  # vanilla transformers refuses it loudly
    # the in-memory executor (the sweep's path) gives the same model
    in_memory, _ = moeprune.methods.get_method("stun").compress(load_full_model(source), source, stats, ratio=0.5,
                                                               options={"distance": "coactivation"})
    assert torch.equal(logits_of(in_memory), logits_of(partial))


def test_stun_representatives_are_the_nearest_to_their_cluster_means(tiny_checkpoint, family_stats):
    """Re-derive the clusters from the public pieces and check every kept expert by hand."""
    source = tiny_checkpoint("mixtral")
    info = api.model_info(source)
    plan = api.plan_pruning(source, method="stun", ratio=0.5, stats=family_stats("mixtral"),
                            protect_super_experts=False)
    layout = info.layout
    distances = {layer: router_distances(layout.checkpoint.get(layout.family.router_keys(layer)[0]), normalize=False)
                 for layer in info.geometry.moe_layers}
    search = search_threshold(distances, sum(plan.kept_counts().values()), min_clusters=info.geometry.top_k)
    for layer, clusters in search.clusters.items():
        kept = []
        for cluster in clusters:
            flat = {e: torch.cat([layout.read_expert(layer, e, p).double().flatten() for p in ("gate", "up", "down")])
                    for e in cluster}
            mean = torch.stack(list(flat.values())).mean(0)
            kept.append(min(cluster, key=lambda e: (float(((flat[e] - mean) ** 2).sum()), e)))
        assert sorted(kept) == plan.layers[layer]


def test_stun_refuses_bad_input_before_reading_weights(tiny_checkpoint, family_stats, read_log):
    source, stats = tiny_checkpoint("mixtral"), family_stats("mixtral")
    cases = [({"ratio": 0.9}, "at least"), ({"ratio": 0.5, "options": {"distance": "cosine"}}, "distance"),
             ({"ratio": 0.5, "options": {"normalize": "yes"}}, "normalize"), ({"ratio": 1.2}, "ratio")]
    for kwargs, message in cases:
        read_log.clear()
        with pytest.raises(PlanError, match=message):
            api.plan_pruning(source, method="stun", stats=stats, **kwargs)
        assert read_log == []
    with pytest.raises(PlanError, match="group-limited"):
        api.plan_pruning(tiny_checkpoint("deepseek_v3"), method="stun", ratio=0.25, stats=family_stats("deepseek_v3"))


# --------------------------------------------------------------------------------------------------
# DERN: pure pieces, by hand


def test_importance_segments_and_matches_by_hand():
    assert torch.equal(expert_importance(torch.tensor([1.0, 3.0]), torch.tensor(4.0)),
                       torch.tensor([0.25, 0.75], dtype=torch.float64))
    gate, up, down = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]]), torch.tensor([[5.0], [6.0]])
    assert torch.equal(neuron_segments(gate, up, down), torch.tensor([[1.0, 2, 3, 4, 5, 6]]))
    assert torch.equal(neuron_segments(gate, up, down, with_gate=False), torch.tensor([[3.0, 4, 5, 6]]))
    index, sims = best_matches(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), torch.tensor([[1.0, 1.0], [2.0, 0.0]]))
    assert index.tolist() == [1, 0, 0]
    assert torch.allclose(sims, torch.tensor([1.0, 1 / math.sqrt(2), 0.0]))
    assert magnitude_init(torch.tensor([[0.1, -3.0], [2.0, 0.0], [3.0, 0.0], [0.5, 0.5]]), 2) == [0, 2]


def test_one_kmeans_step_by_hand():
    """Points a=(1,0), b=(0,1) (weight 10), c=(0.6,0.8), d=(0.8,0.6) (scaled: spherical), centroids a, c.
    Step 0: a->0; b, c, d->1 (d.c = 0.96 > d.a = 0.8). Update: c1 = normalise(10 b + c + d) =
    (1.4, 11.4)/11.486 = (0.122, 0.993), so d.c1 = 0.693 < d.a = 0.8 and d moves to cluster 0."""
    points = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.6, 0.8], [4.0, 3.0]])
    weights = torch.tensor([1.0, 10.0, 1.0, 1.0])
    assert weighted_spherical_kmeans(points, weights, [0, 2], iterations=0).tolist() == [0, 1, 1, 1]
    assert weighted_spherical_kmeans(points, weights, [0, 2], iterations=1).tolist() == [0, 1, 1, 0]
    assert weighted_spherical_kmeans(points, weights, [0, 2], iterations=10).tolist() == [0, 1, 1, 0]
    # K points, K clusters, own init: the identity
    assert weighted_spherical_kmeans(points, weights, [0, 1, 2, 3], iterations=5).tolist() == [0, 1, 2, 3]


def test_empty_clusters_take_the_least_similar_point():
    sims = torch.tensor([[1.0, 0.0, 0.1], [0.9, 0.2, 0.0], [0.5, 0.4, 0.3]])
    # clusters 1 and 2 are empty, cluster 0 holds all three: cluster 1 takes the point that fits
    # cluster 0 worst (point 2, 0.5), then cluster 2 the next worst (point 1, 0.9)
    assert _fill_empty(torch.tensor([0, 0, 0]), sims, 3).tolist() == [0, 2, 1]
    assert _fill_empty(torch.tensor([0, 0, 1]), sims, 3).tolist() == [0, 2, 1]


def test_cluster_coefficients_equalise_norms():
    # one cluster, norms 1 and 3, equal weights: R = 2, each rescaled to norm 2 then averaged -> 1 and 1/3
    coef = cluster_coefficients(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0]), torch.tensor([0, 0]), 1)
    assert torch.allclose(coef, torch.tensor([1.0, 1 / 3], dtype=torch.float64))
    # weights 3:1 -> W = 4, R = (3*1 + 1*3)/4 = 1.5 -> 3*1.5/(4*1), 1*1.5/(4*3)
    coef = cluster_coefficients(torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0]), torch.tensor([0, 0]), 1)
    assert torch.allclose(coef, torch.tensor([1.125, 0.125], dtype=torch.float64))
    # singletons are unchanged, zero weights fall back to uniform, zero segments get 0
    coef = cluster_coefficients(torch.tensor([2.0, 1.0, 3.0, 0.0]), torch.tensor([5.0, 0.0, 0.0, 1.0]),
                                torch.tensor([0, 1, 1, 2]), 3)
    assert torch.allclose(coef, torch.tensor([1.0, 0.5 * 2 / 1, 0.5 * 2 / 3, 0.0], dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
# the recombine_neurons op


def _identity_plan(info, kept: dict[int, list[int]]) -> Plan:
    """Keep ``kept`` and recombine every kept expert from its own neurons, each with weight 1."""
    width = info.geometry.expert_width
    actions = {layer: [RecombineNeurons({e: NeuronMix((e,) * width, tuple(range(width)), tuple(range(width)),
                                                       (1.0,) * width) for e in experts})]
               for layer, experts in kept.items()}
    return Plan(layers=kept, method="manual", family=info.geometry.family, num_experts=info.geometry.num_experts,
                actions=actions)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_identity_recombination_equals_keeping(family, tiny_checkpoint, tmp_path):
    source = tiny_checkpoint(family)
    info = api.model_info(source)
    kept = {layer: [0, 2, 3, 5] for layer in info.geometry.moe_layers}
    plain = Plan(layers=kept, method="manual", family=info.geometry.family, num_experts=info.geometry.num_experts)
    api.apply(source, plain, tmp_path / "kept")
    api.apply(source, _identity_plan(info, kept), tmp_path / "mixed")
    ours, theirs = all_tensors(tmp_path / "mixed"), all_tensors(tmp_path / "kept")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_recombination_by_hand_streaming_equals_in_memory(family, tiny_checkpoint, tmp_path):
    """Expert 2 of each layer: neuron 0 = 0.5 * neuron 3 of expert 1 + 2 * neuron 1 of expert 2, neuron
    1 = expert 2's neuron 0, every other neuron zero; written (streaming), applied in memory, by hand."""
    source = tiny_checkpoint(family)
    info = api.model_info(source)
    kept = {layer: [0, 2, 3, 5] for layer in info.geometry.moe_layers}
    mix = NeuronMix((1, 2, 2), (3, 1, 0), (0, 0, 1), (0.5, 2.0, 1.0))
    plan = Plan(layers=kept, method="manual", family=info.geometry.family, num_experts=info.geometry.num_experts,
                actions={layer: [RecombineNeurons({2: mix})] for layer in kept})
    plan.save(tmp_path / "plan.json")
    api.apply(source, tmp_path / "plan.json", tmp_path / "out")  # replayed from the saved JSON
    written = vanilla(tmp_path / "out")
    original = load_full_model(source)
    in_memory = apply_plan_in_memory(load_full_model(source), plan)
    for name, tensor in in_memory.state_dict().items():
        assert torch.equal(tensor, written.state_dict()[name]), name
    assert torch.equal(logits_of(written), logits_of(in_memory))
    for layer in kept:
        e1, e2 = model_expert(original, info.family, layer, 1), model_expert(original, info.family, layer, 2)
        new = model_expert(written, info.family, layer, 1)  # expert 2 is the second kept expert
        for proj in [p for p in ("gate", "up", "gate_bias", "up_bias") if p in new]:
            expected = torch.zeros_like(e2[proj], dtype=torch.float64)
            expected[0] = 0.5 * e1[proj][3].double() + 2.0 * e2[proj][1].double()
            expected[1] = e2[proj][0].double()
            assert torch.equal(new[proj], expected.float()), proj
        expected = torch.zeros_like(e2["down"], dtype=torch.float64)
        expected[:, 0] = 0.5 * e1["down"][:, 3].double() + 2.0 * e2["down"][:, 1].double()
        expected[:, 1] = e2["down"][:, 0].double()
        assert torch.equal(new["down"], expected.float())
        if "down_bias" in new:
            assert torch.equal(new["down_bias"], e2["down_bias"])


def test_recombine_plans_are_validated(tiny_checkpoint):
    source = tiny_checkpoint("mixtral")
    info = api.model_info(source)
    kept = {layer: [0, 2, 3, 5] for layer in info.geometry.moe_layers}
    layer = info.geometry.moe_layers[0]
    width = info.geometry.expert_width
    bad = {"not kept": ({1: NeuronMix((1,), (0,), (0,), (1.0,))}, "not \\(kept\\)"),
           "source": ({2: NeuronMix((9,), (0,), (0,), (1.0,))}, "out of range"),
           "neuron": ({2: NeuronMix((1,), (width,), (0,), (1.0,))}, "neuron"),
           "target": ({2: NeuronMix((1,), (0,), (width,), (1.0,))}, "target")}
    for experts, message in bad.values():
        plan = Plan(layers=kept, method="manual", actions={layer: [RecombineNeurons(experts)]})
        with pytest.raises(PlanError, match=message):
            moeprune.plan.validate_plan(plan, info.geometry)
    text = json.dumps(_identity_plan(info, kept).to_json())
    assert Plan.from_json(json.loads(text)).actions == _identity_plan(info, kept).actions
    with pytest.raises(PlanError, match="one entry each"):
        Plan.from_json({"method": "m", "actions": {"1": [{"op": "recombine_neurons", "experts": {
            "2": {"sources": [1, 2], "neurons": [0], "targets": [0], "weights": [1.0]}}}]}})


# --------------------------------------------------------------------------------------------------
# DERN: the planner


def test_dern_with_tau_one_is_plain_dropping(tiny_checkpoint, family_stats, tmp_path):
    source, stats = tiny_checkpoint("mixtral"), family_stats("mixtral")
    plan = api.prune(source, tmp_path / "dern", method="dern", ratio=0.5, stats=stats, options={"tau": 1.0})
    assert plan.drops_only
    dropped = api.prune(source, tmp_path / "soft", method="soft_count", ratio=0.5, stats=stats)
    assert plan.layers == dropped.layers
    ours, theirs = all_tensors(tmp_path / "dern"), all_tensors(tmp_path / "soft")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize(("family", "init"), [("mixtral", "magnitude"), ("mixtral", "own"), ("gpt_oss", "magnitude")])
def test_dern_migrates_recombines_and_loads_in_vanilla_transformers(family, init, tiny_checkpoint, family_stats,
                                                                    tmp_path):
    source, stats = tiny_checkpoint(family), family_stats(family)
    info = api.model_info(source)
    plan = api.prune(source, tmp_path / "out", method="dern", ratio=0.5, stats=stats,
                     options={"tau": 0.0, "kmeans_init": init, "gate_in_similarity": False})
    width = info.geometry.expert_width
    assert plan.actions, "tau = 0 migrates every segment with a positive cosine"
    for layer, (action,) in plan.actions.items():
        for expert, mix in action.experts.items():
            assert expert in plan.layers[layer]
            migrated = [s for s in mix.sources if s not in plan.layers[layer]]
            assert migrated and len(mix.sources) == width + len(migrated)
            assert sorted(set(mix.targets)) == list(range(width))  # K = width, no empty cluster
        summary = plan.score_summary[layer]
        assert summary["segments_migrated"] <= summary["segments_dropped"]
    written = vanilla(tmp_path / "out")
    in_memory = apply_plan_in_memory(load_full_model(source), plan)
    assert torch.equal(logits_of(written), logits_of(in_memory))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {config[key] for key in info.family.num_experts_keys} == {info.geometry.num_experts // 2}
    replayed = Plan.load(tmp_path / "out")
    assert replayed.actions == plan.actions


def test_dern_refuses_bad_input_before_reading_weights(tiny_checkpoint, family_stats, read_log):
    source, stats = tiny_checkpoint("mixtral"), family_stats("mixtral")
    cases = [({"tau": 1.5}, "tau"), ({"tau": -0.1}, "tau"), ({"kmeans_iterations": -1}, "kmeans_iterations"),
             ({"kmeans_init": "random"}, "kmeans_init"), ({"gate_in_similarity": 1}, "gate_in_similarity"),
             ({"window": 3}, "does not take")]
    for options, message in cases:
        read_log.clear()
        with pytest.raises(PlanError, match=message):
            api.plan_pruning(source, method="dern", ratio=0.5, stats=stats, options=options)
        assert read_log == []
    read_log.clear()
    with pytest.raises(PlanError, match="top_k"):
        api.plan_pruning(source, method="dern", ratio=0.9, stats=stats)
    assert read_log == []


def test_cli_passes_the_stun_and_dern_options(tiny_checkpoint, family_stats, tmp_path):
    from moeprune.cli import build_parser, main, method_options

    source = tiny_checkpoint("mixtral")
    args = build_parser().parse_args(["prune", str(source), "--method", "stun", "--ratio", "0.5", "--out", "x",
                                      "--distance", "both", "--normalize", "no"])
    assert method_options(args) == {"distance": "both", "normalize": False}
    stats = family_stats("mixtral").save(tmp_path / "stats.safetensors")
    code = main(["-q", "prune", str(source), "--method", "dern", "--ratio", "0.5", "--stats", str(stats),
                 "--out", str(tmp_path / "out"), "--tau", "0.3", "--kmeans-init", "own", "--kmeans-iterations", "2"])
    assert code == 0
    assert Plan.load(tmp_path / "out").method == "dern"
    assert main(["-q", "prune", str(source), "--method", "stun", "--ratio", "0.5", "--stats", str(stats),
                 "--out", str(tmp_path / "refused"), "--tau", "0.3"]) != 0  # stun takes no --tau


@pytest.mark.parametrize(("method", "kwargs", "message"), [
    ("stun", {"ratio": 0.9}, "at least"), ("stun", {"ratio": 0.5, "options": {"distance": "x"}}, "distance"),
    ("dern", {"ratio": 0.5, "options": {"tau": 2.0}}, "tau"), ("dern", {"ratio": 0.9}, "top_k")])
def test_prune_with_data_refuses_before_calibration(method, kwargs, message, tiny_checkpoint, calib_file, tmp_path,
                                                    read_log):
    with pytest.raises(PlanError, match=message):
        api.prune(tiny_checkpoint("mixtral"), tmp_path / "out", method=method, data=calib_file, **kwargs)
    assert read_log == [] and not (tmp_path / "out").exists()
