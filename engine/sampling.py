"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling with a seed.

Shapes: B sequences, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from engine.errors import EngineError


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding settings (vLLM's habit: everything but the prompt in one object).

    temperature 0 means greedy (argmax); top_k 0 and top_p 1.0 disable those filters.
    max_new_tokens: at most this many new tokens (fewer when the context window ends first).
    stop: text that ends the text methods' output (stream, complete, stream_tokens); the match
    and anything after it are not returned.
    eos_token_ids: ids that end a sequence (included in `generate`'s output, never shown as
    text); None uses the checkpoint's own, () never stops early.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()
    eos_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise EngineError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise EngineError(f"top_p must lie in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise EngineError(f"top_k must be >= 0 (0 = off), got {self.top_k}.")
        if self.repetition_penalty <= 0:
            raise EngineError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}.")
        if self.max_new_tokens < 0:
            raise EngineError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}.")
        if isinstance(self.stop, str):  # one stop string, not its characters
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.eos_token_ids is not None:
            object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))

    def updated(self, **fields: Any) -> SamplingParams:
        """A copy with `fields` changed (an unknown name raises EngineError naming the valid ones)."""
        unknown = set(fields) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            valid = ", ".join(f.name for f in dataclasses.fields(self))
            raise EngineError(f"Unknown sampling setting(s) {', '.join(sorted(unknown))}; valid: {valid}.")
        return dataclasses.replace(self, **fields) if fields else self


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty as in transformers: seen tokens' positive logits / p, negative ones * p.

    logits [B, V], seen [B, V] bool.
    """
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] (already penalized) -> next token ids [B]."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [B, V]
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p; the best always stays.
        drop = (probs.cumsum(dim=-1) - probs) >= params.top_p  # [B, V]
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)  # [B, V]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
