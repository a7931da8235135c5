"""End-to-end answers on SQuAD 2.0 (answerable questions) with the extractive generator.

    .venv/bin/python -m bench.answer [--limit N] [--rounds 2]

Targets (issue #4): the gold answer appears in the answer or its first cited source for
>= 80 % of questions, every citation valid; time to first answer token p50 <= 150 ms.
Baseline in the same run: `search()` alone on the same questions (query embedding + hybrid
retrieval), the floor under any answer's first token; the ratio says what answering adds.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from app.qa_eval import COLLECTION, QaReport, load_squad, pick, score
from app.service import AnswerService
from app.settings import load_settings
from ingest.embedder import get_embedder
from ingest.pipeline import ingest_records
from retrieval.kb import KnowledgeBase
from retrieval.search import search

SQUAD = Path(__file__).resolve().parents[1].parent / "shared" / "eval" / "squad2" / "squad2_dev_subset.json"
TARGET_ANSWERED, TARGET_TTFT_MS = 0.80, 150.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", type=Path, default=SQUAD)
    ap.add_argument("--limit", type=int, default=None, help="questions (default: all answerable)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of search-only and answer timing")
    args = ap.parse_args()
    embedder = get_embedder()
    records, questions = load_squad(args.file)
    questions = pick(questions, args.limit)
    with tempfile.TemporaryDirectory(prefix="moerag-bench-answer-") as tmp:
        settings = load_settings(home=Path(tmp)).replace(collection=COLLECTION, generator="extractive")
        kb = KnowledgeBase(settings.home)
        t = time.perf_counter()
        ingest_records(kb, embedder, records, collection=COLLECTION)
        print(f"{len(records)} paragraphs ingested in {time.perf_counter() - t:.1f} s; {len(questions)} questions")
        service = AnswerService(settings, kb=kb, embedder=embedder)
        service.ask(questions[0].question)  # warm-up
        search_ms: list[float] = []
        report = QaReport()
        for r in range(args.rounds):
            for q in questions:
                t = time.perf_counter()
                search(kb, q.question, embed=embedder.encode, collection=COLLECTION, k=settings.answer_k)
                search_ms.append((time.perf_counter() - t) * 1000)
            round_report = QaReport()
            for q in questions:
                score(round_report, q, service.ask(q.question))
            if r == 0:
                report = round_report
            else:
                report.first_answer_ms += round_report.first_answer_ms
    s = report.summary()
    floor = float(np.percentile(search_ms, 50))
    load = os.getloadavg()[0]
    print(f"\nload average {load:.2f}; {args.rounds} rounds\n")
    print(f"{'measure':34s}{'value':>10s}{'target':>10s}")
    print(f"{'answered (gold in answer/1st cite)':34s}{s['answered']:10.3f}{TARGET_ANSWERED:10.2f}")
    print(f"{'  gold in the answer itself':34s}{s['gold_in_answer']:10.3f}")
    print(f"{'  paragraph among the sources':34s}{s['paragraph_in_sources']:10.3f}")
    print(f"{'answers with >= 1 citation':34s}{s['with_citation']:10.3f}")
    print(f"{'answers with an invalid citation':34s}{s['invalid_citation_answers']:10d}{0:10d}")
    print(f"{'first answer token p50 (ms)':34s}{s['first_answer_ms_p50']:10.1f}{TARGET_TTFT_MS:10.0f}")
    print(f"{'first answer token p90 (ms)':34s}{s['first_answer_ms_p90']:10.1f}")
    print(f"{'search() alone p50 (ms), the floor':34s}{floor:10.1f}")
    print(f"{'first token / search floor':34s}{s['first_answer_ms_p50'] / floor:10.2f}")


if __name__ == "__main__":
    main()
