"""The quality sweep with dense methods: option values keep their types (``layers=2`` is an int,
``compensate=false`` a bool), and ReplaceMe runs at several depths each get statistics collected at
their own depth (the ReplaceMe sums depend on the cut)."""

from __future__ import annotations

import pytest
import torch

from moeprune import api
from moeprune.calibration.data import CalibrationBatch
from moeprune.observe import DenseSettings
from moeprune.sweep import (
    SweepSettings,
    parse_method_label,
    replaceme_depths,
    replaceme_stats_by_depth,
    sweep_model,
)


def test_method_labels_keep_option_types():
    name, options = parse_method_label("flap@unit=heads,widths=uniform,compensate=false")
    assert name == "flap" and options == {"unit": "heads", "widths": "uniform", "compensate": False}
    _, options = parse_method_label("replaceme@layers=2,ridge=1e-4")
    assert options == {"layers": 2, "ridge": 1e-4} and isinstance(options["layers"], int)
    _, options = parse_method_label("dern@tau=0.6,kmeans_init=magnitude,gate_in_similarity=True")
    assert options == {"tau": 0.6, "kmeans_init": "magnitude", "gate_in_similarity": True}
    assert parse_method_label("reap") == ("reap", {})


def test_replaceme_depths_of_the_runs():
    settings = SweepSettings(ratios=(0.0, 0.5), methods=("replaceme@layers=2", "angular@layers=2", "replaceme",
                                                         "dense_random@unit=layers,layers=2"))
    assert replaceme_depths(settings) == (1, 2)
    assert replaceme_depths(SweepSettings(ratios=(0.0, 0.5), methods=("angular@layers=2",))) == ()


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    from moeprune.testbed.corpus import build_corpus

    corpus = tmp_path_factory.mktemp("corpus")
    build_corpus(corpus, seed=0, max_domain_bytes=60_000)
    return corpus


def test_replaceme_at_two_depths_gets_statistics_of_each_depth(tiny_checkpoint, small_corpus, tmp_path):
    """Depth 2's statistics are the per-domain sums at depth 2 (equal to one pass over the same rows);
    the other entries are the sweep's own; a depth-2 ReplaceMe plan comes out of them."""
    checkpoint = tiny_checkpoint("mixtral")
    settings = SweepSettings(ratios=(0.0, 0.5), methods=("replaceme@layers=1", "replaceme@layers=2", "angular@layers=2"),
                             samples_per_domain=2, seq_len=32, domains=("code", "math"))
    from moeprune.sweep import collect_domain_stats
    from moeprune.stats import merge_all

    base = merge_all(list(collect_domain_stats(checkpoint, small_corpus, tmp_path / "work", settings, progress=False).values()))
    assert base.metadata["replaceme_depth"] == 1
    by_depth = replaceme_stats_by_depth(base, checkpoint, small_corpus, tmp_path / "work", settings, progress=False)
    assert set(by_depth) == {1, 2} and by_depth[1] is base
    deep = by_depth[2]
    assert deep.metadata["replaceme_depth"] == 2 and deep.layers is base.layers

    parts = [api.calibration_data(checkpoint, small_corpus / domain / "train.jsonl", samples=2, seq_len=32)
             for domain in ("code", "math")]
    rows = CalibrationBatch(torch.cat([p.input_ids for p in parts]), torch.cat([p.attention_mask for p in parts]))
    one_pass = api.collect(checkpoint, calibration=rows, observers=["replaceme"], progress=False,
                           dense=DenseSettings(replaceme_depth=2))
    cuts = [layer for layer, entries in one_pass.dense.items() if "replaceme_mtm" in entries]
    assert cuts == [1]  # 3 layers, depth 2: only the cut 1..2 has a kept layer before it
    for layer, entries in deep.dense.items():
        assert torch.equal(entries["angular_sum"], base.dense[layer]["angular_sum"])
        assert ("replaceme_mtm" in entries) == (layer in cuts)
        for name in ("replaceme_mtm", "replaceme_mtr", "replaceme_rr", "replaceme_tokens"):
            if layer in cuts:
                # float32 forwards of other batch shapes round differently: equal to float32 precision
                expected = one_pass.dense[layer][name]
                torch.testing.assert_close(entries[name], expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    plan = api.plan_pruning(checkpoint, method="replaceme", ratio=0.5, stats=deep, options={"layers": 2})
    assert plan.budget["layers"] == 2 and plan.budget["start"] == 1


def test_sweep_runs_replaceme_at_two_depths(tiny_checkpoint, small_corpus, tmp_path):
    settings = SweepSettings(ratios=(0.0, 0.5), methods=("replaceme@layers=1", "replaceme@layers=2", "angular@layers=2"),
                             samples_per_domain=2, seq_len=32, eval_tokens=256, eval_seq_len=64, domains=("code", "math"))
    rows, _ = sweep_model("tiny", tiny_checkpoint("mixtral"), small_corpus, tmp_path / "work", settings, progress=False)
    assert [r.method for r in rows] == ["dense", "replaceme@layers=1", "replaceme@layers=2", "angular@layers=2"]
    assert all(r.ppl["code"] > 1 for r in rows)
    assert (tmp_path / "work" / "stats-code-replaceme2.safetensors").exists()
    assert rows[1].ppl != rows[2].ppl


def _plot_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "plot_dense_sweep.py"
    spec = importlib.util.spec_from_file_location("plot_dense_sweep", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dense_plot_series_by_hand(tmp_path):
    script = _plot_script()
    assert script.point_of("flap@unit=heads,widths=uniform", 0.125) == ("heads", "flap@widths=uniform", 12.5)
    assert script.point_of("replaceme@layers=2", 0.5) == ("layers", "replaceme", 2.0)
    assert script.point_of("dense_random@unit=layers,layers=1", 0.5) == ("layers", "dense_random", 1.0)
    assert script.point_of("wanda_sp@unit=shared", 0.5) == ("shared", "wanda_sp", 50.0)

    def row(method, ratio, seed, code, math):
        return {"testbed": "t", "method": method, "ratio": ratio, "seed": seed, "ppl": {"code": code, "math": math}}

    summary = {"rows": [row("dense", 0.0, None, 10.0, 2.0), row("flap@unit=heads", 0.25, None, 12.0, 2.2),
                        row("dense_random@unit=heads", 0.25, 0, 15.0, 2.0), row("dense_random@unit=heads", 0.25, 1, 20.0, 3.0)]}
    series = script.dense_series([summary], "t")
    flap = series["heads"]["flap"]
    assert flap == [(25.0, pytest.approx(0.15), pytest.approx(0.15), pytest.approx(0.15))]  # (20% + 10%) / 2
    (x, mean, low, high), = series["heads"]["dense_random"]
    assert (x, low, high) == (25.0, pytest.approx(0.25), pytest.approx(0.75)) and mean == pytest.approx(0.5)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(__import__("json").dumps(summary))
    assert script.main([str(tmp_path / "run"), "--out", str(tmp_path / "plot.png")]) == 0
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_qwen2moe_testbed_has_every_dense_unit():
    """The dense testbed recipe (not trained here): 8 KV groups of 2 query heads in every layer (one
    group = 12.5% of attention), a dense MLP in layer 0, a shared expert in the MoE layers."""
    from moeprune.arch import family_for_model_type
    from moeprune.testbed.models import build_config, get_recipe, recipe_hash
    from moeprune.units import model_facts, unit_parameters

    config = build_config("qwen2moe")
    assert type(config).__name__ == "Qwen2MoeConfig" and get_recipe("qwen2moe").model_class == "Qwen2MoeForCausalLM"
    family = family_for_model_type(config.model_type)
    facts = model_facts(family, config)
    assert [f.attention.kv_heads for f in facts.values()] == [8, 8, 8, 8]
    assert {f.attention.heads_per_group for f in facts.values()} == {2}
    assert [f.dense_width for f in facts.values()] == [512, None, None, None]
    assert [f.shared_width for f in facts.values()] == [None, 256, 256, 256]
    assert [f.experts for f in facts.values()] == [0, 32, 32, 32]
    params = unit_parameters(family, facts)
    assert 8 * params[0].kv_group == sum(p.numel() for n, p in _attention_parameters(config))
    assert len({recipe_hash(name) for name in ("qwen2moe", "mixtral", "qwen3moe", "deepseekv3", "tiny")}) == 5


def _attention_parameters(config):
    from moeprune.arch import build_skeleton

    layer = build_skeleton(config).model.layers[0]
    return [(n, p) for n, p in layer.self_attn.named_parameters()]
