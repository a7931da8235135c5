"""Fused MoE experts: y[t] = sum_k w[t,k] * W2_e (silu(G_e x_t) * U_e x_t), e = ids[t,k].

Shapes: T tokens, H hidden, I expert width, E experts, K per token, S = T*K slots, N outputs.
Weights are stacked: w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I]. Quantized weights
are dequantized inside the loops: int8 per output channel (w [E, N, Kd] int8, scale [E, N]);
int4 group-wise (w [E, N, Kd/2] uint8, two inputs per byte, low nibble first; scale_zero
[E, G, N, 2] with w = (q - 8) * scale + zero, the engine's int4 arithmetic).

Data flow, many tokens (grouped GEMM over the aligned slots, see kernels.align):
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

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.align import align

QUANTS = (None, "int8", "int4")
DECODE_MAX_TOKENS = 8


@triton.jit
def _load_w(w_ptr, s_ptr, e, rows, cols, N, KD, G, row_mask, col_mask, QUANT: tl.constexpr, GROUP: tl.constexpr):
    """A [len(cols), len(rows)] tile of expert e's weight w[e, rows, cols]^T, dequantized to fp32.

    int8: the per-row scale is applied by the caller after the dot (it factors out of the sum).
    """
    mask = col_mask[:, None] & row_mask[None, :]
    if QUANT == 2:  # int4
        byte = tl.load(w_ptr + e * N * (KD // 2) + rows[None, :] * (KD // 2) + cols[:, None] // 2, mask=mask, other=0)
        q = ((byte.to(tl.int32) >> ((cols[:, None] % 2) * 4)) & 15).to(tl.float32)
        g = cols[:, None] // GROUP
        sz = s_ptr + ((e * G + g) * N + rows[None, :]) * 2
        scale = tl.load(sz, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(sz + 1, mask=mask, other=0.0).to(tl.float32)
        return (q - 8.0) * scale + zero
    w = tl.load(w_ptr + e * N * KD + rows[None, :] * KD + cols[:, None], mask=mask, other=0)
    return w.to(tl.float32)


@triton.jit
def _row_scale(s_ptr, e, rows, N, row_mask, QUANT: tl.constexpr):
    if QUANT == 1:
        return tl.load(s_ptr + e * N + rows, mask=row_mask, other=0.0).to(tl.float32)
    return tl.full(rows.shape, 1.0, tl.float32)


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, s_ptr, act_ptr, sorted_ptr, block_expert_ptr, total_ptr,
    H, I, G, K_SLOTS, S,
    QUANT: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
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
        wg = _load_w(w_ptr, s_ptr, e, n, kk, 2 * I, H, G, n_mask, k_mask, QUANT, GROUP)  # [BK, BN]
        wu = _load_w(w_ptr, s_ptr, e, I + n, kk, 2 * I, H, G, n_mask, k_mask, QUANT, GROUP)
        acc_g += tl.dot(a, wg)
        acc_u += tl.dot(a, wu)
    acc_g *= _row_scale(s_ptr, e, n, 2 * I, n_mask, QUANT)[None, :]
    acc_u *= _row_scale(s_ptr, e, I + n, 2 * I, n_mask, QUANT)[None, :]
    h = acc_g * tl.sigmoid(acc_g) * acc_u  # silu(gate) * up
    tl.store(act_ptr + rows_m[:, None] * I + n[None, :], h, mask=n_mask[None, :])


@triton.jit
def _down_kernel(
    act_ptr, w_ptr, s_ptr, out_ptr, weights_ptr, sorted_ptr, block_expert_ptr, total_ptr,
    H, I, G, S,
    QUANT: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
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
        acc += tl.dot(a, _load_w(w_ptr, s_ptr, e, n, kk, H, I, G, n_mask, k_mask, QUANT, GROUP))
    acc *= _row_scale(s_ptr, e, n, H, n_mask, QUANT)[None, :]
    acc *= tl.load(weights_ptr + slot, mask=valid, other=0.0).to(tl.float32)[:, None]  # routing weight
    tl.store(out_ptr + slot[:, None] * H + n[None, :], acc, mask=valid[:, None] & n_mask[None, :])


@triton.jit
def _decode_gate_up_kernel(
    x_ptr, w_ptr, s_ptr, act_ptr, ids_ptr, H, I, G, K_SLOTS,
    QUANT: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
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
        acc_g += tl.sum(a[:, None] * _load_w(w_ptr, s_ptr, e, n, kk, 2 * I, H, G, n_mask, k_mask, QUANT, GROUP), 0)
        acc_u += tl.sum(a[:, None] * _load_w(w_ptr, s_ptr, e, I + n, kk, 2 * I, H, G, n_mask, k_mask, QUANT, GROUP), 0)
    acc_g *= _row_scale(s_ptr, e, n, 2 * I, n_mask, QUANT)
    acc_u *= _row_scale(s_ptr, e, I + n, 2 * I, n_mask, QUANT)
    tl.store(act_ptr + slot * I + n, acc_g * tl.sigmoid(acc_g) * acc_u, mask=n_mask)


@triton.jit
def _decode_down_kernel(
    act_ptr, w_ptr, s_ptr, out_ptr, weights_ptr, ids_ptr, H, I, G,
    QUANT: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    slot, pn = tl.program_id(0), tl.program_id(1)
    e = tl.load(ids_ptr + slot)
    n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < H
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_mask = kk < I
        a = tl.load(act_ptr + slot * I + kk, mask=k_mask, other=0.0)
        acc += tl.sum(a[:, None] * _load_w(w_ptr, s_ptr, e, n, kk, H, I, G, n_mask, k_mask, QUANT, GROUP), 0)
    acc *= _row_scale(s_ptr, e, n, H, n_mask, QUANT) * tl.load(weights_ptr + slot).to(tl.float32)
    tl.store(out_ptr + slot * H + n, acc, mask=n_mask)


def _quant_code(quant: str | None) -> int:
    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {QUANTS}, got {quant!r}")
    return QUANTS.index(quant)


def _check(x, w13, w2, weights, ids, w13_scale, w2_scale, quant) -> tuple[int, int, int, int]:
    """(H, I, E, group size) after checking every shape against the others."""
    if x.dim() != 2 or ids.shape != weights.shape or ids.dim() != 2 or ids.shape[0] != x.shape[0]:
        raise ValueError(f"expected x [T, H], weights and ids [T, K]; got {tuple(x.shape)}, "
                         f"{tuple(weights.shape)}, {tuple(ids.shape)}")
    h = x.shape[1]
    e, two_i = w13.shape[0], w13.shape[1]
    i = two_i // 2
    packed = 2 if quant == "int4" else 1
    if w13.shape != (e, 2 * i, h // packed) or w2.shape != (e, h, i // packed):
        raise ValueError(f"w13 must be [E, 2I, H{'/2' if packed == 2 else ''}] and w2 [E, H, I{'/2' if packed == 2 else ''}];"
                         f" got {tuple(w13.shape)} and {tuple(w2.shape)} for H={h}")
    if quant is None:
        return h, i, e, 1
    if w13_scale is None or w2_scale is None:
        raise ValueError(f"quant={quant!r} needs w13_scale and w2_scale")
    if quant == "int8":
        if w13_scale.shape != (e, 2 * i) or w2_scale.shape != (e, h):
            raise ValueError("int8 scales must be w13_scale [E, 2I] and w2_scale [E, H]")
        return h, i, e, 1
    g13, g2 = w13_scale.shape[1], w2_scale.shape[1]
    if w13_scale.shape != (e, g13, 2 * i, 2) or w2_scale.shape != (e, g2, h, 2) or h // g13 != i // g2 or h % g13 or i % g2:
        raise ValueError("int4 scales must be [E, G, N, 2] with the same group size for both weights")
    return h, i, e, h // g13


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    quant: str | None = None,
    block_m: int = 16,
) -> torch.Tensor:
    """x [T, H] -> [T, H] in x's dtype (see the module docstring for the weight layouts)."""
    code = _quant_code(quant)
    h, i, e, group = _check(x, w13, w2, weights, ids, w13_scale, w2_scale, quant)
    t, k = ids.shape
    s = t * k
    x = x.contiguous()
    flat_ids = ids.reshape(-1).to(torch.int32).contiguous()
    flat_w = weights.reshape(-1).float().contiguous()
    s13 = w13_scale if w13_scale is not None else x
    s2 = w2_scale if w2_scale is not None else x
    g13 = w13_scale.shape[1] if quant == "int4" else 1
    g2 = w2_scale.shape[1] if quant == "int4" else 1
    out = torch.zeros((s, h), dtype=torch.float32, device=x.device)  # [S, H] one row per slot
    bn, bk = 32, 32
    if t == 0:
        return torch.zeros_like(x)
    if t <= DECODE_MAX_TOKENS:
        act = torch.empty((s, i), dtype=torch.float32, device=x.device)  # [S, I]
        _decode_gate_up_kernel[(s, triton.cdiv(i, bn))](x, w13, s13, act, flat_ids, h, i, g13, k,
                                                        QUANT=code, GROUP=group, BLOCK_N=bn, BLOCK_K=bk)
        _decode_down_kernel[(s, triton.cdiv(h, bn))](act, w2, s2, out, flat_w, flat_ids, h, i, g2,
                                                     QUANT=code, GROUP=group, BLOCK_N=bn, BLOCK_K=bk)
    else:
        al = align(ids, e, block_m)
        blocks = al.block_expert.numel()
        act = torch.empty((al.sorted_slots.numel(), i), dtype=torch.float32, device=x.device)  # [P, I]
        _gate_up_kernel[(blocks, triton.cdiv(i, bn))](x, w13, s13, act, al.sorted_slots, al.block_expert, al.total,
                                                      h, i, g13, k, s, QUANT=code, GROUP=group, BLOCK_M=block_m,
                                                      BLOCK_N=bn, BLOCK_K=bk)
        _down_kernel[(blocks, triton.cdiv(h, bn))](act, w2, s2, out, flat_w, al.sorted_slots, al.block_expert, al.total,
                                                   h, i, g2, s, QUANT=code, GROUP=group, BLOCK_M=block_m,
                                                   BLOCK_N=bn, BLOCK_K=bk)
    return out.view(t, k, h).sum(dim=1).to(x.dtype)  # the K slots summed in fp32


def dequantize(w: torch.Tensor, scale: torch.Tensor | None, quant: str | None) -> torch.Tensor:
    """Stacked weights [E, N, Kd] (int4: [E, N, Kd/2]) -> fp32 [E, N, Kd]."""
    if quant is None:
        return w.float()
    if quant == "int8":
        return w.float() * scale.float()[:, :, None]
    q = torch.stack([w & 15, w >> 4], dim=-1).reshape(w.shape[0], w.shape[1], -1).float()  # [E, N, Kd]
    groups = scale.shape[1]
    s, z = scale[..., 0].float(), scale[..., 1].float()  # [E, G, N]
    qg = q.view(q.shape[0], q.shape[1], groups, -1)  # [E, N, G, g]
    return ((qg - 8) * s.transpose(1, 2)[..., None] + z.transpose(1, 2)[..., None]).reshape(q.shape)


def fused_moe_reference(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    quant: str | None = None,
    block_m: int = 16,
) -> torch.Tensor:
    """Plain torch, one expert at a time, fp32 throughout; the same arguments."""
    _quant_code(quant)
    _check(x, w13, w2, weights, ids, w13_scale, w2_scale, quant)
    a13, a2 = dequantize(w13, w13_scale, quant), dequantize(w2, w2_scale, quant)  # [E, 2I, H], [E, H, I]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
    for e in range(a13.shape[0]):
        tok, slot = torch.where(ids == e)  # [n], [n]
        if tok.numel() == 0:
            continue
        gate, up = (x[tok].float() @ a13[e].T).chunk(2, dim=-1)  # [n, I] each
        y = (F.silu(gate) * up) @ a2[e].T  # [n, H]
        out.index_add_(0, tok, y * weights[tok, slot, None].float())
    return out.to(x.dtype)


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [E, N, Kd] float -> (packed [E, N, Kd/2] uint8, scale_zero [E, G, N, 2] fp32), the
    engine's asymmetric int4 (w ~= (q - 8) * scale + zero) in this kernel's layout. One expert
    at a time, so the fp32 temporaries stay one expert's size (a DeepSeek-V3 layer is 22 GB in bf16)."""
    e, n, kd = w.shape
    packed = torch.empty((e, n, kd // 2), dtype=torch.uint8, device=w.device)
    scale_zero = torch.empty((e, kd // group, n, 2), dtype=torch.float32, device=w.device)
    for x in range(e):
        wg = w[x].float().view(n, kd // group, group)  # [N, G, g]
        low, high = wg.amin(-1), wg.amax(-1)  # [N, G]
        scale = ((high - low) / 15).clamp(min=1e-12)
        q = torch.round((wg - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).view(n, kd)
        packed[x] = q[:, 0::2] | (q[:, 1::2] << 4)
        scale_zero[x] = torch.stack([scale, low + 8 * scale], dim=-1).transpose(0, 1)
    return packed, scale_zero


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [E, N, Kd] float -> (q int8, scale [E, N] fp32), per output channel."""
    scale = (w.float().abs().amax(-1) / 127).clamp(min=1e-12)  # [E, N]
    return torch.round(w.float() / scale[..., None]).clamp(-127, 127).to(torch.int8), scale
