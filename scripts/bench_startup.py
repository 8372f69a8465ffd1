"""Start-up wall time of the command line (issue 10 section 7), against importing torch, in one run.

Each command runs ``--repeat`` times (default 5) in a fresh child process, after one untimed warm-up
run (``--no-warmup`` skips it); the table gives the median and the minimum wall time:

* ``python -c "import torch"`` (the floor any torch program pays),
* ``python -m moeprune.cli --help`` (should import neither torch nor transformers),
* ``python -m moeprune.cli inspect MODEL --json`` on a tiny generated Mixtral checkpoint
  (:func:`moeprune.tiny.save_tiny_checkpoint`, no tokenizer: inspect reads none; in a temporary
  folder).

It also reports which of torch / transformers ``moeprune --help`` imports. Usage:

    python scripts/bench_startup.py [--repeat 5] [--json startup.json]

Prints a markdown table; ``--json`` also writes the raw timings with the commit (short hash,
"+uncommitted changes" when tracked files outside docs/ differ) and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from _profiles_doc import ROOT, commit  # ROOT is put on sys.path there

from moeprune.io.output import atomic_write_json

#: Printed by the child of :data:`HELP_IMPORTS` after ``moeprune --help``: the heavy modules it loaded.
HELP_IMPORTS = """
import sys
sys.argv = ["moeprune", "--help"]
from moeprune.cli import main
try:
    main()
except SystemExit:
    pass
print("HEAVY=" + ",".join(m for m in ("torch", "transformers") if m in sys.modules))
"""


def commands(model_dir: str | Path, python: str = sys.executable) -> dict[str, list[str]]:
    """The measured command lines, by the name the table shows."""
    return {
        'python -c "import torch"': [python, "-c", "import torch"],
        "moeprune --help": [python, "-m", "moeprune.cli", "--help"],
        "moeprune inspect MODEL --json": [python, "-m", "moeprune.cli", "inspect", str(model_dir), "--json"],
    }


def child_env() -> dict[str, str]:
    """The environment of the children: this checkout first on PYTHONPATH, one torch thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def time_command(argv: Sequence[str], env: dict[str, str]) -> float:
    """Wall time in seconds of one run of ``argv``; a failing command raises with its stderr."""
    start = time.perf_counter()
    done = subprocess.run(list(argv), capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return wall


def summarize(times: Sequence[float]) -> dict:
    """Median, minimum and every run of a list of wall times (seconds)."""
    if not times:
        raise ValueError("no timings to summarize")
    return {"median_s": statistics.median(times), "min_s": min(times), "runs_s": list(times)}


def heavy_imports_of_help(env: dict[str, str], python: str = sys.executable) -> list[str]:
    """Which of torch / transformers ``moeprune --help`` imports (empty: neither)."""
    done = subprocess.run([python, "-c", HELP_IMPORTS], capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("HEAVY=")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"could not run moeprune --help:\n{done.stderr[-2000:]}")
    return [name for name in lines[-1][len("HEAVY="):].split(",") if name]


def machine() -> dict:
    """CPU count and the python / torch / transformers versions of this machine."""
    import torch
    import transformers

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}


def markdown_table(results: dict) -> str:
    """The timings as a markdown table, each median also relative to ``import torch``."""
    rows = results["timings"]
    floor = next(iter(rows.values()))["median_s"]
    lines = [f"Start-up wall time, {results['repeat']} runs each (commit {results['commit']}, "
             f"{results['machine']['cpu_count']} CPUs, torch {results['machine']['torch']}):", "",
             "| command | median | min | median / import torch |", "|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| `{name}` | {row['median_s']:.2f} s | {row['min_s']:.2f} s | {row['median_s'] / floor:.2f} |")
    heavy = results["help_imports"]
    lines += ["", f"`moeprune --help` imports: {', '.join(heavy) if heavy else 'neither torch nor transformers'}"]
    return "\n".join(lines)


def run(repeat: int = 5, warmup: bool = True) -> dict:
    """Measure every command of :func:`commands` ``repeat`` times; returns the results dict."""
    from moeprune.tiny import save_tiny_checkpoint

    if repeat < 1:
        raise ValueError("--repeat must be at least 1")
    env = child_env()
    with tempfile.TemporaryDirectory(prefix="moeprune-startup-") as tmp:
        model_dir = save_tiny_checkpoint("mixtral", Path(tmp) / "tiny-mixtral", with_tokenizer=False)
        timings = {}
        for name, argv in commands(model_dir).items():
            if warmup:
                time_command(argv, env)
            timings[name] = summarize([time_command(argv, env) for _ in range(repeat)])
    return {"commit": commit(), "machine": machine(), "repeat": repeat, "warmup": warmup,
            "timings": timings, "help_imports": heavy_imports_of_help(env)}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per command (default 5)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed first run of each command")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    results = run(args.repeat, warmup=not args.no_warmup)
    if args.json:
        atomic_write_json(args.json, results, overwrite=True)
    print(markdown_table(results))
    return results


if __name__ == "__main__":
    main()
