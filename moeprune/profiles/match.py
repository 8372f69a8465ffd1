"""Retrieval: the nearest profile of a prompt from its own router signature (PreMoe's TAER), by a
classifier on calibration windows, k nearest windows, or the profile's centroid; with a fallback
profile far from every other one. The distance and confidence formulas are pure functions."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import api
from ..io.fingerprint import architecture_fingerprint
from ..observe.tcess import TCESS_BINS
from .combine import _check_signature_settings
from .export import check_profile_model
from .profile import Profile
from .settings import (_REBUILD, CLASSIFIER_C, DEFAULT_NEIGHBOURS, DEFAULT_REFERENCE, FALLBACK_MARGIN,
                       FALLBACK_QUANTILE, GENERAL, METRICS, REFERENCES, ProfileError)
from .signatures import SignatureExtractor
from .store import _as_store


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
                                                tcess_r=first.metadata.get("tcess_r"),
                                                tcess_bins=first.metadata.get("tcess_bins", TCESS_BINS), dtype=dtype)
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
