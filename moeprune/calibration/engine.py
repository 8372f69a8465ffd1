"""Calibration passes: sequential (one decoder layer resident) and whole-model.

Sequential mode builds the model skeleton with parameters on the meta device, reads the embedding
table, captures every decoder layer's call arguments (position embeddings, attention masks per layer
type) and layer 0's input by running the model body with pass-through layers, then replays the
calibration batches layer by layer: each decoder layer's weights are read lazily from the safetensors
shards, the batches go through it, the layer is freed. Only one decoder layer's weights and the
activations (on CPU, or on disk with ``offload_dir``) are ever resident, so a checkpoint larger than
free RAM works. Layers after the last MoE layer are never loaded.

Layers are replayed with exactly the inputs the model body gives them: a value one layer hands the
next (``[engine] carry``, :class:`LayerCarry`), a value the body accumulates from earlier layers' inputs
and passes positionally (``[engine] accumulate``, :class:`LayerAccumulator`: Inkling-2's block_states),
and layers the body runs several times per forward (``[engine.loop]``, :class:`LayerLoop`:
Inkling-2-Loop; each pass reloads the layer, and a looped layer's statistics sum over its passes in the
body's order).

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
from ..layout import CheckpointLayout, model_body, read_module
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
    ~0.1-1 s per layer in a process with many live objects, and frees nothing more). Non-persistent
    buffers (computed when the model is built, never in the checkpoint: DeepSeek-V4's compressor rotary
    ``inv_freq``) stay, so the module can be loaded again (the backward sweep reloads layers)."""
    computed = [(owner, name, owner._buffers[name]) for owner in module.modules()
                for name in owner._non_persistent_buffers_set if owner._buffers.get(name) is not None]
    module.to("meta")
    for owner, name, buffer in computed:
        owner._buffers[name] = buffer


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
        module = getattr(model_body(model), name, None)
        if isinstance(module, nn.Module):
            return module
    raise MoePruneError(f"{type(model).__name__} has no final norm at model.model.{' or .'.join(FINAL_NORM_NAMES)}; "
                        "the layer-by-layer engine cannot capture its layers' inputs")


@dataclass(frozen=True)
class LayerCarry:
    """A value a decoder layer returns and the model body hands to the next layer: output ``output`` of
    the layer's tuple becomes keyword ``argument`` of the next (GLM-5's indexer top-k,
    ``prev_topk_indices``). From ``[engine] carry`` of routers/<family>.toml. ``positional``: the model
    body passes it as the layer's second positional argument (ZAYA's ``prev_router_hidden_states``); the
    engine passes it by keyword."""

    output: int
    argument: str
    positional: bool = False

    @classmethod
    def of(cls, family: Family) -> "LayerCarry | None":
        """The family's carry (``[engine] carry``), or None."""
        spec = family.spec.get("engine", {}).get("carry")
        return cls(**spec) if spec else None


@dataclass(frozen=True)
class LayerAccumulator:
    """Inputs of some decoder layers that the model body accumulates and passes to every later layer as
    its first positional argument after the hidden states: Inkling-2's ``block_states``, the inputs of
    the block-boundary layers stacked along ``dim`` (``torch.cat([state, input.unsqueeze(dim)], dim)``
    after each layer whose attribute ``when`` is true). From ``[engine] accumulate`` of
    routers/<family>.toml; layer 0's value (captured from the model body, empty for Inkling-2) starts it."""

    when: str
    dim: int = -2

    def grow(self, layer: nn.Module, state: torch.Tensor, layer_input: torch.Tensor) -> torch.Tensor:
        """The accumulated value the layer after ``layer`` receives, ``layer`` having run on ``layer_input``."""
        if not getattr(layer, self.when):
            return state
        return torch.cat([state.to(layer_input.device), layer_input.unsqueeze(self.dim)], dim=self.dim)


def layer_accumulator(family: Family) -> LayerAccumulator | None:
    """The family's :class:`LayerAccumulator` (``[engine] accumulate``), None for most families."""
    spec = family.spec.get("engine", {}).get("accumulate")
    return LayerAccumulator(**spec) if spec else None


@dataclass(frozen=True)
class LayerLoop:
    """Decoder layers ``start .. end - 1`` run ``passes`` times per forward (Inkling-2-Loop; ``[engine.loop]``
    of routers/<family>.toml names the config keys and the model body's messages module). Pass 1 runs them
    as any layer; each later pass restarts from the hidden states and accumulated value the loop began
    with and hands loop layer j, as its second positional argument, the messages
    ``messages(previous accumulated value [..., n + 1:, :], previous pass's output, j)`` (n: the accumulated
    entries before the loop; the ``+ 1`` skips the loop's first layer's input, the pre-loop hidden states),
    exactly as ``Inkling2LoopTextModel.forward`` does."""

    start: int
    end: int
    passes: int
    messages: str

    @classmethod
    def of(cls, family: Family, config) -> LayerLoop | None:
        spec = family.spec.get("engine", {}).get("loop")
        if not spec:
            return None
        return cls(int(getattr(config, spec["start"])), int(getattr(config, spec["end"])),
                   int(getattr(config, spec["passes"])), spec["messages"])

    def passes_of(self, layer: int) -> int:
        """How many times the model body runs decoder layer ``layer`` per forward."""
        return self.passes if self.start <= layer < self.end else 1

    def visits(self, last: int) -> list[tuple[int, int]]:
        """(layer, pass) in the order the model body runs them, through layer ``last`` (a loop once
        entered runs whole: its later passes read every loop layer's previous pass)."""
        if last < self.start:
            return [(index, 1) for index in range(last + 1)]
        last = max(last, self.end - 1)
        loop = [(index, p) for p in range(1, self.passes + 1) for index in range(self.start, self.end)]
        return [(index, 1) for index in range(self.start)] + loop + [(index, 1) for index in range(self.end, last + 1)]


def layer_passes(family: Family, config, layer: int) -> int:
    """How many times the model body runs decoder layer ``layer`` per forward: 1, or a looped layer's
    passes (:class:`LayerLoop`); its statistics (token counts included) are summed over them."""
    loop = LayerLoop.of(family, config)
    return 1 if loop is None else loop.passes_of(layer)


def capture_layer_inputs(model: nn.Module, batches, carry: LayerCarry | None = None,
                         accumulate: LayerAccumulator | None = None,
                         initial: list | None = None) -> tuple[ActivationStore, list[list[dict]]]:
    """Layer-0 hidden states per batch and every decoder layer's keyword arguments per batch.

    Runs the model body with each decoder layer replaced by a pass-through that records its call,
    stopping at the last decoder layer (or before the final norm); only the embedding table needs real
    weights. With ``carry``
    (layers that return a tuple whose ``carry.output`` entry the model body hands to the next layer),
    the pass-through returns that tuple with None there; the sequential engine passes the real value.
    With ``accumulate`` (layers taking the model body's accumulated value positionally), ``initial``
    receives layer 0's value per batch; the sequential engine grows it layer by layer.
    """
    layers = decoder_layers(model)
    per_batch_kwargs: list[list[dict]] = []
    current: dict[int, dict] = {}
    first_inputs: list[torch.Tensor] = []

    def recorder(index):
        def forward(hidden_states, *args, **kwargs):
            if carry is not None and carry.positional and len(args) == 1:
                args = ()  # the carried value: the sequential engine passes the real one by keyword
            if args and accumulate is None:
                raise MoePruneError("decoder layers are expected to take keyword arguments only (or, with [engine] "
                                    "accumulate, the accumulated value positionally after the hidden states)")
            if accumulate is not None and not args:
                raise MoePruneError("[engine] accumulate: the decoder layers take no positional accumulated value")
            if index in current:  # a loop layer's later pass ([engine.loop]): its first call's arguments are kept
                return hidden_states
            if index == 0:
                first_inputs.append(hidden_states)
                if initial is not None and accumulate is not None:
                    initial.append(args[0])
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
                model_body(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
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
    splittable = moe and not family.sorted_dispatch  # JetMoE's experts live on its MoE block: placed whole
    placement = layer_placement(layer, family.experts(layer), settings.expert_devices, settings.device_budgets) if splittable else None
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
    load_body_parameters(model, family, checkpoint, dtype)
    return embed


def load_body_parameters(model: nn.Module, family: Family, checkpoint: LazyCheckpoint, dtype: torch.dtype) -> None:
    """Materialise the model body's own parameters (not its submodules'): ZAYA scales and shifts the
    embeddings by ``input_hidden_states_scale`` / ``_bias`` before the first decoder layer. Nothing for
    a body without any."""
    body = model_body(model)
    prefix = module_path(model, body)
    wanted = {f"{prefix}.{name}": name for name, param in body.named_parameters(recurse=False) if param.is_meta}
    if not wanted:
        return
    layout = CheckpointLayout.build(family, checkpoint, [])
    for group in layout.other_groups():
        if wanted.keys() & set(group.targets):
            for name, tensor in layout.read_group(group, dtype).items():
                if name in wanted:
                    setattr(body, wanted[name], nn.Parameter(tensor, requires_grad=False))


class _LoopStates:
    """Per batch, what a :class:`LayerLoop` keeps between its passes: the hidden states and accumulated
    value the loop began with, and the previous pass's output and accumulated value (on CPU, or on disk
    with ``offload_dir``)."""

    def __init__(self, offload_dir):
        self.stores = [ActivationStore(offload_dir) for _ in range(4)]
        self.pre_hidden, self.pre_state, self.prev_hidden, self.prev_state = self.stores

    def begin_pass(self, loop_pass: int, b: int, hidden: ActivationStore, accumulated: ActivationStore, dim: int) -> None:
        """Before the loop's first layer runs on batch ``b`` in pass ``loop_pass``, as the model body does."""
        if loop_pass == 1:
            _put(self.pre_hidden, b, hidden[b])
            _put(self.pre_state, b, accumulated[b])
            return
        skip = self.pre_state[b].shape[dim] + 1
        _put(self.prev_state, b, accumulated[b].narrow(dim, skip, accumulated[b].shape[dim] - skip))
        _put(self.prev_hidden, b, hidden[b])
        hidden[b], accumulated[b] = self.pre_hidden[b], self.pre_state[b]

    def close(self) -> None:
        for store in self.stores:
            store.close()


def _put(store: ActivationStore, index: int, tensor: torch.Tensor) -> None:
    """Set entry ``index`` of a store filled in batch order (appending the next one)."""
    if index == len(store):
        store.append(tensor)
    else:
        store[index] = tensor


def load_body_module(model: nn.Module, family: Family, checkpoint: LazyCheckpoint, path: str, dtype: torch.dtype,
                     keep_fp32: re.Pattern | None) -> nn.Module:
    """Materialise the model body's module ``path`` (relative to ``model.model``, e.g. Inkling-2-Loop's
    ``message_input``) in ``dtype``, its float32 tensors kept as ``from_pretrained`` keeps them; returns it."""
    module = model_body(model).get_submodule(path)
    full = module_path(model, module)
    load_module_weights(module, cast_state(read_module(family, checkpoint, full), dtype, keep_fp32, prefix=full + ".",
                                           float32=float32_names(module)))
    return module


def _collect_sequential(model_dir, config, family, checkpoint, batches, settings: PassSettings):
    device, dtype = settings.device, settings.dtype
    model = build_skeleton(config, dtype)
    prepare_experts_implementation(model)
    moe_layers = moe_layer_indices(family, model)
    keep_fp32 = fp32_pattern(model, dtype)
    embed = load_input_embeddings(model, family, checkpoint, dtype)
    accumulate = layer_accumulator(family)
    loop = LayerLoop.of(family, config)
    if loop is not None and (accumulate is None or settings.dense is not None):
        raise MoePruneError(f"{family.name}: looped layers ([engine.loop]) need [engine] accumulate and no dense observers")
    messages = load_body_module(model, family, checkpoint, loop.messages, dtype, keep_fp32) if loop else None
    initial: list[torch.Tensor] = []
    with torch.no_grad():
        carry = LayerCarry.of(family)
        first, per_batch_kwargs = capture_layer_inputs(model, batches, carry, accumulate, initial)
    _free_module(embed)
    hidden = ActivationStore(settings.offload_dir)
    for tensor in (first[i] for i in range(len(first))):
        hidden.append(tensor)
    first.close()
    accumulated = ActivationStore(settings.offload_dir)  # per batch: the accumulated value (``[engine] accumulate``)
    for tensor in initial:
        accumulated.append(tensor)
    looping = _LoopStates(settings.offload_dir) if loop else None

    results: dict[int, dict[str, torch.Tensor]] = {}
    carried: dict[int, torch.Tensor | None] = {}  # per batch: the value carried to the next layer
    layers = decoder_layers(model)
    last = max(moe_layers) if moe_layers else -1
    if settings.dense is not None:  # dense observers read every decoder layer
        last = len(layers) - 1
    visits = loop.visits(last) if loop else [(index, 1) for index in range(last + 1)]
    final_visit = {index: position for position, (index, _) in enumerate(visits)}
    observing: dict[int, InstrumentedLayer] = {}  # a looped layer's observers sum over its passes
    try:
        for position, (index, loop_pass) in enumerate(tqdm(visits, desc="layers", disable=not settings.progress, leave=False)):
            layer = layers[index]
            if batches:  # a data-parallel rank without a batch only needs its observers' zeros
                load_decoder_layer(family, checkpoint, index, layer, dtype, keep_fp32)
                _place(family, layer, settings, moe=index in moe_layers)
            if index in moe_layers and index not in observing:
                observing[index] = _instrument(family, layer, config, settings)
                if loop is not None and loop.start <= index < loop.end:
                    observing[index].defer()
            instrumented = observing.get(index)
            if settings.dense is not None:
                settings.dense.attach(index, layer)
            with torch.no_grad():
                for b, (input_ids, attention_mask) in enumerate(batches):
                    if instrumented is not None:
                        instrumented.token_mask = attention_mask.reshape(-1).bool().to(device)
                        instrumented.defer_key = (b, loop_pass)
                    if settings.dense is not None:
                        settings.dense.begin_batch(b, attention_mask.to(device))
                    if loop is not None and index == loop.start:
                        looping.begin_pass(loop_pass, b, hidden, accumulated, accumulate.dim)
                    kwargs = to_device(per_batch_kwargs[b][index], device)
                    if carry is not None:  # the previous layer's carried output (None before the first)
                        kwargs[carry.argument] = carried.get(b)
                    layer_input = hidden[b].to(device)
                    if accumulate is None:
                        output = layer(layer_input, **kwargs)
                    else:
                        state = accumulated[b].to(device)
                        extra = ()
                        if loop_pass > 1:  # the messages of the loop's previous pass
                            messages.to(device)
                            extra = (messages(looping.prev_state[b].to(device), looping.prev_hidden[b].to(device),
                                              index - loop.start),)
                        output = layer(layer_input, state, *extra, **kwargs)
                        accumulated[b] = accumulate.grow(layer, state, layer_input).to(HIDDEN_STORE)
                    if carry is not None:
                        output, carried[b] = output[0], output[carry.output]
                    hidden[b] = output.to(HIDDEN_STORE)
            if instrumented is not None and position == final_visit[index]:
                if instrumented.deferred is not None:
                    instrumented.replay()
                instrumented.remove()
                results[index] = instrumented.result()
                release_experts(family.experts(layer))
            if settings.dense is not None:
                settings.dense.detach(index)
            _free_module(layer)
    finally:
        hidden.close()
        accumulated.close()
        if looping is not None:
            looping.close()
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
                model_body(model)(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
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
