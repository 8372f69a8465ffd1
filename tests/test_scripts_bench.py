"""The benchmark scripts scripts/bench_startup.py and scripts/bench_gpu_collect.py: their pure helpers,
and smoke runs that check the JSON they write (never the timings themselves)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def scripts():
    """The two script modules, imported from scripts/ (not a package)."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield importlib.import_module("bench_startup"), importlib.import_module("bench_gpu_collect")
    finally:
        sys.path.remove(str(SCRIPTS))


# --------------------------------------------------------------------------------------------------
# bench_startup


def test_startup_summarize_is_median_and_min(scripts):
    startup, _ = scripts
    assert startup.summarize([3.0, 1.0, 2.0]) == {"median_s": 2.0, "min_s": 1.0, "runs_s": [3.0, 1.0, 2.0]}
    assert startup.summarize([4.0, 1.0])["median_s"] == 2.5
    with pytest.raises(ValueError):
        startup.summarize([])


def test_startup_commands_run_this_checkout(scripts, tmp_path):
    startup, _ = scripts
    cmds = startup.commands(tmp_path / "model", python="py")
    assert list(cmds) == ['python -c "import torch"', "moeprune --help", "moeprune inspect MODEL --json"]
    assert cmds["moeprune --help"] == ["py", "-m", "moeprune.cli", "--help"]
    assert cmds["moeprune inspect MODEL --json"] == ["py", "-m", "moeprune.cli", "inspect", str(tmp_path / "model"), "--json"]
    assert startup.child_env()["PYTHONPATH"].split(":")[0] == str(startup.ROOT)


def test_startup_table_is_relative_to_import_torch(scripts):
    startup, _ = scripts
    results = {
        "commit": "abc1234", "repeat": 3, "machine": {"cpu_count": 2, "torch": "2.x"}, "help_imports": [],
        "timings": {'python -c "import torch"': {"median_s": 2.0, "min_s": 1.5},
                    "moeprune --help": {"median_s": 0.5, "min_s": 0.4}},
    }
    table = startup.markdown_table(results)
    assert "| `moeprune --help` | 0.50 s | 0.40 s | 0.25 |" in table
    assert "| `python -c \"import torch\"` | 2.00 s | 1.50 s | 1.00 |" in table
    assert "neither torch nor transformers" in table
    assert "commit abc1234" in table


def test_startup_smoke_run_writes_json(scripts, tmp_path, monkeypatch):
    """--repeat 1 end to end (tiny checkpoint, child processes, --help import check, JSON), with cheap
    stand-ins for the three timed commands so the test stays fast."""
    startup, _ = scripts
    real = startup.commands
    names = list(real("MODEL"))
    monkeypatch.setattr(startup, "commands", lambda model_dir, python=sys.executable: {
        name: [python, "-c", f"import pathlib; assert pathlib.Path({str(model_dir)!r}, 'config.json').is_file()"]
        for name in names})
    out = tmp_path / "startup.json"
    startup.main(["--repeat", "1", "--no-warmup", "--json", str(out)])
    data = json.loads(out.read_text())
    assert set(data) == {"commit", "machine", "repeat", "warmup", "timings", "help_imports"}
    assert list(data["timings"]) == names and data["repeat"] == 1 and data["warmup"] is False
    for row in data["timings"].values():
        assert set(row) == {"median_s", "min_s", "runs_s"} and len(row["runs_s"]) == 1
    assert {"cpu_count", "python", "torch", "transformers"} <= set(data["machine"])
    assert set(data["help_imports"]) <= {"torch", "transformers"}


# --------------------------------------------------------------------------------------------------
# bench_gpu_collect


def test_gpu_defaults_per_mode(scripts, monkeypatch):
    _, gpu = scripts
    monkeypatch.delenv("OUT", raising=False)
    full = gpu.parse_args([])
    assert (full.layers, full.samples, full.seq_len, full.device, full.dtype) == (4, 64, 2048, "cuda", "bfloat16")
    assert full.out == Path("bench_gpu.json")
    tiny = gpu.parse_args(["--tiny", "--samples", "2"])
    assert (tiny.layers, tiny.samples, tiny.device, tiny.dtype) == (2, 2, "cpu", "float32")
    assert gpu.default_out({"OUT": "results"}) == Path("results") / "bench_gpu.json"
    with pytest.raises(SystemExit):
        gpu.parse_args(["--tiny", "--samples", "0"])


def test_gpu_config_has_qwen3_30b_a3b_layer_geometry(scripts):
    _, gpu = scripts
    config = gpu.model_config(tiny=False, layers=4, vocab=32000)
    assert (config.hidden_size, config.num_local_experts, config.num_experts_per_tok) == (2048, 128, 8)
    assert (config.moe_intermediate_size, config.num_attention_heads, config.num_key_value_heads) == (768, 32, 4)
    assert (config.head_dim, config.norm_topk_prob, config.num_hidden_layers, config.vocab_size) == (128, True, 4, 32000)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_gpu_without_cuda_fails_at_once(scripts, tmp_path, capsys):
    _, gpu = scripts
    with pytest.raises(gpu.BenchError, match="pass --device cpu"):
        gpu.check_device("cuda")
    with pytest.raises(SystemExit) as exc:
        gpu.main(["--out", str(tmp_path / "b.json")])
    assert exc.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_gpu_ratios_by_hand(scripts):
    _, gpu = scripts
    results = {"model": {"layer_bytes": 100}, "collection": {"wall_s": 6.0, "peak_bytes": 250},
               "plain": {"forward_s": 2.0, "load_s": 1.0, "peak_bytes": 1000}}
    assert gpu.ratios(results) == {"collection_over_plain_forward": 3.0, "collection_over_plain_load_forward": 2.0,
                                   "collection_peak_over_layer": 2.5, "plain_peak_over_layer": 10.0}
    results["collection"]["peak_bytes"] = results["plain"]["peak_bytes"] = None
    assert gpu.ratios(results)["collection_peak_over_layer"] is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_tiny_cpu_run_writes_json(scripts, tmp_path, dtype):
    _, gpu = scripts
    out = tmp_path / "bench_gpu.json"
    gpu.main(["--tiny", "--device", "cpu", "--dtype", dtype, "--samples", "4", "--seq-len", "32",
              "--work", str(tmp_path / "work"), "--out", str(out)])
    data = json.loads(out.read_text())
    assert set(data) == {"complete", "commit", "machine", "settings", "model", "collection", "plain", "notes", "ratios"}
    assert data["complete"] is True
    assert data["settings"]["dtype"] == dtype and data["settings"]["device"] == "cpu"
    assert {"card", "torch", "transformers", "cpu_count"} <= set(data["machine"])
    assert {"params", "bytes", "layer_bytes"} <= set(data["model"])
    collection = data["collection"]
    assert collection["tokens"] == 4 * 32 and collection["tokens_counted"] == 4 * 32
    assert collection["moe_layers"] == 2 and collection["stats_finite"]
    assert {"load_s", "forward_s", "tokens_per_s", "peak_bytes", "experts_implementation"} <= set(data["plain"])
    assert set(data["ratios"]) == {"collection_over_plain_forward", "collection_over_plain_load_forward",
                                   "collection_peak_over_layer", "plain_peak_over_layer"}
    assert list((tmp_path / "work").iterdir()) == []  # the generated checkpoint is removed


def test_gpu_refuses_cuda_with_an_engine_without_device(scripts, monkeypatch, tmp_path):
    _, gpu = scripts
    monkeypatch.setattr(gpu, "check_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(gpu, "engine_takes_device", lambda: False)
    with pytest.raises(gpu.BenchError, match="no `device` argument"):
        gpu.run(gpu.parse_args(["--out", str(tmp_path / "b.json")]))
    assert not (tmp_path / "b.json").exists()
