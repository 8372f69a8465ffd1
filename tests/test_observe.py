"""Observers, exact merging of statistics (TCESS included), the stats format and `moeprune stats merge`."""

from __future__ import annotations

import math
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from conftest import SAMPLES
from moeprune import api, collect
from moeprune.calibration.data import CalibrationBatch
from moeprune.arch import decoder_layers, family_for_model_type, moe_layer_indices
from moeprune.calibration.engine import collect_stats, load_full_model
from moeprune.cli import main
from moeprune.errors import MoePruneError, OutputExistsError, StatsError
from moeprune.io.output import atomic_write_safetensors
from moeprune.observe import (
    ENTRY_OWNERS,
    ENTRY_RULES,
    OBSERVERS,
    LayerContext,
    LayerForward,
    Observer,
    observers_for_entries,
    register_observer,
    resolve_observers,
    signals_needed,
    tcess_of_logits,
)
from moeprune.observe.base import BLOCK_INPUT, EVERY_EXPERT_OUTPUT, EXPERT_INTERMEDIATE
from moeprune.observe.tcess import TcessHistogram, derive_tcess, probability_bin
from moeprune.scoring import SCORERS
from moeprune.stats import REQUIRED_ENTRIES, RouterStats
from moeprune.tiny import TINY_FAMILIES

REL = 1e-9


def assert_stats_close(got: RouterStats, want: RouterStats, rel: float = REL) -> None:
    """Every entry of every layer equal within float64 relative error ``rel`` (zeros exactly)."""
    assert got.layers.keys() == want.layers.keys()
    for layer, entries in want.layers.items():
        assert got.layers[layer].keys() == entries.keys(), layer
        for name, value in entries.items():
            mine = got.layers[layer][name]
            assert mine.dtype == torch.float64 == value.dtype and mine.shape == value.shape, (layer, name)
            assert bool(((mine - value).abs() <= rel * value.abs()).all()), (layer, name, (mine - value).abs().max())


def rows(batch: CalibrationBatch, start: int, stop: int) -> CalibrationBatch:
    return CalibrationBatch(batch.input_ids[start:stop].clone(), batch.attention_mask[start:stop].clone())


# --------------------------------------------------------------------------------------------------
# TCESS by hand


def test_tcess_histogram_by_hand():
    # token a: pool {0: z=2, 1: z=1}, p = (0.7311, 0.2689); token b: pool {1: z=3, 2: z=1}, p = (0.8808, 0.1192)
    # f(z) = max(z, sigmoid(z)) = z for these positive logits; a third, padded token never counts
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.0], [9.0, 0.0, 0.0, 0.0]])
    p_a, p_b = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(-2))
    context = LayerContext(num_experts=4, top_k=1, tcess_pool=2, tcess_bins=4)
    observer = TcessHistogram(context)
    valid = torch.tensor([True, True, False])
    observer.update(LayerForward(valid=valid, top_k_index=torch.zeros(3, 1, dtype=torch.long),
                                 top_k_weights=torch.ones(3, 1), router_logits=logits))
    raw = observer.result()
    # bins of 1/4: p_a -> 2, 1 - p_a -> 1, p_b -> 3, 1 - p_b -> 0
    hist = torch.zeros(4, 4, dtype=torch.float64)
    hist[0, 2], hist[1, 1], hist[1, 3], hist[2, 0] = 2.0, 1.0, 3.0, 1.0
    assert torch.equal(raw["tcess_hist"], hist)
    assert raw["tcess_pool_max_prob"].item() == pytest.approx(p_a + p_b, rel=1e-15)
    raw["tokens"] = torch.tensor(2.0, dtype=torch.float64)
    # data r = (p_a + p_b) / 2 = 0.806 -> bin 3: only token b's expert 1 counts
    derived = derive_tcess(raw)
    assert derived["tcess_r"].item() == pytest.approx((p_a + p_b) / 2, rel=1e-15)
    assert derived["tcess"].tolist() == [0.0, 3.0, 0.0, 0.0]
    # fixed r = 0.7 -> bin 2: p_a = 0.731 counts as well
    assert derive_tcess(raw, 0.7)["tcess"].tolist() == [2.0, 3.0, 0.0, 0.0]
    # r = 0.74 > p_a, but both lie in bin 2: p >= r is decided on the 1/B grid (threshold lowered < 1/B)
    assert derive_tcess(raw, 0.74)["tcess"].tolist() == [2.0, 3.0, 0.0, 0.0]
    assert probability_bin(1.0, 4) == 3 and probability_bin(0.0, 4) == 0
    # the pure function on the valid tokens gives the same vector
    assert tcess_of_logits(logits[:2], pool=2, bins=4).tolist() == [0.0, 3.0, 0.0, 0.0]
    # negative logits score sigmoid(z) > 0: pool {0: -2, 1: -5}, p0 = 0.9526, r = p0 -> only expert 0
    negative = tcess_of_logits(torch.tensor([[-2.0, -5.0, -6.0]]), pool=2, bins=4)
    assert negative.tolist() == pytest.approx([1 / (1 + math.exp(2)), 0.0, 0.0], rel=1e-15)


# --------------------------------------------------------------------------------------------------
# registry


def test_observers_for_scorer_entries():
    assert observers_for_entries(SCORERS["reap"].requires) == ("tokens", "routing", "expert_outputs")
    assert observers_for_entries(SCORERS["tcess"].requires) == ("tokens", "routing", "tcess")
    assert observers_for_entries(SCORERS["easy_ep"].requires) == ("tokens", "routing", "easy_ep")
    # every observer but the opt-in ones (the dense observers of every decoder layer)
    assert resolve_observers(None) == tuple(n for n in OBSERVERS if not OBSERVERS[n].opt_in)
    assert {"dense_channels", "angular", "replaceme"} <= {n for n in OBSERVERS if OBSERVERS[n].opt_in}
    assert {"naee", "dynamic_skip"} <= set(OBSERVERS) - set(resolve_observers(None))
    assert "neurons" in OBSERVERS and "neurons" not in resolve_observers(None)
    for scorer in SCORERS.values():  # every scorer's entries have an observer
        observers_for_entries(scorer.requires)
    with pytest.raises(MoePruneError, match="no observer produces"):
        observers_for_entries(["magic"])
    with pytest.raises(MoePruneError, match="unknown observer"):
        resolve_observers(["magic"])
    assert {ENTRY_RULES[name] for name in ("max_abs_output", "shared_max_abs_output")} == {"max"}
    assert all(ENTRY_RULES[e] == "sum" for e in REQUIRED_ENTRIES if e in ENTRY_RULES and not e.startswith("max"))


def test_opt_in_observers_run_only_when_asked_for():
    @register_observer
    class Costly(Observer):
        name = "test_costly"
        entries = {"test_costly_sum": "sum"}
        opt_in = True

    try:
        assert "test_costly" not in resolve_observers(None)
        assert set(resolve_observers(None)) == {n for n in OBSERVERS if not OBSERVERS[n].opt_in}
        assert resolve_observers(["test_costly"]) == ("tokens", "test_costly")
        assert "test_costly" in observers_for_entries(["test_costly_sum"])
    finally:
        del OBSERVERS["test_costly"], ENTRY_RULES["test_costly_sum"], ENTRY_OWNERS["test_costly_sum"]


def test_observer_needing_a_future_signal_is_refused():
    @register_observer
    class BlockNorm(Observer):
        name = "test_gradient_norm"
        entries = {"test_grad_norm": "sum"}
        needs = frozenset({BLOCK_INPUT})  # gradients landed with the backward pass (issue 11)

    try:
        with pytest.raises(MoePruneError, match="not implemented yet"):
            signals_needed(["tokens", "test_gradient_norm"])
        with pytest.raises(ValueError, match="already"):
            register_observer(BlockNorm)
    finally:
        del OBSERVERS["test_gradient_norm"], ENTRY_RULES["test_grad_norm"], ENTRY_OWNERS["test_grad_norm"]


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_intermediate_and_every_expert_output_signals(family, implementation, tiny_checkpoint, calibration):
    """At every routed pair, h is the expert's act(gate) * up of the token's input and f its down
    projection; every expert's output on every token equals the routed output at the routed pairs;
    the instrumented layer's output is the model's own (logits unchanged)."""
    seen, inputs = [], []

    @register_observer
    class Probe(Observer):
        name = "test_probe"
        entries = {"test_probe_count": "sum"}
        needs = frozenset({EXPERT_INTERMEDIATE, EVERY_EXPERT_OUTPUT})

        def update(self, forward: LayerForward) -> None:
            seen.append(forward)

        def result(self):
            return {"test_probe_count": self.zeros(1) + len(seen)}

    try:
        model = load_full_model(tiny_checkpoint(family))
        model.set_experts_implementation(implementation)
        fam = family_for_model_type(model.config.model_type)
        layer = decoder_layers(model)[moe_layer_indices(fam, model)[0]]
        experts = fam.experts(layer)
        input_ids, attention_mask = next(iter(calibration(family).batches(2)))
        with torch.no_grad():
            want = model(input_ids=input_ids, attention_mask=attention_mask).logits
            instrumented = collect.InstrumentedLayer(fam, layer, collect.new_observers(fam, layer, model.config, ["test_probe"]))
            handle = experts.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
            got = model(input_ids=input_ids, attention_mask=attention_mask).logits
            handle.remove()
            instrumented.remove()
        assert torch.equal(got, want)
        forward, hidden_states = seen[0], inputs[0]
        pairs = forward.pairs
        assert forward.every_expert_output.shape == (hidden_states.shape[0], experts.num_experts, hidden_states.shape[1])
        for p in range(pairs.token.numel()):
            token, expert = int(pairs.token[p]), int(pairs.expert[p])
            h, f = collect.expert_forward(experts, expert, hidden_states[token:token + 1])
            torch.testing.assert_close(pairs.intermediate[p], h[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(pairs.output[p], f[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(forward.every_expert_output[token, expert], f[0], rtol=1e-5, atol=1e-6)
    finally:
        del OBSERVERS["test_probe"], ENTRY_RULES["test_probe_count"], ENTRY_OWNERS["test_probe_count"]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_a_pass_runs_only_the_observers_asked_for(family, tiny_checkpoint, calibration, family_stats, monkeypatch):
    full = family_stats(family)

    def no_outputs(*args, **kwargs):
        raise AssertionError("routed expert outputs were computed")

    monkeypatch.setattr(collect, "routed_expert_outputs", no_outputs)
    names = observers_for_entries(SCORERS["tcess"].requires)
    part = collect_stats(tiny_checkpoint(family), calibration(family), mode="whole", batch_size=2,
                         observers=names, progress=False)
    assert part.metadata["observers"] == list(names)
    for layer, entries in part.layers.items():
        assert set(entries) == {"tokens", "frequency", "soft_count", "tcess_hist", "tcess_pool_max_prob", "tcess", "tcess_r"}
        for name, value in entries.items():  # the model's true routing: identical statistics
            assert torch.equal(value, full.layers[layer][name]), (layer, name)
    budget = {"ratio": 0.5}
    assert api.plan_pruning(tiny_checkpoint(family), method="tcess", stats=part, protect_super_experts=False, **budget).layers == \
        api.plan_pruning(tiny_checkpoint(family), method="tcess", stats=full, protect_super_experts=False, **budget).layers


# --------------------------------------------------------------------------------------------------
# exact merge


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
@pytest.mark.parametrize("mode", ["whole", "sequential"])
def test_merged_halves_equal_the_whole(family, mode, tiny_checkpoint, calibration, tmp_path):
    source, batch = tiny_checkpoint(family), calibration(family)
    half = SAMPLES // 2  # a batch boundary (batch_size 2): every batch's forward is the same
    run = lambda b: collect_stats(source, b, mode=mode, batch_size=2, progress=False)  # noqa: E731
    whole, first, second = run(batch), run(rows(batch, 0, half)), run(rows(batch, half, SAMPLES))
    merged = first.merge(second)
    assert_stats_close(merged, whole)
    assert any(e["tcess"].sum() > 0 for e in whole.layers.values())
    assert merged.metadata["samples"] == SAMPLES and merged.metadata["num_tokens"] == batch.num_tokens
    # through files (format 2) as well
    a, b = first.save(tmp_path / "a.safetensors"), second.save(tmp_path / "b.safetensors")
    assert_stats_close(RouterStats.load(a).merge(RouterStats.load(b)), whole)
    # each half alone has its own threshold: the merged TCESS is not the sum of the halves' TCESS
    for layer in whole.layers:
        assert first.layers[layer]["tcess_r"] != whole.layers[layer]["tcess_r"]


def test_fixed_tcess_r_after_collection(tiny_checkpoint, calibration, family_stats):
    stats = family_stats("mixtral")
    fixed = collect_stats(tiny_checkpoint("mixtral"), calibration("mixtral"), mode="whole", batch_size=2,
                          tcess_r=0.3, progress=False)
    later = stats.with_tcess_r(0.3)
    assert later.metadata["tcess_r"] == 0.3
    assert_stats_close(later, fixed, rel=0.0)
    assert_stats_close(later.with_tcess_r(None), stats, rel=0.0)
    with pytest.raises(StatsError, match=r"\[0, 1\]"):
        stats.with_tcess_r(1.5)


def test_merge_refuses_other_models_layers_and_settings(tiny_checkpoint, calibration, family_stats):
    stats = family_stats("mixtral")
    other_pool = collect_stats(tiny_checkpoint("mixtral"), calibration("mixtral"), mode="whole", batch_size=2,
                               tcess_pool=3, progress=False)
    with pytest.raises(StatsError, match="tcess_pool"):
        stats.merge(other_pool)
    with pytest.raises(StatsError, match="model_fingerprint"):
        stats.merge(RouterStats(stats.layers, {**stats.metadata, "model_fingerprint": "0" * 16}))
    with pytest.raises(StatsError, match="different MoE layers"):
        stats.merge(RouterStats({k: v for k, v in stats.layers.items() if k != min(stats.layers)}, stats.metadata))
    routing_only = collect_stats(tiny_checkpoint("mixtral"), calibration("mixtral"), mode="whole", batch_size=2,
                                 observers=["routing"], progress=False)
    with pytest.raises(StatsError, match="observers"):
        stats.merge(routing_only)


def _v1_file(stats: RouterStats, path) -> None:
    """A format-1 statistics file as moeprune wrote it before (tcess saved, no histogram)."""
    import json

    tensors = {f"layers.{layer}.{name}": entries[name].contiguous()
               for layer, entries in stats.layers.items() for name in (*REQUIRED_ENTRIES, "tcess_r", "tcess_pool_max_prob")}
    metadata = {k: v for k, v in stats.metadata.items() if k not in ("observers", "tcess_bins", "dtype", "device")}
    save_file(tensors, str(path), metadata={"moeprune": json.dumps({**metadata, "format_version": 1})})


def test_format_1_loads_and_refuses_to_merge(family_stats, tmp_path):
    stats = family_stats("mixtral")
    _v1_file(stats, tmp_path / "v1.safetensors")
    old = RouterStats.load(tmp_path / "v1.safetensors")
    assert old.metadata["format_version"] == 1
    for layer, entries in old.layers.items():
        assert "tcess_hist" not in entries
        assert torch.equal(entries["tcess"], stats.layers[layer]["tcess"])  # used as saved
    assert api.plan_pruning(stats.metadata["model_dir"], method="tcess", ratio=0.5, stats=old).layers == \
        api.plan_pruning(stats.metadata["model_dir"], method="tcess", ratio=0.5, stats=stats).layers
    with pytest.raises(StatsError, match="re-collect"):
        old.merge(old)
    with pytest.raises(StatsError, match="re-collect"):
        old.with_tcess_r(0.5)


# --------------------------------------------------------------------------------------------------
# files and the CLI


def test_atomic_safetensors_leaves_nothing_behind(tmp_path, monkeypatch):
    out = tmp_path / "s.safetensors"
    atomic_write_safetensors(out, {"x": torch.zeros(2)})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    with pytest.raises(OutputExistsError):
        atomic_write_safetensors(out, {"x": torch.ones(2)})

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("moeprune.io.output.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_safetensors(out, {"x": torch.ones(2)}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]


def test_cli_stats_merge(tiny_checkpoint, calibration, tmp_path, capsys):
    source, batch = tiny_checkpoint("deepseek_v3"), calibration("deepseek_v3")
    run = lambda b: collect_stats(source, b, mode="whole", batch_size=2, progress=False)  # noqa: E731
    whole = run(batch)
    a = run(rows(batch, 0, 2)).save(tmp_path / "a.safetensors")
    b = run(rows(batch, 2, SAMPLES)).save(tmp_path / "b.safetensors")
    out = tmp_path / "merged" / "ab.safetensors"
    assert main(["-q", "stats", "merge", str(a), str(b), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert_stats_close(RouterStats.load(out), whole)
    assert sorted(p.name for p in out.parent.iterdir()) == ["ab.safetensors"]
    assert main(["-q", "stats", "merge", str(a), str(b), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["-q", "stats", "merge", str(a), str(b), "--out", str(out), "--overwrite"]) == 0
    assert main(["-q", "stats", "merge", str(a), str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "c.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err
    other = collect_stats(tiny_checkpoint("mixtral"), calibration("mixtral"), mode="whole", batch_size=2, progress=False)
    c = other.save(tmp_path / "c.safetensors")
    assert main(["-q", "stats", "merge", str(a), str(c), "--out", str(tmp_path / "d.safetensors")]) == 2
    assert "cannot merge" in capsys.readouterr().err
    assert main(["-q", "stats", "merge", str(a), "--out", str(tmp_path / "e.safetensors")]) == 2
    assert not (tmp_path / "d.safetensors").exists() and not (tmp_path / "e.safetensors").exists()


# --------------------------------------------------------------------------------------------------
# pre-tokenized calibration data


def test_pretokenized_shards_merge_to_the_whole(tiny_checkpoint, calibration, tmp_path, capsys):
    """The research use case: disjoint row shards of one pre-tokenized file, collected apart, merged."""
    family = "qwen3_moe"
    source, packed = tiny_checkpoint(family), calibration(family)
    ids, mask = packed.input_ids.clone(), packed.attention_mask.clone()
    mask[1, 20:] = 0  # a padded row: padding never counts, in a shard or in the whole
    save_file({"input_ids": ids, "attention_mask": mask}, str(tmp_path / "all.safetensors"))
    save_file({"input_ids": ids[:2].clone(), "attention_mask": mask[:2].clone()}, str(tmp_path / "shard0.safetensors"))
    save_file({"input_ids": ids[2:].clone(), "attention_mask": mask[2:].clone()}, str(tmp_path / "shard1.safetensors"))
    run = lambda name, **kw: api.collect(source, tmp_path / name, batch_size=2, progress=False, **kw)  # noqa: E731
    whole = run("all.safetensors")
    assert whole.metadata["data_hash"] == CalibrationBatch(ids, mask).data_hash
    assert whole.metadata["samples"] == SAMPLES and whole.metadata["num_tokens"] == int(mask.sum())
    merged = run("shard0.safetensors").merge(run("shard1.safetensors", samples=2, seq_len=ids.shape[1]))
    assert_stats_close(merged, whole)
    assert merged.metadata["num_tokens"] == whole.metadata["num_tokens"]
    with pytest.raises(MoePruneError, match="--samples 3 does not match"):
        run("all.safetensors", samples=3)
    # the CLI takes the sizes from the file when none are given
    out = tmp_path / "cli.safetensors"
    assert main(["-q", "collect", str(source), "--data", str(tmp_path / "all.safetensors"), "--out", str(out),
                 "--batch-size", "2"]) == 0
    assert_stats_close(RouterStats.load(out), whole, rel=0.0)
    assert main(["-q", "collect", str(source), "--data", str(tmp_path / "all.safetensors"), "--out", str(out),
                 "--overwrite", "--seq-len", "7"]) == 2
    assert "--seq-len 7 does not match" in capsys.readouterr().err


def test_prune_collects_only_what_its_method_needs():
    assert api.statistics_for("reap") == ("tokens", "routing", "expert_outputs", "shared_outputs")
    assert api.statistics_for("tcess", protect_super_experts=False) == ("tokens", "routing", "tcess")
    assert api.statistics_for("random", protect_super_experts=False) == ("tokens", "routing")


def test_partial_statistics_round_trip(tiny_checkpoint, calibration, tmp_path):
    part = collect_stats(tiny_checkpoint("olmoe"), calibration("olmoe"), mode="whole", batch_size=2,
                         observers=["coactivation"], progress=False)
    assert part.metadata["observers"] == ["tokens", "coactivation"]
    loaded = RouterStats.load(part.save(tmp_path / "part.safetensors"))
    assert_stats_close(loaded, part, rel=0.0)
    assert loaded.metadata["format_version"] == 2
    layer = min(part.layers)
    broken = RouterStats({**part.layers, layer: {"tokens": part.layers[layer]["tokens"]}}, part.metadata)
    with pytest.raises(StatsError, match=r"lacks \['coactivation'\]"):
        RouterStats.load(broken.save(tmp_path / "broken.safetensors"))
