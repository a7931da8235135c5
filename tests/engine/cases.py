"""The tiny random models every architecture must match, built with `transformers` itself.

Each case: a config (small, often awkward), the transformers class, and an optional tweak applied to
the reference model before saving (e.g. a non-zero DeepSeek correction bias, which random init
leaves at zero and which would then test nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from torch import nn

VOCAB = 320
# Larger than transformers' 0.02 so random logits and router scores are well separated:
# near-ties would make greedy tokens and expert ids flip on rounding noise alone.
INIT = 0.1


def _no_special_tokens() -> dict[str, Any]:
    # No EOS: transformers' generate would stop early, and the comparison wants 32 tokens.
    return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def _gpt_oss_sinks_and_biases(model: nn.Module) -> None:
    # transformers starts the experts' biases at zero and the sinks near it, which would test nothing.
    for name, p in model.named_parameters():
        if name.endswith(("sinks", "gate_up_proj_bias", "down_proj_bias")):
            p.copy_(torch.randn_like(p) * (1.0 if name.endswith("sinks") else 0.1))


def _offset_norms(model: nn.Module) -> None:
    # Qwen3-Next's norms scale by 1 + weight and start at zero: random weights so the offset is tested.
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") and "linear_attn" not in name:
            p.copy_(torch.randn_like(p) * 0.1)


def _random_correction_bias(model: nn.Module) -> None:
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.randn_like(buf) * 0.5)


def _random_biases_and_statics(model: nn.Module) -> None:
    # transformers starts biases and ERNIE's correction bias (a parameter there) at zero, which would test nothing.
    for name, p in model.named_parameters():
        if name.endswith((".bias", "e_score_correction_bias")):
            p.copy_(torch.randn_like(p) * 0.1)


def _random_qk_norms_and_biases(model: nn.Module) -> None:
    # Unit norm weights commute with RoPE (a rotation keeps each head's length): random ones tell
    # a norm before RoPE from one after it.
    _random_biases_and_statics(model)
    for name, p in model.named_parameters():
        if name.endswith(("query_layernorm.weight", "key_layernorm.weight")):
            p.copy_(1 + torch.randn_like(p) * 0.3)


def _random_biases_and_correction_bias(model: nn.Module) -> None:
    _random_biases_and_statics(model)
    _random_correction_bias(model)


@dataclass(frozen=True)
class Case:
    config_class: str
    model_class: str
    kwargs: dict[str, Any]
    tweak: Callable[[nn.Module], None] | None = None
    moe: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        config = getattr(transformers, self.config_class)(
            vocab_size=VOCAB, hidden_size=64, initializer_range=INIT, **_no_special_tokens(), **self.kwargs
        )
        model = getattr(transformers, self.model_class)(config).eval()
        if self.tweak is not None:
            with torch.no_grad():
                self.tweak(model)
        return model


_QWEN3_MOE = dict(
    intermediate_size=96,
    moe_intermediate_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
)
_DEEPSEEK = dict(
    intermediate_size=96,
    moe_intermediate_size=32,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=16,
    num_experts_per_tok=4,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
)
_QWEN3_NEXT = dict(
    intermediate_size=96,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    num_hidden_layers=5,
    layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention", "full_attention"],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=8,
    linear_conv_kernel_dim=4,
    num_experts=8,
    num_experts_per_tok=2,
)
_YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 256,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "beta_fast": 32,
    "beta_slow": 1,
}

CASES: dict[str, Case] = {
    "qwen3_moe": Case(
        "Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(_QWEN3_MOE, num_hidden_layers=2, norm_topk_prob=True)
    ),
    # No renormalization, every other layer sparse, and layer 3 forced dense.
    "qwen3_moe_awkward": Case(
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            _QWEN3_MOE,
            num_hidden_layers=4,
            norm_topk_prob=False,
            decoder_sparse_step=2,
            mlp_only_layers=[3],
            num_experts_per_tok=3,
            tie_word_embeddings=True,
        ),
    ),
    # A shared expert with its gate, q/k/v biases, the middle layer dense, no renormalization.
    "qwen2_moe": Case(
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            _QWEN3_MOE,
            num_hidden_layers=3,
            mlp_only_layers=[1],
            shared_expert_intermediate_size=48,
            norm_topk_prob=False,
        ),
    ),
    # q/k normed over the whole projection, q/k/v clipped (at a value some activations exceed).
    "olmoe": Case(
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=8,
            num_experts_per_tok=2,
            clip_qkv=1.5,
        ),
    ),
    # Sliding (window 6, shorter than the prompts), full, sliding; sinks; YaRN; a clamp the SwiGLU
    # activations reach (swiglu_limit 0.3 instead of 7).
    "gpt_oss": Case(
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=6,
            swiglu_limit=0.3,
            max_position_embeddings=1024,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 4.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 256,
            },
        ),
        tweak=_gpt_oss_sinks_and_biases,
    ),
    # Partial RoPE (half of each head), q/k norms and biases, two groups of four experts with one
    # kept, a shared expert, a random correction bias, the first layer dense.
    "glm4_moe": Case(
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        dict(
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            n_shared_experts=1,
            first_k_dense_replace=1,
            routed_scaling_factor=1.5,
            attention_bias=True,
            use_qk_norm=True,
            partial_rotary_factor=0.5,
        ),
        tweak=_random_correction_bias,
    ),
    # q/k normed over the whole projection, RoPE on half of each head, sigmoid routing with a
    # random correction bias.
    "minimax_m2": Case(
        "MiniMaxM2Config",
        "MiniMaxM2ForCausalLM",
        dict(
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_local_experts=8,
            num_experts_per_tok=2,
            rotary_dim=8,
        ),
        tweak=_random_correction_bias,
    ),
    # Gated DeltaNet layers (two, then one) between gated full attention; more value heads than key
    # heads; RoPE on a quarter of each head; a shared expert with its gate; layer 1 dense.
    "qwen3_next": Case(
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        dict(_QWEN3_NEXT, mlp_only_layers=[1]),
        tweak=_offset_norms,
    ),
    # Qwen3.5's text model: q, k, v, z, b and a projected apart.
    "qwen3_5_moe": Case("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", dict(_QWEN3_NEXT), tweak=_offset_norms),
    "mixtral": Case(
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=6,
            num_experts_per_tok=2,
        ),
    ),
    # Four groups of four experts, two groups kept, a random correction bias, two dense layers.
    "deepseek_v3": Case(
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(_DEEPSEEK, num_hidden_layers=4, n_group=4, topk_group=2, q_lora_rank=32, first_k_dense_replace=2),
        tweak=_random_correction_bias,
    ),
    # No q LoRA, YaRN rope with mscale, no interleave, two shared experts, no renormalization.
    "deepseek_v3_yarn": Case(
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            _DEEPSEEK,
            num_hidden_layers=3,
            n_group=8,
            topk_group=3,
            q_lora_rank=None,
            first_k_dense_replace=1,
            n_shared_experts=2,
            norm_topk_prob=False,
            routed_scaling_factor=1.7,
            rope_interleave=False,
            rope_parameters=_YARN,
            max_position_embeddings=1024,
        ),
        tweak=_random_correction_bias,
    ),
    # V2-Lite's shape: no q LoRA, softmax greedy routing (no renormalization), scaled, a dense first layer.
    "deepseek_v2": Case(
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(
            _DEEPSEEK,
            num_hidden_layers=3,
            q_lora_rank=None,
            topk_method="greedy",
            first_k_dense_replace=1,
            n_shared_experts=1,
            routed_scaling_factor=1.3,
        ),
    ),
    # q LoRA, group-limited routing over four groups of four, two kept.
    "deepseek_v2_grouped": Case(
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(
            _DEEPSEEK,
            num_hidden_layers=2,
            q_lora_rank=32,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            n_shared_experts=2,
        ),
    ),
    # Biases everywhere (the tied head's too), a shared expert, a random correction bias, MoE on
    # layers 1 and 3 only (interval 2), RoPE on interleaved pairs.
    "ernie4_5_moe": Case(
        "Ernie4_5_MoeConfig",
        "Ernie4_5_MoeForCausalLM",
        dict(
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            moe_num_experts=8,
            moe_k=2,
            moe_num_shared_experts=1,
            moe_layer_interval=2,
            use_bias=True,
            tie_word_embeddings=True,
        ),
        tweak=_random_biases_and_statics,
    ),
    # GLM-4.7-Flash's shape: DeepSeek-V3's blocks with dense layers listed per layer (0 and 2), two
    # groups of four experts with one kept, two shared experts, no renormalization, a random
    # correction bias.
    "glm4_moe_lite": Case(
        "Glm4MoeLiteConfig",
        "Glm4MoeLiteForCausalLM",
        dict(
            _DEEPSEEK,
            n_routed_experts=8,
            num_experts_per_tok=2,
            num_hidden_layers=4,
            mlp_layer_types=["dense", "sparse", "dense", "sparse"],
            q_lora_rank=32,
            n_group=2,
            topk_group=1,
            n_shared_experts=2,
            norm_topk_prob=False,
            routed_scaling_factor=1.8,
        ),
        tweak=_random_correction_bias,
    ),
    # q/k normed after RoPE (random norm weights), biases, a top k per layer (2, 3, 1), NTK-alpha RoPE.
    "hunyuan_v1_moe": Case(
        "HunYuanMoEV1Config",
        "HunYuanMoEV1ForCausalLM",
        dict(
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=8,
            moe_topk=[2, 3, 1],
            attention_bias=True,
            rope_parameters={"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 10000.0},
        ),
        tweak=_random_qk_norms_and_biases,
    ),
    # Qwen3's attention with biases, a dense first layer, two groups of four experts with one kept,
    # two shared experts, renormalized and scaled weights, a random correction bias.
    "dots1": Case(
        "Dots1Config",
        "Dots1ForCausalLM",
        dict(
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            n_shared_experts=2,
            first_k_dense_replace=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            attention_bias=True,
        ),
        tweak=_random_biases_and_correction_bias,
    ),
    # Every multiplier away from 1 (the attention one away from 1/sqrt(D) too), biases, a tied head.
    "granitemoe": Case(
        "GraniteMoeConfig",
        "GraniteMoeForCausalLM",
        dict(
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=8,
            num_experts_per_tok=2,
            attention_bias=True,
            embedding_multiplier=3.0,
            attention_multiplier=0.05,
            residual_multiplier=0.4,
            logits_scaling=2.5,
            tie_word_embeddings=True,
        ),
        tweak=_random_biases_and_statics,
    ),
    # Two experts per token (scores scaling their inputs) beside a shared expert on layers 1 and 3;
    # chunks of 8 positions on the RoPE layers (llama3-scaled, interleaved pairs, L2-normed q/k);
    # layer 3 without RoPE, its temperature stepping every 4 positions.
    "llama4_text": Case(
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        dict(
            intermediate_size=32,
            intermediate_size_mlp=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_local_experts=8,
            num_experts_per_tok=2,
            interleave_moe_layer_step=2,
            attention_chunk_size=8,
            floor_scale=4,
            attn_scale=0.5,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "llama": Case(
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        moe=False,
    ),
    "qwen2": Case(
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
        moe=False,
    ),
    "qwen3": Case(
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=32),
        moe=False,
    ),
}
