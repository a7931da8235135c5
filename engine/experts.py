"""Expert computation backends: y = sum_k w[t,k] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = ids[t,k].

Shapes: T tokens, K experts per token, E experts, H hidden, I expert width.
Weights are stacked: w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I].
A backend is a function (x [T,H], w13, w2, weights [T,K], ids [T,K], *, w13_scale=None,
w2_scale=None, group=None, w13_format=None, w2_format=None) -> [T,H]; scales mark quantized
weights in a layout of kernels/formats.py (int8, int4, fp8), `group` is fp8's input block, and
the formats name layouts the dtype does not (GGUF blocks; w13 and w2 may differ, as in Q4_K_M
files). The sum over the K slots is in fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine import native
from engine.qmatmul import SMALL_M, matmul
from kernels.formats import Format

ExpertsFn = Callable[..., torch.Tensor]


def _expert_mlp(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    s13: torch.Tensor | None,
    s2: torch.Tensor | None,
    group: int | None,
    formats: tuple[Format | None, Format | None],
) -> torch.Tensor:
    gate, up = matmul(x, w13, s13, group, formats[0]).chunk(2, dim=-1)  # [n, I] each
    return matmul(F.silu(gate) * up, w2, s2, group, formats[1])  # [n, H]


def reference(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    group: int | None = None,
    w13_format: Format | None = None,
    w2_format: Format | None = None,
) -> torch.Tensor:
    """Plain torch, one expert at a time over every expert: the readable definition.

    With int8 experts, w13_scale [E, 2I] and w2_scale [E, H] are their per-channel scales; with
    int4 experts (packed uint8 weights) they are group scales and zeros [E, N, G, 2]; with fp8
    ones, block scales [E, N, ceil(K/group)] (see kernels/formats.py).
    """
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
    for e in range(w13.shape[0]):
        tok, slot = torch.where(ids == e)  # [n], [n]
        if tok.numel() == 0:
            continue
        scales = _row(w13_scale, e), _row(w2_scale, e)
        y = _expert_mlp(x[tok], w13[e], w2[e], *scales, group, (w13_format, w2_format))  # [n, H]
        out.index_add_(0, tok, y.float() * weights[tok, slot, None].float())
    return out.to(x.dtype)


def cpu_sorted(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    group: int | None = None,
    w13_format: Format | None = None,
    w2_format: Format | None = None,
) -> torch.Tensor:
    """Sort the T*K slots by expert once, then run only the experts that received tokens.

    A few tokens (decode) go to the native kernel in one call; otherwise one host sync (the
    per-expert counts), which is free on CPU, and each active expert sees one contiguous block
    of rows, so its weights are streamed from memory exactly once.
    """
    t, k = ids.shape
    formats = (w13_format, w2_format)
    if (
        x.device.type == "cpu"
        and t <= SMALL_M
        and native.supports(w13, w13_format)
        and native.supports(w2, w2_format)
        and native.available()
    ):
        out = native.moe(
            x, w13, w2, weights, ids, w13_scale=w13_scale, w2_scale=w2_scale, group=group, fmt=w13_format,
            w2_format=w2_format,
        )  # fmt: skip
        return out.to(x.dtype)
    flat = ids.reshape(-1)  # [T*K]
    order = torch.argsort(flat, stable=True)  # [T*K]
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()  # E ints
    tok = order // k  # [T*K] token of each sorted slot
    xs = x[tok]  # [T*K, H]
    ys = torch.empty(xs.shape, dtype=torch.float32, device=x.device)  # [T*K, H]
    begin = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        ys[begin : begin + n] = _expert_mlp(
            xs[begin : begin + n], w13[e], w2[e], _row(w13_scale, e), _row(w2_scale, e), group, formats
        )
        begin += n
    ys *= weights.reshape(-1)[order, None].float()  # [T*K, H]
    out = torch.zeros((t, x.shape[1]), dtype=torch.float32, device=x.device)  # [T, H]
    out.index_add_(0, tok, ys)
    return out.to(x.dtype)


def triton_fused(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    group: int | None = None,
    w13_format: Format | None = None,
    w2_format: Format | None = None,
) -> torch.Tensor:
    """The Triton kernels (kernels/experts.py): float, int8 and int4 experts, read in the layouts of
    kernels/formats.py as the engine stores them; no host sync, so a decode step that uses it can
    be captured in a CUDA graph. fp8 and GGUF experts, which they do not read, take the sorted torch path."""
    from kernels import fused_moe

    if group is not None or w13_format is not None or w2_format is not None:
        return cpu_sorted(
            x, w13, w2, weights, ids, w13_scale=w13_scale, w2_scale=w2_scale, group=group,
            w13_format=w13_format, w2_format=w2_format,
        )  # fmt: skip
    return fused_moe(x, w13, w2, weights, ids, w13_scale=w13_scale, w2_scale=w2_scale)


def _row(scale: torch.Tensor | None, e: int) -> torch.Tensor | None:
    return None if scale is None else scale[e]


def default_backend(device: torch.device) -> str:
    """triton on CUDA when Triton is installed, else the sorted CPU path."""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "cpu"
        return "triton"
    return "cpu"


EXPERT_BACKENDS: dict[str, ExpertsFn] = {
    "reference": reference,
    "cpu": cpu_sorted,
    "triton": triton_fused,
}
