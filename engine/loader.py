"""Checkpoint loading: a Hugging Face directory (or hub id) -> an architecture's module, filled in place.

The module is built on the meta device, then filled decoder layer by decoder layer: each layer
gets empty storage in the target dtype, its checkpoint tensors (from whichever shard holds
them), then the caller's `transform` (e.g. quantization), before the next layer is touched.
Peak memory is the transformed model plus one float layer. A checkpoint written by
`write_checkpoint` records its quantization; its modules are quantized on the meta device
first, so its stored integer tensors load as they are. An FP8 checkpoint (engine/fp8.py) is
loaded the same way: the modules whose weights have a weight_scale_inv become FP8 on the meta
device, and a `transform` that quantizes re-quantizes them one at a time. So is a GGUF file or an
MXFP4 checkpoint (engine/mxfp4.py): the modules whose weights they store in blocks hold the blocks
(engine/ggml_quants.py). Every checkpoint
tensor must land in exactly one place, and every place must be filled once. Per-expert
tensors (`experts.N.gate_proj`, Mixtral's `w1/w3/w2`) and already-stacked ones
(`experts.gate_up_proj [E, 2I, H]`, `experts.down_proj [E, H, I]`) both fill the stacked experts.
"""

from __future__ import annotations

import ctypes
import json
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine import gguf
from engine.config import read_config
from engine.errors import (
    CheckpointError,
    EngineError,
    MissingTensorError,
    TensorShapeError,
    UnexpectedTensorError,
    UnsupportedArchitectureError,
)
from engine.fp8 import SCALE_SUFFIX, Fp8Blocks, checkpoint_fp8, make_fp8, refuse_nan
from engine.ggml_quants import make_gguf
from engine.gptq import checkpoint_int4, make_int4
from engine.models import ARCHITECTURES, Architecture
from engine.mxfp4 import Mxfp4Tensors
from engine.quant_methods import quant_method
from engine.quantization import check_scheme, quantize_modules
from engine.tensorfile import TensorFile
from kernels.formats import FP8, fp8_row_scales

log = logging.getLogger(__name__)

_PER_EXPERT = re.compile(
    r"(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)\.(?P<kind>weight|weight_scale_inv)"
)
_PART = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "all", "w2": "all"}
_HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]

_LAYER = re.compile(r"model\.layers\.(\d+)\.")
QUANTIZATION_KEY = "moerag_quantization"  # config.json section written by write_checkpoint
QUANTIZATION_LAYOUT = 2  # the tensor layouts of engine.qmatmul; 1 was torch's own int4 packing

Slot = tuple[int, str]  # (expert index or -1, "gate" | "up" | "all")
_BLOCK_FILES = (gguf.GGUFTensors, Mxfp4Tensors)  # files that serve some tensors in block formats (`formats`)


@dataclass
class LoadedCheckpoint:
    net: nn.Module
    args: Any
    model_type: str
    config: dict[str, Any]
    directory: Path
    quantization: dict[str, Any] | None = None  # scheme, group_size, targets when stored quantized
    dtype: torch.dtype = torch.float32  # of the float parameters (`dtype` resolved, "auto" included)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Dtype = torch.dtype | str  # a torch dtype, a name in DTYPES, or "auto" (as transformers takes them)


def check_dtype(dtype: Dtype) -> None:
    """Fails early, before any file is read, on a dtype `resolve_dtype` would refuse."""
    if not isinstance(dtype, torch.dtype) and dtype != "auto" and dtype not in DTYPES:
        raise EngineError(f"Unknown dtype {dtype!r}. Use one of: {', '.join(DTYPES)}, auto (or a torch dtype).")


def resolve_dtype(dtype: Dtype, config: dict[str, Any], directory: Path) -> torch.dtype:
    """The torch dtype for `dtype`; "auto" is the checkpoint's own `torch_dtype` (or `dtype`) in
    config.json, and float32 when it names none."""
    check_dtype(dtype)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        return DTYPES[dtype]
    stored = config.get("torch_dtype") or config.get("dtype")
    if stored is None:
        return torch.float32
    name = str(stored).removeprefix("torch.")
    if name not in DTYPES:
        raise CheckpointError(
            f"config.json in {directory} gives dtype {stored!r}, which dtype='auto' cannot use; "
            f"pass one of: {', '.join(DTYPES)}."
        )
    return DTYPES[name]


def resolve(path_or_id: str | Path) -> Path:
    """A local checkpoint directory; a hub id is downloaded (config, safetensors, tokenizer) first."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; point the engine at the checkpoint directory that holds it.")
    text = str(path_or_id)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise CheckpointError(f"No checkpoint directory at {text}, and it is not a hub id like 'Qwen/Qwen3-30B-A3B'.")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=text, allow_patterns=_HUB_FILES))
    except Exception as exc:  # the hub client raises many types (offline, 404, auth, disk)
        raise CheckpointError(
            f"No local directory {text!r}, and downloading it from the Hugging Face Hub failed: {exc}. "
            "Download it where the network allows (huggingface-cli download ...) and pass the directory."
        ) from exc


def _shards(directory: Path) -> list[Path]:
    if gguf.is_gguf(directory):
        return gguf.split_files(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"Cannot read the shard index {index}: {exc}") from exc
        shards = [directory / name for name in sorted(set(weight_map.values()))]
        absent = [s.name for s in shards if not s.is_file()]
        if absent:
            raise CheckpointError(f"{index.name} lists shards missing from {directory}: {', '.join(absent)}.")
        return shards
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(
            f"No *.safetensors files in {directory}. Only safetensors checkpoints are supported; "
            "convert a .bin checkpoint with transformers' save_pretrained(..., safe_serialization=True)."
        )
    return shards


def _materialize(
    root: nn.Module,
    dtype: torch.dtype,
    device: torch.device,
    keep_fp32: tuple[str, ...],
    *,
    prefix: str = "",
    skip: str | None = None,
) -> None:
    """Give the meta parameters and buffers under `root` empty storage on `device`; ties are kept.

    Float parameters take `dtype` (except `keep_fp32` names); buffers (quantized weights and
    their scales) keep their own dtype. Names starting with `skip` are left on meta.
    """
    done: dict[int, torch.Tensor] = {}
    for module_name, module in root.named_modules(prefix=prefix.rstrip(".")):
        if skip and f"{module_name}.".startswith(skip):
            continue
        for table in (module._parameters, module._buffers):
            for name, tensor in list(table.items()):
                if tensor is None or not tensor.is_meta:
                    continue
                if id(tensor) not in done:
                    full = f"{module_name}.{name}" if module_name else name
                    if table is module._buffers or not tensor.is_floating_point():
                        target = tensor.dtype
                    else:
                        target = torch.float32 if full.endswith(keep_fp32) else dtype
                    empty = torch.empty(tensor.shape, dtype=target, device=device)
                    done[id(tensor)] = empty if table is module._buffers else nn.Parameter(empty, requires_grad=False)
                table[name] = done[id(tensor)]


def _expected_slots(name: str, param: torch.Tensor, fp8: bool) -> set[Slot]:
    """The slots of a parameter the checkpoint fills: per expert for stacked experts (and their FP8
    scales, which come per expert too), else one."""
    if name.endswith("experts.gate_up_proj") or (fp8 and name.endswith("experts.gate_up_scale")):
        return {(e, part) for e in range(param.shape[0]) for part in ("gate", "up")}
    if name.endswith(("experts.down_proj", "experts.down_scale") if fp8 else "experts.down_proj"):
        return {(e, "all") for e in range(param.shape[0])}
    return {(-1, "all")}


def _slot_name(param_name: str, slot: Slot) -> str:
    """The checkpoint-style name of one slot, for messages."""
    expert, part = slot
    if expert < 0:
        return param_name
    prefix, attr = param_name.rsplit(".", 1)
    proj = {"gate": "gate_proj", "up": "up_proj", "all": "down_proj"}[part]
    return f"{prefix}.{expert}.{proj}.{'weight_scale_inv' if attr.endswith('_scale') else 'weight'}"


def _rename(renames: list[tuple[re.Pattern, str]], ckpt_name: str) -> str:
    """A checkpoint name as the engine's modules name it (an architecture's `renames`)."""
    name = ckpt_name
    for pattern, repl in renames:
        name = pattern.sub(repl, name)
    return name


def _relaid(tensor: torch.Tensor, steps: tuple[str, ...], *, blocks: bool) -> torch.Tensor:
    """A checkpoint tensor laid out as the engine holds it (Architecture.layouts); `blocks`: served
    by a file of block formats (GGUF, MXFP4), whose rows are outputs already."""
    for step in steps:
        if step == "transpose" and not blocks:
            tensor = tensor.transpose(-1, -2)
        elif step == "deinterleave":
            tensor = torch.cat([tensor[:, 0::2], tensor[:, 1::2]], dim=1)
    return tensor.contiguous()


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class _Filler:
    """Places checkpoint tensors into the module's parameters and checks exactly-once use."""

    def __init__(self, net: nn.Module, arch: Architecture, args: Any, tied: bool, fp8: Fp8Blocks | None) -> None:
        # Shapes only (the net may still be on meta); `place` looks the live tensor up by name,
        # so no reference to a layer's float weights outlives the layer's transform.
        self.net = net
        self.fp8 = fp8  # the checkpoint's FP8 blocks: its weight_scale_inv tensors fill the modules' scales
        self.params = dict([*net.named_parameters(), *net.named_buffers()])  # meta tensors
        self.expected = {n: _expected_slots(n, p, fp8 is not None) for n, p in self.params.items()}
        self.filled: dict[str, set[Slot]] = {n: set() for n in self.params}
        self.renames = [(re.compile(p), r) for p, r in arch.renames]
        self.layouts = [(re.compile(p), steps) for p, steps in arch.layouts]
        # A tied head has no tensor of its own, unless quantization gave it one.
        tied = tied and "lm_head.weight" not in self.params
        ignore = list(arch.ignore(args)) + (["lm_head\\.weight"] if tied else [])
        self.ignore = [re.compile(p) for p in ignore]
        self.unexpected: list[str] = []
        self.ignored = 0

    def rename(self, ckpt_name: str) -> str:
        return _rename(self.renames, ckpt_name)

    def _live(self, name: str) -> torch.Tensor:
        module_name, _, attr = name.rpartition(".")
        return getattr(self.net.get_submodule(module_name), attr)

    def place(self, ckpt_name: str, source: TensorFile) -> None:
        name = self.rename(ckpt_name)
        if any(p.fullmatch(name) for p in self.ignore):
            self.ignored += 1
            return
        scales = self.fp8 is not None and name.endswith(SCALE_SUFFIX)
        target = self._target(name, scales)
        if target is None:
            self.unexpected.append(ckpt_name)
            return
        param_name, dst, slots = target
        if self.filled[param_name] & slots:
            raise UnexpectedTensorError(
                f"The checkpoint provides {ckpt_name} more than once (or also in stacked form)."
            )
        self._fill(ckpt_name, name, source, dst, scales)
        self.filled[param_name] |= slots

    def _target(self, name: str, scales: bool) -> tuple[str, torch.Tensor, set[Slot]] | None:
        """Where the tensor the engine calls `name` goes: (parameter, the part of it, the slots that
        part fills), or None when the model has no place for it."""
        match = _PER_EXPERT.fullmatch(name)
        if match and (scales or match["kind"] == "weight"):
            part = _PART[match["proj"]]
            param_name = (
                match["prefix"] + (".down_" if part == "all" else ".gate_up_") + ("scale" if scales else "proj")
            )
            expert = int(match["expert"])
            if param_name not in self.params or expert >= self.params[param_name].shape[0]:
                return None
            dst = self._live(param_name)[expert]
            if part != "all":
                width = dst.shape[0] // 2
                dst = dst[:width] if part == "gate" else dst[width:]
            return param_name, dst, {(expert, part)}
        if scales and name.removesuffix(SCALE_SUFFIX) + ".scale" in self.params:  # an Fp8Linear's
            param_name = name.removesuffix(SCALE_SUFFIX) + ".scale"
            return param_name, self._live(param_name), self.expected[param_name]
        if name in self.params and not scales:
            return name, self._live(name), self.expected[name]
        return None

    def _fill(self, ckpt_name: str, name: str, source: TensorFile, dst: torch.Tensor, scales: bool) -> None:
        """Read the tensor into `dst` once its shape checks out: relaid as its architecture declares
        (Architecture.layouts), FP8 scales repeated over their block's rows, the rest as stored."""
        steps = next((s for p, s in self.layouts if p.fullmatch(name)), None)
        relaid = None
        if steps is not None:  # a tensor a block format stores (GGUF, MXFP4) has rows of outputs already
            relaid = _relaid(source.get(ckpt_name), steps, blocks=ckpt_name in getattr(source, "formats", {}))
        shape = source.shape(ckpt_name) if relaid is None else tuple(relaid.shape)
        # FP8 scales come per block of rows, [ceil(N/Bo), G], and are stored per row, [N, G].
        want = (-(-dst.shape[0] // self.fp8.rows), dst.shape[1]) if scales else tuple(dst.shape)
        if shape != want:
            raise TensorShapeError(
                f"Checkpoint tensor {ckpt_name} has shape {shape}, but config.json implies "
                f"{want}. The config.json does not belong to these weights."
            )
        if relaid is not None:
            dst.copy_(relaid)
        elif scales:
            dst.copy_(fp8_row_scales(source.get(ckpt_name), dst.shape[0], self.fp8.rows))
        else:
            source.read_into(ckpt_name, dst)
            if dst.dtype == FP8.dtype:
                refuse_nan(dst, f"{source.path}: {ckpt_name}")

    def check(self, directory: Path) -> None:
        if self.unexpected:
            hint = ""
            if any(n.endswith(("weight_scale_inv", "weight_scale")) for n in self.unexpected):
                hint = (
                    " Some look like quantization scales of weights the engine keeps float, or of a "
                    "checkpoint whose config.json has no quantization_config; FP8 checkpoints need "
                    "quantization_config {'quant_method': 'fp8', 'fmt': 'e4m3', 'weight_block_size': [Bo, B]}."
                )
            raise UnexpectedTensorError(
                f"{len(self.unexpected)} checkpoint tensor(s) in {directory} have no place in the model: "
                f"{_listing(sorted(self.unexpected))}. The checkpoint does not match its config.json "
                f"model_type, or it is a variant the engine does not support.{hint}"
            )
        missing = [_slot_name(n, s) for n in self.params for s in sorted(self.expected[n] - self.filled[n])]
        if missing:
            raise MissingTensorError(
                f"{len(missing)} tensor(s) the model needs are missing from {directory}: {_listing(missing)}. "
                "The download may be incomplete (check every shard in model.safetensors.index.json)."
            )


def stored_quantization(config: dict[str, Any], directory: Path) -> dict[str, Any] | None:
    """The quantization a checkpoint was written with (by write_checkpoint), checked, or None."""
    section = config.get(QUANTIZATION_KEY)
    if section is None:
        return None
    if isinstance(section, dict) and section.get("layout", 1) != QUANTIZATION_LAYOUT:
        raise CheckpointError(
            f"{directory} was quantized by an older moerag, with tensor layout {section.get('layout', 1)} "
            f"(this version reads layout {QUANTIZATION_LAYOUT}). Quantize the original checkpoint again with: "
            "moerag model quantize SRC DST --scheme int4"
        )
    try:
        scheme, group_size, targets = section["scheme"], int(section["group_size"]), tuple(section["targets"])
        check_scheme(scheme, targets=targets, group_size=group_size)
    except (KeyError, TypeError, ValueError, EngineError) as exc:
        raise CheckpointError(
            f"The {QUANTIZATION_KEY} section of {directory / 'config.json'} is damaged ({exc}); "
            "write the quantized checkpoint again with: moerag model quantize SRC DST --scheme int4"
        ) from exc
    return {"scheme": scheme, "group_size": group_size, "targets": targets}


def read_architecture(path_or_id: str | Path):
    """(directory, config, model_type, architecture, args) of a checkpoint, or a clear error."""
    if gguf.is_gguf(path_or_id):  # a .gguf file (first split): the config comes from its metadata
        return gguf.read_architecture(path_or_id)
    directory = resolve(path_or_id)
    config = read_config(directory)
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} in {directory / 'config.json'} is not supported. "
            f"Supported: {', '.join(sorted(ARCHITECTURES))}."
        )
    arch = ARCHITECTURES[model_type]
    try:
        args = arch.args_from_config(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"config.json in {directory} lacks or mangles a field {model_type} needs: {exc}") from exc
    return directory, config, model_type, arch, args


@contextmanager
def _freed_memory_returned() -> Iterator[None]:
    """While loading, glibc hands every freed block of 1 MiB or more straight back to the OS.

    By default glibc raises its mmap threshold after the first large free, so each freed float
    layer stays in the heap and counts in the process's resident memory (measured: peak
    1.26 GiB instead of 1.12 for the int4 bench model). Afterwards the threshold is left at
    glibc's own ceiling (32 MiB), where its dynamic rule would have taken it anyway.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        trim(0)
        mallopt(_M_MMAP_THRESHOLD, 32 << 20)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def _keep_blocks(
    net: nn.Module, arch: Architecture, dtype: torch.dtype, files: list[gguf.GGUFTensors | Mxfp4Tensors]
) -> None:
    """Make the modules whose weights the files store in blocks (GGUF's types, MXFP4) block modules
    (on meta, float dtypes set first), and have the files serve those tensors as raw blocks."""
    renames = [(re.compile(p), r) for p, r in arch.renames]
    formats = {_rename(renames, n): fmt for f in files for n, fmt in f.formats.items()}
    _materialize(net, dtype, torch.device("meta"), arch.keep_fp32)
    kept = make_gguf(net, formats)
    for f in files:
        f.keep_blocks({n for n in f.formats if _rename(renames, n) in kept})
    log.info("%d block tensors stay quantized", len(kept))


def load_checkpoint(
    path_or_id: str | Path,
    *,
    dtype: Dtype = torch.float32,
    device: str | torch.device = "cpu",
    transform: Callable[[nn.Module], Any] | None = None,
) -> LoadedCheckpoint:
    """Read config.json, build the architecture it names, and stream the safetensors into it.

    `transform(module)` is called on each decoder layer as soon as all its tensors are in, then
    once on the whole model (for what lies outside the layers, such as the head); it changes
    modules in place (see engine.quantization.quantize_modules). `dtype`: see `resolve_dtype`.
    """
    check_dtype(dtype)
    with _freed_memory_returned():
        return _load(path_or_id, dtype=dtype, device=device, transform=transform)


def _load(
    path_or_id: str | Path, *, dtype: Dtype, device: str | torch.device, transform: Callable[[nn.Module], Any] | None
) -> LoadedCheckpoint:
    directory, config, model_type, arch, args = read_architecture(path_or_id)
    dtype = resolve_dtype(dtype, config, directory)
    quantization = stored_quantization(config, directory)
    fp8 = None if quantization is not None else checkpoint_fp8(config, directory)  # moerag's own tensors win
    int4 = None if quantization is not None else checkpoint_int4(config, directory)  # GPTQ / AWQ
    shards = _shards(directory)
    device = torch.device(device)
    with torch.device("meta"):
        net = arch.build(args)
    if quantization is not None or fp8 is not None or int4 is not None:
        # dtypes first (scales take the model dtype), then the quantized modules, all shapes only.
        _materialize(net, dtype, torch.device("meta"), arch.keep_fp32)
    if quantization is not None:
        quantize_modules(
            net, quantization["scheme"], targets=quantization["targets"], group_size=quantization["group_size"]
        )
    files: list[TensorFile] = []
    try:
        for shard in shards:
            if gguf.is_gguf(shard):
                files.append(gguf.GGUFTensors(shard, config))
            else:
                files.append(TensorFile(shard))
                if quantization is None and quant_method(config, directory) == "mxfp4":
                    files[-1] = Mxfp4Tensors(files[-1])
        if fp8 is not None:
            renames = [(re.compile(p), r) for p, r in arch.renames]
            scaled = [_rename(renames, n) for f in files for n in f.names if n.endswith(SCALE_SUFFIX)]
            log.info("%d modules stay fp8 (blocks %d x %d)", make_fp8(net, scaled, fp8.inputs), fp8.rows, fp8.inputs)
        if int4 is not None:  # its modules become int4zp on meta; the shards then serve them repacked
            renames = [(re.compile(p), r) for p, r in arch.renames]
            files = [make_int4(net, files, int4, lambda name: _rename(renames, name))]
        block_files = [f for f in files if isinstance(f, _BLOCK_FILES)]
        if quantization is None and any(f.formats for f in block_files):
            _keep_blocks(net, arch, dtype, block_files)
        filler = _Filler(net, arch, args, tied=bool(config.get("tie_word_embeddings", False)), fp8=fp8)
        groups: dict[int | None, list[tuple[TensorFile, str]]] = {}  # decoder layer -> its tensors
        for f in files:
            for name in f.names:
                match = _LAYER.match(filler.rename(name))
                groups.setdefault(int(match[1]) if match else None, []).append((f, name))
        layers = net.model.layers
        _materialize(net, dtype, device, arch.keep_fp32, skip="model.layers.")
        for f, name in groups.pop(None, []):
            filler.place(name, f)
        if transform is not None:  # the head now, not after the layers: it is the largest tensor
            outside = nn.ModuleDict({name: child for name, child in net.named_children() if name != "model"})
            transform(outside)
            for name, child in outside.items():
                setattr(net, name, child)
        for i, layer in enumerate(layers):
            _materialize(layer, dtype, device, arch.keep_fp32, prefix=f"model.layers.{i}.")
            for f, name in groups.pop(i, []):
                filler.place(name, f)
            if transform is not None:
                transform(layer)
        for rest in groups.values():  # layers beyond the model (e.g. DeepSeek's MTP layer)
            for f, name in rest:
                filler.place(name, f)
    finally:
        for f in files:
            f.close()
    filler.check(directory)
    if transform is not None:
        transform(net)
    if filler.ignored:
        log.info("ignored %d checkpoint tensors this engine does not use (e.g. MTP layers)", filler.ignored)
    net.eval()
    return LoadedCheckpoint(
        net=net,
        args=args,
        model_type=model_type,
        config=config,
        directory=directory,
        quantization=quantization,
        dtype=dtype,
    )
