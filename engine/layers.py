"""Blocks shared by the architectures: RMSNorm, SwiGLU MLP, grouped-query attention with a KV cache.

Shapes: B batch, T new tokens, S cached + new tokens, H hidden, N query heads, G key/value heads,
D head dim, I MLP width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.qmatmul import linear as qlinear
from engine.rope import rotate


class StoredWeights(nn.Module):
    """A module whose buffers (quantized weights and their scales) keep their stored dtypes.

    `model.to(torch.bfloat16)` converts every floating-point tensor, fp8 weights and fp32 scales
    included, which would silently change what the kernels read. Here a dtype change leaves each
    buffer's data as stored (moved to the new device when there is one); parameters, such as a
    bias, follow the model.
    """

    def _apply(self, fn, recurse=True):  # torch's signature, untyped there too
        stored = {name: b for name, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for name, before in stored.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:
                self._buffers[name] = before.to(device=after.device)
        return self


def child(net: nn.Module, path: str) -> nn.Module | None:
    """The module at dotted `path` under `net`, or None (the loaders swap modules by checkpoint name)."""
    parent_name, _, child_name = path.rpartition(".")
    try:
        return getattr(net.get_submodule(parent_name), child_name)
    except AttributeError:
        return None


def swap(net: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at dotted `path` under `net`, in place of what is there."""
    parent_name, _, child_name = path.rpartition(".")
    setattr(net.get_submodule(parent_name), child_name, module)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight, as transformers does. With `offset`
    (Qwen3-Next, Qwen3.5) the weight is stored centred on zero and scales by 1 + weight, in fp32."""

    def __init__(self, dim: int, eps: float, *, offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps, self.offset = eps, offset

    def scale(self) -> torch.Tensor:
        """The multiplier after normalizing, fp32 [dim] (what the native kernels read)."""
        return self.weight.float() + 1 if self.offset else self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.offset:
            return (normed * self.scale()).to(x.dtype)
        return self.weight * normed.to(x.dtype)


class Linear(nn.Linear):
    """An inference-only nn.Linear whose product is qmatmul.matmul (the native kernels at decode)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qlinear(x, self.weight, None, self.bias)


def linear(in_features: int, out_features: int, *, bias: bool = False) -> nn.Linear:
    """An inference-only Linear (weights are filled by the loader)."""
    layer = Linear(in_features, out_features, bias=bias)
    layer.requires_grad_(False)
    return layer


class MLP(nn.Module):
    """Dense SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, width: int, *, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = linear(hidden, width, bias=bias)
        self.up_proj = linear(hidden, width, bias=bias)
        self.down_proj = linear(width, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # [..., H]


def kv_cache(
    batch: int, kv_heads: int, slots: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """An attention layer's cache entry: keys and values [B, G, slots, D], zeroed."""
    shape = (batch, kv_heads, slots, head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)]


def append_kv(
    cache: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor, start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write the new keys and values [B, G, T, D] at positions start.. of the cache; return every key
    and value up to them, [B, G, start + T, D] (views into the cache)."""
    t = k.shape[2]
    cache[0][:, :, start : start + t], cache[1][:, :, start : start + t] = k, v
    return cache[0][:, :, : start + t], cache[1][:, :, : start + t]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, start: int, scale: float) -> torch.Tensor:
    """Causal attention of T new queries at positions start.. over S keys at positions 0..S-1.

    q [B, N, T, D], k [B, G, S, D], v [B, G, S, Dv] -> [B, N, T, Dv].
    """
    t, s = q.shape[2], k.shape[2]
    if t == 1 and q.device.type == "cpu":
        # Decode: one query per head. Two small products beat the fused kernel's ~0.3 ms setup.
        b, n, _, d = q.shape
        g = k.shape[1]
        qg = q.view(b, g, n // g, d)  # [B, G, N/G, D]: the query heads sharing each key head
        scores = (qg @ k.transpose(-1, -2)).float() * scale  # [B, G, N/G, S]
        out = torch.softmax(scores, dim=-1).to(v.dtype) @ v  # [B, G, N/G, Dv]
        return out.view(b, n, 1, v.shape[-1])
    mask = None
    causal = False
    if t > 1 and s == t:
        causal = True
    elif t > 1:
        # Query i (absolute position start + i) sees keys 0..start + i.
        positions = torch.arange(t, device=q.device)[:, None] + start  # [T, 1]
        mask = torch.arange(s, device=q.device)[None, :] <= positions  # [T, S]
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)


class HeadProjections(nn.Module):
    """What the grouped-query attention variants share: the q, k, v and o projections (optional
    biases), x split into heads, the output projection, a cache of every position. Each subclass
    says how the heads attend (the native decode kernels read the variants they know by class)."""

    def __init__(
        self, hidden: int, heads: int, kv_heads: int, head_dim: int, *, qkv_bias: bool = False, o_bias: bool = False
    ) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = linear(hidden, heads * head_dim, bias=qkv_bias)
        self.k_proj = linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = linear(heads * head_dim, hidden, bias=o_bias)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        return kv_cache(batch, self.kv_heads, max_len, self.head_dim, dtype, device)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, H] -> q [B, N, T, D], k and v [B, G, T, D]."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """The heads' outputs [B, N, T, D] -> o_proj of them [B, T, H]."""
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class Attention(HeadProjections):
    """Grouped-query attention; optional q/k/v bias (Qwen2), q/k RMSNorm per head (Qwen3) or over the
    whole projection (OLMoE, `qk_norm_per_head=False`), q/k/v clipped to +-clip_qkv (OLMoE), and RoPE
    on the first `rotary_dim` dims of each head only (GLM's partial rotary; cos/sin that wide)."""

    def __init__(
        self,
        hidden: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm_eps: float | None = None,
        qk_norm_per_head: bool = True,
        clip_qkv: float | None = None,
        rotary_dim: int | None = None,
    ) -> None:
        super().__init__(hidden, heads, kv_heads, head_dim, qkv_bias=qkv_bias, o_bias=o_bias)
        self.qk_norm_per_head, self.clip_qkv = qk_norm_per_head, clip_qkv
        self.rotary_dim = rotary_dim or head_dim  # the width of cos / sin; the native kernels rotate whole heads
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim if qk_norm_per_head else heads * head_dim, qk_norm_eps)
            self.k_norm = RMSNorm(head_dim if qk_norm_per_head else kv_heads * head_dim, qk_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: list[torch.Tensor] | None,
        start: int,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, T, N*D], [B, T, G*D] x 2
        if self.q_norm is not None and not self.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (z.clamp(-self.clip_qkv, self.clip_qkv) for z in (q, k, v))
        q = q.view(b, t, self.heads, self.head_dim)  # [B, T, N, D]
        k = k.view(b, t, self.kv_heads, self.head_dim)  # [B, T, G, D]
        v = v.view(b, t, self.kv_heads, self.head_dim)  # [B, T, G, D]
        if self.q_norm is not None and self.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        q = rotate(q.transpose(1, 2), cos, sin)  # [B, N, T, D]
        k = rotate(k.transpose(1, 2), cos, sin)  # [B, G, T, D]
        v = v.transpose(1, 2)  # [B, G, T, D]
        if cache is not None:
            k, v = append_kv(cache, k, v, start)  # [B, G, S, D]
        out = attend(q, k, v, start=start, scale=self.head_dim**-0.5)  # [B, N, T, D]
        return self.output(out)  # [B, T, H]
