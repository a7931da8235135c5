"""A local web for the web-search tests: result pages and a SearXNG-compatible JSON endpoint,
served on 127.0.0.1 (allowed through the allowlist in these tests)."""

from __future__ import annotations

import io
import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

ARTICLE = (
    "<html><head><title>Owls of Europe</title><meta charset='utf-8'></head><body><nav>Home | About</nav>"
    "<article><h1>Barn owls</h1><p>Barn owls hunt small mammals at night. They swallow mice whole and cough up "
    "pellets of bone and fur a few hours later.</p><p>A barn owl pair raises four to seven owlets each year.</p>"
    "</article><footer>Copyright</footer></body></html>"
)


class LocalWeb(BaseHTTPRequestHandler):
    hits: dict[str, int] = {}
    hosts: list[str] = []
    pages: dict[str, tuple[str, bytes]] = {}  # extra pages: path -> (content type, body)
    results: list[dict] = []  # what /search returns
    search_status = 200

    def do_GET(self):  # noqa: N802
        path = urlsplit(self.path).path
        type(self).hits[path] = type(self).hits.get(path, 0) + 1
        type(self).hosts.append(self.headers.get("Host", ""))
        if path == "/search":
            q = parse_qs(urlsplit(self.path).query)
            if self.search_status != 200:
                return self._send(self.search_status, "text/plain", b"no")
            assert q.get("format") == ["json"]
            return self._send(200, "application/json", json.dumps({"query": q["q"][0], "results": self.results}).encode())
        if path == "/article":
            return self._send(200, "text/html; charset=utf-8", ARTICLE.encode())
        if path == "/slow":
            time.sleep(30)  # never answers in time
            return self._send(200, "text/html", b"<p>late</p>")
        if path == "/huge":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            chunk = b"owls " * 20000  # 100 kB
            try:
                for _ in range(200):  # 20 MB if nobody stops reading
                    self.wfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return None
        if path == "/image":
            return self._send(200, "image/png", b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
        if path == "/latin1":
            body = "<html><body><article><p>Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e: the cr\u00e8me is cooked slowly in a bain-marie for an hour.</p></article></body></html>"
            return self._send(200, "text/html; charset=iso-8859-1", body.encode("latin-1"))
        if path == "/badcharset":
            body = "<html><body><article><p>Smørrebrød is an open sandwich from Denmark, built on buttered rye bread.</p></article></body></html>"
            return self._send(200, "text/html; charset=no-such-charset", body.encode("utf-8"))
        if path.startswith("/redirect"):
            target = parse_qs(urlsplit(self.path).query)["to"][0]
            self.send_response(302)
            self.send_header("Location", target)
            self.end_headers()
            return None
        if path in self.pages:
            kind, body = self.pages[path]
            return self._send(200, kind, body)
        return self._send(404, "text/plain", b"not found")

    def _send(self, code: int, kind: str, body: bytes, headers: dict[str, str] | None = None):
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@contextmanager
def serve_local_web(handler: type[LocalWeb] = LocalWeb):
    """The local web (or a variant of it) on a free port of 127.0.0.1: its base URL while the block runs."""
    LocalWeb.hits, LocalWeb.hosts, LocalWeb.pages, LocalWeb.results, LocalWeb.search_status = {}, [], {}, [], 200
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    # Polled every 50 ms rather than 500: shutdown() waits for the next poll, once per test.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def local_web():
    with serve_local_web() as url:
        yield url


class RecordingTransport(httpx.HTTPTransport):
    """Records the host of every connection actually made."""

    def __init__(self):
        super().__init__()
        self.connected: list[str] = []

    def handle_request(self, request):
        self.connected.append(request.url.host)
        return super().handle_request(request)


@pytest.fixture
def recording_client():
    transport = RecordingTransport()
    client = httpx.Client(transport=transport, follow_redirects=False, trust_env=False)
    client.transport_record = transport
    yield client
    client.close()


def pdf_bytes(text: str) -> bytes:
    from reportlab.pdfgen import canvas

    buf = io.BytesIO()
    c = canvas.Canvas(buf)
    c.drawString(72, 720, text)
    c.save()
    return buf.getvalue()
