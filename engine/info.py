"""What a checkpoint is, without loading its weights: architecture, sizes, parameter counts.

The architecture is built on the meta device (shapes only), so counts follow the engine's own
modules. Active parameters per token = all parameters minus the routed experts a token skips
(E - K of E in every MoE layer); embeddings and the head count as active.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.loader import _shards, read_architecture, stored_quantization
from engine.moe import Experts


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


def describe(path_or_id: str | Path) -> CheckpointInfo:
    directory, config, model_type, arch, args = read_architecture(path_or_id)
    with torch.device("meta"):
        net = arch.build(args)
    total = sum(p.numel() for p in net.parameters())
    moe = [m for m in net.modules() if isinstance(m, Experts)]
    experts = moe[0].gate_up_proj.shape[0] if moe else 0
    top_k = int(config.get("num_experts_per_tok") or 0)
    skipped = sum(m.gate_up_proj.numel() + m.down_proj.numel() for m in moe) * (experts - top_k) // max(experts, 1)
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
        dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
        total_params=total,
        active_params=total - skipped,
        quantization=stored_quantization(config, directory),
        checkpoint_bytes=sum(p.stat().st_size for p in _shards(directory)),
    )
