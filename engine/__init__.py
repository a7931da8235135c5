"""The local MoE reasoning engine: load a Hugging Face checkpoint and run it.

model = engine.load_model("path/to/Qwen3-30B-A3B", dtype=torch.bfloat16, quantize="int4")
model.logits([1, 2, 3])                        # [T, V] float32, for checks
model.generate([1, 2, 3], max_new_tokens=32)   # new token ids (greedy unless temperature=...)
model.generate([1, 2, 3], engine.SamplingParams(temperature=0.7, seed=1, stop=("\n",)))  # one request's settings
for delta in model.stream([{"role": "user", "content": "Hi"}], enable_thinking=False): ...
engine.quantize_checkpoint("path/to/model", "path/to/model-int4", scheme="int4")  # loads directly
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from engine.errors import (
    CheckpointError,
    ContextLengthError,
    EngineError,
    MissingTensorError,
    TensorShapeError,
    UnexpectedTensorError,
    UnsupportedArchitectureError,
)

# Imported on first use (PEP 562): torch and the model code load only when a name below is
# asked for, so torch-free parts (errors, reasoning) serve the app without them.
_LAZY = {
    "quantize_checkpoint": "engine.export",
    "write_checkpoint": "engine.export",
    "CheckpointInfo": "engine.info",
    "describe": "engine.info",
    "Completion": "engine.model",
    "Model": "engine.model",
    "load_model": "engine.model",
    "quantize": "engine.quantization",
    "SamplingParams": "engine.sampling",
}

if TYPE_CHECKING:
    from engine.export import quantize_checkpoint, write_checkpoint
    from engine.info import CheckpointInfo, describe
    from engine.model import Completion, Model, load_model
    from engine.quantization import quantize
    from engine.sampling import SamplingParams


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "Completion",
    "ContextLengthError",
    "EngineError",
    "MissingTensorError",
    "Model",
    "SamplingParams",
    "TensorShapeError",
    "UnexpectedTensorError",
    "UnsupportedArchitectureError",
    "describe",
    "load_model",
    "quantize",
    "quantize_checkpoint",
    "write_checkpoint",
]
