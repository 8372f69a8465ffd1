"""Dense statistics: observers of the non-expert blocks (attention, dense MLPs, shared experts, whole
layers) over EVERY decoder layer, for dense structured pruning (:mod:`moeprune.scoring.dense`,
:mod:`moeprune.plan.dense`).

Three opt-in observers (they run only when a pass or a method asks for them by name):

``dense_channels`` (FLAP fluctuation, Wanda-sp input norms), per decoder layer, over valid tokens:

==========================  ============  ====================================================
entry                       shape         value
==========================  ============  ====================================================
dense_tokens                []            valid (non-padding) tokens the layer saw
attn_o_sum / _sumsq         [C]           sum x_c, sum x_c^2 of o_proj's input channel c (C = heads x head_dim)
attn_in_sumsq               [H]           sum x_j^2 of the q/k/v input column j (the normed hidden state)
mlp_down_sum / _sumsq       [I]           same for the dense MLP's down_proj input (dense layers only)
mlp_in_sumsq                [H]           sum x_j^2 of the dense MLP's gate/up input column j
shared_down_sum / _sumsq    [S, I_s]      same for each of the layer's S shared experts
shared_in_sumsq             [S, H]        sum x_j^2 of each shared expert's gate/up input
==========================  ============  ====================================================

``angular`` (layer drop, Gromov et al. 2024 / PruneMe), at the run's FIRST layer l:
``angular_sum[n-1]`` = sum over sequences of arccos(cos(x_l, x_{l+n})) / pi, with x_l the hidden
state entering decoder layer l and x_{l+n} the one leaving layer l+n-1 (decoder-layer outputs,
never the final-normed hidden state transformers returns last: PruneMe's pitfall), on each
sequence's last non-padded token; ``angular_count[n-1]`` = sequences counted (0 where the run would
pass the last layer). n = 1..``max_depth``.

``replaceme`` (ReplaceMe, Shopkhoev et al. 2025), at the cut's first dropped layer s, for the depth
n of :class:`DenseSettings` (layers s..s+n-1 dropped): with M = the MLP / MoE block output of the
last kept layer s-1 and y = its residual input (the hidden state its MLP block adds to), over valid
tokens, in float64: ``replaceme_mtm`` = M^T M [H, H], ``replaceme_mtr`` = M^T (h_end - y) [H, H]
with h_end = the output of layer s+n-1, ``replaceme_rr`` = sum ||h_end - y||^2, ``replaceme_tokens``.
Memory: 2 H^2 float64 per candidate cut (s = 1..L-n; ``DenseSettings.replaceme_starts`` restricts
them: H = 4096 is 256 MiB per cut), plus each batch's M of the n layers in flight (valid tokens x H).

Every entry combines by sum, so halves of the data merge exactly. Instrumentation
(:class:`DenseInstrumentation`): forward pre-hooks on o_proj / down_proj / q_proj / gate_proj (their
inputs), on the decoder layer (BLOCK_INPUT) and its forward hook (BLOCK_OUTPUT), on the MLP block
(M) and the post-attention norm (y); identical in the sequential and whole-model passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import MoePruneError
from .base import OBSERVERS, Observer, register_observer

#: Runs of up to this many consecutive layers get angular distances by default.
DEFAULT_MAX_DEPTH = 8


@dataclass(frozen=True)
class DenseSettings:
    """Collection-time settings of the dense observers.

    ``max_depth``: longest run of layers with angular distances; ``replaceme_depth``: layers a
    ReplaceMe cut drops (its statistics depend on it); ``replaceme_starts``: the candidate cuts'
    first dropped layers (None: every s = 1..L-n; restrict them to bound memory on large models).
    """

    max_depth: int = DEFAULT_MAX_DEPTH
    replaceme_depth: int = 1
    replaceme_starts: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.max_depth < 1 or self.replaceme_depth < 1:
            raise MoePruneError("dense statistics need max_depth >= 1 and replaceme_depth >= 1")

    def metadata(self) -> dict:
        return {"dense_max_depth": self.max_depth, "replaceme_depth": self.replaceme_depth,
                "replaceme_starts": None if self.replaceme_starts is None else list(self.replaceme_starts)}


def dense_settings_for(method_name: str, options: dict | None) -> DenseSettings | None:
    """Collection-time settings a dense method needs (ReplaceMe: its depth ``layers``), else None."""
    if method_name != "replaceme":
        return None
    return DenseSettings(replaceme_depth=int((options or {}).get("layers", 1)))


class DenseObserver(Observer):
    """An observer of every decoder layer (``kind = "dense"``), fed by :class:`DenseInstrumentation`
    instead of the MoE layers' :class:`~moeprune.collect.InstrumentedLayer`; always opt-in."""

    kind: ClassVar[str] = "dense"
    opt_in: ClassVar[bool] = True

    def update(self, forward) -> None:  # the instrumentation writes the accumulators directly
        raise NotImplementedError


@register_observer
class DenseChannels(DenseObserver):
    name = "dense_channels"
    entries = {name: "sum" for name in (
        "dense_tokens", "attn_o_sum", "attn_o_sumsq", "attn_in_sumsq", "mlp_down_sum", "mlp_down_sumsq",
        "mlp_in_sumsq", "shared_down_sum", "shared_down_sumsq", "shared_in_sumsq")}
    needs = frozenset()


@register_observer
class AngularDistance(DenseObserver):
    name = "angular"
    entries = {"angular_sum": "sum", "angular_count": "sum"}
    needs = frozenset()


@register_observer
class ReplaceMeStatistics(DenseObserver):
    name = "replaceme"
    entries = {"replaceme_mtm": "sum", "replaceme_mtr": "sum", "replaceme_rr": "sum", "replaceme_tokens": "sum"}
    needs = frozenset()


def is_dense_observer(name: str) -> bool:
    """True for the observers of :mod:`moeprune.observe.dense` (they run on every decoder layer)."""
    return getattr(OBSERVERS[name], "kind", "moe") == "dense"


# -- where the dense modules are (the one place that names them) ------------------------------------

def dense_paths(family, layer: nn.Module) -> dict[str, str]:
    """Module paths, relative to one decoder layer, of the parts dense pruning reads, by role.

    Assumes the transformers module names (which are also the on-disk tensor prefixes of the stock
    checkpoints): attention ``self_attn.{q,k,v,o}_proj`` (roles ``q k v o``; absent for MLA attention,
    which has no q/k/v projections: role ``mla`` then names ``self_attn``), a dense MLP ``mlp.{gate,
    up,down}_proj`` on layers that are not MoE layers (roles ``mlp_gate mlp_up mlp_down``), the
    family's shared experts ``<shared>.{gate,up,down}_proj`` (roles ``shared.<i>.gate`` ...), the
    MLP / MoE block ``mlp`` and the post-attention norm ``post_attention_layernorm`` (ReplaceMe's M
    and y). The layout room will own this map (routers/*.toml); until then this function is it.
    """
    def has(path: str) -> bool:
        module = layer
        for part in path.split("."):
            module = getattr(module, part, None)
            if not isinstance(module, nn.Module):
                return False
        return True

    paths: dict[str, str] = {}
    if all(has(f"self_attn.{p}_proj") for p in "qkvo"):
        paths.update({p: f"self_attn.{p}_proj" for p in "qkvo"})
    elif has("self_attn"):
        paths["mla"] = "self_attn"
    if not family.is_moe_layer(layer) and all(has(f"mlp.{p}_proj") for p in ("gate", "up", "down")):
        paths.update({f"mlp_{p}": f"mlp.{p}_proj" for p in ("gate", "up", "down")})
    for index, path in enumerate(family.spec["modules"].get("shared", [])):
        if all(has(f"{path}.{p}_proj") for p in ("gate", "up", "down")):
            paths.update({f"shared.{index}.{p}": f"{path}.{p}_proj" for p in ("gate", "up", "down")})
    if has("mlp"):
        paths["mlp"] = "mlp"
    if has("post_attention_layernorm"):
        paths["residual"] = "post_attention_layernorm"
    return paths


def shared_indices(paths: dict[str, str]) -> list[int]:
    """Indices i of the shared experts found by :func:`dense_paths`."""
    return sorted({int(role.split(".")[1]) for role in paths if role.startswith("shared.")})


# -- pure helpers -----------------------------------------------------------------------------------

def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] position of each row's last non-padded token (-1 for a row without one)."""
    mask = attention_mask.bool()
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, torch.full_like(positions, -1)).amax(dim=1)


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """arccos(cos(a, b)) / pi row by row, in float64 (0: same direction, 1: opposite)."""
    a, b = a.double(), b.double()
    cos = (a * b).sum(-1) / (torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1))
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def _first(value) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


class DenseInstrumentation:
    """Feeds the dense observers of one calibration pass (every decoder layer, one object per pass).

    The engine calls :meth:`attach` when a layer is ready (weights loaded), :meth:`begin_batch`
    before each forward of a batch, :meth:`detach` when it is done with a layer (sequential) or
    :meth:`end_batch` after a batch (whole model); :meth:`result` gives ``{layer: entries}``.
    Hidden states a later layer needs (angular: last tokens; ReplaceMe: M and y) are kept by
    (layer, batch) and released as soon as the run they belong to is complete.
    """

    def __init__(self, family, names, num_layers: int, settings: DenseSettings | None = None,
                 device: torch.device | str = "cpu"):
        self.family = family
        self.names = set(names)
        self.num_layers = num_layers
        self.settings = settings or DenseSettings()
        self.device = torch.device(device)
        self.entries: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(num_layers)}
        self.handles: dict[int, list] = {}
        self.batch: int | None = None
        self.mask: torch.Tensor | None = None  # [B, S] bool
        self.block_inputs: dict[tuple[int, int], torch.Tensor] = {}  # (layer, batch) -> [B, H] last tokens
        self.pending_m: dict[tuple[int, int], torch.Tensor] = {}  # (cut start, batch) -> M [N, H] float64
        self.pending_y: dict[tuple[int, int], torch.Tensor] = {}
        starts = self.settings.replaceme_starts
        n = self.settings.replaceme_depth
        self.cuts = tuple(s for s in (range(1, num_layers - n + 1) if starts is None else starts)
                          if 1 <= s <= num_layers - n) if "replaceme" in self.names else ()
        if starts is not None and "replaceme" in self.names and len(self.cuts) != len(starts):
            raise MoePruneError(f"ReplaceMe cut starts {list(starts)} must lie in 1..{num_layers - n} "
                                f"(depth {n}, {num_layers} layers)")
        for index in range(num_layers):
            if "dense_channels" in self.names:
                self.entries[index]["dense_tokens"] = self._zeros()
            if "angular" in self.names:
                self.entries[index]["angular_sum"] = self._zeros(self.settings.max_depth)
                self.entries[index]["angular_count"] = self._zeros(self.settings.max_depth)

    def _zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float64, device=self.device)

    # -- engine protocol ---------------------------------------------------------------------------

    def begin_batch(self, batch: int, attention_mask: torch.Tensor) -> None:
        self.batch = batch
        self.mask = attention_mask.bool()

    def end_batch(self, batch: int) -> None:
        """Forget what a finished batch left (whole-model pass: every run of it is complete)."""
        for store in (self.block_inputs, self.pending_m, self.pending_y):
            for key in [k for k in store if k[1] == batch]:
                del store[key]

    def _init_entries(self, index: int, layer: nn.Module, paths: dict[str, str]) -> None:
        """Zero accumulators of every entry the layer will produce, shaped from its modules (so a
        data-parallel rank without a batch holds the same entries as the others)."""
        def width(role: str) -> int:
            return layer.get_submodule(paths[role]).in_features

        shapes: dict[str, tuple[int, ...]] = {}
        if "dense_channels" in self.names:
            if "o" in paths:
                shapes.update(attn_o_sum=(width("o"),), attn_o_sumsq=(width("o"),), attn_in_sumsq=(width("q"),))
            if "mlp_down" in paths:
                shapes.update(mlp_down_sum=(width("mlp_down"),), mlp_down_sumsq=(width("mlp_down"),),
                              mlp_in_sumsq=(width("mlp_gate"),))
            shared = shared_indices(paths)
            if shared:
                shapes.update(shared_down_sum=(len(shared), width("shared.0.down")),
                              shared_down_sumsq=(len(shared), width("shared.0.down")),
                              shared_in_sumsq=(len(shared), width("shared.0.gate")))
        if "replaceme" in self.names and index + 1 in self.cuts:
            hidden = layer.get_submodule(paths["residual"]).weight.shape[-1]
            cut = self.entries[index + 1]
            for name, shape in (("replaceme_mtm", (hidden, hidden)), ("replaceme_mtr", (hidden, hidden)),
                                ("replaceme_rr", ()), ("replaceme_tokens", ())):
                cut.setdefault(name, self._zeros(*shape))
        for name, shape in shapes.items():
            self.entries[index].setdefault(name, self._zeros(*shape))

    def attach(self, index: int, layer: nn.Module) -> None:
        paths = dense_paths(self.family, layer)
        module = layer.get_submodule
        hooks = []

        def pre(path, fn):
            hooks.append(module(path).register_forward_pre_hook(lambda m, args: fn(args[0])))

        if "dense_channels" in self.names:
            if "o" in paths:
                pre(paths["o"], lambda x: self._channels(index, "attn_o", x))
                pre(paths["q"], lambda x: self._sumsq(index, "attn_in_sumsq", x))
            if "mlp_down" in paths:
                pre(paths["mlp_down"], lambda x: self._channels(index, "mlp_down", x))
                pre(paths["mlp_gate"], lambda x: self._sumsq(index, "mlp_in_sumsq", x))
            shared = shared_indices(paths)
            for i in shared:
                pre(paths[f"shared.{i}.down"], lambda x, i=i: self._channels(index, "shared_down", x, i))
                pre(paths[f"shared.{i}.gate"], lambda x, i=i: self._sumsq(index, "shared_in_sumsq", x, i))
        replaceme = "replaceme" in self.names and index + 1 in self.cuts
        if replaceme and ("mlp" not in paths or "residual" not in paths):
            raise MoePruneError(f"decoder layer {index} has no mlp / post_attention_layernorm module; "
                                "ReplaceMe cannot fold a transform there")
        self._init_entries(index, layer, paths)
        if replaceme:
            hooks.append(module(paths["residual"]).register_forward_pre_hook(
                lambda m, args: self._keep(self.pending_y, index + 1, args[0])))
            hooks.append(module(paths["mlp"]).register_forward_hook(
                lambda m, args, out: self._keep(self.pending_m, index + 1, _first(out))))
        hooks.append(layer.register_forward_pre_hook(lambda m, args, kwargs: self._block_input(index, args, kwargs),
                                                     with_kwargs=True))
        hooks.append(layer.register_forward_hook(lambda m, args, out: self._block_output(index, _first(out))))
        self.handles[index] = hooks

    def detach(self, index: int) -> None:
        for handle in self.handles.pop(index, []):
            handle.remove()

    def remove(self) -> None:
        for index in list(self.handles):
            self.detach(index)

    def result(self) -> dict[int, dict[str, torch.Tensor]]:
        """Every layer's entries (float64, CPU)."""
        return {i: {k: v.cpu() for k, v in e.items()} for i, e in self.entries.items()}

    # -- accumulation ------------------------------------------------------------------------------

    def _valid_rows(self, x: torch.Tensor) -> torch.Tensor:
        """[N_valid, C] float64 rows of the valid tokens of a [B, S, C] input."""
        flat = x.detach().reshape(-1, x.shape[-1])
        return flat[self.mask.reshape(-1).to(flat.device)].to(device=self.device, dtype=torch.float64)

    def _add(self, index: int, name: str, value: torch.Tensor, slot: int | None = None) -> None:
        if slot is None:
            self.entries[index][name] += value
        else:
            self.entries[index][name][slot] += value

    def _channels(self, index, prefix, x, slot=None) -> None:
        rows = self._valid_rows(x)
        self._add(index, f"{prefix}_sum", rows.sum(0), slot)
        self._add(index, f"{prefix}_sumsq", rows.square().sum(0), slot)

    def _sumsq(self, index, name, x, slot=None) -> None:
        self._add(index, name, self._valid_rows(x).square().sum(0), slot)

    def _keep(self, store, start: int, x: torch.Tensor) -> None:
        store[(start, self.batch)] = self._valid_rows(x)

    def _block_input(self, index: int, args, kwargs) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        if "angular" in self.names:
            self.block_inputs[(index, self.batch)] = self._last_tokens(x)

    def _last_tokens(self, x: torch.Tensor) -> torch.Tensor:
        last = last_token_index(self.mask).to(x.device)
        rows = torch.arange(x.shape[0], device=x.device)
        return x.detach()[rows, last.clamp(min=0)][last >= 0].to(device=self.device, dtype=torch.float64)

    def _block_output(self, index: int, out: torch.Tensor) -> None:
        b = self.batch
        entries = self.entries[index]
        if "dense_channels" in self.names:
            entries["dense_tokens"] += float(self.mask.sum())
        if "angular" in self.names:
            x_end = self._last_tokens(out)
            for n in range(1, self.settings.max_depth + 1):
                start = index - n + 1
                if start < 0:
                    break
                x_start = self.block_inputs.get((start, b))
                if x_start is None:
                    continue
                self.entries[start]["angular_sum"][n - 1] += angular_distance(x_start, x_end).sum()
                self.entries[start]["angular_count"][n - 1] += x_start.shape[0]
            for key in [k for k in self.block_inputs if k[1] == b and k[0] <= index - self.settings.max_depth + 1]:
                del self.block_inputs[key]
        start = index - self.settings.replaceme_depth + 1
        if (start, b) in self.pending_m:  # the cut s..index is complete: M^T (h_end - y)
            m, y = self.pending_m.pop((start, b)), self.pending_y.pop((start, b))
            r = self._valid_rows(out) - y
            cut = self.entries[start]
            cut["replaceme_mtm"] += m.T @ m
            cut["replaceme_mtr"] += m.T @ r
            cut["replaceme_rr"] += r.square().sum()
            cut["replaceme_tokens"] += m.shape[0]
