"""Fetching one page safely: every redirect hop checked by the guard, the connection made to the
address that was checked (no second DNS lookup), limits on time, size and content type.

The request goes to http(s)://<checked ip>:<port>/path with the original Host header, and for
https the original name as TLS SNI and certificate name, so virtual hosts and certificates
work while DNS cannot change between the check and the connection.

Content-Encoding is undone here, in bounded steps, not by httpx: httpx inflates each network
chunk whole, so a few hundred bytes of `gzip, gzip` become hundreds of MB before any size check.
"""

from __future__ import annotations

import itertools
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import ModuleType
from urllib.parse import urljoin, urlsplit

import httpx

from retrieval.web.errors import WebError
from retrieval.web.guard import Allowlist, Resolver, check, resolve

ALLOWED_TYPES = ("text/html", "application/xhtml+xml", "text/plain", "application/pdf")
MAX_REDIRECTS = 5
USER_AGENT = "Mozilla/5.0 (compatible; moerag/0.1; self-hosted RAG)"
STEP = 64 * 1024  # bytes one decoding stage hands on per step, however dense its input
MAX_ENCODINGS = 3  # stacked content encodings accepted ("gzip, gzip" is two)


def _bounded_brotli() -> ModuleType | None:
    """The brotli module, if installed and new enough to bound one call's output (brotli >= 1.2;
    older releases inflate a whole meta-block per call, up to 16 MiB)."""
    try:
        import brotli
    except ImportError:
        return None
    return brotli if hasattr(brotli.Decompressor, "can_accept_more_data") else None


_brotli = _bounded_brotli()


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
        headers = {"Host": _host_header(current), "User-Agent": USER_AGENT, "Accept": ", ".join(limits.content_types),
                   "Accept-Encoding": ACCEPT_ENCODING}  # only what _decoded can undo within the cap
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
                body, truncated = _read_body(resp, limits, end)
                return Fetched(url, current, media, charset, body, truncated)
        except httpx.TimeoutException as exc:
            raise FetchError(f"timed out after {limits.page_timeout:g} s") from exc
        except httpx.HTTPError as exc:
            raise FetchError(f"could not connect: {exc.__class__.__name__}: {exc}") from exc
    raise FetchError(f"more than {MAX_REDIRECTS} redirects")


def _read_body(resp: httpx.Response, limits: Limits, end: float) -> tuple[bytes, bool]:
    """The decoded body, cut at `limits.max_bytes` (then truncated is True), read before `end`."""
    wire = _Wire(resp.iter_raw(), cap=limits.max_bytes + STEP, end=end, timeout=limits.page_timeout)
    body = bytearray()
    try:
        for piece in _decoded(wire, resp.headers.get_list("content-encoding", split_commas=True)):
            body += piece  # piece <= STEP bytes, so body never exceeds max_bytes + STEP
            if len(body) >= limits.max_bytes:
                del body[limits.max_bytes:]
                return bytes(body), True
            if time.monotonic() > end:
                raise FetchError(f"timed out after {limits.page_timeout:g} s (still reading)")
    except _DECODE_ERRORS as exc:
        raise FetchError(f"corrupt compressed body ({', '.join(resp.headers.get_list('content-encoding'))}): {exc}") from exc
    return bytes(body), wire.cut


class _Wire:
    """The body's bytes as they arrive, still encoded: checked against the deadline, and cut after
    `cap` bytes. A real page is no smaller decoded than encoded, so one whose encoded form alone
    is over the cap is over it decoded too; stopping there also ends bodies that decode to next
    to nothing (garbage after the end of a gzip stream, say) however long they run."""

    def __init__(self, chunks: Iterable[bytes], *, cap: int, end: float, timeout: float):
        self.chunks, self.cap, self.end, self.timeout = chunks, cap, end, timeout
        self.cut = False

    def __iter__(self) -> Iterator[bytes]:
        seen = 0
        for chunk in self.chunks:
            if time.monotonic() > self.end:
                raise FetchError(f"timed out after {self.timeout:g} s (still reading)")
            seen += len(chunk)
            if seen > self.cap:
                self.cut = True
                yield chunk[: len(chunk) - (seen - self.cap)]
                return
            yield chunk


# --- content encodings: each stage pulls from the one before only when it needs input ----------


def _decoded(wire: Iterable[bytes], codings: list[str]) -> Iterator[bytes]:
    """The body with its content encodings undone, in pieces of at most STEP bytes.

    Stages are generators chained last-applied-first; the reader pulls one piece at a time, so
    the memory held is about STEP per stage, whatever the compression ratio.
    """
    codings = [c.strip().lower() for c in codings if c.strip() and c.strip().lower() != "identity"]
    if len(codings) > MAX_ENCODINGS:
        raise FetchError(f"{len(codings)} stacked content encodings ({', '.join(codings)}); at most {MAX_ENCODINGS} are accepted")
    pieces: Iterator[bytes] = iter(wire)
    for coding in reversed(codings):  # the header lists them in the order they were applied
        stage = _DECODERS.get(coding)
        if stage is None:
            raise FetchError(f"content encoding '{coding}' is not supported (accepted: identity, {ACCEPT_ENCODING})")
        pieces = stage(pieces)
    return pieces


def _inflate(pieces: Iterator[bytes], wbits: int) -> Iterator[bytes]:
    """zlib's decompressobj asked for at most STEP bytes per call; input it could not take yet
    stays in `unconsumed_tail` and is offered again before more is pulled."""
    d = zlib.decompressobj(wbits)
    for data in pieces:
        while True:
            out = d.decompress(data, STEP)
            data = d.unconsumed_tail
            if out:
                yield out
            if d.eof:
                return  # bytes after the end of the stream are ignored, as browsers do
            if not data and len(out) < STEP:
                break  # all input taken and no output waiting: pull more
    # a stream cut short ends with what it had: the page is then simply shorter


def _gunzip(pieces: Iterator[bytes]) -> Iterator[bytes]:
    return _inflate(pieces, 32 + zlib.MAX_WBITS)  # 32: gzip or zlib header, whichever it is


def _deflate(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """HTTP's "deflate" is zlib-wrapped, but many servers send raw deflate: the first two bytes tell."""
    head = b""
    for data in pieces:
        head += data
        if len(head) >= 2:
            break
    wrapped = len(head) >= 2 and head[0] & 0x0F == 8 and (head[0] << 8 | head[1]) % 31 == 0
    yield from _inflate(itertools.chain([head], pieces), zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)


def _unbrotli(pieces: Iterator[bytes]) -> Iterator[bytes]:
    d = _brotli.Decompressor()
    for data in pieces:
        out = d.process(data, STEP)
        while True:
            if out:
                yield out
            if d.is_finished():
                return
            if d.can_accept_more_data() or not out:
                break
            out = d.process(b"", STEP)  # it holds more output: take it before feeding more input


_DECODERS: dict[str, Callable[[Iterator[bytes]], Iterator[bytes]]] = {
    "gzip": _gunzip,
    "x-gzip": _gunzip,
    "deflate": _deflate,
}
if _brotli is not None:
    _DECODERS["br"] = _unbrotli
ACCEPT_ENCODING = ", ".join(c for c in ("gzip", "deflate", "br") if c in _DECODERS)
_DECODE_ERRORS: tuple[type[Exception], ...] = (zlib.error,) + ((_brotli.error,) if _brotli is not None else ())


def new_client() -> httpx.Client:
    """A client that never follows redirects by itself and ignores proxy variables (a proxy would
    resolve names itself, defeating the guard)."""
    return httpx.Client(follow_redirects=False, trust_env=False, http2=False,
                        limits=httpx.Limits(max_connections=16, max_keepalive_connections=0))


