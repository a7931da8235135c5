"""Qwen3-Next (qwen3_next) and Qwen3.5-MoE's text model (qwen3_5_moe): Gated DeltaNet linear-attention
layers interleaved with gated full attention, softmax-routed experts with a gated shared expert.

Shapes: B batch, T new tokens, H hidden, C chunk, Hk / Hv linear key / value heads, Dk / Dv their dims,
N / G attention heads / key-value heads, D head dim, K conv kernel.

A linear-attention layer keeps, per sequence, a recurrent state S [Hv, Dk, Dv] and the last K - 1
inputs of its short convolution; each token t (q, k unit-normed, q scaled by Dk^-1/2) does
    S <- exp(g_t) S;  u_t = beta_t (v_t - k_t^T S);  S <- S + k_t u_t^T;  o_t = q_t^T S
(the gated delta rule). Prompts run it a chunk of C tokens at a time (`gated_delta_rule`), a few
matrix products per chunk instead of a loop over tokens; a decode step is a chunk of one.
All norms scale by 1 + weight (weights stored centred on zero).
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
from engine.layers import RMSNorm, append_kv, attend, kv_cache, linear
from engine.models import Architecture
from engine.models.qwen2_moe import feed_forward
from engine.rope import rotate

CHUNK = 64  # tokens per chunk of the gated delta rule


@dataclass(frozen=True)
class Qwen3NextArgs(DecoderArgs):
    moe_intermediate_size: int  # one expert
    shared_expert_intermediate_size: int
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]
    linear: tuple[bool, ...]  # per layer: Gated DeltaNet (else gated full attention)
    linear_key_heads: int
    linear_value_heads: int
    linear_key_dim: int
    linear_value_dim: int
    conv_kernel: int
    rotary_dim: int
    split_projections: bool  # Qwen3.5's in_proj_qkv / z / b / a, else Qwen3-Next's grouped qkvz / ba

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Qwen3NextArgs:
        c = config.get("text_config") or config  # Qwen3.5 publishes the text model inside a multimodal one
        fields = gqa_fields(c, eps=1e-6)
        layers = fields["num_layers"]
        interval = int(c.get("full_attention_interval") or 4)
        types = c.get("layer_types") or [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)
        ]
        if len(types) != layers or set(types) - {"linear_attention", "full_attention"}:
            raise CheckpointError(f"layer_types must name each of {layers} layers linear or full attention: {types}")
        factor = (c.get("rope_parameters") or {}).get("partial_rotary_factor") or c.get("partial_rotary_factor")
        return cls(
            **fields,
            moe_intermediate_size=int(c["moe_intermediate_size"]),
            shared_expert_intermediate_size=int(c["shared_expert_intermediate_size"]),
            num_experts=int(c["num_experts"]),
            top_k=int(c["num_experts_per_tok"]),
            norm_topk_prob=bool(c.get("norm_topk_prob", True)),
            decoder_sparse_step=int(c.get("decoder_sparse_step") or 1),
            mlp_only_layers=tuple(int(i) for i in c.get("mlp_only_layers") or ()),
            linear=tuple(t == "linear_attention" for t in types),
            linear_key_heads=int(c["linear_num_key_heads"]),
            linear_value_heads=int(c["linear_num_value_heads"]),
            linear_key_dim=int(c["linear_key_head_dim"]),
            linear_value_dim=int(c["linear_value_head_dim"]),
            conv_kernel=int(c.get("linear_conv_kernel_dim") or 4),
            rotary_dim=int(fields["head_dim"] * float(factor or 0.25)),
            split_projections=config.get("model_type") in ("qwen3_5_moe", "qwen3_5_moe_text"),
        )


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over T tokens, C = min(CHUNK, T) at a time: q, k [B, H, T, Dk] (normed, q scaled),
    v [B, H, T, Dv], g (log decay, <= 0) and beta [B, H, T], state [B, H, Dk, Dv], all fp32
    -> (outputs [B, H, T, Dv], the state after the last token).

    Within a chunk, with gamma the cumulative log decay from its start and S0 the state before it,
    the updates solve a unit lower-triangular system: (I + A) u = beta (v - exp(gamma) K S0), where
    A[i, j] = beta_i exp(gamma_i - gamma_j) k_i . k_j for j < i. So u = Wv - Wk S0 with Wv, Wk
    solved for every chunk at once; only S0 passes from chunk to chunk.
    """
    b, h, t, _ = k.shape
    c = min(CHUNK, t)  # a decode step is a chunk of one: padding it to CHUNK cost 3 ms a layer
    pad = -t % c
    if pad:  # zero keys and rates change nothing: the padded tokens write no update
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    n = (t + pad) // c
    q, k, v = (x.reshape(b, h, n, c, x.shape[-1]) for x in (q, k, v))  # [B, H, n, C, D]
    gamma = g.reshape(b, h, n, c).cumsum(-1)  # [B, H, n, C]
    beta = beta.reshape(b, h, n, c)
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()  # j <= i
    diff = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~causal, float("-inf"))
    decay = diff.exp()  # [B, H, n, C, C]: exp(gamma_i - gamma_j) for j <= i, else 0
    a = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).tril(-1)  # strictly lower
    system = a + torch.eye(c, device=q.device)
    w_v = torch.linalg.solve_triangular(system, beta[..., None] * v, upper=False, unitriangular=True)
    w_k = torch.linalg.solve_triangular(system, (beta * gamma.exp())[..., None] * k, upper=False, unitriangular=True)
    scores = (q @ k.transpose(-1, -2)) * decay  # [B, H, n, C, C]: q_i . k_j, decayed, j <= i
    q_decayed = q * gamma.exp()[..., None]  # reads of S0
    k_to_end = k * (gamma[..., -1:] - gamma).exp()[..., None]  # each key's decay to the chunk's end
    out = torch.empty_like(v)
    for i in range(n):
        u = w_v[:, :, i] - w_k[:, :, i] @ state  # [B, H, C, Dv]
        out[:, :, i] = q_decayed[:, :, i] @ state + scores[:, :, i] @ u
        state = state * gamma[:, :, i, -1, None, None].exp() + k_to_end[:, :, i].transpose(-1, -2) @ u
    return out.reshape(b, h, n * c, -1)[:, :, :t], state


def _unit(x: torch.Tensor) -> torch.Tensor:
    """x / |x| over the last dim, as the reference kernels (FLA) compute it: x * rsqrt(|x|^2 + 1e-6)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)


class GatedDeltaNet(nn.Module):
    """The linear-attention token mixer: projections, a causal depthwise convolution with SiLU over
    q, k and v, the gated delta rule, an RMS norm gated by SiLU(z) per value head, the output
    projection. Its cache entry is [conv inputs [B, Ck, K - 1], state [B, Hv, Dk, Dv] fp32]."""

    def __init__(self, args: Qwen3NextArgs) -> None:
        super().__init__()
        h = args.hidden_size
        self.hk, self.hv, self.dk, self.dv = (
            args.linear_key_heads,
            args.linear_value_heads,
            args.linear_key_dim,
            args.linear_value_dim,
        )
        self.key_dim, self.value_dim = self.hk * self.dk, self.hv * self.dv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.split = args.split_projections
        if self.split:  # Qwen3.5: q, k, v one after the other; z, b, a apart
            self.in_proj_qkv = linear(h, self.conv_dim)
            self.in_proj_z = linear(h, self.value_dim)
            self.in_proj_b = linear(h, self.hv)
            self.in_proj_a = linear(h, self.hv)
        else:  # Qwen3-Next: per key head its q, k, then its value heads' v and z; b and a likewise
            self.in_proj_qkvz = linear(h, 2 * self.key_dim + 2 * self.value_dim)
            self.in_proj_ba = linear(h, 2 * self.hv)
        self.conv1d = nn.Module()
        self.conv1d.weight = nn.Parameter(torch.empty(self.conv_dim, 1, args.conv_kernel), requires_grad=False)
        self.dt_bias = nn.Parameter(torch.empty(self.hv), requires_grad=False)
        self.A_log = nn.Parameter(torch.empty(self.hv), requires_grad=False)
        self.norm = RMSNorm(self.dv, args.rms_norm_eps)  # plain weight here, not offset
        self.out_proj = linear(self.value_dim, h)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        kernel = self.conv1d.weight.shape[-1]
        return [
            torch.zeros(batch, self.conv_dim, kernel - 1, dtype=dtype, device=device),
            torch.zeros(batch, self.hv, self.dk, self.dv, dtype=torch.float32, device=device),
        ]

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [B, T, H] -> qkv [B, T, Ck] (q, k, v one after the other), z [B, T, Hv, Dv], b and a [B, T, Hv]."""
        bsz, t, _ = x.shape
        if self.split:
            z = self.in_proj_z(x).view(bsz, t, self.hv, self.dv)
            return self.in_proj_qkv(x), z, self.in_proj_b(x), self.in_proj_a(x)
        per = self.hv // self.hk  # value heads per key head
        mixed = self.in_proj_qkvz(x).view(bsz, t, self.hk, 2 * self.dk + 2 * per * self.dv)
        q, k, v, z = mixed.split([self.dk, self.dk, per * self.dv, per * self.dv], dim=-1)
        ba = self.in_proj_ba(x).view(bsz, t, self.hk, 2 * per)
        b, a = ba.split([per, per], dim=-1)
        qkv = torch.cat([q.reshape(bsz, t, -1), k.reshape(bsz, t, -1), v.reshape(bsz, t, -1)], dim=-1)
        return qkv, z.reshape(bsz, t, self.hv, self.dv), b.reshape(bsz, t, self.hv), a.reshape(bsz, t, self.hv)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: list[torch.Tensor] | None, start: int
    ) -> torch.Tensor:
        bsz, t, _ = x.shape
        qkv, z, b, a = self._project(x)
        kernel = self.conv1d.weight.shape[-1]
        seq = qkv.transpose(1, 2)  # [B, Ck, T]
        before = seq.new_zeros(bsz, self.conv_dim, kernel - 1) if cache is None or start == 0 else cache[0]
        seq = torch.cat([before.to(seq.dtype), seq], dim=-1)  # [B, Ck, K - 1 + T]
        if cache is not None:
            cache[0].copy_(seq[..., -(kernel - 1) :])
        mixed = F.silu(F.conv1d(seq, self.conv1d.weight.to(seq.dtype), groups=self.conv_dim))  # [B, Ck, T]
        q, k, v = mixed.transpose(1, 2).float().split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(bsz, t, self.hk, self.dk).repeat_interleave(self.hv // self.hk, dim=2).transpose(1, 2)
        k = k.reshape(bsz, t, self.hk, self.dk).repeat_interleave(self.hv // self.hk, dim=2).transpose(1, 2)
        v = v.reshape(bsz, t, self.hv, self.dv).transpose(1, 2)  # [B, Hv, T, Dv]
        q, k = _unit(q) * self.dk**-0.5, _unit(k)
        beta = torch.sigmoid(b.float()).transpose(1, 2)  # [B, Hv, T]
        g = (-self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())).transpose(1, 2)
        state = x.new_zeros(bsz, self.hv, self.dk, self.dv, dtype=torch.float32)
        if cache is not None and start > 0:
            state = cache[1]
        out, state = gated_delta_rule(q, k, v, g, beta, state)  # [B, Hv, T, Dv]
        if cache is not None:
            cache[1].copy_(state)
        out = self.norm(out.transpose(1, 2).to(x.dtype)) * F.silu(z)  # [B, T, Hv, Dv]
        return self.out_proj(out.reshape(bsz, t, self.value_dim))  # [B, T, H]


class GatedAttention(nn.Module):
    """Full attention whose output is gated per channel by sigmoid of a second half of q_proj (per
    head: D query dims, then D gate dims), with per-head q/k norms and RoPE on the first rotary dims
    (the width of the model's cos / sin tables)."""

    def __init__(self, args: Qwen3NextArgs) -> None:
        super().__init__()
        h, n, gkv, d = args.hidden_size, args.num_heads, args.num_kv_heads, args.head_dim
        self.heads, self.kv_heads, self.head_dim, self.rotary_dim = n, gkv, d, args.rotary_dim
        self.q_proj = linear(h, n * d * 2)
        self.k_proj = linear(h, gkv * d)
        self.v_proj = linear(h, gkv * d)
        self.o_proj = linear(n * d, h)
        self.q_norm = RMSNorm(d, args.rms_norm_eps, offset=True)
        self.k_norm = RMSNorm(d, args.rms_norm_eps, offset=True)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        return kv_cache(batch, self.kv_heads, max_len, self.head_dim, dtype, device)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: list[torch.Tensor] | None, start: int
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q, gate = self.q_proj(x).view(b, t, self.heads, 2 * self.head_dim).chunk(2, dim=-1)  # [B, T, N, D] each
        q = rotate(self.q_norm(q).transpose(1, 2), cos, sin)  # [B, N, T, D]
        k = self.k_norm(self.k_proj(x).view(b, t, self.kv_heads, self.head_dim))
        k = rotate(k.transpose(1, 2), cos, sin)  # [B, G, T, D]
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, G, T, D]
        if cache is not None:
            k, v = append_kv(cache, k, v, start)  # [B, G, S, D]
        out = attend(q, k, v, start=start, scale=self.head_dim**-0.5).transpose(1, 2)  # [B, T, N, D]
        out = out * torch.sigmoid(gate)
        return self.o_proj(out.reshape(b, t, self.heads * self.head_dim))  # [B, T, H]


def build(args: Qwen3NextArgs) -> CausalLM:
    blocks = []
    for i, is_linear in enumerate(args.linear):
        mixer = GatedDeltaNet(args) if is_linear else GatedAttention(args)
        blocks.append(Block(mixer, feed_forward(args, i), args.hidden_size, args.rms_norm_eps, offset_norms=True))
    return CausalLM.assemble(args, blocks, rope_dim=args.rotary_dim, offset_norm=True)


ARCHITECTURE = Architecture(
    args_from_config=Qwen3NextArgs.from_config,
    build=build,
    renames=(
        (r"^model\.language_model\.", "model."),  # Qwen3.5's multimodal checkpoints
        (r"\.linear_attn\.", ".self_attn."),
    ),
    ignore=lambda args: (r"model\.visual\..*", r"mtp\..*"),  # the vision tower; multi-token prediction
    keep_fp32=("A_log", "dt_bias"),
)
