"""Web search: KB + web fusion quality on our own small set, the time budget with a page that
never answers, and the SSRF table, all against servers on 127.0.0.1.

    .venv/bin/python -m bench.web

Targets (issue #5): the fused top 3 finds the right passage at least as often as either source
alone; with a 1 s page timeout and a never-answering page the web step ends within its budget;
zero refused addresses fetched.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import httpx

from app.service import AnswerService
from app.settings import Settings
from ingest.embedder import get_embedder
from ingest.pipeline import ingest_records
from retrieval.kb import KnowledgeBase
from retrieval.web import WebOptions, web_search
from retrieval.web.errors import RefusedAddressError
from retrieval.web.fetch import fetch
from tests.retrieval.web.conftest import LocalWeb, RecordingTransport
from tests.retrieval.web.fusion_set import DISTRACTORS, ITEMS
from tests.retrieval.web.test_fusion import hit_rates, publish
from tests.retrieval.web.test_guard import REFUSED


def main() -> None:
    LocalWeb.hits, LocalWeb.hosts, LocalWeb.pages, LocalWeb.results = {}, [], {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), LocalWeb)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    local = f"http://127.0.0.1:{server.server_address[1]}"
    embedder = get_embedder()
    publish(local)
    with tempfile.TemporaryDirectory(prefix="moerag-bench-web-") as tmp:
        settings = Settings(home=Path(tmp), web_provider="searxng", searxng_url=local, web_allowlist="127.0.0.1/32",
                            web_max_results=len(LocalWeb.results), web_timeout=6.0)
        kb = KnowledgeBase(settings.home)
        records = [(f"kb:{i}", t, p) for i, (w, t, p, *_) in enumerate(ITEMS) if w == "kb"]
        records += [(f"kbd:{i}", t, p) for i, (w, t, p) in enumerate(DISTRACTORS) if w == "kb"]
        ingest_records(kb, embedder, records, collection="default")
        rates = hit_rates(AnswerService(settings, kb=kb, embedder=embedder))

    budget = 3.0
    LocalWeb.results = [{"url": f"{local}/article", "title": "a", "content": "a"},
                        {"url": f"{local}/slow", "title": "never answers", "content": "s"}]
    start = time.monotonic()
    found = web_search("owls", options=WebOptions(provider="searxng", searxng_url=local, budget=budget,
                                                  page_timeout=1.0, allowlist="127.0.0.1/32"))
    step = time.monotonic() - start

    transport = RecordingTransport()
    client = httpx.Client(transport=transport, follow_redirects=False, trust_env=False)
    refused = 0
    for url, _ in REFUSED:
        try:
            fetch(url, client)
        except RefusedAddressError:
            refused += 1
    server.shutdown()

    print(f"load average {os.getloadavg()[0]:.2f}; {len(ITEMS)} questions (half answered only by the KB, half only by the web)\n")
    print(f"{'top-3 hit rate':34s}{'value':>8s}")
    for name in ("kb", "web", "fused"):
        print(f"{'  ' + name + ' alone' if name != 'fused' else '  fused (target >= each)':34s}{rates[name]:8.3f}")
    print(f"\n{'web step with a never-answering page':34s}{step:7.2f} s  (budget {budget:g} s, page timeout 1 s)")
    print(f"{'  pages read / skipped':34s}{len(found.pages):8d} / {len(found.skipped)}")
    print(f"{'SSRF table: refused / forms':34s}{refused:8d} / {len(REFUSED)}")
    print(f"{'  connections made to them':34s}{len(transport.connected):8d}  (target 0)")


if __name__ == "__main__":
    main()
