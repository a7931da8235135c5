"""ERNIE-4.5 MoE (ERNIE-4.5-21B-A3B, -300B-A47B): grouped-query attention with RoPE on interleaved
pairs, then, on the layers between `moe_layer_start_index` and `moe_layer_end_index` (every
`moe_layer_interval`-th), softmax-routed experts whose selection a correction bias steers, plus
shared experts; a dense MLP elsewhere. `use_bias` puts biases on every projection but the experts'
and the router's, the output head's included.

Shapes: T tokens, H hidden, N query heads, G key/value heads, D head dim, E experts, K experts per
token, I expert width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.config import DecoderArgs, gqa_fields
from engine.decoder import Block, CausalLM
from engine.errors import UnsupportedArchitectureError
from engine.layers import MLP, HeadProjections, append_kv, attend, linear
from engine.models import Architecture
from engine.moe import RoutedMoe
from engine.qmatmul import matmul
from engine.rope import rotate_interleaved


@dataclass(frozen=True)
class Ernie45MoeArgs(DecoderArgs):
    moe_intermediate_size: int  # one expert
    num_experts: int
    num_shared_experts: int
    top_k: int
    moe_layers: tuple[int, ...]
    norm_min: float  # the least the top k's weights may sum to before renormalizing
    use_bias: bool

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> Ernie45MoeArgs:
        fields = gqa_fields(c, eps=1e-5)
        fields["tie_word_embeddings"] = bool(c.get("tie_word_embeddings", True))  # ERNIE ties by default
        layers = fields["num_layers"]
        bounds = [c.get(k, d) for k, d in (("moe_layer_start_index", 1), ("moe_layer_end_index", -1))]
        interval = c.get("moe_layer_interval", 1)
        if not all(isinstance(v, int) for v in (*bounds, interval)):
            raise UnsupportedArchitectureError(
                "This ERNIE-4.5 config.json gives moe_layer_start_index / moe_layer_end_index / moe_layer_interval "
                "as lists (a multimodal ERNIE-4.5-VL checkpoint); the engine reads the text models' integers only."
            )
        start, end = bounds[0], layers - 1 if bounds[1] == -1 else bounds[1]
        return cls(
            **fields,
            moe_intermediate_size=int(c["moe_intermediate_size"]),
            num_experts=int(c["moe_num_experts"]),
            num_shared_experts=int(c.get("moe_num_shared_experts") or 0),
            top_k=int(c["moe_k"]),
            moe_layers=tuple(i for i in range(layers) if (i + 1) % interval == 0 and start <= i <= end),
            norm_min=float(c.get("moe_norm_min", 1e-12)),
            use_bias=bool(c.get("use_bias", False)),
        )


class InterleavedRopeAttention(HeadProjections):
    """Grouped-query attention whose RoPE turns adjacent pairs (x0, x1), (x2, x3), ... of each head
    (rope.rotate_interleaved), with optional biases on q, k, v and o.

    Its own class, not layers.Attention: the native decode kernels rotate half-split heads."""

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: list[torch.Tensor] | None, start: int
    ) -> torch.Tensor:
        q, k, v = self.split_heads(x)  # [B, N, T, D], [B, G, T, D] x 2
        # The rotated pairs come out de-interleaved, in q and k alike: q.k, all attention reads, is unchanged.
        q, k = rotate_interleaved(q, cos, sin), rotate_interleaved(k, cos, sin)
        if cache is not None:
            k, v = append_kv(cache, k, v, start)  # [B, G, S, D]
        out = attend(q, k, v, start=start, scale=self.head_dim**-0.5)  # [B, N, T, D]
        return self.output(out)  # [B, T, H]


class BiasedSoftmaxRouter(nn.Module):
    """ERNIE-4.5 routing: a softmax over all experts in fp32; the top k of softmax + correction bias
    are chosen, weighted by their softmax alone, renormalized (the sum floored at `norm_min`).
    Returns (weights [T, K] fp32, ids [T, K])."""

    def __init__(self, experts: int, hidden: int, top_k: int, *, norm_min: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden), requires_grad=False)  # [E, H], kept fp32
        self.e_score_correction_bias = nn.Parameter(torch.empty(1, experts), requires_grad=False)  # [1, E], kept fp32
        self.top_k, self.norm_min = top_k, norm_min

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(matmul(x.float(), self.weight.float()), dim=-1)  # [T, E]
        ids = torch.topk(probs + self.e_score_correction_bias.float(), self.top_k, dim=-1).indices  # [T, K]
        weights = probs.gather(1, ids)  # [T, K]
        return weights / weights.sum(dim=-1, keepdim=True).clamp(min=self.norm_min), ids


def feed_forward(args: Ernie45MoeArgs, layer: int) -> nn.Module:
    if layer not in args.moe_layers:
        return MLP(args.hidden_size, args.intermediate_size, bias=args.use_bias)
    gate = BiasedSoftmaxRouter(args.num_experts, args.hidden_size, args.top_k, norm_min=args.norm_min)
    moe = RoutedMoe(gate, args.num_experts, args.hidden_size, args.moe_intermediate_size, shared=0)
    if args.num_shared_experts:  # the shared experts carry use_bias's biases, which RoutedMoe's do not
        width = args.moe_intermediate_size * args.num_shared_experts
        moe.shared_experts = MLP(args.hidden_size, width, bias=args.use_bias)
    return moe


def build(args: Ernie45MoeArgs) -> CausalLM:
    blocks = []
    for i in range(args.num_layers):
        attn = InterleavedRopeAttention(
            args.hidden_size,
            args.num_heads,
            args.num_kv_heads,
            args.head_dim,
            qkv_bias=args.use_bias,
            o_bias=args.use_bias,
        )
        blocks.append(Block(attn, feed_forward(args, i), args.hidden_size, args.rms_norm_eps))
    net = CausalLM.assemble(args, blocks)
    if args.use_bias:  # the head has a bias too; its weight stays tied to the embedding when tied
        net.lm_head = linear(args.hidden_size, args.vocab_size, bias=True)
        if args.tie_word_embeddings:
            net.lm_head.weight = net.model.embed_tokens.weight
    return net


ARCHITECTURE = Architecture(
    args_from_config=Ernie45MoeArgs.from_config,
    build=build,
    # The releases keep the correction bias beside the router ("moe_statics"); transformers inside it.
    renames=((r"\.mlp\.(?:gate\.)?moe_statics\.", ".mlp.gate."),),
    # The multi-token-prediction block serves speculative decoding only.
    ignore=lambda args: (r"(?:model\.)?mtp_.*",),
    keep_fp32=("mlp.gate.weight", "e_score_correction_bias"),
)
