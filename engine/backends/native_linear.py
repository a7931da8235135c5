"""A Gated DeltaNet mixer (engine/models/qwen3_next.py) at decode in one native call (moerag_linear,
native_linear.c): `describe` reads a module once, `step` runs one token of B sequences.

Shapes: B sequences, H hidden, Hk / Hv key / value heads, Dk / Dv their dims, K conv kernel,
Ck = 2 Hk Dk + Hv Dv convolved channels.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from engine import native
from engine.models.qwen3_next import GatedDeltaNet

Layer = tuple  # (weight, scale, bias, fp8 block, GGUF format): what native.projections reads of a module


def _rows(layer: Layer, order: torch.Tensor) -> Layer:
    """The layer with its output rows taken in `order` (every format keeps a row's weights and scales on dim 0)."""
    w, scale, bias, *extra = layer
    pick = [None if t is None else t.index_select(0, order).contiguous() for t in (w, scale, bias)]
    return (*pick, *extra)


def _inputs(mixer: GatedDeltaNet) -> list[Layer]:
    """in_proj_qkv, in_proj_z, in_proj_b, in_proj_a as the kernel reads them (Qwen3.5's split layout).

    Qwen3-Next's grouped projections hold, per key head, its q, k, then its value heads' v and z rows
    (and per key head its value heads' b, then a rows): those rows are copied once into the split order.
    """
    if mixer.split:
        return [native.parts(m) for m in (mixer.in_proj_qkv, mixer.in_proj_z, mixer.in_proj_b, mixer.in_proj_a)]
    dk, width = mixer.dk, mixer.hv // mixer.hk * mixer.dv  # width: a key head's v (or z) rows
    qkvz = torch.arange(mixer.hk * (2 * dk + 2 * width)).view(mixer.hk, -1)  # [Hk, 2 Dk + 2 per Dv]
    q, k, v, z = (part.flatten() for part in qkvz.split([dk, dk, width, width], dim=1))
    b, a = (part.flatten() for part in torch.arange(2 * mixer.hv).view(mixer.hk, -1).chunk(2, dim=1))
    grouped, ba = native.parts(mixer.in_proj_qkvz), native.parts(mixer.in_proj_ba)
    return [_rows(grouped, torch.cat([q, k, v])), _rows(grouped, z), _rows(ba, b), _rows(ba, a)]


def describe(mixer: nn.Module) -> tuple[native.LinearArgs, list] | None:
    """(native.LinearArgs, the tensors it points into, to keep alive) for a GatedDeltaNet, or None
    when it is another module or a projection is in a layout the kernels do not read (fp16)."""
    if not isinstance(mixer, GatedDeltaNet):
        return None
    layers = [*_inputs(mixer), native.parts(mixer.out_proj)]
    if not all(native.supports(w, fmt) for w, *_, fmt in layers):
        return None
    projs, keep = native.projections(layers)
    kernel = mixer.conv1d.weight.shape[-1]
    conv = mixer.conv1d.weight.float().reshape(mixer.conv_dim, kernel).contiguous()  # [Ck, K]
    dt_bias, a_log = mixer.dt_bias.float().contiguous(), mixer.A_log.float().contiguous()  # [Hv] each
    norm = mixer.norm.scale().contiguous()  # [Dv]
    args = native.LinearArgs(
        key_heads=mixer.hk, value_heads=mixer.hv, key_dim=mixer.dk, value_dim=mixer.dv, kernel=kernel, proj=projs,
        conv=conv.data_ptr(), dt_bias=dt_bias.data_ptr(), a_log=a_log.data_ptr(), norm=norm.data_ptr(),
        eps=mixer.norm.eps,
    )  # fmt: skip
    return args, [projs, keep, conv, dt_bias, a_log, norm]


def step(
    args: native.LinearArgs, x: torch.Tensor, cache: list[torch.Tensor], *, lib: ctypes.CDLL | None = None
) -> torch.Tensor:
    """One decode step of the mixer `args` describes: x [B, H] (normed) -> [B, H] fp32. The cache
    entry [conv inputs [B, Ck, K - 1], state [B, Hv, Dk, Dv]], both fp32, is updated in place."""
    lib = lib or native.library()
    conv, state = cache
    assert conv.dtype == state.dtype == torch.float32 and conv.is_contiguous() and state.is_contiguous()
    assert conv.shape[0] == state.shape[0] == x.shape[0]
    x = x.float().contiguous()
    out = torch.empty((x.shape[0], args.proj[4].n), dtype=torch.float32)  # [B, H]
    status = lib.moerag_linear(
        ctypes.byref(args), x.shape[0], x.data_ptr(), conv.data_ptr(), state.data_ptr(), out.data_ptr()
    )
    native._check(status, "moerag_linear")
    return out
