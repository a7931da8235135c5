"""The local MoE reasoning engine: load a Hugging Face checkpoint and run it.

model = engine.load_model("path/to/Qwen3-30B-A3B", dtype=torch.bfloat16, quantize="int4")
model.logits([1, 2, 3])                        # [T, V] float32, for checks
model.generate([1, 2, 3], max_new_tokens=32)   # new token ids (greedy unless sampling=...)
for delta in model.stream([{"role": "user", "content": "Hi"}], enable_thinking=False): ...
engine.quantize_checkpoint("path/to/model", "path/to/model-int4", scheme="int4")  # loads directly
"""

from engine.errors import (
    CheckpointError,
    ContextLengthError,
    EngineError,
    MissingTensorError,
    TensorShapeError,
    UnexpectedTensorError,
    UnsupportedArchitectureError,
)
from engine.export import quantize_checkpoint, write_checkpoint
from engine.info import CheckpointInfo, describe
from engine.model import Completion, Model, load_model
from engine.quantize import quantize
from engine.sampling import SamplingParams

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
