"""The checkpoint's tokenizer: loading it offline, chat prompts, and streaming detokenization.

Streaming never emits broken UTF-8: a byte-level token may hold half of a character, so text is
released only once the decoded tail no longer ends in U+FFFD (the replacement character).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.errors import CheckpointError, EngineError

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
Message = dict[str, Any]


def load_tokenizer(directory: Path) -> Any | None:
    """The checkpoint's transformers tokenizer, or None when the directory ships none (a GGUF
    file: the one its metadata describes)."""
    from engine import gguf

    if gguf.is_gguf(directory):
        return gguf.load_tokenizer(directory)
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # transformers raises many types for broken tokenizer files
        raise CheckpointError(f"The tokenizer files in {directory} cannot be loaded: {exc}") from exc


def chat_prompt(
    tokenizer: Any,
    messages: Sequence[Message],
    *,
    enable_thinking: bool | None = None,
    reasoning_effort: str | None = None,
) -> list[int]:
    """Token ids of `messages` rendered by the checkpoint's chat template, ready for the reply.
    `enable_thinking` is Qwen3's thinking switch, `reasoning_effort` gpt-oss's (low, medium, high);
    None leaves the template's default, and a template without the switch ignores it."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise EngineError("This checkpoint's tokenizer has no chat template; pass plain text or token ids instead.")
    extra: dict[str, Any] = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    if reasoning_effort is not None:
        extra["reasoning_effort"] = reasoning_effort
    # Render to text, then encode without adding specials: the template writes BOS itself.
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False, **extra)
    return list(tokenizer.encode(text, add_special_tokens=False))


class Detokenizer:
    """Turns a growing list of token ids into text deltas that never split a character."""

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = ""

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special)

    def push(self, token: int) -> str:
        """Add one token; return the new text that is safe to show (possibly "")."""
        self.ids.append(token)
        text = self._text()
        # Decoding the whole sequence keeps tokenizers' space/merge rules exact; the cost is
        # negligible next to a decode step.
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted) :], text
        return delta

    def flush(self) -> str:
        """Whatever is left at the end (a truly invalid byte sequence is shown as U+FFFD)."""
        text = self._text()
        delta = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted = text
        return delta
