"""Search latency at 100k chunks and approximate-index recall at 1M vectors, against their floors.

    .venv/bin/python bench/search.py [--quick] [--uniform]

Targets (issue): search p50 <= 30 ms at 100k chunks (dense, bm25, hybrid; query embedding
included); at 1M chunks the IVF index keeps recall@10 >= 0.95 against exact search with
p50 <= 50 ms on 2 cores.

Part 1 writes a real knowledge base through the store (SQL rows + FTS5 + FAISS file): SciFact
abstracts cut into ~200-word passages, 5,000 of them embedded for real (cached in /tmp), each
repeated 20 times with word drops/swaps and a little vector noise. Floors and baselines in the
same run: one query through the raw SentenceTransformer, numpy brute force over the same [N, D]
matrix (one pass over N*D*4 bytes: the memory-bandwidth floor of exact dense search), FAISS on
two OpenMP threads (before), and FTS5's own bm25() top-k for the same words (before: the
in-memory BM25 index returns exactly its ranking). Also the BM25 index's first build, file and memory.
Part 2 times `VectorIndex` alone on 1M synthetic unit vectors drawn from a Gaussian mixture
whose centres are the real passage embeddings; exact numpy search is the baseline.
`--uniform` repeats part 2 on uniform vectors on the sphere (no structure: the worst case).

N chunks/vectors, D dims, Q queries, C mixture centres.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

# `python bench/search.py` puts bench/ first on sys.path, where bench/ingest.py shadows the
# ingest package; drop it so the script runs that way as well as `python -m bench.search`.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

from ingest.embedder import get_embedder
from retrieval.bm25 import LexicalIndex, fts_rows, fts_tokenizer, tokenizer
from retrieval.index import IndexParams, VectorIndex
from retrieval.kb import KnowledgeBase
from retrieval.bm25 import WEIGHTS as BM25_WEIGHTS
from retrieval.search import _hydrate, bm25_ids, fts_query, query_words, rrf, search
from retrieval.store import Document

SCIFACT = Path(__file__).resolve().parents[1].parent / "shared" / "eval" / "scifact"
CACHE = Path("/tmp/moerag-bench-search")
WORDS_PER_PASSAGE = 200
REPLICAS = 20  # each real passage appears this many times (the first unchanged)
REPLICA_COS = 0.95  # cosine between a passage's vector and a perturbed copy's
DOC_ABSTRACTS = 8  # abstracts per document (~11 chunks, a short paper); one each makes 90k tiny documents
K, POOL = 10, 100  # hits returned; candidates per retriever in hybrid (search()'s default pool)
TARGET_MS = {"search": 30.0, "ann": 50.0}
TARGET_RECALL = 0.95


@dataclass
class Sizes:
    base: int  # real passages embedded
    queries: int
    warmup: int
    ann_n: int  # part 2 vectors
    ann_queries: int
    nprobes: tuple[int, ...]


FULL = Sizes(base=5000, queries=200, warmup=20, ann_n=1_000_000, ann_queries=200, nprobes=(8, 16, 32, 64))
QUICK = Sizes(base=500, queries=50, warmup=5, ann_n=100_000, ann_queries=50, nprobes=(8, 16, 32, 64))


# --- data ----------------------------------------------------------------------------------------


def passages(n: int) -> list[tuple[str, str, str]]:
    """The first `n` SciFact passages as (abstract id, title, text): abstracts cut into ~200-word pieces."""
    out = []
    for line in open(SCIFACT / "corpus.jsonl"):
        rec = json.loads(line)
        words = rec["text"].split()
        parts = max(1, round(len(words) / WORDS_PER_PASSAGE))
        for piece in np.array_split(np.array(words, dtype=object), parts):
            out.append((rec["_id"], rec["title"], " ".join(piece)))
            if len(out) == n:
                return out
    return out


def base_vectors(embedder, texts: list[str]) -> np.ndarray:
    """Real embeddings of `texts` [n, D], cached in /tmp: embedding 5,000 passages takes minutes on 2 cores."""
    key = hashlib.sha256("\n".join(texts).encode() + embedder.name.encode()).hexdigest()[:16]
    path = CACHE / f"base-{len(texts)}-{key}.npy"
    if path.exists():
        return np.load(path)
    vecs = embedder.encode(texts)  # [n, D]
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, vecs)
    return vecs


def vary_text(text: str, rng: np.random.Generator) -> str:
    """Drop ~10% of the words and swap ~5% of neighbouring pairs: same vocabulary, other term counts."""
    words = [w for w, keep in zip(text.split(), rng.random(len(text.split())) >= 0.1) if keep] or text.split()
    for i in rng.integers(0, max(1, len(words) - 1), size=len(words) // 20):
        words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


def jitter(vecs: np.ndarray, cos: float, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors at about cosine `cos` from `vecs` [n, D]: add isotropic noise, renormalise."""
    # |noise| = s with s^2 = 1/cos^2 - 1 makes cos(v, v + noise) ~ 1/sqrt(1 + s^2) = cos in high D.
    s = math.sqrt(1 / cos**2 - 1)
    out = vecs + rng.standard_normal(vecs.shape, dtype=np.float32) * np.float32(s / math.sqrt(vecs.shape[1]))
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out.astype(np.float32, copy=False)


def queries(n: int) -> list[str]:
    return [json.loads(line)["text"] for _, line in zip(range(n), open(SCIFACT / "queries.jsonl"))]


# --- timing helpers ------------------------------------------------------------------------------


def ms(ts: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(ts) * 1e3, q))


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


# --- part 1: a 100k-chunk knowledge base ---------------------------------------------------------


def build_kb(home: Path, embedder, ps: list[tuple[str, str, str]], vecs: np.ndarray) -> tuple[KnowledgeBase, np.ndarray, dict]:
    """Write len(ps) * REPLICAS chunks through the store; returns the kb, the [N, D] matrix, stats."""
    rng = np.random.default_rng(0)
    by_abstract: dict[str, list[int]] = {}
    for i, (aid, _, _) in enumerate(ps):
        by_abstract.setdefault(aid, []).append(i)
    aids = list(by_abstract)
    groups = {aids[j]: [i for a in aids[j : j + DOC_ABSTRACTS] for i in by_abstract[a]]
              for j in range(0, len(aids), DOC_ABSTRACTS)}  # document -> its passages
    kb = KnowledgeBase(home)
    all_vecs = np.empty((len(ps) * REPLICAS, vecs.shape[1]), np.float32)  # [N, D] in chunk-id order
    n, n_docs = 0, 0
    t0 = time.perf_counter()
    with kb.store.session() as session:
        kb.store.get_or_create_collection(session, "bench", embed_model=embedder.name, dim=vecs.shape[1])
    items = [(r, aid, idxs) for r in range(REPLICAS) for aid, idxs in groups.items()]
    for b in range(0, len(items), 500):  # one transaction per 500 documents
        with kb.store.session() as session:
            coll = kb.store.collection(session, "bench")
            docs = []
            for r, aid, idxs in items[b : b + 500]:
                texts = [ps[i][2] if r == 0 else vary_text(ps[i][2], rng) for i in idxs]
                body = "\n\n".join(texts)
                doc = Document(collection_id=coll.id, source=f"scifact/{aid}/r{r}", title=ps[idxs[0]][1], doc_type="txt",
                               text=body, size=len(body), sha256=hashlib.sha256(body.encode()).hexdigest())
                docs.append((doc, r, idxs, texts))
            session.add_all([d for d, *_ in docs])
            session.flush()  # document ids
            for doc, r, idxs, texts in docs:
                v = vecs[idxs] if r == 0 else jitter(vecs[idxs], REPLICA_COS, rng)  # [c, D]
                rows, pos = [], 0
                for t in texts:
                    rows.append({"text": t, "page": None, "heading": None, "start": pos, "end": pos + len(t),
                                 "n_tokens": len(t.split()) * 4 // 3})  # ~4 tokens per 3 words; only stored
                    pos += len(t) + 2
                kb.store.replace_chunks(session, coll, doc, rows, v)
                all_vecs[n : n + len(idxs)] = v
                n += len(idxs)
                n_docs += 1
    t_store = time.perf_counter() - t0
    with kb.store.session() as session:
        vi, t_index = timed(kb.save_index, session, kb.store.collection(session, "bench"))
    size = sum(f.stat().st_size for f in home.rglob("*") if f.is_file())
    return kb, all_vecs, {"docs": n_docs, "store_s": t_store, "index_s": t_index, "kind": vi.kind, "bytes": size}


def fts5_sql() -> str:
    """FTS5's own bm25() top-k over the table (one collection here): what `bm25_ids` reproduces exactly."""
    weights = ", ".join(map(str, BM25_WEIGHTS))
    return f"SELECT rowid, bm25(chunks_fts, {weights}) AS s FROM chunks_fts WHERE chunks_fts MATCH :q ORDER BY s LIMIT :k"


def lexical_build(kb: KnowledgeBase) -> dict:
    """Build the collection's BM25 index from scratch, write it where searches find it, load it back."""
    with kb.store.session() as session:
        coll = kb.store.collection(session, "bench")
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        t0 = time.perf_counter()
        li, _, _ = LexicalIndex(fts_tokenizer(session)).synced(
            kb.store.chunk_ids(session, coll), lambda ids: fts_rows(session, ids), coll.version
        )
        t_build = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
        path = kb.lexical_path(coll)
        _, t_save = timed(li.save, path)
        _, t_load = timed(LexicalIndex.load, path)
    postings = sum(len(seg.docs) for seg in li.segments)
    return {"build_s": t_build, "save_s": t_save, "load_s": t_load, "mib": li.nbytes / 2**20, "peak_mib": rss / 1024,
            "terms": len(li.terms), "postings": postings, "file_mib": path.stat().st_size / 2**20, "index": li}


def kb_matrix(kb: KnowledgeBase) -> np.ndarray:
    """All stored vectors of the bench collection [N, D], read back from the store."""
    with kb.store.session() as session:
        coll = kb.store.collection(session, "bench")
        return np.concatenate([v for _, v in kb.store.vectors(session, coll)])


def part1(sz: Sizes, home: Path | None) -> None:
    embedder = get_embedder()
    ps = passages(sz.base)
    t0 = time.perf_counter()
    vecs = base_vectors(embedder, [p[2] for p in ps])  # [n, D]
    print(f"base vectors: {len(vecs)} passages ({time.perf_counter() - t0:.0f} s, cached in {CACHE})", flush=True)
    qs = queries(sz.warmup + sz.queries)
    warm, qs = qs[: sz.warmup], qs[sz.warmup :]
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        if home is not None and (home / "moerag.db").exists():
            mat = kb_matrix(KnowledgeBase(home))
            print(f"reusing the knowledge base in {home}: {len(mat):,} chunks", flush=True)
            assert len(mat) == len(vecs) * REPLICAS, "--home holds a knowledge base of another size"
            st = {"kind": "flat" if len(mat) <= IndexParams().exact_max else "ivf"}
        else:
            home = home or Path(tmp)
            _, mat, st = build_kb(home, embedder, ps, vecs)
            print(f"built in {home}: {len(mat):,} chunks in {st['docs']:,} documents, store {st['store_s']:.0f} s "
                  f"({len(mat) / st['store_s']:.0f} chunks/s), save_index {st['index_s']:.1f} s, index {st['kind']}, "
                  f"{st['bytes'] / 2**20:.0f} MiB on disk", flush=True)
        N, D = mat.shape

        # A fresh KnowledgeBase, as a server process sees it: the first search loads the index file.
        kb = KnowledgeBase(home)
        embed = embedder.encode
        _, t_first = timed(search, kb, warm[0], embed=embed, collection="bench", k=K, mode="dense")
        lexical = lexical_build(kb)
        _, t_first_bm25 = timed(search, kb, warm[0], embed=embed, collection="bench", k=K, mode="bm25")
        modes = ("dense", "bm25", "hybrid")
        for q in warm:
            for m in modes:
                search(kb, q, embed=embed, collection="bench", k=K, mode=m)

        # End to end, the three modes interleaved per query so load drift hits them alike.
        load0 = load()
        e2e: dict[str, list[float]] = {m: [] for m in modes}
        for i, q in enumerate(qs):
            for m in modes[i % 3 :] + modes[: i % 3]:
                e2e[m].append(timed(search, kb, q, embed=embed, collection="bench", k=K, mode=m)[1])

        # Hybrid piece by piece, with the floors, again interleaved per query.
        pieces = ["encode", "open", "faiss", "bm25", "rrf", "hydrate", "raw_encode", "raw_encode_1t", "numpy",
                  "numpy_topk", "faiss_2t", "fts5"]
        threads = torch.get_num_threads()
        matches: list[int] = []
        postings: list[int] = []
        t: dict[str, list[float]] = {p: [] for p in pieces}
        raw = sqlite3.connect(home / "moerag.db")
        sql = fts5_sql()
        li, tok = lexical["index"], tokenizer(lexical["index"].spec)
        for q in qs:
            qvec, dt = timed(embedder.encode, [q])
            t["encode"].append(dt)
            _, dt = timed(embedder.model.encode, [q], normalize_embeddings=True, convert_to_numpy=True,
                          show_progress_bar=False)
            t["raw_encode"].append(dt)
            torch.set_num_threads(1)  # one intra-op thread: immune to a descheduled sibling thread
            _, dt = timed(embedder.model.encode, [q], normalize_embeddings=True, convert_to_numpy=True,
                          show_progress_bar=False)
            torch.set_num_threads(threads)
            t["raw_encode_1t"].append(dt)
            t1 = time.perf_counter()
            with kb.store.session() as session:
                coll = kb.store.collection(session, "bench")
                vi = kb.vector_index(session, coll)
                t["open"].append(time.perf_counter() - t1)
                (_, ids), dt = timed(vi.search, qvec, POOL)
                t["faiss"].append(dt)
                dense = [(int(i), 0.0) for i in ids[0] if i >= 0]
                lex, dt = timed(bm25_ids, kb, session, coll, q, POOL)
                t["bm25"].append(dt)
                fused, dt = timed(rrf, [dense, lex])
                t["rrf"].append(dt)
                _, dt = timed(_hydrate, session, [c for c, _ in fused[:K]])
                t["hydrate"].append(dt)
            omp = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(2)  # what VectorIndex.search ran on before
            _, dt = timed(vi.index.search, qvec, POOL)
            faiss.omp_set_num_threads(omp)
            t["faiss_2t"].append(dt)
            t1 = time.perf_counter()
            scores = mat @ qvec[0]  # [N]: reads N*D*4 bytes once
            t["numpy"].append(time.perf_counter() - t1)
            top = np.argpartition(-scores, POOL)[:POOL]
            top = top[np.argsort(-scores[top])]  # [POOL]
            t["numpy_topk"].append(time.perf_counter() - t1)
            match = fts_query(q)
            if match is not None:
                _, dt = timed(lambda: raw.execute(sql, {"q": match, "k": POOL}).fetchall())
                t["fts5"].append(dt)
                matches.append(raw.execute("SELECT count(*) FROM chunks_fts WHERE chunks_fts MATCH ?", (match,)).fetchone()[0])
                terms = [li.terms[x] for ts in tok.terms(query_words(q)) for x in ts if x in li.terms]
                postings.append(sum(int(seg.ptr[x + 1] - seg.ptr[x]) for seg in li.segments for x in terms
                                    if x + 1 < len(seg.ptr)))
        raw.close()
        load1 = load()

    gb = N * D * 4 / 1e9
    hyb = ms(e2e["hybrid"], 50)
    print(f"\nPart 1: search() on {N:,} chunks ({st['kind']} index), {len(qs)} SciFact queries after {len(warm)} "
          f"warm-up, k={K}, hybrid pool {POOL}; first search (loads the index file) {t_first * 1e3:.0f} ms; "
          f"load average {load0} -> {load1}\n")
    print(f"{'end to end':44s}{'p50 ms':>8s}{'p95 ms':>8s}{'target':>8s}{'p50/target':>12s}")
    for m in modes:
        p50 = ms(e2e[m], 50)
        print(f"{m:44s}{p50:8.1f}{ms(e2e[m], 95):8.1f}{TARGET_MS['search']:8.0f}{p50 / TARGET_MS['search']:12.2f}"
              f"{'  MISS' if p50 > TARGET_MS['search'] else ''}")
    names = {
        "encode": "query embedding (embedder.encode)",
        "open": "session + collection + vector_index()",
        "faiss": f"FAISS search (k={POOL}, 1 OpenMP thread)",
        "bm25": f"bm25_ids, in-memory index (k={POOL})",
        "rrf": "RRF fusion",
        "hydrate": f"hydration ({K} hits)",
    }
    print(f"\n{'hybrid, piece by piece':44s}{'p50 ms':>8s}{'p95 ms':>8s}{'':8s}{'of hybrid':>12s}")
    for p, name in names.items():
        print(f"{name:44s}{ms(t[p], 50):8.2f}{ms(t[p], 95):8.2f}{'':8s}{ms(t[p], 50) / hyb:12.0%}")
    total = [sum(xs) for xs in zip(*(t[p] for p in names))]
    print(f"{'sum of pieces':44s}{ms(total, 50):8.2f}{ms(total, 95):8.2f}{'':8s}{ms(total, 50) / hyb:12.0%}")
    print(f"\n{'baselines and floors (same queries)':44s}{'p50 ms':>8s}{'p95 ms':>8s}{'':8s}{'ratio':>12s}")
    print(f"{f'raw ST.encode, 1 query, {threads} torch threads':44s}{ms(t['raw_encode'], 50):8.2f}{ms(t['raw_encode'], 95):8.2f}"
          f"{'':8s}{ms(t['encode'], 50) / ms(t['raw_encode'], 50):12.2f}  embedder.encode / raw")
    print(f"{'  the same, 1 torch thread':44s}{ms(t['raw_encode_1t'], 50):8.2f}{ms(t['raw_encode_1t'], 95):8.2f}"
          f"{'':8s}{ms(t['raw_encode'], 50) / ms(t['raw_encode_1t'], 50):12.2f}  {threads} threads / 1 thread")
    bw = gb / (ms(t["numpy"], 50) / 1e3)
    print(f"{f'numpy [{N // 1000}k, {D}] @ q  ({gb * 1e3:.0f} MB, {bw:.1f} GB/s)':44s}{ms(t['numpy'], 50):8.2f}"
          f"{ms(t['numpy'], 95):8.2f}{'':8s}{ms(t['faiss'], 50) / ms(t['numpy'], 50):12.2f}  FAISS / numpy")
    print(f"{f'numpy @ q + top-{POOL}':44s}{ms(t['numpy_topk'], 50):8.2f}{ms(t['numpy_topk'], 95):8.2f}"
          f"{'':8s}{ms(t['faiss'], 50) / ms(t['numpy_topk'], 50):12.2f}  FAISS / numpy+top-k")
    print(f"{'FAISS on 2 OpenMP threads (before)':44s}{ms(t['faiss_2t'], 50):8.2f}{ms(t['faiss_2t'], 95):8.2f}"
          f"{'':8s}{ms(t['faiss'], 50) / ms(t['faiss_2t'], 50):12.2f}  1 thread / 2 threads")
    print(f"{f'FTS5 bm25() top-{POOL}, same words (before)':44s}{ms(t['fts5'], 50):8.2f}{ms(t['fts5'], 95):8.2f}"
          f"{'':8s}{ms(t['bm25'], 50) / ms(t['fts5'], 50):12.2f}  bm25_ids / FTS5")
    print(f"{'chunks matching the OR-query (median)':44s}{np.median(matches):8.0f}{np.percentile(matches, 95):8.0f}"
          f"{'':8s}{np.median(matches) / N:12.0%}  of all chunks")
    print(f"{'postings scored per query (median)':44s}{np.median(postings):8.0f}{np.percentile(postings, 95):8.0f}"
          f"{'':8s}{np.median(postings) / lexical['postings']:12.1%}  of all postings")
    enc = min(ms(t["raw_encode"], 50), ms(t["raw_encode_1t"], 50))
    floor = enc + min(ms(t["numpy_topk"], 50), ms(t["faiss"], 50))
    print(f"{'dense floor: raw encode + best exact scan':44s}{floor:8.2f}{'':8s}{'':8s}"
          f"{ms(e2e['dense'], 50) / floor:12.2f}  dense search() / floor")
    print(f"\nBM25 index: built from the FTS5 table in {lexical['build_s']:.1f} s (peak RSS +{lexical['peak_mib']:.0f} MiB), "
          f"{lexical['terms']:,} terms, {lexical['postings']:,} postings, {lexical['mib']:.0f} MiB in memory; file "
          f"{lexical['file_mib']:.0f} MiB, saved in {lexical['save_s']:.2f} s, loaded in {lexical['load_s']:.2f} s; "
          f"first bm25 search of a fresh process (loads the file) {t_first_bm25 * 1e3:.0f} ms")


# --- part 2: the approximate index at 1M vectors -------------------------------------------------


def mixture(centres: np.ndarray, n: int, cos: float, rng: np.random.Generator) -> np.ndarray:
    """n unit vectors [n, D]: a uniformly chosen centre plus noise, at about cosine `cos` from it."""
    out = np.empty((n, centres.shape[1]), np.float32)
    for b in range(0, n, 100_000):  # in blocks: no float64 or full-size temporaries
        m = min(100_000, n - b)
        out[b : b + m] = jitter(centres[rng.integers(0, len(centres), size=m)], cos, rng)
    return out


def uniform(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    out = np.empty((n, d), np.float32)
    for b in range(0, n, 100_000):
        m = min(100_000, n - b)
        g = rng.standard_normal((m, d), dtype=np.float32)
        out[b : b + m] = g / np.linalg.norm(g, axis=1, keepdims=True)
    return out


def exact_topk(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids [Q, k] of q [Q, D] against x [N, D] by inner product, in row blocks."""
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for b in range(0, len(x), 200_000):
        s = q @ x[b : b + 200_000].T  # [Q, block]
        part = np.argpartition(-s, k, axis=1)[:, :k]  # [Q, k]
        best_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], 1)
        best_i = np.concatenate([best_i, part + b], 1)
        keep = np.argsort(-best_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_i


def ann(x: np.ndarray, q: np.ndarray, sz: Sizes, label: str) -> None:
    """Build the IVF index over x [N, D], then recall@10 and single-query latency per nprobe."""
    N, D = x.shape
    exact_max = 100_000 if N > 100_000 else 10_000  # --quick: still IVF at 100k
    vi = VectorIndex(dim=D, params=IndexParams(exact_max=exact_max))
    load0 = load()
    _, t_build = timed(vi.rebuild, np.arange(N, dtype=np.int64), x, 1)
    assert vi.kind == "ivf"
    truth, t_truth = timed(exact_topk, x, q, K)  # [Q, K]
    nlist = vi.index.nlist
    got = {p: np.zeros((len(q), K), np.int64) for p in sz.nprobes}
    lat: dict[int, list[float]] = {p: [] for p in sz.nprobes}
    brute: list[float] = []
    for p in sz.nprobes:  # warm-up
        vi.params.nprobe = p
        vi.search(q[:5], K)
    for j in range(len(q)):  # nprobe values interleaved per query, so load drift hits them alike
        for p in sz.nprobes[j % len(sz.nprobes) :] + sz.nprobes[: j % len(sz.nprobes)]:
            vi.params.nprobe = p
            (_, ids), dt = timed(vi.search, q[j], K)
            got[p][j] = ids[0]
            lat[p].append(dt)
        t1 = time.perf_counter()
        s = x @ q[j]  # [N]: the exact baseline, one pass over N*D*4 bytes
        np.argpartition(-s, K)[:K]
        brute.append(time.perf_counter() - t1)
    load1 = load()
    print(f"\nPart 2 ({label}): {N:,} x {D} vectors, VectorIndex IVF nlist={nlist}, trained on "
          f"{min(N, 64 * nlist):,}; rebuild (train + add) {t_build:.0f} s; {len(q)} held-out queries; "
          f"exact top-{K} by numpy in batch {t_truth:.1f} s; load average {load0} -> {load1}\n")
    b50 = ms(brute, 50)
    print(f"{'nprobe':>8s}{'lists %':>9s}{'recall@10':>11s}{'min':>7s}{'p50 ms':>8s}{'p95 ms':>8s}"
          f"{'exact/ivf':>11s}   target: recall >= {TARGET_RECALL}, p50 <= {TARGET_MS['ann']:.0f} ms")
    for p in sz.nprobes:
        rec = np.array([len(np.intersect1d(got[p][j], truth[j])) / K for j in range(len(q))])  # [Q]
        p50 = ms(lat[p], 50)
        ok = rec.mean() >= TARGET_RECALL and p50 <= TARGET_MS["ann"]
        tag = " (default)" if p == IndexParams().nprobe else ""
        print(f"{p:8d}{100 * p / nlist:9.2f}{rec.mean():11.4f}{rec.min():7.1f}{p50:8.2f}{ms(lat[p], 95):8.2f}"
              f"{b50 / p50:11.1f}   {'meets' if ok else 'MISS'}{tag}")
    print(f"{'exact':>8s}{100:9.2f}{1:11.4f}{1:7.1f}{b50:8.2f}{ms(brute, 95):8.2f}{1:11.1f}"
          f"   numpy x @ q + top-{K}, {N * D * 4 / 1e9 / (b50 / 1e3):.1f} GB/s")


def part2(sz: Sizes, *, with_uniform: bool) -> None:
    centres = base_vectors(get_embedder(), [p[2] for p in passages(sz.base)])  # [C, D]
    # Noise: a point sits about as far from its centre as a centre from its nearest other centre,
    # so neighbouring clusters (related abstracts) overlap, as topics do in a real corpus.
    sim = centres @ centres.T  # [C, C]
    np.fill_diagonal(sim, -1)
    cos = float(np.median(sim.max(axis=1)))
    rng = np.random.default_rng(1)
    x = mixture(centres, sz.ann_n + sz.ann_queries, cos, rng)  # [N + Q, D]; queries held out
    print(f"\nmixture: C={len(centres):,} centres = real SciFact passage embeddings, cos(point, centre) ~ {cos:.3f} "
          f"(median nearest-centre cosine), ~{sz.ann_n // len(centres)} points per centre", flush=True)
    ann(x[: sz.ann_n], x[sz.ann_n :], sz, f"Gaussian mixture, C={len(centres):,}")
    if with_uniform:
        del x
        x = uniform(sz.ann_n + sz.ann_queries, centres.shape[1], rng)
        ann(x[: sz.ann_n], x[sz.ann_n :], sz, "uniform on the sphere, no structure")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="10k chunks, 100k vectors, 50 queries: a smoke run")
    ap.add_argument("--uniform", action="store_true", help="also part 2 on uniform vectors (another IVF build)")
    ap.add_argument("--part", choices=["1", "2", "both"], default="both")
    ap.add_argument("--home", type=Path, help="part 1: build the knowledge base here and keep it; reuse it when present")
    args = ap.parse_args()
    sz = QUICK if args.quick else FULL
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads, {os.cpu_count()} cores, "
          f"load average {load()}", flush=True)
    if args.part in ("1", "both"):
        part1(sz, args.home)
    if args.part in ("2", "both"):
        part2(sz, with_uniform=args.uniform)


if __name__ == "__main__":
    main()
