"""GPU check of bfloat16 collection (issue 10 section 6), in one run.

1. Generates a Qwen3-MoE checkpoint with Qwen3-30B-A3B's layer geometry (hidden 2048, 128 routed
   experts top-8 with norm_topk_prob, moe_intermediate_size 768, 32 query / 4 KV heads of 128) but
   only ``--layers`` decoder layers (default 4) and a small vocabulary, random bfloat16 weights,
   saved with ``save_pretrained`` (safetensors) into a temporary folder. No tokenizer: the
   calibration is ``--samples`` x ``--seq-len`` random token ids, given to the engine directly as a
   :class:`~moeprune.calibration.data.CalibrationBatch`.
2. Collection: ``collect_stats(model_dir, calibration, mode="sequential", dtype=..., device=...)``
   after one warm-up collection on the first batch; wall time, tokens/s and peak device memory.
3. Plain forward: the whole model loaded with transformers in the same dtype on the device,
   ``model.model(input_ids, attention_mask)`` over the same batches, the same experts kernel as the
   collector, one warm-up batch; load and forward time, tokens/s, peak device memory.
4. Peak memory of both against one decoder layer's parameter bytes.

Prints a markdown table and writes JSON to ``--out`` (default ``$OUT/bench_gpu.json`` when ``$OUT``
is set, else ``./bench_gpu.json``) with the card, torch/transformers versions and the commit.

    python scripts/bench_gpu_collect.py                          # on a CUDA machine (H200: < 6 min)
    python scripts/bench_gpu_collect.py --tiny --device cpu      # 2 layers, 8 experts, hidden 64

Without CUDA it stops at once unless ``--device cpu``.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from _profiles_doc import commit  # puts the checkout on sys.path; short HEAD + dirty marker

import torch

from moeprune.calibration.data import CalibrationBatch
from moeprune.calibration.engine import collect_stats, load_full_model
from moeprune.io.output import atomic_write_json

#: Qwen3-30B-A3B's decoder-layer geometry (its config.json), vocabulary and depth set per run.
QWEN3_30B_A3B = dict(
    hidden_size=2048, intermediate_size=6144, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
    rms_norm_eps=1e-6, max_position_embeddings=40960, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
)
#: The --tiny geometry: small enough to run end to end on a CPU in seconds.
TINY = dict(
    hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
    rms_norm_eps=1e-6, max_position_embeddings=4096,
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Defaults per mode: (layers, vocab, samples, seq_len, batch_size, device, dtype).
DEFAULTS = {
    "full": dict(layers=4, vocab=32000, samples=64, seq_len=2048, batch_size=8, device="cuda", dtype="bfloat16"),
    "tiny": dict(layers=2, vocab=512, samples=8, seq_len=64, batch_size=4, device="cpu", dtype="float32"),
}


class BenchError(RuntimeError):
    """The benchmark cannot run as asked (no CUDA, an engine without a device argument, ...)."""


# --------------------------------------------------------------------------------------------------
# settings


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options, with the mode's defaults filled in."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="2 layers, 8 experts, hidden 64 (tests on CPU)")
    parser.add_argument("--layers", type=int, help="decoder layers (default 4; tiny 2)")
    parser.add_argument("--vocab", type=int, help="vocabulary size (default 32000; tiny 512)")
    parser.add_argument("--samples", type=int, help="calibration rows (default 64; tiny 8)")
    parser.add_argument("--seq-len", type=int, help="tokens per row (default 2048; tiny 64)")
    parser.add_argument("--batch-size", type=int, help="rows per forward (default 8; tiny 4)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default cuda; tiny cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights and compute dtype (default bfloat16; tiny float32)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up collection and forward")
    parser.add_argument("--work", help="folder for the generated checkpoint (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and token ids (default 0)")
    parser.add_argument("--commit", help="commit to record (default: the checkout's git HEAD; for a copy without git)")
    parser.add_argument("--out", help="JSON results (default $OUT/bench_gpu.json when $OUT is set, else ./bench_gpu.json)")
    args = parser.parse_args(argv)
    for key, value in DEFAULTS["tiny" if args.tiny else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("layers", "vocab", "samples", "seq_len", "batch_size"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.out is None:
        args.out = default_out(os.environ)
    return args


def default_out(environ) -> Path:
    """``$OUT/bench_gpu.json`` when ``OUT`` is set, else ``bench_gpu.json`` in the working folder."""
    return Path(environ["OUT"]) / "bench_gpu.json" if environ.get("OUT") else Path("bench_gpu.json")


def check_device(device: str) -> torch.device:
    """The torch device, or a BenchError at once when CUDA is asked for but absent."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchError(f"--device {device}: CUDA is not available on this machine "
                             f"(torch {torch.__version__}); run on a GPU machine, or pass --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BenchError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise BenchError(f"--device {device}: use cpu, cuda or cuda:N")
    return dev


def engine_takes_device() -> bool:
    """Whether this moeprune's ``collect_stats`` has a ``device`` argument (issue 10 section 6)."""
    return "device" in inspect.signature(collect_stats).parameters


# --------------------------------------------------------------------------------------------------
# checkpoint and data


def model_config(tiny: bool, layers: int, vocab: int):
    """A qwen3_moe config with Qwen3-30B-A3B's layer geometry (or the tiny one)."""
    from transformers import Qwen3MoeConfig

    geometry = TINY if tiny else QWEN3_30B_A3B
    return Qwen3MoeConfig(**geometry, num_hidden_layers=layers, vocab_size=vocab, tie_word_embeddings=False,
                          decoder_sparse_step=1, mlp_only_layers=[])


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def generate_checkpoint(out_dir: Path, config, dtype: torch.dtype, device: torch.device, seed: int) -> dict:
    """Random weights (transformers' own initialisation) in ``dtype``, built on ``device`` (fast on a
    GPU), saved as safetensors; returns parameter count, total and one decoder layer's bytes."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    info = {
        "params": sum(p.numel() for p in model.parameters()),
        "bytes": module_bytes(model),
        "layer_bytes": module_bytes(model.model.layers[0]),
        "layer_params": sum(p.numel() for p in model.model.layers[0].parameters()),
    }
    model.save_pretrained(out_dir)
    del model
    release(device)
    return info


def random_calibration(samples: int, seq_len: int, vocab: int, seed: int) -> CalibrationBatch:
    """``samples`` x ``seq_len`` uniform random token ids, no padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (samples, seq_len), generator=generator)
    return CalibrationBatch(ids, torch.ones_like(ids))


# --------------------------------------------------------------------------------------------------
# timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Free what the last run left (Python garbage, the CUDA cache)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    """Peak allocated device memory since :func:`reset_peak` (None on CPU: not measured)."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def run_collection(model_dir: Path, calibration: CalibrationBatch, batch_size: int, dtype: torch.dtype,
                   device: torch.device, pass_device: bool):
    """One sequential collection; returns the statistics."""
    kwargs = dict(mode="sequential", batch_size=batch_size, dtype=dtype, progress=False)
    if pass_device:
        kwargs["device"] = str(device)
    return collect_stats(model_dir, calibration, **kwargs)


def time_collection(model_dir: Path, calibration: CalibrationBatch, batch_size: int, dtype: torch.dtype,
                    device: torch.device, pass_device: bool, warmup: bool) -> dict:
    """Wall time and peak device memory of a collection (after a warm-up on the first batch)."""
    if warmup:
        first = CalibrationBatch(calibration.input_ids[:batch_size], calibration.attention_mask[:batch_size])
        run_collection(model_dir, first, batch_size, dtype, device, pass_device)
        release(device)
    reset_peak(device)
    synchronize(device)
    start = time.perf_counter()
    stats = run_collection(model_dir, calibration, batch_size, dtype, device, pass_device)
    synchronize(device)
    wall = time.perf_counter() - start
    tokens = sum(float(entries["tokens"]) for entries in stats.layers.values()) / max(len(stats.layers), 1)
    finite = all(bool(torch.isfinite(v).all()) for entries in stats.layers.values() for v in entries.values())
    return {"wall_s": wall, "tokens": calibration.num_tokens, "tokens_per_s": calibration.num_tokens / wall,
            "peak_bytes": peak_bytes(device), "moe_layers": len(stats.layers), "tokens_counted": tokens,
            "stats_finite": finite, "device_argument": pass_device}


def time_plain_forward(model_dir: Path, calibration: CalibrationBatch, batch_size: int, dtype: torch.dtype,
                       device: torch.device, warmup: bool) -> dict:
    """Vanilla transformers: load the whole model, then ``model.model`` over the same batches."""
    from moeprune.collect import prepare_experts_implementation

    reset_peak(device)
    start = time.perf_counter()
    model = load_full_model(model_dir, dtype=dtype).to(device)
    implementation = prepare_experts_implementation(model)  # the kernel the collector runs
    synchronize(device)
    load = time.perf_counter() - start
    batches = [(ids.to(device), mask.to(device)) for ids, mask in calibration.batches(batch_size)]
    with torch.no_grad():
        if warmup:
            model.model(input_ids=batches[0][0], attention_mask=batches[0][1], use_cache=False)
        synchronize(device)
        start = time.perf_counter()
        for ids, mask in batches:
            model.model(input_ids=ids, attention_mask=mask, use_cache=False)
        synchronize(device)
        forward = time.perf_counter() - start
    result = {"load_s": load, "forward_s": forward, "tokens_per_s": calibration.num_tokens / forward,
              "load_forward_tokens_per_s": calibration.num_tokens / (load + forward),
              "peak_bytes": peak_bytes(device), "experts_implementation": implementation}
    del model, batches
    release(device)
    return result


# --------------------------------------------------------------------------------------------------
# report


def machine(device: torch.device) -> dict:
    """The card (or CPU), torch / transformers / python versions and CPU count."""
    import transformers

    info = {"device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "cuda": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(card=torch.cuda.get_device_name(device), card_memory_bytes=int(props.total_memory))
    else:
        info["card"] = f"CPU ({platform.processor() or platform.machine()})"
    return info


def ratios(results: dict) -> dict:
    """Collection against the plain forward (time) and against one decoder layer (peak memory)."""
    collection, plain, layer = results["collection"], results["plain"], results["model"]["layer_bytes"]
    out = {
        "collection_over_plain_forward": collection["wall_s"] / plain["forward_s"],
        "collection_over_plain_load_forward": collection["wall_s"] / (plain["load_s"] + plain["forward_s"]),
    }
    for name, run in (("collection", collection), ("plain", plain)):
        out[f"{name}_peak_over_layer"] = run["peak_bytes"] / layer if run["peak_bytes"] is not None else None
    return out


def _size(value: int) -> str:
    """Bytes as GiB, or MiB below 1 GiB."""
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.2f} MiB"


def _peak(value: int | None, over_layer: float | None) -> str:
    return "not measured on CPU" if value is None else f"{_size(value)} ({over_layer:.2f}x one layer)"


def markdown_table(results: dict) -> str:
    """The measurements as a markdown table with the card, versions and commit above it."""
    m, s, model = results["machine"], results["settings"], results["model"]
    c, p, r = results["collection"], results["plain"], results["ratios"]
    lines = [
        f"{s['dtype']} collection check on {m['card']} (torch {m['torch']}, transformers {m['transformers']}, "
        f"commit {results['commit']}): {s['geometry']} geometry, {s['layers']} decoder layers, "
        f"{s['samples']} x {s['seq_len']} tokens, batch {s['batch_size']}, "
        f"one layer = {_size(model['layer_bytes'])}, model = {_size(model['bytes'])}",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| collection (sequential) wall | {c['wall_s']:.2f} s ({c['tokens_per_s']:,.0f} tokens/s) |",
        f"| plain forward (whole model resident) | {p['forward_s']:.2f} s ({p['tokens_per_s']:,.0f} tokens/s) "
        f"+ load {p['load_s']:.2f} s |",
        f"| collection / plain forward | {r['collection_over_plain_forward']:.2f} |",
        f"| collection / plain load + forward | {r['collection_over_plain_load_forward']:.2f} |",
        f"| peak device memory, collection | {_peak(c['peak_bytes'], r['collection_peak_over_layer'])} |",
        f"| peak device memory, plain forward | {_peak(p['peak_bytes'], r['plain_peak_over_layer'])} |",
    ]
    lines += [f"\nNote: {note}" for note in results["notes"]]
    return "\n".join(lines)


def current_commit(given: str | None) -> str:
    """``--commit`` if given, else the checkout's short HEAD (+ dirty marker); "unknown" without git."""
    if given:
        return given
    try:
        return commit() or "unknown"
    except OSError:  # no git on the machine
        return "unknown"


def say(message: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(f"[bench_gpu_collect {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict:
    """Generate, collect, forward; returns the results dict. After each phase the results so far are
    written to ``args.out`` with ``"complete": false``, so a run cut short still leaves its figures."""
    device = check_device(args.device)
    dtype = DTYPES[args.dtype]
    notes = []
    pass_device = engine_takes_device()
    if not pass_device:
        if device.type != "cpu":
            raise BenchError("this moeprune's collect_stats() has no `device` argument yet (issue 10 section 6), "
                             "so it cannot collect on a GPU; update moeprune, or pass --device cpu")
        notes.append("collect_stats() has no `device` argument in this moeprune: collection ran on CPU "
                     "without it")
    config = model_config(args.tiny, args.layers, args.vocab)
    calibration = random_calibration(args.samples, args.seq_len, args.vocab, args.seed)
    warmup = not args.no_warmup
    results = {
        "complete": False,
        "commit": current_commit(args.commit),
        "machine": machine(device),
        "settings": {"geometry": "tiny" if args.tiny else "Qwen3-30B-A3B", "layers": args.layers,
                     "vocab": args.vocab, "samples": args.samples, "seq_len": args.seq_len,
                     "batch_size": args.batch_size, "device": str(device), "dtype": args.dtype,
                     "warmup": warmup, "seed": args.seed,
                     "config": {k: v for k, v in config.to_dict().items() if k in (*QWEN3_30B_A3B, "num_local_experts")}},
        "notes": notes,
    }
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="moeprune-bench-gpu-", dir=args.work) as tmp:
        model_dir = Path(tmp) / "qwen3moe-bench"
        say(f"generating a {results['settings']['geometry']} checkpoint, {args.layers} layers, {args.dtype}, on {device}")
        start = time.perf_counter()
        results["model"] = generate_checkpoint(model_dir, config, dtype, device, args.seed)
        results["model"]["generate_s"] = time.perf_counter() - start
        atomic_write_json(args.out, results, overwrite=True)
        say(f"collecting {args.samples} x {args.seq_len} tokens")
        results["collection"] = time_collection(model_dir, calibration, args.batch_size, dtype, device, pass_device,
                                                warmup)
        atomic_write_json(args.out, results, overwrite=True)
        release(device)
        say("plain forward")
        results["plain"] = time_plain_forward(model_dir, calibration, args.batch_size, dtype, device, warmup)
    if not results["collection"]["stats_finite"]:
        notes.append("the statistics hold NaN/inf")
    results["ratios"] = ratios(results)
    results["complete"] = True
    return results


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        results = run(args)
    except BenchError as exc:
        print(f"bench_gpu_collect: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    atomic_write_json(args.out, results, overwrite=True)
    print(markdown_table(results))
    print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
