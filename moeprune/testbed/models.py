"""Testbed MoE recipes: small models of real transformers classes, trained from scratch on CPU.

Each recipe is a :class:`TestbedRecipe` in :data:`RECIPES`; it names a transformers config class,
its keyword arguments, the tokenizer's vocabulary size and the training hyper-parameters (fixed
step count, never a time limit).  :func:`build_model` instantiates the model from the recipe,
:func:`recipe_hash` identifies a recipe (and the code version that trains it) for caching.

Recipes
-------
``mixtral``
    ``MixtralForCausalLM``: hidden 256, 4 layers, 16 experts top-2 (intermediate 256), vocab
    4096, about 15.5M parameters; per-layer Switch load-balancing loss with coefficient 0.01.
``qwen3moe``
    ``Qwen3MoeForCausalLM``, fine-grained: hidden 256, 4 layers, 64 experts top-8 with
    ``moe_intermediate_size`` 64 (same active expert width as ``mixtral``: 8 x 64 = 2 x 256),
    ``norm_topk_prob=True`` as in the released Qwen3-MoE configs, aux-loss coefficient 0.01;
    about 15.5M parameters.
``deepseekv3``
    ``DeepseekV3ForCausalLM``: hidden 256, 4 layers, ``first_k_dense_replace=1`` (layer 0 is a
    dense MLP), 32 routed experts top-4 in ``n_group=4`` groups with ``topk_group=2``, one shared
    expert, sigmoid scores with ``e_score_correction_bias``, ``norm_topk_prob`` and
    ``routed_scaling_factor=2.5``; small MLA (q_lora_rank 64, kv_lora_rank 64, qk_nope 32,
    qk_rope 16, v_head 32); about 12.6M parameters.  transformers has no load-balancing loss for DeepSeek-V3, and the
    real model does not use one either: it balances with the auxiliary-loss-free bias update,
    which :mod:`moeprune.testbed.train` applies after every optimizer step
    (``bias_j += gamma * sign(mean_load - load_j)``, ``gamma = 1e-3``).
``qwen2moe``
    ``Qwen2MoeForCausalLM``, the testbed of the dense structured pruning (every dense unit is
    present): hidden 256, 4 layers; grouped-query attention with 16 query heads of ``head_dim`` 32
    in 8 KV groups (one group = 12.5 % of a layer's attention parameters) and Qwen2's q/k/v
    biases; layer 0 is a dense MLP (``mlp_only_layers=[0]``, intermediate 512); layers 1-3 have
    32 routed experts top-4 (``moe_intermediate_size`` 128, ``norm_topk_prob=False`` as in the
    released Qwen1.5-MoE config) plus a shared expert of intermediate 256 scaled by
    ``sigmoid(shared_expert_gate(x))``; per-layer aux-loss coefficient 0.01; about 14.1M
    parameters.  300 steps (1.23M tokens, a third of the others' budget): it was added while the
    2-core machine ran about ten jobs, where one step took 7-15 s instead of the ~2.5 CPU-seconds
    it costs (1,082 tokens/s at 1 thread under load, CPU time / wall time 0.67: ``--benchmark 8
    --threads 1``); the dense comparisons are made within this model, at the same budget.  Build
    ``c10cd5156859``: 51.8 min at 1 thread on that machine, validation loss code / prose / legal /
    math 5.30 / 5.51 / 3.58 / 1.23 (under-trained against the others' 4.1-4.4 / 4.3-4.7 /
    2.1-2.4 / 1.2), routing balanced (busiest expert 4.6-6.0 % of a layer's slots, none unused).
``tiny``
    ``MixtralForCausalLM`` with hidden 64, 2 layers, 8 experts top-2, vocab 1024, sequences of
    128: about 0.35M parameters, for tests and quick demos (builds and trains in well under
    2 minutes).

Load balancing: the transformers default ``router_aux_loss_coef`` of 0.001 collapses routing at
this scale (the issue's trial run: one expert took 30-45 % of the routed slots and 1-2 experts per
layer were never selected, which makes frequency pruning look better than it is).  Worse,
transformers 5.23's ``load_balancing_loss_func`` (what ``MixtralForCausalLM`` and
``Qwen3MoeForCausalLM`` add to the loss when called with ``labels`` and
``output_router_logits=True``) sums the top-k counts and router probabilities over *all layers*
before multiplying them, so it only balances expert indices summed over layers.  The trainer
therefore computes the Switch loss per layer and averages it
(:func:`moeprune.testbed.train.per_layer_balance_loss`) with the recipe's coefficient 0.01, which
is also written to the saved config as ``router_aux_loss_coef``; the saved config has
``output_router_logits=False``.

The step counts and the measured speeds behind them are documented in
:mod:`moeprune.testbed.train`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

#: Bump when the training code changes in a way that changes the trained weights: it is part of
#: :func:`recipe_hash`, so cached testbeds are rebuilt.
TRAIN_CODE_VERSION = 2


@dataclass(frozen=True)
class TestbedRecipe:
    """A testbed model and how to train it."""

    __test__ = False  # not a pytest test class

    name: str
    config_class: str
    """Name of the transformers config class (``MixtralConfig``, ...)."""
    model_class: str
    """Name of the transformers causal-LM class (``MixtralForCausalLM``, ...)."""
    config: dict[str, Any]
    """Keyword arguments of the config class (vocab size and special token ids are added)."""
    vocab_size: int
    steps: int
    """Fixed number of optimizer steps."""
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    router_aux_loss_coef: float | None = 0.01
    """Coefficient of transformers' load-balancing loss (None: the class has none)."""
    bias_update_gamma: float | None = None
    """Step size of DeepSeek-V3's aux-loss-free ``e_score_correction_bias`` update (None: off)."""
    description: str = ""
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


_ATTN = dict(num_attention_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-6,
             tie_word_embeddings=False, initializer_range=0.02)

RECIPES: dict[str, TestbedRecipe] = {
    "mixtral": TestbedRecipe(
        name="mixtral",
        config_class="MixtralConfig",
        model_class="MixtralForCausalLM",
        config=dict(hidden_size=256, intermediate_size=256, num_hidden_layers=4, num_key_value_heads=2,
                    num_local_experts=16, num_experts_per_tok=2, router_jitter_noise=0.0, **_ATTN),
        vocab_size=4096,
        steps=1000,
        description="Mixtral-style: 16 experts top-2, softmax router, per-layer aux load-balancing loss 0.01",
    ),
    "qwen3moe": TestbedRecipe(
        name="qwen3moe",
        config_class="Qwen3MoeConfig",
        model_class="Qwen3MoeForCausalLM",
        config=dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=64, num_hidden_layers=4,
                    num_key_value_heads=2, head_dim=64, num_experts=64, num_experts_per_tok=8,
                    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], **_ATTN),
        vocab_size=4096,
        steps=750,
        description="Qwen3-MoE-style fine-grained: 64 experts top-8 (moe_intermediate 64), per-layer aux loss 0.01",
    ),
    "deepseekv3": TestbedRecipe(
        name="deepseekv3",
        config_class="DeepseekV3Config",
        model_class="DeepseekV3ForCausalLM",
        config=dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
                    num_key_value_heads=4, n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4,
                    n_group=4, topk_group=2, first_k_dense_replace=1, norm_topk_prob=True,
                    routed_scaling_factor=2.5, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
                    qk_rope_head_dim=16, v_head_dim=32, **_ATTN),
        vocab_size=4096,
        steps=1100,
        router_aux_loss_coef=None,
        bias_update_gamma=1e-3,
        description="DeepSeek-V3-style: 1 shared + 32 routed experts top-4, sigmoid routing with "
                    "e_score_correction_bias (aux-loss-free bias update), 4 groups top-2, first layer dense, MLA",
    ),
    "qwen2moe": TestbedRecipe(
        name="qwen2moe",
        config_class="Qwen2MoeConfig",
        model_class="Qwen2MoeForCausalLM",
        config=dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                    shared_expert_intermediate_size=256, num_hidden_layers=4, num_key_value_heads=8,
                    head_dim=32, num_experts=32, num_experts_per_tok=4, norm_topk_prob=False,
                    decoder_sparse_step=1, mlp_only_layers=[0], qkv_bias=True, use_sliding_window=False,
                    **{**_ATTN, "num_attention_heads": 16}),
        vocab_size=4096,
        steps=300,
        description="Qwen2-MoE-style, for dense structured pruning: GQA 16 query heads in 8 KV groups, "
                    "layer 0 dense MLP, 32 routed experts top-4 + sigmoid-gated shared expert, per-layer aux loss 0.01",
    ),
    "tiny": TestbedRecipe(
        name="tiny",
        config_class="MixtralConfig",
        model_class="MixtralForCausalLM",
        config=dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_key_value_heads=2,
                    num_local_experts=8, num_experts_per_tok=2, router_jitter_noise=0.0,
                    **{**_ATTN, "max_position_embeddings": 512}),
        vocab_size=1024,
        steps=600,
        batch_size=16,
        seq_len=128,
        lr=3e-3,
        warmup_steps=20,
        description="tiny Mixtral for tests: 8 experts top-2, hidden 64, 2 layers",
    ),
}

DEFAULT_RECIPE = "mixtral"


def get_recipe(name: str) -> TestbedRecipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise KeyError(f"unknown testbed recipe {name!r}; known: {sorted(RECIPES)}") from None


def list_recipes() -> list[str]:
    return sorted(RECIPES)


def recipe_hash(recipe: TestbedRecipe | str, length: int = 12) -> str:
    """Stable hash of a recipe, the training code version and the corpus format version."""
    from moeprune.testbed.corpus import FORMAT_VERSION

    if isinstance(recipe, str):
        recipe = get_recipe(recipe)
    payload = {"recipe": recipe.to_dict(), "train_code": TRAIN_CODE_VERSION, "corpus_format": FORMAT_VERSION}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def with_steps(recipe: TestbedRecipe, steps: int) -> TestbedRecipe:
    """The same recipe with another step count (warmup shrunk to fit short runs)."""
    return replace(recipe, steps=int(steps), warmup_steps=min(recipe.warmup_steps, max(1, int(steps) // 10)))


def build_config(recipe: TestbedRecipe | str, vocab_size: int | None = None, pad_token_id: int | None = None,
                 eos_token_id: int | None = None, bos_token_id: int | None = None):
    """The transformers config of a recipe (``vocab_size`` defaults to the recipe's)."""
    import transformers

    if isinstance(recipe, str):
        recipe = get_recipe(recipe)
    cls = getattr(transformers, recipe.config_class)
    kwargs = dict(recipe.config)
    kwargs["vocab_size"] = int(vocab_size if vocab_size is not None else recipe.vocab_size)
    kwargs["pad_token_id"] = pad_token_id
    kwargs["eos_token_id"] = eos_token_id
    kwargs["bos_token_id"] = bos_token_id
    if recipe.router_aux_loss_coef is not None:
        kwargs["router_aux_loss_coef"] = recipe.router_aux_loss_coef
    kwargs["output_router_logits"] = False
    kwargs["use_cache"] = True
    config = cls(**kwargs)
    return config


def build_model(recipe: TestbedRecipe | str, vocab_size: int | None = None, seed: int | None = 0,
                pad_token_id: int | None = None, eos_token_id: int | None = None,
                bos_token_id: int | None = None):
    """A freshly initialised float32 model of the recipe (``torch.manual_seed(seed)`` first unless
    ``seed`` is None)."""
    import torch
    import transformers

    if isinstance(recipe, str):
        recipe = get_recipe(recipe)
    config = build_config(recipe, vocab_size, pad_token_id, eos_token_id, bos_token_id)
    if seed is not None:
        torch.manual_seed(int(seed))
    model_cls = getattr(transformers, recipe.model_class)
    model = model_cls(config).to(torch.float32)
    return model


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
