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
        except (OSError, struct.error, ValueError) as exc:
            self.close()
            raise CheckpointError(f"Cannot read {path}: {exc}. The file may be truncated; download it again.") from exc

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        start, end = entry["data_offsets"]
        dtype = DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(
                f"{self.path}: tensor {name} has dtype {entry['dtype']}, which the engine cannot read."
            )
        if self._base + end > self._size:
            raise CheckpointError(f"Cannot read {name} from {self.path}: the file is truncated; download it again.")
        out = torch.empty(entry["shape"], dtype=dtype)
        buf = out.view(-1).view(torch.uint8) if out.numel() else out
        self._file.seek(self._base + start)
        if out.numel() and self._file.readinto(memoryview(buf.numpy())) != end - start:
            raise CheckpointError(f"Cannot read {name} from {self.path}: short read; download it again.")
        return out

    def close(self) -> None:
        self._file.close()
