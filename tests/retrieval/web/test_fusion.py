"""One ranking for the web and the knowledge base, measured on a small set of our own:
the fused top 3 finds the right passage at least as often as either source alone; web sources
carry URL, domain, title and fetch time; `moerag search --web` and `ask --web` surfaces."""

from __future__ import annotations

import json

import pytest

from app.service import AnswerService
from app.settings import Settings
from ingest.pipeline import ingest_records
from retrieval.kb import KnowledgeBase
from tests.retrieval.web.conftest import LocalWeb
from tests.retrieval.web.fusion_set import DISTRACTORS, ITEMS


def publish(local_web: str) -> None:
    """Put the set's web passages on the local web, all returned by its search endpoint."""
    web = [(t, p) for where, t, p, *_ in ITEMS if where == "web"] + [(t, p) for where, t, p in DISTRACTORS if where == "web"]
    LocalWeb.results = []
    for i, (title, passage) in enumerate(web):
        html = f"<html><head><title>{title}</title></head><body><article><h1>{title}</h1><p>{passage}</p></article></body></html>"
        LocalWeb.pages[f"/page{i}"] = ("text/html; charset=utf-8", html.encode())
        LocalWeb.results.append({"url": f"{local_web}/page{i}", "title": title, "content": passage[:60]})


@pytest.fixture
def fusion_service(tmp_path, embedder, local_web):
    publish(local_web)
    settings = Settings(home=tmp_path / "home", web_provider="searxng", searxng_url=local_web,
                        web_allowlist="127.0.0.1/32", web_max_results=len(LocalWeb.results), web_timeout=6.0)
    kb = KnowledgeBase(settings.home)
    records = [(f"kb:{i}", t, p) for i, (where, t, p, *_) in enumerate(ITEMS) if where == "kb"]
    records += [(f"kbd:{i}", t, p) for i, (where, t, p) in enumerate(DISTRACTORS) if where == "kb"]
    ingest_records(kb, embedder, records, collection="default")
    return AnswerService(settings, kb=kb, embedder=embedder)


def hit_rates(service: AnswerService, *, k: int = 3) -> dict[str, float]:
    hits = {"kb": 0, "web": 0, "fused": 0}
    for _, _, _, question, phrase in ITEMS:
        kb = service.retrieve(question, collections=["default"], k=k, mode="hybrid")
        web, _ = service.search_web(question, k=k)
        fused, _ = service.with_web(question, service.retrieve(question, collections=["default"], k=8, mode="hybrid"), k=k)
        for name, got in (("kb", kb), ("web", web), ("fused", fused)):
            hits[name] += any(phrase in s.text for s in got)
    return {name: n / len(ITEMS) for name, n in hits.items()}


def test_fused_ranking_finds_the_passage_at_least_as_often_as_either_source(fusion_service):
    rates = hit_rates(fusion_service)
    assert rates["fused"] >= max(rates["kb"], rates["web"]), rates
    assert rates["fused"] >= 0.9, rates  # each source alone can only find its own half


def test_web_sources_are_labelled_and_answers_cite_them(fusion_service, local_web):
    answer = fusion_service.ask("What does a barn owl regurgitate after eating?", web=True)
    first = answer.sources[answer.citations[0] - 1]
    assert first.origin == "web" and first.url.startswith(local_web) and first.domain == "127.0.0.1"
    assert first.title == "Barn owl - Wikipedia" and first.fetched_at.endswith("+00:00")
    assert "pellets of fur and bone" in answer.answer
    kb_answer = fusion_service.ask("How are basement parking spaces assigned?", web=True)
    assert kb_answer.sources[kb_answer.citations[0] - 1].origin == "kb"


def test_web_unavailable_answers_from_the_knowledge_base_with_a_warning(fusion_service):
    fusion_service.settings = fusion_service.settings.replace(searxng_url="http://127.0.0.1:9")
    answer = fusion_service.ask("Which protocol does the company VPN use?", web=True)
    assert "WireGuard" in answer.answer
    assert any(w.startswith("Web search failed") for w in answer.warnings)
    assert any("knowledge base only" in w for w in answer.warnings)


def test_search_web_json_lists_results_and_skipped(cli, home, embedder, local_web, monkeypatch, tmp_path):
    publish(local_web)
    LocalWeb.results.append({"url": "http://169.254.169.254/latest/meta-data/", "title": "metadata", "content": "x"})
    LocalWeb.results.append({"url": f"{local_web}/slow", "title": "slow", "content": "slow page snippet"})
    for key, value in {"MOERAG_WEB_PROVIDER": "searxng", "MOERAG_SEARXNG_URL": local_web, "MOERAG_WEB_ALLOWLIST": "127.0.0.1/32",
                       "MOERAG_WEB_MAX_RESULTS": "20", "MOERAG_WEB_TIMEOUT": "4", "MOERAG_WEB_PAGE_TIMEOUT": "1"}.items():
        monkeypatch.setenv(key, value)
    doc = tmp_path / "vpn.md"
    doc.write_text("# VPN setup\n\nThe company VPN uses WireGuard.\n")
    assert cli("ingest", str(doc)).code == 0
    res = cli("search", "How high is Uhuru Peak on Kilimanjaro?", "--web", "--json", "-k", "3")
    assert res.code == 0, res
    data = json.loads(res.stdout)
    top = data["results"][0]
    assert top["origin"] == "web" and top["url"].startswith(local_web) and "5,895 metres" in top["text"]
    assert {"rank", "score", "chunk_id", "text", "document", "page", "heading", "start", "end"} <= set(top)
    reasons = {s["url"]: s["reason"] for s in data["skipped"]}
    assert "link-local" in reasons["http://169.254.169.254/latest/meta-data/"]
    assert "timed out" in reasons[f"{local_web}/slow"]
    plain = json.loads(cli("search", "VPN protocol", "--json").stdout)
    assert isinstance(plain, list) and plain[0]["origin"] == "kb"
    asked = cli("ask", "How high is Uhuru Peak?", "--web", "--json")
    body = json.loads(asked.stdout)
    assert body["sources"][body["citations"][0] - 1]["url"].startswith(local_web)
