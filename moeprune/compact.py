"""Routed experts of per-expert widths: the compact layout of neuron slicing, and its loader key.

After neuron slicing with ``--layout compact`` every routed expert keeps its own width w_j, which no
stock transformers config can express (one expert width per model). Such a checkpoint keeps the
source's stock keys and records the widths in config.json's ``moeprune`` section::

    "moeprune": {"format": 1, "expert_widths": {"<layer>": [w_0, ..., w_{E-1}], ...}}

:func:`moeprune.load` builds the model of the same transformers class and, in each listed MoE layer,
turns the experts module into a compact one (:func:`make_compact`): the instance is re-classed to a
subclass of its own transformers class (``Compact<Class>``, so ``isinstance`` still holds and the
family's activation ``_apply_gate``, ``act_fn``, biases flags, ... are the module's own) whose fused
3-D blocks are replaced by two row-concatenated matrices:

* ``gate_up_rows`` [sum_j 2 w_j, H]: expert j's gate and up rows, paired as the family pairs them
  in memory (halves: ``[gate_j; up_j]``; interleaved: gate k, up k alternating), untransposed;
  ungated experts (Nemotron-H, ``down(act(up x))``): expert j's up rows only, [sum_j w_j, H];
* ``down_rows`` [sum_j w_j, H]: expert j's down projection transposed (row k = column k of W_down),
  so every expert's slice is a contiguous block of rows;
* biases (families with expert biases): ``gate_up_bias_rows`` [sum_j 2 w_j], ``down_bias_rows`` [E, H].

The forward sorts the routed (token, expert) pairs by expert, as transformers' ``grouped_mm``
forward does, and runs each expert's contiguous block of pairs through its own contiguous slices
(two matrix products per expert), then weights and sums the pairs per token. Its cost is the
routed FLOPs of the kept neurons plus a Python loop over the experts; ``scripts/bench_compact.py``
measures it against the dense model and a uniform model of the same parameter count.

Families that store their experts fused on disk (GPT-OSS: one [E, H, 2I] tensor per layer) cannot
store experts of different widths; the neuron op refuses the compact layout for them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .errors import MoePruneError
from .layout import FusedFormat, cast_float, family_layout, model_experts_module, set_model_tensor
from .structure import StructureHandler, register_structure

#: ``moeprune`` config section key: per-expert widths of the routed experts, per MoE layer.
EXPERT_WIDTHS = "expert_widths"
#: Parameter names of a compact experts module (relative to it).
GATE_UP_ROWS, DOWN_ROWS, GATE_UP_BIAS_ROWS, DOWN_BIAS_ROWS = "gate_up_rows", "down_rows", "gate_up_bias_rows", "down_bias_rows"


def compact_names(fmt: FusedFormat) -> tuple[str, ...]:
    """The parameter names of a compact experts module of a family with format ``fmt``."""
    return (GATE_UP_ROWS, DOWN_ROWS) + ((GATE_UP_BIAS_ROWS, DOWN_BIAS_ROWS) if fmt.has_biases else ())


def _offsets(sizes: Sequence[int]) -> list[int]:
    """[0, s_0, s_0 + s_1, ...]: where each block starts (and the total last)."""
    out = [0]
    for size in sizes:
        out.append(out[-1] + int(size))
    return out


def rows_per_neuron(fmt: FusedFormat) -> int:
    """Rows of ``gate_up_rows`` per neuron: 2 (gate and up), 1 for ungated experts (up only)."""
    return 2 if fmt.gated else 1


def _input_rows(fmt: FusedFormat, expert: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One expert's rows of ``gate_up_rows``: gate and up paired as the family pairs them, or up alone."""
    return fmt._unpair(expert["gate"], expert["up"]) if fmt.gated else expert["up"]


def compact_tensors(fmt: FusedFormat, experts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The compact module's tensors holding canonical ``experts`` (``gate``/``up`` [w_j, H], ``down``
    [H, w_j], biases) in order; widths may differ."""
    tensors = {
        GATE_UP_ROWS: torch.cat([_input_rows(fmt, e) for e in experts]).contiguous(),
        DOWN_ROWS: torch.cat([e["down"].transpose(0, 1) for e in experts]).contiguous(),
    }
    if fmt.has_biases:
        tensors[GATE_UP_BIAS_ROWS] = torch.cat([fmt._unpair(e["gate_bias"], e["up_bias"]) for e in experts]).contiguous()
        tensors[DOWN_BIAS_ROWS] = torch.stack([e["down_bias"] for e in experts]).contiguous()
    return tensors


def compact_shapes(fmt: FusedFormat, widths: Sequence[int], hidden: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the compact module's tensors for experts of ``widths``."""
    total = sum(int(w) for w in widths)
    shapes = {GATE_UP_ROWS: (rows_per_neuron(fmt) * total, hidden), DOWN_ROWS: (total, hidden)}
    if fmt.has_biases:
        shapes.update({GATE_UP_BIAS_ROWS: (2 * total,), DOWN_BIAS_ROWS: (len(widths), hidden)})
    return shapes


def compact_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts forward over per-expert widths: pairs sorted by expert, each expert's block of
    pairs through its own contiguous weight slices (``act(gate) * up``, or ``act(up)`` for ungated
    experts), gate-weighted and summed per token."""
    num_tokens, top_k = top_k_index.shape
    hidden = hidden_states.shape[-1]
    expert_ids = top_k_index.reshape(-1)
    order = torch.argsort(expert_ids, stable=True)
    token_of = order // top_k
    selected = hidden_states[token_of]
    counts = torch.bincount(expert_ids, minlength=self.num_experts).tolist()
    gate_up_at, down_at = self.gate_up_offsets, self.down_offsets
    has_bias = GATE_UP_BIAS_ROWS in self._parameters
    post_norm = getattr(self, "has_post_expert_norm", False)
    parts, start = [], 0
    for expert, count in enumerate(counts[: self.num_experts]):
        if count == 0:
            continue
        rows = selected[start:start + count]
        start += count
        bias = self.gate_up_bias_rows[gate_up_at[expert]:gate_up_at[expert + 1]] if has_bias else None
        gate_up = nn.functional.linear(rows, self.gate_up_rows[gate_up_at[expert]:gate_up_at[expert + 1]], bias)
        hidden_act = self._apply_gate(gate_up) if self.compact_gated else self.act_fn(gate_up)
        projected = hidden_act @ self.down_rows[down_at[expert]:down_at[expert + 1]]
        if has_bias:
            projected = projected + self.down_bias_rows[expert]
        parts.append(self.post_expert_norm(projected) if post_norm else projected)
    if start < selected.shape[0]:  # ids beyond num_experts (expert-parallel sentinels) contribute nothing
        parts.append(selected.new_zeros(selected.shape[0] - start, hidden))
    out = torch.cat(parts) if parts else selected.new_zeros(0, hidden)
    weighted = out * top_k_weights.reshape(-1)[order].unsqueeze(-1)
    final = weighted.new_zeros(num_tokens, hidden).index_add_(0, token_of, weighted)
    return final.to(hidden_states.dtype)


@functools.cache
def compact_class(base: type) -> type:
    """``Compact<Base>``: a subclass of a transformers experts class running :func:`compact_forward`."""
    return type(f"Compact{base.__name__}", (base,), {"forward": compact_forward, "__module__": __name__})


def is_compact(module: nn.Module) -> bool:
    """True for an experts module turned compact by :func:`make_compact`."""
    return DOWN_ROWS in module._parameters


def make_compact(module: nn.Module, fmt: FusedFormat, widths: Sequence[int], tensors: Mapping[str, torch.Tensor]) -> None:
    """Turn a transformers experts module into a compact one holding ``tensors``
    (:func:`compact_tensors`, or meta tensors of :func:`compact_shapes`) for experts of ``widths``."""
    widths = [int(w) for w in widths]
    if min(widths, default=0) < 1:
        raise MoePruneError(f"every expert needs at least one neuron, got widths {widths}")
    for name in fmt.names:
        module._parameters.pop(name, None)
    for name in compact_names(fmt):
        module._parameters[name] = nn.Parameter(tensors[name], requires_grad=False)
    module.num_experts = len(widths)
    module.expert_widths = widths
    module.compact_gated = fmt.gated
    module.gate_up_offsets = _offsets([rows_per_neuron(fmt) * w for w in widths])
    module.down_offsets = _offsets(widths)
    if type(module).forward is not compact_forward:
        module.__class__ = compact_class(type(module))


def needs_compact(experts: Sequence[Mapping[str, torch.Tensor]]) -> bool:
    """Canonical experts a fused transformers block cannot run as they are: different widths, or one
    width whose rows are not 16-byte aligned (torch's grouped_mm, transformers' default kernel, needs
    16-byte strides)."""
    widths = {e["up"].shape[0] for e in experts}  # every expert has up rows (ungated ones no gate)
    if len(widths) > 1:
        return True
    item = experts[0]["down"].element_size() if experts else 4
    return bool(widths) and (widths.pop() * item) % 16 != 0


def set_compact_experts(model: nn.Module, family, layer: int, experts: Sequence[Mapping[str, torch.Tensor]]) -> None:
    """Replace a MoE layer's routed experts by the canonical ``experts`` (any widths), compact."""
    fmt = family_layout(family).memory
    module = model_experts_module(model, family, layer)
    make_compact(module, fmt, [e["up"].shape[0] for e in experts], compact_tensors(fmt, experts))
    model.save_pretrained = _refuse_save


def _refuse_save(*args, **kwargs):
    raise MoePruneError("this model holds routed experts of different widths (compact layout), which "
                        "save_pretrained cannot write; write the checkpoint with `moeprune prune` / `moeprune apply` "
                        "(api.prune / api.apply) and load it with moeprune.load")


# --------------------------------------------------------------------------------------------------
# the loader key


def _widths_of(value: Mapping) -> dict[int, list[int]]:
    """The section's ``{"layer": [widths]}`` as ints; malformed -> MoePruneError."""
    if not isinstance(value, Mapping):
        raise MoePruneError(f"config.json's moeprune.{EXPERT_WIDTHS} must map layer -> list of widths")
    out = {}
    for layer, widths in value.items():
        if not str(layer).isdigit() or not isinstance(widths, list) or not all(
                isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths):
            raise MoePruneError(f"config.json's moeprune.{EXPERT_WIDTHS}[{layer!r}] must be a list of positive widths")
        out[int(layer)] = widths
    return out


def _prepare(model: nn.Module, family, value) -> set[str]:
    """On the meta skeleton: make the listed layers' experts modules compact (meta tensors)."""
    layout = family_layout(family)
    fmt = layout.memory
    claimed = set()
    for layer, widths in _widths_of(value).items():
        module = model_experts_module(model, family, layer)
        if len(widths) != module.num_experts:
            raise MoePruneError(f"moeprune.{EXPERT_WIDTHS} lists {len(widths)} widths for MoE layer {layer}, which "
                                f"holds {module.num_experts} experts; the config does not match the checkpoint")
        hidden = getattr(module, fmt.down).shape[3 - fmt.down_neuron_axis]  # H of down [E, H, I] (or [E, I, H])
        meta = {name: torch.empty(shape, device="meta") for name, shape in compact_shapes(fmt, widths, hidden).items()}
        make_compact(module, fmt, widths, meta)
        claimed |= {layout.memory_experts_prefix(layer) + name for name in compact_names(fmt)}
    return claimed


def _fill(model: nn.Module, layout, value, dtype) -> set[str]:
    """Read each listed layer's experts (canonical, through the checkpoint layout) into its compact module."""
    family = layout.family
    filled = set()
    for layer, widths in _widths_of(value).items():
        found = [layout.expert_width(layer, e) for e in range(layout.num_experts(layer))]
        if found != widths:
            raise MoePruneError(f"MoE layer {layer}: the checkpoint's experts have widths {found}, config.json's "
                                f"moeprune.{EXPERT_WIDTHS} says {widths}; the files do not match the config")
        experts = []
        for expert in range(len(widths)):
            experts.append({proj: cast_float(layout.read_expert(layer, expert, proj), dtype) for proj in family.memory.projections})
            layout.forget()
        for name, tensor in compact_tensors(family.memory, experts).items():
            full = family.memory_experts_prefix(layer) + name
            set_model_tensor(model, full, tensor)
            filled.add(full)
    return filled


def _finish(model: nn.Module, family, value) -> None:
    model.save_pretrained = _refuse_save


register_structure(StructureHandler(EXPERT_WIDTHS, prepare=_prepare, fill=_fill, finish=_finish))
