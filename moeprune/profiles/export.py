"""Model identity of a profile (architecture checked strictly, weights with a warning), its plan,
its export as a vanilla checkpoint and its partial load."""

from __future__ import annotations

import logging
from pathlib import Path

from .. import api
from ..apply import write_pruned_checkpoint
from ..io.fingerprint import architecture_fingerprint
from ..io.output import check_output
from ..loader import load_with_experts, load_with_plan
from ..plan import Plan, validate_plan
from .profile import Profile
from .settings import ProfileError

logger = logging.getLogger(__name__)


def check_profile_model(profile: Profile, model_dir: str | Path, *, _identity: tuple | None = None):
    """Raise unless ``profile`` was built for this model's architecture; warn if only weights differ.

    Returns the model's :class:`moeprune.api.ModelInfo`.
    """
    info, arch = _identity or (api.model_info(model_dir), architecture_fingerprint(model_dir))
    meta = profile.metadata
    if meta["family"] != info.geometry.family or int(meta["num_experts"]) != info.geometry.num_experts:
        raise ProfileError(
            f"profile {profile.task!r} was built for a {meta['family']} model with {meta['num_experts']} experts per "
            f"layer; {model_dir} is a {info.geometry.family} model with {info.geometry.num_experts}: build profiles "
            "for this checkpoint with `moeprune profile build`"
        )
    if meta["architecture_fingerprint"] != arch:
        raise ProfileError(
            f"profile {profile.task!r} was built for another model (architecture {meta['architecture_fingerprint']}, "
            f"this checkpoint {arch}: config or tensor shapes differ); build profiles for this checkpoint with "
            "`moeprune profile build`"
        )
    if meta["model_fingerprint"] != info.fingerprint:
        logger.warning(
            "profile %s was built on a checkpoint with the same architecture but other weights (%s, this one %s), "
            "e.g. a testbed retrained on another machine; its kept experts may not be the best for these weights: "
            "rebuild it for exact results", profile.task, meta["model_fingerprint"], info.fingerprint,
        )
    return info


def profile_plan(profile: Profile, model_dir: str | Path) -> Plan:
    """The validated plan of ``profile`` for checkpoint ``model_dir`` (identity checked first)."""
    info = check_profile_model(profile, model_dir)
    plan = profile.to_plan(model_fingerprint=info.fingerprint)
    validate_plan(plan, info.geometry, fingerprint=info.fingerprint)
    return plan


def export_profile(model_dir: str | Path, profile: Profile, out: str | Path, *, overwrite: bool = False,
                   progress: bool = True) -> Path:
    """Write ``profile`` as a standalone vanilla checkpoint (with ``moeprune_plan.json`` and a card).

    Streams the shards tensor by tensor into a temporary folder renamed at the end. A profile that
    keeps different numbers of experts per layer (union/intersection) cannot be a vanilla checkpoint
    and is refused; load it with :func:`load_profile` instead. A folding profile (``--action
    merge|dern``) writes its merged or recombined experts through the same ops: a vanilla checkpoint,
    or with ``router="exact"`` one that :func:`moeprune.load` reads.
    """
    check_output(out, overwrite, protect=[model_dir])
    plan = profile_plan(profile, model_dir)
    counts = sorted(set(plan.kept_counts().values()))
    if len(counts) > 1:
        raise ProfileError(
            f"profile {profile.task!r} keeps {counts} experts in different layers; a vanilla transformers checkpoint "
            "holds one expert count per model. Load it with moeprune's partial loader (load_profile), or export a "
            "mixed profile (`moeprune profile combine --mode mix`) or a rebudgeted one (--ratio/--keep)"
        )
    action = f", {profile.action} {profile.action_options}" if profile.folds else ""
    description = f"task profile {profile.task!r} ({profile.method}{action}, data {profile.metadata.get('data_file', '')})"
    return write_pruned_checkpoint(model_dir, plan, out, overwrite=overwrite, data_description=description,
                                   progress=progress)


def load_profile(model_dir: str | Path, profile: Profile, **kw):
    """The model with only ``profile``'s experts, read from disk by moeprune's partial loader.

    Validates the profile against the model first; ``kw`` go to
    :func:`moeprune.loader.load_with_experts` (e.g. ``dtype``, ``shared``). Profiles that keep
    different numbers of experts per layer (union/intersection) load too. A folding profile
    (``--action merge|dern``) loads through :func:`moeprune.loader.load_with_plan`: each layer's
    merged or recombined experts are computed from the members they name, one layer at a time,
    equal to loading its export.
    """
    plan = profile_plan(profile, model_dir)
    return load_profile_plan(model_dir, profile, plan, **kw)


def load_profile_plan(model_dir: str | Path, profile: Profile, plan: Plan | None = None, **kw):
    """:func:`load_profile` without the identity check (done once by the caller, e.g. the server's
    cache): kept experts only for a drop profile, the plan's folded experts otherwise."""
    if profile.folds:
        kw.pop("collapse_groups", None)
        return load_with_plan(model_dir, plan or profile.to_plan(), **kw)
    kw.setdefault("collapse_groups", profile.collapse_groups)
    return load_with_experts(model_dir, profile.kept, **kw)
