"""The knowledge base on disk: one home folder with the SQL store, the derived index files and a lock.

Writers (ingest, delete, rebuild) hold the write lock, one at a time across processes; readers
never take it. A reader's FAISS and BM25 indexes are brought up to the store's version before
every search, so it sees what a writer committed a moment ago, without a restart.

Threads of one process (the API's threadpool) share the indexes, copy-on-write:
- A published index (in `_indexes` / `_lexical`) is never changed. A search takes a reference
  and uses it without any lock, however long, while a newer one is built beside it.
- Catching up builds a new index (`VectorIndex.synced`, `LexicalIndex.synced`) under a lock of
  its collection and kind, so one thread does the work and others that need the same version
  wait for it; searches whose version is already published never wait.
- An index is published under that lock, replacing an older one only: a lagging thread never
  puts back a stale index. A writer's index (of its uncommitted transaction) is published only
  once that transaction committed, so no reader ranks what might still be rolled back.
- Ids come from the store: a chunk removed between ranking and reading its row is dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout
from sqlalchemy import event, func, select, text
from sqlalchemy.orm import Session

from retrieval.bm25 import LexicalIndex, expected_postings, fts_rows, fts_tokenizer
from retrieval.errors import LockedError, StoreError
from retrieval.index import IndexParams, VectorIndex
from retrieval.store import Chunk, Collection, Document, Store

log = logging.getLogger(__name__)


@dataclass
class CheckReport:
    collection: str
    chunks: int
    index_chunks: int
    store_version: int
    index_version: int
    kind: str
    problems: list[str]
    notes: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


class KnowledgeBase:
    def __init__(self, home: Path, *, database_url: str | None = None, index_params: IndexParams | None = None):
        self.home = Path(home).expanduser()
        self.home.mkdir(parents=True, exist_ok=True)
        self.store = Store(database_url or f"sqlite:///{self.home / 'moerag.db'}")
        self.index_params = index_params or IndexParams()
        # Published indexes by collection id: immutable once here, replaced whole (see the docstring).
        self._indexes: dict[int, VectorIndex] = {}
        self._lexical: dict[int, LexicalIndex] = {}
        self._locks: dict[tuple[str, int], threading.Lock] = {}  # (kind, collection id) -> catch-up lock
        self._locks_guard = threading.Lock()
        self._seen_files: dict[Path, tuple[int, int]] = {}  # index file -> (mtime_ns, version) when last looked at

    def _catch_up_lock(self, kind: str, coll_id: int) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault((kind, coll_id), threading.Lock())

    def _publish(self, coll_id: int, vi: VectorIndex) -> None:
        """Make `vi` the index searches use, unless a newer one is there already."""
        with self._catch_up_lock("faiss", coll_id):
            self._replace_if_newer(coll_id, vi)

    def _replace_if_newer(self, coll_id: int, vi: VectorIndex) -> None:
        """Call with the collection's "faiss" lock held."""
        current = self._indexes.get(coll_id)
        if current is None or current.dim != vi.dim or current.version < vi.version:
            self._indexes[coll_id] = vi

    # --- writing ------------------------------------------------------------------------------

    @contextmanager
    def write_lock(self, *, timeout: float = 0) -> Iterator[None]:
        """One writer at a time, across processes."""
        lock = FileLock(str(self.home / "write.lock"))
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            # No path: this message reaches API clients, who have no business knowing the data directory.
            raise LockedError(
                "Another moerag process is writing to the knowledge base (an ingest, delete or rebuild). "
                "Wait for it to finish and try again; searches keep working meanwhile."
            ) from None
        try:
            yield
        finally:
            lock.release()

    # --- the FAISS index ----------------------------------------------------------------------

    def index_path(self, coll: Collection) -> Path:
        return self.home / "index" / f"collection-{coll.id}.npz"

    def vector_index(self, session: Session, coll: Collection) -> VectorIndex:
        """The collection's index at the session's version of the store or later; never changed
        after it is returned (a later catch-up makes a new one)."""
        vi = self._indexes.get(coll.id)
        if vi is not None and vi.dim == coll.dim and vi.version >= coll.version:
            return vi
        with self._catch_up_lock("faiss", coll.id):
            vi = self._indexes.get(coll.id)  # another thread may have caught up while this one waited
            if vi is None or vi.dim != coll.dim or vi.version < coll.version:
                vi = self._caught_up(session, coll, vi)
                self._replace_if_newer(coll.id, vi)
            return vi

    def _caught_up(self, session: Session, coll: Collection, vi: VectorIndex | None) -> VectorIndex:
        """An index of what `session` sees of the collection, built from `vi` (left unchanged),
        from a newer file another process saved, or from the stored vectors."""
        path = self.index_path(coll)
        if vi is None or vi.dim != coll.dim:
            fresh: VectorIndex | None = self._open(path, coll)
        else:
            fresh = self._newer_file(path, vi.version, coll.version)
        store_ids = self.store.chunk_ids(session, coll)
        fetch = lambda ids: self.store.vectors(session, coll, ids)  # noqa: E731
        if fresh is not None:
            # A file is diffed with the store even at the same version: a writer that saved and then
            # rolled back leaves a file whose version a later commit reuses. Nobody sees `fresh` yet.
            vi = fresh
            added, removed = vi.sync(store_ids, fetch, coll.version)
        else:
            vi, added, removed = vi.synced(store_ids, fetch, coll.version)
        if added or removed:
            log.info("index of '%s' caught up with the store: +%d -%d chunks", coll.name, added, removed)
        return vi

    def _newer_file(self, path: Path, have: int, want: int) -> VectorIndex | None:
        """The index file, when a writer (of another process) saved one ahead of `have` and not
        beyond `want`: loading it spares fetching every changed vector (or retraining an IVF index)."""
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            return None
        seen = self._seen_files.get(path)
        if seen is not None and seen[0] == mtime and not have < seen[1] <= want:
            return None
        try:
            version = VectorIndex.saved_version(path)
            self._seen_files[path] = (mtime, version)
            if have < version <= want:
                return VectorIndex.load(path, self.index_params)
        except StoreError:
            pass  # being replaced, or damaged: the store has everything
        return None

    def _open(self, path: Path, coll: Collection) -> VectorIndex:
        if path.exists():
            try:
                vi = VectorIndex.load(path, self.index_params)
                if vi.dim == coll.dim:
                    return vi
                log.warning("index file %s has %d dims, the collection %d: rebuilding", path, vi.dim, coll.dim)
            except StoreError as exc:
                log.warning("%s — rebuilding it from the store", exc)
        return VectorIndex(dim=coll.dim, params=self.index_params)

    def save_index(self, session: Session, coll: Collection) -> VectorIndex:
        """Bring the index up to what `session` sees and write it; call with the write lock held.

        The index goes to the readers of this process when the session commits, not before: until
        then it holds changes that may yet be rolled back.
        """
        with self._catch_up_lock("faiss", coll.id):
            vi = self._indexes.get(coll.id)
            if vi is None or vi.dim != coll.dim or vi.version != coll.version:
                vi = self._caught_up(session, coll, vi)
            if vi.index is None:  # an empty collection that never had an index
                vi = VectorIndex(dim=coll.dim, params=self.index_params)
                vi.rebuild(np.zeros(0, np.int64), np.zeros((0, coll.dim), np.float32), coll.version)
            self._save(vi, coll)
        event.listen(session, "after_commit", lambda _s, cid=coll.id, v=vi: self._publish(cid, v), once=True)
        return vi

    def _save(self, vi: VectorIndex, coll: Collection) -> None:
        path = self.index_path(coll)
        # The write lock is held, so any temporary file beside the index is a killed writer's.
        for stale in path.parent.glob(path.name + "*.tmp"):
            stale.unlink(missing_ok=True)
        vi.save(path)
        try:  # this process knows what it wrote: no need to read it back
            self._seen_files[path] = (path.stat().st_mtime_ns, vi.version)
        except FileNotFoundError:
            pass

    def rebuild_index(self, session: Session, coll: Collection) -> VectorIndex:
        """Rebuild from the stored vectors (no re-embedding) and replace the file and the published
        index (searches meanwhile keep the old one); call with the write lock held."""
        vi = VectorIndex(dim=coll.dim, params=self.index_params)
        vi.sync(self.store.chunk_ids(session, coll), lambda ids: self.store.vectors(session, coll, ids), coll.version)
        if vi.index is None:
            vi.rebuild(np.zeros(0, np.int64), np.zeros((0, coll.dim), np.float32), coll.version)
        with self._catch_up_lock("faiss", coll.id):
            self._save(vi, coll)
            self._indexes[coll.id] = vi  # replaces one of the same version: the point of a rebuild
        if self.store.is_sqlite:  # the BM25 index too, from the FTS5 table
            with self._catch_up_lock("bm25", coll.id):
                self._lexical.pop(coll.id, None)
                self.lexical_path(coll).unlink(missing_ok=True)
            self.lexical_index(session, coll)
        return vi

    def drop_index(self, coll: Collection) -> None:
        with self._catch_up_lock("faiss", coll.id):
            self._indexes.pop(coll.id, None)
            self.index_path(coll).unlink(missing_ok=True)
        with self._catch_up_lock("bm25", coll.id):
            self._lexical.pop(coll.id, None)
            self.lexical_path(coll).unlink(missing_ok=True)

    # --- the BM25 index -----------------------------------------------------------------------

    def lexical_path(self, coll: Collection) -> Path:
        return self.home / "index" / f"collection-{coll.id}.bm25.npz"

    def lexical_index(self, session: Session, coll: Collection) -> LexicalIndex:
        """The collection's BM25 index (SQLite stores), brought up to the store's current version.

        Derived from the FTS5 table; kept in a file only to spare the next process a first
        build (seconds at 100k chunks), written whenever its largest segment was rebuilt.
        """
        li = self._lexical.get(coll.id)
        if li is not None and li.version >= coll.version:
            return li
        with self._catch_up_lock("bm25", coll.id):
            li = self._lexical.get(coll.id)  # another thread may have caught up while this one waited
            if li is not None and li.version >= coll.version:
                return li
            if li is None:
                li = self._open_lexical(session, coll)
            if li.version != coll.version:
                largest = li.segments[0] if li.segments else None
                # A new object: searches holding the old one keep a consistent view.
                li, added, removed = li.synced(
                    self.store.chunk_ids(session, coll), lambda ids: fts_rows(session, ids), coll.version
                )
                log.info("BM25 index of '%s' caught up with the store: +%d -%d chunks", coll.name, added, removed)
                if li.segments and li.segments[0] is not largest:
                    self._save_lexical(li, coll)
            current = self._lexical.get(coll.id)
            if current is None or current.version < li.version:
                self._lexical[coll.id] = li
        return li

    def _open_lexical(self, session: Session, coll: Collection) -> LexicalIndex:
        spec = fts_tokenizer(session)
        path = self.lexical_path(coll)
        if path.exists():
            try:
                li = LexicalIndex.load(path)
                if li.spec == spec:
                    return li  # any generation will do: `synced` diffs its chunk ids with the store's
                log.warning("BM25 index file %s was built with tokenizer '%s', the table uses '%s': rebuilding",
                            path, li.spec, spec)
            except StoreError as exc:
                log.warning("%s", exc)
        return LexicalIndex(spec)

    def _save_lexical(self, li: LexicalIndex, coll: Collection) -> None:
        path = self.lexical_path(coll)
        # Readers write this file without the write lock; a temporary file an hour old is a killed one's.
        for stale in path.parent.glob(path.name + "*.tmp"):
            if stale.stat().st_mtime < time.time() - 3600:
                stale.unlink(missing_ok=True)
        try:
            li.save(path)
        except OSError as exc:  # a read-only home still searches; the next process builds again
            log.warning("Cannot save the BM25 index to %s: %s", path, exc)

    # --- checking -----------------------------------------------------------------------------

    def check(self, session: Session, coll: Collection, *, sample: int = 256) -> CheckReport:
        """Compare the index file and the lexical index with the store; say what disagrees.

        An index file that is merely behind the store (an ingest was killed before saving it) is
        not a disagreement: every id it holds still has the same vector, and it is caught up on the
        next open. Anything else is.
        """
        problems: list[str] = []
        notes: list[str] = []
        store_ids = self.store.chunk_ids(session, coll)
        path = self.index_path(coll)
        vi: VectorIndex | None = None
        if not path.exists():
            if len(store_ids):
                notes.append(
                    f"no index file yet at {path} (an ingest stopped before saving it); "
                    "it is built from the stored vectors on the next open"
                )
        else:
            try:
                vi = VectorIndex.load(path, self.index_params)
            except StoreError as exc:
                problems.append(str(exc))
        if vi is not None:
            if vi.dim != coll.dim:
                problems.append(f"index has {vi.dim} dims, the collection {coll.dim}")
            missing = np.setdiff1d(store_ids, vi.ids)
            extra = np.setdiff1d(vi.ids, store_ids)
            if vi.version > coll.version:
                problems.append(f"index file is from version {vi.version}, newer than the store's {coll.version}")
            elif vi.version == coll.version and (len(missing) or len(extra)):
                problems.append(
                    f"index and store are at the same version but differ: {len(missing)} chunks missing "
                    f"from the index, {len(extra)} chunks in the index that the store no longer has"
                )
            elif vi.version < coll.version:
                notes.append(
                    f"index file is behind the store (version {vi.version} < {coll.version}: "
                    f"{len(missing)} to add, {len(extra)} to remove); it is caught up on the next open"
                )
            # The vectors it holds must be the stored ones.
            common = np.intersect1d(vi.ids, store_ids)
            if len(common) and vi.dim == coll.dim:
                rng = np.random.default_rng(0)
                probe = np.sort(rng.choice(common, size=min(sample, len(common)), replace=False))
                stored = np.concatenate([v for _, v in self.store.vectors(session, coll, probe)])
                held = vi.reconstruct(probe)
                bad = int((np.abs(held - stored).max(axis=1) > 1e-5).sum())
                if bad:
                    problems.append(f"{bad} of {len(probe)} sampled vectors in the index differ from the store")
        if self.store.is_sqlite:
            problems += self._check_lexical(session, coll, len(store_ids))
            lex_problems, lex_notes = self._check_lexical_file(session, coll, store_ids, sample=min(sample, 32))
            problems += lex_problems
            notes += lex_notes
        problems += self._check_documents(session, coll)
        return CheckReport(
            collection=coll.name,
            chunks=len(store_ids),
            index_chunks=len(vi.ids) if vi is not None else 0,
            store_version=coll.version,
            index_version=vi.version if vi is not None else -1,
            kind=vi.kind if vi is not None else "none",
            problems=problems,
            notes=notes,
        )

    def _check_lexical(self, session: Session, coll: Collection, n_chunks: int) -> list[str]:
        n_fts = session.scalar(
            text("SELECT count(*) FROM chunks_fts f JOIN chunks c ON c.id = f.rowid WHERE c.collection_id = :c"),
            {"c": coll.id},
        )
        orphans = session.scalar(
            text("SELECT count(*) FROM chunks_fts WHERE rowid NOT IN (SELECT id FROM chunks)")
        )
        out = []
        if n_fts != n_chunks:
            out.append(f"lexical index holds {n_fts} of the collection's {n_chunks} chunks")
        if orphans:
            out.append(f"lexical index holds {orphans} rows for chunks that no longer exist")
        return out

    def _check_lexical_file(
        self, session: Session, coll: Collection, store_ids: np.ndarray, *, sample: int
    ) -> tuple[list[str], list[str]]:
        """The BM25 index file against the store, as the FAISS file: version, chunk ids, sampled postings."""
        path = self.lexical_path(coll)
        if not path.exists():
            return [], []
        try:
            li = LexicalIndex.load(path)
        except StoreError as exc:
            return [f"{exc}. Or rebuild it now with: moerag index rebuild"], []
        problems, notes = [], []
        held = li.ids
        missing = np.setdiff1d(store_ids, held)
        extra = np.setdiff1d(held, store_ids)
        if li.version > coll.version:
            problems.append(f"BM25 index file is from version {li.version}, newer than the store's {coll.version}")
        elif li.version == coll.version and (len(missing) or len(extra)):
            problems.append(f"BM25 index file and store are at the same version but differ: {len(missing)} chunks "
                            f"missing from it, {len(extra)} chunks in it that the store no longer has")
        elif li.version < coll.version:
            notes.append(f"BM25 index file is behind the store (version {li.version} < {coll.version}); "
                         "it is caught up on the next search")
        common = np.intersect1d(held, store_ids)
        if len(common):
            probe = np.sort(np.random.default_rng(0).choice(common, size=min(sample, len(common)), replace=False))
            bad = sum(li.postings_of(row[0]) != expected_postings(li.spec, row) for row in fts_rows(session, probe))
            if bad:
                problems.append(f"{bad} of {len(probe)} sampled chunks have other terms in the BM25 index file "
                                "than in the FTS5 table. Rebuild it with: moerag index rebuild")
        return problems, notes

    def _check_documents(self, session: Session, coll: Collection) -> list[str]:
        counted = (
            select(Document.id, Document.n_chunks, func.count(Chunk.id).label("n"))
            .outerjoin(Chunk, Chunk.document_id == Document.id)
            .where(Document.collection_id == coll.id)
            .group_by(Document.id)
        )
        bad = [r for r in session.execute(counted) if r.n_chunks != r.n]
        return [f"{len(bad)} documents record a chunk count that differs from their stored chunks"] if bad else []

