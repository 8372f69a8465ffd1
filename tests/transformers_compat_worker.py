"""Runs under ANOTHER transformers release (4.57) for tests/test_transformers_compat.py; never imports moeprune.

    python transformers_compat_worker.py make CONFIGS.json OUT_DIR
        for each {"name": config dict} entry, build the causal LM from ``AutoConfig.for_model`` with
        seed 0, weights N(0, 0.2) except norms, and ``save_pretrained`` it into OUT_DIR/name: checkpoints in that release's own format
        (config keys and tensor names), as the Hub holds them.
    python transformers_compat_worker.py types OUT.json
        the model types this release ships.
    python transformers_compat_worker.py logits IDS.safetensors REPORT.json DIR [DIR ...]
        load each DIR with ``AutoModelForCausalLM.from_pretrained`` and write, per DIR, its loading
        report (missing, unexpected and mismatched keys, or the error) and the float32 logits on the
        ``input_ids`` of IDS into DIR-named entries of REPORT.json's companion REPORT.safetensors.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

#: What this CPU-only environment needs to run a family (the Mamba CUDA kernels are absent here).
LOAD_OPTIONS = {"jamba": {"use_mamba_kernels": False}}


def known_keys(model_type: str, values: dict) -> dict:
    """``values`` without the keys this release's config class does not know (a checkpoint it wrote has
    none of them): its ``__init__`` parameters, the base class's and its ``attribute_map`` aliases."""
    config_class = CONFIG_MAPPING[model_type]
    known = {*inspect.signature(config_class.__init__).parameters, *inspect.signature(PretrainedConfig.__init__).parameters,
             *config_class.attribute_map, *PretrainedConfig.attribute_map}
    kept = {key: value for key, value in values.items() if key in known}
    for key, sub_class in getattr(config_class, "sub_configs", {}).items():  # DBRX's attn_config / ffn_config:
        if isinstance(kept.get(key), dict):  # their classes refuse the base class's keys
            own = set(inspect.signature(sub_class.__init__).parameters) - {"self", "kwargs"}
            kept[key] = {name: value for name, value in kept[key].items() if name in own}
    return kept


def make(configs_file: str, out_dir: str) -> None:
    for name, config_dict in json.loads(Path(configs_file).read_text()).items():
        model_type = config_dict.pop("model_type")
        config_dict = known_keys(model_type, config_dict)
        config = AutoConfig.for_model(model_type, **{**config_dict, **LOAD_OPTIONS.get(model_type, {})})
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
        with torch.no_grad():  # weights large enough that routing, rope and masking show in the logits
            for param_name, param in model.named_parameters():
                if "norm" not in param_name:
                    param.normal_(0.0, 0.2)
        model.save_pretrained(Path(out_dir) / name, safe_serialization=True)


def logits(ids_file: str, report_file: str, *dirs: str) -> None:
    input_ids = load_file(ids_file)["input_ids"]
    report, tensors = {"transformers": transformers.__version__}, {}
    for folder in dirs:
        model_type = json.loads((Path(folder) / "config.json").read_text())["model_type"]
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                folder, torch_dtype=torch.float32, output_loading_info=True, **LOAD_OPTIONS.get(model_type, {}))
            with torch.no_grad():
                tensors[Path(folder).name] = model.eval()(input_ids=input_ids).logits.contiguous()
            report[Path(folder).name] = {key: [str(k) for k in info[key]] for key in
                                         ("missing_keys", "unexpected_keys", "mismatched_keys")}
        except Exception as error:  # reported to the test, which fails with it
            report[Path(folder).name] = {"error": f"{type(error).__name__}: {error}"}
    save_file(tensors, str(Path(report_file).with_suffix(".safetensors")))
    Path(report_file).write_text(json.dumps(report, indent=1))


def types(out_file: str) -> None:
    Path(out_file).write_text(json.dumps(sorted(CONFIG_MAPPING.keys())))


if __name__ == "__main__":
    {"make": make, "logits": logits, "types": types}[sys.argv[1]](*sys.argv[2:])
