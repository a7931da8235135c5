"""Hostile requests against a real `moerag serve`: what each costs the server, then a load phase.

    .venv/bin/python -m bench.hostile [--seconds 60] [--clients 64]     (quick: --seconds 10 --clients 16)

Targets (issue #14): the server's RSS grows by at most 50 MB per hostile request, for every
class; a request from a read-only key costs the server at most 5 s of CPU; 64 concurrent clients
for 60 s mixing search, chat (extractive), uploads and deletes get 0 5xx, lose 0 documents, and
`moerag index check` is clean afterwards.

RSS growth is the peak of the server's VmRSS, sampled every 10 ms while the request runs, less
its value before; CPU is the server's utime + stime plus that of its reaped children (parse
workers), from /proc. Baseline in the same run: an ordinary search and chat from the read-only key.
Payloads are built in memory by tests/payloads.py; the web bomb is served by a loopback page
behind a fake SearXNG.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from tests.payloads import compression_bombs, docx_bomb, multipart_file, padded_chat, slow_pdf
from tests.servers import REPO, MoeragServer

MB = 2**20
RSS_TARGET_MB, CPU_TARGET_S = 50.0, 5.0
COLLECTION = "default"
TOPICS = ["green tea", "night trains", "honey bees", "sourdough bread", "tidal power", "glass blowing",
          "chess openings", "volcanic soil", "river deltas", "paper making"]


# --- the load mix (also run by tests/app/test_api_stress.py) -----------------------------------------------


def word(rng: random.Random) -> str:
    """A made-up word: a tag no other document holds."""
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(4))


def base_records(rng: random.Random) -> list[tuple[str, str, str]]:
    """One short document per topic, (source, title, text): what the clients search and ask about."""
    return [(f"base:{i}", t.title(), f"Notes on {t}. " + " ".join(f"{t} fact {j}: {word(rng)} {word(rng)}."
                                                                  for j in range(12)))
            for i, t in enumerate(TOPICS)]


@dataclass
class Tally:
    """What the clients saw: statuses per operation, errors, and the uploads that succeeded."""

    statuses: Counter = field(default_factory=Counter)  # (operation, status) -> count
    errors: list[str] = field(default_factory=list)
    uploaded: set[str] = field(default_factory=set)  # tags whose upload answered "added"
    deleted: set[str] = field(default_factory=set)  # tags whose delete answered 200
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, op: str, status: int, detail: str = "") -> None:
        with self.lock:
            self.statuses[(op, status)] += 1
            if status >= 500:
                self.errors.append(f"{op}: {status} {detail[:300]}")

    def n(self, op: str | None = None, status: Callable[[int], bool] = lambda s: True) -> int:
        return sum(c for (o, s), c in self.statuses.items() if (op is None or o == op) and status(s))

    def summary(self) -> str:
        return ", ".join(f"{op} {status}: {n}" for (op, status), n in sorted(self.statuses.items()))


def client_loop(url: str, key: str, seed: int, deadline: float, tally: Tally) -> None:
    """One client until `deadline`: searches, chats (plain and streamed), uploads, and deletes of its own
    uploads. A 5xx, a stream's error event, a dropped connection or a search showing a document this
    client deleted before it began is an error; 409 (the write lock was held) and 429 are counted."""
    rng = random.Random(seed)
    mine: dict[str, int] = {}  # tag -> document id: this client's uploads, not deleted yet
    gone: set[str] = set()  # tags this client deleted (committed before its later searches)
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
    n = 0
    while time.monotonic() < deadline:
        op = rng.choices(["search", "chat", "stream", "upload", "delete"], [35, 15, 15, 20, 15])[0]
        try:
            if op == "search":
                r = http.post("/v1/search", json={"query": f"{rng.choice(TOPICS)} quarterly report", "k": 8,
                                                  "collection": COLLECTION})
                tally.count(op, r.status_code, r.text)
                if r.status_code == 200:
                    shown = {t for hit in r.json() for t in gone if t in hit["document"]["title"] + hit["document"]["source"]}
                    if shown:
                        tally.errors.append(f"search showed documents deleted before it began: {sorted(shown)}")
            elif op in ("chat", "stream"):
                body = {"model": COLLECTION, "stream": op == "stream",
                        "messages": [{"role": "user", "content": f"What do the notes say about {rng.choice(TOPICS)}?"}]}
                if op == "chat":
                    r = http.post("/v1/chat/completions", json=body)
                    tally.count(op, r.status_code, r.text)
                else:
                    with http.stream("POST", "/v1/chat/completions", json=body) as r:
                        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
                    tally.count(op, r.status_code)
                    failed = [e for e in events if e != "[DONE]" and "error" in json.loads(e)]
                    if r.status_code == 200 and (failed or events[-1:] != ["[DONE]"]):
                        tally.errors.append(f"stream: {failed[:1] or events[-2:]}")
            elif op == "upload":
                n += 1
                tag = f"upl{seed}x{n}{word(rng)}"
                text = f"# Upload {tag}\n\nThe quarterly report on {rng.choice(TOPICS)} mentions {tag} twice: {tag}.\n"
                r = http.post(f"/v1/collections/{COLLECTION}/documents", files={"files": (f"{tag}.md", text.encode())})
                tally.count(op, r.status_code, r.text)
                if r.status_code == 200:
                    result = r.json()["results"][0]
                    if result["status"] != "added":
                        tally.errors.append(f"upload of {tag}: {result}")
                        continue
                    with tally.lock:
                        tally.uploaded.add(tag)
                    docs = http.get(f"/v1/collections/{COLLECTION}/documents")
                    tally.count("list", docs.status_code, docs.text)
                    ids = [d["id"] for d in docs.json() if tag in d["title"] + d["source"]] if docs.status_code == 200 else []
                    if len(ids) == 1:
                        mine[tag] = ids[0]
                    elif docs.status_code == 200:
                        tally.errors.append(f"upload {tag} answered 'added' but is listed {len(ids)} times")
            elif mine:
                tag = rng.choice(sorted(mine))
                r = http.delete(f"/v1/collections/{COLLECTION}/documents/{mine[tag]}")
                tally.count(op, r.status_code, r.text)
                if r.status_code == 200:
                    del mine[tag]
                    gone.add(tag)
                    with tally.lock:
                        tally.deleted.add(tag)
                elif r.status_code not in (409, 429):
                    tally.errors.append(f"delete of {tag}: {r.status_code} {r.text[:200]}")
        except httpx.HTTPError as exc:
            tally.errors.append(f"{op}: {exc.__class__.__name__}: {exc}")
    http.close()


def run_load(url: str, keys: list[str], *, seconds: float) -> Tally:
    """One client per key, all at once, for `seconds`."""
    tally = Tally()
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=client_loop, args=(url, key, i, deadline, tally), daemon=True)
               for i, key in enumerate(keys)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 180)
    hung = sum(t.is_alive() for t in threads)
    if hung:
        tally.errors.append(f"{hung} clients still waiting for an answer 180 s after the end")
    return tally


def lost_documents(listed: list[dict], tally: Tally) -> tuple[list[str], list[str]]:
    """(uploads that answered "added", were not deleted and are not listed once; deleted ones still listed)."""
    present = [d["title"] + d["source"] for d in listed]
    lost = sorted(t for t in tally.uploaded - tally.deleted if sum(t in p for p in present) != 1)
    undead = sorted(t for t in tally.deleted if any(t in p for p in present))
    return lost, undead


def index_check(home: Path) -> tuple[bool, str]:
    """`moerag index check --json`, as a user runs it."""
    done = subprocess.run([sys.executable, "-m", "app.cli", "index", "check", "--home", str(home), "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    try:
        ok = done.returncode == 0 and json.loads(done.stdout)["ok"]
    except (json.JSONDecodeError, KeyError):
        ok = False
    return ok, done.stdout + done.stderr


# --- measuring the server --------------------------------------------------------------------------------


class Meter:
    """The server's resident memory and CPU time, from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def cpu_s(self) -> float:
        """utime + stime + cutime + cstime: the server and its reaped children (parse workers)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")

    @contextmanager
    def measure(self) -> Iterator[dict[str, float]]:
        """{"rss_mb": peak growth, "cpu_s": CPU used} of what runs inside."""
        out: dict[str, float] = {}
        before, cpu = self.rss_mb(), self.cpu_s()
        peak, stop = [before], threading.Event()

        def sample() -> None:
            while not stop.wait(0.01):
                try:
                    peak[0] = max(peak[0], self.rss_mb())
                except OSError:
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield out
        finally:
            time.sleep(0.2)  # work the server finishes after answering (a parse worker, a stream) counts too
            stop.set()
            sampler.join()
            out["rss_mb"] = max(peak[0], self.rss_mb()) - before
            out["cpu_s"] = self.cpu_s() - cpu


# --- a fake web and raw requests (the payloads are in tests/payloads.py) ------------------------------


ARTICLE = (b"<html><head><title>Owls</title></head><body><article><h1>Barn owls</h1><p>Barn owls hunt small "
           b"mammals at night and swallow them whole, then cough up pellets of bone and fur.</p></article></body></html>")


class FakeWeb(BaseHTTPRequestHandler):
    """A SearXNG JSON endpoint whose one result is `target` (an article, or a gzip-gzip bomb), on 127.0.0.1."""

    bomb = b""
    base = ""
    target = "/article"

    def do_GET(self) -> None:  # noqa: N802
        path = urlsplit(self.path).path
        if path == "/search":
            body = json.dumps({"results": [{"url": f"{self.base}{self.target}", "title": "Owls", "content": "owls"}]})
            self._send(body.encode(), {"Content-Type": "application/json"})
        elif path == "/article":
            self._send(ARTICLE, {"Content-Type": "text/html; charset=utf-8"})
        elif path == "/bomb":
            self._send(self.bomb, {"Content-Type": "text/html", "Content-Encoding": "gzip, gzip"})
        else:
            self.send_error(404)

    def _send(self, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(200)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def raw_request(port: int, path: str, headers: dict[str, str], body: Iterator[bytes], *, chunked: bool = False,
                timeout: float = 120) -> str:
    """Send a request body block by block, stopping as soon as the server answers; its status (or why none)."""
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()] + (["Transfer-Encoding: chunked"] if chunked else [])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        try:
            for block in body:
                if select.select([s], [], [], 0)[0]:
                    break  # answered before the body was sent
                s.sendall(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
            else:
                if chunked:
                    s.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        except socket.timeout:
            return "stalled"
        reply = b""
        try:
            while b"\r\n" not in reply:
                more = s.recv(65536)
                if not more:
                    break
                reply += more
        except (ConnectionResetError, socket.timeout):
            pass
    return reply.split()[1].decode() if reply.startswith(b"HTTP/") else "no reply"


# --- the run ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    key: str  # none | read-only | write | web
    status: str
    rss_mb: float
    cpu_s: float
    baseline: bool = False
    note: str = ""  # an upload's per-file reason

    @property
    def passed(self) -> bool:
        return self.rss_mb <= RSS_TARGET_MB and (self.key not in ("none", "read-only") or self.cpu_s <= CPU_TARGET_S)


def hostile_rows(server: MoeragServer, keys: dict[str, str], web_ok: bool) -> list[Row]:
    meter = Meter(server.pid)
    rows: list[Row] = []

    def http(key: str | None) -> httpx.Client:
        return httpx.Client(base_url=server.url, timeout=600,
                            headers={"Authorization": f"Bearer {keys[key]}"} if key else {})

    def row(name: str, key: str, send: Callable[[], object], *, baseline: bool = False) -> None:
        note, result = "", None
        with meter.measure() as got:
            try:
                result = send()
                status = str(result.status_code) if isinstance(result, httpx.Response) else str(result)
            except httpx.HTTPError as exc:
                status = exc.__class__.__name__
        if isinstance(result, httpx.Response) and result.status_code == 200 and "/documents" in str(result.url):
            first = result.json()["results"][0]
            status, note = f"200 {first['status']}", first["error"] or ""
        rows.append(Row(name, key, status, got["rss_mb"], got["cpu_s"], baseline, note))

    auth = {"Authorization": f"Bearer {keys['reader']}"}
    chat = {"model": COLLECTION, "messages": [{"role": "user", "content": "What do the notes say about green tea?"}]}
    size = 300 * MB
    row("ordinary search", "read-only", lambda: http("reader").post("/v1/search", json={"query": "green tea"}), baseline=True)
    row("ordinary chat", "read-only", lambda: http("reader").post("/v1/chat/completions", json=chat), baseline=True)
    row("300 MB JSON body, no key", "none", lambda: raw_request(
        server.port, "/v1/chat/completions", {"Content-Type": "application/json", "Content-Length": str(size)},
        padded_chat(size)))
    row("300 MB JSON body", "read-only", lambda: raw_request(
        server.port, "/v1/chat/completions",
        {**auth, "Content-Type": "application/json", "Content-Length": str(size)}, padded_chat(size)))
    row("300 MB chunked JSON body", "read-only", lambda: raw_request(
        server.port, "/v1/chat/completions", {**auth, "Content-Type": "application/json"}, padded_chat(size),
        chunked=True))
    body, total, kind = multipart_file("big.txt", size)
    row("300 MB multipart upload, no key", "none", lambda: raw_request(
        server.port, f"/v1/collections/{COLLECTION}/documents", {"Content-Type": kind, "Content-Length": str(total)}, body))
    bomb = docx_bomb(400)
    row(f".docx zip bomb ({len(bomb) // 1024} kB -> 400 MB)", "write", lambda: http("admin").post(
        f"/v1/collections/{COLLECTION}/documents", files={"files": ("bomb.docx", bomb)}))
    pdf = slow_pdf()
    row(f"expensive tiny PDF ({len(pdf) // 1024} kB)", "write", lambda: http("admin").post(
        f"/v1/collections/{COLLECTION}/documents", files={"files": ("slow.pdf", pdf)}))
    if web_ok:
        row("ordinary web chat (one article)", "web", lambda: http("web").post(
            "/v1/chat/completions", json={**chat, "moerag": {"web": True}}), baseline=True)
        FakeWeb.target = "/bomb"
        row(f"gzip-gzip web page ({len(FakeWeb.bomb)} B -> 256 MB) via chat", "web", lambda: http("web").post(
            "/v1/chat/completions", json={**chat, "moerag": {"web": True}}))
    else:  # TODO(#14): drop this branch once `moerag keys create --web` (Keys.create(web=True)) is in
        rows.append(Row("gzip-gzip web page via chat: no --web keys yet", "web", "skipped", 0.0, 0.0))
    row('"collections": ["default"] x 10000', "read-only", lambda: http("reader").post(
        "/v1/chat/completions", json={**chat, "moerag": {"collections": [COLLECTION] * 10000}}))
    text = "Barn owls hunt small mammals at night and swallow them whole. " * 8  # ~500 characters
    row("2048 embedding inputs", "read-only", lambda: http("reader").post(
        "/v1/embeddings", json={"input": [text] * 2048}))
    row("100k messages", "read-only", lambda: http("reader").post(
        "/v1/chat/completions", json={"model": COLLECTION, "messages": [{"role": "user", "content": "hi"}] * 100_000}))
    row("k and max_tokens huge (chat)", "read-only", lambda: http("reader").post(
        "/v1/chat/completions", json={**chat, "max_tokens": 10**9, "moerag": {"k": 10**9}}))
    row("k huge (search)", "read-only", lambda: http("reader").post(
        "/v1/search", json={"query": "green tea", "k": 10**9}))
    return rows


def write_lock_free(home: Path) -> bool:
    from filelock import FileLock, Timeout

    lock = FileLock(str(home / "write.lock"))
    try:
        lock.acquire(timeout=5)
    except Timeout:
        return False
    lock.release()
    return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the load phase")
    ap.add_argument("--clients", type=int, default=64, help="concurrent clients in the load phase")
    args = ap.parse_args()

    from app.keys import Keys
    from ingest.embedder import get_embedder
    from ingest.pipeline import ingest_records
    from retrieval.kb import KnowledgeBase

    FakeWeb.bomb = compression_bombs()["gzip-gzip"]
    web = ThreadingHTTPServer(("127.0.0.1", 0), FakeWeb)
    web.daemon_threads = True
    FakeWeb.base = f"http://127.0.0.1:{web.server_address[1]}"
    threading.Thread(target=web.serve_forever, daemon=True).start()

    with tempfile.TemporaryDirectory(prefix="moerag-bench-hostile-") as tmp:
        home = Path(tmp) / "home"
        kb = KnowledgeBase(home)
        records = base_records(random.Random(1))
        ingest_records(kb, get_embedder(), records, collection=COLLECTION)
        keys_db = Keys(kb.store)
        web_ok = "web" in inspect.signature(Keys.create).parameters
        keys = {
            "admin": keys_db.create("admin")[1],
            "reader": keys_db.create("read-only, scoped", collections=[COLLECTION], read_only=True)[1],
            "widget": keys_db.create("widget", collections=[COLLECTION], read_only=True)[1],
        }
        if web_ok:
            keys["web"] = keys_db.create("web", web=True)[1]
        clients = [keys_db.create(f"load client {i}")[1] for i in range(args.clients)]
        env = {"MOERAG_GENERATOR": "extractive", "MOERAG_WEB_PROVIDER": "searxng", "MOERAG_SEARXNG_URL": FakeWeb.base,
               "MOERAG_WEB_ALLOWLIST": "127.0.0.1/32", "TMPDIR": tmp}
        with MoeragServer(home, env=env) as server:
            warm = httpx.post(f"{server.url}/v1/search", json={"query": "green tea"}, timeout=120,
                              headers={"Authorization": f"Bearer {keys['widget']}"})
            assert warm.status_code == 200, warm.text  # the embedder is loaded before anything is measured
            rows = hostile_rows(server, keys, web_ok)
            lock_free = write_lock_free(home)
            docs_before = {d["source"] for d in httpx.get(
                f"{server.url}/v1/collections/{COLLECTION}/documents", timeout=60,
                headers={"Authorization": f"Bearer {keys['admin']}"}).json()}
            rss_before = server.rss_mb()
            t0 = time.monotonic()
            tally = run_load(server.url, clients, seconds=args.seconds)
            wall = time.monotonic() - t0
            listed = httpx.get(f"{server.url}/v1/collections/{COLLECTION}/documents", timeout=120,
                               headers={"Authorization": f"Bearer {keys['admin']}"}).json()
            rss_after = server.rss_mb()
        ok, check_out = index_check(home)
    web.shutdown()

    base_lost = sorted(f"base:{i}" for i in range(len(records)) if f"base:{i}" not in docs_before)
    lost, undead = lost_documents(listed, tally)
    n5xx = tally.n(status=lambda s: s >= 500)
    print(f"load average {os.getloadavg()[0]:.2f}; server RSS {rss_before:.0f} MB before the load phase\n")
    print(f"{'class':48s}{'key':>10s}{'status':>12s}{'RSS +MB':>9s}{'CPU s':>8s}  {'result'}")
    for r in rows:
        result = "baseline" if r.baseline else ("-" if r.status == "skipped" else "pass" if r.passed else "MISS")
        print(f"{r.name:48s}{r.key:>10s}{r.status:>12s}{r.rss_mb:9.1f}{r.cpu_s:8.2f}  {result}")
    print(f"{'targets':48s}{'':>10s}{'':>12s}{RSS_TARGET_MB:9.0f}{CPU_TARGET_S:8.0f}  (CPU: requests with no key or a read-only one)")
    for r in rows:
        if r.note:
            print(f"  {r.name}: {r.note[:200]}")
    print(f"\nafter the hostile requests: write lock free {'yes' if lock_free else 'NO'}; "
          f"documents stored before lost: {len(base_lost)}")
    requests = tally.n() - tally.n("list")
    print(f"\nload: {args.clients} clients x {args.seconds:g} s: {requests} requests ({requests / wall:.1f}/s), "
          f"5xx {n5xx} (target 0), errors {len(tally.errors)}, lost documents {len(lost)} (target 0), "
          f"deleted but listed {len(undead)}, index check {'clean' if ok else 'NOT CLEAN'}; "
          f"server RSS {rss_before:.0f} -> {rss_after:.0f} MB")
    print(f"  uploads: {tally.n('upload', lambda s: s == 200)} ok, {tally.n('upload', lambda s: s == 409)} refused "
          f"(409 locked), {tally.n('upload', lambda s: s == 429)} rate-limited; deletes: "
          f"{tally.n('delete', lambda s: s == 200)} ok, {tally.n('delete', lambda s: s == 409)} refused (409 locked)")
    print(f"  {tally.summary()}")
    for e in tally.errors[:5]:
        print(f"  error: {e[:300]}")
    if not ok:
        print(check_out[-2000:])


if __name__ == "__main__":
    main()
