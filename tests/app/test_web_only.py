"""Web-only questions on a fresh install: with the web on, a knowledge base (or collection) that
does not exist yet is searched as empty, with a note, by `moerag search`, `moerag ask` and the API;
without the web the clear "No collection" error stays. Against a local SearXNG and page."""

from __future__ import annotations

import json

import httpx
import pytest

from app.settings import Settings
from tests.retrieval.web.conftest import LocalWeb, serve_local_web
from tests.servers import serve_app

QUESTION = "What do barn owls do with their pellets of bone and fur?"
NOTE = "No knowledge base collection 'default' yet; "


@pytest.fixture
def web(monkeypatch):
    """The local web, with its article as the only search result, and the settings pointing at it."""
    with serve_local_web() as url:
        LocalWeb.results = [{"url": f"{url}/article", "title": "Owls of Europe", "content": "owls"}]
        for key, value in {"MOERAG_WEB_PROVIDER": "searxng", "MOERAG_SEARXNG_URL": url,
                           "MOERAG_WEB_ALLOWLIST": "127.0.0.1/32", "MOERAG_WEB_TIMEOUT": "10",
                           "MOERAG_GENERATOR": "extractive"}.items():
            monkeypatch.setenv(key, value)
        yield url


def test_search_with_the_web_on_an_empty_home(cli, web, home):
    r = cli("search", "--web", "barn owl pellets", "--json")
    assert r.code == 0, r
    found = json.loads(r.stdout)
    assert found["results"] and all(x["origin"] == "web" for x in found["results"])
    assert found["results"][0]["url"] == f"{web}/article" and "pellets" in found["results"][0]["text"]
    assert any(w.startswith(NOTE + "searching the web alone") and "moerag ingest PATH" in w
               for w in found["warnings"]), found["warnings"]

    r = cli("search", "barn owl pellets", "--json")  # without the web: the clear error, as before
    assert r.code == 1 and "No collection named 'default'" in r.stderr and "moerag ingest" in r.stderr


def test_ask_with_the_web_on_an_empty_home(cli, web, home):
    r = cli("ask", "--web", QUESTION, "--json")
    assert r.code == 0, r
    answer = json.loads(r.stdout)
    assert "pellets" in answer["answer"] and answer["citations"], answer
    cited = answer["sources"][answer["citations"][0] - 1]
    assert cited["origin"] == "web" and cited["url"] == f"{web}/article"
    assert any(w.startswith(NOTE + "answering from the web alone") for w in answer["warnings"]), answer["warnings"]

    r = cli("ask", QUESTION)
    assert r.code == 1 and "No collection named 'default'" in r.stderr


def test_a_read_creates_no_collection(web, home, embedder):
    from app.service import AnswerService

    svc = AnswerService(Settings(home=home, generator="extractive"), embedder=embedder)
    svc.ask(QUESTION, web=True)
    assert svc.collections() == []


def test_api_chat_with_the_web_on_an_empty_home(web, home, embedder):
    from app.api import create_app
    from app.keys import Keys
    from app.service import AnswerService

    settings = Settings(home=home, generator="extractive", web_provider="searxng", searxng_url=web,
                        web_allowlist="127.0.0.1/32", web_timeout=10.0)
    service = AnswerService(settings, embedder=embedder)
    keys = Keys(service.kb.store)
    surfer, plain = keys.create("surfer", web=True)[1], keys.create("plain")[1]
    url, stop = serve_app(create_app(settings, service=service))
    try:
        question = {"model": "default", "messages": [{"role": "user", "content": QUESTION}]}
        with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {surfer}"}) as http:
            resp = http.post("/v1/chat/completions", json={**question, "moerag": {"web": True}})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert "pellets" in body["choices"][0]["message"]["content"]
            assert body["citations"][0]["url"] == f"{web}/article"
            assert any(w.startswith(NOTE) for w in body["moerag"]["warnings"]), body["moerag"]
            missing = http.post("/v1/chat/completions", json=question)  # web off: still a 404
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
        with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {plain}"}) as http:
            denied = http.post("/v1/chat/completions", json={**question, "moerag": {"web": True}})
            assert denied.status_code == 403 and denied.json()["error"]["code"] == "web_not_allowed"
    finally:
        stop()
    assert service.collections() == []
