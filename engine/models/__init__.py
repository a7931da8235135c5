"""Architectures by `config.model_type`: a dict from name to how to read, build and load it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Architecture:
    """What the loader needs from one architecture file.

    `renames` are (regex, replacement) pairs applied to checkpoint names before matching module
    names; `ignore` are regexes of checkpoint tensors that are knowingly unused (e.g. DeepSeek's
    multi-token-prediction layer); `keep_fp32` are parameter-name suffixes never cast down.
    """

    args_from_config: Callable[[dict[str, Any]], Any]
    build: Callable[[Any], nn.Module]
    renames: tuple[tuple[str, str], ...] = ()
    ignore: Callable[[Any], tuple[str, ...]] = field(default=lambda args: ())
    keep_fp32: tuple[str, ...] = ()
    # Checkpoint tensors held otherwise than the engine holds them: (regex on the renamed name, steps),
    # applied as each is read. "transpose": a float [.., K, N] becomes [.., N, K] (block formats
    # already store rows of outputs, so they skip it); "deinterleave": dim 1's gate/up rows (or
    # columns of a bias) alternating g0, u0, g1, u1, ... become all gate ones, then all up ones.
    layouts: tuple[tuple[str, tuple[str, ...]], ...] = ()


def _registry() -> dict[str, Architecture]:
    from engine.models import (
        deepseek_v3,
        dots1,
        ernie4_5_moe,
        glm4_moe,
        glm4_moe_lite,
        gpt_oss,
        granitemoe,
        hunyuan_v1_moe,
        llama,
        llama4_text,
        minimax_m2,
        mixtral,
        olmoe,
        qwen2_moe,
        qwen3_moe,
        qwen3_next,
    )

    return {
        "qwen3_moe": qwen3_moe.ARCHITECTURE,
        "qwen2_moe": qwen2_moe.ARCHITECTURE,
        "olmoe": olmoe.ARCHITECTURE,
        "gpt_oss": gpt_oss.ARCHITECTURE,
        "glm4_moe": glm4_moe.ARCHITECTURE,
        "minimax_m2": minimax_m2.ARCHITECTURE,
        "qwen3_next": qwen3_next.ARCHITECTURE,
        "qwen3_5_moe": qwen3_next.ARCHITECTURE,  # the text model; its checkpoints are multimodal
        "qwen3_5_moe_text": qwen3_next.ARCHITECTURE,
        "mixtral": mixtral.ARCHITECTURE,
        "deepseek_v3": deepseek_v3.ARCHITECTURE,
        "deepseek_v2": deepseek_v3.ARCHITECTURE,  # the same blocks; DeepseekV3Args reads V2's routing
        "ernie4_5_moe": ernie4_5_moe.ARCHITECTURE,
        "glm4_moe_lite": glm4_moe_lite.ARCHITECTURE,
        "hunyuan_v1_moe": hunyuan_v1_moe.ARCHITECTURE,
        "dots1": dots1.ARCHITECTURE,
        "granitemoe": granitemoe.ARCHITECTURE,
        "llama4_text": llama4_text.ARCHITECTURE,
        "llama": llama.LLAMA,
        "qwen2": llama.QWEN2,
        "qwen3": llama.QWEN3,
    }


ARCHITECTURES: dict[str, Architecture] = _registry()
