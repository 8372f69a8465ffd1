"""The Python API: the same verbs as the CLI (inspect, collect, super_experts, prune, apply).

Every function validates its inputs before any heavy work and raises a
:class:`~moeprune.errors.MoePruneError` with a message that says how to fix the problem.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .apply import write_pruned_checkpoint
from .arch import Family, build_skeleton, family_for_model_type, moe_layer_indices, read_config
from .calibration.data import CalibrationBatch, is_pretokenized, load_calibration, load_pretokenized, resolve_text_sizes
from .calibration.distributed import is_writer
from .calibration.engine import collect_stats
from .errors import DataError, MoePruneError, OutputExistsError
from .geometry import MoEGeometry
from .io.checkpoint import LazyCheckpoint
from .io.output import check_output
from .layout import CheckpointLayout
from .observe import observers_for_entries
from .plan import Plan, build_plan, resolve_budget, validate_budget, validate_plan
from .methods import get_method
from .scoring import score_layers
from .stats import RouterStats
from .super_experts import SuperExpertReport, detect_super_experts

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """A checkpoint's family, expert geometry and fingerprint, read without loading weights."""

    model_dir: Path
    config: object
    family: Family
    geometry: MoEGeometry
    fingerprint: str


def model_info(model_dir: str | Path) -> ModelInfo:
    """Family, expert layers and fingerprint of a local checkpoint (meta-device skeleton only)."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    family = family_for_model_type(config.model_type)
    skeleton = build_skeleton(config)
    geometry = family.geometry(config, moe_layer_indices(family, skeleton))
    return ModelInfo(model_dir, config, family, geometry, LazyCheckpoint(model_dir).fingerprint())


def inspect(model_dir: str | Path) -> dict:
    """Family, layers, experts, routing rule and sizes of a checkpoint, as a plain dict."""
    info = model_info(model_dir)
    checkpoint = LazyCheckpoint(info.model_dir)
    geometry = info.geometry
    layout = CheckpointLayout.build(info.family, checkpoint, geometry.moe_layers)
    expert_bytes = sum(layout.expert_nbytes(layer) for layer in geometry.moe_layers)
    total = checkpoint.total_bytes()
    params = info.family.routing_params(info.config)
    return {
        "model_dir": str(info.model_dir),
        "family": info.family.name,
        "model_type": geometry.model_type,
        "routing": info.family.description,
        "routing_rule": params.rule,
        "renormalize": params.renormalize,
        "num_hidden_layers": geometry.num_hidden_layers,
        "moe_layers": list(geometry.moe_layers),
        "num_experts": geometry.num_experts,
        "top_k": geometry.top_k,
        "n_group": geometry.n_group,
        "topk_group": geometry.topk_group,
        "shared_experts": geometry.has_shared_experts,
        "weights_bytes": total,
        "routed_expert_bytes": expert_bytes,
        "routed_expert_fraction": expert_bytes / total if total else 0.0,
        "shards": len(checkpoint.shard_files()),
        "fingerprint": info.fingerprint,
    }


def load_tokenizer(model_dir: str | Path, needed_for: str):
    """The checkpoint's own tokenizer (local files only); a MoePruneError ending in ``needed_for``
    (how to fix it) when it cannot be loaded."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/... for a missing tokenizer
        raise MoePruneError(f"cannot load the tokenizer of {model_dir}: {exc}; {needed_for}") from exc


def calibration_data(
    model_dir: str | Path,
    data: str | Path,
    *,
    samples: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
    chat_template: bool = False,
    text_field: str = "text",
) -> CalibrationBatch:
    """Calibration tokens of a local data file.

    A ``.safetensors`` file is pre-tokenized data, used row for row (``samples``/``seq_len``, when
    given, must match its shape; see :func:`~moeprune.calibration.data.load_pretokenized`). Any other
    file is tokenized and packed with the model's own tokenizer: ``samples`` x ``seq_len`` tokens
    (default 64 x 512).
    """
    if is_pretokenized(data):
        if chat_template:
            raise DataError(f"{data} is pre-tokenized: a chat template cannot be applied to it; drop --chat-template")
        return load_pretokenized(data, samples, seq_len, vocab_size=getattr(read_config(model_dir), "vocab_size", None))
    samples, seq_len = resolve_text_sizes(samples, seq_len)
    tokenizer = load_tokenizer(model_dir, "the checkpoint folder must contain its tokenizer files "
                                          "(tokenizer.json / tokenizer_config.json)")
    return load_calibration(
        data, tokenizer, seq_len=seq_len, samples=samples, seed=seed, chat_template=chat_template, text_field=text_field
    )


def collect(
    model_dir: str | Path,
    data: str | Path | None = None,
    *,
    calibration: CalibrationBatch | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    samples: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
    chat_template: bool = False,
    text_field: str = "text",
    batch_size: int = 4,
    mode: str = "sequential",
    tcess_pool: int | None = None,
    tcess_r: float | None = None,
    offload_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    observers: list[str] | tuple[str, ...] | None = None,
    progress: bool = True,
) -> RouterStats:
    """Calibration statistics of every MoE layer in one pass; saved to ``out`` when given.

    ``observers`` (None: all), ``device`` and ``dtype`` as in
    :func:`~moeprune.calibration.engine.collect_stats`. Under torchrun the pass is data-parallel;
    every rank returns the statistics, rank 0 alone writes ``out``.
    """
    if (data is None) == (calibration is None):
        raise MoePruneError("pass exactly one of data (a local text/jsonl/parquet/safetensors file) or calibration")
    if out is not None:
        out = Path(out)
        if out.exists() and not overwrite:
            raise OutputExistsError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    if calibration is None:
        calibration = calibration_data(
            model_dir, data, samples=samples, seq_len=seq_len, seed=seed, chat_template=chat_template, text_field=text_field
        )
    stats = collect_stats(
        model_dir, calibration, mode=mode, batch_size=batch_size, tcess_pool=tcess_pool, tcess_r=tcess_r,
        offload_dir=offload_dir, device=device, dtype=dtype, observers=observers, progress=progress,
    )
    if data is not None:
        stats.metadata["data_file"] = str(data)
    if out is not None and is_writer():  # data-parallel (torchrun): rank 0 alone writes
        stats.save(out)
    return stats


def super_experts(model_dir: str | Path, stats: RouterStats) -> SuperExpertReport:
    """Super experts of a model from its statistics (METHODS.md's rule)."""
    info = model_info(model_dir)
    stats.check_model(info.fingerprint)
    return detect_super_experts(stats, info.geometry)


def plan_pruning(
    model_dir: str | Path,
    *,
    method: str,
    ratio: float | None = None,
    keep: int | None = None,
    per_layer: dict | None = None,
    stats: RouterStats | None = None,
    protect_super_experts: bool = True,
    collapse_groups: bool = False,
    seed: int = 0,
) -> Plan:
    """Score experts with ``method`` (:mod:`moeprune.methods`) and choose which to keep at the budget.

    ``stats`` may be None only for a method that needs no statistics (``random``); its scores then
    come from the same scorer without statistics (no super-expert protection: nothing detects them).
    """
    info = model_info(model_dir)
    spec = get_method(method)
    spec.check_implemented()
    kept_counts = resolve_budget(info.geometry, ratio=ratio, keep=keep, per_layer=per_layer, collapse_groups=collapse_groups)
    validate_budget(info.geometry, kept_counts, collapse_groups=collapse_groups)
    protected = {}
    if stats is None:
        if spec.needs_stats:
            raise MoePruneError(f"method {method!r} needs calibration statistics: pass --data FILE or --stats STATS")
        layer_stats = {layer: {} for layer in info.geometry.moe_layers}
    else:
        stats.check_model(info.fingerprint)
        layer_stats = stats.layers
        if protect_super_experts:
            protected = detect_super_experts(stats, info.geometry).routed_by_layer()
    scores = score_layers(spec.name, layer_stats, seed=seed, num_experts=info.geometry.num_experts)
    plan = build_plan(
        info.geometry, scores, method=method, ratio=ratio, keep=keep, per_layer=per_layer,
        protected=protected, collapse_groups=collapse_groups, model_fingerprint=info.fingerprint,
    )
    if stats is not None:
        plan.calibration = {
            key: stats.metadata.get(key) for key in ("data_hash", "samples", "seq_len", "num_tokens", "data_file")
        }
    return plan


def statistics_for(method: str, protect_super_experts: bool = True) -> tuple[str, ...]:
    """The observers a calibration pass for ``method`` needs: the entries its registry entry reads
    (:mod:`moeprune.methods`: required and optional), plus the output peaks super-expert protection
    reads."""
    spec = get_method(method)
    entries = [*spec.requires, *spec.optional]
    if protect_super_experts:
        entries += ["max_abs_output", "shared_max_abs_output"]
    return observers_for_entries(entries)


def prune(
    model_dir: str | Path,
    out: str | Path,
    *,
    method: str,
    ratio: float | None = None,
    keep: int | None = None,
    per_layer: dict | None = None,
    data: str | Path | None = None,
    stats: str | Path | RouterStats | None = None,
    overwrite: bool = False,
    protect_super_experts: bool = True,
    collapse_groups: bool = False,
    seed: int = 0,
    samples: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 4,
    chat_template: bool = False,
    text_field: str = "text",
    mode: str = "sequential",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
) -> Plan:
    """Collect (or load) statistics, score, plan, and write a pruned vanilla checkpoint to ``out``.

    With ``data``, the calibration pass runs only the observers ``method`` needs
    (:func:`statistics_for`), on ``device`` in ``dtype`` (see
    :func:`~moeprune.calibration.engine.collect_stats`). Under torchrun the pass is data-parallel;
    every rank returns the plan, rank 0 alone writes the checkpoint.
    """
    check_output(out, overwrite)
    if data is not None and stats is not None:
        raise MoePruneError("pass either --data or --stats, not both")
    info = model_info(model_dir)
    get_method(method).check_implemented()
    validate_budget(info.geometry, resolve_budget(info.geometry, ratio=ratio, keep=keep, per_layer=per_layer,
                                                  collapse_groups=collapse_groups), collapse_groups=collapse_groups)
    if isinstance(stats, (str, Path)):
        stats = RouterStats.load(stats)
    if stats is not None:
        stats.check_model(info.fingerprint)
    elif data is not None:
        stats = collect(model_dir, data, samples=samples, seq_len=seq_len, seed=seed, batch_size=batch_size,
                        chat_template=chat_template, text_field=text_field, mode=mode, device=device, dtype=dtype,
                        observers=statistics_for(method, protect_super_experts), progress=progress)
    plan = plan_pruning(model_dir, method=method, ratio=ratio, keep=keep, per_layer=per_layer, stats=stats,
                        protect_super_experts=protect_super_experts, collapse_groups=collapse_groups, seed=seed)
    description = str(data) if data is not None else (stats.metadata.get("data_file", "") if stats else f"none ({method})")
    if not is_writer():  # data-parallel (torchrun): every rank plans, rank 0 alone writes
        return plan
    write_pruned_checkpoint(model_dir, plan, out, overwrite=overwrite, data_description=description, progress=progress)
    return plan


def apply(model_dir: str | Path, plan: str | Path | Plan, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Write the checkpoint a saved plan describes (streaming, one tensor at a time)."""
    check_output(out, overwrite)
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    info = model_info(model_dir)
    validate_plan(plan, info.geometry, fingerprint=info.fingerprint)
    return write_pruned_checkpoint(model_dir, plan, out, overwrite=overwrite, progress=progress)
