"""Ingesting folders: incremental updates, failures recorded, pruning, embedder mismatch."""

from pathlib import Path

import pytest
from sqlalchemy import select

from ingest.pipeline import IngestOptions, ingest_paths
from retrieval.errors import EmbeddingMismatchError
from retrieval.search import search
from retrieval.store import Chunk, Document


def write_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cats.md").write_text(
        "# Cats\n\nCats are small carnivorous mammals that purr when content.\n\n"
        "## Care\n\nFeed your cat twice a day and keep fresh water available.\n"
    )
    (folder / "rockets.txt").write_text("Liquid-fuel rockets burn kerosene and liquid oxygen in a combustion chamber.\n")
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    (folder / "photo.bin").write_bytes(bytes(range(256)) * 10)
    return folder


def statuses(report) -> dict[str, str]:
    return {Path(r.source).name: r.status for r in report.results}


def test_ingest_is_incremental_and_records_failures(kb, embedder, tmp_path):
    docs = write_corpus(tmp_path / "docs")
    first = ingest_paths(kb, embedder, [docs], collection="default")
    assert statuses(first) == {"cats.md": "added", "rockets.txt": "added", "broken.pdf": "failed", "photo.bin": "failed"}
    reasons = {Path(r.source).name: r.error for r in first.failed}
    assert "pdf" in reasons["broken.pdf"].lower()
    assert "binary" in reasons["photo.bin"].lower()

    # Failed files are recorded, so they can be listed with their reason.
    with kb.store.session() as s:
        rows = {Path(d.source).name: (d.status, d.error) for d in s.scalars(select(Document))}
    assert rows["broken.pdf"][0] == "failed" and rows["broken.pdf"][1]
    assert rows["cats.md"] == ("ok", None)

    second = ingest_paths(kb, embedder, [docs], collection="default")
    assert statuses(second)["cats.md"] == "unchanged" and statuses(second)["rockets.txt"] == "unchanged"
    assert second.chunks == 0

    # A changed file replaces its chunks: the new text is found, the old text is gone.
    (docs / "rockets.txt").write_text("Solid rocket boosters burn a mix of ammonium perchlorate and aluminium powder.\n")
    third = ingest_paths(kb, embedder, [docs], collection="default")
    assert statuses(third)["rockets.txt"] == "updated"
    hits = search(kb, "kerosene", embed=embedder.encode, collection="default", mode="bm25")
    assert hits == []
    hits = search(kb, "ammonium perchlorate", embed=embedder.encode, collection="default", mode="bm25")
    assert [Path(h.source).name for h in hits] == ["rockets.txt"]
    with kb.store.session() as s:
        assert s.scalar(select(Document).where(Document.source.like("%rockets.txt"))).n_chunks == 1

    # --prune removes documents whose files are gone, with their chunks.
    (docs / "cats.md").unlink()
    fourth = ingest_paths(kb, embedder, [docs], collection="default", prune=True)
    assert statuses(fourth)["cats.md"] == "removed"
    with kb.store.session() as s:
        assert not s.scalars(select(Chunk).join(Document).where(Document.source.like("%cats.md"))).all()
    assert search(kb, "purr", embed=embedder.encode, collection="default", mode="bm25") == []
    with kb.store.session() as s:
        assert kb.check(s, kb.store.collection(s, "default")).ok


def test_a_file_that_breaks_keeps_its_previous_chunks(kb, embedder, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    data = docs / "table.csv"
    data.write_text("name,role\nAda,engineer\nGrace,admiral\n")
    ingest_paths(kb, embedder, [docs], collection="default")
    data.write_bytes(b"\x00\x01\x02" * 100)  # now garbage
    report = ingest_paths(kb, embedder, [docs], collection="default")
    assert report.failed and "previous version" in report.failed[0].error
    hits = search(kb, "Grace admiral", embed=embedder.encode, collection="default", mode="bm25")
    assert hits and Path(hits[0].source).name == "table.csv"


def test_chunks_fit_the_embedder_and_point_into_the_document(kb, embedder, tmp_path):
    long = "\n\n".join(f"Paragraph {i}. " + "The quick brown fox jumps over the lazy dog. " * 12 for i in range(40))
    (tmp_path / "long.txt").write_text(long)
    ingest_paths(kb, embedder, [tmp_path / "long.txt"], collection="default", options=IngestOptions(chunk_tokens=128, chunk_overlap=16))
    with kb.store.session() as s:
        doc = s.scalar(select(Document))
        chunks = doc.chunks
        assert len(chunks) > 10
        for c in chunks:
            assert doc.text[c.start : c.end] == c.text
            n = len(embedder.tokenizer(c.text, add_special_tokens=True, truncation=False)["input_ids"])
            assert n <= 128


def test_a_collection_refuses_another_embedding_model(kb, embedder, tmp_path):
    (tmp_path / "a.txt").write_text("hello world, this is a document")
    ingest_paths(kb, embedder, [tmp_path / "a.txt"], collection="default")
    with kb.store.session() as s, pytest.raises(EmbeddingMismatchError) as exc:
        kb.store.get_or_create_collection(s, "default", embed_model="BAAI/bge-small-en-v1.5", dim=384)
    assert "re-index" in str(exc.value) and "all-MiniLM-L6-v2" in str(exc.value)
