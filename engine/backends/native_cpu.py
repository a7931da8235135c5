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
from engine.layers import MLP, Attention, RMSNorm
from engine.moe import RoutedMoe, SharedExpertMoe, SigmoidGroupRouter, SoftmaxRouter, SparseMoe, stored
from engine.qmatmul import SMALL_M
from kernels.formats import FORMATS, Format

if TYPE_CHECKING:
    from engine.decoder import KVCache


@dataclass
class _Attention:
    """What the kernels read of one attention module (`keep`: the tensors `projs` points into).
    `plain` ones (whole heads rotated, no gate, window or sinks) also run through native.attention."""

    projs: ctypes.Array  # q, k, v, o as native.Proj
    keep: list
    heads: int
    kv_heads: int
    head_dim: int
    q_norm: torch.Tensor | None  # [D] fp32 (Qwen3), else None
    k_norm: torch.Tensor | None
    qk_eps: float
    rotary: int  # the first dims of each head RoPE turns
    qgate: bool  # q_proj gives each head D query then D gate values (Qwen3-Next's gated attention)
    window: int  # a sliding window (gpt-oss), 0 for none
    sinks: torch.Tensor | None  # [N] fp32 (gpt-oss)
    qk_whole: bool  # q_norm / k_norm over all heads at once [N D] / [G D] (OLMoE, MiniMax-M2)
    clip: float  # q, k and v clipped to +-clip (OLMoE), 0 for none

    @property
    def plain(self) -> bool:
        return (
            self.rotary == self.head_dim
            and not (self.qgate or self.window or self.qk_whole or self.clip)
            and self.sinks is None
        )


@dataclass
class _Block:
    """One decoder block's native parts: its norms [H] in fp32, its attention when the kernels read
    it, and its whole description when native.blocks does (`keep`: what that points into)."""

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
    """attn for the kernels, or None when it is another kind of attention (DeepSeek's latent one,
    Llama 4's chunks, ...), a projection is in a layout the kernels do not
    read (fp16), or q, k and v differ in layout (format or group: e.g. one stayed float under int4;
    they share one prepared input)."""
    from engine.models.gpt_oss import SinkAttention  # the models import the decoder, which imports this
    from engine.models.qwen3_next import GatedAttention

    if isinstance(attn, Attention):
        rotary, qgate, window, sinks = attn.rotary_dim, False, 0, None
    elif isinstance(attn, SinkAttention):
        rotary, qgate, window, sinks = attn.head_dim, False, attn.window or 0, attn.sinks.float().contiguous()
    elif isinstance(attn, GatedAttention):
        rotary, qgate, window, sinks = attn.rotary_dim, True, 0, None
    else:
        return None
    layers = [native.parts(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)]
    if not all(native.supports(w, fmt) for w, *_, fmt in layers):
        return None
    if len({_input_kind(*layer) for layer in layers[:3]}) > 1:
        return None
    projs, keep = native.projections(layers)
    q_norm, k_norm = (getattr(attn, name, None) for name in ("q_norm", "k_norm"))
    norms = [None if n is None else _fp32(n) for n in (q_norm, k_norm)]
    eps = 0.0 if q_norm is None else q_norm.eps
    whole = isinstance(attn, Attention) and q_norm is not None and not attn.qk_norm_per_head
    clip = float(getattr(attn, "clip_qkv", None) or 0.0)
    return _Attention(
        projs, keep + [sinks], attn.heads, attn.kv_heads, attn.head_dim, *norms, eps, rotary, qgate, window, sinks,
        whole, clip,
    )  # fmt: skip


def _input_kind(
    w: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None, block: int | None, fmt: Format | None
) -> tuple[int, int] | str:
    """What q, k and v must share to read one prepared input: (format, group), or "gguf" for any mix of
    block types, which share one preparation (Q4_K_M files keep attn_v in Q6_K)."""
    code, _, group = native.layout(w, scale, block, fmt)
    return "gguf" if FORMATS[code].block else (code, group)


def _mixer(block: nn.Module, attention: _Attention | None) -> tuple[dict, list] | None:
    """The BlockArgs fields of a block's token mixer and what they point into, or None when the
    kernels do not read it: attention, or a Gated DeltaNet (Qwen3-Next, Qwen3.5)."""
    from engine.backends import native_linear
    from engine.models.qwen3_next import GatedDeltaNet

    if isinstance(block.self_attn, GatedDeltaNet):
        described = native_linear.describe(block.self_attn)
        if described is None:
            return None
        args, keep = described
        return {"linear": ctypes.pointer(args)}, [args, keep]
    a = attention
    if a is None:
        return None
    fields = dict(
        heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim, attn=a.projs, qnorm=native.address(a.q_norm),
        knorm=native.address(a.k_norm), qk_eps=a.qk_eps, rotary=a.rotary, qgate=int(a.qgate), window=a.window,
        sinks=native.address(a.sinks), qk_whole=int(a.qk_whole), clip=a.clip,
    )  # fmt: skip
    return fields, []


def _dense(mlp: MLP, gate: nn.Module | None) -> tuple[ctypes.Array, list] | None:
    """BlockArgs.shared for a dense SwiGLU MLP ({gate_proj, up_proj, down_proj, its sigmoid gate or
    none}) and what it points into, or None when a projection is in a layout the kernels do not read."""
    modules = [mlp.gate_proj, mlp.up_proj, mlp.down_proj] + ([] if gate is None else [gate])
    layers = [native.parts(m) for m in modules]
    if not all(native.supports(w, fmt) for w, *_, fmt in layers):
        return None
    projs, keep = native.projections(layers)
    if gate is None:  # the fourth Proj stays zeroed: no gate
        projs, keep = (native.Proj * 4)(*projs), [projs, keep]
    return projs, keep


def _router(mlp: nn.Module) -> tuple[dict, list] | None:
    """(the router's BlockArgs fields, what they point into) for the routings the kernel knows: a
    softmax over all experts (Qwen, Mixtral), gpt-oss's over the top-k logits with a bias (the same
    thing, renormalized), DeepSeek-V3's grouped sigmoid (GLM-4.5, dots1, ...); else None."""
    from engine.models.gpt_oss import BiasRouter

    router = getattr(mlp, "gate", None) or getattr(mlp, "router", None)
    keep: list = []
    if isinstance(router, BiasRouter):
        fields, bias = {"renormalize": 1}, router.bias
    elif isinstance(router, SoftmaxRouter):
        fields, bias = {"renormalize": int(router.renormalize)}, None
    elif isinstance(router, SigmoidGroupRouter) and router.topk_group <= 64:  # route_grouped's limit
        correction = router.e_score_correction_bias.float().contiguous()
        fields, bias = {
            "routing": 1, "renormalize": int(router.renormalize), "n_group": router.n_group,
            "topk_group": router.topk_group, "scaling": router.scaling, "correction": correction.data_ptr(),
        }, None  # fmt: skip
        keep.append(correction)
    else:
        return None
    if router.weight.dtype not in (torch.float32, torch.bfloat16) or not native.supports(router.weight):
        return None
    proj, more = native.projections([(router.weight, None, bias)])
    fields.update(experts=router.weight.shape[0], topk=router.top_k, router=proj)
    return fields, keep + [proj, more]


def _mlp(mlp: nn.Module) -> tuple[dict, list] | None:
    """The BlockArgs fields of a block's MLP and what they point into, or None when the kernels do
    not read it: routed experts (with gpt-oss's biases and activation) behind a router `_router`
    knows, plus a shared expert (gated as in Qwen2-MoE, or not), or a dense MLP alone."""
    from engine.models.gpt_oss import GptOssMoe

    if isinstance(mlp, MLP):
        shared = _dense(mlp, None)
        return None if shared is None else ({"shared": shared[0]}, [shared])
    if not isinstance(mlp, (SparseMoe, SharedExpertMoe, RoutedMoe, GptOssMoe)):
        return None
    routing = _router(mlp)
    experts = mlp.experts
    (w13, s13, block, f13), (w2, s2, _, f2) = (
        stored(experts, "gate_up"),
        stored(experts, "down"),
    )  # [E, 2I, H], [E, H, I]
    if (
        routing is None
        or experts.backend != "cpu"
        or w13.dtype != w2.dtype
        or not (native.supports(w13, f13) and native.supports(w2, f2))
    ):
        return None
    fields, keep = routing
    fmt, _, group = native.layout(w13, s13, block, f13)
    fmt2, _, group2 = native.layout(w2, s2, block, f2)  # Q4_K_M files keep down in another type
    fields.update(
        fmt=fmt, inter=w13.shape[1] // 2, group=group, fmt2=fmt2, group2=group2, w13=w13.data_ptr(),
        s13=native.address(s13), w2=w2.data_ptr(), s2=native.address(s2),
    )  # fmt: skip
    keep += [w13, s13, w2, s2]
    if isinstance(mlp, GptOssMoe):
        b13, b2 = mlp.gate_up_bias.float().contiguous(), mlp.down_bias.float().contiguous()
        fields.update(act=1, alpha=mlp.alpha, limit=mlp.limit, b13=b13.data_ptr(), b2=b2.data_ptr())
        keep += [b13, b2]
    shared = None
    if isinstance(mlp, SharedExpertMoe):
        shared = _dense(mlp.shared_expert, mlp.shared_expert_gate)
    elif isinstance(mlp, RoutedMoe) and mlp.shared_experts is not None:
        shared = _dense(mlp.shared_experts, None)
    else:
        return fields, keep
    if shared is None:
        return None
    fields["shared"] = shared[0]
    return fields, keep + [shared]


def _fused(
    block: nn.Module, attention: _Attention | None, in_norm: torch.Tensor, post_norm: torch.Tensor
) -> tuple[native.BlockArgs | None, list]:
    """(native.BlockArgs, the tensors it points into) for a block native.blocks reads whole, else (None, [])."""
    if block.input_layernorm.eps != block.post_attention_layernorm.eps:  # the kernel takes one eps
        return None, []
    mixer, mlp = _mixer(block, attention), _mlp(block.mlp)
    if mixer is None or mlp is None:
        return None, []
    args = native.BlockArgs(
        hidden=in_norm.shape[0], in_norm=in_norm.data_ptr(), post_norm=post_norm.data_ptr(),
        eps=block.input_layernorm.eps, **mixer[0], **mlp[0],
    )  # fmt: skip
    return args, [mixer[1], mlp[1]]


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
        dims = {b.attention.head_dim for b in self.blocks if b.attention is not None}
        self.scale = min(dims, default=1) ** -0.5  # attention's; a model's attention blocks share D

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
                x = native.blocks(part, x, position=start, cos=cos, sin=sin, scale=self.scale)
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
        if a is not None and a.plain and cache[0].dtype == torch.float32:
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
