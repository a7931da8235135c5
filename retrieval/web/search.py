"""The web step: search, fetch the top results concurrently, extract their text, all within one
time budget. Pages that cannot be fetched or read fall back to the search snippet (and say so);
pages the address guard refuses are left out. Every result that was refused or failed is
listed in `skipped` with its reason.

Extraction is a parameter: by default it runs in this process, where nothing can stop it at the
deadline (its result is then dropped); the service passes one that runs in a worker process
which is killed at the deadline, so no extraction outlives the budget.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from urllib.parse import urldefrag, urlsplit

from retrieval.store import Store
from retrieval.web.cache import CachedPage, PageCache
from retrieval.web.errors import ProviderError, RefusedAddressError, WebError, WebTimeoutError
from retrieval.web.extract import ExtractError, Extracted, extract
from retrieval.web.fetch import Fetched, FetchError, Limits, fetch, new_client
from retrieval.web.guard import Allowlist, Resolver, resolve
from retrieval.web.providers import PROVIDERS, SearchResult, WebOptions

log = logging.getLogger(__name__)

# (fetched page, deadline as time.monotonic()) -> its text; raises ExtractError with the reason
Extractor = Callable[[Fetched, float], Extracted]


def extract_here(page: Fetched, deadline: float) -> Extracted:
    """Extraction in this thread; it cannot be stopped at the deadline, only ignored after it."""
    return extract(page)


@dataclass
class WebPage:
    url: str
    domain: str
    title: str
    text: str
    fetched_at: float  # unix time (of the cached copy, when it came from the cache)
    rank: int  # the search result's rank
    from_snippet: bool = False  # the page could not be used; this is the search engine's snippet
    date: str | None = None


@dataclass
class WebResults:
    pages: list[WebPage] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"url", "reason"}
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _domain(url: str) -> str:
    return (urlsplit(url).hostname or "").removeprefix("www.")


def web_search(
    query: str,
    *,
    options: WebOptions,
    store: Store | None = None,
    resolver: Resolver = resolve,
    extractor: Extractor = extract_here,
) -> WebResults:
    """Search the web and read the top pages, never past `options.budget` seconds."""
    start = time.monotonic()
    deadline = start + options.budget
    out = WebResults()
    if options.provider not in PROVIDERS:
        raise WebError(f"Unknown web provider {options.provider!r}; choose one of: {', '.join(PROVIDERS)}.")
    pool = ThreadPoolExecutor(max_workers=max(2, options.max_results + 1), thread_name_prefix="moerag-web")
    try:
        try:
            results = _search(pool, query, options, deadline)
        except ProviderError as exc:
            out.warnings.append(f"Web search failed: {exc}")
            return out
        seen, unique = set(), []
        for r in results:
            key = urldefrag(r.url)[0]
            if key not in seen:
                seen.add(key)
                unique.append(r)
        cache = PageCache(store, ttl=options.cache_ttl) if store is not None else None
        allow = Allowlist.parse(options.allowlist)
        limits = Limits(page_timeout=options.page_timeout, max_bytes=options.max_page_bytes)
        client = new_client()
        jobs = {}
        for r in unique:
            cached = cache.get(r.url) if cache else None
            if cached is not None:
                out.pages.append(WebPage(r.url, _domain(cached.final_url), cached.title or r.title, cached.text,
                                         cached.fetched_at, r.rank, date=cached.date))
                continue
            jobs[pool.submit(_read, r, client, allow, limits, deadline, resolver, extractor)] = r
        done, pending = wait(jobs, timeout=max(0.0, deadline - time.monotonic()))
        for future in pending:
            future.cancel()
        for future, r in jobs.items():
            if future in pending:
                _fallback(out, r, f"did not finish within the {options.budget:g} s web budget")
                continue
            try:
                page = future.result()
            except RefusedAddressError as exc:
                out.skipped.append({"url": r.url, "reason": f"refused: {exc}"})
                continue
            except (FetchError, ExtractError) as exc:
                _fallback(out, r, str(exc))
                continue
            out.pages.append(page)
            if cache:
                cache.put(CachedPage(r.url, page.url, page.title, page.date, page.text, "", page.fetched_at))
        if not pending:
            client.close()  # with stragglers still reading, the client is left to the garbage collector
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # a straggler never holds the answer up
        out.seconds = time.monotonic() - start
    out.pages.sort(key=lambda p: p.rank)
    if any(p.from_snippet for p in out.pages):
        n = sum(p.from_snippet for p in out.pages)
        out.warnings.append(f"{n} web page(s) could not be read; their search snippets were used instead.")
    return out


def _search(pool: ThreadPoolExecutor, query: str, options: WebOptions, deadline: float) -> list[SearchResult]:
    provider = PROVIDERS[options.provider]
    left = deadline - time.monotonic()
    future = pool.submit(provider, query, options, max(left, 0.5))
    done, _ = wait([future], timeout=max(left, 0.0))
    if not done:
        raise WebTimeoutError(f"the {options.provider} search did not answer within the {options.budget:g} s budget")
    return future.result()


def _read(r: SearchResult, client, allow: Allowlist, limits: Limits, deadline: float, resolver: Resolver,
          extractor: Extractor) -> WebPage:
    fetched = fetch(r.url, client, allow=allow, limits=limits, deadline=deadline, resolver=resolver)
    try:
        page = extractor(fetched, deadline)
    except ExtractError:
        raise
    except Exception as exc:  # a parser bug costs its page, never the web step
        log.debug("extracting %s failed", r.url, exc_info=True)
        raise ExtractError(f"unreadable page ({exc.__class__.__name__}: {str(exc)[:120]})") from exc
    return WebPage(fetched.final_url, _domain(fetched.final_url), page.title or r.title, page.text, time.time(),
                   r.rank, date=page.date)


def _fallback(out: WebResults, r: SearchResult, reason: str) -> None:
    out.skipped.append({"url": r.url, "reason": reason})
    if r.snippet.strip():
        out.pages.append(WebPage(r.url, _domain(r.url), r.title, r.snippet.strip(), time.time(), r.rank, from_snippet=True))
