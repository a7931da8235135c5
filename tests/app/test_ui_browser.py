"""The chat UI in a real browser: `moerag ui` on 127.0.0.1, Debian's chromium driven by
Playwright, a question typed in, the streamed answer and a citation waited for, a screenshot.

MOERAG_UPDATE_SCREENSHOT=1 also copies the screenshot to docs/screenshot.png (the README's).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ingest.pipeline import ingest_paths
from retrieval.kb import KnowledgeBase
from tests.servers import CHROMIUM, CHROMIUM_ARGS, free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (make test installs it)")
def test_ui_answers_a_question_in_a_browser(tmp_path, embedder):
    from playwright.sync_api import sync_playwright

    home = tmp_path / "home"
    ingest_paths(KnowledgeBase(home), embedder, [REPO / "docs"], collection="default")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "ui", "--port", str(port), "--home", str(home)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    shot = tmp_path / "ui.png"
    upload = tmp_path / "mascot.md"
    upload.write_text("# Mascot\n\nThe moerag mascot is a teal octopus that reads documents with all eight arms.\n")
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"{url}/_stcore/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, server.stdout.read().decode()
            assert time.time() < deadline, "the UI did not start within 60 s"
            time.sleep(0.3)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 950})
            page.goto(url)
            box = page.get_by_placeholder("Ask a question…")
            box.wait_for(timeout=60_000)
            box.fill("How does moerag keep the FAISS index consistent with the database?")
            box.press("Enter")
            answer = page.locator('[data-testid="stChatMessage"]').nth(1)
            # The timings caption appears once the answer is complete (after it has streamed).
            answer.get_by_text("first token", exact=False).wait_for(timeout=60_000)
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
            box.fill("What colour is the moerag mascot?")
            box.press("Enter")
            newest = page.locator('[data-testid="stChatMessage"]').nth(3)
            newest.get_by_text("first token", exact=False).wait_for(timeout=60_000)
            assert "teal" in newest.inner_text()
            browser.close()
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
    assert shot.stat().st_size > 10_000
    if os.environ.get("MOERAG_UPDATE_SCREENSHOT") == "1":
        shutil.copy(shot, REPO / "docs" / "screenshot.png")
