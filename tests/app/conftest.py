"""Helpers for the Streamlit page tests (AppTest runs app/ui.py in-process): run the page, ask
it a question through the chat box, with or without the web."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytest
    from streamlit.testing.v1 import AppTest

UI = Path(__file__).resolve().parents[2] / "app" / "ui.py"


def run_page(at: AppTest | None = None) -> AppTest:
    """Run the page (a fresh one, or `at` again) and fail on any exception it raised."""
    from streamlit.testing.v1 import AppTest  # not at import: most tests under tests/app never run the page

    at = (AppTest.from_file(str(UI), default_timeout=120) if at is None else at).run()
    assert not at.exception, at.exception
    return at


def ask(at: AppTest, question: str) -> AppTest:
    at.chat_input[0].set_value(question).run()
    assert not at.exception, at.exception
    return at


def ask_with_web(monkeypatch: pytest.MonkeyPatch, searxng_url: str, question: str) -> AppTest:
    """Point the page at the SearXNG at `searxng_url` (loopback allowed, 5 s budget), switch its web
    toggle on and ask `question`."""
    for key, value in {"MOERAG_WEB_PROVIDER": "searxng", "MOERAG_SEARXNG_URL": searxng_url,
                       "MOERAG_WEB_ALLOWLIST": "127.0.0.1/32", "MOERAG_WEB_TIMEOUT": "5"}.items():
        monkeypatch.setenv(key, value)
    at = run_page()
    at.toggle[0].set_value(True).run()
    return ask(at, question)
