"""kernels.fused_moe against its torch reference: float, int8 and int4 experts, the decode path
(<= 8 tokens, no sort) and the grouped GEMM (more tokens), on awkward routings.

Tolerances: fp32 in the interpreter, the kernel and the reference differ only in summation
order: 1e-5 relative. Quantized weights are dequantized the same way on both sides, so the same
bound holds; int4 against the float weights is int4's own error, checked loosely."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from kernels import fused_moe, fused_moe_reference, quantize_int4, quantize_int8, route  # noqa: E402

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def experts(e: int, h: int, i: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(e, 2 * i, h, generator=g) * 0.2, torch.randn(e, h, i, generator=g) * 0.2


def routing(kind: str, t: int, e: int, k: int):
    g = torch.Generator().manual_seed(t * 7 + e)
    if kind == "one expert":
        ids = torch.full((t, k), e - 1) if k == 1 else torch.stack([torch.full((t,), e - 1)] + [torch.full((t,), j) for j in range(k - 1)], 1)
        return torch.rand(t, k, generator=g), ids.int()
    if kind == "two experts only":
        ids = torch.tensor([0, 2])[torch.arange(k) % 2].expand(t, k).int()  # experts 1, 3, 4, 5 get nothing
        return torch.rand(t, k, generator=g), ids
    return route(torch.randn(t, e, generator=g), top_k=k)


CASES = [  # T, E, K, H, I, routing
    (1, 4, 2, 32, 16, "random"),  # one decode token
    (3, 5, 2, 48, 24, "random"),  # decode, E=5, widths not multiples of the 32-wide tiles
    (8, 6, 1, 32, 32, "random"),  # the largest decode batch, K=1
    (9, 5, 2, 32, 16, "random"),  # the smallest grouped batch, T not a power of two
    (17, 6, 3, 64, 32, "two experts only"),  # experts with no tokens
    (12, 4, 2, 32, 16, "one expert"),  # every token's first slot on one expert
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-E{c[1]}-K{c[2]}-{c[5].replace(' ', '_')}")
@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_fused_moe_matches_the_reference(case, quant):
    t, e, k, h, i, kind = case
    w13, w2 = experts(e, h, i, seed=t)
    weights, ids = routing(kind, t, e, k)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(5))
    kwargs = {}
    if quant == "int8":
        (w13, s13), (w2, s2) = quantize_int8(w13), quantize_int8(w2)
        kwargs = dict(w13_scale=s13, w2_scale=s2, quant="int8")
    elif quant == "int4":
        (w13, s13), (w2, s2) = quantize_int4(w13, 8), quantize_int4(w2, 8)
        kwargs = dict(w13_scale=s13, w2_scale=s2, quant="int4")
    y = fused_moe(x, w13, w2, weights, ids, **kwargs)
    ref = fused_moe_reference(x, w13, w2, weights, ids, **kwargs)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_int4_stays_close_to_the_float_experts():
    g = torch.Generator().manual_seed(3)
    w13, w2 = experts(4, 64, 32)
    weights, ids = route(torch.randn(10, 4, generator=g), top_k=2)
    x = torch.randn(10, 64, generator=g)
    exact = fused_moe_reference(x, w13, w2, weights, ids)
    (q13, s13), (q2, s2) = quantize_int4(w13, 16), quantize_int4(w2, 16)
    approx = fused_moe(x, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2, quant="int4")
    # 16 levels per group of 16 Gaussian weights: about 10 % relative error through two layers.
    assert ((approx - exact).norm() / exact.norm()) < 0.15


def test_shapes_are_checked():
    w13, w2 = experts(4, 32, 16)
    with pytest.raises(ValueError, match="w13 must be"):
        fused_moe(torch.randn(2, 32), w13[:, :, :16], w2, torch.rand(2, 1), torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="needs w13_scale"):
        fused_moe(torch.randn(2, 32), w13, w2, torch.rand(2, 1), torch.zeros(2, 1, dtype=torch.int32), quant="int8")


@GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("t", [1, 8, 64, 512])
def test_gpu_matches_the_reference(dtype, tol, t):
    # bf16 keeps 8 mantissa bits: inputs and weights are rounded before an fp32 accumulation.
    w13, w2 = experts(16, 256, 128)
    weights, ids = route(torch.randn(t, 16, device="cuda"), top_k=4)
    x = torch.randn(t, 256, device="cuda", dtype=dtype)
    w13, w2 = w13.cuda().to(dtype), w2.cuda().to(dtype)
    torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids).float(),
                               fused_moe_reference(x, w13, w2, weights, ids).float(), rtol=tol, atol=tol)


@GPU
@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager():
    w13, w2 = experts(16, 256, 128)
    w13, w2 = w13.cuda().bfloat16(), w2.cuda().bfloat16()
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(4, 16, device="cuda")

    def step():
        weights, ids = route(logits, top_k=4)
        return fused_moe(x, w13, w2, weights, ids)

    eager = step()
    step()  # warm up (compiles) outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    logits.copy_(torch.randn(4, 16, device="cuda"))
    graph.replay()
    torch.testing.assert_close(captured, step())
    assert not torch.equal(eager, captured)
