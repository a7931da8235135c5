"""Retrieval quality on a BEIR-format dataset (corpus.jsonl, queries.jsonl, qrels/<split>.tsv).

The corpus is ingested into a throwaway knowledge base (document id = corpus `_id`, text =
title + " " + text), the split's queries are searched, chunk hits are folded into document
rankings (a document scores its best chunk), and the standard metrics are computed with binary
relevance: nDCG@10, Recall@10, Recall@100, MRR@10.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from app.settings import Settings
from ingest.embedder import Embedder
from ingest.pipeline import IngestOptions, Progress, ingest_records
from retrieval.errors import MoeragError
from retrieval.kb import KnowledgeBase
from retrieval.index import IndexParams
from retrieval.search import search


class EvalError(MoeragError):
    """The dataset folder is not a readable BEIR dataset."""


def load_beir(folder: Path, split: str):
    """(corpus [(id, title, text)], queries {qid: text}, qrels {qid: {docid}}) for `split`."""
    folder = Path(folder)
    files = {"corpus": folder / "corpus.jsonl", "queries": folder / "queries.jsonl", "qrels": folder / "qrels" / f"{split}.tsv"}
    for name, path in files.items():
        if not path.is_file():
            raise EvalError(f"{folder} is not a BEIR dataset: {path} is missing (expected corpus.jsonl, queries.jsonl, qrels/{split}.tsv)")
    try:
        corpus = []
        with open(files["corpus"], encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    rec = json.loads(line)
                    corpus.append((str(rec["_id"]), rec.get("title", "") or "", rec.get("text", "") or ""))
        queries = {}
        with open(files["queries"], encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    rec = json.loads(line)
                    queries[str(rec["_id"])] = rec["text"]
        qrels: dict[str, set[str]] = {}
        with open(files["qrels"], encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                parts = line.rstrip("\n").split("\t")
                if i == 0 and not parts[-1].strip().lstrip("-").isdigit():
                    continue  # header
                if len(parts) >= 3 and int(parts[2]) > 0:
                    qrels.setdefault(parts[0], set()).add(parts[1])
    except (OSError, ValueError, KeyError) as exc:
        raise EvalError(f"Cannot read the BEIR dataset in {folder}: {exc}") from exc
    qrels = {q: d for q, d in qrels.items() if q in queries}
    if not qrels:
        raise EvalError(f"No judged queries for split '{split}' in {folder}")
    return corpus, queries, qrels


def doc_ranking(hits, limit: int = 100) -> list[str]:
    """Chunk hits (best first) -> distinct document sources, best first."""
    seen: dict[str, None] = {}
    for h in hits:
        seen.setdefault(h.source, None)
        if len(seen) >= limit:
            break
    return list(seen)


def metrics(ranking: list[str], relevant: set[str]) -> dict[str, float]:
    gains = [1.0 if d in relevant else 0.0 for d in ranking[:10]]
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains))
    idcg = sum(1.0 / math.log2(i + 2) for i in range(min(len(relevant), 10)))
    first = next((i for i, g in enumerate(gains) if g), None)
    return {
        "ndcg@10": dcg / idcg if idcg else 0.0,
        "recall@10": len(relevant & set(ranking[:10])) / len(relevant),
        "recall@100": len(relevant & set(ranking[:100])) / len(relevant),
        "mrr@10": 1.0 / (first + 1) if first is not None else 0.0,
    }


def evaluate(
    dataset: Path,
    *,
    settings: Settings,
    embedder: Embedder,
    modes: list[str],
    split: str = "test",
    limit_docs: int | None = None,
    progress: Progress | None = None,
    on_phase: Callable[[str], None] = lambda _: None,
) -> list[dict]:
    """One result dict per mode; the corpus is ingested once into a temporary knowledge base."""
    corpus, queries, qrels = load_beir(dataset, split)
    if limit_docs is not None:  # a smaller corpus, keeping only queries whose judged docs remain
        corpus = corpus[:limit_docs]
        ids = {c[0] for c in corpus}
        qrels = {q: d & ids for q, d in qrels.items() if d & ids}
    records = [(doc_id, title, f"{title} {text}".strip()) for doc_id, title, text in corpus]
    with tempfile.TemporaryDirectory(prefix="moerag-eval-") as tmp:
        kb = KnowledgeBase(Path(tmp), index_params=IndexParams(exact_max=settings.exact_index_max, nprobe=settings.nprobe))
        options = IngestOptions(chunk_tokens=settings.chunk_tokens, chunk_overlap=settings.chunk_overlap)
        on_phase(f"ingesting {len(records)} documents")
        report = ingest_records(kb, embedder, records, collection="eval", options=options, progress=progress)
        if report.failed:
            on_phase(f"{len(report.failed)} documents could not be ingested (empty text)")
        qids = sorted(qrels)
        on_phase(f"searching {len(qids)} queries")
        qvecs = dict(zip(qids, embedder.encode([queries[q] for q in qids])))
        results = []
        for mode in modes:
            per_query = []
            t0 = time.perf_counter()
            for q in qids:
                hits = search(
                    kb, queries[q], embed=lambda _t, v=qvecs[q]: v[None, :], collection="eval", k=300, mode=mode, candidates=300
                )
                per_query.append(metrics(doc_ranking(hits), qrels[q]))
            search_seconds = time.perf_counter() - t0
            row = {name: float(np.mean([m[name] for m in per_query])) for name in per_query[0]}
            row.update(
                queries=len(qids),
                documents=len(records),
                chunks=report.chunks,
                ingest_seconds=round(report.seconds, 2),
                search_ms_per_query=round(1000 * search_seconds / len(qids), 2),
                mode=mode,
            )
            results.append(row)
    return results
