"""The FAISS index of one collection, derived from the SQL store and kept in step with it.

N chunks, D dims. Exact inner product (`IndexIDMap2(IndexFlatIP)`) up to `exact_max` chunks, an
inverted-file index (`IndexIVFFlat`, nlist ~ 4·sqrt(N)) above. Vectors are L2-normalised, so
inner product is cosine. FAISS ids are chunk ids; since SQLite never reuses them
(AUTOINCREMENT), the difference between the ids in the index and in the store says exactly
what to add and remove, and `sync` brings any older index up to the store without re-embedding.

On disk: one `.npz` per collection holding the serialised index, its ids and the store version
it reflects; written to a temporary file and renamed over the old one, so a reader or a crash
sees either the old file or the new one, never half of one.

FAISS allows concurrent searches of one index but nothing alongside an add or a remove, so an
index that others may be searching is never changed: `synced` returns a caught-up copy.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from retrieval.errors import StoreError

log = logging.getLogger(__name__)

# Fewer queries than this are scanned one by one (FAISS's BLAS threshold), on one OpenMP thread.
SMALL_BATCH = 20


@dataclass
class IndexParams:
    exact_max: int = 100_000  # above this many chunks the index becomes approximate (IVF)
    nprobe: int = 32  # IVF lists visited per query: recall against speed


@dataclass
class VectorIndex:
    dim: int
    params: IndexParams = field(default_factory=IndexParams)
    version: int = -1  # store version this index reflects; -1: nothing yet
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # sorted
    index: faiss.Index | None = None
    trained_on: int = 0  # IVF: how many vectors its centroids were trained on

    @property
    def kind(self) -> str:
        return "ivf" if isinstance(self.index, faiss.IndexIVF) else "flat"

    def __len__(self) -> int:
        return len(self.ids)

    # --- building -----------------------------------------------------------------------------

    def rebuild(self, ids: np.ndarray, vecs: np.ndarray, version: int) -> None:
        """Build from scratch: flat when small, IVF (trained on these vectors) when large."""
        if len(ids) > 1 and not (ids[1:] > ids[:-1]).all():  # the store yields them sorted: no copy
            order = np.argsort(ids)
            ids, vecs = ids[order], vecs[order]
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)  # [N, D]
        if len(ids) > self.params.exact_max:
            nlist = int(min(65536, max(64, 4 * math.sqrt(len(ids)))))
            quantizer = faiss.IndexFlatIP(self.dim)
            index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            # k-means needs ~40 points per centroid; more only costs time.
            rng = np.random.default_rng(0)
            sample = vecs[rng.choice(len(vecs), size=min(len(vecs), 64 * nlist), replace=False)]
            index.train(sample)
            self.trained_on = len(ids)
        else:
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
            self.trained_on = 0
        if len(ids):
            index.add_with_ids(vecs, ids)
        self.index, self.ids, self.version = index, ids, version

    def _wants_rebuild(self, n: int) -> bool:
        if self.index is None:
            return True
        if self.kind == "flat":
            return n > self.params.exact_max
        # IVF: back to exact when it shrank well below the threshold; retrain when it grew a lot.
        return n < self.params.exact_max // 2 or n > 4 * self.trained_on

    def sync(self, store_ids: np.ndarray, fetch, version: int) -> tuple[int, int]:
        """Make this index hold exactly `store_ids` (sorted), in place: only for an index no other
        thread can see yet (see `synced`). `fetch(ids)` yields (ids, vecs) batches.

        Returns (added, removed).
        """
        if self._wants_rebuild(len(store_ids)):
            return self._rebuild_from(fetch, version), 0
        missing = np.setdiff1d(store_ids, self.ids, assume_unique=True)
        extra = np.setdiff1d(self.ids, store_ids, assume_unique=True)
        return self._apply(missing, extra, fetch, version)

    def synced(self, store_ids: np.ndarray, fetch, version: int) -> tuple[VectorIndex, int, int]:
        """A copy holding exactly `store_ids`; this index is left as it is, so searches running on
        it meanwhile are safe. Returns (index, added, removed).

        The copy shares the FAISS index when no chunk changed, and clones it before an add or a
        remove (one memcpy of N·D·4 bytes, less than the index file's write costs a writer).
        """
        out = VectorIndex(self.dim, self.params, self.version, self.ids, self.index, self.trained_on)
        if self._wants_rebuild(len(store_ids)):
            return out, out._rebuild_from(fetch, version), 0
        missing = np.setdiff1d(store_ids, self.ids, assume_unique=True)
        extra = np.setdiff1d(self.ids, store_ids, assume_unique=True)
        if len(missing) or len(extra):
            out.index = faiss.clone_index(self.index)
        added, removed = out._apply(missing, extra, fetch, version)
        return out, added, removed

    def _rebuild_from(self, fetch, version: int) -> int:
        batches = list(fetch(None))
        ids = np.concatenate([b[0] for b in batches]) if batches else np.zeros(0, np.int64)
        vecs = np.concatenate([b[1] for b in batches]) if batches else np.zeros((0, self.dim), np.float32)
        self.rebuild(ids, vecs, version)
        return len(ids)

    def _apply(self, missing: np.ndarray, extra: np.ndarray, fetch, version: int) -> tuple[int, int]:
        if len(extra):
            self.index.remove_ids(extra)
        got = [np.zeros(0, np.int64)]
        for ids, vecs in fetch(missing) if len(missing) else ():
            self.index.add_with_ids(np.ascontiguousarray(vecs, dtype=np.float32), ids)
            got.append(ids)
        # What was added, not what was asked for: a chunk deleted between the caller's listing and
        # this fetch is not in the store any more, and the ids must say what the FAISS index holds.
        kept = np.setdiff1d(self.ids, extra, assume_unique=True) if len(extra) else self.ids
        added = np.concatenate(got)
        if not len(added):
            self.ids = kept
        elif not len(kept) or added.min() > kept[-1]:  # new chunks have the largest ids: no sort
            self.ids = np.concatenate([kept, np.sort(added)])
        else:
            self.ids = np.union1d(kept, added)
        self.version = version
        return len(added), len(extra)

    # --- searching ----------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None):
        """Top-k (scores [Q, k], ids [Q, k]) by inner product; id -1 pads when fewer exist."""
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)  # [Q, D]
        if self.index is None or len(self.ids) == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        k = min(k, len(self.ids))
        sel = faiss.IDSelectorBatch(allowed.astype(np.int64)) if allowed is not None else None
        if self.kind == "ivf":
            params = faiss.SearchParametersIVF(sel=sel, nprobe=self.params.nprobe)
        else:
            params = faiss.SearchParameters(sel=sel) if sel is not None else None
        if len(q) >= SMALL_BATCH:
            return self.index.search(q, k, params=params)
        # One query gains nothing from a second OpenMP thread and loses much when another process
        # holds the other core: flat 100k x 384, 7.5 ms on 1 thread, 48 ms on 2 (2 cores, load
        # ~2.5). libgomp keeps the setting per calling thread: concurrent searches do not interfere.
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return self.index.search(q, k, params=params)
        finally:
            faiss.omp_set_num_threads(threads)

    # --- files --------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write atomically: a temporary file in the same folder, fsynced, renamed over `path`."""
        assert self.index is not None
        write_npz_atomically(path, {
            "index": faiss.serialize_index(self.index),
            "ids": self.ids,
            "meta": np.array([self.version, self.dim, self.trained_on], dtype=np.int64),
        })

    @staticmethod
    def saved_version(path: Path) -> int:
        """The store version an index file reflects, read without loading the index."""
        try:
            with np.load(path) as data:
                return int(data["meta"][0])
        except (OSError, KeyError, ValueError, IndexError, zipfile.BadZipFile) as exc:
            raise StoreError(f"The index file {path} is unreadable ({exc}). Rebuild it with: moerag index rebuild") from exc

    @classmethod
    def load(cls, path: Path, params: IndexParams) -> VectorIndex:
        try:
            with np.load(path) as data:
                version, dim, trained_on = (int(v) for v in data["meta"])
                index = faiss.deserialize_index(data["index"])
                ids = data["ids"]
        except (OSError, KeyError, ValueError, RuntimeError, zipfile.BadZipFile) as exc:
            raise StoreError(f"The index file {path} is unreadable ({exc}). Rebuild it with: moerag index rebuild") from exc
        if index.ntotal != len(ids) or index.d != dim:
            raise StoreError(f"The index file {path} is inconsistent. Rebuild it with: moerag index rebuild")
        return cls(dim=dim, params=params, version=version, ids=ids, index=index, trained_on=trained_on)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of `ids` [n] -> [n, D] (used by `moerag index check`); changes an IVF
        index (adds its id map), so only on an index no other thread searches."""
        if self.kind == "ivf":
            self.index.make_direct_map()  # IVF keeps no id -> slot map unless asked
        if not len(ids):
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self.index.reconstruct(int(i)) for i in ids])  # [n, D]


def write_npz_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays to `path` (.npz) so that readers see the old file or the new one, never half:
    a temporary file beside it, fsynced, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
