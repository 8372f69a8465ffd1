"""Super-expert rule (moeprune.super_experts) on synthetic statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moeprune.errors import PlanError, StatsError
from moeprune.geometry import MoEGeometry
from moeprune.super_experts import (
    SuperExpert,
    SuperExpertReport,
    detect_super_experts,
    format_table,
    last_eligible_layer,
)
from moeprune.stats import RouterStats

E = 96
NUM_LAYERS = 8  # eligible layers: l < 0.75 * 8 = 6, i.e. 0..5

GEOMETRY = MoEGeometry(
    family="toy",
    model_type="toy_moe",
    num_hidden_layers=NUM_LAYERS,
    moe_layers=tuple(range(NUM_LAYERS)),
    num_experts=E,
    top_k=2,
    has_shared_experts=True,
)


def _stats() -> RouterStats:
    """8 layers x (96 routed + 1 shared) = 776 magnitudes.

    Background a = 1 + (layer * 96 + j) / 1000 (all in [1, 1.768)), shared 0.5; then
      layer 1 expert 5  (routed) = 1000  -> super expert (early, > P99.5, > max/10 = 100)
      layer 2 shared 0           =  300  -> super expert (shared kind)
      layer 6 expert 3  (routed) =  800  -> excluded: layer 6 is not < 6
      layer 2 expert 9  (routed) =   50  -> excluded: > P99.5 but < max/10 = 100
    P99.5 sits at sorted position 0.995 * 775 = 771.125, below the four planted values (772..775).
    """
    layers = {}
    for layer in range(NUM_LAYERS):
        routed = 1.0 + (layer * E + torch.arange(E, dtype=torch.float64)) / 1000.0
        shared = torch.tensor([0.5], dtype=torch.float64)
        layers[layer] = {"max_abs_output": routed, "shared_max_abs_output": shared}
    layers[1]["max_abs_output"][5] = 1000.0
    layers[2]["shared_max_abs_output"][0] = 300.0
    layers[6]["max_abs_output"][3] = 800.0
    layers[2]["max_abs_output"][9] = 50.0
    return RouterStats(layers=layers, metadata={"model_fingerprint": "toy"})


def test_rule_detects_early_huge_and_excludes_late_and_moderate() -> None:
    stats = _stats()
    report = detect_super_experts(stats, GEOMETRY)
    assert [(s.layer, s.expert, s.kind) for s in report.experts] == [
        (1, 5, "routed"),
        (2, 0, "shared"),
    ]
    assert [s.magnitude for s in report.experts] == [1000.0, 300.0]
    # thresholds: independent numpy percentile over all 776 values
    all_a = np.concatenate(
        [
            np.concatenate([e["max_abs_output"].numpy(), e["shared_max_abs_output"].numpy()])
            for e in stats.layers.values()
        ]
    )
    assert report.num_values == 776
    assert report.percentile_threshold == pytest.approx(np.percentile(all_a, 99.5), rel=1e-12)
    assert 1.7 < report.percentile_threshold < 50.0  # so 50 is excluded by max/10 alone
    assert report.max_threshold == pytest.approx(100.0)
    assert report.max_magnitude == 1000.0
    assert report.last_eligible_layer == 5
    assert report.routed_by_layer() == {1: [5]}
    assert report.shared_by_layer() == {2: [0]}


def test_late_expert_detected_when_all_layers_eligible() -> None:
    report = detect_super_experts(_stats(), GEOMETRY, early_fraction=1.0)
    assert report.routed_by_layer() == {1: [5], 6: [3]}
    assert report.last_eligible_layer == 7


def test_last_eligible_layer() -> None:
    assert last_eligible_layer(8, 0.75) == 5  # 5 < 6, 6 is not
    assert last_eligible_layer(48, 0.75) == 35  # 35 < 36
    assert last_eligible_layer(10, 0.75) == 7  # 7 < 7.5


def test_json_round_trip() -> None:
    report = detect_super_experts(_stats(), GEOMETRY)
    data = json.loads(json.dumps(report.to_json()))
    assert data["experts"][0] == {"layer": 1, "expert": 5, "kind": "routed", "magnitude": 1000.0}
    assert SuperExpertReport.from_json(data) == report
    with pytest.raises(PlanError, match="malformed super-expert report"):
        SuperExpertReport.from_json({"experts": [{"layer": 1}]})


def test_format_table_aligned() -> None:
    report = detect_super_experts(_stats(), GEOMETRY)
    text = format_table(report)
    lines = text.splitlines()
    table = lines[:-1]
    assert table[0].split() == ["layer", "expert", "kind", "magnitude", "x", "P99.5"]
    assert len({len(line) for line in table}) == 1  # header, rule and rows equally wide
    assert table[2].split()[:4] == ["1", "5", "routed", "1000"]
    ratio = 1000.0 / report.percentile_threshold
    assert float(table[2].split()[4]) == pytest.approx(ratio, rel=1e-3)
    assert table[3].split()[:3] == ["2", "0", "shared"]
    assert lines[-1].startswith("2 super expert(s)")


def test_empty_report_table() -> None:
    report = SuperExpertReport([], 1.0, 0.1, 5, 1.0, 10)
    assert format_table(report).splitlines()[-1].startswith("0 super expert(s)")
    assert report.routed_by_layer() == {}


def test_bad_inputs() -> None:
    with pytest.raises(PlanError, match="quantile"):
        detect_super_experts(_stats(), GEOMETRY, quantile=1.5)
    no_magnitudes = RouterStats(layers={1: {"frequency": torch.ones(4)}}, metadata={})
    with pytest.raises(StatsError, match="max_abs_output"):
        detect_super_experts(no_magnitudes, GEOMETRY)


def test_super_expert_is_a_value_object() -> None:
    assert SuperExpert(1, 2, "routed", 3.0) == SuperExpert(1, 2, "routed", 3.0)
