"""Device and dtype of a calibration pass: resolution, errors, bfloat16 on the CPU end to end."""

from __future__ import annotations

import pytest
import torch

from moeprune import api
from moeprune.calibration.device import checkpoint_dtype, resolve_device, resolve_dtype, to_device
from moeprune.arch import family_for_model_type, read_config
from moeprune.calibration.engine import collect_stats, layer_passes
from moeprune.cli import main
from moeprune.errors import MoePruneError
from moeprune.io.checkpoint import LazyCheckpoint
from moeprune.tiny import TINY_FAMILIES

CPU = torch.device("cpu")


def test_device_resolution():
    assert resolve_device(None) == CPU == resolve_device("cpu")
    with pytest.raises(MoePruneError, match="unknown device"):
        resolve_device("gpu7")
    with pytest.raises(MoePruneError, match="use cpu, cuda or cuda:N"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:0"):
            with pytest.raises(MoePruneError, match="pass --device cpu"):
                resolve_device(name)
    nested = {"a": (torch.ones(1), [torch.zeros(2)]), "b": None, "c": 3}
    moved = to_device(nested, CPU)
    assert moved["b"] is None and moved["c"] == 3 and torch.equal(moved["a"][1][0], torch.zeros(2))


def test_dtype_resolution(tiny_checkpoint, caplog):
    class Config:
        dtype = "bfloat16"

    assert resolve_dtype(None, CPU) == torch.float32  # float32 on the CPU whatever the checkpoint
    assert resolve_dtype(None, torch.device("cuda"), Config()) == torch.bfloat16  # the checkpoint's own on a GPU
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16 == resolve_dtype(torch.bfloat16, CPU)
    with pytest.raises(MoePruneError, match="unknown dtype 'float64'"):
        resolve_dtype("float64", CPU)
    with pytest.raises(MoePruneError, match="unsupported dtype"):
        resolve_dtype(torch.int8, CPU)
    with caplog.at_level("WARNING"):
        assert resolve_dtype("float16", CPU) == torch.float16
    assert "slow" in caplog.text
    # no dtype in the config: the shard headers decide
    source = tiny_checkpoint("mixtral")
    assert checkpoint_dtype(object(), LazyCheckpoint(source)) == torch.float32
    assert checkpoint_dtype(object()) == torch.float32


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_bfloat16_on_cpu_end_to_end(family, tiny_checkpoint, calibration):
    """bf16 collection works for every family; sequential == whole holds in bf16 too (parameters
    transformers keeps in float32, e.g. DeepSeek's router, stay float32 in both)."""
    source, batch = tiny_checkpoint(family), calibration(family)
    sequential = collect_stats(source, batch, mode="sequential", batch_size=2, dtype="bfloat16", device="cpu", progress=False)
    whole = collect_stats(source, batch, mode="whole", batch_size=2, dtype=torch.bfloat16, progress=False)
    assert sequential.metadata["dtype"] == "bfloat16" and sequential.metadata["device"] == "cpu"
    config = read_config(source)
    for layer, entries in sequential.layers.items():  # Inkling-2-Loop's looped layers sum their passes
        assert entries["tokens"].item() == batch.num_tokens * layer_passes(family_for_model_type(config.model_type), config, layer)
        for name, value in entries.items():
            assert value.dtype == torch.float64 and bool(torch.isfinite(value).all()), (layer, name)
            assert torch.equal(value, whole.layers[layer][name]), (layer, name)


def test_reap_kept_sets_in_bfloat16_match_float32(tiny_checkpoint, calib_file):
    """REAP at 50%: the experts kept from bf16 statistics are nearly those kept from float32 ones."""
    shared = total = 0
    for family in TINY_FAMILIES:
        source = tiny_checkpoint(family)
        batch = api.calibration_data(source, calib_file, samples=8, seq_len=32)
        plans = {}
        for dtype in ("float32", "bfloat16"):
            stats = collect_stats(source, batch, batch_size=4, dtype=dtype, progress=False)
            plans[dtype] = api.plan_pruning(source, method="reap", ratio=0.5, stats=stats, protect_super_experts=False)
        both = sum(len(set(plans["float32"].layers[l]) & set(plans["bfloat16"].layers[l])) for l in plans["float32"].layers)
        kept = sum(len(k) for k in plans["float32"].layers.values())
        assert both >= 0.75 * kept, family
        shared, total = shared + both, total + kept
    assert shared >= 0.9 * total


def test_cli_dtype_choices_and_device_errors(tiny_checkpoint, calib_file, tmp_path, capsys):
    source = tiny_checkpoint("mixtral")
    out = tmp_path / "s.safetensors"
    assert main(["collect", str(source), "--data", str(calib_file), "--out", str(out), "--dtype", "float64"]) == 2
    assert "invalid choice: 'float64'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["-q", "collect", str(source), "--data", str(calib_file), "--out", str(out), "--device", "cuda",
                     "--samples", "2", "--seq-len", "16"]) == 2
        assert "--device cpu" in capsys.readouterr().err
        assert not out.exists()
    assert main(["-q", "collect", str(source), "--data", str(calib_file), "--out", str(out), "--dtype", "bfloat16",
                 "--samples", "2", "--seq-len", "16"]) == 0
    from moeprune.stats import RouterStats

    assert RouterStats.load(out).metadata["dtype"] == "bfloat16"


def test_float16_on_cpu_keeps_fp32_modules_like_transformers(tiny_checkpoint, calibration, caplog):
    """float16 works on the CPU (with a warning); DeepSeek's float32-kept router keeps sequential == whole."""
    source, batch = tiny_checkpoint("deepseek_v3"), calibration("deepseek_v3")
    with caplog.at_level("WARNING"):
        sequential = collect_stats(source, batch, batch_size=2, dtype="float16", progress=False)
    assert "slow" in caplog.text
    whole = collect_stats(source, batch, mode="whole", batch_size=2, dtype="float16", progress=False)
    for layer, entries in sequential.layers.items():
        for name, value in entries.items():
            assert bool(torch.isfinite(value).all()) and torch.equal(value, whole.layers[layer][name]), (layer, name)
    with pytest.raises(MoePruneError, match="--tcess-pool"):
        collect_stats(source, batch, tcess_pool=-1, progress=False)
