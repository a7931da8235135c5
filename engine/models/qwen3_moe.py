"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): GQA with per-head q/k RMSNorm, softmax top-k experts.

Shapes: H hidden, E experts, K experts per token, I expert width.
Layer i is sparse unless it is in `mlp_only_layers` or (i + 1) % decoder_sparse_step != 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.config import DecoderArgs, gqa_fields, require
from engine.decoder import Block, CausalLM
from engine.errors import UnsupportedArchitectureError
from engine.layers import MLP, Attention
from engine.models import Architecture
from engine.moe import SparseMoe


@dataclass(frozen=True)
class Qwen3MoeArgs(DecoderArgs):
    moe_intermediate_size: int  # one expert
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]
    attention_bias: bool

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> Qwen3MoeArgs:
        if c.get("use_sliding_window"):
            raise UnsupportedArchitectureError(
                f"This {c.get('model_type')} checkpoint enables sliding-window attention (use_sliding_window), "
                "which the engine does not implement yet."
            )
        return cls(
            **gqa_fields(c, eps=1e-6),
            moe_intermediate_size=int(c["moe_intermediate_size"]),
            # transformers 5 writes num_local_experts; the official checkpoints write num_experts.
            num_experts=int(require(c, "num_experts", "num_local_experts")),
            top_k=int(c["num_experts_per_tok"]),
            norm_topk_prob=bool(c.get("norm_topk_prob", False)),
            decoder_sparse_step=int(c.get("decoder_sparse_step", 1)),
            mlp_only_layers=tuple(int(i) for i in c.get("mlp_only_layers") or ()),
            attention_bias=bool(c.get("attention_bias", False)),
        )


def is_sparse(args: Any, layer: int) -> bool:
    """Whether `layer` routes to experts (Qwen2/3-MoE, Qwen3-Next args alike): not in mlp_only_layers,
    and (layer + 1) a multiple of decoder_sparse_step."""
    return layer not in args.mlp_only_layers and args.num_experts > 0 and (layer + 1) % args.decoder_sparse_step == 0


def build(args: Qwen3MoeArgs) -> CausalLM:
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
        if is_sparse(args, i):
            mlp = SparseMoe(
                args.num_experts,
                args.hidden_size,
                args.moe_intermediate_size,
                args.top_k,
                renormalize=args.norm_topk_prob,
            )
        else:
            mlp = MLP(args.hidden_size, args.intermediate_size)
        blocks.append(Block(attn, mlp, args.hidden_size, args.rms_norm_eps))
    return CausalLM.assemble(args, blocks)


ARCHITECTURE = Architecture(args_from_config=Qwen3MoeArgs.from_config, build=build)
