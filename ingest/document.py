"""What a loader produces and what the chunker cuts: a document's text with its structure.

Offsets are character offsets into `LoadedDoc.text`, end exclusive, so a chunk can always be
found again in the stored document text.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Block:
    """A structural span of the document text: a page, a section under a heading, a table.

    Chunks never cross a block boundary. `heading` is the heading path joined with " > "
    (e.g. "Install > From source"); `page` is 1-based.
    """

    start: int
    end: int
    page: int | None = None
    heading: str | None = None


@dataclass
class LoadedDoc:
    """A parsed file. `blocks` cover the meaningful parts of `text`, in order, without overlap."""

    title: str
    text: str
    blocks: list[Block]
    doc_type: str
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Chunk:
    """A token-bounded piece of a document, ready to embed.

    `text` is exactly `doc.text[start:end]`; `embed_text` is what the embedder sees (the text,
    prefixed with its title/heading context when that is not already in it), and
    `n_tokens` counts the embedder's tokens of `embed_text`, special tokens included.
    """

    text: str
    start: int
    end: int
    page: int | None
    heading: str | None
    embed_text: str
    n_tokens: int
