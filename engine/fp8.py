"""FP8 block-scaled checkpoints (DeepSeek-V3's layout), kept 8-bit: what config.json says, and the modules.

config.json's quantization_config {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [Bo, B]}
marks a checkpoint whose quantized X.weight is float8_e4m3fn [N, K] with X.weight_scale_inv fp32
[ceil(N/Bo), ceil(K/B)]: w = q * weight_scale_inv[n // Bo, k // B]. Which modules are FP8 is
what the checkpoint holds: those whose weight has a weight_scale_inv (norms, embeddings, routers
and usually the head stay float). The loader swaps them on the meta device before filling them
(`make_fp8`); their scales are stored repeated over their Bo rows (kernels/formats.py, fp8).
Shapes: N outputs, K inputs, E experts, H hidden, I expert width.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.errors import CheckpointError
from engine.experts import EXPERT_BACKENDS
from engine.layers import StoredWeights, child, linear, swap
from engine.moe import Experts
from engine.qmatmul import linear as qlinear
from engine.quant_methods import quant_method, refusal
from kernels.formats import CHUNK_ELEMENTS, FP8, dequantize

SCALE_SUFFIX = ".weight_scale_inv"  # the checkpoint's name for a quantized weight's block scales


@dataclass(frozen=True)
class Fp8Blocks:
    """A checkpoint's FP8 scale blocks: `rows` (Bo) outputs by `inputs` (B) inputs."""

    rows: int
    inputs: int


def checkpoint_fp8(config: dict[str, Any], directory: Path) -> Fp8Blocks | None:
    """The FP8 blocks config.json's quantization_config declares, None without one or for another
    loadable method; a CheckpointError naming what cannot load (an unknown quant_method, fmt e5m2,
    per-tensor scales, static activations)."""
    if quant_method(config, directory) != "fp8":
        return None
    section = config["quantization_config"]

    def refuse(what: str) -> CheckpointError:
        return refusal(directory / "config.json", what)

    if section.get("fmt", "e4m3") != "e4m3":
        raise refuse(f"fp8 fmt {section['fmt']!r}")
    if section.get("activation_scheme", "dynamic") != "dynamic":
        raise refuse(f"activation_scheme {section['activation_scheme']!r} (input scales)")
    block = section.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise refuse(f"weight_block_size {block!r} (per-tensor fp8 scales, or a damaged section)")
    return Fp8Blocks(*block)


class Fp8Linear(StoredWeights):
    """A Linear whose weight is float8_e4m3fn [N, K] with fp32 scales [N, ceil(K/block)]; same call."""

    def __init__(self, layer: nn.Linear, block: int) -> None:
        super().__init__()
        n, k, device = layer.out_features, layer.in_features, layer.weight.device
        self.register_buffer("weight", torch.empty(n, k, dtype=FP8.dtype, device=device))
        self.register_buffer("scale", torch.empty(n, -(-k // block), dtype=torch.float32, device=device))
        self.bias = layer.bias
        self.block = block  # inputs per scale (B); not recoverable from the shapes
        self.float_dtype = layer.weight.dtype  # what `to_float` gives back

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qlinear(x, self.weight, self.scale, self.bias, self.block)

    def to_float(self) -> nn.Linear:
        """This layer dequantized, as the float Linear it stands for (in the model dtype)."""
        with torch.device("meta"):
            layer = linear(self.weight.shape[1], self.weight.shape[0])
        layer.weight = nn.Parameter(_dequantized(self.weight, self.scale, self.block, self.float_dtype), False)
        layer.bias = self.bias
        return layer


class Fp8Experts(StoredWeights):
    """Stacked float8_e4m3fn experts with their block scales; same call as `Experts`."""

    def __init__(self, experts: Experts, block: int) -> None:
        super().__init__()
        for name in ("gate_up_proj", "down_proj"):  # [E, 2I, H], [E, H, I]
            w = getattr(experts, name)
            scale_shape = (*w.shape[:-1], -(-w.shape[-1] // block))  # [E, N, ceil(K/B)]
            self.register_buffer(name, torch.empty(w.shape, dtype=FP8.dtype, device=w.device))
            self.register_buffer(name.replace("_proj", "_scale"), torch.empty(scale_shape, device=w.device))
        self.backend = experts.backend
        self.block = block
        self.float_dtype = experts.gate_up_proj.dtype

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return EXPERT_BACKENDS[self.backend](
            x, self.gate_up_proj, self.down_proj, weights, ids,
            w13_scale=self.gate_up_scale, w2_scale=self.down_scale, group=self.block,
        )  # fmt: skip

    def float_inputs(self, name: str) -> int:
        """K of the float weight `name` ("gate_up_proj" or "down_proj"): fp8 stores one byte an input."""
        return getattr(self, name).shape[-1]

    def widened(self, name: str) -> torch.Tensor:
        """The float weight `name` in the model dtype ([E, 2I, H] or [E, H, I]), the other untouched."""
        return _dequantized(
            getattr(self, name), getattr(self, name.replace("_proj", "_scale")), self.block, self.float_dtype
        )

    def to_float(self) -> Experts:
        """These experts dequantized, as the float Experts they stand for (in the model dtype)."""
        e, width, hidden = self.gate_up_proj.shape
        with torch.device("meta"):
            experts = Experts(e, hidden, width // 2, backend=self.backend)
        for name in ("gate_up_proj", "down_proj"):
            setattr(experts, name, nn.Parameter(self.widened(name), requires_grad=False))
        return experts


def _dequantized(w: torch.Tensor, scale: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor:
    """fp8 w [.., N, K] with its scales -> [.., N, K] in `dtype`, a slice of rows at a time.

    Re-quantizing while loading goes through this: dequantizing a stacked expert tensor whole
    made fp32 temporaries twice its bf16 size, and the load's peak memory 2.1x the int4 model
    instead of the 1.4x of a bf16 source (bench model, --load-memory).
    """
    rows, scales = w.reshape(-1, w.shape[-1]), scale.reshape(-1, scale.shape[-1])
    out = torch.empty(rows.shape, dtype=dtype, device=w.device)
    step = max(1, CHUNK_ELEMENTS // max(rows.shape[1], 1))
    for start in range(0, rows.shape[0], step):
        part = slice(start, start + step)
        out[part] = dequantize(rows[part], scales[part], block).to(dtype)
    return out.view(w.shape)


FP8_MODULES = (Fp8Linear, Fp8Experts)


def refuse_nan(w: torch.Tensor, where: str) -> None:
    """A CheckpointError if fp8 weights hold e4m3fn's NaN (bytes 0x7F / 0xFF): the kernels read every
    byte as a number (NaN as 480), so a damaged tensor would give finite, wrong answers."""
    nan = (w.view(torch.uint8) & 0x7F) == 0x7F
    if bool(nan.any()):
        raise CheckpointError(f"{where} holds {int(nan.sum())} NaN fp8 weight(s); the file is damaged.")


def make_fp8(net: nn.Module, scaled: list[str], block: int) -> int:
    """Swap the modules whose weights have scales for their FP8 stand-ins; returns the count.

    `scaled`: the checkpoint's weight_scale_inv names, renamed to the engine's modules. A per-expert
    name (`...experts.3.gate_proj.weight_scale_inv`) makes its stacked Experts FP8. Names that
    point at no Linear or Experts are left alone: the loader then reports them as unexpected.
    """
    targets = set()
    for name in scaled:
        path = name.removesuffix(SCALE_SUFFIX)
        parts = path.split(".")
        if len(parts) >= 3 and parts[-3] == "experts" and parts[-2].isdigit():
            path = ".".join(parts[:-2])
        targets.add(path)
    swaps = 0
    for path in sorted(targets):
        module = child(net, path)
        if isinstance(module, Experts):
            swap(net, path, Fp8Experts(module, block))
        elif isinstance(module, nn.Linear):
            swap(net, path, Fp8Linear(module, block))
        else:
            continue
        swaps += 1
    return swaps
