"""A collection's documents as the UI and the HTTP API manage them: list, upload, delete.

Uploaded files are written under <home>/uploads/<collection>/ with a name made from the upload's
own name (directories, `..` and odd characters removed) plus a hash of its content, so a
filename from the network is never used as a path, two uploads never collide, and re-uploading
the same bytes is recognised as unchanged. Then they are ingested like any other file.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.settings import Settings
from ingest.pipeline import IngestOptions, IngestReport, Progress, ingest_paths
from retrieval.errors import MoeragError, NotFoundError
from retrieval.kb import KnowledgeBase
from retrieval.store import Document

_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]+")
MAX_NAME = 80


class UploadError(MoeragError):
    """An upload that cannot be accepted (too large, too many files, no name)."""


def safe_name(filename: str, data: bytes) -> str:
    """A file name for an upload: its base name, cleaned, plus 12 hex digits of its content hash.

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
    digest = hashlib.sha256(data).hexdigest()[:12]
    return f"{stem}-{digest}" + (f".{ext}" if ext else "")


def uploads_dir(home: Path, collection: str) -> Path:
    return Path(home) / "uploads" / hashlib.sha256(collection.encode()).hexdigest()[:16]


def ingest_uploads(
    kb: KnowledgeBase,
    embedder: Any,
    files: list[tuple[str, bytes]],
    *,
    collection: str,
    settings: Settings,
    progress: Progress | None = None,
) -> IngestReport:
    """Save uploaded (name, bytes) pairs under the data directory and ingest them.

    The report has one result per file, in the order given (a repeated file appears twice).
    """
    if not files:
        raise UploadError("No files were uploaded.")
    limit = int(settings.max_file_mb * 2**20)
    for name, data in files:
        if len(data) > limit:
            raise UploadError(f"'{name}' is {len(data) / 2**20:.1f} MB, more than MOERAG_MAX_FILE_MB={settings.max_file_mb:g}.")
    folder = uploads_dir(settings.home, collection)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in files:
        path = folder / safe_name(name, data)
        if not path.exists():
            tmp = path.with_name(path.name + ".part")
            tmp.write_bytes(data)
            tmp.replace(path)  # atomic: an ingest never reads half a file
        paths.append(path)
    unique = list(dict.fromkeys(paths))
    options = IngestOptions(chunk_tokens=settings.chunk_tokens, chunk_overlap=settings.chunk_overlap, max_bytes=limit)
    report = ingest_paths(kb, embedder, unique, collection=collection, options=options, progress=progress)
    by_source = {r.source: r for r in report.results}
    report.results = [by_source[str(p.resolve())] for p in paths]
    return report


def list_documents(kb: KnowledgeBase, collection: str) -> list[dict[str, Any]]:
    """id, source, title, status, error and chunk count of each document, oldest first."""
    with kb.store.session() as session:
        coll = kb.store.collection(session, collection)
        docs = session.scalars(select(Document).where(Document.collection_id == coll.id).order_by(Document.id))
        return [
            {"id": d.id, "source": d.source, "title": d.title, "status": d.status, "error": d.error, "chunks": d.n_chunks}
            for d in docs
        ]


def delete_documents(kb: KnowledgeBase, collection: str, ids: list[int] | None) -> int:
    """Remove documents (chunks, vectors, lexical rows) from a collection, all of them when `ids`
    is None; the index is saved. Unknown ids remove nothing."""
    with kb.write_lock(), kb.store.session() as session:
        coll = kb.store.collection(session, collection)
        if ids is None:
            docs = list(session.scalars(select(Document).where(Document.collection_id == coll.id)))
        else:
            docs = []
            for i in ids:
                doc = session.get(Document, i)
                if doc is None or doc.collection_id != coll.id:
                    raise NotFoundError(f"No document with id {i} in collection '{collection}'. "
                                        "List them with: moerag docs list")
                docs.append(doc)
        for doc in docs:
            kb.store.delete_document(session, doc)
        session.flush()
        kb.save_index(session, coll)
    return len(docs)
