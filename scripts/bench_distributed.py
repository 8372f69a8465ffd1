"""Data-parallel calibration speed-up: N ranks x 1 thread against 1 rank x 1 thread (issue 15).

Usage:

    python scripts/bench_distributed.py [--work DIR] [--ranks 2] [--samples 64] [--seq-len 256] [--repeat 2]

1. The Mixtral-style bench checkpoint of scripts/bench_collect.py (same generator, same folder;
   reused when it exists) and ``samples`` x ``seq_len`` seeded random tokens, saved pre-tokenized.
2. ``api.collect`` of every observer on those tokens (what ``moeprune collect`` runs), in a child
   process with one torch thread: once alone, once under ``python -m torch.distributed.run
   --nproc_per_node N`` (gloo on loopback). Two times per run: the whole processes' wall time
   (start-up and imports included) and the calibration pass (the collect call, process group,
   all-reduce and writing included, after transformers' model classes are imported; the slowest
   rank). Each is repeated ``--repeat`` times, alternating; the best counts.
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
from _profiles_doc import commit  # also puts this checkout first on sys.path

from moeprune.calibration.distributed import LAUNCHER_VARIABLES
from moeprune.stats import RouterStats

DEFAULT_WORK = Path(tempfile.gettempdir()) / "moeprune-bench"


def free_port() -> int:
    """A TCP port free on loopback now (for the rendezvous of torch.distributed.run)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


CHILD = """
import json, os, sys, time
import torch
torch.set_num_threads(1)
from moeprune import api
from moeprune.arch import build_skeleton, read_config
model, data, out, batch_size = sys.argv[1:5]
build_skeleton(read_config(model))  # transformers imports its model classes on first use: not the pass
start = time.perf_counter()
api.collect(model, data, out=out, overwrite=True, batch_size=int(batch_size), progress=False)
print(json.dumps({"rank": int(os.environ.get("RANK", 0)), "pass_s": time.perf_counter() - start}))
"""

SINGLE = "1 rank x 1 thread"


def collect_commands(child: Path, model: Path, data: Path, out_dir: Path, ranks: int, batch_size: int, port: int,
                     python: str = sys.executable) -> dict[str, list[str]]:
    """The single-process and the data-parallel command lines of the collect child script."""
    def args(out: str) -> list[str]:
        return [str(child), str(model), str(data), str(out_dir / out), str(batch_size)]

    return {
        SINGLE: [python, *args("single.safetensors")],
        f"{ranks} ranks x 1 thread": [python, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                                      "--master_addr", "127.0.0.1", "--master_port", str(port),
                                      *args("parallel.safetensors")],
    }


def parse_pass_seconds(stdout: str) -> float:
    """The slowest rank's pass time from the children's JSON lines."""
    times = [json.loads(line)["pass_s"] for line in stdout.splitlines() if line.startswith("{")]
    if not times:
        raise RuntimeError(f"no timing in the output:\n{stdout[-2000:]}")
    return max(times)


def child_env() -> dict[str, str]:
    """This checkout first on PYTHONPATH, one OpenMP thread, no inherited launcher variables."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for name in LAUNCHER_VARIABLES:
        env.pop(name, None)
    return env


def timed(command: list[str]) -> tuple[float, float]:
    """(whole wall time, slowest rank's pass time) of one command; a RuntimeError when it fails."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=child_env())
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... failed:\n{done.stderr[-3000:]}")
    return wall, parse_pass_seconds(done.stdout)


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
    lines = ["| run | calibration pass | speed-up | whole processes | speed-up |", "|---|---|---|---|---|"]
    single_pass, single_wall = results["pass_s"][SINGLE], results["wall_s"][SINGLE]
    for name in results["wall_s"]:
        run_pass, wall = results["pass_s"][name], results["wall_s"][name]
        lines.append(f"| {name} | {run_pass:.1f} s | {speedup(single_pass, run_pass):.2f} | {wall:.1f} s | "
                     f"{speedup(single_wall, wall):.2f} |")
    model = results["model"]
    lines.append("")
    lines.append(f"commit {results['commit']}; {results['samples']} x {results['seq_len']} tokens, batch size "
                 f"{results['batch_size']}, Mixtral-style checkpoint of {model['params'] / 1e6:.0f}M parameters "
                 f"(scripts/bench_collect.py); best of {results['repeat']}; {results['cpu_count']} CPU cores; "
                 f"statistics max relative error {results['max_relative_error']:.1e}.")
    return "\n".join(lines)


def prepare_model(work: Path, samples: int, seq_len: int) -> tuple[Path, Path, dict]:
    """The bench checkpoint (made by bench_collect's generator when missing) and ``samples`` x
    ``seq_len`` seeded random tokens as a pre-tokenized .safetensors file."""
    import torch
    from safetensors.torch import save_file

    model_dir = work / "mixtral-bench"
    info_file = work / "model_info.json"
    if not (model_dir / "tokens.pt").is_file() or not info_file.is_file():
        model_dir.mkdir(parents=True, exist_ok=True)
        info, _ = run_child(["-c", MAKE_MODEL, str(model_dir), str(samples), str(seq_len)])
        info_file.write_text(json.dumps(info))
    info = json.loads(info_file.read_text())
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (samples, seq_len), generator=torch.Generator().manual_seed(1))
    data = work / f"tokens-{samples}x{seq_len}.safetensors"
    save_file({"input_ids": ids}, str(data))
    return model_dir, data, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(DEFAULT_WORK), help="folder of the bench checkpoint (bench_collect's)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    work = Path(args.work)
    model_dir, data, info = prepare_model(work, args.samples, args.seq_len)
    child = work / "collect_child.py"
    child.write_text(CHILD)
    names = list(collect_commands(child, model_dir, data, work, args.ranks, args.batch_size, 0))
    walls: dict[str, list[float]] = {name: [] for name in names}
    passes: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeat):
        for name in names:  # alternate, so background load hits both alike
            command = collect_commands(child, model_dir, data, work, args.ranks, args.batch_size, free_port())[name]
            wall, run_pass = timed(command)
            walls[name].append(wall)
            passes[name].append(run_pass)
    results = {
        "commit": commit(), "ranks": args.ranks, "samples": args.samples, "seq_len": args.seq_len,
        "batch_size": args.batch_size, "repeat": args.repeat, "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(), "model": info,
        "runs_wall_s": walls, "runs_pass_s": passes,
        "wall_s": {name: min(values) for name, values in walls.items()},
        "pass_s": {name: min(values) for name, values in passes.items()},
    }
    parallel = names[1]
    results["speedup_pass"] = speedup(results["pass_s"][SINGLE], results["pass_s"][parallel])
    results["speedup_wall"] = speedup(results["wall_s"][SINGLE], results["wall_s"][parallel])
    results["max_relative_error"] = max_relative_error(RouterStats.load(work / "parallel.safetensors"),
                                                       RouterStats.load(work / "single.safetensors"))
    (work / "bench_distributed.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(markdown_table(results))


if __name__ == "__main__":
    main()
