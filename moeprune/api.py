"""The Python API: the same verbs as the CLI (inspect, collect, super_experts, prune, apply).

Every function validates its inputs before any heavy work and raises a
:class:`~moeprune.errors.MoePruneError` with a message that says how to fix the problem.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .apply import write_pruned_checkpoint
from .arch import Family, build_skeleton, family_for_model_type, moe_layer_indices, read_config, text_config_of
from .calibration.data import (DEFAULT_SEQ_LEN, CalibrationBatch, check_seq_len_fits, is_pretokenized, load_calibration,
                               load_pretokenized, resolve_text_sizes, tokenizer_files)
from .calibration.distributed import is_writer
from .calibration.engine import collect_stats
from .checks import (check_checkpoint, check_config_file, check_number, check_output_writable, check_plan_complete,
                     check_stats_fit)
from .errors import DataError, MoePruneError
from .geometry import MoEGeometry
from .io.checkpoint import LazyCheckpoint
from .layout import CheckpointLayout
from .observe import DenseSettings, check_observers_fit, dense_settings_for, observers_for_entries
from .plan import Plan, build_plan, resolve_budget, validate_budget, validate_plan
from .plan import combined as combined_budgets
from .methods import get_method
from .scoring import score_layers
from .skipping import betas_from_stats, skip_section
from .observe.skip import check_skip_top_k
from .stats import RouterStats
from .super_experts import SuperExpertReport, detect_super_experts

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """A checkpoint's family, expert geometry and fingerprint, read without loading weights, and its
    checked tensor layout (headers only)."""

    model_dir: Path
    config: object
    family: Family
    geometry: MoEGeometry
    fingerprint: str
    layout: CheckpointLayout


def model_info(model_dir: str | Path) -> ModelInfo:
    """Family, expert layers and fingerprint of a local checkpoint (meta-device skeleton only)."""
    model_dir = Path(model_dir)
    check_config_file(model_dir)
    full_config = read_config(model_dir)
    family = family_for_model_type(full_config.model_type)
    config = family.text_config(full_config)  # a multimodal wrapper: its text decoder's config (the MoE keys)
    skeleton = build_skeleton(config)
    geometry = family.geometry(full_config, moe_layer_indices(family, skeleton))
    checkpoint = LazyCheckpoint(model_dir)  # refuses shards whose header does not cover the file
    layout = check_checkpoint(checkpoint, family, config, geometry)
    return ModelInfo(model_dir, config, family, geometry, checkpoint.fingerprint(), layout)


def inspect(model_dir: str | Path) -> dict:
    """Family, layers, experts, routing rule and sizes of a checkpoint, as a plain dict."""
    info = model_info(model_dir)
    layout, geometry = info.layout, info.geometry
    checkpoint = layout.checkpoint
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


#: The tokenizer folder :func:`load_tokenizer` uses when its caller passes none (:func:`using_tokenizer`).
_TOKENIZER_DIR: contextvars.ContextVar[str | None] = contextvars.ContextVar("moeprune_tokenizer_dir", default=None)


@contextlib.contextmanager
def using_tokenizer(tokenizer: str | Path | None) -> Iterator[None]:
    """Within the ``with`` body, :func:`load_tokenizer` reads ``tokenizer`` (a folder) instead of the
    checkpoint's own tokenizer files (None: no change). For verbs whose signature has no
    ``tokenizer=`` argument (profile build and match)."""
    token = _TOKENIZER_DIR.set(str(tokenizer) if tokenizer is not None else _TOKENIZER_DIR.get())
    try:
        yield
    finally:
        _TOKENIZER_DIR.reset(token)


def load_tokenizer(model_dir: str | Path, needed_for: str, tokenizer: str | Path | None = None):
    """The tokenizer of ``tokenizer`` (a folder; default: the checkpoint folder, local files only).

    A folder without tokenizer files is a MoePruneError that names it and offers ``--tokenizer DIR``;
    a tokenizer that fails to load is a MoePruneError ending in ``needed_for`` (how to fix it).
    """
    from transformers import AutoTokenizer

    source = Path(tokenizer if tokenizer is not None else _TOKENIZER_DIR.get() or model_dir).expanduser()
    if not source.is_dir():
        raise MoePruneError(f"tokenizer folder {source} does not exist; pass --tokenizer DIR (a folder with "
                            "tokenizer.json / tokenizer_config.json)")
    if not tokenizer_files(source):
        raise MoePruneError(f"{source} has no tokenizer files (tokenizer.json, tokenizer_config.json, tokenizer.model, "
                            "vocab.json); copy the model's tokenizer there or pass --tokenizer DIR (tokenizer= in the "
                            "API) with the folder that holds it")
    try:
        return AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/... for a broken tokenizer
        raise MoePruneError(f"cannot load the tokenizer of {source}: {exc}; {needed_for}, or pass --tokenizer DIR") from exc


def default_seq_len(config) -> int:
    """The default calibration length: 512 tokens, or the model's max_position_embeddings when shorter."""
    limit = int(getattr(config, "max_position_embeddings", 0) or 0)
    return min(DEFAULT_SEQ_LEN, limit) if limit > 0 else DEFAULT_SEQ_LEN


def _check_data_numbers(samples, seq_len, seed, batch_size) -> None:
    """MoePruneError unless the calibration sizes are integers in range (before any work)."""
    check_number("samples", samples, minimum=1)
    check_number("seq_len", seq_len, minimum=2)
    check_number("seed", seed, minimum=0, optional=False)
    check_number("batch_size", batch_size, minimum=1, optional=False)


def calibration_data(
    model_dir: str | Path,
    data: str | Path,
    *,
    samples: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
    chat_template: bool = False,
    text_field: str = "text",
    tokenizer: str | Path | None = None,
) -> CalibrationBatch:
    """Calibration tokens of a local data file.

    A ``.safetensors`` file is pre-tokenized data, used row for row (``samples``/``seq_len``, when
    given, must match its shape; see :func:`~moeprune.calibration.data.load_pretokenized`). Any other
    file is tokenized and packed with the model's own tokenizer (or the one in the folder
    ``tokenizer``): ``samples`` x ``seq_len`` tokens (default 64 x 512). A ``seq_len`` beyond the
    model's ``max_position_embeddings`` is a DataError (the default is clamped to it).
    """
    _check_data_numbers(samples, seq_len, seed, 1)
    config = text_config_of(read_config(model_dir))
    if is_pretokenized(data):
        if chat_template:
            raise DataError(f"{data} is pre-tokenized: a chat template cannot be applied to it; drop --chat-template")
        batch = load_pretokenized(data, samples, seq_len, vocab_size=getattr(config, "vocab_size", None))
        check_seq_len_fits(batch.seq_len, getattr(config, "max_position_embeddings", None))
        return batch
    samples, seq_len = resolve_text_sizes(samples, default_seq_len(config) if seq_len is None else seq_len)
    check_seq_len_fits(seq_len, getattr(config, "max_position_embeddings", None))
    tokenizer = load_tokenizer(model_dir, "the checkpoint folder must contain its tokenizer files "
                                          "(tokenizer.json / tokenizer_config.json)", tokenizer)
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
    tokenizer: str | Path | None = None,
    progress: bool = True,
    dense: DenseSettings | None = None,
) -> RouterStats:
    """Calibration statistics of every MoE layer in one pass; saved to ``out`` when given.

    ``observers`` (None: all), ``device`` and ``dtype`` as in
    :func:`~moeprune.calibration.engine.collect_stats`. The checkpoint and ``out`` are checked
    before calibration starts. Under torchrun the pass is data-parallel; every rank returns the
    statistics, rank 0 alone writes ``out``. ``dense``: settings of the dense observers (angular
    depth, ReplaceMe depth and cuts; :class:`moeprune.observe.DenseSettings`).
    """
    if (data is None) == (calibration is None):
        raise MoePruneError("pass exactly one of data (a local text/jsonl/parquet/safetensors file) or calibration")
    _check_data_numbers(samples, seq_len, seed, batch_size)
    check_number("tcess_pool", tcess_pool, minimum=1)
    check_number("tcess_r", tcess_r, minimum=0.0, maximum=1.0, integer=False)
    if out is not None:
        out = check_output_writable(out, overwrite)
    if offload_dir is not None and Path(offload_dir).exists() and not Path(offload_dir).is_dir():
        raise MoePruneError(f"--offload-dir {offload_dir} is a file; pass a folder (it is created when missing)")
    info = model_info(model_dir)  # config, shard headers and tensor shapes, before any weight is read
    if observers is not None:
        check_observers_fit(observers, info.geometry)  # e.g. NAEE's E <= 16, dynamic skipping's top-2
    if calibration is None:
        calibration = calibration_data(
            model_dir, data, samples=samples, seq_len=seq_len, seed=seed, chat_template=chat_template, text_field=text_field,
            tokenizer=tokenizer,
        )
    stats = collect_stats(
        model_dir, calibration, mode=mode, batch_size=batch_size, tcess_pool=tcess_pool, tcess_r=tcess_r,
        offload_dir=offload_dir, device=device, dtype=dtype, observers=observers, progress=progress, dense=dense,
    )
    if data is not None:
        stats.metadata["data_file"] = str(data)
    if out is not None and is_writer():  # data-parallel (torchrun): rank 0 alone writes
        stats.save(out, overwrite=overwrite)
    return stats


def _stats_of(stats: str | Path | RouterStats | None, info: ModelInfo) -> RouterStats | None:
    """Statistics (loaded when given as a path), checked against the model: fingerprint, layers and
    every entry's length."""
    if stats is None:
        return None
    if isinstance(stats, (str, Path)):
        stats = RouterStats.load(stats)
    if not isinstance(stats, RouterStats):
        raise MoePruneError(f"stats must be a RouterStats or the path of a statistics file, got {type(stats).__name__}")
    stats.check_model(info.fingerprint)
    check_stats_fit(stats, info.geometry)
    return stats


def super_experts(model_dir: str | Path, stats: str | Path | RouterStats) -> SuperExpertReport:
    """Super experts of a model from its statistics (or their file; METHODS.md's rule)."""
    info = model_info(model_dir)
    if stats is None:
        raise MoePruneError("super_experts needs statistics: a RouterStats or the path of a statistics file")
    return detect_super_experts(_stats_of(stats, info), info.geometry)


def plan_pruning(
    model_dir: str | Path,
    *,
    method: str,
    ratio: float | None = None,
    keep: int | None = None,
    per_layer: dict | None = None,
    stats: str | Path | RouterStats | None = None,
    protect_super_experts: bool = True,
    collapse_groups: bool = False,
    seed: int = 0,
    options: dict | None = None,
) -> Plan:
    """Score experts with ``method`` (:mod:`moeprune.methods`) and choose which to keep at the budget.

    ``stats`` may be None only for a method that needs no statistics (``random``); its scores then
    come from the same scorer without statistics (no super-expert protection: nothing detects them).
    ``stats`` may also be the path of a statistics file. ``options``: the method's own options
    (``Method.options``, e.g. ``{"layout": "compact"}``); a method with a planner builds its whole plan.
    """
    _check_budget_numbers(ratio, keep, per_layer, seed)
    info = model_info(model_dir)
    stats = _stats_of(stats, info)
    spec = get_method(method)
    spec.check_implemented()
    info.family.check_method(spec.name, spec.planner if isinstance(spec.planner, str) else None)
    method_options = spec.method_options(options)
    if spec.planner is not None:
        if keep is not None or per_layer is not None:
            raise MoePruneError(f"method {method!r} takes its budget as --ratio only")
        if stats is None and spec.needs_stats:
            raise MoePruneError(f"method {method!r} needs calibration statistics: pass --data FILE or --stats STATS")
        plan = spec.plan_fn(info, stats, method=spec, ratio=ratio, seed=seed,
                            protect_super_experts=protect_super_experts, **method_options)
        return _record_calibration(plan, stats)
    kept_counts = resolve_budget(info.geometry, ratio=ratio, keep=keep, per_layer=per_layer, collapse_groups=collapse_groups)
    validate_budget(info.geometry, kept_counts, collapse_groups=collapse_groups)
    protected = {}
    if stats is None:
        if spec.needs_stats:
            raise MoePruneError(f"method {method!r} needs calibration statistics: pass --data FILE or --stats STATS")
        layer_stats = {layer: {} for layer in info.geometry.moe_layers}
    else:
        layer_stats = stats.layers
        if protect_super_experts:
            protected = detect_super_experts(stats, info.geometry).routed_by_layer()
    scores = score_layers(spec.name, layer_stats, seed=seed, num_experts=info.geometry.num_experts)
    plan = build_plan(
        info.geometry, scores, method=method, ratio=ratio, keep=keep, per_layer=per_layer,
        protected=protected, collapse_groups=collapse_groups, model_fingerprint=info.fingerprint,
    )
    return _record_calibration(plan, stats)


def _record_calibration(plan: Plan, stats: RouterStats | None) -> Plan:
    """The plan with the calibration its statistics came from (data hash, sizes, file), if any."""
    if stats is not None and not plan.calibration:
        plan.calibration = {
            key: stats.metadata.get(key) for key in ("data_hash", "samples", "seq_len", "num_tokens", "data_file")
        }
    return plan


def _check_budget_numbers(ratio, keep, per_layer, seed) -> None:
    """MoePruneError unless the budget arguments have the right types (ranges: the budget checks)."""
    check_number("ratio", ratio, integer=False)
    check_number("keep", keep)
    check_number("seed", seed, minimum=0, optional=False)
    if per_layer is not None and not isinstance(per_layer, dict):
        raise MoePruneError(f"per_layer must be a dict of layer -> kept count, got {type(per_layer).__name__}")


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
    tokenizer: str | Path | None = None,
    progress: bool = True,
    options: dict | None = None,
    dynamic_skip: bool = False,
    dense_method: str | None = None,
    dense_options: dict | None = None,
    total_ratio: float | None = None,
    expert_share: float | None = None,
    dense_ratio: float | None = None,
) -> Plan:
    """Collect (or load) statistics, score, plan, and write a pruned vanilla checkpoint to ``out``.

    A combined budget (``dense_method`` and ``total_ratio``, instead of ``ratio``/``keep``/``per_layer``):
    ``total_ratio`` of ALL the parameters removed by ``method`` (an expert or neuron method, with
    ``options``) and ``dense_method`` (with ``dense_options``, e.g. ``{"unit": "heads"}``), the dense part
    sized by ``expert_share``, ``dense_ratio`` or ``dense_options["layers"]``
    (:mod:`moeprune.plan.combined`; the plan's budget says what each part took).

    ``dynamic_skip``: also record NAEE's dynamic skipping (:mod:`moeprune.skipping`) in the output's
    config.json (applied by ``moeprune.load``; top-2 routing only); its thresholds come from the
    statistics (collected with ``data``, or a ``stats`` file collected with the ``dynamic_skip`` observer).

    With ``data``, the calibration pass runs only the observers ``method`` needs
    (:func:`statistics_for`), on ``device`` in ``dtype`` (see
    :func:`~moeprune.calibration.engine.collect_stats`); ``tokenizer``: a tokenizer folder for a
    checkpoint without one. Under torchrun the pass is data-parallel; every rank returns the plan,
    rank 0 alone writes the checkpoint.
    """
    check_output_writable(out, overwrite, protect=[model_dir])
    if data is not None and stats is not None:
        raise MoePruneError("pass either --data or --stats, not both")
    _check_budget_numbers(ratio, keep, per_layer, seed)
    _check_data_numbers(samples, seq_len, seed, batch_size)
    info = model_info(model_dir)
    spec = get_method(method)
    spec.check_implemented()
    given = spec.method_options(options)
    info.family.check_method(spec.name, spec.planner if isinstance(spec.planner, str) else None, dynamic_skip)
    combined = _combined_request(info, method, options, dense_method, dense_options, total_ratio, expert_share,
                                 dense_ratio, ratio, keep, per_layer, collapse_groups)
    if dynamic_skip:
        check_skip_top_k(info.geometry.top_k)
        if data is None and stats is None:
            raise MoePruneError("--dynamic-skip needs calibration statistics: pass --data FILE or --stats STATS")
    if combined is None and spec.planner is not None:  # (a combined request was checked whole above)
        spec.validate_request(info, ratio=ratio, options=options)
    elif combined is None:
        validate_budget(info.geometry, resolve_budget(info.geometry, ratio=ratio, keep=keep, per_layer=per_layer,
                                                      collapse_groups=collapse_groups), collapse_groups=collapse_groups)
    stats = _stats_of(stats, info)
    if stats is None and data is not None:  # a combined budget may need two passes (combined_budgets.join_passes)
        passes = [statistics_for(method, protect_super_experts)] if combined is None else combined.observer_passes(protect_super_experts)
        stats = combined_budgets.join_passes([
            collect(model_dir, data, samples=samples, seq_len=seq_len, seed=seed, batch_size=batch_size,
                    chat_template=chat_template, text_field=text_field, mode=mode, device=device, dtype=dtype,
                    observers=observers + (("dynamic_skip",) if dynamic_skip and not number else ()),
                    tokenizer=tokenizer, progress=progress,
                    dense=dense_settings_for(method, given) if combined is None else combined.dense_settings)
            for number, observers in enumerate(passes)])
    if combined is not None:
        plan = combined_budgets.plan_request(model_dir, combined, stats=stats, seed=seed,
                                             protect_super_experts=protect_super_experts)
    else:
        plan = plan_pruning(model_dir, method=method, ratio=ratio, keep=keep, per_layer=per_layer, stats=stats,
                            protect_super_experts=protect_super_experts, collapse_groups=collapse_groups, seed=seed,
                            options=options)
    structure = skip_section(betas_from_stats(stats)) if dynamic_skip else None
    description = str(data) if data is not None else (stats.metadata.get("data_file", "") if stats else f"none ({method})")
    if not is_writer():  # data-parallel (torchrun): every rank plans, rank 0 alone writes
        return plan
    write_pruned_checkpoint(model_dir, plan, out, overwrite=overwrite, data_description=description, progress=progress,
                            structure=structure)
    return plan


def _combined_request(info: ModelInfo, method: str, options, dense_method, dense_options, total_ratio, expert_share,
                      dense_ratio, ratio, keep, per_layer, collapse_groups) -> combined_budgets.CombinedRequest | None:
    """The checked combined-budget request of :func:`prune` (None without ``dense_method`` and
    ``total_ratio``); a MoePruneError for half a request or one mixed with ``ratio``/``keep``/``per_layer``."""
    parts = {"dense_method": dense_method, "total_ratio": total_ratio, "expert_share": expert_share,
             "dense_ratio": dense_ratio, "dense_options": dense_options}
    if all(value is None for value in parts.values()):
        return None
    if dense_method is None or total_ratio is None:
        raise MoePruneError("a combined budget needs both --dense-method M and --total-ratio T (the fraction of all the "
                            "model's parameters removed)")
    if ratio is not None or keep is not None or per_layer is not None:
        raise MoePruneError("a combined budget is --total-ratio T with --expert-share S (or --dense-ratio R / --layers N), "
                            "not --ratio, --keep or --per-layer: drop those")
    return combined_budgets.check_combined(info, expert_method=method, dense_method=dense_method, total_ratio=total_ratio,
                                           expert_share=expert_share, dense_ratio=dense_ratio, expert_options=options,
                                           dense_options=dense_options, collapse_groups=collapse_groups)


def apply(model_dir: str | Path, plan: str | Path | Plan, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Write the checkpoint a saved plan describes (streaming, one tensor at a time).

    A plan that omits a MoE layer is refused unless that keeps the expert counts uniform
    (:func:`~moeprune.checks.check_plan_complete`)."""
    check_output_writable(out, overwrite, protect=[model_dir])
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    info = model_info(model_dir)
    validate_plan(plan, info.geometry, fingerprint=info.fingerprint)
    check_plan_complete(plan, info.geometry)
    return write_pruned_checkpoint(model_dir, plan, out, overwrite=overwrite, progress=progress)
