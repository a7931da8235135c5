"""GPTQ and AWQ int4 checkpoints, kept 4-bit: what config.json says, the repacking, and the modules.

Both store w = (q - zero) * scale per group of inputs, with q and zero 4-bit in int32 words and
fp16 scales [G, N]; they differ in the packing. GPTQ (quant_method "gptq"): X.qweight [K/8, N]
(input 8r + i in bits 4i of row r), X.qzeros [G, N/8] (output 8c + i in bits 4i of column c),
X.g_idx [K] the group of each input; checkpoint_format "gptq" (v1) stores zero - 1, "gptq_v2"
the zero itself. AWQ (quant_method "awq", version "gemm"): X.qweight [K, N/8] and X.qzeros
[G, N/8] with outputs 8c + (0, 2, 4, 6, 1, 3, 5, 7) in bits 0, 4, .., 28 of column c.
The loader repacks each module exactly into int4zp (kernels/formats.py): packed [N, K/2] uint8,
(scale, zero) [N, G, 2] fp16, served by `Int4Tensors` under the names the modules hold.

Act-order (desc_act with a g_idx that is not input // group): a group's inputs are scattered.
Sorting the inputs by group (stable) makes every group contiguous; the module keeps that
permutation and applies it to x first, which is exact. Experts fold down's permutation into
gate and up's output rows (exact, and free); gate and up's own, per expert, take a slower
path (`ActOrderExperts`). Modules whose inputs are permuted hold their weights as int32 words
(the bytes of packed [.., N, K/2]), a layout no kernel reads by itself: the native decode
backend leaves them to their forward, which permutes x before the int4zp product.
Shapes: N outputs, K inputs, G groups, E experts, H hidden, I expert width, T tokens.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import CheckpointError
from engine.experts import EXPERT_BACKENDS
from engine.layers import StoredWeights, child, linear, swap
from engine.moe import Experts
from engine.qmatmul import dequantize as dequantize_native
from engine.qmatmul import linear as qlinear
from engine.qmatmul import matmul
from engine.quant_methods import quant_method, refusal
from engine.tensorfile import TensorFile
from kernels.formats import CHUNK, INT4ZP, pack_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the output held by nibble i of an AWQ word
GROUPS = (32, 64, 128, 256)  # group sizes the int4 kernels take (a multiple of CHUNK, at most 256)
_SHIFTS = range(0, 32, 4)  # nibble i of an int32 word: bits 4i .. 4i + 3
_PARTS = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
_EXPERT = re.compile(r"(?P<experts>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)")


@dataclass(frozen=True)
class Int4Checkpoint:
    """What a GPTQ or AWQ quantization_config says about its int4 tensors."""

    method: str  # "gptq" or "awq"
    group: int  # inputs per scale; -1: one group per output channel
    sym: bool
    desc_act: bool
    v1_zeros: bool  # GPTQ's checkpoint_format "gptq": stored zeros are zero - 1

    def describe(self) -> str:
        """In words, for `moerag model info`: "gptq int4 (group 128, asym, act-order)"."""
        group = "per channel" if self.group == -1 else f"group {self.group}"
        extra = [group, "sym" if self.sym else "asym"]
        if self.method == "gptq" and self.desc_act:
            extra.append("act-order")
        if self.method == "awq":
            extra.append("gemm")
        return f"{self.method} int4 ({', '.join(extra)}, kept 4-bit)"


def checkpoint_int4(config: dict[str, Any], directory: Path) -> Int4Checkpoint | None:
    """The GPTQ / AWQ section of config.json, None for none or another method; a CheckpointError naming
    what cannot load (bits other than 4, exllama / marlin / gemv packings, other group sizes)."""
    method = quant_method(config, directory)
    if method not in ("gptq", "awq"):
        return None
    section = config["quantization_config"]

    def refuse(what: str) -> CheckpointError:
        return refusal(directory / "config.json", what)

    bits = section.get("bits", section.get("w_bit", 4))
    if bits != 4:
        raise refuse(f"{method} bits {bits!r}")
    group = section.get("group_size", section.get("q_group_size", 128))
    if group != -1 and group not in GROUPS:
        raise refuse(f"{method} group_size {group!r}")
    if method == "awq":
        version = str(section.get("version", "gemm")).lower()
        if version != "gemm":
            raise refuse(f"awq version {section['version']!r}")
        if section.get("zero_point", True) is not True:
            raise refuse("awq zero_point false")
        return Int4Checkpoint("awq", group, sym=False, desc_act=False, v1_zeros=False)
    packing = section.get("checkpoint_format", "gptq")
    if packing not in ("gptq", "gptq_v2") or section.get("is_marlin_format"):
        raise refuse(f"gptq checkpoint_format {'marlin' if section.get('is_marlin_format') else packing!r}")
    return Int4Checkpoint(
        "gptq", group, sym=bool(section.get("sym", True)), desc_act=bool(section.get("desc_act", False)),
        v1_zeros=packing == "gptq",
    )  # fmt: skip


# The checkpoint layouts -> q [N, K] (0..15), zero and scale [G, N] fp32.


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 words [R, C] -> uint8 [R, C, 8]: nibble i of each word (one nibble at a time: no int32
    temporary eight times the words)."""
    out = torch.empty((*words.shape, 8), dtype=torch.uint8)
    for i, shift in enumerate(_SHIFTS):
        out[..., i] = (words >> shift) & 15
    return out


def _unpack_outputs(words: torch.Tensor, awq: bool) -> torch.Tensor:
    """[R, N/8] int32, eight outputs a word -> [R, N]: GPTQ in order, AWQ in AWQ_ORDER."""
    q = _nibbles(words)  # [R, N/8, 8]: nibble i
    if awq:
        q = q[..., [AWQ_ORDER.index(j) for j in range(8)]]  # output j sits in nibble AWQ_ORDER.index(j)
    return q.flatten(-2)


def unpack(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, method: str, *, v1_zeros: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A module's checkpoint tensors -> (q [N, K] uint8, zero [G, N] fp32, scale [G, N] fp32)."""
    if method == "awq":
        q = _unpack_outputs(qweight, awq=True).T  # [K, N] -> [N, K]
    else:
        q = _nibbles(qweight.T).flatten(-2)  # [N, K/8, 8] -> [N, K]: input 8r + i is nibble i of row r
    zero = _unpack_outputs(qzeros, awq=method == "awq").float()  # [G, N]
    return q.contiguous(), zero + 1 if v1_zeros else zero, scales.float()


@dataclass
class Repacked:
    """One module in int4zp: packed [N, K/2] uint8, scale_zero [N, G', 2] fp16, perm [K] or None
    (x[..., perm] meets the packed inputs; None when the groups are contiguous already)."""

    packed: torch.Tensor
    scale_zero: torch.Tensor
    perm: torch.Tensor | None


def act_order(g_idx: torch.Tensor | None, k: int, group: int, where: str) -> torch.Tensor | None:
    """The input permutation that makes each group contiguous, None when g_idx is input // group."""
    if g_idx is None:
        return None
    g_idx = g_idx.long()
    if torch.equal(g_idx, torch.arange(k) // group):
        return None
    counts = torch.bincount(g_idx.clamp(min=0), minlength=k // group)
    if int(g_idx.min()) < 0 or counts.numel() != k // group or not bool((counts == group).all()):
        raise CheckpointError(
            f"{where}.g_idx does not give every group {group} inputs; the engine reads act-order checkpoints "
            "whose g_idx puts exactly group_size inputs in each group (as GPTQ writes them)."
        )
    return torch.sort(g_idx, stable=True).indices


def stored_group(k: int, group: int) -> int:
    """The group int4zp stores: the checkpoint's, or for one group per channel (group -1) the largest
    of GROUPS[:3] dividing K, its (scale, zero) repeated (exact; the kernels' int16 sums cap a group at 256)."""
    if group != -1:
        return group
    return next(g for g in (128, 64, 32) if k % g == 0)


def repack(q: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, group: int, perm: torch.Tensor | None) -> Repacked:
    """q [N, K], zero and scale [G, N] -> int4zp, inputs sorted by `perm` when given."""
    k = q.shape[1]
    if perm is not None:
        q = q[:, perm]  # [N, K], group g's inputs now at g * group ..
    g = stored_group(k, group)
    scale_zero = torch.stack([scale.T, zero.T], dim=-1)  # [N, G, 2]
    scale_zero = scale_zero.repeat_interleave(k // g // scale_zero.shape[1], dim=1)  # [N, K/g, 2]
    return Repacked(pack_int4(q), scale_zero.to(torch.float16).contiguous(), perm)


# The modules.


class Int4ZpLinear(StoredWeights):
    """A Linear whose weight is int4zp: packed [N, K/2] uint8, scale [N, G, 2] fp16; same call."""

    def __init__(self, layer: nn.Linear, group: int) -> None:
        super().__init__()
        n, k, device = layer.out_features, layer.in_features, layer.weight.device
        self.register_buffer("weight", torch.empty(n, k // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.empty(n, k // group, 2, dtype=torch.float16, device=device))
        self.bias = layer.bias
        self.format = INT4ZP
        self.float_dtype = layer.weight.dtype  # what `to_float` gives back

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qlinear(x, self.weight, self.scale, self.bias, fmt=INT4ZP)

    def to_float(self) -> nn.Linear:
        """This layer dequantized, as the float Linear it stands for (in the model dtype)."""
        return _float_linear(_dequantized(self.weight, self.scale, self.float_dtype), self.bias)


class ActOrderLinear(StoredWeights):
    """An act-order Linear: int4zp over inputs sorted by group, weight kept as int32 words [N, K/8]
    (see the module docstring), perm [K]; y = int4zp(x[..., perm]). Same call."""

    def __init__(self, layer: nn.Linear, group: int) -> None:
        super().__init__()
        n, k, device = layer.out_features, layer.in_features, layer.weight.device
        self.register_buffer("weight", torch.empty(n, k // 8, dtype=torch.int32, device=device))
        self.register_buffer("scale", torch.empty(n, k // group, 2, dtype=torch.float16, device=device))
        self.register_buffer("perm", torch.empty(k, dtype=torch.int64, device=device))
        self.bias = layer.bias
        self.float_dtype = layer.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qlinear(x[..., self.perm], self.weight.view(torch.uint8), self.scale, self.bias, fmt=INT4ZP)

    def to_float(self) -> nn.Linear:
        """This layer dequantized in the original input order (in the model dtype)."""
        w = _dequantized(self.weight.view(torch.uint8), self.scale, self.float_dtype)  # [N, K], sorted inputs
        return _float_linear(_unsorted(w, self.perm), self.bias)


class Int4ZpExperts(StoredWeights):
    """Stacked int4zp experts: gate_up_proj [E, 2I, H/2], down_proj [E, H, I/2] uint8 with their fp16
    (scale, zero) [E, N, G, 2]; down's act-order (if any) folded into gate and up's rows. Same call."""

    def __init__(self, experts: Experts, groups: dict[str, int]) -> None:
        super().__init__()
        for name in ("gate_up_proj", "down_proj"):  # [E, 2I, H], [E, H, I]
            w = getattr(experts, name)
            self.register_buffer(name, torch.empty(*w.shape[:-1], w.shape[-1] // 2, dtype=torch.uint8, device=w.device))
            scale_shape = (*w.shape[:-1], w.shape[-1] // groups[name], 2)
            self.register_buffer(_scale(name), torch.empty(scale_shape, dtype=torch.float16, device=w.device))
        self.gate_up_format = self.down_format = INT4ZP
        self.backend = experts.backend
        self.float_dtype = experts.gate_up_proj.dtype

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return EXPERT_BACKENDS[self.backend](
            x, self.gate_up_proj, self.down_proj, weights, ids, w13_scale=self.gate_up_scale,
            w2_scale=self.down_scale, w13_format=INT4ZP, w2_format=INT4ZP,
        )  # fmt: skip

    def float_inputs(self, name: str) -> int:
        """K of the float weight `name` ("gate_up_proj" or "down_proj"): two inputs a byte."""
        return getattr(self, name).shape[-1] * 2

    def widened(self, name: str) -> torch.Tensor:
        """The float weight `name` in the model dtype ([E, 2I, H] or [E, H, I]); with down's act-order,
        gate and up's rows and down's inputs stay in the sorted order, which computes the same."""
        return _dequantized(getattr(self, name), getattr(self, _scale(name)), self.float_dtype)

    def to_float(self) -> Experts:
        """These experts dequantized, as the float Experts they stand for (in the model dtype)."""
        return _float_experts(self)


class ActOrderExperts(StoredWeights):
    """Int4zp experts whose gate and up inputs are permuted per expert, gate_up_perm [E, 2, H] (gate's,
    up's); down's act-order folded into their rows as in Int4ZpExperts. gate_up_proj is kept as int32
    words [E, 2I, H/8] (see the module docstring); the experts run one at a time in torch around the
    int4zp products: the slower path. Same call as `Experts`."""

    def __init__(self, experts: Experts, groups: dict[str, int]) -> None:
        super().__init__()
        (e, width, hidden), device = experts.gate_up_proj.shape, experts.gate_up_proj.device
        self.register_buffer("gate_up_proj", torch.empty(e, width, hidden // 8, dtype=torch.int32, device=device))
        self.register_buffer("gate_up_perm", torch.empty(e, 2, hidden, dtype=torch.int64, device=device))
        self.register_buffer("down_proj", torch.empty(e, hidden, width // 4, dtype=torch.uint8, device=device))
        for name, (n, k) in {"gate_up_proj": (width, hidden), "down_proj": (hidden, width // 2)}.items():
            scale = torch.empty(e, n, k // groups[name], 2, dtype=torch.float16, device=device)
            self.register_buffer(_scale(name), scale)
        self.backend = experts.backend
        self.float_dtype = experts.gate_up_proj.dtype

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
        w13 = self.gate_up_proj.view(torch.uint8)  # [E, 2I, H/2]
        inter = w13.shape[1] // 2
        for e in ids.unique().tolist():
            tok, slot = torch.where(ids == e)  # [n], [n]
            xe, perm, s13 = x[tok], self.gate_up_perm[e], self.gate_up_scale[e]
            if torch.equal(perm[0], perm[1]):  # GPTQ's usual case: one input, one Hessian, one order
                gate, up = matmul(xe[:, perm[0]], w13[e], s13, fmt=INT4ZP).chunk(2, dim=-1)  # [n, I] each
            else:
                gate = matmul(xe[:, perm[0]], w13[e, :inter], s13[:inter], fmt=INT4ZP)  # [n, I]
                up = matmul(xe[:, perm[1]], w13[e, inter:], s13[inter:], fmt=INT4ZP)  # [n, I]
            y = matmul(F.silu(gate) * up, self.down_proj[e], self.down_scale[e], fmt=INT4ZP)  # [n, H]
            out.index_add_(0, tok, y.float() * weights[tok, slot, None].float())
        return out.to(x.dtype)

    def float_inputs(self, name: str) -> int:
        """K of the float weight `name` ("gate_up_proj" or "down_proj")."""
        return self.down_proj.shape[-1] * 2 if name == "down_proj" else self.gate_up_perm.shape[-1]

    def widened(self, name: str) -> torch.Tensor:
        """The float weight `name` in the model dtype, gate and up in their original input order."""
        if name == "down_proj":
            return _dequantized(self.down_proj, self.down_scale, self.float_dtype)
        w = _dequantized(self.gate_up_proj.view(torch.uint8), self.gate_up_scale, self.float_dtype)  # [E, 2I, H]
        inter = w.shape[1] // 2
        for e in range(w.shape[0]):
            for part, rows in enumerate((slice(0, inter), slice(inter, None))):
                w[e, rows] = _unsorted(w[e, rows], self.gate_up_perm[e, part])
        return w

    def to_float(self) -> Experts:
        """These experts dequantized, as the float Experts they stand for (in the model dtype)."""
        return _float_experts(self)


INT4ZP_LINEARS = (Int4ZpLinear, ActOrderLinear)
INT4ZP_EXPERTS = (Int4ZpExperts, ActOrderExperts)


def _scale(name: str) -> str:
    return name.replace("_proj", "_scale")


def _dequantized(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int4zp [.., N, K/2] -> [.., N, K] in `dtype`, one matrix at a time (the native kernel on CPU)."""
    rows, scales = w.reshape(-1, *w.shape[-2:]), scale.reshape(-1, *scale.shape[-3:])
    out = torch.empty((rows.shape[0], w.shape[-2], w.shape[-1] * 2), dtype=dtype, device=w.device)
    for i in range(rows.shape[0]):
        out[i] = dequantize_native(rows[i], scales[i], fmt=INT4ZP).to(dtype)
    return out.view(*w.shape[:-1], w.shape[-1] * 2)


def _unsorted(w: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """w [N, K] over inputs sorted by `perm` -> [N, K] in the original input order."""
    out = torch.empty_like(w)
    out[:, perm] = w
    return out


def _float_linear(w: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    with torch.device("meta"):
        layer = linear(w.shape[1], w.shape[0])
    layer.weight = nn.Parameter(w, requires_grad=False)
    layer.bias = bias
    return layer


def _float_experts(module: Int4ZpExperts | ActOrderExperts) -> Experts:
    w13, w2 = module.widened("gate_up_proj"), module.widened("down_proj")  # [E, 2I, H], [E, H, I]
    with torch.device("meta"):
        experts = Experts(w13.shape[0], w13.shape[2], w13.shape[1] // 2, backend=module.backend)
    experts.gate_up_proj = nn.Parameter(w13, requires_grad=False)
    experts.down_proj = nn.Parameter(w2, requires_grad=False)
    return experts


# Loading: the modules swapped on meta, and the checkpoint tensors served under their names.


@dataclass
class _Module:
    """One quantized module of the checkpoint: its tensors' prefix, K inputs, N outputs, input permutation."""

    prefix: str
    k: int
    n: int
    perm: torch.Tensor | None


class Int4Tensors:
    """The checkpoint's shards read like one safetensors file, with its GPTQ / AWQ modules repacked.

    Float tensors pass through. A quantized Linear X is served as X.weight and X.scale (and X.perm
    for act-order); an Experts' per-expert modules as the stacked experts.gate_up_proj, gate_up_scale,
    down_proj and down_scale (and gate_up_perm), in the layouts of the modules above. The names of
    one module (or one Experts) are built together, on the first read of any of them.
    """

    def __init__(self, files: list[TensorFile], scheme: Int4Checkpoint) -> None:
        self.files, self.scheme = files, scheme
        self._where = {name: f for f in files for name in f.names}
        prefixes = sorted(n.removesuffix(".qweight") for n in self._where if n.endswith(".qweight"))
        self.modules = {p: self._module(p) for p in prefixes}
        self._units: dict[str, Callable[[], dict[str, torch.Tensor]]] = {}  # served name -> its unit's builder
        self._built: dict[str, torch.Tensor] = {}
        self._hidden: set[str] = set()

    @property
    def names(self) -> list[str]:
        return [n for f in self.files for n in f.names if n not in self._hidden] + list(self._units)

    def _module(self, prefix: str) -> _Module:
        rows, cols = self._where[f"{prefix}.qweight"].shape(f"{prefix}.qweight")
        k, n = (rows, cols * 8) if self.scheme.method == "awq" else (rows * 8, cols)
        group = self.scheme.group if self.scheme.group != -1 else k
        groups = [self._where[f"{prefix}.{t}"].shape(f"{prefix}.{t}") for t in ("qzeros", "scales")]
        if k % CHUNK or k % group or groups != [(k // group, n // 8), (k // group, n)]:
            raise CheckpointError(
                f"{prefix}: qweight {(rows, cols)}, qzeros and scales {groups} do not make a {self.scheme.method} "
                f"int4 weight of K a multiple of {CHUNK} in groups of {self.scheme.group}; the engine cannot hold it."
            )
        g_idx = f"{prefix}.g_idx"
        g_idx = self._where[g_idx].get(g_idx) if g_idx in self._where else None
        return _Module(prefix, k, n, act_order(g_idx, k, group, prefix))

    def repacked(self, module: _Module, rows: torch.Tensor | None = None) -> Repacked:
        """One module in int4zp; `rows` reorders its outputs (down's act-order folded into gate and up)."""
        p = module.prefix
        q, zero, scale = unpack(
            *(self._where[f"{p}.{t}"].get(f"{p}.{t}") for t in ("qweight", "qzeros", "scales")),
            self.scheme.method, v1_zeros=self.scheme.v1_zeros,
        )  # fmt: skip
        if not torch.equal(scale.half().float(), scale):  # bf16 / fp32 scales: exact in fp16 or refused
            raise CheckpointError(
                f"{p}.scales hold values fp16 cannot represent exactly; the engine keeps int4 scales in fp16."
            )
        if rows is not None:
            q, zero, scale = q[rows], zero[:, rows], scale[:, rows]
        return repack(q, zero, scale, self.scheme.group, module.perm)

    def serve(
        self, module: _Module | list[_Module], names: list[str], build: Callable[[], dict[str, torch.Tensor]]
    ) -> None:
        """Serve `names` (built together by `build`) in place of the modules' checkpoint tensors."""
        for m in module if isinstance(module, list) else [module]:
            self._hidden |= {f"{m.prefix}.{t}" for t in ("qweight", "qzeros", "scales", "g_idx")}
        self._units.update(dict.fromkeys(names, build))

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._units:
            if name not in self._built:
                self._built.update(self._units[name]())
            return tuple(self._built[name].shape)
        return self._where[name].shape(name)

    def read_into(self, name: str, dst: torch.Tensor) -> None:
        if name not in self._units:
            self._where[name].read_into(name, dst)
            return
        if name not in self._built:
            self._built.update(self._units[name]())
        dst.copy_(self._built.pop(name))

    def get(self, name: str) -> torch.Tensor:
        return self._where[name].get(name)

    def close(self) -> None:
        for f in self.files:
            f.close()


def make_int4(
    net: nn.Module, files: list[TensorFile], scheme: Int4Checkpoint, rename: Callable[[str], str]
) -> Int4Tensors:
    """Swap the Linears and Experts the checkpoint holds in GPTQ / AWQ form for int4zp modules (on the
    meta device) and return the shards as they now read (`Int4Tensors`). `rename`: a checkpoint name as
    the engine's modules name it. Experts need all their experts' gate, up and down quantized."""
    tensors = Int4Tensors(files, scheme)
    experts: dict[str, dict[int, dict[str, _Module]]] = {}  # checkpoint prefix -> expert -> part -> module
    for prefix, module in tensors.modules.items():
        match = _EXPERT.fullmatch(prefix)
        if match:
            experts.setdefault(match["experts"], {}).setdefault(int(match["expert"]), {})[_PARTS[match["proj"]]] = (
                module
            )
            continue
        path = rename(f"{prefix}.weight").removesuffix(".weight")
        if isinstance(child(net, path), nn.Linear):
            _swap_linear(net, path, tensors, module)
    for prefix, found in experts.items():
        path = rename(f"{prefix}.gate_up_proj").removesuffix(".gate_up_proj")
        module = child(net, path)
        if isinstance(module, Experts):
            _swap_experts(net, path, module, tensors, prefix, found)
    return tensors


def _swap_linear(net: nn.Module, path: str, tensors: Int4Tensors, module: _Module) -> None:
    layer, group = child(net, path), stored_group(module.k, tensors.scheme.group)
    p, ordered = module.prefix, module.perm is not None
    swap(net, path, (ActOrderLinear if ordered else Int4ZpLinear)(layer, group))

    def build() -> dict[str, torch.Tensor]:
        r = tensors.repacked(module)
        out = {f"{p}.weight": r.packed.view(torch.int32) if ordered else r.packed, f"{p}.scale": r.scale_zero}
        return out | ({f"{p}.perm": r.perm} if ordered else {})

    tensors.serve(module, [f"{p}.weight", f"{p}.scale", *([f"{p}.perm"] if ordered else [])], build)


def _swap_experts(
    net: nn.Module, path: str, experts: Experts, tensors: Int4Tensors, prefix: str, found: dict[int, dict[str, _Module]]
) -> None:
    count, width, hidden = experts.gate_up_proj.shape  # E, 2I, H
    complete = sorted(found) == list(range(count)) and all(len(parts) == 3 for parts in found.values())
    if not complete:
        raise CheckpointError(
            f"{prefix} holds {tensors.scheme.method} tensors for only some of its {count} experts' gate, up "
            "and down; the engine stores each layer's experts in one format."
        )
    groups = {
        "gate_up_proj": stored_group(hidden, tensors.scheme.group),
        "down_proj": stored_group(width // 2, tensors.scheme.group),
    }
    slow = any(found[e][part].perm is not None for e in found for part in ("gate", "up"))
    swap(net, path, (ActOrderExperts if slow else Int4ZpExperts)(experts, groups))
    names = [f"{prefix}.{n}" for n in ("gate_up_proj", "gate_up_scale", "down_proj", "down_scale")]

    def build() -> dict[str, torch.Tensor]:
        w13, s13, w2, s2, perms = [], [], [], [], []
        for e in range(count):
            parts = found[e]
            down = tensors.repacked(parts["down"])  # its inputs sorted by down.perm: gate and up's rows follow
            gate, up = (tensors.repacked(parts[p], rows=down.perm) for p in ("gate", "up"))
            w13.append(torch.cat([gate.packed, up.packed]))  # [2I, H/2]
            s13.append(torch.cat([gate.scale_zero, up.scale_zero]))  # [2I, G, 2]
            w2.append(down.packed)
            s2.append(down.scale_zero)
            perms.append(torch.stack([_or_identity(r.perm, hidden) for r in (gate, up)]))  # [2, H]
        packed13 = torch.stack(w13)  # [E, 2I, H/2]
        out = dict(
            zip(
                names,
                (packed13.view(torch.int32) if slow else packed13, torch.stack(s13), torch.stack(w2), torch.stack(s2)),
                strict=True,
            )
        )
        return out | ({f"{prefix}.gate_up_perm": torch.stack(perms)} if slow else {})

    tensors.serve(
        [m for parts in found.values() for m in parts.values()],
        names + ([f"{prefix}.gate_up_perm"] if slow else []),
        build,
    )


def _or_identity(perm: torch.Tensor | None, k: int) -> torch.Tensor:
    return torch.arange(k) if perm is None else perm
