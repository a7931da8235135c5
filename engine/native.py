"""The native CPU kernels (native.c): built with the system C compiler on first use, loaded with ctypes.

Shapes: M rows of activations, N outputs, K inputs; T tokens, K_ experts per token, H hidden,
I expert width. Weights: fp32 / bf16 [N, K]; int8 [N, K] with fp32 scales [N]; int4 packed
[N, K/2] uint8 with bf16 (scale, zero) [N, K/G, 2] (see qmatmul). Everything else is torch.

The library is cached under ~/.cache/moerag/native, keyed by the source, the compiler and the
CPU's flags (it is built with -march=native). Without a compiler, or with MOERAG_NATIVE=0, the
engine runs on torch alone: the same results, several times slower at decode.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.c")
FORMATS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2, torch.uint8: 3}  # uint8 = packed int4
_P, _I = ctypes.c_void_p, ctypes.c_int64


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "moerag" / "native"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def build(*, scalar: bool = False) -> Path:
    """Compile native.c (once per source, compiler and CPU) and return the shared library's path.

    `scalar` builds the portable path without SIMD (what machines without AVX2 run; tests use it).
    Raises OSError or subprocess.CalledProcessError when no compiler works.
    """
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    flags = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11"] + (["-DMOERAG_SCALAR"] if scalar else [])
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, *flags, _cpu_flags()]).encode()).hexdigest()
    target = cache_dir() / f"moerag-native-{key[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # concurrent builders each rename a whole file
        out = Path(tmp) / target.name
        subprocess.run([compiler, *flags, str(SOURCE), "-o", str(out), "-lm"], capture_output=True, text=True, check=True)
        os.replace(out, target)
    log.info("built the native CPU kernels: %s", target)
    return target


@cache
def library(*, scalar: bool = False) -> ctypes.CDLL | None:
    """The loaded kernels, or None (logged once) when they cannot be built or MOERAG_NATIVE=0."""
    if os.environ.get("MOERAG_NATIVE", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(build(scalar=scalar)))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.warning("native CPU kernels unavailable (%s); decoding on torch alone, several times slower", detail)
        return None
    lib.moerag_gemv.argtypes = [ctypes.c_int, _I, _I, _I, _I, _P, _P, _P, _P]
    lib.moerag_moe.argtypes = [ctypes.c_int, _I, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P]
    lib.moerag_dequantize.argtypes = [ctypes.c_int, _I, _I, _I, _P, _P, _P]
    lib.moerag_rmsnorm.argtypes = [_I, _I, _P, _P, ctypes.c_float, _P]
    lib.moerag_attention.argtypes = [_I, _I, _I, _I, _I, _I, _P, _P, _P, _P, ctypes.c_float, _P, _P, _P, _P, ctypes.c_float, _P]
    lib.moerag_set_threads.argtypes = [ctypes.c_int]
    lib.moerag_blocks.argtypes = [_P, _I, _I, _I, _I, _P, _P, _P, _P, _P, ctypes.c_float]
    fns = (lib.moerag_gemv, lib.moerag_moe, lib.moerag_dequantize, lib.moerag_rmsnorm, lib.moerag_attention)
    for fn in (*fns, lib.moerag_blocks):
        fn.restype = None
    lib.moerag_set_threads(torch.get_num_threads())  # the kernels' own threads (see native.c)
    return lib


def available() -> bool:
    return library() is not None


def supports(w: torch.Tensor) -> bool:
    """Whether the kernels read this weight (fp16 and others fall back to torch)."""
    return w.dtype in FORMATS and w.device.type == "cpu" and w.is_contiguous()


def _format(w: torch.Tensor, scale: torch.Tensor | None) -> tuple[int, int, int]:
    """(format code, K inputs, int4 group) of a weight [.., N, K or K/2]."""
    fmt = FORMATS[w.dtype]
    k = w.shape[-1] * 2 if fmt == 3 else w.shape[-1]
    group = k // scale.shape[-2] if fmt == 3 else 32
    return fmt, k, group


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None, *, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [M, K] fp32 @ W^T -> [M, N] fp32, for small M (decode): each weight row is read once."""
    lib = lib or library()
    fmt, k, group = _format(w, scale)
    x = x.contiguous()
    y = torch.empty((x.shape[0], w.shape[0]), dtype=torch.float32)  # [M, N]
    lib.moerag_gemv(fmt, x.shape[0], w.shape[0], k, group, x.data_ptr(), w.data_ptr(), _ptr(scale), y.data_ptr())
    return y


def moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    lib: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) -> [T, H] fp32, in one call (decode)."""
    lib = lib or library()
    fmt, hidden, group = _format(w13, w13_scale)
    inter = w13.shape[1] // 2
    x, ids = x.float().contiguous(), ids.to(torch.int64).contiguous()
    weights = weights.float().contiguous()
    out = torch.empty((x.shape[0], hidden), dtype=torch.float32)  # [T, H]
    lib.moerag_moe(
        fmt, ids.shape[0], ids.shape[1], hidden, inter, group, x.data_ptr(), ids.data_ptr(), weights.data_ptr(),
        w13.data_ptr(), _ptr(w13_scale), w2.data_ptr(), _ptr(w2_scale), out.data_ptr(),
    )  # fmt: skip
    return out


def dequantize(w: torch.Tensor, scale: torch.Tensor | None = None, *, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """W as fp32 [N, K], for products with many rows (prefill), which torch's GEMM then runs."""
    lib = lib or library()
    fmt, k, group = _format(w, scale)
    out = torch.empty((w.shape[0], k), dtype=torch.float32)
    lib.moerag_dequantize(fmt, w.shape[0], k, group, w.data_ptr(), _ptr(scale), out.data_ptr())
    return out


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [..., N] fp32 / rms * weight [N] fp32 -> fp32, for a few rows (decode)."""
    lib = lib or library()
    x = x.contiguous()
    out = torch.empty_like(x)
    lib.moerag_rmsnorm(x.numel() // x.shape[-1], x.shape[-1], x.data_ptr(), weight.data_ptr(), eps, out.data_ptr())
    return out


class Proj(ctypes.Structure):
    """One projection for moerag_attention: weight layout, shapes, pointers (bias fp32 or NULL)."""

    _fields_ = [("fmt", _I), ("n", _I), ("k", _I), ("group", _I), ("w", _P), ("scale", _P), ("bias", _P)]


def projections(layers: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]) -> tuple[ctypes.Array, list]:
    """(weight, scale, bias) per projection -> (a Proj array, the tensors it points into, to keep alive)."""
    keep, array = [], (Proj * len(layers))()
    for slot, (w, scale, bias) in zip(array, layers, strict=True):
        fmt, k, group = _format(w, scale)
        bias32 = None if bias is None else bias.float().contiguous()
        keep += [w, scale, bias32]
        slot.fmt, slot.n, slot.k, slot.group = fmt, w.shape[0], k, group
        slot.w, slot.scale, slot.bias = w.data_ptr(), _ptr(scale), _ptr(bias32)
    return array, keep


def attention(
    x: torch.Tensor,
    projs: ctypes.Array,
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
    position: int,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
    lib: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """One decode step of grouped-query attention (see moerag_attention): x [B, H] -> [B, H_out] fp32.

    Writes the new key and value at `position` of the fp32 caches [B, G, S_max, D].
    """
    lib = lib or library()
    out = torch.empty((x.shape[0], projs[3].n), dtype=torch.float32)
    lib.moerag_attention(
        x.shape[0], heads, kv_heads, head_dim, position, k_cache.shape[2], x.data_ptr(), projs,
        _ptr(q_norm), _ptr(k_norm), eps, cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        scale, out.data_ptr(),
    )  # fmt: skip
    return out


class BlockArgs(ctypes.Structure):
    """A decoder block for moerag_block (see native.c); pointers into tensors kept alive elsewhere."""

    _fields_ = [
        *[(name, _I) for name in ("heads", "kv_heads", "head_dim", "experts", "topk", "renormalize", "fmt", "inter", "group")],
        ("attn", ctypes.POINTER(Proj)),
        *[(name, _P) for name in ("qnorm", "knorm", "in_norm", "post_norm")],
        ("qk_eps", ctypes.c_float),
        ("eps", ctypes.c_float),
        ("router", ctypes.POINTER(Proj)),
        *[(name, _P) for name in ("w13", "s13", "w2", "s2")],
    ]


class Stack:
    """Consecutive blocks for moerag_blocks: their BlockArgs in one array, and their caches' pointers."""

    def __init__(self, blocks: list[BlockArgs], caches: list[list[torch.Tensor]], first: int = 0) -> None:
        self.first = first  # the first block's index in the model
        self.args = (BlockArgs * len(blocks))(*blocks)  # copies of the structs; `blocks` keeps their tensors
        self.blocks = blocks
        self.caches = caches
        pointers = ctypes.c_void_p * len(blocks)
        self.k = pointers(*(c[0].data_ptr() for c in caches))
        self.v = pointers(*(c[1].data_ptr() for c in caches))
        self.smax = caches[0][0].shape[2]


def blocks(
    stack: Stack,
    x: torch.Tensor,
    *,
    position: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    scale: float,
    lib: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """One decode step of every block in `stack` (attention + softmax-routed experts each, see
    moerag_block): x [B, H] fp32 -> new x; each block's new key and value go into its cache."""
    lib = lib or library()
    x = x.contiguous().clone()  # updated in place by the kernel
    lib.moerag_blocks(
        stack.args, len(stack.blocks), x.shape[0], position, stack.smax, x.data_ptr(), cos.data_ptr(),
        sin.data_ptr(), stack.k, stack.v, scale,
    )  # fmt: skip
    return x
