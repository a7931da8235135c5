"""The SQL store: collections, documents and chunks (with their vectors) — the source of truth.

Everything derived (the FAISS index, the FTS5 lexical index) can be rebuilt from these rows.
Every change to a collection's chunks bumps `Collection.version` in the same transaction, so a
derived index that remembers the version it was built at knows when it is stale.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from sqlalchemy import (
    ForeignKey,
    Index,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, defer, mapped_column, relationship, sessionmaker

from retrieval.errors import EmbeddingMismatchError, NotFoundError, StoreError

log = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Collection(Base):
    __tablename__ = "collections"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    embed_model: Mapped[str] = mapped_column(String(500))
    dim: Mapped[int]
    version: Mapped[int] = mapped_column(default=0)  # bumped on every chunk change
    created_at: Mapped[datetime] = mapped_column(default=_now)

    documents: Mapped[list[Document]] = relationship(back_populates="collection", cascade="all, delete-orphan")


class Document(Base):
    __tablename__ = "documents"
    __table_args__ = (UniqueConstraint("collection_id", "source"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"), index=True)
    source: Mapped[str] = mapped_column(String(4000))  # absolute path for files, record id otherwise
    title: Mapped[str] = mapped_column(String(1000), default="")
    doc_type: Mapped[str] = mapped_column(String(50), default="")
    sha256: Mapped[str] = mapped_column(String(64), default="")
    size: Mapped[int] = mapped_column(default=0)
    mtime: Mapped[float] = mapped_column(default=0.0)
    status: Mapped[str] = mapped_column(String(10), default="ok")  # ok | failed
    error: Mapped[str | None] = mapped_column(Text, default=None)
    text: Mapped[str | None] = mapped_column(Text, default=None)  # chunk offsets point into this
    n_chunks: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(default=_now)
    updated_at: Mapped[datetime] = mapped_column(default=_now, onupdate=_now)

    collection: Mapped[Collection] = relationship(back_populates="documents")
    chunks: Mapped[list[Chunk]] = relationship(
        back_populates="document", cascade="all, delete-orphan", passive_deletes=True, order_by="Chunk.ordinal"
    )


class Chunk(Base):
    __tablename__ = "chunks"
    # AUTOINCREMENT: ids are never reused, so "which ids does the index hold" is an exact diff.
    __table_args__ = (Index("ix_chunks_collection", "collection_id", "id"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(primary_key=True)
    document_id: Mapped[int] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"), index=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"))
    ordinal: Mapped[int]
    text: Mapped[str] = mapped_column(Text)
    page: Mapped[int | None] = mapped_column(default=None)
    heading: Mapped[str | None] = mapped_column(Text, default=None)
    start: Mapped[int]
    end: Mapped[int]
    n_tokens: Mapped[int] = mapped_column(default=0)
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32 [dim], L2-normalised

    document: Mapped[Document] = relationship(back_populates="chunks")


# The lexical index: one FTS5 row per chunk (rowid = chunk id), written in the same transaction
# as the chunk, so it can never disagree with the store.
_FTS_DDL = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5("
    "title, heading, body, tokenize = 'porter unicode61 remove_diacritics 2')"
)

# Per-term document frequencies of the lexical index (read to drop near-universal query terms).
_VOCAB_DDL = "CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts_vocab USING fts5vocab(chunks_fts, row)"


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers keep working while a writer commits
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


class Store:
    """A connection to the SQL store, with the few queries the rest of moerag needs."""

    def __init__(self, url: str):
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite and ":memory:" not in url:
            Path(url.split("///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.engine: Engine = create_engine(url)
            if self.is_sqlite:
                event.listen(self.engine, "connect", _sqlite_pragmas)
            Base.metadata.create_all(self.engine)
            if self.is_sqlite:
                with self.engine.begin() as conn:
                    conn.execute(text(_FTS_DDL))
                    conn.execute(text(_VOCAB_DDL))
        except SQLAlchemyError as exc:
            raise StoreError(f"Cannot open the database at {url}: {exc.__class__.__name__}: {exc}") from exc
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed when the block ends, rolled back on any exception."""
        with self._sessions() as session:
            try:
                yield session
                session.commit()
            except OperationalError as exc:
                session.rollback()
                raise StoreError(f"Database error ({self.url}): {exc.orig}") from exc
            except BaseException:
                session.rollback()
                raise

    # --- collections -----------------------------------------------------------------------

    def collection(self, session: Session, name: str) -> Collection:
        coll = session.scalar(select(Collection).where(Collection.name == name))
        if coll is None:
            names = ", ".join(self.collection_names(session)) or "none yet"
            raise NotFoundError(
                f"No collection named '{name}' (collections: {names}). Create it with: moerag ingest PATH --collection {name}"
            )
        return coll

    def collection_names(self, session: Session) -> list[str]:
        return list(session.scalars(select(Collection.name).order_by(Collection.name)))

    def get_or_create_collection(self, session: Session, name: str, *, embed_model: str, dim: int) -> Collection:
        coll = session.scalar(select(Collection).where(Collection.name == name))
        if coll is None:
            coll = Collection(name=name, embed_model=embed_model, dim=dim)
            session.add(coll)
            session.flush()
            return coll
        check_embedder(coll, embed_model=embed_model, dim=dim)
        return coll

    # --- documents and chunks --------------------------------------------------------------

    def documents(self, session: Session, coll: Collection, *, sources: Sequence[str] | None = None) -> list[Document]:
        """The collection's documents, oldest (lowest id) first; with `sources`, only those whose
        source is one of them. The one query that lists documents (document lists in the CLI, API
        and UI; pruning; emptying a collection). Their texts stay in the database unless read: a
        listing never needs them."""
        query = select(Document).where(Document.collection_id == coll.id).options(defer(Document.text)).order_by(Document.id)
        if sources is not None:
            query = query.where(Document.source.in_(sources))
        return list(session.scalars(query))

    def document_by_source(self, session: Session, coll: Collection, source: str) -> Document | None:
        return session.scalar(select(Document).where(Document.collection_id == coll.id, Document.source == source))

    def replace_chunks(
        self, session: Session, coll: Collection, doc: Document, chunks: list[dict], vectors: np.ndarray
    ) -> None:
        """Drop the document's old chunks and write new ones (with FTS rows); bump the version."""
        self.delete_chunks(session, doc)
        rows = [
            Chunk(document_id=doc.id, collection_id=coll.id, ordinal=i, vector=vectors[i].astype(np.float32).tobytes(), **c)
            for i, c in enumerate(chunks)
        ]
        session.add_all(rows)
        session.flush()  # assigns ids
        if self.is_sqlite and rows:
            session.execute(
                text("INSERT INTO chunks_fts(rowid, title, heading, body) VALUES (:id, :title, :heading, :body)"),
                [{"id": r.id, "title": doc.title or "", "heading": r.heading or "", "body": r.text} for r in rows],
            )
        doc.n_chunks = len(rows)
        coll.version += 1

    def delete_chunks(self, session: Session, doc: Document) -> int:
        if doc.id is None:
            return 0
        ids = list(session.scalars(select(Chunk.id).where(Chunk.document_id == doc.id)))
        if not ids:
            return 0
        if self.is_sqlite:
            session.execute(text("DELETE FROM chunks_fts WHERE rowid = :id"), [{"id": i} for i in ids])
        session.execute(Chunk.__table__.delete().where(Chunk.document_id == doc.id))
        session.expire(doc, ["chunks"])
        doc.n_chunks = 0
        doc.collection.version += 1
        return len(ids)

    def delete_document(self, session: Session, doc: Document) -> None:
        self.delete_chunks(session, doc)
        session.delete(doc)

    def chunk_ids(self, session: Session, coll: Collection) -> np.ndarray:
        ids = session.scalars(select(Chunk.id).where(Chunk.collection_id == coll.id).order_by(Chunk.id))
        return np.fromiter(ids, dtype=np.int64)

    def vectors(self, session: Session, coll: Collection, ids: np.ndarray | None = None, *, batch: int = 20000):
        """Yield (ids [n], vectors [n, dim]) in batches: all of the collection's, or just `ids`."""
        def rows_to_arrays(rows):
            got_ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), coll.dim)
            return got_ids, vecs

        if ids is None:
            last = 0
            while True:
                rows = session.execute(
                    select(Chunk.id, Chunk.vector)
                    .where(Chunk.collection_id == coll.id, Chunk.id > last)
                    .order_by(Chunk.id)
                    .limit(batch)
                ).all()
                if not rows:
                    return
                last = rows[-1][0]
                yield rows_to_arrays(rows)
        else:
            for i in range(0, len(ids), batch):
                part = [int(x) for x in ids[i : i + batch]]
                rows = session.execute(
                    select(Chunk.id, Chunk.vector).where(Chunk.id.in_(part)).order_by(Chunk.id)
                ).all()
                if rows:
                    yield rows_to_arrays(rows)

    def count_chunks(self, session: Session, coll: Collection) -> int:
        return session.scalar(select(func.count(Chunk.id)).where(Chunk.collection_id == coll.id)) or 0


def check_embedder(coll: Collection, *, embed_model: str, dim: int) -> None:
    """Refuse to mix vectors from two embedding models in one collection."""
    if coll.embed_model != embed_model or coll.dim != dim:
        raise EmbeddingMismatchError(
            f"Collection '{coll.name}' was built with embedding model '{coll.embed_model}' ({coll.dim} dims), "
            f"but the configured model is '{embed_model}' ({dim} dims). Either set MOERAG_EMBED_MODEL="
            f"'{coll.embed_model}', or re-index into a new collection: moerag ingest PATH --collection NEW_NAME "
            f"(then remove the old one with: moerag docs rm --all --collection {coll.name})."
        )
