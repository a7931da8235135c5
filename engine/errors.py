"""Errors a user can hit in the engine; each message names the thing and the fix.

`EngineError` derives from `Exception` rather than `retrieval.errors.MoeragError` because the
engine may not import retrieval (dependencies point app -> engine -> kernels only).
"""


class EngineError(Exception):
    """Root of every engine error a user can hit."""


class CheckpointError(EngineError):
    """A checkpoint directory or hub id cannot be read as a model."""


class UnsupportedArchitectureError(CheckpointError):
    """config.json names a `model_type` (or a feature of one) the engine does not implement."""


class MissingTensorError(CheckpointError):
    """The model needs tensors the checkpoint does not contain."""


class UnexpectedTensorError(CheckpointError):
    """The checkpoint contains tensors the model has no place for (or names one twice)."""


class TensorShapeError(CheckpointError):
    """A checkpoint tensor has another shape than its config.json implies."""


class ContextLengthError(EngineError):
    """A prompt (plus the tokens asked for) does not fit in the model's context window."""
