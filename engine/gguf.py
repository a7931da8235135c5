"""GGUF files (llama.cpp's format): config, tensors and tokenizer from one file or its splits.

The metadata becomes a Hugging Face config dict (one builder per llama.cpp architecture the
engine implements: engine/gguf_config.py's FAMILIES), GGUF tensor names become the loader's module names, and `GGUFTensors`
reads one file the way engine.tensorfile.TensorFile reads a shard (names, shape, read_into, close),
so the loader fills the model layer by layer from it. Where llama.cpp stores a tensor otherwise
than the checkpoint does (llama's permuted Q/K rows, DeepSeek's split kv_b, gpt-oss's separate gate
and up biases, vectors squeezed from rows), it is served as the checkpoint holds it, so the
architecture's own renames and layouts apply unchanged. F32, F16 and BF16 tensors load as floats;
the block types of kernels/formats.py (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K, MXFP4) stay blocks in the
modules that read them (engine/ggml_quants.py) and are widened to floats elsewhere; other types are
refused by name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from engine.errors import CheckpointError, UnsupportedArchitectureError
from engine.gguf_config import FAMILIES, _Meta
from engine.tensorfile import CHUNK_BYTES
from kernels.formats import GGUF_FORMATS, Format, dequantize

_SPLIT = re.compile(r"(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf")
# Vocabulary-sized arrays: only the tokenizer reads them, through transformers.
_TOKENIZER_ARRAYS = (
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
)
_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
TENSOR_TYPES = (*_FLOAT_TYPES, *GGUF_FORMATS)  # every tensor type the engine reads
_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def is_gguf(path_or_id: str | Path) -> bool:
    return str(path_or_id).lower().endswith(".gguf")


def split_files(path: str | Path) -> list[Path]:
    """The file itself, or every split of a `name-00001-of-0000N.gguf` set (given its first split)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"No GGUF file at {path}.")
    match = _SPLIT.fullmatch(path.name)
    if match is None:
        return [path]
    if int(match["no"]) != 1:
        first = path.with_name(f"{match['stem']}-00001-of-{match['count']}.gguf")
        raise CheckpointError(f"{path.name} is split {int(match['no'])} of a set; point the engine at {first}.")
    count = int(match["count"])
    splits = [path.with_name(f"{match['stem']}-{i:05d}-of-{match['count']}.gguf") for i in range(1, count + 1)]
    absent = [s.name for s in splits if not s.is_file()]
    if absent:
        raise CheckpointError(f"{path.name} is one of {count} splits, but {', '.join(absent)} are missing.")
    return splits


@dataclass(frozen=True)
class _Tensor:
    """One tensor as stored: GGUF name, type name (F32, Q4_K, ...), torch-order shape, absolute offset."""

    path: Path
    name: str
    type: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _open(path: Path) -> tuple[dict[str, Any], list[_Tensor]]:
    """The metadata (without the vocabulary arrays) and the tensor table of one GGUF file."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (OSError, ValueError, KeyError) as exc:  # bad magic, truncated header or data, unknown type
        raise CheckpointError(
            f"Cannot read {path} as GGUF: {exc}. The file may be truncated; download it again."
        ) from exc
    metadata = {
        name: field.contents()
        for name, field in reader.fields.items()
        if not name.startswith("GGUF.") and name not in _TOKENIZER_ARRAYS
    }
    tensors = [
        _Tensor(
            path,
            t.name,
            t.tensor_type.name,
            tuple(int(d) for d in reversed(t.shape.tolist())),
            t.data_offset,
            t.n_bytes,
        )
        for t in reader.tensors
    ]
    return metadata, tensors


def _check_types(path: Path, tensors: list[_Tensor]) -> None:
    """Refuse a tensor type the engine cannot read, or a block tensor whose rows are not whole blocks."""
    for t in tensors:
        if t.type not in _FLOAT_TYPES and t.type not in GGUF_FORMATS:
            raise CheckpointError(
                f"{path.name}: tensor {t.name} is {t.type}, which the engine cannot load. Supported GGUF tensor "
                f"types: {', '.join(TENSOR_TYPES)}; requantize with llama.cpp's llama-quantize "
                "(e.g. Q4_K_M) or convert with convert_hf_to_gguf.py --outtype bf16."
            )
        fmt = GGUF_FORMATS.get(t.type)
        if fmt is not None and (not t.shape or t.shape[-1] % fmt.block):
            raise CheckpointError(
                f"{path.name}: tensor {t.name} is {t.type} with rows of {t.shape[-1] if t.shape else 0} values, "
                f"not a multiple of its block of {fmt.block}; the file is damaged or from a newer llama.cpp."
            )


def _stored_dtype(tensors: list[_Tensor]) -> str:
    """The float type holding most matrix elements: what dtype="auto" loads as."""
    counts: dict[str, int] = {}
    for t in tensors:
        if len(t.shape) >= 2:
            counts[t.type] = counts.get(t.type, 0) + math.prod(t.shape)
    return _DTYPE_NAMES.get(max(counts, key=counts.__getitem__), "float32") if counts else "float32"


def read_config(path: str | Path) -> dict[str, Any]:
    """The Hugging Face config dict a GGUF's metadata describes (first split), checked for
    supported architecture and tensor types before anything is allocated."""
    splits = split_files(path)
    tables = [_open(split) for split in splits]
    metadata, tensors = tables[0][0], [t for _, table in tables for t in table]
    arch = str(metadata.get("general.architecture"))
    if arch not in FAMILIES:
        from engine.models import ARCHITECTURES

        raise UnsupportedArchitectureError(
            f"{splits[0].name} is a GGUF of architecture {arch!r}, which the engine does not read from GGUF. "
            f"Supported: {', '.join(FAMILIES)}. The engine may still run the model from its Hugging Face "
            f"checkpoint (config.json + safetensors) if its model_type is one of: {', '.join(sorted(ARCHITECTURES))}."
        )
    for split, (_, table) in zip(splits, tables):
        _check_types(split, table)
    info = {t.name: t for t in tensors}
    if "token_embd.weight" not in info:
        raise CheckpointError(f"{splits[0].name} has no token_embd.weight tensor; it is not a complete model.")
    family = FAMILIES[arch]
    meta = _Meta(metadata, splits[0])

    def read(name: str) -> torch.Tensor:  # a small tensor the config needs (e.g. rope_freqs)
        return _read_whole(info[name])

    try:
        config = family.config(meta, info, read)
    except (TypeError, ValueError) as exc:  # a per-layer array where a number belongs, and the like
        raise CheckpointError(f"{splits[0].name} has GGUF metadata the engine cannot read: {exc}") from exc
    return {
        "model_type": family.model_type,
        "architectures": [family.hf_class],
        **config,
        "tie_word_embeddings": "output.weight" not in info,
        "torch_dtype": _stored_dtype(tensors),
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
    }


def read_architecture(path: str | Path):
    """(path, config, model_type, architecture, args), as engine.loader.read_architecture gives for a directory."""
    from engine.models import ARCHITECTURES

    path = Path(path).expanduser()
    config = read_config(path)
    model_type = config["model_type"]
    arch = ARCHITECTURES[model_type]
    try:
        args = arch.args_from_config(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"The GGUF metadata of {path.name} lacks or mangles a field {model_type} needs: {exc}"
        ) from exc
    return path, config, model_type, arch, args


# --- GGUF tensor names -> module names ----------------------------------------------------------

_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {  # blk.N.<key>.<weight|bias> -> model.layers.N.<value>.<weight|bias>
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_q_a": "self_attn.q_a_proj",
    "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
    "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
}
# Where an architecture's modules are named otherwise (by model_type): llama.cpp calls the norm
# before the MLP post_attention_norm in gpt-oss and GLM, Qwen2-MoE's shared expert is singular, and
# Hunyuan keeps its q/k norms' own names (they come after RoPE there).
_BLOCK_BY_TYPE = {
    "gpt_oss": {"post_attention_norm": "post_attention_layernorm", "ffn_gate_inp": "mlp.router"},
    "glm4_moe": {"post_attention_norm": "post_attention_layernorm"},
    "hunyuan_v1_moe": {"attn_q_norm": "self_attn.query_layernorm", "attn_k_norm": "self_attn.key_layernorm"},
    "qwen2_moe": {
        "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
        "ffn_up_shexp": "mlp.shared_expert.up_proj",
        "ffn_down_shexp": "mlp.shared_expert.down_proj",
        "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    },
}
# Block tensors that are one parameter, whatever their .weight / .bias suffix says.
_PARAMETERS = {
    "exp_probs_b": "mlp.gate.e_score_correction_bias",  # DeepSeek's routing correction, stored as a bias
    "attn_sinks": "self_attn.sinks",  # gpt-oss's sink logit per head
}
_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}  # [E, out, in]
_NAME = re.compile(r"blk\.(?P<layer>\d+)\.(?P<key>\w+)\.(?P<kind>weight|bias)")
_LAYER = re.compile(r"blk\.(?P<layer>\d+)\.(?P<rest>.+)")


def _module_name(name: str, model_type: str) -> str:
    """The loader's name for GGUF tensor `name`; names it does not know pass through unchanged,
    so the loader reports them as having no place in the model."""
    stem, _, kind = name.rpartition(".")
    if stem in _GLOBAL:
        return f"{_GLOBAL[stem]}.{kind}"
    match = _NAME.fullmatch(name)
    if match is None:
        return name
    prefix, key = f"model.layers.{match['layer']}.", match["key"]
    if key in _PARAMETERS:
        return prefix + _PARAMETERS[key]
    block = _BLOCK_BY_TYPE.get(model_type, {}).get(key) or _BLOCK.get(key)
    return name if block is None else f"{prefix}{block}.{match['kind']}"


_PERMUTED_QK = ("llama", "mixtral", "granitemoe")  # model types convert_hf_to_gguf writes as LlamaModel does


def _unpermute(heads: int, stored: torch.Tensor) -> torch.Tensor:
    """Undo convert_hf_to_gguf's Q/K row order for llama: within each head it interleaves the two
    rotary halves (rows j, j + D/2 -> 2j, 2j + 1), since llama.cpp rotates adjacent pairs."""
    rows = stored.shape[0]
    # [heads, D/2, 2, ...] as stored -> [heads, 2, D/2, ...] as transformers rotates halves
    return stored.reshape(heads, rows // heads // 2, 2, *stored.shape[1:]).transpose(1, 2).reshape(stored.shape)


def _merge_kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """DeepSeek's kv_b_proj [N*(Dn+Dv), R] from llama.cpp's split halves k_b [N, R, Dn], v_b [N, Dv, R]."""
    r = k_b.shape[1]
    return torch.cat((k_b.transpose(1, 2), v_b), dim=1).reshape(-1, r)  # [N, Dn+Dv, R] -> [N*(Dn+Dv), R]


@dataclass(frozen=True)
class _Entry:
    """A module tensor: the stored pieces it is read from and, if they are not it as they are, how
    they combine into it."""

    parts: tuple[_Tensor, ...]
    shape: tuple[int, ...]
    combine: Callable[..., torch.Tensor] | None = None


def _interleaved(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gpt-oss's expert biases as its checkpoints hold them, [E, 2I] alternating g0, u0, g1, u1, ...,
    from llama.cpp's gate and up halves [E, I] each: the layout gpt_oss's Architecture.layouts undoes."""
    return torch.stack((gate, up), dim=-1).flatten(-2)


_SQUEEZED_ROWS = {("ffn_gate_inp_shexp", "qwen2_moe"), ("exp_probs_b", "ernie4_5_moe")}  # (key, model_type)


def _as_row(w: torch.Tensor) -> torch.Tensor:
    """A vector convert_hf_to_gguf squeezed back to the row its module holds: Qwen2-MoE's shared expert
    gate [H] to its Linear's [1, H], ERNIE's correction bias [E] to [1, E]."""
    return w.view(1, -1)


def _expert_entries(t: _Tensor, layer: str, projs: tuple[str, ...]) -> dict[str, _Entry]:
    """One entry per expert and projection of stacked experts [E, rows, in] (the loader fills its
    stacked experts from these); a fused ffn_gate_up_exps holds each expert's gate rows, then its up rows."""
    per_expert, rows = t.nbytes // t.shape[0], t.shape[1] // len(projs)
    size = per_expert // len(projs)
    entries = {}
    for e in range(t.shape[0]):
        for j, proj in enumerate(projs):
            part = _Tensor(t.path, t.name, t.type, (rows, *t.shape[2:]), t.offset + e * per_expert + j * size, size)
            entries[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"] = _Entry((part,), part.shape)
    return entries


def _pair(match: re.Match, by_name: dict[str, _Tensor], first: str, second: str) -> tuple[_Tensor, _Tensor] | None:
    """The tensors `first` and `second` of match's layer and kind, or None when this file lacks one
    (half of a pair in another split: it then passes through, for the loader to refuse)."""
    found = [by_name.get(f"blk.{match['layer']}.{key}.{match['kind']}") for key in (first, second)]
    return None if None in found else (found[0], found[1])


def _entries(tensors: list[_Tensor], config: dict[str, Any]) -> dict[str, _Entry]:
    entries: dict[str, _Entry] = {}
    by_name = {t.name: t for t in tensors}
    model_type = config["model_type"]
    for t in tensors:
        if t.name == "rope_freqs.weight":  # read into the config's rope scaling
            continue
        layer = _LAYER.fullmatch(t.name)
        if layer and int(layer["layer"]) >= config["num_hidden_layers"]:  # MTP layers, which the arch ignores
            entries[f"model.layers.{layer['layer']}.{layer['rest']}"] = _Entry((t,), t.shape)
            continue
        match = _NAME.fullmatch(t.name)
        if match is None:
            entries[_module_name(t.name, model_type)] = _Entry((t,), t.shape)
            continue
        prefix, key, kind = f"model.layers.{match['layer']}.", match["key"], match["kind"]
        if kind == "weight" and key in _EXPERTS:
            entries |= _expert_entries(t, match["layer"], (_EXPERTS[key],))
        elif kind == "weight" and key == "ffn_gate_up_exps":
            entries |= _expert_entries(t, match["layer"], ("gate_proj", "up_proj"))
        elif kind == "bias" and key in ("ffn_gate_exps", "ffn_up_exps"):  # gpt-oss's expert biases
            pair = _pair(match, by_name, "ffn_gate_exps", "ffn_up_exps")
            if pair is None:
                entries[t.name] = _Entry((t,), t.shape)
            elif key == "ffn_gate_exps":
                shape = (t.shape[0], 2 * t.shape[1])
                entries[prefix + "mlp.experts.gate_up_proj_bias"] = _Entry(pair, shape, _interleaved)
        elif kind == "bias" and key == "ffn_gate_up_exps":
            entries[prefix + "mlp.experts.gate_up_proj_bias"] = _Entry(
                (t,), t.shape, lambda w: _interleaved(*w.chunk(2, dim=-1))
            )
        elif kind == "bias" and key == "ffn_down_exps":
            entries[prefix + "mlp.experts.down_proj_bias"] = _Entry((t,), t.shape)
        elif kind == "weight" and key in ("attn_k_b", "attn_v_b"):
            pair = _pair(match, by_name, "attn_k_b", "attn_v_b")
            if pair is None:
                entries[t.name] = _Entry((t,), t.shape)
            elif key == "attn_k_b":
                k_b, v_b = pair
                shape = (k_b.shape[0] * (k_b.shape[2] + v_b.shape[1]), k_b.shape[1])
                entries[prefix + "self_attn.kv_b_proj.weight"] = _Entry(pair, shape, _merge_kv_b)
        elif model_type in _PERMUTED_QK and key in ("attn_q", "attn_k"):
            heads = config["num_attention_heads"] if key == "attn_q" else config["num_key_value_heads"]
            entries[_module_name(t.name, model_type)] = _Entry(
                (t,), t.shape, lambda w, heads=heads: _unpermute(heads, w)
            )
        elif len(t.shape) == 1 and (key, model_type) in _SQUEEZED_ROWS:
            entries[_module_name(t.name, model_type)] = _Entry((t,), (1, *t.shape), _as_row)
        else:
            entries[_module_name(t.name, model_type)] = _Entry((t,), t.shape)
    return entries


def _stored_shape(t: _Tensor) -> tuple[int, ...]:
    """A tensor's shape as read raw: its own for floats, [.., N, K / block * bytes] for blocks."""
    fmt = GGUF_FORMATS.get(t.type)
    return t.shape if fmt is None else fmt.stored_shape(t.shape)


def _read_whole(t: _Tensor, *, raw: bool = False) -> torch.Tensor:
    """A stored tensor as a fresh CPU tensor (for small ones and combined pieces): a block tensor as
    its raw uint8 blocks with `raw`, else widened to fp32."""
    fmt = GGUF_FORMATS.get(t.type)
    out = torch.empty(_stored_shape(t), dtype=torch.uint8 if fmt else _FLOAT_TYPES[t.type])
    with open(t.path, "rb") as f:
        _read(f, t, 0, t.nbytes, out)
    return out if fmt is None or raw else dequantize(out, None, fmt=fmt)


def _read(f: BinaryIO, t: _Tensor, start: int, end: int, out: torch.Tensor) -> None:
    """Bytes start..end of tensor `t` into `out` (contiguous, end - start bytes)."""
    f.seek(t.offset + start)
    if f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy())) != end - start:
        raise CheckpointError(f"Cannot read {t.name} from {t.path}: the file is truncated; download it again.")


class GGUFTensors:
    """One GGUF file read like a safetensors shard: `names` (module names), `shape`, `read_into`.

    Tensors are read with plain reads, not through a memory map, so the file's pages stay out of
    the process's resident memory (as in engine.tensorfile). `config` is the one `read_config`
    built from the set's first split: llama's Q/K rows are un-permuted with its head counts.
    """

    def __init__(self, path: Path, config: dict[str, Any]) -> None:
        self.path = path
        tensors = _open(path)[1]
        _check_types(path, tensors)
        self._entries = _entries(tensors, config)
        self._file: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._scratch: torch.Tensor | None = None
        self._raw: set[str] = set()  # block tensors served as their blocks (see keep_blocks)

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    @property
    def formats(self) -> dict[str, Format]:
        """The tensors stored in GGUF blocks that a module could keep as they are: name -> format.
        (DeepSeek's kv_b, merged from two transposed halves, is widened instead.)"""
        return {
            name: GGUF_FORMATS[entry.parts[0].type]
            for name, entry in self._entries.items()
            if entry.parts[0].type in GGUF_FORMATS and entry.combine is not _merge_kv_b
        }

    def keep_blocks(self, names: set[str]) -> None:
        """Serve these block tensors raw from now on: `shape` and `read_into` give their blocks
        [.., N, K / block * bytes] uint8 (the modules that hold them are GGUF ones)."""
        self._raw = names & set(self.formats)

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name` whole (fp32, or its blocks once kept): for the loader's Architecture.layouts."""
        out = torch.empty(self.shape(name), dtype=torch.uint8 if name in self._raw else torch.float32)
        self.read_into(name, out)
        return out

    def shape(self, name: str) -> tuple[int, ...]:
        entry = self._entries[name]
        return GGUF_FORMATS[entry.parts[0].type].stored_shape(entry.shape) if name in self._raw else entry.shape

    def read_into(self, name: str, dst: torch.Tensor) -> None:
        """Copy tensor `name` into `dst` (same shape, any float dtype, on the CPU).

        A plain tensor streams in slices of rows through one reused scratch buffer of at most
        CHUNK_BYTES; a combined one (llama Q/K, DeepSeek kv_b) is read whole, then rearranged.
        """
        entry, raw = self._entries[name], name in self._raw
        if entry.combine is not None:  # llama's row order is undone on raw blocks as on floats: rows stay whole
            dst.copy_(entry.combine(*(_read_whole(part, raw=raw) for part in entry.parts)))
            return
        t = entry.parts[0]
        if t.type in GGUF_FORMATS and not raw:  # blocks a float module holds (the embedding): widened whole
            dst.copy_(_read_whole(t))
            return
        dtype = torch.uint8 if raw else _FLOAT_TYPES[t.type]
        if dtype == dst.dtype and dst.is_contiguous():
            _read(self._file, t, 0, t.nbytes, dst)
            return
        rows = t.shape[0] if t.shape else 1
        row_bytes = t.nbytes // max(rows, 1)
        step = max(1, CHUNK_BYTES // max(row_bytes, 1))
        if self._scratch is None or self._scratch.numel() < min(step, rows) * row_bytes:
            self._scratch = torch.empty(max(CHUNK_BYTES, row_bytes), dtype=torch.uint8)
        flat = dst if t.shape else dst.view(1)
        for begin in range(0, rows, step):
            n = min(step, rows - begin)
            part = self._scratch[: n * row_bytes]
            _read(self._file, t, begin * row_bytes, (begin + n) * row_bytes, part)
            flat[begin : begin + n].copy_(part.view(dtype).view(n, *_stored_shape(t)[1:]))

    def close(self) -> None:
        self._file.close()


# --- tokenizer and description ------------------------------------------------------------------


def load_tokenizer(path: str | Path) -> Any | None:
    """The transformers tokenizer a GGUF's metadata describes (vocabulary, merges, special tokens,
    chat template), or None when it has no vocabulary."""
    path = split_files(path)[0]
    from gguf import GGUFReader

    if GGUFReader(path).get_field("tokenizer.ggml.tokens") is None:
        return None
    try:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as exc:  # transformers raises many types for tokenizers it cannot rebuild
        raise CheckpointError(f"The tokenizer in the GGUF metadata of {path.name} cannot be built: {exc}") from exc


@dataclass(frozen=True)
class GGUFSummary:
    """What `moerag model info` says about a GGUF's storage."""

    format: str  # "gguf"
    tensor_types: dict[str, int]  # type name -> parameters stored in it
    bits_per_weight: float  # over every tensor, scales and all


def summarize(path: str | Path) -> GGUFSummary:
    tensors = [t for split in split_files(path) for t in _open(split)[1]]
    params: dict[str, int] = {}
    for t in tensors:
        params[t.type] = params.get(t.type, 0) + math.prod(t.shape)
    total = sum(params.values())
    return GGUFSummary("gguf", params, 8 * sum(t.nbytes for t in tensors) / max(total, 1))
