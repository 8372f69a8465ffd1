"""``[engine] accumulate``: decoder layers that take the inputs of earlier layers, accumulated by the model body
(Inkling-2's ``block_states``), replayed one layer at a time exactly as the model body runs them."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from moeprune.arch import decoder_layers
from moeprune.calibration.engine import LayerAccumulator, capture_layer_inputs


def test_grow_appends_the_input_of_marked_layers_only():
    accumulate = LayerAccumulator(when="is_block_boundary")
    state = torch.zeros(1, 2, 0, 3)
    layer_input = torch.arange(6.0).reshape(1, 2, 3)
    boundary, inner = nn.Module(), nn.Module()
    boundary.is_block_boundary, inner.is_block_boundary = True, False
    assert accumulate.grow(inner, state, layer_input) is state
    grown = accumulate.grow(boundary, state, layer_input)
    assert grown.shape == (1, 2, 1, 3) and torch.equal(grown[:, :, 0], layer_input)
    twice = accumulate.grow(boundary, grown, layer_input + 1)
    assert torch.equal(twice[:, :, 0], layer_input) and torch.equal(twice[:, :, 1], layer_input + 1)


def _block_model() -> nn.Module:
    """A 4-layer Inkling-2 text model with a block boundary every 2 layers (layers 0 and 2)."""
    config = CONFIG_MAPPING["inkling2_text"](
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, head_dim=8, swa_num_attention_heads=2,
        swa_num_key_value_heads=1, swa_head_dim=8, d_rel=4, rel_extent=8, sliding_window_size=4, hidden_size=16,
        num_attention_heads=2, num_key_value_heads=1, vocab_size=64, unpadded_vocab_size=60,
        n_layers_per_attn_res_block=2, num_hidden_layers=4, layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding", "hybrid"],
        pad_token_id=1, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # the block-attention queries start at zero (uniform weights): make them count
        for name, param in model.named_parameters():
            if name.endswith("input.query"):
                param.normal_()
    return model


def test_layer_by_layer_replay_with_accumulated_inputs_equals_the_model_body():
    model = _block_model()
    layers = decoder_layers(model)
    ids = torch.randint(2, 60, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    reference: dict[int, torch.Tensor] = {}
    handles = [layer.register_forward_hook(lambda module, args, out, i=i: reference.__setitem__(i, out))
               for i, layer in enumerate(layers)]
    with torch.no_grad():
        model.model(input_ids=ids, attention_mask=mask, use_cache=False)
    for handle in handles:
        handle.remove()

    accumulate = LayerAccumulator(when="is_block_boundary")
    initial: list[torch.Tensor] = []
    with torch.no_grad():
        first, kwargs = capture_layer_inputs(model, [(ids, mask)], accumulate=accumulate, initial=initial)
        hidden, state = first[0], initial[0]
        assert state.shape[-2] == 0  # nothing is accumulated before layer 0
        for index, layer in enumerate(layers):
            output = layer(hidden, state, **kwargs[0][index])
            state = accumulate.grow(layer, state, hidden)
            assert torch.equal(output, reference[index]), index
            hidden = output
    assert state.shape[-2] == 2  # the inputs of layers 0 and 2
