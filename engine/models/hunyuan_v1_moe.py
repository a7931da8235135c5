"""Hunyuan-A13B (hunyuan_v1_moe): grouped-query attention whose q and k are RMS-normed per head after
RoPE (not before, as in Qwen3), then in every layer softmax top-k experts, renormalized, plus one
shared MLP every token takes, ungated. RoPE is NTK-scaled by a fixed `alpha` ("dynamic" with alpha
in config.json), which only raises its base.

Shapes: T tokens, H hidden, N query heads, G key/value heads, D head dim, E experts, K experts per
token, I expert width (config.json's intermediate_size, the shared MLP's too).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from engine.config import DecoderArgs, RopeArgs, gqa_fields
from engine.decoder import Block, CausalLM
from engine.errors import UnsupportedArchitectureError
from engine.layers import HeadProjections, RMSNorm, append_kv, attend
from engine.models import Architecture
from engine.moe import RoutedMoe, SoftmaxRouter
from engine.rope import rotate


@dataclass(frozen=True)
class HunyuanMoeArgs(DecoderArgs):
    num_experts: int
    top_k: tuple[int, ...]  # per layer
    attention_bias: bool

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> HunyuanMoeArgs:
        fields = gqa_fields(c, eps=1e-5)
        layers, width = fields["num_layers"], fields["intermediate_size"]
        _refuse_variants(c, layers, width)
        top_k = c.get("moe_topk", 1)
        top_k = [top_k] * layers if isinstance(top_k, int) else top_k
        if not isinstance(c.get("num_experts"), int):
            raise UnsupportedArchitectureError(
                "This hunyuan_v1_moe config.json gives num_experts per layer; the engine reads one count."
            )
        return cls(
            **{**fields, "rope": _ntk_alpha(fields["rope"], fields["head_dim"])},
            num_experts=int(c["num_experts"]),
            top_k=tuple(int(k) for k in top_k),
            attention_bias=bool(c.get("attention_bias", False)),
        )


def _per_layer(value: Any, layers: int) -> list[Any]:
    return list(value) if isinstance(value, list) else [value] * layers


def _refuse_variants(c: dict[str, Any], layers: int, width: int) -> None:
    """The released configs' own fields, where they leave what transformers' HunYuanMoEV1 computes:
    experts as wide as intermediate_size, one shared MLP, no cross-layer attention (CLA)."""
    problems = []
    if c.get("moe_intermediate_size") is not None and set(_per_layer(c["moe_intermediate_size"], layers)) != {width}:
        problems.append(f"moe_intermediate_size {c['moe_intermediate_size']} differs from intermediate_size {width}")
    if c.get("num_shared_expert") is not None and set(_per_layer(c["num_shared_expert"], layers)) != {1}:
        problems.append(f"num_shared_expert {c['num_shared_expert']} is not 1")
    if c.get("use_mixed_mlp_moe") is False:
        problems.append("use_mixed_mlp_moe is false (no shared MLP)")
    if c.get("use_cla"):
        problems.append("use_cla is true (cross-layer attention)")
    if problems:
        raise UnsupportedArchitectureError(
            "This hunyuan_v1_moe checkpoint is a variant the engine does not implement: " + "; ".join(problems) + "."
        )


def _ntk_alpha(rope: RopeArgs, head_dim: int) -> RopeArgs:
    """Hunyuan's "dynamic" RoPE with a fixed alpha: plain RoPE over base theta * alpha^(D / (D - 2))."""
    alpha = rope.params.get("alpha")
    if rope.rope_type != "dynamic" or not alpha:
        return rope
    theta = rope.theta * float(alpha) ** (head_dim / (head_dim - 2))
    return replace(rope, theta=theta, rope_type="default", params={})


class PostRopeNormAttention(HeadProjections):
    """Grouped-query attention, q and k RMS-normed per head after RoPE (`query_layernorm`,
    `key_layernorm`), optional biases on q, k, v and o.

    Its own class, not layers.Attention: the native decode kernels norm q and k before RoPE."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, *, bias: bool, eps: float) -> None:
        super().__init__(hidden, heads, kv_heads, head_dim, qkv_bias=bias, o_bias=bias)
        self.query_layernorm = RMSNorm(head_dim, eps)
        self.key_layernorm = RMSNorm(head_dim, eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: list[torch.Tensor] | None, start: int
    ) -> torch.Tensor:
        q, k, v = self.split_heads(x)  # [B, N, T, D], [B, G, T, D] x 2
        q = self.query_layernorm(rotate(q, cos, sin))
        k = self.key_layernorm(rotate(k, cos, sin))
        if cache is not None:
            k, v = append_kv(cache, k, v, start)  # [B, G, S, D]
        out = attend(q, k, v, start=start, scale=self.head_dim**-0.5)  # [B, N, T, D]
        return self.output(out)  # [B, T, H]


def build(args: HunyuanMoeArgs) -> CausalLM:
    blocks = []
    for i in range(args.num_layers):
        attn = PostRopeNormAttention(
            args.hidden_size,
            args.num_heads,
            args.num_kv_heads,
            args.head_dim,
            bias=args.attention_bias,
            eps=args.rms_norm_eps,
        )
        gate = SoftmaxRouter(args.num_experts, args.hidden_size, args.top_k[i], renormalize=True)
        mlp = RoutedMoe(gate, args.num_experts, args.hidden_size, args.intermediate_size, shared=1)
        blocks.append(Block(attn, mlp, args.hidden_size, args.rms_norm_eps))
    return CausalLM.assemble(args, blocks)


ARCHITECTURE = Architecture(
    args_from_config=HunyuanMoeArgs.from_config,
    build=build,
    renames=((r"\.mlp\.gate\.wg\.", ".mlp.gate."), (r"\.mlp\.shared_mlp\.", ".mlp.shared_experts.")),
)
