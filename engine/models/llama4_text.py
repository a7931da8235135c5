"""Llama 4's text model (llama4_text: Llama-4-Scout / Maverick's language model).

Attention: most layers turn q and k by RoPE on interleaved pairs, L2-normalize them per head
(`use_qk_norm`, no weight) and attend only within chunks of `attention_chunk_size` positions; the
others (`no_rope_layers` 0: every fourth by default) have no RoPE, see the whole context, and scale
q by a temperature that grows with the position (`attn_temperature_tuning`).
Feed-forward: on `moe_layers`, a shared expert plus top-k experts whose router scores
(sigmoid of the chosen logits) scale each expert's input, not its output; a dense MLP of width
`intermediate_size_mlp` elsewhere. The experts are stored [E, H, 2I] / [E, I, H] (inputs first).

Shapes: B batch, T new tokens, S keys, H hidden, N query heads, G key/value heads, D head dim,
E experts, K experts per token, I expert width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import DecoderArgs, gqa_fields
from engine.decoder import Block, CausalLM
from engine.errors import UnsupportedArchitectureError
from engine.layers import MLP, HeadProjections, append_kv, attend
from engine.models import Architecture
from engine.moe import Experts
from engine.qmatmul import matmul
from engine.rope import rotate_interleaved


@dataclass(frozen=True)
class Llama4TextArgs(DecoderArgs):
    dense_intermediate_size: int  # intermediate_size_mlp: the dense layers' MLP (intermediate_size is one expert's)
    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]
    rope_layers: tuple[int, ...]  # the rest have no RoPE
    chunk: int | None  # attention_chunk_size: the RoPE layers' attention span
    qk_norm: bool
    temperature_tuning: bool
    floor_scale: float
    attn_scale: float
    attention_bias: bool

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> Llama4TextArgs:
        fields = gqa_fields(c, eps=1e-5)
        layers = fields["num_layers"]
        interval = int(c.get("no_rope_layer_interval") or 4)
        use_rope = c.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]
        step = int(c.get("interleave_moe_layer_step") or 1)
        moe_layers = c.get("moe_layers")
        moe_layers = range(step - 1, layers, step) if moe_layers is None else moe_layers
        if float(c.get("router_jitter_noise") or 0.0):
            raise UnsupportedArchitectureError("router_jitter_noise is a training setting; set it to 0 to run.")
        chunk = c.get("attention_chunk_size")
        return cls(
            **fields,
            dense_intermediate_size=int(c["intermediate_size_mlp"]),
            num_experts=int(c["num_local_experts"]),
            top_k=int(c.get("num_experts_per_tok") or 1),
            moe_layers=tuple(int(i) for i in moe_layers),
            rope_layers=tuple(i for i, rope in enumerate(use_rope) if rope),
            chunk=None if chunk is None else int(chunk),
            qk_norm=bool(c.get("use_qk_norm", True)),
            temperature_tuning=bool(c.get("attn_temperature_tuning", True)),
            floor_scale=float(c.get("floor_scale", 8192)),
            attn_scale=float(c.get("attn_scale", 0.1)),
            attention_bias=bool(c.get("attention_bias", False)),
        )


def chunked_attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, start: int, chunk: int, scale: float
) -> torch.Tensor:
    """Causal attention within chunks: the query at position p sees keys (p // chunk) * chunk .. p.

    q [B, N, T, D] at positions start.., k [B, G, S, D] and v [B, G, S, D] at 0..S-1 -> [B, N, T, D].
    """
    first = (start // chunk) * chunk  # the first key any of the new queries sees
    if q.shape[2] == 1:
        return attend(q, k[:, :, first:], v[:, :, first:], start=start - first, scale=scale)
    positions = torch.arange(start, start + q.shape[2], device=q.device)[:, None]  # [T, 1]
    keys = torch.arange(first, k.shape[2], device=q.device)[None, :]  # [1, S - first]
    mask = (keys <= positions) & (keys // chunk == positions // chunk)  # [T, S - first]
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(
        q, k[:, :, first:], v[:, :, first:], attn_mask=mask, scale=scale, enable_gqa=gqa
    )  # [B, N, T, D]


class Llama4Attention(HeadProjections):
    """Grouped-query attention in Llama 4's two kinds (see the module docstring): `rope` layers turn
    interleaved pairs, L2-norm q and k (`qk_norm`) and attend within `chunk`s; the others scale q
    by log1p(floor((p + 1) / floor_scale)) * attn_scale + 1 at position p (`temperature`).

    Its own class, not layers.Attention: the native decode kernels know neither chunks nor NoPE."""

    def __init__(self, args: Llama4TextArgs, *, rope: bool) -> None:
        bias = args.attention_bias
        super().__init__(args.hidden_size, args.num_heads, args.num_kv_heads, args.head_dim, qkv_bias=bias, o_bias=bias)
        self.rope = rope
        self.chunk = args.chunk if rope else None
        self.qk_norm_eps = args.rms_norm_eps if rope and args.qk_norm else None
        self.temperature = None if rope or not args.temperature_tuning else (args.floor_scale, args.attn_scale)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: list[torch.Tensor] | None, start: int
    ) -> torch.Tensor:
        t = x.shape[1]
        q, k, v = self.split_heads(x)  # [B, N, T, D], [B, G, T, D] x 2
        if self.rope:
            # De-interleaved output in q and k alike: q.k and the L2 norm are unchanged.
            q, k = rotate_interleaved(q, cos, sin), rotate_interleaved(k, cos, sin)
        if self.qk_norm_eps is not None:
            q = F.rms_norm(q.float(), (self.head_dim,), eps=self.qk_norm_eps).to(q.dtype)
            k = F.rms_norm(k.float(), (self.head_dim,), eps=self.qk_norm_eps).to(k.dtype)
        if self.temperature is not None:
            floor_scale, attn_scale = self.temperature
            positions = torch.arange(start, start + t, device=x.device, dtype=torch.float32)  # [T]
            q = (q * (torch.log1p(torch.floor((positions + 1) / floor_scale)) * attn_scale + 1)[:, None]).to(q.dtype)
        if cache is not None:
            k, v = append_kv(cache, k, v, start)  # [B, G, S, D]
        scale = self.head_dim**-0.5
        if self.chunk is None:
            out = attend(q, k, v, start=start, scale=scale)  # [B, N, T, D]
        else:
            out = chunked_attend(q, k, v, start=start, chunk=self.chunk, scale=scale)  # [B, N, T, D]
        return self.output(out)  # [B, T, H]


class SigmoidTopKRouter(nn.Module):
    """Llama 4 routing: the top k logits, each through a sigmoid (no normalization across experts).
    Returns (scores [T, K] fp32, ids [T, K])."""

    def __init__(self, experts: int, hidden: int, top_k: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden), requires_grad=False)  # [E, H]
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top, ids = torch.topk(matmul(x, self.weight), self.top_k, dim=-1)  # [T, K]
        return torch.sigmoid(top.float()), ids


class InputScaledMoe(nn.Module):
    """shared(x) + sum over the k chosen experts of expert(score * x): the score scales the expert's
    input (SwiGLU is not linear, so this is not expert(x) * score). Each (token, expert) pair runs as
    its own row through the experts backend, with weight 1."""

    def __init__(self, experts: int, hidden: int, width: int, top_k: int) -> None:
        super().__init__()
        self.gate = SigmoidTopKRouter(experts, hidden, top_k)
        self.experts = Experts(experts, hidden, width)
        self.shared_expert = MLP(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [T, H]
        scores, ids = self.gate(flat)  # [T, K] each
        t, k = ids.shape
        rows = (flat[:, None, :] * scores[..., None].to(flat.dtype)).reshape(t * k, -1)  # [T*K, H]
        ones = torch.ones(t * k, 1, dtype=scores.dtype, device=x.device)  # [T*K, 1]
        routed = self.experts(rows, ones, ids.reshape(t * k, 1)).view(t, k, -1).sum(dim=1)  # [T, H]
        return (routed + self.shared_expert(flat)).view(shape)  # [B, T, H]


def build(args: Llama4TextArgs) -> CausalLM:
    blocks = []
    for i in range(args.num_layers):
        if i in args.moe_layers:
            mlp = InputScaledMoe(args.num_experts, args.hidden_size, args.intermediate_size, args.top_k)
        else:
            mlp = MLP(args.hidden_size, args.dense_intermediate_size)
        attn = Llama4Attention(args, rope=i in args.rope_layers)
        blocks.append(Block(attn, mlp, args.hidden_size, args.rms_norm_eps))
    return CausalLM.assemble(args, blocks)


ARCHITECTURE = Architecture(
    args_from_config=Llama4TextArgs.from_config,
    build=build,
    renames=((r"\.feed_forward\.router\.", ".mlp.gate."), (r"\.feed_forward\.", ".mlp.")),
    layouts=(
        (r".*\.mlp\.experts\.gate_up_proj", ("transpose",)),
        (r".*\.mlp\.experts\.down_proj", ("transpose",)),
    ),
)
