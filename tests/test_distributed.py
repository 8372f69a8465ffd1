"""Data-parallel calibration (moeprune.calibration.distributed): the sharding rule, the single-process
paths, and 2 gloo ranks on CPU whose statistics, plans and pruned checkpoints equal a single-process
run on the same sequences (statistics to float64 relative error 1e-9, TCESS included; plans and
checkpoint tensors identical), through the API (forked ranks) and the CLI (torchrun)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import save_file

from moeprune import api
from moeprune.calibration.data import load_pretokenized
from moeprune.calibration.distributed import (
    LAUNCHER_VARIABLES,
    DistributedContext,
    all_reduce_layers,
    backend_for,
    distributed_pass,
    is_writer,
    rank_batches,
    rank_device,
    shard_batches,
)
from moeprune.errors import MoePruneError
from moeprune.stats import RouterStats
from test_observe import assert_stats_close

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
FAMILY = "qwen2_moe"  # shared experts: every observer has something to observe
#: (name, rows, batch_size, mode): 3 uneven batches (2 + 1 on the ranks, last batch short), one batch
#: for two ranks (rank 1 runs nothing), and the whole-model engine.
COLLECT_CASES = (("uneven", 5, 2, "sequential"), ("empty_rank", 3, 4, "sequential"), ("whole", 5, 2, "whole"))
PRUNE = {"method": "reap", "ratio": 0.5, "batch_size": 2}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_env(rank: int, port: int) -> dict[str, str]:
    """What torchrun sets for one rank on one node."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


@pytest.fixture(scope="module")
def model_and_data(tiny_checkpoint, tmp_path_factory):
    """A tiny qwen2_moe checkpoint and a pre-tokenized file of 5 rows (one row partly padded)."""
    model = tiny_checkpoint(FAMILY)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (5, 16), generator=generator)
    mask = torch.ones_like(ids)
    mask[3, 9:] = 0
    data = tmp_path_factory.mktemp("dist-data") / "tokens.safetensors"
    save_file({"input_ids": ids, "attention_mask": mask}, str(data))
    return model, data


# -- the sharding rule and the single-process paths -----------------------------------------------


def test_round_robin_shards_by_whole_batches():
    assert shard_batches(5, 0, 2) == [0, 2, 4]
    assert shard_batches(5, 1, 2) == [1, 3]
    assert shard_batches(1, 1, 2) == []
    assert shard_batches(3, 0, 1) == [0, 1, 2]
    for batches in range(7):
        for world in range(1, 5):
            shards = [shard_batches(batches, rank, world) for rank in range(world)]
            assert sorted(b for shard in shards for b in shard) == list(range(batches))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError):
        shard_batches(4, 2, 2)
    context = DistributedContext(rank=1, world_size=3)
    assert rank_batches(["a", "b", "c", "d", "e"], context) == ["b", "e"]


def test_single_process_is_rank_zero_of_one(monkeypatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with distributed_pass(torch.device("cpu")) as context:
        assert (context.rank, context.world_size, context.active, context.created_group) == (0, 1, False, False)
    layers = {0: {"tokens": torch.tensor(3.0, dtype=torch.float64)}}
    assert all_reduce_layers(layers, context) is layers
    assert is_writer()
    monkeypatch.setenv("RANK", "1")
    assert not is_writer()
    assert backend_for(torch.device("cpu")) == "gloo" and backend_for(torch.device("cuda", 0)) == "nccl"
    assert rank_device(torch.device("cpu"), DistributedContext(1, 2, 1)) == torch.device("cpu")


def test_world_size_without_launcher_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(MoePruneError, match="torchrun"):
        with distributed_pass(torch.device("cpu")):
            pass
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(MoePruneError, match="not an integer"):
        with distributed_pass(torch.device("cpu")):
            pass


# -- 2 gloo ranks == 1 process ---------------------------------------------------------------------


def _rows(data: Path, rows: int):
    whole = load_pretokenized(data)
    return type(whole)(whole.input_ids[:rows].clone(), whole.attention_mask[:rows].clone())


def _rank_worker(rank: int, model: str, data: str, out: str, ports: list[int]) -> None:
    """One rank: every collect case and one prune, each in its own process group (env://)."""
    torch.set_num_threads(1)
    out = Path(out)
    for (name, rows, batch_size, mode), port in zip(COLLECT_CASES, ports):
        os.environ.update(launcher_env(rank, port))
        stats = api.collect(model, calibration=_rows(Path(data), rows), batch_size=batch_size, mode=mode,
                            out=out / f"{name}-written-by-{rank}.safetensors", progress=False)
        stats.save(out / f"{name}-returned-{rank}.safetensors")  # what this rank's caller received
    os.environ.update(launcher_env(rank, ports[-1]))
    plan = api.prune(model, out / f"pruned-by-{rank}", data=data, progress=False, **PRUNE)
    (out / f"plan-returned-{rank}.json").write_text(json.dumps(plan.layers))


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(model_and_data, tmp_path):
    model, data = model_and_data
    # references first: the forked ranks then inherit this process's imports (a fresh interpreter
    # spends ~10 s importing transformers' model classes on a busy machine)
    references = {name: api.collect(model, calibration=_rows(data, rows), batch_size=batch_size, mode=mode,
                                    progress=False) for name, rows, batch_size, mode in COLLECT_CASES}
    reference_plan = api.prune(model, tmp_path / "pruned-single", data=data, progress=False, **PRUNE)
    ports = [free_port() for _ in range(len(COLLECT_CASES) + 1)]
    mp.start_processes(_rank_worker, args=(str(model), str(data), str(tmp_path), ports), nprocs=WORLD, join=True,
                       start_method="fork")
    for name, rows, batch_size, mode in COLLECT_CASES:
        reference = references[name]
        assert "tcess" in reference.layers[min(reference.layers)]
        written = RouterStats.load(tmp_path / f"{name}-written-by-0.safetensors")
        assert not (tmp_path / f"{name}-written-by-1.safetensors").exists()  # rank 0 alone writes
        for stats in (written, *(RouterStats.load(tmp_path / f"{name}-returned-{r}.safetensors") for r in range(WORLD))):
            assert_stats_close(stats, reference)  # TCESS is re-derived on load, so it is compared too
            assert {k: v for k, v in stats.metadata.items() if k != "format_version"} == reference.metadata
    assert not (tmp_path / "pruned-by-1").exists()
    for rank in range(WORLD):
        returned = json.loads((tmp_path / f"plan-returned-{rank}.json").read_text())
        assert {int(k): v for k, v in returned.items()} == reference_plan.layers
    written_plan = json.loads((tmp_path / "pruned-by-0" / "moeprune_plan.json").read_text())
    assert {int(k): v for k, v in written_plan["layers"].items()} == reference_plan.layers
    assert_same_tensors(checkpoint_tensors(tmp_path / "pruned-by-0"), checkpoint_tensors(tmp_path / "pruned-single"))


def _mismatched_rank(rank: int, model: str, data: str, out: str, port: int) -> None:
    """A rank given other rows than rank 0: the pass must refuse (on every rank), never hang."""
    torch.set_num_threads(1)
    os.environ.update(launcher_env(rank, port))
    try:
        api.collect(model, calibration=_rows(Path(data), 4 + rank), batch_size=2, progress=False)
    except MoePruneError as exc:
        (Path(out) / f"refused-{rank}.txt").write_text(str(exc))


def test_ranks_with_other_data_are_refused(model_and_data, tmp_path):
    model, data = model_and_data
    mp.start_processes(_mismatched_rank, args=(str(model), str(data), str(tmp_path), free_port()), nprocs=WORLD,
                       join=True, start_method="fork")
    for rank in range(WORLD):
        assert "data_hash" in (tmp_path / f"refused-{rank}.txt").read_text()


@pytest.mark.slow
def test_torchrun_cli_collect_equals_single_process(model_and_data, tmp_path):
    model, data = model_and_data
    out = tmp_path / "dp.safetensors"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for name in LAUNCHER_VARIABLES:
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "moeprune.cli", "-q", "--threads", "1", "collect", str(model), "--data", str(data),
               "--out", str(out), "--batch-size", "2"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote statistics") == 1  # rank 0 alone reports (and writes)
    reference = api.collect(model, data, batch_size=2, progress=False)
    got = RouterStats.load(out)
    assert_stats_close(got, reference)
    assert {k: v for k, v in got.metadata.items() if k != "format_version"} == reference.metadata
    assert got.metadata["samples"] == 5 and got.metadata["num_tokens"] == 5 * 16 - 7


# -- scripts/bench_distributed.py: its pure helpers (never the timings) ---------------------------


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_distributed

        yield bench_distributed
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def test_bench_commands_and_figures(bench, tmp_path):
    commands = bench.collect_commands(tmp_path / "child.py", tmp_path / "m", tmp_path / "d.safetensors", tmp_path,
                                      ranks=2, batch_size=4, port=1234, python="py")
    assert commands[bench.SINGLE] == ["py", str(tmp_path / "child.py"), str(tmp_path / "m"),
                                      str(tmp_path / "d.safetensors"), str(tmp_path / "single.safetensors"), "4"]
    assert commands["2 ranks x 1 thread"][:9] == ["py", "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                                  "--master_addr", "127.0.0.1", "--master_port", "1234"]
    assert bench.parse_pass_seconds('noise\n{"rank": 0, "pass_s": 2.0}\n{"rank": 1, "pass_s": 3.5}\n') == 3.5
    assert bench.speedup(10.0, 4.0) == 2.5
    results = {"commit": "abc1234", "samples": 8, "seq_len": 4, "batch_size": 2, "repeat": 2, "cpu_count": 2,
               "max_relative_error": 3e-16, "model": {"params": 140e6},
               "pass_s": {bench.SINGLE: 10.0, "2 ranks x 1 thread": 4.0},
               "wall_s": {bench.SINGLE: 20.0, "2 ranks x 1 thread": 16.0}}
    table = bench.markdown_table(results)
    assert "| 2 ranks x 1 thread | 4.0 s | 2.50 | 16.0 s | 1.25 |" in table
    assert "commit abc1234" in table and "140M parameters" in table


def test_bench_relative_error(bench):
    want = RouterStats({0: {"a": torch.tensor([2.0, 0.0], dtype=torch.float64)}})
    assert bench.max_relative_error(RouterStats({0: {"a": torch.tensor([2.5, 0.0], dtype=torch.float64)}}), want) == 0.25
    assert bench.max_relative_error(RouterStats({0: {"a": torch.tensor([2.0, 1e-30], dtype=torch.float64)}}), want) == float("inf")
