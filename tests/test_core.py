"""Core guarantees of moeprune (issue 2) beyond the per-family conformance suite
(tests/test_conformance.py runs routing, prune-nothing, vanilla load, sequential == whole,
streaming == in-memory and partial load for every family).

1. moeprune's routing reproduces the router bit for bit under config variants, and the instrumented
   experts forward equals the model's experts module (grouped_mm and eager) for every family.
3. Pruned checkpoints with DeepSeek groups collapsed or kept binding load in vanilla transformers and
   equal the masked original.
6. Bad inputs raise one clear MoePruneError subclass and leave nothing behind.
7. The statistics artifact round-trips; a corrupt one is a StatsError.
8. Collector statistics equal a brute-force hand computation on a tiny Mixtral.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoTokenizer

from conftest import (
    GROUP_CASES,
    SAMPLES,
    SEQ_LEN,
    as_loaded_in,
    assert_output_folder,
    assert_routing_is_the_models,
    assert_same_stats,
    check_vanilla_case,
    moe_layers,
    per_group_counts,
    text_runner,
)
from moeprune import api
from moeprune.apply import write_pruned_checkpoint
from moeprune.arch import known_families, text_model
from moeprune.calibration.data import read_texts, tokenize_and_pack
from moeprune.calibration.engine import collect_stats, load_full_model
from moeprune.collect import eager_accumulate_dtype, routed_expert_outputs
from moeprune.errors import (
    DataError,
    MoePruneError,
    OutputExistsError,
    PlanError,
    StatsError,
    UnknownFamilyError,
)
from moeprune.plan import PLAN_FILENAME
from moeprune.stats import RouterStats
from moeprune.tiny import TINY_FAMILIES, build_tiny_model


# --------------------------------------------------------------------------------------------------
# 1. routing and the instrumented experts forward are exact

# Every family's default config is checked by test_conformance.py; these are the config variants.
ROUTING_CASES = [
    ("deepseek_v2", {"topk_method": "greedy"}),
    ("deepseek_v2", {"topk_group": 1}),  # max-scored groups only bind when top_k > topk_group
    ("qwen2_moe", {"norm_topk_prob": True}),
    ("olmoe", {"norm_topk_prob": True}),
    ("deepseek_v3", {"norm_topk_prob": False}),
]


def _case_id(name: str, overrides: dict) -> str:
    return "-".join([name, *(f"{k}={v}" for k, v in overrides.items())])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family_name,overrides", ROUTING_CASES, ids=[_case_id(*case) for case in ROUTING_CASES])
def test_routing_variants_reproduce_the_model_router(family_name, overrides, dtype):
    model = build_tiny_model(family_name, **overrides).to(dtype)
    family, layers = moe_layers(model)
    params = family.routing_params(model.config)
    for key, value in overrides.items():
        assert getattr(params, {"norm_topk_prob": "renormalize"}.get(key, key)) == value
    assert_routing_is_the_models(model)


#: families whose experts do not implement transformers' experts interface: the collector replaces their
#: own forward by an exact twin (Llama 4's MoE block, LongCat-Flash's loop with identity experts), tested in
#: test_conformance.py (test_input_gated_block_twin_is_exact, test_identity_experts_twin_is_exact)
#: DBRX's twin: test_dbrx.py (test_flat_experts_twin_is_exact); JetMoE's block: test_sorted_dispatch_block_twin_is_exact
OWN_TWINS = ("llama4_text", "longcat_flash", "dbrx", "jetmoe")


#: experts modules without transformers' experts decorator: a plain eager loop only (Inkling)
EAGER_ONLY = ("inkling_text",)


def _decoder(name: str) -> str:
    """The family whose decoder a family runs (a multimodal wrapper: the family its spec extends)."""
    return known_families()[name].spec.get("extends", name)


EXPERT_CASES = [(name, implementation) for name in TINY_FAMILIES if _decoder(name) not in OWN_TWINS
                for implementation in ("grouped_mm", "eager") if implementation == "eager" or _decoder(name) not in EAGER_ONLY]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family_name,implementation", EXPERT_CASES)
def test_instrumented_experts_equal_model_experts(family_name, implementation, dtype):
    model = as_loaded_in(build_tiny_model(family_name), dtype)
    text_runner(model).set_experts_implementation(implementation)  # a multimodal wrapper: on its own class
    assert text_runner(model).config._experts_implementation == implementation
    family, layers = moe_layers(model)
    top_k = family.top_k(model.config)
    generator = torch.Generator().manual_seed(2)
    for index, layer in layers:
        router, experts = family.router(layer), family.experts(layer)
        assert _decoder(family_name) in EAGER_ONLY or experts.config._experts_implementation == implementation
        x = torch.randn(61, text_model(model).config.hidden_size, generator=generator).to(dtype)
        with torch.no_grad():
            token_ids = torch.randint(0, text_model(model).config.vocab_size, (x.shape[0],), generator=generator)  # hash routing
            _, weights, indices = router(*family.router_inputs(layer, x, token_ids))[:3]
            expected = experts(x, indices, weights)
            ours, pairs = routed_expert_outputs(experts, x, indices, weights, eager_accumulate_dtype(family, weights))
        assert torch.equal(ours, expected), (family_name, implementation, index)
        # the routed pairs are exactly the selected (token, expert) pairs, each once ...
        assert pairs.token.numel() == x.shape[0] * top_k
        got = sorted(zip(pairs.token.tolist(), pairs.expert.tolist()))
        want = sorted((t, e) for t in range(x.shape[0]) for e in indices[t].tolist())
        assert got == want
        # ... with the model's gate weights, and their gated outputs add up to the MoE output
        gate = {(t, e): w for t in range(x.shape[0]) for e, w in zip(indices[t].tolist(), weights[t])}
        assert all(torch.equal(gate[(t, e)], w) for t, e, w in zip(pairs.token.tolist(), pairs.expert.tolist(), pairs.weight))
        rebuilt = torch.zeros_like(x, dtype=torch.float64).index_add_(0, pairs.token, (pairs.output * pairs.weight[:, None]).double())
        tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
        torch.testing.assert_close(rebuilt, expected.double(), **tolerance)


# --------------------------------------------------------------------------------------------------
# 3. pruned checkpoints load in vanilla transformers and equal the masked original

@pytest.mark.parametrize("name", sorted(GROUP_CASES))
def test_group_routing_checkpoints(name, vanilla_pruned, tiny_checkpoint):
    case = vanilla_pruned[name]
    config = check_vanilla_case(case, tiny_checkpoint)
    family_name, overrides, budget = GROUP_CASES[name]
    plan = case["plan"]
    assert all(len(kept) == budget["keep"] for kept in plan.layers.values())
    saved = json.loads((case["out"] / PLAN_FILENAME).read_text())
    assert saved["collapse_groups"] is plan.collapse_groups is bool(budget.get("collapse_groups"))
    if plan.collapse_groups:
        assert config["n_group"] == 1 and config["topk_group"] == 1
    else:
        n_group = overrides["n_group"]
        assert config["n_group"] == n_group and config["topk_group"] == overrides["topk_group"]
        assert config["topk_method"] == "group_limited_greedy" and config["num_experts_per_tok"] > config["topk_group"]
        per_group = 8 // n_group
        assert all(per_group_counts(kept, n_group, per_group) == [budget["keep"] // n_group] * n_group for kept in plan.layers.values())


# --------------------------------------------------------------------------------------------------
# 6. bad inputs: one clear error, nothing left behind


def assert_refused(exc_type, out: Path, action, *fragments: str):
    """``action()`` raises ``exc_type`` (a MoePruneError subclass), and leaves no output or temp folder."""
    assert issubclass(exc_type, MoePruneError) and exc_type is not MoePruneError
    out.parent.mkdir(parents=True, exist_ok=True)
    before = sorted(os.listdir(out.parent))
    with pytest.raises(exc_type) as caught:
        action()
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert not out.exists()
    assert sorted(os.listdir(out.parent)) == before
    return message


def test_unknown_family_lists_the_known_ones(tmp_path):
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2}))
    out = tmp_path / "outputs" / "pruned"
    model_types = [t for family in known_families().values() for t in family.model_types]
    assert len(model_types) >= 7
    message = assert_refused(
        UnknownFamilyError, out, lambda: api.prune(llama, out, method="random", ratio=0.5, progress=False), "llama", *model_types
    )
    assert "supported" in message
    with pytest.raises(UnknownFamilyError):
        api.inspect(llama)


@pytest.mark.parametrize("ratio", [1.0, -0.1])
def test_bad_ratio(ratio, tiny_checkpoint, calib_file, tmp_path):
    out = tmp_path / "pruned"
    assert_refused(
        PlanError, out,
        lambda: api.prune(tiny_checkpoint("mixtral"), out, method="reap", ratio=ratio, data=calib_file,
                          samples=SAMPLES, seq_len=SEQ_LEN, progress=False),
        "[0, 1)",
    )


def test_keep_fewer_than_top_k(tiny_checkpoint, tmp_path):
    out = tmp_path / "pruned"
    assert_refused(
        PlanError, out, lambda: api.prune(tiny_checkpoint("qwen3_moe"), out, method="random", keep=1, progress=False), "top_k=2"
    )


def test_plan_for_another_model(tiny_checkpoint, tmp_path):
    other = tiny_checkpoint("mixtral", seed=1, max_position_embeddings=512)  # same family and shapes, another config
    plan = api.plan_pruning(other, method="random", ratio=0.5)
    source = tiny_checkpoint("mixtral")
    assert plan.model_fingerprint and plan.model_fingerprint != api.model_info(source).fingerprint
    out = tmp_path / "pruned"
    assert_refused(PlanError, out, lambda: api.apply(source, plan, out, progress=False), plan.model_fingerprint)
    # the same plan from a file
    plan.save(tmp_path / "plan.json")
    assert_refused(PlanError, out, lambda: api.apply(source, tmp_path / "plan.json", out, progress=False))
    # a plan for another family
    foreign = api.plan_pruning(tiny_checkpoint("olmoe"), method="random", ratio=0.5)
    assert_refused(PlanError, out, lambda: api.apply(source, foreign, out, progress=False))


def test_plan_layer_that_is_not_moe(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("deepseek_v3")  # layer 0 is a dense layer (first_k_dense_replace=1)
    plan = api.plan_pruning(source, method="random", ratio=0.5)
    assert 0 not in plan.layers
    plan.layers[0] = list(plan.layers[1])
    out = tmp_path / "pruned"
    assert_refused(PlanError, out, lambda: api.apply(source, plan, out, progress=False), "layer 0", "not a MoE layer")
    beyond = api.plan_pruning(source, method="random", ratio=0.5)
    beyond.layers[7] = list(beyond.layers[1])
    assert_refused(PlanError, out, lambda: api.apply(source, beyond, out, progress=False), "layer 7")


def test_output_exists_and_overwrite(tiny_checkpoint, calibration, tmp_path):
    source = tiny_checkpoint("olmoe")
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "keep-me.txt").write_text("precious")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(OutputExistsError, match="--overwrite"):
        api.prune(source, out, method="random", ratio=0.5, progress=False)
    assert sorted(os.listdir(out)) == ["keep-me.txt"] and sorted(os.listdir(tmp_path)) == before
    plan = api.plan_pruning(source, method="random", ratio=0.5)
    with pytest.raises(OutputExistsError):
        api.apply(source, plan, out, progress=False)
    with pytest.raises(OutputExistsError):
        write_pruned_checkpoint(source, plan, out, progress=False)
    assert sorted(os.listdir(out)) == ["keep-me.txt"] and sorted(os.listdir(tmp_path)) == before

    plan = api.prune(source, out, method="random", ratio=0.5, overwrite=True, progress=False)
    assert not (out / "keep-me.txt").exists()
    assert json.loads((out / "config.json").read_text())["num_experts"] == 4
    assert_output_folder(out, plan, source)
    assert sorted(os.listdir(tmp_path)) == before  # nothing set aside or temporary remains

    stats_out = tmp_path / "stats.safetensors"
    stats_out.write_bytes(b"old")
    with pytest.raises(OutputExistsError):
        api.collect(source, calibration=calibration("olmoe"), out=stats_out, progress=False)
    assert stats_out.read_bytes() == b"old"


def test_interrupted_write_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    source = tiny_checkpoint("gpt_oss")
    plan = api.plan_pruning(source, method="random", ratio=0.5)

    def interrupted(*args, **kwargs):  # after the shards are written, before the folder is final
        raise KeyboardInterrupt

    monkeypatch.setattr("moeprune.write.finish_output", interrupted)
    out = tmp_path / "pruned"
    with pytest.raises(KeyboardInterrupt):
        api.apply(source, plan, out, progress=False)
    assert os.listdir(tmp_path) == []
    # an existing output is left untouched by an interrupted --overwrite
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        api.apply(source, plan, out, overwrite=True, progress=False)
    assert os.listdir(tmp_path) == ["pruned"] and os.listdir(out) == ["old.txt"]


BAD_DATA = {  # kind: (file content, a fragment of the message)
    "empty": (b"", "is empty"),
    "binary": (b"\x00\x01\x02PK\x03\x04" * 50, "binary"),
    "too_short": (b"Just a few words.\n", "lower --samples or --seq-len"),
}


@pytest.mark.parametrize("kind", sorted(BAD_DATA))
def test_bad_calibration_data(kind, tiny_checkpoint, tmp_path):
    content, fragment = BAD_DATA[kind]
    data = tmp_path / "data" / "calib.txt"
    data.parent.mkdir()
    data.write_bytes(content)
    out = tmp_path / "outputs" / "pruned"
    assert_refused(
        DataError, out,
        lambda: api.prune(tiny_checkpoint("mixtral"), out, method="reap", ratio=0.5, data=data,
                          samples=SAMPLES, seq_len=SEQ_LEN, progress=False),
        fragment,
    )


def test_stats_from_another_model(tiny_checkpoint, family_stats, tmp_path):
    source = tiny_checkpoint("mixtral", seed=1, max_position_embeddings=512)
    stats = family_stats("mixtral")
    out = tmp_path / "outputs" / "pruned"
    assert_refused(
        StatsError, out, lambda: api.prune(source, out, method="reap", ratio=0.5, stats=stats, progress=False),
        stats.metadata["model_fingerprint"],
    )
    path = stats.save(tmp_path / "stats.safetensors")
    assert_refused(StatsError, out, lambda: api.prune(source, out, method="reap", ratio=0.5, stats=path, progress=False))
    with pytest.raises(StatsError):
        api.plan_pruning(source, method="reap", ratio=0.5, stats=stats)


def test_unknown_method(tiny_checkpoint, tmp_path):
    out = tmp_path / "pruned"
    assert_refused(
        PlanError, out, lambda: api.prune(tiny_checkpoint("mixtral"), out, method="magic", ratio=0.5, progress=False),
        "magic", "reap", "frequency",
    )


# --------------------------------------------------------------------------------------------------
# 7. the statistics artifact


def test_stats_round_trip_and_corruption(family_stats, tmp_path):
    stats = family_stats("deepseek_v3")
    assert "shared_max_abs_output" in next(iter(stats.layers.values()))
    path = stats.save(tmp_path / "stats.safetensors")
    loaded = RouterStats.load(path)
    assert_same_stats(stats, loaded)
    for layer in stats.layers:
        for name, value in stats.layers[layer].items():
            assert loaded.layers[layer][name].dtype == torch.float64 == value.dtype
    for key in ("model_fingerprint", "data_hash", "samples", "seq_len", "moeprune_version"):
        assert stats.metadata[key] not in (None, "")
        assert loaded.metadata[key] == stats.metadata[key], key
    assert loaded.metadata["samples"] == SAMPLES and loaded.metadata["seq_len"] == SEQ_LEN
    assert {k: v for k, v in loaded.metadata.items() if k != "format_version"} == stats.metadata

    raw = path.read_bytes()
    corrupt = {
        "truncated": raw[: len(raw) // 2],
        "garbage": b"\xde\xad\xbe\xef" * 64,
        "empty": b"",
    }
    for name, content in corrupt.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(StatsError):
            RouterStats.load(bad)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(3)}, str(foreign))
    with pytest.raises(StatsError, match="not moeprune statistics"):
        RouterStats.load(foreign)
    with pytest.raises(StatsError):
        RouterStats.load(tmp_path / "missing.safetensors")


# --------------------------------------------------------------------------------------------------
# 8. collector statistics by hand


def test_collector_matches_hand_computation(tiny_checkpoint, calib_file):
    source = tiny_checkpoint("mixtral")
    tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    batch = tokenize_and_pack(read_texts(calib_file), tokenizer, seq_len=SEQ_LEN, samples=5, seed=11, pack=False)
    assert (batch.attention_mask == 0).any()
    stats = collect_stats(source, batch, mode="whole", batch_size=2, progress=False)

    model = load_full_model(source)
    family, layers = moe_layers(model)
    assert model.config.hidden_act == "silu"
    top_k, num = family.top_k(model.config), family.num_experts(model.config)
    captured = {index: {"x": [], "residual": []} for index, _ in layers}
    handles = []
    for index, layer in layers:
        handles.append(family.experts(layer).register_forward_pre_hook(lambda m, args, i=index: captured[i]["x"].append(args[0].detach().clone())))
        handles.append(family.residual_norm(layer).register_forward_pre_hook(
            lambda m, args, i=index: captured[i]["residual"].append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())))
    masks = []
    with torch.no_grad():
        for input_ids, attention_mask in batch.batches(2):
            model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            masks.append(attention_mask.reshape(-1).bool())
    for handle in handles:
        handle.remove()

    for index, layer in layers:
        router, experts = family.router(layer), family.experts(layer)
        w_gate_up, w_down = experts.gate_up_proj.detach().double(), experts.down_proj.detach().double()
        inter = w_down.shape[-1]
        hand = {name: [0.0] * num for name in ("frequency", "soft_count", "ean_sum", "reap_sum", "max_abs_output", "easy_ep", "tcess")}
        coactivation = [[0] * num for _ in range(num)]
        tokens, pool_max = 0, 0.0
        pooled: list[tuple[list[int], list[float], list[float]]] = []
        for x, residual, mask in zip(captured[index]["x"], captured[index]["residual"], masks):
            assert x.shape[0] == mask.numel()
            with torch.no_grad():
                logits, weights, selected = router(x)  # the layer's own router on the captured input
            for t in range(x.shape[0]):
                if not mask[t]:
                    continue
                tokens += 1
                routed = torch.zeros(x.shape[1], dtype=torch.float64)
                contributions = []
                for k in range(top_k):
                    e, g = int(selected[t, k]), float(weights[t, k])
                    gate_up = w_gate_up[e] @ x[t].double()
                    h = F.silu(gate_up[:inter]) * gate_up[inter:]
                    f = w_down[e] @ h
                    norm = math.sqrt(sum(v * v for v in f.tolist()))
                    hand["frequency"][e] += 1
                    hand["soft_count"][e] += g
                    hand["ean_sum"][e] += norm
                    hand["reap_sum"][e] += g * norm
                    hand["max_abs_output"][e] = max(hand["max_abs_output"][e], max(abs(v) for v in f.tolist()))
                    routed += g * f
                    contributions.append((e, g * norm))
                    for other in selected[t].tolist():
                        coactivation[e][other] += 1
                h_t = residual[t].double()
                cos = float(h_t @ (h_t + routed)) / (float(h_t.norm()) * float((h_t + routed).norm()))
                for e, c in contributions:
                    hand["easy_ep"][e] += c * max(0.0, 1.0 - cos)
                # TCESS: pool = top-(2k) logits, p = softmax over the pool
                row = logits[t].double().tolist()
                pool = sorted(range(num), key=lambda j: -row[j])[: 2 * top_k]
                exps = [math.exp(row[j] - row[pool[0]]) for j in pool]
                probs = [v / sum(exps) for v in exps]
                pool_max += max(probs)
                pooled.append((pool, probs, [max(row[j], 1.0 / (1.0 + math.exp(-row[j]))) for j in pool]))
        r = pool_max / tokens
        bins = stats.metadata["tcess_bins"]
        grid = lambda p: min(math.floor(p * bins), bins - 1)  # noqa: E731  p >= r on the 1/B grid
        for pool, probs, scores in pooled:
            for j, p, s in zip(pool, probs, scores):
                if grid(p) >= grid(r):
                    hand["tcess"][j] += s

        got = stats.layers[index]
        assert got["tokens"].item() == tokens == batch.num_tokens
        assert got["frequency"].tolist() == hand["frequency"]
        assert got["coactivation"].tolist() == coactivation
        assert got["tcess_r"].item() == pytest.approx(r, rel=1e-9)
        for name in ("soft_count", "ean_sum", "reap_sum", "max_abs_output", "tcess"):
            torch.testing.assert_close(got[name], torch.tensor(hand[name], dtype=torch.float64), rtol=1e-6, atol=0, msg=name)
        # 1 - cos(h, h + routed) cancels digits: compared at the precision the float32 model allows
        torch.testing.assert_close(got["easy_ep"], torch.tensor(hand["easy_ep"], dtype=torch.float64), rtol=1e-4, atol=1e-9)
        assert sum(hand["frequency"]) == tokens * top_k and min(hand["frequency"]) >= 0


def test_config_keys_under_old_names_are_edited_too(tiny_checkpoint, tmp_path):
    """A source config.json that spells the expert count under an old name as well (DeepSeek-V2's
    ``num_experts`` is an alias of ``n_routed_experts`` in transformers 5) gets both edited; left at its
    old value, the alias would override the edited key on load."""
    import shutil
    from transformers import AutoModelForCausalLM

    source = tmp_path / "source"
    shutil.copytree(tiny_checkpoint("deepseek_v2"), source)
    config = json.loads((source / "config.json").read_text())
    config["num_experts"] = config["n_routed_experts"]
    (source / "config.json").write_text(json.dumps(config))
    api.prune(source, tmp_path / "out", method="random", ratio=0.5, progress=False)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["num_experts"] == written["n_routed_experts"] == config["n_routed_experts"] // 2
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert model.config.n_routed_experts == config["n_routed_experts"] // 2


def test_the_model_card_says_what_every_kind_of_plan_did(tiny_checkpoint, family_stats, calib_file, tmp_path):
    from moeprune.write import plan_summary

    source = tiny_checkpoint("mixtral")
    drop = api.plan_pruning(source, method="frequency", ratio=0.5, stats=family_stats("mixtral"))
    assert plan_summary(drop).startswith(f"layer 0: {len(drop.layers[0])}/{drop.num_experts}")
    merge = api.prune(source, tmp_path / "merged", method="hc_smoe", ratio=0.5, data=calib_file, samples=4, seq_len=32,
                      progress=False)
    assert f"layer 0: {merge.num_experts // 2} merged experts (vanilla router)" in (tmp_path / "merged" / "README.md").read_text()
    heads = api.plan_pruning(source, method="magnitude", ratio=0.5, options={"unit": "heads"})
    assert "KV groups (with their query heads) dropped" in plan_summary(heads)
    layers = api.plan_pruning(source, method="dense_random", options={"unit": "layers", "layers": 1})
    assert plan_summary(layers).count("layer dropped") == 1
