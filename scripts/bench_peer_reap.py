#!/usr/bin/env python3
"""Benchmark the independent peer: llm-compressor's REAPPruningModifier, on CPU, float32.

Runs under the peer virtualenv made by ``scripts/setup_peer_venv.sh`` (NOT moeprune's env):

    /opt/peer-venv/bin/python scripts/bench_peer_reap.py \
        --model DIR --tokens FILE.pt --ratio 0.5 --out OUTDIR --threads 1

``--tokens`` is a ``torch.save``'d dict ``{"input_ids": LongTensor[N,S], "attention_mask":
LongTensor[N,S]}`` holding the exact calibration tokens. The peer is driven through its documented
entry point ``llmcompressor.oneshot`` with a ready-made ``torch.utils.data.DataLoader`` (oneshot
returns a DataLoader untouched: no tokenisation, no shuffling, no sub-sampling, no truncation), so
it sees exactly these tokens, in file order.

Writes the pruned checkpoint to ``--out`` and ``--out/peer_result.json``:

* ``layers``: kept experts per decoder layer in ORIGINAL numbering, ``{"<layer>": [sorted]}``,
  read from the modifier's own state (``_retained_experts``) and cross-checked against the saved
  router rows (``router_rows_check``);
* ``scores``: the peer's per-layer REAP saliency (its ``REAPSaliencyTracker.mean_saliency``,
  float64) and ``counts`` (routed tokens per expert), captured by wrapping the tracker's
  ``compute_retained_experts`` (the tracker is deleted right after it prunes a layer);
* ``wall_s`` (whole process, from the OS process start), phase timings, ``peak_rss_mb`` (self and
  children, from ``getrusage``), versions and the options used.

Workarounds (each is also recorded in ``workarounds`` of the JSON when it fires):

1. CAUSAL MASK. llm-compressor's sequential pipeline (the one REAP requires) traces the model with
   torch.fx; in the traced graph the decoder layers receive ``attention_mask=None`` and, since
   ``calibration_forward_context`` forces eager attention, eager attention then applies NO causal
   mask (verified on Mixtral: layer-0 MoE inputs equal a non-causal forward to 5e-7, while they
   differ from the real causal forward by ~2). We therefore feed an explicit additive 4-D float
   mask ``[B, 1, S, S]`` (0 where a query may attend = causal AND key is a real token, finfo.min
   elsewhere); HF's ``create_causal_mask`` passes a 4-D mask through as-is, and the traced graph
   carries it to every layer. With it, layer-0 MoE inputs equal the vanilla causal forward (5e-7).
2. PADDING. The peer counts EVERY token that reaches the MoE block (padding included): its hooks
   see the flattened ``[B*S, H]`` hidden states and never look at the attention mask. With
   ``--padding strip`` (default) each sample is cut to its real tokens before it is fed (requires
   right padding: mask = 1...1 0...0; real tokens neither move nor see padding under a causal mask,
   so this is exact) and so only real tokens are scored. ``--padding keep`` feeds the padded rows
   (padding keys masked out of attention) to reproduce the peer's own behaviour on padded data.
3. PROCESSOR. oneshot insists on a tokenizer/processor whenever a dataset is given, even a ready
   DataLoader; if ``--model`` has no tokenizer files we hand it a stub whose ``save_pretrained``
   does nothing (it is never used to tokenise).
4. CONFIG EXPERT COUNT. After saving, config.json's expert-count key(s) are checked against the
   kept count and corrected if the peer left the old number (seen on DeepSeek-V3 checkpoints).
5. SAVE LAYOUT. oneshot linearises the fused HF experts into per-expert Linear modules
   (``experts.<j>.{gate,up,down}_proj.weight``); saved as-is (what ``oneshot(output_dir=...)``
   does), vanilla transformers 5.x reports those experts MISSING and randomly initialises them.
   We call the peer's own ``llmcompressor.modeling.moe.linearize.repack_moe`` before
   ``save_pretrained`` so the checkpoint is HF-native (verified: loads in transformers 5.23 with no
   missing/unexpected keys; expert and router rows equal the original's kept rows).

Peer defaults that we keep / change (recorded in ``options``):

* ``propagate_error=True`` (peer default; ``--no-propagate-error`` to change): layer L is
  calibrated on activations produced by the ALREADY PRUNED layers 0..L-1 (sequential pruning),
  not by the original model. ``--no-propagate-error`` scores every layer on the unpruned model.
* ``moe_calibrate_all_experts``: oneshot's default is True (every expert runs on every token), which
  REAP does not need (the modifier itself says so) and which leaves the scores unchanged (only the
  routed tokens' norms are used) but costs ~E/top_k more expert FLOPs; we default to False
  (``--calibrate-all-experts`` restores oneshot's default).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

T_SCRIPT0 = time.time()

import torch  # noqa: E402


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", required=True, help="local HF checkpoint dir (Mixtral-style MoE)")
    p.add_argument("--tokens", required=True, help=".pt dict {input_ids, attention_mask} [N,S]")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of experts REMOVED per layer")
    p.add_argument("--out", required=True, help="output dir: pruned checkpoint + peer_result.json")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--batch-size", type=int, default=1,
                   help="samples per forward (only rows of equal fed length are batched together)")
    p.add_argument("--padding", choices=("strip", "keep"), default="strip",
                   help="strip: feed only real tokens (right padding cut off); keep: feed padded "
                        "rows as the peer would (padding tokens then count in its REAP scores)")
    p.add_argument("--no-propagate-error", dest="propagate_error", action="store_false",
                   help="calibrate every layer on the unpruned model's activations")
    p.add_argument("--calibrate-all-experts", action="store_true",
                   help="oneshot's default moe_calibrate_all_experts=True (slower, same scores)")
    p.add_argument("--no-save", action="store_true", help="skip saving the pruned checkpoint")
    return p.parse_args(argv)


def _mb(kb: int) -> float:
    return round(kb / 1024.0, 1)  # Linux ru_maxrss is in KiB


def _load_tokens(path: str):
    data = torch.load(path, map_location="cpu", weights_only=True)
    ids = data["input_ids"].to(torch.long)
    mask = data.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(torch.long)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise SystemExit(f"--tokens: expected input_ids/attention_mask [N,S], got "
                         f"{tuple(ids.shape)} / {tuple(mask.shape)}")
    return ids, mask


def _causal_4d(mask2d: torch.Tensor) -> torch.Tensor:
    """Additive float mask [B,1,S,S]: 0 = may attend (causal and key is real), finfo.min = not."""
    b, s = mask2d.shape
    causal = torch.tril(torch.ones(s, s, dtype=torch.bool))
    allowed = causal[None, None] & mask2d[:, None, None, :].bool()
    out = torch.zeros(b, 1, s, s, dtype=torch.float32)
    return out.masked_fill(~allowed, torch.finfo(torch.float32).min)


def _build_batches(ids, mask, padding: str, batch_size: int):
    """List of {"input_ids", "attention_mask"(4-D)} batches, in file order; returns stats too."""
    rows = []
    for r in range(ids.shape[0]):
        m = mask[r]
        if padding == "strip":
            n = int(m.sum())
            if not bool(m[:n].all()) or bool(m[n:].any()):
                raise SystemExit(f"--padding strip needs right-padded rows; row {r} is not "
                                 f"(use --padding keep)")
            if n == 0:
                continue
            rows.append((ids[r, :n], m[:n]))
        else:
            rows.append((ids[r], m))
    batches, i = [], 0
    while i < len(rows):
        j = i + 1
        while j < len(rows) and j - i < batch_size and rows[j][0].numel() == rows[i][0].numel():
            j += 1
        bid = torch.stack([x for x, _ in rows[i:j]])
        bm = torch.stack([y for _, y in rows[i:j]])
        batches.append({"input_ids": bid, "attention_mask": _causal_4d(bm)})
        i = j
    fed = sum(int(b["input_ids"].numel()) for b in batches)
    return batches, {"samples": len(rows), "batches": len(batches), "tokens_fed": fed,
                     "real_tokens": int(mask.sum()), "padding_tokens_fed": fed - int(mask.sum())
                     if padding == "keep" else 0}


def _layer_index(name: str) -> int:
    """'model.layers.3.mlp' -> 3 (first integer component after 'layers')."""
    parts = name.split(".")
    for k, part in enumerate(parts[:-1]):
        if part == "layers" and parts[k + 1].isdigit():
            return int(parts[k + 1])
    digits = [int(x) for x in parts if x.isdigit()]
    if not digits:
        raise ValueError(f"cannot find a layer index in {name!r}")
    return digits[0]


def _read_safetensors_dir(path: str, suffix: str) -> dict:
    """{tensor name: tensor} for every tensor whose name ends with ``suffix`` in a checkpoint."""
    from safetensors import safe_open

    out = {}
    for fn in sorted(os.listdir(path)):
        if fn.endswith(".safetensors"):
            with safe_open(os.path.join(path, fn), framework="pt") as f:
                for k in f.keys():
                    if k.endswith(suffix):
                        out[k] = f.get_tensor(k)
    return out


def _router_rows_check(orig_dir: str, out_dir: str, router_attr: str, kept: dict) -> dict:
    """Match each saved router row to the original router's rows (exact equality)."""
    suffix = f".{router_attr}.weight"
    orig = _read_safetensors_dir(orig_dir, suffix)
    new = _read_safetensors_dir(out_dir, suffix)
    layers, ok = {}, True
    for name, w_new in new.items():
        if name not in orig:
            continue
        w_old = orig[name].float()
        rows = []
        for row in w_new.float():
            hits = (w_old == row).all(dim=1).nonzero().flatten().tolist()
            rows.append(hits[0] if len(hits) == 1 else None)
        li = str(_layer_index(name))
        layers[li] = rows
        if rows != kept.get(li):
            ok = False
    return {"matches_modifier_state": ok and set(layers) == set(kept), "layers": layers}


def _fix_config_expert_count(out_dir: str, kept_count: int) -> list:
    """Set every expert-count key of config.json (and its text_config) to ``kept_count``."""
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    fixed = []
    for holder, where in ((cfg, ""), (cfg.get("text_config") or {}, "text_config.")):
        for key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
            if isinstance(holder.get(key), int) and holder[key] != kept_count:
                fixed.append(f"{where}{key}: {holder[key]} -> {kept_count}")
                holder[key] = kept_count
    if fixed:
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
    return fixed


def main(argv=None) -> int:
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    workarounds = []
    timings = {}

    import importlib.metadata as md

    import psutil
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import repack_moe
    from llmcompressor.modifiers.pruning.reap import REAPPruningModifier
    from llmcompressor.modifiers.pruning.reap import utils as reap_utils

    timings["imports_s"] = round(time.time() - T_SCRIPT0, 3)

    # --- capture the peer's per-layer saliency before its tracker is discarded -------------------
    # The modifier creates one REAPSaliencyTracker per MoE layer in on_calibration_start and deletes
    # it right after pruning that layer, so we (1) note which tracker belongs to which layer and
    # (2) record mean_saliency / count when the tracker picks the experts to keep. Read-only
    # wrappers around the installed package's methods; the peer's logic is untouched.
    captured, tracker_layer = {}, {}
    original_start = REAPPruningModifier.on_calibration_start
    original_compute = reap_utils.REAPSaliencyTracker.compute_retained_experts

    def start_and_map(self, *a, **k):
        out = original_start(self, *a, **k)
        tracker_layer.update({id(t): name for name, t in self._saliency_trackers.items()})
        return out

    def compute_and_record(self, *a, **k):
        retained = original_compute(self, *a, **k)
        cnt = self.count.to("cpu", torch.float64) if self.count is not None else None
        captured[tracker_layer.get(id(self), f"?{id(self)}")] = {
            "saliency": self.mean_saliency.tolist(),
            "count": None if cnt is None else cnt.tolist(),
        }
        return retained

    REAPPruningModifier.on_calibration_start = start_and_map
    reap_utils.REAPSaliencyTracker.compute_retained_experts = compute_and_record

    # --- data ---------------------------------------------------------------------------------
    ids, mask = _load_tokens(args.tokens)
    batches, data_stats = _build_batches(ids, mask, args.padding, args.batch_size)
    workarounds.append("explicit additive 4-D causal mask fed as attention_mask (the sequential "
                       "pipeline otherwise runs eager attention with no mask)")
    if args.padding == "strip" and int(mask.numel()) != int(mask.sum()):
        workarounds.append("right padding stripped per sample (the peer would score padding tokens)")
    loader = DataLoader(batches, batch_size=None, shuffle=False)

    # --- model --------------------------------------------------------------------------------
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    timings["load_s"] = round(time.time() - t0, 3)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    num_experts_before = next(getattr(cfg, k) for k in
                              ("num_local_experts", "num_experts", "n_routed_experts",
                               "moe_num_experts") if isinstance(getattr(cfg, k, None), int))

    has_tokenizer = True
    try:
        processor = AutoTokenizer.from_pretrained(args.model)
    except Exception:  # no tokenizer files: oneshot still wants one (see docstring, item 3)
        class _NoProcessor:
            def save_pretrained(self, *a, **k):
                return None

        processor = _NoProcessor()
        has_tokenizer = False
        workarounds.append("stub processor passed to oneshot (checkpoint has no tokenizer)")

    modifier = REAPPruningModifier(sparsity=args.ratio)

    # --- run ----------------------------------------------------------------------------------
    t0 = time.time()
    oneshot(
        model=model,
        processor=processor,
        recipe=modifier,
        dataset=loader,
        moe_calibrate_all_experts=args.calibrate_all_experts,
        propagate_error=args.propagate_error,
        output_dir=None,  # we time saving separately
    )
    timings["oneshot_s"] = round(time.time() - t0, 3)

    retained_by_name = dict(modifier._retained_experts)
    kept = {str(_layer_index(n)): sorted(int(i) for i in v) for n, v in retained_by_name.items()}
    kept = dict(sorted(kept.items(), key=lambda kv: int(kv[0])))
    kept_counts = sorted({len(v) for v in kept.values()})

    scores = {str(_layer_index(n)): r["saliency"] for n, r in captured.items()}
    counts = {str(_layer_index(n)): r["count"] for n, r in captured.items()}
    scores = dict(sorted(scores.items(), key=lambda kv: int(kv[0])))
    counts = dict(sorted(counts.items(), key=lambda kv: int(kv[0])))

    # --- save ---------------------------------------------------------------------------------
    rows_check, config_fixes = None, []
    if not args.no_save:
        t0 = time.time()
        # Workaround 5: oneshot linearised the fused experts into per-expert Linear modules; saved
        # like that, vanilla transformers cannot load the experts (they come back MISSING and
        # randomly initialised). The peer's documented remedy is repack_moe() before saving.
        repack_moe(model)
        workarounds.append("repack_moe() before save_pretrained (linearised experts otherwise "
                           "save in a layout vanilla transformers does not load)")
        model.save_pretrained(args.out)
        if has_tokenizer:
            processor.save_pretrained(args.out)
        timings["save_s"] = round(time.time() - t0, 3)
        if len(kept_counts) == 1:
            config_fixes = _fix_config_expert_count(args.out, kept_counts[0])
            if config_fixes:
                workarounds.append("config.json expert count corrected: " + "; ".join(config_fixes))
        rows_check = _router_rows_check(args.model, args.out,
                                        modifier._moe_attrs.router_attr if modifier._moe_attrs
                                        else "gate", kept)

    ru_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ru_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc_start = psutil.Process().create_time()

    def _v(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    result = {
        "tool": "llmcompressor.REAPPruningModifier",
        "versions": {n: _v(n) for n in ("llmcompressor", "transformers", "torch",
                                        "compressed-tensors", "datasets")},
        "model": os.path.abspath(args.model),
        "tokens": os.path.abspath(args.tokens),
        "ratio": args.ratio,
        "num_experts_before": num_experts_before,
        "num_experts_after": kept_counts[0] if len(kept_counts) == 1 else kept_counts,
        "layers": kept,
        "scores": scores,
        "counts": counts,
        "score_definition": "mean over tokens routed to j of top_k_weight_j(x) * ||f_j(x)||_2 "
                            "(weights as passed to the experts module; 0 if never routed)",
        "router_rows_check": rows_check,
        "options": {
            "threads": args.threads,
            "batch_size": args.batch_size,
            "padding": args.padding,
            "propagate_error": args.propagate_error,
            "moe_calibrate_all_experts": args.calibrate_all_experts,
            "pipeline": "sequential (inferred by oneshot for REAP)",
            "dtype": "float32",
            "device": "cpu",
        },
        "data": data_stats,
        "workarounds": workarounds,
        "timings": timings,
        "wall_s": round(time.time() - proc_start, 3),
        "wall_s_from_script_start": round(time.time() - T_SCRIPT0, 3),
        "peak_rss_mb": _mb(ru_self),
        "peak_rss_children_mb": _mb(ru_child),
    }
    with open(os.path.join(args.out, "peer_result.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("layers", "wall_s", "peak_rss_mb")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
