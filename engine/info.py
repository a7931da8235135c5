"""What a checkpoint is, without loading its weights: architecture, sizes, parameter counts.

The architecture is built on the meta device (shapes only), so counts follow the engine's own
modules. Active parameters per token = all parameters minus the routed experts a token skips
(E - K of E in every MoE layer); embeddings and the head count as active. Bits per weight are
the checkpoint's bytes on disk over its parameters (as llama.cpp reports them): what a format
costs on average, float embeddings and norms included.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine import gguf
from engine.fp8 import checkpoint_fp8
from engine.gptq import checkpoint_int4
from engine.loader import _shards, read_architecture, stored_quantization
from engine.moe import Experts
from engine.quant_methods import quant_method


@dataclass(frozen=True)
class CheckpointInfo:
    directory: Path
    model_type: str
    architecture: str  # config.json's `architectures[0]`, e.g. Qwen3MoeForCausalLM
    layers: int
    moe_layers: int
    experts: int  # routed experts per MoE layer (0 for a dense model)
    experts_per_token: int
    hidden_size: int
    vocab_size: int
    context_length: int
    dtype: str  # as stored in config.json (torch_dtype / dtype)
    total_params: int
    active_params: int
    quantization: dict[str, Any] | None
    checkpoint_bytes: int
    weight_format: str  # e.g. "bfloat16", "int4 (group size 128)", "fp8 e4m3 (blocks of 128 x 128)"
    bits_per_weight: float  # checkpoint bits over total_params


def weight_format(config: dict[str, Any], directory: Path, quantization: dict[str, Any] | None, dtype: str) -> str:
    """How the checkpoint stores its weights, in words."""
    if quantization is not None:
        return f"{quantization['scheme']} (group size {quantization['group_size']})"
    fp8 = checkpoint_fp8(config, directory)
    if fp8 is not None:
        return f"fp8 e4m3 (blocks of {fp8.rows} x {fp8.inputs}, kept 8-bit)"
    int4 = checkpoint_int4(config, directory)
    if int4 is not None:
        return int4.describe()
    if quant_method(config, directory) == "mxfp4":
        return "mxfp4 (e2m1 in blocks of 32 with e8m0 scales, kept 4-bit)"
    return dtype


def supported() -> dict[str, list[str]]:
    """What the engine loads: architectures (config.json model_type), quantized checkpoint formats
    (quantization_config quant_method) and GGUF tensor types."""
    from engine.models import ARCHITECTURES
    from engine.quant_methods import LOADABLE

    return {
        "architectures": sorted(ARCHITECTURES),
        "quant_methods": list(LOADABLE),
        "gguf tensor types": list(gguf.TENSOR_TYPES),
    }


def _moe_layers(net: torch.nn.Module) -> list[tuple[Experts, int]]:
    """(routed experts, experts per token) of each MoE layer, the latter from its router's own top_k:
    config.json names it differently per family (num_experts_per_tok, moe_k, moe_topk, per layer)."""
    layers = []
    for module in net.modules():
        children = list(module.children())
        experts = [c for c in children if isinstance(c, Experts)]
        routers = [c for c in children if isinstance(getattr(c, "top_k", None), int)]
        if experts and routers:
            layers.append((experts[0], routers[0].top_k))
    return layers


def describe(path_or_id: str | Path) -> CheckpointInfo:
    directory, config, model_type, arch, args = read_architecture(path_or_id)
    with torch.device("meta"):
        net = arch.build(args)
    total = sum(p.numel() for p in net.parameters())
    moe = _moe_layers(net)
    experts = moe[0][0].gate_up_proj.shape[0] if moe else 0
    top_k = moe[0][1] if moe else 0
    skipped = sum((m.gate_up_proj.numel() + m.down_proj.numel()) * (experts - k) // experts for m, k in moe)
    quantization = stored_quantization(config, directory)
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    checkpoint_bytes = sum(p.stat().st_size for p in _shards(directory))
    if gguf.is_gguf(directory):  # the file's own tensor types, and bits over its tensors alone
        summary = gguf.summarize(directory)
        types = ", ".join(f"{name} {count / max(total, 1):.0%}" for name, count in summary.tensor_types.items())
        fmt, bits = f"gguf ({types})", summary.bits_per_weight
    else:
        fmt, bits = weight_format(config, directory, quantization, dtype), checkpoint_bytes * 8 / max(total, 1)
    return CheckpointInfo(
        directory=directory,
        model_type=model_type,
        architecture=(config.get("architectures") or [model_type])[0],
        layers=len(net.model.layers),
        moe_layers=len(moe),
        experts=experts,
        experts_per_token=top_k if moe else 0,
        hidden_size=int(config["hidden_size"]),
        vocab_size=int(config["vocab_size"]),
        context_length=int(net.max_position_embeddings),
        dtype=dtype,
        total_params=total,
        active_params=total - skipped,
        quantization=quantization,
        checkpoint_bytes=checkpoint_bytes,
        weight_format=fmt,
        bits_per_weight=bits,
    )
