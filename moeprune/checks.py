"""Checks that run before any heavy work, so that bad input fails in a second with one clear error.

* :func:`check_config_file`: config.json exists, is JSON, is an object and names a ``model_type``.
* :func:`check_checkpoint`: every tensor the layout reads (routers, routed experts) has the shape the
  config implies (shard headers covering their files is checked by
  :class:`~moeprune.io.checkpoint.LazyCheckpoint` itself). Uses :mod:`moeprune.layout` read-only.
* :func:`check_output_writable`: an output location may be written (refusals of
  :func:`~moeprune.io.output.check_output`, then a probe file actually created and removed).
* :func:`check_number`: a numeric API argument has the right type and range.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import CheckpointError, MoePruneError
from .io.checkpoint import read_config_json
from .io.output import _nearest_existing, check_output

logger = logging.getLogger(__name__)

_HINT = "the checkpoint does not match its config.json (re-download or re-save it)"


def check_config_file(model_dir: str | Path) -> dict:
    """The parsed config.json of ``model_dir``; CheckpointError unless it is a JSON object with a
    string ``model_type`` (a missing config.json: {}, explained later by ``arch.read_config``)."""
    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist; check the path" if not folder.exists() else
                              f"{folder} is a file, not a checkpoint folder; pass the folder with its config.json")
    value = read_config_json(folder)
    if value is None:
        return {}
    if not isinstance(value.get("model_type"), str):
        raise CheckpointError(f"{Path(model_dir) / 'config.json'} has no \"model_type\" string; is this a Hugging Face "
                              "checkpoint folder?")
    return value


def _expect(name: str, shape: tuple[int, ...], expected: tuple[int, ...], why: str) -> None:
    if tuple(shape) != tuple(expected):
        raise CheckpointError(f"tensor {name!r} has shape {list(shape)}, but {why} implies {list(expected)}; {_HINT}")


def expected_expert_shape(proj: str, inter: int, hidden: int) -> tuple[int, ...]:
    """Canonical (``nn.Linear``) shape of projection ``proj`` of one expert of width ``inter``."""
    return {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter),
            "gate_bias": (inter,), "up_bias": (inter,), "down_bias": (hidden,)}[proj]


def check_checkpoint(checkpoint, family, config, geometry):
    """The :class:`~moeprune.layout.CheckpointLayout` of ``checkpoint``, after checking every router
    and routed-expert tensor against the config: E experts per MoE layer, router weights [E, H] and
    router biases [E], experts of width I (the family's ``expert_width`` key) and hidden size H, per
    expert or fused (:meth:`~moeprune.layout.FusedFormat.block_shape`). CheckpointError names the
    first tensor that differs, its shape and the expected one. Headers only: no weight is read.
    """
    from .structure import SECTION

    try:
        return _check_checkpoint(checkpoint, family, config, geometry)
    except CheckpointError as exc:
        if not getattr(config, SECTION, None):
            raise
        raise CheckpointError(f"{exc}. Its config.json has a {SECTION!r} section (structure for moeprune.load, e.g. "
                              "per-layer expert counts) that this check does not read: moeprune cannot take such an "
                              "output as its input yet; start from the original checkpoint") from None


def _check_checkpoint(checkpoint, family, config, geometry):
    from .layout import CheckpointLayout

    layout = CheckpointLayout.build(family, checkpoint, geometry.moe_layers)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    width_key = family.spec["config"].get("router_width")  # ZAYA: the router's last linear reads router_hidden_size
    router_width = int(getattr(config, width_key, 0) or 0) if width_key else hidden
    for layer in geometry.moe_layers:
        entry = layout.layers[layer]
        experts = geometry.experts_in(layer)
        tail = family.router_tail(config)  # LongCat-Flash's identity / Inkling's shared experts: rows after the routed
        rows = experts + tail
        tail_keys = set(layout.family.router_tail_keys(layer))
        for name in entry.router:
            shape = tuple(checkpoint.shape(name))
            count = rows if name in tail_keys else experts
            why = (f"config.json ({experts} experts{f' + {tail} after them' if count > experts else ''}, "
                   f"{f'{width_key} {router_width}' if width_key else f'hidden size {hidden}'})")
            expected = (count, router_width) if len(shape) == 2 or name.endswith(".weight") else (count,)
            axis = layout.family.router_axis(name)
            if axis:  # experts along another axis (ERNIE-4.5's [1, E] correction bias): only that axis is known
                expected = shape[:axis] + (experts,) + shape[axis + 1:]
            _expect(name, shape, expected, why)
        if layout.family.identity_experts and sorted(entry.identity) != list(range(experts, rows)):
            raise CheckpointError(f"MoE layer {layer} of {checkpoint.path} stores identity experts {sorted(entry.identity)}, "
                                  f"but config.json implies {list(range(experts, rows))}; {_HINT}")
        if entry.per_expert:
            if sorted(entry.per_expert) != list(range(experts)):
                found = sorted(entry.per_expert)
                raise CheckpointError(f"MoE layer {layer} of {checkpoint.path} stores experts {found[0]}..{found[-1]} "
                                      f"({len(found)}), but config.json says {experts}; {_HINT}")
            for expert, files in entry.per_expert.items():
                inter = geometry.width_of(layer, expert) or checkpoint.shape(files["up"])[0]
                for proj, name in files.items():
                    _expect(name, checkpoint.shape(name), expected_expert_shape(proj, inter, hidden),
                            f"config.json (expert width {inter}, hidden size {hidden})")
        else:
            fmt, prefix = layout.family.disk, layout.family.disk_experts_prefix(layer)
            inter = geometry.expert_width or layout.expert_width(layer, 0)
            for name in entry.fused:
                _expect(name, checkpoint.shape(name), fmt.block_shape(name[len(prefix):], experts, inter, hidden),
                        f"config.json ({experts} experts of width {inter}, hidden size {hidden})")
    return layout


def check_output_writable(out: str | Path, overwrite: bool = False, *, protect: Iterable[str | Path] = ()) -> Path:
    """:func:`~moeprune.io.output.check_output`, then prove the location writable by creating and
    removing a probe file in the nearest existing folder (permissions, read-only filesystems, full
    disks); a MoePruneError names the path and the reason. Returns ``out`` as an absolute Path."""
    out = check_output(out, overwrite, protect=protect)
    base = _nearest_existing(out.parent)
    try:
        fd, probe = tempfile.mkstemp(prefix=".moeprune-probe-", dir=base)
        try:
            os.write(fd, b"\0")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise MoePruneError(f"cannot write {out}: {exc.strerror or exc} in {base}; choose another --out") from None
    return out


def check_number(name: str, value, *, minimum: float | None = None, maximum: float | None = None,
                 integer: bool = True, optional: bool = True):
    """``value`` unchanged when it is a number of the right kind in range; a MoePruneError naming
    ``name`` otherwise (a bool, a string or a float where an integer belongs are refused)."""
    if value is None and optional:
        return value
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an integer" if integer else "a number"
        raise MoePruneError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    if not integer and not math.isfinite(float(value)):
        raise MoePruneError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise MoePruneError(f"{name} must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise MoePruneError(f"{name} must be <= {maximum}, got {value!r}")
    return value


def check_stats_fit(stats, geometry) -> None:
    """StatsError unless ``stats`` holds exactly the model's MoE layers, each entry sized for its
    expert count (:func:`~moeprune.stats.check_entry_shapes`)."""
    from .errors import StatsError
    from .stats import check_entry_shapes

    if sorted(stats.layers) != sorted(geometry.moe_layers):
        raise StatsError(f"the statistics cover MoE layers {sorted(stats.layers)}, the model has {list(geometry.moe_layers)}; "
                         "collect statistics for this checkpoint with `moeprune collect`")
    for layer, entries in stats.layers.items():
        check_entry_shapes(entries, f"statistics of layer {layer}", geometry.experts_in(layer))


def check_plan_complete(plan, geometry) -> None:
    """PlanError when a plan that keeps experts omits a MoE layer and so would write a checkpoint
    transformers cannot load.

    An omitted MoE layer keeps all its experts; a vanilla config holds one expert count per model,
    so that is accepted only when every listed layer keeps all of its experts too (counts stay
    uniform); otherwise the plan is refused, naming the omitted layers.
    """
    from .errors import PlanError

    if not plan.layers:
        return
    dropped = {layer for layer, actions in plan.actions.items() if any(a.op == "drop_layer" for a in actions)}
    omitted = [layer for layer in geometry.moe_layers if layer not in plan.layers and layer not in dropped]
    counts = {len(kept) for kept in plan.layers.values()}
    if omitted and counts != {geometry.experts_in(omitted[0])}:
        raise PlanError(f"the plan keeps {sorted(counts)} experts in its layers but omits MoE layer(s) {omitted}, which "
                        f"would keep all {geometry.experts_in(omitted[0])}; a transformers checkpoint holds one expert "
                        "count per model: list every MoE layer in the plan")
