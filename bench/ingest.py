"""Ingest throughput against its floor: the raw embedder on the same chunk texts, in one run.

Writes N SciFact abstracts as .txt files, ingests them with the real pipeline (parse, chunk,
embed, SQL + FTS5 + FAISS), records every text the pipeline embedded, then times
`SentenceTransformer.encode` alone on exactly those texts. Ingest and raw alternate for
`--rounds` rounds (each ingest into a fresh knowledge base), so drift in machine load hits both
sides; the ratio of the summed times is reported, with each round's for spread.

    .venv/bin/python -m bench.ingest [--docs 1500]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from ingest.embedder import get_embedder
from ingest.pipeline import ingest_paths
from retrieval.kb import KnowledgeBase

SCIFACT = Path(__file__).resolve().parents[1].parent / "shared" / "eval" / "scifact" / "corpus.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=1500)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    embedder = get_embedder()
    recs = [json.loads(line) for _, line in zip(range(args.docs), open(SCIFACT))]
    seen: list[str] = []
    encode = embedder.encode

    def recording_encode(texts):
        seen.extend(texts)
        return encode(texts)

    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, "docs")
        folder.mkdir()
        for r in recs:
            Path(folder, f"{r['_id']}.txt").write_text(f"{r['title']}\n\n{r['text']}\n")
        embedder.encode(["warm up the model once"] * 8)
        for i in range(args.rounds):
            seen.clear()
            embedder.encode = recording_encode
            report = ingest_paths(KnowledgeBase(Path(tmp, f"home{i}")), embedder, [folder], collection="bench")
            embedder.encode = encode
            t0 = time.perf_counter()
            embedder.model.encode(seen, batch_size=embedder.batch_size, normalize_embeddings=True, convert_to_numpy=True)
            rounds.append((report.seconds, report.embed_seconds, time.perf_counter() - t0))
    n = len(seen)
    print(f"{len(recs)} files -> {n} chunks; torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}\n")
    print(f"{'round':>5s}{'ingest s':>10s}{'embed s':>9s}{'other s':>9s}{'raw s':>8s}{'ingest/raw':>12s}")
    for i, (ing, emb, raw) in enumerate(rounds, 1):
        print(f"{i:5d}{ing:10.2f}{emb:9.2f}{ing - emb:9.2f}{raw:8.2f}{raw / ing:12.3f}")
    ing, emb, raw = (sum(r[j] for r in rounds) for j in range(3))
    print(f"\nraw encode: {n * len(rounds) / raw:.1f} chunks/s; ingest: {n * len(rounds) / ing:.1f} chunks/s")
    print(f"ingest / raw throughput: {raw / ing:.3f}  (target >= 0.85); "
          f"non-embedding work is {100 * (ing - emb) / ing:.1f} % of ingest time")


if __name__ == "__main__":
    main()
