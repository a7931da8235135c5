"""Rotary position embeddings: inverse frequencies per `rope_type`, cos/sin tables, rotation.

Shapes: T tokens, D rotary dims (D/2 frequencies), N heads.
Matches transformers' `modeling_rope_utils` for default, linear, llama3 and yarn.
"""

from __future__ import annotations

import math

import torch

from engine.config import RopeArgs
from engine.errors import UnsupportedArchitectureError


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # [D/2]


def _linear(args: RopeArgs, dim: int) -> tuple[torch.Tensor, float]:
    return _base_inv_freq(args.theta, dim) / float(args.params["factor"]), 1.0


def _llama3(args: RopeArgs, dim: int) -> tuple[torch.Tensor, float]:
    p = args.params
    inv_freq = _base_inv_freq(args.theta, dim)
    factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
    old_len = float(p["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by the factor, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled), 1.0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction (DeepSeek's `yarn_get_mscale`)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(args: RopeArgs, dim: int) -> tuple[torch.Tensor, float]:
    p = args.params
    original = int(p.get("original_max_position_embeddings") or args.max_position_embeddings)
    factor = p.get("factor")
    if factor is None:
        factor = args.max_position_embeddings / original
    factor = float(factor)
    attention_factor = p.get("attention_factor")
    mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # The rotary dim at which a wavelength completes `rotations` turns over the original context.
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(args.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)  # [D/2]
    pos_freqs = args.theta ** (torch.arange(0, dim, 2).float() / dim)  # [D/2]
    extrapolate = 1 - ramp  # 1 keeps the original frequency (high-frequency dims), 0 interpolates
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention_factor)


ROPE_TYPES = {
    "default": lambda args, dim: (_base_inv_freq(args.theta, dim), 1.0),
    "linear": _linear,
    "llama3": _llama3,
    "yarn": _yarn,
}


class Rope:
    """cos/sin tables for positions; `attention_factor` scales both (YaRN), as in transformers."""

    def __init__(self, args: RopeArgs, dim: int) -> None:
        if args.rope_type not in ROPE_TYPES:
            raise UnsupportedArchitectureError(
                f"RoPE type {args.rope_type!r} is not supported; supported: {sorted(ROPE_TYPES)}."
            )
        # Built on the CPU even when the module around it is built on the meta device.
        with torch.device("cpu"):
            self.inv_freq, self.attention_factor = ROPE_TYPES[args.rope_type](args, dim)
        self._tables: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def span(
        self, start: int, length: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, D] for positions start..start+length-1, sliced from tables kept per
        dtype and device (doubled when outgrown): a decode step then costs two slices instead of
        the ~90 us of torch ops that computing them took (measured on a 2-core VM)."""
        cos, sin = self._tables.get((dtype, device), (None, None))
        if cos is None or cos.shape[0] < start + length:
            size = max(256, start + length, 2 * (0 if cos is None else cos.shape[0]))
            cos, sin = self.cos_sin(torch.arange(size, device=device), dtype)
            self._tables[(dtype, device)] = (cos, sin)
        return cos[start : start + length], sin[start : start + length]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, D] in `dtype` (frequencies repeated in two halves)."""
        inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[:, None].float() * inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotation (Llama/Qwen layout): x [B, N, T, D], cos/sin [T, R]. With R < D (partial
    RoPE: GLM, MiniMax, Qwen3-Next) the first R dims rotate and the rest pass through."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return torch.cat([rotate(x[..., :rotary], cos, sin), x[..., rotary:]], dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # [B, N, T, D]
    return x * cos + rotated * sin


def rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pairwise rotation (DeepSeek layout, pairs (x0, x1), (x2, x3) ...), output de-interleaved.

    The output order (all even results, then all odd) matches transformers; attention only sees
    q.k, so any order applied to both q and k gives the same scores.
    """
    half = x.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]  # [T, D/2]
    even, odd = x[..., 0::2], x[..., 1::2]  # [B, N, T, D/2]
    return torch.cat((even * cos - odd * sin, odd * cos + even * sin), dim=-1)  # [B, N, T, D]
