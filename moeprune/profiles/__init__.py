"""Task-specific expert profiles: build, store, combine, retrieve, export (PreMoe, EASY-EP).

A :class:`Profile` is, per MoE layer, a score vector over the routed experts computed on one task's
calibration data, the kept set at a budget, and a retrieval key:

* **scores** come from the one-pass statistics (:func:`moeprune.api.collect`) and a registered
  scorer (:mod:`moeprune.scoring`): PreMoe's TCESS by default, EASY-EP or REAP on request;
* **kept** is chosen exactly as ``moeprune prune`` chooses (:func:`moeprune.api.plan_pruning`: group
  budgets of DeepSeek routing, super-expert protection);
* **signature** is the retrieval key: for each of the first few MoE layers, the task's mean TCESS
  vector ``sig_l[j] = (1/T) sum_t 1[j in pool_t and p_tj >= r] max(z_tj, sigmoid(z_tj))`` over the
  task's T calibration tokens (PreMoe, 2025; pool = top-K_a experts by logit, p = softmax over the
  pool, r = the mean largest pooled probability). A query is matched by computing the same vector
  over its own tokens (:func:`tcess_signature`) and taking the nearest profile;
* **windows**: two signatures of each of up to 512 short windows (16, 64, 128 and 256 tokens) cut
  from the task's data (256 rows by default, half the windows at document starts, half evenly
  spread): the TCESS vector and the mean raw router logits (:func:`mean_logit_signature`), stored
  (float16) in a safetensors file beside the JSON. They train the matcher's classifier (a logistic
  regression on the mean logits, the default rule), are the neighbours of its k-nearest-window
  rule, and calibrate the fallback rule of :class:`ProfileMatcher`: how far a query of a given
  length may lie from its profile.

Profiles are versioned, human-readable JSON files in a store folder (:class:`ProfileStore`),
validated on load. Model identity is checked in two steps: the **architecture fingerprint**
(config.json without volatile keys, and every tensor's name, shape and dtype) must match, or the
profile is refused; the **weights fingerprint** (:meth:`LazyCheckpoint.fingerprint`, which also
samples tensor bytes) may differ with a warning only, because the default testbed is retrained from
a seed on every machine and training is not bit-identical across CPUs.

Combining profiles: :func:`mix_profiles` (EASY-EP: normalise each domain's scores by their
per-layer sum, average, select), :func:`union_profiles`, :func:`intersect_profiles`.

Package layout: :mod:`~moeprune.profiles.settings` (constants, ProfileError; no torch, read by the
CLI), :mod:`~moeprune.profiles.profile` (the Profile and its JSON), :mod:`~moeprune.profiles.store`,
:mod:`~moeprune.profiles.signatures` (TCESS / mean-logit signatures, the extractor, calibration
windows), :mod:`~moeprune.profiles.build`, :mod:`~moeprune.profiles.combine`,
:mod:`~moeprune.profiles.export` (model identity, export, partial load) and
:mod:`~moeprune.profiles.match` (retrieval). Every public name is importable from
``moeprune.profiles`` itself; the submodules are imported on first use, so importing the constants
(``moeprune.profiles.settings``) stays light. The architecture fingerprint lives in
:mod:`moeprune.io.fingerprint`.
"""

from __future__ import annotations

import importlib

from .settings import (  # noqa: F401  (light: re-exported eagerly)
    PROFILE_FORMAT, PROFILE_FORMAT_VERSION, GENERAL, DEFAULT_SIGNATURE_LAYERS, DEFAULT_WINDOW_LENGTHS,
    DEFAULT_MAX_WINDOWS, DEFAULT_WINDOW_SAMPLES, SIGNATURE_KINDS, FALLBACK_QUANTILE, FALLBACK_MARGIN,
    DEFAULT_RATIO, METRICS, REFERENCES, DEFAULT_REFERENCE, CLASSIFIER_C, DEFAULT_NEIGHBOURS, COMBINE_MODES,
    ProfileError, check_profile_name)

#: public name -> submodule that defines it (imported on first access; PEP 562)
_LAZY = {
    "Profile": ".profile",
    "ProfileStore": ".store",
    "tcess_signature": ".signatures",
    "mean_logit_signature": ".signatures",
    "token_set_signature": ".signatures",
    "SignatureExtractor": ".signatures",
    "calibration_windows": ".signatures",
    "build_profile": ".build",
    "rebudget_profile": ".build",
    "normalised_scores": ".combine",
    "mix_scores": ".combine",
    "mix_profiles": ".combine",
    "union_profiles": ".combine",
    "intersect_profiles": ".combine",
    "combine_profiles": ".combine",
    "check_profile_model": ".export",
    "profile_plan": ".export",
    "export_profile": ".export",
    "load_profile": ".export",
    "load_profile_plan": ".export",
    "check_action": ".fold",
    "fold_actions": ".fold",
    "signature_distances": ".match",
    "knn_distances": ".match",
    "fallback_threshold": ".match",
    "match_confidence": ".match",
    "nearest_length": ".match",
    "rows_by_nearest_length": ".match",
    "Match": ".match",
    "ProfileMatcher": ".match",
    "architecture_fingerprint": "..io.fingerprint",
}

__all__ = [*(name for name in dir() if name.isupper()), "ProfileError", "check_profile_name", *_LAZY]


def __getattr__(name: str):
    """The public names of the submodules, imported on first access (PEP 562)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
