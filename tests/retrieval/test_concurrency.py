"""Readers and writers in one process: searches in many threads while another thread of the same
KnowledgeBase ingests and deletes documents (what `moerag serve` does under load).

What a user would notice, checked on every search: no error; no chunk twice in one answer; no
chunk of a document whose deletion was committed before the search started; a document whose
ingest was committed before the search started is found by its own word; and afterwards the
index files agree with the store.
"""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
from sqlalchemy import func, select

from ingest.pipeline import ingest_records
from retrieval.kb import KnowledgeBase
from retrieval.search import search
from retrieval.store import Chunk, Document

COLLECTION = "default"
SEARCHERS = 4
ROUNDS = 12  # the writer adds one document and deletes another this many times


def word(rng: random.Random) -> str:
    """A made-up word no other document holds: found by BM25 only in its own document."""
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(5))


def record(name: str, marker: str, n: int) -> tuple[str, str, str]:
    body = " ".join(f"Paragraph {i} of the {name} report mentions {marker} and the quarterly figures." for i in range(n))
    return f"rec:{name}", f"{name} report", body


def chunk_ids_of(kb: KnowledgeBase, source: str) -> set[int]:
    with kb.store.session() as s:
        doc = kb.store.document_by_source(s, kb.store.collection(s, COLLECTION), source)
        return set(s.scalars(select(Chunk.id).where(Chunk.document_id == doc.id)))


def delete(kb: KnowledgeBase, source: str) -> None:
    """What the API's DELETE does: under the write lock, drop the document and save the index."""
    with kb.write_lock(), kb.store.session() as s:
        coll = kb.store.collection(s, COLLECTION)
        kb.store.delete_document(s, kb.store.document_by_source(s, coll, source))
        s.flush()
        kb.save_index(s, coll)


@pytest.mark.slow
def test_searches_stay_consistent_while_documents_are_added_and_deleted(kb, embedder, home):
    rng = random.Random(14)
    base = [record(f"base{i}", word(rng), 3) for i in range(20)]
    victims = [record(f"victim{i}", word(rng), 6) for i in range(ROUNDS)]
    ingest_records(kb, embedder, base + victims, collection=COLLECTION)
    victim_ids = {src: chunk_ids_of(kb, src) for src, _, _ in victims}
    markers = {src: body.split(" mentions ")[1].split()[0] for src, _, body in base + victims}

    deleted: list[tuple[float, set[int]]] = []  # (monotonic time the delete was committed, its chunk ids)
    added: list[tuple[float, str]] = []  # (monotonic time the ingest was committed, source)
    deleting: list[str] = []  # deletes begun
    errors: list[BaseException] = []
    stop = threading.Event()
    checked = {"searches": 0, "fresh": 0}

    def writer() -> None:
        try:
            for i, (src, _, _) in enumerate(victims):
                name = f"new{i}"
                marker = word(rng)
                ingest_records(kb, embedder, [record(name, marker, 4)], collection=COLLECTION)
                markers[f"rec:{name}"] = marker
                added.append((time.monotonic(), f"rec:{name}"))
                deleting.append(src)
                delete(kb, src)
                deleted.append((time.monotonic(), victim_ids[src]))
                # The files this writer saved agree with the store it committed (no writer runs now).
                with kb.store.session() as s:
                    report = kb.check(s, kb.store.collection(s, COLLECTION))
                    assert report.ok and report.index_version == report.store_version, report
        except BaseException as exc:  # noqa: BLE001 -- reported by the test thread
            errors.append(exc)
        finally:
            stop.set()

    def searcher(seed: int) -> None:
        local = random.Random(seed)
        try:
            while not stop.is_set():
                start, n_deleted = time.monotonic(), len(deleted)
                gone = set().union(*(ids for t, ids in deleted if t < start))
                fresh = [src for t, src in added if t < start]
                mode = local.choice(["hybrid", "dense", "bm25"])
                if fresh and local.random() < 0.5:  # a document committed before this search began
                    src, mode = local.choice(fresh), "bm25"
                    hits = search(kb, markers[src], embed=embedder.encode, collection=COLLECTION, k=5, mode=mode)
                    assert src in {h.source for h in hits}, f"{src}, committed before the search, was not found"
                    checked["fresh"] += 1
                else:
                    src = local.choice(list(victim_ids))
                    hits = search(kb, f"{markers[src]} quarterly figures", embed=embedder.encode,
                                  collection=COLLECTION, k=10, mode=mode)
                ids = [h.chunk_id for h in hits]
                if mode == "dense" and len(deleting) == n_deleted:
                    # Exact search over >= 20 chunks, no delete committed meanwhile: k of them.
                    assert len(ids) == 10, f"dense search returned {len(ids)} of 10 hits"
                assert len(ids) == len(set(ids)), f"a chunk twice in one {mode} result: {ids}"
                assert not gone & set(ids), f"{mode} search returned chunks deleted before it began: {gone & set(ids)}"
                checked["searches"] += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=searcher, args=(i,)) for i in range(SEARCHERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    assert checked["searches"] > 50 and checked["fresh"] > 5, checked

    with kb.store.session() as s:
        coll = kb.store.collection(s, COLLECTION)
        store_ids = kb.store.chunk_ids(s, coll)
        assert not kb.check(s, coll).problems
        assert s.scalar(select(func.count(Document.id))) == len(base) + ROUNDS
        # The index this process searches holds exactly the store's chunks.
        assert np.array_equal(np.sort(kb.vector_index(s, coll).ids), store_ids)
        assert np.array_equal(kb.lexical_index(s, coll).ids, store_ids)
    fresh_kb = KnowledgeBase(home)  # and a new process, from the saved files
    with fresh_kb.store.session() as s:
        assert fresh_kb.check(s, fresh_kb.store.collection(s, COLLECTION)).ok


@pytest.fixture
def two_docs(kb, embedder):
    rng = random.Random(7)
    keep, victim = record("keep", word(rng), 3), record("victim", word(rng), 3)
    ingest_records(kb, embedder, [keep, victim], collection=COLLECTION)
    return keep, victim


def test_a_search_keeps_its_index_while_a_newer_one_is_built(kb, embedder, two_docs):
    """FAISS cannot search an index while it is changed: a catch-up builds a new one beside it."""
    _, victim = two_docs
    with kb.store.session() as s:
        coll = kb.store.collection(s, COLLECTION)
        held, lexical = kb.vector_index(s, coll), kb.lexical_index(s, coll)  # what a running search holds
    ids, n = held.ids.copy(), held.index.ntotal
    delete(kb, victim[0])
    ingest_records(kb, embedder, [record("late", "zarimoku", 3)], collection=COLLECTION)
    with kb.store.session() as s:
        coll = kb.store.collection(s, COLLECTION)
        newer, newer_lexical = kb.vector_index(s, coll), kb.lexical_index(s, coll)
        store_ids = kb.store.chunk_ids(s, coll)
    assert newer is not held and newer_lexical is not lexical
    assert np.array_equal(held.ids, ids) and held.index.ntotal == n == len(ids)
    assert np.array_equal(lexical.ids, ids)
    assert np.array_equal(newer.ids, store_ids) and newer.index.ntotal == len(store_ids)


def test_a_rolled_back_writer_leaves_readers_and_files_right(kb, embedder, two_docs):
    """A writer's index reaches readers when it commits; a rollback leaves nothing they would use."""
    keep, victim = two_docs
    assert victim[0] in {h.source for h in search(kb, "quarterly figures", embed=embedder.encode, collection=COLLECTION)}
    with pytest.raises(RuntimeError, match="rolled back"):
        with kb.write_lock(), kb.store.session() as s:
            coll = kb.store.collection(s, COLLECTION)
            kb.store.delete_document(s, kb.store.document_by_source(s, coll, victim[0]))
            s.flush()
            kb.save_index(s, coll)  # the file now says: version v+1, without the victim
            raise RuntimeError("rolled back")
    # The next commit reuses version v+1, with other content.
    ingest_records(kb, embedder, [record("late", "zarimoku", 3)], collection=COLLECTION)
    for reader in (kb, KnowledgeBase(kb.home)):  # this process, and a new one starting from the file
        for mode in ("dense", "hybrid"):
            found = {h.source for h in search(reader, "quarterly figures", embed=embedder.encode,
                                              collection=COLLECTION, mode=mode)}
            assert found == {keep[0], victim[0], "rec:late"}, (mode, found)
    with kb.store.session() as s:
        assert kb.check(s, kb.store.collection(s, COLLECTION)).ok
