"""moeprune's outputs load in transformers 4.57 as well as in 5.x, with the same logits.

The Hub's checkpoints were written by transformers 4.x: config keys such as ``num_experts`` and
``rope_theta`` (5.x renamed some and moved rope settings into ``rope_parameters``). This test has
transformers 4.57 itself write tiny random checkpoints of every family both releases ship, prunes them
with moeprune under 5.x (expert drop for every family; merging, neuron slicing, heads, channels and
layer drop where the family has the unit), then loads sources and outputs in both releases:

- 4.57 loads every output with no missing, unexpected or mismatched key;
- the logits 4.57 computes equal those 5.x computes for the same folder (sources included: moeprune
  reads 4.x checkpoints as their own release does).

It needs a Python with transformers 4.57 and this project's torch: ``make test`` builds one
(``make compat-env``, a venv over the system site-packages) and passes it in
``MOEPRUNE_COMPAT_PYTHON``; without that variable the module is skipped and says why.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeprune import api
from moeprune.arch import family_for_model_type
from moeprune.layout import family_layout
from moeprune.tiny import TINY_FAMILIES, tiny_config
from moeprune.tokenizer import tiny_tokenizer

COMPAT_PYTHON = os.environ.get("MOEPRUNE_COMPAT_PYTHON")
pytestmark = pytest.mark.skipif(not COMPAT_PYTHON, reason="set MOEPRUNE_COMPAT_PYTHON to a Python with transformers "
                                                          "4.57 (make compat-env builds one; make test sets it)")
WORKER = Path(__file__).with_name("transformers_compat_worker.py")

#: Heads moeprune cannot prune although the spec has [attention]: MiniMax's lightning-attention layers.
HEADS_REFUSED = ("minimax",)


def heads_prunable(family: str) -> bool:
    spec = family_layout(family_for_model_type(family)).attention
    return (spec is not None and spec.kind == "gqa" and spec.qk_norm != "across_heads"
            and family not in HEADS_REFUSED)

#: Output kinds beyond the 50% expert drop every family gets: (method, options) -> does the family get it.
OUTPUTS = {
    ("hc_smoe", ()): ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss").__contains__,
    ("wanda_neuron", ()): ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss").__contains__,
    ("magnitude", (("unit", "heads"),)): heads_prunable,
    ("magnitude", (("unit", "mlp"),)): ("deepseek_v3", "glm4_moe").__contains__,
    ("magnitude", (("unit", "shared"),)): ("qwen2_moe", "deepseek_v3").__contains__,
    ("angular", (("layers", 1),)): ("mixtral", "qwen3_moe", "jamba", "deepseek_v3").__contains__,
}

def expressible_in_457(folder: Path) -> bool:
    """Whether transformers 4.57 can express an output. Not: head-pruned models of the families whose spec says
    4.x derives the head size from hidden_size / num_attention_heads (``[attention] head_dim_v4 = "derived"``),
    and outputs with a ``moeprune`` config section (non-uniform widths, per-layer counts: ``moeprune.load``)."""
    family = folder.name.split("-")[0]
    spec = family_layout(family_for_model_type(family)).attention
    derived_heads = folder.name.endswith("-magnitude-unitheads") and spec.head_dim_v4 == "derived"
    return not derived_heads and "moeprune" not in json.loads((folder / "config.json").read_text())


#: Families whose 4.57 checkpoints transformers 5 itself cannot load (so neither can moeprune, which says so): 4.57's
#: LongCat-Flash stores no gate/up rows for the identity experts, 5.x's does.
NOT_READABLE_IN_5 = ("longcat_flash",)


def checked_in_457(family: str) -> bool:
    """Whether this check covers ``family``: not the multimodal wrappers (the worker writes causal-LM
    checkpoints; a multimodal source would need its own class) and not :data:`NOT_READABLE_IN_5`."""
    return family not in NOT_READABLE_IN_5 and not family_for_model_type(family).text_key

#: transformers 4.57 names these config values differently from 5.x (the checkpoints on the Hub use these).
LEGACY_VALUES = {"granitemoehybrid": {"layer_types": {"linear_attention": "mamba", "full_attention": "attention"}}}


def legacy_config_dict(family: str) -> dict:
    """The tiny 5.x config of ``family`` as a 4.x config.json spells it: every renamed key under its old
    name too (the config class's ``attribute_map``) and ``rope_theta``/``rope_scaling`` beside
    ``rope_parameters``."""
    config = tiny_config(family)
    values = config.to_dict()
    for key, renamed in LEGACY_VALUES.get(family, {}).items():
        values[key] = [renamed.get(v, v) for v in values[key]]
    for old, new in type(config).attribute_map.items():
        if new in values and old not in values:
            values[old] = values[new]
    rope = values.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        values.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            values.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    for key in ("transformers_version", "architectures", "dtype", "torch_dtype"):
        values.pop(key, None)
    return values


def worker(*args) -> None:
    done = subprocess.run([COMPAT_PYTHON, str(WORKER), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]


def logits_here(folder: Path, input_ids: torch.Tensor) -> torch.Tensor:
    import moeprune

    model = moeprune.load(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.fixture(scope="module")
def compat_run(tmp_path_factory, calib_file):
    """Sources written by 4.57, outputs written by moeprune, and 4.57's report and logits on all of them."""
    root = tmp_path_factory.mktemp("compat")
    worker("types", root / "types.json")
    families = [family for family in TINY_FAMILIES
                if family in json.loads((root / "types.json").read_text()) and checked_in_457(family)]
    configs = root / "configs.json"
    configs.write_text(json.dumps({family: legacy_config_dict(family) for family in families}))
    worker("make", configs, root / "sources")
    folders = [root / "sources" / family for family in families]
    for folder in folders:
        tiny_tokenizer().save_pretrained(folder)
    for family in families:
        runs = [("frequency", ())] + [kind for kind, gets_it in OUTPUTS.items() if gets_it(family)]
        for method, options in runs:
            out = root / "outputs" / "-".join([family, method, *(f"{k}{v}" for k, v in options)])
            api.prune(root / "sources" / family, out, method=method, ratio=0.5, options=dict(options),
                      data=calib_file, samples=4, seq_len=32, progress=False,
                      protect_super_experts=False)  # super experts kept whole would need moeprune.load
            folders.append(out)
    input_ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": input_ids}, str(root / "ids.safetensors"))
    worker("logits", root / "ids.safetensors", root / "report.json", *folders)
    report = json.loads((root / "report.json").read_text())
    return folders, report, load_file(str(root / "report.safetensors")), input_ids


def test_outputs_load_in_transformers_457_without_key_mismatch(compat_run):
    folders, report, _, _ = compat_run
    assert report["transformers"].startswith("4.57")
    clean = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    problems = {folder.name: report[folder.name] for folder in folders if expressible_in_457(folder) and report[folder.name] != clean}
    assert not problems, json.dumps(problems, indent=1)[:6000]
    sources = [folder for folder in folders if folder.parent.name == "sources"]
    assert len(sources) >= 20 and sum(map(expressible_in_457, folders)) > 2 * len(sources)


def test_outputs_457_cannot_express_fail_loudly_there(compat_run):
    folders, report, logits_457, _ = compat_run
    inexpressible = [folder for folder in folders if not expressible_in_457(folder)]
    assert sum(folder.name.endswith("-magnitude-unitheads") for folder in inexpressible) == 6  # spec: head_dim_v4
    for folder in inexpressible:
        assert "error" in report[folder.name] or report[folder.name]["mismatched_keys"], folder.name


def test_transformers_457_and_5_give_the_same_logits(compat_run):
    folders, _, logits_457, input_ids = compat_run
    for folder in filter(expressible_in_457, folders):
        expected = logits_here(folder, input_ids)
        assert torch.allclose(logits_457[folder.name], expected, rtol=1e-4, atol=1e-4), folder.name


def test_every_output_changed_the_model(compat_run):
    """The outputs are real prunes: each one's logits differ from its source's."""
    folders, _, logits_457, _ = compat_run
    for folder in filter(expressible_in_457, folders):
        if folder.parent.name == "outputs":
            source = folder.name.split("-")[0]
            assert not torch.allclose(logits_457[folder.name], logits_457[source], atol=1e-3), folder.name
