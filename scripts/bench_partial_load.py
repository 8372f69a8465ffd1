"""Benchmark of the partial load (issue 4): peak RSS and load time against a full vanilla load.

    python scripts/bench_partial_load.py [--work runs/bench-partial] [--repeats 3] [--threads 1]

1. A Mixtral-style checkpoint whose bytes are >= 90% routed experts is generated once with
   scripts/bench_collect.py's builder (random float32 weights, 200 MB shards) and cached in --work.
2. Each measurement runs in a fresh child process (so its peak RSS, ru_maxrss, is its own): a full
   vanilla ``AutoModelForCausalLM.from_pretrained`` load, and ``moeprune.loader.load_with_experts``
   keeping 25/50/75/100% of the experts of every MoE layer (a random subset per layer, seed 0).
   Every child imports the modeling code first and records its RSS then (the interpreter, torch,
   transformers), so load times exclude imports and the load's own memory is ``peak - baseline``.
3. Each is repeated --repeats times; the median is reported. Target (issue 4): the partial load's
   peak is at most (kept fraction + 0.1) x the full load's, reported for the whole-process peak and
   for the load's own increment.
A markdown table and the JSON results are printed; the JSON is also written to <work>/bench.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _profiles_doc import commit  # noqa: E402
from bench_collect import MAKE_MODEL, run_child  # noqa: E402  (the shared model builder)

#: 16 experts of 3 x 512 x 1024 in 8 layers (805 MB) against 8000 x 512 embeddings, head and attention.
MODEL_SHAPE = {"num_local_experts": 16, "num_experts_per_tok": 2, "vocab_size": 8000}
FRACTIONS = (0.25, 0.5, 0.75, 1.0)

CHILD = """
import json, resource, sys, time
import psutil, torch
torch.set_num_threads(int(sys.argv[3]))
import accelerate
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from moeprune.loader import load_with_experts
model_dir, what = sys.argv[1], sys.argv[2]
MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(model_dir))]  # import the modeling code untimed
baseline = psutil.Process().memory_info().rss / 2**20
t0 = time.perf_counter()
if what == "full":
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
else:
    model = load_with_experts(model_dir, json.loads(what)["kept"])
load_s = time.perf_counter() - t0
with torch.no_grad():
    model(torch.zeros(1, 4, dtype=torch.long))  # it works
params = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"load_s": load_s, "baseline_rss_mb": baseline, "peak_rss_mb": peak, "param_mb": params}))
"""


def kept_experts(num_experts: int, fraction: float, layers: int, seed: int = 0) -> dict[int, list[int]]:
    """A random subset of round(fraction x E) experts per layer (reproducible)."""
    import torch

    count = round(fraction * num_experts)
    generator = torch.Generator().manual_seed(seed)
    return {layer: sorted(torch.randperm(num_experts, generator=generator)[:count].tolist()) for layer in range(layers)}


def expert_fraction(model_dir: Path) -> dict:
    """Routed-expert bytes over all weight bytes, from moeprune inspect."""
    from moeprune import api

    info = api.inspect(model_dir)
    return {key: info[key] for key in ("weights_bytes", "routed_expert_bytes", "routed_expert_fraction", "num_experts",
                                       "shards")}


def markdown(rows: list[dict]) -> str:
    lines = [
        "| load | kept | load time s | peak RSS MiB | peak / full | load's own RSS MiB | own / full | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['what']} | {row['kept_fraction']:.0%} | {row['load_s']:.2f} | {row['peak_rss_mb']:.0f} | "
            f"{row['peak_over_full']:.2f} | {row['own_rss_mb']:.0f} | {row['own_over_full']:.2f} | "
            f"<= {row['target']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/bench-partial")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    work = Path(args.work)
    model_dir = work / "mixtral-experts"
    if not (model_dir / "tokens.pt").is_file():
        model_dir.mkdir(parents=True, exist_ok=True)
        info, _ = run_child(["-c", MAKE_MODEL, str(model_dir), "1", "8", json.dumps(MODEL_SHAPE)])
        (work / "model_info.json").write_text(json.dumps(info))
    model = {**json.loads((work / "model_info.json").read_text()), **expert_fraction(model_dir)}
    config = json.loads((model_dir / "config.json").read_text())

    cases = [("full", "full", 1.0)]
    for fraction in FRACTIONS:
        kept = kept_experts(config["num_local_experts"], fraction, config["num_hidden_layers"])
        cases.append(("load_with_experts", json.dumps({"kept": kept}), fraction))
    runs: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):  # interleaved, so a busy period does not hit one case only
        for label, what, fraction in cases:
            result, wall = run_child(["-c", CHILD, str(model_dir), what, str(args.threads)])
            result["process_wall_s"] = wall
            runs.setdefault(f"{label}@{fraction}", []).append(result)

    def median(key: str, case: str) -> float:
        return statistics.median(r[key] for r in runs[case])

    full_peak = median("peak_rss_mb", "full@1.0")
    full_own = statistics.median(r["peak_rss_mb"] - r["baseline_rss_mb"] for r in runs["full@1.0"])
    rows = []
    for label, _, fraction in cases:
        case = f"{label}@{fraction}"
        own = statistics.median(r["peak_rss_mb"] - r["baseline_rss_mb"] for r in runs[case])
        rows.append({
            "what": "vanilla from_pretrained" if label == "full" else label, "kept_fraction": fraction,
            "load_s": median("load_s", case), "peak_rss_mb": median("peak_rss_mb", case),
            "baseline_rss_mb": median("baseline_rss_mb", case), "own_rss_mb": own,
            "peak_over_full": median("peak_rss_mb", case) / full_peak, "own_over_full": own / full_own,
            "param_mb": median("param_mb", case), "target": fraction + 0.1 if label != "full" else 1.0,
        })
    results = {"commit": commit(), "threads": args.threads, "repeats": args.repeats, "model": model,
               "rows": rows, "runs": runs}
    (work / "bench.json").write_text(json.dumps(results, indent=2))
    print(markdown(rows))
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
