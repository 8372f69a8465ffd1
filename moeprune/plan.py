"""Pruning plans: budgets, expert selection, validation and the ``moeprune_plan.json`` artifact.

A :class:`Plan` says, per MoE decoder layer, which routed experts to KEEP (indices in the original
numbering). It is produced from scores (:mod:`moeprune.scoring`) and a budget, is validated against
the model's :class:`~moeprune.geometry.MoEGeometry` before any weight is read, and is saved as JSON
so that a prune can be reviewed, edited by hand and replayed.

Routing constraints enforced here:

* every layer keeps at least ``top_k`` experts (otherwise the router cannot select top-k);
* group-limited routing (DeepSeek-V3, Kimi-K2, GLM-4.5: ``n_group > 1``) keeps the same number of
  experts in every group, at least ``min_experts_per_group`` each, and enough that the
  ``topk_group`` selectable groups still hold ``top_k`` experts -- unless ``collapse_groups`` is
  set, in which case the pruned model routes with ``n_group = topk_group = 1``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import __version__
from .errors import PlanError
from .geometry import MoEGeometry

logger = logging.getLogger(__name__)

PLAN_FILENAME = "moeprune_plan.json"
PLAN_FORMAT_VERSION = 1
_RATIO_EPS = 1e-9

_COLLAPSE_HINT = "use a different budget or pass --collapse-groups to set n_group = topk_group = 1"
_PROTECT_HINT = "pass --no-protect-super-experts or give a larger budget"


def utc_timestamp() -> str:
    """Now, UTC, ISO 8601 to the second: the ``created`` field of plans and profiles."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------
# the plan


@dataclass
class Plan:
    """Which routed experts each MoE layer keeps.

    Attributes:
        layers: decoder-layer index -> sorted kept expert indices (original numbering). MoE layers
            absent from the mapping keep all experts.
        method: scoring method that ranked the experts (or e.g. ``"manual"``).
        budget: the budget as the user gave it, e.g. ``{"ratio": 0.5}``, ``{"keep": 4}`` or
            ``{"per_layer": {3: 4, 5: 0.25}}``.
        protected: layer -> experts that were kept regardless of score (super experts).
        model_fingerprint: fingerprint of the checkpoint the plan was made for ("" = unknown).
        family: routers/ family name of that checkpoint ("" = unknown).
        num_experts: routed experts per layer before pruning (0 = unknown).
        score_summary: per layer, min/max/mean of all scores and of the kept scores.
        collapse_groups: the pruned model routes with ``n_group = topk_group = 1``.
        calibration: where the statistics came from (data file and hash, samples, seq len).
        moeprune_version: version that wrote the plan.
        created: ISO-8601 creation time (UTC).
    """

    layers: dict[int, list[int]]
    method: str
    budget: dict = field(default_factory=dict)
    protected: dict[int, list[int]] = field(default_factory=dict)
    model_fingerprint: str = ""
    family: str = ""
    num_experts: int = 0
    score_summary: dict[int, dict[str, float]] = field(default_factory=dict)
    collapse_groups: bool = False
    calibration: dict = field(default_factory=dict)
    moeprune_version: str = __version__
    created: str = field(default_factory=utc_timestamp)

    # ---- queries -------------------------------------------------------------------------------

    def kept_counts(self) -> dict[int, int]:
        """Experts kept per listed layer."""
        return {layer: len(kept) for layer, kept in sorted(self.layers.items())}

    def dropped(self, num_experts: int | None = None) -> dict[int, list[int]]:
        """Experts removed per listed layer (pass ``num_experts`` if the plan lacks it)."""
        total = num_experts or self.num_experts
        if not total:
            raise PlanError("the plan does not record num_experts; pass the model's expert count")
        return {
            layer: sorted(set(range(total)) - set(kept))
            for layer, kept in sorted(self.layers.items())
        }

    # ---- JSON ----------------------------------------------------------------------------------

    def to_json(self) -> dict:
        """A JSON-serialisable dict; ``layers``/``protected``/``score_summary`` keys are strings."""
        budget = dict(self.budget)
        if isinstance(budget.get("per_layer"), Mapping):
            budget["per_layer"] = {str(k): v for k, v in budget["per_layer"].items()}
        return {
            "format_version": PLAN_FORMAT_VERSION,
            "method": self.method,
            "family": self.family,
            "model_fingerprint": self.model_fingerprint,
            "num_experts": self.num_experts,
            "budget": budget,
            "collapse_groups": self.collapse_groups,
            "layers": {str(layer): list(kept) for layer, kept in sorted(self.layers.items())},
            "protected": {str(layer): list(p) for layer, p in sorted(self.protected.items())},
            "score_summary": {
                str(layer): dict(s) for layer, s in sorted(self.score_summary.items())
            },
            "calibration": dict(self.calibration),
            "moeprune_version": self.moeprune_version,
            "created": self.created,
        }

    @classmethod
    def from_json(cls, data: object, *, source: str = "plan") -> "Plan":
        """Rebuild a plan from :meth:`to_json` output; anything malformed is a PlanError.

        Only ``layers`` and ``method`` are required (a hand-written plan may omit the rest).
        Expert lists are sorted; duplicates are kept so that :func:`validate_plan` can report them.
        """
        if not isinstance(data, Mapping):
            raise PlanError(f"{source}: a plan must be a JSON object, got {type(data).__name__}")
        version = data.get("format_version", PLAN_FORMAT_VERSION)
        if not isinstance(version, int) or version > PLAN_FORMAT_VERSION:
            raise PlanError(
                f"{source}: plan format {version!r} is newer than this moeprune reads "
                f"({PLAN_FORMAT_VERSION}); upgrade moeprune"
            )
        for key in ("layers", "method"):
            if key not in data:
                raise PlanError(f"{source}: the plan lacks the required key {key!r}")
        if not isinstance(data["method"], str):
            raise PlanError(f"{source}: 'method' must be a string")
        budget = data.get("budget", {})
        if not isinstance(budget, Mapping):
            raise PlanError(f"{source}: 'budget' must be an object")
        budget = dict(budget)
        if isinstance(budget.get("per_layer"), Mapping):
            budget["per_layer"] = {
                _layer_key(k, f"{source}: budget.per_layer"): v
                for k, v in budget["per_layer"].items()
            }
        summary = data.get("score_summary", {})
        if not isinstance(summary, Mapping):
            raise PlanError(f"{source}: 'score_summary' must be an object")
        try:
            num_experts = int(data.get("num_experts", 0))
        except (TypeError, ValueError):
            raise PlanError(f"{source}: 'num_experts' must be an integer") from None
        collapse = data.get("collapse_groups", False)
        if not isinstance(collapse, bool):
            raise PlanError(f"{source}: 'collapse_groups' must be true or false")
        return cls(
            layers=_expert_mapping(data["layers"], f"{source}: 'layers'"),
            method=data["method"],
            budget=budget,
            protected=_expert_mapping(data.get("protected", {}), f"{source}: 'protected'"),
            model_fingerprint=str(data.get("model_fingerprint", "") or ""),
            family=str(data.get("family", "") or ""),
            num_experts=num_experts,
            score_summary={
                _layer_key(k, f"{source}: 'score_summary'"): (
                    dict(v) if isinstance(v, Mapping) else v
                )
                for k, v in summary.items()
            },
            collapse_groups=collapse,
            calibration=dict(data.get("calibration", {}) or {}),
            moeprune_version=str(data.get("moeprune_version", "unknown")),
            created=str(data.get("created", "")),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON, atomically (temp file + ``os.replace``).

        ``path`` may be a file or an existing directory (then ``<dir>/moeprune_plan.json``).
        Returns the file written.
        """
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        logger.info("wrote plan to %s", path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        """Read a plan written by :meth:`save` (a file, or a directory with moeprune_plan.json)."""
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILENAME
        if not path.is_file():
            raise PlanError(f"plan file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise PlanError(
                f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                "fix or regenerate the plan"
            ) from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise PlanError(f"cannot read plan {path}: {exc}") from exc
        return cls.from_json(data, source=str(path))


def _layer_key(key: object, where: str) -> int:
    """A layer index from a JSON key (``"3"``) or an int; anything else is a PlanError."""
    if isinstance(key, bool):
        raise PlanError(f"{where}: layer key {key!r} is not a layer index")
    try:
        return int(key)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise PlanError(f"{where}: layer key {key!r} is not a layer index") from None


def _expert_mapping(raw: object, where: str) -> dict[int, list[int]]:
    """``{"3": [0, 2]}`` -> ``{3: [0, 2]}`` with sorted integer lists; malformed -> PlanError."""
    if not isinstance(raw, Mapping):
        raise PlanError(f"{where} must be an object mapping layer index to a list of experts")
    out: dict[int, list[int]] = {}
    for key, experts in raw.items():
        layer = _layer_key(key, where)
        if not isinstance(experts, list) or not all(
            isinstance(e, int) and not isinstance(e, bool) for e in experts
        ):
            raise PlanError(
                f"{where}: layer {layer} must list integer expert indices, got {experts!r}"
            )
        out[layer] = sorted(experts)
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------------------------------
# budgets


def _check_moe_layer(geometry: MoEGeometry, layer: int, what: str) -> None:
    if layer not in geometry.moe_layers:
        raise PlanError(
            f"{what} names layer {layer}, which is not a MoE layer of this {geometry.family} "
            f"model; MoE layers: {list(geometry.moe_layers)}"
        )


def kept_from_ratio(num_experts: int, ratio: float) -> int:
    """Experts kept when removing the fraction ``ratio`` of ``num_experts``.

    removed = floor(ratio * E + 1e-9), kept = E - removed: never removes more than asked (E=8,
    ratio=0.3 -> 2.4 -> remove 2, keep 6); the 1e-9 absorbs float error (0.29 * 100 = 28.999...
    removes 29). At least one expert is kept.
    """
    removed = math.floor(ratio * num_experts + _RATIO_EPS)
    return max(1, num_experts - removed)


def _check_ratio(ratio: object, what: str = "--ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        raise PlanError(f"{what} must be a number in [0, 1): got {ratio!r}")
    if not 0.0 <= ratio < 1.0:
        raise PlanError(
            f"{what} must be in [0, 1): got {ratio} (the fraction of experts REMOVED; 0.5 removes "
            "half)"
        )
    return float(ratio)


def _round_to_groups(
    geometry: MoEGeometry, kept: int, layer: int | None, collapse_groups: bool
) -> int:
    """Round a ratio-derived count UP to a multiple of n_group for group-limited routing."""
    if not geometry.grouped or collapse_groups or kept % geometry.n_group == 0:
        return kept
    rounded = min(geometry.num_experts, math.ceil(kept / geometry.n_group) * geometry.n_group)
    logger.info(
        "%s: keeping %d experts instead of %d so that each of the %d routing groups keeps "
        "the same number (%d)",
        "every MoE layer" if layer is None else f"layer {layer}",
        rounded,
        kept,
        geometry.n_group,
        rounded // geometry.n_group,
    )
    return rounded


def _check_count(count: object, what: str) -> int:
    if isinstance(count, bool) or not isinstance(count, int):
        raise PlanError(f"{what} must be an integer number of experts to keep, got {count!r}")
    if count < 1:
        raise PlanError(f"{what} must keep at least 1 expert, got {count}")
    return count


def resolve_budget(
    geometry: MoEGeometry,
    *,
    ratio: float | None = None,
    keep: int | None = None,
    per_layer: Mapping[int | str, int | float] | None = None,
    collapse_groups: bool = False,
) -> dict[int, int]:
    """Number of experts to KEEP in every MoE layer, from exactly one kind of budget.

    Args:
        ratio: fraction of experts REMOVED in every layer, in [0, 1); kept = E - floor(ratio*E)
            (see :func:`kept_from_ratio`).
        keep: experts kept in every layer.
        per_layer: ``{layer: n}``; an int ``n`` is a count to keep, a float in [0, 1) a removal
            ratio. MoE layers not in the mapping keep all experts. Keys may be strings (JSON/CLI).
        collapse_groups: the pruned model will route with n_group = 1 (no per-group rounding).

    For group-limited routing (n_group > 1, not collapsed), counts derived from a ratio are rounded
    UP to a multiple of n_group (logged); explicit integer counts are used as given and checked by
    :func:`validate_budget`. The result is not validated; call :func:`validate_budget`.
    """
    options = (("--ratio", ratio), ("--keep", keep), ("--per-layer", per_layer))
    given = [name for name, value in options if value is not None]
    if len(given) != 1:
        raise PlanError(
            "give exactly one budget: --ratio (fraction removed), --keep (experts kept per layer) "
            f"or --per-layer; got {', '.join(given) if given else 'none'}"
        )
    num = geometry.num_experts
    if ratio is not None:
        kept = _round_to_groups(
            geometry, kept_from_ratio(num, _check_ratio(ratio)), None, collapse_groups
        )
        return {layer: kept for layer in geometry.moe_layers}
    if keep is not None:
        count = _check_count(keep, "--keep")
        return {layer: count for layer in geometry.moe_layers}

    assert per_layer is not None
    if not isinstance(per_layer, Mapping):
        raise PlanError(f"--per-layer must map layer index to a count or ratio, got {per_layer!r}")
    counts = {layer: num for layer in geometry.moe_layers}
    for key, value in per_layer.items():
        layer = _layer_key(key, "--per-layer")
        _check_moe_layer(geometry, layer, "--per-layer")
        if isinstance(value, float):
            what = f"--per-layer ratio for layer {layer} (floats are removal ratios)"
            layer_ratio = _check_ratio(value, what)
            counts[layer] = _round_to_groups(
                geometry, kept_from_ratio(num, layer_ratio), layer, collapse_groups
            )
        else:
            counts[layer] = _check_count(value, f"--per-layer count for layer {layer}")
    return counts


def validate_budget(
    geometry: MoEGeometry, kept_counts: Mapping[int, int], collapse_groups: bool = False
) -> None:
    """Raise PlanError unless keeping ``kept_counts[layer]`` experts leaves routing valid.

    Checks: each key is a MoE layer; top_k <= kept <= E; for group-limited routing without
    ``collapse_groups``: kept divisible by n_group, kept/n_group >= min_experts_per_group and
    (kept/n_group) * topk_group >= top_k.
    """
    num, top_k = geometry.num_experts, geometry.top_k
    for layer, kept in sorted(kept_counts.items()):
        _check_moe_layer(geometry, layer, "the budget")
        if kept > num:
            raise PlanError(
                f"keeping {kept} experts in layer {layer}, but the layer has only {num}; keep at "
                f"most {num}"
            )
        if kept < top_k:
            raise PlanError(
                f"keeping {kept} experts in layer {layer} but the router selects top_k={top_k} per "
                f"token; keep at least {top_k}"
            )
        if not geometry.grouped or collapse_groups:
            continue
        groups = geometry.n_group
        if kept % groups:
            raise PlanError(
                f"keeping {kept} experts in layer {layer}, but routing is group-limited with "
                f"n_group={groups}, so every group must keep the same number (a multiple of "
                f"{groups}); {_COLLAPSE_HINT}"
            )
        per_group = kept // groups
        if per_group < geometry.min_experts_per_group:
            raise PlanError(
                f"keeping {kept} experts in layer {layer} leaves {per_group} per routing group, "
                f"but the router needs at least {geometry.min_experts_per_group} per group; "
                f"{_COLLAPSE_HINT}"
            )
        if per_group * geometry.topk_group < top_k:
            raise PlanError(
                f"keeping {kept} experts in layer {layer} leaves {per_group} per group, so the "
                f"topk_group={geometry.topk_group} groups a token may use hold only "
                f"{per_group * geometry.topk_group} experts < top_k={top_k}; {_COLLAPSE_HINT}"
            )


def validate_plan(plan: Plan, geometry: MoEGeometry, fingerprint: str | None = None) -> None:
    """Raise PlanError unless ``plan`` can be applied to the model described by ``geometry``.

    Checks the model fingerprint (when both the plan and ``fingerprint`` have one), family and
    expert count (when the plan records them), that every layer is a MoE layer, that indices are
    unique and in [0, E), that counts pass :func:`validate_budget`, that grouped routing keeps the
    same number in every group (unless ``plan.collapse_groups``), and that protected experts are
    kept.
    """
    if fingerprint and plan.model_fingerprint and plan.model_fingerprint != fingerprint:
        raise PlanError(
            f"the plan was made for model {plan.model_fingerprint}, not this model "
            f"({fingerprint}); make a new plan for this checkpoint"
        )
    if plan.family and plan.family != geometry.family:
        raise PlanError(
            f"the plan was made for a {plan.family} model, this is a {geometry.family} model; "
            "make a new plan for this checkpoint"
        )
    num = geometry.num_experts
    if plan.num_experts and plan.num_experts != num:
        raise PlanError(
            f"the plan was made for {plan.num_experts} experts per layer, this model has {num}; "
            "make a new plan for this checkpoint"
        )
    for layer, kept in sorted(plan.layers.items()):
        _check_moe_layer(geometry, layer, "the plan")
        if len(set(kept)) != len(kept):
            dupes = sorted({e for e in kept if kept.count(e) > 1})
            raise PlanError(f"the plan lists experts {dupes} of layer {layer} more than once")
        bad = [e for e in kept if not 0 <= e < num]
        if bad:
            raise PlanError(
                f"the plan keeps experts {bad} in layer {layer}; indices must be in [0, {num})"
            )
    validate_budget(geometry, plan.kept_counts(), plan.collapse_groups)
    if geometry.grouped and not plan.collapse_groups:
        for layer, kept in sorted(plan.layers.items()):
            per_group = _count_per_group(geometry, kept)
            if len(set(per_group)) > 1:
                raise PlanError(
                    f"layer {layer} keeps {per_group} experts in its {geometry.n_group} routing "
                    f"groups; group-limited routing needs the same number in every group; "
                    f"{_COLLAPSE_HINT}"
                )
    for layer, protected in sorted(plan.protected.items()):
        if layer in plan.layers:
            lost = sorted(set(protected) - set(plan.layers[layer]))
            if lost:
                raise PlanError(
                    f"the plan drops protected experts {lost} of layer {layer}; keep them or "
                    "remove them from 'protected'"
                )


def _count_per_group(geometry: MoEGeometry, experts: list[int]) -> list[int]:
    counts = [0] * geometry.n_group
    for expert in experts:
        counts[geometry.group_of(expert)] += 1
    return counts


# --------------------------------------------------------------------------------------------------
# selection


def _ranked(candidates: list[int], scores: list[float]) -> list[int]:
    """``candidates`` by descending score; ties go to the lower index."""
    return sorted(candidates, key=lambda e: (-scores[e], e))


def _pick(candidates: list[int], scores: list[float], protected: set[int], count: int) -> list[int]:
    """``count`` experts of ``candidates``: all protected ones, then the best-scoring others."""
    chosen = [e for e in candidates if e in protected]
    others = _ranked([e for e in candidates if e not in protected], scores)
    return chosen + others[: count - len(chosen)]


def _layer_scores(scores: Mapping[int, torch.Tensor], layer: int, num: int) -> list[float]:
    if layer not in scores:
        raise PlanError(
            f"no scores for MoE layer {layer} (the statistics lack this layer); re-run "
            "`moeprune collect` on this model"
        )
    vector = torch.as_tensor(scores[layer]).detach().to(torch.float64).reshape(-1)
    if vector.numel() != num:
        raise PlanError(
            f"layer {layer} has {vector.numel()} scores but the model has {num} experts; the "
            "statistics belong to another model"
        )
    if not bool(torch.isfinite(vector).all()):
        raise PlanError(f"layer {layer} scores contain NaN/inf; re-run `moeprune collect`")
    return vector.tolist()


def _check_protected(
    geometry: MoEGeometry, protected: Mapping[int, list[int]]
) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for layer, experts in protected.items():
        _check_moe_layer(geometry, layer, "the protected experts")
        bad = [e for e in experts if not 0 <= e < geometry.num_experts]
        if bad:
            raise PlanError(
                f"protected experts {bad} of layer {layer} are out of range [0, "
                f"{geometry.num_experts})"
            )
        out[layer] = set(experts)
    return out


def select_experts(
    scores: Mapping[int, torch.Tensor],
    kept_counts: Mapping[int, int],
    geometry: MoEGeometry,
    protected: Mapping[int, list[int]] | None = None,
    collapse_groups: bool = False,
) -> dict[int, list[int]]:
    """Kept experts per MoE layer: the highest-scoring ones, protected experts always included.

    Protected experts count toward the budget (too many is a PlanError). Ties go to the lower
    index. For group-limited routing without ``collapse_groups`` each group keeps
    kept/n_group experts (its protected ones first). MoE layers absent from ``kept_counts`` (or
    keeping all E) keep every expert and need no scores. Returns ``{layer: sorted indices}`` for
    every MoE layer.
    """
    validate_budget(geometry, kept_counts, collapse_groups)
    guarded = _check_protected(geometry, protected or {})
    num = geometry.num_experts
    grouped = geometry.grouped and not collapse_groups
    result: dict[int, list[int]] = {}
    for layer in geometry.moe_layers:
        count = kept_counts.get(layer, num)
        if count >= num:
            result[layer] = list(range(num))
            continue
        layer_scores = _layer_scores(scores, layer, num)
        keep_safe = guarded.get(layer, set())
        if len(keep_safe) > count:
            raise PlanError(
                f"layer {layer} has {len(keep_safe)} protected experts {sorted(keep_safe)} but the "
                f"budget keeps only {count}; {_PROTECT_HINT}"
            )
        if not grouped:
            chosen = _pick(list(range(num)), layer_scores, keep_safe, count)
        else:
            per_group, size = count // geometry.n_group, geometry.experts_per_group
            chosen = []
            for group in range(geometry.n_group):
                members = list(range(group * size, (group + 1) * size))
                safe_here = keep_safe.intersection(members)
                if len(safe_here) > per_group:
                    raise PlanError(
                        f"layer {layer}, routing group {group} has {len(safe_here)} protected "
                        f"experts {sorted(safe_here)} but each group keeps only {per_group}; "
                        f"{_PROTECT_HINT} (or --collapse-groups)"
                    )
                chosen.extend(_pick(members, layer_scores, safe_here, per_group))
        result[layer] = sorted(chosen)
    return result


# --------------------------------------------------------------------------------------------------
# convenience


def _stats_summary(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return (0.0, 0.0, 0.0)
    return (min(values), max(values), sum(values) / len(values))


def _short(x: float) -> float:
    return float(f"{x:.6g}")


def summarize_scores(
    scores: Mapping[int, torch.Tensor], layers: Mapping[int, list[int]]
) -> dict[int, dict[str, float]]:
    """Per layer: min/max/mean of all scores and of the kept scores (6 significant digits)."""
    summary: dict[int, dict[str, float]] = {}
    for layer, kept in sorted(layers.items()):
        if layer not in scores:
            continue
        values = torch.as_tensor(scores[layer]).detach().to(torch.float64).reshape(-1).tolist()
        lo, hi, mean = _stats_summary(values)
        k_lo, k_hi, k_mean = _stats_summary([values[e] for e in kept if 0 <= e < len(values)])
        summary[layer] = {
            "min": _short(lo),
            "max": _short(hi),
            "mean": _short(mean),
            "kept_min": _short(k_lo),
            "kept_max": _short(k_hi),
            "kept_mean": _short(k_mean),
        }
    return summary


def build_plan(
    geometry: MoEGeometry,
    scores: Mapping[int, torch.Tensor],
    *,
    method: str,
    ratio: float | None = None,
    keep: int | None = None,
    per_layer: Mapping[int | str, int | float] | None = None,
    protected: Mapping[int, list[int]] | None = None,
    collapse_groups: bool = False,
    model_fingerprint: str = "",
) -> Plan:
    """Resolve the budget, validate it, select experts and return the filled-in :class:`Plan`."""
    if collapse_groups and not geometry.grouped:
        logger.info("--collapse-groups ignored: this model's routing has no groups")
        collapse_groups = False
    counts = resolve_budget(
        geometry, ratio=ratio, keep=keep, per_layer=per_layer, collapse_groups=collapse_groups
    )
    validate_budget(geometry, counts, collapse_groups)
    layers = select_experts(scores, counts, geometry, protected, collapse_groups)
    if ratio is not None:
        budget: dict = {"ratio": ratio}
    elif keep is not None:
        budget = {"keep": keep}
    else:
        mapping = per_layer or {}
        budget = {"per_layer": {_layer_key(k, "--per-layer"): v for k, v in mapping.items()}}
    plan = Plan(
        layers=layers,
        method=method,
        budget=budget,
        protected={layer: sorted(p) for layer, p in sorted((protected or {}).items()) if p},
        model_fingerprint=model_fingerprint,
        family=geometry.family,
        num_experts=geometry.num_experts,
        score_summary=summarize_scores(scores, layers),
        collapse_groups=collapse_groups,
    )
    removed = sum(geometry.num_experts - len(k) for k in layers.values())
    logger.info(
        "plan (%s): keeping %s experts per layer, %d of %d routed experts removed",
        method,
        sorted(set(len(k) for k in layers.values())),
        removed,
        geometry.num_experts * len(layers),
    )
    return plan
