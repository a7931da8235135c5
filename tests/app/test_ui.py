"""The Streamlit page's flows with Streamlit's AppTest (the script runs in-process): asking,
sources and warnings, conversations (new, resume, rename, delete), deleting a document, an empty
knowledge base, and document text that tries to inject markup."""

from __future__ import annotations

import re

import pytest
from streamlit.testing.v1 import AppTest

from app.history import Conversations
from app.library import list_documents
from ingest.pipeline import ingest_paths
from retrieval.kb import KnowledgeBase
from tests.app.conftest import ask, ask_with_web, run_page

DOCS = {
    "tea.md": "# Green tea\n\nSteep green tea at 80 degrees Celsius for two minutes.\n",
    "trains.md": "# Night trains\n\nThe night train from Vienna to Hamburg leaves at 21:30.\n",
    "evil.md": "# Owls\n\nBarn owls hunt mice at night. <script>alert('owl')</script> "
    "<img src=x onerror=alert(1)> ![pixel](http://evil.example/p.png) [click](javascript:alert(2))\n",
}


@pytest.fixture
def ui_home(tmp_path, embedder, monkeypatch):
    import streamlit as st

    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text)
    home = tmp_path / "home"
    kb = KnowledgeBase(home)
    ingest_paths(kb, embedder, [docs], collection="default")
    monkeypatch.setenv("MOERAG_HOME", str(home))
    st.cache_resource.clear()  # the page's AnswerService is cached per process: start fresh
    yield home
    st.cache_resource.clear()


def button(at: AppTest, label: str):
    return next(b for b in at.sidebar.button if b.label == label)


def test_a_question_gets_a_cited_answer_with_sources_and_timings(ui_home):
    at = ask(run_page(), "How long should green tea steep?")
    user, assistant = at.chat_message[-2], at.chat_message[-1]
    assert user.markdown[0].value == "How long should green tea steep?"
    answer = assistant.markdown[0].value
    assert "two minutes" in answer and "\\[1\\]" in answer  # [1] shown literally
    sources = [e.label for e in assistant.expander]
    assert sources[0].startswith("● [1] Green tea")
    assert any("No generator model is configured" in w.value for w in assistant.warning)
    assert any("first token" in c.value for c in assistant.caption)
    stored = Conversations(KnowledgeBase(ui_home).store).list()
    assert [c.title for c in stored] == ["How long should green tea steep?"]


def test_document_text_cannot_inject_markup(ui_home):
    at = ask(run_page(), "What do barn owls hunt?")
    assistant = at.chat_message[-1]
    rendered = " ".join(m.value for m in assistant.markdown)
    assert "mice" in rendered
    assert "\\<script\\>" in rendered and "\\<img" in rendered  # escaped: shown as text, never parsed
    assert not re.search(r"(?<!\\)<", rendered)  # no markup at all
    assert not re.search(r"(?<!\\)!(?<!\\)\[", rendered) and not re.search(r"(?<!\\)\]\(", rendered)  # no image/link syntax
    snippets = [t.value for t in assistant.text]
    assert any("<script>alert('owl')</script>" in t for t in snippets)  # st.text shows it verbatim


def test_conversations_new_resume_rename_delete(ui_home):
    at = ask(run_page(), "When does the night train leave Vienna?")
    assert len(at.chat_message) == 2
    button(at, "New conversation").click().run()
    assert len(at.chat_message) == 0
    at = ask(at, "How long should green tea steep?")
    titles = [b.label for b in at.sidebar.button if "?" in b.label]
    assert len(titles) == 2
    button(at, "When does the night train leave Vienna?").click().run()
    assert [m.markdown[0].value for m in at.chat_message][0] == "When does the night train leave Vienna?"
    assert "21:30" in at.chat_message[1].markdown[0].value
    assert [e.label for e in at.chat_message[1].expander][0].startswith("● [1] Night trains")  # sources were stored
    at.sidebar.text_input(key="rename-title").input("Trains").run()
    button(at, "Rename").click().run()
    convs = Conversations(KnowledgeBase(ui_home).store)
    assert "Trains" in [c.title for c in convs.list()]
    delete = [b for b in at.sidebar.button if b.key and b.key.startswith("del-conv-")]
    delete[0].click().run()
    assert len(convs.list()) == 1


def test_deleting_a_document_from_the_sidebar(ui_home):
    at = run_page()
    kb = KnowledgeBase(ui_home)
    before = list_documents(kb, "default")
    trains = next(d for d in before if d["title"] == "Night trains")
    next(b for b in at.sidebar.button if b.key == f"del-doc-{trains['id']}").click().run()
    assert not at.exception
    after = list_documents(kb, "default")
    assert len(after) == len(before) - 1 and all(d["id"] != trains["id"] for d in after)


def test_an_empty_knowledge_base_says_what_to_do(tmp_path, monkeypatch):
    import streamlit as st

    monkeypatch.setenv("MOERAG_HOME", str(tmp_path / "empty"))
    st.cache_resource.clear()
    at = run_page()
    assert any("knowledge base is empty" in i.value for i in at.sidebar.info)
    assert at.chat_input[0].disabled
    st.cache_resource.clear()


def test_the_web_toggle_adds_labelled_web_sources(ui_home, monkeypatch):
    from tests.retrieval.web.conftest import LocalWeb, serve_local_web

    with serve_local_web() as web:
        LocalWeb.results = [{"url": f"{web}/article", "title": "Owls of Europe", "content": "owls"}]
        at = ask_with_web(monkeypatch, web, "What do barn owls do with their pellets of bone and fur?")
    labels = [e.label for e in at.chat_message[-1].expander]
    assert any("web: 127.0.0.1" in label for label in labels), labels
    assert LocalWeb.hits.get("/article") == 1
