"""OLMoE (allenai/OLMoE-1B-7B): Llama-style attention whose q and k are RMS-normed over the whole
projection (not per head) and optionally clipped, then softmax top-k experts in every layer.

Shapes: H hidden, E experts, K experts per token, I expert width (config.json's intermediate_size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.config import DecoderArgs, gqa_fields
from engine.decoder import Block, CausalLM
from engine.layers import Attention
from engine.models import Architecture
from engine.moe import SparseMoe


@dataclass(frozen=True)
class OlmoeArgs(DecoderArgs):
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    clip_qkv: float | None
    attention_bias: bool

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> OlmoeArgs:
        clip = c.get("clip_qkv")
        return cls(
            **gqa_fields(c, eps=1e-5),
            num_experts=int(c["num_experts"]),
            top_k=int(c["num_experts_per_tok"]),
            norm_topk_prob=bool(c.get("norm_topk_prob", False)),
            clip_qkv=None if clip is None else float(clip),
            attention_bias=bool(c.get("attention_bias", False)),
        )


def build(args: OlmoeArgs) -> CausalLM:
    blocks = []
    for _ in range(args.num_layers):
        attn = Attention(
            args.hidden_size,
            args.num_heads,
            args.num_kv_heads,
            args.head_dim,
            qkv_bias=args.attention_bias,
            o_bias=args.attention_bias,
            qk_norm_eps=args.rms_norm_eps,
            qk_norm_per_head=False,
            clip_qkv=args.clip_qkv,
        )
        mlp = SparseMoe(
            args.num_experts, args.hidden_size, args.intermediate_size, args.top_k, renormalize=args.norm_topk_prob
        )
        blocks.append(Block(attn, mlp, args.hidden_size, args.rms_norm_eps))
    return CausalLM.assemble(args, blocks)


ARCHITECTURE = Architecture(args_from_config=OlmoeArgs.from_config, build=build)
