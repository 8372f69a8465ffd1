"""Hand-computed checks of every registered scorer (moeprune.scoring)."""

from __future__ import annotations

import pytest
import torch

from moeprune.errors import PlanError, StatsError
from moeprune.methods import method_names
from moeprune.scoring import (
    SCORERS,
    get_scorer,
    score_all,
    score_layer,
)
from moeprune.stats import RouterStats

# One MoE layer, E = 4 experts, top_k = 2, 3 valid tokens (so frequencies sum to 3 * 2 = 6).
#   frequency   = [3, 0, 2, 1]          expert 1 never routed
#   soft_count  = [1.5, 0, 0.9, 0.6]    gates renormalised: sums to 3 tokens * 1
#   tcess       = [2.4, 0.3, 1.2, 0.0]  expert 1 was pooled (0.3) but never routed
#   ean_sum     = [6.0, 0, 3.0, 5.0]
#   reap_sum    = [3.0, 0, 1.2, 0.5]
#   easy_ep     = [0.9, 0, 0.3, 0.6]
LAYER = {
    "tokens": torch.tensor(3.0, dtype=torch.float64),
    "frequency": torch.tensor([3.0, 0.0, 2.0, 1.0], dtype=torch.float64),
    "soft_count": torch.tensor([1.5, 0.0, 0.9, 0.6], dtype=torch.float64),
    "tcess": torch.tensor([2.4, 0.3, 1.2, 0.0], dtype=torch.float64),
    "tcess_pool_max_prob": torch.tensor(2.1, dtype=torch.float64),
    "ean_sum": torch.tensor([6.0, 0.0, 3.0, 5.0], dtype=torch.float64),
    "reap_sum": torch.tensor([3.0, 0.0, 1.2, 0.5], dtype=torch.float64),
    "easy_ep": torch.tensor([0.9, 0.0, 0.3, 0.6], dtype=torch.float64),
    "coactivation": torch.zeros(4, 4, dtype=torch.float64),
    "max_abs_output": torch.tensor([1.0, 0.0, 2.0, 3.0], dtype=torch.float64),
}

EXPECTED = {
    # |S_j|
    "frequency": [3.0, 0.0, 2.0, 1.0],
    # sum of gates, unchanged
    "soft_count": [1.5, 0.0, 0.9, 0.6],
    # tcess / tokens = [2.4/3, 0.3/3, 1.2/3, 0/3] = [0.8, 0.1, 0.4, 0]; unused expert 1 -> 0
    "tcess": [0.8, 0.0, 0.4, 0.0],
    # ean_sum as is
    "ean": [6.0, 0.0, 3.0, 5.0],
    # ean_sum / freq = [6/3, 0/0 -> 0, 3/2, 5/1]
    "ean_mean": [2.0, 0.0, 1.5, 5.0],
    # reap_sum / freq = [3/3, 0/0 -> 0, 1.2/2, 0.5/1]
    "reap": [1.0, 0.0, 0.6, 0.5],
    # easy_ep as is
    "easy_ep": [0.9, 0.0, 0.3, 0.6],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_scorer_hand_computed(name: str) -> None:
    scores = score_layer(name, LAYER, layer=1)
    assert scores.dtype == torch.float64
    torch.testing.assert_close(
        scores, torch.tensor(EXPECTED[name], dtype=torch.float64), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_unused_expert_scores_lowest(name: str) -> None:
    scores = score_layer(name, LAYER, seed=3, layer=1)
    assert scores[1].item() == 0.0
    assert bool((scores >= 0).all())
    assert scores.min().item() == scores[1].item()


def test_float32_input_is_promoted() -> None:
    layer32 = {k: v.to(torch.float32) for k, v in LAYER.items()}
    scores = score_layer("reap", layer32)
    assert scores.dtype == torch.float64
    torch.testing.assert_close(
        scores, torch.tensor(EXPECTED["reap"], dtype=torch.float64), rtol=1e-6, atol=1e-7
    )


def test_random_reproducible_and_seed_and_layer_dependent() -> None:
    a = score_layer("random", LAYER, seed=0, layer=1)
    b = score_layer("random", LAYER, seed=0, layer=1)
    c = score_layer("random", LAYER, seed=1, layer=1)
    d = score_layer("random", LAYER, seed=0, layer=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, d)
    used = torch.tensor([True, False, True, True])
    assert bool((a[used] > 0).all()) and bool((a[used] <= 1).all())


def test_registry_and_method_names() -> None:
    expected = {"random", "frequency", "soft_count", "tcess", "ean", "ean_mean", "reap", "easy_ep"}
    assert set(SCORERS) == expected
    assert set(method_names()) == expected | {"camera_p", "wanda_neuron", "random_neuron"}  # planned: not expert scorers
    with_outputs = {n for n, s in SCORERS.items() if s.needs_outputs}
    assert with_outputs == {"ean", "ean_mean", "reap", "easy_ep"}
    for scorer in SCORERS.values():
        assert scorer.description
        assert scorer.fn.__doc__ and "score_j" in scorer.fn.__doc__


def test_unknown_method_lists_known() -> None:
    with pytest.raises(PlanError, match="unknown scoring method 'bogus'.*frequency.*reap"):
        get_scorer("bogus")


def test_missing_entry_is_stats_error() -> None:
    partial = {k: v for k, v in LAYER.items() if k != "reap_sum"}
    with pytest.raises(StatsError, match="layer 5 statistics lack \\['reap_sum'\\]"):
        score_layer("reap", partial, layer=5)


def test_score_all_layers_and_values() -> None:
    other = dict(LAYER, frequency=torch.tensor([1.0, 1.0, 1.0, 3.0], dtype=torch.float64))
    stats = RouterStats(layers={3: other, 1: LAYER}, metadata={"model_fingerprint": "x"})
    scores = score_all("frequency", stats)
    assert list(scores) == [1, 3]
    assert scores[1].tolist() == [3.0, 0.0, 2.0, 1.0]
    assert scores[3].tolist() == [1.0, 1.0, 1.0, 3.0]
    random_scores = score_all("random", stats, seed=7)
    assert not torch.equal(random_scores[1], random_scores[3])


def test_score_all_rejects_output_scorer_without_outputs() -> None:
    no_outputs = dict(LAYER, reap_sum=torch.zeros(4, dtype=torch.float64))
    stats = RouterStats(layers={1: no_outputs}, metadata={})
    with pytest.raises(StatsError, match="needs expert-output statistics"):
        score_all("reap", stats)
    # a router-only scorer still works on the same statistics
    assert score_all("frequency", stats)[1].tolist() == [3.0, 0.0, 2.0, 1.0]


def test_nan_scores_rejected() -> None:
    broken = dict(LAYER, soft_count=torch.tensor([float("nan"), 0.0, 0.9, 0.6]))
    with pytest.raises(StatsError, match="non-finite"):
        score_layer("soft_count", broken)
