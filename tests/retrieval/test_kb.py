"""The knowledge base as a user meets it: search modes, filters, one writer, fresh readers, checks."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ingest.pipeline import ingest_paths
from retrieval.errors import LockedError, RetrievalError
from retrieval.index import VectorIndex
from retrieval.kb import KnowledgeBase
from retrieval.search import search

TOPICS = {
    "astronomy/jupiter.md": "# Jupiter\n\nJupiter is the largest planet in the Solar System, a gas giant with a Great Red Spot storm.",
    "astronomy/mars.md": "# Mars\n\nMars is the fourth planet from the Sun; its red colour comes from iron oxide dust.",
    "cooking/bread.md": "# Sourdough\n\nSourdough bread rises with a starter of wild yeast and lactobacilli instead of baker's yeast.",
    "cooking/pasta.md": "# Carbonara\n\nCarbonara is a Roman pasta dish of eggs, pecorino romano, guanciale and black pepper.",
    "code/faiss.txt": "FAISS IndexIVFFlat partitions vectors into nlist inverted lists; nprobe lists are scanned per query.",
}


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    for rel, text in TOPICS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.fixture
def filled(kb, embedder, corpus):
    ingest_paths(kb, embedder, [corpus], collection="default")
    return kb


def names(hits):
    return [Path(h.source).name for h in hits]


def test_dense_finds_a_paraphrase_bm25_finds_the_keyword(filled, embedder):
    dense = search(filled, "which world is the biggest one orbiting our star?", embed=embedder.encode, collection="default", k=1, mode="dense")
    assert names(dense) == ["jupiter.md"]
    bm25 = search(filled, "guanciale", embed=embedder.encode, collection="default", k=3, mode="bm25")
    assert names(bm25) == ["carbonara.md"] or names(bm25) == ["pasta.md"]
    hybrid = search(filled, "nprobe inverted lists", embed=embedder.encode, collection="default", k=2)
    assert names(hybrid)[0] == "faiss.txt"
    assert set(hybrid[0].ranks) == {"dense", "bm25"}  # found by both retrievers


def test_bm25_stems_and_ignores_stopwords(filled, embedder):
    hits = search(filled, "the planets", embed=embedder.encode, collection="default", mode="bm25")
    assert set(names(hits)) == {"jupiter.md", "mars.md"}


def test_source_filter_keeps_only_that_folder(filled, embedder, corpus):
    for mode in ("dense", "bm25", "hybrid"):
        hits = search(filled, "planet yeast pepper", embed=embedder.encode, collection="default", mode=mode, source=str(corpus / "cooking"))
        assert hits and all("/cooking/" in h.source for h in hits), mode


def test_hits_carry_location_and_document(filled, embedder):
    hit = search(filled, "iron oxide dust", embed=embedder.encode, collection="default", k=1)[0]
    item = hit.to_json()
    assert item["rank"] == 1 and item["document"]["title"] == "Mars"
    assert item["heading"] == "Mars"
    assert "iron oxide" in item["text"]
    for key in ("score", "chunk_id", "page", "start", "end"):
        assert key in item


def test_unknown_collection_and_bad_mode_say_what_to_do(filled, embedder):
    with pytest.raises(RetrievalError, match="moerag ingest"):
        search(filled, "x", embed=embedder.encode, collection="nope")
    with pytest.raises(RetrievalError, match="hybrid, dense, bm25"):
        search(filled, "x", embed=embedder.encode, collection="default", mode="fuzzy")


def test_a_reader_sees_a_writers_commit_without_restarting(filled, embedder, home, tmp_path):
    reader = KnowledgeBase(home)  # a second process's view (its own index cache)
    assert "comet.md" not in names(search(reader, "comet tail", embed=embedder.encode, collection="default", mode="dense"))
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "comet.md").write_text("# Comets\n\nA comet grows a tail of gas and dust when it nears the Sun.")
    writer = KnowledgeBase(home)
    ingest_paths(writer, embedder, [tmp_path / "more"], collection="default")
    assert names(search(reader, "comet tail", embed=embedder.encode, collection="default", k=1, mode="dense")) == ["comet.md"]


def test_a_second_writer_is_refused_with_a_clear_message(filled, home):
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from filelock import FileLock; l = FileLock({str(home / 'write.lock')!r}); l.acquire(); "
                               "print('held', flush=True); import time; time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match="Wait for it to finish"):
            with filled.write_lock():
                pass
    finally:
        holder.kill()
        holder.wait()
    with filled.write_lock():  # released with the process
        pass


def test_check_finds_a_tampered_index_and_rebuild_fixes_it(filled):
    with filled.store.session() as s:
        coll = filled.store.collection(s, "default")
        assert filled.check(s, coll).ok
        path = filled.index_path(coll)
        vi = VectorIndex.load(path, filled.index_params)
        # Same version, but one vector replaced: what a bug or a stray file copy would leave.
        victim = vi.ids[:1]
        vi.index.remove_ids(victim)
        vi.index.add_with_ids(np.ones((1, vi.dim), np.float32) / np.sqrt(vi.dim), victim)
        vi.save(path)
        report = filled.check(s, coll)
        assert not report.ok and any("differ from the store" in p for p in report.problems)
        filled.rebuild_index(s, coll)
        assert filled.check(s, coll).ok


def test_an_index_file_behind_the_store_is_caught_up_on_open(filled, embedder, home, tmp_path):
    with filled.store.session() as s:
        coll = filled.store.collection(s, "default")
        old = filled.index_path(coll).read_bytes()
    (tmp_path / "late.txt").write_text("Neutron stars are the collapsed cores of massive stars.")
    ingest_paths(filled, embedder, [tmp_path / "late.txt"], collection="default")
    with filled.store.session() as s:
        coll = filled.store.collection(s, "default")
        filled.index_path(coll).write_bytes(old)  # as if the ingest died before saving its index
        report = filled.check(s, coll)
        assert report.ok and any("behind" in n for n in report.notes)
    fresh = KnowledgeBase(home)
    assert names(search(fresh, "collapsed cores of massive stars", embed=embedder.encode, collection="default", k=1, mode="dense")) == ["late.txt"]
