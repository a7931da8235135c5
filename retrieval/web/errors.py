"""Errors of the web step. Provider failures are typed so the service can say what happened
(offline, rate-limited, too slow) and answer from the knowledge base alone."""

from __future__ import annotations

from retrieval.errors import RetrievalError


class WebError(RetrievalError):
    """The web step failed."""


class ProviderError(WebError):
    """The search provider failed (unreachable, bad reply, misconfigured)."""


class RateLimitedError(ProviderError):
    """The search provider refused for now: too many requests."""


class WebTimeoutError(ProviderError):
    """The search provider did not answer within the time budget."""


class RefusedAddressError(WebError):
    """A URL that the private-address guard refuses to fetch."""
