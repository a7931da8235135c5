"""The FAISS index: exact and approximate kinds, catching up with the store, atomic files."""

from pathlib import Path

import numpy as np
import pytest

from retrieval.errors import StoreError
from retrieval.index import IndexParams, VectorIndex

D = 32


def unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class FakeStore:
    """Vectors by id; `fetch(None)` yields every id the store currently holds, like the SQL store."""

    def __init__(self, ids: np.ndarray, vecs: np.ndarray):
        self.lookup = dict(zip(ids.tolist(), vecs))
        self.current = ids

    def sync(self, vi: VectorIndex, ids: np.ndarray, version: int):
        self.current = ids
        return vi.sync(ids, self.fetch, version)

    def fetch(self, ids):
        ids = self.current if ids is None else ids
        yield ids, np.stack([self.lookup[int(i)] for i in ids])


def exact_top(vecs, ids, q, k):
    order = np.argsort(-(vecs @ q))[:k]
    return ids[order]


@pytest.mark.parametrize("exact_max", [10_000, 100])  # flat, then IVF (300 vectors > 100)
def test_sync_adds_and_removes_exactly_the_difference(exact_max):
    ids = np.arange(1, 301, dtype=np.int64)
    vecs = unit(300, 0)
    store = FakeStore(ids, vecs)
    vi = VectorIndex(dim=D, params=IndexParams(exact_max=exact_max, nprobe=10_000))
    store.sync(vi, ids[:200], version=1)
    assert len(vi) == 200 and vi.kind == ("ivf" if exact_max == 100 else "flat")

    keep = np.setdiff1d(ids[:250], np.arange(50, 80))  # remove 30, add 50
    added, removed = store.sync(vi, keep, version=2)
    assert (added, removed) == (50, 30)
    assert vi.index.ntotal == len(keep) and vi.version == 2

    # Every query's top 5 equals brute force over exactly the kept vectors: deleted ones never come back.
    kv = vecs[keep - 1]
    for q in unit(20, 1):
        _, got = vi.search(q[None], 5)
        assert list(got[0]) == list(exact_top(kv, keep, q, 5))


def test_crossing_the_threshold_switches_to_ivf_and_back():
    ids = np.arange(1, 501, dtype=np.int64)
    vecs = unit(500, 2)
    store = FakeStore(ids, vecs)
    vi = VectorIndex(dim=D, params=IndexParams(exact_max=300))
    store.sync(vi, ids[:200], version=1)
    assert vi.kind == "flat"
    store.sync(vi, ids, version=2)
    assert vi.kind == "ivf" and vi.index.ntotal == 500
    store.sync(vi, ids[:100], version=3)
    assert vi.kind == "flat" and vi.index.ntotal == 100


def test_allowed_ids_filter_results():
    ids = np.arange(1, 101, dtype=np.int64)
    vecs = unit(100, 3)
    vi = VectorIndex(dim=D)
    FakeStore(ids, vecs).sync(vi, ids, version=1)
    allowed = np.array([5, 17, 42], dtype=np.int64)
    _, got = vi.search(vecs[0][None], 10, allowed=allowed)
    assert set(got[0][got[0] >= 0]) == {5, 17, 42}


def test_save_is_atomic_and_load_roundtrips(tmp_path: Path):
    ids = np.arange(1, 51, dtype=np.int64)
    vecs = unit(50, 4)
    vi = VectorIndex(dim=D)
    FakeStore(ids, vecs).sync(vi, ids, version=7)
    path = tmp_path / "index" / "c.npz"
    vi.save(path)
    vi.save(path)  # overwrite in place
    assert [p.name for p in path.parent.iterdir()] == ["c.npz"]  # no temporary files left behind
    back = VectorIndex.load(path, IndexParams())
    assert back.version == 7 and list(back.ids) == list(ids)
    np.testing.assert_allclose(back.reconstruct(ids[:5]), vecs[:5], atol=1e-6)


def test_unreadable_file_says_how_to_fix(tmp_path: Path):
    path = tmp_path / "bad.npz"
    path.write_bytes(b"not an index")
    with pytest.raises(StoreError, match="moerag index rebuild"):
        VectorIndex.load(path, IndexParams())
