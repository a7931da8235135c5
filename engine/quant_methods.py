"""The `quantization_config` methods of published checkpoints the engine loads, and one error for the rest.

A published checkpoint says how its weights are quantized in config.json's quantization_config
(`quant_method`). Each loadable method has its own module (engine/fp8.py, engine/mxfp4.py,
engine/gptq.py) that reads its section; this one decides which applies, so that any other method
is refused once, by name, with the list of what loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.errors import CheckpointError

LOADABLE = {
    "fp8": "fmt 'e4m3' with a weight_block_size (DeepSeek-V3's layout)",
    "mxfp4": "e2m1 blocks of 32 with e8m0 scales (gpt-oss's layout)",
    "gptq": "4 bits, groups of 32/64/128 or per channel, sym or asym, with or without desc_act",
    "awq": "4 bits, GEMM packing",
}


def refusal(where: Path, what: str) -> CheckpointError:
    """The error for a quantization_config the engine cannot load: what it has, and what loads."""
    methods = "; ".join(f"'{name}' ({detail})" for name, detail in LOADABLE.items())
    return CheckpointError(
        f"{where}: quantization_config has {what}, which the engine cannot load. Loadable: float checkpoints "
        f"(float32, bfloat16, float16), checkpoints written by moerag model quantize, and quant_method {methods}."
    )


def quant_method(config: dict[str, Any], directory: Path) -> str | None:
    """config.json's quant_method when it is one the engine loads, None without a quantization_config;
    a CheckpointError naming any other."""
    section = config.get("quantization_config")
    if section is None:
        return None
    method = section.get("quant_method") if isinstance(section, dict) else section
    if method not in LOADABLE:
        raise refusal(directory / "config.json", f"quant_method {method!r}")
    return method
