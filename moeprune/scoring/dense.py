"""Dense structured-pruning scores: pure functions from one layer's weights and dense statistics
(:mod:`moeprune.observe.dense`) to one score per unit; **higher means more important** (kept first).

Units (one layer at a time):

* attention: a KV group with its query heads (under grouped-query attention; a head under
  multi-head attention, where every group has one query head): q and k/v rows of its heads, o_proj
  columns of its query heads' channels;
* channels of a dense MLP or shared expert: gate row k, up row k, down column k.

Every scorer takes a :class:`UnitInputs` and returns float64 ``[units]``. Formulas (papers in
docs/methods.md): magnitude = ||W_unit||_2; Wanda-sp = sum over the unit's weights of
|W_ij| ||x_j||_2; FLAP = fluctuation x squared norm of the output-projection column (a head: the
mean over its channels), standardised per layer and unit type by the planner; LLM-Pruner Taylor =
sum over the unit's weights of |w dL/dw|; random (seeded).
Layer-drop scores (angular distance) and the ReplaceMe transform are below.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..errors import PlanError, StatsError

HEADS = "heads"
CHANNELS = "channels"


@dataclass
class UnitInputs:
    """What a dense scorer may read about one layer's units of one kind.

    ``kind``: :data:`HEADS` (``weights`` q [Hq d, H], k and v [Hkv d, H], o [H, Hq d]) or
    :data:`CHANNELS` (``weights`` gate and up [I, H], down [H, I]). ``stats``: the layer's dense
    entries for these units under generic names: ``in_sumsq`` [H] (sum x^2 of the input columns of
    q/k/v or gate/up), ``out_sum`` / ``out_sumsq`` [C] (sum x, sum x^2 of the output projection's
    input channels, C = Hq d or I) and ``tokens``. ``num_heads`` / ``num_kv_heads`` for heads.
    """

    kind: str
    weights: Mapping[str, torch.Tensor]
    stats: Mapping[str, torch.Tensor] = field(default_factory=dict)
    num_heads: int = 0
    num_kv_heads: int = 0
    layer: int = 0
    seed: int = 0

    @property
    def num_units(self) -> int:
        """KV groups, or the channels of the output projection."""
        return self.num_kv_heads if self.kind == HEADS else self.weights["down"].shape[1]

    def stat(self, name: str) -> torch.Tensor:
        if name not in self.stats:
            raise StatsError(f"layer {self.layer}: the statistics lack the dense entry {name!r}; collect them with the "
                             "'dense_channels' observer (moeprune prune --data FILE does, or "
                             "api.collect(..., observers=['dense_channels']))")
        return self.stats[name].double()


# -- unit geometry ----------------------------------------------------------------------------------

def group_rows(values: torch.Tensor, groups: int) -> torch.Tensor:
    """[groups] sums of consecutive equal blocks of a [groups x block] vector."""
    return values.reshape(groups, -1).sum(dim=1)


def per_unit(inputs: UnitInputs, row_values: Mapping[str, torch.Tensor], out_values: torch.Tensor) -> torch.Tensor:
    """Sum per unit of per-row values of the input projections (q/k/v or gate/up rows) and per-column
    values of the output projection (o or down columns)."""
    if inputs.kind == CHANNELS:
        return row_values["gate"] + row_values["up"] + out_values
    groups = inputs.num_kv_heads
    return (group_rows(row_values["q"], groups) + group_rows(row_values["k"], groups)
            + group_rows(row_values["v"], groups) + group_rows(out_values, groups))


def _in_names(inputs: UnitInputs) -> tuple[str, ...]:
    return ("q", "k", "v") if inputs.kind == HEADS else ("gate", "up")


def _out(inputs: UnitInputs) -> torch.Tensor:
    return inputs.weights["o" if inputs.kind == HEADS else "down"].double()


# -- scorers ----------------------------------------------------------------------------------------

def magnitude_scores(inputs: UnitInputs) -> torch.Tensor:
    """||W_unit||_2: the Frobenius norm of every weight of the unit (its q/k/v or gate/up rows and
    its o or down columns). Magnitude baseline of LLM-Pruner (Ma et al., NeurIPS 2023)."""
    rows = {n: inputs.weights[n].double().square().sum(dim=1) for n in _in_names(inputs)}
    return per_unit(inputs, rows, _out(inputs).square().sum(dim=0)).sqrt()


def wanda_sp_scores(inputs: UnitInputs) -> torch.Tensor:
    """Wanda-sp: sum over the unit's weights W_ij of |W_ij| ||x_j||_2, ||x_j|| = the input column j's
    norm over the calibration tokens (sqrt of ``in_sumsq`` for q/k/v and gate/up, of ``out_sumsq``
    for the o / down columns). Structured Wanda (Sun et al., ICLR 2024) as defined by FLAP (An et
    al., AAAI 2024), which scores only the o/down columns; moeprune sums over the whole coupled unit."""
    in_norm = inputs.stat("in_sumsq").sqrt()
    out_norm = inputs.stat("out_sumsq").sqrt()
    rows = {n: inputs.weights[n].double().abs() @ in_norm for n in _in_names(inputs)}
    return per_unit(inputs, rows, (_out(inputs).abs() * out_norm[None, :]).sum(dim=0))


def fluctuation(total: torch.Tensor, total_sq: torch.Tensor, tokens: torch.Tensor | float) -> torch.Tensor:
    """Sample variance over N tokens from sums: (sum x^2 - (sum x)^2 / N) / (N - 1) (0 for N <= 1)."""
    n = float(tokens)
    if n <= 1:
        return torch.zeros_like(total, dtype=torch.float64)
    return ((total_sq.double() - total.double().square() / n) / (n - 1)).clamp(min=0.0)


def flap_channel_scores(inputs: UnitInputs) -> torch.Tensor:
    """FLAP's fluctuation metric of every input channel c of the output projection W_out:
    S_c = Var_tokens(x_c) ||W_out[:, c]||^2 (An et al., 'Fluctuation-based Adaptive Structured
    Pruning for Large Language Models', AAAI 2024, https://arxiv.org/abs/2312.11983)."""
    var = fluctuation(inputs.stat("out_sum"), inputs.stat("out_sumsq"), inputs.stat("tokens"))
    return var * _out(inputs).square().sum(dim=0)


def flap_scores(inputs: UnitInputs) -> torch.Tensor:
    """FLAP per unit: a channel's S_c; a KV group: the mean of S_c over its heads' channels (FLAP
    scores a head by the mean of its channels). Raw scores: the planner standardises them per layer
    and unit type before one global threshold."""
    channel = flap_channel_scores(inputs)
    if inputs.kind == CHANNELS:
        return channel
    return channel.reshape(inputs.num_kv_heads, -1).mean(dim=1)


def taylor_saliency(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """LLM-Pruner's first-order element saliency |w * dL/dw| (float64, same shape as ``weight``)."""
    return (weight.double() * grad.double()).abs()


def taylor_unit_scores(weights: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor], units) -> torch.Tensor:
    """First-order Taylor score of coupled units (LLM-Pruner, Ma et al., 'LLM-Pruner: On the Structural
    Pruning of Large Language Models', NeurIPS 2023, https://arxiv.org/abs/2305.11627):

        S_u = sum over the elements w of unit u of |w * dL/dw|

    (the element saliency W * dL/dW, first order, summed in absolute value over the coupled group).
    ``units``: :class:`moeprune.units.Unit` objects whose slices name tensors of ``weights`` / ``grads``
    (``dL/dW`` over the whole calibration set); a slice takes the entries ``index`` along ``dim`` (all
    of the tensor when ``dim`` is None). Returns float64 ``[len(units)]``."""
    scores = torch.zeros(len(units), dtype=torch.float64)
    groups: dict[tuple, tuple[list[int], list[int]]] = {}
    for u, unit in enumerate(units):
        for piece in unit.slices:
            ids, positions = groups.setdefault((piece.ref, piece.dim), ([], []))
            index = (0,) if piece.dim is None else piece.index
            ids.extend([u] * len(index))
            positions.extend(index)
    for (ref, dim), (ids, positions) in groups.items():
        if ref not in weights or ref not in grads:
            raise StatsError(f"no weight or gradient of {ref} for its Taylor score")
        saliency = taylor_saliency(weights[ref], grads[ref]).cpu()
        per_position = (saliency.sum().reshape(1) if dim is None
                        else saliency.movedim(dim, 0).reshape(saliency.shape[dim], -1).sum(dim=1))
        scores.index_add_(0, torch.tensor(ids, dtype=torch.long), per_position[torch.tensor(positions, dtype=torch.long)])
    return scores


def taylor_scores(inputs: UnitInputs) -> torch.Tensor:
    """LLM-Pruner's first-order Taylor score of each unit, S_u = sum over u's weights of |w * dL/dw|
    (:func:`taylor_unit_scores`, NeurIPS 2023, https://arxiv.org/abs/2305.11627), read from the
    ``taylor`` statistics (:mod:`moeprune.observe.taylor`), which the backward pass computes."""
    if "taylor" not in inputs.stats:
        raise StatsError(f"layer {inputs.layer}: the statistics lack the Taylor saliencies of these units; collect "
                         "them with the 'taylor' observer (moeprune prune --method taylor --data FILE does, or "
                         "api.collect(..., observers=['taylor']), which runs the layer-by-layer backward pass)")
    scores = inputs.stats["taylor"].double().reshape(-1)
    if scores.numel() != inputs.num_units:
        raise StatsError(f"layer {inputs.layer}: {scores.numel()} Taylor scores for {inputs.num_units} units; the "
                         "statistics belong to another model")
    return scores


def dense_random_scores(inputs: UnitInputs) -> torch.Tensor:
    """Uniform random scores, seeded by (seed, layer): the random baseline at the same budget."""
    generator = torch.Generator().manual_seed(int(inputs.seed) * 1_000_003 + int(inputs.layer))
    return torch.rand(inputs.num_units, generator=generator, dtype=torch.float64)


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """(s - mean) / std over one layer's units (FLAP's per-layer standardisation; std unbiased,
    0 scores when every unit scores the same)."""
    scores = scores.double()
    if scores.numel() < 2:
        return torch.zeros_like(scores)
    std = scores.std()
    return torch.zeros_like(scores) if std == 0 else (scores - scores.mean()) / std


def removed_channels(inputs: UnitInputs, removed_units, channels: int) -> list[int]:
    """Input channels of the output projection (``channels`` wide) that removing ``removed_units``
    takes away (a KV group: the channels of its query heads)."""
    if inputs.kind == CHANNELS:
        return sorted(int(u) for u in removed_units)
    width = channels // inputs.num_kv_heads
    return [u * width + c for u in sorted(int(u) for u in removed_units) for c in range(width)]


def flap_bias(weight_out: torch.Tensor, channel_mean: torch.Tensor, removed: list[int]) -> torch.Tensor:
    """FLAP's bias compensation: b = W_out[:, R] mean(x_R), the mean contribution of the removed
    channels R, added to the output projection's bias so the pruned layer outputs, on average, what
    the full one did (the removed inputs replaced by their calibration mean). float64 [H]."""
    if not removed:
        return torch.zeros(weight_out.shape[0], dtype=torch.float64)
    index = torch.tensor(removed, dtype=torch.long)
    return weight_out.double()[:, index] @ channel_mean.double()[index]


# -- layer drop -------------------------------------------------------------------------------------

def angular_run_distances(dense: Mapping[int, Mapping[str, torch.Tensor]], depth: int) -> dict[int, float]:
    """Mean angular distance d(l, n) = mean over sequences of arccos(cos(x_l, x_{l+n})) / pi of every
    run of ``depth`` = n layers starting at l (Gromov et al., 'The Unreasonable Ineffectiveness of
    the Deeper Layers', 2024, https://arxiv.org/abs/2403.17887); runs without data are left out."""
    out = {}
    for layer, entries in sorted(dense.items()):
        if "angular_sum" not in entries:
            raise StatsError("the statistics lack angular distances; collect them with the 'angular' observer")
        if depth > entries["angular_sum"].numel():
            raise StatsError(f"the statistics hold angular distances of runs up to {entries['angular_sum'].numel()} "
                             f"layers, not {depth}; re-collect with a larger max_depth")
        count = float(entries["angular_count"][depth - 1])
        if count > 0:
            out[layer] = float(entries["angular_sum"][depth - 1]) / count
    return out


def best_run(distances: Mapping[int, float]) -> int:
    """The run start with the smallest distance (the lowest start on ties)."""
    if not distances:
        raise PlanError("no run of that many layers fits in the model")
    return min(distances, key=lambda start: (distances[start], start))


def replaceme_transform(mtm: torch.Tensor, mtr: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """ReplaceMe's linear map T [H, H] = argmin ||M T - (h_end - y)||^2 + alpha ||T||^2
    = (M^T M + alpha I)^-1 M^T (h_end - y), in float64, with alpha = ``ridge`` x mean(diag(M^T M))
    (Shopkhoev et al., 'ReplaceMe: Network Simplification via Layer Pruning and Linear
    Transformations', 2025, https://arxiv.org/abs/2505.02819)."""
    mtm, mtr = mtm.double(), mtr.double()
    alpha = ridge * float(mtm.diagonal().mean()) if mtm.numel() else 0.0
    return torch.linalg.solve(mtm + alpha * torch.eye(mtm.shape[0], dtype=torch.float64), mtr)


def replaceme_residual(mtm: torch.Tensor, mtr: torch.Tensor, rr: torch.Tensor, transform: torch.Tensor) -> float:
    """sum ||M T - (h_end - y)||^2 = rr - 2 tr(T^T M^T r) + tr(T^T M^T M T), from the sums alone."""
    t = transform.double()
    return float(rr) - 2 * float((t * mtr.double()).sum()) + float((t * (mtm.double() @ t)).sum())

