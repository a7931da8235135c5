"""Readers and writers together through the API: concurrent clients of a real `moerag serve` mix
searches, chats (plain and streamed), uploads and deletes on one collection for a while. No
response is a 5xx (or a stream's error event), no document whose upload succeeded is lost, no
search shows a document its client had deleted, and `moerag index check` is clean afterwards.
A 409 "locked" (another upload or delete held the write lock) is counted, not an error.

The mix is bench/hostile.py's load phase (64 clients for 60 s there), smaller.
"""

from __future__ import annotations

import random

import httpx
import pytest

from bench.hostile import COLLECTION, TOPICS, base_records, index_check, lost_documents, run_load
from tests.servers import MoeragServer

CLIENTS = 16
SECONDS = 15.0


@pytest.mark.slow
def test_concurrent_searches_chats_uploads_and_deletes(tmp_path, embedder):
    from app.keys import Keys
    from ingest.pipeline import ingest_records
    from retrieval.kb import KnowledgeBase

    home = tmp_path / "home"
    kb = KnowledgeBase(home)
    ingest_records(kb, embedder, base_records(random.Random(1)), collection=COLLECTION)
    keys = [Keys(kb.store).create(f"client {i}")[1] for i in range(CLIENTS)]
    env = {"MOERAG_GENERATOR": "extractive", "MOERAG_WEB_PROVIDER": "none",
           "MOERAG_API_RATE_PER_MINUTE": "0", "MOERAG_API_MAX_CONCURRENT": "0"}
    with MoeragServer(home, env=env) as server:
        auth = {"Authorization": f"Bearer {keys[0]}"}
        warm = httpx.post(f"{server.url}/v1/search", json={"query": "tea"}, headers=auth, timeout=60)
        assert warm.status_code == 200, warm.text
        tally = run_load(server.url, keys, seconds=SECONDS)
        listed = httpx.get(f"{server.url}/v1/collections/{COLLECTION}/documents", headers=auth, timeout=60).json()
        log = server.output()

    summary = tally.summary()
    assert not tally.errors, f"{len(tally.errors)} errors, first: {tally.errors[:3]}\n{summary}\n{log[-2000:]}"
    assert tally.n() - tally.n("list") > 10 * CLIENTS, summary
    assert tally.n("upload", lambda s: s == 200) and tally.n("delete", lambda s: s == 200), summary
    lost, undead = lost_documents(listed, tally)
    assert not lost and not undead, f"lost: {lost[:5]}, deleted but listed: {undead[:5]}"
    assert sum(d["source"].startswith("base:") for d in listed) == len(TOPICS)
    assert "Traceback" not in log, log[-3000:]
    ok, out = index_check(home)
    assert ok, out
    print(f"\n{CLIENTS} clients x {SECONDS:g} s: {summary}")
