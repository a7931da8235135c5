"""The chat UI in a real browser: `moerag ui` on 127.0.0.1, Debian's chromium driven by
Playwright, a question typed in, the streamed answer and a citation waited for, a screenshot;
and a password-protected UI that asks for the password first.

MOERAG_UPDATE_SCREENSHOT=1 also copies the screenshot to docs/screenshot.png (the README's).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ingest.pipeline import ingest_paths
from retrieval.kb import KnowledgeBase
from tests.servers import CHROMIUM, CHROMIUM_ARGS, free_port, wait_until_up

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

REPO = Path(__file__).resolve().parents[2]
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (make test installs it)")


@contextmanager
def ui_server(home: Path, **env_extra: str) -> Iterator[str]:
    """`moerag ui` on a free port of 127.0.0.1, its URL once it answers its health check."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **env_extra}
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "ui", "--port", str(port), "--home", str(home)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_up(f"{url}/_stcore/health", server, timeout=60)
        except RuntimeError as exc:
            # Its output is complete only once it has exited; reading the pipe before would block.
            output = server.stdout.read().decode() if server.poll() is not None else ""
            raise AssertionError(f"the UI did not start: {exc}\n{output}") from None
        yield url
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


def ask_in_browser(page: Page, question: str, *, nth: int) -> Locator:
    """Type `question` into the chat box and wait for its answer, chat message number `nth`
    (counting from 0, questions included), to be complete."""
    box = page.get_by_placeholder("Ask a question…")
    box.wait_for(timeout=60_000)
    box.fill(question)
    box.press("Enter")
    answer = page.locator('[data-testid="stChatMessage"]').nth(nth)
    # The timings caption appears once the answer is complete (after it has streamed).
    answer.get_by_text("first token", exact=False).wait_for(timeout=60_000)
    return answer


@needs_chromium
def test_ui_answers_a_question_in_a_browser(tmp_path, embedder):
    from playwright.sync_api import sync_playwright

    home = tmp_path / "home"
    ingest_paths(KnowledgeBase(home), embedder, [REPO / "docs"], collection="default")
    shot = tmp_path / "ui.png"
    upload = tmp_path / "mascot.md"
    upload.write_text("# Mascot\n\nThe moerag mascot is a teal octopus that reads documents with all eight arms.\n")
    with ui_server(home) as url:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 950})
            page.goto(url)
            answer = ask_in_browser(page, "How does moerag keep the FAISS index consistent with the database?", nth=1)
            text = answer.inner_text()
            assert "index" in text.lower() and "[1]" in text
            assert "Sources" in text and "▌" not in text
            page.wait_for_timeout(500)
            page.screenshot(path=str(shot), full_page=False)
            # Upload a file through the sidebar; it is ingested with progress and becomes searchable.
            page.get_by_text("Add documents").click()
            page.locator('input[type="file"]').set_input_files(str(upload))
            page.get_by_role("button", name="Ingest").click()
            page.get_by_text("1 added, 0 failed", exact=False).wait_for(timeout=60_000)
            newest = ask_in_browser(page, "What colour is the moerag mascot?", nth=3)
            assert "teal" in newest.inner_text()
            browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("MOERAG_UPDATE_SCREENSHOT") == "1":
        shutil.copy(shot, REPO / "docs" / "screenshot.png")


@needs_chromium
def test_a_password_protected_ui_asks_for_the_password_first(tmp_path, embedder):
    from playwright.sync_api import sync_playwright

    home, docs = tmp_path / "home", tmp_path / "docs"
    docs.mkdir()
    (docs / "owls.md").write_text("# Owls\n\nBarn owls swallow mice whole and cough up pellets of bone.\n")
    ingest_paths(KnowledgeBase(home), embedder, [docs], collection="default")
    with ui_server(home, MOERAG_UI_PASSWORD="owl-night-42") as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(url)
        password = page.locator('input[type="password"]')
        password.wait_for(timeout=60_000)
        assert page.get_by_placeholder("Ask a question…").count() == 0  # nothing but the form
        assert "Owls" not in page.inner_text("body")
        password.fill("owl-night-41")
        page.get_by_role("button", name="Open").click()
        page.get_by_text("Wrong password.").wait_for(timeout=30_000)
        assert page.get_by_placeholder("Ask a question…").count() == 0
        page.locator('input[type="password"]').fill("owl-night-42")
        page.get_by_role("button", name="Open").click()
        answer = ask_in_browser(page, "What do barn owls swallow?", nth=1)
        assert "mice" in answer.inner_text()
        assert "owl-night-42" not in page.content()  # the password is never echoed
        browser.close()
