"""Files (or in-memory records) -> documents -> chunks -> vectors, into a knowledge-base collection.

Work is grouped into batches of about `batch_chunks` chunks: the batch is embedded in one call
(sentence-transformers sorts a call's texts by length, so big calls waste little on padding),
then every document of the batch is written — document row, chunks, vectors, lexical rows — in
one transaction. A crash loses at most the batch in flight; nothing half-written is ever
committed. The FAISS file is saved every `save_every_s` and at the end; if the process dies in
between, the next open catches the index up from the store (see retrieval.kb).

Each file is parsed in a worker process under the parse limits (see ingest.isolate), so one
bad file fails alone, with its reason, within `parse_timeout` seconds: the write lock held for
the run is never held by a parser for longer than that.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ingest.chunker import chunk_document
from ingest.document import Chunk, LoadedDoc
from ingest.embedder import Embedder
from ingest.errors import LoadError
from ingest.files import Found, read_state, too_large, walk
from ingest.isolate import file_parsers, parse_file
from ingest.limits import ParseLimits
from ingest.loaders import load_text
from retrieval.kb import KnowledgeBase
from retrieval.store import Collection, Document

log = logging.getLogger(__name__)

STATUSES = ("added", "updated", "unchanged", "failed", "removed")


@dataclass
class FileResult:
    source: str
    status: str  # one of STATUSES
    chunks: int = 0
    error: str | None = None


@dataclass
class IngestReport:
    collection: str
    results: list[FileResult] = field(default_factory=list)
    seconds: float = 0.0
    embed_seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)

    @property
    def chunks(self) -> int:
        return sum(r.chunks for r in self.results if r.status in ("added", "updated"))

    @property
    def failed(self) -> list[FileResult]:
        return [r for r in self.results if r.status == "failed"]


@dataclass(frozen=True)
class IngestOptions:
    chunk_tokens: int = 256
    chunk_overlap: int = 32
    max_bytes: int = 50 * 1024 * 1024
    batch_chunks: int = 512  # chunks embedded per call (length-sorted within it) and committed together
    save_every_s: float = 60.0  # during long ingests, save the FAISS file this often
    limits: ParseLimits = ParseLimits()  # each file is parsed in a worker process under these
    lock_wait: float = 30.0  # seconds each write waits for another writer before LockedError


class Progress:
    """What the pipeline reports while it runs; the CLI draws a progress bar from it."""

    def start(self, files: int) -> None: ...
    def advance(self, *, files: int = 0, chunks: int = 0) -> None: ...


@dataclass
class _Item:
    """One thing to ingest: where it comes from and how to read it."""

    source: str
    load: Callable[[], LoadedDoc]
    sha256: str | None = None  # set when the item is read; None only with a `problem`
    size: int = 0
    mtime: float = 0.0
    problem: str | None = None  # why it cannot be ingested, known before parsing (too large, a FIFO...)


@dataclass
class _Pending:
    item: _Item
    doc: LoadedDoc
    chunks: list[Chunk]


# --- finding the files ---------------------------------------------------------------------------


def _file_items(found: list[Found], options: IngestOptions) -> Iterator[_Item]:
    """One item per entry found; each file is looked at (and hashed) only when its turn comes, so
    one that vanished or changed since the walk fails alone, with its reason. Files are parsed in
    a worker process under the parse limits (ingest.isolate): a parser that hangs, bloats or
    crashes costs its file, never this process."""
    max_bytes = options.max_bytes
    for f in found:
        item = _Item(source=str(f.path), load=partial(parse_file, f.path, max_bytes=max_bytes, limits=options.limits))
        if f.problem:
            item.problem = f.problem
            yield item
            continue
        try:
            state = read_state(f.path, max_bytes=max_bytes)
        except LoadError as exc:
            item.problem = str(exc)
            yield item
            continue
        item.size, item.mtime, item.sha256 = state.size, state.mtime, state.sha256
        if state.sha256 is None:
            item.problem = too_large(state.size, max_bytes)
        yield item


# --- the pipeline --------------------------------------------------------------------------------


def ingest_paths(
    kb: KnowledgeBase,
    embedder: Embedder,
    paths: Iterable[Path],
    *,
    collection: str,
    options: IngestOptions = IngestOptions(),
    prune: bool = False,
    progress: Progress | None = None,
) -> IngestReport:
    """Ingest files and folders; with `prune`, remove documents under `paths` whose files are gone."""
    file_parsers().warm()  # the parsing worker imports its parsers while the files are walked
    paths = [Path(p).expanduser() for p in paths]
    files = walk(paths)
    items = _file_items(files, options)
    report = _run(kb, embedder, items, len(files), collection=collection, options=options, progress=progress)
    if prune:
        roots = [str(p.resolve()) for p in paths]
        _prune(kb, report, roots, lock_wait=options.lock_wait)
    return report


def ingest_records(
    kb: KnowledgeBase,
    embedder: Embedder,
    records: list[tuple[str, str, str]],
    *,
    collection: str,
    options: IngestOptions = IngestOptions(),
    progress: Progress | None = None,
) -> IngestReport:
    """Ingest in-memory (source id, title, text) records, e.g. an evaluation corpus."""
    items = (
        _Item(
            source=source,
            load=lambda t=text, ti=title: load_text(t, title=ti),
            sha256=hashlib.sha256(text.encode()).hexdigest(),
            size=len(text),
        )
        for source, title, text in records
    )
    return _run(kb, embedder, items, len(records), collection=collection, options=options, progress=progress)


def _run(kb, embedder, items, total, *, collection, options, progress) -> IngestReport:
    """Parse, chunk and embed outside the write lock; take it only for each write (a batch's
    commit, a failure's record, an index save), so a slow file or a long embedding never keeps
    other writers (uploads, deletes, another ingest) waiting for more than one batch's commit."""
    progress = progress or Progress()
    report = IngestReport(collection=collection)
    t0 = time.perf_counter()
    budget = min(options.chunk_tokens, embedder.max_tokens)
    with kb.write_lock(timeout=options.lock_wait), kb.store.session() as session:
        coll = kb.store.get_or_create_collection(session, collection, embed_model=embedder.name, dim=embedder.dim)
        coll_id = coll.id
    progress.start(total)
    pending: list[_Pending] = []
    n_pending = 0
    last_save = time.perf_counter()
    for item in items:
        with kb.store.session() as session:
            coll = session.get(Collection, coll_id)
            existing = kb.store.document_by_source(session, coll, item.source)
        result = _prepare(item, existing, embedder, budget, options)
        if isinstance(result, FileResult):
            if result.status == "failed":
                result.error = _record_failure(kb, coll_id, item, result.error, lock_wait=options.lock_wait)
            report.results.append(result)
            progress.advance(files=1)
            continue
        pending.append(result)
        n_pending += len(result.chunks)
        if n_pending >= options.batch_chunks:
            # Bound how far the index file can lag the store if this process dies.
            save = time.perf_counter() - last_save > options.save_every_s
            report.embed_seconds += _flush(kb, embedder, coll_id, pending, report, progress,
                                           lock_wait=options.lock_wait, save=save)
            pending, n_pending = [], 0
            if save:
                last_save = time.perf_counter()
    report.embed_seconds += _flush(kb, embedder, coll_id, pending, report, progress, lock_wait=options.lock_wait,
                                   save=True)
    report.seconds = time.perf_counter() - t0
    return report


def _prepare(item: _Item, existing: Document | None, embedder: Embedder, budget: int, options: IngestOptions):
    """Read and chunk one item; a FileResult when there is nothing to embed (unchanged or failed)."""
    if item.problem:
        return FileResult(item.source, "failed", error=item.problem)
    if existing is not None and existing.sha256 == item.sha256 and existing.status == "ok":
        return FileResult(item.source, "unchanged", chunks=existing.n_chunks)
    try:
        doc = item.load()
        chunks = chunk_document(
            doc, embedder.tokenizer, max_tokens=embedder.max_tokens, chunk_tokens=budget, overlap_tokens=options.chunk_overlap
        )
    except LoadError as exc:
        return FileResult(item.source, "failed", error=str(exc))
    except Exception as exc:  # a parser bug must cost one file, never the run
        log.debug("unexpected error reading %s", item.source, exc_info=True)
        return FileResult(item.source, "failed", error=f"unexpected {exc.__class__.__name__}: {exc}")
    if not chunks:
        return FileResult(item.source, "failed", error="no text found")
    return _Pending(item, doc, chunks)


def _flush(kb, embedder, coll_id, pending: list[_Pending], report: IngestReport, progress: Progress, *,
           lock_wait: float, save: bool) -> float:
    """Embed a batch of documents' chunks (no lock held), then commit them together under the
    write lock, saving the index file too when `save`; returns embedding seconds."""
    texts = [c.embed_text for p in pending for c in p.chunks]
    t0 = time.perf_counter()
    vectors = embedder.encode(texts) if texts else None  # [N, D]
    embed_seconds = time.perf_counter() - t0
    offset = 0
    with kb.write_lock(timeout=lock_wait):
        with kb.store.session() as session:
            coll = session.get(Collection, coll_id)
            for p in pending:
                doc = kb.store.document_by_source(session, coll, p.item.source)
                status = "updated" if doc is not None else "added"
                if doc is None:
                    doc = Document(collection_id=coll.id, source=p.item.source)
                    session.add(doc)
                doc.title = p.doc.title
                doc.doc_type = p.doc.doc_type
                doc.sha256, doc.size, doc.mtime = p.item.sha256, p.item.size, p.item.mtime
                doc.status, doc.error, doc.text = "ok", None, p.doc.text
                session.flush()
                rows = [
                    dict(text=c.text, page=c.page, heading=c.heading, start=c.start, end=c.end, n_tokens=c.n_tokens)
                    for c in p.chunks
                ]
                kb.store.replace_chunks(session, coll, doc, rows, vectors[offset : offset + len(rows)])
                offset += len(rows)
                report.results.append(FileResult(p.item.source, status, chunks=len(rows)))
        if save:  # after the commit: an index file never holds what the store does not
            with kb.store.session() as session:
                kb.save_index(session, session.get(Collection, coll_id))
    if pending:
        progress.advance(files=len(pending), chunks=len(texts))
    return embed_seconds


def _record_failure(kb: KnowledgeBase, coll_id: int, item: _Item, error: str, *, lock_wait: float) -> str:
    """A failed file is recorded so it is listed; a previous good version keeps its chunks."""
    with kb.write_lock(timeout=lock_wait), kb.store.session() as session:
        coll = session.get(Collection, coll_id)
        doc = kb.store.document_by_source(session, coll, item.source)
        if doc is None:
            doc = Document(collection_id=coll.id, source=item.source, title=Path(item.source).name, n_chunks=0)
            session.add(doc)
        if doc.n_chunks:
            error = f"{error} (kept the {doc.n_chunks} chunks of the previous version)"
        doc.status, doc.error = "failed", error
        doc.size, doc.mtime = item.size, item.mtime
    return error


def _prune(kb: KnowledgeBase, report: IngestReport, roots: list[str], *, lock_wait: float) -> None:
    with kb.write_lock(timeout=lock_wait), kb.store.session() as session:
        coll = kb.store.collection(session, report.collection)
        for doc in kb.store.documents(session, coll):
            under = any(doc.source == r or doc.source.startswith(r.rstrip(os.sep) + os.sep) for r in roots)
            if under and not Path(doc.source).exists():
                kb.store.delete_document(session, doc)
                report.results.append(FileResult(doc.source, "removed"))
        session.flush()
        kb.save_index(session, coll)
