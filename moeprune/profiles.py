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
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import __version__
from .errors import DataError, MoePruneError, OutputExistsError
from .geometry import MoEGeometry
from .plan import Plan, build_plan, summarize_scores, utc_timestamp, validate_plan

logger = logging.getLogger(__name__)

PROFILE_FORMAT = "moeprune-profile"
PROFILE_FORMAT_VERSION = 1
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


# --------------------------------------------------------------------------------------------------
# pure math


def tcess_signature(logits: torch.Tensor, pool: int, r: float | None = None) -> torch.Tensor:
    """PreMoe's TCESS vector of one token set, the retrieval key of a prompt or a task.

    ``sig[j] = (1/T) sum_t 1[j in P_t and p_tj >= r] f(z_tj)`` with z_t the router logits of token
    t ([T, E]), P_t its top-``pool`` experts by logit, p_t = softmax over the pooled logits,
    f(s) = max(s, sigmoid(s)) (:func:`moeprune.collect.tcess_transform`) and, unless given, r = the
    mean over the T tokens of max_j p_tj (PreMoe v3). Equals the collector's ``tcess / tokens`` on
    the same tokens. Returns float64 [E].
    """
    from .collect import tcess_transform

    z = logits.detach().double().reshape(-1, logits.shape[-1])
    if z.shape[0] == 0:
        raise ValueError("no tokens: a signature needs at least one token")
    pooled, index = torch.topk(z, min(pool, z.shape[1]), dim=-1)
    prob = torch.softmax(pooled, dim=-1)
    threshold = prob.max(dim=-1).values.mean() if r is None else torch.tensor(float(r), dtype=torch.float64)
    credited = torch.where(prob >= threshold, tcess_transform(pooled), torch.zeros_like(pooled))
    total = torch.zeros(z.shape[1], dtype=torch.float64).index_add_(0, index.reshape(-1), credited.reshape(-1))
    return total / z.shape[0]


def mean_logit_signature(logits: torch.Tensor) -> torch.Tensor:
    """The mean raw router logits of one token set, ``sig[j] = (1/T) sum_t z_tj`` (float64 [E]).

    Unlike TCESS, which credits only the pooled experts above the threshold, the mean logit keeps
    every expert's evidence; it is the feature the matcher's classifier is trained on.
    """
    z = logits.detach().double().reshape(-1, logits.shape[-1])
    if z.shape[0] == 0:
        raise ValueError("no tokens: a signature needs at least one token")
    return z.mean(dim=0)


def token_set_signature(logits: torch.Tensor, kind: str, pool: int, r: float | None = None) -> torch.Tensor:
    """:func:`tcess_signature` (``kind="tcess"``) or :func:`mean_logit_signature` (``"logits"``)."""
    if kind == "tcess":
        return tcess_signature(logits, pool, r)
    if kind == "logits":
        return mean_logit_signature(logits)
    raise ProfileError(f"unknown signature kind {kind!r}; choose one of {', '.join(SIGNATURE_KINDS)}")


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


def signature_distances(queries: torch.Tensor, references: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """Distances [N, P] between query signatures [N, D] and reference signatures [P, D].

    ``l2``: Euclidean distance ||q - s||. ``cosine``: 1 - cos(q, s) (in [0, 2]). Signatures of several
    layers are compared as one concatenated vector.
    """
    q = queries.double().reshape(queries.shape[0], -1)
    s = references.double().reshape(references.shape[0], -1)
    if metric == "l2":
        return torch.cdist(q, s)
    if metric == "cosine":
        return 1.0 - F.cosine_similarity(q.unsqueeze(1), s.unsqueeze(0), dim=-1, eps=1e-12)
    raise ProfileError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


def knn_distances(queries: torch.Tensor, windows: torch.Tensor, k: int, metric: str = "l2",
                  leave_one_out: bool = False) -> torch.Tensor:
    """Mean distance [N] from each query [N, D] to its ``k`` nearest windows [M, D].

    With ``leave_one_out`` the queries are the windows themselves and each one's zero distance to
    itself is left out (the spread of a profile's own windows).
    """
    distances = signature_distances(queries, windows, metric)
    if leave_one_out:
        distances = distances + torch.diag(torch.full((distances.shape[0],), math.inf, dtype=distances.dtype))
    available = distances.shape[1] - (1 if leave_one_out else 0)
    if available < 1:
        raise ProfileError("a profile needs at least 2 calibration windows per length for window matching; "
                           f"{_REBUILD} with more --samples")
    return distances.topk(min(k, available), dim=1, largest=False).values.mean(dim=1)


def fallback_threshold(window_distances: torch.Tensor, quantile: float = FALLBACK_QUANTILE,
                       margin: float = FALLBACK_MARGIN) -> float:
    """``margin * quantile_q(d_w)``: how far a query may lie from a profile before falling back.

    ``d_w`` are the distances from the profile's own calibration windows (of the length closest to
    the query's) to the profile's signature.
    """
    if window_distances.numel() == 0:
        return math.inf
    return float(margin * torch.quantile(window_distances.double().reshape(-1), quantile))


def match_confidence(nearest: float, runner_up: float, threshold: float) -> float:
    """Confidence in [0, 1] of a retrieval decision: the relative margin to the decision boundary.

    If the query is within the threshold of its nearest profile (d1 <= tau), the boundary is the
    closer of the runner-up profile and the threshold: ``1 - d1 / min(d2, tau)`` (0 on a tie or at
    the threshold, 1 on the profile's own signature). If it falls back (d1 > tau):
    ``1 - tau / d1`` (0 at the threshold, towards 1 far beyond it).
    """
    if nearest > threshold:
        return 1.0 - threshold / nearest
    bound = min(runner_up, threshold)
    if bound <= 0:
        return 0.0
    if math.isinf(bound):
        return 1.0
    return max(0.0, 1.0 - nearest / bound)


def nearest_length(lengths: Iterable[int], tokens: int) -> int:
    """The stored window length closest to ``tokens`` on a log scale (ties: the shorter)."""
    return min(sorted(lengths), key=lambda w: abs(math.log(max(tokens, 1) / w)))


def rows_by_nearest_length(lengths: Iterable[int], tokens: Sequence[int]) -> dict[int, list[int]]:
    """Row indices of prompts of ``tokens`` tokens, grouped by the stored length nearest each one."""
    groups: dict[int, list[int]] = {}
    for row, count in enumerate(tokens):
        groups.setdefault(nearest_length(lengths, int(count)), []).append(row)
    return groups


def architecture_fingerprint(model_dir: str | Path) -> str:
    """16 hex digits of sha256 over config.json (volatile keys left out) and every tensor's
    (name, shape, dtype): the model's architecture, independent of its weights."""
    from .io.checkpoint import CONFIG_NAME, LazyCheckpoint, config_bytes

    checkpoint = LazyCheckpoint(model_dir)
    digest = hashlib.sha256(b"moeprune-architecture-v1\0")
    digest.update(config_bytes(checkpoint.path / CONFIG_NAME))
    listing = [[n, list(checkpoint.shape(n)), str(checkpoint.dtype(n))] for n in checkpoint.keys()]
    digest.update(json.dumps(listing, separators=(",", ":")).encode("utf-8"))
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# the profile


def _geometry_dict(geometry: MoEGeometry) -> dict:
    data = asdict(geometry)
    data.pop("extra", None)
    data["moe_layers"] = list(geometry.moe_layers)
    return data


def _geometry_from_dict(data: Mapping) -> MoEGeometry:
    try:
        return MoEGeometry(**{**data, "moe_layers": tuple(int(x) for x in data["moe_layers"])})
    except (TypeError, KeyError) as exc:
        raise ProfileError(f"the profile's metadata.geometry is malformed ({exc}); {_REBUILD}") from None


def _int_keys(mapping, what: str, where: str) -> dict[int, list]:
    if not isinstance(mapping, Mapping):
        raise ProfileError(f"{where}: {what} must be an object of layer -> list; {_REBUILD}")
    out = {}
    for key, value in mapping.items():
        try:
            layer = int(key)
        except (TypeError, ValueError):
            raise ProfileError(f"{where}: {what} has layer key {key!r}, not an integer; {_REBUILD}") from None
        if not isinstance(value, list):
            raise ProfileError(f"{where}: {what}[{key}] must be a list; {_REBUILD}")
        out[layer] = value
    return dict(sorted(out.items()))


@dataclass
class Profile:
    """One task's expert profile (see the module docstring).

    Attributes:
        task: the profile's name (its file name in a store).
        method: scoring method (``tcess``, ``easy_ep``, ``reap``, ...).
        budget: the budget as given, e.g. ``{"ratio": 0.5}``, ``{"keep": 4}``, ``{"union": [...]}``.
        scores: MoE layer -> one score per routed expert (higher = more important).
        kept: MoE layer -> sorted kept experts (original numbering; may differ in count per layer
            after union/intersection).
        signature: early MoE layer -> the task's mean TCESS vector (the retrieval key).
        metadata: model_fingerprint, architecture_fingerprint, family, num_experts, top_k,
            geometry, data_hash, data_file, samples, seq_len, num_tokens, tcess_pool, tcess_r,
            moeprune_version, created, format_version (and sources/combine for combined profiles).
        protected: MoE layer -> experts kept regardless of score (super experts).
        collapse_groups: the pruned model routes with n_group = topk_group = 1.
        windows: window length -> TCESS signatures [n, len(signature), E] of calibration windows of
            that many tokens (the ``windows`` and ``centroid`` matching rules and their fallback).
        logit_windows: window length -> mean router logits [n, len(signature), E] of the same windows
            (the ``classifier`` matching rule and its fallback).
    """

    task: str
    method: str
    budget: dict
    scores: dict[int, list[float]]
    kept: dict[int, list[int]]
    signature: dict[int, list[float]]
    metadata: dict
    protected: dict[int, list[int]] = field(default_factory=dict)
    collapse_groups: bool = False
    windows: dict[int, torch.Tensor] = field(default_factory=dict)
    logit_windows: dict[int, torch.Tensor] = field(default_factory=dict)

    # ---- queries -------------------------------------------------------------------------------

    @property
    def geometry(self) -> MoEGeometry:
        return _geometry_from_dict(self.metadata["geometry"])

    @property
    def signature_layers(self) -> list[int]:
        return sorted(self.signature)

    def kept_counts(self) -> dict[int, int]:
        return {layer: len(kept) for layer, kept in sorted(self.kept.items())}

    def signature_tensor(self, layers: Sequence[int] | None = None) -> torch.Tensor:
        """The signature of ``layers`` (default: all stored) as a float64 tensor [L, E]."""
        layers = self.signature_layers if layers is None else list(layers)
        missing = [layer for layer in layers if layer not in self.signature]
        if missing:
            raise ProfileError(f"profile {self.task!r} stores no signature for layers {missing} "
                               f"(it has {self.signature_layers}); {_REBUILD} with more --signature-layers")
        return torch.tensor([self.signature[layer] for layer in layers], dtype=torch.float64)

    def to_plan(self, model_fingerprint: str | None = None) -> Plan:
        """The pruning plan of this profile (for ``moeprune apply`` or the partial loader).

        ``model_fingerprint`` (default: the one the profile was built on) is recorded in the plan;
        pass the target checkpoint's fingerprint once :func:`check_profile_model` accepted it.
        """
        meta = self.metadata
        scores = {layer: torch.tensor(v, dtype=torch.float64) for layer, v in self.scores.items()}
        return Plan(
            layers={layer: list(k) for layer, k in sorted(self.kept.items())},
            method=self.method,
            budget=dict(self.budget),
            protected={layer: list(p) for layer, p in sorted(self.protected.items())},
            model_fingerprint=meta["model_fingerprint"] if model_fingerprint is None else model_fingerprint,
            family=meta["family"],
            num_experts=int(meta["num_experts"]),
            score_summary=summarize_scores(scores, self.kept),
            collapse_groups=self.collapse_groups,
            calibration={"profile": self.task, "profile_model_fingerprint": meta["model_fingerprint"],
                         **{k: meta.get(k) for k in ("data_hash", "samples", "seq_len", "num_tokens", "data_file")}},
        )

    # ---- validation and JSON -------------------------------------------------------------------

    def validate(self, where: str = "profile") -> None:
        """Raise ProfileError unless the profile is internally consistent (see :meth:`from_json`)."""
        check_profile_name(self.task)
        missing = [k for k in _REQUIRED_METADATA if k not in self.metadata]
        if missing:
            raise ProfileError(f"{where}: metadata lacks {missing}; {_REBUILD}")
        if self.metadata["format_version"] != PROFILE_FORMAT_VERSION:
            raise ProfileError(
                f"{where} has profile format version {self.metadata['format_version']!r}, this moeprune "
                f"({__version__}) reads version {PROFILE_FORMAT_VERSION}; {_REBUILD}"
            )
        geometry = self.geometry
        num = geometry.num_experts
        if int(self.metadata["num_experts"]) != num:
            raise ProfileError(f"{where}: metadata.num_experts disagrees with metadata.geometry; {_REBUILD}")
        moe = set(geometry.moe_layers)
        for what, mapping in (("scores", self.scores), ("kept", self.kept), ("signature", self.signature)):
            stray = sorted(set(mapping) - moe)
            if stray:
                raise ProfileError(f"{where}: {what} names layers {stray} that are not MoE layers {sorted(moe)}; {_REBUILD}")
        if set(self.kept) != set(self.scores):
            raise ProfileError(f"{where}: kept and scores cover different layers; {_REBUILD}")
        if not self.signature:
            raise ProfileError(f"{where}: the signature is empty; {_REBUILD}")
        for what, mapping in (("scores", self.scores), ("signature", self.signature)):
            for layer, values in mapping.items():
                if len(values) != num or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                    raise ProfileError(f"{where}: {what}[{layer}] must be {num} finite numbers; {_REBUILD}")
        for layer, kept in self.kept.items():
            if not all(isinstance(e, int) and 0 <= e < num for e in kept) or kept != sorted(set(kept)):
                raise ProfileError(f"{where}: kept[{layer}] must be sorted distinct expert indices in [0, {num}); {_REBUILD}")
            if len(kept) < geometry.top_k:
                raise ProfileError(f"{where}: layer {layer} keeps {len(kept)} experts < top_k={geometry.top_k}; {_REBUILD}")
        for kind, windows in (("tcess", self.windows), ("logits", self.logit_windows)):
            for length, tensor in windows.items():
                if tensor.dim() != 3 or tuple(tensor.shape[1:]) != (len(self.signature), num):
                    raise ProfileError(
                        f"{where}: {kind} window signatures of length {length} have shape {tuple(tensor.shape)}, "
                        f"expected [n, {len(self.signature)}, {num}]; {_REBUILD}"
                    )

    def to_json(self) -> dict:
        """A JSON-serialisable dict (without the window tensors, which :class:`ProfileStore` writes)."""
        return {
            "format": PROFILE_FORMAT,
            "format_version": PROFILE_FORMAT_VERSION,
            "task": self.task,
            "method": self.method,
            "budget": self.budget,
            "collapse_groups": self.collapse_groups,
            "kept": {str(k): v for k, v in sorted(self.kept.items())},
            "protected": {str(k): v for k, v in sorted(self.protected.items())},
            "scores": {str(k): [float(x) for x in v] for k, v in sorted(self.scores.items())},
            "signature": {str(k): [float(x) for x in v] for k, v in sorted(self.signature.items())},
            "metadata": {**self.metadata, "format_version": PROFILE_FORMAT_VERSION},
        }

    @classmethod
    def from_json(cls, data, where: str = "profile", windows: dict[int, torch.Tensor] | None = None,
                  logit_windows: dict[int, torch.Tensor] | None = None) -> "Profile":
        """Parse and validate :meth:`to_json` output; anything malformed is a ProfileError."""
        if not isinstance(data, Mapping) or data.get("format") != PROFILE_FORMAT:
            raise ProfileError(f"{where} is not a moeprune profile (no \"format\": \"{PROFILE_FORMAT}\"); {_REBUILD}")
        if data.get("format_version") != PROFILE_FORMAT_VERSION:
            raise ProfileError(
                f"{where} has profile format version {data.get('format_version')!r}, this moeprune "
                f"({__version__}) reads version {PROFILE_FORMAT_VERSION}; {_REBUILD}"
            )
        missing = [k for k in _REQUIRED_KEYS if k not in data]
        if missing:
            raise ProfileError(f"{where} lacks {missing}; the file is incomplete, {_REBUILD}")
        if not isinstance(data["metadata"], Mapping) or not isinstance(data["budget"], Mapping):
            raise ProfileError(f"{where}: metadata and budget must be objects; {_REBUILD}")
        profile = cls(
            task=data["task"],
            method=str(data["method"]),
            budget=dict(data["budget"]),
            scores=_int_keys(data["scores"], "scores", where),
            kept=_int_keys(data["kept"], "kept", where),
            signature=_int_keys(data["signature"], "signature", where),
            metadata=dict(data["metadata"]),
            protected=_int_keys(data.get("protected", {}), "protected", where),
            collapse_groups=bool(data.get("collapse_groups", False)),
            windows=dict(windows or {}),
            logit_windows=dict(logit_windows or {}),
        )
        profile.validate(where)
        return profile


def _compact_json(obj) -> str:
    """JSON with 2-space indentation but each list of numbers on one line (readable vectors)."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False)

    def inline(match: re.Match) -> str:
        return "[" + ", ".join(item.strip() for item in match.group(1).split(",")) + "]"

    return re.sub(r"\[\s*([-+0-9.eE,\s]+?)\s*\]", inline, text) + "\n"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------
# the store


class ProfileStore:
    """A folder of profiles: ``<name>.json`` plus ``<name>.safetensors`` (window signatures:
    tensors ``windows.<length>`` (TCESS) and ``logit_windows.<length>`` (mean router logits), float16)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()

    def __repr__(self) -> str:
        return f"ProfileStore({str(self.folder)!r})"

    @classmethod
    def default(cls) -> "ProfileStore":
        """The profiles shipped with moeprune for the default testbed (``moeprune._profiles``)."""
        return cls(Path(str(resources.files("moeprune._profiles"))))

    def _existing(self) -> Path:
        if not self.folder.is_dir():
            raise ProfileError(
                f"profile store {self.folder} does not exist or is not a folder; build profiles into it with "
                f"`moeprune profile build MODEL --task NAME --data FILE --store {self.folder}`"
            )
        return self.folder

    def names(self) -> list[str]:
        """Names of the profiles in the store (``*.json`` files), sorted."""
        return sorted(p.stem for p in self._existing().glob("*.json") if not p.name.startswith("."))

    def path(self, name: str) -> Path:
        return self.folder / f"{check_profile_name(name)}.json"

    def __contains__(self, name: str) -> bool:
        return self.folder.is_dir() and (self.folder / f"{name}.json").is_file()

    def load(self, name: str) -> Profile:
        """The validated profile ``name``; missing, corrupt or foreign files are a ProfileError."""
        path = self.path(name)
        if not path.is_file():
            known = ", ".join(self.names()) or "none"
            raise ProfileError(f"no profile {name!r} in store {self.folder} (profiles: {known}); build it with "
                               "`moeprune profile build` or pick another --task")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProfileError(f"{path} is corrupt (not valid JSON: {exc}); {_REBUILD}") from None
        windows = self._load_windows(path, data)
        profile = Profile.from_json(data, where=str(path), windows=windows.get("windows"),
                                    logit_windows=windows.get("logit_windows"))
        if profile.task != name:
            raise ProfileError(f"{path} holds profile {profile.task!r}, not {name!r}; rename the file or {_REBUILD}")
        return profile

    def _load_windows(self, path: Path, data) -> dict[str, dict[int, torch.Tensor]]:
        """``{"windows": {length: tensor}, "logit_windows": {...}}`` from the file the JSON names."""
        info = data.get("windows") if isinstance(data, Mapping) else None
        if not info:
            return {}
        from safetensors import safe_open

        if not isinstance(info, Mapping) or "file" not in info or "sha256" not in info:
            raise ProfileError(f"{path}: 'windows' must name a file and its sha256; {_REBUILD}")
        file = self.folder / Path(str(info["file"])).name
        if not file.is_file():
            raise ProfileError(f"{path} refers to {file.name}, which is missing from {self.folder}; {_REBUILD}")
        if _sha256(file) != info["sha256"]:
            raise ProfileError(f"{file} does not match the checksum recorded in {path.name} (corrupt or from "
                               f"another build); {_REBUILD}")
        try:
            tables: dict[str, dict[int, torch.Tensor]] = {}
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    kind, length = key.split(".", 1)
                    tables.setdefault(kind, {})[int(length)] = handle.get_tensor(key).double()
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise ProfileError(f"cannot read window signatures from {file}: {exc}; {_REBUILD}") from exc
        stray = sorted(set(tables) - {"windows", "logit_windows"})
        if stray:
            raise ProfileError(f"{file} holds unknown tensors {stray}; {_REBUILD}")
        return tables

    def load_all(self) -> dict[str, Profile]:
        """Every profile of the store, by name."""
        return {name: self.load(name) for name in self.names()}

    def check_writable(self, name: str, overwrite: bool = False) -> Path:
        """Raise OutputExistsError if profile ``name`` exists and ``overwrite`` is False."""
        path = self.path(name)
        if path.exists() and not overwrite:
            raise OutputExistsError(f"profile {name!r} exists in {self.folder}; pass --overwrite to replace it, "
                                    "or choose another --task/--name")
        if self.folder.exists() and not self.folder.is_dir():
            raise ProfileError(f"profile store {self.folder} is a file; choose a folder for --store")
        return path

    def save(self, profile: Profile, overwrite: bool = False) -> Path:
        """Write ``profile`` (validated) as ``<task>.json`` and ``<task>.safetensors``; returns the JSON path.

        Each file is written to a temporary name and renamed, the windows first, so a reader never
        sees a JSON whose window file is half-written.
        """
        from safetensors.torch import save_file

        from .io.output import atomic_write_text

        profile.validate(f"profile {profile.task!r}")
        path = self.check_writable(profile.task, overwrite)
        self.folder.mkdir(parents=True, exist_ok=True)
        data = profile.to_json()
        windows_file = self.folder / f"{profile.task}.safetensors"
        if profile.windows or profile.logit_windows:
            fd, tmp = tempfile.mkstemp(prefix=f".{windows_file.name}.tmp-", dir=self.folder)
            os.close(fd)
            try:
                tensors = {f"{kind}.{length}": t.to(torch.float16).contiguous()
                           for kind, table in (("windows", profile.windows), ("logit_windows", profile.logit_windows))
                           for length, t in sorted(table.items())}
                save_file(tensors, tmp, metadata={"format": PROFILE_FORMAT, "task": profile.task})
                os.chmod(tmp, 0o644)
                os.replace(tmp, windows_file)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            data["windows"] = {"file": windows_file.name, "sha256": _sha256(windows_file),
                               "kinds": [k for k, t in (("tcess", profile.windows), ("logits", profile.logit_windows)) if t],
                               "lengths": sorted(set(profile.windows) | set(profile.logit_windows)),
                               "count": {str(k): int(v.shape[0]) for k, v in sorted(profile.windows.items())}}
        elif windows_file.exists():
            windows_file.unlink()
        atomic_write_text(path, _compact_json(data), overwrite=True)
        logger.info("saved profile %s to %s", profile.task, path)
        return path


def _as_store(store) -> ProfileStore:
    if store is None:
        return ProfileStore.default()
    return store if isinstance(store, ProfileStore) else ProfileStore(store)


# --------------------------------------------------------------------------------------------------
# signatures of prompts: embeddings + the first decoder layers only


class SignatureExtractor:
    """Router signatures of token sequences at a few early MoE layers.

    Holds the embedding table and decoder layers ``0 .. max(layers)`` only (read lazily from the
    safetensors shards, as the sequential calibration engine does); later layers, the final norm and
    the LM head are never loaded.
    """

    def __init__(self, model_dir: str | Path, layers: Sequence[int], *, tcess_pool: int, tcess_r: float | None = None,
                 dtype: torch.dtype = torch.float32):
        from .arch import build_skeleton, decoder_layers, family_for_model_type, moe_layer_indices, read_config
        from .calibration.engine import load_module_weights
        from .collect import prepare_experts_implementation
        from .io.checkpoint import LazyCheckpoint

        self.model_dir = Path(model_dir)
        config = read_config(self.model_dir)
        self.family = family_for_model_type(config.model_type)
        model = build_skeleton(config)
        prepare_experts_implementation(model)
        moe = moe_layer_indices(self.family, model)
        self.layers = sorted(set(int(x) for x in layers))
        bad = [layer for layer in self.layers if layer not in moe]
        if not self.layers or bad:
            raise ProfileError(f"signature layers {bad or 'none'} are not MoE layers of {self.model_dir} (MoE layers: {moe})")
        self.tcess_pool = int(tcess_pool)
        self.tcess_r = tcess_r
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or 0) or None
        checkpoint = LazyCheckpoint(self.model_dir)
        load_module_weights(model.model.embed_tokens, {"weight": checkpoint.get("model.embed_tokens.weight").to(dtype)})
        self.depth = max(self.layers)
        blocks = decoder_layers(model)
        for index in range(self.depth + 1):
            load_module_weights(blocks[index], self.family.layer_state_dict(checkpoint, index, blocks[index], dtype=dtype))
        checkpoint.close()
        self.model = model
        self._tokenizer = None
        logger.debug("signature extractor: embeddings + decoder layers 0..%d of %s", self.depth, self.model_dir)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .api import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_dir, "matching prompts needs the checkpoint's tokenizer files")
        return self._tokenizer

    @torch.no_grad()
    def router_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[int, torch.Tensor]:
        """Raw router logits [B, S, E] of every signature layer for one batch."""
        from .arch import decoder_layers
        from .calibration.engine import capture_layer_inputs

        first, kwargs = capture_layer_inputs(self.model, [(input_ids, attention_mask)])
        hidden = first[0]
        first.close()
        captured: dict[int, torch.Tensor] = {}
        blocks = decoder_layers(self.model)

        def hook(layer):
            def record(module, args, output):
                logits = output[0] if isinstance(output, tuple) else output
                captured[layer] = logits.detach().reshape(*input_ids.shape, logits.shape[-1])
            return record

        handles = [self.family.router(blocks[layer]).register_forward_hook(hook(layer)) for layer in self.layers]
        try:
            for index in range(self.depth + 1):
                hidden = blocks[index](hidden, **kwargs[0][index])
        finally:
            for handle in handles:
                handle.remove()
        return captured

    def signatures_of_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          batch_size: int = 8, progress: bool = False,
                          kinds: Sequence[str] = ("tcess",)) -> torch.Tensor | dict[str, torch.Tensor]:
        """One signature per row: [N, len(layers), E] float64 (padding, mask 0, never counts).

        ``kinds`` (see :data:`SIGNATURE_KINDS`): one kind gives its tensor, several a dict kind ->
        tensor, all from one forward pass.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows: dict[str, list[torch.Tensor]] = {kind: [] for kind in kinds}
        starts = range(0, input_ids.shape[0], batch_size)
        for start in tqdm(starts, desc="signatures", disable=not progress, leave=False):
            ids, mask = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
            logits = self.router_logits(ids, mask)
            for row in range(ids.shape[0]):
                valid = mask[row].bool()
                for kind in kinds:
                    rows[kind].append(torch.stack([
                        token_set_signature(logits[layer][row][valid], kind, self.tcess_pool, self.tcess_r)
                        for layer in self.layers]))
        stacked = {kind: torch.stack(values) for kind, values in rows.items()}
        return stacked[kinds[0]] if len(kinds) == 1 else stacked

    def encode(self, texts: Sequence[str], max_tokens: int | None = None) -> list[list[int]]:
        """Token ids of each text (the tokenizer's own special tokens), cut to ``max_tokens``."""
        limits = [x for x in (max_tokens, self.max_positions) if x]
        limit = min(limits) if limits else None
        encoded = []
        for index, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ProfileError(f"prompt {index} is empty; give a non-empty --prompt (or non-empty rows in --prompts)")
            ids = self.tokenizer(text)["input_ids"]
            encoded.append(ids[:limit] if limit else ids)
        return encoded

    def signatures(self, texts: Sequence[str], max_tokens: int | None = None, batch_size: int = 8,
                   progress: bool = False, kind: str = "tcess") -> tuple[torch.Tensor, list[int]]:
        """Signatures [N, len(layers), E] of texts (``kind``: tcess or logits) and their token counts
        (right-padded batches)."""
        if not texts:
            raise ProfileError("no prompts given; pass --prompt TEXT or a --prompts file with rows")
        encoded = self.encode(texts, max_tokens)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, index in enumerate(order):
            input_ids[row, :len(encoded[index])] = torch.tensor(encoded[index])
            mask[row, :len(encoded[index])] = 1
        chunks = []
        for start in range(0, len(order), batch_size):
            stop = start + batch_size
            used = int(mask[start:stop].sum(dim=1).max())
            chunks.append(self.signatures_of_ids(input_ids[start:stop, :used], mask[start:stop, :used], batch_size,
                                                 kinds=(kind,)))
        stacked = torch.cat(chunks)
        result = torch.empty_like(stacked)
        result[torch.tensor(order)] = stacked
        return result, [len(ids) for ids in encoded]


def _spread(count: int, wanted: int) -> torch.Tensor:
    """At most ``wanted`` evenly spread indices of ``range(count)``."""
    if count <= wanted:
        return torch.arange(count)
    return torch.linspace(0, count - 1, wanted).round().long().unique()


def calibration_windows(input_ids: torch.Tensor, length: int, max_windows: int,
                        eos_token_id: int | None = None) -> torch.Tensor:
    """``length``-token windows of the packed calibration rows [N, S], [n <= max_windows, length].

    With ``eos_token_id``, up to half are document starts (the ``length`` tokens after an eos, evenly
    spread over those that fit in their row: prompts usually open a document); the rest are evenly
    spread non-overlapping windows of the rows. Empty when rows are shorter than ``length``.
    """
    rows, width = input_ids.shape
    per_row = width // length
    if per_row == 0 or max_windows < 1:
        return input_ids.new_empty(0, length)
    chosen: list[tuple[int, int]] = []
    if eos_token_id is not None:
        after_eos = (input_ids[:, :width - length] == eos_token_id).nonzero().tolist()
        starts = [(row, position + 1) for row, position in after_eos]
        chosen = [starts[i] for i in _spread(len(starts), max_windows // 2).tolist()]
    taken = set(chosen)
    grid = [(row, k * length) for row in range(rows) for k in range(per_row)]
    grid = [cell for cell in grid if cell not in taken]
    chosen += [grid[i] for i in _spread(len(grid), max_windows - len(chosen)).tolist()]
    chosen.sort()
    return torch.stack([input_ids[row, start:start + length] for row, start in chosen])


# --------------------------------------------------------------------------------------------------
# building


def build_profile(
    model_dir: str | Path,
    task: str,
    data: str | Path,
    *,
    method: str = "tcess",
    keep: int | None = None,
    ratio: float | None = None,
    samples: int = 64,
    seq_len: int = 512,
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
    progress: bool = True,
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
    """
    from . import api
    from .collect import tcess_pool_size
    from .plan import resolve_budget, validate_budget
    from .scoring import get_scorer, score_all
    from .stats import RouterStats

    check_profile_name(task)
    if ratio is None and keep is None:
        ratio = DEFAULT_RATIO
    info = api.model_info(model_dir)
    geometry = info.geometry
    get_scorer(method)
    validate_budget(geometry, resolve_budget(geometry, ratio=ratio, keep=keep, collapse_groups=collapse_groups),
                    collapse_groups=collapse_groups)
    if signature_layers < 1:
        raise ProfileError("--signature-layers must be at least 1")
    if window_samples < 1:
        raise ProfileError("--window-samples must be at least 1 (rows the matcher's calibration windows are cut from)")
    calibration = api.calibration_data(model_dir, data, samples=samples, seq_len=seq_len, seed=seed,
                                       chat_template=chat_template, text_field=text_field)
    if isinstance(stats, (str, Path)):
        stats = RouterStats.load(stats)
    if stats is None:
        stats = api.collect(model_dir, calibration=calibration, batch_size=batch_size, mode=mode, progress=progress)
    elif stats.metadata.get("data_hash") != calibration.data_hash:
        raise ProfileError(
            "the statistics were collected on other tokens than --data with these --samples/--seq-len/--seed "
            "(data hashes differ); pass the same data and sizes, or leave out the statistics"
        )
    plan = api.plan_pruning(model_dir, method=method, ratio=ratio, keep=keep, stats=stats,
                            protect_super_experts=protect_super_experts, collapse_groups=collapse_groups, seed=seed)
    scores = score_all(method, stats, seed=seed)
    sig_layers = list(geometry.moe_layers[:signature_layers])
    signature = {}
    for layer in sig_layers:
        entries = stats.layers[layer]
        signature[layer] = (entries["tcess"].double() / entries["tokens"].double().clamp(min=1)).tolist()
    pool = tcess_pool_size(geometry.num_experts, geometry.top_k, stats.metadata.get("tcess_pool"))
    tcess_r = stats.metadata.get("tcess_r")
    extractor = SignatureExtractor(model_dir, sig_layers, tcess_pool=pool, tcess_r=tcess_r)
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
        "format_version": PROFILE_FORMAT_VERSION,
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
        "window_rows": int(window_rows.shape[0]),
        "moeprune_version": __version__,
        "created": utc_timestamp(),
    }
    profile = Profile(task=task, method=method, budget=plan.budget,
                      scores={layer: s.tolist() for layer, s in scores.items()}, kept=plan.layers,
                      signature=signature, metadata=metadata, protected=plan.protected,
                      collapse_groups=plan.collapse_groups, windows=windows, logit_windows=logit_windows)
    profile.validate(f"profile {task!r}")
    logger.info("profile %s: %s, kept %s experts per MoE layer", task, method, sorted(set(profile.kept_counts().values())))
    return profile


def rebudget_profile(profile: Profile, *, ratio: float | None = None, keep: int | None = None) -> Profile:
    """The same profile with its kept sets re-selected from its scores at another budget."""
    if (ratio is None) == (keep is None):
        raise ProfileError("give exactly one budget: --ratio (fraction removed) or --keep (experts kept)")
    scores = {layer: torch.tensor(v, dtype=torch.float64) for layer, v in profile.scores.items()}
    plan = build_plan(profile.geometry, scores, method=profile.method, ratio=ratio, keep=keep,
                      protected=profile.protected, collapse_groups=profile.collapse_groups)
    return replace(profile, budget=plan.budget, kept=plan.layers, metadata=dict(profile.metadata))


# --------------------------------------------------------------------------------------------------
# combining


def _check_signature_settings(first: Profile, other: Profile) -> None:
    """Raise unless both profiles computed their TCESS signatures with the same pool and threshold."""
    for key in ("tcess_pool", "tcess_r"):
        if other.metadata.get(key) != first.metadata.get(key):
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


# --------------------------------------------------------------------------------------------------
# model identity, export and loading


def check_profile_model(profile: Profile, model_dir: str | Path, *, _identity: tuple | None = None):
    """Raise unless ``profile`` was built for this model's architecture; warn if only weights differ.

    Returns the model's :class:`moeprune.api.ModelInfo`.
    """
    from . import api

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
    and is refused; load it with :func:`load_profile` instead.
    """
    from .apply import write_pruned_checkpoint
    from .io.output import check_output

    check_output(out, overwrite, protect=[model_dir])
    plan = profile_plan(profile, model_dir)
    counts = sorted(set(plan.kept_counts().values()))
    if len(counts) > 1:
        raise ProfileError(
            f"profile {profile.task!r} keeps {counts} experts in different layers; a vanilla transformers checkpoint "
            "holds one expert count per model. Load it with moeprune's partial loader (load_profile), or export a "
            "mixed profile (`moeprune profile combine --mode mix`) or a rebudgeted one (--ratio/--keep)"
        )
    description = f"task profile {profile.task!r} ({profile.method}, data {profile.metadata.get('data_file', '')})"
    return write_pruned_checkpoint(model_dir, plan, out, overwrite=overwrite, data_description=description,
                                   progress=progress)


def load_profile(model_dir: str | Path, profile: Profile, **kw):
    """The model with only ``profile``'s experts, read from disk by moeprune's partial loader.

    Validates the profile against the model first; ``kw`` go to
    :func:`moeprune.loader.load_with_experts` (e.g. ``dtype``, ``shared``). Profiles that keep
    different numbers of experts per layer (union/intersection) load too.
    """
    profile_plan(profile, model_dir)
    from .loader import load_with_experts

    kw.setdefault("collapse_groups", profile.collapse_groups)
    return load_with_experts(model_dir, profile.kept, **kw)


# --------------------------------------------------------------------------------------------------
# retrieval


@dataclass(frozen=True)
class Match:
    """A retrieval decision for one prompt.

    Attributes:
        profile: the profile to use (the fallback profile when ``fallback``).
        confidence: in [0, 1]: :func:`match_confidence` for the distance rules; for the
            ``classifier`` rule, the margin between the two largest class probabilities (or
            ``1 - threshold / distance`` when the prompt falls back).
        distance: distance of the prompt's signature to the chosen profile.
        fallback: True when the nearest profile was farther than its threshold.
        nearest: the chosen profile: the nearest one, or the classifier's most probable one
            (equals ``profile`` unless ``fallback``).
        threshold: the nearest profile's fallback threshold for this prompt length (inf: none).
        tokens: prompt tokens the signature was computed from.
        distances: distance to every candidate profile.
    """

    profile: str
    confidence: float
    distance: float
    fallback: bool
    nearest: str
    threshold: float
    tokens: int
    distances: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"profile": self.profile, "confidence": round(self.confidence, 6), "distance": self.distance,
                "fallback": self.fallback, "nearest": self.nearest,
                "threshold": None if math.isinf(self.threshold) else self.threshold, "tokens": self.tokens}


class ProfileMatcher:
    """Nearest-profile retrieval from a prompt's own router signature (PreMoe).

    Args:
        model_dir: the checkpoint the profiles were built for (architecture checked).
        store: a :class:`ProfileStore`, a folder, or a sequence of profiles (default: shipped store).
        layers: None (default: every MoE layer the profiles store a signature for, the first 4), an
            int n (the first n of them; PreMoe uses 1) or explicit decoder-layer indices.
        metric: ``l2`` (PreMoe) or ``cosine``.
        reference: ``classifier`` (default): a multinomial logistic regression (scikit-learn,
            standardised features, C = :data:`CLASSIFIER_C`) trained on the candidates' calibration
            windows of the stored length closest to the prompt's, on the mean raw router logits of
            the chosen layers; the prompt goes to the most probable profile. ``windows``: mean
            distance (TCESS signatures) to the ``neighbours`` nearest of the profile's calibration
            windows of the stored length closest to the prompt's (a k-nearest-neighbour rule that
            copes with domains whose routing is multi-modal); ``centroid`` (PreMoe): distance to the
            profile's TCESS signature. PreMoe's own rule is ``layers=1, metric="l2",
            reference="centroid"``; the defaults retrieved best on the testbeds' validation prompts
            (docs/profiles.md).
        fallback: name of the profile returned when the prompt is far from every other profile
            (``general``), or None to always return the nearest.
        quantile, margin: the fallback rule: a prompt of n tokens falls back when its distance to the
            chosen profile p exceeds ``margin x quantile_q`` of the same distance measured from p's
            own calibration windows of the stored length closest to n (to p's signature for
            ``centroid``; to their k nearest other windows for ``windows`` and, in mean-logit space,
            for ``classifier``).
        extractor: reuse a :class:`SignatureExtractor` covering these layers (shares its weights).

    Only the embeddings and decoder layers up to the deepest signature layer are loaded. Candidates
    are all profiles except the fallback profile.
    """

    def __init__(self, model_dir: str | Path, store=None, layers: int | Sequence[int] | None = None, metric: str = "l2",
                 fallback: str | None = GENERAL, *, reference: str = DEFAULT_REFERENCE, neighbours: int = DEFAULT_NEIGHBOURS,
                 quantile: float = FALLBACK_QUANTILE, margin: float = FALLBACK_MARGIN,
                 dtype: torch.dtype = torch.float32, extractor: SignatureExtractor | None = None, batch_size: int = 8):
        if metric not in METRICS:
            raise ProfileError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        if reference not in REFERENCES:
            raise ProfileError(f"unknown reference {reference!r}; choose one of {', '.join(REFERENCES)}")
        if neighbours < 1:
            raise ProfileError("--neighbours must be at least 1")
        if not 0.0 < quantile <= 1.0 or margin <= 0:
            raise ProfileError("the fallback quantile must be in (0, 1] and the margin positive")
        if isinstance(store, Sequence) and not isinstance(store, (str, bytes)):
            profiles = {p.task: p for p in store}
        else:
            profiles = _as_store(store).load_all()
        if fallback is not None and fallback not in profiles:
            raise ProfileError(
                f"the store has no fallback profile {fallback!r} (profiles: {', '.join(sorted(profiles)) or 'none'}); "
                f"build it with `moeprune profile combine --mode mix --name {fallback} ...` or disable the fallback "
                "(--no-fallback)"
            )
        candidates = {name: p for name, p in sorted(profiles.items()) if name != fallback}
        if not candidates:
            raise ProfileError("the store holds no profile to match against; build some with `moeprune profile build`")
        first = next(iter(profiles.values()))
        from . import api

        identity = (api.model_info(model_dir), architecture_fingerprint(model_dir))
        for profile in profiles.values():
            check_profile_model(profile, model_dir, _identity=identity)
            _check_signature_settings(first, profile)
            if reference != "centroid" and profile.task in candidates and not self._window_table(profile, reference):
                other = "centroid" if reference == "windows" else "windows or --reference centroid"
                raise ProfileError(f"profile {profile.task!r} has no calibration windows for --reference {reference}; "
                                   f"{_REBUILD}, or use --reference {other}")
        stored = sorted(set.intersection(*(set(p.signature_layers) for p in candidates.values())))
        if layers is None:
            self.layers = stored
        elif isinstance(layers, int):
            if not 1 <= layers <= len(stored):
                raise ProfileError(f"--layers {layers}: the profiles store signatures of {len(stored)} MoE layers "
                                   f"{stored}; use 1..{len(stored)}")
            self.layers = stored[:layers]
        else:
            self.layers = sorted(set(int(x) for x in layers))
            missing = sorted(set(self.layers) - set(stored))
            if missing or not self.layers:
                raise ProfileError(f"signature layers {missing or 'none'} are not stored by every profile (stored: {stored})")
        self.metric = metric
        self.reference = reference
        self.kind = "logits" if reference == "classifier" else "tcess"
        self.neighbours = neighbours
        self.fallback = fallback
        self.quantile = quantile
        self.margin = margin
        self.batch_size = batch_size
        self.names = list(candidates)
        self.profiles = profiles
        self.references = torch.stack([candidates[n].signature_tensor(self.layers).reshape(-1) for n in self.names])
        self.windows = {name: {length: self._flat_windows(p, w)
                               for length, w in sorted(self._window_table(p, reference).items())}
                        for name, p in candidates.items()}
        self._classifiers: dict[int, object] = {}
        #: window lengths every candidate stores: one classifier each
        self.classifier_lengths = sorted(set.intersection(*(set(w) for w in self.windows.values())))
        if reference == "classifier" and not self.classifier_lengths:
            raise ProfileError("the profiles share no calibration window length, so no classifier can be trained; "
                               f"{_REBUILD} with the same --seq-len, or use --reference windows")
        self.thresholds = {name: self._thresholds(p) for name, p in candidates.items()} if fallback else {}
        if extractor is not None:
            if not set(self.layers) <= set(extractor.layers):
                raise ProfileError(f"the extractor covers layers {extractor.layers}, not {self.layers}")
            self.extractor = extractor
        else:
            self.extractor = SignatureExtractor(model_dir, self.layers, tcess_pool=first.metadata["tcess_pool"],
                                                tcess_r=first.metadata.get("tcess_r"), dtype=dtype)
        self._columns = [self.extractor.layers.index(layer) for layer in self.layers]

    @staticmethod
    def _window_table(profile: Profile, reference: str) -> dict[int, torch.Tensor]:
        """The profile's windows a rule works on: mean logits for ``classifier``, else TCESS."""
        return profile.logit_windows if reference == "classifier" else profile.windows

    def _flat_windows(self, profile: Profile, windows: torch.Tensor) -> torch.Tensor:
        """Window signatures [n, L, E] of ``profile`` reduced to this matcher's layers, [n, L' x E]."""
        positions = [profile.signature_layers.index(layer) for layer in self.layers]
        return windows[:, positions].reshape(windows.shape[0], -1)

    def _thresholds(self, profile: Profile) -> dict[int, float]:
        """Window length -> fallback threshold of ``profile`` for this matcher's layers, metric and reference."""
        if not profile.windows:
            raise ProfileError(f"profile {profile.task!r} has no calibration windows, so the fallback threshold is "
                               f"unknown; {_REBUILD}, or disable the fallback (--no-fallback)")
        table = {}
        for length, windows in self.windows[profile.task].items():
            if self.reference == "centroid":
                spread = signature_distances(windows, profile.signature_tensor(self.layers).reshape(1, -1), self.metric)[:, 0]
            else:
                spread = knn_distances(windows, windows, self.neighbours, self.metric, leave_one_out=True)
            table[length] = fallback_threshold(spread, self.quantile, self.margin)
        return table

    def threshold(self, name: str, tokens: int) -> float:
        """Fallback threshold of candidate ``name`` for a prompt of ``tokens`` tokens (inf: no fallback)."""
        if not self.fallback:
            return math.inf
        table = self.thresholds[name]
        return table[nearest_length(table, tokens)]

    def distances(self, signatures: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
        """Distances [N, candidates] of signatures [N, len(layers), E] of prompts of ``tokens`` tokens
        (for ``classifier``: k-nearest-window distances in mean-logit space, the fallback measure)."""
        flat = signatures.reshape(signatures.shape[0], -1)
        if self.reference == "centroid":
            return signature_distances(flat, self.references, self.metric)
        out = torch.empty(flat.shape[0], len(self.names), dtype=torch.float64)
        for column, name in enumerate(self.names):
            table = self.windows[name]
            for length, rows in rows_by_nearest_length(table, tokens).items():
                out[rows, column] = knn_distances(flat[rows], table[length], self.neighbours, self.metric)
        return out

    def classifier(self, length: int):
        """The fitted classifier of window length ``length`` (trained on first use, then cached)."""
        if length not in self._classifiers:
            from sklearn.linear_model import LogisticRegression
            from sklearn.pipeline import make_pipeline
            from sklearn.preprocessing import StandardScaler

            features = torch.cat([self.windows[name][length] for name in self.names]).numpy()
            labels = [index for index, name in enumerate(self.names) for _ in range(self.windows[name][length].shape[0])]
            model = make_pipeline(StandardScaler(), LogisticRegression(C=CLASSIFIER_C, max_iter=5000))
            self._classifiers[length] = model.fit(features, labels)
        return self._classifiers[length]

    def fit(self) -> "ProfileMatcher":
        """Train the classifiers of every stored window length now (the ``classifier`` rule trains
        each on first use otherwise, 0.5-2.5 s on one thread for four profiles); returns self."""
        if self.reference == "classifier" and len(self.names) > 1:
            for length in self.classifier_lengths:
                self.classifier(length)
        return self

    def probabilities(self, signatures: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
        """Class probabilities [N, candidates] of mean-logit signatures [N, len(layers), E] (the
        ``classifier`` rule; each prompt is scored by the classifier of its nearest window length)."""
        if len(self.names) == 1:
            return torch.ones(signatures.shape[0], 1, dtype=torch.float64)
        flat = signatures.reshape(signatures.shape[0], -1).double()
        out = torch.empty(flat.shape[0], len(self.names), dtype=torch.float64)
        for length, rows in rows_by_nearest_length(self.classifier_lengths, tokens).items():
            # labels are the candidate indices 0..C-1, every one present, so classes_ is in that order
            out[rows] = torch.from_numpy(self.classifier(length).predict_proba(flat[rows].numpy())).double()
        return out

    def signatures(self, prompts: Sequence[str], max_tokens: int | None = None) -> tuple[torch.Tensor, list[int]]:
        """Signatures [N, len(layers), E] of the prompts at this matcher's layers (TCESS, or mean logits
        for ``classifier``), and token counts."""
        sigs, tokens = self.extractor.signatures(prompts, max_tokens, self.batch_size, kind=self.kind)
        return sigs[:, self._columns], tokens

    def signatures_of_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Signatures [N, len(layers), E] of token-id rows [N, S] (all tokens count), as :meth:`signatures`."""
        return self.extractor.signatures_of_ids(input_ids, batch_size=self.batch_size, kinds=(self.kind,))[:, self._columns]

    def signature(self, prompt: str, max_tokens: int | None = None) -> torch.Tensor:
        """The prompt's signature [len(layers), E] (float64; see :meth:`signatures`)."""
        return self.signatures([prompt], max_tokens)[0][0]

    def match_signatures(self, signatures: torch.Tensor, tokens: Sequence[int]) -> list[Match]:
        """Decisions for precomputed signatures [N, len(layers), E] of prompts of ``tokens`` tokens
        (of this matcher's kind: :meth:`signatures`)."""
        distances = self.distances(signatures, tokens)
        probabilities = self.probabilities(signatures, tokens) if self.reference == "classifier" else None
        matches = []
        for index, (row, count) in enumerate(zip(distances, tokens)):
            if probabilities is None:
                order = torch.argsort(row).tolist()
            else:
                order = torch.argsort(probabilities[index], descending=True).tolist()
            best = self.names[order[0]]
            d1 = float(row[order[0]])
            tau = self.threshold(best, int(count))
            fell_back = d1 > tau
            if probabilities is None:
                d2 = float(row[order[1]]) if len(order) > 1 else math.inf
                confidence = match_confidence(d1, d2, tau)
            else:
                p = probabilities[index]
                margin = float(p[order[0]] - p[order[1]]) if len(order) > 1 else 1.0
                confidence = 1.0 - tau / d1 if fell_back else margin
            matches.append(Match(
                profile=self.fallback if fell_back else best, confidence=confidence, distance=d1,
                fallback=fell_back, nearest=best, threshold=tau, tokens=int(count),
                distances={name: float(d) for name, d in zip(self.names, row)},
            ))
        return matches

    def match_many(self, prompts: Sequence[str], max_tokens: int | None = None) -> list[Match]:
        """One :class:`Match` per prompt."""
        signatures, tokens = self.signatures(prompts, max_tokens)
        return self.match_signatures(signatures, tokens)

    def match(self, prompt: str, max_tokens: int | None = None) -> Match:
        """The nearest profile of ``prompt`` (or the fallback profile), with a confidence."""
        return self.match_many([prompt], max_tokens)[0]
