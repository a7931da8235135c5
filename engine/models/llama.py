"""Dense decoders of the Llama family: Llama, Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm).

These are the DeepSeek-R1 distills. One block shape; the variants differ only in flags read
from config.json at the boundary.
Shapes: H hidden, I MLP width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.config import DecoderArgs, gqa_fields
from engine.decoder import Block, CausalLM
from engine.errors import UnsupportedArchitectureError
from engine.layers import MLP, Attention
from engine.models import Architecture


@dataclass(frozen=True)
class DenseArgs(DecoderArgs):
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool


def _common(c: dict[str, Any], *, qkv_bias: bool, o_bias: bool, mlp_bias: bool, qk_norm: bool) -> DenseArgs:
    if c.get("use_sliding_window") or "sliding_attention" in (c.get("layer_types") or ()):
        raise UnsupportedArchitectureError(
            f"This {c.get('model_type')} checkpoint uses sliding-window attention, which the engine "
            "does not implement yet."
        )
    return DenseArgs(
        **gqa_fields(c, eps=1e-6),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        qk_norm=qk_norm,
    )


def llama_args(c: dict[str, Any]) -> DenseArgs:
    bias = bool(c.get("attention_bias", False))
    return _common(c, qkv_bias=bias, o_bias=bias, mlp_bias=bool(c.get("mlp_bias", False)), qk_norm=False)


def qwen2_args(c: dict[str, Any]) -> DenseArgs:
    # Qwen2 always has q/k/v biases and never an output-projection bias.
    return _common(c, qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False)


def qwen3_args(c: dict[str, Any]) -> DenseArgs:
    bias = bool(c.get("attention_bias", False))
    return _common(c, qkv_bias=bias, o_bias=bias, mlp_bias=False, qk_norm=True)


def build(args: DenseArgs) -> CausalLM:
    blocks = [
        Block(
            Attention(
                args.hidden_size,
                args.num_heads,
                args.num_kv_heads,
                args.head_dim,
                qkv_bias=args.qkv_bias,
                o_bias=args.o_bias,
                qk_norm_eps=args.rms_norm_eps if args.qk_norm else None,
            ),
            MLP(args.hidden_size, args.intermediate_size, bias=args.mlp_bias),
            args.hidden_size,
            args.rms_norm_eps,
        )
        for _ in range(args.num_layers)
    ]
    return CausalLM.assemble(args, blocks)


# Old Llama checkpoints store the rotary table; it is derived from config.json instead.
_IGNORE = lambda args: (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)

LLAMA = Architecture(args_from_config=llama_args, build=build, ignore=_IGNORE)
QWEN2 = Architecture(args_from_config=qwen2_args, build=build, ignore=_IGNORE)
QWEN3 = Architecture(args_from_config=qwen3_args, build=build, ignore=_IGNORE)
