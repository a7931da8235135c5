"""Mixtral: Llama-style GQA attention and softmax top-k experts, weights always renormalized.

Shapes: H hidden, E experts, I expert width.
Checkpoints name the MoE `block_sparse_moe` with experts `w1` (gate), `w3` (up), `w2` (down);
they are renamed onto the shared `mlp` module and stacked by the loader.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.config import DecoderArgs, gqa_fields
from engine.decoder import Block, CausalLM
from engine.errors import UnsupportedArchitectureError
from engine.layers import Attention
from engine.models import Architecture
from engine.moe import SparseMoe


@dataclass(frozen=True)
class MixtralArgs(DecoderArgs):
    num_experts: int
    top_k: int

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> MixtralArgs:
        if c.get("sliding_window") and int(c["sliding_window"]) < int(c.get("max_position_embeddings", 0)):
            raise UnsupportedArchitectureError(
                f"This Mixtral checkpoint uses a sliding window of {c['sliding_window']} tokens, which the "
                "engine does not implement yet."
            )
        return cls(
            **gqa_fields(c, eps=1e-5),
            num_experts=int(c["num_local_experts"]),
            top_k=int(c["num_experts_per_tok"]),
        )


def build(args: MixtralArgs) -> CausalLM:
    blocks = [
        Block(
            Attention(args.hidden_size, args.num_heads, args.num_kv_heads, args.head_dim),
            SparseMoe(args.num_experts, args.hidden_size, args.intermediate_size, args.top_k, renormalize=True),
            args.hidden_size,
            args.rms_norm_eps,
        )
        for _ in range(args.num_layers)
    ]
    return CausalLM.assemble(args, blocks)


ARCHITECTURE = Architecture(
    args_from_config=MixtralArgs.from_config,
    build=build,
    renames=((r"\.block_sparse_moe\.", ".mlp."),),
)
