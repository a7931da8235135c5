"""The in-memory BM25 index: FTS5's own ranking, kept up with the store, filtered exactly.

Collections are written through the store with placeholder vectors: BM25 needs no embedder.
"""

import json
import sqlite3

import numpy as np
import pytest
from sqlalchemy import text

from retrieval.bm25 import LexicalIndex
from retrieval.kb import KnowledgeBase
from retrieval.search import bm25_ids, fts_query, search
from retrieval.store import Document

WORDS_PER_CHUNK = 60


def add(kb: KnowledgeBase, collection: str, source: str, title: str, body: str, *, heading: str | None = None) -> None:
    """One document, its body cut into WORDS_PER_CHUNK-word chunks, committed."""
    words = body.split()
    parts = [" ".join(words[i : i + WORDS_PER_CHUNK]) for i in range(0, len(words), WORDS_PER_CHUNK)] or [""]
    with kb.store.session() as s:
        coll = kb.store.get_or_create_collection(s, collection, embed_model="none", dim=2)
        doc = kb.store.document_by_source(s, coll, source) or Document(collection_id=coll.id, source=source, title=title)
        s.add(doc)
        s.flush()
        rows = [{"text": t, "page": None, "heading": heading, "start": 0, "end": len(t)} for t in parts]
        kb.store.replace_chunks(s, coll, doc, rows, np.ones((len(rows), 2), np.float32))


def remove(kb: KnowledgeBase, collection: str, source: str) -> None:
    with kb.store.session() as s:
        kb.store.delete_document(s, kb.store.document_by_source(s, kb.store.collection(s, collection), source))


def bm25(kb: KnowledgeBase, query: str, k: int = 10, *, collection: str = "c", source: str | None = None):
    with kb.store.session() as s:
        return bm25_ids(kb, s, kb.store.collection(s, collection), query, k, source=source)


def fts5(kb: KnowledgeBase, query: str, k: int = 10) -> list[tuple[int, float]]:
    """The reference: FTS5's bm25() over the whole table (one collection here), best first, ties by id.

    Weights title 2, heading 1, body 1, written out: the contract, not whatever the code says.
    """
    with sqlite3.connect(kb.home / "moerag.db") as raw:
        rows = raw.execute(
            "SELECT rowid, bm25(chunks_fts, 2.0, 1.0, 1.0) FROM chunks_fts WHERE chunks_fts MATCH ?",
            (fts_query(query),),
        ).fetchall()
    return sorted(((i, -s) for i, s in rows), key=lambda r: (-r[1], r[0]))[:k]


def sources(kb: KnowledgeBase) -> dict[int, str]:
    """chunk id -> its document's source."""
    with kb.store.session() as s:
        return dict(s.execute(text("SELECT c.id, d.source FROM chunks c JOIN documents d ON d.id = c.document_id")).all())


@pytest.fixture(scope="module")
def scifact(shared_eval):
    docs = [json.loads(line) for line, _ in zip(open(shared_eval / "scifact" / "corpus.jsonl"), range(300))]
    queries = [json.loads(line)["text"] for line, _ in zip(open(shared_eval / "scifact" / "queries.jsonl"), range(40))]
    return docs, queries


@pytest.fixture
def sci_kb(kb, scifact):
    docs, _ = scifact
    for i, d in enumerate(docs[:250]):  # every third document under a heading, so all three weights count
        add(kb, "c", f"scifact/{d['_id']}", d["title"], d["text"], heading="Results" if i % 3 == 0 else None)
    return kb


def test_ranks_and_scores_as_fts5_bm25(sci_kb, scifact):
    _, queries = scifact
    # Repeated stems, a heading word, non-ASCII words and separators (SciFact has "β", "–", "’").
    queries = queries + ["planet planets planetary", "results of treatment", "β-catenin signalling – naïve T cells"]
    matched = 0
    for q in queries:
        got = bm25(sci_kb, q)
        assert got == fts5(sci_kb, q), q  # same ids, same order, the same doubles
        matched += bool(got)
    assert matched >= len(queries) - 2


def test_new_commits_and_deletions_are_seen_by_the_next_search(sci_kb, scifact, home):
    docs, queries = scifact
    before = bm25(sci_kb, "zyxomycin")  # builds the index (and saves it)
    assert before == []
    add(sci_kb, "c", "late/zyx.txt", "Zyxomycin", "Zyxomycin is a made-up antibiotic that clears biofilms.")
    assert [sources(sci_kb)[c] for c, _ in bm25(sci_kb, "zyxomycin")] == ["late/zyx.txt"]
    # Several small commits (new segments, merges), a re-ingest (old chunks out, new in), a deletion:
    # scores still equal FTS5's, whose statistics always reflect the table.
    for d in docs[250:290]:
        add(sci_kb, "c", f"scifact/{d['_id']}", d["title"], d["text"])
    add(sci_kb, "c", f"scifact/{docs[0]['_id']}", "Replaced", "A replacement text about zyxomycin resistance in biofilms.")
    remove(sci_kb, "c", "late/zyx.txt")
    assert [c for c, _ in bm25(sci_kb, "zyxomycin")] == [c for c, _ in fts5(sci_kb, "zyxomycin")]
    assert len(bm25(sci_kb, "zyxomycin")) == 1  # only the replacement; the deleted document is gone
    for q in queries[:15]:
        assert bm25(sci_kb, q) == fts5(sci_kb, q), q
    # A fresh reader starts from the saved file and catches up with what came after it.
    fresh = KnowledgeBase(home)
    for q in queries[:15]:
        assert bm25(fresh, q) == fts5(sci_kb, q), q


def test_collection_and_source_filters_are_exact(kb):
    add(kb, "c", "/docs/space/mars.md", "Mars", "Mars dust storms cover the planet for weeks.")
    add(kb, "c", "/docs/space/venus.md", "Venus", "Venus has dust free skies and sulphuric acid clouds.")
    add(kb, "c", "/docs/home/vacuum.md", "Vacuum", "A vacuum cleaner removes dust from carpets. Dust, dust, dust.")
    add(kb, "other", "/docs/space/moon.md", "Moon", "Moon dust is sharp and clings to spacesuits.")
    source_of = sources(kb)
    assert {source_of[c] for c, _ in bm25(kb, "dust")} == {"/docs/space/mars.md", "/docs/space/venus.md", "/docs/home/vacuum.md"}
    assert [source_of[c] for c, _ in bm25(kb, "dust", collection="other")] == ["/docs/space/moon.md"]
    assert {source_of[c] for c, _ in bm25(kb, "dust", source="/docs/space/")} == {"/docs/space/mars.md", "/docs/space/venus.md"}
    assert bm25(kb, "dust", source="/docs/space_") == []  # "_" is a character, not a LIKE wildcard
    assert bm25(kb, "dust", k=1)[0][0] in {c for c, s in source_of.items() if s.endswith("vacuum.md")}  # four "dust"s


def test_a_query_without_meaningful_words_finds_nothing(kb):
    add(kb, "c", "a.txt", "The", "The cat is on the mat, and it is what it is.")
    for q in ("", "!!! ???", "the of and is", "What is it?"):
        assert bm25(kb, q) == [], q
    assert search(kb, "the and what", embed=None, collection="c", mode="bm25") == []
    assert len(bm25(kb, "the cat")) == 1


def test_a_damaged_index_file_is_rebuilt_and_check_reports_it(sci_kb, home):
    first = bm25(sci_kb, "coronary artery disease")
    with sci_kb.store.session() as s:
        coll = sci_kb.store.collection(s, "c")
        path = sci_kb.lexical_path(coll)
        assert sci_kb.check(s, coll).ok
        li = LexicalIndex.load(path)
        seg = li.segments[0]
        tampered = LexicalIndex(li.spec, li.version, li.terms, (type(seg)(seg.ids, seg.lengths, seg.ptr, seg.docs,
                                                                          seg.tf + 1, seg.alive),))
        tampered.save(path)
        report = sci_kb.check(s, coll)
        assert not report.ok and any("BM25 index file" in p for p in report.problems)
        sci_kb.rebuild_index(s, coll)
        assert sci_kb.check(s, coll).ok
    path.write_bytes(b"not an npz file")
    assert bm25(KnowledgeBase(home), "coronary artery disease") == first
