"""Building a task profile from local data: statistics (collected once), the selection of
``moeprune prune``, the TCESS signature and the calibration-window signatures."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from .. import __version__, api
from ..collect import tcess_pool_size
from ..observe.tcess import TCESS_BINS
from ..calibration.data import (CalibrationBatch, is_pretokenized, read_documents, resolve_text_sizes,
                                tokenize_and_pack)
from ..errors import DataError
from ..io.fingerprint import architecture_fingerprint
from ..methods import get_method
from ..observe import resolve_observers
from ..plan import build_plan, resolve_budget, utc_timestamp, validate_budget
from ..scoring import score_all
from ..stats import RouterStats
from .fold import check_action, fold_actions, needed_entries, refuse_folded
from .profile import Profile, _geometry_dict
from .settings import (DEFAULT_MAX_WINDOWS, DEFAULT_RATIO, DEFAULT_SIGNATURE_LAYERS, DEFAULT_WINDOW_LENGTHS,
                       DEFAULT_WINDOW_SAMPLES, FOLD_FORMAT_VERSION, PROFILE_FORMAT_VERSION, SIGNATURE_KINDS,
                       ProfileError, check_profile_name)
from .signatures import SignatureExtractor, calibration_windows

logger = logging.getLogger(__name__)


def profile_calibration(model_dir: str | Path, data: str | Path, *, samples: int | None = None,
                        seq_len: int | None = None, seed: int = 0, chat_template: bool = False,
                        text_field: str = "text") -> CalibrationBatch:
    """The calibration rows of a profile (:func:`moeprune.api.calibration_data`).

    Text data with ``samples=None``: :data:`~moeprune.calibration.data.DEFAULT_SAMPLES` packed
    blocks, or every block of the data when it holds fewer (a profile is meant for a few in-domain
    demonstrations, EASY-EP), logged. The block count is the largest sample count
    :func:`~moeprune.calibration.data.tokenize_and_pack` accepts (a bisection; with every block it
    returns them all, in order). An explicit ``samples`` larger than the data stays the data loader's
    DataError; pre-tokenized data is used row for row, as everywhere.
    """
    if samples is not None or is_pretokenized(data):
        return api.calibration_data(model_dir, data, samples=samples, seq_len=seq_len, seed=seed,
                                    chat_template=chat_template, text_field=text_field)
    wanted, seq_len = resolve_text_sizes(samples, seq_len)
    try:
        return api.calibration_data(model_dir, data, samples=wanted, seq_len=seq_len, seed=seed,
                                    chat_template=chat_template, text_field=text_field)
    except DataError as too_few:
        error = too_few
    documents = read_documents(data, text_field, allow_messages=chat_template)
    tokenizer = api.load_tokenizer(model_dir, "the checkpoint folder must contain its tokenizer files")

    def pack(count: int) -> CalibrationBatch:
        return tokenize_and_pack(documents, tokenizer, seq_len=seq_len, samples=count, seed=seed,
                                 chat_template=chat_template)

    fits, too_many = 0, wanted  # invariant: `fits` blocks are available (0: none), `too_many` are not
    while too_many - fits > 1:
        middle = (fits + too_many) // 2
        try:
            pack(middle)
            fits = middle
        except DataError:
            too_many = middle
    if fits == 0:
        raise error
    logger.info("%s holds %d packed blocks of %d tokens, fewer than the default --samples %d: the profile uses "
                "every block (pass --samples to require a count)", data, fits, seq_len, wanted)
    return pack(fits)


def build_profile(
    model_dir: str | Path,
    task: str,
    data: str | Path,
    *,
    method: str = "tcess",
    keep: int | None = None,
    ratio: float | None = None,
    samples: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
    batch_size: int = 4,
    text_field: str = "text",
    chat_template: bool = False,
    mode: str = "sequential",
    stats=None,
    signature_layers: int = DEFAULT_SIGNATURE_LAYERS,
    window_lengths: Sequence[int] = DEFAULT_WINDOW_LENGTHS,
    max_windows: int = DEFAULT_MAX_WINDOWS,
    window_samples: int = DEFAULT_WINDOW_SAMPLES,
    protect_super_experts: bool = True,
    collapse_groups: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
    action: str = "drop",
    action_options: dict | None = None,
) -> Profile:
    """Build the profile of task ``task`` from local data (``--data FILE``).

    Collects statistics once (or uses ``stats``, a RouterStats or statistics file collected on the
    same tokens), scores with ``method`` and selects the kept experts exactly as
    :func:`moeprune.api.plan_pruning` (same budget rules, super experts protected). The signature is
    the collector's TCESS (``tcess / tokens``) at the first ``signature_layers`` MoE layers; window
    signatures (TCESS and mean logits) are computed over up to ``max_windows`` windows of each of
    ``window_lengths`` tokens (:func:`calibration_windows`) cut from ``window_samples`` rows of
    ``seq_len`` tokens of the same data and seed (a superset of the calibration rows; the calibration
    rows alone when the data holds fewer).
    Budget: ``ratio`` (fraction removed) or ``keep`` (experts kept); default ratio 0.5.
    ``samples`` x ``seq_len`` (default 64 x 512, :func:`profile_calibration`): without ``samples``,
    every block when the data holds fewer (EASY-EP's few in-domain demonstrations), and says so; an
    explicit ``samples`` larger than the data is a DataError. ``device`` / ``dtype`` place the
    statistics pass (:func:`moeprune.api.collect`); signatures are always computed on the CPU in
    float32, so that they compare with the stored ones of every other profile.

    ``action`` (:data:`~moeprune.profiles.settings.PROFILE_ACTIONS`): what the profile does with the
    experts it does not keep: ``drop`` (the default), ``merge`` or ``dern`` fold them into the kept
    ones (:mod:`moeprune.profiles.fold`; ``action_options`` as :func:`~moeprune.profiles.fold.check_action`
    takes them). The kept set is the same for every action; the folding actions are computed from
    the same statistics (``merge`` by output also collects the opt-in mean expert outputs).
    """
    check_profile_name(task)
    if ratio is None and keep is None:
        ratio = DEFAULT_RATIO
    info = api.model_info(model_dir)
    geometry = info.geometry
    get_method(method).check_implemented()
    options = check_action(action, action_options, info, collapse_groups=collapse_groups)
    validate_budget(geometry, resolve_budget(geometry, ratio=ratio, keep=keep, collapse_groups=collapse_groups),
                    collapse_groups=collapse_groups)
    if signature_layers < 1:
        raise ProfileError("--signature-layers must be at least 1")
    if window_samples < 1:
        raise ProfileError("--window-samples must be at least 1 (rows the matcher's calibration windows are cut from)")
    calibration = profile_calibration(model_dir, data, samples=samples, seq_len=seq_len, seed=seed,
                                      chat_template=chat_template, text_field=text_field)
    seq_len = calibration.seq_len
    if isinstance(stats, (str, Path)):
        stats = RouterStats.load(stats)
    if stats is None:
        extra = [name for name in needed_entries(action, options) if name == "expert_mean_output"]
        observers = [*resolve_observers(None), *extra] if extra else None
        stats = api.collect(model_dir, calibration=calibration, batch_size=batch_size, mode=mode, device=device,
                            dtype=dtype, progress=progress, observers=observers)
    elif stats.metadata.get("data_hash") != calibration.data_hash:
        raise ProfileError(
            "the statistics were collected on other tokens than --data with these --samples/--seq-len/--seed "
            "(data hashes differ); pass the same data and sizes, or leave out the statistics"
        )
    missing = sorted({name for layer in geometry.moe_layers for name in needed_entries(action, options)
                      if name not in stats.layers.get(layer, {})})
    if missing:
        raise ProfileError(f"--action {action} reads the statistics {missing}, which --stats lacks; leave out --stats "
                           "so that the build collects them")
    plan = api.plan_pruning(model_dir, method=method, ratio=ratio, keep=keep, stats=stats,
                            protect_super_experts=protect_super_experts, collapse_groups=collapse_groups, seed=seed)
    actions = fold_actions(info, stats, plan, action, options)
    scores = score_all(method, stats, seed=seed)
    sig_layers = list(geometry.moe_layers[:signature_layers])
    signature = {}
    for layer in sig_layers:
        entries = stats.layers[layer]
        signature[layer] = (entries["tcess"].double() / entries["tokens"].double().clamp(min=1)).tolist()
    pool = tcess_pool_size(geometry.num_experts, geometry.top_k, stats.metadata.get("tcess_pool"))
    tcess_r = stats.metadata.get("tcess_r")
    bins = int(stats.metadata.get("tcess_bins") or TCESS_BINS)
    extractor = SignatureExtractor(model_dir, sig_layers, tcess_pool=pool, tcess_r=tcess_r, tcess_bins=bins)
    window_rows = calibration.input_ids
    if window_samples > len(calibration):
        try:
            window_rows = api.calibration_data(model_dir, data, samples=window_samples, seq_len=seq_len, seed=seed,
                                               chat_template=chat_template, text_field=text_field).input_ids
        except DataError:
            logger.warning("%s holds fewer than %d rows of %d tokens; profile %s cuts its windows from the %d "
                           "calibration rows", data, window_samples, seq_len, task, len(calibration))
    windows, logit_windows = {}, {}
    eos = extractor.tokenizer.eos_token_id
    for length in sorted(set(int(w) for w in window_lengths)):
        ids = calibration_windows(window_rows, length, max_windows, eos_token_id=eos)
        if ids.shape[0]:
            both = extractor.signatures_of_ids(ids, batch_size=max(1, 2048 // length), progress=progress,
                                               kinds=SIGNATURE_KINDS)
            windows[length], logit_windows[length] = both["tcess"], both["logits"]
    if not windows:
        logger.warning("no window fits in --seq-len %d; profile %s gets no fallback calibration", seq_len, task)
    metadata = {
        "format_version": FOLD_FORMAT_VERSION if action != "drop" else PROFILE_FORMAT_VERSION,
        "model_fingerprint": info.fingerprint,
        "architecture_fingerprint": architecture_fingerprint(model_dir),
        "family": geometry.family,
        "num_experts": geometry.num_experts,
        "top_k": geometry.top_k,
        "geometry": _geometry_dict(geometry),
        "model_name": Path(model_dir).resolve().name,
        "data_file": str(data),
        "data_hash": calibration.data_hash,
        "samples": len(calibration),
        "seq_len": calibration.seq_len,
        "num_tokens": calibration.num_tokens,
        "seed": seed,
        "tcess_pool": pool,
        "tcess_r": tcess_r,
        "tcess_bins": bins,
        "window_rows": int(window_rows.shape[0]),
        "moeprune_version": __version__,
        "created": utc_timestamp(),
    }
    profile = Profile(task=task, method=method, budget=plan.budget,
                      scores={layer: s.tolist() for layer, s in scores.items()}, kept=plan.layers,
                      signature=signature, metadata=metadata, protected=plan.protected,
                      collapse_groups=plan.collapse_groups, windows=windows, logit_windows=logit_windows,
                      action=action, action_options=options, actions=actions)
    profile.validate(f"profile {task!r}")
    logger.info("profile %s: %s, kept %s experts per MoE layer%s", task, method,
                sorted(set(profile.kept_counts().values())), f", the others folded in ({action})" if profile.folds else "")
    return profile


def rebudget_profile(profile: Profile, *, ratio: float | None = None, keep: int | None = None) -> Profile:
    """The same profile with its kept sets re-selected from its scores at another budget (drop
    profiles only: a folding profile's merges belong to its own kept sets)."""
    refuse_folded([profile], "re-selecting the kept experts at another budget")
    if (ratio is None) == (keep is None):
        raise ProfileError("give exactly one budget: --ratio (fraction removed) or --keep (experts kept)")
    scores = {layer: torch.tensor(v, dtype=torch.float64) for layer, v in profile.scores.items()}
    plan = build_plan(profile.geometry, scores, method=profile.method, ratio=ratio, keep=keep,
                      protected=profile.protected, collapse_groups=profile.collapse_groups)
    return replace(profile, budget=plan.budget, kept=plan.layers, metadata=dict(profile.metadata))
