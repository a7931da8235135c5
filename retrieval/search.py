"""Finding evidence in a collection: dense (FAISS), lexical (BM25) and both fused by rank.

Hybrid search runs both retrievers over a candidate pool of chunks and fuses them by
reciprocal rank: score(c) = sum over retrievers of 1 / (rrf_k + rank(c)). Rank fusion needs no
score calibration between cosine similarities and BM25 values, which live on unrelated scales.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from retrieval.errors import RetrievalError
from retrieval.kb import KnowledgeBase
from retrieval.store import Chunk, Collection, Document

MODES = ("hybrid", "dense", "bm25")
RRF_K = 60  # the constant from Cormack et al. (2009); robust across collections
# Words too common to carry meaning: a query made only of them finds nothing rather than every chunk.
STOPWORDS = frozenset(
    "a an and are as at be but by for from has have if in into is it its of on or such that the their then "
    "there these they this to was were will with what which who whom how why when where does do did not no "
    "can could should would may might".split()
)
# Letters and digits: "_" splits words as it splits FTS5 tokens, so a word is one term.
_WORD = re.compile(r"[^\W_]+")

Embed = Callable[[Sequence[str]], np.ndarray]


@dataclass
class Hit:
    chunk_id: int
    score: float
    text: str
    document_id: int
    source: str
    title: str
    page: int | None
    heading: str | None
    start: int
    end: int
    rank: int = 0
    ranks: dict[str, int] = field(default_factory=dict)  # rank in each retriever that found it

    def to_json(self) -> dict:
        return {
            "rank": self.rank,
            "score": round(float(self.score), 6),
            "chunk_id": self.chunk_id,
            "text": self.text,
            "document": {"id": self.document_id, "source": self.source, "title": self.title},
            "page": self.page,
            "heading": self.heading,
            "start": self.start,
            "end": self.end,
            "ranks": self.ranks,
        }


def search(
    kb: KnowledgeBase,
    query: str,
    *,
    embed: Embed,
    collection: str,
    k: int = 10,
    mode: str = "hybrid",
    source: str | None = None,
    candidates: int | None = None,
) -> list[Hit]:
    """The k best chunks for `query`, best first. `source` keeps documents whose source starts with it."""
    if mode not in MODES:
        raise RetrievalError(f"Unknown search mode '{mode}'. Choose one of: {', '.join(MODES)}")
    if k < 1:
        raise RetrievalError(f"k must be at least 1 (got {k})")
    if not query.strip():
        raise RetrievalError("The query is empty. Pass the words to search for, e.g.: moerag search \"vector index\"")
    pool = max(candidates or 0, k, 100 if mode == "hybrid" else k)
    with kb.store.session() as session:
        coll = kb.store.collection(session, collection)
        allowed = _allowed_ids(session, coll, source) if source else None
        ranked: dict[str, list[tuple[int, float]]] = {}
        lexical = None
        if mode == "hybrid":
            # BM25 runs in a worker thread while this one embeds the query and searches FAISS,
            # which release the GIL; its ~5 ms at 100k chunks then mostly hide behind them.
            lexical = _WORKERS.submit(_bm25_in_own_session, kb, coll.id, query, pool, allowed)
        if mode in ("dense", "hybrid"):
            ranked["dense"] = dense_ids(kb, session, coll, embed([query])[0], pool, allowed=allowed)
        if mode == "bm25":
            ranked["bm25"] = bm25_ids(kb, session, coll, query, pool, allowed=allowed)
        if lexical is not None:
            ranked["bm25"] = lexical.result()
        fused = ranked[mode] if mode != "hybrid" else rrf(ranked.values())
        top = fused[:k]
        hits = _hydrate(session, [cid for cid, _ in top])
        if len(hits) < len(top):
            # A delete committed while this search ran removed chunks that its index snapshot still
            # ranked: they are gone, and the candidates behind them move up (rare: one more query).
            hits.update(_hydrate(session, [cid for cid, _ in fused[k:]]))
            top = [(cid, score) for cid, score in fused if cid in hits][:k]
    out = []
    for rank, (cid, score) in enumerate(top, 1):
        hit = hits[cid]
        hit.rank, hit.score = rank, score
        hit.ranks = {name: _rank_of(lst, cid) for name, lst in ranked.items() if _rank_of(lst, cid)}
        out.append(hit)
    return out


_WORKERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="moerag-bm25")


def _bm25_in_own_session(kb: KnowledgeBase, coll_id: int, query: str, k: int, allowed: np.ndarray | None):
    with kb.store.session() as session:  # a session is not shared across threads
        coll = session.get(Collection, coll_id)
        if coll is None:  # deleted since the search began
            return []
        return bm25_ids(kb, session, coll, query, k, allowed=allowed)


def dense_ids(
    kb: KnowledgeBase, session: Session, coll: Collection, qvec: np.ndarray, k: int, *, allowed: np.ndarray | None = None
) -> list[tuple[int, float]]:
    if allowed is not None and not len(allowed):
        return []
    vi = kb.vector_index(session, coll)
    scores, ids = vi.search(qvec[None, :], k, allowed=allowed)  # [1, k], [1, k]
    return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]


def bm25_ids(
    kb: KnowledgeBase,
    session: Session,
    coll: Collection,
    query: str,
    k: int,
    *,
    source: str | None = None,
    allowed: np.ndarray | None = None,
) -> list[tuple[int, float]]:
    """BM25 top-k of one collection, exact: its in-memory index (retrieval/bm25.py) scores the
    postings of the query's terms, with FTS5's bm25() and the weights retrieval.bm25.WEIGHTS.

    `source` keeps chunks of documents whose source starts with it; `allowed` (chunk ids), when
    the caller has them already, stands for it.
    """
    if not kb.store.is_sqlite:
        raise RetrievalError("BM25 search needs the SQLite store (FTS5). Use --mode dense with this database.")
    words = query_words(query)
    if not words:
        return []
    if source and allowed is None:
        allowed = _allowed_ids(session, coll, source)
    if allowed is not None and not len(allowed):
        return []
    return kb.lexical_index(session, coll).top_k(words, k, allowed=allowed)


def query_words(query: str) -> list[str]:
    """The query's distinct words that carry meaning, lowercased.

    Stopwords are left out; so are single letters, unless nothing else remains.
    """
    words = list(dict.fromkeys(w.lower() for w in _WORD.findall(query)))
    words = [w for w in words if w not in STOPWORDS]
    return [w for w in words if not (len(w) == 1 and w.isalpha())] or words


def fts_query(query: str) -> str | None:
    """The same words as an FTS5 OR-query (each quoted), for running a query on the table itself."""
    words = query_words(query)
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in words) if words else None


def rrf(rankings, *, k: int = RRF_K) -> list[tuple[int, float]]:
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, (cid, _) in enumerate(ranking, 1):
            scores[cid] = scores.get(cid, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


def _rank_of(ranking: list[tuple[int, float]], cid: int) -> int:
    for rank, (c, _) in enumerate(ranking, 1):
        if c == cid:
            return rank
    return 0


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _allowed_ids(session: Session, coll: Collection, source: str) -> np.ndarray:
    ids = session.scalars(
        select(Chunk.id)
        .join(Document, Document.id == Chunk.document_id)
        .where(Chunk.collection_id == coll.id, Document.source.like(_like_prefix(source), escape="\\"))
    )
    return np.fromiter(ids, dtype=np.int64)


def _hydrate(session: Session, chunk_ids: list[int]) -> dict[int, Hit]:
    if not chunk_ids:
        return {}
    rows = session.execute(
        select(Chunk.id, Chunk.text, Chunk.page, Chunk.heading, Chunk.start, Chunk.end, Document.id, Document.source, Document.title)
        .join(Document, Document.id == Chunk.document_id)
        .where(Chunk.id.in_(chunk_ids))
    )
    return {
        r[0]: Hit(
            chunk_id=r[0], score=0.0, text=r[1], page=r[2], heading=r[3], start=r[4], end=r[5],
            document_id=r[6], source=r[7], title=r[8],
        )
        for r in rows
    }
