"""The embeddable widget in a real browser: Debian's chromium, driven by Playwright, opens the
demo page served by uvicorn on 127.0.0.1, types a question, and gets a streamed cited answer."""

from __future__ import annotations

import pytest

from app.settings import Settings
from tests.servers import CHROMIUM, CHROMIUM_ARGS, serve_app


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (make test installs it)")
def test_widget_answers_with_sources_in_a_browser(tmp_path, embedder):
    from playwright.sync_api import sync_playwright

    from app.api import create_app
    from app.keys import Keys
    from app.service import AnswerService
    from ingest.pipeline import ingest_records
    from retrieval.kb import KnowledgeBase

    s = Settings(home=tmp_path / "home")
    kb = KnowledgeBase(s.home)
    ingest_records(kb, embedder, [
        ("handbook/tea", "Green tea", "Steep green tea at 80 degrees Celsius for two minutes. <b>Never</b> boil it."),
        ("handbook/trains", "Night trains", "The night train from Vienna to Hamburg leaves at 21:30."),
    ], collection="handbook")
    _, key = Keys(kb.store).create("widget", collections=["handbook"], read_only=True)
    url, stop = serve_app(create_app(s, service=AnswerService(s, kb=kb, embedder=embedder)))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(f"{url}/widget/demo?collection=handbook&key={key}")
            page.fill(".moerag-input", "How long should green tea steep?")
            page.keyboard.press("Enter")
            answer = page.locator(".moerag-answer").first
            answer.locator(".moerag-sources li").first.wait_for(timeout=30_000)
            text = answer.inner_text()
            assert "two minutes" in text and "[1]" in text
            assert "Green tea" in answer.locator(".moerag-sources").inner_text()
            assert page.locator(".moerag-answer b").count() == 0  # "<b>" in a document stays text
            page.screenshot(path=str(tmp_path / "widget.png"))
            browser.close()
    finally:
        stop()
