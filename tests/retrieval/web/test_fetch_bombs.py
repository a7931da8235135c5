"""Compressed bombs served on 127.0.0.1: whatever the Content-Encoding (stacked ones included), a
fetched page is cut at the byte cap, quickly, without the decompressed whole ever being in memory;
ordinary compressed pages still decode, and encodings we cannot undo are refused with a reason."""

from __future__ import annotations

import gzip
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import pytest

from retrieval.web.extract import extract
from retrieval.web.fetch import ACCEPT_ENCODING, FetchError, Limits, fetch, new_client
from retrieval.web.guard import Allowlist
from tests.payloads import compression_bombs
from tests.retrieval.web.conftest import ARTICLE, LocalWeb, serve_local_web

LOCAL = Allowlist.parse("127.0.0.1/32")
BOMB_MB = 256  # decompressed size of every bomb below
MEMORY_BOUND = 50 * 2**20  # what one fetch may allocate at its peak, bomb or not


class Encoded(LocalWeb):
    """Serves `encoded[path] = (content encoding, body)`, the body as given, and records the
    Accept-Encoding of every request."""

    encoded: dict[str, tuple[str, bytes]] = {}
    accept_encoding: list[str] = []

    def do_GET(self):  # noqa: N802
        type(self).accept_encoding.append(self.headers.get("Accept-Encoding", ""))
        encoding, body = self.encoded[urlsplit(self.path).path]
        kind = "text/html" if b"<html>" in body[:100] else "text/plain"
        self._send(200, kind, body, {"Content-Encoding": encoding})


@contextmanager
def serve(pages: dict[str, tuple[str, bytes]]) -> Iterator[str]:
    Encoded.encoded, Encoded.accept_encoding = pages, []
    with serve_local_web(Encoded) as url:
        yield url


@pytest.fixture
def client():
    with new_client() as c:
        yield c


@pytest.fixture(scope="module")
def bombs() -> dict[str, tuple[str, bytes]]:
    bomb = compression_bombs(BOMB_MB)
    assert len(bomb["gzip-gzip"]) < 4096  # hundreds of bytes on the wire, as in the report
    return {
        "/gzip-gzip": ("gzip, gzip", bomb["gzip-gzip"]),
        "/gzip": ("gzip", bomb["gzip"]),
        "/deflate-zlib": ("deflate", bomb["deflate-zlib"]),
        "/deflate-raw": ("deflate", bomb["deflate-raw"]),
    }


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/gzip-gzip", "/gzip", "/deflate-zlib", "/deflate-raw"])
def test_bombs_are_cut_at_the_cap_without_inflating_in_memory(bombs, path, client):
    limits = Limits(max_bytes=2 * 2**20)
    with serve(bombs) as url:
        tracemalloc.start()
        try:
            start = time.monotonic()
            page = fetch(f"{url}{path}", client, allow=LOCAL, limits=limits)
            elapsed = time.monotonic() - start
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert page.truncated and len(page.body) == limits.max_bytes
    assert page.body.count(0) == len(page.body)  # the real decoded bytes, not something else
    assert peak < MEMORY_BOUND, f"peak {peak / 2**20:.0f} MB while fetching {BOMB_MB} MB of {bombs[path][0]}"
    assert elapsed < 2.0


def test_ordinary_compressed_pages_still_decode(client):
    html = ARTICLE.encode()
    raw = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    pages = {
        "/gzip": ("gzip", gzip.compress(html)),
        "/stacked": ("gzip, gzip", gzip.compress(gzip.compress(html))),
        "/deflate": ("deflate", zlib.compress(html)),
        "/deflate-raw": ("deflate", raw.compress(html) + raw.flush()),
        "/identity": ("identity", html),
    }
    with serve(pages) as url:
        for path in pages:
            page = fetch(f"{url}{path}", client, allow=LOCAL)
            assert page.body == html and not page.truncated, path
            assert "swallow mice whole" in extract(page).text
    assert set(Encoded.accept_encoding) == {ACCEPT_ENCODING}  # we only ask for what we can undo
    assert ACCEPT_ENCODING.startswith("gzip, deflate") and "zstd" not in ACCEPT_ENCODING


def test_a_page_just_under_the_cap_is_whole_and_not_truncated(client):
    text = b"owls " * 100_000  # 500 kB
    with serve({"/p": ("gzip", gzip.compress(text))}) as url:
        page = fetch(f"{url}/p", client, allow=LOCAL, limits=Limits(max_bytes=len(text) + 1))
        assert page.body == text and not page.truncated
        cut = fetch(f"{url}/p", client, allow=LOCAL, limits=Limits(max_bytes=len(text) - 1))
        assert cut.body == text[:-1] and cut.truncated


@pytest.mark.parametrize(("encoding", "body", "reason"), [
    ("zstd", b"\x28\xb5\x2f\xfd" + b"\0" * 20, "content encoding 'zstd' is not supported"),
    ("compress", b"\x1f\x9d" + b"\0" * 20, "content encoding 'compress' is not supported"),
    ("gzip, gzip, gzip, gzip", gzip.compress(gzip.compress(gzip.compress(gzip.compress(b"hi")))),
     "4 stacked content encodings"),
    ("gzip", b"\x1f\x8b\x08\x00 this is not gzip at all", "corrupt compressed body"),
], ids=["zstd", "compress", "four-stacked", "corrupt"])
def test_encodings_we_cannot_undo_are_refused_with_the_reason(encoding, body, reason, client):
    with serve({"/p": (encoding, body)}) as url:
        with pytest.raises(FetchError, match=reason):
            fetch(f"{url}/p", client, allow=LOCAL)


def test_brotli_is_decoded_only_when_it_can_be_bounded(client):
    brotli = pytest.importorskip("brotli")
    if not hasattr(brotli.Decompressor, "can_accept_more_data"):
        assert "br" not in ACCEPT_ENCODING
        return
    html = ARTICLE.encode()
    bomb = brotli.compress(bytes(BOMB_MB * 2**20 // 8))
    with serve({"/p": ("br", brotli.compress(html)), "/bomb": ("br", bomb)}) as url:
        assert fetch(f"{url}/p", client, allow=LOCAL).body == html
        tracemalloc.start()
        try:
            page = fetch(f"{url}/bomb", client, allow=LOCAL)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert page.truncated and len(page.body) == Limits().max_bytes and peak < MEMORY_BOUND
