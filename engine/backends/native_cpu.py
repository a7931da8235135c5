"""The native CPU decode step: a CausalLM's blocks at decode in as few native calls as fit.

Per token and block, the module-by-module path costs ~0.3 ms of Python and torch dispatch
around ~1 ms of kernels, and even one call per block cost ~65 us of Python per block on a
2-core VM (measured on the bench model). So runs of blocks that native.blocks reads whole
(attention + softmax-routed experts) go in one call per token; every other block gets native
norms and, where the kernel reads its projections, native attention, with its MLP as a module.
Shapes: B sequences (one new token each), H hidden, D head dim.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from engine import native
from engine.layers import Attention, RMSNorm
from engine.moe import SoftmaxRouter, SparseMoe
from engine.qmatmul import SMALL_M
from kernels.formats import FORMATS, Format

if TYPE_CHECKING:
    from engine.decoder import KVCache


@dataclass
class _Attention:
    """What native.attention reads of one Attention module (`keep`: the tensors `projs` points into)."""

    projs: ctypes.Array  # q, k, v, o as native.Proj
    keep: list
    heads: int
    kv_heads: int
    head_dim: int
    q_norm: torch.Tensor | None  # [D] fp32 (Qwen3), else None
    k_norm: torch.Tensor | None
    qk_eps: float


@dataclass
class _Block:
    """One decoder block's native parts: its norms [H] in fp32, its attention when native.attention
    reads it, and its whole description when native.blocks does (`keep`: what that points into)."""

    in_norm: torch.Tensor
    in_eps: float
    post_norm: torch.Tensor
    post_eps: float
    attention: _Attention | None
    fused: native.BlockArgs | None
    keep: list


def _fp32(norm: RMSNorm) -> torch.Tensor:
    return norm.scale().contiguous()  # the weight itself when it already is fp32 and not offset


def _attention(attn: nn.Module) -> _Attention | None:
    """attn for native.attention, or None when it is another kind of attention (DeepSeek's latent
    one, OLMoE's whole-projection q/k norms and clipping, GLM's partial rotary), a projection is in a layout the kernels do not read (fp16), or q, k and v differ in
    layout (format or group: e.g. one stayed float under int4; they share one prepared input)."""
    if (
        not isinstance(attn, Attention)
        or not attn.qk_norm_per_head
        or attn.clip_qkv is not None
        or attn.rotary_dim != attn.head_dim
    ):
        return None  # the kernel norms q and k per head, clips nothing and rotates whole heads
    modules = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
    # (weight, scale, bias, fp8 block, GGUF format): what a module stores beyond its dtype
    layers = [
        (m.weight, getattr(m, "scale", None), m.bias, getattr(m, "block", None), getattr(m, "format", None))
        for m in modules
    ]
    if not all(native.supports(w, fmt) for w, *_, fmt in layers):
        return None
    if len({_input_kind(*layer) for layer in layers[:3]}) > 1:
        return None
    projs, keep = native.projections(layers)
    norms = [None if n is None else _fp32(n) for n in (attn.q_norm, attn.k_norm)]
    eps = 0.0 if attn.q_norm is None else attn.q_norm.eps
    return _Attention(projs, keep, attn.heads, attn.kv_heads, attn.head_dim, *norms, eps)


def _input_kind(
    w: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None, block: int | None, fmt: Format | None
) -> tuple[int, int] | str:
    """What q, k and v must share to read one prepared input: (format, group), or "gguf" for any mix of
    block types, which share one preparation (Q4_K_M files keep attn_v in Q6_K)."""
    code, _, group = native.layout(w, scale, block, fmt)
    return "gguf" if FORMATS[code].block else (code, group)


def _fused(
    block: nn.Module, attention: _Attention | None, in_norm: torch.Tensor, post_norm: torch.Tensor
) -> tuple[native.BlockArgs | None, list]:
    """(native.BlockArgs, the tensors it points into) for a block native.blocks reads whole, else (None, [])."""
    mlp = block.mlp
    if attention is None or not (isinstance(mlp, SparseMoe) and isinstance(mlp.gate, SoftmaxRouter)):
        return None, []
    experts, router = mlp.experts, mlp.gate
    w13, w2 = experts.gate_up_proj, experts.down_proj  # [E, 2I, H], [E, H, I]
    f13, f2 = getattr(experts, "gate_up_format", None), getattr(experts, "down_format", None)  # GGUF blocks
    if (
        experts.backend != "cpu"
        or block.input_layernorm.eps != block.post_attention_layernorm.eps  # the kernel takes one eps
        or router.weight.dtype not in (torch.float32, torch.bfloat16)
        or w13.dtype != w2.dtype
        or not (native.supports(w13, f13) and native.supports(w2, f2) and native.supports(router.weight))
    ):
        return None, []
    s13, s2 = getattr(experts, "gate_up_scale", None), getattr(experts, "down_scale", None)
    fp8_block = getattr(experts, "block", None)  # fp8 experts carry their block
    fmt, _, group = native.layout(w13, s13, fp8_block, f13)
    fmt2, _, group2 = native.layout(w2, s2, fp8_block, f2)  # Q4_K_M files keep down in another type
    router_proj, router_keep = native.projections([(router.weight, None, None)])
    a = attention
    args = native.BlockArgs(
        heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim, experts=router.weight.shape[0], topk=router.top_k,
        renormalize=int(router.renormalize), fmt=fmt, inter=w13.shape[1] // 2, group=group, fmt2=fmt2,
        group2=group2, attn=a.projs,
        qnorm=native.address(a.q_norm), knorm=native.address(a.k_norm), in_norm=in_norm.data_ptr(),
        post_norm=post_norm.data_ptr(), qk_eps=a.qk_eps, eps=block.input_layernorm.eps, router=router_proj,
        w13=w13.data_ptr(), s13=native.address(s13), w2=w2.data_ptr(), s2=native.address(s2),
    )  # fmt: skip
    return args, [router_proj, router_keep, w13, s13, w2, s2]


def _describe(block: nn.Module) -> _Block:
    """A decoder.Block's native parts, from its weights as they are now."""
    in_norm, post_norm = _fp32(block.input_layernorm), _fp32(block.post_attention_layernorm)
    attention = _attention(block.self_attn)
    fused, keep = _fused(block, attention, in_norm, post_norm)
    eps = (block.input_layernorm.eps, block.post_attention_layernorm.eps)
    return _Block(in_norm, eps[0], post_norm, eps[1], attention, fused, keep)


class NativeCPU:
    """The decode backend of one CausalLM on CPU, built from its weights as they are now.

    It points into those weights, so the model drops it when they change (CausalLM.weights_changed).
    The plan for one KV cache (runs of blocks as native.Stack, which point into the cache) is
    kept on the cache, tagged with the backend that built it.
    """

    def __init__(self, layers: nn.ModuleList, *, fuse: bool = True) -> None:
        self.layers = layers  # decoder.Block each
        self.fuse = fuse  # False: every block by itself, the reference for the fused block kernel
        self.blocks = [_describe(block) for block in layers]

    @staticmethod
    def fits(x: torch.Tensor) -> bool:
        """Whether this backend runs the step of x [B, T, H]: decode (T = 1) of a few fp32 rows on CPU."""
        return (
            x.shape[1] == 1
            and x.shape[0] <= SMALL_M
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and native.available()
        )

    def step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """x [B, 1, H] through every block at position `start` -> [B, 1, H]; each block's new key
        and value go into its cache. cos, sin [1, D]."""
        shape = x.shape
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        x = x.view(shape[0], -1)  # [B, H]
        for part in self._plan(cache):
            if isinstance(part, native.Stack):
                scale = self.blocks[part.first].attention.head_dim ** -0.5  # a model's blocks share D
                x = native.blocks(part, x, position=start, cos=cos, sin=sin, scale=scale)
            else:
                x = self._block(part, x, cos, sin, cache[part], start)
        return x.view(shape)

    def _plan(self, cache: KVCache) -> list[native.Stack | int]:
        """Runs of whole-block fits as native.Stack, other blocks by index: built once per cache."""
        if cache.plan is not None and cache.plan[0] is self:
            return cache.plan[1]
        steps: list[native.Stack | int] = []
        run: list[int] = []  # consecutive blocks native.blocks reads whole

        def close_run() -> None:
            if run:
                steps.append(native.Stack([self.blocks[i].fused for i in run], [cache[i] for i in run], run[0]))
                run.clear()

        for i, block in enumerate(self.blocks):
            if self.fuse and block.fused is not None and cache[i][0].dtype == torch.float32:
                run.append(i)
            else:
                close_run()
                steps.append(i)
        close_run()
        cache.plan = (self, steps)
        return steps

    def _block(
        self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: list[torch.Tensor], start: int
    ) -> torch.Tensor:
        """x [B, H] + attn(norm(x)), then + mlp(norm(x)) for block i, as decoder.Block does, with
        native norms, native attention where it reads the block's, and the MLP as a module."""
        module, block, b = self.layers[i], self.blocks[i], x.shape[0]
        h = native.rmsnorm(x, block.in_norm, block.in_eps)  # [B, H]
        a = block.attention
        if a is not None and cache[0].dtype == torch.float32:
            attn = native.attention(
                h, a.projs, heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim, position=start,
                q_norm=a.q_norm, k_norm=a.k_norm, eps=a.qk_eps, cos=cos, sin=sin, k_cache=cache[0],
                v_cache=cache[1], scale=a.head_dim**-0.5,
            )  # fmt: skip
        else:
            attn = module.self_attn(h.view(b, 1, -1), cos, sin, cache, start).view(b, -1)  # [B, H]
        x = x + attn
        h = native.rmsnorm(x, block.post_norm, block.post_eps)  # [B, H]
        return x + module.mlp(h.view(b, 1, -1)).view(b, -1)
