"""Granite 3.x MoE (granitemoe: granite-3.0-1b-a400m, -3b-a800m): Mixtral's blocks with four
multipliers: embeddings times `embedding_multiplier`, attention scores times `attention_multiplier`
(instead of 1/sqrt(D)), each block's attention and expert outputs times `residual_multiplier`
before they join the residual stream, logits divided by `logits_scaling`. The experts are softmax
top-k (a softmax over the k best logits, i.e. renormalized), stored stacked (`input_linear` holds
gate then up, `output_linear` down).

Shapes: B batch, T tokens, H hidden, N query heads, G key/value heads, D head dim, E experts,
I expert width (config.json's intermediate_size), V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.config import DecoderArgs, gqa_fields
from engine.decoder import Block, CausalLM
from engine.layers import HeadProjections, RMSNorm, append_kv, attend
from engine.models import Architecture
from engine.moe import RoutedMoe, SoftmaxGroupRouter
from engine.rope import rotate


@dataclass(frozen=True)
class GraniteMoeArgs(DecoderArgs):
    num_experts: int
    top_k: int
    attention_bias: bool
    embedding_multiplier: float
    attention_multiplier: float
    residual_multiplier: float
    logits_scaling: float

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> GraniteMoeArgs:
        return cls(
            **gqa_fields(c, eps=1e-6),
            num_experts=int(c["num_local_experts"]),
            top_k=int(c["num_experts_per_tok"]),
            attention_bias=bool(c.get("attention_bias", False)),
            embedding_multiplier=float(c.get("embedding_multiplier", 1.0)),
            attention_multiplier=float(c.get("attention_multiplier", 1.0)),
            residual_multiplier=float(c.get("residual_multiplier", 1.0)),
            logits_scaling=float(c.get("logits_scaling", 1.0)),
        )


class ScaledAttention(HeadProjections):
    """Grouped-query attention with its own score scale and its output times `out_scale` (Granite's
    attention_multiplier and residual_multiplier); optional biases on q, k, v and o.

    Its own class, not layers.Attention: the native decode kernels scale scores by 1/sqrt(D) and
    add attention's output to the residual unscaled."""

    def __init__(
        self, hidden: int, heads: int, kv_heads: int, head_dim: int, *, bias: bool, scale: float, out_scale: float
    ) -> None:
        super().__init__(hidden, heads, kv_heads, head_dim, qkv_bias=bias, o_bias=bias)
        self.scale, self.out_scale = scale, out_scale

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: list[torch.Tensor] | None, start: int
    ) -> torch.Tensor:
        q, k, v = self.split_heads(x)  # [B, N, T, D], [B, G, T, D] x 2
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:
            k, v = append_kv(cache, k, v, start)  # [B, G, S, D]
        out = attend(q, k, v, start=start, scale=self.scale)  # [B, N, T, D]
        return self.output(out) * self.out_scale  # [B, T, H]


class ScaledEmbedding(nn.Embedding):
    """Token embeddings times a constant (Granite's embedding_multiplier); the weight is stored
    unscaled, so a head tied to it is unaffected."""

    def __init__(self, vocab: int, hidden: int, multiplier: float) -> None:
        super().__init__(vocab, hidden)
        self.requires_grad_(False)
        self.multiplier = multiplier

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return super().forward(tokens) * self.multiplier  # [B, T, H]


class DividedNorm(RMSNorm):
    """The final RMSNorm with its output divided by Granite's logits_scaling: the head is linear and
    bias-free, so this divides the logits, and it stays true when a transform swaps the head."""

    def __init__(self, dim: int, eps: float, divisor: float) -> None:
        super().__init__(dim, eps)
        self.divisor = divisor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) / self.divisor


def build(args: GraniteMoeArgs) -> CausalLM:
    blocks = []
    for _ in range(args.num_layers):
        attn = ScaledAttention(
            args.hidden_size,
            args.num_heads,
            args.num_kv_heads,
            args.head_dim,
            bias=args.attention_bias,
            scale=args.attention_multiplier,
            out_scale=args.residual_multiplier,
        )
        # A softmax over the k best logits is the renormalized top-k softmax; residual_multiplier,
        # linear through the experts, rides on their weights. The native decode kernels read no
        # SoftmaxGroupRouter (nor its scaling): these experts decode as modules.
        gate = SoftmaxGroupRouter(
            args.num_experts,
            args.hidden_size,
            args.top_k,
            n_group=1,
            topk_group=1,
            renormalize=True,
            scaling=args.residual_multiplier,
        )
        mlp = RoutedMoe(gate, args.num_experts, args.hidden_size, args.intermediate_size, shared=0)
        blocks.append(Block(attn, mlp, args.hidden_size, args.rms_norm_eps))
    net = CausalLM.assemble(args, blocks)
    net.model.embed_tokens = ScaledEmbedding(args.vocab_size, args.hidden_size, args.embedding_multiplier)
    if args.tie_word_embeddings:
        net.lm_head.weight = net.model.embed_tokens.weight
    net.model.norm = DividedNorm(args.hidden_size, args.rms_norm_eps, args.logits_scaling)
    return net


ARCHITECTURE = Architecture(
    args_from_config=GraniteMoeArgs.from_config,
    build=build,
    renames=(
        (r"\.block_sparse_moe\.input_linear\.weight$", ".mlp.experts.gate_up_proj"),
        (r"\.block_sparse_moe\.output_linear\.weight$", ".mlp.experts.down_proj"),
        (r"\.block_sparse_moe\.router\.layer\.", ".mlp.gate."),
        (r"\.block_sparse_moe\.", ".mlp."),  # transformers' own names (experts.gate_up_proj, router.weight)
        (r"\.mlp\.router\.", ".mlp.gate."),
    ),
)
