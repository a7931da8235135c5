"""What an answer is made of: numbered Sources, the Answer, and the Events of its stream.

The service builds them (app/service.py) with the help of app/prompting.py, app/citations.py and
app/websources.py; the CLI, the UI and the API render them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from retrieval.errors import MoeragError

SNIPPET_CHARS = 300


class ServiceError(MoeragError):
    """The question cannot be answered as asked (too long for the model, no collection...)."""


@dataclass
class Source:
    """One numbered piece of evidence, as given to the generator."""

    n: int
    text: str  # what the generator saw (cut to fit when `cut`)
    title: str
    source: str  # file path, record id or URL
    collection: str
    score: float
    page: int | None = None
    heading: str | None = None
    start: int = 0
    end: int = 0
    url: str | None = None
    origin: str = "kb"  # kb | web
    document_id: int | None = None
    chunk_id: int | None = None
    cut: bool = False
    domain: str | None = None  # web sources: the site
    fetched_at: str | None = None  # web sources: when the page was read (ISO 8601, UTC)

    @property
    def snippet(self) -> str:
        flat = " ".join(self.text.split())
        return flat if len(flat) <= SNIPPET_CHARS else flat[: SNIPPET_CHARS - 1].rsplit(" ", 1)[0] + "…"

    @property
    def where(self) -> str:
        """Location in words: path or URL, page, heading."""
        parts = [self.url or self.source]
        if self.page:
            parts.append(f"p. {self.page}")
        if self.heading and self.heading != self.title:
            parts.append(self.heading)
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "snippet": self.snippet}


@dataclass
class Answer:
    question: str
    answer: str
    reasoning: str
    sources: list[Source]
    citations: list[int]  # source numbers the answer cites, in order of first citation
    warnings: list[str]
    timings: dict[str, float]
    standalone_question: str = ""
    generator: str = ""
    conversation_id: int | None = None
    stopped: bool = False  # cut short (client gone, Ctrl-C): `answer` is what was written until then

    def to_json(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "standalone_question": self.standalone_question,
            "answer": self.answer,
            "reasoning": self.reasoning,
            "sources": [s.to_json() for s in self.sources],
            "citations": self.citations,
            "warnings": self.warnings,
            "timings": self.timings,
            "generator": self.generator,
            "conversation_id": self.conversation_id,
            "stopped": self.stopped,
        }


@dataclass(frozen=True)
class Event:
    kind: str  # status | warning | sources | reasoning | answer | timings | done
    data: Any
