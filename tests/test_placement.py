"""Placement of a decoder layer larger than one device (moeprune.calibration.placement): the greedy
expert ranges, the layer's byte counts, and, on CPU with fake small device budgets, a pass whose
layers run split over three "devices" giving exactly the statistics of the unsplit pass."""

from __future__ import annotations

import logging

import pytest
import torch

from moeprune.arch import decoder_layers, family_for_model_type, read_config
from moeprune.calibration.engine import collect_stats, load_full_model
from moeprune.calibration import placement as placement_module
from moeprune.calibration.placement import ExpertShard, LayerPlacement, layer_bytes, layer_placement, place_layer
from moeprune.errors import MoePruneError
from test_observe import assert_stats_close

CPU = torch.device("cpu")


def shard_ranges(placement: LayerPlacement) -> list[tuple[str, int, int]]:
    return [(str(s.device), s.start, s.stop) for s in placement.shards]


def test_whole_layer_on_the_main_device_when_it_fits():
    placement = place_layer(100, 10, 8, ["cuda:0", "cuda:1"], [180, 0])
    assert not placement.split and placement.main == torch.device("cuda:0")


def test_experts_fill_the_devices_in_order_after_the_rest_of_the_layer():
    # device 0: (150 - 100) // 10 = 5 experts, device 1: 30 // 10 = 3 more, device 2 unused
    placement = place_layer(100, 10, 8, ["cuda:0", "cuda:1", "cuda:2"], [150, 30, 1000])
    assert shard_ranges(placement) == [("cuda:0", 0, 5), ("cuda:1", 5, 8)]
    # device 0 too small for even one expert beside the rest: it keeps the rest only
    placement = place_layer(100, 10, 4, ["cuda:0", "cuda:1"], [105, 40])
    assert shard_ranges(placement) == [("cuda:1", 0, 4)] and placement.main == torch.device("cuda:0")


def test_a_layer_larger_than_every_device_is_refused():
    with pytest.raises(MoePruneError, match="more than"):
        place_layer(100, 10, 8, ["cuda:0", "cuda:1", "cuda:2"], [120, 25, 25])  # 2 + 2 + 2 < 8 experts
    with pytest.raises(ValueError):
        place_layer(1, 1, 1, ["cpu"], [1, 2])


def test_layer_bytes_split_the_experts_from_the_rest(tiny_checkpoint):
    model = load_full_model(tiny_checkpoint("qwen2_moe"))
    family = family_for_model_type(model.config.model_type)
    layer = decoder_layers(model)[0]
    experts = family.experts(layer)
    rest, per_expert = layer_bytes(layer, experts, experts.num_experts)
    fused = sum(p.numel() * 4 for p in experts.parameters(recurse=False))
    everything = sum(p.numel() * 4 for p in layer.parameters()) + sum(b.numel() * b.element_size() for b in layer.buffers())
    assert per_expert * experts.num_experts == fused and rest + fused == everything


def fake_budgets(model_dir) -> list[int]:
    """Budgets that split every MoE layer over 3 CPU "devices": the rest and 1 expert, 2 experts, the others."""
    model = load_full_model(model_dir)
    family = family_for_model_type(read_config(model_dir).model_type)
    layer = next(layer for layer in decoder_layers(model) if family.is_moe_layer(layer))
    experts = family.experts(layer)
    rest, per_expert = layer_bytes(layer, experts, experts.num_experts)
    return [rest + per_expert, 2 * per_expert, 10**12]


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])  # shared experts; biases and transposed weights
def test_split_layers_give_the_statistics_of_the_unsplit_pass(family, tiny_checkpoint, calibration, caplog):
    model_dir = tiny_checkpoint(family)
    batch = calibration(family)
    whole = collect_stats(model_dir, batch, batch_size=2, progress=False)
    with caplog.at_level(logging.INFO, logger="moeprune.calibration.placement"):
        split = collect_stats(model_dir, batch, batch_size=2, progress=False, expert_devices=[CPU, CPU, CPU],
                              device_budgets=fake_budgets(model_dir))
    messages = [r.getMessage() for r in caplog.records if "split over" in r.getMessage()]
    assert len(messages) == len(whole.layers) and "cpu [0, 1), cpu [1, 3), cpu [3, " in messages[0]
    assert_stats_close(split, whole, rel=0.0)
    # routing-only observers: the split experts run through the placement's forward, not transformers'
    routing = collect_stats(model_dir, batch, batch_size=2, progress=False, observers=["routing"])
    split_routing = collect_stats(model_dir, batch, batch_size=2, progress=False, observers=["routing"],
                                  expert_devices=[CPU, CPU, CPU], device_budgets=fake_budgets(model_dir))
    assert_stats_close(split_routing, routing, rel=0.0)


def test_placement_options_are_checked(tiny_checkpoint, calibration):
    model_dir, batch = tiny_checkpoint("qwen2_moe"), calibration("qwen2_moe")
    with pytest.raises(MoePruneError, match="more than"):
        collect_stats(model_dir, batch, progress=False, expert_devices=[CPU, CPU], device_budgets=[1, 1])
    with pytest.raises(MoePruneError, match="sequential"):
        collect_stats(model_dir, batch, mode="whole", progress=False, expert_devices=[CPU], device_budgets=[1])
    with pytest.raises(MoePruneError, match="one device budget per"):
        collect_stats(model_dir, batch, progress=False, expert_devices=[CPU, CPU], device_budgets=[1])
    assert ExpertShard(CPU, 0, 2).weights == {}


def test_cuda_budgets_are_asked_of_other_gpus_only_when_the_main_one_is_too_small(tiny_checkpoint, monkeypatch):
    model = load_full_model(tiny_checkpoint("qwen2_moe"))
    family = family_for_model_type(model.config.model_type)
    layer = decoder_layers(model)[0]
    experts = family.experts(layer)
    rest, per_expert = layer_bytes(layer, experts, experts.num_experts)
    asked = []

    def fake_cuda_budgets(devices):
        asked.append([str(d) for d in devices])
        return [main_budget if str(d) == "cuda:0" else 10**12 for d in devices]

    monkeypatch.setattr(placement_module, "cuda_budgets", fake_cuda_budgets)
    gpus = ["cuda:0", "cuda:1", "cuda:2"]
    main_budget = rest + experts.num_experts * per_expert
    assert not layer_placement(layer, experts, gpus, None).split and asked == [["cuda:0"]]
    asked.clear()
    main_budget = rest + 3 * per_expert
    placement = layer_placement(layer, experts, gpus, None)
    assert asked == [["cuda:0"], ["cuda:1", "cuda:2"]]
    assert shard_ranges(placement) == [("cuda:0", 0, 3), ("cuda:1", 3, experts.num_experts)]
    assert not layer_placement(layer, experts, ["cpu"], None).split  # the CPU: never split without budgets
