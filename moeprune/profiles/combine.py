"""Combining profiles: EASY-EP's mixed-domain scores (:func:`mix_profiles`), union and intersection
of kept sets."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from .. import __version__
from ..observe.tcess import TCESS_BINS
from ..plan import Plan, build_plan, utc_timestamp, validate_plan
from .fold import refuse_folded
from .profile import Profile
from .settings import COMBINE_MODES, GENERAL, ProfileError, check_profile_name

logger = logging.getLogger(__name__)


def normalised_scores(scores: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """EASY-EP's per-domain normalisation: ``s_j / sum_i s_i`` (all zeros if the sum is 0)."""
    vector = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    total = float(vector.sum())
    return vector / total if total > 0 else torch.zeros_like(vector)


def mix_scores(score_sets: Sequence[Mapping[int, Sequence[float]]], weights: Sequence[float] | None = None) -> dict[int, torch.Tensor]:
    """EASY-EP mixed-domain scores: ``m_j = sum_d w_d s_dj / sum_i s_di`` per layer.

    Each domain's scores are normalised by their per-layer sum (so a domain with larger raw scores
    does not dominate), then averaged with weights ``w_d`` (default 1/D each; given weights are
    rescaled to sum to 1). Layers are those of the first score set; every set must have them all.
    """
    if not score_sets:
        raise ProfileError("no profiles to mix")
    w = torch.full((len(score_sets),), 1.0 / len(score_sets), dtype=torch.float64) if weights is None else \
        torch.as_tensor(list(weights), dtype=torch.float64)
    if w.numel() != len(score_sets) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ProfileError(f"need one non-negative weight per profile ({len(score_sets)}), not all zero; got {weights}")
    w = w / w.sum()
    mixed = {}
    for layer in score_sets[0]:
        mixed[layer] = sum(wd * normalised_scores(s[layer]) for wd, s in zip(w.tolist(), score_sets))
    return mixed



def _check_signature_settings(first: Profile, other: Profile) -> None:
    """Raise unless both profiles computed their TCESS signatures with the same pool and threshold."""
    for key, default in (("tcess_pool", None), ("tcess_r", None), ("tcess_bins", TCESS_BINS)):
        if other.metadata.get(key, default) != first.metadata.get(key, default):
            raise ProfileError(f"profiles {first.task!r} and {other.task!r} use different signature settings "
                               f"({key}); rebuild them with the same settings")


def _merged_protected(profiles: Sequence[Profile]) -> dict[int, list[int]]:
    """Per layer, the experts any of ``profiles`` protects."""
    protected: dict[int, set[int]] = {}
    for p in profiles:
        for layer, experts in p.protected.items():
            protected.setdefault(layer, set()).update(experts)
    return {layer: sorted(experts) for layer, experts in protected.items()}


def _check_combinable(profiles: Sequence[Profile]) -> None:
    if len(profiles) < 2:
        raise ProfileError("combining needs at least two profiles")
    refuse_folded(profiles, "combining")
    first = profiles[0]
    for other in profiles[1:]:
        if other.metadata["architecture_fingerprint"] != first.metadata["architecture_fingerprint"]:
            raise ProfileError(f"profiles {first.task!r} and {other.task!r} were built for different models; "
                               "combine profiles of one model only")
        _check_signature_settings(first, other)
        if other.signature_layers != first.signature_layers:
            raise ProfileError(f"profiles {first.task!r} and {other.task!r} store signatures of different layers")
        if other.collapse_groups != first.collapse_groups:
            raise ProfileError(f"profiles {first.task!r} and {other.task!r} disagree on --collapse-groups")
        if other.metadata["model_fingerprint"] != first.metadata["model_fingerprint"]:
            logger.warning("profiles %s and %s were built on checkpoints with different weights", first.task, other.task)


def _combined(profiles: Sequence[Profile], name: str, mode: str, method: str, budget: dict,
              scores: Mapping[int, torch.Tensor], kept: dict[int, list[int]], weights: Sequence[float],
              protected: dict[int, list[int]]) -> Profile:
    """A profile made of ``profiles``: weighted-mean signature, concatenated windows, merged metadata."""
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    w = w / w.sum()
    signature = {layer: sum(float(wd) * torch.tensor(p.signature[layer], dtype=torch.float64)
                            for wd, p in zip(w, profiles)).tolist()
                 for layer in profiles[0].signature_layers}
    windows = {}, {}
    for slot, kind in enumerate(("windows", "logit_windows")):
        lengths = set.intersection(*(set(getattr(p, kind)) for p in profiles))
        windows[slot].update({length: torch.cat([getattr(p, kind)[length] for p in profiles]) for length in sorted(lengths)})
    metadata = {key: value for key, value in profiles[0].metadata.items()
                if key not in ("data_file", "data_hash", "samples", "num_tokens", "seed", "created")}
    metadata.update({
        "combine": mode,
        "sources": [p.task for p in profiles],
        "weights": [float(x) for x in w],
        "data_hash": "+".join(str(p.metadata.get("data_hash", "")) for p in profiles),
        "data_file": " + ".join(str(p.metadata.get("data_file", "")) for p in profiles),
        "samples": sum(int(p.metadata.get("samples") or 0) for p in profiles),
        "num_tokens": sum(int(p.metadata.get("num_tokens") or 0) for p in profiles),
        "moeprune_version": __version__,
        "created": utc_timestamp(),
    })
    profile = Profile(task=check_profile_name(name), method=method, budget=budget,
                      scores={layer: s.tolist() for layer, s in scores.items()}, kept=kept, signature=signature,
                      metadata=metadata, protected=protected, collapse_groups=profiles[0].collapse_groups,
                      windows=windows[0], logit_windows=windows[1])
    profile.validate(f"combined profile {name!r}")
    return profile


def _common_method(profiles: Sequence[Profile]) -> str:
    methods = sorted({p.method for p in profiles})
    if len(methods) > 1:
        raise ProfileError(f"profiles were scored with different methods {methods}; combine profiles of one method")
    return methods[0]


def mix_profiles(profiles: Sequence[Profile], *, name: str = GENERAL, ratio: float | None = None,
                 keep: int | None = None, weights: Sequence[float] | None = None) -> Profile:
    """EASY-EP mixed-domain profile: normalise each profile's scores by their per-layer sum,
    average them (``weights``, default equal), and select the kept experts at the budget.

    The budget defaults to the components' common budget. The signature is the weighted mean of
    the components' signatures and the fallback windows are all of theirs.
    """
    _check_combinable(profiles)
    method = _common_method(profiles)
    if ratio is None and keep is None:
        budgets = [p.budget for p in profiles]
        if any(b != budgets[0] for b in budgets) or not set(budgets[0]) <= {"ratio", "keep"}:
            raise ProfileError("the profiles have different budgets; give the mixed profile's --ratio or --keep")
        ratio, keep = budgets[0].get("ratio"), budgets[0].get("keep")
    weights = [1.0] * len(profiles) if weights is None else list(weights)
    scores = mix_scores([p.scores for p in profiles], weights)
    protected = _merged_protected(profiles)
    plan = build_plan(profiles[0].geometry, scores, method=method, ratio=ratio, keep=keep, protected=protected,
                      collapse_groups=profiles[0].collapse_groups)
    return _combined(profiles, name, "mix", method, plan.budget, scores, plan.layers, weights, protected)


def _set_combination(profiles: Sequence[Profile], name: str, mode: str) -> Profile:
    _check_combinable(profiles)
    method = _common_method(profiles)
    geometry = profiles[0].geometry
    kept = {}
    for layer in sorted(profiles[0].kept):
        sets = [set(p.kept[layer]) for p in profiles]
        chosen = set.union(*sets) if mode == "union" else set.intersection(*sets)
        if len(chosen) < geometry.top_k:
            raise ProfileError(
                f"the intersection of {', '.join(p.task for p in profiles)} keeps {len(chosen)} experts in layer "
                f"{layer}, but the router selects top_k={geometry.top_k} per token; use --mode union or mix, or "
                "profiles with larger budgets"
            )
        kept[layer] = sorted(chosen)
    plan = Plan(layers=kept, method=method, family=geometry.family, num_experts=geometry.num_experts,
                collapse_groups=profiles[0].collapse_groups)
    validate_plan(plan, geometry)
    scores = mix_scores([p.scores for p in profiles])
    budget = {mode: [p.task for p in profiles]}
    return _combined(profiles, name, mode, method, budget, scores, kept, [1.0] * len(profiles),
                     _merged_protected(profiles))


def union_profiles(profiles: Sequence[Profile], *, name: str) -> Profile:
    """Keep every expert any profile keeps (per layer; counts may then differ between layers).

    Scores are the EASY-EP mixed scores (:func:`mix_scores`); the signature is the mean signature.
    """
    return _set_combination(profiles, name, "union")


def intersect_profiles(profiles: Sequence[Profile], *, name: str) -> Profile:
    """Keep only the experts every profile keeps; fewer than top_k in a layer is a ProfileError."""
    return _set_combination(profiles, name, "intersection")


def combine_profiles(profiles: Sequence[Profile], mode: str, *, name: str, ratio: float | None = None,
                     keep: int | None = None) -> Profile:
    """``mode`` = mix | union | intersection (see :func:`mix_profiles` and friends)."""
    if mode == "mix":
        return mix_profiles(profiles, name=name, ratio=ratio, keep=keep)
    if mode not in COMBINE_MODES:
        raise ProfileError(f"unknown combine mode {mode!r}; choose one of {', '.join(COMBINE_MODES)}")
    if ratio is not None or keep is not None:
        raise ProfileError(f"--mode {mode} takes its kept sets from the profiles; --ratio/--keep apply to --mode mix only")
    return _set_combination(profiles, name, mode)
