"""A collection's documents as the CLI, the UI and the HTTP API manage them: list, upload, delete.

Uploaded files are written under <home>/uploads/<collection>/ with a name made from the upload's
own name (directories, `..` and odd characters removed) plus a hash of its content, so a
filename from the network is never used as a path, two uploads never collide, and re-uploading
the same bytes is recognised as unchanged. Then they are ingested like any other file. Uploads
are copied in blocks (never held whole), a rejected or failed upload leaves no file behind, and
deleting a document deletes its stored upload.
"""

from __future__ import annotations

import hashlib
import io
import re
import unicodedata
import uuid
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import select

from app.settings import Settings
from ingest.pipeline import IngestOptions, IngestReport, ParseLimits, Progress, ingest_paths
from retrieval.errors import MoeragError, NotFoundError
from retrieval.kb import KnowledgeBase
from retrieval.store import Collection, Document

_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]+")
MAX_NAME = 80


BLOCK = 1 << 20  # bytes copied at a time


class UploadError(MoeragError):
    """An upload that cannot be accepted (too large, too many files, no name)."""


class UploadTooLargeError(UploadError):
    """One uploaded file is over MOERAG_MAX_FILE_MB."""


def safe_name(filename: str, sha256: str) -> str:
    """A file name for an upload: its base name, cleaned, plus 12 hex digits of its content hash
    (`sha256`, hex).

    "../../etc/passwd.txt" -> "passwd-<hash>.txt"; the extension picks the loader, so it is kept.
    """
    base = re.split(r"[\\/]", filename or "")[-1]  # both separators, whatever the client's OS
    base = unicodedata.normalize("NFKC", base)
    base = "".join(ch for ch in base if unicodedata.category(ch)[0] != "C")  # control characters
    stem, dot, ext = base.rpartition(".")
    if not dot:
        stem, ext = base, ""
    stem = _UNSAFE.sub("_", stem).strip(" ._-")[:MAX_NAME] or "upload"
    ext = _UNSAFE.sub("", ext)[:12].lower()
    return f"{stem}-{sha256[:12]}" + (f".{ext}" if ext else "")


def ingest_options(settings: Settings) -> IngestOptions:
    """The ingest pipeline's options from the settings: chunking, size and parse limits, lock wait."""
    return IngestOptions(chunk_tokens=settings.chunk_tokens, chunk_overlap=settings.chunk_overlap,
                         max_bytes=int(settings.max_file_mb * 2**20), limits=ParseLimits.of(settings),
                         lock_wait=settings.lock_wait)


def uploads_dir(home: Path, collection: str) -> Path:
    return Path(home) / "uploads" / hashlib.sha256(collection.encode()).hexdigest()[:16]


def _is_upload(home: Path, source: str) -> bool:
    """Whether `source` is a file stored by `store_upload` (sources are resolved paths)."""
    root = Path(source).parent.parent
    return root == Path(home) / "uploads" or root == Path(home).resolve() / "uploads"


def display_source(home: Path, source: str) -> str:
    """A document's source as shown to API and UI users: an upload's stored file name (never
    its path under the data directory); any other source (a path the admin ingested, a URL, a
    record id) unchanged."""
    return Path(source).name if _is_upload(home, source) else source


def store_upload(name: str, data: BinaryIO, folder: Path, *, limit: int) -> tuple[Path, bool]:
    """Copy one upload into `folder` in blocks while hashing it: (its path, whether this call
    created it). Over `limit` bytes: UploadTooLargeError, and nothing is left in `folder`."""
    tmp = folder / f".{uuid.uuid4().hex}.part"
    h, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as out:
            while block := data.read(BLOCK):
                size += len(block)
                if size > limit:
                    raise UploadTooLargeError(f"'{name}' is larger than {limit / 2**20:g} MB (MOERAG_MAX_FILE_MB); "
                                              "nothing was stored.")
                h.update(block)
                out.write(block)
        path = folder / safe_name(name, h.hexdigest())
        if path.exists():
            return path, False
        tmp.replace(path)  # atomic: an ingest never reads half a file
        return path, True
    finally:
        tmp.unlink(missing_ok=True)


def ingest_uploads(
    kb: KnowledgeBase,
    embedder: Any,
    files: list[tuple[str, bytes | BinaryIO]],
    *,
    collection: str,
    settings: Settings,
    progress: Progress | None = None,
) -> IngestReport:
    """Save uploaded (name, bytes or readable binary file) pairs under the data directory and
    ingest them. A file over MOERAG_MAX_FILE_MB rejects the whole upload (UploadTooLargeError)
    and nothing of it is kept; a file that fails to ingest keeps its failure in the report and
    the document list, but not its bytes.

    The report has one result per file, in the order given (a repeated file appears twice).
    """
    if not files:
        raise UploadError("No files were uploaded.")
    limit = int(settings.max_file_mb * 2**20)
    folder = uploads_dir(settings.home, collection)
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    created: list[Path] = []
    try:
        for name, data in files:
            stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
            path, new = store_upload(name, stream, folder, limit=limit)
            paths.append(path)
            if new:
                created.append(path)
        unique = list(dict.fromkeys(paths))
        report = ingest_paths(kb, embedder, unique, collection=collection, options=ingest_options(settings),
                              progress=progress)
    except BaseException:
        _discard_unused(kb, collection, created)
        raise
    _discard_unused(kb, collection, created)
    by_source = {r.source: r for r in report.results}
    report.results = [by_source[str(p.resolve())] for p in paths]
    return report


def _discard_unused(kb: KnowledgeBase, collection: str, paths: list[Path]) -> None:
    """Remove stored uploads that no document's chunks come from (rejected, failed, or never
    ingested because the run stopped)."""
    if not paths:
        return
    used: set[str] = set()
    try:
        with kb.store.session() as session:
            coll = session.scalar(select(Collection).where(Collection.name == collection))
            if coll is not None:
                stored = kb.store.documents(session, coll, sources=[str(p.resolve()) for p in paths])
                used = {d.source for d in stored if d.n_chunks > 0}
    except MoeragError:
        return  # cannot tell what is used: keep the files rather than lose a document's bytes
    for p in paths:
        if str(p.resolve()) not in used:
            p.unlink(missing_ok=True)


def document_row(doc: Document) -> dict[str, Any]:
    """One document as every surface shows it: `moerag docs list --json` prints these rows whole,
    the API's DocumentOut and the UI's list take the fields they show."""
    return {
        "id": doc.id,
        "source": doc.source,
        "title": doc.title,
        "type": doc.doc_type,
        "status": doc.status,
        "error": doc.error,
        "chunks": doc.n_chunks,
        "sha256": doc.sha256,
        "size": doc.size,
        "updated_at": doc.updated_at.isoformat() if doc.updated_at else None,
    }


def list_documents(kb: KnowledgeBase, collection: str) -> list[dict[str, Any]]:
    """The rows (`document_row`) of a collection's documents, oldest first."""
    with kb.store.session() as session:
        return [document_row(d) for d in kb.store.documents(session, kb.store.collection(session, collection))]


def delete_documents(kb: KnowledgeBase, collection: str, ids: list[int] | None, *, lock_wait: float = 0.0) -> int:
    """Remove documents (chunks, vectors, lexical rows) from a collection, all of them when `ids`
    is None; the index is saved, then uploaded documents' stored files are deleted (files an
    admin ingested from elsewhere are never touched). Unknown ids remove nothing. Waits up to
    `lock_wait` seconds for another writer."""
    uploads: list[Path] = []
    with kb.write_lock(timeout=lock_wait), kb.store.session() as session:
        coll = kb.store.collection(session, collection)
        if ids is None:
            docs = kb.store.documents(session, coll)
        else:
            docs = []
            for i in ids:
                doc = session.get(Document, i)
                if doc is None or doc.collection_id != coll.id:
                    raise NotFoundError(f"No document with id {i} in collection '{collection}'. "
                                        "List them with: moerag docs list")
                docs.append(doc)
        for doc in docs:
            if _is_upload(kb.home, doc.source):
                uploads.append(Path(doc.source))
            kb.store.delete_document(session, doc)
        session.flush()
        kb.save_index(session, coll)
    for path in uploads:  # after the commit: a failed delete keeps its document's bytes
        path.unlink(missing_ok=True)
    return len(docs)
