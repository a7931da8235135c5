"""Live web search: providers, the private-address guard, safe fetching, extraction, a page
cache, and one ranking with the knowledge base."""

from retrieval.web.errors import ProviderError, RateLimitedError, RefusedAddressError, WebError, WebTimeoutError
from retrieval.web.providers import PROVIDERS, SearchResult, WebOptions
from retrieval.web.rank import fuse, rank_web
from retrieval.web.search import WebPage, WebResults, web_search

__all__ = [
    "PROVIDERS",
    "ProviderError",
    "RateLimitedError",
    "RefusedAddressError",
    "SearchResult",
    "WebError",
    "WebOptions",
    "WebPage",
    "WebResults",
    "WebTimeoutError",
    "fuse",
    "rank_web",
    "web_search",
]
