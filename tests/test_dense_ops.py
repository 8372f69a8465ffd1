"""Dense ops: attention heads (KV groups), dense-MLP and shared-expert channels, whole layers.

Every pruned checkpoint is compared with the ORIGINAL model with the removed units masked: a head's
output is zeroed through its o_proj columns, a channel through its down_proj column, a dropped layer
replaced by the identity. Uniform outputs load in vanilla transformers; non-uniform ones with
moeprune.load (vanilla from_pretrained must fail on them). Streaming == in-memory for each.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import all_tensors, logits_of, vanilla

import moeprune
from moeprune import api, cli
from moeprune.apply import apply_plan_in_memory, write_pruned_checkpoint
from moeprune.arch import family_for_model_type, known_families, read_config
from moeprune.errors import PlanError
from moeprune.layout import family_layout, layer_prefix
from moeprune.plan import Plan
from moeprune.plan.actions import DropAttentionHeads, DropLayer, SliceChannels, TransformMlpOutput
from moeprune.units import channel_unit, kv_group_unit, model_facts, unit_parameters

# -- helpers ---------------------------------------------------------------------------------------


def _plan(family: str, actions: dict, layers: dict | None = None) -> Plan:
    return Plan(layers=layers or {}, method="manual", family=family, actions=actions)


def _masked(model, family: str, heads: dict[int, list[int]] = (), channels: dict[tuple[int, str], list[int]] = (),
            dropped: tuple[int, ...] = ()):
    """``model`` (a copy) with query heads ``heads[layer]`` and channels ``channels[(layer, target)]``
    zeroed through their output columns, and layers ``dropped`` replaced by the identity."""
    model = copy.deepcopy(model)
    layout = family_layout(family)
    facts = model_facts(family, model)
    with torch.no_grad():
        for layer, removed in dict(heads).items():
            d = facts[layer].attention.head_dim
            o = model.get_submodule(layer_prefix(layer) + f"{layout.attention.module}.{layout.attention.o}")
            for head in removed:
                o.weight[:, head * d:(head + 1) * d] = 0
        for (layer, target), removed in dict(channels).items():
            spec = layout.dense_mlp if target == "dense_mlp" else layout.shared_channels
            down = model.get_submodule(layer_prefix(layer) + f"{spec.module}.{spec.down}")
            down.weight[:, list(removed)] = 0
    for layer in dropped:
        def identity(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        model.model.layers[layer].register_forward_hook(identity, with_kwargs=True)
    return model


def _heads_of_groups(family: str, model, layer: int, groups) -> list[int]:
    attention = model_facts(family, model)[layer].attention
    return [h for h in range(attention.heads) if attention.group_of(h) in set(groups)]


def _prune_both(source, plan, out, family):
    """(streamed output folder, in-memory pruned model) of ``plan``."""
    written = write_pruned_checkpoint(source, plan, out, max_shard_size="30KB", progress=False)
    in_memory = apply_plan_in_memory(vanilla(source), plan)
    return written, in_memory


def _assert_logits(model, reference):
    torch.testing.assert_close(logits_of(model), logits_of(reference), rtol=1e-5, atol=1e-5)


def _assert_masking_matters(masked, original):
    """The masked reference is not the original model (so equality with it means something)."""
    assert not torch.allclose(logits_of(masked), logits_of(original), atol=1e-4)


def _vanilla_fails(folder):
    from transformers import AutoModelForCausalLM

    with pytest.raises(Exception):  # noqa: B017  (transformers' own error: shape mismatch)
        AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)


def _attention_layers(family: str, model) -> list[int]:
    return [layer for layer, fact in model_facts(family, model).items() if fact.attention is not None]


# -- pruning nothing changes nothing -----------------------------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_pruning_nothing_changes_nothing(family, tiny_checkpoint, tmp_path):
    source = tiny_checkpoint(family)
    model = vanilla(source)
    facts = model_facts(family, model)
    actions = {}
    for layer, fact in facts.items():
        listed = []
        if fact.attention is not None and family_layout(family).attention.kind == "gqa":
            listed.append(DropAttentionHeads())
        if fact.dense_width:
            listed.append(SliceChannels("dense_mlp", tuple(range(fact.dense_width))))
        if fact.shared_width:
            listed.append(SliceChannels("shared_experts", tuple(range(fact.shared_width))))
        if listed:
            actions[layer] = listed
    assert actions
    out, in_memory = _prune_both(source, _plan(family, actions), tmp_path / "out", family)
    before, after = all_tensors(source), all_tensors(out)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    source_config = json.loads((source / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert "moeprune" not in config
    assert {k: v for k, v in config.items() if source_config.get(k) != v} in ({}, {"head_dim": 8})
    _assert_logits(vanilla(out), model)
    _assert_logits(in_memory, model)


# -- attention heads -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe", "gpt_oss", "qwen3_next", "granitemoehybrid"])
def test_uniform_kv_group_drop_is_vanilla_and_equals_masked_heads(family, tiny_checkpoint, tmp_path):
    source = tiny_checkpoint(family)
    model = vanilla(source)
    layers = _attention_layers(family, model)
    plan = _plan(family, {layer: [DropAttentionHeads(kv_groups=(layer % 2,))] for layer in layers})
    out, in_memory = _prune_both(source, plan, tmp_path / "out", family)
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 8)
    assert "moeprune" not in config
    pruned = vanilla(out)
    masked = _masked(model, family, heads={layer: _heads_of_groups(family, model, layer, [layer % 2]) for layer in layers})
    _assert_masking_matters(masked, model)
    _assert_logits(pruned, masked)
    _assert_logits(in_memory, masked)
    streamed = dict(pruned.state_dict())
    assert all(torch.equal(streamed[k], v) for k, v in in_memory.state_dict().items())
    layer = layers[0]
    attention = family_layout(family).attention
    tensors = all_tensors(out)
    kept_rows = slice(8 * (1 - layer % 2), 8 * (2 - layer % 2))
    k_name = f"{layer_prefix(layer)}self_attn.{attention.k}.weight"
    assert torch.equal(tensors[k_name], all_tensors(source)[k_name][kept_rows])
    if family == "gpt_oss":  # attention sinks and the q/k/v/o biases follow their heads
        sinks = f"{layer_prefix(layer)}self_attn.sinks"
        kept = [h for h in range(4) if h // 2 != layer % 2]
        assert torch.equal(tensors[sinks], all_tensors(source)[sinks][kept])
        assert tensors[f"{layer_prefix(layer)}self_attn.o_proj.bias"].shape == (32,)
        assert tensors[f"{layer_prefix(layer)}self_attn.q_proj.bias"].shape == (16,)


def test_non_uniform_heads_load_with_moeprune_and_equal_masked(tiny_checkpoint, tmp_path):
    family = "qwen3_moe"
    source = tiny_checkpoint(family)
    model = vanilla(source)
    # layer 0: one KV group goes; layer 1: untouched; layer 2: one query head of each group (heads 1, 3)
    plan = _plan(family, {0: [DropAttentionHeads(kv_groups=(0,))], 2: [DropAttentionHeads(heads=(1, 3))]})
    out, in_memory = _prune_both(source, plan, tmp_path / "out", family)
    config = json.loads((out / "config.json").read_text())
    assert config["moeprune"]["attention_heads"] == {"0": [2, 1], "2": [2, 2]}
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)  # the stock keys stay
    _vanilla_fails(out)
    loaded = moeprune.load(out)
    masked = _masked(model, family, heads={0: [0, 1], 2: [1, 3]})
    _assert_masking_matters(masked, model)
    _assert_logits(loaded, masked)
    _assert_logits(in_memory, masked)
    assert loaded.model.layers[2].self_attn.num_key_value_groups == 1
    for facts in (model_facts(family, loaded), model_facts(family, read_config(out))):  # the section's shapes
        assert [(f.attention.heads, f.attention.kv_heads) for f in facts.values()] == [(2, 1), (4, 2), (2, 2)]


def test_heads_bad_input_refused_before_writing(tiny_checkpoint, tmp_path):
    cases = [
        ("mixtral", {1: [DropAttentionHeads(heads=(0, 1, 2, 3))]}, "drops every head"),
        ("mixtral", {1: [DropAttentionHeads(kv_groups=(2,))]}, r"kv_groups has indices \[2\] out of range"),
        ("mixtral", {1: [DropAttentionHeads(heads=(0,))]}, "same number in every group"),
        ("deepseek_v3", {1: [DropAttentionHeads(kv_groups=(1,))]}, "multi-head latent attention"),
        ("olmoe", {1: [DropAttentionHeads(kv_groups=(1,))]}, "across heads"),
        ("granitemoehybrid", {0: [DropAttentionHeads(kv_groups=(1,))]}, "layer 0 .* has no self-attention"),
        ("afmoe", {1: [DropAttentionHeads(kv_groups=(1,))]}, r"afmoe.toml has no \[attention\] keys"),
        ("mixtral", {1: [SliceChannels("dense_mlp", (0,))]}, r"mixtral.toml has no \[dense_mlp\] keys"),
        ("deepseek_v3", {1: [SliceChannels("dense_mlp", (0,))]}, "layer 1 .* has no dense MLP"),
        ("deepseek_v3", {0: [SliceChannels("dense_mlp", (0, 24))]}, r"channels 0..23; the plan keeps \[24\]"),
        ("jamba", {2: [DropLayer()]}, "would not load as pruned"),  # Mamba, attention, attention: no period says so
    ]
    for family, actions, message in cases:
        out = tmp_path / family
        with pytest.raises(PlanError, match=message):
            api.apply(tiny_checkpoint(family), _plan(family, actions), out, progress=False)
        assert not out.exists()
    assert list(tmp_path.iterdir()) == []


# -- channels ------------------------------------------------------------------------------------------


def test_uniform_shared_expert_channels_are_vanilla_and_keep_the_gate(tiny_checkpoint, tmp_path):
    family = "qwen2_moe"
    source = tiny_checkpoint(family)
    model = vanilla(source)
    kept = {layer: tuple(c for c in range(24) if (c + layer) % 3) for layer in range(3)}  # 16 of 24 each
    plan = _plan(family, {layer: [SliceChannels("shared_experts", k)] for layer, k in kept.items()})
    out, in_memory = _prune_both(source, plan, tmp_path / "out", family)
    config = json.loads((out / "config.json").read_text())
    assert config["shared_expert_intermediate_size"] == 16 and config["intermediate_size"] == 24
    before, after = all_tensors(source), all_tensors(out)
    gate = "model.layers.1.mlp.shared_expert_gate.weight"
    assert torch.equal(after[gate], before[gate])
    down = "model.layers.1.mlp.shared_expert.down_proj.weight"
    assert torch.equal(after[down], before[down][:, list(kept[1])])
    removed = {(layer, "shared_experts"): [c for c in range(24) if c not in k] for layer, k in kept.items()}
    masked = _masked(model, family, channels=removed)
    _assert_masking_matters(masked, model)
    _assert_logits(vanilla(out), masked)
    _assert_logits(in_memory, masked)


def test_deepseek_dense_and_shared_channels(tiny_checkpoint, tmp_path):
    """DeepSeek-V3: the dense first layer's width is a stock key (vanilla); the shared experts' width is
    moe_intermediate_size x n_shared_experts, so it goes to the moeprune section (moeprune.load)."""
    family = "deepseek_v3"
    source = tiny_checkpoint(family)
    model = vanilla(source)
    dense_kept = tuple(range(0, 24, 2))
    vanilla_plan = _plan(family, {0: [SliceChannels("dense_mlp", dense_kept)]})
    out, in_memory = _prune_both(source, vanilla_plan, tmp_path / "dense", family)
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == 12 and config["moe_intermediate_size"] == 16 and "moeprune" not in config
    masked = _masked(model, family, channels={(0, "dense_mlp"): [c for c in range(24) if c not in dense_kept]})
    _assert_masking_matters(masked, model)
    _assert_logits(vanilla(out), masked)
    _assert_logits(in_memory, masked)

    shared_kept = {1: (0, 1, 2, 5, 8), 2: tuple(range(12))}
    plan = _plan(family, {layer: [SliceChannels("shared_experts", k)] for layer, k in shared_kept.items()})
    out, in_memory = _prune_both(source, plan, tmp_path / "shared", family)
    config = json.loads((out / "config.json").read_text())
    assert config["moeprune"]["shared_widths"] == {"1": 5, "2": 12}
    _vanilla_fails(out)
    masked = _masked(model, family, channels={(layer, "shared_experts"): [c for c in range(16) if c not in k]
                                              for layer, k in shared_kept.items()})
    _assert_masking_matters(masked, model)
    _assert_logits(moeprune.load(out), masked)
    _assert_logits(in_memory, masked)


# -- layers --------------------------------------------------------------------------------------------


def test_layer_drop_renumbers_tensors_and_layer_types(tiny_checkpoint, tmp_path):
    """Qwen3-Next (hybrid: linear attention, full attention, linear attention): dropping layer 0
    renames layers 1, 2 to 0, 1 and drops the first layer_types entry (checked by hand)."""
    family = "qwen3_next"
    source = tiny_checkpoint(family)
    model = vanilla(source)
    out, in_memory = _prune_both(source, _plan(family, {0: [DropLayer()]}), tmp_path / "out", family)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert config["layer_types"] == ["full_attention", "linear_attention"]
    before, after = all_tensors(source), all_tensors(out)
    for name, tensor in after.items():
        original = name.replace("model.layers.1.", "model.layers.2.").replace("model.layers.0.", "model.layers.1.")
        assert torch.equal(tensor, before[original]), name
    assert len(after) == len(before) - sum(1 for n in before if n.startswith("model.layers.0."))
    masked = _masked(model, family, dropped=(0,))
    _assert_masking_matters(masked, model)
    pruned = vanilla(out)
    _assert_logits(pruned, masked)
    _assert_logits(in_memory, masked)
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers if hasattr(layer, "self_attn")] == [0]
    assert in_memory.model.layers[0].self_attn.layer_idx == 0


def test_layer_drop_keeps_dense_layers_and_renumbers_expert_actions(tiny_checkpoint, tmp_path):
    """DeepSeek-V3: drop the dense first layer (first_k_dense_replace 1 -> 0) and keep 8 of 16 experts
    in layer 2 (original numbering), which becomes layer 1."""
    family = "deepseek_v3"
    source = tiny_checkpoint(family)
    kept = [0, 1, 4, 5, 8, 9, 12, 13]
    plan = _plan(family, {0: [DropLayer()]}, layers={1: kept, 2: kept})
    out, in_memory = _prune_both(source, plan, tmp_path / "out", family)
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["first_k_dense_replace"], config["n_routed_experts"]) == (2, 0, 8)
    after = all_tensors(out)
    assert "model.layers.2.mlp.gate.weight" not in after
    assert torch.equal(after["model.layers.1.mlp.gate.weight"], all_tensors(source)["model.layers.2.mlp.gate.weight"][kept])
    reference = apply_plan_in_memory(vanilla(source), _plan(family, {}, layers={1: kept, 2: kept}))
    masked = _masked(reference, family, dropped=(0,))
    _assert_masking_matters(masked, reference)
    _assert_logits(vanilla(out), masked)
    _assert_logits(in_memory, masked)


def test_layer_drop_sliding_window_and_sparse_step(tiny_checkpoint, tmp_path):
    """GPT-OSS: layer_types (sliding/full) lose the dropped entry. Qwen2-MoE with decoder_sparse_step 2
    (MoE at layer 1 only): dropping layer 0 writes the dense layers explicitly (mlp_only_layers)."""
    source = tiny_checkpoint("gpt_oss")
    model = vanilla(source)
    out, _ = _prune_both(source, _plan("gpt_oss", {1: [DropLayer()]}), tmp_path / "gpt_oss", "gpt_oss")
    config = json.loads((out / "config.json").read_text())
    assert config["layer_types"] == ["sliding_attention", "sliding_attention"]
    masked = _masked(model, "gpt_oss", dropped=(1,))
    _assert_masking_matters(masked, model)
    _assert_logits(vanilla(out), masked)

    source = tiny_checkpoint("qwen2_moe", decoder_sparse_step=2)
    model = vanilla(source)
    plan = Plan(layers={}, method="manual", actions={0: [DropLayer()]})
    out, in_memory = _prune_both(source, plan, tmp_path / "qwen2_moe", "qwen2_moe")
    config = json.loads((out / "config.json").read_text())
    assert (config["decoder_sparse_step"], config["mlp_only_layers"], config["num_hidden_layers"]) == (1, [1], 2)
    masked = _masked(model, "qwen2_moe", dropped=(0,))
    _assert_masking_matters(masked, model)
    _assert_logits(vanilla(out), masked)
    _assert_logits(in_memory, masked)


def test_combined_non_uniform_plan_with_layer_drop_loads(tiny_checkpoint, tmp_path):
    """Heads, shared channels and a layer drop in one plan: the section's layers are renumbered."""
    family = "qwen2_moe"
    source = tiny_checkpoint(family)
    model = vanilla(source)
    plan = _plan(family, {0: [DropLayer()], 2: [DropAttentionHeads(kv_groups=(1,)), SliceChannels("shared_experts", (1, 4, 7))]})
    out, in_memory = _prune_both(source, plan, tmp_path / "out", family)
    config = json.loads((out / "config.json").read_text())
    assert config["moeprune"]["attention_heads"] == {"1": [2, 1]}
    assert config["moeprune"]["shared_widths"] == {"1": 3}
    masked = _masked(model, family, heads={2: [2, 3]}, channels={(2, "shared_experts"): [c for c in range(24) if c not in (1, 4, 7)]},
                     dropped=(0,))
    _assert_masking_matters(masked, model)
    _assert_logits(moeprune.load(out), masked)
    _assert_logits(in_memory, masked)


def test_apply_keeps_experts_around_a_dropped_moe_layer(tiny_checkpoint, tmp_path):
    """Mixtral: keep 4 experts in layers 0 and 2 and drop layer 1 (its experts need no listing)."""
    source = tiny_checkpoint("mixtral")
    kept = [0, 2, 5, 7]
    plan = _plan("mixtral", {1: [DropLayer()]}, layers={0: kept, 2: kept})
    out = api.apply(source, plan, tmp_path / "out", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_local_experts"]) == (2, 4)
    reference = apply_plan_in_memory(vanilla(source), _plan("mixtral", {}, layers={0: kept, 1: kept, 2: kept}))
    masked = _masked(reference, "mixtral", dropped=(1,))
    _assert_masking_matters(masked, reference)
    _assert_logits(vanilla(out), masked)


def test_cli_apply_of_a_hand_written_dense_plan(tiny_checkpoint, tmp_path, capsys):
    source = tiny_checkpoint("mixtral")
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({
        "format_version": 2, "method": "manual", "family": "mixtral",
        "actions": {str(layer): [{"op": "drop_attention_heads", "kv_groups": [1]}] for layer in range(3)},
    }))
    out = tmp_path / "out"
    assert cli.main(["-q", "apply", str(source), "--plan", str(plan_file), "--out", str(out)]) == 0
    model = vanilla(source)
    masked = _masked(model, "mixtral", heads={layer: [2, 3] for layer in range(3)})
    _assert_masking_matters(masked, model)
    _assert_logits(vanilla(out), masked)


# -- units -------------------------------------------------------------------------------------------


def test_units_and_their_parameter_counts(tiny_checkpoint):
    """Hand-computed: hidden 32, 4 heads of 8, 2 KV heads; a KV group is 2 query heads (q rows 16,
    o columns 16) and 8 k rows + 8 v rows: (16 + 16) * 32 + 16 * 32 = 1536 (half the attention);
    GPT-OSS adds q/k/v biases (16 + 8 + 8) and 2 sinks; a channel is 3 * 32."""
    family = known_families()["gpt_oss"]
    model = vanilla(tiny_checkpoint("gpt_oss"))
    facts = model_facts(family, model)
    unit = kv_group_unit(family, facts[1], 1)
    by_name = {piece.ref.split(".", 3)[3]: (piece.dim, piece.index) for piece in unit.slices}
    assert by_name["self_attn.q_proj.weight"] == (0, tuple(range(16, 32)))
    assert by_name["self_attn.k_proj.weight"] == (0, tuple(range(8, 16)))
    assert by_name["self_attn.o_proj.weight"] == (1, tuple(range(16, 32)))
    assert by_name["self_attn.sinks"] == (0, (2, 3))
    assert "self_attn.o_proj.bias" not in by_name
    counts = unit_parameters(family, facts)
    assert unit_parameters(family, model) == counts
    assert counts[1].kv_group == 1536 + 16 + 8 + 8 + 2 and counts[1].dense_channel == 0
    attention = model.model.layers[1].self_attn
    assert 2 * counts[1].kv_group == sum(p.numel() for n, p in attention.named_parameters() if not n.startswith("o_proj.bias"))
    assert counts[1].layer == sum(p.numel() for p in model.model.layers[1].parameters())

    deepseek = family_for_model_type("deepseek_v3")
    ds_facts = model_facts(deepseek, vanilla(tiny_checkpoint("deepseek_v3")))
    ds_counts = unit_parameters(deepseek, ds_facts)
    assert (ds_counts[0].dense_channel, ds_counts[0].shared_channel, ds_counts[0].kv_group) == (96, 0, 0)
    assert ds_counts[1].shared_channel == 96
    assert [p.index for p in channel_unit(deepseek, ds_facts[0], "dense_mlp", 5).slices] == [(5,), (5,), (5,)]
    with pytest.raises(PlanError, match="multi-head latent attention"):
        kv_group_unit(deepseek, ds_facts[1], 0)


def test_output_bias_compensation_is_summed_or_created(tiny_checkpoint, tmp_path):
    """FLAP's bias compensation: GPT-OSS's o_proj has a bias (summed into it, vanilla output);
    Qwen3-MoE's o_proj and DeepSeek's dense down_proj have none (created, moeprune section). The
    reference is the masked model plus the bias added to that projection's output."""
    cases = [("gpt_oss", 1, DropAttentionHeads(kv_groups=(0,), output_bias=tuple(0.01 * i for i in range(32))),
              "self_attn.o_proj", dict(heads={1: [0, 1]})),
             ("qwen3_moe", 2, DropAttentionHeads(kv_groups=(1,), output_bias=tuple(-0.02 * i for i in range(32))),
              "self_attn.o_proj", dict(heads={2: [2, 3]})),
             ("deepseek_v3", 0, SliceChannels("dense_mlp", tuple(range(12)), output_bias=tuple(0.03 for _ in range(32))),
              "mlp.down_proj", dict(channels={(0, "dense_mlp"): list(range(12, 24))}))]
    for family, layer, action, path, mask in cases:
        source = tiny_checkpoint(family)
        model = vanilla(source)
        actions = {layer: [action]}
        if family == "gpt_oss":  # uniform heads: the other layers lose the same group (vanilla config)
            actions.update({other: [DropAttentionHeads(kv_groups=(0,))] for other in (0, 2)})
            mask = dict(heads={other: [0, 1] for other in (0, 1, 2)})
        plan = _plan(family, actions)
        out, in_memory = _prune_both(source, plan, tmp_path / family, family)
        config = json.loads((out / "config.json").read_text())
        masked = _masked(model, family, **mask)
        linear = masked.get_submodule(f"{layer_prefix(layer)}{path}")
        with torch.no_grad():
            bias = torch.tensor(action.output_bias, dtype=torch.float64)
            if linear.bias is None:
                linear.bias = torch.nn.Parameter(bias.float())
            else:
                linear.bias.copy_((linear.bias.double() + bias).float())
        _assert_masking_matters(masked, model)
        if family == "gpt_oss":
            assert "moeprune" not in config
            loaded = vanilla(out)
        else:
            assert config["moeprune"]["output_biases"] == {str(layer): [path]}
            loaded = moeprune.load(out)
            if family == "deepseek_v3":  # uniform width: vanilla loads, reporting the new bias as unexpected
                from transformers import AutoModelForCausalLM

                _, info = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True, output_loading_info=True)
                assert f"{layer_prefix(layer)}{path}.bias" in info["unexpected_keys"]
            else:
                _vanilla_fails(out)
        _assert_logits(loaded, masked)
        _assert_logits(in_memory, masked)
    assert Plan.from_json(_plan("mixtral", {1: [cases[0][2]]}).to_json()).actions[1][0] == cases[0][2]


def test_bf16_checkpoint_stays_bf16_with_a_new_bias(tiny_checkpoint, tmp_path):
    source = tmp_path / "bf16"
    vanilla(tiny_checkpoint("qwen3_moe")).to(torch.bfloat16).save_pretrained(source)
    plan = _plan("qwen3_moe", {layer: [DropAttentionHeads(kv_groups=(0,), output_bias=(0.5,) * 32)] for layer in range(3)})
    out = write_pruned_checkpoint(source, plan, tmp_path / "out", progress=False)
    tensors = all_tensors(out)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert torch.equal(tensors["model.layers.1.self_attn.o_proj.bias"], torch.full((32,), 0.5, dtype=torch.bfloat16))


@pytest.mark.parametrize("family", ["exaone_moe", "granitemoe_swa", "minimax", "mimo_v2_flash", "glm4_moe_lite",
                                    "granitemoehybrid", "jamba"])
def test_layer_drop_keeps_per_layer_config_lists_consistent(family, tiny_checkpoint, tmp_path):
    """Families whose config lists something per layer (layer_types, mlp_layer_types, layer_rope_theta,
    first_k_dense_replace): drop layer 0; every list keeps the kept layers' entries, in order."""
    source = tiny_checkpoint(family)
    model = vanilla(source)
    out, in_memory = _prune_both(source, _plan(family, {0: [DropLayer()]}), tmp_path / "out", family)
    before = json.loads((source / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == before["num_hidden_layers"] - 1
    for key in ("layer_types", "mlp_layer_types", "layer_rope_theta"):
        if isinstance(before.get(key), list):
            assert config[key] == before[key][1:], key
    if family == "jamba":  # Mamba/attention and dense/MoE alternate from layer 1: now from layer 0
        assert [config[k] for k in ("attn_layer_period", "attn_layer_offset", "expert_layer_period", "expert_layer_offset")] == [2, 0, 2, 0]
    masked = _masked(model, family, dropped=(0,))
    _assert_masking_matters(masked, model)
    _assert_logits(vanilla(out), masked)
    _assert_logits(in_memory, masked)


def test_minimax_uniform_heads_go_to_the_section(tiny_checkpoint, tmp_path):
    """MiniMax's lightning-attention layers read num_attention_heads too: even a uniform head drop in
    its softmax-attention layers cannot change the stock key, so the moeprune section records it."""
    family = "minimax"
    source = tiny_checkpoint(family)
    model = vanilla(source)
    plan = _plan(family, {layer: [DropAttentionHeads(kv_groups=(1,))] for layer in (0, 2)})
    out, in_memory = _prune_both(source, plan, tmp_path / "out", family)
    config = json.loads((out / "config.json").read_text())
    assert config["num_attention_heads"] == 4 and config["moeprune"]["attention_heads"] == {"0": [2, 1], "2": [2, 1]}
    masked = _masked(model, family, heads={0: [2, 3], 2: [2, 3]})
    _assert_masking_matters(masked, model)
    _assert_logits(moeprune.load(out), masked)
    _assert_logits(in_memory, masked)


@pytest.mark.parametrize("family, layer", [("mixtral", 1), ("gpt_oss", 0), ("qwen2_moe", 1), ("deepseek_v3", 0),
                                           ("deepseek_v3", 1)])
def test_transform_mlp_output_folds_into_every_down_projection(family, layer, tiny_checkpoint, tmp_path):
    """ReplaceMe's fold: the pruned model equals the original with the layer's feed-forward output
    (routed experts, shared expert behind its gate, dense MLP; GPT-OSS's expert down biases too)
    multiplied by M; combined with keeping experts in that layer and dropping the next one."""
    source = tiny_checkpoint(family)
    generator = torch.Generator().manual_seed(3)
    # float32 values: the plan stores the matrix in float32
    matrix = (torch.eye(32, dtype=torch.float64) + 0.2 * torch.randn(32, 32, generator=generator, dtype=torch.float64)).float().double()
    model = vanilla(source)
    facts = model_facts(family, model)
    keep = {} if family == "deepseek_v3" else {  # (DeepSeek-V3's group-limited routing: keep every expert)
        other: [e for e in range(fact.experts) if e % 4 != 1] for other, fact in facts.items() if fact.experts and other != layer + 1}
    plan = _plan(family, {layer: [TransformMlpOutput(matrix.float())], layer + 1: [DropLayer()]},
                 layers=keep)
    out, in_memory = _prune_both(source, plan, tmp_path / "out", family)
    reference = apply_plan_in_memory(vanilla(source), _plan(family, {}, layers=keep)) if keep else copy.deepcopy(model)
    layout = family_layout(family)
    block = layout.dense_mlp.module if facts[layer].dense_width else layout.experts_module.rpartition(".")[0]

    def transform(module, args, output):
        first = output[0] if isinstance(output, tuple) else output
        first = (first.double() @ matrix.T).to(first.dtype)
        return (first, *output[1:]) if isinstance(output, tuple) else first

    reference.get_submodule(layer_prefix(layer) + block).register_forward_hook(transform)
    masked = _masked(reference, family, dropped=(layer + 1,))
    _assert_masking_matters(masked, model)
    loaded = vanilla(out)
    _assert_logits(loaded, masked)
    _assert_logits(in_memory, masked)


def test_transform_mlp_output_json_and_refusals(tiny_checkpoint, tmp_path):
    action = TransformMlpOutput(torch.tensor([[1.0, 0.5], [0.0, 2.0]]))
    plan = _plan("mixtral", {0: [action]})
    again = Plan.from_json(json.loads(json.dumps(plan.to_json()))).actions[0][0]
    assert isinstance(again, TransformMlpOutput) and torch.equal(again.matrix, action.matrix)
    with pytest.raises(PlanError, match="must be a square"):
        Plan.from_json({"method": "m", "actions": {"0": [TransformMlpOutput(torch.ones(1, 2)).to_json()]}})
    damaged = action.to_json()
    damaged["matrix"]["sha256"] = "0" * 64
    with pytest.raises(PlanError, match="damaged"):
        Plan.from_json({"method": "m", "actions": {"0": [damaged]}})
    with pytest.raises(PlanError, match="matrix must be a JSON object"):
        Plan.from_json({"method": "m", "actions": {"0": [{"op": "transform_mlp_output", "matrix": [[1.0, 2.0]]}]}})
    for family, matrix, message in (("mixtral", action.matrix, r"the matrix is \(2, 2\); the hidden size is 32"),
                                    ("granitemoeshared", torch.eye(32), r"no \[shared_channels\] keys")):
        with pytest.raises(PlanError, match=message):
            api.apply(tiny_checkpoint(family), _plan(family, {1: [TransformMlpOutput(matrix)]}), tmp_path / family,
                      progress=False)
    assert list(tmp_path.iterdir()) == []


def test_periodic_pattern_by_hand():
    from moeprune.ops.dense import periodic_pattern

    assert periodic_pattern([True, False, True, False]) == (2, 0)
    assert periodic_pattern([False, True, False, True]) == (2, 1)
    assert periodic_pattern([True, True, True]) == (1, 0)
    assert periodic_pattern([False, False]) == (3, 2)  # no layer has the feature
    assert periodic_pattern([False, False, True]) == (3, 2)
    assert periodic_pattern([False, True, True]) is None
