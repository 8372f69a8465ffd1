"""Constants, the error type and name rules of task profiles; light (no torch), so the CLI builds
its ``profile`` parsers from them without importing torch."""

from __future__ import annotations

import re

from ..errors import MoePruneError

PROFILE_FORMAT = "moeprune-profile"
#: Format version of a drop profile (kept sets only), unchanged since the first release, so drop
#: profiles stay byte-identical and older moeprune versions keep reading them.
PROFILE_FORMAT_VERSION = 1
#: Format version of a profile that folds its dropped experts into the kept ones (``action`` and
#: ``actions`` keys, :mod:`moeprune.profiles.fold`).
FOLD_FORMAT_VERSION = 2
#: Every profile format version this moeprune reads.
READABLE_FORMAT_VERSIONS = (PROFILE_FORMAT_VERSION, FOLD_FORMAT_VERSION)
#: What a profile does with the experts it does not keep: drop them (PreMoe / EASY-EP), merge each
#: into a kept expert (frequency-weighted, neurons aligned), or recombine their neurons into the
#: kept experts (DERN). The kept set is the same for all three.
PROFILE_ACTIONS = ("drop", "merge", "dern")
#: Which kept expert a dropped expert merges into (``--action merge``): the nearest by HC-SMoE's
#: mean expert output over all tokens (Euclidean), or the most similar by M-SMoE's router logits.
MERGE_SIMILARITIES = ("output", "router")
#: Options of ``--action merge`` and their defaults (the router rows of the kept experts stay theirs:
#: a vanilla merge profile routes exactly as the drop profile of the same kept set).
MERGE_OPTIONS = {"similarity": "output", "router": "vanilla", "router_rows": "dominant", "align": "on"}
#: Name of the profile a matcher falls back to (by convention built on mixed-domain data).
GENERAL = "general"
#: MoE layers whose signature a profile stores (the first ones; early layers are cheap to run).
DEFAULT_SIGNATURE_LAYERS = 4
#: Window lengths (tokens) whose signatures train the matcher and calibrate the fallback threshold.
DEFAULT_WINDOW_LENGTHS = (16, 64, 128, 256)
#: Windows kept per length (half at document starts, the rest evenly spread over the window rows).
DEFAULT_MAX_WINDOWS = 512
#: Rows of --seq-len tokens the windows are cut from (a superset of the calibration rows: only the
#: first few layers run on them, so the classifier sees more of the task than the scores need).
DEFAULT_WINDOW_SAMPLES = 256
#: What a window's signature is: PreMoe's TCESS vector, or the mean raw router logits.
SIGNATURE_KINDS = ("tcess", "logits")
#: Fallback rule: a query falls back when its distance to the nearest profile exceeds
#: FALLBACK_MARGIN x the FALLBACK_QUANTILE-quantile of that profile's own window distances.
FALLBACK_QUANTILE = 0.95
FALLBACK_MARGIN = 1.5
DEFAULT_RATIO = 0.5
METRICS = ("l2", "cosine")
#: How a prompt is matched: a logistic-regression classifier trained on the profiles' calibration
#: windows (mean router logits), the k nearest calibration windows (TCESS), or the profile's
#: signature (TCESS centroid, PreMoe).
REFERENCES = ("classifier", "windows", "centroid")
DEFAULT_REFERENCE = "classifier"
#: Inverse L2 strength of the classifier (scikit-learn's C) on standardised features.
CLASSIFIER_C = 1.0
DEFAULT_NEIGHBOURS = 5
COMBINE_MODES = ("mix", "union", "intersection")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FOLD_KEYS = ("action", "actions")
_REQUIRED_KEYS = ("task", "method", "budget", "kept", "scores", "signature", "metadata")
_REQUIRED_METADATA = ("format_version", "model_fingerprint", "architecture_fingerprint", "family",
                      "num_experts", "geometry", "tcess_pool")
_REBUILD = "rebuild it with `moeprune profile build`"


class ProfileError(MoePruneError):
    """A profile is corrupt, of another format version, or made for another model."""


def check_profile_name(name: str) -> str:
    """``name`` if it is usable as a profile (and file) name, else a ProfileError."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ProfileError(
            f"profile name {name!r} is not allowed: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit (e.g. --task code)"
        )
    return name
