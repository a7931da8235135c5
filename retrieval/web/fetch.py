"""Fetching one page safely: every redirect hop checked by the guard, the connection made to the
address that was checked (no second DNS lookup), limits on time, size and content type.

The request goes to http(s)://<checked ip>:<port>/path with the original Host header, and for
https the original name as TLS SNI and certificate name, so virtual hosts and certificates
work while DNS cannot change between the check and the connection.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from retrieval.web.errors import WebError
from retrieval.web.guard import Allowlist, Resolver, check, resolve

ALLOWED_TYPES = ("text/html", "application/xhtml+xml", "text/plain", "application/pdf")
MAX_REDIRECTS = 5
USER_AGENT = "Mozilla/5.0 (compatible; moerag/0.1; self-hosted RAG)"


class FetchError(WebError):
    """A page that could not be fetched; the message is the reason, for the `skipped` list."""


@dataclass(frozen=True)
class Limits:
    page_timeout: float = 4.0  # seconds for one page, all redirect hops together
    max_bytes: int = 2 * 2**20  # a larger body is cut here (its start is kept)
    content_types: tuple[str, ...] = ALLOWED_TYPES


@dataclass
class Fetched:
    url: str  # as asked
    final_url: str  # after redirects
    content_type: str  # media type, lower case
    charset: str | None  # declared charset, if any
    body: bytes
    truncated: bool


def _pinned(url: str, ip: str) -> str:
    """`url` with its host replaced by the checked address (the Host header keeps the name)."""
    parts = urlsplit(url)
    literal = f"[{ip}]" if ":" in ip else ip
    default = 443 if parts.scheme == "https" else 80
    port = parts.port or default
    netloc = literal if port == default else f"{literal}:{port}"
    return parts._replace(netloc=netloc).geturl()


def _host_header(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{parts.port}" if parts.port else host


def fetch(
    url: str,
    client: httpx.Client,
    *,
    allow: Allowlist = Allowlist(),
    limits: Limits = Limits(),
    deadline: float | None = None,
    resolver: Resolver = resolve,
) -> Fetched:
    """GET `url` within `limits` and before `deadline` (time.monotonic()); FetchError otherwise."""
    start = time.monotonic()
    end = start + limits.page_timeout if deadline is None else min(deadline, start + limits.page_timeout)
    current = url
    for _hop in range(MAX_REDIRECTS + 1):
        target = check(current, allow, resolver=resolver)  # RefusedAddressError propagates with its reason
        left = end - time.monotonic()
        if left <= 0:
            raise FetchError(f"timed out after {limits.page_timeout:g} s")
        headers = {"Host": _host_header(current), "User-Agent": USER_AGENT, "Accept": ", ".join(limits.content_types)}
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        try:
            with client.stream("GET", _pinned(current, target.ip), headers=headers, timeout=httpx.Timeout(left),
                               extensions=extensions) as resp:
                if resp.status_code in (301, 302, 303, 307, 308):
                    location = resp.headers.get("location")
                    if not location:
                        raise FetchError(f"HTTP {resp.status_code} redirect without a Location header")
                    current = urljoin(current, location)
                    continue
                if resp.status_code >= 400:
                    raise FetchError(f"HTTP {resp.status_code}")
                media, _, params = resp.headers.get("content-type", "").partition(";")
                media = media.strip().lower() or "application/octet-stream"
                if media not in limits.content_types:
                    raise FetchError(f"content type {media} is not one of {', '.join(limits.content_types)}")
                charset = None
                for p in params.split(";"):
                    name, _, value = p.strip().partition("=")
                    if name.lower() == "charset" and value:
                        charset = value.strip().strip('"').strip("'")
                body, truncated = bytearray(), False
                for piece in resp.iter_bytes():
                    body += piece
                    if len(body) >= limits.max_bytes:
                        del body[limits.max_bytes:]
                        truncated = True
                        break
                    if time.monotonic() > end:
                        raise FetchError(f"timed out after {limits.page_timeout:g} s (still reading)")
                return Fetched(url, current, media, charset, bytes(body), truncated)
        except httpx.TimeoutException as exc:
            raise FetchError(f"timed out after {limits.page_timeout:g} s") from exc
        except httpx.HTTPError as exc:
            raise FetchError(f"could not connect: {exc.__class__.__name__}: {exc}") from exc
    raise FetchError(f"more than {MAX_REDIRECTS} redirects")


def new_client() -> httpx.Client:
    """A client that never follows redirects by itself and ignores proxy variables (a proxy would
    resolve names itself, defeating the guard)."""
    return httpx.Client(follow_redirects=False, trust_env=False, http2=False,
                        limits=httpx.Limits(max_connections=16, max_keepalive_connections=0))


