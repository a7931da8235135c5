"""Hostile requests against a real `moerag serve` process: bodies too large (declared or chunked),
uploads without a key or over the per-file limit, lists and counts over their caps, request
bursts and requests held open, a key asking for the web without the permission. Each asserts
the status and the error's `param`/`code`, and that the server's RSS grew by at most 50 MB and
its CPU by at most 5 s; uploads leave no file behind, and no path on the server reaches a client.
"""

from __future__ import annotations

import json
import os
import select
import socket
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from tests.payloads import MB, multipart, multipart_file, padded_chat
from tests.servers import MoeragServer

pytestmark = pytest.mark.slow  # one `moerag serve` for the module: ~30 s to start and load the embedder

RECORDS = [
    ("tea", "Green tea", "Green tea is steeped at 80 degrees Celsius for two minutes."),
    ("trains", "Night trains", "The night train from Vienna to Hamburg leaves at 21:30 and arrives at 09:10."),
]
CHAT = {"model": "default", "messages": [{"role": "user", "content": "When does the night train leave Vienna?"}]}


@pytest.fixture(scope="module")
def srv(tmp_path_factory, embedder):
    from app.keys import Keys
    from ingest.pipeline import ingest_records
    from retrieval.kb import KnowledgeBase

    root = tmp_path_factory.mktemp("hostile")
    home, tmpdir = root / "home", root / "server-tmp"
    tmpdir.mkdir()
    kb = KnowledgeBase(home)
    ingest_records(kb, embedder, RECORDS, collection="default")
    keys = Keys(kb.store)
    specs = {
        "admin": dict(web=True),
        "reader": dict(collections=["default"], read_only=True),  # what a widget gets
        "burst": {}, "slow": {}, "other": {},
    }
    plain = {name: keys.create(name, **spec)[1] for name, spec in specs.items()}
    # Small per-file and upload limits so that the tests' payloads stay small; the rest are defaults
    # (4 MB JSON bodies, 120 requests a minute and 4 in flight per key).
    env = {"MOERAG_MAX_FILE_MB": "1", "MOERAG_API_MAX_UPLOAD_MB": "8", "MOERAG_WEB_PROVIDER": "none", "MOERAG_LOCK_WAIT": "1",
           "TMPDIR": str(tmpdir)}
    with MoeragServer(home, env=env) as server:
        server.keys, server.home, server.tmpdir = plain, home, tmpdir
        http = server.http()
        assert http.post("/v1/search", json={"query": "green tea"}).status_code == 200  # loads the embedder
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
        yield server


def _http(self: MoeragServer, key: str | None = "admin") -> httpx.Client:
    headers = {"Authorization": f"Bearer {self.keys[key]}"} if key else {}
    return httpx.Client(base_url=self.url, headers=headers, timeout=60)


def _client(self: MoeragServer, key: str = "admin") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.keys[key], max_retries=0, timeout=60)


MoeragServer.http = _http  # type: ignore[attr-defined]
MoeragServer.client = _client  # type: ignore[attr-defined]


@contextmanager
def bounded(srv: MoeragServer, *, mb: float = 50, cpu_s: float = 5):
    """The request(s) inside cost the server at most `mb` of resident memory and `cpu_s` of CPU."""
    rss, cpu = srv.rss_mb(), srv.cpu_s()
    yield
    grew, used = srv.rss_mb() - rss, srv.cpu_s() - cpu
    assert grew <= mb, f"the server's RSS grew by {grew:.0f} MB"
    assert used <= cpu_s, f"the server used {used:.1f} s of CPU"


def error(r: httpx.Response) -> dict:
    return r.json()["error"]


def early_reply(srv: MoeragServer, path: str, headers: dict[str, str], first: bytes) -> tuple[int, dict, dict]:
    """POST the headers and only the start of the body, then read the reply: a server that reads
    (or parses, or spools) the body before answering never answers, and this raises a timeout."""
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{srv.port}"] + [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + first)
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536) or b"\r\n\r\n"
        head, _, body = data.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode().split("\r\n")
        got = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
        while len(body) < int(got.get("content-length", 0)):
            more = s.recv(65536)
            if not more:
                break
            body += more
    return int(status_line.split()[1]), got, json.loads(body)["error"]


def stored_uploads(srv: MoeragServer) -> list[Path]:
    return sorted(p for p in (srv.home / "uploads").rglob("*") if p.is_file()) if (srv.home / "uploads").exists() else []


def temp_traces(srv: MoeragServer) -> list[str]:
    """Files in the server's TMPDIR, and files it holds open there (unlinked temporary files too)."""
    listed = [p.name for p in srv.tmpdir.iterdir()]
    held = []
    for fd in Path(f"/proc/{srv.pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(srv.tmpdir)):
            held.append(target)
    return listed + held


# --- size before anything else -----------------------------------------------------------------------


def test_a_declared_oversized_body_is_refused_before_it_is_read(srv):
    """300 MB declared: 413 on the headers alone, with or without a key (size comes first)."""
    size = 300 * MB
    for key in (None, "reader"):
        headers = {"Content-Type": "application/json", "Content-Length": str(size)}
        if key:
            headers["Authorization"] = f"Bearer {srv.keys[key]}"
        with bounded(srv):
            status, got, err = early_reply(srv, "/v1/chat/completions", headers, b'{"model": "default"')
        assert status == 413 and err["code"] == "request_too_large" and "MOERAG_API_MAX_BODY_MB" in err["message"]
        assert got.get("connection") == "close"  # the rest is never read, not even drained
        # and as an ordinary client sees it, sending the whole body from a generator
        with bounded(srv):
            r = httpx.post(f"{srv.url}/v1/chat/completions", content=padded_chat(size), headers=headers, timeout=60)
        assert r.status_code == 413 and error(r)["code"] == "request_too_large"


def test_a_chunked_oversized_body_is_counted_and_refused(srv):
    """300 MB chunked (no Content-Length) with a valid key: 413 once 4 MB have arrived, never held."""
    started = time.monotonic()
    with bounded(srv):
        r = srv.http("reader").post("/v1/chat/completions", content=padded_chat(300 * MB),
                                    headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and error(r)["code"] == "request_too_large", r.text
    assert time.monotonic() - started < 30  # the rest was not drained either
    # The same route still answers a normal request from the same key.
    assert srv.http("reader").post("/v1/chat/completions", json=CHAT).status_code == 200


def test_the_key_is_checked_before_the_body(srv):
    """Without a key, a JSON body or a multipart upload gets 401 before it is read or spooled; a
    read-only key gets 403 on an upload before its body is read."""
    head, _, total, ctype = multipart("notes.txt", 6 * MB)
    cases = [
        ("/v1/chat/completions", {"Content-Type": "application/json", "Content-Length": str(3 * MB)}, b"{", None, 401),
        ("/v1/collections/default/documents", {"Content-Type": ctype, "Content-Length": str(total)}, head, None, 401),
        ("/v1/collections/default/documents", {"Content-Type": ctype, "Content-Length": str(total)}, head, "reader", 403),
    ]
    for path, headers, first, key, want in cases:
        if key:
            headers = {**headers, "Authorization": f"Bearer {srv.keys[key]}"}
        with bounded(srv):
            status, _, err = early_reply(srv, path, headers, first + b"x" * 65536)
        assert status == want, err
        assert err["code"] == ("invalid_api_key" if want == 401 else "read_only")
    assert temp_traces(srv) == [] and stored_uploads(srv) == []


def test_an_upload_over_the_request_limit_is_refused_whether_declared_or_chunked(srv):
    http = srv.http()
    for declared in (True, False):
        body, total, ctype = multipart_file("big.txt", 20 * MB)
        headers = {"Content-Type": ctype, **({"Content-Length": str(total)} if declared else {})}
        with bounded(srv):
            r = http.post("/v1/collections/default/documents", content=body, headers=headers)
        assert r.status_code == 413 and "MOERAG_API_MAX_UPLOAD_MB" in error(r)["message"], r.text
    assert temp_traces(srv) == [] and stored_uploads(srv) == []


def test_a_file_over_the_per_file_limit_leaves_nothing_behind(srv):
    """A 3 MB file under MOERAG_MAX_FILE_MB=1, after a good one: 413 naming it, and neither file,
    nor a partial copy, nor Starlette's spooled temporary file remains."""
    files = [("files", ("fine.md", b"# Fine\n\nA small file about herons.\n", "text/markdown")),
             ("files", ("huge.txt", b"z" * (3 * MB), "text/plain"))]
    with bounded(srv):
        r = srv.http().post("/v1/collections/herons/documents", files=files)
    assert r.status_code == 413, r.text
    err = error(r)
    assert err["param"] == "files" and err["code"] == "file_too_large"
    assert "huge.txt" in err["message"] and "MOERAG_MAX_FILE_MB" in err["message"]
    assert stored_uploads(srv) == [] and temp_traces(srv) == []
    assert "herons" not in [m.id for m in srv.client().models.list()]


def test_a_failed_file_keeps_its_reason_but_not_its_bytes(srv):
    files = [("files", ("broken.pdf", b"%PDF-1.4 not really a pdf", "application/pdf")),
             ("files", ("good.md", b"# Storks\n\nStorks nest on chimneys.\n", "text/markdown"))]
    r = srv.http().post("/v1/collections/storks/documents", files=files)
    assert r.status_code == 200, r.text
    results = {x["filename"]: x for x in r.json()["results"]}
    assert results["broken.pdf"]["status"] == "failed" and results["good.md"]["status"] == "added"
    assert str(srv.home) not in json.dumps(r.json())
    assert [p.name.split("-")[0] for p in stored_uploads(srv)] == ["good"]
    docs = srv.http().get("/v1/collections/storks/documents").json()
    assert {d["status"] for d in docs} == {"ok", "failed"}
    for d in docs:
        srv.http().delete(f"/v1/collections/storks/documents/{d['id']}")
    assert stored_uploads(srv) == []


def test_uploads_are_shown_by_file_name_and_deleting_removes_the_file(srv):
    text = b"# Kingfishers\n\nKingfishers dive for small fish from a perch above the water.\n"
    r = srv.http().post("/v1/collections/default/documents", files={"files": ("../../srv/kingfisher.md", text)})
    assert r.status_code == 200 and r.json()["results"][0]["status"] == "added", r.text
    [stored] = stored_uploads(srv)
    docs = srv.http().get("/v1/collections/default/documents").json()
    doc = next(d for d in docs if d["title"] == "Kingfishers")
    assert doc["source"] == stored.name and stored.name.startswith("kingfisher-")
    hits = srv.http().post("/v1/search", json={"query": "how do kingfishers fish"}).json()
    assert hits[0]["document"]["source"] == stored.name
    question = [{"role": "user", "content": "How do kingfishers catch fish?"}]
    plain = srv.client().chat.completions.create(model="default", messages=question)
    streamed = list(srv.client().chat.completions.create(model="default", messages=question, stream=True))
    for citations in (plain.model_extra["citations"], streamed[-1].model_extra["citations"]):
        assert citations[0]["source"] == stored.name
        assert all(str(srv.home) not in json.dumps(c) for c in citations)
    assert srv.http().delete(f"/v1/collections/default/documents/{doc['id']}").status_code == 200
    assert not stored.exists() and stored_uploads(srv) == []


def test_lock_errors_do_not_name_the_data_directory(srv):
    from retrieval.kb import KnowledgeBase

    with KnowledgeBase(srv.home).write_lock():
        r = srv.http().post("/v1/collections/default/documents", files={"files": ("wren.md", b"# Wren\n\nSmall.\n")})
        d = srv.http().delete("/v1/collections/default/documents/1")
    for resp in (r, d):
        assert resp.status_code == 409 and error(resp)["code"] == "locked"
        assert str(srv.home) not in resp.text and "write.lock" not in resp.text
    assert stored_uploads(srv) == []  # the upload that could not be ingested left nothing


# --- every list and count is capped ------------------------------------------------------------------------


def test_repeated_collections_are_searched_once(srv):
    body = {**CHAT, "moerag": {"collections": ["default"] * 10_000}}
    with bounded(srv, cpu_s=3):
        r = srv.http("reader").post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    chunks = [c["chunk_id"] for c in r.json()["citations"]]
    assert len(chunks) == len(set(chunks))
    many = {**CHAT, "moerag": {"collections": [f"c{i}" for i in range(17)]}}
    r = srv.http().post("/v1/chat/completions", json=many)
    assert r.status_code == 400 and error(r)["param"] == "moerag.collections"


def test_messages_tokens_and_k_are_capped(srv):
    http = srv.http("reader")
    flood = {"model": "default", "messages": [{"role": "user", "content": "x"}] * 100_000}  # 3 MB
    with bounded(srv):
        r = http.post("/v1/chat/completions", json=flood)
    assert r.status_code == 400 and error(r)["param"] == "messages"
    cases = {
        "messages": {**CHAT, "messages": CHAT["messages"] * 201},
        "messages ": {**CHAT, "messages": [{"role": "user", "content": "y" * 100_001}]},
        "max_tokens": {**CHAT, "max_tokens": 8193},
        "moerag.k": {**CHAT, "moerag": {"k": 51}},
    }
    for param, body in cases.items():
        with bounded(srv):
            r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and error(r)["param"] == param.strip(), (param, r.text)
    r = http.post("/v1/search", json={"query": "q" * 100_001})
    assert r.status_code == 400 and error(r)["param"] == "query"
    r = http.post("/v1/search", json={"query": "tea", "k": 101})
    assert r.status_code == 400 and error(r)["param"] == "k"


def test_embedding_inputs_are_capped_in_count_and_characters(srv):
    client = srv.client("reader")
    for texts in (["a few words"] * 257, ["a few words"] * 2049, ["w" * 50_001, "w" * 50_000]):
        with bounded(srv), pytest.raises(openai.BadRequestError) as exc:
            client.embeddings.create(input=texts, model="x")
        assert exc.value.body["param"] == "input"
    assert len(client.embeddings.create(input=["tea"] * 256, model="x").data) == 256  # at the cap: answered


# --- per-key rate and concurrency ----------------------------------------------------------------------------


def test_a_burst_over_the_rate_gets_429_with_retry_after(srv):
    http, answered = srv.http("burst"), 0
    for _ in range(200):
        r = http.get("/v1/models")
        if r.status_code != 200:
            break
        answered += 1
    assert r.status_code == 429 and error(r)["code"] == "rate_limit_exceeded"
    assert 120 <= answered <= 126  # the bucket (120 a minute) plus what refilled during the burst
    assert 1 <= int(r.headers["retry-after"]) <= 60
    client = srv.client("burst")
    with pytest.raises(openai.RateLimitError):  # the bucket refills 2 a second: a few calls empty it again
        for _ in range(10):
            client.models.list()
    assert srv.http("other").get("/v1/models").status_code == 200  # other keys are not slowed


def test_requests_in_flight_are_capped_per_key(srv):
    """Four requests whose bodies are still arriving hold the key's four slots: a fifth gets 429,
    another key does not; when they finish, the key is free again."""
    body = b'{"input": ["held open", "then finished"]}'
    head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {srv.keys['slow']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()

    def hold() -> socket.socket:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
        s.sendall(head + body[:10])  # and the rest later
        return s

    def answered(s: socket.socket) -> bool:
        return bool(select.select([s], [], [], 0)[0])

    http = srv.http("slow")
    held = [hold() for _ in range(4)]
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            time.sleep(0.2)
            # One that arrived while the probe held a slot was refused (429): send it again.
            held = [s if not answered(s) else (s.close(), hold())[1] for s in held]
            r = http.get("/v1/models")
            if r.status_code != 200:
                break
        assert r.status_code == 429 and error(r)["code"] == "rate_limit_exceeded", r.text
        assert r.headers["retry-after"] == "1" and "MOERAG_API_MAX_CONCURRENT" in error(r)["message"]
        assert srv.http("other").get("/v1/models").status_code == 200
        for s in held:
            s.sendall(body[10:])
        assert [s.recv(65536).split(b" ", 2)[1] for s in held] == [b"200"] * 4
    finally:
        for s in held:
            s.close()
    assert http.get("/v1/models").status_code == 200


# --- permissions ----------------------------------------------------------------------------------------


def test_the_web_is_a_permission_of_the_key(srv):
    ask = {**CHAT, "moerag": {"web": True}}
    with pytest.raises(openai.PermissionDeniedError) as exc:
        srv.client("reader").chat.completions.create(model="default", messages=CHAT["messages"],
                                                     extra_body={"moerag": {"web": True}})
    assert exc.value.body["param"] == "moerag.web" and "--web" in exc.value.body["message"]
    assert srv.http().post("/v1/chat/completions", json=ask).status_code == 200  # made with --web


# --- keys on the command line ---------------------------------------------------------------------------


def test_keys_web_flag_odd_ids_and_old_databases(cli, home):
    assert cli("keys", "create", "--name", "plain").code == 0
    assert cli("keys", "create", "--name", "searcher", "--web").code == 0
    rows = {r["name"]: r for r in json.loads(cli("keys", "list", "--json").stdout)}
    assert rows["plain"]["web"] is False and rows["searcher"]["web"] is True
    assert "web" in cli("keys", "list").stdout
    for odd in ("²", "١٢", "99999999999999999999999"):
        r = cli("keys", "revoke", odd)
        assert r.code == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r


def test_a_database_from_before_the_web_permission_is_upgraded_on_open(tmp_path):
    from app.keys import Keys, digest
    from retrieval.store import Store

    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:  # the api_keys table as it was, with one key in it
        conn.execute("CREATE TABLE api_keys (id INTEGER PRIMARY KEY, name VARCHAR(200), digest VARCHAR(64) UNIQUE, "
                     "hint VARCHAR(16), collections TEXT, read_only BOOLEAN, created_at DATETIME, revoked_at DATETIME)")
        conn.execute("INSERT INTO api_keys VALUES (1, 'old', ?, 'mrg_old', '[]', 0, '2024-01-01 00:00:00', NULL)",
                     (digest("mrg_old-key"),))
    keys = Keys(Store(f"sqlite:///{db}"))
    assert keys.verify("mrg_old-key").web is False
    assert keys.create("new", web=True)[0].web is True
    assert [k.name for k in Keys(Store(f"sqlite:///{db}")).list()] == ["old", "new"]  # a second open changes nothing


def test_docs_rm_deletes_stored_uploads_and_never_other_files(cli, home, kb, embedder, tmp_path):
    from app.library import ingest_uploads
    from app.settings import Settings

    mine = tmp_path / "mine" / "notes.md"
    mine.parent.mkdir()
    mine.write_text("# Notes\n\nMy own file, ingested from my folder.\n")
    assert cli("ingest", str(mine.parent)).code == 0
    ingest_uploads(kb, embedder, [("owls.md", b"# Owls\n\nOwls hunt at night.\n")], collection="default",
                   settings=Settings(home=home))
    [stored] = [p for p in (home / "uploads").rglob("*") if p.is_file()]
    ids = [str(d["id"]) for d in json.loads(cli("docs", "list", "--json").stdout)]
    assert cli("docs", "rm", *ids).code == 0
    assert not stored.exists() and mine.exists()
