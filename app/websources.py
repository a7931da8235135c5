"""The web part of an answer: live results as numbered Sources, ranked with the knowledge base's.

Pages are searched and fetched by retrieval/web (behind the private-address guard), read by the
extractor in a contained worker under the parsing limits, cut by the knowledge base's chunker,
ranked for the question (retrieval/web/rank.py), and fused with the knowledge base's sources
into one ranking. When the web fails, the answer goes on without it, with a warning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any

from app.answers import Source
from app.settings import Settings
from ingest.chunker import chunk_document
from ingest.errors import LoadError
from ingest.isolate import runner
from ingest.limits import ParseLimits
from ingest.loaders import load_text
from retrieval.web import WebError, WebOptions, WebResults, fuse, rank_web, web_search
from retrieval.web.extract import Extracted, ExtractError, extract
from retrieval.web.fetch import Fetched
from retrieval.web.rank import Embed, WebChunk
from retrieval.web.search import Extractor

if TYPE_CHECKING:
    from ingest.embedder import Embedder
    from retrieval.search import Hit
    from retrieval.store import Store


def web_options(settings: Settings) -> WebOptions:
    s = settings
    return WebOptions(
        provider=s.web_provider,
        searxng_url=s.searxng_url,
        region=s.web_region,
        safesearch=s.web_safesearch,
        max_results=s.web_max_results,
        budget=s.web_timeout,
        page_timeout=s.web_page_timeout,
        max_page_bytes=int(s.web_max_page_mb * 2**20),
        allowlist=s.web_allowlist,
        cache_ttl=s.web_cache_ttl,
    )


def search_web(
    query: str, *, k: int, settings: Settings, store: Store, embedder: Embedder
) -> tuple[list[Source], WebResults]:
    """(web chunks ranked for `query`, best first, as Sources numbered from 1; the WebResults with
    skipped pages and warnings). Web errors become warnings: the answer goes on without the web."""
    if settings.web_provider == "none":
        return [], WebResults(
            warnings=["Web search is off (MOERAG_WEB_PROVIDER=none); answering from the knowledge base."]
        )
    try:
        found = web_search(query, options=web_options(settings), store=store, extractor=_contained_extractor(settings))
    except WebError as exc:
        found = WebResults(warnings=[f"Web search failed: {exc}"])
    chunk = partial(_chunk_page, embedder=embedder, settings=settings)
    chunks = rank_web(query, found.pages, chunk=chunk, embed=embedder.encode, k=k)
    if not chunks:
        found.warnings.append("Nothing usable came from the web; answering from the knowledge base only.")
    return [_web_source(i, c) for i, c in enumerate(chunks, 1)], found


def fuse_with_web(
    query: str, kb_sources: Sequence[Source], web_sources: Sequence[Source], *, k: int, embed: Embed
) -> list[Source]:
    """The knowledge base's sources and the web's in one ranking (see retrieval/web/rank.py), the
    best `k`, renumbered from 1 and scored by the fused score."""
    fused = fuse(query, [kb_sources, web_sources], k=k, embed=embed, text_of=lambda x: x.text, url_of=lambda x: x.url)
    return [replace(src, n=i, score=score) for i, (src, score) in enumerate(fused, 1)]


def fused_items(
    query: str, hits: Sequence[Hit], web_sources: Sequence[Source], *, k: int, embed: Embed
) -> list[dict[str, Any]]:
    """`moerag search --web --json`'s results: the knowledge base's hits and the web's sources in
    one ranking, each as Hit.to_json's keys plus `origin` (web items also `url`, `domain`,
    `fetched_at`), ranked from 1."""
    fused = fuse(
        query,
        [hits, web_sources],
        k=k,
        embed=embed,
        text_of=lambda x: x.text,
        url_of=lambda x: x.url if isinstance(x, Source) else None,
    )
    results = []
    for rank, (item, score) in enumerate(fused, 1):
        if isinstance(item, Source):
            results.append(_web_item(item, rank, score, web_rank=web_sources.index(item) + 1))
        else:
            results.append({**item.to_json(), "rank": rank, "score": round(score, 6), "origin": "kb"})
    return results


def _web_item(s: Source, rank: int, score: float, *, web_rank: int) -> dict[str, Any]:
    """A web source in the shape of Hit.to_json (no chunk, no stored document)."""
    return {
        "rank": rank,
        "score": round(score, 6),
        "chunk_id": None,
        "text": s.text,
        "document": {"id": None, "source": s.url, "title": s.title},
        "page": None,
        "heading": None,
        "start": 0,
        "end": len(s.text),
        "ranks": {"web": web_rank},
        "origin": "web",
        "url": s.url,
        "domain": s.domain,
        "fetched_at": s.fetched_at,
    }


def _contained_extractor(settings: Settings) -> Extractor:
    """The extractor web_search reads pages with: in a worker killed at the deadline, under the
    parsing limits, so a bomb or a slow PDF costs its page and never outlives the web budget."""
    limits = ParseLimits.of(settings)
    workers = runner("retrieval.web.extract", "trafilatura")
    workers.warm()  # a worker's imports overlap the search request

    def contained(page: Fetched, deadline: float) -> Extracted:
        call = partial(extract, page, max_pages=limits.max_elements, max_chars=limits.max_chars)
        try:
            return workers.run(call, limits=limits, deadline=deadline)
        except LoadError as exc:  # out of time or memory, or the parser died
            raise ExtractError(str(exc)) from exc

    return contained


def _chunk_page(title: str, text: str, *, embedder: Embedder, settings: Settings) -> list[str]:
    """A web page cut like a knowledge-base document: the same chunker and token budget."""
    e, s = embedder, settings
    doc = load_text(text, title=title or "web page", doc_type="web")
    chunks = chunk_document(
        doc,
        e.tokenizer,
        max_tokens=e.max_tokens,
        chunk_tokens=min(s.chunk_tokens, e.max_tokens),
        overlap_tokens=s.chunk_overlap,
    )
    return [c.text for c in chunks]


def _web_source(n: int, c: WebChunk) -> Source:
    return Source(
        n=n,
        text=c.text,
        title=c.page.title or c.page.domain,
        source=c.page.url,
        collection="web",
        score=c.score,
        url=c.page.url,
        origin="web",
        domain=c.page.domain,
        fetched_at=datetime.fromtimestamp(c.page.fetched_at, UTC).isoformat(timespec="seconds"),
    )
