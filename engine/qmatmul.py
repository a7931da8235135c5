"""Weight-only int8 / int4 quantization, and the products x @ W^T the engine runs on every weight.

Shapes: M rows of activations, N outputs, K inputs, G = K / group groups; leading dims (stacked
experts [E, N, K]) are carried through. Layouts, shared with engine/native.c:
  int8  q [.., N, K] int8, scales [.., N] fp32; w = q * scale (per output channel).
  int4  packed [.., N, K/2] uint8 in chunks of 32 weights (byte j: weight j in the low nibble,
        weight 16 + j in the high one), scale_zero [.., N, G, 2] bf16; w = (q - 8) * scale + zero.
`matmul` runs decode-sized products (M <= SMALL_M) on CPU in the native kernels, which read each
weight once; larger ones (prefill) dequantize to fp32 and use torch's GEMM: this CPU has no bf16
or int8 matrix instructions, and fp32 GEMM is the fastest it has.
"""

from __future__ import annotations

import torch

from engine import native

CHUNK_ELEMENTS = 1 << 22  # rows are quantized in slices of ~16 MB of fp32 temporaries
SMALL_M = 16  # rows of activations up to which the native kernels beat dequantize + GEMM
INT4_GROUPS = (32, 64, 128, 256)  # multiples of the 32-weight chunk


def _row_chunks(rows: int, k: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] float -> (q [..., N, K] int8, scales [..., N] fp32), per output channel.

    Rows are independent, so they are done a slice at a time: the fp32 temporaries stay ~16 MB
    instead of several copies of the whole weight (a stacked expert tensor, the output head).
    """
    rows = w.reshape(-1, w.shape[-1])  # [R, K]
    q = torch.empty(rows.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(rows.shape[0], dtype=torch.float32, device=w.device)
    for part in [] if w.is_meta else _row_chunks(*rows.shape):
        w32 = rows[part].float()  # [r, K]
        scales[part] = (w32.abs().amax(dim=-1) / 127.0).clamp(min=1e-12)  # [r]
        q[part] = torch.round(w32 / scales[part, None]).clamp(-127, 127)
    return q.view(w.shape), scales.view(w.shape[:-1])


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] float -> (packed [..., N, K/2] uint8, scale_zero [..., N, K/group, 2] bf16).

    Asymmetric per group of `group` inputs: scale = (max - min) / 15, zero = min + 8 * scale,
    q = round((w - min) / scale). Done a slice of rows at a time straight into the packed
    tensors, so quantizing a stacked expert tensor needs only ~16 MB of temporaries.
    K must be a multiple of `group`, itself a multiple of 32.
    """
    k = w.shape[-1]
    rows = w.reshape(-1, k)  # [R, K]
    packed = torch.empty((rows.shape[0], k // 2), dtype=torch.uint8, device=w.device)  # [R, K/2]
    scale_zero = torch.empty((rows.shape[0], k // group, 2), dtype=torch.bfloat16, device=w.device)  # [R, G, 2]
    for part in [] if w.is_meta else _row_chunks(*rows.shape):
        wg = rows[part].float().view(-1, k // group, group)  # [r, G, g]
        low, high = wg.amin(dim=-1), wg.amax(dim=-1)  # [r, G]
        scale = ((high - low) / 15).clamp(min=1e-12)  # [r, G]
        q = torch.round((wg - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)  # [r, G, g]
        packed[part] = pack_int4(q.view(-1, k))
        scale_zero[part] = torch.stack([scale, low + 8 * scale], dim=-1)
    return packed.view(*w.shape[:-1], k // 2), scale_zero.view(*w.shape[:-1], k // group, 2)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [..., K] (0..15) -> [..., K/2] uint8: in each chunk of 32, byte j = q[j] | q[16 + j] << 4."""
    halves = q.to(torch.uint8).reshape(*q.shape[:-1], q.shape[-1] // 32, 2, 16)  # [..., K/32, 2, 16]
    return (halves[..., 0, :] | (halves[..., 1, :] << 4)).reshape(*q.shape[:-1], q.shape[-1] // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] uint8 -> q [..., K] uint8 (0..15); the inverse of pack_int4."""
    chunks = packed.reshape(*packed.shape[:-1], packed.shape[-1] // 16, 1, 16)  # [..., K/32, 1, 16]
    return torch.cat([chunks & 15, chunks >> 4], dim=-2).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def dequantize_reference(w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Any weight layout above -> fp32 [..., N, K], in plain torch."""
    if scale is None:
        return w.float()
    if w.dtype == torch.int8:
        return w.float() * scale.float()[..., None]
    q = unpack_int4(w).float()  # [..., N, K]
    groups = scale.shape[-2]
    s, z = scale[..., 0].float(), scale[..., 1].float()  # [..., N, G]
    wg = (q.view(*q.shape[:-1], groups, -1) - 8) * s[..., None] + z[..., None]  # [..., N, G, g]
    return wg.view(q.shape)


def dequantize(w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """A weight [N, K..] -> fp32 [N, K]: the native kernel on CPU, else plain torch."""
    if w.dim() == 2 and native.supports(w) and native.available():
        return native.dequantize(w, scale)
    return dequantize_reference(w, scale)


def matmul(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N] in x's dtype, for any layout above (float weights: scale None)."""
    if x.device.type != "cpu":
        return x @ (w if scale is None else dequantize(w, scale).to(x.dtype)).T
    if x.shape[0] <= SMALL_M and native.supports(w) and native.available():
        return native.gemv(x.float(), w, scale).to(x.dtype)  # [M, N]
    if scale is None and w.dtype == x.dtype == torch.float32:
        return x @ w.T
    return (x.float() @ dequantize(w, scale).T).to(x.dtype)  # [M, N]


def linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) -> [..., N]: the forward of every Linear, float or quantized."""
    y = matmul(x.reshape(-1, x.shape[-1]), w, scale)  # [M, N]
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], y.shape[-1])
