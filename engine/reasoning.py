"""Splitting a model's reasoning from its answer while text streams in: <think>...</think> (Qwen3,
DeepSeek-R1 and most reasoning families) or gpt-oss's harmony channels.

State machines over text deltas: tags may arrive split across deltas, so a possible partial
tag is held back until decided. Templates that put the opening tag in the prompt
(DeepSeek-R1) start in the reasoning state. Whitespace between the reasoning and the answer
is dropped, so the answer starts with its first real character. `reply_splitter` picks the
machine for a model's tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

OPEN, CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Piece:
    kind: str  # "reasoning" | "answer"
    text: str


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningSplitter:
    """feed(delta) -> pieces; close() -> the rest. States: start, reasoning, answer."""

    def __init__(self, *, starts_in_reasoning: bool = False) -> None:
        self.state = "reasoning" if starts_in_reasoning else "start"
        self.pending = ""
        self.answer_started = False

    @classmethod
    def after(cls, prompt: str) -> ReasoningSplitter:
        """A splitter for the reply to `prompt` (its text): templates like DeepSeek-R1's open the
        reasoning in the prompt itself, so the reply starts inside it."""
        return cls(starts_in_reasoning=prompt.rstrip().endswith(OPEN))

    def _answer(self, text: str) -> list[Piece]:
        if not self.answer_started:
            text = text.lstrip()
            if not text:
                return []
            self.answer_started = True
        return [Piece("answer", text)]

    def feed(self, delta: str) -> list[Piece]:
        self.pending += delta
        pieces: list[Piece] = []
        while True:
            if self.state == "start":
                head = self.pending.lstrip()
                if head.startswith(OPEN):
                    self.pending, self.state = head[len(OPEN) :], "reasoning"
                    continue
                if OPEN.startswith(head):
                    return pieces  # still only whitespace or part of "<think>": wait
                self.state = "answer"
                continue
            if self.state == "reasoning":
                index = self.pending.find(CLOSE)
                if index >= 0:
                    if index:
                        pieces.append(Piece("reasoning", self.pending[:index]))
                    self.pending, self.state = self.pending[index + len(CLOSE) :], "answer"
                    continue
                keep = _partial_suffix(self.pending, CLOSE)
                text, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
                if text:
                    pieces.append(Piece("reasoning", text))
                return pieces
            text, self.pending = self.pending, ""
            return pieces + self._answer(text)

    def close(self) -> list[Piece]:
        text, self.pending = self.pending, ""
        if self.state == "reasoning":
            return [Piece("reasoning", text)] if text else []
        return self._answer(text)


# gpt-oss's harmony format: each message is <|start|>{role}<|channel|>{channel}[ to=... <|constrain|>...]
# <|message|>{text} ended by <|end|>, <|return|> (the reply's last) or <|call|> (a tool call).
CHANNEL, MESSAGE = "<|channel|>", "<|message|>"
ENDS = ("<|end|>", "<|return|>", "<|call|>")
CHANNELS = {"analysis": "reasoning", "final": "answer"}  # commentary (tool calls, preambles) is not shown


class HarmonySplitter:
    """feed(delta) -> pieces; close() -> the rest, for text decoded with its special tokens kept.
    A message's header (up to <|message|>) names its channel; its text goes to reasoning
    (analysis), to the answer (final) or nowhere (other channels) until the message ends."""

    def __init__(self) -> None:
        self.kind: str | None = None  # in a message: where its text goes ("" nowhere); None: in a header
        self.pending = ""
        self.answer_started = False

    def _emit(self, kind: str, text: str) -> list[Piece]:
        if kind == "answer" and not self.answer_started:
            text = text.lstrip()
            self.answer_started = bool(text)
        return [Piece(kind, text)] if kind and text else []

    def feed(self, delta: str) -> list[Piece]:
        self.pending += delta
        pieces: list[Piece] = []
        while True:
            if self.kind is None:  # a header: wait for <|message|>, read the channel
                at = self.pending.find(MESSAGE)
                if at < 0:
                    return pieces
                header, self.pending = self.pending[:at], self.pending[at + len(MESSAGE) :]
                channel = header.split(CHANNEL, 1)[1].split()[0].split("<|")[0] if CHANNEL in header else "final"
                self.kind = CHANNELS.get(channel, "")
                continue
            ends = [(i, tag) for tag in ENDS if (i := self.pending.find(tag)) >= 0]
            if ends:
                at, tag = min(ends)
                pieces += self._emit(self.kind, self.pending[:at])
                self.pending, self.kind = self.pending[at + len(tag) :], None
                continue
            keep = max(_partial_suffix(self.pending, tag) for tag in ENDS)
            text, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
            return pieces + self._emit(self.kind, text)

    def close(self) -> list[Piece]:
        text, self.pending = self.pending, ""
        if self.kind is None:  # a reply that never opened a message: plain text is the answer
            return self._emit("answer", text) if CHANNEL not in text and MESSAGE not in text else []
        return self._emit(self.kind, text)


def is_harmony(tokenizer: object) -> bool:
    """Whether a tokenizer speaks gpt-oss's harmony format (its vocabulary has the channel token).
    One lookup: get_vocab() builds the whole vocabulary as a dict, ~0.1 s for 150k tokens."""
    lookup = getattr(tokenizer, "convert_tokens_to_ids", None)
    token = lookup(CHANNEL) if lookup is not None else None
    return isinstance(token, int) and token != getattr(tokenizer, "unk_token_id", None)


def reply_splitter(tokenizer: object, prompt: str) -> ReasoningSplitter | HarmonySplitter:
    """The splitter for the reply to `prompt` (its text) from a model with this tokenizer."""
    return HarmonySplitter() if is_harmony(tokenizer) else ReasoningSplitter.after(prompt)


def split_reasoning(deltas: Iterable[str], *, starts_in_reasoning: bool = False) -> Iterator[Piece]:
    """Pieces of reasoning and answer, in order, from a stream of text deltas."""
    splitter = ReasoningSplitter(starts_in_reasoning=starts_in_reasoning)
    for delta in deltas:
        yield from splitter.feed(delta)
    yield from splitter.close()
