"""Retrieval quality on BEIR SciFact against the published numbers, all modes from one ingest.

    .venv/bin/python -m bench.retrieval [--split test] [--dataset ../shared/eval/scifact]

Published nDCG@10 on the test split: all-MiniLM-L6-v2 0.6451 (MTEB), BM25 0.665 (BEIR paper).
Targets: dense >= 0.645, hybrid >= 0.70.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from app.evaluate import evaluate
from app.settings import load_settings
from ingest.embedder import get_embedder

DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "eval" / "scifact"
PUBLISHED = {"dense": 0.6451, "bm25": 0.665, "hybrid": 0.70}  # hybrid: our target, not a published figure


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", type=Path, default=DEFAULT)
    ap.add_argument("--split", default="test")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    rows = evaluate(args.dataset, settings=load_settings(), embedder=get_embedder(), modes=["dense", "bm25", "hybrid"],
                    split=args.split, on_phase=print)
    r0 = rows[0]
    print(f"\n{args.dataset.name} ({args.split}): {r0['queries']} queries, {r0['documents']} documents, "
          f"{r0['chunks']} chunks, ingested in {r0['ingest_seconds']:.0f} s\n")
    print(f"{'mode':8s}{'nDCG@10':>9s}{'R@10':>8s}{'R@100':>8s}{'MRR@10':>8s}{'ms/q':>7s}   reference   ratio")
    for r in rows:
        ref = PUBLISHED[r["mode"]]
        print(f"{r['mode']:8s}{r['ndcg@10']:9.4f}{r['recall@10']:8.4f}{r['recall@100']:8.4f}{r['mrr@10']:8.4f}"
              f"{r['search_ms_per_query']:7.1f}   {ref:9.4f}   {r['ndcg@10'] / ref:5.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
