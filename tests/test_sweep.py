"""The quality sweep, the method registry and the default job: hand-computed metrics and a tiny
end-to-end run on a random checkpoint and a small corpus."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moeprune import api
from moeprune.methods import get_method, methods, unregister_method
from moeprune.scoring import SCORERS, register_scorer
from moeprune.stats import RouterStats
from moeprune.sweep import (SweepRow, SweepSettings, aggregate, expert_usage, js_divergence, markdown_table, merge_all,
                            signal_check, sweep_model, usage_divergence, write_results)
from moeprune.testbed.corpus import build_corpus

SMALL_CAP = 60_000


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep_corpus")
    build_corpus(out, seed=0, max_domain_bytes=SMALL_CAP)
    return out


def _stats(*frequencies: list[float]) -> RouterStats:
    return RouterStats({layer: {"frequency": torch.tensor(f, dtype=torch.float64)} for layer, f in enumerate(frequencies)})


# ---- pure functions ---------------------------------------------------------------------------------


def test_js_divergence_hand_computed():
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0])
    # m = (0.75, 0.25); KL(p||m) = 0.5 log2(2/3) + 0.5 log2(2); KL(q||m) = log2(4/3)
    expected = 0.5 * (0.5 * math.log2(2 / 3) + 0.5 * 1.0) + 0.5 * math.log2(4 / 3)
    assert js_divergence(p, q) == pytest.approx(expected, abs=1e-12)
    assert js_divergence(p, p) == pytest.approx(0.0, abs=1e-12)
    assert js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == pytest.approx(1.0)


def test_expert_usage_and_divergence_per_layer():
    a = _stats([3.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0])
    b = _stats([0.0, 0.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0])
    usage = expert_usage(a)
    assert torch.allclose(usage[0], torch.tensor([0.75, 0.25, 0.0, 0.0], dtype=torch.float64))
    div = usage_divergence({"x": a, "y": b})
    assert div[0]["x|y"] == pytest.approx(1.0)  # disjoint supports
    assert div[1]["x|y"] == pytest.approx(0.0, abs=1e-12)  # same distribution


def _rows() -> list[SweepRow]:
    return [
        SweepRow("tb", "dense", 0.0, None, 8, {"a": 10.0, "b": 20.0}),
        SweepRow("tb", "frequency", 0.5, None, 4, {"a": 11.0, "b": 22.0}),
        SweepRow("tb", "random", 0.5, 0, 4, {"a": 15.0, "b": 30.0}),
        SweepRow("tb", "random", 0.5, 1, 4, {"a": 13.0, "b": 26.0}),
    ]


def test_aggregate_signal_check_and_table():
    rows = _rows()
    assert rows[0].mean_ppl == pytest.approx(math.sqrt(10.0 * 20.0))
    agg = {(r["method"], r["ratio"]): r for r in aggregate(rows)}
    random = agg[("random", 0.5)]
    assert random["seeds"] == 2
    assert random["ppl"] == {"a": 14.0, "b": 28.0}
    assert random["ppl_min"] == {"a": 13.0, "b": 26.0} and random["ppl_max"] == {"a": 15.0, "b": 30.0}
    check = signal_check(aggregate(rows))["tb"]
    assert check["change"]["frequency"] == pytest.approx(0.10)
    assert check["change"]["random"] == pytest.approx(0.40)
    assert check["passed"]
    table = markdown_table(aggregate(rows), "tb")
    assert "| frequency | 50% | 4 | 11.00 | 22.00 | +10.0% |" in table
    assert "| random (mean of 2) | 50% | 4 | 14.00 | 28.00 | +40.0% |" in table
    # a method no better than half of random's damage does not pass
    rows[1] = SweepRow("tb", "frequency", 0.5, None, 4, {"a": 13.0, "b": 26.0})
    assert not signal_check(aggregate(rows))["tb"]["passed"]


def test_every_scorer_is_a_method_and_new_ones_join():
    assert set(SCORERS) <= set(methods())
    assert get_method("random").stochastic and not get_method("reap").stochastic

    @register_scorer("test_only_index", needs_outputs=False)
    def _by_index(stats, **_):
        """score_j = j (test only)."""
        return torch.arange(stats["frequency"].numel(), dtype=torch.float64)

    try:
        assert methods()["test_only_index"].op == "drop"
    finally:
        unregister_method("test_only_index")


# ---- end to end on a tiny random model ----------------------------------------------------------------


def test_sweep_model_end_to_end(tiny_checkpoint, small_corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moeprune.evaluation.perplexity import perplexity
    from moeprune.testbed.corpus import load_domain

    model_dir = tiny_checkpoint("mixtral")
    settings = SweepSettings(ratios=(0.0, 0.5), methods=("frequency", "random"), seeds=(0, 1), samples_per_domain=2,
                             seq_len=32, eval_tokens=512, eval_seq_len=64, domains=("code", "math"))
    rows, divergence = sweep_model("tiny", model_dir, small_corpus, tmp_path / "work", settings, progress=False)
    assert [(r.method, r.ratio, r.seed) for r in rows] == [
        ("dense", 0.0, None), ("frequency", 0.5, None), ("random", 0.5, 0), ("random", 0.5, 1)]
    assert all(r.experts_kept == 4 for r in rows[1:]) and rows[0].experts_kept == 8

    # the dense row is plain perplexity of the unmodified model on the TEST split
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    direct = perplexity(model, tokenizer, load_domain(small_corpus, "math", "test"), seq_len=64, max_tokens=512)
    assert rows[0].ppl["math"] == pytest.approx(direct, rel=1e-9)

    # methods score the exact sum of the per-domain statistics
    per_domain = [RouterStats.load(tmp_path / "work" / f"stats-{d}.safetensors") for d in ("code", "math")]
    merged = merge_all(per_domain)
    for layer, entries in merged.layers.items():
        assert torch.equal(entries["frequency"], per_domain[0].layers[layer]["frequency"] + per_domain[1].layers[layer]["frequency"])
    plan = api.plan_pruning(model_dir, method="frequency", ratio=0.5, stats=merged)
    assert rows[1].kept == plan.layers
    assert set(divergence) == set(merged.layers) and all(0.0 <= v <= 1.0 for d in divergence.values() for v in d.values())

    summary = write_results(rows, {"tiny": divergence}, tmp_path / "out", settings)
    for name in ("results.json", "results.csv", "results.md", "tiny.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(saved["rows"]) == 4 and "tiny" in saved["signal_check"]
    assert summary["aggregated"][0]["method"] == "dense"
    assert (tmp_path / "out" / "results.csv").read_text().count("\n") == 1 + 4 * 2


def test_default_job_writes_a_vanilla_pruned_checkpoint(tiny_checkpoint, small_corpus, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from moeprune.demo import run_demo

    out = tmp_path / "demo"
    summary = run_demo(out, method="reap", ratio=0.5, model_dir=tiny_checkpoint("mixtral"), corpus_dir=small_corpus,
                       samples_per_domain=2, eval_tokens=256, random_seeds=(0,), progress=False)
    printed = capsys.readouterr().out
    assert "| dense | 0% | 8 |" in printed and "| reap | 50% | 4 |" in printed
    model = AutoModelForCausalLM.from_pretrained(str(out / "pruned-reap"))
    assert model.config.num_local_experts == 4
    plan = json.loads((out / "pruned-reap" / "moeprune_plan.json").read_text())
    reap = [r for r in summary["rows"] if r["method"] == "reap"][0]
    assert {int(k): v for k, v in plan["layers"].items()} == {int(k): v for k, v in reap["kept"].items()}
    with pytest.raises(Exception, match="overwrite"):
        run_demo(out, model_dir=tiny_checkpoint("mixtral"), corpus_dir=small_corpus, progress=False)


def test_default_job_with_a_stochastic_method_keeps_each_seed(tiny_checkpoint, small_corpus, tmp_path):
    """The saved checkpoint is the first seed's; only that row takes its perplexity."""
    from moeprune.demo import run_demo

    out = tmp_path / "demo"
    summary = run_demo(out, method="random", ratio=0.5, model_dir=tiny_checkpoint("mixtral"), corpus_dir=small_corpus,
                       samples_per_domain=2, eval_tokens=256, random_seeds=(0, 1), progress=False)
    rows = {r["seed"]: r for r in summary["rows"] if r["method"] == "random"}
    assert set(rows) == {0, 1} and rows[0]["kept"] != rows[1]["kept"]
    assert rows[0]["ppl"] != rows[1]["ppl"]
    plan = json.loads((out / "pruned-random" / "moeprune_plan.json").read_text())
    assert {int(k): v for k, v in plan["layers"].items()} == {int(k): v for k, v in rows[0]["kept"].items()}


def test_cli_threads_option(tiny_checkpoint, capsys):
    from moeprune.cli import main

    before = torch.get_num_threads()
    try:
        assert main(["inspect", str(tiny_checkpoint("mixtral")), "--json", "--threads", "1"]) == 0
        assert json.loads(capsys.readouterr().out)["family"] == "mixtral"
        assert torch.get_num_threads() == 1
        assert main(["--threads", "0", "inspect", str(tiny_checkpoint("mixtral"))]) == 2
        assert "argument --threads: must be >= 1, got 0" in capsys.readouterr().err
        torch.set_num_threads(2)
        assert main(["profile", "list", "--json", "--threads", "1"]) == 0  # after a sub-subcommand too
        assert {p["name"] for p in json.loads(capsys.readouterr().out)} >= {"code", "general"}
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
