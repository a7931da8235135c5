"""Reading a checkpoint's config.json at the boundary: the raw dict and the RoPE settings.

Each architecture turns the dict into its own args dataclass; this file holds what they share.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import CheckpointError


def read_config(directory: Path) -> dict[str, Any]:
    """The checkpoint's config.json as a dict, or a CheckpointError that says what is wrong."""
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"No config.json in {directory}. Point the engine at a Hugging Face checkpoint "
            "directory (config.json + *.safetensors)."
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"Cannot read {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not hold a JSON object.")
    return config


def require(config: dict[str, Any], *names: str) -> Any:
    """The first of `names` present in config.json (aliases across transformers versions)."""
    for name in names:
        if config.get(name) is not None:
            return config[name]
    raise CheckpointError(f"config.json lacks {' / '.join(names)}, which this architecture needs.")


@dataclass(frozen=True)
class RopeArgs:
    """Rotary embedding settings, from `rope_parameters` (transformers 5) or `rope_scaling` (older)."""

    theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3 | yarn
    params: dict[str, Any] = field(default_factory=dict)  # the scaling dict as written in config.json
    max_position_embeddings: int = 2048

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RopeArgs:
        # transformers 5 writes `rope_parameters` (with rope_theta inside); older checkpoints
        # (and the official DeepSeek/Qwen ones) write `rope_theta` + `rope_scaling`.
        params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        return cls(
            theta=float(theta),
            rope_type=str(rope_type),
            params=params,
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        )


@dataclass(frozen=True)
class DecoderArgs:
    """The fields every grouped-query-attention decoder reads alike from config.json (`gqa_fields`);
    each architecture's args add their own after these."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # the dense MLP's width (one expert's, in families without a dense MLP)
    rms_norm_eps: float
    tie_word_embeddings: bool
    rope: RopeArgs


def gqa_fields(c: dict[str, Any], *, eps: float) -> dict[str, Any]:
    """The fields every grouped-query-attention decoder (llama, qwen2/3, qwen3_moe, mixtral) reads
    the same way; `eps` is the family's rms_norm_eps default when config.json omits it."""
    hidden, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    return dict(
        vocab_size=int(c["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(c["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=int(c.get("head_dim") or hidden // heads),
        intermediate_size=int(c["intermediate_size"]),
        rms_norm_eps=float(c.get("rms_norm_eps", eps)),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        rope=RopeArgs.from_config(c),
    )
