#!/usr/bin/env python
"""Forward time of neuron-sliced models: dense vs uniform widths vs compact (per-expert widths).

    OMP_NUM_THREADS=1 python scripts/bench_compact.py [--ratio 0.5] [--threads 1] [--repeats 7] [--out FILE]

A Mixtral-style model with random weights (float32, CPU; shape from --hidden/--width/--experts/
--layers) is saved to a temporary folder, then sliced in memory with ``random_neuron`` at --ratio:

* uniform: every expert keeps the same width (transformers' own experts module, the model's default
  experts implementation, and also eager for reference);
* compact: each expert keeps its own width (:mod:`moeprune.compact`'s module), the SAME number of
  parameters as the uniform model (no super-expert protection, a ratio that divides evenly).

Each model runs a prefill batch (--batch x --seq tokens) and a decode-like batch (4 x --batch
sequences of 1 token), the models in turn, --repeats rounds after one warm-up round; the median and
the min wall time are reported, with compact/uniform ratios (the target: compact within 1.2x of
uniform). Prints JSON (and writes it to --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch


def interleaved_seconds(runs: dict, repeats: int) -> dict[str, dict[str, float]]:
    """Wall times of every ``runs[name]()``, called in turn (one warm-up round, then ``repeats``
    rounds, so a load spike on a shared machine hits every model alike): median and min per name."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: {"median": statistics.median(t), "min": min(t)} for name, t in times.items()}


def routed_params(model) -> int:
    """Parameters of the routed experts (fused blocks or compact modules)."""
    return sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)


def build_models(folder: Path, args) -> dict:
    """Dense, uniform, uniform (eager) and compact models of the same random checkpoint."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    from moeprune import api
    from moeprune.apply import apply_plan_in_memory
    from moeprune.calibration.engine import load_full_model
    from moeprune.tokenizer import tiny_tokenizer

    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=args.hidden, intermediate_size=args.width, num_hidden_layers=args.layers,
                           num_attention_heads=8, num_key_value_heads=4, num_local_experts=args.experts,
                           num_experts_per_tok=2, vocab_size=4096, max_position_embeddings=4096)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    models = {"dense": load_full_model(folder)}
    for layout in ("uniform", "compact"):
        plan = api.plan_pruning(folder, method="random_neuron", ratio=args.ratio, options={"layout": layout})
        models[layout] = apply_plan_in_memory(load_full_model(folder), plan)
    eager = apply_plan_in_memory(load_full_model(folder), api.plan_pruning(folder, method="random_neuron", ratio=args.ratio))
    eager.set_experts_implementation("eager")
    models["uniform_eager"] = eager
    return models


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of routed-expert neurons removed")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--width", type=int, default=1024, help="expert intermediate size before slicing")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="moeprune-bench-compact-") as tmp:
        models = build_models(Path(tmp), args)
    generator = torch.Generator().manual_seed(1)
    inputs = {"prefill": torch.randint(3, 4096, (args.batch, args.seq), generator=generator),
              "decode": torch.randint(3, 4096, (args.batch * 4, 1), generator=generator)}
    result = {"threads": args.threads, "ratio": args.ratio,
              "shape": dict(hidden=args.hidden, width=args.width, experts=args.experts, layers=args.layers),
              "routed_params": {name: routed_params(m) for name, m in models.items()},
              "experts_implementation": getattr(models["uniform"].config, "_experts_implementation", None),
              "seconds": {}}
    with torch.no_grad():
        for phase, ids in inputs.items():
            times = interleaved_seconds({name: (lambda m=m, ids=ids: m(input_ids=ids, use_cache=False))
                                         for name, m in models.items()},
                                        args.repeats)
            for stat in ("median", "min"):
                times[f"compact_over_uniform_{stat}"] = times["compact"][stat] / times["uniform"][stat]
                times[f"compact_over_uniform_eager_{stat}"] = times["compact"][stat] / times["uniform_eager"][stat]
            result["seconds"][phase] = times
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
