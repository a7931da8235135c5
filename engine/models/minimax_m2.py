"""MiniMax-M2 (minimax_m2): grouped-query attention whose q and k are RMS-normed over the whole
projection, RoPE on the first `rotary_dim` dims of each head, and experts in every layer chosen by
sigmoid scores plus a correction bias, weighted by their sigmoid scores renormalized (DeepSeek-V3's
routing with one group and no scaling). The checkpoints name the MoE `block_sparse_moe`, the experts
Mixtral's way (w1 / w3 / w2), and keep the correction bias on the MoE block.

Shapes: H hidden, E experts, K experts per token, I expert width, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.config import DecoderArgs, gqa_fields
from engine.decoder import Block, CausalLM
from engine.layers import Attention
from engine.models import Architecture
from engine.moe import RoutedMoe, SigmoidGroupRouter


@dataclass(frozen=True)
class MiniMaxM2Args(DecoderArgs):
    num_experts: int
    top_k: int
    rotary_dim: int

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> MiniMaxM2Args:
        fields = gqa_fields(c, eps=1e-6)
        factor = (c.get("rope_parameters") or {}).get("partial_rotary_factor") or c.get("partial_rotary_factor")
        rotary = c.get("rotary_dim") or int(fields["head_dim"] * float(factor or 1.0))  # the releases write rotary_dim
        return cls(
            **fields,
            num_experts=int(c["num_local_experts"]),
            top_k=int(c["num_experts_per_tok"]),
            rotary_dim=int(rotary),
        )


def build(args: MiniMaxM2Args) -> CausalLM:
    blocks = []
    for _ in range(args.num_layers):
        attn = Attention(
            args.hidden_size,
            args.num_heads,
            args.num_kv_heads,
            args.head_dim,
            qk_norm_eps=args.rms_norm_eps,
            qk_norm_per_head=False,
            rotary_dim=args.rotary_dim,
        )
        gate = SigmoidGroupRouter(
            args.num_experts, args.hidden_size, args.top_k, n_group=1, topk_group=1, renormalize=True, scaling=1.0
        )
        mlp = RoutedMoe(gate, args.num_experts, args.hidden_size, args.intermediate_size, shared=0)
        blocks.append(Block(attn, mlp, args.hidden_size, args.rms_norm_eps))
    return CausalLM.assemble(args, blocks, rope_dim=args.rotary_dim)


ARCHITECTURE = Architecture(
    args_from_config=MiniMaxM2Args.from_config,
    build=build,
    renames=(
        (r"\.block_sparse_moe\.", ".mlp."),
        (r"\.mlp\.e_score_correction_bias$", ".mlp.gate.e_score_correction_bias"),
    ),
    keep_fp32=("e_score_correction_bias",),
)
