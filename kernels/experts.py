"""Fused MoE experts: y[t] = sum_k w[t,k] * W2_e (silu(G_e x_t) * U_e x_t), e = ids[t,k].

Shapes: T tokens, H hidden, I expert width, E experts, K per token, S = T*K slots, N outputs,
Kd inputs of a weight, G groups. Weights are stacked: w13 [E, 2I, H] (gate rows, then up rows),
w2 [E, H, I], in any layout of kernels/formats.py, the one the engine stores, told apart by dtype:
float (fp32, bf16, fp16), int8 (q [E, N, Kd] int8, scale [E, N] fp32) or int4 (packed
[E, N, Kd/2] uint8 in chunks of 32 inputs, scale_zero [E, N, G, 2] bf16). Quantized weights are
dequantized inside the loops, tile by tile.

Data flow, many tokens (grouped GEMM over the aligned slots, see kernels/alignment.py):
    slots sorted by expert into BLOCK_M blocks; per (block, N tile):
    GEMM 1: gather x rows of the block's tokens [BM, H] @ w13[e] gate and up tiles -> fp32
            accumulators; epilogue silu(gate) * up -> act [P, I]
    GEMM 2: act rows [BM, I] @ w2[e]^T tile -> fp32, times the slot's routing weight
            (epilogue) -> per-slot outputs [S, H] (sentinel rows skipped)
    sum over the K slots of each token in fp32 -> [T, H]
A handful of tokens (decode) skips the sort: one program per (slot, N tile) reads its expert id
and runs matrix-vector products; the weight reads dominate either way.
No step copies anything to the host, so a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.alignment import align
from kernels.formats import CHUNK, INT4, INT8, Format, dequantize, format_of

DECODE_MAX_TOKENS = 8
_QUANT = {INT8: 1, INT4: 2}  # the kernels' QUANT switch; float weights are 0
_HALF_CHUNK: tl.constexpr = tl.constexpr(CHUNK // 2)  # bytes per packed int4 chunk


@triton.jit
def _load_w(w_ptr, s_ptr, e, rows, cols, N, KD, row_mask, col_mask, QUANT: tl.constexpr, GROUP: tl.constexpr):
    """A [len(cols), len(rows)] tile of expert e's weight w[e, rows, cols]^T, dequantized to fp32.

    int8: the per-row scale is applied by the caller after the dot (it factors out of the sum).
    int4: input c sits in byte (c // 32) * 16 + c % 16 of its row, in the high nibble when
    c % 32 >= 16; its scale and zero are scale_zero[e, row, c // GROUP].
    """
    mask = col_mask[:, None] & row_mask[None, :]
    e = e.to(tl.int64)  # E * N * KD passes 2**31 on the largest models (DeepSeek-V3: 7.5e9)
    if QUANT == 2:  # int4
        byte_col = (cols // (2 * _HALF_CHUNK)) * _HALF_CHUNK + cols % _HALF_CHUNK  # [BK]
        byte = tl.load(w_ptr + (e * N + rows[None, :]) * (KD // 2) + byte_col[:, None], mask=mask, other=0)
        shift = (cols[:, None] // _HALF_CHUNK) % 2 * 4  # 0: low nibble, 4: high nibble
        q = ((byte.to(tl.int32) >> shift) & 15).to(tl.float32)  # [BK, BN]
        sz = s_ptr + ((e * N + rows[None, :]) * (KD // GROUP) + cols[:, None] // GROUP) * 2
        scale = tl.load(sz, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(sz + 1, mask=mask, other=0.0).to(tl.float32)
        return (q - 8.0) * scale + zero
    w = tl.load(w_ptr + (e * N + rows[None, :]) * KD + cols[:, None], mask=mask, other=0)
    return w.to(tl.float32)


@triton.jit
def _row_scale(s_ptr, e, rows, N, row_mask, QUANT: tl.constexpr):
    if QUANT == 1:
        return tl.load(s_ptr + e * N + rows, mask=row_mask, other=0.0).to(tl.float32)
    return tl.full(rows.shape, 1.0, tl.float32)


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, s_ptr, act_ptr, sorted_ptr, block_expert_ptr, total_ptr,
    H, I, K_SLOTS, S,
    QUANT: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    b, pn = tl.program_id(0), tl.program_id(1)
    if b * BLOCK_M >= tl.load(total_ptr):
        return
    e = tl.load(block_expert_ptr + b)
    rows_m = b * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(sorted_ptr + rows_m)  # [BM]; padding holds the sentinel S
    valid = slot < S
    tok = slot // K_SLOTS
    n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < I
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_mask = kk < H
        a = tl.load(x_ptr + tok[:, None] * H + kk[None, :], mask=valid[:, None] & k_mask[None, :], other=0.0)
        a = a.to(tl.float32)
        wg = _load_w(w_ptr, s_ptr, e, n, kk, 2 * I, H, n_mask, k_mask, QUANT, GROUP)  # [BK, BN]
        wu = _load_w(w_ptr, s_ptr, e, I + n, kk, 2 * I, H, n_mask, k_mask, QUANT, GROUP)
        acc_g += tl.dot(a, wg)
        acc_u += tl.dot(a, wu)
    acc_g *= _row_scale(s_ptr, e, n, 2 * I, n_mask, QUANT)[None, :]
    acc_u *= _row_scale(s_ptr, e, I + n, 2 * I, n_mask, QUANT)[None, :]
    h = acc_g * tl.sigmoid(acc_g) * acc_u  # silu(gate) * up
    tl.store(act_ptr + rows_m[:, None] * I + n[None, :], h, mask=n_mask[None, :])


@triton.jit
def _down_kernel(
    act_ptr, w_ptr, s_ptr, out_ptr, weights_ptr, sorted_ptr, block_expert_ptr, total_ptr,
    H, I, S,
    QUANT: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    b, pn = tl.program_id(0), tl.program_id(1)
    if b * BLOCK_M >= tl.load(total_ptr):
        return
    e = tl.load(block_expert_ptr + b)
    rows_m = b * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(sorted_ptr + rows_m)
    valid = slot < S
    n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < H
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_mask = kk < I
        a = tl.load(act_ptr + rows_m[:, None] * I + kk[None, :], mask=valid[:, None] & k_mask[None, :], other=0.0)
        acc += tl.dot(a, _load_w(w_ptr, s_ptr, e, n, kk, H, I, n_mask, k_mask, QUANT, GROUP))
    acc *= _row_scale(s_ptr, e, n, H, n_mask, QUANT)[None, :]
    acc *= tl.load(weights_ptr + slot, mask=valid, other=0.0).to(tl.float32)[:, None]  # routing weight
    tl.store(out_ptr + slot[:, None] * H + n[None, :], acc, mask=valid[:, None] & n_mask[None, :])


@triton.jit
def _decode_gate_up_kernel(
    x_ptr, w_ptr, s_ptr, act_ptr, ids_ptr, H, I, K_SLOTS,
    QUANT: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    slot, pn = tl.program_id(0), tl.program_id(1)
    e = tl.load(ids_ptr + slot)
    tok = slot // K_SLOTS
    n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < I
    acc_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_mask = kk < H
        a = tl.load(x_ptr + tok * H + kk, mask=k_mask, other=0.0).to(tl.float32)  # [BK]
        acc_g += tl.sum(a[:, None] * _load_w(w_ptr, s_ptr, e, n, kk, 2 * I, H, n_mask, k_mask, QUANT, GROUP), 0)
        acc_u += tl.sum(a[:, None] * _load_w(w_ptr, s_ptr, e, I + n, kk, 2 * I, H, n_mask, k_mask, QUANT, GROUP), 0)
    acc_g *= _row_scale(s_ptr, e, n, 2 * I, n_mask, QUANT)
    acc_u *= _row_scale(s_ptr, e, I + n, 2 * I, n_mask, QUANT)
    tl.store(act_ptr + slot * I + n, acc_g * tl.sigmoid(acc_g) * acc_u, mask=n_mask)


@triton.jit
def _decode_down_kernel(
    act_ptr, w_ptr, s_ptr, out_ptr, weights_ptr, ids_ptr, H, I,
    QUANT: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    slot, pn = tl.program_id(0), tl.program_id(1)
    e = tl.load(ids_ptr + slot)
    n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < H
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_mask = kk < I
        a = tl.load(act_ptr + slot * I + kk, mask=k_mask, other=0.0)
        acc += tl.sum(a[:, None] * _load_w(w_ptr, s_ptr, e, n, kk, H, I, n_mask, k_mask, QUANT, GROUP), 0)
    acc *= _row_scale(s_ptr, e, n, H, n_mask, QUANT) * tl.load(weights_ptr + slot).to(tl.float32)
    tl.store(out_ptr + slot * H + n, acc, mask=n_mask)


class _Problem(NamedTuple):
    quant: int  # the kernels' QUANT switch
    hidden: int  # H
    width: int  # I
    experts: int  # E
    group13: int  # inputs per int4 group of w13 (CHUNK for other formats)
    group2: int  # the same for w2


def _format(w13: torch.Tensor, w2: torch.Tensor) -> Format | None:
    """The quantized format both weights share, None when both are float."""
    if w13.dtype.is_floating_point and w2.dtype.is_floating_point:
        return None
    fmt = format_of(w13)
    if fmt not in _QUANT or format_of(w2) is not fmt:
        raise ValueError(
            f"w13 and w2 must both be float, int8 or int4 (packed uint8) weights as kernels/formats.py defines them; "
            f"got {w13.dtype} and {w2.dtype}"
        )
    return fmt


def _int4_scale_fits(scale: torch.Tensor, e: int, n: int, k: int) -> bool:
    """scale_zero [E, N, G, 2] for a weight of K inputs, its group (K / G) a multiple of CHUNK."""
    if scale.dim() != 4 or scale.shape[:2] != (e, n) or scale.shape[3] != 2 or k % scale.shape[2]:
        return False
    return (k // scale.shape[2]) % CHUNK == 0


def _check_scales(fmt: Format | None, w13_scale, w2_scale, e: int, h: int, i: int) -> None:
    if fmt is None:
        if w13_scale is not None or w2_scale is not None:
            raise ValueError("w13_scale and w2_scale belong to int8 or int4 weights; float weights take none")
        return
    if w13_scale is None or w2_scale is None:
        raise ValueError(f"{fmt.name} weights need w13_scale and w2_scale ({fmt.scale}, see kernels/formats.py)")
    got = f"got {tuple(w13_scale.shape)} and {tuple(w2_scale.shape)}"
    if fmt is INT8 and (w13_scale.shape != (e, 2 * i) or w2_scale.shape != (e, h)):
        raise ValueError(f"int8 scales must be w13_scale [E, 2I] = {(e, 2 * i)} and w2_scale [E, H] = {(e, h)}; {got}")
    if fmt is INT4 and not (_int4_scale_fits(w13_scale, e, 2 * i, h) and _int4_scale_fits(w2_scale, e, h, i)):
        raise ValueError(
            f"int4 scales must be scale_zero [E, N, G, 2], the group (inputs / G) a multiple of {CHUNK}, as "
            f"kernels.formats.quantize_int4 makes them: w13_scale [{e}, {2 * i}, G, 2] and w2_scale [{e}, {h}, G, 2]; "
            f"{got}"
        )


def _check(x, w13, w2, weights, ids, w13_scale, w2_scale) -> _Problem:
    """The problem's sizes after checking every shape against the others."""
    if x.dim() != 2 or ids.shape != weights.shape or ids.dim() != 2 or ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"expected x [T, H], weights and ids [T, K]; got {tuple(x.shape)}, {tuple(weights.shape)}, "
            f"{tuple(ids.shape)}"
        )
    fmt = _format(w13, w2)
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(
            f"w13 and w2 must be stacked experts [E, N, inputs]; got {tuple(w13.shape)} and {tuple(w2.shape)}"
        )
    per_element = 1 if fmt is None else fmt.per_element  # inputs per stored element
    h, e, i = x.shape[1], w13.shape[0], w13.shape[1] // 2
    inputs13, inputs2 = w13.shape[2] * per_element, w2.shape[2] * per_element
    if (*w13.shape[:2], inputs13) != (e, 2 * i, h) or (*w2.shape[:2], inputs2) != (e, h, i):
        packed = " (int4: the last dimension halved, two inputs per byte)" if fmt is INT4 else ""
        raise ValueError(
            f"w13 must be [E, 2I, H] and w2 [E, H, I]{packed}; got {tuple(w13.shape)} and {tuple(w2.shape)} for H={h}"
        )
    _check_scales(fmt, w13_scale, w2_scale, e, h, i)
    if fmt is None:
        return _Problem(0, h, i, e, CHUNK, CHUNK)
    return _Problem(_QUANT[fmt], h, i, e, fmt.group(w13, w13_scale), fmt.group(w2, w2_scale))


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block_m: int = 16,
) -> torch.Tensor:
    """x [T, H] -> [T, H] in x's dtype. The weights' format comes from their dtype (module
    docstring); int8 and int4 weights need their scales, in kernels/formats.py's layouts."""
    p = _check(x, w13, w2, weights, ids, w13_scale, w2_scale)
    h, i = p.hidden, p.width
    t, k = ids.shape
    s = t * k
    if t == 0:
        return torch.zeros_like(x)
    x = x.contiguous()
    flat_ids = ids.reshape(-1).to(torch.int32).contiguous()
    flat_w = weights.reshape(-1).float().contiguous()
    s13 = w13_scale if w13_scale is not None else x  # float weights: a pointer the kernels never read
    s2 = w2_scale if w2_scale is not None else x
    out = torch.zeros((s, h), dtype=torch.float32, device=x.device)  # [S, H] one row per slot
    bn, bk = 32, 32
    if t <= DECODE_MAX_TOKENS:
        act = torch.empty((s, i), dtype=torch.float32, device=x.device)  # [S, I]
        _decode_gate_up_kernel[(s, triton.cdiv(i, bn))](
            x, w13, s13, act, flat_ids, h, i, k, QUANT=p.quant, GROUP=p.group13, BLOCK_N=bn, BLOCK_K=bk
        )
        _decode_down_kernel[(s, triton.cdiv(h, bn))](
            act, w2, s2, out, flat_w, flat_ids, h, i, QUANT=p.quant, GROUP=p.group2, BLOCK_N=bn, BLOCK_K=bk
        )
    else:
        al = align(ids, p.experts, block_m)
        blocks = al.block_expert.numel()
        act = torch.empty((al.sorted_slots.numel(), i), dtype=torch.float32, device=x.device)  # [P, I]
        _gate_up_kernel[(blocks, triton.cdiv(i, bn))](
            x, w13, s13, act, al.sorted_slots, al.block_expert, al.total, h, i, k, s,
            QUANT=p.quant, GROUP=p.group13, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk,
        )  # fmt: skip
        _down_kernel[(blocks, triton.cdiv(h, bn))](
            act, w2, s2, out, flat_w, al.sorted_slots, al.block_expert, al.total, h, i, s,
            QUANT=p.quant, GROUP=p.group2, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk,
        )  # fmt: skip
    return out.view(t, k, h).sum(dim=1).to(x.dtype)  # the K slots summed in fp32


def fused_moe_reference(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block_m: int = 16,
) -> torch.Tensor:
    """Plain torch, one expert at a time, fp32 throughout; the same arguments. Weights are
    dequantized by kernels.formats.dequantize, the definition every backend matches."""
    _check(x, w13, w2, weights, ids, w13_scale, w2_scale)
    a13, a2 = dequantize(w13, w13_scale), dequantize(w2, w2_scale)  # [E, 2I, H], [E, H, I]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
    for e in range(a13.shape[0]):
        tok, slot = torch.where(ids == e)  # [n], [n]
        if tok.numel() == 0:
            continue
        gate, up = (x[tok].float() @ a13[e].T).chunk(2, dim=-1)  # [n, I] each
        y = (F.silu(gate) * up) @ a2[e].T  # [n, H]
        out.index_add_(0, tok, y * weights[tok, slot, None].float())
    return out.to(x.dtype)
