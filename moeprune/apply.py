"""Drop experts: slice a model in memory, or rewrite its safetensors shards tensor by tensor.

What changes together when experts are dropped from an MoE layer (original numbering ``kept``):

* the fused expert tensors (and their biases) along the expert axis; on disk, per-expert tensors of
  dropped experts are left out and the kept ones renumbered 0..E'-1;
* the router's weight rows, and its bias / ``e_score_correction_bias`` where the family has them;
* the ``num_experts`` attributes of the router and experts modules, and every config key old and new
  transformers read for the expert count (routers/<family>.toml lists them);
* with ``collapse_groups`` (DeepSeek group routing, explicit opt-in only): n_group = topk_group = 1.

Vanilla transformers holds one expert count per model, so a plan must keep the same number of experts
in every MoE layer to produce a loadable checkpoint.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .arch import Family, decoder_layers, family_for_model_type, read_config
from .errors import PlanError
from .io.checkpoint import LazyCheckpoint
from .io.files import copy_companion_files, write_model_card
from .io.output import check_output, prepared_output
from .io.writer import TensorSpec, write_sharded
from .plan import PLAN_FILENAME, Plan

logger = logging.getLogger(__name__)

def uniform_kept_count(plan: Plan) -> int:
    """The single number of experts every MoE layer keeps; non-uniform plans are refused."""
    counts = {len(kept) for kept in plan.layers.values()}
    if len(counts) != 1:
        raise PlanError(
            f"the plan keeps different numbers of experts per layer ({sorted(counts)}); a vanilla "
            "transformers checkpoint holds one expert count per model, so use a uniform --ratio/--keep"
        )
    return counts.pop()


def pruned_config_dict(config_dict: dict, family: Family, plan: Plan) -> dict:
    """config.json content after the plan: every expert-count key, and groups if collapsed."""
    new = dict(config_dict)
    kept = uniform_kept_count(plan)
    for key in family.num_experts_keys:
        new[key] = kept
    if plan.collapse_groups:
        for key in ("n_group", "topk_group"):
            if key in family.spec["config"]:
                new[family.spec["config"][key]] = 1
    return new


# -- in memory ---------------------------------------------------------------------------------


def apply_plan_in_memory(model: nn.Module, plan: Plan) -> nn.Module:
    """Slice the model's expert layers in place to the plan's kept experts; returns the model."""
    family = family_for_model_type(model.config.model_type)
    layers = decoder_layers(model)
    kept_count = uniform_kept_count(plan)
    for layer_index, kept in plan.layers.items():
        layer = layers[layer_index]
        index = torch.tensor(kept, dtype=torch.long)
        router = family.router(layer)
        experts = family.experts(layer)
        for module, names in ((router, family.router_param_names), (experts, family.expert_param_names)):
            for name in names:
                _slice_tensor_attribute(module, name, index)
        resize_routing(router, experts, kept_count, plan.collapse_groups)
    set_pruned_config(model.config, family, plan)
    return model


def resize_routing(router: nn.Module, experts: nn.Module, count: int, collapse_groups: bool) -> None:
    """Set the expert count a sliced MoE block routes over (and n_group = topk_group = 1 when
    ``collapse_groups``)."""
    router.num_experts = experts.num_experts = count
    if collapse_groups:
        for attribute in ("num_group", "topk_group"):
            if hasattr(router, attribute):
                setattr(router, attribute, 1)


def set_pruned_config(config, family: Family, plan: Plan) -> None:
    """Set on a loaded model's ``config`` every key :func:`pruned_config_dict` changes."""
    before = config.to_dict()
    for key, value in pruned_config_dict(before, family, plan).items():
        if before.get(key) != value:
            setattr(config, key, value)


def _slice_tensor_attribute(module: nn.Module, name: str, index: torch.Tensor) -> None:
    tensor = getattr(module, name)
    sliced = tensor.detach().index_select(0, index.to(tensor.device)).clone()
    if isinstance(tensor, nn.Parameter):
        setattr(module, name, nn.Parameter(sliced, requires_grad=tensor.requires_grad))
    else:
        module.register_buffer(name, sliced, persistent=name in module._buffers and name not in module._non_persistent_buffers_set)


# -- streaming ---------------------------------------------------------------------------------


def streaming_tensor_plan(checkpoint: LazyCheckpoint, family: Family, plan: Plan) -> list[tuple[TensorSpec, str, list[int] | None]]:
    """(output spec, source tensor, rows to keep or None) for every output tensor, in source order."""
    entries = []
    sliced: dict[str, list[int]] = {}
    renamed: dict[str, str] = {}
    dropped: set[str] = set()
    for layer, kept in plan.layers.items():
        for key in family.disk_router_keys(layer) + family.disk_fused_expert_keys(layer):
            sliced[key] = kept
        pattern = family.disk_expert_key_pattern(layer)
        if pattern is None:
            continue
        new_number = {old: new for new, old in enumerate(kept)}
        for key in checkpoint.keys_with_prefix(f"model.layers.{layer}."):
            match = pattern.match(key)
            if not match:
                continue
            old = int(match.group(1))
            if old in new_number:
                head = key[: match.start(1)]
                renamed[key] = head + str(new_number[old]) + key[match.end(1):]
            else:
                dropped.add(key)
    available = set(checkpoint.keys())
    missing = [key for key in sliced if key not in available]
    if missing:
        raise PlanError(f"checkpoint lacks router/expert tensors the plan needs: {missing[:3]}")
    for key in checkpoint.keys():
        if key in dropped:
            continue
        shape = tuple(checkpoint.shape(key))
        rows = sliced.get(key)
        if rows is not None:
            shape = (len(rows),) + shape[1:]
        entries.append((TensorSpec(renamed.get(key, key), shape, checkpoint.dtype(key)), key, rows))
    return entries


def write_pruned_checkpoint(
    model_dir: str | Path,
    plan: Plan,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    data_description: str = "",
    progress: bool = True,
) -> Path:
    """Stream ``model_dir``'s shards into a pruned, vanilla-loadable checkpoint at ``out_dir``.

    Reads and writes one tensor at a time; writes into a temporary folder renamed at the end.
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    family = family_for_model_type(config.model_type)
    checkpoint = LazyCheckpoint(model_dir)
    check_output(out_dir, overwrite, protect=[model_dir])
    entries = streaming_tensor_plan(checkpoint, family, plan)
    sources = {spec.name: (source, rows) for spec, source, rows in entries}

    def produce(name: str) -> torch.Tensor:
        source, rows = sources[name]
        return checkpoint.get(source) if rows is None else checkpoint.get_rows(source, rows)

    config_dict = json.loads((model_dir / "config.json").read_text())
    with prepared_output(out_dir, overwrite=overwrite, protect=[model_dir]) as tmp:
        write_sharded(tmp, [spec for spec, _, _ in entries], produce, max_shard_bytes=max_shard_size, progress=progress)
        write_pruned_config(tmp / "config.json", config_dict, family, plan)
        finish_output(model_dir, tmp, plan, data_description)
    logger.info("wrote pruned checkpoint to %s", out_dir)
    return Path(out_dir)


def save_in_memory_pruned(model: nn.Module, source_dir: str | Path, plan: Plan, out_dir: str | Path, *, overwrite: bool = False, data_description: str = "") -> Path:
    """Save an in-memory-pruned model with save_pretrained plus the plan, card and companions."""
    check_output(out_dir, overwrite)
    family = family_for_model_type(model.config.model_type)
    with prepared_output(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        # save_pretrained writes only the attribute names the config class keeps (Qwen3-MoE: just
        # num_local_experts); write every expert-count key old and new transformers read, as the
        # streaming path does.
        write_pruned_config(tmp / "config.json", json.loads((tmp / "config.json").read_text()), family, plan)
        finish_output(Path(source_dir), tmp, plan, data_description)
    return Path(out_dir)


def write_pruned_config(config_path: Path, source_config: dict, family: Family, plan: Plan) -> None:
    """Write config.json with every expert-count key old and new transformers read (and groups)."""
    config_path.write_text(json.dumps(pruned_config_dict(source_config, family, plan), indent=2, sort_keys=True) + "\n")


def finish_output(source_dir: Path, out_dir: Path, plan: Plan, data_description: str) -> None:
    """Tokenizer/generation files, moeprune_plan.json and the model card."""
    copy_companion_files(source_dir, out_dir)
    plan.save(out_dir / PLAN_FILENAME)
    kept = {layer: len(k) for layer, k in plan.layers.items()}
    summary = ", ".join(f"layer {layer}: {count}/{plan.num_experts}" for layer, count in kept.items())
    write_model_card(
        out_dir,
        base_model=str(source_dir),
        method=plan.method,
        ratio=plan.budget.get("ratio"),
        data=data_description,
        moeprune_version=__version__,
        kept_summary=summary,
        extra={"collapse_groups": plan.collapse_groups, "protected": {str(k): v for k, v in plan.protected.items()}},
    )
