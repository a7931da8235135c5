"""The native CPU kernels against plain torch: every weight layout, both builds (AVX2 and portable);
and the library's contract with Python: its ABI check, its out-of-memory status, its build key."""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from engine import native
from engine.errors import EngineError
from engine.qmatmul import matmul
from kernels.formats import (
    FORMATS,
    INT4,
    INT8,
    MXFP4,
    Q4_0,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_0,
    Format,
    pack_int4,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from kernels.formats import dequantize as dequantize_reference
from tests.engine.checkpoints import gguf_blocks

# The SIMD build rounds activations (to int16 per chunk of 32 for int8 weights, to int8 per
# weight group for int4 ones, as llama.cpp does); `expected` rounds them the same way, so every comparison is to
# fp32 summation-order error (1e-5 of the largest output). Against exact fp32 activations the
# int4 product is off by ~1 % (measured), far below int4's own rounding (~10 %).
TOLERANCE = 1e-5


@pytest.fixture(params=["simd", "portable"])
def lib(request):
    lib = native.library(scalar=request.param == "portable")
    if lib is None:
        pytest.skip("no C compiler: the engine runs on torch alone")
    if request.param == "simd" and not lib.moerag_simd():
        pytest.skip("this CPU has no AVX2: the portable build is the one in use")
    return lib


def _weights(fmt: str, shape: tuple[int, ...], group: int = 32) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = torch.randn(shape)
    if fmt == "f32":
        return w, None
    if fmt == "bf16":
        return w.to(torch.bfloat16), None
    if fmt == "fp8":  # `group` is its input block
        return quantize_fp8(w, group)
    return quantize_int8(w) if fmt == "int8" else quantize_int4(w, group)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= TOLERANCE, f"relative error {err:.2e}"


def _round_chunks(x: torch.Tensor, top: int, size: int = 32) -> torch.Tensor:
    """x [M, K] with each full chunk of `size` rounded to `top` levels of its largest magnitude."""
    full = x.shape[-1] // size * size
    chunks = x[:, :full].reshape(x.shape[0], -1, size)  # [M, K/size, size]
    step = chunks.abs().amax(dim=-1, keepdim=True) / top
    rounded = torch.round(chunks / torch.where(step > 0, step, 1)) * step
    return torch.cat([rounded.reshape(x.shape[0], full), x[:, full:]], dim=1)


def expected(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, simd: bool, block: int | None = None
) -> torch.Tensor:
    """x [M, K] @ W^T as the kernel defines it, in plain torch (`block`: fp8's)."""
    if simd and w.dtype == torch.int8:
        return _round_chunks(x, 32767) @ dequantize_reference(w, scale).T
    if simd and w.dtype == torch.uint8:  # activations rounded to int8 per weight group, zero term included
        group = w.shape[-1] * 2 // scale.shape[-2]
        return _round_chunks(x, 127, group) @ dequantize_reference(w, scale).T
    return x @ dequantize_reference(w, scale, block).T


def expected_moe(x, w13, s13, w2, s2, weights, ids, simd: bool, block: int | None = None) -> torch.Tensor:
    out = torch.zeros_like(x)
    for t, k in torch.cartesian_prod(torch.arange(ids.shape[0]), torch.arange(ids.shape[1])).tolist():
        e = int(ids[t, k])
        gate, up = expected(x[t : t + 1], w13[e], None if s13 is None else s13[e], simd, block).chunk(2, dim=-1)
        out[t] += weights[t, k] * expected(F.silu(gate) * up, w2[e], None if s2 is None else s2[e], simd, block)[0]
    return out


@pytest.mark.parametrize(
    "fmt,k,group",
    [("f32", 77, 32), ("f32", 64, 32), ("bf16", 77, 32), ("bf16", 256, 32), ("int8", 72, 32), ("int8", 13, 32), ("int8", 96, 32),
     ("int4", 32, 32), ("int4", 96, 32), ("int4", 256, 64), ("int4", 1024, 128), ("int4", 512, 256)],
)  # fmt: skip
@pytest.mark.parametrize("m", [1, 3, 16])
def test_gemv_equals_the_dequantized_product(lib, fmt: str, k: int, group: int, m: int) -> None:
    torch.manual_seed(k + m)
    w, scale = _weights(fmt, (45, k), group)
    x = torch.randn(m, k)
    _close(native.gemv(x, w, scale, lib=lib), expected(x, w, scale, bool(lib.moerag_simd())))


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_dequantize_is_exact(lib, fmt: str) -> None:
    w, scale = _weights(fmt, (19, 192), 64)
    assert torch.equal(native.dequantize(w, scale, lib=lib), dequantize_reference(w, scale))


# fp8 blocks: K and block multiples of 8 (rows four at a time in the SIMD build, the last block
# partial or whole), or not (one row at a time, scalar tails); a block wider than K.
FP8_SHAPES = [(256, 128), (96, 40), (200, 64), (77, 32), (100, 7), (24, 128)]


@pytest.mark.parametrize("k,block", FP8_SHAPES)
@pytest.mark.parametrize("m", [1, 3, 16])
def test_fp8_gemv_equals_the_dequantized_product(lib, k: int, block: int, m: int) -> None:
    # fp8 activations stay fp32: only the summation order differs from the reference.
    torch.manual_seed(k + m)
    w, scale = _weights("fp8", (45, k), block)
    x = torch.randn(m, k)
    _close(native.gemv(x, w, scale, group=block, lib=lib), x @ dequantize_reference(w, scale, block).T)


@pytest.mark.parametrize("k,block", FP8_SHAPES)
def test_fp8_dequantize_is_exact_and_reads_every_byte(lib, k: int, block: int) -> None:
    codes = torch.arange(256, dtype=torch.uint8).repeat(k)[: 19 * k].view(19, k)  # every e4m3 pattern ...
    w = codes.masked_fill((codes & 0x7F) == 0x7F, 0).view(torch.float8_e4m3fn)  # ... but NaN
    scale = torch.rand(19, -(-k // block)) + 0.5
    assert torch.equal(native.dequantize(w, scale, group=block, lib=lib), dequantize_reference(w, scale, block))


def test_int4_packing_round_trips_and_rounds_to_half_a_step() -> None:
    q = torch.randint(0, 16, (7, 96), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    w = torch.randn(48, 256)
    packed, scale_zero = quantize_int4(w, 64)
    assert packed.shape == (48, 128) and scale_zero.shape == (48, 4, 2) and scale_zero.dtype == torch.bfloat16
    s, z = scale_zero[..., 0].float(), scale_zero[..., 1].float()  # [N, G]
    # Half a step, plus the bf16 rounding of scale and zero (8-bit mantissas).
    bound = (s / 2 + (z.abs() + 8 * s) * 2**-8).repeat_interleave(64, dim=1)  # [N, K]
    assert torch.all((w - dequantize_reference(packed, scale_zero)).abs() <= bound + 1e-6)


@pytest.mark.parametrize(
    "fmt,group", [("f32", 32), ("bf16", 32), ("int8", 32), ("int4", 32), ("int4", 64), ("fp8", 48), ("fp8", 100)]
)
@pytest.mark.parametrize(
    "ids",
    [
        [[3, 1]],  # decode: one token
        [[0, 5], [5, 0], [2, 7], [7, 7]],  # experts shared between tokens; one token twice on expert 7
        [[4], [4], [4]],  # K = 1, every token on one expert
        [[6, 2, 1], [1, 2, 6], [0, 3, 5], [6, 6, 6], [2, 4, 0]],  # T = 5, experts 0..6 used, 7 idle
    ],
)
def test_moe_equals_the_reference(lib, fmt: str, group: int, ids: list[list[int]]) -> None:
    torch.manual_seed(len(ids))
    experts, hidden, width = 8, 128, 192  # int4 g64: 2 and 3 groups per row (eight at a time in the kernel)
    w13, s13 = _weights(fmt, (experts, 2 * width, hidden), group)
    w2, s2 = _weights(fmt, (experts, hidden, width), group)
    ids_t = torch.tensor(ids)
    x, weights = torch.randn(ids_t.shape[0], hidden), torch.rand(ids_t.shape)
    block = group if fmt == "fp8" else None  # fp8: 128 and 192 inputs in blocks of 48 or 100 (partial last)
    got = native.moe(x, w13, w2, weights, ids_t, w13_scale=s13, w2_scale=s2, group=block, lib=lib)
    _close(got, expected_moe(x, w13, s13, w2, s2, weights, ids_t, bool(lib.moerag_simd()), block))


@pytest.mark.parametrize("m", [1, 40])  # decode (native) and prefill (dequantize + torch GEMM)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_keeps_the_activation_dtype(m: int, dtype: torch.dtype) -> None:
    w, scale = _weights("int4", (64, 128), 32)
    x = torch.randn(m, 128).to(dtype)
    got = matmul(x, w, scale)
    assert got.dtype == dtype and got.shape == (m, 64)
    want = x.float() @ dequantize_reference(w, scale).T
    # ~1 % from the int8 activations at decode (see above), bf16's 8-bit mantissa on the output.
    assert (got.float() - want).abs().max() <= 3e-2 * want.abs().max()


def _rms(v: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    return v if weight is None else v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * weight


@pytest.mark.parametrize("position", [0, 7, 8, 37])  # the SIMD path scores 8 positions at a time
@pytest.mark.parametrize("norm,bias", [(True, False), (False, True)])  # Qwen3 (q/k norm), Qwen2 (biases)
@pytest.mark.parametrize("d", [16, 72])  # head_dim: values summed 64 channels at a time, then 8
@pytest.mark.parametrize("fmt", ["f32", "int8", "int4", "fp8"])  # int8, int4 g64: rows four at a time, as four streams
def test_attention_step_equals_the_reference(lib, position: int, norm: bool, bias: bool, d: int, fmt: str) -> None:
    torch.manual_seed(position)
    b, heads, kv_heads, hidden, smax = 2, 8, 2, 64, 40
    shapes = [(heads * d, hidden), (kv_heads * d, hidden), (kv_heads * d, hidden), (hidden, heads * d)]
    group = 40 if fmt == "fp8" else 64  # fp8: blocks of 40, the last one partial
    block = group if fmt == "fp8" else None
    weights = [(*_weights(fmt, shape, group), torch.randn(shape[0]) if bias else None, block) for shape in shapes]
    projs, _keep = native.projections(weights)  # _keep: the tensors projs points into
    q_norm, k_norm = (torch.rand(d) + 0.5, torch.rand(d) + 0.5) if norm else (None, None)
    angle = torch.rand(d // 2) * position
    cos, sin = torch.cat([angle.cos(), angle.cos()]), torch.cat([angle.sin(), angle.sin()])  # [D]
    k_cache, v_cache = torch.randn(b, kv_heads, smax, d), torch.randn(b, kv_heads, smax, d)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    x = torch.randn(b, hidden)
    got = native.attention(
        x, projs, heads=heads, kv_heads=kv_heads, head_dim=d, position=position, q_norm=q_norm, k_norm=k_norm,
        eps=1e-6, cos=cos, sin=sin, k_cache=k_cache, v_cache=v_cache, scale=d**-0.5, lib=lib,
    )  # fmt: skip

    def project(i: int, v: torch.Tensor) -> torch.Tensor:
        w, scale, bias_i, _ = weights[i]
        return expected(v, w, scale, bool(lib.moerag_simd()), block) + (0 if bias_i is None else bias_i)

    def rotate(v: torch.Tensor) -> torch.Tensor:  # half-split rotation (Llama / Qwen layout)
        half = v.shape[-1] // 2
        return v * cos + torch.cat([-v[..., half:], v[..., :half]], dim=-1) * sin

    q = rotate(_rms(project(0, x).view(b, heads, d), q_norm))
    k_want[:, :, position] = rotate(_rms(project(1, x).view(b, kv_heads, d), k_norm))
    v_want[:, :, position] = project(2, x).view(b, kv_heads, d)
    keys = k_want[:, :, : position + 1].repeat_interleave(heads // kv_heads, dim=1)  # [B, N, S, D]
    values = v_want[:, :, : position + 1].repeat_interleave(heads // kv_heads, dim=1)
    probs = torch.softmax(torch.einsum("bnd,bnsd->bns", q, keys) * d**-0.5, dim=-1)
    want = project(3, torch.einsum("bns,bnsd->bnd", probs, values).reshape(b, heads * d))
    assert torch.allclose(k_cache, k_want, rtol=1e-5, atol=TOLERANCE * float(k_want.abs().max())) and torch.equal(
        v_cache[:, :, :position], v_want[:, :, :position]
    )
    _close(got, want)


def test_the_library_agrees_with_its_python_mirrors(lib) -> None:
    assert native.abi_mismatch(lib) is None


def _mirror(name: str, fields: list[tuple]) -> type[ctypes.Structure]:
    return type(name, (ctypes.Structure,), {"_fields_": fields})


_PROJ, _BLOCK = native.Proj._fields_, native.BlockArgs._fields_
_SWAPPED = {"w13": "w2", "w2": "w13"}
_BLOCK_BYTES, _W13 = ctypes.sizeof(native.BlockArgs), native.BlockArgs.w13.offset  # 320, 144 on 64-bit machines


@pytest.mark.parametrize(
    "mirrors,formats,says",
    [
        (  # a field's type
            (_mirror("Proj", [("fmt", ctypes.c_int32), *_PROJ[1:]]), native.LinearArgs, native.BlockArgs),
            None,
            "the library has Proj.fmt (offset 0, 8 bytes) where engine/native.py has Proj.fmt (offset 0, 4 bytes)",
        ),
        (  # a field left out
            (native.Proj, native.LinearArgs, _mirror("BlockArgs", [f for f in _BLOCK if f[0] != "renormalize"])),
            None,
            (
                f"the library has BlockArgs (offset 0, {_BLOCK_BYTES} bytes) "
                f"where engine/native.py has BlockArgs (offset 0, {_BLOCK_BYTES - 8} bytes)"
            ),
        ),
        (  # two fields of one type in another order: only their names tell
            (
                native.Proj,
                native.LinearArgs,
                _mirror("BlockArgs", [(_SWAPPED.get(name, name), kind) for name, kind in _BLOCK]),
            ),
            None,
            f"the library has BlockArgs.w13 (offset {_W13}, 8 bytes) where engine/native.py has BlockArgs.w2 (offset {_W13}, 8 bytes)",
        ),
        (
            (native.Proj, native.LinearArgs),
            None,
            f"the library has BlockArgs (offset 0, {_BLOCK_BYTES} bytes) where engine/native.py has nothing",
        ),
        (
            None,
            (dataclasses.replace(INT8, name="fp8"),),
            "format code 2 is 'int8' in native.c, 'fp8' in kernels/formats.py",
        ),
        (
            None,
            (dataclasses.replace(INT4, name="mxfp4", code=len(FORMATS)),),
            f"format code {len(FORMATS)} ('mxfp4' in kernels/formats.py) has no row in native.c's format table",
        ),
    ],
)
def test_a_drifted_mirror_or_format_table_is_named(lib, mirrors, formats, says: str) -> None:
    assert native.abi_mismatch(lib, mirrors=mirrors or native.MIRRORS, formats=formats or FORMATS) == says


def test_a_library_that_disagrees_is_refused_for_torch(monkeypatch, caplog) -> None:
    if native.library() is None:
        pytest.skip("no C compiler: the engine runs on torch alone")
    monkeypatch.setattr(native, "ABI_VERSION", native.ABI_VERSION + 1)
    native.library.cache_clear()
    try:
        with caplog.at_level(logging.ERROR, logger=native.__name__):
            assert native.library() is None
    finally:
        native.library.cache_clear()  # the next caller loads the library again, unpatched
    version = native.ABI_VERSION - 1  # the library's: ABI_VERSION is still patched one past it
    assert f"refused: the ABI version is {version} in the library, {version + 1} in engine/native.py" in caplog.text


HUGE = 1 << 50  # rows whose scratch (petabytes) no allocator can give


def test_kernels_report_out_of_memory_instead_of_crashing(lib) -> None:
    projs, _keep = native.projections([(torch.randn(32, 64), None, None)] * 3 + [(torch.randn(64, 32), None, None)])
    block = native.BlockArgs(
        heads=2, kv_heads=2, head_dim=16, experts=4, topk=1, router=projs, hidden=64, rotary=16, slots=1
    )
    no_memory = 1  # MOERAG_NO_MEMORY in native.h
    assert lib.moerag_gemv(0, HUGE, 8, 32, 32, None, None, None, None) == no_memory
    assert lib.moerag_moe(3, 3, HUGE, 1, 64, 32, 32, 32, *[None] * 8) == no_memory
    attention = lib.moerag_attention(
        HUGE, 2, 2, 16, 0, 1, None, projs, None, None, 1e-6, None, None, None, None, 1.0, None
    )
    assert attention == no_memory
    caches = (ctypes.c_void_p * 1)()  # one block's (NULL) cache pointer
    assert lib.moerag_blocks(ctypes.byref(block), 1, HUGE, 0, None, None, None, caches, caches, 1.0) == no_memory


def test_out_of_memory_in_a_kernel_is_an_engine_error() -> None:
    full = SimpleNamespace(moerag_gemv=lambda *args: 1)  # a library whose kernel reports MOERAG_NO_MEMORY
    with pytest.raises(EngineError, match="ran out of memory in moerag_gemv"):
        native.gemv(torch.randn(1, 32), torch.randn(8, 32), lib=full)


def test_the_build_key_covers_every_file_native_c_includes() -> None:
    included, todo = set(), [native.SOURCE]
    while todo:
        path = todo.pop()
        included.add(path)
        todo += [path.parent / name for name in re.findall(r'#include "([^"]+)"', path.read_text())]
    assert len(included) >= 4 and included <= set(native.sources())  # native.c, .h, _generic.c, _simd.c


# The SIMD kernels read 32-input blocks in groups of eight, then four, then what is left: K = 320
# is 8 + 2 blocks, 224 is 4 + 3, 288 is 8 + 1, 384 is 8 + 4.
GGUF_CASES = [(Q8_0, 32), (Q8_0, 320), (Q4_0, 64), (Q4_0, 224), (Q4_0, 288), (Q4_K, 256), (Q4_K, 512), (Q6_K, 256),
              (Q5_K, 512), (MXFP4, 32), (MXFP4, 224), (MXFP4, 288), (MXFP4, 384), (MXFP4, 2880)]  # fmt: skip


def _blocks(fmt: Format, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random blocks of `fmt` for weights [.., N, K]; mxfp4's e8m0 exponents in 2^-9..2^6 (every e2m1
    code and both nibbles random), the GGUF types' from gguf_blocks."""
    if fmt is not MXFP4:
        return gguf_blocks(fmt, shape, seed=seed)
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*shape[:-1], shape[-1] // 32, 17), dtype=torch.uint8, generator=g)
    blocks[..., 0] = torch.randint(118, 134, blocks.shape[:-1], dtype=torch.uint8, generator=g)
    return blocks.flatten(-2)


def _expected_blocks(x: torch.Tensor, blocks: torch.Tensor, fmt: Format, simd: bool) -> torch.Tensor:
    """x [M, K] @ W^T as the block kernels define it: the SIMD build rounds x to int8 per 32 inputs
    (llama.cpp's Q8_0; the offsets of q4_0, mxfp4 and the K-quants take the rounded sums too, so the
    kernel computes exactly this product), the portable one keeps it fp32. Against exact activations
    the SIMD product is off by ~0.5 % (measured: 3e-3..8e-3 of the largest output on random blocks)."""
    return (_round_chunks(x, 127) if simd else x) @ dequantize_reference(blocks, None, fmt=fmt).T


@pytest.mark.parametrize("fmt", [Q8_0, Q4_0, Q4_K, Q5_K, Q6_K, MXFP4], ids=lambda f: f.name)
def test_block_reference_dequantize_equals_the_gguf_package(fmt: Format) -> None:
    # gguf.quants is ggml's own formulas in numpy: an independent reading of the same bytes.
    gguf = pytest.importorskip("gguf")
    blocks = _blocks(fmt, (5, 512), seed=fmt.code)
    want = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[fmt.name.upper()])
    assert torch.equal(dequantize_reference(blocks, None, fmt=fmt), torch.from_numpy(want))


@pytest.mark.parametrize("fmt,k", GGUF_CASES, ids=lambda v: getattr(v, "name", v))
def test_block_dequantize_is_exact(lib, fmt: Format, k: int) -> None:
    blocks = _blocks(fmt, (19, k), seed=k)
    assert torch.equal(native.dequantize(blocks, fmt=fmt, lib=lib), dequantize_reference(blocks, None, fmt=fmt))


@pytest.mark.parametrize("fmt,k", GGUF_CASES, ids=lambda v: getattr(v, "name", v))
@pytest.mark.parametrize("m", [1, 3, 16])
def test_block_gemv_equals_the_dequantized_product(lib, fmt: Format, k: int, m: int) -> None:
    blocks = _blocks(fmt, (45, k), seed=k + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    _close(native.gemv(x, blocks, fmt=fmt, lib=lib), _expected_blocks(x, blocks, fmt, bool(lib.moerag_simd())))


def test_mxfp4_scales_down_to_fp32_subnormals(lib) -> None:
    # e = 0 and 1 scale by 2^-127 (an fp32 subnormal) and 2^-126; the SIMD kernel builds its halved
    # scale 2^(e - 128) apart for them. Products that small keep ~16 bits (subnormal), hence 1e-3.
    blocks = _blocks(MXFP4, (3, 64), seed=7).view(3, 2, 17)
    blocks[0, :, 0], blocks[1, :, 0], blocks[2, :, 0] = 0, 1, 200
    blocks = blocks.flatten(-2)
    assert torch.equal(native.dequantize(blocks, fmt=MXFP4, lib=lib), dequantize_reference(blocks, None, fmt=MXFP4))
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    got, want = native.gemv(x, blocks, fmt=MXFP4, lib=lib), _expected_blocks(x, blocks, MXFP4, bool(lib.moerag_simd()))
    assert torch.allclose(got, want, rtol=1e-3, atol=0), (got, want)  # each row on its own scale


@pytest.mark.parametrize(
    "fmt,down", [(Q8_0, Q8_0), (Q4_K, Q4_K), (MXFP4, MXFP4), (Q4_K, Q6_K), (Q4_K, Q4_0)], ids=lambda f: f.name
)
def test_block_moe_equals_the_reference(lib, fmt: Format, down: Format) -> None:
    # Down may be in another type than gate and up, as Q4_K_M files store it (Q6_K), with another block.
    experts, hidden, width = 8, 256, 256
    w13, w2 = _blocks(fmt, (experts, 2 * width, hidden), seed=1), _blocks(down, (experts, hidden, width), seed=2)
    ids = torch.tensor([[0, 5], [5, 0], [2, 7], [7, 7]])
    x, weights = torch.randn(ids.shape[0], hidden), torch.rand(ids.shape)
    got = native.moe(x, w13, w2, weights, ids, fmt=fmt, w2_format=down, lib=lib)
    simd, want = bool(lib.moerag_simd()), torch.zeros_like(x)
    for t, k in torch.cartesian_prod(torch.arange(ids.shape[0]), torch.arange(ids.shape[1])).tolist():
        e = int(ids[t, k])
        gate, up = _expected_blocks(x[t : t + 1], w13[e], fmt, simd).chunk(2, dim=-1)
        want[t] += weights[t, k] * _expected_blocks(F.silu(gate) * up, w2[e], down, simd)[0]
    _close(got, want)
