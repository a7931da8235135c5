"""The products x @ W^T the engine runs on every weight, in any layout of kernels/formats.py.

Shapes: M rows of activations, N outputs, K inputs.
`matmul` runs decode-sized products (M <= SMALL_M) on CPU in the native kernels, which read each
weight once; larger ones (prefill) dequantize to fp32 and use torch's GEMM: this CPU has no bf16
or int8 matrix instructions, and fp32 GEMM is the fastest it has.
"""

from __future__ import annotations

import torch

from engine import native
from kernels.formats import Format
from kernels.formats import dequantize as dequantize_reference

SMALL_M = 16  # rows of activations up to which the native kernels beat dequantize + GEMM


def dequantize(
    w: torch.Tensor, scale: torch.Tensor | None, group: int | None = None, fmt: Format | None = None
) -> torch.Tensor:
    """A weight [N, K..] -> fp32 [N, K]: the native kernel on CPU, else plain torch. `group`: fp8's
    block; `fmt`: the layout when the dtype does not say it (GGUF blocks)."""
    if w.dim() == 2 and native.supports(w, fmt) and native.available():
        return native.dequantize(w, scale, group=group, fmt=fmt)
    return dequantize_reference(w, scale, group, fmt)


def matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor | None = None,
    group: int | None = None,
    fmt: Format | None = None,
) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N] in x's dtype, for any layout above (float weights: scale None;
    fp8: `group` is its input block; GGUF blocks: `fmt` is their format)."""
    quantized = scale is not None or fmt is not None
    if x.device.type != "cpu":
        return x @ (dequantize(w, scale, group, fmt).to(x.dtype) if quantized else w).T
    if x.shape[0] <= SMALL_M and native.supports(w, fmt) and native.available():
        return native.gemv(x.float(), w, scale, group=group, fmt=fmt).to(x.dtype)  # [M, N]
    if not quantized and w.dtype == x.dtype == torch.float32:
        return x @ w.T
    return (x.float() @ dequantize(w, scale, group, fmt).T).to(x.dtype)  # [M, N]


def linear(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    group: int | None = None,
    fmt: Format | None = None,
) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) -> [..., N]: the forward of every Linear, float or quantized."""
    y = matmul(x.reshape(-1, x.shape[-1]), w, scale, group, fmt)  # [M, N]
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], y.shape[-1])
