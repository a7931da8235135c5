"""Finding evidence in a collection: dense (FAISS), lexical (FTS5 BM25) and both fused by rank.

Hybrid search runs both retrievers over a candidate pool of chunks and fuses them by
reciprocal rank: score(c) = sum over retrievers of 1 / (rrf_k + rank(c)). Rank fusion needs no
score calibration between cosine similarities and BM25 values, which live on unrelated scales.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from retrieval.errors import RetrievalError
from retrieval.kb import KnowledgeBase
from retrieval.store import Chunk, Collection, Document

MODES = ("hybrid", "dense", "bm25")
RRF_K = 60  # the constant from Cormack et al. (2009); robust across collections
BM25_WEIGHTS = (2.0, 1.0, 1.0)  # title, heading, body: a title match says more than a body match

# Words too common to carry meaning; dropping them from the query keeps FTS5 from ranking every
# chunk that contains "the" (FTS5 itself has no stopword list).
STOPWORDS = frozenset(
    "a an and are as at be but by for from has have if in into is it its of on or such that the their then "
    "there these they this to was were will with what which who whom how why when where does do did not no "
    "can could should would may might".split()
)
_WORD = re.compile(r"\w+", re.UNICODE)
# Query terms found in more than this share of all chunks are dropped: their IDF is small (< 2.2
# of typically 6-9 for a content word), yet FTS5 must score every chunk containing them. At 100k
# chunks a SciFact query's OR of all its words matched half the table (66 ms p50); without such
# terms, 23 ms.
MAX_DF = 0.10
MIN_ROWS_TO_PRUNE = 1000  # in small collections document frequencies say little

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
            # BM25 runs in a worker thread while this one embeds the query and searches FAISS:
            # SQLite, torch and FAISS all release the GIL (100k chunks: hybrid p50 71 -> 47 ms).
            lexical = _WORKERS.submit(_bm25_in_own_session, kb, coll.id, query, pool, source)
        if mode in ("dense", "hybrid"):
            ranked["dense"] = dense_ids(kb, session, coll, embed([query])[0], pool, allowed=allowed)
        if mode == "bm25":
            ranked["bm25"] = bm25_ids(kb, session, coll, query, pool, source=source)
        if lexical is not None:
            ranked["bm25"] = lexical.result()
        fused = ranked[mode] if mode != "hybrid" else rrf(ranked.values())
        top = fused[:k]
        hits = _hydrate(session, [cid for cid, _ in top])
    out = []
    for rank, (cid, score) in enumerate(top, 1):
        hit = hits[cid]
        hit.rank, hit.score = rank, score
        hit.ranks = {name: _rank_of(lst, cid) for name, lst in ranked.items() if _rank_of(lst, cid)}
        out.append(hit)
    return out


_WORKERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="moerag-bm25")


def _bm25_in_own_session(kb: KnowledgeBase, coll_id: int, query: str, k: int, source: str | None):
    with kb.store.session() as session:  # a session is not shared across threads
        return bm25_ids(kb, session, session.get(Collection, coll_id), query, k, source=source)


def dense_ids(
    kb: KnowledgeBase, session: Session, coll: Collection, qvec: np.ndarray, k: int, *, allowed: np.ndarray | None = None
) -> list[tuple[int, float]]:
    if allowed is not None and not len(allowed):
        return []
    vi = kb.vector_index(session, coll)
    scores, ids = vi.search(qvec[None, :], k, allowed=allowed)  # [1, k], [1, k]
    return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]


def bm25_ids(
    kb: KnowledgeBase, session: Session, coll: Collection, query: str, k: int, *, source: str | None = None
) -> list[tuple[int, float]]:
    """BM25 top-k of one collection.

    FTS5 ranks its matches first and only the best `pool` rows are joined to `chunks` to keep
    this collection's (and source's). Filtering a global ranking preserves its order, so when at
    least k rows survive they are exactly the collection's top k; otherwise the query is run
    again with the filter applied to every match. Joining every match instead (tens of
    thousands of rows for a common word at 100k chunks) made queries 2.3x slower.
    """
    if not kb.store.is_sqlite:
        raise RetrievalError("BM25 search needs the SQLite store (FTS5). Use --mode dense with this database.")
    match = fts_query(query, common=_common_terms(session, query))
    if match is None:
        return []
    w_title, w_heading, w_body = BM25_WEIGHTS
    params: dict = {"q": match, "c": coll.id, "k": k, "src": _like_prefix(source) if source else None}
    ranked = f"SELECT rowid, bm25(chunks_fts, {w_title}, {w_heading}, {w_body}) AS s FROM chunks_fts WHERE chunks_fts MATCH :q"
    keep = (
        "JOIN chunks c ON c.id = f.rowid JOIN documents d ON d.id = c.document_id "
        "WHERE c.collection_id = :c AND (:src IS NULL OR d.source LIKE :src ESCAPE '\\') ORDER BY f.s LIMIT :k"
    )
    pool = max(1000, 10 * k)
    rows = session.execute(text(f"SELECT f.rowid, f.s FROM ({ranked} ORDER BY s LIMIT {pool}) f {keep}"), params).all()
    if len(rows) < k:
        rows = session.execute(text(f"SELECT f.rowid, f.s FROM ({ranked}) f {keep}"), params).all()
    # FTS5's bm25() is "lower is better"; negate so every retriever reports "higher is better".
    return [(int(r[0]), -float(r[1])) for r in rows]


def fts_query(query: str, *, common: frozenset[str] = frozenset()) -> str | None:
    """A free-text query as an FTS5 OR-query of its distinct, meaningful words (each quoted).

    Stopwords and `common` words are left out, unless nothing else would remain.
    """
    words = list(dict.fromkeys(w.lower() for w in _WORD.findall(query)))
    kept = [w for w in words if w not in STOPWORDS and w not in common and not (len(w) == 1 and w.isalpha())]
    kept = kept or [w for w in words if w not in STOPWORDS] or words
    if not kept:
        return None
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in kept)


_stemmer = threading.local()


def _stems(words: list[str]) -> list[list[str]]:
    """Each word as the lexical index stores it: FTS5's own tokenizer, run on an in-memory table."""
    conn = getattr(_stemmer, "conn", None)
    if conn is None:
        conn = _stemmer.conn = sqlite3.connect(":memory:")
        conn.execute("CREATE VIRTUAL TABLE q USING fts5(t, tokenize = 'porter unicode61 remove_diacritics 2')")
        conn.execute("CREATE VIRTUAL TABLE qv USING fts5vocab(q, instance)")
    out = []
    for w in words:
        conn.execute("DELETE FROM q")
        conn.execute("INSERT INTO q(t) VALUES (?)", (w,))
        out.append([r[0] for r in conn.execute("SELECT term FROM qv")])
    return out


def _common_terms(session: Session, query: str) -> frozenset[str]:
    """The query's words that occur in more than MAX_DF of the lexical index's rows."""
    words = [w for w in dict.fromkeys(w.lower() for w in _WORD.findall(query)) if w not in STOPWORDS]
    if not words:
        return frozenset()
    rows = session.scalar(text("SELECT count(*) FROM chunks")) or 0  # = rows of the lexical index
    if rows < MIN_ROWS_TO_PRUNE:
        return frozenset()
    stems = _stems(words)
    flat = sorted({s for ss in stems for s in ss})
    if not flat:
        return frozenset()
    marks = ", ".join(f":t{i}" for i in range(len(flat)))
    df = dict(session.execute(text(f"SELECT term, doc FROM chunks_fts_vocab WHERE term IN ({marks})"),
                              {f"t{i}": t for i, t in enumerate(flat)}).all())
    return frozenset(w for w, ss in zip(words, stems) if ss and all(df.get(t, 0) > MAX_DF * rows for t in ss))


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
