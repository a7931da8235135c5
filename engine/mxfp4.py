"""MXFP4 checkpoints (gpt-oss's layout), kept at 4.25 bits a weight: the shards read as block tensors.

config.json's quantization_config {"quant_method": "mxfp4"} marks a checkpoint whose quantized
tensors come in pairs: `P_blocks` uint8 [.., N, K/32, 16], two e2m1 codes a byte (input 2j in the
low nibble of byte j, 2j + 1 in the high one), and `P_scales` uint8 [.., N, K/32], one e8m0
exponent per 32 inputs: w = E2M1[code] * 2^(scale - 127) (the OCP microscaling format). P is the
float tensor's name (`...experts.gate_up_proj` in gpt-oss, `...experts.3.down_proj.weight` for a
per-expert layout); which tensors are MXFP4 is what the checkpoint holds.

Each pair is served as tensor P in kernels/formats.py's MXFP4 blocks (ggml's block_mxfp4: the
exponent byte, then 16 bytes with input j low and 16 + j high), repacked a slice of rows at a
time and losslessly, so the modules and kernels that read GGUF's MXFP4 read these too
(engine/ggml_quants.py; the loader treats these shards as it treats a GGUF's).
"""

from __future__ import annotations

import math

import torch

from engine.errors import CheckpointError, TensorShapeError
from engine.tensorfile import CHUNK_BYTES, TensorFile
from kernels.formats import MXFP4, dequantize

BLOCKS, SCALES = "_blocks", "_scales"
_NAN_EXPONENT = 255  # e8m0's one non-number


def repack(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """OCP blocks [.., G, 16] uint8 and e8m0 scales [.., G] -> MXFP4 blocks [.., G * 17] uint8."""
    codes = torch.stack([blocks & 15, blocks >> 4], dim=-1).flatten(-2)  # [.., G, 32], in input order
    qs = codes[..., :16] | (codes[..., 16:] << 4)  # [.., G, 16]: input j low, 16 + j high
    return torch.cat([scales[..., None], qs], dim=-1).flatten(-2)


class Mxfp4Tensors:
    """One safetensors shard of an MXFP4 checkpoint, read like any shard: each `P_blocks` /
    `P_scales` pair is tensor P, served as floats or, once kept (`keep_blocks`), as MXFP4 blocks."""

    def __init__(self, file: TensorFile) -> None:
        self.path, self._file = file.path, file
        names = set(file.names)
        self._pairs = {n.removesuffix(BLOCKS): n for n in names if n.endswith(BLOCKS)}  # P -> P_blocks
        for name in [n for n in names if n.endswith(SCALES)]:
            if name.removesuffix(SCALES) not in self._pairs:
                raise CheckpointError(f"{self.path}: {name} has no {name.removesuffix(SCALES)}{BLOCKS} beside it.")
        for p in self._pairs:
            blocks, scales = file.shape(p + BLOCKS), file.shape(p + SCALES) if p + SCALES in names else None
            if scales is None:
                raise CheckpointError(f"{self.path}: {p}{BLOCKS} has no {p}{SCALES} beside it.")
            if len(blocks) < 3 or blocks[-1] != 16 or tuple(blocks[:-1]) != tuple(scales):
                raise TensorShapeError(
                    f"{self.path}: {p}{BLOCKS} {tuple(blocks)} and {p}{SCALES} {tuple(scales)} are not MXFP4 "
                    "blocks [.., N, K/32, 16] with scales [.., N, K/32]."
                )
        self._plain = sorted(names - {p + s for p in self._pairs for s in (BLOCKS, SCALES)})
        self._raw: set[str] = set()

    @property
    def names(self) -> list[str]:
        return self._plain + sorted(self._pairs)

    @property
    def formats(self) -> dict[str, object]:
        """The tensors a module could keep as MXFP4 blocks: name -> format."""
        return dict.fromkeys(self._pairs, MXFP4)

    def keep_blocks(self, names: set[str]) -> None:
        """Serve these tensors as MXFP4 blocks [.., N, K / 32 * 17] from now on (their modules hold blocks)."""
        self._raw = names & set(self._pairs)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._pairs:
            return self._file.shape(name)
        *lead, groups, _ = self._file.shape(self._pairs[name])
        return (*lead, groups * (MXFP4.block_bytes if name in self._raw else MXFP4.block))

    def get(self, name: str) -> torch.Tensor:
        if name not in self._pairs:
            return self._file.get(name)
        out = torch.empty(self.shape(name), dtype=torch.uint8 if name in self._raw else torch.float32)
        self.read_into(name, out)
        return out

    def read_into(self, name: str, dst: torch.Tensor) -> None:
        """Tensor `name` into `dst`: MXFP4 blocks when kept, else dequantized to dst's dtype; a
        slice of the leading dimension at a time (one expert of a stacked tensor, or rows)."""
        if name not in self._pairs:
            self._file.read_into(name, dst)
            return
        first, *rest = self._file.shape(self._pairs[name])
        step = max(1, CHUNK_BYTES // max(math.prod(rest) * 2 * 4, 1))  # fp32 temporaries of ~CHUNK_BYTES
        for begin in range(0, first, step):
            blocks = self._file.rows(self._pairs[name], begin, begin + step)  # [s, .., N, K/32, 16]
            scales = self._file.rows(name + SCALES, begin, begin + step)  # [s, .., N, K/32]
            if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
                raise CheckpointError(f"{self.path}: {name}{BLOCKS} and {name}{SCALES} must be uint8 (U8) tensors.")
            if bool((scales == _NAN_EXPONENT).any()):
                raise CheckpointError(
                    f"{self.path}: {name}{SCALES} holds e8m0's NaN exponent (255); the file is damaged."
                )
            part = repack(blocks, scales)  # [s, .., N, K/32*17]
            dst[begin : begin + step].copy_(part if name in self._raw else dequantize(part, None, fmt=MXFP4))

    def close(self) -> None:
        self._file.close()
