"""Writing a loaded (usually quantized) model back as a Hugging Face-style safetensors checkpoint.

The tensors are the model's own state (quantized weights, scales, float norms and embeddings);
config.json gains a `moerag_quantization` section and every safetensors file records the scheme
in its metadata, so `load_model(dst)` rebuilds the quantized modules and loads without
re-quantizing. Tokenizer files, generation_config.json and the like are copied as they are.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from engine.errors import EngineError
from engine.fp8 import FP8_MODULES
from engine.gptq import INT4ZP_EXPERTS, INT4ZP_LINEARS
from engine.loader import QUANTIZATION_KEY, QUANTIZATION_LAYOUT
from engine.model import Model, load_model

log = logging.getLogger(__name__)

SHARD_BYTES = 4 * 2**30  # split like the hub checkpoints do; one file for anything smaller


def write_checkpoint(model: Model, dst: str | Path, *, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write `model` to the directory `dst` (created; must not hold a checkpoint already)."""
    dst = Path(dst).expanduser()
    if dst.resolve() == Path(model.directory).resolve():
        raise EngineError(f"Refusing to overwrite the source checkpoint {dst}; choose another destination.")
    if (dst / "config.json").exists():
        raise EngineError(f"{dst} already holds a checkpoint (config.json); choose an empty directory.")
    if any(isinstance(m, FP8_MODULES) for m in model.net.modules()):
        raise EngineError(
            f"{model.directory} is an FP8 checkpoint, loaded as it is stored: use it directly, or write an int8 / "
            "int4 copy with: moerag model quantize SRC DST --scheme int4"
        )
    if any(isinstance(m, (*INT4ZP_LINEARS, *INT4ZP_EXPERTS)) for m in model.net.modules()):
        raise EngineError(
            f"{model.directory} is a GPTQ / AWQ checkpoint whose int4 weights are loaded as they are stored: use it "
            "directly, or write a copy with every target re-quantized: moerag model quantize SRC DST --scheme int4"
        )
    dst.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt"}
    config = dict(model.config)
    if model.quantization is not None:
        section = {**model.quantization, "targets": list(model.quantization["targets"]), "layout": QUANTIZATION_LAYOUT}
        config[QUANTIZATION_KEY] = section
        metadata[QUANTIZATION_KEY] = json.dumps(section)
    shards = _shards(model.net.state_dict(), shard_bytes)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(dst / name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    if len(shards) > 1:
        total = sum(t.nbytes for s in shards for t in s.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    if Path(model.directory).is_file():  # a GGUF: its tokenizer lives in its metadata
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(dst)
    else:
        for path in Path(model.directory).iterdir():
            if path.is_file() and path.name != "config.json" and not path.name.startswith("model.safetensors"):
                if path.suffix != ".safetensors":
                    shutil.copy2(path, dst / path.name)
    (dst / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return dst


def quantize_checkpoint(
    src: str | Path, dst: str | Path, *, scheme: str, group_size: int = 128, dtype: torch.dtype | None = None
) -> Model:
    """Load `src` quantizing layer by layer, write it to `dst`, and return the quantized model.

    dtype: what the float parts (embeddings, norms, scales) are kept in; by default the
    checkpoint's own `torch_dtype` / `dtype`, else float32.
    """
    model = load_model(src, quantize=scheme, group_size=group_size, dtype=dtype or _checkpoint_dtype(src))
    write_checkpoint(model, dst)
    return model


def _checkpoint_dtype(src: str | Path) -> torch.dtype:
    from engine.loader import read_architecture

    config = read_architecture(src)[1]
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    value = getattr(torch, str(name), None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32


def _shards(state: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    """The state split into files of at most ~limit bytes; tied tensors are written once."""
    shards: list[dict[str, Any]] = [{}]
    size, seen = 0, set()
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:  # a tied head: the loader fills it from the embedding
            continue
        seen.add(key)
        if size and size + tensor.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().contiguous().cpu()
        size += tensor.nbytes
    return shards
