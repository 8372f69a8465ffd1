"""Layout, coupled units, tensor recipes and their two executors (issue 10, sections 2 and 3).

* FusedFormat split/join against hand-built blocks (halves/interleaved x transposed, biases);
* the neuron unit on GPT-OSS (interleaved, transposed, biases), hand-located and checked on the
  experts forward;
* every recipe kind evaluated from the checkpoint (streaming source) == from the loaded model
  (in-memory source) == the hand-written torch expression;
* whole edits: streaming writer == in-memory executor, and the written checkpoint loads in vanilla
  transformers with no missing/unexpected keys (keep-experts on every family; hand-built edits
  using every recipe kind on a per-expert and a fused family).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from conftest import check_expert_counts_in_config, load_output, vanilla
from moeprune import api
from moeprune.apply import apply_plan_in_memory
from moeprune.arch import family_for_model_type, known_families, read_config, text_model
from moeprune.errors import PlanError
from moeprune.io.checkpoint import LazyCheckpoint
from moeprune.layout import CheckpointLayout, FusedFormat, PerExpertFormat, family_layout, model_expert
from moeprune.ops import Concat, Edit, ExpertRef, NewTensor, Select, Take, WeightedSum, apply_edit
from moeprune.ops.edit import CheckpointSource, ModelSource
from moeprune.plan import Plan
from moeprune.units import BlockEntry, expert_unit, kv_group_unit, layer_unit, locate_in_block, model_facts, neuron_unit
from moeprune.write import write_edit, write_pruned_checkpoint


def _vanilla(path):
    """A clean vanilla load (a multimodal wrapper with its own class, towers included: conftest.vanilla)."""
    return vanilla(path)


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            out.update({key: handle.get_tensor(key) for key in handle.keys()})
    return out


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


# --------------------------------------------------------------------------------------------------
# layout


def test_fused_format_split_and_join_by_hand():
    # one expert, I = 2 neurons, H = 3: gate rows g0, g1; up rows u0, u1; down [3, 2]
    gate = torch.tensor([[1.0, 2, 3], [4, 5, 6]])
    up = torch.tensor([[7.0, 8, 9], [10, 11, 12]])
    down = torch.tensor([[1.0, 2], [3, 4], [5, 6]])
    expert = {"gate": gate, "up": up, "down": down,
              "gate_bias": torch.tensor([0.1, 0.2]), "up_bias": torch.tensor([0.3, 0.4]), "down_bias": torch.tensor([9.0, 8, 7])}
    halves = FusedFormat()
    block = halves.join([expert])
    assert torch.equal(block["gate_up_proj"][0], torch.tensor([[1.0, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]))
    assert torch.equal(block["down_proj"][0], down)
    gpt = FusedFormat(gate_up_layout="interleaved", transposed=True, gate_up_bias="gate_up_proj_bias", down_bias="down_proj_bias")
    block = gpt.join([expert, expert])
    # [E, H, 2I]: column 2k is gate neuron k, column 2k+1 up neuron k
    assert block["gate_up_proj"].shape == (2, 3, 4)
    assert torch.equal(block["gate_up_proj"][1], torch.tensor([[1.0, 7, 4, 10], [2, 8, 5, 11], [3, 9, 6, 12]]))
    assert torch.equal(block["down_proj"][0], down.T)
    assert torch.equal(block["gate_up_proj_bias"][0], torch.tensor([0.1, 0.3, 0.2, 0.4]))
    assert torch.equal(block["down_proj_bias"][1], torch.tensor([9.0, 8, 7]))
    for fmt, names in ((gpt, gpt.names), (FusedFormat(gate_up_layout="interleaved"), ("gate_up_proj", "down_proj")),
                       (FusedFormat(transposed=True), ("gate_up_proj", "down_proj"))):
        joined = fmt.join([expert])
        back = fmt.split({name: joined[name][0] for name in names})
        assert back.keys() == set(fmt.projections)
        assert all(torch.equal(back[p], expert[p]) for p in back)
        assert fmt.block_shape(fmt.gate_up, 1, 2, 3) == tuple(joined[fmt.gate_up].shape)
        assert fmt.block_shape(fmt.down, 1, 2, 3) == tuple(joined[fmt.down].shape)
        slots = {name: torch.zeros((2, *joined[name].shape[1:])) for name in names}
        fmt.fill(slots, 1, expert)  # writes through the views split() returns
        assert all(torch.equal(slots[name][1], joined[name][0]) and not slots[name][0].any() for name in names)


def test_per_expert_names_and_memory_names():
    mixtral = family_layout("mixtral")
    assert isinstance(mixtral.disk, PerExpertFormat)
    assert mixtral.expert_file(3, 5, "up") == "model.layers.3.block_sparse_moe.experts.5.w3.weight"
    assert mixtral.disk.parse(3, "model.layers.3.block_sparse_moe.experts.12.w2.weight") == (12, "down")
    assert mixtral.disk.parse(3, "model.layers.3.block_sparse_moe.experts.12.w9.weight") is None
    assert mixtral.disk.parse(3, "model.layers.3.block_sparse_moe.gate.weight") is None
    assert mixtral.disk.parse(13, "model.layers.3.block_sparse_moe.experts.1.w1.weight") is None
    assert mixtral.memory_name("model.layers.3.block_sparse_moe.gate.weight") == "model.layers.3.mlp.gate.weight"
    assert mixtral.memory_name("model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert mixtral.router_keys(2) == ["model.layers.2.block_sparse_moe.gate.weight"]
    gpt = family_layout("gpt_oss")
    assert gpt.fused_keys(1) == ["model.layers.1.mlp.experts." + n for n in
                                 ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")]
    assert gpt.projections == ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")
    assert family_layout("qwen2_moe").shared_expert_prefixes(2) == ["model.layers.2.mlp.shared_expert."]
    assert family_layout("deepseek_v3").shared_expert_prefixes(1) == ["model.layers.1.mlp.shared_experts."]


def test_checkpoint_layout_classifies_and_counts(family_checkpoint):
    family, checkpoint = family_checkpoint
    info = api.model_info(checkpoint)
    reader = LazyCheckpoint(checkpoint)
    layout = CheckpointLayout.build(info.family, reader, info.geometry.moe_layers)
    owned = [name for entry in layout.layers.values() for name in entry.router + entry.id_tables + entry.expert_keys]
    assert sorted(owned + layout.others) == reader.keys() and len(set(owned)) == len(owned)
    expert_bytes = 0
    for layer in info.geometry.moe_layers:
        assert layout.num_experts(layer) == info.geometry.experts_in(layer) == info.geometry.num_experts
        assert layout.expert_width(layer, 0) == info.geometry.width_of(layer, 0) == info.geometry.expert_width
        expert_bytes += sum(reader.nbytes(name) for name in layout.layers[layer].expert_keys)
    assert api.inspect(checkpoint)["routed_expert_bytes"] == expert_bytes > 0
    model = text_model(_vanilla(checkpoint))  # a multimodal wrapper: its text decoder
    for layer in info.geometry.moe_layers:  # canonical experts read from disk == from the loaded model
        for expert in (0, info.geometry.num_experts - 1):
            in_memory = model_expert(model, info.family, layer, expert)
            assert in_memory.keys() == set(layout.family.projections)
            for proj, tensor in in_memory.items():
                assert torch.equal(layout.read_expert(layer, expert, proj), tensor), (layer, expert, proj)


# --------------------------------------------------------------------------------------------------
# units


def test_gpt_oss_neuron_unit_by_hand(tiny_checkpoint):
    model = _vanilla(tiny_checkpoint("gpt_oss"))
    family = family_for_model_type("gpt_oss")
    layer, j, k = 1, 3, 5
    experts = model.model.layers[layer].mlp.experts
    width = experts.down_proj.shape[1]
    fmt = family.layout.memory
    located = [locate_in_block(fmt, piece, width) for piece in neuron_unit(family, layer, j, k).slices]
    assert located == [  # gate column 2k, up column 2k+1 of [E, H, 2I]; down row k of [E, I, H]; bias entries
        BlockEntry("gate_up_proj", j, 2, (2 * k,)),
        BlockEntry("gate_up_proj", j, 2, (2 * k + 1,)),
        BlockEntry("down_proj", j, 1, (k,)),
        BlockEntry("gate_up_proj_bias", j, 1, (2 * k,)),
        BlockEntry("gate_up_proj_bias", j, 1, (2 * k + 1,)),
    ]
    canonical = model_expert(model, family, layer, j)
    assert torch.equal(experts.gate_up_proj[j, :, 2 * k], canonical["gate"][k])
    assert torch.equal(experts.gate_up_proj[j, :, 2 * k + 1], canonical["up"][k])
    assert torch.equal(experts.down_proj[j, k, :], canonical["down"][:, k])
    assert torch.equal(experts.gate_up_proj_bias[j, 2 * k : 2 * k + 2], torch.stack([canonical["gate_bias"][k], canonical["up_bias"][k]]))

    # zeroing the unit in the block == the expert computed by hand without neuron k
    x = torch.randn(4, experts.gate_up_proj.shape[1], generator=torch.Generator().manual_seed(0))
    index, weight = torch.full((4, 1), j), torch.ones(4, 1)
    with torch.no_grad():
        full = experts(x, index, weight)
        for entry in located:
            tensor = getattr(experts, entry.tensor)
            tensor[entry.expert].index_fill_(entry.axis - 1, torch.tensor(entry.positions), 0.0)
        zeroed = experts(x, index, weight)
        keep = torch.tensor([n for n in range(width) if n != k])
        c = {p: t.index_select(0 if p != "down" else 1, keep) if p != "down_bias" else t for p, t in canonical.items()}
        gate = (x @ c["gate"].T + c["gate_bias"]).clamp(max=experts.limit)
        up = (x @ c["up"].T + c["up_bias"]).clamp(-experts.limit, experts.limit)
        by_hand = ((up + 1) * gate * torch.sigmoid(gate * experts.alpha)) @ c["down"].T + c["down_bias"]
    torch.testing.assert_close(zeroed, by_hand, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(full, zeroed)


def test_expert_kv_and_layer_units(tiny_checkpoint):
    family = known_families()["deepseek_v3"]
    unit = expert_unit(family, 2, 7)
    assert [s.ref for s in unit.slices] == [ExpertRef(2, 7, p) for p in ("gate", "up", "down")] + [
        "model.layers.2.mlp.gate.weight", "model.layers.2.mlp.gate.e_score_correction_bias"]
    assert all(s.dim == 0 and s.index == (7,) for s in unit.slices[3:])
    with pytest.raises(PlanError, match="multi-head latent attention"):  # MLA: no KV-group unit (tests/test_dense_ops.py)
        kv_group_unit(family, model_facts(family, read_config(tiny_checkpoint("deepseek_v3")))[1], 0)
    reader = LazyCheckpoint(tiny_checkpoint("deepseek_v3"))
    layout = CheckpointLayout.build(family, reader, [1, 2])
    names = [s.ref for s in layer_unit(layout, 2).slices]
    assert names == [n for n in reader.keys() if n.startswith("model.layers.2.")]


# --------------------------------------------------------------------------------------------------
# recipes: every kind, streaming source == in-memory source == hand expression

Q = "model.layers.0.self_attn.q_proj.weight"
O = "model.layers.0.self_attn.o_proj.weight"


def _recipe_cases(layer: int, num: int):
    perm = list(reversed(range(16)))
    gate0, gate1, down1 = ExpertRef(layer, 0, "gate"), ExpertRef(layer, 1, "gate"), ExpertRef(layer, 1, "down")
    return {
        "select_rows": (Select(Take(Q), 0, (5, 1, 1)), lambda t: t[Q][[5, 1, 1]]),
        "select_columns": (Select(Take(O), 1, (0, 7, 3)), lambda t: t[O][:, [0, 7, 3]]),
        "permuted_select": (Select(Take(gate0), 0, perm), lambda t: t[gate0][perm]),
        "weighted_sum_with_permutations": (
            WeightedSum(((0.25, Select(Take(gate0), 0, perm)), (0.75, Take(gate1)))),
            lambda t: (0.25 * t[gate0].double()[perm] + 0.75 * t[gate1].double()).float()),
        "weighted_sum_columns": (
            WeightedSum(((2.0, Select(Take(down1), 1, perm)), (-1.0, Take(down1)))),
            lambda t: (2.0 * t[down1].double()[:, perm] - t[down1].double()).float()),
        "concat": (Concat((Select(Take(Q), 0, (3, 4)), Take(O)), 0), lambda t: torch.cat([t[Q][[3, 4]], t[O]])),
        "router_rows": (Select(Take(f"model.layers.{layer}.mlp.gate.weight"), 0, tuple(range(num - 1, -1, -2))),
                        lambda t: t[f"model.layers.{layer}.mlp.gate.weight"][list(range(num - 1, -1, -2))]),
        "new_tensor": (NewTensor(torch.arange(6.0).reshape(2, 3)), lambda t: torch.arange(6.0).reshape(2, 3)),
    }


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_every_recipe_kind_streaming_equals_in_memory(family, tiny_checkpoint):
    checkpoint = tiny_checkpoint(family)
    info = api.model_info(checkpoint)
    layer = info.geometry.moe_layers[0]
    model = _vanilla(checkpoint)
    layout = CheckpointLayout.build(info.family, LazyCheckpoint(checkpoint), info.geometry.moe_layers)
    disk, memory = CheckpointSource(layout), ModelSource(model, info.family)
    cases = _recipe_cases(layer, info.geometry.num_experts)
    if family == "gpt_oss":
        cases = {name: case for name, case in cases.items() if name != "router_rows"}
    for name, (recipe, by_hand) in cases.items():
        refs = set(recipe.refs())
        sources = {ref: disk.read(ref).clone() for ref in refs}
        streamed, in_memory = recipe.evaluate(disk), recipe.evaluate(memory)
        layout.forget()
        assert streamed.dtype == in_memory.dtype == torch.float32, name
        assert torch.equal(streamed, in_memory), name
        assert torch.equal(streamed, by_hand(sources)), name
        assert recipe.shape(disk) == recipe.shape(memory) == tuple(streamed.shape), name
    with pytest.raises(IndexError):
        Select(Take(Q), 0, (10_000,)).shape(disk)


def _hand_edit(info) -> Edit:
    """Same-shape edits that use every recipe kind (so the model stays loadable)."""
    layer = info.geometry.moe_layers[-1]
    num = info.geometry.num_experts
    edit = Edit()
    q_rows = LazyCheckpoint(info.model_dir).shape(Q)[0]
    half = q_rows // 2
    edit.tensors[Q] = Concat((Select(Take(Q), 0, tuple(range(half, q_rows))), Select(Take(Q), 0, tuple(range(half)))), 0)
    o_cols = LazyCheckpoint(info.model_dir).shape(O)[1]
    edit.tensors[O] = Select(Take(O), 1, tuple(reversed(range(o_cols))))
    norm = f"model.layers.{layer}.input_layernorm.weight"
    edit.tensors[norm] = NewTensor(torch.linspace(0.5, 1.5, LazyCheckpoint(info.model_dir).shape(norm)[0]))
    width = info.geometry.expert_width
    perm = tuple((3 * n + 1) % width for n in range(width))
    projections = info.family.layout.projections
    dims = {"gate": 0, "up": 0, "down": 1, "gate_bias": 0, "up_bias": 0}
    experts = []
    for e in range(num):
        other = (e + 1) % num
        new = {}
        for proj in projections:
            mine, theirs = Take(ExpertRef(layer, e, proj)), Take(ExpertRef(layer, other, proj))
            permuted = Select(theirs, dims[proj], perm) if proj in dims else theirs
            new[proj] = WeightedSum(((0.6, mine), (0.4, permuted)))
        experts.append(new)
    edit.experts[layer] = experts
    return edit


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_hand_built_edit_streaming_equals_in_memory(family, tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint(family)
    info = api.model_info(checkpoint)
    edit = _hand_edit(info)
    layout = CheckpointLayout.build(info.family, LazyCheckpoint(checkpoint), info.geometry.moe_layers)
    out = tmp_path / "edited"
    write_edit(layout, edit, out, max_shard_size="40KB", progress=False)
    assert len(list(out.glob("*.safetensors"))) > 1
    shutil.copy(checkpoint / "config.json", out / "config.json")
    model = apply_edit(_vanilla(checkpoint), info.family, edit)
    _assert_same_state(_vanilla(out), model)
    original = _vanilla(checkpoint)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, original.model.layers[0].self_attn.q_proj.weight)
    # the merged expert 0 by hand: 0.6 * expert 0 + 0.4 * expert 1 with permuted neurons
    layer = info.geometry.moe_layers[-1]
    width = info.geometry.expert_width
    perm = [(3 * n + 1) % width for n in range(width)]
    e0, e1 = model_expert(original, info.family, layer, 0), model_expert(original, info.family, layer, 1)
    merged = model_expert(model, info.family, layer, 0)
    assert torch.equal(merged["gate"], (0.6 * e0["gate"].double() + 0.4 * e1["gate"].double()[perm]).float())
    assert torch.equal(merged["down"], (0.6 * e0["down"].double() + 0.4 * e1["down"].double()[:, perm]).float())


def _uniform_kept(geometry) -> dict[int, list[int]]:
    if geometry.grouped:
        size = geometry.experts_per_group
        return {layer: [e for e in range(geometry.num_experts) if e % size in (0, 3)] for layer in geometry.moe_layers}
    return {layer: [e for e in range(geometry.num_experts) if e % 4 != (layer % 4)] for layer in geometry.moe_layers}


def test_keep_experts_streaming_equals_in_memory(family_checkpoint, tmp_path):
    family, checkpoint = family_checkpoint
    info = api.model_info(checkpoint)
    plan = Plan(layers=_uniform_kept(info.geometry), method="manual", family=info.geometry.family,
                num_experts=info.geometry.num_experts)
    out = write_pruned_checkpoint(checkpoint, plan, tmp_path / "pruned", max_shard_size="30KB", progress=False)
    streamed = load_output(family, out)  # moeprune.load where the family's outputs need it (JetMoE)
    in_memory = apply_plan_in_memory(_vanilla(checkpoint), plan)
    _assert_same_state(streamed, in_memory)
    config = json.loads((out / "config.json").read_text())
    check_expert_counts_in_config(family, config, {k: len(v) for k, v in plan.layers.items()}, plan.num_experts)
    source = _tensors(checkpoint)  # float32, and integer buffers some families persist (Qwen4-Exp's n-gram tables)
    assert all(t.dtype == source[name].dtype for name, t in _tensors(out).items())
    assert {t.dtype for t in source.values() if t.is_floating_point()} == {torch.float32}


def test_bf16_checkpoint_stays_bf16(tiny_checkpoint, tmp_path):
    source = tmp_path / "bf16"
    _vanilla(tiny_checkpoint("gpt_oss")).to(torch.bfloat16).save_pretrained(source)
    info = api.model_info(source)
    plan = Plan(layers=_uniform_kept(info.geometry), method="manual")
    out = write_pruned_checkpoint(source, plan, tmp_path / "pruned", progress=False)
    before, after = _tensors(source), _tensors(out)
    assert {t.dtype for t in after.values()} == {torch.bfloat16}
    layer = info.geometry.moe_layers[0]
    name = f"model.layers.{layer}.mlp.experts.gate_up_proj"
    assert torch.equal(after[name], before[name][plan.layers[layer]])
