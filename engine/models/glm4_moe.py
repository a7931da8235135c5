"""GLM-4.5 / GLM-4.6 (glm4_moe): grouped-query attention with q/k/v biases, RoPE on part of each head
(partial_rotary_factor, 0.5 in the releases) and optional per-head q/k norms, then DeepSeek-V3's
routing (sigmoid scores with a correction bias, group-limited top-k) with shared experts, after
`first_k_dense_replace` dense layers.

Shapes: H hidden, E experts, K experts per token, I expert width, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.config import DecoderArgs, gqa_fields
from engine.decoder import Block, CausalLM
from engine.layers import Attention
from engine.models import Architecture
from engine.models.deepseek_v3 import moe_or_mlp, mtp_layers


@dataclass(frozen=True)
class Glm4MoeArgs(DecoderArgs):
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
    use_qk_norm: bool
    rotary_dim: int
    num_nextn_predict_layers: int

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> Glm4MoeArgs:
        fields = gqa_fields(c, eps=1e-5)
        rope_params = c.get("rope_parameters") or {}
        factor = float(c.get("partial_rotary_factor") or rope_params.get("partial_rotary_factor") or 1.0)
        return cls(
            **fields,
            moe_intermediate_size=int(c["moe_intermediate_size"]),
            num_experts=int(c["n_routed_experts"]),
            num_shared_experts=int(c.get("n_shared_experts") or 0),
            top_k=int(c["num_experts_per_tok"]),
            n_group=int(c.get("n_group") or 1),
            topk_group=int(c.get("topk_group") or 1),
            norm_topk_prob=bool(c.get("norm_topk_prob", True)),
            routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
            first_k_dense_replace=int(c.get("first_k_dense_replace", 1)),
            attention_bias=bool(c.get("attention_bias", False)),
            use_qk_norm=bool(c.get("use_qk_norm", False)),
            rotary_dim=int(fields["head_dim"] * factor),
            num_nextn_predict_layers=int(c.get("num_nextn_predict_layers") or 0),
        )


def build(args: Glm4MoeArgs) -> CausalLM:
    blocks = []
    for i in range(args.num_layers):
        attn = Attention(
            args.hidden_size,
            args.num_heads,
            args.num_kv_heads,
            args.head_dim,
            qkv_bias=args.attention_bias,
            qk_norm_eps=args.rms_norm_eps if args.use_qk_norm else None,
            rotary_dim=args.rotary_dim,
        )
        blocks.append(Block(attn, moe_or_mlp(args, i), args.hidden_size, args.rms_norm_eps))
    return CausalLM.assemble(args, blocks, rope_dim=args.rotary_dim)


ARCHITECTURE = Architecture(
    args_from_config=Glm4MoeArgs.from_config,
    build=build,
    ignore=mtp_layers,
    keep_fp32=("e_score_correction_bias",),
)
