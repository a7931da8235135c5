"""Reading safetensors files with plain reads (no mmap), tensor by tensor.

A safetensors file is an 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}}, then the raw bytes. Reading with `readinto` instead of
mmap keeps the file's pages out of the process's resident memory, so peak RSS while loading
is the model being built plus one tensor, not the whole checkpoint file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, BinaryIO

import torch

from engine.errors import CheckpointError

CHUNK_BYTES = 16 << 20  # read_into's largest temporary

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class TensorFile:
    """One open safetensors file: `names`, `metadata`, and `get(name)` -> a fresh CPU tensor."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed by close()
        try:
            (length,) = struct.unpack("<Q", self._file.read(8))
            header = json.loads(self._file.read(length))
            self._base = 8 + length
            self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
            self._entries: dict[str, dict[str, Any]] = header
            self._size = path.stat().st_size
            self._scratch: torch.Tensor | None = None
        except (OSError, struct.error, ValueError) as exc:
            self.close()
            raise CheckpointError(f"Cannot read {path}: {exc}. The file may be truncated; download it again.") from exc

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def read_into(self, name: str, dst: torch.Tensor) -> None:
        """Copy tensor `name` into `dst` (same shape, any dtype, on the CPU), a slice of rows at a time.

        Same dtype and contiguous: read straight into dst. Otherwise through one reused scratch
        buffer of at most CHUNK_BYTES: no fp32 copy of a stacked expert tensor beside the model,
        and no fresh allocation (and page faults) per tensor.
        """
        entry = self._entries[name]
        start, end = entry["data_offsets"]
        dtype = self._dtype(name)
        if dtype == dst.dtype and dst.is_contiguous() and dst.device.type == "cpu":
            self._read(name, start, end, dst)
            return
        rows = dst.shape[0] if dst.dim() else 1
        row_bytes = (end - start) // max(rows, 1)
        step = max(1, CHUNK_BYTES // max(row_bytes, 1))
        if self._scratch is None or self._scratch.numel() < min(step, rows) * row_bytes:
            self._scratch = torch.empty(max(CHUNK_BYTES, row_bytes), dtype=torch.uint8)
        for begin in range(0, rows, step):
            n = min(step, rows - begin)
            part = self._scratch[: n * row_bytes]
            self._read(name, start + begin * row_bytes, start + (begin + n) * row_bytes, part)
            src = part.view(dtype).view(n, *dst.shape[1:]) if dst.dim() else part.view(dtype).view(())
            if dst.dim():
                dst[begin : begin + n].copy_(src)
            else:
                dst.copy_(src)

    def _dtype(self, name: str) -> torch.dtype:
        dtype = DTYPES.get(self._entries[name]["dtype"])
        if dtype is None:
            raise CheckpointError(
                f"{self.path}: tensor {name} has dtype {self._entries[name]['dtype']}, which the engine cannot read."
            )
        return dtype

    def _read(self, name: str, start: int, end: int, out: torch.Tensor) -> None:
        """Bytes start..end of the data section into `out` (contiguous, end - start bytes)."""
        if self._base + end > self._size:
            raise CheckpointError(f"Cannot read {name} from {self.path}: the file is truncated; download it again.")
        if end > start:
            self._file.seek(self._base + start)
            if self._file.readinto(memoryview(out.view(-1).view(torch.uint8).numpy())) != end - start:
                raise CheckpointError(f"Cannot read {name} from {self.path}: short read; download it again.")

    def rows(self, name: str, begin: int, end: int) -> torch.Tensor:
        """Slices begin..end of tensor `name`'s first dimension, as a fresh CPU tensor."""
        entry = self._entries[name]
        first, *rest = entry["shape"]
        start, stop = entry["data_offsets"]
        row_bytes = (stop - start) // max(first, 1)
        end = min(end, first)
        out = torch.empty((max(end - begin, 0), *rest), dtype=self._dtype(name))
        self._read(name, start + begin * row_bytes, start + end * row_bytes, out)
        return out

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name` as a fresh CPU tensor."""
        entry = self._entries[name]
        out = torch.empty(entry["shape"], dtype=self._dtype(name))
        self._read(name, *entry["data_offsets"], out)
        return out

    def close(self) -> None:
        self._file.close()
