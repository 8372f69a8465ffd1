"""Data-parallel calibration speed-up: N ranks x 1 thread against 1 rank x 1 thread (issue 15).

Usage:

    python scripts/bench_distributed.py [--work DIR] [--ranks 2] [--samples 32] [--seq-len 256] [--repeat 2]

1. The Mixtral-style bench checkpoint of scripts/bench_collect.py (same generator, same folder
   layout; reused when it exists), with its calibration tokens also saved pre-tokenized.
2. ``moeprune collect`` of every observer on those tokens, timed as whole processes (start-up,
   imports and writing included): once as one process with ``--threads 1``, once under
   ``python -m torch.distributed.run --nproc_per_node N`` with ``--threads 1`` per rank (gloo on
   loopback). Each is repeated ``--repeat`` times; the best wall time counts.
3. The two statistics files are compared (largest float64 relative error over every entry, which
   the equality test bounds by 1e-9).

Writes <work>/bench_distributed.json and prints it, then a markdown table with the commit.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_collect import MAKE_MODEL, ROOT, run_child
from _profiles_doc import commit

DEFAULT_WORK = Path(tempfile.gettempdir()) / "moeprune-bench"


def free_port() -> int:
    """A TCP port free on loopback now (for the rendezvous of torch.distributed.run)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def collect_commands(model: Path, data: Path, out_dir: Path, ranks: int, batch_size: int, port: int,
                     python: str = sys.executable) -> dict[str, list[str]]:
    """The single-process and the data-parallel ``moeprune collect`` command lines."""
    def cli(out: str) -> list[str]:
        return ["-m", "moeprune.cli", "-q", "--threads", "1", "collect", str(model), "--data", str(data),
                "--out", str(out_dir / out), "--batch-size", str(batch_size), "--overwrite"]

    return {
        "1 rank x 1 thread": [python, *cli("single.safetensors")],
        f"{ranks} ranks x 1 thread": [python, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                                      "--master_addr", "127.0.0.1", "--master_port", str(port),
                                      *cli("parallel.safetensors")],
    }


def child_env() -> dict[str, str]:
    """This checkout first on PYTHONPATH, one OpenMP thread, no inherited launcher variables."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def timed(command: list[str]) -> float:
    """Wall time of one command (a RuntimeError with its stderr when it fails)."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=child_env())
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... failed:\n{done.stderr[-3000:]}")
    return wall


def speedup(single_s: float, parallel_s: float) -> float:
    """Single-process wall time over data-parallel wall time (> 1: the ranks are faster)."""
    return single_s / parallel_s


def max_relative_error(got, want) -> float:
    """Largest |got - want| / |want| over every entry of two RouterStats (0 where both are 0)."""
    worst = 0.0
    for layer, entries in want.layers.items():
        for name, value in entries.items():
            diff = (got.layers[layer][name].double() - value.double()).abs()
            scale = value.double().abs()
            nonzero = scale > 0
            if bool((diff[~nonzero] > 0).any()):
                return float("inf")
            if bool(nonzero.any()):
                worst = max(worst, float((diff[nonzero] / scale[nonzero]).max()))
    return worst


def markdown_table(results: dict) -> str:
    """The figures as a markdown table, with the commit, the machine and the sizes."""
    lines = ["| run | best wall time | speed-up |", "|---|---|---|"]
    single = results["wall_s"]["1 rank x 1 thread"]
    for name, wall in results["wall_s"].items():
        lines.append(f"| `{name}` | {wall:.1f} s | {speedup(single, wall):.2f} |")
    model = results["model"]
    lines.append("")
    lines.append(f"commit {results['commit']}; {results['samples']} x {results['seq_len']} tokens, batch size "
                 f"{results['batch_size']}, Mixtral-style checkpoint of {model['params'] / 1e6:.0f}M parameters "
                 f"(scripts/bench_collect.py); whole processes, best of {results['repeat']}; "
                 f"{results['cpu_count']} CPU cores; statistics max relative error {results['max_relative_error']:.1e}.")
    return "\n".join(lines)


def prepare_model(work: Path, samples: int, seq_len: int) -> tuple[Path, Path, dict]:
    """The bench checkpoint (made by bench_collect's generator when missing) and its tokens as a
    pre-tokenized .safetensors file."""
    import torch
    from safetensors.torch import save_file

    model_dir = work / "mixtral-bench"
    info_file = work / "model_info.json"
    if not (model_dir / "tokens.pt").is_file() or not info_file.is_file():
        model_dir.mkdir(parents=True, exist_ok=True)
        info, _ = run_child(["-c", MAKE_MODEL, str(model_dir), str(samples), str(seq_len)])
        info_file.write_text(json.dumps(info))
    tokens = torch.load(model_dir / "tokens.pt")
    if tuple(tokens["input_ids"].shape) != (samples, seq_len):
        raise SystemExit(f"{model_dir} holds {tuple(tokens['input_ids'].shape)} tokens, not {samples} x {seq_len}: "
                         "pass the sizes it was made with, or another --work")
    data = work / "tokens.safetensors"
    save_file({"input_ids": tokens["input_ids"].contiguous(), "attention_mask": tokens["attention_mask"].contiguous()},
              str(data))
    return model_dir, data, json.loads(info_file.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(DEFAULT_WORK), help="folder of the bench checkpoint (bench_collect's)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from moeprune.stats import RouterStats

    work = Path(args.work)
    model_dir, data, info = prepare_model(work, args.samples, args.seq_len)
    commands = collect_commands(model_dir, data, work, args.ranks, args.batch_size, free_port())
    walls: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.repeat):
        for name in commands:  # alternate, so background load hits both alike
            command = collect_commands(model_dir, data, work, args.ranks, args.batch_size, free_port())[name]
            walls[name].append(timed(command))
    results = {
        "commit": commit(), "ranks": args.ranks, "samples": args.samples, "seq_len": args.seq_len,
        "batch_size": args.batch_size, "repeat": args.repeat, "cpu_count": os.cpu_count(), "model": info,
        "commands": {name: " ".join(command) for name, command in commands.items()},
        "runs_s": walls, "wall_s": {name: min(values) for name, values in walls.items()},
    }
    single, parallel = results["wall_s"].values()
    results["speedup"] = speedup(single, parallel)
    results["max_relative_error"] = max_relative_error(RouterStats.load(work / "parallel.safetensors"),
                                                       RouterStats.load(work / "single.safetensors"))
    (work / "bench_distributed.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(markdown_table(results))


if __name__ == "__main__":
    main()
