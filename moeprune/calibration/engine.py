"""Calibration passes: sequential (one decoder layer resident) and whole-model.

Sequential mode builds the model skeleton with parameters on the meta device, reads the embedding
table, captures every decoder layer's call arguments (position embeddings, attention masks per layer
type) and layer 0's input by running the model body with pass-through layers, then replays the
calibration batches layer by layer: each decoder layer's weights are read lazily from the safetensors
shards, the batches go through it, the layer is freed. Only one decoder layer's weights and the
activations (on CPU, or on disk with ``offload_dir``) are ever resident, so a checkpoint larger than
free RAM works. Layers after the last MoE layer are never loaded.

With ``device`` a GPU, each decoder layer is read on the CPU, moved to the device, run on every
batch (each batch moved there and back) and freed; statistics accumulate in float64 on the device
and come back to the CPU with the layer's result.

Under torchrun (``WORLD_SIZE > 1``) each rank runs its round-robin share of the batches and the
statistics are all-reduced once at the end (:mod:`moeprune.calibration.distributed`).

Whole-model mode loads the full model and runs it once per batch; it exists for small models and as
the reference the sequential mode is tested against (statistics are identical).
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path
from dataclasses import dataclass
from typing import Collection, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import __version__
from ..arch import Family, build_skeleton, decoder_layers, family_for_model_type, moe_layer_indices, read_config
from ..layout import read_module
from ..collect import InstrumentedLayer, check_signals, new_observers, prepare_experts_implementation
from ..errors import MoePruneError
from ..io.checkpoint import LazyCheckpoint
from ..observe import OBSERVERS, DenseInstrumentation, DenseSettings, is_dense_observer, resolve_observers, signals_needed
from ..observe.base import GRADIENTS
from ..observe.tcess import TCESS_BINS
from ..stats import RouterStats
from .data import CalibrationBatch
from .placement import layer_placement, module_path, node_devices, release_experts, split_experts
from .distributed import all_reduce_layers, check_same_on_all_ranks, distributed_pass, entry_shapes, rank_batches, rank_device
from .device import dtype_name, resolve_device, resolve_dtype, to_device

logger = logging.getLogger(__name__)

MODES = ("sequential", "whole")
#: Where cached activations live between layers (the device holds one layer and one batch).
HIDDEN_STORE = torch.device("cpu")


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once what it needs has been captured."""


class ActivationStore:
    """Per-batch hidden states, kept on CPU or offloaded to a folder on disk."""

    def __init__(self, offload_dir: str | Path | None = None):
        self._tmp = None
        if offload_dir is not None:
            Path(offload_dir).mkdir(parents=True, exist_ok=True)
            self._tmp = tempfile.TemporaryDirectory(dir=offload_dir, prefix="moeprune-acts-")
        self._items: list = []

    def append(self, tensor: torch.Tensor) -> None:
        self._items.append(None)
        self[len(self._items) - 1] = tensor

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> torch.Tensor:
        item = self._items[index]
        return torch.load(item, weights_only=True) if isinstance(item, str) else item

    def __setitem__(self, index: int, tensor: torch.Tensor) -> None:
        if self._tmp is None:
            self._items[index] = tensor
        else:
            path = f"{self._tmp.name}/{index}.pt"
            torch.save(tensor.contiguous(), path)
            self._items[index] = path

    def close(self) -> None:
        self._items = []
        if self._tmp is not None:
            self._tmp.cleanup()


def load_module_weights(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Materialise a meta-device module from ``state`` (strict: every tensor must be provided)."""
    expected = set(module.state_dict().keys())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise MoePruneError(
            f"checkpoint tensors do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}; "
            "is config.json the one these weights were saved with?"
        )
    module.load_state_dict(state, strict=True, assign=True)


def _free_module(module: nn.Module) -> None:
    """Drop a module's weights (reference counting frees them; a full gc.collect() here costs
    ~0.1-1 s per layer in a process with many live objects, and frees nothing more)."""
    module.to("meta")


def fp32_pattern(model: nn.Module, dtype: torch.dtype) -> re.Pattern | None:
    """Parameters transformers keeps in float32 when it loads the model in ``dtype`` (its
    ``_keep_in_fp32_modules`` for float16, ``_keep_in_fp32_modules_strict`` for float16 and bfloat16,
    e.g. DeepSeek's router weight and correction bias), as a regex searched in full parameter names
    the way ``from_pretrained`` matches them; None when there are none."""
    names: set[str] = set()
    if dtype == torch.float16:
        names |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        names |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if not names:
        return None
    return re.compile("|".join(name.replace("*", ".*") for name in sorted(names)))


def float32_names(module: nn.Module) -> set[str]:
    """Tensors ``module`` creates in float32 when its skeleton is built in the run's dtype: parameters
    and buffers a model creates in an explicit float32, which ``from_pretrained(dtype=...)`` keeps in
    float32 (Hunyuan-A13B's router gate.wg, LFM2-MoE's expert_bias)."""
    return {name for name, tensor in [*module.named_parameters(), *module.named_buffers()] if tensor.dtype == torch.float32}


def cast_state(state: dict[str, torch.Tensor], dtype: torch.dtype, keep_fp32: re.Pattern | None, prefix: str = "",
               float32: Collection[str] = ()) -> dict:
    """Floating tensors of ``state`` in ``dtype``, those matching ``keep_fp32`` (after ``prefix``) or named
    in ``float32`` in float32, as ``from_pretrained(dtype=...)`` loads them; other tensors unchanged."""
    def target(name: str) -> torch.dtype:
        return torch.float32 if name in float32 or (keep_fp32 is not None and keep_fp32.search(prefix + name)) else dtype

    return {k: v.to(target(k)) if v.is_floating_point() else v for k, v in state.items()}


#: Names of the model body's final norm, the first module after the decoder layers (Jamba: final_layernorm;
#: LFM2-MoE: embedding_norm, applied after the last layer despite its name; Qwen4-Exp: hyper_connection_mixer,
#: which normalises and mixes its hyper-connection streams into one hidden state; Nemotron-H: norm_f).
FINAL_NORM_NAMES = ("norm", "final_layernorm", "embedding_norm", "hyper_connection_mixer", "norm_f")


def final_norm(model: nn.Module) -> nn.Module:
    """The model body's final norm (``model.model.norm``, or Jamba's ``final_layernorm``)."""
    for name in FINAL_NORM_NAMES:
        module = getattr(model.model, name, None)
        if isinstance(module, nn.Module):
            return module
    raise MoePruneError(f"{type(model).__name__} has no final norm at model.model.{' or .'.join(FINAL_NORM_NAMES)}; "
                        "the layer-by-layer engine cannot capture its layers' inputs")


@dataclass(frozen=True)
class LayerCarry:
    """A value a decoder layer returns and the model body hands to the next layer: output ``output`` of
    the layer's tuple becomes keyword ``argument`` of the next (GLM-5's indexer top-k,
    ``prev_topk_indices``). From ``[engine] carry`` of routers/<family>.toml."""

    output: int
    argument: str


def capture_layer_inputs(model: nn.Module, batches, carry: LayerCarry | None = None) -> tuple[ActivationStore, list[list[dict]]]:
    """Layer-0 hidden states per batch and every decoder layer's keyword arguments per batch.

    Runs the model body with each decoder layer replaced by a pass-through that records its call,
    stopping at the last decoder layer (or before the final norm); only the embedding table needs real
    weights. With ``carry``
    (layers that return a tuple whose ``carry.output`` entry the model body hands to the next layer),
    the pass-through returns that tuple with None there; the sequential engine passes the real value.
    """
    layers = decoder_layers(model)
    per_batch_kwargs: list[list[dict]] = []
    current: dict[int, dict] = {}
    first_inputs: list[torch.Tensor] = []

    def recorder(index):
        def forward(hidden_states, *args, **kwargs):
            if args:
                raise MoePruneError("decoder layers are expected to take keyword arguments only")
            if index == 0:
                first_inputs.append(hidden_states)
            current[index] = kwargs
            if index == len(layers) - 1:  # the last layer's call is recorded: nothing after it must run
                raise _StopForward        # (HY-V4 mixes its hyper-connection streams before the final norm)
            return hidden_states if carry is None else (hidden_states,) + (None,) * carry.output

        return forward

    for index, layer in enumerate(layers):
        layer.forward = recorder(index)

    def stop(module, args):
        raise _StopForward

    handle = final_norm(model).register_forward_pre_hook(stop)
    try:
        for input_ids, attention_mask in batches:
            current.clear()
            try:
                model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            except _StopForward:
                pass
            per_batch_kwargs.append([dict(current[i]) for i in range(len(layers))])
    finally:
        handle.remove()
        for layer in layers:
            del layer.forward
    store = ActivationStore()
    for hidden in first_inputs:
        store.append(hidden)
    return store, per_batch_kwargs


def collect_stats(
    model_dir: str | Path,
    calibration: CalibrationBatch,
    *,
    mode: str = "sequential",
    batch_size: int = 4,
    tcess_pool: int | None = None,
    tcess_r: float | None = None,
    offload_dir: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    observers: Iterable[str] | None = None,
    tcess_bins: int = TCESS_BINS,
    progress: bool = True,
    expert_devices: Iterable[str | torch.device] | None = None,
    device_budgets: Iterable[int] | None = None,
    dense: DenseSettings | None = None,
) -> RouterStats:
    """Run the calibration data through the model once and return every MoE layer's statistics.

    ``observers``: the observers to run (:data:`moeprune.observe.OBSERVERS` names; None: every one;
    ``tokens`` always runs); :func:`moeprune.observe.observers_for_entries` maps the statistics a
    scorer reads to them. ``device``: cpu (default), cuda or cuda:N: one decoder layer at a time is
    resident there, activations stay on the CPU (or on disk with ``offload_dir``). ``dtype``:
    float32, bfloat16 or float16 (default: float32 on the CPU, the checkpoint's dtype on a GPU);
    statistics accumulate in float64 whatever it is.

    Launched by torchrun / ``accelerate launch`` (``WORLD_SIZE > 1``), the pass is data-parallel
    (:mod:`.distributed`): rank r runs the batches b with b mod WORLD_SIZE = r, every entry is
    all-reduced by its combine rule at the end, and every rank returns the statistics of the whole
    calibration set (equal to a single-process run's to float64 rounding).

    A MoE layer larger than the device's budget has its routed experts split over several devices
    (:mod:`.placement`; sequential mode): on CUDA over every visible GPU (80% of their free memory)
    unless ``expert_devices`` (the main ``device`` first) and ``device_budgets`` (bytes, one per
    device) say otherwise; the CPU is split only when budgets are given (tests).

    Dense observers (:mod:`moeprune.observe.dense`: ``dense_channels``, ``angular``, ``replaceme``)
    run on EVERY decoder layer; ``dense`` holds their collection-time settings (angular depth,
    ReplaceMe depth and cuts); their entries land in :attr:`RouterStats.dense`.
    """
    if mode not in MODES:
        raise MoePruneError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if batch_size < 1:
        raise MoePruneError("--batch-size must be at least 1")
    if tcess_r is not None and not 0.0 <= tcess_r <= 1.0:
        raise MoePruneError("--tcess-r must be a probability in [0, 1]")
    if tcess_pool is not None and tcess_pool < 1:
        raise MoePruneError("--tcess-pool must be at least 1 (default: 2 x top_k)")
    if tcess_bins < 1:
        raise MoePruneError("tcess_bins must be at least 1")
    names = resolve_observers(observers)
    gradients = GRADIENTS in signals_needed(names)
    if gradients and mode != "sequential":
        raise MoePruneError(f"observers {[n for n in names if GRADIENTS in OBSERVERS[n].needs]} need gradients, which the "
                            "layer-by-layer backward pass computes: use mode='sequential'")
    if gradients and any(is_dense_observer(n) and GRADIENTS not in OBSERVERS[n].needs for n in names):
        raise MoePruneError("observers of every decoder layer (dense statistics) and gradient observers cannot share one pass; "
                            "collect them in two passes (two statistics files)")
    expert_devices = None if expert_devices is None else tuple(torch.device(d) for d in expert_devices)
    device_budgets = None if device_budgets is None else tuple(int(b) for b in device_budgets)
    if (expert_devices is not None or device_budgets is not None) and mode != "sequential":
        raise MoePruneError("placing a layer over several devices needs mode='sequential'")
    if device_budgets is not None and len(device_budgets) != len(expert_devices or (None,)):
        raise MoePruneError("give one device budget per expert device (the main device alone by default)")
    model_dir = Path(model_dir)
    config, family, checkpoint, device, dtype = open_checkpoint(model_dir, device, dtype)
    check_signals(family, signals_needed(names))  # Llama 4 (gates on the experts' input) refuses some
    batches = list(calibration.batches(batch_size))
    fingerprint = checkpoint.fingerprint()
    run = _collect_sequential if mode == "sequential" else _collect_whole
    if gradients:
        from . import backward  # builds on this module (a module-level import would be circular)
        run = backward.collect_backward
    with distributed_pass(device) as context:
        device = rank_device(device, context)
        if expert_devices is not None and expert_devices[0] != device:
            raise MoePruneError(f"the first expert device must be the pass's device {device}, not {expert_devices[0]}")
        unmergeable = [name for name in names if not getattr(OBSERVERS[name], "mergeable", True)]
        if context.active and unmergeable:
            raise MoePruneError(f"observer(s) {unmergeable} need the gradient of the WHOLE calibration set before taking "
                                "|w * dL/dw|, which a data-parallel pass does not all-reduce; run them in one process "
                                "(without torchrun)")
        dense_names = [name for name in names if is_dense_observer(name) and GRADIENTS not in OBSERVERS[name].needs]
        tracker = (DenseInstrumentation(family, dense_names, config.num_hidden_layers, dense, device)
                   if dense_names else None)
        settings = PassSettings(names, tcess_pool, tcess_bins, device, dtype, offload_dir,
                                progress and context.rank == 0,
                                expert_devices or tuple(node_devices(device, context.active)), device_budgets, tracker)
        agreed = {"data_hash": calibration.data_hash, "model_fingerprint": fingerprint, "mode": mode,
                  "batch_size": batch_size, "observers": list(names), "tcess_pool": tcess_pool,
                  "tcess_bins": tcess_bins, "dtype": dtype_name(dtype)}
        check_same_on_all_ranks(context, agreed)
        layers = run(model_dir, config, family, checkpoint, rank_batches(batches, context), settings)
        gradient_dense = {}
        if gradients:
            layers, loss, gradient_dense = layers
            loss = backward.all_reduce_loss(loss, context, device)
        check_same_on_all_ranks(context, {"entries": entry_shapes(layers)})
        layers = all_reduce_layers(layers, context, device)
        dense_layers = all_reduce_layers(tracker.result(), context, device) if tracker is not None else gradient_dense
    metadata = {
        "model_fingerprint": fingerprint,
        "model_dir": str(model_dir),
        "family": family.name,
        "data_hash": calibration.data_hash,
        "samples": int(calibration.input_ids.shape[0]),
        "seq_len": int(calibration.input_ids.shape[1]),
        "num_tokens": int(calibration.num_tokens),
        "mode": mode,
        "batch_size": batch_size,
        "observers": list(names),
        "tcess_pool": tcess_pool,
        "tcess_r": tcess_r,
        "tcess_bins": tcess_bins,
        "device": str(device),
        "dtype": dtype_name(dtype),
        "moeprune_version": __version__,
    }
    if gradients:
        metadata.update(backward="layer_by_layer", loss=backward.LOSS_DESCRIPTION, loss_mean=loss.mean, loss_tokens=loss.loss_tokens)
    if tracker is not None:
        metadata.update(tracker.settings.metadata())
    return RouterStats.from_raw(layers, metadata, dense=dense_layers)


def open_checkpoint(model_dir: Path, device, dtype) -> tuple:
    """``(config, family, lazy checkpoint, device, dtype)`` of a calibration pass over ``model_dir``
    (the device and dtype resolved as :mod:`.device` says)."""
    config = read_config(model_dir)
    family = family_for_model_type(config.model_type)
    config = family.text_config(config)  # a multimodal wrapper: its text decoder's config
    checkpoint = LazyCheckpoint(model_dir)
    device = resolve_device(device)
    return config, family, checkpoint, device, resolve_dtype(dtype, device, config, checkpoint)


@dataclass(frozen=True)
class PassSettings:
    """What one calibration pass runs and where."""

    observers: tuple[str, ...]
    tcess_pool: int | None
    tcess_bins: int
    device: torch.device
    dtype: torch.dtype
    offload_dir: str | Path | None
    progress: bool
    expert_devices: tuple[torch.device, ...] = ()
    device_budgets: tuple[int, ...] | None = None
    #: the dense observers' instrumentation of every decoder layer (None: no dense observer)
    dense: DenseInstrumentation | None = None


def _instrument(family: Family, layer: nn.Module, config, settings: PassSettings) -> InstrumentedLayer:
    observers = new_observers(family, layer, config, settings.observers, tcess_pool=settings.tcess_pool,
                              tcess_bins=settings.tcess_bins, device=settings.device)
    return InstrumentedLayer(family, layer, observers)


def _place(family: Family, layer: nn.Module, settings: PassSettings, moe: bool) -> None:
    """Move a loaded layer to the device, its experts split over several when it does not fit."""
    placement = layer_placement(layer, family.experts(layer), settings.expert_devices, settings.device_budgets) if moe else None
    if placement is not None and placement.split:
        split_experts(layer, family.experts(layer), placement)
    else:
        layer.to(settings.device)


def load_decoder_layer(family: Family, checkpoint: LazyCheckpoint, index: int, layer: nn.Module, dtype: torch.dtype,
                       keep_fp32: re.Pattern | None) -> None:
    """Materialise decoder layer ``index`` of a meta skeleton built in ``dtype`` from the shards, in
    ``dtype`` except the tensors ``from_pretrained(dtype=...)`` keeps in float32 (``keep_fp32``,
    :func:`float32_names`)."""
    # no name may keep the state dict: it would hold this layer's weights while the next is read
    load_module_weights(layer, cast_state(family.layer_state_dict(checkpoint, index, layer), dtype, keep_fp32,
                                          prefix=f"model.layers.{index}.", float32=float32_names(layer)))


def load_input_embeddings(model: nn.Module, family: Family, checkpoint: LazyCheckpoint, dtype: torch.dtype) -> nn.Module:
    """Materialise the model body's input embedding module (every tensor of it: Inkling's has its own
    norm; Nemotron-H's is ``model.embeddings``) from the shards, whatever names they are stored under
    (:func:`~moeprune.layout.read_module`); returns it."""
    embed = model.get_input_embeddings()
    load_module_weights(embed, read_module(family, checkpoint, module_path(model, embed), dtype))
    return embed


def _collect_sequential(model_dir, config, family, checkpoint, batches, settings: PassSettings):
    device, dtype = settings.device, settings.dtype
    model = build_skeleton(config, dtype)
    prepare_experts_implementation(model)
    moe_layers = moe_layer_indices(family, model)
    keep_fp32 = fp32_pattern(model, dtype)
    embed = load_input_embeddings(model, family, checkpoint, dtype)
    with torch.no_grad():
        carry = LayerCarry(**family.spec["engine"]["carry"]) if "carry" in family.spec.get("engine", {}) else None
        first, per_batch_kwargs = capture_layer_inputs(model, batches, carry)
    _free_module(embed)
    hidden = ActivationStore(settings.offload_dir)
    for tensor in (first[i] for i in range(len(first))):
        hidden.append(tensor)
    first.close()

    results: dict[int, dict[str, torch.Tensor]] = {}
    carried: dict[int, torch.Tensor | None] = {}  # per batch: the value carried to the next layer
    layers = decoder_layers(model)
    last = max(moe_layers) if moe_layers else -1
    if settings.dense is not None:  # dense observers read every decoder layer
        last = len(layers) - 1
    try:
        for index in tqdm(range(last + 1), desc="layers", disable=not settings.progress, leave=False):
            layer = layers[index]
            if batches:  # a data-parallel rank without a batch only needs its observers' zeros
                load_decoder_layer(family, checkpoint, index, layer, dtype, keep_fp32)
                _place(family, layer, settings, moe=index in moe_layers)
            instrumented = _instrument(family, layer, config, settings) if index in moe_layers else None
            if settings.dense is not None:
                settings.dense.attach(index, layer)
            with torch.no_grad():
                for b, (input_ids, attention_mask) in enumerate(batches):
                    if instrumented is not None:
                        instrumented.token_mask = attention_mask.reshape(-1).bool().to(device)
                    if settings.dense is not None:
                        settings.dense.begin_batch(b, attention_mask.to(device))
                    kwargs = to_device(per_batch_kwargs[b][index], device)
                    if carry is not None:  # the previous layer's carried output (None before the first)
                        kwargs[carry.argument] = carried.get(b)
                    output = layer(hidden[b].to(device), **kwargs)
                    if carry is not None:
                        output, carried[b] = output[0], output[carry.output]
                    hidden[b] = output.to(HIDDEN_STORE)
            if instrumented is not None:
                instrumented.remove()
                results[index] = instrumented.result()
                release_experts(family.experts(layer))
            if settings.dense is not None:
                settings.dense.detach(index)
            _free_module(layer)
    finally:
        hidden.close()
    return results


def _collect_whole(model_dir, config, family, checkpoint, batches, settings: PassSettings):
    device = settings.device
    model = load_full_model(model_dir, dtype=settings.dtype).to(device)
    prepare_experts_implementation(model)
    layers = decoder_layers(model)
    instrumented = {index: _instrument(family, layers[index], config, settings)
                    for index in moe_layer_indices(family, model)}
    if settings.dense is not None:
        for index, layer in enumerate(layers):
            settings.dense.attach(index, layer)
    try:
        with torch.no_grad():
            for b, (input_ids, attention_mask) in enumerate(tqdm(batches, desc="batches", disable=not settings.progress,
                                                                 leave=False)):
                for inst in instrumented.values():
                    inst.token_mask = attention_mask.reshape(-1).bool().to(device)
                if settings.dense is not None:
                    settings.dense.begin_batch(b, attention_mask.to(device))
                model.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
                if settings.dense is not None:
                    settings.dense.end_batch(b)
    finally:
        for inst in instrumented.values():
            inst.remove()
        if settings.dense is not None:
            settings.dense.remove()
    return {index: inst.result() for index, inst in instrumented.items()}


def load_full_model(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The whole checkpoint with vanilla transformers (local files only), in eval mode."""
    from transformers import AutoModelForCausalLM

    read_config(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True)
    return model.eval()
