"""Cut a loaded document into chunks that fit the embedder, never crossing a block boundary.

Each block is tokenized once; a chunk ends at the best natural break (paragraph > line >
sentence > word > any token) in the last half of its token window, and the next chunk starts
about `overlap_tokens` earlier, at a sentence or word start. Each chunk's `embed_text` (a
"Title > Heading" context line plus the text) is then counted exactly and fits `max_tokens`.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

from tokenizers import Tokenizer

from .document import Block, Chunk, LoadedDoc
from .errors import IngestError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

_SPECIALS = 2  # [CLS] and [SEP] wrap every text the embedder sees
_SENTENCE_END = ".!?"

# Break strengths, for the gap between two tokens.
_NONE, _WORD, _SENTENCE, _LINE, _PARAGRAPH = range(5)

Offsets = list[tuple[int, int]]  # per token: (start, end) character offsets in the block text

_BACKENDS: WeakKeyDictionary = WeakKeyDictionary()  # tokenizer -> its untruncated backend copy


def chunk_document(
    doc: LoadedDoc,
    tokenizer: "PreTrainedTokenizerFast",
    *,
    max_tokens: int,
    chunk_tokens: int,
    overlap_tokens: int,
) -> list[Chunk]:
    """Chunks of every block of `doc`, in order.

    `tokenizer` is the embedder's fast tokenizer. Every chunk's `n_tokens` (its `embed_text`,
    special tokens included) is <= `max_tokens`, so the embedder never truncates; chunks aim
    at `chunk_tokens` and consecutive chunks of a block share about `overlap_tokens`.
    """
    target = min(chunk_tokens, max_tokens)
    if target < 8:
        raise IngestError(
            f"chunk_tokens={chunk_tokens} with max_tokens={max_tokens} leaves no room for text; "
            "set chunk_tokens to at least 8 (256 suits all-MiniLM-L6-v2)."
        )
    if not 0 <= overlap_tokens < target // 2:
        raise IngestError(
            f"overlap_tokens={overlap_tokens} must be between 0 and half of chunk_tokens "
            f"({target // 2}); 32 is a good default."
        )

    blocks = [b for b in doc.blocks if doc.text[b.start : b.end].strip()]
    texts = [doc.text[b.start : b.end] for b in blocks]
    offsets = _offsets(tokenizer, texts)
    # A long prefix is cut so that at least half of every chunk is text.
    prefix_counts = _prefix_lines(tokenizer, doc.title, blocks, limit=target // 2)

    title = doc.title.strip()
    cutters = [
        _BlockCutter(block, text, offs, title, prefix_counts, target, overlap_tokens)
        for block, text, offs in zip(blocks, texts, offsets)
    ]
    pieces = [c.cut() for c in cutters]

    # Count every embed_text exactly; a chunk over the limit (wordpieces that tokenize
    # differently once cut out of their block) gets a smaller budget and its block is recut.
    counts: list[list[int]] = [[] for _ in cutters]
    todo = list(range(len(cutters)))
    while todo:
        flat = [p.embed_text for b in todo for p in pieces[b]]
        n_flat = iter(_count(tokenizer, flat))
        redo = []
        for b in todo:
            counts[b] = [next(n_flat) for _ in pieces[b]]
            over = [(p, n) for p, n in zip(pieces[b], counts[b]) if n > max_tokens]
            for p, n in over:
                cutters[b].cap(p.first, (p.last - p.first) - (n - max_tokens))
            if over:
                pieces[b] = cutters[b].cut()
                redo.append(b)
        todo = redo

    chunks = []
    for cutter, block_pieces, block_counts in zip(cutters, pieces, counts):
        b = cutter.block
        for p, n in zip(block_pieces, block_counts):
            start, end = b.start + p.start, b.start + p.end
            text = doc.text[start:end]
            chunks.append(Chunk(text, start, end, b.page, b.heading, p.embed_text, n))
    assert all(c.n_tokens <= max_tokens for c in chunks)
    return chunks


@dataclass(frozen=True)
class _Piece:
    """One chunk of a block: tokens [first, last), characters [start, end) of the block text."""

    first: int
    last: int
    start: int
    end: int
    embed_text: str


class _BlockCutter:
    """Cuts one block's token sequence into pieces; `cap` lowers the budget of one piece."""

    def __init__(
        self,
        block: Block,
        text: str,
        offs: Offsets,
        title: str,
        prefix_counts: dict[str, tuple[str, int]],
        target: int,
        overlap: int,
    ):
        self.block, self.text, self.offs = block, text, offs
        self.title, self.overlap = title, overlap
        heading = " ".join((block.heading or "").split())
        self.prefix = {}  # with_title -> (context line, text budget in tokens)
        for with_title in (True, False):
            line, n_prefix = prefix_counts[_context(title, heading, with_title)]
            self.prefix[with_title] = (line, max(1, target - _SPECIALS - n_prefix))
        self.caps: dict[int, int] = {}

    def cap(self, first: int, budget: int) -> None:
        assert budget >= 1, "a single token does not fit the embedder"
        self.caps[first] = min(budget, self.caps.get(first, budget))

    def cut(self) -> list[_Piece]:
        text, offs, n = self.text, self.offs, len(self.offs)
        pieces, i = [], 0
        while i < n:
            start = _lstrip(text, 0 if i == 0 else offs[i][0])
            # The title is left out of the context line when the chunk already starts with it.
            line, budget = self.prefix[not (self.title and text.startswith(self.title, start))]
            budget = min(budget, self.caps.get(i, budget))
            j = n if n - i <= budget else _best_end(text, offs, i + max(1, budget // 2), i + budget)
            end = _rstrip(text, len(text) if j == n else offs[j][0])
            embed_text = f"{line}\n{text[start:end]}" if line else text[start:end]
            pieces.append(_Piece(i, j, start, end, embed_text))
            if j == n:
                break
            overlap = min(self.overlap, (j - i) // 2)
            i = _overlap_start(text, offs, max(j - overlap, i + 1), j, slack=overlap // 2)
        return pieces


def _break(text: str, offs: Offsets, j: int) -> int:
    """Strength of a break before token j, judged by the characters between tokens j-1 and j."""
    gap = text[offs[j - 1][1] : offs[j][0]]
    if not gap:
        return _NONE  # the common case: inside a word, or at punctuation
    newlines = gap.count("\n")
    if newlines:
        return _PARAGRAPH if newlines >= 2 else _LINE
    if not gap.isspace() and not any(c.isspace() for c in gap):
        return _NONE  # only characters the tokenizer drops (controls)
    return _SENTENCE if text[offs[j - 1][1] - 1] in _SENTENCE_END else _WORD


def _best_end(text: str, offs: Offsets, lo: int, hi: int) -> int:
    """Token index in [lo, hi] to end a chunk before: the strongest break, the latest on ties."""
    best, best_j = -1, hi
    for j in range(hi, lo - 1, -1):
        strength = _break(text, offs, j)
        if strength > best:
            best, best_j = strength, j
            if strength == _PARAGRAPH:
                break
    return best_j


def _overlap_start(text: str, offs: Offsets, lo: int, hi: int, *, slack: int) -> int:
    """Token index in [lo, hi) to start the next chunk at: a sentence start within `slack`
    tokens of lo, else the first word start, else lo (inside a word too long to break)."""
    word = None
    for k in range(lo, hi):
        strength = _break(text, offs, k)
        if strength >= _SENTENCE and k <= lo + slack:
            return k
        if strength >= _WORD and word is None:
            word = k
        if word is not None and k >= lo + slack:
            break
    return lo if word is None else word


def _lstrip(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _rstrip(text: str, j: int) -> int:
    while j > 0 and text[j - 1].isspace():
        j -= 1
    return j


def _context(title: str, heading: str, with_title: bool) -> str:
    """The one-line context "Title > Heading path" ("" when there is neither)."""
    title = " ".join(title.split()) if with_title else ""
    return " > ".join(p for p in (title, heading) if p)


def _prefix_lines(
    tokenizer, title: str, blocks: list[Block], *, limit: int
) -> dict[str, tuple[str, int]]:
    """For each distinct context line of the doc: (line cut to `limit` tokens, its token count)."""
    lines = sorted(
        {
            _context(title, " ".join((b.heading or "").split()), with_title)
            for b in blocks
            for with_title in (True, False)
        }
    )
    out = {}
    for line, offs in zip(lines, _offsets(tokenizer, lines)):
        cut = line[: offs[limit - 1][1]] if len(offs) > limit else line
        out[line] = (cut, min(len(offs), limit))
    return out


def _backend(tokenizer) -> Tokenizer:
    """A private copy of the fast tokenizer's backend that neither truncates nor pads.

    A packaged tokenizer.json may bake both in (MiniLM's: 128), and transformers changes the
    shared backend's settings on every call that passes truncation or padding.
    """
    backend = _BACKENDS.get(tokenizer)
    if backend is None:
        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        backend.no_truncation()
        backend.no_padding()
        _BACKENDS[tokenizer] = backend
    return backend


def _offsets(tokenizer, texts: list[str]) -> list[Offsets]:
    encodings = _backend(tokenizer).encode_batch(texts, add_special_tokens=False)
    return [e.offsets for e in encodings]


def _count(tokenizer, texts: list[str]) -> list[int]:
    """Tokens the embedder sees for each text, special tokens included."""
    return [len(e.ids) for e in _backend(tokenizer).encode_batch(texts, add_special_tokens=True)]
