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


def _registry() -> dict[str, Architecture]:
    from engine.models import deepseek_v3, llama, mixtral, qwen3_moe

    return {
        "qwen3_moe": qwen3_moe.ARCHITECTURE,
        "mixtral": mixtral.ARCHITECTURE,
        "deepseek_v3": deepseek_v3.ARCHITECTURE,
        "llama": llama.LLAMA,
        "qwen2": llama.QWEN2,
        "qwen3": llama.QWEN3,
    }


ARCHITECTURES: dict[str, Architecture] = _registry()
