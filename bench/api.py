"""HTTP API overhead: a non-streaming chat completion through uvicorn + the openai client, against
calling AnswerService.ask directly on the same questions (extractive generator), and 16
concurrent streaming clients.

    .venv/bin/python -m bench.api [--rounds 3] [--clients 16]

Targets (issue #6): API p50 - direct p50 <= 10 ms; 16 concurrent clients with no errors.
The two are timed alternately, question by question, so machine load hits both alike.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai

from app.api import create_app
from app.keys import Keys
from app.qa_eval import COLLECTION, load_squad
from app.service import AnswerService
from app.settings import load_settings
from ingest.embedder import get_embedder
from ingest.pipeline import ingest_records
from retrieval.kb import KnowledgeBase
from tests.servers import serve_app

SQUAD = Path(__file__).resolve().parents[1].parent / "shared" / "eval" / "squad2" / "squad2_dev_subset.json"
TARGET_MS = 10.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--questions", type=int, default=60)
    ap.add_argument("--clients", type=int, default=16)
    args = ap.parse_args()
    embedder = get_embedder()
    records, questions = load_squad(SQUAD)
    questions = [q.question for q in questions[: args.questions]]
    with tempfile.TemporaryDirectory(prefix="moerag-bench-api-") as tmp:
        s = load_settings(home=Path(tmp)).replace(collection=COLLECTION, generator="extractive")
        kb = KnowledgeBase(s.home)
        ingest_records(kb, embedder, records, collection=COLLECTION)
        service = AnswerService(s, kb=kb, embedder=embedder)
        _, key = Keys(kb.store).create("bench")
        url, stop = serve_app(create_app(s, service=service))
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        try:
            service.ask(questions[0])
            client.chat.completions.create(model=COLLECTION, messages=[{"role": "user", "content": questions[0]}])
            direct, api = [], []
            for _ in range(args.rounds):
                for q in questions:
                    t = time.perf_counter()
                    service.ask(q)
                    direct.append((time.perf_counter() - t) * 1000)
                    t = time.perf_counter()
                    client.chat.completions.create(model=COLLECTION, messages=[{"role": "user", "content": q}])
                    api.append((time.perf_counter() - t) * 1000)

            def stream(i: int) -> tuple[bool, float]:
                t = time.perf_counter()
                try:
                    c = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
                    chunks = list(c.chat.completions.create(
                        model=COLLECTION, messages=[{"role": "user", "content": questions[i % len(questions)]}], stream=True))
                    ok = chunks[-1].choices[0].finish_reason == "stop"
                except Exception:  # noqa: BLE001 -- counted as an error
                    ok = False
                return ok, (time.perf_counter() - t) * 1000

            with ThreadPoolExecutor(args.clients) as pool:
                t = time.perf_counter()
                results = list(pool.map(stream, range(args.clients * 4)))
                wall = time.perf_counter() - t
        finally:
            stop()
    d50, a50 = np.percentile(direct, 50), np.percentile(api, 50)
    errors = sum(not ok for ok, _ in results)
    lat = np.array([ms for _, ms in results])
    print(f"load average {os.getloadavg()[0]:.2f}; {len(direct)} questions per path\n")
    print(f"{'measure':40s}{'value':>10s}{'target':>10s}")
    print(f"{'service.ask p50 (ms)':40s}{d50:10.1f}")
    print(f"{'API chat completion p50 (ms)':40s}{a50:10.1f}")
    print(f"{'API overhead p50 (ms)':40s}{a50 - d50:10.1f}{TARGET_MS:10.0f}")
    print(f"{'API / direct':40s}{a50 / d50:10.2f}")
    print(f"{f'{args.clients} concurrent streams: requests':40s}{len(results):10d}")
    print(f"{'  errors':40s}{errors:10d}{0:10d}")
    print(f"{'  stream latency p50 / p99 (ms)':40s}{np.percentile(lat, 50):10.0f}{np.percentile(lat, 99):10.0f}")
    print(f"{'  answers per second':40s}{len(results) / wall:10.1f}")


if __name__ == "__main__":
    main()
