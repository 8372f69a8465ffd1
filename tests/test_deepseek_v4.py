"""DeepSeek-V4 beyond the conformance suite: the routing rule and the hash-table remap by hand, sigmoid
scoring bitwise and pruned exactly, the pruned table in the output, the refusals (methods the
hash-routed layers make inexact, checkpoints under the original release's prefix-less names)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import assert_routing_is_the_models, logits_of, patch_routers, vanilla
from moeprune import api
from moeprune.arch import known_families
from moeprune.calibration.engine import collect_stats
from moeprune.errors import MoePruneError
from moeprune.routing import RoutingParams, remap_expert_ids, renumber_expert_ids, route
from moeprune.tiny import build_tiny_model

V4 = RoutingParams(rule="deepseek_v4", top_k=2, renormalize=True, routed_scaling_factor=1.5, score_fn="sqrtsoftplus")


def test_remap_expert_ids_by_hand():
    """A dropped expert becomes its row's first kept expert; a row keeping none maps each dropped expert to
    the next kept one in expert order (cyclically); renumbering gives the kept experts' new indices."""
    table = torch.tensor([[0, 1], [1, 2], [3, 2], [1, 3], [3, 1], [0, 2]])
    keep = torch.tensor([True, False, True, False])  # experts 0 and 2 stay
    assert remap_expert_ids(table, keep).tolist() == [[0, 0], [2, 2], [2, 2], [2, 0], [0, 2], [0, 2]]
    assert renumber_expert_ids(table, [0, 2]).tolist() == [[0, 0], [1, 1], [1, 1], [1, 0], [0, 1], [0, 1]]
    assert torch.equal(renumber_expert_ids(table, [0, 1, 2, 3]), table)  # keeping every expert: unchanged
    assert torch.equal(remap_expert_ids(table, torch.ones(4, dtype=torch.bool)), table)


def test_deepseek_v4_rule_by_hand():
    """s = sqrt(softplus(z)); top-k of s + b; weights = s_sel / (sum + 1e-20) x scale; a hash row replaces
    the selection and is remapped under a mask."""
    logits = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    bias = torch.tensor([0.0, 5.0, 0.0, 0.0])
    s = F.softplus(logits[0]).sqrt()
    weights, indices = route(logits, V4, bias)
    assert sorted(indices[0].tolist()) == [1, 3]  # expert 1 only through its bias
    expected = {e: 1.5 * s[e] / (s[1] + s[3]) for e in (1, 3)}
    for w, e in zip(weights[0], indices[0].tolist()):
        torch.testing.assert_close(w, expected[e], rtol=0, atol=1e-6)
    _, masked = route(logits, V4, bias, expert_mask=torch.tensor([True, False, True, True]))
    assert sorted(masked[0].tolist()) == [0, 3]
    # hash routing: the token's row, weighed the same way; expert 2 dropped -> the row's kept expert 0
    hashed, rows = route(logits, V4, None, expert_ids=torch.tensor([[0, 2]]))
    assert rows.tolist() == [[0, 2]]
    torch.testing.assert_close(hashed[0], 1.5 * s[[0, 2]] / (s[0] + s[2]), rtol=0, atol=1e-6)
    remapped, rows = route(logits, V4, None, expert_mask=torch.tensor([True, True, False, True]),
                           expert_ids=torch.tensor([[0, 2]]))
    assert rows.tolist() == [[0, 0]]
    torch.testing.assert_close(remapped[0], torch.tensor([0.75, 0.75]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scoring", ["sigmoid"])
def test_sigmoid_scoring_routes_as_the_model(scoring, dtype):
    model = build_tiny_model("deepseek_v4", scoring_func=scoring).to(dtype)
    assert known_families()["deepseek_v4"].routing_params(model.config).score_fn == scoring
    assert_routing_is_the_models(model)


@pytest.mark.parametrize("scoring", ["sqrtsoftplus", "sigmoid"])
def test_pruned_tables_and_logits_equal_the_masked_original(scoring, tiny_checkpoint, tmp_path):
    """The output's hash table is the remapped, renumbered original (kept experts only); its logits equal
    the original's with dropped experts masked out of the score-routed layers and remapped in the hash
    layer."""
    source = tiny_checkpoint("deepseek_v4", scoring_func=scoring)
    plan = api.prune(source, tmp_path / "out", method="random", ratio=0.5, seed=3, progress=False)
    name = "model.layers.0.ffn.gate.tid2eid"
    with safe_open(str(source / "model.safetensors"), "pt") as before, \
            safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as after:
        original, pruned = before.get_tensor(name), after.get_tensor(name)
        assert "model.layers.0.ffn.gate.bias" not in after.keys() and "model.layers.1.ffn.gate.bias" in after.keys()
    kept = plan.layers[0]
    assert torch.equal(pruned, renumber_expert_ids(original, kept)) and int(pruned.max()) < len(kept)
    dropped = torch.ones(8, dtype=torch.bool)
    dropped[kept] = False
    assert dropped[original].any()  # some rows named a dropped expert: the remap is exercised
    reference = vanilla(source)
    masked = logits_of(patch_routers(reference, keep=plan.layers))
    assert not torch.allclose(masked, logits_of(vanilla(source)), atol=1e-3)
    torch.testing.assert_close(logits_of(vanilla(tmp_path / "out")), masked, atol=1e-5, rtol=1e-4)
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert "tid2eid" in card


def test_refuses_what_hash_routing_makes_inexact(tiny_checkpoint, calibration, family_stats):
    from moeprune.skipping import install_dynamic_skip

    source = tiny_checkpoint("deepseek_v4")
    stats = family_stats("deepseek_v4")
    for method in ("naee", "angular", "wanda_sp"):
        with pytest.raises(MoePruneError, match="hash routing"):
            api.plan_pruning(source, method=method, ratio=0.5, stats=stats)
    with pytest.raises(MoePruneError, match="dynamic skipping"):
        install_dynamic_skip(vanilla(source), known_families()["deepseek_v4"], {1: 0.1})
    with pytest.raises(MoePruneError, match="token id"):
        collect_stats(source, calibration("deepseek_v4"), observers=["naee"], progress=False)
    # gradients replay the hash layers with the tokens' ids (test_backward checks them against autograd)
    found = collect_stats(source, calibration("deepseek_v4"), observers=["heapr"], progress=False)
    assert sorted(found.layers) == [0, 1, 2] and all(entries["heapr_h2_sum"].sum() > 0 for entries in found.layers.values())
    plan = api.plan_pruning(source, method="reap", ratio=0.5, stats=stats)  # dropping experts is fine
    assert sorted(plan.layers) == [0, 1, 2] and all(len(kept) == 4 for kept in plan.layers.values())


def test_prefix_less_checkpoint_is_refused_clearly(tiny_checkpoint, tmp_path):
    """The original release names its tensors layers.N.* (no model. prefix): one clear error saying how to
    get the names transformers writes."""
    source = tiny_checkpoint("deepseek_v4")
    with safe_open(str(source / "model.safetensors"), "pt") as handle:
        tensors = {key.removeprefix("model."): handle.get_tensor(key) for key in handle.keys()}
    folder = tmp_path / "release"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(json.loads((source / "config.json").read_text())))
    with pytest.raises(MoePruneError, match="without the 'model.' prefix"):
        api.plan_pruning(folder, method="random", ratio=0.5)


def test_neuron_slicing_is_exact(tiny_checkpoint, calibration, tmp_path):
    """Slicing neurons leaves the routing (hash tables included) alone: compact and uniform outputs load with
    moeprune.load (the shared expert's width is moe_intermediate_size, so no vanilla config fits a uniform
    slice) and equal the dense model with the removed neurons' down columns zeroed; streaming == in-memory."""
    import moeprune
    from moeprune.apply import apply_plan_in_memory
    from moeprune.calibration.engine import load_full_model
    from test_neurons import _masked_dense

    source = tiny_checkpoint("deepseek_v4")
    stats = collect_stats(source, calibration("deepseek_v4"), mode="whole", batch_size=2,
                          observers=api.statistics_for("camera_p"), progress=False)
    for method, options in (("camera_p", {"layout": "compact"}), ("wanda_neuron", {})):
        plan = api.plan_pruning(source, method=method, ratio=0.3, stats=stats, protect_super_experts=False, options=options)
        assert sorted(plan.actions) == [0, 1, 2]  # the hash-routed layer 0 too
        out = api.apply(source, plan, tmp_path / method, progress=False)
        loaded = logits_of(moeprune.load(out))
        torch.testing.assert_close(loaded, logits_of(_masked_dense(source, plan)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits_of(apply_plan_in_memory(load_full_model(source), plan)), loaded, rtol=0, atol=1e-6)


def test_merges_renumber_the_hash_table_and_the_exact_router_keeps_it(tiny_checkpoint, calibration, tmp_path):
    """A vanilla-router merge maps each member's id in the hash table to its cluster (HC-SMoE end to end:
    vanilla load == in-memory executor); the exact router keeps the table and the E router rows, and equals
    the original model whose cluster members carry the merged weights (float32: transformers keeps the
    hyper-connection modules in float32 whatever the dtype)."""
    import moeprune
    from moeprune.apply import apply_plan_in_memory
    from moeprune.calibration.engine import load_full_model
    from moeprune.layout import model_expert, set_expert_block
    from moeprune.plan import MergeCluster
    from test_merge import _merge_plan

    source = tiny_checkpoint("deepseek_v4")
    name = "model.layers.0.ffn.gate.tid2eid"
    with safe_open(str(source / "model.safetensors"), "pt") as handle:
        original = handle.get_tensor(name)
    stats = collect_stats(source, calibration("deepseek_v4"), mode="whole", batch_size=2,
                          observers=api.statistics_for("hc_smoe"), progress=False)
    plan = api.plan_pruning(source, method="hc_smoe", ratio=0.5, stats=stats)
    out = api.apply(source, plan, tmp_path / "hc_smoe", progress=False)
    clusters = plan.actions[0][0].clusters
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        merged = handle.get_tensor(name)
    cluster_of = {m: i for i, c in enumerate(clusters) for m in c.members}
    assert torch.equal(merged, original.apply_(cluster_of.__getitem__)) and int(merged.max()) == len(clusters) - 1
    in_memory = apply_plan_in_memory(load_full_model(source), plan)
    assert torch.equal(logits_of(vanilla(out)), logits_of(in_memory))

    info = api.model_info(source)
    groups = [[0, 7, 3], [1], [2, 4], [5], [6]]
    exact = _merge_plan(info, {layer: [MergeCluster(tuple(g), tuple(float(i + 1) for i in range(len(g)))) for g in groups]
                               for layer in info.geometry.moe_layers}, router="exact")
    out = api.apply(source, exact, tmp_path / "exact", progress=False)
    with safe_open(str(out / "model.safetensors"), "pt") as after, safe_open(str(source / "model.safetensors"), "pt") as before:
        assert torch.equal(after.get_tensor(name), before.get_tensor(name))  # the exact router keeps the original table
    loaded = moeprune.load(out)
    reference = load_full_model(source)
    mapping = [next(i for i, g in enumerate(groups) if e in g) for e in range(8)]
    for layer in info.geometry.moe_layers:
        carried = [model_expert(loaded, info.family, layer, c) for c in range(len(groups))]
        set_expert_block(reference, info.family, layer, [{p: t.clone() for p, t in carried[mapping[e]].items()} for e in range(8)])
    torch.testing.assert_close(logits_of(loaded), logits_of(reference), rtol=1e-5, atol=1e-5)
    assert torch.equal(logits_of(apply_plan_in_memory(load_full_model(source), exact)), logits_of(loaded))


@pytest.mark.parametrize("method", ["stun", "dern"])
def test_drop_planners_remap_the_hash_table(method, tiny_checkpoint, calibration, tmp_path):
    """STUN (non-uniform counts: moeprune.load) and DERN (vanilla) drop experts: the hash table is the
    remapped, renumbered original and the output equals the in-memory executor's model."""
    import moeprune
    from moeprune.apply import apply_plan_in_memory
    from moeprune.calibration.engine import load_full_model

    source = tiny_checkpoint("deepseek_v4")
    stats = collect_stats(source, calibration("deepseek_v4"), mode="whole", batch_size=2,
                          observers=api.statistics_for(method), progress=False)
    plan = api.plan_pruning(source, method=method, ratio=0.5, stats=stats)
    out = api.apply(source, plan, tmp_path / method, progress=False)
    name = "model.layers.0.ffn.gate.tid2eid"
    with safe_open(str(source / "model.safetensors"), "pt") as before, safe_open(str(out / "model.safetensors"), "pt") as after:
        assert torch.equal(after.get_tensor(name), renumber_expert_ids(before.get_tensor(name), plan.layers[0]))
    in_memory = apply_plan_in_memory(load_full_model(source), plan)
    assert torch.equal(logits_of(moeprune.load(out)), logits_of(in_memory))
