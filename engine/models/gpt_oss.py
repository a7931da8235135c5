"""gpt-oss (openai/gpt-oss-20b, -120b): sliding and full attention alternating, a learned attention
sink per head, YaRN RoPE, and experts with biases and a clamped SwiGLU, routed by top-k of the
router's logits (with bias) then a softmax over those k.

Shapes: B batch, T new tokens, S cached + new tokens, H hidden, N query heads, G key/value heads,
D head dim, E experts, K experts per token, I expert width.

Checkpoints store the float experts transposed and gate/up interleaved (gate_up_proj [E, H, 2I],
columns g0, u0, g1, u1, ...; down_proj [E, I, H]); MXFP4 ones store their blocks as rows of outputs
([E, 2I, H/32, 16], still interleaved). `layouts` below has the loader turn both into the engine's
[E, 2I, H] (gate rows, then up rows) and [E, H, I].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import DecoderArgs, gqa_fields
from engine.decoder import Block, CausalLM
from engine.errors import CheckpointError
from engine.layers import HeadProjections, append_kv, kv_cache
from engine.models import Architecture
from engine.moe import Experts, expert_matmul
from engine.qmatmul import matmul
from engine.rope import rotate


@dataclass(frozen=True)
class GptOssArgs(DecoderArgs):
    num_experts: int
    top_k: int
    sliding_window: int
    sliding: tuple[bool, ...]  # per layer: a sliding-window layer (else full attention)
    swiglu_alpha: float
    swiglu_limit: float

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> GptOssArgs:
        layers = int(c["num_hidden_layers"])
        types = c.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        unknown = set(types) - {"sliding_attention", "full_attention"}
        if unknown or len(types) != layers:
            raise CheckpointError(f"gpt_oss layer_types must name each of {layers} layers sliding or full: {types}")
        return cls(
            **gqa_fields(c, eps=1e-5),
            num_experts=int(c["num_local_experts"]),
            top_k=int(c["num_experts_per_tok"]),
            sliding_window=int(c.get("sliding_window") or 128),
            sliding=tuple(t == "sliding_attention" for t in types),
            swiglu_alpha=float(c.get("swiglu_alpha", 1.702)),
            swiglu_limit=float(c.get("swiglu_limit", 7.0)),
        )


def sink_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    *,
    start: int,
    key_start: int,
    window: int | None,
    scale: float,
) -> torch.Tensor:
    """Causal attention where each head's softmax also holds a sink logit that carries no value.

    q [B, N, T, D] at positions start.., k / v [B, G, S, D] at key_start.., sinks [N] -> [B, N, T, D].
    The query at position p sees keys p - window < j <= p (all j <= p without a window). The sink
    is one more key whose value is zero and whose score is the sink itself, given through the
    additive mask, so the fused kernel does the rest.
    """
    b, n, t, _ = q.shape
    s = k.shape[2]
    positions = torch.arange(t, device=q.device)[:, None] + start  # [T, 1]
    keys = torch.arange(s, device=q.device)[None, :] + key_start  # [1, S]
    visible = keys <= positions
    if window is not None:
        visible &= keys > positions - window
    bias = torch.zeros(t, s, dtype=q.dtype, device=q.device).masked_fill(~visible, float("-inf"))  # [T, S]
    sink = sinks.to(q.dtype)[None, :, None, None].expand(b, n, t, 1)  # the zero key's score: q . 0 + sink
    mask = torch.cat([bias[None, None].expand(b, n, t, s), sink], dim=-1)  # [B, N, T, S + 1]
    zero = k.new_zeros(k.shape[0], k.shape[1], 1, k.shape[3])  # [B, G, 1, D]
    k, v = torch.cat([k, zero], dim=2), torch.cat([v, zero], dim=2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=n != k.shape[1])


class SinkAttention(HeadProjections):
    """gpt-oss attention: GQA with biases, a sink logit per head, a sliding window on some layers.

    Its own class, not layers.Attention: the native decode kernels know neither sinks nor windows.
    A sliding layer's KV cache keeps only its window: position p lives in slot p % slots, where
    slots = min(window, the cache's length)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, *, window: int | None) -> None:
        super().__init__(hidden, heads, kv_heads, head_dim, qkv_bias=True, o_bias=True)
        self.window = window
        self.sinks = nn.Parameter(torch.empty(heads), requires_grad=False)  # [N]

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        slots = max_len if self.window is None else min(max_len, self.window)
        return kv_cache(batch, self.kv_heads, slots, self.head_dim, dtype, device)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: list[torch.Tensor] | None, start: int
    ) -> torch.Tensor:
        q, k, v = self.split_heads(x)  # [B, N, T, D], [B, G, T, D] x 2
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        key_start = start
        if cache is not None:
            k, v, key_start = self._cached(cache, k, v, start)
        out = sink_attend(
            q, k, v, self.sinks, start=start, key_start=key_start, window=self.window, scale=self.head_dim**-0.5
        )
        return self.output(out)  # [B, T, H]

    def _cached(
        self, cache: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Store the new keys and values [B, G, T, D]; return every key and value the new queries may
        see, and the position of the first."""
        t, slots = k.shape[2], cache[0].shape[2]
        if self.window is None:
            return *append_kv(cache, k, v, start), 0
        past = min(start, self.window - 1)  # the earlier positions the window still reaches
        kept = torch.arange(start - past, start, device=k.device) % slots
        keys, values = torch.cat([cache[0][:, :, kept], k], dim=2), torch.cat([cache[1][:, :, kept], v], dim=2)
        new = min(t, slots)  # a prompt longer than the window leaves only its last `slots` positions
        at = torch.arange(start + t - new, start + t, device=k.device) % slots
        cache[0][:, :, at], cache[1][:, :, at] = k[:, :, t - new :], v[:, :, t - new :]
        return keys, values, start - past


class BiasRouter(nn.Module):
    """gpt-oss routing: logits with a bias, their top k, a softmax over those k.
    Returns (weights [T, K] fp32, ids [T, K])."""

    def __init__(self, experts: int, hidden: int, top_k: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden), requires_grad=False)  # [E, H]
        self.bias = nn.Parameter(torch.empty(experts), requires_grad=False)  # [E]
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = matmul(x, self.weight).float() + self.bias.float()  # [T, E]
        top, ids = torch.topk(logits, self.top_k, dim=-1)  # [T, K]
        return torch.softmax(top, dim=-1), ids


class GptOssMoe(nn.Module):
    """Routed experts with biases: down(swiglu(gate_up(x) + b13)) + b2, where swiglu clamps gate from
    above and up on both sides at `limit`, then (up + 1) * gate * sigmoid(alpha * gate).

    The experts are any stored form of `Experts` (float, quantized, MXFP4 blocks), read one expert
    at a time through `expert_matmul`; the biases are kept beside them in the model dtype."""

    def __init__(self, experts: int, hidden: int, width: int, top_k: int, *, alpha: float, limit: float) -> None:
        super().__init__()
        self.router = BiasRouter(experts, hidden, top_k)
        self.experts = Experts(experts, hidden, width)
        self.gate_up_bias = nn.Parameter(torch.empty(experts, 2 * width), requires_grad=False)  # [E, 2I]
        self.down_bias = nn.Parameter(torch.empty(experts, hidden), requires_grad=False)  # [E, H]
        self.alpha, self.limit = alpha, limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [T, H]
        weights, ids = self.router(flat)  # [T, K] each
        out = torch.zeros_like(flat, dtype=torch.float32)  # [T, H]
        for e in ids.unique().tolist():
            rows, slots = torch.where(ids == e)  # the tokens routed to e, and where in their top k
            gate_up = expert_matmul(self.experts, "gate_up_proj", e, flat[rows]).float() + self.gate_up_bias[e].float()
            gate, up = gate_up.chunk(2, dim=-1)  # [R, I] each
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
            h = (up + 1) * gate * torch.sigmoid(self.alpha * gate)  # [R, I]
            y = expert_matmul(self.experts, "down_proj", e, h.to(flat.dtype)).float() + self.down_bias[e].float()
            out.index_add_(0, rows, y * weights[rows, slots, None])
        return out.to(x.dtype).view(shape)  # [B, T, H]


def build(args: GptOssArgs) -> CausalLM:
    blocks = []
    for sliding in args.sliding:
        attn = SinkAttention(
            args.hidden_size,
            args.num_heads,
            args.num_kv_heads,
            args.head_dim,
            window=args.sliding_window if sliding else None,
        )
        mlp = GptOssMoe(
            args.num_experts,
            args.hidden_size,
            args.intermediate_size,
            args.top_k,
            alpha=args.swiglu_alpha,
            limit=args.swiglu_limit,
        )
        blocks.append(Block(attn, mlp, args.hidden_size, args.rms_norm_eps))
    return CausalLM.assemble(args, blocks)


ARCHITECTURE = Architecture(
    args_from_config=GptOssArgs.from_config,
    build=build,
    renames=(
        (r"\.mlp\.experts\.gate_up_proj_bias$", ".mlp.gate_up_bias"),
        (r"\.mlp\.experts\.down_proj_bias$", ".mlp.down_bias"),
    ),
    layouts=(
        (r".*\.mlp\.experts\.gate_up_proj", ("transpose", "deinterleave")),
        (r".*\.mlp\.experts\.down_proj", ("transpose",)),
        (r".*\.mlp\.gate_up_bias", ("deinterleave",)),
    ),
    keep_fp32=("sinks",),
)
