"""dots.llm1 (rednote-hilab, dots1): Qwen3's attention (per-head q/k RMSNorm before RoPE) and
DeepSeek-V3's feed-forward: `first_k_dense_replace` dense layers, then experts chosen by sigmoid
scores plus a correction bias, group-limited, beside shared experts.

Shapes: H hidden, E experts, K experts per token, I expert width, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.config import DecoderArgs, gqa_fields
from engine.decoder import Block, CausalLM
from engine.errors import UnsupportedArchitectureError
from engine.layers import Attention
from engine.models import Architecture
from engine.models.deepseek_v3 import moe_or_mlp


@dataclass(frozen=True)
class Dots1Args(DecoderArgs):
    moe_intermediate_size: int  # one expert
    num_experts: int
    num_shared_experts: int
    top_k: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    first_k_dense_replace: int
    attention_bias: bool

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> Dots1Args:
        if "sliding_attention" in (c.get("layer_types") or ()):
            raise UnsupportedArchitectureError(
                "This dots1 checkpoint uses sliding-window attention on some layers (layer_types), which the "
                "engine does not implement yet."
            )
        return cls(
            **gqa_fields(c, eps=1e-6),
            moe_intermediate_size=int(c["moe_intermediate_size"]),
            num_experts=int(c["n_routed_experts"]),
            num_shared_experts=int(c.get("n_shared_experts") or 0),
            top_k=int(c["num_experts_per_tok"]),
            n_group=int(c.get("n_group") or 1),
            topk_group=int(c.get("topk_group") or 1),
            norm_topk_prob=bool(c.get("norm_topk_prob", False)),
            routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
            first_k_dense_replace=int(c.get("first_k_dense_replace") or 0),
            attention_bias=bool(c.get("attention_bias", False)),
        )


def build(args: Dots1Args) -> CausalLM:
    blocks = []
    for i in range(args.num_layers):
        attn = Attention(
            args.hidden_size,
            args.num_heads,
            args.num_kv_heads,
            args.head_dim,
            qkv_bias=args.attention_bias,
            o_bias=args.attention_bias,
            qk_norm_eps=args.rms_norm_eps,
        )
        blocks.append(Block(attn, moe_or_mlp(args, i), args.hidden_size, args.rms_norm_eps))
    return CausalLM.assemble(args, blocks)


ARCHITECTURE = Architecture(
    args_from_config=Dots1Args.from_config,
    build=build,
    keep_fp32=("e_score_correction_bias",),
)
