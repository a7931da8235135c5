"""int8 weight-only matmul: per-output-channel quantization and the CPU product that uses it.

Shapes: M rows of activations, N outputs, K inputs.
"""

from __future__ import annotations

import torch


CHUNK_ELEMENTS = 1 << 22  # rows are quantized in slices of ~16 MB of fp32 temporaries


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
    for part in [slice(None)] if w.is_meta else _row_chunks(*rows.shape):
        w32 = rows[part].float()  # [r, K]
        scales[part] = (w32.abs().amax(dim=-1) / 127.0).clamp(min=1e-12)  # [r]
        q[part] = torch.round(w32 / scales[part, None]).clamp(-127, 127)
    return q.view(w.shape), scales.view(w.shape[:-1])


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (q [N, K] * scales [N])^T -> [M, N] in x's dtype.

    torch's fused CPU kernel (`_weight_int8pack_mm`) is used for bf16 activations when K is a
    multiple of 32: measured here, it returns wrong values for K = 24 and NaN for K = 8, and
    crashed for K = 13. Elsewhere the scale is applied after a plain matmul (same result).
    """
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and q.shape[-1] % 32 == 0:
        return torch._weight_int8pack_mm(x.contiguous(), q, scales.to(x.dtype))
    return (x @ q.to(x.dtype).T) * scales.to(x.dtype)  # [M, N]


INT4_GROUPS = (32, 64, 128, 256)  # the group sizes torch's int4 CPU kernel accepts


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q [N, K] int32 in 0..15, scale_zero [K/group, N, 2] fp32).

    Asymmetric per group of `group` inputs: w ~= (q - 8) * scale + zero, with zero = min + 8 * scale
    (the layout torch's int4 CPU kernel reads). K must be a multiple of `group`.
    """
    n, k = w.shape
    q = torch.empty((n, k // group, group), dtype=torch.int32, device=w.device)  # [N, G, g]
    scale_zero = torch.empty((n, k // group, 2), dtype=torch.float32, device=w.device)  # [N, G, 2]
    for part in [slice(None)] if w.is_meta else _row_chunks(n, k):  # rows in slices, as in int8
        wg = w[part].float().view(-1, k // group, group)  # [r, G, g]
        low, high = wg.amin(dim=-1), wg.amax(dim=-1)  # [r, G]
        scale = ((high - low) / 15).clamp(min=1e-12)  # [r, G]
        q[part] = torch.round((wg - low[..., None]) / scale[..., None]).clamp(0, 15)
        scale_zero[part] = torch.stack([scale, low + 8 * scale], dim=-1)
    return q.view(n, k), scale_zero.transpose(0, 1).contiguous()  # [N, K], [G, N, 2]


def dequantize_int4(q: torch.Tensor, scale_zero: torch.Tensor) -> torch.Tensor:
    """q [N, K] (0..15), scale_zero [G, N, 2] -> w [N, K] fp32."""
    n, k = q.shape
    groups = scale_zero.shape[0]
    scale, zero = scale_zero[..., 0].T.float(), scale_zero[..., 1].T.float()  # [N, G] each
    wg = (q.view(n, groups, k // groups).float() - 8) * scale[..., None] + zero[..., None]  # [N, G, g]
    return wg.view(n, k)


def int4_fused_ok(n: int, k: int, group: int) -> bool:
    """Whether torch's int4 CPU kernel takes this shape (it raises for N % 16 != 0)."""
    return n % 16 == 0 and k % group == 0 and group in INT4_GROUPS


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] int32 (0..15) -> the kernel's packed layout [N, K/2] uint8."""
    return torch._convert_weight_to_int4pack_for_cpu(q, 8)


def int4_matmul(x: torch.Tensor, w: torch.Tensor, scale_zero: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ dequant(w)^T -> [M, N] in x's dtype.

    w is either packed [N, K/2] uint8 (fused kernel) or plain [N, K] uint8 (shapes the kernel
    refuses). The fused kernel is fast only with bf16 activations (measured: ~30 us vs ~6 ms for
    a 768x1024 weight in fp32), so activations are rounded to bf16 for it; that error is far
    below int4's own.
    """
    k = x.shape[-1]
    if w.shape[-1] * 2 == k:  # packed
        groups = scale_zero.shape[0]
        y = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), w, k // groups, scale_zero)
        return y.to(x.dtype)
    return x @ dequantize_int4(w, scale_zero).to(x.dtype).T  # [M, N]
