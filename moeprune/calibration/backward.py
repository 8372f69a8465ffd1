"""Layer-by-layer backward pass: gradients of the calibration loss with one decoder layer resident.

The loss is the next-token cross-entropy of the calibration tokens (labels = inputs shifted by one),
**summed** over the valid predicted tokens: position t predicting token t+1 counts when both are real
(attention mask 1), so padding never counts, neither as a target nor as a predicting position. The
sum (not a per-batch mean) makes every gradient independent of how the data is batched, sharded or
spread over data-parallel ranks, and makes per-token gradient statistics plain sums that merge
exactly; the gradient of the whole-set mean loss is this one divided by the number of predicted
tokens N_pred (reported as ``loss_tokens``), a constant that changes no ranking.

The pass, with the sequential engine's pieces (:mod:`.engine`):

1. forward, one decoder layer at a time (weights read lazily from the shards, freed after), saving
   each layer's input per batch in an :class:`~.engine.ActivationStore` (CPU, or ``offload_dir``)
   from the lowest layer a callback needs upwards; observers that need no gradient run here, as in
   :func:`~.engine.collect_stats`;
2. at the top: the final norm and the output head (the model's own ``ForCausalLM`` head code, so
   logit scaling / tied embeddings are the model's), the loss per batch and dL/dx of the last
   layer's output;
3. from the top layer down: reload the layer, recompute its forward from the saved input with
   autograd, backward with the incoming dL/d(output), hand the layer to the callbacks (e.g. the
   gradient observers, which read dL/dh of every routed pair), keep dL/d(input) for the layer below,
   free the layer. Layers below the lowest one a callback needs are not recomputed.

Peak memory: one decoder layer (or the output head) + the saved layer inputs + one batch's
activations and their gradients. Time: about one forward, plus one forward and one backward of every
recomputed layer, plus the head.

A general per-layer hook is :class:`LayerGradientCallback` (:func:`layer_gradients` runs it alone);
when it ``wants_weight_grads(index)`` (``weight_grads = True``: every layer it needs), the recomputed
layer's parameters require gradients and hold dL/dW summed over the batches when its ``end_layer``
runs (nothing is computed for weights otherwise, e.g. |W * dL/dW| saliencies).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..arch import build_skeleton, decoder_layers, moe_layer_indices
from ..layout import model_body, read_module
from ..collect import InstrumentedLayer, new_observers, prepare_experts_implementation
from ..errors import MoePruneError
from ..io.checkpoint import LazyCheckpoint
from ..observe import OBSERVERS, LayerForward, RoutedPairs
from ..observe.base import GRADIENTS
from ..observe.dense import is_dense_observer
from .data import CalibrationBatch
from .device import to_device
from .distributed import DistributedContext, _collective_device as collective_device
from .engine import (
    HIDDEN_STORE,
    ActivationStore,
    PassSettings,
    load_decoder_layer,
    open_checkpoint,
    _collect_sequential,
    _free_module,
    _instrument,
    _place,
    capture_layer_inputs,
    cast_state,
    final_norm,
    fp32_pattern,
    load_input_embeddings,
    load_module_weights,
)
from .placement import module_path, release_experts

logger = logging.getLogger(__name__)

#: What the gradients of a backward pass differentiate (recorded in the statistics' metadata).
LOSS_DESCRIPTION = "next-token cross-entropy summed over valid predicted tokens (both positions unmasked)"


class LayerGradientCallback:
    """Per-layer hook of the backward pass; subclass and override what you need.

    For every decoder layer ``index`` with ``needs_layer(index)`` true, top layer first:
    ``begin_layer`` (weights resident, before any recomputation), then per batch ``before_batch``,
    the recomputed forward (with autograd) and its backward, ``after_batch`` (tensor gradients
    retained in the forward are filled; :class:`BatchGradients` holds the layer's input and dL/d of
    its input and output), and ``end_layer`` (when ``wants_weight_grads(index)``, every parameter's
    ``.grad`` is dL/dW summed over all batches). The layer is freed afterwards.
    """

    #: parameters of the recomputed layers require gradients (costs one more matmul per weight)
    weight_grads: bool = False

    def needs_layer(self, index: int) -> bool:
        return True

    def wants_weight_grads(self, index: int) -> bool:
        """Whether layer ``index``'s parameters need ``.grad`` (default: :attr:`weight_grads`)."""
        return self.weight_grads

    def weight_grad_parameters(self, index: int, layer: nn.Module) -> set[str] | None:
        """Names (relative to the layer) of the parameters that need ``.grad`` when
        ``wants_weight_grads(index)``; None (default): every parameter of the layer."""
        return None

    def begin_layer(self, index: int, layer: nn.Module) -> None:
        pass

    def before_batch(self, index: int, layer: nn.Module, batch: int, attention_mask: torch.Tensor) -> None:
        pass

    def after_batch(self, index: int, layer: nn.Module, grads: "BatchGradients") -> None:
        pass

    def end_layer(self, index: int, layer: nn.Module) -> None:
        pass


@dataclass(frozen=True)
class BatchGradients:
    """One batch through one recomputed layer (tensors on the pass's device, [B, S, H])."""

    batch: int
    attention_mask: torch.Tensor  # [B, S], 1 on real tokens
    layer_input: torch.Tensor
    input_grad: torch.Tensor  # dL/d(layer input)
    output_grad: torch.Tensor  # dL/d(layer output)


@dataclass(frozen=True)
class LossSummary:
    """The calibration loss of a backward pass: ``loss_sum`` over ``loss_tokens`` predicted tokens."""

    loss_sum: float
    loss_tokens: int

    @property
    def mean(self) -> float:
        return self.loss_sum / max(self.loss_tokens, 1)


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of the next-token cross-entropy over valid predictions, their number), computed in float32.

    Position t predicts token t+1; it counts when ``attention_mask`` is 1 at t and at t+1. ``logits``
    may cover the first n < S positions only (a chunk: :func:`loss_gradient`)."""
    n = min(logits.shape[1], input_ids.shape[1] - 1)
    valid = (attention_mask[:, 1:n + 1].bool() & attention_mask[:, :n].bool()).reshape(-1).to(logits.device)
    labels = input_ids[:, 1:n + 1].reshape(-1).to(logits.device)
    predicted = logits[:, :n].reshape(-1, logits.shape[-1]).float()
    losses = F.cross_entropy(predicted, labels, reduction="none")
    return losses[valid].sum(), int(valid.sum())


#: Bytes of float32 logits one chunk of positions of the output head may hold (with their gradient
#: and softmax, about three times that): a 150k-token vocabulary at batch 4 x 2048 would otherwise
#: need ~5 GB of logits at once.
HEAD_CHUNK_BYTES = 32 * 2**20


def loss_gradient(model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> tuple[float, int, torch.Tensor]:
    """(summed next-token loss, number of predicted tokens, dL/d ``hidden``) of one batch, from the
    last decoder layer's output ``hidden`` [B, S, H]; the head runs on chunks of positions of at most
    :data:`HEAD_CHUNK_BYTES` of logits each (the loss is a sum over positions, so this is exact)."""
    batch, length = input_ids.shape
    vocab = model.get_output_embeddings().weight.shape[0]
    chunk = max(1, HEAD_CHUNK_BYTES // (4 * batch * vocab))
    hidden = hidden.detach().requires_grad_(True)
    total, count = 0.0, 0
    for start in range(0, length - 1, chunk):
        stop = min(start + chunk, length - 1)
        with torch.enable_grad():
            logits = head_logits(model, hidden[:, start:stop], input_ids[:, start:stop], attention_mask[:, start:stop])
            loss, n = next_token_loss(logits, input_ids[:, start:stop + 1], attention_mask[:, start:stop + 1])
            loss.backward()
        total, count = total + float(loss.detach()), count + n
    grad = hidden.grad if hidden.grad is not None else torch.zeros_like(hidden)
    return total, count, grad


# -- the output head -------------------------------------------------------------------------------


def _load_head(model: nn.Module, family, checkpoint: LazyCheckpoint, dtype: torch.dtype, keep_fp32) -> list[nn.Module]:
    """Read the final norm and the output embedding (tied: the input embedding) from the shards, under
    whatever names the family stores them (:func:`~moeprune.layout.read_module`)."""
    head = model.get_output_embeddings()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    modules = [*pre_norm_modules(model), final_norm(model), head]
    for module in modules:
        path = module_path(model, module)
        state = read_module(family, checkpoint, path)
        if module is head and tied and "weight" not in state:
            state["weight"] = read_module(family, checkpoint, module_path(model, model.get_input_embeddings()))["weight"]
        load_module_weights(module, cast_state(state, dtype, keep_fp32, prefix=path + "."))
    return modules


#: modules a model body applies to the last decoder layer's output before its final norm (DeepSeek-V4's
#: hyper-connection head, which mixes the hc_mult residual streams [B, S, hc, H] into one)
PRE_NORM_NAMES = ("hc_head",)


def pre_norm_modules(model: nn.Module) -> list[nn.Module]:
    """The model body's modules between the last decoder layer and the final norm (:data:`PRE_NORM_NAMES`)."""
    return [module for name in PRE_NORM_NAMES if isinstance(module := getattr(model_body(model), name, None), nn.Module)]


def head_logits(model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits of the last decoder layer's output ``hidden``, by the model's own ``ForCausalLM``
    forward (output head, logit scaling, soft-capping) with its body replaced by the final norm (after
    the stream mixer of :func:`pre_norm_modules`)."""
    body = model_body(model)
    norm = final_norm(model)
    mixers = pre_norm_modules(model)

    def body_forward(*args, **kwargs):
        mixed = hidden
        for mixer in mixers:
            mixed = mixer(mixed)
        return _BodyOutput(last_hidden_state=norm(mixed))

    extra = {"output_router_logits": False} if "output_router_logits" in inspect.signature(model.forward).parameters else {}
    body.forward = body_forward
    try:
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra).logits
    finally:
        del body.forward


class _BodyOutput:
    """A model body's output holding only ``last_hidden_state`` (every other field reads None)."""

    def __init__(self, last_hidden_state: torch.Tensor):
        self.last_hidden_state = last_hidden_state

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return None

    def __getitem__(self, index):
        return (self.last_hidden_state,)[index]


# -- gradient observers ----------------------------------------------------------------------------


class _GradientInstrumentedLayer(InstrumentedLayer):
    """An :class:`~moeprune.collect.InstrumentedLayer` whose observers update after the backward of
    each forward, with dL/dh of every routed pair (``RoutedPairs.intermediate_grad``).

    h = act(gate) * up is recorded where the experts compute it (their ``_apply_gate``, or ``act_fn``
    for experts without a gate), with its gradient retained, in the order the instrumented experts
    forward concatenates the pairs' intermediates (one call per expert for ``eager``, one for
    ``grouped_mm``).
    """

    def __init__(self, family, layer: nn.Module, observers):
        self._activations: list[torch.Tensor] = []
        self._pending: dict | None = None
        super().__init__(family, layer, observers)
        experts = self.experts
        if experts.has_gate:
            apply_gate = experts._apply_gate

            def recorded(gate_up):
                return self._record(apply_gate(gate_up))

            experts._apply_gate = recorded
        else:
            self.handles.append(experts.act_fn.register_forward_hook(lambda module, args, out: self._record(out)))

    def _record(self, activation: torch.Tensor) -> torch.Tensor:
        if activation.requires_grad:
            activation.retain_grad()
        self._activations.append(activation)
        return activation

    def _layer_hook(self, module, args, output):
        self._pending, self._signals = self._signals, {"shared_outputs": []}

    def after_backward(self) -> None:
        """Feed the observers the last forward, now that its gradients are known."""
        signals, self._pending = self._pending, None
        activations, self._activations = self._activations, []
        pairs = signals["pairs"]
        grads = [a.grad if a.grad is not None else torch.zeros_like(a) for a in activations]
        grad = torch.cat(grads) if grads else torch.zeros_like(pairs.intermediate)
        if grad.shape != pairs.intermediate.shape:
            raise MoePruneError(f"recorded {tuple(grad.shape)} expert activations for {tuple(pairs.intermediate.shape)} "
                                "routed pairs: this experts implementation is not supported by the backward pass")
        signals["pairs"] = dataclasses.replace(pairs, output=pairs.output.detach(), intermediate=pairs.intermediate.detach(),
                                               intermediate_grad=grad.detach())
        top_k_index = signals["top_k_index"]
        forward = LayerForward(valid=self.valid(top_k_index.shape[0], top_k_index.device), **signals)
        for observer in self.observers:
            observer.update(forward)

    def update_empty(self) -> None:
        """Feed the observers a forward of no token (sizes their accumulators: a rank without data)."""
        experts, device = self.experts, self.observers[0].context.device if self.observers else torch.device("cpu")
        width = experts.down_proj.shape[-2] if experts.is_transposed else experts.down_proj.shape[-1]
        hidden = experts.down_proj.shape[-1] if experts.is_transposed else experts.down_proj.shape[-2]
        index = torch.empty(0, dtype=torch.long, device=device)
        empty = torch.empty(0, width, device=device)
        pairs = RoutedPairs(index, index, torch.empty(0, device=device), torch.empty(0, hidden, device=device), empty, empty)
        top_k = torch.empty(0, self.observers[0].context.top_k if self.observers else 1, device=device)
        forward = LayerForward(valid=torch.empty(0, dtype=torch.bool, device=device), top_k_index=top_k.long(),
                               top_k_weights=top_k, pairs=pairs)
        for observer in self.observers:
            observer.update(forward)

    def remove(self) -> None:
        super().remove()
        self.experts.__dict__.pop("_apply_gate", None)


class ObserverCallback(LayerGradientCallback):
    """Runs gradient observers (those needing ``gradients``) on the recomputed MoE layers."""

    def __init__(self, family, config, names: Sequence[str], settings: PassSettings, moe_layers: Sequence[int]):
        self.family, self.config, self.names, self.settings = family, config, tuple(names), settings
        self.moe_layers = frozenset(moe_layers)
        self.results: dict[int, dict[str, torch.Tensor]] = {}
        self._instrumented: _GradientInstrumentedLayer | None = None

    def needs_layer(self, index: int) -> bool:
        return index in self.moe_layers

    def begin_layer(self, index, layer):
        observers = new_observers(self.family, layer, self.config, self.names, tcess_pool=self.settings.tcess_pool,
                                  tcess_bins=self.settings.tcess_bins, device=self.settings.device)
        observers = [o for o in observers if type(o).name in self.names]  # not the always-run ones again
        self._instrumented = _GradientInstrumentedLayer(self.family, layer, observers)

    def before_batch(self, index, layer, batch, attention_mask):
        self._instrumented.token_mask = attention_mask.reshape(-1).bool().to(self.settings.device)

    def after_batch(self, index, layer, grads):
        self._instrumented.after_backward()

    def end_layer(self, index, layer):
        self._instrumented.remove()
        self.results[index] = self._instrumented.result()
        self._instrumented = None

    def zeros_of(self, index: int, layer: nn.Module) -> None:
        """The observers' zeros for layer ``index`` (a data-parallel rank without data; ``layer`` may
        be on the meta device)."""
        self.begin_layer(index, layer)
        self._instrumented.update_empty()
        self.end_layer(index, layer)


def gradient_observers(names: Sequence[str]) -> tuple[str, ...]:
    """The observers of ``names`` that need the gradients signal (they run in the backward sweep)."""
    return tuple(n for n in names if GRADIENTS in OBSERVERS[n].needs)


# -- the pass --------------------------------------------------------------------------------------


def check_backward_family(family) -> None:
    """MoePruneError for a family whose layers hand a value to the next layer (``[engine] carry`` in
    its spec, e.g. GLM-MoE-DSA's ``prev_topk_indices``): the forward engine carries it, the backward
    pass does not yet, and gradients without it would be wrong."""
    carry = family.spec.get("engine", {}).get("carry")
    if carry:
        raise MoePruneError(f"{family.name} layers hand {carry.get('argument')!r} to the next layer, which the layer-by-layer "
                            "backward pass does not carry yet: gradient statistics (heapr, taylor) are not available for it")
    if family.spec.get("engine", {}).get("accumulate"):
        raise MoePruneError(f"{family.name} layers take the inputs of earlier layers (accumulated by the model body), whose "
                            "gradients the layer-by-layer backward pass does not carry yet: gradient statistics (heapr, "
                            "taylor) are not available for it")


def run_backward(config, family, checkpoint: LazyCheckpoint, batches, settings: PassSettings,
                 callbacks: Sequence[LayerGradientCallback], forward_observers: Sequence[str] = (),
                 model: nn.Module | None = None):
    """Forward sweep (running ``forward_observers`` on the MoE layers), loss, backward sweep (running
    ``callbacks``). Returns (the forward observers' entries per MoE layer, :class:`LossSummary`).
    ``model``: the meta skeleton to use (built from ``config`` when None)."""
    if not batches:
        raise MoePruneError("the backward pass needs at least one calibration batch")
    check_backward_family(family)
    device, dtype = settings.device, settings.dtype
    model = build_skeleton(config, dtype) if model is None else model
    prepare_experts_implementation(model)
    moe_layers = moe_layer_indices(family, model)
    keep_fp32 = fp32_pattern(model, dtype)
    layers = decoder_layers(model)
    wanted = [i for i in range(len(layers)) if any(cb.needs_layer(i) for cb in callbacks)]
    lowest = min(wanted) if wanted else len(layers)

    def load(index: int) -> nn.Module:
        layer = layers[index]
        load_decoder_layer(family, checkpoint, index, layer, dtype, keep_fp32)
        _place(family, layer, settings, moe=index in moe_layers)
        return layer

    def unload(index: int, layer: nn.Module) -> None:
        if index in moe_layers:
            release_experts(family.experts(layer))
        _free_module(layer)

    embed = load_input_embeddings(model, family, checkpoint, dtype)
    with torch.no_grad():
        first, per_batch_kwargs = capture_layer_inputs(model, batches)
    _free_module(embed)
    hidden = ActivationStore(settings.offload_dir)
    for b in range(len(first)):
        hidden.append(first[b])
    first.close()

    saved: dict[int, ActivationStore] = {}
    results: dict[int, dict[str, torch.Tensor]] = {}
    grads = ActivationStore(settings.offload_dir)
    try:
        # 1. forward, saving the inputs of the layers the backward sweep recomputes
        started = time.perf_counter()
        for index in tqdm(range(len(layers)), desc="forward", disable=not settings.progress, leave=False):
            layer = load(index)
            instrumented = (_instrument(family, layer, config, dataclasses.replace(settings, observers=tuple(forward_observers)))
                            if forward_observers and index in moe_layers else None)
            if index >= lowest:
                saved[index] = ActivationStore(settings.offload_dir)
            with torch.no_grad():
                for b, (input_ids, attention_mask) in enumerate(batches):
                    x = hidden[b]
                    if index >= lowest:
                        saved[index].append(x)
                    if instrumented is not None:
                        instrumented.token_mask = attention_mask.reshape(-1).bool().to(device)
                    hidden[b] = _output(layer(x.to(device), **to_device(per_batch_kwargs[b][index], device))).to(HIDDEN_STORE)
            if instrumented is not None:
                instrumented.remove()
                results[index] = instrumented.result()
            unload(index, layer)

        # 2. the loss and its gradient at the last layer's output
        timings = {"forward": time.perf_counter() - started}
        started = time.perf_counter()
        head = _load_head(model, family, checkpoint, dtype, keep_fp32)
        for module in head:
            module.to(device).requires_grad_(False)
        loss_sum, loss_tokens = 0.0, 0
        for b, (input_ids, attention_mask) in enumerate(batches):
            loss, count, grad = loss_gradient(model, hidden[b].to(device), input_ids.to(device), attention_mask.to(device))
            loss_sum, loss_tokens = loss_sum + loss, loss_tokens + count
            grads.append(grad.to(HIDDEN_STORE))
        for module in head:
            _free_module(module)
        hidden.close()
        logger.info("calibration loss %.4f (mean over %d predicted tokens)", loss_sum / max(loss_tokens, 1), loss_tokens)
        timings["head"] = time.perf_counter() - started
        started = time.perf_counter()

        # 3. backward, top layer first
        for index in tqdm(range(len(layers) - 1, lowest - 1, -1), desc="backward", disable=not settings.progress, leave=False):
            layer = load(index)
            active = [cb for cb in callbacks if cb.needs_layer(index)]
            _require_weight_grads(index, layer, active)
            for cb in active:
                cb.begin_layer(index, layer)
            for b, (input_ids, attention_mask) in enumerate(batches):
                for cb in active:
                    cb.before_batch(index, layer, b, attention_mask)
                x = saved[index][b].to(device).requires_grad_(True)
                output_grad = grads[b].to(device)
                with torch.enable_grad():
                    out = _output(layer(x, **to_device(per_batch_kwargs[b][index], device)))
                    torch.autograd.backward(out, output_grad)
                for cb in active:
                    cb.after_batch(index, layer, BatchGradients(b, attention_mask, x.detach(), x.grad, output_grad))
                grads[b] = x.grad.to(HIDDEN_STORE)
                del x, out
            for cb in active:
                cb.end_layer(index, layer)
            saved.pop(index).close()
            unload(index, layer)
    finally:
        hidden.close()
        grads.close()
        for store in saved.values():
            store.close()
    timings["backward"] = time.perf_counter() - started
    logger.info("backward pass: %s", ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    return results, LossSummary(loss_sum, loss_tokens)


def _require_weight_grads(index: int, layer: nn.Module, callbacks: Sequence[LayerGradientCallback]) -> None:
    """Make the parameters some callback wants ``.grad`` of (:meth:`LayerGradientCallback.weight_grad_parameters`,
    union over the callbacks) require gradients, and no other (no cost for the routed experts of a
    callback that reads attention gradients only)."""
    wanting = [cb for cb in callbacks if cb.wants_weight_grads(index)]
    chosen = [cb.weight_grad_parameters(index, layer) for cb in wanting]
    if not wanting or any(names is None for names in chosen):
        layer.requires_grad_(bool(wanting))
        return
    names = set().union(*chosen)
    for name, parameter in layer.named_parameters():
        parameter.requires_grad_(name in names)


def _output(out) -> torch.Tensor:
    """The hidden states a decoder layer returns (a tensor, or the first element of a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def collect_backward(model_dir, config, family, checkpoint, batches, settings: PassSettings):
    """:func:`~.engine.collect_stats`'s pass when an observer needs gradients: observers without
    gradients run in the forward sweep, the others on the recomputed layers of the backward sweep.
    Returns the raw entries per MoE layer (each layer's entries in observer order), the loss, and the
    dense gradient observers' entries per decoder layer (``taylor``: :mod:`.taylor`)."""
    backward_names = gradient_observers(settings.observers)
    dense_names = tuple(n for n in backward_names if is_dense_observer(n))
    backward_names = tuple(n for n in backward_names if n not in dense_names)
    forward_names = tuple(n for n in settings.observers if n not in backward_names and n not in dense_names)
    model = build_skeleton(config, settings.dtype)
    callback = ObserverCallback(family, config, backward_names, settings, moe_layer_indices(family, model))
    from .taylor import TaylorCallback  # builds on this module (a module-level import would be circular)

    taylor = TaylorCallback(family, config) if "taylor" in dense_names else None
    callbacks = ([callback] if backward_names else []) + ([taylor] if taylor is not None else [])
    if batches:
        forward, loss = run_backward(config, family, checkpoint, batches, settings, callbacks, forward_names, model=model)
    elif taylor is not None:
        raise MoePruneError("the Taylor statistics need calibration batches on every process")
    else:  # a data-parallel rank without a batch: every observer's zeros, nothing read but the embedding
        forward = _collect_sequential(model_dir, config, family, checkpoint, batches,
                                      dataclasses.replace(settings, observers=forward_names))
        for index in sorted(callback.moe_layers):
            callback.zeros_of(index, decoder_layers(model)[index])
        loss = LossSummary(0.0, 0)
    order = list(settings.observers)
    layers = {}
    for index in sorted(set(forward) | set(callback.results)):
        entries = {**forward.get(index, {}), **callback.results.get(index, {})}
        layers[index] = {name: entries[name] for name in _entry_order(order, entries)}
    return layers, loss, (taylor.results if taylor is not None else {})


def all_reduce_loss(loss: LossSummary, context: DistributedContext, device: torch.device) -> LossSummary:
    """The whole calibration set's loss from every data-parallel rank's (unchanged on one process)."""
    if not context.active:
        return loss
    total = torch.tensor([loss.loss_sum, float(loss.loss_tokens)], dtype=torch.float64, device=collective_device(context, device))
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return LossSummary(float(total[0]), int(total[1]))


def _entry_order(observers: Sequence[str], entries: dict) -> list[str]:
    """Entry names in observer order (the order a forward-only pass returns them in)."""
    ordered = [e for n in observers for e in OBSERVERS[n].entries if e in entries]
    return ordered + [e for e in entries if e not in ordered]


def layer_gradients(
    model_dir: str | Path,
    calibration: CalibrationBatch,
    callbacks: Sequence[LayerGradientCallback],
    *,
    batch_size: int = 4,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    offload_dir: str | Path | None = None,
    progress: bool = True,
) -> LossSummary:
    """Run the layer-by-layer backward pass of the calibration loss on ``model_dir`` and call
    ``callbacks`` on every recomputed layer they need (:class:`LayerGradientCallback`); single process.
    Returns the loss (sum over the predicted tokens, and their number)."""
    if batch_size < 1:
        raise MoePruneError("batch_size must be at least 1")
    config, family, checkpoint, device, dtype = open_checkpoint(Path(model_dir), device, dtype)
    settings = PassSettings((), None, 1, device, dtype, offload_dir, progress, (device,), None)
    _, loss = run_backward(config, family, checkpoint, list(calibration.batches(batch_size)), settings, callbacks)
    return loss
