"""The native CPU kernels (native.c): built with the system C compiler on first use, loaded with ctypes.

Shapes: M rows of activations, N outputs, K inputs; T tokens, K_ experts per token, H hidden,
I expert width. Weights: fp32 / bf16 [N, K]; int8 [N, K] with fp32 scales [N]; int4 packed
[N, K/2] uint8 with bf16 (scale, zero) [N, K/G, 2]; fp8 [N, K] with fp32 scales [N, ceil(K/B)]
and GGUF blocks [N, K / block * bytes] uint8 (kernels/formats.py). fp8's input block B is not in
its shapes, nor is a GGUF block type in its dtype: every function that takes a weight takes them as
`group` and `fmt` (None: from the shapes and the dtype). Everything else is torch.

The library is cached under ~/.cache/moerag/native, keyed by the sources, the compiler and the
CPU's flags (it is built with -march=native). Without a compiler, or with MOERAG_NATIVE=0, the
engine runs on torch alone: the same results, several times slower at decode. Proj and BlockArgs
mirror native.h's structs; a library whose layout (moerag_abi) or format table differs from them
and kernels/formats.py is refused the same way.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

from engine.errors import ContextLengthError, EngineError
from kernels.formats import FORMATS, Format, format_of

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.c")  # the translation unit; it includes the other native* files
ABI_VERSION = 3  # MOERAG_ABI_VERSION in native.h
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


def sources() -> list[Path]:
    """native.c, native.h and the native_* files native.c includes: what the build depends on."""
    return sorted(SOURCE.parent.glob("native*.[ch]"))


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
    """Compile native.c (once per set of sources, compiler and CPU) and return the shared library's path.

    `scalar` builds the portable path without SIMD (what machines without AVX2 run; tests use it).
    Raises OSError or subprocess.CalledProcessError when no compiler works.
    """
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    flags = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11"] + (
        ["-DMOERAG_SCALAR"] if scalar else []
    )
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    texts = [f"{path.name}\0{path.read_text()}" for path in sources()]
    key = hashlib.sha256("\0".join([*texts, compiler, version, *flags, _cpu_flags()]).encode()).hexdigest()
    target = cache_dir() / f"moerag-native-{key[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # concurrent builders each rename a whole file
        out = Path(tmp) / target.name
        subprocess.run(
            [compiler, *flags, str(SOURCE), "-o", str(out), "-lm"], capture_output=True, text=True, check=True
        )
        os.replace(out, target)
    log.info("built the native CPU kernels: %s", target)
    return target


class Proj(ctypes.Structure):
    """native.h's Proj: one projection for moerag_attention (weight layout, shapes, pointers; bias fp32 or NULL)."""

    _fields_ = [("fmt", _I), ("n", _I), ("k", _I), ("group", _I), ("w", _P), ("scale", _P), ("bias", _P)]


class LinearArgs(ctypes.Structure):
    """native.h's LinearArgs: a Gated DeltaNet mixer for moerag_linear / moerag_blocks."""

    _fields_ = [
        *[(name, _I) for name in ("key_heads", "value_heads", "key_dim", "value_dim", "kernel")],
        ("proj", ctypes.POINTER(Proj)),
        *[(name, _P) for name in ("conv", "dt_bias", "a_log", "norm")],
        ("eps", _F),
    ]


class BlockArgs(ctypes.Structure):
    """native.h's BlockArgs: a decoder block for moerag_blocks; pointers into tensors kept alive elsewhere."""

    _fields_ = [
        *[(name, _I) for name in ("heads", "kv_heads", "head_dim", "experts", "topk", "renormalize", "fmt", "inter")],
        *[(name, _I) for name in ("group", "fmt2", "group2")],
        ("attn", ctypes.POINTER(Proj)),
        *[(name, _P) for name in ("qnorm", "knorm", "in_norm", "post_norm")],
        ("qk_eps", _F),
        ("eps", _F),
        ("router", ctypes.POINTER(Proj)),
        *[(name, _P) for name in ("w13", "s13", "w2", "s2")],
        *[(name, _I) for name in ("hidden", "rotary", "qgate", "window", "slots", "act", "routing", "n_group")],
        *[(name, _I) for name in ("topk_group", "qk_whole")],
        *[(name, _F) for name in ("alpha", "limit", "scaling", "clip")],
        *[(name, _P) for name in ("sinks", "b13", "b2", "correction")],
        ("shared", ctypes.POINTER(Proj)),
        ("linear", ctypes.POINTER(LinearArgs)),
    ]


class AbiField(ctypes.Structure):
    """native.h's AbiField: one entry of moerag_abi(), a struct or one of its fields."""

    _fields_ = [("name", ctypes.c_char_p), ("offset", _I), ("size", _I)]


MIRRORS = (Proj, LinearArgs, BlockArgs)  # the structs shared with native.h (named as there), in moerag_abi's order


def _layout(mirrors: tuple[type[ctypes.Structure], ...]) -> list[tuple[str, int, int]]:
    """What moerag_abi() reports for these mirrors: (name, offset, size) of each struct, then of its fields."""
    entries = []
    for mirror in mirrors:
        entries.append((mirror.__name__, 0, ctypes.sizeof(mirror)))
        for field, *_ in mirror._fields_:
            described = getattr(mirror, field)
            entries.append((f"{mirror.__name__}.{field}", described.offset, described.size))
    return entries


def _describe(entry: tuple[str, int, int] | None) -> str:
    return "nothing" if entry is None else f"{entry[0]} (offset {entry[1]}, {entry[2]} bytes)"


def abi_mismatch(
    lib: ctypes.CDLL, *, mirrors: tuple[type[ctypes.Structure], ...] = MIRRORS, formats: tuple[Format, ...] = FORMATS
) -> str | None:
    """The first difference between the library and Python's view of it, or None when they agree.

    Compares moerag_abi() (the ABI version; each shared struct's size, each field's name, offset
    and size, in order) with the ctypes `mirrors`, and the library's format table with `formats`
    (the name at each code).
    """
    version, count = ctypes.c_int64(), ctypes.c_int64()
    fields = lib.moerag_abi(ctypes.byref(version), ctypes.byref(count))
    if version.value != ABI_VERSION:
        return f"the ABI version is {version.value} in the library, {ABI_VERSION} in engine/native.py"
    reported = [(field.name.decode(), field.offset, field.size) for field in fields[: count.value]]
    for c_side, py_side in itertools.zip_longest(reported, _layout(mirrors)):
        if c_side != py_side:
            return f"the library has {_describe(c_side)} where engine/native.py has {_describe(py_side)}"
    for fmt in formats:
        name = lib.moerag_format_name(fmt.code)
        if name is None:
            return f"format code {fmt.code} ({fmt.name!r} in kernels/formats.py) has no row in native.c's format table"
        if name != fmt.name.encode():
            return f"format code {fmt.code} is {name.decode()!r} in native.c, {fmt.name!r} in kernels/formats.py"
    return None


def _declare(lib: ctypes.CDLL) -> None:
    """The exported functions' signatures (native.h)."""
    lib.moerag_abi.argtypes, lib.moerag_abi.restype = [ctypes.POINTER(_I), ctypes.POINTER(_I)], ctypes.POINTER(AbiField)
    lib.moerag_format_name.argtypes, lib.moerag_format_name.restype = [_I], ctypes.c_char_p
    lib.moerag_set_threads.argtypes, lib.moerag_set_threads.restype = [ctypes.c_int], None
    lib.moerag_gemv.argtypes = [ctypes.c_int, _I, _I, _I, _I, _P, _P, _P, _P]
    lib.moerag_moe.argtypes = [ctypes.c_int, ctypes.c_int, _I, _I, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P]
    lib.moerag_attention.argtypes = [_I, _I, _I, _I, _I, _I, _P, _P, _P, _P, _F, _P, _P, _P, _P, _F, _P]
    lib.moerag_blocks.argtypes = [_P, _I, _I, _I, _P, _P, _P, _P, _P, _F]
    lib.moerag_linear.argtypes = [_P, _I, _P, _P, _P, _P]
    for fn in (lib.moerag_gemv, lib.moerag_moe, lib.moerag_attention, lib.moerag_blocks, lib.moerag_linear):
        fn.restype = ctypes.c_int  # MOERAG_OK or MOERAG_NO_MEMORY (see _check)
    lib.moerag_dequantize.argtypes, lib.moerag_dequantize.restype = [ctypes.c_int, _I, _I, _I, _P, _P, _P], None
    lib.moerag_rmsnorm.argtypes, lib.moerag_rmsnorm.restype = [_I, _I, _P, _P, _F, _P], None


@cache
def library(*, scalar: bool = False) -> ctypes.CDLL | None:
    """The loaded kernels, or None (logged once) when they cannot be built, disagree with their
    Python mirrors (abi_mismatch), or MOERAG_NATIVE=0."""
    if os.environ.get("MOERAG_NATIVE", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(build(scalar=scalar)))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.warning("native CPU kernels unavailable (%s); decoding on torch alone, several times slower", detail)
        return None
    _declare(lib)
    mismatch = abi_mismatch(lib)
    if mismatch is not None:
        log.error(
            "native CPU kernels refused: %s. engine/native.h (and native.c's format table) and engine/native.py "
            "must change together; decoding on torch alone, several times slower",
            mismatch,
        )
        return None
    lib.moerag_set_threads(torch.get_num_threads())  # the kernels' own threads (see native.c)
    return lib


def _check(status: int, kernel: str) -> None:
    """Raise for a kernel's status other than MOERAG_OK (native.h): its scratch memory failed."""
    if status != 0:
        raise EngineError(
            f"The native CPU kernels ran out of memory in {kernel} (scratch buffers of the step). "
            "Free memory, decode fewer sequences at once, or run on torch alone with MOERAG_NATIVE=0."
        )


def _check_position(position: int, slots: int) -> None:
    """The kernels write the new key and value at `position` unchecked: refuse one past the cache."""
    if not 0 <= position < slots:
        raise ContextLengthError(f"Decode position {position} is outside the KV cache's {slots} positions.")


def available() -> bool:
    return library() is not None


def supports(w: torch.Tensor, fmt: Format | None = None) -> bool:
    """Whether the kernels read this weight (fp16 and others fall back to torch)."""
    return format_of(w, fmt) is not None and w.device.type == "cpu" and w.is_contiguous()


def layout(
    w: torch.Tensor, scale: torch.Tensor | None, group: int | None = None, fmt: Format | None = None
) -> tuple[int, int, int]:
    """(format code, K inputs, int4 group or fp8 / GGUF block) of a weight [.., N, stored K] (kernels/formats.py);
    `group` is fp8's block, which its shapes do not hold, `fmt` the layout its dtype does not say."""
    fmt = format_of(w, fmt)
    return fmt.code, fmt.inputs(w), fmt.group(w, scale) if group is None else group


def address(t: torch.Tensor | None) -> int | None:
    """A tensor's data pointer for the kernels, None (NULL) for no tensor."""
    return None if t is None else t.data_ptr()


def gemv(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor | None = None,
    *,
    group: int | None = None,
    fmt: Format | None = None,
    lib: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """x [M, K] fp32 @ W^T -> [M, N] fp32, for small M (decode): each weight row is read once."""
    lib = lib or library()
    fmt, k, group = layout(w, scale, group, fmt)
    x = x.contiguous()
    y = torch.empty((x.shape[0], w.shape[0]), dtype=torch.float32)  # [M, N]
    status = lib.moerag_gemv(
        fmt, x.shape[0], w.shape[0], k, group, x.data_ptr(), w.data_ptr(), address(scale), y.data_ptr()
    )
    _check(status, "moerag_gemv")
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
    group: int | None = None,
    fmt: Format | None = None,
    w2_format: Format | None = None,
    lib: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) -> [T, H] fp32, in one call (decode); w13 in
    `fmt`, w2 in `w2_format` (default: the same; GGUF's Q4_K_M keeps down in another type)."""
    lib = lib or library()
    code, hidden, group13 = layout(w13, w13_scale, group, fmt)
    code2, inter, group2 = layout(w2, w2_scale, group, w2_format or fmt)
    x, ids = x.float().contiguous(), ids.to(torch.int64).contiguous()
    weights = weights.float().contiguous()
    out = torch.empty((x.shape[0], hidden), dtype=torch.float32)  # [T, H]
    status = lib.moerag_moe(
        code, code2, ids.shape[0], ids.shape[1], hidden, inter, group13, group2, x.data_ptr(), ids.data_ptr(),
        weights.data_ptr(), w13.data_ptr(), address(w13_scale), w2.data_ptr(), address(w2_scale), out.data_ptr(),
    )  # fmt: skip
    _check(status, "moerag_moe")
    return out


def dequantize(
    w: torch.Tensor,
    scale: torch.Tensor | None = None,
    *,
    group: int | None = None,
    fmt: Format | None = None,
    lib: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """W as fp32 [N, K], for products with many rows (prefill), which torch's GEMM then runs."""
    lib = lib or library()
    fmt, k, group = layout(w, scale, group, fmt)
    out = torch.empty((w.shape[0], k), dtype=torch.float32)
    lib.moerag_dequantize(fmt, w.shape[0], k, group, w.data_ptr(), address(scale), out.data_ptr())
    return out


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [..., N] fp32 / rms * weight [N] fp32 -> fp32, for a few rows (decode)."""
    lib = lib or library()
    x = x.contiguous()
    out = torch.empty_like(x)
    lib.moerag_rmsnorm(x.numel() // x.shape[-1], x.shape[-1], x.data_ptr(), weight.data_ptr(), eps, out.data_ptr())
    return out


def parts(m: torch.nn.Module) -> tuple:
    """(weight, scale, bias, fp8 block, GGUF format) of a linear module of any stored form: what
    `projections` reads of it."""
    return m.weight, getattr(m, "scale", None), m.bias, getattr(m, "block", None), getattr(m, "format", None)


def projections(layers: list[tuple]) -> tuple[ctypes.Array, list]:
    """(weight, scale, bias), optionally + (fp8 block, format) per projection -> (a Proj array, the
    tensors it points into, to keep alive)."""
    keep, array = [], (Proj * len(layers))()
    for slot, (w, scale, bias, *extra) in zip(array, layers, strict=True):
        fmt, k, group = layout(w, scale, *extra)
        bias32 = None if bias is None else bias.float().contiguous()
        keep += [w, scale, bias32]
        slot.fmt, slot.n, slot.k, slot.group = fmt, w.shape[0], k, group
        slot.w, slot.scale, slot.bias = w.data_ptr(), address(scale), address(bias32)
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
    _check_position(position, k_cache.shape[2])
    out = torch.empty((x.shape[0], projs[3].n), dtype=torch.float32)
    status = lib.moerag_attention(
        x.shape[0], heads, kv_heads, head_dim, position, k_cache.shape[2], x.data_ptr(), projs,
        address(q_norm), address(k_norm), eps, cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        scale, out.data_ptr(),
    )  # fmt: skip
    _check(status, "moerag_attention")
    return out


class Stack:
    """Consecutive blocks for moerag_blocks: their BlockArgs in one array, and their caches' pointers."""

    def __init__(self, blocks: list[BlockArgs], caches: list[list[torch.Tensor]], first: int = 0) -> None:
        self.first = first  # the first block's index in the model
        self.args = (BlockArgs * len(blocks))(*blocks)  # copies of the structs; `blocks` keeps their tensors
        full = []  # the cache lengths of full attention: a position past one is refused
        for args, entry in zip(self.args, caches, strict=True):
            if not args.linear:
                args.slots = entry[0].shape[2]  # a sliding window's cache holds only its window
                if not args.window:
                    full.append(args.slots)
        self.blocks = blocks
        self.caches = caches
        pointers = ctypes.c_void_p * len(blocks)
        self.k = pointers(*(c[0].data_ptr() for c in caches))
        self.v = pointers(*(c[1].data_ptr() for c in caches))
        self.smax = min(full, default=None)


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
    decode_block in native.c): x [B, H] fp32 -> new x; each block's new key and value go into its cache."""
    lib = lib or library()
    if stack.smax is not None:
        _check_position(position, stack.smax)
    x = x.contiguous().clone()  # updated in place by the kernel
    status = lib.moerag_blocks(
        stack.args, len(stack.blocks), x.shape[0], position, x.data_ptr(), cos.data_ptr(),
        sin.data_ptr(), stack.k, stack.v, scale,
    )  # fmt: skip
    _check(status, "moerag_blocks")
    return x
