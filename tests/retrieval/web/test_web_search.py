"""The whole web step against a SearXNG-compatible endpoint on 127.0.0.1: the budget holds with
a page that never answers, refused and failed results are listed with reasons, snippets stand in
for unreadable pages, pages are cached; and the ddgs adapter's mapping and errors."""

from __future__ import annotations

import time

import pytest

from retrieval.store import Store
from retrieval.web import ProviderError, RateLimitedError, WebOptions, WebTimeoutError, web_search
from retrieval.web.providers import duckduckgo, searxng
from tests.retrieval.web.conftest import LocalWeb


def options(local_web: str, **changes) -> WebOptions:
    base = dict(provider="searxng", searxng_url=local_web, budget=3.0, page_timeout=1.0, allowlist="127.0.0.1/32",
                max_results=8)
    return WebOptions(**{**base, **changes})


def results(local_web: str, *paths_or_urls: str) -> list[dict]:
    return [{"url": p if "://" in p else f"{local_web}{p}", "title": f"result {i}", "content": f"snippet of {p}"}
            for i, p in enumerate(paths_or_urls)]


def test_the_budget_holds_and_every_skip_has_a_reason(local_web):
    LocalWeb.results = results(local_web, "/article", "/slow", "http://169.254.169.254/latest/meta-data/",
                               "/image", "/article#again")
    start = time.monotonic()
    found = web_search("barn owls", options=options(local_web))
    elapsed = time.monotonic() - start
    assert elapsed < 3.0 + 0.5, elapsed  # a page that never answers cannot hold the step up
    by_url = {s["url"]: s["reason"] for s in found.skipped}
    assert "timed out after 1 s" in by_url[f"{local_web}/slow"]
    assert "refused" in by_url["http://169.254.169.254/latest/meta-data/"] and "link-local" in by_url["http://169.254.169.254/latest/meta-data/"]
    assert "image/png" in by_url[f"{local_web}/image"]
    pages = {p.url: p for p in found.pages}
    assert "swallow mice whole" in pages[f"{local_web}/article"].text and pages[f"{local_web}/article"].domain == "127.0.0.1"
    assert pages[f"{local_web}/slow"].from_snippet and pages[f"{local_web}/slow"].text == "snippet of /slow"
    assert "http://169.254.169.254/latest/meta-data/" not in pages  # refused: not even its snippet
    assert LocalWeb.hits.get("/article") == 1  # the #again duplicate was not fetched twice
    assert any("search snippets were used" in w for w in found.warnings)


def test_pages_are_cached_for_the_ttl(local_web, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'cache.db'}")
    LocalWeb.results = results(local_web, "/article")
    web_search("owls", options=options(local_web), store=store)
    again = web_search("owls", options=options(local_web), store=store)
    assert LocalWeb.hits["/article"] == 1 and "swallow mice whole" in again.pages[0].text
    web_search("owls", options=options(local_web, cache_ttl=0.0), store=store)
    assert LocalWeb.hits["/article"] == 2  # expired: fetched again


def test_searxng_errors_are_typed_and_the_step_goes_on(local_web):
    LocalWeb.search_status = 403
    with pytest.raises(ProviderError, match="json"):
        searxng("owls", options(local_web), 2.0)
    found = web_search("owls", options=options(local_web))
    assert found.pages == [] and found.warnings[0].startswith("Web search failed")
    LocalWeb.search_status = 429
    with pytest.raises(RateLimitedError):
        searxng("owls", options(local_web), 2.0)
    with pytest.raises(ProviderError, match="Cannot reach SearXNG"):
        searxng("owls", options("http://127.0.0.1:9"), 2.0)
    with pytest.raises(ProviderError, match="MOERAG_SEARXNG_URL"):
        searxng("owls", options(local_web, searxng_url=""), 2.0)


class FakeDDGS:
    rows: list[dict] = []
    error: Exception | None = None
    calls: list[dict] = []

    def __init__(self, timeout=None):
        self.timeout = timeout

    def text(self, query, **kwargs):
        FakeDDGS.calls.append({"query": query, **kwargs})
        if FakeDDGS.error:
            raise FakeDDGS.error
        return FakeDDGS.rows


def test_ddgs_adapter_maps_results_and_translates_errors(monkeypatch):
    import ddgs
    from ddgs.exceptions import DDGSException, RatelimitException, TimeoutException

    monkeypatch.setattr(ddgs, "DDGS", FakeDDGS)
    FakeDDGS.rows = [{"title": "Owls", "href": "https://owls.example/a", "body": "All about owls"},
                     {"title": "No link", "body": "dropped"},
                     {"title": "Bats", "href": "https://bats.example/", "body": "Bats too"}]
    FakeDDGS.error = None
    got = duckduckgo("owls", WebOptions(region="de-de", safesearch="off", max_results=5), 3.0)
    assert [(r.url, r.title, r.snippet, r.rank) for r in got] == [
        ("https://owls.example/a", "Owls", "All about owls", 1), ("https://bats.example/", "Bats", "Bats too", 3)]
    assert FakeDDGS.calls[-1] == {"query": "owls", "region": "de-de", "safesearch": "off", "max_results": 5}
    for error, kind, words in ((RatelimitException("202 Ratelimit"), RateLimitedError, "rate-limiting"),
                               (TimeoutException("slow"), WebTimeoutError, "did not answer"),
                               (DDGSException("offline"), ProviderError, "Is this machine online")):
        FakeDDGS.error = error
        with pytest.raises(kind, match=words):
            duckduckgo("owls", WebOptions(), 3.0)
