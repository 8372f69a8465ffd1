"""The files a pruned checkpoint carries besides its weights: companions and the model card.

:func:`copy_companion_files` copies from the source checkpoint folder what a Hugging Face model needs
next to its weights (tokenizer, generation config, chat template, license, remote code, ...) and
skips the weights, their index, config.json (the pruner writes a new one) and moeprune's own
outputs. :func:`write_model_card` writes the README.md model card of the pruned model.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moeprune.errors import MoePruneError
from moeprune.io.output import atomic_write_text

logger = logging.getLogger(__name__)

#: Files never copied: weights, weight indexes, the config, moeprune's own outputs.
SKIP_PATTERNS: tuple[str, ...] = (
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.h5",
    "*.msgpack",
    "*.gguf",
    "*.onnx",
    "*.index.json",
    "config.json",
    "README.md",
    "moeprune_*",
)

#: Companions larger than this are skipped with a warning (tokenizer.json of big vocabularies is ~30 MB).
MAX_COMPANION_BYTES = 256 * 1024**2


def is_companion(name: str) -> bool:
    """True when a top-level file called ``name`` should follow the weights into the pruned folder."""
    if name.startswith("."):
        return False  # .gitattributes, editor/download leftovers, our own temp files
    return not any(fnmatch.fnmatch(name, pattern) for pattern in SKIP_PATTERNS)


def copy_companion_files(src_dir: str | Path, dst_dir: str | Path) -> list[Path]:
    """Copy the non-weight files of checkpoint folder ``src_dir`` into ``dst_dir``.

    Copies top-level regular files (symlinks, as in the Hugging Face cache, are followed) that
    :func:`is_companion` accepts: tokenizer files, vocab/merges, ``*.model``, ``chat_template.*``,
    ``generation_config.json``, licenses, remote-code ``*.py`` and other small files. Subfolders,
    files already present in ``dst_dir`` and files over :data:`MAX_COMPANION_BYTES` are skipped (the
    latter with a warning). Returns the copied destination paths, sorted by name.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    if not src.is_dir():
        raise MoePruneError(f"checkpoint folder {src} does not exist or is not a folder; check the path")
    dst.mkdir(parents=True, exist_ok=True)
    copied: list[Path] = []
    for item in sorted(src.iterdir()):
        if not item.is_file() or not is_companion(item.name):
            continue
        target = dst / item.name
        if target.exists():
            logger.debug("not copying %s: %s already exists", item.name, target)
            continue
        size = item.stat().st_size
        if size > MAX_COMPANION_BYTES:
            logger.warning("not copying %s (%d bytes): too large for a companion file", item, size)
            continue
        shutil.copy2(item, target)
        copied.append(target)
    logger.info("copied %d companion file(s) from %s", len(copied), src)
    return copied


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _longest_backtick_run(text: str) -> int:
    """Length of the longest run of backticks in ``text`` (to pick a code fence that survives it)."""
    return max((len(m) for m in re.findall(r"`+", text)), default=0)


def _yaml_str(value: str) -> str:
    """A YAML double-quoted scalar (JSON string syntax is valid YAML)."""
    return json.dumps(value, ensure_ascii=False)


def _format_value(value: Any) -> str:
    """Render a value for the model card's parameter table."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list, tuple)):
        return f"`{json.dumps(value, ensure_ascii=False)}`"
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_model_card(
    *,
    base_model: str,
    method: str,
    ratio: float | None,
    data: str | None,
    moeprune_version: str,
    kept_summary: str,
    extra: Mapping[str, Any] | None = None,
    structure_keys: Sequence[str] = (),
    notes: str = "",
) -> str:
    """The markdown text of the model card (see :func:`write_model_card`). ``structure_keys``: the keys of
    the output's ``moeprune`` config section (the card then says to load it with ``moeprune.load``);
    ``notes``: a paragraph on what the family's pruning leaves as it is."""
    rows: list[tuple[str, Any]] = [
        ("Base model", f"`{base_model}`"),
        ("Pruning method", method),
        ("Pruning ratio", ratio),
        ("Calibration data", data),
        ("moeprune version", moeprune_version),
    ]
    rows += [(str(k), v) for k, v in (extra or {}).items()]
    table = "\n".join(f"| {k} | {_format_value(v)} |" for k, v in rows)
    summary = kept_summary.strip() or "(no summary given)"
    fence = "`" * max(3, _longest_backtick_run(summary) + 1)
    is_hub_id = _HUB_ID.match(base_model) is not None
    base_link = f"[{base_model}](https://huggingface.co/{base_model})" if is_hub_id else f"`{base_model}`"
    how_to_load = (_LOAD_WITH_MOEPRUNE.format(keys=", ".join(f"`{key}`" for key in structure_keys)) if structure_keys
                   else _LOAD_WITH_TRANSFORMERS)
    notes = f"## Notes\n\n{notes.strip()}\n\n" if notes.strip() else ""
    return f"""---
base_model: {_yaml_str(base_model)}
library_name: transformers
tags:
- moeprune
- moe
- pruned
---

# Expert-pruned {base_model}

This is a copy of {base_link} whose Mixture-of-Experts layers
keep only part of their routed experts. The experts that remain, their router rows and every other
weight are copied unchanged; nothing was fine-tuned.

## How it was made

Pruned with moeprune {moeprune_version}:

| Setting | Value |
|---|---|
{table}

## Experts kept per layer

{fence}text
{summary}
{fence}

{notes}## How to load

{how_to_load}"""


_LOAD_WITH_TRANSFORMERS = """The folder is a standard Hugging Face checkpoint: plain `transformers` loads it, no moeprune needed
(`config.json` records the reduced expert count).

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

path = "path/to/this/folder"  # or the Hub repository id
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", device_map="auto")
```
"""

_LOAD_WITH_MOEPRUNE = """`config.json` has a `moeprune` section: structure a stock transformers config cannot express
({keys}). Load the folder with `moeprune.load`, which applies it; plain `transformers` does not know the
section (it refuses tensors shaped differently from what the stock config implies, and loads behaviour
such as dynamic skipping without it).

```python
import moeprune
from transformers import AutoTokenizer

path = "path/to/this/folder"
tokenizer = AutoTokenizer.from_pretrained(path)
model = moeprune.load(path)
```
"""


def write_model_card(
    dst_dir: str | Path,
    *,
    base_model: str,
    method: str,
    ratio: float | None,
    data: str | None,
    moeprune_version: str,
    kept_summary: str,
    extra: Mapping[str, Any] | None = None,
    structure_keys: Sequence[str] = (),
    notes: str = "",
) -> Path:
    """Write ``README.md`` (YAML front matter + how it was made, experts kept, how to load) into ``dst_dir``.

    ``kept_summary`` is shown verbatim (e.g. one line per layer); ``extra`` adds rows to the settings
    table. Replaces an existing README.md (the card describes this output). Returns its path.
    """
    text = render_model_card(
        base_model=base_model,
        method=method,
        ratio=ratio,
        data=data,
        moeprune_version=moeprune_version,
        kept_summary=kept_summary,
        extra=extra,
        structure_keys=structure_keys,
        notes=notes,
    )
    return atomic_write_text(Path(dst_dir) / "README.md", text, overwrite=True)
