"""List every Mixture-of-Experts causal LM of the INSTALLED transformers, with moeprune's status.

For every model type that has a causal-LM class (transformers' auto mapping) and whose config names
a number of experts, the script builds the model on the meta device (no memory, no download) with a
few decoder layers, and looks for routed experts: a module named ``experts`` (fused 3-D tensors or a
list of per-expert modules). For each MoE family it prints the causal-LM class, a guess of the
routing rule read from the router's source (softmax / sigmoid, correction bias, groups, top-k before
softmax), and moeprune's status:

* ``supported``: a routers/*.toml spec names the model type (the conformance suite runs it);
* ``needs engine support`` / ``unsupported``: with the reason (``moeprune.arch.UNSUPPORTED``, found by
  reading the modeling file), or "not tried / not examined yet" (hybrid layers: Mamba / linear
  attention between attention layers).

Usage::

    python scripts/list_moe_families.py            # print the table
    python scripts/list_moe_families.py --write    # rewrite the table in docs/families.md
    python scripts/list_moe_families.py --check    # exit 1 if docs/families.md is not current
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import logging
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402

from moeprune.arch import UNSUPPORTED, known_families  # noqa: E402

DOC = ROOT / "docs" / "families.md"
BEGIN, END = "<!-- families:begin (scripts/list_moe_families.py) -->", "<!-- families:end -->"
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
HYBRID_MARKERS = ("mamba", "linear_attention", "linear_attn", "gated_deltanet", "deltanet", "conv", "ssm",
                  "short_conv", "lightning")

#: Config arguments without which the defaults build no routed experts (None or 1 expert by default,
#: layer lists left unset).
PROBE_OVERRIDES: dict[str, dict] = {
    "dots1": {"n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1},
    "hunyuan_v1_moe": {"num_experts": 8, "moe_topk": 2, "head_dim": 128},
    "dbrx": {"ffn_config": {"moe_num_experts": 8, "moe_top_k": 2}, "attn_config": {"rope_theta": 10000.0}},
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv", "full_attention"]},
    # the default config leaves the QSA indexer of its indexed-attention layers unset
    "qwen4_exp_text": {"indexer_n_heads": 4, "indexer_kv_heads": 1, "indexer_head_dim": 256, "indexer_budget": 256,
                       "indexer_compress_ratio": 4},
}


@dataclass(frozen=True)
class Row:
    model_type: str
    causal_lm: str
    routing: str
    status: str


def expert_count_keys(config) -> list[str]:
    """Config keys (top level or one sub-config / dict deep) holding a number of experts > 1."""
    found = [key for key in EXPERT_KEYS if isinstance(getattr(config, key, None), int) and getattr(config, key) > 1]
    for value in vars(config).values():
        nested = value if isinstance(value, dict) else vars(value) if hasattr(value, "to_dict") else {}
        found += [key for key in EXPERT_KEYS if isinstance(nested.get(key), int) and nested[key] > 1]
    return found


def small_config(config_class, model_type: str = ""):
    """The config class's defaults with few decoder layers (falls back to the defaults)."""
    extra = PROBE_OVERRIDES.get(model_type, {})
    for kwargs in ({"num_hidden_layers": 4, **extra}, extra):
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return config_class(**kwargs)
        except Exception:  # a config may validate its layer lists against the layer count
            continue
    return None


def meta_model(config):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(config)


def experts_modules(model) -> list[tuple[str, torch.nn.Module]]:
    return [(name, module) for name, module in model.named_modules() if name.rsplit(".", 1)[-1] == "experts"]


def routing_guess(model, experts_name: str) -> str:
    """The router's rule, read from the source of the router and of the MoE block around the experts."""
    block_name = experts_name.rsplit(".", 1)[0]
    block = model.get_submodule(block_name)
    sources = []
    experts = model.get_submodule(experts_name)  # JetMoE's attention experts hold their own router
    routers = [m for parent in (block, experts) for n, m in parent.named_children() if n in ("gate", "router")]
    for module in [block, *routers]:
        with contextlib.suppress(OSError, TypeError):
            sources.append(inspect.getsource(type(module)))
    text = "\n".join(sources)
    parts = []
    if "sparsemixer" in text:
        parts.append("sparsemixer")
    if "sigmoid" in text:
        parts.append("sigmoid")
    if "softmax" in text:
        topk_first = re.search(r"topk\([^\n]*\n(?:[^\n]*\n){0,3}[^\n]*softmax", text) and "sigmoid" not in text
        parts.append("top-k then softmax" if topk_first else "softmax")
    if "e_score_correction_bias" in text or "expert_bias" in text:
        parts.append("+ correction bias")
    if "n_group" in text or "num_expert_group" in text:
        parts.append("groups")
    if "zero_expert" in text or "identity" in text.lower():
        parts.append("null experts")
    if "routed_scaling_factor" in text or "route_scale" in text:
        parts.append("x scale")
    if re.search(r"shared_expert", text):
        parts.append("+ shared")
    return " ".join(parts) or "?"


def is_hybrid(config, model) -> bool:
    layer_types = getattr(config, "layer_types", None) or getattr(config, "layers_block_type", None) or []
    if isinstance(layer_types, (list, tuple)) and any(
        any(marker in str(t).lower() for marker in HYBRID_MARKERS) for t in layer_types
    ):
        return True
    return any(any(marker in type(m).__name__.lower() for marker in ("mamba", "deltanet", "linearattention", "shortconv"))
               for m in model.modules())


def survey() -> list[Row]:
    """One row per MoE causal-LM model type of the installed transformers."""
    transformers.logging.set_verbosity_error()
    supported = {t: f.name for f in known_families().values() for t in f.model_types}
    rows = []
    for model_type, config_name in sorted(CONFIG_MAPPING_NAMES.items()):
        causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        if not causal_lm:
            continue
        try:
            config_class = getattr(transformers, config_name)
        except (AttributeError, ImportError):
            continue
        config = small_config(config_class, model_type)
        if config is None or not expert_count_keys(config):
            continue
        try:
            model = meta_model(config)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            if model_type in supported:  # the conformance suite builds moeprune's own tiny config of it
                status = f"supported (its default config does not build here: {type(exc).__name__})"
            else:
                status = UNSUPPORTED.get(model_type) or (f"unsupported: not examined yet (its default config does not "
                                                         f"build: {type(exc).__name__})")
            rows.append(Row(model_type, causal_lm, "?", status))
            continue
        found = experts_modules(model)
        if not found:
            continue  # an expert-count key but no routed experts in the causal LM
        routing = routing_guess(model, found[0][0])
        if model_type in supported:
            status = "supported" + (" (hybrid)" if is_hybrid(config, model) else "")
        elif model_type in UNSUPPORTED:
            status = UNSUPPORTED[model_type]
        elif is_hybrid(config, model):
            status = "needs engine support (hybrid): not tried yet"
        else:
            status = "unsupported: not examined yet (no routers/ spec)"
        rows.append(Row(model_type, causal_lm, routing, status))
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        f"Generated by `scripts/list_moe_families.py` from transformers {transformers.__version__}.",
        "",
        "| model_type | causal-LM class | routing (read from the router's source) | moeprune status |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r.model_type} | {r.causal_lm} | {r.routing} | {r.status} |" for r in rows]
    counts = {}
    for r in rows:
        key = r.status.split(":")[0].split(" (")[0]
        key = "not examined" if "not examined yet" in r.status or "not tried yet" in r.status else key
        counts[key] = counts.get(key, 0) + 1
    lines += ["", f"{len(rows)} MoE causal-LM model types: "
              + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + "."]
    return "\n".join(lines)


def replace_section(text: str, section: str) -> str:
    if BEGIN not in text or END not in text:
        return text.rstrip("\n") + f"\n\n{BEGIN}\n{section}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    return f"{head}{BEGIN}\n{section}\n{END}{rest.split(END, 1)[1]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the table in docs/families.md")
    mode.add_argument("--check", action="store_true", help="exit 1 when docs/families.md is not current")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    section = table(survey())
    current = DOC.read_text(encoding="utf-8") if DOC.is_file() else "# Model families\n"
    if args.write:
        DOC.write_text(replace_section(current, section), encoding="utf-8")
        return 0
    if args.check:
        if replace_section(current, section) != current:
            sys.stderr.write(f"{DOC.relative_to(ROOT)} is out of date: run scripts/list_moe_families.py --write\n")
            return 1
        return 0
    sys.stdout.write(section + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
