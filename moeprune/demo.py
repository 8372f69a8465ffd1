"""The default job (`moeprune demo`): collect statistics once, prune with the chosen method and with
random drops, and compare held-out perplexity against the dense model.

``--testbed random`` (the default until the trained testbeds are validated) builds a small
random-weight Mixtral on the fly and uses built-in text: it exercises the whole pipeline in seconds,
but perplexities of a random model say nothing about pruning quality. ``--testbed tiny`` (or another
testbed recipe) trains that testbed on first use, caches it under ~/.cache/moeprune (or
$MOEPRUNE_CACHE), and compares held-out perplexity per corpus domain."""

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


def _held_out_perplexity(model_dir: Path, eval_texts: dict[str, list[str]], max_tokens: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluate import perplexity

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    return {name: perplexity(model, tokenizer, texts, seq_len=128, max_tokens=max_tokens) for name, texts in eval_texts.items()}


def format_results(rows: list[dict]) -> str:
    """Markdown table: one row per model, held-out perplexity per domain and change vs dense."""
    dense = rows[0]["ppl"]
    domains = list(dense)
    header = "| model | experts kept | " + " | ".join(f"{d} ppl" for d in domains) + " | mean change vs dense |"
    lines = [header, "|" + "---|" * (len(domains) + 3)]
    for row in rows:
        change = sum(row["ppl"][d] / dense[d] - 1 for d in domains) / len(domains)
        cells = " | ".join(f"{row['ppl'][d]:.2f}" for d in domains)
        lines.append(f"| {row['name']} | {row['kept']} | {cells} | {100 * change:+.1f}% |")
    return "\n".join(lines)


def run_demo(out: str | Path, *, method: str = "reap", ratio: float = 0.5, overwrite: bool = False,
             testbed: str = "random", samples: int = 32, seq_len: int = 128, eval_tokens: int = 8192,
             progress: bool = True) -> list[dict]:
    """Run the default job into ``out`` and print the comparison table; returns its rows."""
    out = check_output(out, overwrite)
    with prepared_output(out, overwrite=overwrite) as work:
        calibration = work / "calibration.jsonl"
        if testbed == "random":
            from .tiny import save_tiny_checkpoint
            from .tokenizer import _tiny_corpus

            model_dir = save_tiny_checkpoint("mixtral", work / "dense")
            calibration.write_text("".join(json.dumps({"text": t}) + "\n" for t in _tiny_corpus(400, seed=1)))
            eval_texts = {"held-out text": _tiny_corpus(200, seed=2)}
        else:
            from .testbed.corpus import load_domain
            from .testbed.train import CORPUS_FORMAT_VERSION, build_or_load_testbed, default_cache_root

            model_dir = build_or_load_testbed(testbed, progress=progress)
            corpus_dir = default_cache_root() / f"corpus-v{CORPUS_FORMAT_VERSION}-seed0"
            _write_calibration(corpus_dir, calibration)
            eval_texts = {domain: load_domain(corpus_dir, domain, "test") for domain in DOMAINS}
        stats = api.collect(model_dir, calibration, samples=samples, seq_len=seq_len, out=work / "stats.safetensors",
                            progress=progress)
        report = api.super_experts(model_dir, stats)
        print(format_table(report))
        info = api.inspect(model_dir)
        rows = [{"name": "dense", "kept": info["num_experts"], "ppl": _held_out_perplexity(model_dir, eval_texts, eval_tokens)}]
        for name in dict.fromkeys([method, "random"]):
            plan = api.prune(model_dir, work / f"pruned-{name}", method=name, ratio=ratio, stats=stats, progress=progress)
            kept = len(next(iter(plan.layers.values())))
            rows.append({"name": f"{name} {int(100 * ratio)}% removed", "kept": kept,
                         "ppl": _held_out_perplexity(work / f"pruned-{name}", eval_texts, eval_tokens)})
        table = format_results(rows)
        (work / "results.json").write_text(json.dumps({"testbed": str(model_dir), "rows": rows}, indent=2) + "\n")
        (work / "results.md").write_text(table + "\n")
    print(table)
    if testbed == "random":
        print("\n(random-weight model built on the fly: the numbers show the pipeline works, not pruning quality)")
    print(f"\nwrote {out} (statistics, plans, pruned checkpoints, results.md)")
    return rows
