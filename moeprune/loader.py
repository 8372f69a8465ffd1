"""Partial loading: build a model that holds only the experts a profile keeps.

:func:`load_with_experts` builds the model skeleton on the meta device from the checkpoint's
config, then materialises it from the safetensors shards through
:class:`~moeprune.io.checkpoint.LazyCheckpoint`:

* every non-expert tensor (embeddings, attention, norms, dense MLPs, shared experts, lm head) is
  read once; passing a :class:`SharedWeights` (from :func:`load_shared_weights`) instead reuses
  tensors already in memory, so several profile models share one copy of them;
* in each MoE layer only the kept experts' tensors are read (per-expert on-disk layouts: only the
  kept experts' keys; fused on-disk layouts such as GPT-OSS: only the kept rows, with
  ``get_rows``) and written into the fused in-memory layout (``gate_up_proj`` [E', 2I, H],
  ``down_proj`` [E', H, I]); router weight / bias / ``e_score_correction_bias`` rows are sliced the
  same way and the ``num_experts`` attributes of the router and experts modules set to E'.

Dropped experts are never read into memory. The result is bitwise identical to pruning the
checkpoint with the same plan (:func:`moeprune.apply.write_pruned_checkpoint`) and loading it with
vanilla ``AutoModelForCausalLM.from_pretrained`` (tested for every family).

Non-uniform layouts (different kept counts per layer) work in memory, because each layer's modules
are sized independently. A vanilla config holds one expert count, so such a model keeps the
original count in config.json keys, records its real layout in ``config.moeprune_kept``
(``{"layer": [kept experts, original numbering]}``, written for every partial load) and refuses
``save_pretrained``: it cannot be saved as a vanilla checkpoint (prune with a uniform plan for that).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import Family, build_skeleton, family_for_model_type, moe_layer_indices, read_config, text_config_of
from .errors import MoePruneError, PlanError
from .io.checkpoint import LazyCheckpoint
from .layout import CheckpointLayout, cast_float, model_experts_module, set_expert_block, set_model_tensor
from .ops import CheckpointSource, config_edit, keep_experts, plan_edit, set_attributes, set_config
from .ops.memory import finish_structure
from .structure import SECTION
from .plan import Plan, validate_plan
from . import skipping  # noqa: F401  (registers the dynamic_skip structure key)

logger = logging.getLogger(__name__)

#: config attribute holding the per-layer kept experts of a partially loaded model.
KEPT_CONFIG_KEY = "moeprune_kept"


# -- shared (non-expert) weights -----------------------------------------------------------------


def _checkpoint_identity(model_dir: Path, checkpoint: LazyCheckpoint) -> tuple:
    """Cheap identity of a checkpoint folder: resolved path and every shard's size and mtime."""
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in checkpoint.shard_files()]
    return (str(model_dir.resolve()), tuple(stats))


@dataclass(frozen=True)
class SharedWeights:
    """The non-expert tensors of one checkpoint, read once and shared by several partial loads.

    ``tensors`` maps in-memory names to tensors; models built with ``shared=`` wrap the very same
    storage (no copy), so N cached profile models cost one copy of these plus their experts.
    """

    model_dir: Path
    identity: tuple
    dtype: torch.dtype
    tensors: Mapping[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        """Bytes held by the shared tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _expected_names(model: nn.Module) -> set[str]:
    """Persistent parameters and buffers the skeleton needs from disk."""
    return set(model.state_dict().keys())


def _read_shared(layout: CheckpointLayout, wanted: set[str], dtype: torch.dtype,
                 progress: bool = False) -> dict[str, torch.Tensor]:
    """The tensors outside the routers and routed experts that the model has a parameter or buffer
    for (``wanted``), read shard by shard and cast to ``dtype``."""
    return layout.read_memory(wanted, dtype, progress)  # renamed, split or concatenated as the family stores them


def load_shared_weights(model_dir: str | Path, dtype: torch.dtype = torch.float32, *,
                        progress: bool = False) -> SharedWeights:
    """Read every non-expert tensor of ``model_dir`` (routers and routed experts are left out)."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    family = family_for_model_type(config.model_type)
    skeleton = build_skeleton(config)
    with LazyCheckpoint(model_dir) as checkpoint:
        layout = CheckpointLayout.build(family, checkpoint, moe_layer_indices(family, skeleton))
        tensors = _read_shared(layout, _expected_names(skeleton), dtype, progress)
        identity = _checkpoint_identity(model_dir, checkpoint)
    shared = SharedWeights(model_dir, identity, dtype, tensors)
    logger.info("read %d non-expert tensors (%.1f MiB) of %s", len(tensors), shared.nbytes / 2**20, model_dir)
    return shared


# -- validation ----------------------------------------------------------------------------------


def full_kept(kept: Mapping[int, Sequence[int]], moe_layers: Sequence[int], num_experts: int) -> dict[int, list[int]]:
    """Sorted kept experts for every MoE layer (layers absent from ``kept`` keep all experts)."""
    layers = {layer: list(range(num_experts)) for layer in moe_layers}
    layers.update({layer: list(experts) for layer, experts in kept.items()})
    return layers


def _index(value: object, what: str) -> int:
    """An integer index (ints, numpy/torch integer scalars); anything else is a PlanError."""
    if isinstance(value, bool):
        raise PlanError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise PlanError(f"{what} must be an integer, got {value!r}") from None


def kept_plan(kept: Mapping[int, Sequence[int]], family: str, num_experts: int, collapse_groups: bool) -> Plan:
    """A :class:`Plan` of the kept experts with sorted expert lists; malformed input is a PlanError."""
    if not isinstance(kept, Mapping):
        raise PlanError(f"kept must map decoder-layer index to a list of expert indices, got {type(kept).__name__}")
    layers: dict[int, list[int]] = {}
    for layer, experts in kept.items():
        index = int(layer) if isinstance(layer, str) and layer.isdigit() else _index(layer, "a kept-experts layer key")
        if isinstance(experts, (str, bytes)) or not isinstance(experts, Iterable):
            raise PlanError(f"layer {index} must list the kept expert indices, got {experts!r}")
        layers[index] = sorted(_index(e, f"an expert index of layer {index}") for e in experts)
    return Plan(layers=dict(sorted(layers.items())), method="partial_load", family=family,
                num_experts=num_experts, collapse_groups=collapse_groups)


# -- the loader ----------------------------------------------------------------------------------


def _refuse_save(*args, **kwargs):
    raise MoePruneError(
        "this model keeps different numbers of experts per layer (config.moeprune_kept), which a vanilla "
        "checkpoint cannot describe; prune with a uniform plan (`moeprune apply` / api.apply) to save one"
    )


def load_with_experts(
    model_dir: str | Path,
    kept: Mapping[int, Sequence[int]],
    *,
    dtype: torch.dtype = torch.float32,
    collapse_groups: bool = False,
    shared: SharedWeights | None = None,
    progress: bool = False,
):
    """The model of ``model_dir`` holding only the ``kept`` experts of each MoE layer, ready for generate().

    Args:
        model_dir: local checkpoint folder (config.json + safetensors shards).
        kept: decoder-layer index (int, or digit string as in JSON) -> kept routed experts (original numbering, any order; they are
            sorted, as in a :class:`~moeprune.plan.Plan`). MoE layers absent keep all experts.
            Counts may differ across layers (see the module docstring).
        dtype: floating-point dtype of the loaded weights.
        collapse_groups: DeepSeek group-limited routing: route with n_group = topk_group = 1 instead
            of requiring the same number of kept experts in every group.
        shared: non-expert tensors from :func:`load_shared_weights` of the same checkpoint and dtype;
            the model reuses their storage instead of reading them again.
        progress: tqdm bar over the MoE layers.

    Validation (top_k <= kept, indices in range and unique, MoE layers only, DeepSeek group rules)
    happens before any tensor data is read; errors are :class:`~moeprune.errors.PlanError`.
    """
    model_dir = Path(model_dir)
    family, model, moe_layers, geometry = _skeleton(model_dir)
    if collapse_groups and not geometry.grouped:
        logger.info("collapse_groups ignored: this model's routing has no groups")
        collapse_groups = False
    plan = kept_plan(kept, geometry.family, geometry.num_experts, collapse_groups)
    validate_plan(plan, geometry)
    plan.layers = full_kept(plan.layers, moe_layers, geometry.num_experts)
    if shared is not None and shared.dtype != dtype:
        raise MoePruneError(f"the shared weights were loaded as {shared.dtype}, not {dtype}; load them with the same dtype")

    with LazyCheckpoint(model_dir) as checkpoint:
        layout = CheckpointLayout.build(family, checkpoint, moe_layers)
        expected = _expected_names(model)
        filled = _fill_shared(model, layout, model_dir, shared, dtype, expected)
        for layer in tqdm(moe_layers, desc="experts", disable=not progress, leave=False):
            experts = plan.layers[layer]
            for name, tensor in layout.read_layer_experts(layer, experts, dtype).items():
                set_model_tensor(model, name, tensor)
                filled.add(name)
            _size_layer(model, family, layer, experts, collapse_groups)
    _finish(model, model_dir, family, plan, expected - filled)
    logger.info("loaded %s with %s of %d experts per MoE layer",
                model_dir, sorted({len(k) for k in plan.layers.values()}), geometry.num_experts)
    return model


def _skeleton(model_dir: Path) -> tuple:
    """(family, meta-device model, MoE layer indices, geometry) of a checkpoint folder's config."""
    config = read_config(model_dir)
    family = family_for_model_type(config.model_type)
    model = build_skeleton(config)
    moe_layers = moe_layer_indices(family, model)
    return family, model, moe_layers, family.geometry(config, moe_layers)


def _fill_shared(model: nn.Module, layout: CheckpointLayout, model_dir: Path, shared: SharedWeights | None,
                 dtype: torch.dtype, expected: set[str]) -> set[str]:
    """Put the non-expert tensors into ``model`` (read now, or ``shared``'s storage); their names."""
    if shared is not None and shared.identity != _checkpoint_identity(model_dir, layout.checkpoint):
        raise MoePruneError(
            f"the shared weights were read from {shared.model_dir}, not from {model_dir} (or its files "
            "changed since); call load_shared_weights on this checkpoint"
        )
    tensors = shared.tensors if shared is not None else _read_shared(layout, expected, dtype)
    for name, tensor in tensors.items():
        set_model_tensor(model, name, tensor)
    return set(tensors)


def _finish(model: nn.Module, model_dir: Path, family: Family, plan: Plan, unfilled: set[str]) -> None:
    """Tie weights, check nothing is left on meta, set the config and generation config."""
    _check_materialised(model, model_dir, unfilled)
    config = model.config
    counts = {len(experts) for experts in plan.layers.values()}
    if len(counts) == 1:
        set_config(config, config_edit(family, plan))
    else:
        model.save_pretrained = _refuse_save
    setattr(config, KEPT_CONFIG_KEY, {str(layer): list(experts) for layer, experts in sorted(plan.layers.items())})
    _set_origin(model, model_dir)
    model.eval()


def load(model_dir: str | Path, *, dtype: torch.dtype = torch.float32, progress: bool = False):
    """``moeprune.load(DIR)``: any checkpoint moeprune writes, ready for generate().

    A vanilla checkpoint (no ``moeprune`` section in config.json) loads with transformers'
    ``from_pretrained``. A checkpoint with the section (:mod:`moeprune.structure`) is built from the
    meta-device skeleton of its stock config; each section key's handler prepares the modules it
    needs and fills its own tensors; every other tensor is read by name (routed experts through the
    :class:`~moeprune.layout.CheckpointLayout`, so per-layer expert counts come from the files), and
    the handlers' finishing steps run last. Nothing may stay on the meta device.
    """
    from .structure import HANDLERS, SECTION, ordered_keys, read_section

    model_dir = Path(model_dir)
    full_config = read_config(model_dir)
    config = text_config_of(full_config)  # a multimodal wrapper: the section is in its text config
    values = read_section(config.to_dict())
    if not values:
        from .calibration.engine import load_full_model

        return load_full_model(model_dir, dtype=dtype)
    family = family_for_model_type(full_config.model_type)
    if hasattr(config, SECTION):
        delattr(config, SECTION)
    model = build_skeleton(config)
    moe_layers = moe_layer_indices(family, model)
    order = ordered_keys(values)
    claimed: set[str] = set()
    for key in order:
        if HANDLERS[key].prepare is not None:
            claimed |= set(HANDLERS[key].prepare(model, family, values[key]))
    with LazyCheckpoint(model_dir) as checkpoint:
        layout = CheckpointLayout.build(family, checkpoint, moe_layers)
        expected = _expected_names(model)
        filled: set[str] = set()
        for name, tensor in _read_shared(layout, expected - claimed, dtype).items():
            set_model_tensor(model, name, tensor)
            filled.add(name)
        for layer in tqdm(moe_layers, desc="experts", disable=not progress, leave=False):
            experts = list(range(layout.num_experts(layer)))
            if _claims_layer(claimed, layout, layer):  # a handler reads the experts; the router rows are read whole
                state = {layout.family.memory_name(name): cast_float(checkpoint.get(name), dtype)
                         for name in layout.layers[layer].router + layout.layers[layer].id_tables}
            else:
                state = layout.read_layer_experts(layer, experts, dtype)
                _size_layer(model, family, layer, experts)
            for name, tensor in state.items():
                if name not in claimed:
                    set_model_tensor(model, name, tensor)
                    filled.add(name)
        for key in order:
            if HANDLERS[key].fill is not None:
                filled |= set(HANDLERS[key].fill(model, layout, values[key], dtype))
    _check_materialised(model, model_dir, expected - filled)
    setattr(config, SECTION, {"format": 1, **values})
    for key in order:
        if HANDLERS[key].finish is not None:
            HANDLERS[key].finish(model, family, values[key])
    _set_origin(model, model_dir)
    logger.info("loaded %s with moeprune structure %s", model_dir, ", ".join(order))
    return model.eval()


def _size_layer(model: nn.Module, family: Family, layer: int, experts: Sequence[int], collapse_groups: bool = False) -> None:
    """Set the router's and experts module's attributes of a MoE layer holding ``experts``."""
    set_attributes(model, keep_experts(family.layout, layer, experts, collapse_groups=collapse_groups).attributes)
    model_experts_module(model, family, layer).num_experts = len(experts)
    counts = family.count_attributes(len(experts), family.router_tail(model.config))  # LongCat-Flash, Inkling
    set_attributes(model, {family.layout.memory_layer_prefix(layer) + path: values for path, values in counts.items()})


def _check_materialised(model: nn.Module, model_dir: Path, unfilled: set[str]) -> None:
    """Tie the weights when some were not read, then refuse a model with any tensor left on meta."""
    if unfilled:
        model.tie_weights()
    left = sorted(name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta)
    if left:
        raise MoePruneError(
            f"{model_dir} lacks tensors the model needs: {left[:5]}; is config.json the one these weights were saved with?"
        )


def _set_origin(model: nn.Module, model_dir: Path) -> None:
    """The config's source path and the checkpoint's generation config, as from_pretrained sets them."""
    model.config._name_or_path = str(model_dir)
    if (model_dir / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(model_dir), local_files_only=True)


def _claims_layer(claimed: set[str], layout: CheckpointLayout, layer: int) -> bool:
    """A handler fills this MoE layer's routed experts itself (it claimed a name under the layer's
    experts module)."""
    prefix = layout.family.memory_experts_prefix(layer)
    return any(name.startswith(prefix) for name in claimed)


def expert_nbytes(model_dir: str | Path, kept: Mapping[int, Sequence[int]], dtype: torch.dtype = torch.float32, *,
                  full_router: bool = False) -> int:
    """Bytes the routers and kept experts of a partial load occupy (from the headers, nothing read).
    ``full_router``: the routers keep every row (a merge with the exact router)."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    family = family_for_model_type(config.model_type)
    moe_layers = moe_layer_indices(family, build_skeleton(config))
    layers = full_kept(kept, moe_layers, family.num_experts(config))
    layout = CheckpointLayout.build(family, LazyCheckpoint(model_dir), moe_layers)
    return sum(layout.router_nbytes(layer, None if full_router else len(layers[layer]), dtype)
               + layout.expert_nbytes(layer, layers[layer], dtype)
               for layer in layout.layers)


# -- partial load of a plan that rebuilds experts (merge, recombine) --------------------------------

#: plan actions :func:`load_with_plan` evaluates (they change only routed experts and router rows)
EXPERT_ACTIONS = ("keep_experts", "merge_experts", "recombine_neurons")


def load_with_plan(model_dir: str | Path, plan: Plan, *, dtype: torch.dtype = torch.float32,
                   shared: SharedWeights | None = None, progress: bool = False):
    """The model of ``model_dir`` with ``plan`` applied, read from disk one MoE layer at a time.

    For plans whose actions change only routed experts and routers (:data:`EXPERT_ACTIONS`: kept,
    merged or recombined experts, e.g. a task profile built with ``--action merge|dern``): the
    plan's edit (:func:`moeprune.ops.plan_edit`, the recipes both executors run) is evaluated layer
    by layer against the checkpoint, reading only the experts its recipes name (a merged expert
    reads its cluster's members); each layer's result replaces the skeleton's experts before the
    next layer is read, so one layer's source experts are resident at a time, and only the results
    are kept. Router rows, module attributes, config keys and the ``moeprune`` section's finishing
    steps (the exact router's expert map) follow the edit. ``shared`` as in :func:`load_with_experts`.

    The result equals loading the checkpoint :func:`moeprune.apply.write_pruned_checkpoint` writes
    for ``plan`` (``from_pretrained``, or :func:`load` for an exact router), tensor for tensor.
    """
    model_dir = Path(model_dir)
    family, model, moe_layers, geometry = _skeleton(model_dir)
    other = sorted({a.op for actions in plan.layer_actions().values() for a in actions} - set(EXPERT_ACTIONS))
    if other:
        raise PlanError(f"the partial loader evaluates only {', '.join(EXPERT_ACTIONS)}; this plan also has {other}: "
                        "write it with `moeprune apply` and load the result")
    validate_plan(plan, geometry)
    edit = plan_edit(family, plan)
    if shared is not None and shared.dtype != dtype:
        raise MoePruneError(f"the shared weights were loaded as {shared.dtype}, not {dtype}; load them with the same dtype")
    with LazyCheckpoint(model_dir) as checkpoint:
        layout = CheckpointLayout.build(family, checkpoint, moe_layers)
        source = CheckpointSource(layout)
        expected = _expected_names(model)
        filled = _fill_shared(model, layout, model_dir, shared, dtype, expected)
        routers = {name for layer in moe_layers for name in layout.layers[layer].router}
        routers |= {name for layer in moe_layers for name in layout.layers[layer].id_tables}
        stray = sorted(set(edit.tensors) - routers - edit.optional)
        if stray:
            raise PlanError(f"the plan changes tensors outside the routers ({stray[:3]}); write it with `moeprune apply`")
        for layer in tqdm(moe_layers, desc="experts", disable=not progress, leave=False):
            if layer in edit.experts:
                experts = [{proj: cast_float(recipe.evaluate(source), dtype) for proj, recipe in expert.items()}
                           for expert in edit.experts[layer]]
                layout.forget()
                set_expert_block(model, family, layer, experts)
                for name in layout.layers[layer].router + layout.layers[layer].id_tables:
                    tensor = edit.tensors[name].evaluate(source) if name in edit.tensors else checkpoint.get(name)
                    set_model_tensor(model, layout.family.memory_name(name), cast_float(tensor, dtype))
                    filled.add(layout.family.memory_name(name))
                filled |= {name for name in expected if name.startswith(layout.family.memory_experts_prefix(layer))}
            else:
                all_experts = range(layout.num_experts(layer))
                for name, tensor in layout.read_layer_experts(layer, all_experts, dtype).items():
                    set_model_tensor(model, name, tensor)
                    filled.add(name)
                _size_layer(model, family, layer, all_experts)
        set_attributes(model, edit.attributes)
    _check_materialised(model, model_dir, expected - filled)
    set_config(model.config, edit.config)
    finish_structure(model, family, edit.config.get(SECTION) or {})
    if plan.layers:
        setattr(model.config, KEPT_CONFIG_KEY, {str(layer): list(k) for layer, k in sorted(plan.layers.items())})
    _set_origin(model, model_dir)
    logger.info("loaded %s with plan %s (%s)", model_dir, plan.method,
                ", ".join(sorted({a.op for actions in plan.layer_actions().values() for a in actions})))
    return model.eval()
