"""Tiny random models of every supported family, built from transformers config classes.

Used by the test suite and by the no-argument demo: nothing is downloaded. Random weights are
perturbed where a zero initialisation would hide routing bugs (DeepSeek-V3's correction bias, the
GPT-OSS router bias, RMSNorm weights), so that the routing tests exercise every term.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .arch import known_families, set_config_value

TINY_FAMILIES = (
    "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe", "gpt_oss",
    # added with issue 14 (one routers/*.toml each)
    "glm4_moe", "dots1", "solar_open", "glm4_moe_lite", "deepseek_v32", "flex_olmo", "exaone_moe",
    "minimax_m2", "phimoe", "granitemoe", "granitemoeshared", "granitemoe_swa",
    "afmoe", "mellum", "mimo_v2_flash", "granitemoehybrid", "qwen3_next",
    "qwen3_5_moe_text", "minimax", "sarvam_mla", "jamba",
    "flint", "laguna", "axk1", "aria_text", "cohere2_moe",
    "lfm2_moe", "minimax_m3_vl_text", "beam", "axk2", "dots3_note_text", "hunyuan_v1_moe", "glm_moe_dsa", "hy_v4", "kolibri1",
    "llama4_text", "longcat_flash", "nemotron_h", "inkling_text", "zaya", "jetmoe",
    # checkpoint-layout families (renamed, split or concatenated on load: moeprune/layout.py)
    "hy_v3", "kimi_linear", "bailing_hybrid", "lara_mini", "sarvam_moe", "qwen4_exp_text", "ernie4_5_moe",
    # layers at transformer.blocks.N, flattened [E * I, H] experts, nested ffn_config
    "dbrx",
    "deepseek_v4",
    "inkling2_text", "inkling2_loop_text",
    # multimodal wrappers: the text decoder of a supported family beside vision (and audio) towers
    "qwen3_5_moe", "qwen4_exp", "dots3_note", "llama4",
)

_COMMON = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def tiny_config(family: str, **overrides):
    """A config of ``family`` small enough to build in milliseconds (8 or 16 experts, 3 layers)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers import (
        DeepseekV2Config,
        DeepseekV3Config,
        GptOssConfig,
        MixtralConfig,
        OlmoeConfig,
        Qwen2MoeConfig,
        Qwen3MoeConfig,
    )

    # MLA attention: real DeepSeek configs have as many key/value heads as query heads
    mla = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    common_mla = {**_COMMON, "num_key_value_heads": _COMMON["num_attention_heads"]}
    common_mla_overrides = {"num_key_value_heads": _COMMON["num_attention_heads"]}
    # DeepSeek-V3-style routers (sigmoid + correction bias, group-limited, x routed_scaling_factor) with a
    # shared expert: 8 experts in 2 groups, the best group only, so the group limit binds
    sigmoid_groups = dict(
        intermediate_size=24, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
    )
    # DeepSeek-V3.2 sparse attention (lightning indexer) at tiny sizes: it keeps every token here
    indexer = dict(index_topk=64, index_head_dim=8, index_n_heads=2)

    def sigmoid_family(config_class: str, **extra):
        """A builder of ``config_class`` (a transformers class name, or a model type for config classes
        transformers does not export) with the sigmoid-groups defaults; an ``extra`` of None drops a key."""
        kwargs = {**_COMMON, **sigmoid_groups, **extra}
        config = getattr(transformers, config_class, None) or CONFIG_MAPPING[config_class]
        return lambda: config(**{k: v for k, v in kwargs.items() if v is not None})

    builders = {
        "glm4_moe": sigmoid_family("Glm4MoeConfig", first_k_dense_replace=1, head_dim=8, use_qk_norm=True),
        "dots1": sigmoid_family("Dots1Config", first_k_dense_replace=1, head_dim=8,
                                n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0),
        "solar_open": sigmoid_family("SolarOpenConfig", head_dim=8, routed_scaling_factor=1.5),
        "glm4_moe_lite": sigmoid_family("Glm4MoeLiteConfig", **mla, **{**common_mla_overrides},
                                        mlp_layer_types=["dense", "sparse", "sparse"]),
        "deepseek_v32": sigmoid_family("DeepseekV32Config", **{**mla, "q_lora_rank": 16}, **common_mla_overrides,
                                       **indexer, first_k_dense_replace=1, mlp_layer_types=["dense", "sparse", "sparse"]),
        "flex_olmo": lambda: transformers.FlexOlmoConfig(
            intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, pad_token_id=1,
            eos_token_id=0, bos_token_id=0, **_COMMON,
        ),
        # EXAONE-MoE: hybrid sliding-window / full attention, first layer dense, num_experts
        "exaone_moe": lambda: transformers.ExaoneMoeConfig(
            **{k: v for k, v in sigmoid_groups.items() if not k.startswith("n_")}, n_group=2, num_experts=8, num_shared_experts=1, head_dim=8,
            first_k_dense_replace=1, mlp_layer_types=["dense", "sparse", "sparse"], sliding_window=8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"], **_COMMON,
        ),
        "minimax_m2": lambda: transformers.MiniMaxM2Config(
            intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=8, bos_token_id=0,
            eos_token_id=0, **_COMMON,
        ),
        "phimoe": lambda: transformers.PhimoeConfig(
            intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, router_jitter_noise=0.3,
            **{**_COMMON, "max_position_embeddings": 4096},
        ),
        "granitemoe": lambda: transformers.GraniteMoeConfig(
            intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, **_COMMON,
        ),
        "granitemoeshared": lambda: transformers.GraniteMoeSharedConfig(
            intermediate_size=16, shared_intermediate_size=24, num_local_experts=8, num_experts_per_tok=2, **_COMMON,
        ),
        "granitemoe_swa": lambda: transformers.GraniteMoeSWAConfig(
            intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], **_COMMON,
        ),
        "afmoe": lambda: transformers.AfmoeConfig(
            intermediate_size=24, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
            num_shared_experts=1, num_dense_layers=1, route_scale=1.5, head_dim=8, sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], **_COMMON,
        ),
        "mellum": lambda: transformers.MellumConfig(
            intermediate_size=24, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
            head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            mlp_layer_types=["sparse", "sparse", "sparse"], num_mtp_layers=0, **_COMMON,
        ),
        # MiMo-V2-Flash: DeepSeek-V3 routing without shared experts, sliding-window layers, first layer dense
        "mimo_v2_flash": sigmoid_family(
            "MiMoV2FlashConfig", n_shared_experts=None, head_dim=8, v_head_dim=8, sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            mlp_layer_types=["dense", "sparse", "sparse"],
        ),
        # Mamba-2 layers between attention layers (hybrid): the sequential engine replays each layer type
        "granitemoehybrid": lambda: transformers.GraniteMoeHybridConfig(
            intermediate_size=16, shared_intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
            layer_types=["mamba", "attention", "mamba"], mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
            mamba_n_groups=1, mamba_chunk_size=16, **_COMMON,
        ),
        # Mamba layers with attention every other layer and a MoE block every other layer (hybrid)
        "jamba": lambda: transformers.JambaConfig(
            intermediate_size=24, num_experts=8, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
            attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4,
            **{**_COMMON, "num_hidden_layers": 4},
        ),
        # Gated DeltaNet linear attention between full attention layers (hybrid)
        "qwen3_next": lambda: transformers.Qwen3NextConfig(
            intermediate_size=24, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8,
            num_experts_per_tok=2, norm_topk_prob=True, head_dim=8,
            layer_types=["linear_attention", "full_attention", "linear_attention"], linear_num_key_heads=2,
            linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4,
            **_COMMON,
        ),
        "qwen3_5_moe_text": lambda: transformers.Qwen3_5MoeTextConfig(
            moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
            head_dim=8, layer_types=["linear_attention", "full_attention", "linear_attention"],
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
            linear_conv_kernel_dim=4, **_COMMON,
        ),
        # lightning (linear) attention between softmax attention layers
        "minimax": lambda: transformers.MiniMaxConfig(
            intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=8, block_size=8,
            layer_types=["full_attention", "linear_attention", "full_attention"], **_COMMON,
        ),
        "sarvam_mla": sigmoid_family("sarvam_mla", **{**mla, "q_lora_rank": 16}, **common_mla_overrides,
                                     first_k_dense_replace=1),
        # Flint: sigmoid top-k of float32 logits (no bias), renormalised; ungated shared expert; first layer dense
        "flint": sigmoid_family("FlintConfig", num_experts=8, n_routed_experts=None, n_shared_experts=None,
                                n_group=None, topk_group=None, routed_scaling_factor=None, head_dim=8,
                                shared_expert_intermediate_size=24, mlp_only_layers=[0], sliding_window=8,
                                layer_types=["full_attention", "sliding_attention", "full_attention"]),
        # Laguna: sigmoid + correction bias (float32), renormalised, weights in the hidden dtype; first layer dense
        "laguna": sigmoid_family("LagunaConfig", num_experts=8, n_routed_experts=None, n_shared_experts=None,
                                 n_group=None, topk_group=None, routed_scaling_factor=None, norm_topk_prob=None,
                                 head_dim=8, shared_expert_intermediate_size=24, moe_routed_scaling_factor=1.5,
                                 mlp_layer_types=["dense", "sparse", "sparse"]),
        # A.X-K1: DeepSeek-V3 (MLA, sigmoid groups) with a norm after the MoE block
        "axk1": sigmoid_family("AXK1Config", **{**mla, "q_lora_rank": 16}, **common_mla_overrides,
                               mlp_layer_types=["dense", "sparse", "sparse"]),
        # Aria (text): top-k of the logits, softmax over the selected; transposed fused experts; 2 shared experts
        "aria_text": lambda: transformers.AriaTextConfig(
            intermediate_size=16, moe_num_experts=8, moe_topk=2, moe_num_shared_experts=2, **_COMMON,
        ),
        # Cohere2-MoE: top-k of the logits then softmax (float32, cast back); parallel attention + MoE block
        "cohere2_moe": lambda: transformers.Cohere2MoeConfig(
            intermediate_size=16, num_experts=8, num_experts_per_tok=2, head_dim=8, sliding_window=8,
            sliding_window_pattern=2, **{**_COMMON, "tie_word_embeddings": True},
        ),
        # LFM2-MoE (hybrid: gated short convolutions between attention layers): sigmoid + expert_bias,
        # renormalised (+1e-6) x routed_scaling_factor; the first num_dense_layers layers are dense
        "lfm2_moe": lambda: transformers.Lfm2MoeConfig(
            intermediate_size=24, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, num_dense_layers=1,
            routed_scaling_factor=1.5, layer_types=["conv", "full_attention", "conv"], pad_token_id=1,
            eos_token_id=0, bos_token_id=0, **_COMMON,
        ),
        # MiniMax-M3 (text): sigmoid + correction bias, renormalised; clamped SwiGLU experts; shared experts
        "minimax_m3_vl_text": lambda: CONFIG_MAPPING["minimax_m3_vl_text"](
            intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=8, rotary_dim=4,
            dense_intermediate_size=24, shared_intermediate_size=16, routed_scaling_factor=1.5, index_n_heads=2,
            index_head_dim=8, index_block_size=4, index_topk_blocks=2, index_local_blocks=1, bos_token_id=0,
            eos_token_id=0, **_COMMON,
        ),
        # Lara-mini (hybrid: Gated DeltaNet between sliding / full attention layers): Flint's sigmoid MoE block
        "lara_mini": lambda: CONFIG_MAPPING["lara_mini"](
            moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
            head_dim=8, layer_types=["linear_attention", "sliding_attention", "full_attention"], sliding_window=8,
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
            linear_conv_kernel_dim=4, **_COMMON,
        ),
        # Beam: DeepSeek-V3 routing (sorted top-k), output x routed_scaling_factor; sliding-window layers
        "beam": sigmoid_family("BeamConfig", num_experts=8, n_routed_experts=None, n_shared_experts=None,
                               head_dim=8, sliding_window=8, mlp_layer_types=["dense", "sparse", "sparse"],
                               layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
        # A.X-K2: DeepSeek-V3.2 (lightning indexer) whose group limit fills the other groups with 0, not -inf
        "axk2": sigmoid_family("AXK2Config", **{**mla, "q_lora_rank": 16}, **common_mla_overrides, **indexer,
                               head_dim=16, gated_norm_rank=4, mlp_layer_types=["dense", "sparse", "sparse"],
                               bos_token_id=0, eos_token_id=0),
        # dots.3 note (text decoder): DeepSeek-V3 routing; indexed (sparse) and sliding-window MLA layers
        "dots3_note_text": sigmoid_family("dots3_note_text", **{**mla, "q_lora_rank": 16}, **common_mla_overrides,
                                          **indexer, head_dim=16, shared_experts_intermediate_size=16, sliding_window=8,
                                          mlp_layer_types=["dense", "sparse", "sparse"],
                                          pad_token_id=1, bos_token_id=0, eos_token_id=0),
        # Hunyuan-A13B: softmax (float32 router) top-k, renormalised; an always-on shared MLP
        "hunyuan_v1_moe": lambda: transformers.HunYuanMoEV1Config(
            intermediate_size=16, num_experts=8, moe_topk=2, head_dim=8, pad_token_id=1, bos_token_id=0,
            eos_token_id=0, eod_token_id=0, sep_token_id=0, **_COMMON,
        ),
        # GLM-5 (glm_moe_dsa): DeepSeek-V3 routing; an indexer keeps 4 keys per query, and the "shared" layer
        # reuses the previous layer's top-k (prev_topk_indices, carried between layers by the engine)
        "glm_moe_dsa": sigmoid_family("GlmMoeDsaConfig", **{**mla, "q_lora_rank": 16}, **common_mla_overrides,
                                      index_topk=4, index_head_dim=8, index_n_heads=2, head_dim=16,
                                      first_k_dense_replace=1, mlp_layer_types=["dense", "sparse", "sparse"],
                                      indexer_types=["full", "shared", "full"]),
        # HY-V4: GLM-5's indexer hand-over between layers, hyper-connection streams (hc_mult copies of the
        # hidden state, mixed by hc_head before the final norm), DeepSeek-V3 routing, clamped SwiGLU experts
        "hy_v4": sigmoid_family("HYV4Config", **{**mla, "q_lora_rank": 16}, **common_mla_overrides, index_topk=4,
                                index_head_dim=8, index_n_heads=2, head_dim=16, hc_mult=2,
                                mlp_layer_types=["dense", "sparse", "sparse"],
                                indexer_types=["full", "shared", "full"], pad_token_id=1, bos_token_id=0,
                                eos_token_id=0),
        # Kolibri-1: top-k of float32 logits + correction bias, weights = sigmoid of the selected logits
        "kolibri1": lambda: CONFIG_MAPPING["kolibri1"](
            moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=True, head_dim=8, sliding_window=8, **_COMMON,
        ),
        # Llama 4 (text): sigmoid of the top-k logits scales each expert's input; every expert runs on every
        # token; a shared expert; the first layer dense (moe_layers), chunked attention and a NoPE layer
        "llama4_text": lambda: CONFIG_MAPPING["llama4_text"](
            intermediate_size=16, intermediate_size_mlp=24, num_local_experts=8, num_experts_per_tok=2, head_dim=8,
            moe_layers=[1, 2], attention_chunk_size=8, no_rope_layer_interval=3, pad_token_id=1, bos_token_id=0,
            eos_token_id=0, **_COMMON,
        ),
        # LongCat-Flash: 8 routed + 4 zero-computation (identity) experts behind one softmax router (+ bias);
        # two attention (MLA) and two dense MLP sublayers per decoder layer, the MoE block as a shortcut
        "longcat_flash": lambda: CONFIG_MAPPING["longcat_flash"](
            num_layers=2, n_routed_experts=8, zero_expert_num=4, moe_topk=2, expert_ffn_hidden_size=16,
            ffn_hidden_size=24, routed_scaling_factor=1.5, **{**mla, "q_lora_rank": 16}, head_dim=8,
            **{k: v for k, v in common_mla.items() if k != "num_hidden_layers"},
        ),
        # Nemotron-H (hybrid: Mamba-2, attention and MoE blocks, each its own decoder layer): DeepSeek-V3
        # routing, ungated relu2 experts (up/down only), an ungated shared expert; stored under backbone.
        "nemotron_h": lambda: CONFIG_MAPPING["nemotron_h"](
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, moe_shared_expert_intermediate_size=24,
            n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5, head_dim=8,
            layers_block_type=["mamba", "moe", "attention", "moe"], mamba_num_heads=4, mamba_head_dim=16,
            ssm_state_size=8, n_groups=1, chunk_size=16, **{**_COMMON, "num_hidden_layers": 4},
        ),
        # Inkling (text): the router scores 8 routed + 1 shared expert, weighed jointly; sliding / full attention
        # layers with short convolutions after the attention and MoE blocks
        "inkling_text": lambda: CONFIG_MAPPING["inkling_text"](
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16,
            intermediate_size=24, head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8,
            layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding"], mlp_layer_types=["sparse", "sparse", "sparse"],
            route_scale=2.0, pad_token_id=1, bos_token_id=0, eos_token_id=0, **_COMMON,
        ),
        # ZAYA: an MLP router (router_hidden_size 16) over 8 experts + the skip expert, top-1, its state carried
        # to the next layer's router; CCA attention (convolved q/k, delayed v), full and sliding layers
        "zaya": lambda: CONFIG_MAPPING["zaya"](
            moe_intermediate_size=16, num_experts=8, num_experts_per_tok=1, router_hidden_size=16, head_dim=8,
            layer_types=["hybrid", "hybrid_sliding", "hybrid"], sliding_window=8, pad_token_id=1, bos_token_id=0,
            eos_token_id=0, **_COMMON,
        ),
        # HY-V3: sigmoid + correction bias (on the MoE block), renormalised (+1e-20) x router_scaling_factor;
        # shared MLP; first layer dense; renamed on disk (router.gate, expert_bias, shared_mlp)
        "hy_v3": lambda: CONFIG_MAPPING["hy_v3"](
            intermediate_size=24, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, num_shared_experts=1,
            router_scaling_factor=1.5, head_dim=8, **_COMMON,
        ),
        # Kimi-Linear (hybrid: Kimi Delta Attention + MLA layers): DeepSeek-V3 routing, shared experts, first
        # layer dense; q/k/v short convolutions concatenated on load
        "kimi_linear": lambda: CONFIG_MAPPING["kimi_linear"](
            intermediate_size=24, moe_intermediate_size=16, num_experts=8, num_experts_per_token=2, num_shared_experts=1,
            num_expert_group=2, topk_group=1, moe_renormalize=True, routed_scaling_factor=2.5, kv_lora_rank=16,
            q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, head_dim=8, linear_head_dim=8,
            linear_num_heads=4, linear_conv_kernel_dim=4, mlp_layer_types=["dense", "sparse", "sparse"],
            layer_types=["linear_attention", "full_attention", "linear_attention"], pad_token_id=1, bos_token_id=0,
            eos_token_id=0, **{**_COMMON, "num_key_value_heads": 4},
        ),
        # Bailing-hybrid (hybrid: Kimi Delta Attention + MLA layers): DeepSeek-V3 routing, shared experts, first
        # layer dense; word_embeddings, attention.* and q/k/v short convolutions converted on load
        "bailing_hybrid": lambda: CONFIG_MAPPING["bailing_hybrid"](
            intermediate_size=24, moe_intermediate_size=16, num_experts=8, num_experts_per_token=2, num_shared_experts=1,
            num_expert_group=2, topk_group=1, moe_renormalize=True, routed_scaling_factor=2.5, kv_lora_rank=16,
            q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, head_dim=8, linear_head_dim=8,
            linear_num_heads=4, linear_conv_kernel_dim=4, first_k_dense_replace=1,
            mlp_layer_types=["dense", "sparse", "sparse"], layer_types=["linear_attention", "full_attention", "linear_attention"],
            num_nextn_predict_layers=0, pad_token_id=1, bos_token_id=0, eos_token_id=0,
            **{**_COMMON, "num_key_value_heads": 4},
        ),
        # Sarvam-MoE (a GLM-4.5 model): DeepSeek-V3 routing, shared experts, first layer dense; fused
        # query_key_value split on load, attention / embedding renamed on disk
        "sarvam_moe": sigmoid_family("sarvam_moe", first_k_dense_replace=1, head_dim=8, use_qk_norm=True,
                                     pad_token_id=1, bos_token_id=0, eos_token_id=0, num_nextn_predict_layers=0),
        # Qwen4-Exp (text; hybrid: Gated DeltaNet + indexed attention, 2 hyper-connection streams, an n-gram
        # embedding (PLE) on layer 0 stored in 4 shards on disk, concatenated on load)
        "qwen4_exp_text": lambda: CONFIG_MAPPING["qwen4_exp_text"](
            moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
            head_dim=8, layer_types=["linear_attention", "indexed_attention", "linear_attention"],
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
            linear_conv_kernel_dim=4, hc_count=2, hc_lowrank=4, ple_layer_ids=[1], ple_embed_dim=32, heads_per_ngram=2,
            ngram_vocab_size_base=64, make_ngram_vocab_size_divisible_by=4, split_ngram_parts=4, indexer_n_heads=2,
            indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=8, indexer_compress_ratio=2, eos_token_id=0,
            **_COMMON,
        ),
        # ERNIE-4.5-MoE: softmax, selection on p + a [1, E] correction bias (on disk under mlp.moe_statics),
        # clamped renormalisation; shared experts; MoE layers from layer 1
        "ernie4_5_moe": lambda: transformers.Ernie4_5_MoeConfig(
            intermediate_size=24, moe_intermediate_size=16, moe_num_experts=8, moe_k=2, moe_num_shared_experts=1,
            moe_layer_start_index=1, moe_layer_end_index=2, moe_layer_interval=1, head_dim=8, pad_token_id=1,
            bos_token_id=0, eos_token_id=0, **_COMMON,
        ),
        # DeepSeek-V4: sqrt(softplus) scores + correction bias; layer 0 hash-routed (tid2eid); 2 hyper-connection
        # streams; sliding, compressed-sparse (indexer) and heavily-compressed attention; original names on disk
        "deepseek_v4": lambda: CONFIG_MAPPING["deepseek_v4"](
            moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
            routed_scaling_factor=1.5, head_dim=16, q_lora_rank=16, partial_rotary_factor=0.5, sliding_window=8,
            o_groups=2, o_lora_rank=8, index_n_heads=2, index_head_dim=8, index_topk=4, hc_mult=2,
            mlp_layer_types=["hash_moe", "moe", "moe"],
            layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
            compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
            pad_token_id=1, bos_token_id=0, eos_token_id=0, **{**_COMMON, "num_key_value_heads": 1},
        ),
        # Inkling-2 (text): float32 sigmoid router (+ correction bias, renormalised x route_scale); 4 layers, a
        # block boundary every 2 (block_states: the inputs of layers 0 and 2); sliding / full attention; on disk
        # model.llm.* with interleaved w13 experts and the unembedding padded from 500 to 512 rows
        "inkling2_text": lambda: CONFIG_MAPPING["inkling2_text"](
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8, swa_num_attention_heads=4,
            swa_num_key_value_heads=2, swa_head_dim=8, unpadded_vocab_size=500, d_rel=4, rel_extent=16,
            sliding_window_size=8, n_layers_per_attn_res_block=2, route_scale=2.0, pad_token_id=1, bos_token_id=0,
            eos_token_id=0, layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding", "hybrid"],
            **{**_COMMON, "num_hidden_layers": 4},
        ),
        # Inkling-2-Loop (text): as inkling2_text over 6 layers, layers 2 and 3 looped 3 times per forward
        "inkling2_loop_text": lambda: CONFIG_MAPPING["inkling2_loop_text"](
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8, swa_num_attention_heads=4,
            swa_num_key_value_heads=2, swa_head_dim=8, unpadded_vocab_size=500, d_rel=4, rel_extent=16,
            sliding_window_size=8, n_layers_per_attn_res_block=2, route_scale=2.0, pad_token_id=1, bos_token_id=0,
            eos_token_id=0, layer_types=["hybrid_sliding", "hybrid"] * 3, loop_layer_index_start=2,
            loop_layer_index_end=4, loop_num_passes=3, loop_gate_rank=4, **{**_COMMON, "num_hidden_layers": 6},
        ),
        # JetMoE: mixture of attention heads (2 KV heads of 8 channels, top-2 of 8 attention experts) and 8 MLP
        # experts behind a sorted-dispatch router; num_local_experts sizes both
        "jetmoe": lambda: transformers.JetMoeConfig(
            intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, kv_channels=8,
            **{k: v for k, v in _COMMON.items() if k != "num_attention_heads"},
        ),
        "mixtral": lambda: MixtralConfig(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, **_COMMON),
        "qwen2_moe": lambda: Qwen2MoeConfig(
            intermediate_size=24, moe_intermediate_size=16, shared_expert_intermediate_size=24,
            num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, **_COMMON,
        ),
        "qwen3_moe": lambda: Qwen3MoeConfig(
            intermediate_size=24, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=True, head_dim=8, **_COMMON,
        ),
        "deepseek_v2": lambda: DeepseekV2Config(
            intermediate_size=24, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, first_k_dense_replace=1, topk_method="group_limited_greedy",
            n_group=4, topk_group=2, routed_scaling_factor=1.5, **mla, **common_mla,
        ),
        "deepseek_v3": lambda: DeepseekV3Config(
            intermediate_size=24, moe_intermediate_size=16, n_routed_experts=16, n_shared_experts=1,
            num_experts_per_tok=2, first_k_dense_replace=1, n_group=4, topk_group=2, norm_topk_prob=True,
            routed_scaling_factor=2.5, **{**mla, "q_lora_rank": 16}, **common_mla,
        ),
        "olmoe": lambda: OlmoeConfig(
            intermediate_size=16, num_experts=8, num_experts_per_tok=2, pad_token_id=1, eos_token_id=0,
            bos_token_id=0, **_COMMON,
        ),
        "gpt_oss": lambda: GptOssConfig(
            intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=8,
            **{**_COMMON, "max_position_embeddings": 131072},
        ),
        # DBRX: 8 experts of width 16, top-2, L1-normalised weights; DbrxAttention needs attn_config.rope_theta and a clip_qkv (as the released configs have)
        "dbrx": lambda: CONFIG_MAPPING["dbrx"](
            d_model=32, n_heads=4, n_layers=3, max_seq_len=256, vocab_size=512,
            attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
            ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 8, "moe_top_k": 2, "moe_normalize_expert_weights": 1.0},
        ),
    }
    # multimodal wrappers (``[text] config`` in the spec): the tiny text decoder above as text_config, tiny towers

    def wrapper(config_class: str, text_family: str, **towers):
        return lambda: CONFIG_MAPPING[config_class](text_config=tiny_config(text_family).to_dict(), **towers)

    qwen_vision = dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, patch_size=4, out_hidden_size=32,
                       num_position_embeddings=16)
    qwen_tokens = dict(image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503)
    builders.update({
        "qwen3_5_moe": wrapper("qwen3_5_moe", "qwen3_5_moe_text", vision_config=qwen_vision, **qwen_tokens),
        "qwen4_exp": wrapper("qwen4_exp", "qwen4_exp_text", vision_config=qwen_vision, **qwen_tokens),
        # dots.3 note: a MoE vision tower (copied through untouched) and an audio tower
        "dots3_note": wrapper("dots3_note", "dots3_note_text",
                              vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                                 num_attention_heads=2, patch_size=4, moe_intermediate_size=8,
                                                 mlp_layer_types=["sparse"], per_layer_config={},
                                                 num_local_experts=4, num_experts_per_tok=2, adapter_in_dim=16,
                                                 adapter_out_dim=32),
                              audio_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                                num_attention_heads=2, feature_size=16, downsample_hidden_size=8,
                                                adapter_input_size=16, adapter_out_dim=32),
                              image_token_id=500, video_token_id=501, audio_token_id=502),
        "llama4": wrapper("llama4", "llama4_text",
                          vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=24, vision_output_dim=16, image_size=16, patch_size=4,
                                             projector_input_dim=16, projector_output_dim=32),
                          boi_token_index=500, eoi_token_index=501, image_token_index=502),
    })
    if family not in builders:
        raise ValueError(f"no tiny config for {family!r}; known: {', '.join(TINY_FAMILIES)}")
    config = builders[family]()
    for key, value in overrides.items():  # a dotted key sets a nested sub-config's (DBRX's ffn_config.*)
        set_config_value(config, key, value)
    return config


def build_tiny_model(family: str, seed: int = 0, **overrides):
    """A randomly initialised tiny model of ``family`` in eval mode, float32."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    wrapper = known_families()[family].spec.get("text", {}).get("model_class") if family in known_families() else None
    if wrapper:  # a multimodal wrapper: its own class, towers included
        import transformers

        model = getattr(transformers, wrapper)(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            elif name.endswith("router.bias"):
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
            elif name.endswith(("mlp.bias", "experts.bias")) and param.dim() == 1:  # JetMoE's MoE / MoA output bias
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            elif name.endswith(("gate.global_scale", "router_states_scale")):  # Inkling's router scale, ZAYA's state scale
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            elif name.endswith("router_mlp.out_proj.weight"):  # ZAYA: logits spread enough for the biases not to decide
                param.copy_(torch.randn(param.shape, generator=generator))
            elif name.endswith("qk_norm.temp"):  # ZAYA's key scale (0 at init: uniform attention)
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            elif name.endswith("_input.query"):  # Inkling-2's block attention queries (zero: uniform weights)
                param.copy_(torch.randn(param.shape, generator=generator))
            elif param.dim() >= 2 or name.endswith("_bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
        for name, buffer in model.named_buffers():
            if name.endswith(("e_score_correction_bias", "expert_bias")):  # on the router or on the MoE block
                buffer.copy_(0.05 * torch.randn(buffer.shape, generator=generator))
            elif name.endswith("tid2eid"):  # DeepSeek-V4's hash routing: k distinct experts per token id
                vocab, top_k = buffer.shape
                experts = config.n_routed_experts
                buffer.copy_(torch.rand(vocab, experts, generator=generator).argsort(dim=-1)[:, :top_k])
            elif name.endswith("balancing_biases"):  # ZAYA: the skip class (last) picked for some tokens, not all;
                buffer.copy_(0.01 * torch.randn(buffer.shape, generator=generator) - 1.0)  # transformers sets the skip
                buffer[-1] = -1.0                                                       # class's to -1 on every load
    return model.eval()


def save_tiny_checkpoint(family: str, out_dir: str | Path, seed: int = 0, with_tokenizer: bool = True, **overrides) -> Path:
    """Build a tiny model and save it (safetensors) with a small local tokenizer."""
    out_dir = Path(out_dir)
    model = build_tiny_model(family, seed=seed, **overrides)
    model.save_pretrained(out_dir)
    if with_tokenizer:
        from .tokenizer import tiny_tokenizer

        tiny_tokenizer().save_pretrained(out_dir)
    return out_dir
