"""Fetched pages are extracted under the parsing limits, in a worker process that is stopped at the
web budget: a PDF that would cost minutes of CPU is skipped with a reason, the web step returns
on time, and nothing keeps parsing it afterwards."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from app.service import AnswerService
from app.settings import Settings
from tests.payloads import slow_pdf
from tests.retrieval.web.conftest import LocalWeb

BUDGET = 6.0  # seconds: room for a fresh worker to start and begin on the PDF before it is stopped


def cpu_seconds() -> float:
    """CPU time used so far by this process (all threads) and by its children still running."""
    t = os.times()
    total = t.user + t.system
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():  # ppid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


@pytest.mark.slow
def test_a_slow_pdf_is_stopped_at_the_web_budget_and_skipped_with_a_reason(local_web, kb, embedder, tmp_path):
    LocalWeb.pages["/report.pdf"] = ("application/pdf", slow_pdf())
    LocalWeb.results = [
        {"url": f"{local_web}/article", "title": "Owls of Europe", "content": "Barn owls hunt at night."},
        {"url": f"{local_web}/report.pdf", "title": "Owl report", "content": "An annual report on owls."},
    ]
    settings = Settings(home=tmp_path / "home", web_provider="searxng", searxng_url=local_web, web_timeout=BUDGET,
                        web_page_timeout=BUDGET, web_allowlist="127.0.0.1/32", web_cache_ttl=0.0)
    service = AnswerService(settings, kb=kb, embedder=embedder)

    start = time.monotonic()
    sources, found = service.search_web("barn owls", k=5)
    elapsed = time.monotonic() - start

    assert elapsed < BUDGET + 2, elapsed
    reasons = {s["url"]: s["reason"] for s in found.skipped}
    assert f"{local_web}/report.pdf" in reasons, found.skipped
    assert reasons[f"{local_web}/report.pdf"]  # a reason the user can read, e.g. "did not finish within ..."
    assert any(s.url == f"{local_web}/article" for s in sources)  # the good page still counts

    # No extraction outlives the budget: nothing of ours burns CPU on the PDF afterwards.
    time.sleep(0.5)
    before = cpu_seconds()
    time.sleep(2.0)
    assert cpu_seconds() - before < 0.5
