"""The layer-by-layer backward pass (moeprune.calibration.backward), the heapr observer and scorer.

The reference everywhere is vanilla transformers loaded whole, one autograd pass of the summed
next-token cross-entropy, with hooks; HEAPr quantities are recomputed from the experts' weights in
the test (h = act(gate) * up, dL/dh = g W_down with g = gate weight * dL/d(experts output)).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from moeprune import api
from moeprune.arch import decoder_layers, family_for_model_type
from moeprune.calibration import backward
from moeprune.calibration.backward import LayerGradientCallback, layer_gradients, next_token_loss
from moeprune.calibration.data import CalibrationBatch
from moeprune.calibration.engine import collect_stats
from moeprune.collect import new_observers, prepare_experts_implementation
from moeprune.errors import MoePruneError, StatsError
from moeprune.scoring.heapr import HEAPR_REQUIRES, heapr_scores
from moeprune.tiny import TINY_FAMILIES
from moeprune.observe import observers_for_entries
from moeprune.stats import RouterStats

from conftest import moe_layers, text_runner, vanilla

FAMILIES = ("mixtral", "deepseek_v3")


def padded_calibration(samples: int = 4, seq_len: int = 12, seed: int = 3) -> CalibrationBatch:
    """Random tokens; row 1 right-padded (4 positions), row 2 left-padded (3 positions)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 400, (samples, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -4:] = 0
    attention_mask[2, :3] = 0
    return CalibrationBatch(input_ids, attention_mask)


def reference_loss(logits, input_ids, attention_mask):
    """Summed cross-entropy of every prediction whose position and target are both real tokens."""
    total = logits.new_zeros((), dtype=torch.float32)
    for row in range(input_ids.shape[0]):
        for t in range(input_ids.shape[1] - 1):
            if attention_mask[row, t] and attention_mask[row, t + 1]:
                total = total - torch.log_softmax(logits[row, t].float(), -1)[input_ids[row, t + 1]]
    return total


def whole_model_reference(checkpoint, calibration, explicit_pairs=True):
    """dL/dx at every decoder layer input, dL/dW of every parameter, and per MoE layer the explicit
    routed pairs (expert, valid, h [I], g = dL/df_j [H]) and W_down, from one whole-model autograd pass."""
    model = vanilla(checkpoint)
    prepare_experts_implementation(model)
    family, layers = moe_layers(model)
    inputs, routed, output_grads = {}, {}, {}

    def layer_pre_hook(index):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            hidden.retain_grad()
            inputs[index] = hidden
        return hook

    def experts_pre_hook(index):
        def hook(module, args, kwargs):
            bound = dict(zip(("hidden_states", "top_k_index", "top_k_weights"), args), **kwargs)
            routed[index] = {k: v.detach() for k, v in bound.items()}
        return hook

    def experts_hook(index):
        def hook(module, args, kwargs, output):
            output.register_hook(lambda grad: output_grads.__setitem__(index, grad.detach()))
        return hook

    handles = [layer.register_forward_pre_hook(layer_pre_hook(i), with_kwargs=True)
               for i, layer in enumerate(decoder_layers(model))]
    for index, layer in layers:
        experts = family.experts(layer)
        handles.append(experts.register_forward_pre_hook(experts_pre_hook(index), with_kwargs=True))
        handles.append(experts.register_forward_hook(experts_hook(index), with_kwargs=True))
    logits = text_runner(model)(input_ids=calibration.input_ids, attention_mask=calibration.attention_mask,
                                use_cache=False).logits
    loss = reference_loss(logits, calibration.input_ids, calibration.attention_mask)
    loss.backward()
    for handle in handles:
        handle.remove()
    valid = calibration.attention_mask.reshape(-1).bool()
    pairs = {}
    for index, layer in layers if explicit_pairs else ():
        experts = family.experts(layer)
        assert not experts.is_transposed and experts.has_gate and not experts.has_bias
        x, top_k_index, top_k_weights = (routed[index][k] for k in ("hidden_states", "top_k_index", "top_k_weights"))
        grad_y = output_grads[index]
        expert_ids, hs, gs, valids = [], [], [], []
        with torch.no_grad():
            for token in range(x.shape[0]):
                for slot in range(top_k_index.shape[1]):
                    j = int(top_k_index[token, slot])
                    gate, up = (x[token] @ experts.gate_up_proj[j].T).chunk(2)
                    hs.append(experts.act_fn(gate) * up)
                    gs.append(top_k_weights[token, slot] * grad_y[token])  # dL/df_j
                    expert_ids.append(j)
                    valids.append(bool(valid[token]))
        pairs[index] = dict(expert=torch.tensor(expert_ids), valid=torch.tensor(valids), h=torch.stack(hs).double(),
                            g=torch.stack(gs).double(), down=experts.down_proj.detach().double(),
                            num_experts=experts.num_experts)
    input_grads = {i: inputs[i].grad.detach() for i in inputs}
    weight_grads = {name: p.grad.detach() for name, p in model.named_parameters() if p.grad is not None}
    return input_grads, weight_grads, pairs, float(loss.detach())


class Recorder(LayerGradientCallback):
    """Keeps dL/dx of every layer input per batch and, for ``weight_layers``, the weight gradients."""

    def __init__(self, weight_layers=()):
        self.weight_layers = set(weight_layers)
        self.input_grads: dict[int, dict[int, torch.Tensor]] = {}
        self.dw: dict[str, torch.Tensor] = {}

    def wants_weight_grads(self, index):
        return index in self.weight_layers

    def after_batch(self, index, layer, grads):
        self.input_grads.setdefault(index, {})[grads.batch] = grads.input_grad.detach().clone()

    def end_layer(self, index, layer):
        for name, p in layer.named_parameters():
            if index in self.weight_layers:
                self.dw[f"model.layers.{index}.{name}"] = p.grad.detach().clone()
            else:
                assert p.grad is None  # no weight gradient unless asked


def assert_close(actual, expected, rtol=1e-5):
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=rtol * scale + 1e-12)


@pytest.fixture(scope="module", params=FAMILIES)
def reference(request, tiny_checkpoint):
    checkpoint = tiny_checkpoint(request.param)
    calibration = padded_calibration()
    return request.param, checkpoint, calibration, whole_model_reference(checkpoint, calibration)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_family_loss_and_gradients_equal_whole_model(family, tiny_checkpoint):
    """Hybrid layers, dense layers, shared experts, logit scaling, tied heads: the loss and dL/dx at
    every layer input equal the whole model's."""
    checkpoint = tiny_checkpoint(family)
    calibration = padded_calibration(samples=3, seq_len=10)
    engine_spec = family_for_model_type(family).spec.get("engine", {})
    if "carry" in engine_spec or "accumulate" in engine_spec:  # GLM-MoE-DSA, HY-V4, Inkling-2: refused, not wrong
        with pytest.raises(MoePruneError, match="does not carry yet"):
            layer_gradients(checkpoint, calibration, [Recorder()], batch_size=1, progress=False)
        return
    input_grads, _, _, loss = whole_model_reference(checkpoint, calibration, explicit_pairs=False)
    recorder = Recorder()
    summary = layer_gradients(checkpoint, calibration, [recorder], batch_size=1, progress=False)
    assert summary.loss_sum == pytest.approx(loss, rel=1e-5)
    assert set(recorder.input_grads) == set(input_grads)
    for index, per_batch in recorder.input_grads.items():
        assert_close(torch.cat([per_batch[b] for b in sorted(per_batch)]), input_grads[index])


def test_input_and_weight_gradients_equal_whole_model_autograd(reference):
    family, checkpoint, calibration, (input_grads, weight_grads, _, loss) = reference
    recorder = Recorder(weight_layers=(0, 2))
    summary = layer_gradients(checkpoint, calibration, [recorder], batch_size=2, progress=False)
    mask = calibration.attention_mask
    assert summary.loss_tokens == int((mask[:, 1:] & mask[:, :-1]).sum())
    assert summary.loss_sum == pytest.approx(loss, rel=1e-5)
    assert set(recorder.input_grads) == set(input_grads)  # every layer, down to layer 0
    for index, per_batch in recorder.input_grads.items():
        mine = torch.cat([per_batch[b] for b in sorted(per_batch)])
        assert mine.abs().max() > 0
        assert_close(mine, input_grads[index])
    assert recorder.dw and all(name.startswith(("model.layers.0.", "model.layers.2.")) for name in recorder.dw)
    for name, grad in recorder.dw.items():
        assert_close(grad, weight_grads[name])


def heapr_stats(checkpoint, calibration, batch_size=2, **kwargs):
    return collect_stats(checkpoint, calibration, observers=observers_for_entries(HEAPR_REQUIRES),
                         batch_size=batch_size, progress=False, **kwargs)


def explicit_sums(pairs):
    """heapr_h2_sum, heapr_g2_sum and frequency from the explicit pairs (valid ones only)."""
    keep = pairs["valid"]
    expert, h, dl_dh = pairs["expert"][keep], pairs["h"][keep], None
    dl_dh = torch.stack([g @ pairs["down"][j] for g, j in zip(pairs["g"][keep], expert)])  # W_down^T dL/df_j
    num_experts, width = pairs["num_experts"], h.shape[-1]
    h2 = torch.zeros(num_experts, width, dtype=torch.float64).index_add_(0, expert, h.square())
    g2 = torch.zeros(num_experts, width, dtype=torch.float64).index_add_(0, expert, dl_dh.square())
    return h2, g2, torch.bincount(expert, minlength=num_experts).double()


def test_heapr_sums_equal_whole_model_autograd(reference):
    family, checkpoint, calibration, (_, _, pairs, _) = reference
    stats = heapr_stats(checkpoint, calibration)
    assert stats.metadata["backward"] == "layer_by_layer" and "summed" in stats.metadata["loss"]
    assert set(stats.layers) == set(pairs)
    for index, layer_pairs in pairs.items():
        h2, g2, frequency = explicit_sums(layer_pairs)
        entries = stats.layers[index]
        assert torch.equal(entries["frequency"], frequency)
        assert entries["heapr_h2_sum"].dtype == torch.float64 and g2.abs().max() > 0
        assert_close(entries["heapr_h2_sum"], h2, rtol=1e-5)
        assert_close(entries["heapr_g2_sum"], g2)


def test_factorised_score_equals_explicit_fisher(reference):
    """S_jk = mean(h_k^2) * w_k^T M_j w_k with M_j = mean over routed tokens of g g^T (d x d)."""
    family, checkpoint, calibration, (_, _, pairs, _) = reference
    stats = heapr_stats(checkpoint, calibration)
    for index, layer_pairs in pairs.items():
        scores = heapr_scores(stats.layers[index], layer=index, seed=0)
        keep = layer_pairs["valid"]
        expert, h, g = layer_pairs["expert"][keep], layer_pairs["h"][keep], layer_pairs["g"][keep]
        expected = torch.full_like(scores, -1.0)
        for j in range(layer_pairs["num_experts"]):
            routed = expert == j
            if not routed.any():
                continue
            fisher = g[routed].T @ g[routed] / routed.sum()  # M_j, d x d
            down = layer_pairs["down"][j]  # [H, I]: column k is w_k
            curvature = torch.einsum("hk,hd,dk->k", down, fisher, down)  # w_k^T M_j w_k
            expected[j] = h[routed].square().mean(0) * curvature
        assert_close(scores, expected)


def test_heapr_scores_by_hand():
    stats = {"frequency": torch.tensor([2.0, 0.0, 1.0]),
             "heapr_h2_sum": torch.tensor([[4.0, 8.0], [5.0, 5.0], [1.0, 0.0]]),
             "heapr_g2_sum": torch.tensor([[2.0, 6.0], [7.0, 7.0], [3.0, 9.0]])}
    scores = heapr_scores(stats, layer=0, seed=0)
    # expert 0: (4/2)(2/2) = 2, (8/2)(6/2) = 12; expert 1 unrouted: -1; expert 2: 1*3 = 3, 0*9 = 0
    assert scores.dtype == torch.float64
    assert torch.equal(scores, torch.tensor([[2.0, 12.0], [-1.0, -1.0], [3.0, 0.0]], dtype=torch.float64))
    with pytest.raises(StatsError, match="heapr"):
        heapr_scores({"frequency": stats["frequency"]})


def test_halves_merge_to_the_whole_and_batching_does_not_matter(tiny_checkpoint):
    checkpoint = tiny_checkpoint("qwen3_moe")
    calibration = padded_calibration()
    whole = heapr_stats(checkpoint, calibration)
    first = heapr_stats(checkpoint, CalibrationBatch(calibration.input_ids[:2], calibration.attention_mask[:2]))
    second = heapr_stats(checkpoint, CalibrationBatch(calibration.input_ids[2:], calibration.attention_mask[2:]))
    merged = first.merge(second)
    one_batch = heapr_stats(checkpoint, calibration, batch_size=4)
    for index, entries in whole.layers.items():
        for name in ("frequency", "heapr_h2_sum", "heapr_g2_sum"):
            torch.testing.assert_close(merged.layers[index][name], entries[name], rtol=1e-12, atol=0)
            assert_close(one_batch.layers[index][name], entries[name], rtol=1e-5)


def test_padding_never_counts(tiny_checkpoint):
    checkpoint = tiny_checkpoint("mixtral")
    calibration = padded_calibration()
    stats = heapr_stats(checkpoint, calibration)
    ids = calibration.input_ids.clone()
    ids[calibration.attention_mask == 0] = 1  # other tokens at the padded positions
    other = heapr_stats(checkpoint, CalibrationBatch(ids, calibration.attention_mask))
    top_k = 2
    for index, entries in stats.layers.items():
        assert entries["frequency"].sum() == top_k * calibration.num_tokens
        for name in ("heapr_h2_sum", "heapr_g2_sum"):
            # padding routed elsewhere changes the grouped matmul's group sizes: float32 rounding only
            assert_close(other.layers[index][name], entries[name], rtol=1e-5)
    # the padded rows contribute what their real tokens alone contribute
    rows = [calibration.input_ids[r][calibration.attention_mask[r].bool()] for r in range(len(calibration))]
    parts = [heapr_stats(checkpoint, CalibrationBatch(row[None], torch.ones_like(row)[None]), batch_size=1) for row in rows]
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)
    for index, entries in stats.layers.items():
        for name in ("frequency", "heapr_h2_sum", "heapr_g2_sum"):
            assert_close(merged.layers[index][name], entries[name])


def test_other_observers_run_in_the_same_pass_and_equal_a_forward_pass(tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint("mixtral")
    calibration = padded_calibration()
    returned = api.collect(checkpoint, calibration=calibration, observers=["heapr", "routing", "expert_outputs"],
                           batch_size=2, out=tmp_path / "stats.safetensors", progress=False)
    saved = RouterStats.load(tmp_path / "stats.safetensors")
    assert saved.metadata["backward"] == "layer_by_layer" and saved.metadata["loss_mean"] == returned.metadata["loss_mean"]
    forward = collect_stats(checkpoint, calibration, observers=["routing", "expert_outputs"], batch_size=2, progress=False)
    for index, entries in forward.layers.items():
        assert list(returned.layers[index])[:len(entries)] == list(entries)  # forward observers first, in order
        assert set(saved.layers[index]) == set(returned.layers[index])
        for name, value in entries.items():
            assert torch.equal(returned.layers[index][name], value), (index, name)
            assert torch.equal(saved.layers[index][name], value), (index, name)


def test_gradient_observers_need_the_sequential_mode(tiny_checkpoint):
    with pytest.raises(MoePruneError, match="sequential"):
        collect_stats(tiny_checkpoint("mixtral"), padded_calibration(), observers=["heapr"], mode="whole", progress=False)


def test_next_token_loss_masks_padding():
    logits = torch.randn(2, 4, 5)
    ids = torch.tensor([[1, 2, 3, 4], [0, 1, 2, 3]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    loss, count = next_token_loss(logits, ids, mask)
    expected = sum(F.cross_entropy(logits[r, t][None], ids[r, t + 1][None]) for r, t in ((0, 0), (0, 1), (1, 1), (1, 2)))
    assert count == 4
    torch.testing.assert_close(loss, expected)


def test_the_head_in_chunks_of_positions_is_exact(reference, monkeypatch):
    family, checkpoint, calibration, (input_grads, _, _, loss) = reference
    vocab = vanilla(checkpoint).config.vocab_size
    monkeypatch.setattr(backward, "HEAD_CHUNK_BYTES", 4 * 2 * vocab * 3)  # 3 positions per chunk at batch 2
    calls = []
    head_logits = backward.head_logits
    monkeypatch.setattr(backward, "head_logits", lambda *args: calls.append(1) or head_logits(*args))
    recorder = Recorder()
    summary = layer_gradients(checkpoint, calibration, [recorder], batch_size=2, progress=False)
    assert len(calls) == 2 * 4  # two batches, 11 predicting positions in chunks of 3
    assert summary.loss_sum == pytest.approx(loss, rel=1e-5)
    for index, per_batch in recorder.input_grads.items():
        assert_close(torch.cat([per_batch[b] for b in sorted(per_batch)]), input_grads[index])


def _heapr_rank(rank: int, model: str, out: str, ports: list[int]) -> None:
    """One data-parallel rank: uneven batches (3 + 2 rows) and a rank without a batch."""
    from test_distributed import launcher_env

    torch.set_num_threads(1)
    for (name, rows, batch_size), port in zip(DATA_PARALLEL_CASES, ports):
        os.environ.update(launcher_env(rank, port))
        calibration = padded_calibration(samples=5)
        calibration = CalibrationBatch(calibration.input_ids[:rows], calibration.attention_mask[:rows])
        heapr_stats(model, calibration, batch_size=batch_size).save(Path(out) / f"{name}-{rank}.safetensors")


#: (name, rows, batch size): 3 batches over 2 ranks; one batch for 2 ranks (rank 1 runs nothing)
DATA_PARALLEL_CASES = (("uneven", 5, 2), ("empty_rank", 3, 4))


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tiny_checkpoint, tmp_path):
    from test_distributed import WORLD, free_port

    model = tiny_checkpoint("qwen2_moe")  # shared experts
    references = {}
    for name, rows, batch_size in DATA_PARALLEL_CASES:
        calibration = padded_calibration(samples=5)
        references[name] = heapr_stats(model, CalibrationBatch(calibration.input_ids[:rows], calibration.attention_mask[:rows]),
                                       batch_size=batch_size)
    ports = [free_port() for _ in DATA_PARALLEL_CASES]
    mp.start_processes(_heapr_rank, args=(str(model), str(tmp_path), ports), nprocs=WORLD, join=True, start_method="fork")
    for name, _, _ in DATA_PARALLEL_CASES:
        reference = references[name]
        for rank in range(WORLD):
            stats = RouterStats.load(tmp_path / f"{name}-{rank}.safetensors")
            assert stats.metadata["loss_tokens"] == reference.metadata["loss_tokens"]
            assert stats.metadata["loss_mean"] == pytest.approx(reference.metadata["loss_mean"], rel=1e-12)
            for index, entries in reference.layers.items():
                assert set(stats.layers[index]) == set(entries)
                for entry, value in entries.items():
                    assert_close(stats.layers[index][entry], value, rtol=1e-9)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
def test_dl_dh_is_captured_under_both_experts_implementations(implementation, tiny_checkpoint):
    """The gradient-instrumented layer on a whole model (one autograd pass) gives the explicit sums,
    whether the experts loop over experts (eager: one h per expert) or run grouped (one h)."""
    checkpoint = tiny_checkpoint("mixtral")
    calibration = padded_calibration()
    _, _, pairs, _ = whole_model_reference(checkpoint, calibration)
    model = vanilla(checkpoint)
    model.set_experts_implementation(implementation)
    family, layers = moe_layers(model)
    index, layer = layers[1]
    observers = [o for o in new_observers(family, layer, model.config, ["heapr"]) if type(o).name == "heapr"]
    instrumented = backward._GradientInstrumentedLayer(family, layer, observers)
    instrumented.token_mask = calibration.attention_mask.reshape(-1).bool()
    try:
        logits = model(input_ids=calibration.input_ids, attention_mask=calibration.attention_mask, use_cache=False).logits
        reference_loss(logits, calibration.input_ids, calibration.attention_mask).backward()
        instrumented.after_backward()
    finally:
        instrumented.remove()
    assert "_apply_gate" not in family.experts(layer).__dict__ and "forward" not in family.experts(layer).__dict__
    h2, g2, _ = explicit_sums(pairs[index])
    result = instrumented.result()
    assert_close(result["heapr_h2_sum"], h2)
    assert_close(result["heapr_g2_sum"], g2)
