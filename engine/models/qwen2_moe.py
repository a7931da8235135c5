"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen3-MoE's layout with q/k/v biases and no q/k
norms, and a shared expert beside the routed ones, scaled by its own sigmoid gate.

Shapes: H hidden, E experts, K experts per token, I expert width.
Layer i is sparse unless it is in `mlp_only_layers` or (i + 1) % decoder_sparse_step != 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from engine.decoder import Block, CausalLM
from engine.layers import MLP, Attention
from engine.models import Architecture
from engine.models.qwen3_moe import Qwen3MoeArgs, is_sparse
from engine.moe import SharedExpertMoe


@dataclass(frozen=True)
class Qwen2MoeArgs(Qwen3MoeArgs):
    shared_expert_intermediate_size: int = 0
    qkv_bias: bool = True

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> Qwen2MoeArgs:
        base = Qwen3MoeArgs.from_config(c)
        return cls(
            **vars(base),
            shared_expert_intermediate_size=int(c["shared_expert_intermediate_size"]),
            qkv_bias=bool(c.get("qkv_bias", True)),  # the official configs omit it: always biased
        )


def feed_forward(args: Any, layer: int) -> nn.Module:
    """Qwen2-MoE's MLP for `layer` (Qwen3-Next's too): routed experts with a gated shared expert where
    the layer is sparse, a dense MLP elsewhere."""
    if not is_sparse(args, layer):
        return MLP(args.hidden_size, args.intermediate_size)
    return SharedExpertMoe(
        args.num_experts,
        args.hidden_size,
        args.moe_intermediate_size,
        args.top_k,
        args.shared_expert_intermediate_size,
        renormalize=args.norm_topk_prob,
    )


def build(args: Qwen2MoeArgs) -> CausalLM:
    blocks = []
    for i in range(args.num_layers):
        attn = Attention(args.hidden_size, args.num_heads, args.num_kv_heads, args.head_dim, qkv_bias=args.qkv_bias)
        blocks.append(Block(attn, feed_forward(args, i), args.hidden_size, args.rms_norm_eps))
    return CausalLM.assemble(args, blocks)


ARCHITECTURE = Architecture(args_from_config=Qwen2MoeArgs.from_config, build=build)
