"""The HTTP API, served by uvicorn on 127.0.0.1 and driven with the official `openai` client:
chat (plain and streamed), models, embeddings, the knowledge-base endpoints, keys and scopes,
error shapes, metrics, and 16 streaming clients while an upload is ingested."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

from app.settings import Settings
from tests.servers import serve_app

DOCS = {
    "tea.md": "# Green tea\n\nGreen tea is made from Camellia sinensis leaves that are not oxidised. "
    "Steep green tea at 80 degrees Celsius for two minutes.\n",
    "trains.md": "# Night trains\n\nThe night train from Vienna to Hamburg leaves at 21:30 and arrives at 09:10. "
    "Sleeper cabins hold up to six passengers.\n",
}
OTHER = {"bees.md": "# Bees\n\nA honey bee colony has one queen, thousands of workers and a few hundred drones.\n"}


class Served:
    def __init__(self, url: str, keys: dict[str, str], service, home):
        self.url, self.keys, self.service, self.home = url, keys, service, home

    def client(self, key: str = "admin") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.keys.get(key, key), max_retries=0, timeout=60)

    def http(self, key: str | None = "admin") -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[key]}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def served(tmp_path_factory, embedder):
    from app.api import create_app
    from app.keys import Keys
    from app.service import AnswerService
    from ingest.pipeline import ingest_paths
    from retrieval.kb import KnowledgeBase

    root = tmp_path_factory.mktemp("api")
    for coll, docs in (("default", DOCS), ("bees", OTHER)):
        folder = root / coll
        folder.mkdir()
        for name, text in docs.items():
            (folder / name).write_text(text)
    # One key runs 17 requests at once in the load test below; per-key limits have their own tests
    # (test_api_hostile.py).
    settings = Settings(home=root / "home", api_max_concurrent=0, api_rate_per_minute=0)
    kb = KnowledgeBase(settings.home)
    ingest_paths(kb, embedder, [root / "default"], collection="default")
    ingest_paths(kb, embedder, [root / "bees"], collection="bees")
    service = AnswerService(settings, kb=kb, embedder=embedder)
    keys = Keys(kb.store)
    plain = {
        "admin": keys.create("admin")[1],
        "reader": keys.create("default reader", collections=["default"], read_only=True)[1],
        "bees": keys.create("bee keeper", collections=["bees"])[1],
    }
    url, stop = serve_app(create_app(settings, service=service))
    yield Served(url, plain, service, settings.home)
    stop()


# --- chat ----------------------------------------------------------------------------------------------


def test_chat_completion_cites_sources(served):
    resp = served.client().chat.completions.create(
        model="default", messages=[{"role": "user", "content": "At what temperature should green tea steep?"}]
    )
    msg = resp.choices[0].message
    assert resp.object == "chat.completion" and resp.model == "default"
    assert "80 degrees" in msg.content and "[1]" in msg.content
    extra = resp.model_extra
    assert extra["citations"][0]["title"] == "Green tea" and extra["citations"][0]["n"] == 1
    assert extra["moerag"]["cited"][0] == 1 and extra["moerag"]["generator"] == "extractive"
    assert resp.usage.total_tokens >= resp.usage.prompt_tokens > 0


def test_streamed_chat_matches_the_plain_answer(served):
    question = [{"role": "user", "content": "When does the night train leave Vienna?"}]
    plain = served.client().chat.completions.create(model="default", messages=question).choices[0].message.content
    chunks = list(served.client().chat.completions.create(model="default", messages=question, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == plain and "21:30" in text
    last = chunks[-1]
    assert last.choices[0].finish_reason == "stop"
    assert last.model_extra["citations"][0]["title"] == "Night trains"


def test_history_and_options_reach_the_service(served):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me about the night train from Vienna."},
        {"role": "assistant", "content": "It goes to Hamburg [1]."},
        {"role": "user", "content": "When does it arrive?"},
    ]
    resp = served.client().chat.completions.create(
        model="default", messages=messages, extra_body={"moerag": {"k": 1, "mode": "hybrid"}}
    )
    assert "09:10" in resp.choices[0].message.content
    assert len(resp.model_extra["citations"]) == 1  # k=1


def test_models_are_the_collections_a_key_may_use(served):
    assert {m.id for m in served.client().models.list()} == {"default", "bees"}
    assert [m.id for m in served.client("reader").models.list()] == ["default"]


# --- errors and access -----------------------------------------------------------------------------


def test_errors_have_openai_shape_and_keys_are_enforced(served):
    with pytest.raises(openai.AuthenticationError) as exc:
        served.client("mrg_not-a-key").models.list()
    assert exc.value.status_code == 401 and "Invalid or revoked" in exc.value.body["message"]
    raw = httpx.get(f"{served.url}/v1/models")
    assert raw.status_code == 401 and set(raw.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError) as exc:
        served.client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.body["code"] == "model_not_found" and "GET /v1/models" in exc.value.body["message"]
    with pytest.raises(openai.PermissionDeniedError) as exc:
        served.client("bees").chat.completions.create(model="default", messages=[{"role": "user", "content": "tea?"}])
    assert "may not use collection 'default'" in exc.value.body["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        served.client().chat.completions.create(model="default", messages=[{"role": "assistant", "content": "hi"}])
    assert "last message must be a non-empty user message" in exc.value.body["message"]
    bad = served.http().post("/v1/chat/completions", json={"model": "default", "messages": "nope"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert served.http().get("/v1/nowhere").json()["error"]["code"] == "not_found"


def test_read_only_and_scoped_keys_cannot_write_elsewhere(served):
    files = {"files": ("x.md", b"# X\n\nSome text about x.\n", "text/markdown")}
    r = served.http("reader").post("/v1/collections/default/documents", files=files)
    assert r.status_code == 403 and "read-only" in r.json()["error"]["message"]
    r = served.http("bees").post("/v1/collections/default/documents", files=files)
    assert r.status_code == 403
    r = served.http("bees").delete("/v1/collections/default/documents/1")
    assert r.status_code == 403
    assert served.http("reader").post("/v1/search", json={"query": "bees", "collection": "bees"}).status_code == 403


# --- embeddings ------------------------------------------------------------------------------------------


def test_embeddings_match_the_knowledge_base_embedder(served, embedder):
    texts = ["green tea", "night trains to Hamburg"]
    want = embedder.encode(texts)
    default = served.client().embeddings.create(input=texts, model="anything")  # the client asks for base64, decodes it
    as_float = served.client().embeddings.create(input=texts, model="anything", encoding_format="float")
    for resp in (default, as_float):
        got = np.array([d.embedding for d in resp.data], dtype=np.float32)
        assert got.shape == want.shape and np.allclose(got, want, atol=1e-5)
    single = served.client().embeddings.create(input="green tea", model="x")
    assert len(single.data) == 1 and single.data[0].index == 0


# --- the knowledge base over HTTP ------------------------------------------------------------------------


def test_upload_list_search_and_delete(served, cli):
    http = served.http()
    files = [
        ("files", ("../../etc/owls.md", b"# Owls\n\nBarn owls hunt at night and swallow mice whole.\n", "text/markdown")),
        ("files", ("broken.pdf", b"%PDF-1.4 this is not really a pdf", "application/pdf")),
    ]
    r = http.post("/v1/collections/birds/documents", files=files)
    assert r.status_code == 200, r.text
    results = {x["filename"]: x for x in r.json()["results"]}
    assert results["../../etc/owls.md"]["status"] == "added" and results["../../etc/owls.md"]["chunks"] == 1
    assert results["broken.pdf"]["status"] == "failed" and results["broken.pdf"]["error"]
    docs = http.get("/v1/collections/birds/documents").json()
    owls = next(d for d in docs if d["title"] == "Owls")
    # Stored under the data directory whatever the name said, and shown by its file name, not that path
    assert owls["status"] == "ok" and owls["source"].startswith("owls-") and "/" not in owls["source"]
    assert any(p.name == owls["source"] for p in (served.home / "uploads").rglob("*"))
    hits = http.post("/v1/search", json={"query": "what do barn owls eat", "collection": "birds", "k": 3}).json()
    assert hits[0]["document"]["title"] == "Owls" and {"rank", "score", "chunk_id", "text", "page", "heading", "start", "end"} <= set(hits[0])
    assert http.delete(f"/v1/collections/birds/documents/{owls['id']}").json() == {"deleted": [owls["id"]]}
    hits = http.post("/v1/search", json={"query": "barn owls", "collection": "birds"}).json()
    assert all(h["document"]["title"] != "Owls" for h in hits)
    assert http.delete(f"/v1/collections/birds/documents/{owls['id']}").status_code == 404


def test_upload_limits(served):
    limit = served.service.settings.api_max_files
    too_many = [("files", (f"f{i}.txt", b"x", "text/plain")) for i in range(limit + 1)]
    r = served.http().post("/v1/collections/default/documents", files=too_many)
    assert r.status_code == 400 and "At most" in r.json()["error"]["message"]


# --- operations -------------------------------------------------------------------------------------------


def test_health_needs_no_key_and_metrics_count_requests(served):
    assert httpx.get(f"{served.url}/healthz").json()["status"] == "ok"
    assert httpx.get(f"{served.url}/metrics").status_code == 401
    served.client().chat.completions.create(model="default", messages=[{"role": "user", "content": "green tea?"}])
    text = served.http().get("/metrics").text
    assert 'moerag_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}' in text
    assert "moerag_http_request_seconds_bucket" in text and 'moerag_answers_total{generator="extractive"}' in text


def test_widget_script_and_demo_page(served):
    js = httpx.get(f"{served.url}/widget.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("application/javascript")
    assert "/v1/chat/completions" in js.text and "innerHTML" not in js.text  # text only, never markup
    page = httpx.get(f"{served.url}/widget/demo", params={"collection": 'x"><script>alert(1)</script>', "key": "k"})
    assert page.status_code == 200 and "<script>alert(1)</script>" not in page.text


# --- load: 16 streams while an upload is ingested ----------------------------------------------------------


def test_sixteen_streams_complete_while_an_upload_lands(served):
    questions = ["green tea temperature?", "night train arrival?", "how long to steep tea?", "sleeper cabins?"]

    def stream(i: int) -> str:
        chunks = served.client().chat.completions.create(
            model="default", messages=[{"role": "user", "content": questions[i % 4]}], stream=True
        )
        parts, finished = [], False
        for c in chunks:
            parts.append(c.choices[0].delta.content or "")
            finished = finished or c.choices[0].finish_reason == "stop"
        assert finished
        return "".join(parts)

    big = "\n\n".join(f"## Part {i}\n\nHedgehogs eat beetles and worms; part {i} of a long field guide." for i in range(400))
    with ThreadPoolExecutor(17) as pool:
        upload = pool.submit(
            served.http().post, "/v1/collections/field/documents",
            files={"files": ("hedgehogs.md", ("# Hedgehogs\n\n" + big).encode(), "text/markdown")},
        )
        answers = list(pool.map(stream, range(16)))
        landed = upload.result()
    assert all("[1]" in a for a in answers) and len(answers) == 16
    assert landed.status_code == 200 and landed.json()["results"][0]["status"] == "added"
    hits = served.http().post("/v1/search", json={"query": "what do hedgehogs eat", "collection": "field"}).json()
    assert hits and hits[0]["document"]["title"] == "Hedgehogs"


# --- keys on the command line -------------------------------------------------------------------------------


def test_keys_cli_prints_the_plaintext_once_alone_on_the_last_line(cli, home):
    res = cli("keys", "create", "--name", "wiki bot", "--collections", "handbook,wiki", "--read-only")
    assert res.code == 0, res
    plaintext = res.stdout.strip().splitlines()[-1]
    assert plaintext.startswith("mrg_") and len(plaintext) > 40 and res.stdout.strip() == plaintext
    listed = cli("keys", "list", "--json")
    rows = json.loads(listed.stdout)
    assert rows[0]["name"] == "wiki bot" and rows[0]["collections"] == ["handbook", "wiki"] and rows[0]["read_only"]
    assert plaintext not in listed.stdout
    from app.keys import Keys
    from retrieval.store import Store

    keys = Keys(Store(f"sqlite:///{home / 'moerag.db'}"))
    assert keys.verify(plaintext).name == "wiki bot"
    assert cli("keys", "revoke", "wiki bot").code == 0
    assert keys.verify(plaintext) is None
    assert cli("keys", "revoke", "nobody").code == 1


def test_cors_origins_come_from_settings(served):
    from fastapi.testclient import TestClient

    from app.api import create_app

    settings = served.service.settings.replace(api_cors_origins="http://intranet.example, http://wiki.example")
    client = TestClient(create_app(settings, service=served.service))
    headers = {"Origin": "http://wiki.example", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization,content-type"}
    ok = client.options("/v1/chat/completions", headers=headers)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://wiki.example"
    other = client.options("/v1/chat/completions", headers={**headers, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    plain = TestClient(create_app(served.service.settings, service=served.service))
    assert "access-control-allow-origin" not in plain.options("/v1/chat/completions", headers=headers).headers
