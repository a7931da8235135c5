"""How each llama.cpp architecture's GGUF metadata becomes a Hugging Face config dict: one builder
per family the engine reads from GGUF (FAMILIES), keyed by `general.architecture`. engine/gguf.py
reads the file and calls these; they see the metadata (`_Meta`), the tensor table (names, shapes,
types) and a reader for the few small tensors a config needs (rope_freqs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.errors import CheckpointError, UnsupportedArchitectureError

if TYPE_CHECKING:
    from engine.gguf import _Tensor


class _Meta:
    """`{arch}.`-prefixed metadata lookups; a missing required key is a CheckpointError naming it."""

    def __init__(self, metadata: dict[str, Any], path: Path) -> None:
        self.data, self.path = metadata, path
        self.arch = str(metadata.get("general.architecture"))

    def __call__(self, key: str, default: Any = KeyError) -> Any:
        value = self.data.get(f"{self.arch}.{key}", default)
        if value is KeyError:
            raise CheckpointError(f"{self.path.name} lacks the GGUF metadata {self.arch}.{key}, which the model needs.")
        return value


def _rope_scaling(m: _Meta) -> dict[str, Any] | None:
    kind = m("rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(m("rope.scaling.factor"))}
    if kind == "yarn":
        return {
            "rope_type": "yarn",
            "factor": float(m("rope.scaling.factor")),
            "original_max_position_embeddings": int(m("rope.scaling.original_context_length")),
            "beta_fast": float(m("rope.scaling.yarn_beta_fast", 32.0)),
            "beta_slow": float(m("rope.scaling.yarn_beta_slow", 1.0)),
        }
    raise UnsupportedArchitectureError(
        f"{m.path.name} uses rope scaling {kind!r}, which the engine does not support (none, linear, yarn)."
    )


def _llama3_rope(divisors: torch.Tensor, theta: float, dim: int) -> dict[str, Any] | None:
    """Llama 3's rope scaling from llama.cpp's `rope_freqs` tensor (one divisor per frequency, [D/2]).

    transformers divides long wavelengths (> L/low) by `factor`, keeps short ones (< L/high) and
    blends between, where 1/divisor = (1 - s)/factor + s with s = (L/wavelen - low)/(high - low).
    Only the ratios L/low and L/high are determined, so low = 1; the recovered parameters are
    accepted only if the engine's own llama3 rope reproduces every divisor.
    """
    from engine.config import RopeArgs
    from engine.rope import ROPE_TYPES

    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # [D/2]
    wavelen = (2 * math.pi / inv_freq).double()
    divisors = divisors.double()
    factor = float(divisors.max())
    if factor == 1.0:
        return None
    unit, full = divisors == 1.0, divisors == factor
    mid = ~unit & ~full
    s = (1 / divisors[mid] - 1 / factor) / (1 - 1 / factor)
    if int(mid.sum()) >= 2:  # s = A/w - B with A = L/(high - 1), B = 1/(high - 1): a least-squares line
        fit = torch.linalg.lstsq(torch.stack([1 / wavelen[mid], -torch.ones_like(s)], 1), s[:, None]).solution
        a, b = float(fit[0]), float(fit[1])
        high, old_len = 1 + 1 / b, a / b
    else:  # too few blended frequencies to fix L: any L between the bands gives the same divisors
        below = float(wavelen[~full].max()) if bool((~full).any()) else float(wavelen.min()) / 2
        old_len = math.sqrt(below * float(wavelen[full].min()))
        if bool(mid.any()):
            high = 1 + (old_len / float(wavelen[mid][0]) - 1) / float(s[0])
        else:
            shortest_kept = float(wavelen[unit].max()) if bool(unit.any()) else old_len / 4
            high = math.sqrt(old_len / shortest_kept) if shortest_kept < old_len else 4.0
    params = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": high,
        "original_max_position_embeddings": old_len,
    }
    ours, _ = ROPE_TYPES["llama3"](RopeArgs(theta=theta, rope_type="llama3", params=params), dim)
    if not torch.allclose(ours.double(), inv_freq.double() / divisors, rtol=1e-5, atol=0):
        raise UnsupportedArchitectureError(
            "The GGUF's rope_freqs tensor is not Llama 3 rope scaling, the only per-frequency scaling the engine reads."
        )
    return params


def _gqa(m: _Meta, info: dict[str, _Tensor]) -> dict[str, Any]:
    """The fields every llama-style architecture writes the same way."""
    hidden, heads = int(m("embedding_length")), int(m("attention.head_count"))
    return {
        "vocab_size": info["token_embd.weight"].shape[0],
        "hidden_size": hidden,
        "num_hidden_layers": int(m("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(m("attention.head_count_kv", heads)),
        "head_dim": int(m("attention.key_length", hidden // heads)),
        "intermediate_size": int(m("feed_forward_length", 0)),
        "rms_norm_eps": float(m("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(m("context_length")),
        "rope_theta": float(m("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(m),
        "attention_bias": "blk.0.attn_q.bias" in info,
    }


def _llama(m: _Meta, info: dict[str, _Tensor], read: Callable[[str], torch.Tensor]) -> dict[str, Any]:
    config = _gqa(m, info) | {"mlp_bias": "blk.0.ffn_gate.bias" in info}
    if "rope_freqs.weight" in info:
        dim = int(m("rope.dimension_count", config["head_dim"]))
        config["rope_scaling"] = _llama3_rope(read("rope_freqs.weight"), config["rope_theta"], dim)
    if "blk.0.ffn_gate_inp.weight" in info:  # llama.cpp writes Mixtral as llama with experts
        config |= {
            "model_type": "mixtral",
            "architectures": ["MixtralForCausalLM"],
            "num_local_experts": int(m("expert_count")),
            "num_experts_per_tok": int(m("expert_used_count")),
        }
    return config


def _softmax_moe(m: _Meta, info: dict[str, _Tensor], *, renormalize: bool) -> dict[str, Any]:
    """Qwen-style softmax top-k experts; `renormalize`: what llama.cpp does when the file does not say."""
    config = _gqa(m, info)
    width = int(m("expert_feed_forward_length"))
    return config | {
        "moe_intermediate_size": width,
        "intermediate_size": config["intermediate_size"] or width,
        "num_experts": int(m("expert_count")),
        "num_experts_per_tok": int(m("expert_used_count")),
        "norm_topk_prob": bool(m("expert_weights_norm", renormalize)),
        "decoder_sparse_step": 1,
        # A layer without a router is dense: the file says which by its tensors.
        "mlp_only_layers": [
            i for i in range(config["num_hidden_layers"]) if f"blk.{i}.ffn_gate_inp.weight" not in info
        ],
    }


def _qwen3moe(m: _Meta, info: dict[str, _Tensor], read: Callable[[str], torch.Tensor]) -> dict[str, Any]:
    return _softmax_moe(m, info, renormalize=True)  # llama.cpp renormalizes qwen3moe's top k by default


def _qwen2moe(m: _Meta, info: dict[str, _Tensor], read: Callable[[str], torch.Tensor]) -> dict[str, Any]:
    config = _softmax_moe(m, info, renormalize=False)  # nor does Qwen1.5-MoE or Qwen2-57B
    return config | {"shared_expert_intermediate_size": int(m("expert_shared_feed_forward_length"))}


def _olmoe(m: _Meta, info: dict[str, _Tensor], read: Callable[[str], torch.Tensor]) -> dict[str, Any]:
    config = _gqa(m, info)
    clip = m("attention.clamp_kqv", None)
    return config | {
        # convert_hf_to_gguf writes OLMoE's expert width as the feed-forward length
        "intermediate_size": int(m("expert_feed_forward_length", 0) or config["intermediate_size"]),
        "num_experts": int(m("expert_count")),
        "num_experts_per_tok": int(m("expert_used_count")),
        "norm_topk_prob": bool(m("expert_weights_norm", False)),
        "clip_qkv": None if clip is None else float(clip),
    }


def _check_sigmoid_routing(m: _Meta) -> None:
    """The families routed by sigmoid scores in the engine (llama.cpp's default for them too)."""
    gating = int(m("expert_gating_func", 2))
    if gating != 2:
        raise UnsupportedArchitectureError(
            f"{m.path.name} routes its experts with gating function {gating} (llama.cpp's numbering); the "
            f"engine's {m.arch} routes by sigmoid scores (2) only."
        )


def _sigmoid_grouped_moe(m: _Meta, info: dict[str, _Tensor]) -> dict[str, Any]:
    """DeepSeek-V3-style routing over GQA attention (dots1, glm4moe): sigmoid scores with a correction
    bias, group-limited, scaled, beside shared experts, after leading dense layers."""
    _check_sigmoid_routing(m)
    return _gqa(m, info) | {
        "moe_intermediate_size": int(m("expert_feed_forward_length")),
        "n_routed_experts": int(m("expert_count")),
        "num_experts_per_tok": int(m("expert_used_count")),
        "n_shared_experts": int(m("expert_shared_count", 0)),
        "n_group": int(m("expert_group_count", 1)),
        "topk_group": int(m("expert_group_used_count", 1)),
        "norm_topk_prob": bool(m("expert_weights_norm", False)),
        "routed_scaling_factor": float(m("expert_weights_scale", 1.0)),
        "first_k_dense_replace": int(m("leading_dense_block_count", 0)),
    }


def _glm4moe(m: _Meta, info: dict[str, _Tensor], read: Callable[[str], torch.Tensor]) -> dict[str, Any]:
    config = _sigmoid_grouped_moe(m, info)
    nextn = int(m("nextn_predict_layers", 0))  # block_count counts the MTP layers after the model's
    return config | {
        "num_hidden_layers": config["num_hidden_layers"] - nextn,
        "num_nextn_predict_layers": nextn,
        "partial_rotary_factor": int(m("rope.dimension_count", config["head_dim"])) / config["head_dim"],
        "use_qk_norm": "blk.0.attn_q_norm.weight" in info,
    }


def _ernie4_5_moe(m: _Meta, info: dict[str, _Tensor], read: Callable[[str], torch.Tensor]) -> dict[str, Any]:
    return _gqa(m, info) | {
        "moe_num_experts": int(m("expert_count")),
        "moe_k": int(m("expert_used_count")),
        "moe_intermediate_size": int(m("expert_feed_forward_length")),
        "moe_num_shared_experts": int(m("expert_shared_count", 0)),
        # experts on every step-th layer from the first after the dense ones, to the last
        "moe_layer_start_index": int(m("leading_dense_block_count", 0)),
        "moe_layer_end_index": -1,
        "moe_layer_interval": int(m("interleave_moe_layer_step", 1)),
        "use_bias": "blk.0.attn_q.bias" in info,
    }


def _granitemoe(m: _Meta, info: dict[str, _Tensor], read: Callable[[str], torch.Tensor]) -> dict[str, Any]:
    config = _gqa(m, info)
    return config | {
        "intermediate_size": int(m("expert_feed_forward_length", 0) or config["intermediate_size"]),
        "num_local_experts": int(m("expert_count")),
        "num_experts_per_tok": int(m("expert_used_count")),
        # convert_hf_to_gguf writes Granite's multipliers when config.json sets them; 1 is its default
        "embedding_multiplier": float(m("embedding_scale", 1.0)),
        "attention_multiplier": float(m("attention.scale", 1.0)),
        "residual_multiplier": float(m("residual_scale", 1.0)),
        "logits_scaling": float(m("logit_scale", 1.0)),
    }


def _hunyuan_moe(m: _Meta, info: dict[str, _Tensor], read: Callable[[str], torch.Tensor]) -> dict[str, Any]:
    # convert_hf_to_gguf folds Hunyuan's NTK alpha into the rope base, so the rope read is plain
    config = _gqa(m, info)
    return config | {
        "intermediate_size": int(m("expert_shared_feed_forward_length", 0) or config["intermediate_size"]),
        "moe_intermediate_size": int(m("expert_feed_forward_length")),
        "num_experts": int(m("expert_count")),
        "moe_topk": int(m("expert_used_count")),
        "num_shared_expert": int(m("expert_shared_count", 1)),
    }


def _minimax_m2(m: _Meta, info: dict[str, _Tensor], read: Callable[[str], torch.Tensor]) -> dict[str, Any]:
    _check_sigmoid_routing(m)
    config = _gqa(m, info)
    return config | {
        "intermediate_size": int(m("expert_feed_forward_length")),
        "num_local_experts": int(m("expert_count")),
        "num_experts_per_tok": int(m("expert_used_count")),
        "rotary_dim": int(m("rope.dimension_count", config["head_dim"])),
    }


def _gpt_oss(m: _Meta, info: dict[str, _Tensor], read: Callable[[str], torch.Tensor]) -> dict[str, Any]:
    config = _gqa(m, info)
    layers = config["num_hidden_layers"]
    # llama.cpp hard-codes gpt-oss's alternation (even layers sliding); a file may state it per layer.
    pattern = m("attention.sliding_window_pattern", [i % 2 == 0 for i in range(layers)])
    if not isinstance(pattern, list) or len(pattern) != layers:
        raise CheckpointError(f"{m.path.name}: {m.arch}.attention.sliding_window_pattern is not one flag a layer.")
    rope = config["rope_scaling"]
    if rope is not None and rope["rope_type"] == "yarn":
        rope["truncate"] = False  # as every gpt-oss config.json states; GGUF metadata has no key for it
    return config | {
        "intermediate_size": int(m("expert_feed_forward_length")),
        "num_local_experts": int(m("expert_count")),
        "num_experts_per_tok": int(m("expert_used_count")),
        "sliding_window": int(m("attention.sliding_window")),
        "layer_types": ["sliding_attention" if sliding else "full_attention" for sliding in pattern],
    }


def _deepseek2(m: _Meta, info: dict[str, _Tensor], read: Callable[[str], torch.Tensor]) -> dict[str, Any]:
    heads, rope_dim = int(m("attention.head_count")), int(m("rope.dimension_count"))
    nextn = int(m("nextn_predict_layers", 0))
    # Files since llama.cpp's MLA rework state the per-head key length as key_length_mla
    # (key_length is then kv_lora_rank + rope dims); older files state it as key_length.
    key_length = int(m("attention.key_length_mla", 0) or m("attention.key_length"))
    gating = int(m("expert_gating_func", 1))  # llama.cpp's default for deepseek2 is softmax
    rope = _rope_scaling(m)
    if rope is not None and rope["rope_type"] == "yarn":
        # llama.cpp scales q.k by mscale_all_dim^2 and leaves cos/sin unscaled, i.e. mscale == mscale_all_dim.
        mscale_all_dim = float(m("rope.scaling.yarn_log_multiplier", 0.0)) / 0.1
        rope |= {"mscale": mscale_all_dim, "mscale_all_dim": mscale_all_dim}
    return {
        "vocab_size": info["token_embd.weight"].shape[0],
        "hidden_size": int(m("embedding_length")),
        "num_hidden_layers": int(m("block_count")) - nextn,
        "num_nextn_predict_layers": nextn,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "q_lora_rank": int(m("attention.q_lora_rank", 0)) or None,
        "kv_lora_rank": int(m("attention.kv_lora_rank")),
        "qk_rope_head_dim": rope_dim,
        "qk_nope_head_dim": key_length - rope_dim,
        "v_head_dim": int(m("attention.value_length_mla", 0) or m("attention.value_length")),
        "intermediate_size": int(m("feed_forward_length")),
        "moe_intermediate_size": int(m("expert_feed_forward_length")),
        "n_routed_experts": int(m("expert_count")),
        "n_shared_experts": int(m("expert_shared_count", 0)),
        "num_experts_per_tok": int(m("expert_used_count")),
        "n_group": int(m("expert_group_count", 1)),
        "topk_group": int(m("expert_group_used_count", 1)),
        "norm_topk_prob": bool(m("expert_weights_norm", False)),
        "routed_scaling_factor": float(m("expert_weights_scale", 1.0)),
        "scoring_func": {1: "softmax", 2: "sigmoid"}.get(gating, str(gating)),
        "topk_method": "noaux_tc" if gating == 2 else "greedy",
        "first_k_dense_replace": int(m("leading_dense_block_count", 0)),
        "rms_norm_eps": float(m("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(m("context_length")),
        "rope_theta": float(m("rope.freq_base", 10000.0)),
        "rope_scaling": rope,
        # llama.cpp rotates adjacent pairs for deepseek2, as the official weights are laid out.
        "rope_interleave": True,
        "attention_bias": False,
    }


@dataclass(frozen=True)
class _Family:
    model_type: str  # the engine's architecture (engine.models.ARCHITECTURES), unless `config` names another
    hf_class: str
    config: Callable[[_Meta, dict[str, _Tensor], Callable[[str], torch.Tensor]], dict[str, Any]]


# GGUF general.architecture -> how its metadata becomes a config.json.
FAMILIES: dict[str, _Family] = {
    "llama": _Family("llama", "LlamaForCausalLM", _llama),
    "qwen2": _Family("qwen2", "Qwen2ForCausalLM", lambda m, info, read: _gqa(m, info)),
    "qwen3": _Family("qwen3", "Qwen3ForCausalLM", lambda m, info, read: _gqa(m, info)),
    "qwen3moe": _Family("qwen3_moe", "Qwen3MoeForCausalLM", _qwen3moe),
    "qwen2moe": _Family("qwen2_moe", "Qwen2MoeForCausalLM", _qwen2moe),
    "olmoe": _Family("olmoe", "OlmoeForCausalLM", _olmoe),
    "deepseek2": _Family("deepseek_v3", "DeepseekV3ForCausalLM", _deepseek2),
    "glm4moe": _Family("glm4_moe", "Glm4MoeForCausalLM", _glm4moe),
    "dots1": _Family("dots1", "Dots1ForCausalLM", lambda m, info, read: _sigmoid_grouped_moe(m, info)),
    "granitemoe": _Family("granitemoe", "GraniteMoeForCausalLM", _granitemoe),
    "hunyuan-moe": _Family("hunyuan_v1_moe", "HunYuanMoEV1ForCausalLM", _hunyuan_moe),
    "ernie4_5-moe": _Family("ernie4_5_moe", "Ernie4_5_MoeForCausalLM", _ernie4_5_moe),
    "minimax-m2": _Family("minimax_m2", "MiniMaxM2ForCausalLM", _minimax_m2),
    "gpt-oss": _Family("gpt_oss", "GptOssForCausalLM", _gpt_oss),
}
