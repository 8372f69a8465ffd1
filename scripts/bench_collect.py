"""Benchmarks of the core (issue 2): collection overhead, sequential-engine memory, and a peer.

Every measurement runs in its own child process, so wall time and peak RSS (ru_maxrss) are the
whole process's. Usage:

    python scripts/bench_collect.py [--work runs/bench] [--threads 2] [--peer]

1. A Mixtral-style checkpoint of >= 100M parameters is generated (random weights, bf16 not used:
   float32 on CPU), with calibration tokens saved beside it.
2. overhead: collection time / plain forward time on the same tokens (plain = vanilla
   transformers forward of the model body, no hooks), for whole-model and sequential collection.
3. memory: peak RSS of sequential collection vs loading the whole model and collecting.
4. --peer: llm-compressor's REAPPruningModifier (scripts/setup_peer_venv.sh makes its virtualenv)
   against `moeprune prune --method reap` on the same model and tokens, single-threaded: whole
   process wall time, peak RSS, and the overlap of the kept experts.
Results are printed as JSON and written to <work>/bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _profiles_doc import commit  # short HEAD, marked when tracked files outside docs/ differ

ROOT = Path(__file__).resolve().parent.parent
PEER_PYTHON = Path(os.environ.get("MOEPRUNE_PEER_PYTHON", "/opt/peer-venv/bin/python"))

MAKE_MODEL = """
import torch, json, sys
from transformers import MixtralConfig, AutoModelForCausalLM
from moeprune.tokenizer import tiny_tokenizer
out = sys.argv[1]
shape = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
             max_position_embeddings=4096, tie_word_embeddings=False)
shape.update(json.loads(sys.argv[4]) if len(sys.argv) > 4 else {})  # config overrides (other benchmarks)
cfg = MixtralConfig(**shape)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg)
params = sum(p.numel() for p in model.parameters())
model.save_pretrained(out, max_shard_size="200MB")
tiny_tokenizer().save_pretrained(out)
torch.manual_seed(1)
ids = torch.randint(0, cfg.vocab_size, (int(sys.argv[2]), int(sys.argv[3])))
torch.save({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, out + "/tokens.pt")
layer = sum(p.numel() for p in model.model.layers[0].parameters())
print(json.dumps({"params": params, "layer_params": layer, "bytes": params * 4, "layer_bytes": layer * 4}))
"""

CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(int(sys.argv[3]))
from moeprune.calibration.data import CalibrationBatch
from moeprune.calibration.engine import collect_stats, load_full_model
model_dir, what = sys.argv[1], sys.argv[2]
tokens = torch.load(model_dir + "/tokens.pt")
cal = CalibrationBatch(tokens["input_ids"], tokens["attention_mask"])
t_import = time.perf_counter() - t0
t1 = time.perf_counter()
if what == "plain":
    model = load_full_model(model_dir)
    t_load = time.perf_counter() - t1
    t2 = time.perf_counter()
    with torch.no_grad():
        for ids, mask in cal.batches(4):
            model.model(input_ids=ids, attention_mask=mask, use_cache=False)
    t_run = time.perf_counter() - t2
else:
    collect_stats(model_dir, cal, mode=what, batch_size=4, progress=False)
    t_load, t_run = 0.0, time.perf_counter() - t1
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"what": what, "import_s": t_import, "load_s": t_load, "run_s": t_run, "peak_rss_mb": rss}))
"""

MOEPRUNE_REAP = """
import json, resource, sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
from moeprune import api
from moeprune.calibration.data import CalibrationBatch
tokens = torch.load(sys.argv[1] + "/tokens.pt")
cal = CalibrationBatch(tokens["input_ids"], tokens["attention_mask"])
stats = api.collect(sys.argv[1], calibration=cal, batch_size=4, progress=False)
plan = api.plan_pruning(sys.argv[1], method="reap", ratio=0.5, stats=stats, protect_super_experts=False)
api.apply(sys.argv[1], plan, sys.argv[2], overwrite=True, progress=False)
print(json.dumps({"layers": {str(k): v for k, v in plan.layers.items()},
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_child(args: list[str], python: str = sys.executable) -> tuple[dict, float]:
    start = time.perf_counter()
    done = subprocess.run([python, *args], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{args[:2]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/bench")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--peer", action="store_true", help="also run llm-compressor's REAP (needs its virtualenv)")
    parser.add_argument("--peer-propagate-error", action="store_true",
                        help="run the peer with its default propagate_error=True (scores layer L on the already "
                             "pruned layers < L); the default scores every layer on the unpruned model, which is "
                             "moeprune's choice (equal choice)")
    args = parser.parse_args()
    work = Path(args.work)
    model_dir = work / "mixtral-bench"
    results: dict = {"commit": commit(), "threads": args.threads, "samples": args.samples, "seq_len": args.seq_len}
    if not (model_dir / "tokens.pt").is_file():
        model_dir.mkdir(parents=True, exist_ok=True)
        info, _ = run_child(["-c", MAKE_MODEL, str(model_dir), str(args.samples), str(args.seq_len)])
        (work / "model_info.json").write_text(json.dumps(info))
    results["model"] = json.loads((work / "model_info.json").read_text())

    runs = {}
    for what in ("plain", "whole", "sequential"):
        runs[what], wall = run_child(["-c", CHILD, str(model_dir), what, str(args.threads)])
        runs[what]["wall_s"] = wall
    results["runs"] = runs
    # collection (load + one instrumented pass) over plain (vanilla load + one forward), same tokens
    plain = runs["plain"]["load_s"] + runs["plain"]["run_s"]
    results["collect_over_plain_whole"] = runs["whole"]["run_s"] / plain
    results["collect_over_plain_sequential"] = runs["sequential"]["run_s"] / plain
    layer_mb = results["model"]["layer_bytes"] / 2**20
    results["memory"] = {
        "model_mb": results["model"]["bytes"] / 2**20,
        "one_layer_mb": layer_mb,
        "activations_mb": args.samples * args.seq_len * 512 * 4 / 2**20,
        "sequential_peak_mb": runs["sequential"]["peak_rss_mb"],
        "whole_peak_mb": runs["whole"]["peak_rss_mb"],
    }

    if args.peer:
        if not PEER_PYTHON.exists():
            raise SystemExit(f"{PEER_PYTHON} missing: run scripts/setup_peer_venv.sh first")
        mine, my_wall = run_child(["-c", MOEPRUNE_REAP, str(model_dir), str(work / "moeprune-reap"), "1"])
        peer, peer_wall = run_child(
            ["scripts/bench_peer_reap.py", "--model", str(model_dir), "--tokens", str(model_dir / "tokens.pt"),
             "--ratio", "0.5", "--out", str(work / "peer-reap"), "--threads", "1",
             *([] if args.peer_propagate_error else ["--no-propagate-error"])],
            python=str(PEER_PYTHON),
        )
        overlap = {}
        for layer, kept in mine["layers"].items():
            theirs = set(peer["layers"].get(layer, []))
            overlap[layer] = len(set(kept) & theirs) / max(len(kept), 1)
        results["peer"] = {
            "moeprune_wall_s": my_wall, "moeprune_peak_rss_mb": mine["peak_rss_mb"],
            "peer_wall_s": peer_wall, "peer_peak_rss_mb": peer.get("peak_rss_mb"),
            "peer_propagate_error": args.peer_propagate_error, "wall_ratio": my_wall / peer_wall,
            "kept_overlap_per_layer": overlap,
            "moeprune_layers": mine["layers"], "peer_layers": peer["layers"],
        }
    (work / "bench.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
