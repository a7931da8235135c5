"""Decode-product rates of the native kernels at the bench model's shapes: this tree vs a git revision, one process.

Each side's engine/native*.c is compiled apart (same flags as engine/native.py) and loaded with ctypes;
products are timed in alternation, so a neighbour slowing the shared VM slows both alike. Rates are
weight bytes / s over a weight larger than the L3 cache (decode reads every weight from memory once),
median of the rounds, for mxfp4 and int4 g128 (both ~4.25 bits a weight) at K = 384 (the bench's
experts' down), 1024 (gate / up, attention) and 4096.

    .venv/bin/python bench/block_kernels.py [--base HEAD] [--rounds 7] [--formats mxfp4 "int4 g128"]
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not bench/, comes first

import torch

from engine import native
from kernels.formats import GGUF_FORMATS, Format, quantize_int4

ROOT = Path(__file__).resolve().parents[1]


def compile_sources(sources: Path, into: Path) -> ctypes.CDLL:
    """The kernels in `sources` (a folder holding native.c and what it includes), built and loaded."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    out = into / f"{sources.name}.so"
    flags = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11"]
    subprocess.run([compiler, *flags, str(sources / "native.c"), "-o", str(out), "-lm"], check=True)
    lib = ctypes.CDLL(str(out))
    # moerag_gemv alone (native.h): older revisions lack later exports, which native._declare names
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.moerag_gemv.argtypes = [ctypes.c_int, i64, i64, i64, i64, ptr, ptr, ptr, ptr]
    lib.moerag_gemv.restype = ctypes.c_int
    lib.moerag_set_threads.argtypes = [ctypes.c_int]
    lib.moerag_set_threads(torch.get_num_threads())
    return lib


def sources_at(rev: str | None, into: Path) -> Path:
    """engine/native*.[ch] of git revision `rev` (None: this tree) copied into a folder of their own."""
    folder = into / (rev or "tree")
    folder.mkdir()
    if rev is None:
        for path in native.sources():
            shutil.copy(path, folder)
        return folder
    names = subprocess.run(
        ["git", "-C", str(ROOT), "ls-tree", "--name-only", rev, "engine/"], capture_output=True, text=True, check=True
    ).stdout.split()
    for name in names:
        if Path(name).name.startswith("native") and name.endswith((".c", ".h")):
            text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{name}"], capture_output=True, check=True)
            (folder / Path(name).name).write_bytes(text.stdout)
    return folder


def weight(name: str, k: int, nbytes: int) -> tuple[torch.Tensor, torch.Tensor | None, Format | None]:
    """A random [N, K] weight of about `nbytes` in format `name`: (w, scale, fmt)."""
    if name == "int4 g128":
        n = int(nbytes / (0.5 + 4 / 128) / k) // 64 * 64
        w, scale = quantize_int4(torch.randn(n, k) * 0.02, 128)
        return w, scale, None
    fmt = GGUF_FORMATS[name.upper()]
    n = int(nbytes / (fmt.block_bytes / fmt.block) / k) // 64 * 64
    w = torch.randint(0, 256, fmt.stored_shape((n, k)), dtype=torch.uint8)
    if name == "mxfp4":  # exponents near 1, as checkpoints' (random bytes below 64 are fp32 subnormals)
        w.view(-1, fmt.block_bytes)[:, 0] = torch.randint(118, 126, (w.numel() // fmt.block_bytes,), dtype=torch.uint8)
    return w, None, fmt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="git revision to compare with")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--formats", nargs="+", default=["mxfp4", "int4 g128"])
    parser.add_argument("--ks", nargs="+", type=int, default=[384, 1024, 4096])
    parser.add_argument("--mib", type=float, default=128, help="weight size per product (above the L3 cache)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    with tempfile.TemporaryDirectory() as tmp:
        libs = {
            side: compile_sources(sources_at(rev, Path(tmp)), Path(tmp))
            for side, rev in (("base", opts.base), ("this", None))
        }
        print(f"GB/s of weights, median of {opts.rounds} alternating rounds; threads {torch.get_num_threads()}")
        print(f"{'format':10} {'K':>5} {'base':>7} {'this':>7} {'this/base':>10}")
        for name in opts.formats:
            for k in opts.ks:
                w, scale, fmt = weight(name, k, int(opts.mib * 2**20))
                x = torch.randn(1, k)
                ref = native.gemv(x, w, scale, fmt=fmt, lib=libs["base"])
                got = native.gemv(x, w, scale, fmt=fmt, lib=libs["this"])
                assert torch.allclose(ref, got, rtol=1e-3, atol=1e-3 * float(ref.abs().max())), (name, k)
                size = w.nbytes + (scale.nbytes if scale is not None else 0)
                rates: dict[str, list[float]] = {side: [] for side in libs}
                for r in range(opts.rounds):
                    for side in ("base", "this") if r % 2 == 0 else ("this", "base"):
                        start = time.perf_counter()
                        native.gemv(x, w, scale, fmt=fmt, lib=libs[side])
                        rates[side].append(size / (time.perf_counter() - start) / 1e9)
                base, this = (statistics.median(rates[side]) for side in ("base", "this"))
                print(f"{name:10} {k:5} {base:7.1f} {this:7.1f} {this / base:10.2f}")
                del w, scale


if __name__ == "__main__":
    main()
