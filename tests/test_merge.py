"""Merging (issue 12): features, weight matching, the merge op, both router modes, and the planners.

* observers ``expert_mean_output`` and ``router_logit_gram`` by hand (padding never counts, two
  batches == one) and through the engine against a direct computation;
* similarity functions and clusterers on hand-computed cases;
* weight matching: an expert merged with a neuron-permuted copy of itself is the expert, exactly;
* the op: a merge of singletons writes the keep_experts checkpoint; streaming == in-memory; vanilla
  outputs load in plain transformers; the exact router equals the original model whose cluster
  members carry the merged weights and is refused by plain transformers; non-uniform counts load
  with moeprune.load;
* planners hc_smoe, m_smoe and ream: hand-checked clusters on constructed statistics, super experts
  kept alone; CLI and API (options, `moeprune apply` replays a merge plan).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import moeprune
from conftest import all_tensors, model_inputs, vanilla
from moeprune import api
from moeprune.apply import apply_plan_in_memory
from moeprune.calibration.engine import collect_stats, load_full_model
from moeprune.cli import main
from moeprune.errors import PlanError
from moeprune.io.checkpoint import LazyCheckpoint
from moeprune.layout import CheckpointLayout, model_expert, set_expert_block
from moeprune.methods import get_method
from moeprune.observe import LayerContext, LayerForward, OBSERVERS, observers_for_entries
from moeprune.ops import Edit, ExpertRef, Select, Take
from moeprune.ops.align import align_cluster, match_neurons, neuron_axis, permute_expert
from moeprune.ops.merge import EXPERT_MAP
from moeprune.plan import MergeCluster, MergeExperts, Plan, validate_plan
from moeprune.plan.merging import (assign_to_dominants, bounded_assignment, nearest_to_center, ream_merge_weights,
                                   salient_first_groups, global_dominants, hierarchical_clusters,
                                   plan_hc_smoe)
from moeprune.scoring.similarity import (cosine_matrix, gated_mean_expert_outputs, mean_expert_outputs, ream_distance,
                                         ream_gate_similarity, router_logit_similarity)
from moeprune.stats import RouterStats
from moeprune.structure import SECTION
from moeprune.write import write_edit, write_pruned_checkpoint


def _logits(model, inputs=None):
    with torch.no_grad():
        return model(**(inputs or model_inputs())).logits


def _merge_plan(info, clusters_by_layer, router="vanilla", router_rows="dominant", **kwargs) -> Plan:
    actions = {layer: [MergeExperts(tuple(clusters), router=router, router_rows=router_rows)]
               for layer, clusters in clusters_by_layer.items()}
    return Plan(layers={}, method="manual", family=info.geometry.family, num_experts=info.geometry.num_experts,
                actions=actions, **kwargs)


def _pairs(info, perms=False, weights=(0.25, 0.75)) -> dict[int, list[MergeCluster]]:
    """Experts (2i, 2i+1) merged in every MoE layer (inside one routing group), optionally with a
    reversed neuron order for the second member."""
    width = info.geometry.expert_width
    perm = tuple(reversed(range(width))) if perms else None
    return {layer: [MergeCluster((2 * i, 2 * i + 1), weights, (None, perm)) for i in range(info.geometry.num_experts // 2)]
            for layer in info.geometry.moe_layers}


# --------------------------------------------------------------------------------------------------
# observers


def test_similarity_observers_by_hand_padding_excluded_and_batches_add_up():
    context = LayerContext(num_experts=2, top_k=1)
    every = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]], [[100.0, 100.0], [100.0, 100.0]]])
    logits = torch.tensor([[1.0, 2.0], [3.0, -1.0], [50.0, 50.0]])
    forward = LayerForward(valid=torch.tensor([True, True, False]), top_k_index=torch.zeros(3, 1, dtype=torch.long),
                           top_k_weights=torch.ones(3, 1), router_logits=logits, every_expert_output=every)
    mean_out, gram = OBSERVERS["expert_mean_output"](context), OBSERVERS["router_logit_gram"](context)
    assert OBSERVERS["expert_mean_output"].opt_in and not OBSERVERS["router_logit_gram"].opt_in
    for observer in (mean_out, gram):
        observer.update(forward)
    assert mean_out.result()["expert_mean_output"].tolist() == [[6.0, 8.0], [10.0, 12.0]]  # the padded token is out
    assert gram.result()["router_logit_gram"].tolist() == [[1 + 9, 2 - 3], [2 - 3, 4 + 1]]
    assert gram.result()["router_logit_gram"].dtype == torch.float64
    # one token at a time == both at once (the sums merge exactly)
    split_mean, split_gram = OBSERVERS["expert_mean_output"](context), OBSERVERS["router_logit_gram"](context)
    for t in range(3):
        part = LayerForward(valid=forward.valid[t:t + 1], top_k_index=forward.top_k_index[t:t + 1],
                            top_k_weights=forward.top_k_weights[t:t + 1], router_logits=logits[t:t + 1],
                            every_expert_output=every[t:t + 1])
        split_mean.update(part)
        split_gram.update(part)
    assert torch.equal(split_mean.result()["expert_mean_output"], mean_out.result()["expert_mean_output"])
    assert torch.equal(split_gram.result()["router_logit_gram"], gram.result()["router_logit_gram"])
    assert observers_for_entries(["expert_mean_output"]) == ("tokens", "expert_mean_output")
    gated = OBSERVERS["expert_gated_mean_output"](context)
    assert OBSERVERS["expert_gated_mean_output"].opt_in
    gated.update(forward)
    p0, p1 = torch.softmax(logits[0], 0).double(), torch.softmax(logits[1], 0).double()  # the padded token is out
    want = torch.stack([p0[e] * every[0, e].double() + p1[e] * every[1, e].double() for e in range(2)])
    torch.testing.assert_close(gated.result()["expert_gated_mean_output"], want)
    split = OBSERVERS["expert_gated_mean_output"](context)
    for t in range(3):
        split.update(LayerForward(valid=forward.valid[t:t + 1], top_k_index=forward.top_k_index[t:t + 1],
                                  top_k_weights=forward.top_k_weights[t:t + 1], router_logits=logits[t:t + 1],
                                  every_expert_output=every[t:t + 1]))
    torch.testing.assert_close(split.result()["expert_gated_mean_output"], want)


def test_similarity_observers_through_the_engine_match_a_direct_computation(tiny_checkpoint, calibration):
    source = tiny_checkpoint("mixtral")
    batch = calibration("mixtral")
    stats = collect_stats(source, batch, mode="whole", batch_size=2, progress=False,
                          observers=["expert_mean_output", "expert_gated_mean_output", "router_logit_gram"])
    model = load_full_model(source)
    layer = 1
    block = model.model.layers[layer].mlp
    captured = []
    handle = block.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    handle.remove()
    x = torch.cat(captured).double()[batch.attention_mask.reshape(-1).bool()]
    want_sum, want_gated, logits = [], [], (x @ block.gate.weight.double().T)
    probs = logits.softmax(dim=-1)
    for j in range(8):
        e = {k: v.double() for k, v in model_expert(model, moeprune.arch.family_for_model_type("mixtral"), layer, j).items()}
        out = (F.silu(x @ e["gate"].T) * (x @ e["up"].T)) @ e["down"].T
        want_sum.append(out.sum(0))
        want_gated.append((probs[:, j:j + 1] * out).sum(0))
    got = stats.layers[layer]
    torch.testing.assert_close(got["expert_mean_output"], torch.stack(want_sum), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["expert_gated_mean_output"], torch.stack(want_gated), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["router_logit_gram"], logits.T @ logits, rtol=1e-4, atol=1e-3)


# --------------------------------------------------------------------------------------------------
# similarities and clusterers by hand


def test_similarity_functions_by_hand():
    columns = torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, -1.0]])  # 2 tokens x 3 experts: z_0=(1,0), z_1=(0,2), z_2=(1,-1)
    sim = router_logit_similarity({"router_logit_gram": columns.T @ columns})
    inv = 2 ** -0.5
    want = torch.tensor([[1.0, 0.5, (inv + 1) / 2], [0.5, 1.0, (1 - inv) / 2], [(inv + 1) / 2, (1 - inv) / 2, 1.0]],
                        dtype=torch.float64)
    torch.testing.assert_close(sim, want)
    assert cosine_matrix(torch.tensor([[0.0, 0.0], [1.0, 0.0]])).tolist() == [[1.0, 0.0], [0.0, 1.0]]  # a zero row
    outputs = torch.tensor([[2.0, 0.0], [0.0, 4.0], [-2.0, 0.0]])
    stats = {"expert_mean_output": outputs, "tokens": torch.tensor(2.0), "router_logit_gram": columns.T @ columns}
    assert mean_expert_outputs(stats).tolist() == [[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]]
    # REAM's gate similarity: unit columns u_0=(1,0), u_1=(0,1), u_2=(1,-1)/sqrt2; distances |u_i - u_j|:
    # d_01 = sqrt2, d_02 = sqrt(2 - sqrt2), d_12 = sqrt(2 + sqrt2) (the largest); s = 1 - d / d_12
    gate = ream_gate_similarity(stats)
    top = (2 + 2 ** 0.5) ** 0.5
    want_gate = torch.tensor([[1.0, 1 - 2 ** 0.5 / top, 1 - (2 - 2 ** 0.5) ** 0.5 / top],
                              [1 - 2 ** 0.5 / top, 1.0, 0.0], [1 - (2 - 2 ** 0.5) ** 0.5 / top, 0.0, 1.0]],
                             dtype=torch.float64)
    torch.testing.assert_close(gate, want_gate)
    gated = torch.tensor([[1.0, 1.0], [0.0, 3.0], [2.0, 2.0]])
    stats["expert_gated_mean_output"] = gated
    assert gated_mean_expert_outputs(stats).tolist() == [[0.5, 0.5], [0.0, 1.5], [1.0, 1.0]]
    distance = ream_distance(stats)  # gated outputs: cos_01 = 1/sqrt2, cos_02 = 1
    # d_ij = 1 - ((cos + 1) / 2 + s_gate) / 2
    torch.testing.assert_close(distance[0, 1], 1 - ((inv + 1) / 2 + want_gate[0, 1]) / 2)
    torch.testing.assert_close(distance[0, 2], 1 - (1.0 + want_gate[0, 2]) / 2)
    assert distance.diagonal().tolist() == [0.0, 0.0, 0.0]
    plain = ream_distance(stats, outputs="plain")  # plain outputs: cos_01 = 0, cos_02 = -1
    torch.testing.assert_close(plain[0, 1], 1 - (0.5 + want_gate[0, 1]) / 2)
    torch.testing.assert_close(plain[0, 2], 1 - (0.0 + want_gate[0, 2]) / 2)
    # a zero logit column stays the zero vector: distance 1 to a unit column, 0 to another zero one
    zero = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(ream_gate_similarity({"router_logit_gram": zero.T @ zero}),
                               torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64))


def test_hierarchical_clusters_by_hand_for_each_linkage():
    points = torch.tensor([[0.0], [1.0], [2.1], [3.3]])
    # single: 0-1 (1.0), {0,1}-2.1 (1.1) -> {0,1,2},{3}; complete/average: 0-1, then 2.1-3.3 (1.2) -> {0,1},{2,3}
    assert hierarchical_clusters(points, 2, "single") == [[0, 1, 2], [3]]
    assert hierarchical_clusters(points, 2, "complete") == [[0, 1], [2, 3]]
    assert hierarchical_clusters(points, 2, "average") == [[0, 1], [2, 3]]
    assert hierarchical_clusters(points, 2, "ward") == [[0, 1], [2, 3]]
    assert hierarchical_clusters(points, 3, "average") == [[0, 1], [2], [3]]
    assert hierarchical_clusters(points, 4, "average") == [[0], [1], [2], [3]]
    tied = torch.zeros(5, 2)  # all distances tie: still exactly r clusters
    assert len(hierarchical_clusters(tied, 3, "average")) == 3
    with pytest.raises(PlanError, match="unknown linkage 'avg'"):
        hierarchical_clusters(points, 2, "avg")


def test_nearest_to_center_by_hand():
    features = torch.tensor([[0.0, 0.0], [4.0, 0.0], [1.0, 0.0], [9.0, 9.0]])
    assert nearest_to_center(features, [0, 1, 2]) == 2  # mean (5/3, 0): 2 is 2/3 away
    assert nearest_to_center(features, [0, 1]) == 0  # a tie: the lower index
    assert nearest_to_center(features, [3]) == 3


def test_assignment_clusterers_by_hand():
    sim = torch.tensor([[1.0, 0.2, 0.9, 0.1], [0.2, 1.0, 0.3, 0.8], [0.9, 0.3, 1.0, 0.5], [0.1, 0.8, 0.5, 1.0]])
    assert assign_to_dominants(sim, [0, 1], [2, 3]) == {0: [0, 2], 1: [1, 3]}
    assert assign_to_dominants(sim, [0, 1], [2, 3], closed=[0]) == {0: [0], 1: [1, 2, 3]}  # a super expert takes nobody
    with pytest.raises(PlanError, match="protected super expert"):
        assign_to_dominants(sim, [0], [2, 3], closed=[0])
    distance = torch.tensor([[0.0, 0.5, 0.1, 0.2, 0.9], [0.5, 0.0, 0.6, 0.3, 0.4], [0.1, 0.6, 0.0, 0.7, 0.8],
                             [0.2, 0.3, 0.7, 0.0, 0.5], [0.9, 0.4, 0.8, 0.5, 0.0]])
    # unbounded: nearest centroid; 2 -> 0 (0.1), 3 -> 0 (0.2), 4 -> 1 (0.4)
    assert bounded_assignment(distance, [0, 1], [2, 3, 4], group_size=16) == {0: [0, 2, 3], 1: [1, 4]}
    # at most 2 per group: 2 -> 0 (0.1) fills 0; 3 goes to 1 (0.3); 4 has no room left -> infeasible
    with pytest.raises(PlanError, match="raise --group-size"):
        bounded_assignment(distance, [0, 1], [2, 3, 4], group_size=2)
    assert bounded_assignment(distance, [0, 1], [2, 3], group_size=2) == {0: [0, 2], 1: [1, 3]}
    # REAM's grouping: centroid 1 (the more salient, visited first) takes its nearest free experts, 3 (0.3)
    # and 4 (0.4) with room for 15; nobody is left for 0
    assert salient_first_groups(distance, [1, 0], [2, 3, 4], group_size=16) == {1: [1, 2, 3, 4], 0: [0]}
    # room for one each: 1 takes 3 (0.3), then 0 takes 2 (0.1)... and 4 has no room left -> infeasible
    with pytest.raises(PlanError, match="raise --group-size"):
        salient_first_groups(distance, [1, 0], [2, 3, 4], group_size=2)
    assert salient_first_groups(distance, [1, 0], [2, 3, 4], group_size=3) == {1: [1, 3, 4], 0: [0, 2]}
    assert salient_first_groups(distance, [1, 0], [2, 3, 4], group_size=16, closed=[1]) == {1: [1], 0: [0, 2, 3, 4]}
    assert ream_merge_weights(torch.tensor([0.0, 2.0, 0.25])).tolist() == [0.25, 2.0, 0.25]
    assert ream_merge_weights(torch.tensor([0.0, 2.0, 3.0])).tolist() == [0.5, 2.0, 3.0]
    frequencies = {0: torch.full((8,), 8.0), 1: torch.tensor([8.0] + [4.0] * 7), 2: torch.tensor([8.0] + [1.0] * 7)}
    # each layer first keeps its top 2; the 6 other slots go to the highest normalised frequency: layer 0's (1.0)
    assert global_dominants(frequencies, 12, 2, {}) == {0: list(range(8)), 1: [0, 1], 2: [0, 1]}
    assert global_dominants(frequencies, 12, 2, {2: [5]}) == {0: [0, 1, 2, 3, 4, 5, 6], 1: [0, 1], 2: [0, 1, 5]}
    with pytest.raises(PlanError, match="global budget keeps 5"):
        global_dominants(frequencies, 5, 2, {})


# --------------------------------------------------------------------------------------------------
# weight matching


def _random_expert(width=6, hidden=5, biases=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    expert = {"gate": torch.randn(width, hidden, generator=g), "up": torch.randn(width, hidden, generator=g),
              "down": torch.randn(hidden, width, generator=g)}
    if biases:
        expert.update(gate_bias=torch.randn(width, generator=g), up_bias=torch.randn(width, generator=g),
                      down_bias=torch.randn(hidden, generator=g))
    return expert


def test_match_neurons_recovers_a_permutation_and_permutes_every_tensor():
    expert = _random_expert()
    shuffle = [3, 0, 5, 1, 4, 2]
    copy = permute_expert(expert, shuffle)
    assert torch.equal(copy["gate"][0], expert["gate"][3]) and torch.equal(copy["down"][:, 0], expert["down"][:, 3])
    assert torch.equal(copy["up_bias"][2], expert["up_bias"][5]) and torch.equal(copy["down_bias"], expert["down_bias"])
    perm = match_neurons(expert, copy)
    aligned = permute_expert(copy, perm)
    assert all(torch.equal(aligned[p], expert[p]) for p in expert)
    assert [neuron_axis(p) for p in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")] == [0, 0, 1, 0, 0, None]
    # the function of the expert is unchanged by a permutation
    x = torch.randn(4, 5)

    def forward(e):
        return (F.silu(x @ e["gate"].T + e["gate_bias"]) * (x @ e["up"].T + e["up_bias"])) @ e["down"].T + e["down_bias"]

    torch.testing.assert_close(forward(copy), forward(expert))


def _twin_checkpoint(source, out, layer, shuffle):
    """``source`` with expert 1 of ``layer`` replaced by expert 0 with its neurons shuffled."""
    info = api.model_info(source)
    layout = CheckpointLayout.build(info.family, LazyCheckpoint(source), info.geometry.moe_layers)
    edit = Edit()
    experts = []
    for e in range(info.geometry.num_experts):
        if e == 1:
            experts.append({p: Take(ExpertRef(layer, 0, p)) if neuron_axis(p) is None
                            else Select(Take(ExpertRef(layer, 0, p)), neuron_axis(p), tuple(shuffle))
                            for p in info.family.layout.projections})
        else:
            experts.append({p: Take(ExpertRef(layer, e, p)) for p in info.family.layout.projections})
    edit.experts[layer] = experts
    write_edit(layout, edit, out, progress=False)
    shutil.copy(source / "config.json", out / "config.json")
    return out


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "nemotron_h"])
def test_merging_an_expert_with_its_permuted_copy_returns_it_exactly(family, tiny_checkpoint, tmp_path):
    source = tiny_checkpoint(family)
    info = api.model_info(source)
    layer, width = info.geometry.moe_layers[-1], info.geometry.expert_width
    shuffle = [(5 * k + 2) % width for k in range(width)]
    twin = _twin_checkpoint(source, tmp_path / "twin", layer, shuffle)
    twin_info = api.model_info(twin)
    perms = align_cluster(twin_info.layout, layer, [0, 1])
    assert perms[0] is None and perms[1] is not None
    clusters = [MergeCluster((0, 1), (0.3, 0.7), perms)] + [MergeCluster((e,), (1.0,)) for e in range(2, info.geometry.num_experts)]
    plan = _merge_plan(twin_info, {layer: clusters})
    out = write_pruned_checkpoint(twin, plan, tmp_path / "merged", progress=False)
    merged = CheckpointLayout.build(info.family, LazyCheckpoint(out), info.geometry.moe_layers)
    for proj in info.family.layout.projections:
        assert torch.equal(merged.read_expert(layer, 0, proj), twin_info.layout.read_expert(layer, 0, proj)), proj
    # without alignment the merge is not the expert
    plain = _merge_plan(twin_info, {layer: [MergeCluster((0, 1), (0.3, 0.7))] + clusters[1:]})
    other = CheckpointLayout.build(info.family, LazyCheckpoint(write_pruned_checkpoint(twin, plain, tmp_path / "plain", progress=False)),
                                   info.geometry.moe_layers)
    first = info.family.layout.projections[0]  # gate, or up for ungated experts (Nemotron-H)
    assert not torch.equal(other.read_expert(layer, 0, first), twin_info.layout.read_expert(layer, 0, first))


# --------------------------------------------------------------------------------------------------
# the op


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_a_merge_of_singletons_writes_the_keep_experts_checkpoint(family, tiny_checkpoint, tmp_path):
    source = tiny_checkpoint(family)
    info = api.model_info(source)
    size = info.geometry.experts_per_group if info.geometry.grouped else 4
    kept = [e for e in range(info.geometry.num_experts) if e % size != 1]
    drop = Plan(layers={layer: kept for layer in info.geometry.moe_layers}, method="manual")
    for rows in ("dominant", "mean"):
        singletons = _merge_plan(info, {layer: [MergeCluster((e,), (2.0,)) for e in kept] for layer in info.geometry.moe_layers},
                                 router_rows=rows)
        a = write_pruned_checkpoint(source, drop, tmp_path / f"drop-{rows}", progress=False)
        b = write_pruned_checkpoint(source, singletons, tmp_path / f"merge-{rows}", progress=False)
        ta, tb = all_tensors(a), all_tensors(b)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
        assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


def _merged_by_hand(original, family, layer, cluster):
    experts = [permute_expert(model_expert(original, family, layer, m), p) for m, p in zip(cluster.members, cluster.permutations)]
    total = sum(cluster.weights)
    return {proj: sum(w / total * e[proj].double() for w, e in zip(cluster.weights, experts)).float() for proj in experts[0]}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3", "nemotron_h"])
def test_vanilla_merge_streaming_equals_in_memory_and_loads_in_transformers(family, tiny_checkpoint, tmp_path):
    source = tiny_checkpoint(family)
    info = api.model_info(source)
    plan = _merge_plan(info, _pairs(info, perms=True), router_rows="mean")
    out = write_pruned_checkpoint(source, plan, tmp_path / "merged", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert SECTION not in config
    assert all(config[key] == info.geometry.num_experts // 2 for key in info.family.num_experts_keys if key in config)
    loaded = vanilla(out)
    in_memory = apply_plan_in_memory(load_full_model(source), plan)
    assert loaded.state_dict().keys() == in_memory.state_dict().keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, in_memory.state_dict()[key]), key
    assert torch.equal(_logits(loaded), _logits(in_memory))
    # by hand: merged expert 1 of the last layer, and its router row = the weighted mean of the members' rows
    original = load_full_model(source)
    layer = info.geometry.moe_layers[-1]
    cluster = plan.actions[layer][0].clusters[1]
    want = _merged_by_hand(original, info.family, layer, cluster)
    got = model_expert(loaded, info.family, layer, 1)
    for proj in want:
        torch.testing.assert_close(got[proj], want[proj], rtol=0, atol=1e-6)
    router = info.family.router(original.model.layers[layer]).weight
    new_router = info.family.router(loaded.model.layers[layer]).weight
    torch.testing.assert_close(new_router[1], (0.25 * router[2].double() + 0.75 * router[3].double()).to(router.dtype))


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "nemotron_h"])
def test_exact_router_equals_the_original_model_whose_members_carry_the_merged_weights(family, tiny_checkpoint, tmp_path):
    source = tiny_checkpoint(family)
    info = api.model_info(source)
    E = info.geometry.num_experts
    # clusters of uneven sizes, crossing DeepSeek's routing groups (the exact router keeps the model's routing)
    groups = [[0, E - 1, 3], [1], [2, 4], *[[e] for e in range(5, E - 1)]]
    width = info.geometry.expert_width
    clusters = [MergeCluster(tuple(g), tuple(float(i + 1) for i in range(len(g))),
                             tuple(None if i == 0 else tuple(reversed(range(width))) for i in range(len(g)))) for g in groups]
    plan = _merge_plan(info, {layer: clusters for layer in info.geometry.moe_layers}, router="exact")
    validate_plan(plan, info.geometry)
    out = write_pruned_checkpoint(source, plan, tmp_path / "exact", progress=False)
    config = json.loads((out / "config.json").read_text())
    mapping = config[SECTION][EXPERT_MAP][str(info.geometry.moe_layers[0])]
    assert mapping[0] == mapping[E - 1] == mapping[3] == 0 and mapping[2] == mapping[4] == 2 and len(mapping) == E
    with pytest.raises(Exception):  # plain transformers refuses the E router rows of a model with fewer experts
        AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    loaded = moeprune.load(out, dtype=torch.float64)
    reference = load_full_model(source, dtype=torch.float64)
    for layer in info.geometry.moe_layers:  # the original model, every member carrying its cluster's merged weights
        merged = [model_expert(loaded, info.family, layer, c) for c in range(len(clusters))]
        set_expert_block(reference, info.family, layer, [{p: t.clone() for p, t in merged[mapping[e]].items()} for e in range(E)])
    for model in (loaded, reference):  # grouped_mm has no float64 kernel on the CPU
        model.set_experts_implementation("eager")
    torch.testing.assert_close(_logits(loaded), _logits(reference), rtol=1e-10, atol=1e-10)
    # the in-memory executor builds the same model as moeprune.load of the written checkpoint
    in_memory = apply_plan_in_memory(load_full_model(source), plan)
    assert torch.equal(_logits(in_memory), _logits(moeprune.load(out)))


def test_non_uniform_merge_loads_with_moeprune_load_and_validation(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("mixtral")
    info = api.model_info(source)
    layers = info.geometry.moe_layers
    clusters = {layers[0]: [MergeCluster(tuple(range(4)), (1, 1, 1, 1)), MergeCluster(tuple(range(4, 8)), (1, 2, 0, 1))],
                **{layer: [MergeCluster((e,), (1.0,)) for e in range(8)] for layer in layers[1:]}}
    plan = _merge_plan(info, clusters)
    out = write_pruned_checkpoint(source, plan, tmp_path / "uneven", progress=False)
    assert json.loads((out / "config.json").read_text())[SECTION]["experts_per_layer"][str(layers[0])] == 2
    assert torch.equal(_logits(moeprune.load(out)), _logits(apply_plan_in_memory(load_full_model(source), plan)))
    bad = [
        (_merge_plan(info, {1: [MergeCluster((0, 1, 2, 3), (1, -1, 1, 1)), MergeCluster((4, 5, 6, 7), (1,) * 4)]}), "non-negative"),
        (_merge_plan(info, {1: [MergeCluster((0, 1, 2, 3), (0,) * 4), MergeCluster((4, 5, 6, 7), (1,) * 4)]}), "positive sum"),
        (Plan(layers={1: [0, 1, 2, 3]}, method="manual", actions={1: [MergeExperts(
            (MergeCluster((0, 1), (1, 1)), MergeCluster((2, 3), (1, 1))), router="exact")]}), "exact router"),
        (_merge_plan(info, {1: [MergeCluster((0, 1, 2, 3), (1,) * 4), MergeCluster((4, 5, 6, 7), (1,) * 4)]},
                     protected={1: [5]}), "protected experts \\[5\\]"),
    ]
    for plan, message in bad:
        with pytest.raises(PlanError, match=message):
            validate_plan(plan, info.geometry)


def test_merge_plan_round_trips_with_router_choices():
    plan = Plan(layers={}, method="manual", actions={1: [MergeExperts((MergeCluster((3, 0), (2.0, 1.0), (None, (1, 0))),),
                                                                      router="vanilla", router_rows="mean")]})
    data = json.loads(json.dumps(plan.to_json()))
    assert data["actions"]["1"][0]["router_rows"] == "mean"
    assert Plan.from_json(data) == plan
    data["actions"]["1"][0]["router_rows"] = "median"
    with pytest.raises(PlanError, match="router_rows must be one of dominant, mean"):
        Plan.from_json(data)
    del data["actions"]["1"][0]["router_rows"], data["actions"]["1"][0]["router"]
    assert Plan.from_json(data).actions[1][0] == MergeExperts(plan.actions[1][0].clusters)  # vanilla, dominant


# --------------------------------------------------------------------------------------------------
# planners on constructed statistics (hand-checked clusters)


def _stats(info, per_layer) -> RouterStats:
    """RouterStats of the tiny checkpoint with the given entries in every MoE layer (plus tokens and
    max_abs_output with no super expert unless given)."""
    layers = {}
    for layer in info.geometry.moe_layers:
        entries = {"tokens": torch.tensor(100.0, dtype=torch.float64),
                   "max_abs_output": torch.ones(info.geometry.num_experts, dtype=torch.float64)}
        entries.update({k: v.to(torch.float64) for k, v in per_layer(layer).items()})
        layers[layer] = entries
    return RouterStats(layers, {"model_fingerprint": info.fingerprint})


def _clusters(plan, layer):
    return [list(c.members) for c in plan.actions[layer][0].clusters]


def test_hc_smoe_clusters_by_hand_super_experts_stay_alone(tiny_checkpoint):
    source = tiny_checkpoint("mixtral")
    info = api.model_info(source)
    hidden = info.config.hidden_size
    centers = torch.zeros(4, hidden)
    centers[:, 0] = torch.tensor([0.0, 10.0, 15.0, 40.0])  # groups 1 and 2 are the nearest pair of groups
    groups = {0: 0, 3: 0, 1: 1, 5: 1, 6: 1, 2: 2, 4: 3, 7: 3}
    features = torch.stack([centers[groups[e]] + 0.01 * e for e in range(8)]) * 100  # sums over 100 tokens
    frequency = torch.tensor([10.0, 20, 5, 1, 8, 3, 30, 2])
    stats = _stats(info, lambda layer: {"frequency": frequency, "expert_mean_output": features})
    plan = api.plan_pruning(source, method="hc_smoe", ratio=0.5, stats=stats, protect_super_experts=False,
                            options={"align": "off"})
    # the default dominant: the member nearest its cluster's mean feature ({1, 5, 6}: 5, at 1 from the mean)
    got = _clusters(plan, info.geometry.moe_layers[0])
    assert sorted(map(sorted, got)) == [[0, 3], [1, 5, 6], [2], [4, 7]] and [5, 1, 6] in got
    assert plan.actions[info.geometry.moe_layers[0]][0].clusters[got.index([5, 1, 6])].weights == (3.0, 20.0, 30.0)
    plan = api.plan_pruning(source, method="hc_smoe", ratio=0.5, stats=stats, protect_super_experts=False,
                            options={"align": "off", "dominant": "frequency"})
    for layer in info.geometry.moe_layers:  # dominant (most frequent) first; clusters ordered by dominant
        assert _clusters(plan, layer) == [[0, 3], [2], [4, 7], [6, 1, 5]]
        assert plan.actions[layer][0].clusters[3].weights == (30.0, 20.0, 3.0)
        assert all(p is None for c in plan.actions[layer][0].clusters for p in c.permutations)  # align off
    assert plan.budget["options"]["linkage"] == "average" and plan.method == "hc_smoe"
    aligned = api.plan_pruning(source, method="hc_smoe", ratio=0.5, stats=stats, protect_super_experts=False,
                               options={"dominant": "frequency"})
    layer = info.geometry.moe_layers[0]
    assert aligned.actions[layer][0].clusters[3].permutations == align_cluster(info.layout, layer, [6, 1, 5])
    # expert 1 of layer 0 is a super expert: alone, and the other 7 experts share the remaining 3 clusters
    peaks = lambda layer: torch.tensor([1.0, 1000, 1, 1, 1, 1, 1, 1]) if layer == info.geometry.moe_layers[0] else torch.ones(8)
    stats = _stats(info, lambda layer: {"frequency": frequency, "expert_mean_output": features, "max_abs_output": peaks(layer)})
    plan = api.plan_pruning(source, method="hc_smoe", ratio=0.5, stats=stats, options={"dominant": "frequency"})
    assert plan.protected == {info.geometry.moe_layers[0]: [1]}
    assert _clusters(plan, info.geometry.moe_layers[0]) == [[0, 3], [1], [4, 7], [6, 2, 5]]
    with pytest.raises(PlanError, match="unknown linkage|--linkage must be one of"):
        api.plan_pruning(source, method="hc_smoe", ratio=0.5, stats=stats, options={"linkage": "averge"})


def test_m_smoe_clusters_by_hand_aligned_to_their_dominant(tiny_checkpoint):
    source = tiny_checkpoint("mixtral")
    info = api.model_info(source)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 4, generator=g)
    near = {4: 0, 5: 1, 6: 2, 7: 0}
    columns = torch.cat([base, torch.stack([base[:, near[e]] + 0.05 * torch.randn(64, generator=g) for e in range(4, 8)], 1)], 1)
    frequency = torch.tensor([50.0, 40, 30, 20, 1, 2, 3, 4])
    stats = _stats(info, lambda layer: {"frequency": frequency, "router_logit_gram": columns.T @ columns})
    plan = api.plan_pruning(source, method="m_smoe", ratio=0.5, stats=stats, protect_super_experts=False,
                            options={"budget": "per_layer"})
    layer = info.geometry.moe_layers[0]
    assert _clusters(plan, layer) == [[0, 4, 7], [1, 5], [2, 6], [3]]
    cluster = plan.actions[layer][0].clusters[0]
    want = align_cluster(info.layout, layer, [0, 4, 7])  # aligned to its dominant, expert 0
    assert cluster.permutations == want and cluster.weights == (50.0, 1.0, 4.0)
    assert plan.actions[1][0].clusters[1].permutations == align_cluster(info.layout, 1, [1, 5])  # to expert 1, not 0
    # the global budget: the same total, spread by normalised frequency (all layers equal here: 4 each)
    plan = api.plan_pruning(source, method="m_smoe", ratio=0.5, stats=stats, protect_super_experts=False)
    assert [len(plan.actions[l][0].clusters) for l in info.geometry.moe_layers] == [4, 4, 4]


def test_ream_clusters_by_hand(tiny_checkpoint):
    source = tiny_checkpoint("mixtral")
    info = api.model_info(source)
    hidden = info.config.hidden_size
    frequency = torch.full((8,), 10.0)
    reap = torch.tensor([1.0, 9, 2, 8, 3, 7, 4, 6]) * 10  # saliency: centroids 1, 3, 5, 7
    near = {0: 1, 2: 3, 4: 5, 6: 7, 1: 1, 3: 3, 5: 5, 7: 7}
    outputs = torch.zeros(8, hidden)
    for e in range(8):
        outputs[e, near[e]] = 1.0
        outputs[e, 10 + e] = 0.1
    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 8, generator=g)
    columns = torch.stack([base[:, near[e]] + 0.1 * torch.randn(64, generator=g) for e in range(8)], 1)
    stats = _stats(info, lambda layer: {"frequency": frequency, "reap_sum": reap, "expert_gated_mean_output": outputs * 100,
                                        "router_logit_gram": columns.T @ columns})
    # the default (the reference's grouping): the most salient centroid, 1, takes every free expert
    plan = api.plan_pruning(source, method="ream", ratio=0.5, stats=stats, protect_super_experts=False)
    assert _clusters(plan, 0) == [[1, 0, 2, 4, 6], [3], [5], [7]]
    # merge weights: the REAP saliencies reap_sum / frequency
    assert plan.actions[0][0].clusters[0].weights == (9.0, 1.0, 2.0, 3.0, 4.0)
    # one free expert per centroid: each joins its own nearest centroid here
    plan = api.plan_pruning(source, method="ream", ratio=0.5, stats=stats, protect_super_experts=False,
                            options={"group_size": 2})
    assert _clusters(plan, 0) == [[1, 0], [3, 2], [5, 4], [7, 6]]
    plan = api.plan_pruning(source, method="ream", ratio=0.5, stats=stats, protect_super_experts=False,
                            options={"assign": "nearest", "merge_weights": "frequency"})
    assert _clusters(plan, 0) == [[1, 0], [3, 2], [5, 4], [7, 6]]
    assert plan.actions[0][0].clusters[0].weights == (10.0, 10.0)
    assert all(c.permutations[1] is None or len(c.permutations[1]) == info.geometry.expert_width
               for c in plan.actions[0][0].clusters)
    with pytest.raises(PlanError, match="group-size"):
        api.plan_pruning(source, method="ream", ratio=0.5, stats=stats, options={"group_size": 1})


def test_merge_methods_registry_and_refused_options(tiny_checkpoint):
    for name in ("hc_smoe", "m_smoe", "ream"):
        method = get_method(name)
        assert (method.op, method.selector, dict(method.options)["router"]) == ("merge", "clustering", "vanilla")
    assert "expert_mean_output" in api.statistics_for("hc_smoe") and "router_logit_gram" in api.statistics_for("m_smoe")
    with pytest.raises(PlanError, match="does not take the option"):
        api.plan_pruning(tiny_checkpoint("mixtral"), method="reap", ratio=0.5, options={"router": "exact"})
    info = api.model_info(tiny_checkpoint("mixtral"))
    with pytest.raises(PlanError, match="--router must be one of"):
        plan_hc_smoe(info, None, method=get_method("hc_smoe"), ratio=0.5, router="approximate")


# --------------------------------------------------------------------------------------------------
# end to end: API, CLI, apply


def test_api_prune_with_exact_router_and_cli_apply_replays_the_merge_plan(tiny_checkpoint, calib_file, tmp_path):
    source = tiny_checkpoint("mixtral")
    out = tmp_path / "hc"
    plan = api.prune(source, out, method="hc_smoe", ratio=0.5, data=calib_file, samples=4, seq_len=32, progress=False,
                     options={"router": "exact", "linkage": "complete"})
    assert all(a[0].router == "exact" for a in plan.actions.values())
    assert EXPERT_MAP in json.loads((out / "config.json").read_text())[SECTION]
    replay = tmp_path / "replay"
    assert main(["-q", "apply", str(source), "--plan", str(out / "moeprune_plan.json"), "--out", str(replay)]) == 0
    ta, tb = all_tensors(out), all_tensors(replay)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert torch.equal(_logits(moeprune.load(out)), _logits(moeprune.load(replay)))
    cli_out = tmp_path / "cli"
    assert main(["-q", "prune", str(source), "--method", "m_smoe", "--ratio", "0.5", "--data", str(calib_file),
                 "--samples", "4", "--seq-len", "32", "--budget", "per_layer", "--router-rows", "mean",
                 "--out", str(cli_out)]) == 0
    saved = Plan.load(cli_out)
    assert saved.budget["options"]["budget"] == "per_layer" and all(a[0].router_rows == "mean" for a in saved.actions.values())
    vanilla(cli_out)  # a uniform vanilla merge is a stock checkpoint
    assert main(["-q", "prune", str(source), "--method", "reap", "--ratio", "0.5", "--data", str(calib_file),
                 "--router", "exact", "--out", str(tmp_path / "refused")]) != 0


def test_planners_keep_vanilla_merges_inside_deepseek_routing_groups(tiny_checkpoint, calibration, tmp_path):
    source = tiny_checkpoint("deepseek_v3")
    info = api.model_info(source)
    observers = sorted({o for m in ("hc_smoe", "m_smoe", "ream") for o in api.statistics_for(m)})
    stats = collect_stats(source, calibration("deepseek_v3"), mode="whole", batch_size=2, progress=False, observers=observers)
    geometry = info.geometry
    assert geometry.grouped
    for method, options in (("hc_smoe", {}), ("m_smoe", {"budget": "per_layer"}), ("ream", {})):
        plan = api.plan_pruning(source, method=method, ratio=0.5, stats=stats, options=options)
        for layer in geometry.moe_layers:
            clusters = plan.actions[layer][0].clusters
            assert all(len({geometry.group_of(m) for m in c.members}) == 1 for c in clusters), (method, layer)
            per_group = [sum(geometry.group_of(c.members[0]) == g for c in clusters) for g in range(geometry.n_group)]
            assert len(set(per_group)) == 1, (method, per_group)
        vanilla(write_pruned_checkpoint(source, plan, tmp_path / method, progress=False))
    with pytest.raises(PlanError, match="--budget per_layer or --router exact"):
        api.plan_pruning(source, method="m_smoe", ratio=0.5, stats=stats)
    exact = api.plan_pruning(source, method="m_smoe", ratio=0.5, stats=stats, options={"router": "exact"})
    out = write_pruned_checkpoint(source, exact, tmp_path / "exact", progress=False)
    assert torch.equal(_logits(moeprune.load(out)), _logits(apply_plan_in_memory(load_full_model(source), exact)))
