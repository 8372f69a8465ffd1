"""Super-expert detection ("Unveiling Super Experts in Mixture-of-Experts LLMs", 2025).

A few experts produce the extreme activations ("massive activations") that the rest of the network
relies on; pruning them wrecks a model (Qwen3-30B-A3B: WikiText PPL 8.70 -> 59.86 when its 3 super
experts are pruned, 8.71 for 3 random experts). Pruning plans therefore protect them by default.

Rule, with a_{l,j} = max over calibration tokens and channels of |f_j(x)| (statistics entry
``max_abs_output``, and ``shared_max_abs_output`` for shared experts; dense MLPs are excluded):

    expert j of layer l is a super expert  iff
        a_{l,j} > P99.5 of all a (routed and shared, all MoE layers; linear interpolation)
        and a_{l,j} > max(a) / 10
        and l < 0.75 * num_hidden_layers   (massive activations form in the early layers)
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from .errors import PlanError, StatsError
from .geometry import MoEGeometry
from .stats import RouterStats

logger = logging.getLogger(__name__)

ExpertKind = Literal["routed", "shared"]
_KINDS = ("routed", "shared")


@dataclass(frozen=True)
class SuperExpert:
    """One detected super expert: ``expert`` indexes the layer's routed or shared experts."""

    layer: int
    expert: int
    kind: ExpertKind
    magnitude: float


@dataclass
class SuperExpertReport:
    """Detected super experts (sorted by magnitude, largest first) and the thresholds used.

    Attributes:
        experts: the super experts.
        percentile_threshold: P_{quantile} of all a values (P99.5 by default).
        max_threshold: ``max_fraction * max(a)`` (max/10 by default).
        last_eligible_layer: the last decoder layer l with l < early_fraction * num_hidden_layers.
        max_magnitude: max(a).
        num_values: how many a values (routed + shared experts over all MoE layers) were ranked.
        quantile, max_fraction, early_fraction: the rule's parameters.
    """

    experts: list[SuperExpert]
    percentile_threshold: float
    max_threshold: float
    last_eligible_layer: int
    max_magnitude: float
    num_values: int
    quantile: float = 0.995
    max_fraction: float = 0.1
    early_fraction: float = 0.75

    def routed_by_layer(self) -> dict[int, list[int]]:
        """Routed super experts as ``{layer: sorted expert indices}`` (what a plan protects)."""
        out: dict[int, list[int]] = {}
        for se in self.experts:
            if se.kind == "routed":
                out.setdefault(se.layer, []).append(se.expert)
        return {layer: sorted(experts) for layer, experts in sorted(out.items())}

    def shared_by_layer(self) -> dict[int, list[int]]:
        """Shared super experts as ``{layer: sorted shared-expert indices}``."""
        out: dict[int, list[int]] = {}
        for se in self.experts:
            if se.kind == "shared":
                out.setdefault(se.layer, []).append(se.expert)
        return {layer: sorted(experts) for layer, experts in sorted(out.items())}

    def to_json(self) -> dict:
        """A JSON-serialisable dict (inverse: :meth:`from_json`)."""
        data = asdict(self)
        data["experts"] = [asdict(se) for se in self.experts]
        return data

    @classmethod
    def from_json(cls, data: dict) -> "SuperExpertReport":
        """Rebuild a report from :meth:`to_json` output; malformed input is a PlanError."""
        try:
            experts = []
            for item in data["experts"]:
                kind = str(item["kind"])
                if kind not in _KINDS:
                    raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
                experts.append(
                    SuperExpert(
                        layer=int(item["layer"]),
                        expert=int(item["expert"]),
                        kind=kind,  # type: ignore[arg-type]
                        magnitude=float(item["magnitude"]),
                    )
                )
            return cls(
                experts=experts,
                percentile_threshold=float(data["percentile_threshold"]),
                max_threshold=float(data["max_threshold"]),
                last_eligible_layer=int(data["last_eligible_layer"]),
                max_magnitude=float(data["max_magnitude"]),
                num_values=int(data["num_values"]),
                quantile=float(data.get("quantile", 0.995)),
                max_fraction=float(data.get("max_fraction", 0.1)),
                early_fraction=float(data.get("early_fraction", 0.75)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(
                f"malformed super-expert report ({type(exc).__name__}: {exc}); "
                "regenerate it from the statistics"
            ) from exc


def last_eligible_layer(num_hidden_layers: int, early_fraction: float = 0.75) -> int:
    """Largest layer index l with l < early_fraction * num_hidden_layers (-1 when none)."""
    return math.ceil(early_fraction * num_hidden_layers) - 1


def _check_parameters(quantile: float, max_fraction: float, early_fraction: float) -> None:
    if not 0.0 < quantile < 1.0:
        raise PlanError(f"super-expert quantile must be in (0, 1), got {quantile}")
    if not 0.0 <= max_fraction <= 1.0:
        raise PlanError(f"super-expert max_fraction must be in [0, 1], got {max_fraction}")
    if not 0.0 < early_fraction <= 1.0:
        raise PlanError(f"super-expert early_fraction must be in (0, 1], got {early_fraction}")


def _magnitudes(stats: RouterStats) -> list[tuple[int, int, ExpertKind, float]]:
    """All a_{l,j} as ``(layer, expert, kind, value)``, routed then shared, layers ascending."""
    values: list[tuple[int, int, ExpertKind, float]] = []
    for layer in sorted(stats.layers):
        entries = stats.layers[layer]
        if "max_abs_output" not in entries:
            raise StatsError(
                f"layer {layer} statistics lack 'max_abs_output'; re-run `moeprune collect`"
            )
        for kind, key in (("routed", "max_abs_output"), ("shared", "shared_max_abs_output")):
            if key not in entries:
                continue
            vector = torch.as_tensor(entries[key]).detach().to(torch.float64).reshape(-1)
            values.extend((layer, j, kind, float(v)) for j, v in enumerate(vector.tolist()))
    return values


def detect_super_experts(
    stats: RouterStats,
    geometry: MoEGeometry,
    quantile: float = 0.995,
    max_fraction: float = 0.1,
    early_fraction: float = 0.75,
) -> SuperExpertReport:
    """Find the super experts in ``stats`` by the rule in the module docstring.

    Args:
        stats: calibration statistics (``max_abs_output``, optionally ``shared_max_abs_output``).
        geometry: the model's geometry (``num_hidden_layers`` sets the early-layer cut).
        quantile: percentile threshold as a fraction (0.995 = P99.5).
        max_fraction: a value must also exceed ``max_fraction * max(a)``.
        early_fraction: only layers l < early_fraction * num_hidden_layers are eligible.
    """
    _check_parameters(quantile, max_fraction, early_fraction)
    stray = sorted(set(stats.layers) - set(geometry.moe_layers))
    if stray:
        logger.warning(
            "statistics hold layers %s that are not MoE layers of %s; they are ranked anyway",
            stray,
            geometry.family,
        )
    values = _magnitudes(stats)
    if not values:
        raise StatsError("the statistics hold no expert magnitudes; re-run `moeprune collect`")
    all_a = torch.tensor([v for *_, v in values], dtype=torch.float64)
    if not bool(torch.isfinite(all_a).all()):
        raise StatsError("expert magnitudes contain NaN/inf; re-run `moeprune collect` in float32")
    p_threshold = float(torch.quantile(all_a, quantile, interpolation="linear"))
    max_a = float(all_a.max())
    m_threshold = max_a * max_fraction
    last_layer = last_eligible_layer(geometry.num_hidden_layers, early_fraction)

    experts = [
        SuperExpert(layer, expert, kind, value)
        for layer, expert, kind, value in values
        if value > p_threshold and value > m_threshold and layer <= last_layer
    ]
    experts.sort(key=lambda se: (-se.magnitude, se.layer, se.kind != "routed", se.expert))
    logger.info(
        "super experts: %d found (P%.4g = %.4g, max/%.3g = %.4g, layers <= %d)",
        len(experts),
        quantile * 100,
        p_threshold,
        1 / max_fraction if max_fraction else float("inf"),
        m_threshold,
        last_layer,
    )
    return SuperExpertReport(
        experts=experts,
        percentile_threshold=p_threshold,
        max_threshold=m_threshold,
        last_eligible_layer=last_layer,
        max_magnitude=max_a,
        num_values=len(values),
        quantile=quantile,
        max_fraction=max_fraction,
        early_fraction=early_fraction,
    )


def _format_number(value: float) -> str:
    if math.isinf(value):
        return "inf"
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.4e}"


def format_table(report: SuperExpertReport) -> str:
    """An aligned plain-text table of the super experts (layer, expert, kind, magnitude, ratio).

    ``ratio`` is the magnitude divided by the percentile threshold. A final line states the
    thresholds. Header and rows all have the same width.
    """
    pct_name = f"P{report.quantile * 100:g}"
    header = ("layer", "expert", "kind", "magnitude", f"x {pct_name}")
    rows = [
        (
            str(se.layer),
            str(se.expert),
            se.kind,
            _format_number(se.magnitude),
            _format_number(
                se.magnitude / report.percentile_threshold
                if report.percentile_threshold > 0
                else math.inf
            ),
        )
        for se in report.experts
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    left_aligned = {2}  # kind is text; the rest are numbers

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            cell.ljust(w) if i in left_aligned else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths))
        )

    lines = [line(header), "  ".join("-" * w for w in widths)]
    lines.extend(line(row) for row in rows)
    summary = (
        f"{len(report.experts)} super expert(s); {pct_name} = "
        f"{_format_number(report.percentile_threshold)}, max/{1 / report.max_fraction:g} = "
        f"{_format_number(report.max_threshold)}, eligible layers <= {report.last_eligible_layer}"
        if report.max_fraction > 0
        else f"{len(report.experts)} super expert(s); {pct_name} = "
        f"{_format_number(report.percentile_threshold)}, eligible layers <= "
        f"{report.last_eligible_layer}"
    )
    lines.append(summary)
    return "\n".join(lines)
