"""The weight formats: the one definition of each layout the engine stores and every kernel reads.

The native CPU kernels (engine/native.c, through engine/native.py), the Triton kernels
(kernels/experts.py), the torch fallbacks (engine/qmatmul.py) and the tests all take their
layouts from here: packing order, scale and offset layout, and the reference quantize /
dequantize. Adding a format is one `Format` row here, one row in native.c's format table and
its kernels. This module imports only torch, so both `engine` and `kernels` may use it.

Shapes: N outputs, K inputs, G = K / group groups; leading dims (stacked experts [E, N, K])
are carried through unchanged.

  fp32  w [.., N, K] float32; no scale.
  bf16  w [.., N, K] bfloat16; no scale.
  int8  q [.., N, K] int8, scale [.., N] fp32; w = q * scale (symmetric, per output channel).
  int4  packed [.., N, K/2] uint8 in chunks of 32 inputs: byte j of a chunk holds input j in
        its low nibble and input 16 + j in its high one; scale_zero [.., N, G, 2] bf16;
        w = (q - 8) * scale + zero (asymmetric, per group of `group` inputs, a multiple of 32).
  fp8   q [.., N, K] float8_e4m3fn, scale [.., N, ceil(K/B)] fp32; w = q * scale[n, k // B], B the
        block of inputs (any size; the last block of a row may be partial).
  GGUF block types (ggml's layouts, kept as the file stores them): [.., N, K / block * bytes] uint8,
  each row K / block blocks of `bytes` bytes holding their own fp16 scales; no separate scale.
  q8_0  32 inputs in 34 bytes: d fp16, q int8[32]; w = d * q.
  q4_0  32 inputs in 18 bytes: d fp16, qs[16] (input j low nibble, 16 + j high); w = d * (q - 8).
  q4_k  256 inputs in 144 bytes: d, dmin fp16, 12 bytes of 6-bit (scale, min) for 8 sub-blocks of
        32, qs[128]: 4 chunks of 32 bytes, sub-block 2c in the low nibbles, 2c + 1 in the high
        ones; w = d * sc[s] * q - dmin * m[s].
  q5_k  256 inputs in 176 bytes: d, dmin, 12 scale bytes as q4_k, qh[32] (bit s of byte j: the 5th
        bit of input j of sub-block s), qs[128] as q4_k; w = d * sc[s] * (q + 16 h) - dmin * m[s].
  q6_k  256 inputs in 210 bytes: ql[128], qh[64], sc int8[16], d fp16; per half of 128 inputs (ql
        64 bytes, qh 32): inputs l, l + 32, l + 64, l + 96 are the low nibbles of ql[l], ql[32 + l],
        the high nibbles of ql[l], ql[32 + l], with bits 0-1, 2-3, 4-5, 6-7 of qh[l] on top;
        w = d * sc[i / 16] * (q - 32).
  mxfp4 32 inputs in 17 bytes (ggml's block_mxfp4, also how .gguf files store MXFP4): e e8m0, qs[16]
        (input j low nibble, 16 + j high), each nibble an e2m1 code; w = E2M1[q] * 2^(e - 127).
        Checkpoints in the OCP layout (gpt-oss: `X_blocks` [.., N, K/32, 16], input 2j in the low
        nibble of byte j, 2j + 1 in the high one; `X_scales` [.., N, K/32] e8m0) are repacked into it
        losslessly at load.
  int4zp packed [.., N, K/2] uint8 as int4, scale_zero [.., N, G, 2] fp16 (scale, zero point);
        w = (q - zero) * scale, zero an integer 0..16 (GPTQ v1 stores zero - 1 in 4 bits, so 16
        occurs) (GPTQ and AWQ's layout, repacked exactly: an fp16 scale does not fit in int4's bf16,
        and zero * scale not in fp16).
The int4 chunk order lets a kernel unpack 32 inputs with one mask and one shift of 16 bytes.
A stored uint8 weight is int4 unless its module says otherwise: several formats share the dtype, so
modules holding GGUF blocks carry their Format and pass it to every kernel as `fmt`.

FP8 checkpoints (DeepSeek-V3's layout) scale blocks of [Bo, B] weights: weight_scale_inv
[ceil(N/Bo), ceil(K/B)]. The loader repeats each scale row over its Bo output rows (`fp8_row_scales`),
which costs 4/B bytes a weight (1/32 bit at B = 128) and lets every kernel read one row with its
own scales. B cannot be recovered from the shapes when K is not a multiple of it (K = 100 has two
blocks for any B in 50..99), so the module carries it and passes it to every kernel as `group`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK = 32  # int4 inputs per packed chunk; every int4 group is a multiple of it
INT4_GROUPS = (32, 64, 128, 256)
CHUNK_ELEMENTS = 1 << 22  # rows are quantized in slices of ~16 MB of fp32 temporaries


@dataclass(frozen=True)
class Format:
    """One weight layout. `code` is its row in native.c's FORMATS table (native.h's MOERAG_* enum) and
    `name` its name there; the library is refused at load if they disagree."""

    name: str
    code: int
    dtype: torch.dtype  # the stored weight's dtype
    per_element: int  # inputs stored per element of the weight (2 for packed int4)
    scale: str | None  # the scale tensor's layout, None when the weight is unscaled
    block: int = 0  # GGUF block types: inputs per block ...
    block_bytes: int = 0  # ... and its bytes (scales included); 0 for the others

    def inputs(self, w: torch.Tensor) -> int:
        """K, the inputs per output row of a weight [.., N, K / per_element] in this format."""
        if self.block:
            return w.shape[-1] // self.block_bytes * self.block
        return w.shape[-1] * self.per_element

    def stored_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The stored weight's shape for a float weight of `shape` [.., N, K] (GGUF block types)."""
        assert self.block and shape[-1] % self.block == 0, f"{self.name} needs K a multiple of {self.block}"
        return (*shape[:-1], shape[-1] // self.block * self.block_bytes)

    def group(self, w: torch.Tensor, scale: torch.Tensor | None) -> int:
        """Inputs per scale group (int4), per block (GGUF types); formats without groups report CHUNK.
        fp8's block is not in its shapes (see above): its callers pass it."""
        if self is FP8:
            raise ValueError("fp8 weights need their input block passed explicitly (the module's `block`)")
        if self in (INT4, INT4ZP) and scale is not None:
            return self.inputs(w) // scale.shape[-2]
        return self.block or CHUNK


FP32 = Format("fp32", 0, torch.float32, 1, None)
BF16 = Format("bf16", 1, torch.bfloat16, 1, None)
INT8 = Format("int8", 2, torch.int8, 1, "fp32 [.., N]")
INT4 = Format("int4", 3, torch.uint8, 2, "bf16 [.., N, G, 2] (scale, zero)")
FP8 = Format("fp8", 4, torch.float8_e4m3fn, 1, "fp32 [.., N, ceil(K/B)]")
Q8_0 = Format("q8_0", 5, torch.uint8, 1, None, 32, 34)
Q4_K = Format("q4_k", 6, torch.uint8, 1, None, 256, 144)
Q6_K = Format("q6_k", 7, torch.uint8, 1, None, 256, 210)
Q4_0 = Format("q4_0", 8, torch.uint8, 1, None, 32, 18)
Q5_K = Format("q5_k", 9, torch.uint8, 1, None, 256, 176)
MXFP4 = Format("mxfp4", 10, torch.uint8, 1, None, 32, 17)
INT4ZP = Format("int4zp", 11, torch.uint8, 2, "fp16 [.., N, G, 2] (scale, zero point)")
FORMATS = (FP32, BF16, INT8, INT4, FP8, Q8_0, Q4_K, Q6_K, Q4_0, Q5_K, MXFP4, INT4ZP)  # in code order
GGUF_FORMATS = {"Q8_0": Q8_0, "Q4_K": Q4_K, "Q6_K": Q6_K, "Q4_0": Q4_0, "Q5_K": Q5_K, "MXFP4": MXFP4}  # by GGML name
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # mxfp4's codes
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
_BY_DTYPE = {f.dtype: f for f in (FP32, BF16, INT8, INT4, FP8)}  # uint8 means int4 unless told


def format_of(w: torch.Tensor, fmt: Format | None = None) -> Format | None:
    """The layout of a stored weight: `fmt` when its module gives one, else from its dtype; None for
    others (fp16: torch reads those)."""
    return fmt or _BY_DTYPE.get(w.dtype)


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
    K must be a multiple of `group`, itself a multiple of CHUNK.
    """
    k = w.shape[-1]
    if group % CHUNK or k % group:
        raise ValueError(f"int4 needs K ({k}) a multiple of the group ({group}), itself a multiple of {CHUNK}")
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
    halves = q.to(torch.uint8).reshape(*q.shape[:-1], q.shape[-1] // CHUNK, 2, CHUNK // 2)  # [..., K/32, 2, 16]
    return (halves[..., 0, :] | (halves[..., 1, :] << 4)).reshape(*q.shape[:-1], q.shape[-1] // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] uint8 -> q [..., K] uint8 (0..15); the inverse of pack_int4."""
    chunks = packed.reshape(*packed.shape[:-1], packed.shape[-1] // (CHUNK // 2), 1, CHUNK // 2)  # [..., K/32, 1, 16]
    return torch.cat([chunks & 15, chunks >> 4], dim=-2).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def quantize_fp8(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] float -> (q [..., N, K] float8_e4m3fn, scale [..., N, ceil(K/block)] fp32).

    One scale per row and block of inputs, max|w| / 448 (a finer grid than a checkpoint's
    [Bo, B] blocks, in the same layout once those are repeated over their rows).
    """
    k = w.shape[-1]
    blocks = -(-k // block)
    padded = torch.nn.functional.pad(w.float(), (0, blocks * block - k))  # [..., N, G*B], zeros change no max
    scale = (padded.unflatten(-1, (blocks, block)).abs().amax(-1) / FP8_MAX).clamp(min=1e-12)  # [..., N, G]
    q = (w.float() / fp8_expand(scale, block, k)).to(torch.float8_e4m3fn)
    return q, scale


def fp8_expand(scale: torch.Tensor, block: int, k: int) -> torch.Tensor:
    """scale [..., N, ceil(K/block)] -> [..., N, K]: each input's scale."""
    return scale.float().repeat_interleave(block, dim=-1)[..., :k]


def fp8_row_scales(block_scale: torch.Tensor, rows: int, block: int) -> torch.Tensor:
    """A checkpoint's weight_scale_inv [ceil(N/Bo), G] -> the stored layout [N, G]: each scale row
    repeated over its `block` (Bo) output rows, the last block cut to the N rows there are."""
    return block_scale.float().repeat_interleave(block, dim=0)[:rows]


def quantize_mxfp4(w: torch.Tensor) -> torch.Tensor:
    """w [.., N, K] float (K a multiple of 32) -> MXFP4 blocks [.., N, K / 32 * 17], as the OCP MX spec
    quantizes: per 32 inputs the exponent floor(log2(max |w|)) - 2 (e2m1's largest, 6, is 1.5 * 2^2,
    so the top of the range clips), each input the nearest e2m1 value."""
    groups = w.float().reshape(-1, 32)  # [B, 32]
    top = groups.abs().amax(-1, keepdim=True)  # [B, 1]
    exponent = torch.where(top > 0, torch.floor(torch.log2(top)) - 2, -127).clamp(-127, 127)  # all zero: e = 0
    values = torch.tensor(E2M1)
    codes = (groups / torch.exp2(exponent))[..., None].sub(values).abs().argmin(-1).to(torch.uint8)  # [B, 32]
    qs = codes[:, :16] | (codes[:, 16:] << 4)  # input j low, 16 + j high
    blocks = torch.cat([(exponent + 127).to(torch.uint8), qs], dim=-1)  # [B, 17]
    return blocks.view(*w.shape[:-1], w.shape[-1] // 32 * 17)


def quantize_q4_k(w: torch.Tensor) -> torch.Tensor:
    """w [.., N, K] float (K a multiple of 256) -> Q4_K blocks [.., N, K / 256 * 144]: per sub-block of 32
    the range [min(0, lowest), highest] in 15 steps, its step and offset as 6-bit multiples of the
    block's fp16 d and dmin. (llama.cpp also searches each sub-block's scale; this takes min/max.)"""
    sub = w.float().reshape(-1, 8, 32)  # [B, 8, 32]
    low = sub.amin(-1).clamp(max=0)  # [B, 8], <= 0 (w = d sc q - dmin m, m >= 0)
    step = (sub.amax(-1) - low) / 15  # [B, 8]
    d = (step.amax(-1, keepdim=True) / 63).to(torch.float16)  # [B, 1]
    dmin = (-low.amin(-1, keepdim=True) / 63).to(torch.float16)  # [B, 1]
    sc = torch.round(step / d.float().clamp(min=1e-30)).clamp(0, 63)  # [B, 8]
    mn = torch.round(-low / dmin.float().clamp(min=1e-30)).clamp(0, 63)  # [B, 8]
    scale = (d.float() * sc)[..., None]  # [B, 8, 1]
    q = torch.round((sub + (dmin.float() * mn)[..., None]) / scale.clamp(min=1e-30)).clamp(0, 15).to(torch.uint8)
    sc, mn = sc.to(torch.uint8), mn.to(torch.uint8)
    packed = torch.cat(  # the 12 scale bytes _k_scales reads back
        [
            sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
            mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4),
        ],
        dim=-1,
    )  # [B, 12]
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).flatten(1)  # [B, 128]: chunk c holds sub-blocks 2c (low), 2c + 1 (high)
    halves = torch.cat([d, dmin], dim=-1).view(torch.uint8)  # [B, 4]
    return torch.cat([halves, packed, qs], dim=-1).view(*w.shape[:-1], w.shape[-1] // 256 * 144)


_BLOCK_QUANTIZE = {"mxfp4": quantize_mxfp4, "q4_k": quantize_q4_k}


def quantize(w: torch.Tensor, fmt: Format, group: int = 128) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A float weight [.., N, K] in `fmt`: (stored weight, scale or None). `group`: int4's group, fp8's block.
    Of the block types only MXFP4 and Q4_K are made here (benchmarks and tests); the others are read
    as files store them."""
    if fmt.block:
        if fmt.name not in _BLOCK_QUANTIZE:
            raise ValueError(f"{fmt.name} weights come from GGUF files; the engine does not quantize to them")
        return _BLOCK_QUANTIZE[fmt.name](w), None
    if fmt is INT8:
        return quantize_int8(w)
    if fmt is INT4:
        return quantize_int4(w, group)
    if fmt is FP8:
        return quantize_fp8(w, group)
    return w.to(fmt.dtype), None


def dequantize(
    w: torch.Tensor, scale: torch.Tensor | None, group: int | None = None, fmt: Format | None = None
) -> torch.Tensor:
    """Any stored weight above -> fp32 [..., N, K], in plain torch (the reference every kernel matches).

    `group`: fp8's input block (required there); the other formats read theirs from the shapes.
    `fmt`: the layout, when the dtype does not say it (GGUF blocks)."""
    fmt = format_of(w, fmt)
    if fmt is not None and fmt.block:
        blocks = w.reshape(-1, fmt.block_bytes)  # [B, bytes]
        return _BLOCK_DEQUANTIZE[fmt](blocks).view(*w.shape[:-1], fmt.inputs(w))
    if fmt is FP8:
        assert group is not None, "fp8 needs its input block"
        return w.float() * fp8_expand(scale, group, w.shape[-1])
    if fmt is INT8:
        return w.float() * scale.float()[..., None]
    if fmt in (INT4, INT4ZP):
        q = unpack_int4(w).float()  # [..., N, K]
        groups = scale.shape[-2]
        s, z = scale[..., 0].float(), scale[..., 1].float()  # [..., N, G]
        qg = q.view(*q.shape[:-1], groups, -1)  # [..., N, G, g]
        wg = (qg - 8) * s[..., None] + z[..., None] if fmt is INT4 else (qg - z[..., None]) * s[..., None]
        return wg.view(q.shape)
    return w.float()


# GGUF blocks -> fp32, from ggml's published formulas (the layouts above): blocks [B, bytes] uint8 -> [B, block].


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at byte `at` of each block, as fp32 [B, 1]."""
    return blocks[:, at : at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """qs [B, C, 32] -> [B, 2C, 32]: per chunk of 32 bytes its low nibbles, then its high ones."""
    return torch.stack([qs & 15, qs >> 4], dim=2).flatten(1, 2)


def _k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q4_k / q5_k's 6-bit (scale, min) of the 8 sub-blocks, from bytes 4..15: [B, 8] each as fp32.
    Sub-blocks 0-3 take the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); 4-7 take a nibble of
    bytes 8-11 with the top 2 bits of bytes 0-3 (scales) or 4-7 (mins) above it."""
    s = blocks[:, 4:16].int()  # [B, 12]
    scales = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], dim=1)
    mins = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    return scales.float(), mins.float()


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return _f16(blocks, 0) * blocks[:, 2:34].contiguous().view(torch.int8).float()


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, None, 2:18]).flatten(1).float()  # [B, 32]: low nibbles, then high
    return _f16(blocks, 0) * (q - 8)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    scales, mins = _k_scales(blocks)  # [B, 8]
    q = _nibbles(blocks[:, 16:144].reshape(-1, 4, 32)).float()  # [B, 8, 32]
    w = _f16(blocks, 0)[..., None] * scales[..., None] * q - _f16(blocks, 2)[..., None] * mins[..., None]
    return w.flatten(1)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    scales, mins = _k_scales(blocks)  # [B, 8]
    high = (blocks[:, None, 16:48].int() >> torch.arange(8, dtype=torch.int32)[:, None]) & 1  # [B, 8, 32]
    q = _nibbles(blocks[:, 48:176].reshape(-1, 4, 32)).float() + 16 * high  # [B, 8, 32]
    w = _f16(blocks, 0)[..., None] * scales[..., None] * q - _f16(blocks, 2)[..., None] * mins[..., None]
    return w.flatten(1)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    ql = blocks[:, 0:128].reshape(-1, 2, 2, 32).int()  # [B, half, 2, 32]
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32).int()  # [B, half, 1, 32]
    shifts = torch.arange(0, 8, 2, dtype=torch.int32).view(1, 1, 4, 1)  # bits 0-1, 2-3, 4-5, 6-7 of qh
    low = torch.cat([ql & 15, ql >> 4], dim=2)  # [B, half, 4, 32]: inputs l, l + 32, l + 64, l + 96
    q = (low | (((qh >> shifts) & 3) << 4)).float() - 32  # [B, half, 4, 32]
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()  # [B, 16], one per 16 inputs
    return _f16(blocks, 208) * scales.repeat_interleave(16, dim=1) * q.flatten(1)


def _mxfp4(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, None, 1:17]).flatten(1).long()  # [B, 32]: low nibbles, then high
    e = blocks[:, :1].int() - 127  # [B, 1]; e = 255 (NaN) is never written
    scale = torch.ldexp(torch.ones(e.shape), e)
    return torch.tensor(E2M1)[q] * scale


_BLOCK_DEQUANTIZE = {Q8_0: _q8_0, Q4_0: _q4_0, Q4_K: _q4_k, Q5_K: _q5_k, Q6_K: _q6_k, MXFP4: _mxfp4}
