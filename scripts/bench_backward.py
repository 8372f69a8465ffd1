"""Benchmark of the layer-by-layer backward pass (HEAPr statistics) against a forward statistics pass.

Usage:

    OMP_NUM_THREADS=1 python scripts/bench_backward.py [--work runs/bench] [--threads 1]

On the Mixtral-style bench checkpoint of scripts/bench_collect.py (same generator and folder, built
when missing; its tokens.pt: 32 x 256 tokens by default), each in its own child process (wall time and
peak RSS = ru_maxrss of the whole process):

* ``forward``: ``collect_stats`` with the default observers (sequential, batch size 4);
* ``backward``: ``collect_stats`` with the observers HEAPr reads (``heapr``, ``routing``): forward
  sweep saving every layer's input, the loss through the output head, then recompute + backward of
  every layer from the top;
* ``backward_all``: the same plus every default observer in the same pass (``--all``).

Targets (issue 11): backward time <= 4 x forward time; backward peak RSS <= one decoder layer + the
saved layer inputs + 1 GiB. Each run is repeated (``--repeat``, alternated) and the best time kept;
CPU time (user + system) is reported beside wall time, since on a shared machine it depends far
less on the load. Results are printed as JSON and written to <work>/bench_backward.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from _profiles_doc import commit  # short HEAD, marked when tracked files outside docs/ differ
from bench_collect import MAKE_MODEL, run_child

CHILD = """
import json, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[3]))
from moeprune.calibration.data import CalibrationBatch
from moeprune.calibration.engine import collect_stats
from moeprune.observe import observer_names, OBSERVERS
model_dir, what = sys.argv[1], sys.argv[2]
tokens = torch.load(model_dir + "/tokens.pt")
cal = CalibrationBatch(tokens["input_ids"], tokens["attention_mask"])
default = [n for n in observer_names() if not OBSERVERS[n].opt_in]
observers = {"forward": None, "backward": ["heapr", "routing"], "backward_all": default + ["heapr"]}[what]
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0, c0 = time.perf_counter(), cpu()
stats = collect_stats(model_dir, cal, mode="sequential", batch_size=4, observers=observers, progress=False)
run_s, cpu_s = time.perf_counter() - t0, cpu() - c0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"what": what, "run_s": run_s, "cpu_s": cpu_s, "peak_rss_mb": rss, "rss_after_import_mb": rss0,
                  "loss_mean": stats.metadata.get("loss_mean")}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/bench", help="folder of the bench checkpoint (bench_collect's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--all", action="store_true", help="also time the backward pass with every default observer")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each, alternated; the best time is kept")
    args = parser.parse_args()
    work = Path(args.work)
    model_dir = work / "mixtral-bench"
    if not (model_dir / "tokens.pt").is_file():
        model_dir.mkdir(parents=True, exist_ok=True)
        info, _ = run_child(["-c", MAKE_MODEL, str(model_dir), str(args.samples), str(args.seq_len)])
        (work / "model_info.json").write_text(json.dumps(info))
    model = json.loads((work / "model_info.json").read_text())
    results: dict = {"commit": commit(), "threads": args.threads, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                     "model": model}
    runs: dict[str, dict] = {}
    for _ in range(args.repeat):  # alternated, so a change of machine load hits both
        for what in ("forward", "backward", *(("backward_all",) if args.all else ())):
            run, wall = run_child(["-c", CHILD, str(model_dir), what, str(args.threads)])
            run["wall_s"] = wall
            best = runs.setdefault(what, run)
            for key in ("run_s", "cpu_s", "wall_s"):
                best[key] = min(best[key], run[key])
            best["peak_rss_mb"] = max(best["peak_rss_mb"], run["peak_rss_mb"])
    results["runs"] = runs
    import torch  # the tokens' shape (the checkpoint folder may hold tokens of another size)

    tokens = torch.load(model_dir / "tokens.pt")["input_ids"]
    config = json.loads((model_dir / "config.json").read_text())
    num_layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    saved_mb = num_layers * tokens.numel() * hidden * 4 / 2**20  # float32 inputs of every layer
    budget_mb = model["layer_bytes"] / 2**20 + saved_mb + 1024
    results["samples"], results["seq_len"] = list(tokens.shape)
    results["time_ratio"] = runs["backward"]["run_s"] / runs["forward"]["run_s"]
    results["cpu_time_ratio"] = runs["backward"]["cpu_s"] / runs["forward"]["cpu_s"]  # robust to machine load
    results["memory"] = {"one_layer_mb": model["layer_bytes"] / 2**20, "saved_inputs_mb": saved_mb,
                         "budget_mb": budget_mb, "backward_peak_mb": runs["backward"]["peak_rss_mb"],
                         "forward_peak_mb": runs["forward"]["peak_rss_mb"], "model_mb": model["bytes"] / 2**20}
    results["targets_met"] = {"time": results["time_ratio"] <= 4.0, "memory": runs["backward"]["peak_rss_mb"] <= budget_mb}
    (work / "bench_backward.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
