"""Search providers, a registry: query -> ranked results (url, title, snippet).

duckduckgo: the `ddgs` package (the maintained successor of duckduckgo-search).
searxng: a self-hosted SearXNG's JSON API (its settings must enable the json format).
none: no web search.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import httpx

from retrieval.web.errors import ProviderError, RateLimitedError, WebTimeoutError


@dataclass(frozen=True)
class SearchResult:
    url: str
    title: str
    snippet: str
    rank: int  # 1-based


@dataclass(frozen=True)
class WebOptions:
    provider: str = "duckduckgo"
    searxng_url: str = ""
    region: str = "us-en"
    safesearch: str = "moderate"  # on | moderate | off
    max_results: int = 5
    budget: float = 8.0  # seconds for the whole web step
    page_timeout: float = 4.0
    max_page_bytes: int = 2 * 2**20
    allowlist: str = ""  # hosts and CIDRs, comma-separated
    cache_ttl: float = 86400.0


def duckduckgo(query: str, options: WebOptions, timeout: float) -> list[SearchResult]:
    from ddgs import DDGS
    from ddgs.exceptions import DDGSException, RatelimitException, TimeoutException

    try:
        rows = DDGS(timeout=max(1, int(timeout))).text(
            query, region=options.region, safesearch=options.safesearch, max_results=options.max_results
        )
    except RatelimitException as exc:
        raise RateLimitedError(f"DuckDuckGo is rate-limiting this machine ({exc}); try again in a minute, "
                               "or use a SearXNG (MOERAG_WEB_PROVIDER=searxng).") from exc
    except TimeoutException as exc:
        raise WebTimeoutError(f"DuckDuckGo did not answer within {timeout:.0f} s ({exc}).") from exc
    except DDGSException as exc:
        raise ProviderError(f"DuckDuckGo search failed: {exc}. Is this machine online?") from exc
    out = []
    for i, row in enumerate(rows or [], 1):
        url = row.get("href") or row.get("url")
        if url:
            out.append(SearchResult(url, row.get("title") or "", row.get("body") or "", i))
    return out[: options.max_results]


_SAFE = {"off": 0, "moderate": 1, "on": 2}


def searxng(query: str, options: WebOptions, timeout: float) -> list[SearchResult]:
    if not options.searxng_url:
        raise ProviderError("MOERAG_WEB_PROVIDER=searxng needs MOERAG_SEARXNG_URL, e.g. http://searx.intranet:8080")
    base = options.searxng_url.rstrip("/")
    params = {"q": query, "format": "json", "safesearch": _SAFE.get(options.safesearch, 1)}
    if options.region and options.region != "wt-wt":
        params["language"] = options.region
    try:
        # The configured SearXNG is trusted (it is usually on the intranet): no address guard here.
        resp = httpx.get(f"{base}/search", params=params, timeout=timeout, trust_env=False,
                         headers={"Accept": "application/json"})
    except httpx.TimeoutException as exc:
        raise WebTimeoutError(f"SearXNG at {base} did not answer within {timeout:.1f} s.") from exc
    except httpx.HTTPError as exc:
        raise ProviderError(f"Cannot reach SearXNG at {base}: {exc}. Check MOERAG_SEARXNG_URL.") from exc
    if resp.status_code == 429:
        raise RateLimitedError(f"SearXNG at {base} is rate-limiting (HTTP 429); check its limiter settings.")
    if resp.status_code == 403:
        raise ProviderError(f"SearXNG at {base} refused the JSON format (HTTP 403): add 'json' to search.formats "
                            "in its settings.yml.")
    if resp.status_code >= 400:
        raise ProviderError(f"SearXNG at {base} answered HTTP {resp.status_code}.")
    try:
        rows = resp.json()["results"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ProviderError(f"SearXNG at {base} did not return JSON search results: {exc}.") from exc
    out = []
    for row in rows:
        if isinstance(row, dict) and row.get("url"):
            out.append(SearchResult(row["url"], row.get("title") or "", row.get("content") or "", len(out) + 1))
    return out[: options.max_results]


def no_search(query: str, options: WebOptions, timeout: float) -> list[SearchResult]:
    return []


PROVIDERS: dict[str, Callable[[str, WebOptions, float], list[SearchResult]]] = {
    "duckduckgo": duckduckgo,
    "searxng": searxng,
    "none": no_search,
}
