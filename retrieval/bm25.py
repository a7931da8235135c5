"""BM25 over one collection from an in-memory inverted index derived from the FTS5 table.

N chunks, V terms, P postings (one per term and chunk holding it), R distinct word runs.

The FTS5 table stays the persistent, incremental source of truth. This index reads its rows,
splits them with the table's own tokenizer (each distinct word once, through an in-memory FTS5
table, so stemming and folding are SQLite's) and keeps, per term, the chunks holding it and the
term's field-weighted frequency. A query scores only its terms' postings (a gather and a
bincount), and the scores are FTS5's bm25() to the last bit, with the statistics of the
collection rather than of the whole table. Chunk ids are never reused, so the ids held against
the store's say exactly what to add and drop, as for the FAISS index.
"""

from __future__ import annotations

import math
import re
import sqlite3
import threading
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain, repeat
from pathlib import Path

import numpy as np
from sqlalchemy import text
from sqlalchemy.orm import Session

from retrieval.errors import StoreError
from retrieval.index import write_npz_atomically

K1, B = 1.2, 0.75  # FTS5's bm25() constants
FIELDS = ("title", "heading", "body")
WEIGHTS = (2, 1, 1)  # title, heading, body: a title match says more than a body match
FORMAT = 1  # bumped when the file layout changes; other versions are rebuilt
MERGE_DEAD = 0.25  # rewrite a segment once this share of its chunks was removed

# unicode61 splits at every ASCII character that is not a letter or digit and folds A-Z to a-z,
# so a text's UTF-8 bytes with those made spaces (one C pass) split into runs that tokenize the
# same alone as in the text. Non-ASCII separators ("’", "–") stay inside a run for SQLite.
_ASCII_RUNS = bytes.maketrans(
    bytes(c for c in range(128) if not chr(c).isalnum()) + bytes(range(65, 91)),
    b" " * sum(not chr(c).isalnum() for c in range(128)) + bytes(range(97, 123)),
)
_TOKENIZE = re.compile(r"tokenize\s*=\s*'([^']*)'", re.IGNORECASE)

Rows = Callable[[np.ndarray], Iterable[tuple[int, str, str, str]]]  # ids -> (id, title, heading, body)


# --- tokenizing with SQLite's own tokenizer ---------------------------------------------------------


def fts_tokenizer(session: Session, table: str = "chunks_fts") -> str:
    """The `tokenize` option of the FTS5 table, e.g. "porter unicode61 remove_diacritics 2"."""
    sql = session.scalar(text("SELECT sql FROM sqlite_master WHERE name = :t"), {"t": table}) or ""
    found = _TOKENIZE.search(sql)
    return found.group(1) if found else "unicode61"


class Tokenizer:
    """Strings -> their terms, as the FTS5 table with this `tokenize` option indexes them."""

    def __init__(self, spec: str):
        self.spec = spec
        self._local = threading.local()  # sqlite3 connections stay in the thread that made them
        self._ascii_checked = False

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = sqlite3.connect(":memory:")
            conn.execute(f"CREATE VIRTUAL TABLE t USING fts5(x, tokenize = '{self.spec}')")
            conn.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, instance)")
        return conn

    def pairs(self, strings: list[str]) -> list[tuple[int, str]]:
        """(index into `strings`, term) for every token of every string, in no particular order."""
        conn = self._conn()
        with conn:
            conn.execute("DELETE FROM t")
            conn.executemany("INSERT INTO t(rowid, x) VALUES (?, ?)", ((i + 1, s) for i, s in enumerate(strings)))
            out = [(doc - 1, term) for doc, term in conn.execute("SELECT doc, term FROM v")]
            conn.execute("DELETE FROM t")
        return out

    def terms(self, words: list[str]) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in words]
        for i, term in self.pairs(words):
            out[i].append(term)
        return out

    def check_ascii(self) -> None:
        """Refuse a tokenizer that splits or folds ASCII otherwise than _ASCII_RUNS assumes."""
        if self._ascii_checked:
            return
        probes = [f"Xa{chr(c)}bX" for c in range(1, 128)]
        mine = [sorted(r.decode() for r in p.encode().translate(_ASCII_RUNS).split()) for p in probes]
        if [sorted(ts) for ts in self.terms(probes)] != mine:
            raise StoreError(f"The FTS5 tokenizer '{self.spec}' splits ASCII text otherwise than unicode61; "
                             "the BM25 index supports unicode61 and ascii tokenizers without tokenchars or separators")
        self._ascii_checked = True


_TOKENIZERS: dict[str, Tokenizer] = {}


def tokenizer(spec: str) -> Tokenizer:
    return _TOKENIZERS.setdefault(spec, Tokenizer(spec))


class _Runs:
    """Word runs (UTF-8) -> term ids (CSR), learnt a batch at a time; grows `terms` with unseen terms."""

    def __init__(self, tok: Tokenizer, terms: dict[str, int]):
        tok.check_ascii()
        self.tok, self.terms = tok, terms
        self.index: dict[bytes, int] = {}
        self.start = np.zeros(0, np.int64)  # [R] first term of run r in `tok_ids`
        self.count = np.zeros(0, np.int64)  # [R] terms in run r (0 for a run of separators)
        self.tok_ids = np.zeros(0, np.int64)

    def ids(self, runs: list[bytes]) -> np.ndarray:
        rid = np.fromiter(map(self.index.get, runs, repeat(-1)), np.int64, len(runs))  # [len(runs)]
        unseen = np.flatnonzero(rid < 0)
        if len(unseen):
            new = list(dict.fromkeys(runs[i] for i in unseen))
            pairs = self.tok.pairs([r.decode() for r in new])
            run = np.fromiter((p[0] for p in pairs), np.int64, len(pairs))
            tid = np.fromiter((self.terms.setdefault(p[1], len(self.terms)) for p in pairs), np.int64, len(pairs))
            order = np.argsort(run, kind="stable")
            count = np.bincount(run, minlength=len(new))  # [len(new)]
            self.start = np.concatenate([self.start, len(self.tok_ids) + np.cumsum(count) - count])
            self.count = np.concatenate([self.count, count])
            self.tok_ids = np.concatenate([self.tok_ids, tid[order]])
            base = len(self.index)
            self.index.update((r, base + i) for i, r in enumerate(new))
            rid[unseen] = [self.index[runs[i]] for i in unseen]
        return rid


def _spread(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenated ranges [starts[i], starts[i] + counts[i]) as one index array."""
    total = int(counts.sum())
    ends = np.cumsum(counts)
    return np.repeat(starts - ends + counts, counts) + np.arange(total)


# --- segments: postings of a set of chunks ------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """Postings grouped by term: the chunks holding term t are rows docs[ptr[t]:ptr[t + 1]]."""

    ids: np.ndarray  # [n] int64 chunk ids, ascending
    lengths: np.ndarray  # [n] int32 tokens in title + heading + body, unweighted (FTS5's row size)
    ptr: np.ndarray  # [V_s + 1] int64; terms learnt after this segment was built have no postings here
    docs: np.ndarray  # [P] int32 rows into `ids`, ascending within a term
    tf: np.ndarray  # [P] uint16 occurrences weighted by field: 2·title + heading + body
    alive: np.ndarray | None = None  # [n] bool; None while none of its chunks was removed

    @property
    def n_alive(self) -> int:
        return len(self.ids) if self.alive is None else int(self.alive.sum())

    def live_ids(self) -> np.ndarray:
        return self.ids if self.alive is None else self.ids[self.alive]

    def without(self, ids: np.ndarray) -> Segment:
        """This segment with `ids` (sorted) removed: a new `alive` mask, postings shared."""
        if not len(self.ids):
            return self
        pos = np.searchsorted(self.ids, ids)
        pos = pos[self.ids[np.minimum(pos, len(self.ids) - 1)] == ids]
        if not len(pos):
            return self
        alive = np.ones(len(self.ids), bool) if self.alive is None else self.alive.copy()
        alive[pos] = False
        return Segment(self.ids, self.lengths, self.ptr, self.docs, self.tf, alive)

    def postings(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows [p], weighted tf [p]) of live chunks holding term t."""
        if t + 1 >= len(self.ptr):
            return self.docs[:0], self.tf[:0]
        lo, hi = self.ptr[t], self.ptr[t + 1]
        docs, tf = self.docs[lo:hi], self.tf[lo:hi]
        if self.alive is not None:
            keep = self.alive[docs]
            docs, tf = docs[keep], tf[keep]
        return docs, tf

    @property
    def nbytes(self) -> int:
        arrays = (self.ids, self.lengths, self.ptr, self.docs, self.tf, self.alive)
        return sum(a.nbytes for a in arrays if a is not None)


def _segment(ids: np.ndarray, lengths: np.ndarray, term: np.ndarray, doc: np.ndarray, tf: np.ndarray, n_terms: int) -> Segment:
    """A segment from postings in any order: term [P], doc [P] rows into ids, tf [P]."""
    key = term.astype(np.int64) * max(len(ids), 1) + doc  # [P]: term-major, then row
    if len(key) > 1 and not (key[1:] > key[:-1]).all():
        order = np.argsort(key)
        term, doc, tf = term[order], doc[order], tf[order]
    ptr = np.zeros(n_terms + 1, np.int64)
    np.cumsum(np.bincount(term, minlength=n_terms), out=ptr[1:])
    dtype = np.uint16 if not len(tf) or tf.max() < 2**16 else np.uint32
    return Segment(ids, lengths.astype(np.int32), ptr, doc.astype(np.int32), tf.astype(dtype))


def _tokenize(rows: list[tuple[int, str, str, str]], runs: _Runs) -> Segment:
    """A segment of these rows (sorted by id), tokenized run by run."""
    n = len(rows)
    ids = np.fromiter((r[0] for r in rows), np.int64, n)
    lengths = np.zeros(n, np.int64)
    keys = []
    for f, weight in enumerate(WEIGHTS):
        found = [(r[1 + f] or "").encode().translate(_ASCII_RUNS).split() for r in rows]
        per_doc = np.fromiter(map(len, found), np.int64, n)  # [n] runs per chunk
        rid = runs.ids(list(chain.from_iterable(found)))  # [runs of this field]
        per_run = runs.count[rid]
        tok = runs.tok_ids[_spread(runs.start[rid], per_run)]  # [tokens]
        doc = np.repeat(np.repeat(np.arange(n), per_doc), per_run)  # [tokens]
        lengths += np.bincount(doc, minlength=n)
        keys += [tok * n + doc] * weight  # a title token counts twice
    key, tf = np.unique(np.concatenate(keys), return_counts=True)  # [P] term-major, then row
    return _segment(ids, lengths, key // n, key % n, tf, len(runs.terms))


def _merge(segments: list[Segment], n_terms: int) -> Segment:
    """One segment holding the live chunks of all of `segments`."""
    ids = np.concatenate([s.live_ids() for s in segments])
    lengths = np.concatenate([s.lengths if s.alive is None else s.lengths[s.alive] for s in segments])
    counts = []
    for s in segments:  # live postings per term [n_terms]
        term = np.repeat(np.arange(len(s.ptr) - 1), np.diff(s.ptr))
        live = np.ones(len(s.docs), bool) if s.alive is None else s.alive[s.docs]
        counts.append(np.bincount(term[live], minlength=n_terms))
    if len(ids) > 1 and not (ids[1:] > ids[:-1]).all():  # segments overlap in ids: sort the postings
        order = np.argsort(ids)
        rank = np.empty(len(ids), np.int64)
        rank[order] = np.arange(len(ids))
        parts, base = [], 0
        for s in segments:
            row = np.full(len(s.ids), -1, np.int64)
            live = np.arange(len(s.ids)) if s.alive is None else np.flatnonzero(s.alive)
            row[live] = rank[base : base + len(live)]
            base += len(live)
            term = np.repeat(np.arange(len(s.ptr) - 1), np.diff(s.ptr))
            doc = row[s.docs]
            parts.append((term[doc >= 0], doc[doc >= 0], s.tf[doc >= 0]))
        term, doc, tf = (np.concatenate(x) for x in zip(*parts))
        return _segment(ids[order], lengths[order], term, doc, tf.astype(np.uint32), n_terms)
    # Each segment's chunks come after the previous one's (new chunks get larger ids), so a term's
    # merged list is its lists one after another: every posting has a known place, no sort.
    ptr = np.zeros(n_terms + 1, np.int64)
    np.cumsum(np.sum(counts, axis=0), out=ptr[1:])
    docs = np.empty(ptr[-1], np.int32)
    tf = np.empty(ptr[-1], np.result_type(*(s.tf for s in segments)))
    filled = ptr[:-1].copy()  # [n_terms] next free place of each term
    base = 0
    for s, count in zip(segments, counts):
        row = np.arange(len(s.ids)) if s.alive is None else np.cumsum(s.alive) - 1  # row in the merged ids
        term = np.repeat(np.arange(len(s.ptr) - 1), np.diff(s.ptr))  # [P_s]
        keep = slice(None) if s.alive is None else s.alive[s.docs]
        term, doc, f = term[keep], s.docs[keep], s.tf[keep]
        within = np.arange(len(term)) - np.repeat(np.cumsum(count) - count, count)  # place in its term's list
        place = filled[term] + within  # [live P_s]
        docs[place] = base + row[doc]
        tf[place] = f
        filled += count
        base += s.n_alive
    return Segment(ids, lengths.astype(np.int32), ptr, docs, tf)


# --- the index ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LexicalIndex:
    """One collection's BM25 index; immutable, so a search keeps a consistent view while `synced` runs."""

    spec: str  # the FTS5 tokenize option it was built with
    version: int = -1  # store version it reflects; -1: nothing yet
    terms: dict[str, int] = field(default_factory=dict)
    segments: tuple[Segment, ...] = ()  # oldest and largest first
    norms: tuple[np.ndarray, ...] = field(init=False, repr=False)  # per segment [n] float64: k1·(1 - b + b·len/avgdl)
    n: int = field(init=False)  # live chunks
    avgdl: float = field(init=False)

    def __post_init__(self):
        n = sum(s.n_alive for s in self.segments)
        total = sum(int(s.lengths.sum() if s.alive is None else s.lengths[s.alive].sum()) for s in self.segments)
        avgdl = total / n if n else 1.0
        # The same operations in the same order as FTS5's C code, so scores agree to the bit.
        norms = tuple(K1 * (1 - B + B * s.lengths.astype(np.float64) / avgdl) for s in self.segments)
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "avgdl", avgdl)
        object.__setattr__(self, "norms", norms)

    @property
    def ids(self) -> np.ndarray:
        """Chunk ids held, ascending."""
        if not self.segments:
            return np.zeros(0, np.int64)
        return np.sort(np.concatenate([s.live_ids() for s in self.segments]))

    @property
    def nbytes(self) -> int:
        # Terms: the dict's table plus each str object (~50 bytes of header).
        return sum(s.nbytes for s in self.segments) + sum(len(t) + 50 for t in self.terms) + 100 * len(self.terms)

    # --- searching ----------------------------------------------------------------------------

    def top_k(self, words: list[str], k: int, *, allowed: np.ndarray | None = None) -> list[tuple[int, float]]:
        """The k best chunks for the OR of `words` as (chunk id, score), best first, ties by id.

        Each word counts as FTS5 counts a quoted phrase of one token: a term twice in the query
        (two words with one stem) counts twice. `allowed` (chunk ids) restricts the results,
        not the statistics.
        """
        phrases = [self.terms.get(t) for ts in tokenizer(self.spec).terms(words) for t in ts]
        phrases = [t for t in phrases if t is not None]  # an unknown term matches nothing, adds nothing
        if not phrases or not self.n or k < 1:
            return []
        hits = [[s.postings(t) for t in phrases] for s in self.segments]  # [segment][phrase] -> (rows, tf)
        out_ids, out_scores = [], []
        idf = []
        for j in range(len(phrases)):
            df = sum(len(h[j][0]) for h in hits)
            w = math.log((self.n - df + 0.5) / (df + 0.5))
            idf.append(w if w > 0.0 else 1e-6)
        for s, norm, h in zip(self.segments, self.norms, hits):
            docs = np.concatenate([d for d, _ in h])  # [p] rows, phrase after phrase
            if not len(docs):
                continue
            f = np.concatenate([tf for _, tf in h]).astype(np.float64)  # [p]
            w = np.repeat(idf, [len(d) for d, _ in h])  # [p]
            # FTS5 adds phrase after phrase into one double; bincount adds in array order: the same sums.
            scores = np.bincount(docs, weights=w * ((f * (K1 + 1.0)) / (f + norm[docs])), minlength=len(s.ids))  # [n]
            rows = np.flatnonzero(scores)
            ids = s.ids[rows]
            if allowed is not None:
                keep = np.isin(ids, allowed)
                rows, ids = rows[keep], ids[keep]
            out_ids.append(ids)
            out_scores.append(scores[rows])
        if not out_ids:
            return []
        ids, scores = np.concatenate(out_ids), np.concatenate(out_scores)
        if len(scores) > k:
            kth = np.partition(scores, len(scores) - k)[len(scores) - k]
            keep = scores >= kth  # ties at the k-th score all stay, then go by id
            ids, scores = ids[keep], scores[keep]
        order = np.lexsort((ids, -scores))[:k]
        return [(int(i), float(s)) for i, s in zip(ids[order], scores[order])]

    # --- keeping up with the store ------------------------------------------------------------

    def synced(self, store_ids: np.ndarray, rows: Rows, version: int) -> tuple[LexicalIndex, int, int]:
        """A copy holding exactly `store_ids` (sorted); `rows(ids)` yields their FTS5 rows.

        Returns (index, added, removed). New chunks go into a new segment; a segment is merged
        into the one before it once it is at least half its size (so about log N segments), and
        rewritten alone once a quarter of its chunks was removed.
        """
        held = self.ids
        missing = np.setdiff1d(store_ids, held, assume_unique=True)
        extra = np.setdiff1d(held, store_ids, assume_unique=True)
        segments = [s.without(extra) for s in self.segments] if len(extra) else list(self.segments)
        terms = dict(self.terms)
        if len(missing):
            runs = _Runs(tokenizer(self.spec), terms)
            batch: list[tuple[int, str, str, str]] = []
            parts = []
            for row in rows(missing):
                batch.append(row)
                if len(batch) == 20_000:  # bounds the transient memory of a first build
                    parts.append(_tokenize(batch, runs))
                    batch = []
            if batch:
                parts.append(_tokenize(batch, runs))
            if parts:
                segments.append(parts[0] if len(parts) == 1 else _merge(parts, len(terms)))
        segments = [s if s.alive is None or s.n_alive > (1 - MERGE_DEAD) * len(s.ids) else _merge([s], len(terms))
                    for s in segments]
        segments = [s for s in segments if len(s.ids)]
        while len(segments) > 1 and 2 * len(segments[-1].docs) >= len(segments[-2].docs):
            segments[-2:] = [_merge(segments[-2:], len(terms))]
        return LexicalIndex(self.spec, version, terms, tuple(segments)), len(missing), len(extra)

    # --- files --------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write atomically: a temporary file in the same folder, fsynced, renamed over `path`."""
        arrays: dict[str, np.ndarray] = {
            "meta": np.array([FORMAT, self.version, len(self.segments)], np.int64),
            "spec": np.frombuffer(self.spec.encode(), np.uint8),
            # Terms never hold a newline (a separator to every FTS5 tokenizer); their id is their line.
            "terms": np.frombuffer("\n".join(self.terms).encode(), np.uint8),
        }
        for i, s in enumerate(self.segments):
            arrays.update({f"{name}_{i}": getattr(s, name) for name in ("ids", "lengths", "ptr", "docs", "tf")})
            if s.alive is not None:
                arrays[f"alive_{i}"] = s.alive
        write_npz_atomically(path, arrays)

    @classmethod
    def load(cls, path: Path) -> LexicalIndex:
        try:
            with np.load(path) as data:
                fmt, version, n_segments = (int(v) for v in data["meta"])
                if fmt != FORMAT:
                    raise ValueError(f"format {fmt}, expected {FORMAT}")
                spec = data["spec"].tobytes().decode()
                blob = data["terms"].tobytes().decode()
                segments = []
                for i in range(n_segments):
                    alive = data[f"alive_{i}"] if f"alive_{i}" in data else None
                    segments.append(Segment(*(data[f"{name}_{i}"] for name in ("ids", "lengths", "ptr", "docs", "tf")), alive))
        except (OSError, KeyError, ValueError, UnicodeDecodeError, zipfile.BadZipFile) as exc:
            raise StoreError(f"The lexical index file {path} is unreadable ({exc}); it is rebuilt from the store") from exc
        terms = {t: i for i, t in enumerate(blob.split("\n"))} if blob else {}
        if any(len(s.ptr) - 1 > len(terms) or len(s.docs) != s.ptr[-1] for s in segments):
            raise StoreError(f"The lexical index file {path} is inconsistent; it is rebuilt from the store")
        return cls(spec, version, terms, tuple(segments))

    def postings_of(self, chunk_id: int) -> dict[str, int]:
        """term -> weighted tf of one chunk (used by `moerag index check`); {} when not held."""
        names = list(self.terms)
        for s in self.segments:
            pos = int(np.searchsorted(s.ids, chunk_id))
            if pos < len(s.ids) and s.ids[pos] == chunk_id and (s.alive is None or s.alive[pos]):
                at = np.flatnonzero(s.docs == pos)  # [postings of the chunk]
                term = np.searchsorted(s.ptr, at, side="right") - 1
                return {names[t]: int(f) for t, f in zip(term, s.tf[at])}
        return {}


def expected_postings(spec: str, row: tuple[int, str, str, str]) -> dict[str, int]:
    """term -> weighted tf of one FTS5 row, tokenized from scratch (the reference for checks and tests)."""
    counts: dict[str, int] = {}
    fields = [row[1 + f] or "" for f in range(len(FIELDS))]
    for f, ts in enumerate(tokenizer(spec).terms(fields)):
        for t in ts:
            counts[t] = counts.get(t, 0) + WEIGHTS[f]
    return counts


def fts_rows(session: Session, ids: np.ndarray, *, batch: int = 20_000) -> Iterator[tuple[int, str, str, str]]:
    """(id, title, heading, body) of the FTS5 rows of `ids` (sorted), in id order; ids without a row are skipped."""
    if not len(ids):
        return
    lo, hi = int(ids[0]), int(ids[-1])
    if hi - lo + 1 <= 4 * len(ids):  # dense ids (a collection, an append): scan the rowid range
        last = lo - 1
        while last < hi:
            got = session.execute(
                text("SELECT rowid, title, heading, body FROM chunks_fts WHERE rowid > :a AND rowid <= :b "
                     "ORDER BY rowid LIMIT :n"), {"a": last, "b": hi, "n": batch},
            ).all()
            if not got:
                return
            last = got[-1][0]
            rowids = np.fromiter((r[0] for r in got), np.int64, len(got))
            wanted = ids[np.minimum(np.searchsorted(ids, rowids), len(ids) - 1)] == rowids
            yield from (tuple(r) for r, w in zip(got, wanted) if w)
    else:
        for i in range(0, len(ids), 500):
            part = ", ".join(str(int(x)) for x in ids[i : i + 500])
            yield from (tuple(r) for r in session.execute(
                text(f"SELECT rowid, title, heading, body FROM chunks_fts WHERE rowid IN ({part}) ORDER BY rowid")))
