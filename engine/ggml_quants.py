"""GGUF block-quantized weights (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K) kept as the file stores them: the modules.

A GGUF tensor of a block type loads as its raw blocks, uint8 [N, K / block * bytes] (the layouts
are in kernels/formats.py), into a module that carries its Format and passes it to every kernel,
since uint8 alone does not say which layout it is. The loader swaps the modules whose weights the
file stores in blocks on the meta device before filling them (`make_gguf`); other block tensors
(the embedding) are widened to floats as they are read. Shapes: N outputs, K inputs, E experts,
H hidden, I expert width.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.errors import CheckpointError
from engine.experts import EXPERT_BACKENDS
from engine.layers import StoredWeights, child, linear, swap
from engine.moe import Experts
from engine.qmatmul import linear as qlinear
from kernels.formats import CHUNK_ELEMENTS, Format, dequantize

_EXPERT_PROJS = {"gate_proj": "gate_up", "up_proj": "gate_up", "down_proj": "down"}  # per expert
_STACKED_PROJS = {"gate_up_proj": "gate_up", "down_proj": "down"}  # every expert in one tensor


class GGUFLinear(StoredWeights):
    """A Linear whose weight is GGUF blocks [N, K / block * bytes] uint8 in `format`; same call."""

    def __init__(self, layer: nn.Linear, fmt: Format) -> None:
        super().__init__()
        shape = fmt.stored_shape((layer.out_features, layer.in_features))
        self.register_buffer("weight", torch.empty(shape, dtype=torch.uint8, device=layer.weight.device))
        self.bias = layer.bias
        self.format = fmt
        self.float_dtype = layer.weight.dtype  # what `to_float` gives back

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qlinear(x, self.weight, None, self.bias, fmt=self.format)

    def to_float(self) -> nn.Linear:
        """This layer dequantized, as the float Linear it stands for (in the model dtype)."""
        w = _widened(self.weight, self.format, self.float_dtype)  # [N, K]
        with torch.device("meta"):
            layer = linear(w.shape[1], w.shape[0])
        layer.weight = nn.Parameter(w, requires_grad=False)
        layer.bias = self.bias
        return layer


class GGUFExperts(StoredWeights):
    """Stacked experts as GGUF blocks: gate_up_proj [E, 2I, H / block * bytes] in `gate_up_format`,
    down_proj [E, H, I / block * bytes] in `down_format` (Q4_K_M files often store down in Q6_K)."""

    def __init__(self, experts: Experts, gate_up: Format, down: Format) -> None:
        super().__init__()
        for name, fmt in (("gate_up_proj", gate_up), ("down_proj", down)):
            w = getattr(experts, name)
            self.register_buffer(name, torch.empty(fmt.stored_shape(w.shape), dtype=torch.uint8, device=w.device))
        self.gate_up_format, self.down_format = gate_up, down
        self.backend = experts.backend
        self.float_dtype = experts.gate_up_proj.dtype

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return EXPERT_BACKENDS[self.backend](
            x, self.gate_up_proj, self.down_proj, weights, ids,
            w13_format=self.gate_up_format, w2_format=self.down_format,
        )  # fmt: skip

    def float_inputs(self, name: str) -> int:
        """K of the float weight `name` ("gate_up_proj" or "down_proj") these blocks stand for."""
        return self._format(name).inputs(getattr(self, name))

    def widened(self, name: str) -> torch.Tensor:
        """The float weight `name` in the model dtype ([E, 2I, H] or [E, H, I]), the others untouched."""
        return _widened(getattr(self, name), self._format(name), self.float_dtype)

    def _format(self, name: str) -> Format:
        return self.gate_up_format if name == "gate_up_proj" else self.down_format

    def to_float(self) -> Experts:
        """These experts dequantized, as the float Experts they stand for (in the model dtype)."""
        w13, w2 = self.widened("gate_up_proj"), self.widened("down_proj")  # [E, 2I, H], [E, H, I]
        with torch.device("meta"):
            experts = Experts(w13.shape[0], w13.shape[2], w13.shape[1] // 2, backend=self.backend)
        experts.gate_up_proj = nn.Parameter(w13, requires_grad=False)
        experts.down_proj = nn.Parameter(w2, requires_grad=False)
        return experts


def _widened(w: torch.Tensor, fmt: Format, dtype: torch.dtype) -> torch.Tensor:
    """Blocks [.., N, K / block * bytes] -> [.., N, K] in `dtype`, a slice of rows at a time, so
    re-quantizing while loading never holds a whole stacked expert tensor in fp32 (as engine.fp8 does)."""
    rows = w.reshape(-1, w.shape[-1])  # [R, bytes]
    k = fmt.inputs(w)
    out = torch.empty((rows.shape[0], k), dtype=dtype, device=w.device)  # [R, K]
    step = max(1, CHUNK_ELEMENTS // k)
    for start in range(0, rows.shape[0], step):
        out[start : start + step] = dequantize(rows[start : start + step], None, fmt=fmt).to(dtype)
    return out.view(*w.shape[:-1], k)


GGUF_MODULES = (GGUFLinear, GGUFExperts)


def make_gguf(net: nn.Module, formats: dict[str, Format]) -> set[str]:
    """Swap the Linears and stacked Experts whose weights the file stores in blocks for GGUF modules.

    `formats`: weight name (as the engine's modules name it; for experts per expert,
    `...experts.3.gate_proj.weight`, or stacked, `...experts.gate_up_proj`) -> its block format. Returns the names now read as raw blocks;
    the others stay float (their blocks are widened as they are read). Experts need every expert's
    gate, up and down in blocks, gate and up in one format (they share one stacked tensor).
    """
    linears: dict[str, Format] = {}
    experts: dict[str, dict[str, set[Format]]] = {}  # module path -> "gate_up" / "down" -> formats
    for name, fmt in formats.items():
        parts = name.removesuffix(".weight").split(".")
        if len(parts) >= 3 and parts[-3] == "experts" and parts[-2].isdigit() and parts[-1] in _EXPERT_PROJS:
            experts.setdefault(".".join(parts[:-2]), {}).setdefault(_EXPERT_PROJS[parts[-1]], set()).add(fmt)
        elif len(parts) >= 2 and parts[-2] == "experts" and parts[-1] in _STACKED_PROJS:
            experts.setdefault(".".join(parts[:-1]), {}).setdefault(_STACKED_PROJS[parts[-1]], set()).add(fmt)
        else:
            linears[".".join(parts)] = fmt
    kept: set[str] = set()
    for path, fmt in linears.items():
        if isinstance(child(net, path), nn.Linear):
            swap(net, path, GGUFLinear(child(net, path), fmt))
            kept.add(f"{path}.weight")
    for path, found in experts.items():
        module = child(net, path)
        if not isinstance(module, Experts):
            continue
        if len(found.get("gate_up", ())) != 1 or len(found.get("down", ())) != 1:
            raise CheckpointError(
                f"The experts of {path} mix GGUF tensor types within gate and up, or hold only some of their "
                f"tensors in blocks ({ {k: sorted(f.name for f in v) for k, v in found.items()} }); "
                "the engine stores gate and up as one tensor in one format."
            )
        swap(net, path, GGUFExperts(module, *found["gate_up"], *found["down"]))
        kept |= {n for n in formats if n.startswith(f"{path}.")}
    return kept
