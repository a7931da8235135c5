"""The fused CPU decode step: consecutive softmax-routed MoE decoder blocks in one native call.

Per token and block, the module-by-module path costs ~0.3 ms of Python and torch dispatch
around ~1 ms of kernels, and even one call per block cost ~65 us of Python per block on a
2-core VM (measured on the bench model); one call per token for the whole stack removes it.
The plan (which blocks run fused, with which cache pointers) is built once per KV cache and
rebuilt when any module, parameter or buffer is assigned anywhere (torch's registration hooks)
or the model is converted (`CausalLM._apply`).
Shapes: B sequences (one new token each), H hidden.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module

from engine import native
from engine.layers import Attention, fp32_copy
from engine.moe import SoftmaxRouter, SparseMoe


def _args(block: nn.Module) -> native.BlockArgs | None:
    """The block's native description, built once per set of weights; None if it does not fit."""
    attn, mlp = block.self_attn, block.mlp
    if not (isinstance(attn, Attention) and isinstance(mlp, SparseMoe) and isinstance(mlp.gate, SoftmaxRouter)):
        return None
    experts = mlp.experts
    if experts.backend != "cpu" or mlp.gate.weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    key = (mlp.gate.weight, experts.gate_up_proj, experts.down_proj, attn.q_proj.weight, attn.o_proj.weight)
    cached = block.__dict__.get("_native_block")
    if cached is not None and all(a is b for a, b in zip(cached[0], key, strict=True)):
        return cached[1]
    projections = attn._native_projections()
    args = None
    weights = (experts.gate_up_proj, experts.down_proj, mlp.gate.weight)
    if projections is not None and experts.gate_up_proj.dtype == experts.down_proj.dtype and all(
        native.supports(w) for w in weights
    ):
        s13, s2 = getattr(experts, "gate_up_scale", None), getattr(experts, "down_scale", None)
        fmt, _, group = native._format(experts.gate_up_proj, s13)
        router, keep = native.projections([(mlp.gate.weight, None, None)])
        norms = [fp32_copy(m, "weight") for m in (block.input_layernorm, block.post_attention_layernorm)]
        qk = [None if m is None else fp32_copy(m, "weight") for m in (attn.q_norm, attn.k_norm)]
        args = native.BlockArgs(
            heads=attn.heads, kv_heads=attn.kv_heads, head_dim=attn.head_dim, experts=mlp.gate.weight.shape[0],
            topk=mlp.gate.top_k, renormalize=int(mlp.gate.renormalize), fmt=fmt, inter=experts.gate_up_proj.shape[1] // 2,
            group=group, attn=projections[0], qnorm=native._ptr(qk[0]), knorm=native._ptr(qk[1]),
            in_norm=norms[0].data_ptr(), post_norm=norms[1].data_ptr(),
            qk_eps=0.0 if attn.q_norm is None else attn.q_norm.eps, eps=block.input_layernorm.eps,
            router=router, w13=experts.gate_up_proj.data_ptr(), s13=native._ptr(s13),
            w2=experts.down_proj.data_ptr(), s2=native._ptr(s2),
        )  # fmt: skip
        args._keep = (projections, router, keep, norms, qk, s13, s2)  # what the pointers point into
    block.__dict__["_native_block"] = (key, args)
    return args


_generation = 0  # bumped whenever a module, parameter or buffer is assigned, anywhere


def changed(*_: object) -> None:
    """Forget every fused plan (weights may have moved)."""
    global _generation
    _generation += 1


_module.register_module_module_registration_hook(changed)
_module.register_module_parameter_registration_hook(changed)
_module.register_module_buffer_registration_hook(changed)


class KVCache(list):
    """The per-layer caches [[k, v], ...] of one generation, with the fused plan built for them."""

    plan: tuple[int, list] | None = None  # (generation, [native.Stack or a block index, ...])


def _plan(layers: nn.ModuleList, cache: KVCache) -> list:
    """Runs of fusable blocks as native.Stack, other blocks by index."""
    if cache.plan is not None and cache.plan[0] == _generation:
        return cache.plan[1]
    steps: list = []
    run: list[tuple[int, native.BlockArgs]] = []  # consecutive fusable blocks: (index, args)

    def close_run() -> None:
        if run:
            steps.append(native.Stack([args for _, args in run], [cache[i] for i, _ in run], run[0][0]))
            run.clear()

    for i, block in enumerate(layers):
        args = None
        if block.post_attention_layernorm.eps == block.input_layernorm.eps and cache[i][0].dtype == torch.float32:
            args = _args(block)
        if args is None:
            close_run()
            steps.append(i)
        else:
            run.append((i, args))
    close_run()
    cache.plan = (_generation, steps)
    return steps


def run_blocks(
    layers: nn.ModuleList, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: list, start: int
) -> torch.Tensor:
    """x [B, T, H] through every block, as few native calls as fit (one per run of fusable
    blocks at decode on CPU), the others module by module."""
    if not (
        isinstance(cache, KVCache)
        and x.shape[1] == 1
        and x.shape[0] <= 16
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and native.available()
    ):
        for i, block in enumerate(layers):
            x = block(x, cos, sin, cache[i], start)
        return x
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    shape = x.shape
    for step in _plan(layers, cache):
        if isinstance(step, int):
            x = layers[step](x.view(shape), cos, sin, cache[step], start)
        else:
            attn = layers[step.first].self_attn
            x = native.blocks(step, x.view(shape[0], -1), position=start, cos=cos, sin=sin, scale=attn.head_dim**-0.5)
    return x.view(shape)
