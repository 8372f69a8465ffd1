"""LLM-Pruner first-order Taylor scores of dense units (method ``taylor``).

References: a hand-computed case for the scorer; for the statistics, vanilla transformers loaded
whole, one autograd pass of the summed next-token cross-entropy (the backward pass's loss), and
|w * dL/dw| summed per unit by slicing the tensors here (not through moeprune.units).
"""

from __future__ import annotations

import pytest
import torch

from moeprune import api
from moeprune.calibration.backward import next_token_loss
from moeprune.calibration.data import CalibrationBatch
from moeprune.calibration.engine import collect_stats, load_full_model
from moeprune.errors import MoePruneError, PlanError, StatsError
from moeprune.methods import get_method
from moeprune.plan.actions import DropAttentionHeads, SliceChannels
from moeprune.scoring.dense import CHANNELS, UnitInputs, taylor_scores, taylor_unit_scores
from moeprune.stats import RouterStats
from moeprune.units import TensorSlice, Unit

from conftest import assert_written_equals_in_memory
from test_backward import padded_calibration


def _calibration() -> CalibrationBatch:
    """Random tokens, one right-padded and one left-padded row (test_backward's)."""
    return padded_calibration(samples=4, seq_len=10, seed=5)


def _whole_model_grads(checkpoint, calibration):
    """(model, {parameter name: dL/dW}) from one autograd pass of the whole model over every row."""
    model = load_full_model(checkpoint)
    logits = model(input_ids=calibration.input_ids, attention_mask=calibration.attention_mask, use_cache=False).logits
    loss, _ = next_token_loss(logits, calibration.input_ids, calibration.attention_mask)
    loss.backward()
    return model, {name: p.grad.detach().double() for name, p in model.named_parameters() if p.grad is not None}


def _saliency(model, grads, name):
    return (dict(model.named_parameters())[name].detach().double() * grads[name]).abs()


def _taylor_stats(checkpoint, calibration, batch_size=2):
    return collect_stats(checkpoint, calibration, observers=["taylor"], batch_size=batch_size, progress=False)


def assert_close(actual, expected, rtol=1e-4):
    scale = expected.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=rtol * scale)


# -- the scorer by hand -----------------------------------------------------------------------------

def test_taylor_unit_scores_by_hand():
    """Two units over a 2x3 weight (rows) and a 3x2 weight (columns): S_u = sum |w g| over its slices."""
    w = torch.tensor([[1.0, -2.0, 3.0], [0.5, 4.0, -1.0]])
    g = torch.tensor([[2.0, 1.0, -1.0], [-4.0, 0.25, 3.0]])
    v = torch.tensor([[2.0, -1.0], [1.0, 1.0], [0.0, 3.0]])
    h = torch.tensor([[1.0, 1.0], [-2.0, 0.5], [5.0, -1.0]])
    units = [Unit("channel", 0, (TensorSlice("w", 0, (0,)), TensorSlice("v", 1, (0,)))),
             Unit("channel", 0, (TensorSlice("w", 0, (1,)), TensorSlice("v", 1, (1,)), TensorSlice("b")))]
    b, gb = torch.tensor([3.0]), torch.tensor([-2.0])
    # unit 0: |1*2| + |-2*1| + |3*-1| = 7; column 0 of v*h: |2*1| + |1*-2| + |0*5| = 4 -> 11
    # unit 1: |0.5*-4| + |4*0.25| + |-1*3| = 6; column 1: |-1*1| + |1*0.5| + |3*-1| = 4.5; |3*-2| = 6 -> 16.5
    scores = taylor_unit_scores({"w": w, "v": v, "b": b}, {"w": g, "v": h, "b": gb}, units)
    assert scores.dtype == torch.float64
    assert scores.tolist() == [11.0, 16.5]


def test_taylor_scores_read_the_statistics_of_the_units():
    inputs = UnitInputs(CHANNELS, {"down": torch.zeros(2, 3)}, {"taylor": torch.tensor([[1.0, 3.0, 2.0]])})
    assert taylor_scores(inputs).tolist() == [1.0, 3.0, 2.0]
    with pytest.raises(StatsError, match="'taylor' observer"):
        taylor_scores(UnitInputs(CHANNELS, {"down": torch.zeros(2, 3)}, {}))
    with pytest.raises(StatsError, match="3 units"):
        taylor_scores(UnitInputs(CHANNELS, {"down": torch.zeros(2, 3)}, {"taylor": torch.ones(2)}))


# -- the statistics equal a whole-model autograd pass -----------------------------------------------

def _heads_reference(model, grads, layer):
    """Per KV group g: |w g| summed over the q rows of its query heads, its k/v rows, the o columns of
    its query heads, and the q/k/v bias entries of those rows."""
    config = model.config
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_group = heads // kv  # query heads h of group g: h // per_group == g, q rows h*d..(h+1)*d-1
    prefix = f"model.layers.{layer}.self_attn."
    q, k, v, o = (_saliency(model, grads, prefix + f"{p}_proj.weight") for p in "qkvo")
    want = (q.reshape(kv, per_group * d, -1).sum((1, 2)) + k.reshape(kv, d, -1).sum((1, 2))
            + v.reshape(kv, d, -1).sum((1, 2)) + o.reshape(o.shape[0], kv, per_group * d).sum((0, 2)))
    for p in "qkv":
        if prefix + f"{p}_proj.bias" in grads:
            want = want + _saliency(model, grads, prefix + f"{p}_proj.bias").reshape(kv, -1).sum(1)
    return want


def test_heads_equal_whole_model_autograd_mixtral(tiny_checkpoint):
    checkpoint = tiny_checkpoint("mixtral")
    calibration = _calibration()
    stats = _taylor_stats(checkpoint, calibration)
    model, grads = _whole_model_grads(checkpoint, calibration)
    assert set(stats.dense) == set(range(model.config.num_hidden_layers))
    for layer, entries in stats.dense.items():
        assert set(entries) == {"attn_taylor"}  # no dense MLP, no shared expert in Mixtral
        assert_close(entries["attn_taylor"], _heads_reference(model, grads, layer))


def _channel_reference(model, grads, path):
    gate, up, down = (_saliency(model, grads, f"{path}.{p}_proj.weight") for p in ("gate", "up", "down"))
    return gate.sum(1) + up.sum(1) + down.sum(0)


def test_shared_channels_equal_whole_model_autograd_qwen2_moe(tiny_checkpoint):
    checkpoint = tiny_checkpoint("qwen2_moe")
    calibration = _calibration()
    stats = _taylor_stats(checkpoint, calibration, batch_size=3)
    model, grads = _whole_model_grads(checkpoint, calibration)
    for layer, entries in stats.dense.items():
        want = _channel_reference(model, grads, f"model.layers.{layer}.mlp.shared_expert")
        assert entries["shared_taylor"].shape == (1, want.numel())
        assert_close(entries["shared_taylor"][0], want)
        # and its heads, whose q/k/v biases belong to their KV group
        assert any(name.endswith("self_attn.q_proj.bias") for name in grads)
        assert_close(entries["attn_taylor"], _heads_reference(model, grads, layer))


def test_dense_mlp_channels_equal_whole_model_autograd_deepseek_v3(tiny_checkpoint):
    """DeepSeek-V3's first_k_dense_replace layers: dense-MLP channels; MLA attention: no head scores."""
    checkpoint = tiny_checkpoint("deepseek_v3")
    calibration = _calibration()
    stats = _taylor_stats(checkpoint, calibration)
    model, grads = _whole_model_grads(checkpoint, calibration)
    dense_layers = [layer for layer, entries in stats.dense.items() if "mlp_taylor" in entries]
    assert dense_layers == list(range(model.config.first_k_dense_replace))
    for layer in dense_layers:
        assert_close(stats.dense[layer]["mlp_taylor"], _channel_reference(model, grads, f"model.layers.{layer}.mlp"))
    assert not any("attn_taylor" in entries for entries in stats.dense.values())
    with pytest.raises(PlanError, match="multi-head latent attention"):
        api.prune(checkpoint, "unused", method="taylor", ratio=0.25, data=None, stats=stats, options={"unit": "heads"})


def test_batching_does_not_change_the_scores(tiny_checkpoint):
    checkpoint = tiny_checkpoint("mixtral")
    calibration = _calibration()
    one, four = _taylor_stats(checkpoint, calibration, batch_size=1), _taylor_stats(checkpoint, calibration, batch_size=4)
    for layer, entries in one.dense.items():
        assert_close(entries["attn_taylor"], four.dense[layer]["attn_taylor"])


def test_taylor_statistics_do_not_merge(tiny_checkpoint, tmp_path):
    """|w * (g1 + g2)| != |w g1| + |w g2|: merging two shards' saliencies is refused, also after a save."""
    checkpoint = tiny_checkpoint("mixtral")
    calibration = _calibration()
    stats = _taylor_stats(checkpoint, calibration)
    stats.save(tmp_path / "t.safetensors")
    loaded = RouterStats.load(tmp_path / "t.safetensors")
    assert torch.equal(loaded.dense[0]["attn_taylor"], stats.dense[0]["attn_taylor"])
    with pytest.raises(StatsError, match="cannot be merged"):
        loaded.merge(stats)


def test_taylor_refuses_what_it_cannot_do(tiny_checkpoint):
    checkpoint = tiny_checkpoint("mixtral")
    with pytest.raises(PlanError, match="heads, mlp or shared"):
        api.prune(checkpoint, "unused", method="taylor", ratio=0.25, data="unused", options={"unit": "layers"})
    with pytest.raises(PlanError, match="no shared experts"):
        api.prune(checkpoint, "unused", method="taylor", ratio=0.25, data="unused", options={"unit": "shared"})
    with pytest.raises(MoePruneError, match="sequential"):
        collect_stats(checkpoint, _calibration(), observers=["taylor"], mode="whole", progress=False)
    with pytest.raises(MoePruneError, match="two passes"):
        collect_stats(checkpoint, _calibration(), observers=["taylor", "dense_channels"], progress=False)


# -- end to end ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, unit", [("mixtral", "heads"), ("qwen2_moe", "shared"), ("deepseek_v3", "mlp")])
def test_prune_with_data_writes_a_checkpoint_equal_to_the_plan_in_memory(family, unit, tiny_checkpoint, calib_file, tmp_path):
    checkpoint = tiny_checkpoint(family)
    plan = api.prune(checkpoint, tmp_path / "out", method="taylor", ratio=0.5, data=calib_file, samples=4, seq_len=16,
                     options={"unit": unit}, progress=False)
    stats = api.collect(checkpoint, calib_file, samples=4, seq_len=16, observers=["taylor"], progress=False)
    action = DropAttentionHeads if unit == "heads" else SliceChannels
    assert plan.method == "taylor" and plan.actions
    assert all(isinstance(a, action) for acts in plan.actions.values() for a in acts)
    # the plan removes the lowest-scoring units of every layer
    entry = {"heads": "attn_taylor", "mlp": "mlp_taylor", "shared": "shared_taylor"}[unit]
    for layer, (act,) in plan.actions.items():
        scores = stats.dense[layer][entry].reshape(-1)
        gone = act.kv_groups if unit == "heads" else sorted(set(range(scores.numel())) - set(act.kept))
        kept = sorted(set(range(scores.numel())) - set(gone))
        assert gone and scores[list(gone)].max() <= scores[kept].min()
    assert_written_equals_in_memory(checkpoint, tmp_path / "out", plan)


def test_registry_entry():
    method = get_method("taylor")
    assert method.granularity == "dense" and dict(method.options) == {"unit": "heads", "widths": None}
    assert api.statistics_for("taylor", protect_super_experts=False) == ("tokens", "taylor")


def test_sweep_collects_taylor_over_the_whole_set(tiny_checkpoint, tmp_path):
    """A sweep naming taylor and wanda_sp: the mergeable statistics per domain, the Taylor ones in one
    pass over every domain's rows (they do not merge), and both methods evaluated."""
    from moeprune.sweep import SweepSettings, sweep_model, sweep_observers, whole_set_observers
    from moeprune.testbed.corpus import build_corpus

    corpus = tmp_path / "corpus"
    build_corpus(corpus, seed=0, max_domain_bytes=60_000)
    settings = SweepSettings(ratios=(0.0, 0.5), methods=("taylor@unit=heads", "wanda_sp@unit=heads"), samples_per_domain=2,
                             seq_len=32, eval_tokens=256, eval_seq_len=64, domains=("code", "math"))
    assert whole_set_observers(settings) == ("taylor",) and "taylor" not in sweep_observers(settings)
    rows, _ = sweep_model("tiny", tiny_checkpoint("mixtral"), corpus, tmp_path / "work", settings, progress=False)
    assert [(r.method, r.ratio) for r in rows] == [("dense", 0.0), ("taylor@unit=heads", 0.5), ("wanda_sp@unit=heads", 0.5)]
    assert all(r.ppl["code"] > 1 for r in rows)
    whole = RouterStats.load(tmp_path / "work" / "stats-whole-set.safetensors")
    assert whole.metadata["samples"] == 4 and all("attn_taylor" in entries for entries in whole.dense.values())
    assert not any("attn_taylor" in e for e in RouterStats.load(tmp_path / "work" / "stats-code.safetensors").dense.values())


def test_a_data_parallel_pass_refuses_taylor(tiny_checkpoint, monkeypatch):
    """Under torchrun each rank holds its shard's gradient only: refused before any weight is read."""
    import contextlib

    from moeprune.calibration import engine
    from moeprune.calibration.distributed import DistributedContext

    @contextlib.contextmanager
    def two_ranks(device):
        yield DistributedContext(rank=0, world_size=2)

    monkeypatch.setattr(engine, "distributed_pass", two_ranks)
    with pytest.raises(MoePruneError, match="without torchrun"):
        collect_stats(tiny_checkpoint("mixtral"), _calibration(), observers=["taylor"], progress=False)
