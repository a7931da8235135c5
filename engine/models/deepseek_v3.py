"""DeepSeek-V3 / R1 / Moonlight and DeepSeek-V2 / V2-Lite: multi-head latent attention (MLA) and
routed + shared experts; V3 routes by grouped sigmoid scores, V2 by softmax (greedy or group-limited).

Shapes: B batch, T new tokens, S cached + new tokens, N heads, R kv_lora_rank,
Dn qk_nope_head_dim, Dr qk_rope_head_dim, Dv v_head_dim, E experts, H hidden.
The KV cache holds the normalized latent [B, S, R] and the rotated shared key [B, S, Dr],
not per-head keys and values: that is MLA's memory saving.
Layers below `first_k_dense_replace` use a dense MLP; the rest routed experts + shared experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.config import RopeArgs, require
from engine.decoder import Block, CausalLM
from engine.errors import UnsupportedArchitectureError
from engine.layers import MLP, RMSNorm, attend, linear
from engine.models import Architecture
from engine.moe import RoutedMoe, SigmoidGroupRouter, SoftmaxGroupRouter
from engine.rope import rotate, rotate_interleaved, yarn_mscale

# (scoring_func, topk_method) pairs: V3's, then V2's two.
_ROUTINGS = (("sigmoid", "noaux_tc"), ("softmax", "greedy"), ("softmax", "group_limited_greedy"))
# DeepSeek's q/kv LoRA norms use RMSNorm's default eps, not config.rms_norm_eps.
_LORA_NORM_EPS = 1e-6


@dataclass(frozen=True)
class DeepseekV3Args:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    intermediate_size: int  # dense layers
    moe_intermediate_size: int  # one expert
    num_experts: int
    num_shared_experts: int
    top_k: int
    scoring: str  # "sigmoid" (V3: with the correction bias) | "softmax" (V2)
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    first_k_dense_replace: int
    rms_norm_eps: float
    attention_bias: bool
    rope_interleave: bool
    num_nextn_predict_layers: int
    tie_word_embeddings: bool
    rope: RopeArgs

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> DeepseekV3Args:
        # V3 routes by sigmoid scores with a correction bias ("noaux_tc"), V2 by softmax, greedy or
        # group-limited; each config.json may spell its method out (the GGUF reader always does).
        v2 = c.get("model_type") == "deepseek_v2"
        scoring = c.get("scoring_func") or ("softmax" if v2 else "sigmoid")
        method = c.get("topk_method") or ("greedy" if v2 else "noaux_tc")
        if (scoring, method) not in _ROUTINGS:
            raise UnsupportedArchitectureError(
                f"DeepSeek routing scoring_func={scoring!r} with topk_method={method!r} is not supported; supported: "
                + ", ".join(f"{s} with {m}" for s, m in _ROUTINGS)
                + "."
            )
        return cls(
            vocab_size=int(c["vocab_size"]),
            hidden_size=int(c["hidden_size"]),
            num_layers=int(c["num_hidden_layers"]),
            num_heads=int(c["num_attention_heads"]),
            q_lora_rank=int(c["q_lora_rank"]) if c.get("q_lora_rank") else None,
            kv_lora_rank=int(c["kv_lora_rank"]),
            qk_nope_head_dim=int(c["qk_nope_head_dim"]),
            qk_rope_head_dim=int(c["qk_rope_head_dim"]),
            v_head_dim=int(c["v_head_dim"]),
            intermediate_size=int(c["intermediate_size"]),
            moe_intermediate_size=int(c["moe_intermediate_size"]),
            num_experts=int(require(c, "n_routed_experts", "num_local_experts")),
            num_shared_experts=int(c.get("n_shared_experts") or 0),
            top_k=int(c["num_experts_per_tok"]),
            scoring=scoring,
            # V2's "greedy" ignores the groups its config.json may still list.
            n_group=1 if method == "greedy" else int(c.get("n_group") or 1),
            topk_group=int(c.get("topk_group") or 1),
            norm_topk_prob=bool(c.get("norm_topk_prob", not v2)),
            routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
            first_k_dense_replace=int(c.get("first_k_dense_replace", 0)),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            attention_bias=bool(c.get("attention_bias", False)),
            # The official checkpoints store rotary dims as interleaved pairs.
            rope_interleave=bool(c.get("rope_interleave", True)),
            num_nextn_predict_layers=int(c.get("num_nextn_predict_layers") or 0),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            rope=RopeArgs.from_config(c),
        )

    @property
    def softmax_scale(self) -> float:
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        mscale_all_dim = self.rope.params.get("mscale_all_dim")
        if self.rope.rope_type != "default" and mscale_all_dim:
            # YaRN sharpens attention by mscale^2 (applied to q.k, not to the rotary tables).
            scale *= yarn_mscale(float(self.rope.params["factor"]), float(mscale_all_dim)) ** 2
        return scale


class LatentAttention(nn.Module):
    def __init__(self, args: DeepseekV3Args) -> None:
        super().__init__()
        self.args = args
        n, h = args.num_heads, args.hidden_size
        self.qk_dim = args.qk_nope_head_dim + args.qk_rope_head_dim
        if args.q_lora_rank is None:
            self.q_proj = linear(h, n * self.qk_dim)
        else:
            self.q_a_proj = linear(h, args.q_lora_rank, bias=args.attention_bias)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, _LORA_NORM_EPS)
            self.q_b_proj = linear(args.q_lora_rank, n * self.qk_dim)
        self.kv_a_proj_with_mqa = linear(h, args.kv_lora_rank + args.qk_rope_head_dim, bias=args.attention_bias)
        self.kv_a_layernorm = RMSNorm(args.kv_lora_rank, _LORA_NORM_EPS)
        self.kv_b_proj = linear(args.kv_lora_rank, n * (args.qk_nope_head_dim + args.v_head_dim))
        self.o_proj = linear(n * args.v_head_dim, h, bias=args.attention_bias)
        self.rotate = rotate_interleaved if args.rope_interleave else rotate

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        return [
            torch.zeros((batch, max_len, self.args.kv_lora_rank), dtype=dtype, device=device),  # [B, S_max, R]
            torch.zeros((batch, max_len, self.args.qk_rope_head_dim), dtype=dtype, device=device),  # [B, S_max, Dr]
        ]

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: list[torch.Tensor] | None, start: int
    ) -> torch.Tensor:
        a = self.args
        b, t, _ = x.shape
        n, dn, dr, dv = a.num_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
        if a.q_lora_rank is None:
            q = self.q_proj(x)  # [B, T, N*(Dn+Dr)]
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))  # [B, T, N*(Dn+Dr)]
        q = q.view(b, t, n, dn + dr).transpose(1, 2)  # [B, N, T, Dn+Dr]
        q_nope, q_rot = q.split([dn, dr], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([a.kv_lora_rank, dr], dim=-1)  # [B, T, R], [B, T, Dr]
        latent = self.kv_a_layernorm(latent)
        q_rot = self.rotate(q_rot, cos, sin)  # [B, N, T, Dr]
        k_rot = self.rotate(k_rot[:, None], cos, sin)[:, 0]  # [B, T, Dr]
        if cache is not None:
            cache[0][:, start : start + t] = latent
            cache[1][:, start : start + t] = k_rot
            latent, k_rot = cache[0][:, : start + t], cache[1][:, : start + t]  # [B, S, R], [B, S, Dr]
        s = latent.shape[1]
        kv = self.kv_b_proj(latent).view(b, s, n, dn + dv).transpose(1, 2)  # [B, N, S, Dn+Dv]
        k_nope, v = kv.split([dn, dv], dim=-1)  # [B, N, S, Dn], [B, N, S, Dv]
        k = torch.cat((k_nope, k_rot[:, None].expand(b, n, s, dr)), dim=-1)  # [B, N, S, Dn+Dr]
        q = torch.cat((q_nope, q_rot), dim=-1)  # [B, N, T, Dn+Dr]
        out = attend(q, k, v, start=start, scale=a.softmax_scale)  # [B, N, T, Dv]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, n * dv))  # [B, T, H]


def moe_or_mlp(args: Any, layer: int, router: type[nn.Module] = SigmoidGroupRouter) -> nn.Module:
    """DeepSeek's feed-forward for `layer`: a dense MLP below first_k_dense_replace, else routed experts
    behind `router` (grouped, scaled) plus the shared ones (DeepSeek-V2/V3 and GLM-4.5 args alike)."""
    if layer < args.first_k_dense_replace:
        return MLP(args.hidden_size, args.intermediate_size)
    gate = router(
        args.num_experts,
        args.hidden_size,
        args.top_k,
        n_group=args.n_group,
        topk_group=args.topk_group,
        renormalize=args.norm_topk_prob,
        scaling=args.routed_scaling_factor,
    )
    return RoutedMoe(
        gate, args.num_experts, args.hidden_size, args.moe_intermediate_size, shared=args.num_shared_experts
    )


def build(args: DeepseekV3Args) -> CausalLM:
    router = SigmoidGroupRouter if args.scoring == "sigmoid" else SoftmaxGroupRouter
    blocks = [
        Block(LatentAttention(args), moe_or_mlp(args, i, router), args.hidden_size, args.rms_norm_eps)
        for i in range(args.num_layers)
    ]
    return CausalLM.assemble(args, blocks, rope_dim=args.qk_rope_head_dim)


def mtp_layers(args: DeepseekV3Args) -> tuple[str, ...]:
    """The multi-token-prediction layers after the last decoder layer (DeepSeek-V3, GLM-4.5): they
    serve speculative decoding only."""
    first = args.num_layers
    return tuple(rf"model\.layers\.{i}\..*" for i in range(first, first + args.num_nextn_predict_layers))


ARCHITECTURE = Architecture(
    args_from_config=DeepseekV3Args.from_config,
    build=build,
    ignore=mtp_layers,
    keep_fp32=("e_score_correction_bias",),
)
