"""The one writer: a plan's recipes -> a sharded, vanilla-loadable checkpoint folder.

:func:`write_edit` is the streaming executor: it lists every output tensor (unchanged source
tensors, replaced tensors, the new routed experts of edited layers, laid out on disk as the family
stores them: :mod:`moeprune.layout`) with its shape and dtype from the headers alone, then hands
them to :func:`moeprune.io.writer.write_sharded`, which asks for one tensor at a time; each is
evaluated from the :class:`~moeprune.io.checkpoint.LazyCheckpoint` (reading only the rows a
selection needs) in source-shard order. Outputs keep the checkpoint's own dtypes.

:func:`write_pruned_checkpoint` adds what makes a folder a checkpoint: config.json with the plan's
config keys, companion files (tokenizer, generation config), ``moeprune_plan.json`` and the model
card, all in a temporary folder renamed into place at the end (:func:`moeprune.io.output.prepared_output`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .arch import Family, family_for_model_type, known_families, read_config, set_config_value
from .errors import PlanError
from .io.checkpoint import LazyCheckpoint
from .io.files import copy_companion_files, write_model_card
from .io.output import check_output, final_path, prepared_output
from .io.writer import TensorSpec, write_sharded
from .layout import CheckpointLayout, FlatFormat, FusedFormat
from .ops import Edit, config_edit, plan_edit
from .ops.neurons import widths_summary
from .structure import SECTION, section_config
from .ops.edit import CheckpointSource
from .ops.recipe import ExpertRef, Recipe, Take
from .plan import PLAN_FILENAME, Plan
from .plan.actions import (DropAttentionHeads, DropLayer, MergeExperts, RecombineNeurons, SliceChannels,
                           TransformMlpOutput)

logger = logging.getLogger(__name__)

Producer = Callable[[], torch.Tensor]


def _whole_experts(layer: int, experts: list[dict[str, Recipe]]) -> list[int] | None:
    """The source expert of each new expert when every new expert is an old one of ``layer`` taken
    whole (every projection a :class:`Take` of the same projection), else None."""
    origin = []
    for expert in experts:
        refs = {proj: recipe.ref if isinstance(recipe, Take) else None for proj, recipe in expert.items()}
        numbers = {ref.expert if isinstance(ref, ExpertRef) and ref.layer == layer and ref.proj == proj else None
                   for proj, ref in refs.items()}
        if len(numbers) != 1 or None in numbers:
            return None
        origin.append(numbers.pop())
    return origin


def _block_entries(layout: CheckpointLayout, source: CheckpointSource, layer: int,
                   experts: list[dict[str, Recipe]]) -> list[tuple[TensorSpec, Producer]]:
    """Output tensors of one MoE layer's new routed experts, as the family stores them on disk."""
    family = layout.family
    if family.per_expert_on_disk:
        entries = []
        for i, expert in enumerate(experts):
            extra = sorted(set(expert) - set(family.disk.projections))
            if extra:
                raise PlanError(f"layer {layer}: the {family.family} on-disk layout has no place for {extra}")
            identity = family.identity_experts and set(expert) == {"gate", "up"}  # LongCat-Flash: gate/up files only
            for proj in family.disk.projections:
                if identity and proj not in expert:
                    continue
                recipe = expert[proj]
                spec = TensorSpec(family.expert_file(layer, i, proj), recipe.shape(source), recipe.dtype(source))
                entries.append((spec, lambda recipe=recipe: recipe.evaluate(source)))
        return entries
    fmt: FusedFormat | FlatFormat = family.disk
    wrong = [i for i, expert in enumerate(experts) if set(expert) != set(fmt.projections)]
    if wrong:
        raise PlanError(f"layer {layer}: new expert {wrong[0]} must give exactly {', '.join(fmt.projections)}")
    shapes = [{proj: recipe.shape(source) for proj, recipe in expert.items()} for expert in experts]
    widths = {shape["up"][0] for shape in shapes}  # every expert has up rows (ungated ones no gate)
    if len(widths) > 1:
        raise PlanError(f"layer {layer}: experts of different widths {sorted(widths)} cannot share one fused "
                        f"{family.family} expert tensor")
    inter, hidden = shapes[0]["up"]
    origin = _whole_experts(layer, experts)
    entries = []
    for name, key in zip(fmt.names, layout.layers[layer].fused):
        spec = TensorSpec(key, fmt.block_shape(name, len(experts), inter, hidden), layout.checkpoint.dtype(key))
        if origin is not None:  # whole experts: read just their rows of the block, in one call
            produce = lambda key=key: layout.checkpoint.get_rows(key, layout.expert_block_rows(layer, key, origin))  # noqa: E731
        else:
            def produce(name=name, spec=spec):
                parts = fmt.parts(name)
                canonical = [{proj: expert[proj].evaluate(source) for proj in parts} for expert in experts]
                return fmt.join_one(name, canonical).to(spec.dtype)
        entries.append((spec, produce))
    return entries


def edit_entries(layout: CheckpointLayout, edit: Edit) -> list[tuple[TensorSpec, Producer]]:
    """Every output tensor of ``edit`` applied to the checkpoint, in source-shard order (header only).

    Shapes come from the recipes, so an index out of range or a shape mismatch is an error here,
    before any weight is read. Tensors of dropped layers are left out and later layers' tensors are
    renamed (:meth:`~moeprune.ops.edit.Edit.renumber`), the one place where outputs are renumbered.
    """
    checkpoint = layout.checkpoint
    source = CheckpointSource(layout)
    missing = [name for name in edit.tensors if name not in checkpoint and isinstance(edit.tensors[name], Take)
               and name not in edit.optional]
    if missing:
        raise PlanError(f"checkpoint lacks tensors the plan needs: {missing[:3]}")
    unknown = [layer for layer in edit.experts if layer not in layout.layers]
    if unknown:
        raise PlanError(f"layers {unknown} hold no routed experts in {checkpoint.path}")
    entries: list[tuple[TensorSpec, Producer]] = []
    emitted: set[int] = set()
    for names in checkpoint.keys_by_shard().values():
        for name in names:
            if edit.renumber(name) is None:  # a dropped layer
                continue
            layer = layout.owner(name)
            if layer is not None and layer in edit.experts:
                if layer not in emitted:
                    entries.extend(_block_entries(layout, source, layer, edit.experts[layer]))
                    emitted.add(layer)
                continue
            recipe = edit.tensors.get(name, Take(name))
            spec = TensorSpec(name, recipe.shape(source), recipe.dtype(source))
            entries.append((spec, lambda recipe=recipe: recipe.evaluate(source)))
    for name, recipe in edit.tensors.items():
        if name not in checkpoint and name not in edit.optional:  # new tensors go last
            entries.append((TensorSpec(name, recipe.shape(source), recipe.dtype(source)), lambda r=recipe: r.evaluate(source)))
    if edit.dropped_layers:
        entries = [(dataclasses.replace(spec, name=edit.renumber(spec.name)), produce) for spec, produce in entries]
    return entries


def write_edit(layout: CheckpointLayout, edit: Edit, out_dir: str | Path, *, max_shard_size: str | int = "5GB",
               progress: bool = True) -> list[Path]:
    """Stream the checkpoint with ``edit`` applied into (an existing, empty) ``out_dir``: the tensors only."""
    entries = edit_entries(layout, edit)
    producers = {spec.name: produce for spec, produce in entries}

    def produce(name: str) -> torch.Tensor:
        try:
            return producers[name]()
        finally:
            layout.forget()

    return write_sharded(out_dir, [spec for spec, _ in entries], produce, max_shard_bytes=max_shard_size, progress=progress)


def write_pruned_checkpoint(
    model_dir: str | Path,
    plan: Plan,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    data_description: str = "",
    progress: bool = True,
    structure: dict | None = None,
) -> Path:
    """Stream ``model_dir``'s shards into the checkpoint ``plan`` describes, at ``out_dir``.

    Reads and writes one tensor at a time; writes into a temporary folder renamed at the end. Actions
    not implemented yet are refused before anything is written. ``structure``: further keys of the
    ``moeprune`` config section (e.g. ``dynamic_skip``, :mod:`moeprune.skipping`).
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    family = family_for_model_type(config.model_type)
    checkpoint = LazyCheckpoint(model_dir)
    check_output(out_dir, overwrite, protect=[model_dir])
    edit = plan_edit(family, plan, config=config)
    if structure:
        edit.config.update(section_config(structure, existing=edit.config.get(SECTION)))
    layout = CheckpointLayout.build(family, checkpoint, sorted(edit.experts))
    edit_entries(layout, edit)  # every shape checked before the output folder exists
    config_dict = json.loads((model_dir / "config.json").read_text())
    with prepared_output(out_dir, overwrite=overwrite, protect=[model_dir]) as tmp:
        write_edit(layout, edit, tmp, max_shard_size=max_shard_size, progress=progress)
        write_config(tmp / "config.json", config_dict, edit.config, sub_config=family.text_key)
        finish_output(model_dir, tmp, plan, data_description)
    checkpoint.close()
    logger.info("wrote pruned checkpoint and its %s to %s", PLAN_FILENAME, final_path(out_dir))
    return Path(out_dir)


def save_in_memory_pruned(model: nn.Module, source_dir: str | Path, plan: Plan, out_dir: str | Path, *,
                          overwrite: bool = False, data_description: str = "") -> Path:
    """Save an in-memory-pruned model with save_pretrained plus the plan, card and companions."""
    check_output(out_dir, overwrite)
    family = family_for_model_type(model.config.model_type)
    source_family = family_for_model_type(read_config(source_dir).model_type)
    if source_family.text_key and family.name != source_family.name:  # the text decoder of a multimodal source
        return _save_text_into_wrapper(model, source_family, Path(source_dir), plan, out_dir, overwrite, data_description)
    with prepared_output(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if family.text_key:  # a whole multimodal model: the source's config, the expert counts in its text config
            source = json.loads((Path(source_dir) / "config.json").read_text())
            write_config(tmp / "config.json", source, config_edit(family, plan), sub_config=family.text_key)
            finish_output(Path(source_dir), tmp, plan, data_description)
            return Path(out_dir)
        # save_pretrained writes only the attribute names the config class keeps (Qwen3-MoE: just
        # num_local_experts); write every expert-count key old and new transformers read, as the
        # streaming path does.
        write_config(tmp / "config.json", json.loads((tmp / "config.json").read_text()), config_edit(family, plan))
        finish_output(Path(source_dir), tmp, plan, data_description)
    logger.info("wrote pruned checkpoint to %s", final_path(out_dir))
    return Path(out_dir)


def _save_text_into_wrapper(model: nn.Module, family: Family, source_dir: Path, plan: Plan, out_dir: str | Path,
                            overwrite: bool, data_description: str) -> Path:
    """Save the pruned text decoder (a causal LM) of multimodal checkpoint ``source_dir`` as a multimodal
    checkpoint: the decoder's tensors as save_pretrained writes them, renamed to the wrapper's on-disk names
    (``[disk] model_prefix`` / ``head_prefix``), every tower tensor copied from the source byte for byte,
    the source's config.json with the expert counts in its text config."""
    layout = family.layout
    with prepared_output(out_dir, overwrite=overwrite) as tmp, LazyCheckpoint(source_dir) as source:
        scratch = tmp / "text-decoder"
        model.save_pretrained(scratch)
        with LazyCheckpoint(scratch) as text:
            # transformers may already write the wrapper's names (a decoder loaded from it); else rename
            renamed = {(name if layout.is_text_tensor(name) else layout.disk_name(name)): (text, name) for name in text.keys()}
            towers = {name: (source, name) for name in source.keys() if not layout.is_text_tensor(name)}
            tensors = {**renamed, **towers}
            specs = [TensorSpec(name, tuple(where.shape(key)), where.dtype(key)) for name, (where, key) in tensors.items()]
            write_sharded(tmp, specs, lambda name: tensors[name][0].get(tensors[name][1]), progress=False)
        shutil.rmtree(scratch)
        write_config(tmp / "config.json", json.loads((source_dir / "config.json").read_text()), config_edit(family, plan),
                     sub_config=family.text_key)
        finish_output(source_dir, tmp, plan, data_description)
    logger.info("wrote pruned checkpoint to %s", final_path(out_dir))
    return Path(out_dir)


def aliased_values(source_config: dict, values: dict) -> dict:
    """``values`` under the other names the source config.json already uses for them: transformers maps
    old names to new ones (the config class's ``attribute_map``, e.g. DeepSeek-V2's ``num_experts`` ->
    ``n_routed_experts``), and an old name left at its old value would override the edited one on load."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = source_config.get("model_type")
    aliases = CONFIG_MAPPING[model_type].attribute_map if model_type in CONFIG_MAPPING else {}
    pairs = [*aliases.items(), *((new, old) for old, new in aliases.items())]
    return {name: values[edited] for name, edited in pairs
            if edited in values and name in source_config and name not in values}


def write_config(config_path: Path, source_config: dict, values: dict, sub_config: str | None = None) -> None:
    """Write config.json: ``source_config`` with ``values`` set (sorted keys, as before); with
    ``sub_config`` (a multimodal wrapper's ``text_config``) ``values`` are set in that sub-config. The file
    lies in the temporary output folder, which becomes the output atomically."""
    merged = merged_config(source_config, values)
    if sub_config is not None:
        merged = {**source_config, sub_config: merged_config(source_config[sub_config], values)}
    config_path.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")


def merged_config(source_config: dict, values: dict) -> dict:
    """``source_config`` with ``values`` set, under every alias the source uses (a dotted key in its nested
    sub-config: DBRX's ``ffn_config.moe_num_experts``), and the source's structure keys kept unless replaced."""
    nested = {key: value for key, value in values.items() if "." in key}
    values = {key: value for key, value in values.items() if key not in nested}
    merged = {**source_config, **values, **aliased_values(source_config, values)}
    merged = copy.deepcopy(merged) if nested else merged
    for key, value in nested.items():
        set_config_value(merged, key, value)
    if SECTION in values and SECTION in source_config:  # the source's structure keys stay unless replaced
        merged.update(section_config({k: v for k, v in values[SECTION].items() if k != "format"},
                                     existing=source_config[SECTION]))
    return merged


def pruned_config_dict(config_dict: dict, family: Family, plan: Plan) -> dict:
    """config.json content after the plan: every expert-count key, and groups if collapsed."""
    return {**config_dict, **config_edit(family, plan)}


def _action_summary(action) -> str:
    """One model-card phrase for a non-keep action (neuron slicing is summarised by its widths)."""
    if isinstance(action, MergeExperts):
        return f"{len(action.clusters)} merged experts ({action.router} router)"
    if isinstance(action, RecombineNeurons):
        return f"neurons of dropped experts recombined into {len(action.experts)} kept experts"
    if isinstance(action, DropAttentionHeads):
        return ", ".join(filter(None, [action.kv_groups and f"{len(action.kv_groups)} KV groups (with their query heads) dropped",
                                       action.heads and f"{len(action.heads)} query heads dropped"]))
    if isinstance(action, SliceChannels):
        return f"{action.target} kept {len(action.kept)} channels"
    if isinstance(action, DropLayer):
        return "layer dropped"
    if isinstance(action, TransformMlpOutput):
        return "MLP output transformed (ReplaceMe)"
    return ""


def plan_summary(plan: Plan) -> str:
    """The model card's summary of what ``plan`` keeps: per layer, kept experts (``k/E``) and every other
    action in a phrase; the expert widths of a neuron-slicing plan."""
    parts = {layer: [f"{len(kept)}/{plan.num_experts}"] for layer, kept in plan.layers.items()}
    for layer, actions in plan.actions.items():
        parts.setdefault(layer, []).extend(p for p in map(_action_summary, actions) if p)
    summary = ", ".join(f"layer {layer}: {'; '.join(p)}" for layer, p in sorted(parts.items()) if p)
    return "; ".join(filter(None, [summary, widths_summary(plan)]))


def card_notes(family: Family) -> str:
    """The model card's paragraph on what pruning this family leaves whole (JetMoE's attention experts)."""
    shared = family.expert_count_shared
    if not shared:
        return ""
    keys = ", ".join(f"`{key}`" for key in family.num_experts_keys)
    return (f"{keys} also sizes {shared}. moeprune prunes the routed MLP experts only and keeps {shared} whole: "
            f"{keys} keeps their count, and config.json's `moeprune` section records the MLP experts kept per "
            "layer (`experts_per_layer`).")


def finish_output(source_dir: Path, out_dir: Path, plan: Plan, data_description: str) -> None:
    """Tokenizer/generation files, moeprune_plan.json and the model card (which says to load the output with
    ``moeprune.load`` when its config.json has a ``moeprune`` section)."""
    copy_companion_files(source_dir, out_dir)
    plan.save(out_dir / PLAN_FILENAME, announce=False)  # out_dir is the temporary folder
    summary = plan_summary(plan)
    config = json.loads((out_dir / "config.json").read_text()) if (out_dir / "config.json").is_file() else {}
    structure = sorted(key for key in (config.get(SECTION) or {}) if key != "format")
    family = family_for_model_type(config["model_type"]) if "model_type" in config else None
    write_model_card(
        out_dir,
        base_model=str(source_dir),
        method=plan.method,
        ratio=plan.budget.get("ratio", plan.budget.get("total_ratio")),  # a combined budget: of all parameters
        data=data_description,
        moeprune_version=__version__,
        kept_summary=summary,
        extra={"collapse_groups": plan.collapse_groups, "protected": {str(k): v for k, v in plan.protected.items()},
               **hash_routing_note(plan)},
        structure_keys=structure,
        notes=card_notes(family) if family is not None else "",
    )


#: the model card's note for families whose first MoE layers route by a token-id table (DeepSeek-V4)
HASH_ROUTING_NOTE = ("the hash-routed MoE layers' token-id -> expert-id table (tid2eid) is remapped: a merged expert's "
                     "members become the merged expert; in each token's row a dropped expert is replaced by the row's "
                     "first kept expert (by the next kept expert in expert order where the row keeps none), so no "
                     "dropped expert is selected; their experts are chosen by the method like every other layer's")


def hash_routing_note(plan: Plan) -> dict[str, str]:
    """The model card row saying how a hash-routed family's tables were remapped (empty for other families)."""
    family = known_families().get(plan.family)
    return {"hash_routed_layers": HASH_ROUTING_NOTE} if family is not None and family.hash_routed and plan.layers else {}
