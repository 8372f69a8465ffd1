"""The default job (`moeprune demo`): build or load the small trained testbed, collect statistics
once, prune with the chosen method and with random drops, and compare held-out perplexity per domain
against the dense model. Everything is local: the testbed is trained on first use (a few minutes)
and cached under ~/.cache/moeprune (or $MOEPRUNE_CACHE)."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch

from . import api
from .io.output import check_output, prepared_output
from .super_experts import format_table

logger = logging.getLogger(__name__)

DOMAINS = ("code", "prose", "legal", "math")


def _write_calibration(corpus_dir: Path, path: Path, per_domain: int = 64, seed: int = 0) -> None:
    """A mixed calibration file from the corpus TRAIN splits (held-out splits stay unseen)."""
    from .testbed.corpus import load_domain

    rng = random.Random(seed)
    rows = []
    for domain in DOMAINS:
        docs = load_domain(corpus_dir, domain, "train")
        rows.extend(rng.sample(docs, min(per_domain, len(docs))))
    rng.shuffle(rows)
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in rows))


def _held_out_perplexity(model_dir: Path, corpus_dir: Path, max_tokens: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluate import perplexity
    from .testbed.corpus import load_domain

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    return {
        domain: perplexity(model, tokenizer, load_domain(corpus_dir, domain, "test"), seq_len=128, max_tokens=max_tokens)
        for domain in DOMAINS
    }


def format_results(rows: list[dict]) -> str:
    """Markdown table: one row per model, held-out perplexity per domain and change vs dense."""
    dense = rows[0]["ppl"]
    header = "| model | experts kept | " + " | ".join(f"{d} ppl" for d in DOMAINS) + " | mean change vs dense |"
    lines = [header, "|" + "---|" * (len(DOMAINS) + 3)]
    for row in rows:
        change = sum(row["ppl"][d] / dense[d] - 1 for d in DOMAINS) / len(DOMAINS)
        cells = " | ".join(f"{row['ppl'][d]:.2f}" for d in DOMAINS)
        lines.append(f"| {row['name']} | {row['kept']} | {cells} | {100 * change:+.1f}% |")
    return "\n".join(lines)


def run_demo(out: str | Path, *, method: str = "reap", ratio: float = 0.5, overwrite: bool = False,
             testbed: str = "tiny", samples: int = 32, seq_len: int = 128, eval_tokens: int = 8192,
             progress: bool = True) -> list[dict]:
    """Run the default job into ``out`` and print the comparison table; returns its rows."""
    from .testbed.train import CORPUS_FORMAT_VERSION, build_or_load_testbed, default_cache_root

    out = check_output(out, overwrite)
    model_dir = build_or_load_testbed(testbed, progress=progress)
    corpus_dir = default_cache_root() / f"corpus-v{CORPUS_FORMAT_VERSION}-seed0"
    with prepared_output(out, overwrite=overwrite) as work:
        calibration = work / "calibration.jsonl"
        _write_calibration(corpus_dir, calibration)
        stats = api.collect(model_dir, calibration, samples=samples, seq_len=seq_len, out=work / "stats.safetensors",
                            progress=progress)
        report = api.super_experts(model_dir, stats)
        print(format_table(report))
        info = api.inspect(model_dir)
        rows = [{"name": "dense", "kept": info["num_experts"], "ppl": _held_out_perplexity(model_dir, corpus_dir, eval_tokens)}]
        for name in dict.fromkeys([method, "random"]):
            plan = api.prune(model_dir, work / f"pruned-{name}", method=name, ratio=ratio, stats=stats, progress=progress)
            kept = len(next(iter(plan.layers.values())))
            rows.append({"name": f"{name} {int(100 * ratio)}% removed", "kept": kept,
                         "ppl": _held_out_perplexity(work / f"pruned-{name}", corpus_dir, eval_tokens)})
        table = format_results(rows)
        (work / "results.json").write_text(json.dumps({"testbed": str(model_dir), "rows": rows}, indent=2) + "\n")
        (work / "results.md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {out} (statistics, plans, pruned checkpoints, results.md)")
    return rows
