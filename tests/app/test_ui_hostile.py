"""The chat UI against hostile input and unwanted visitors (Streamlit's AppTest runs the page
in-process): markup from documents, web pages, conversations and errors is shown as text; the
password and OIDC gates; the collection scope and the read-only UI; Stop closes the answer's
stream; `moerag ui --host` beyond loopback refuses to start without a sign-in."""

from __future__ import annotations

import html
import re
import time
from pathlib import Path

import pytest
from markdown_it import MarkdownIt
from streamlit.testing.v1 import AppTest

from app.history import Conversations
from app.library import list_documents, uploads_dir
from app.ui import as_label, as_text
from ingest.pipeline import ingest_paths
from retrieval.kb import KnowledgeBase
from tests.app.conftest import UI, ask, ask_with_web, run_page

# Each piece would render as something other than its own characters if it reached Markdown
# unescaped: an image fetched from a foreign host, a javascript: link, raw HTML, bold, a heading,
# an entity, Streamlit's LaTeX and colour directives.
HOSTILE = ("![x](http://evil.example/x.png) [click](javascript:alert(1)) <img src=x onerror=alert(1)> "
           "**bold** # heading C++ & <b> &amp; $x^2$ :red[red] `code` ~~gone~~ a_b_c")
HOSTILE_LINES = "# heading\n- item\n1. first\n> quote\n---\n**bold**\n    indented"
# A file name cannot hold "/": the same tricks, without it.
HOSTILE_NAME = "![x](javascript:alert(1)) <img src=x onerror=alert(1)> **bold** # C++ & <b>"
PASSWORD = "correct horse battery staple"

_MD = MarkdownIt("commonmark").enable(["table", "strikethrough"])


def assert_literal(markdown: str, raw: str) -> None:
    """`markdown`, rendered as CommonMark (with GFM tables and strikethrough), is `raw`'s own
    characters: paragraphs and line breaks only, no element of any other kind, the same text,
    and no unescaped `$` or `:name[` for Streamlit's own syntax."""
    rendered = _MD.render(markdown)
    tags = set(re.findall(r"<(\w+)", rendered))
    assert tags <= {"p", "br"}, (markdown, rendered)
    text = html.unescape(re.sub(r"<[^>]+>", "", rendered))
    assert " ".join(text.split()) == " ".join(raw.split()), (markdown, rendered)
    unescaped = re.sub(r"\\.", "", markdown)  # drop every escaped character
    assert "$" not in unescaped and not re.search(r":\w+\[", unescaped), markdown


@pytest.fixture
def page_home(tmp_path, monkeypatch):
    """An empty data directory for the page (MOERAG_HOME) and a fresh cached service."""
    import streamlit as st

    home = tmp_path / "home"
    monkeypatch.setenv("MOERAG_HOME", str(home))
    for name in ("MOERAG_UI_PASSWORD", "MOERAG_UI_COLLECTIONS", "MOERAG_UI_READ_ONLY", "MOERAG_UI_REQUIRE_AUTH"):
        monkeypatch.delenv(name, raising=False)
    st.cache_resource.clear()  # the page's AnswerService is cached per process: start fresh
    yield home
    st.cache_resource.clear()


def ingest_texts(home: Path, embedder, folder: Path, collection: str, files: dict[str, str | bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in files.items():
        (folder / name).write_bytes(body if isinstance(body, bytes) else body.encode())
    ingest_paths(KnowledgeBase(home), embedder, [folder], collection=collection)


# --- markup is shown as text ------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    HOSTILE, HOSTILE_LINES, HOSTILE_NAME, "C++ & <b>", "&amp; &lt;script&gt; &#60;", "a\\*b\\", "<https://evil.example>",
    "[a]\n\n[a]: http://evil.example", "| a | b |\n|---|---|\n| 1 | 2 |", "```js\nalert(1)\n```", "~~~\nx\n~~~",
    "Title\n===", "Title\n---", "***", "2) two\n10. ten", "text\n\n    indented code\n\t\ttabbed",
    "<!-- hidden --> <svg onload=alert(1)>", "line one\r\nline two\rline three", "$$\nx\n$$", ":blue-badge[new]",
])
def test_as_text_and_as_label_render_the_characters_themselves(raw):
    assert_literal(as_text(raw), raw)
    assert_literal(as_label(raw), raw)
    assert "\n" not in as_label(raw)


def test_markup_from_documents_and_stored_conversations_is_shown_as_text(page_home, embedder, tmp_path):
    page = (f"<html><head><title>{html.escape(HOSTILE)}</title></head><body><h2>{html.escape(HOSTILE)}</h2>"
            f"<p>Barn owls swallow mice whole. {html.escape(HOSTILE)}</p></body></html>")
    ingest_texts(page_home, embedder, tmp_path / "docs", "default",
                 {"owls.html": page, f"{HOSTILE_NAME}.pdf": b"%PDF-1.4 this is not a PDF"})
    kb = KnowledgeBase(page_home)
    docs = {d["status"]: d for d in list_documents(kb, "default")}
    assert docs["failed"]["error"]  # the broken PDF is listed with its reason
    convs = Conversations(kb.store)
    conv = convs.create(title=HOSTILE, collections=["default"])
    convs.add(conv.id, "user", HOSTILE_LINES)
    web_source = {"n": 1, "title": HOSTILE, "source": "http://evil.example/x", "url": "http://evil.example/x",
                  "heading": HOSTILE, "origin": "web", "domain": "evil.example **b**", "score": 0.5, "snippet": HOSTILE}
    convs.add(conv.id, "assistant", HOSTILE_LINES, sources=[web_source], citations=[1], warnings=[HOSTILE, HOSTILE_LINES])
    title = convs.get(conv.id).title

    at = run_page()
    # The sidebar: the conversation's button, each document's name and state.
    conv_button = next(b for b in at.sidebar.button if b.key == f"conv-{conv.id}")
    assert conv_button.label == as_label(title)
    assert_literal(conv_button.label, title)
    captions = [c.value for c in at.sidebar.caption]
    for d in docs.values():
        label = d["title"] or d["source"].rsplit("/", 1)[-1]
        state = f"{d['chunks']} chunks" if d["status"] == "ok" else f"failed: {d['error']}"
        assert f"**{as_label(label)}**  \n{as_text(state)}" in captions
        assert_literal(as_label(label), label)
        assert_literal(as_text(state), state)
    assert any(HOSTILE_NAME in (d["title"] or d["source"]) for d in docs.values())

    # The stored conversation: question, answer, warnings, sources.
    conv_button.click().run()
    assert not at.exception, at.exception
    user, assistant = at.chat_message[0], at.chat_message[1]
    assert user.markdown[0].value == as_text(HOSTILE_LINES)
    assert_literal(user.markdown[0].value, HOSTILE_LINES)
    assert assistant.markdown[0].value == as_text(HOSTILE_LINES)
    assert [w.value for w in assistant.warning] == [as_text(HOSTILE), as_text(HOSTILE_LINES)]
    for w, raw in zip(assistant.warning, [HOSTILE, HOSTILE_LINES]):
        assert_literal(w.value, raw)
    label = assistant.expander[0].label
    assert label == "● [1] " + as_label(f"{HOSTILE} · web: evil.example **b**")
    assert_literal(label.removeprefix("● [1] "), f"{HOSTILE} · web: evil.example **b**")
    heading_caption = next(c.value for c in assistant.caption if "relevance" in c.value)
    assert heading_caption.startswith(as_text(f"http://evil.example/x · {HOSTILE}"))
    assert [t.value for t in assistant.text] == [HOSTILE]  # st.text: the snippet verbatim

    # A fresh answer from the hostile page: its title in the source label, its heading in the caption.
    next(b for b in at.sidebar.button if b.label == "New conversation").click().run()
    at = ask(at, "What do barn owls swallow?")
    assistant = at.chat_message[-1]
    hit = next(e for e in assistant.expander if HOSTILE[:20] in e.label.replace("\\", ""))
    assert hit.label.endswith(as_label(HOSTILE))
    assert_literal(hit.label.split("] ", 1)[1], HOSTILE)
    assert any(f" · {as_text(HOSTILE)} · relevance" in c.value for c in assistant.caption)
    assert any(HOSTILE in t.value for t in assistant.text)
    answer = assistant.markdown[0].value
    assert "mice" in answer and not re.search(r"(?<!\\)[<\[!*#`&$]", re.sub(r"\\.", "", answer))


def test_upload_errors_with_markup_are_shown_as_text(page_home, embedder, monkeypatch):
    at = run_page()
    name = f"{HOSTILE_NAME}.pdf"
    at.sidebar.file_uploader[0].upload(name, b"%PDF-1.4 not a PDF at all", "application/pdf")
    at = run_page(at)
    next(b for b in at.sidebar.button if b.label == "Ingest").click().run()
    assert not at.exception, at.exception
    failed = next(d for d in list_documents(KnowledgeBase(page_home), "default") if d["status"] == "failed")
    raw = f"{name}: {failed['error']}"
    errors = [e.value for e in at.error]
    assert as_text(raw) in errors, errors
    assert_literal(as_text(raw), raw)

    # Rejected before ingesting (over MOERAG_MAX_FILE_MB): the reason names the file, as text.
    import streamlit as st

    monkeypatch.setenv("MOERAG_MAX_FILE_MB", "0.001")
    st.cache_resource.clear()
    at = run_page()
    at.sidebar.file_uploader[0].upload(f"{HOSTILE_NAME}.txt", b"owls " * 1000, "text/plain")
    at = run_page(at)
    next(b for b in at.sidebar.button if b.label == "Ingest").click().run()
    assert not at.exception, at.exception
    too_large = [e.value for e in at.error if "larger than" in e.value]
    assert too_large and as_text(HOSTILE_NAME) in too_large[0]
    assert not re.search(r"(?<!\\)[<\[!*#&]", re.sub(r"\\.", "", too_large[0]))


def test_a_web_warning_with_markup_is_shown_as_text(page_home, embedder, tmp_path, monkeypatch):
    from tests.retrieval.web.conftest import serve_local_web

    ingest_texts(page_home, embedder, tmp_path / "docs", "default",
                 {"owls.md": "# Owls\n\nBarn owls swallow mice whole.\n"})
    with serve_local_web() as web:
        # The SearXNG address is not there: the warning quotes it, markup and all.
        base = f"{web}/![x](http://evil.example/x.png)<img src=x onerror=alert(1)>**bold**"
        at = ask_with_web(monkeypatch, base, "What do barn owls swallow?")
    warnings = [w.value for w in at.chat_message[-1].warning]
    failed = [w for w in warnings if "SearXNG" in w]
    assert failed, warnings
    raw = failed[0].replace("\\", "")  # the warning as the service wrote it (it holds no backslash)
    assert "<img src=x onerror=alert(1)>" in raw and "**bold**" in raw
    assert failed[0] == as_text(raw)
    assert_literal(failed[0], raw)


# --- signing in ---------------------------------------------------------------------------------------


def only_the_sign_in(at: AppTest) -> None:
    """Nothing of the knowledge base: no sidebar, no chat, no documents."""
    assert not at.chat_input and not at.chat_message
    assert not at.sidebar.button and not at.sidebar.caption and not at.sidebar.multiselect


def test_a_password_protected_ui_shows_only_the_password_form(page_home, embedder, tmp_path, monkeypatch):
    ingest_texts(page_home, embedder, tmp_path / "docs", "default",
                 {"owls.md": "# Owls\n\nBarn owls swallow mice whole.\n"})
    monkeypatch.setenv("MOERAG_UI_PASSWORD", PASSWORD)
    at = run_page()
    only_the_sign_in(at)
    assert [t.label for t in at.text_input] == ["Password"]
    assert at.text_input[0].proto.type == at.text_input[0].proto.PASSWORD  # typed characters are masked

    at.text_input[0].input(PASSWORD[:-1] + "X")
    start = time.monotonic()
    next(b for b in at.button if b.label == "Open").click().run()
    assert time.monotonic() - start >= 1.0  # a wrong guess costs a second
    only_the_sign_in(at)
    assert [e.value for e in at.error] == ["Wrong password."]

    at.text_input[0].input(PASSWORD)
    next(b for b in at.button if b.label == "Open").click().run()
    assert not at.exception, at.exception
    assert "Password" not in [t.label for t in at.text_input]
    at = ask(at, "What do barn owls swallow?")
    assert "mice" in at.chat_message[-1].markdown[0].value
    assert at.session_state["signed_in"] is True
    every_value = [str(getattr(e, "value", "")) for e in at.main] + [str(getattr(e, "value", "")) for e in at.sidebar]
    assert not any(PASSWORD in v for v in every_value)  # never echoed


def test_oidc_login_is_required_when_secrets_configure_it(page_home):
    auth = {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": "s" * 32, "client_id": "moerag",
            "client_secret": "x", "server_metadata_url": "http://127.0.0.1:9/.well-known/openid-configuration"}
    at = AppTest.from_file(str(UI), default_timeout=120)
    at.secrets["auth"] = auth
    at.user = {"is_logged_in": False}
    at = run_page(at)
    only_the_sign_in(at)
    assert [b.label for b in at.button] == ["Log in"]

    at.user = {"is_logged_in": True, "email": "ada@example.com"}
    at = run_page(at)
    assert at.chat_input and at.sidebar.button


def test_served_beyond_loopback_without_a_sign_in_the_page_shows_nothing(page_home, monkeypatch):
    # `moerag ui --host` sets this; should the page find no sign-in (the command saw one that
    # Streamlit does not), it fails closed.
    monkeypatch.setenv("MOERAG_UI_REQUIRE_AUTH", "1")
    at = run_page()
    only_the_sign_in(at)
    assert "MOERAG_UI_PASSWORD" in at.error[0].value


# --- scope and read-only ----------------------------------------------------------------------------


@pytest.fixture
def two_collections(page_home, embedder, tmp_path):
    ingest_texts(page_home, embedder, tmp_path / "a", "a", {"owls.md": "# Owls\n\nBarn owls swallow mice whole.\n"})
    ingest_texts(page_home, embedder, tmp_path / "b", "b", {"secret.md": "# Salaries\n\nThe secret budget is 42 million.\n"})
    convs = Conversations(KnowledgeBase(page_home).store)
    on_a = convs.create(title="about owls", collections=["a"])
    on_b = convs.create(title="about the budget", collections=["b"])
    on_both = convs.create(title="about everything", collections=["a", "b"])
    return page_home, {"a": on_a.id, "b": on_b.id, "both": on_both.id}


def test_a_scoped_ui_shows_and_searches_only_its_collections(two_collections, monkeypatch):
    home, conv_ids = two_collections
    monkeypatch.setenv("MOERAG_UI_COLLECTIONS", "a")
    monkeypatch.setenv("MOERAG_COLLECTION", "b")  # the default collection is out of scope too
    at = run_page()
    assert at.sidebar.multiselect[0].options == ["a"] and at.sidebar.multiselect[0].value == ["a"]
    conv_keys = {b.key for b in at.sidebar.button if b.key and b.key.startswith("conv-")}
    assert conv_keys == {f"conv-{conv_ids['a']}"}
    assert not any("Salaries" in c.value for c in at.sidebar.caption)
    at = ask(at, "What is the secret budget?")
    shown = " ".join([m.value for m in at.chat_message[-1].markdown] + [t.value for t in at.chat_message[-1].text])
    assert "42 million" not in shown

    # Uploading into a collection outside the scope is refused, whatever the text box says.
    before = len(list_documents(KnowledgeBase(home), "b"))
    at.sidebar.text_input[0].input("b")
    at.sidebar.file_uploader[0].upload("more.md", b"# More\n\nThe secret budget grew to 50 million.\n", "text/markdown")
    at = run_page(at)
    next(b for b in at.sidebar.button if b.label == "Ingest").click().run()
    assert not at.exception, at.exception
    assert any("not open in this UI" in e.value for e in at.sidebar.error)
    assert len(list_documents(KnowledgeBase(home), "b")) == before
    assert not uploads_dir(home, "b").exists()


def _write_directly(conv_id: int) -> None:
    """Runs as a Streamlit script: the page's own upload, delete and resume paths, called with
    what a read-only, scoped UI must refuse (no widget offers them)."""
    import io

    import streamlit as st

    import app.ui as ui
    from app.library import list_documents
    from app.ui_access import ScopeError, UiScope

    service = ui.get_service()
    scope = UiScope.from_settings(service.settings)
    upload = io.BytesIO(b"# Injected\n\nThis should never be stored.\n")
    upload.name = "injected.md"
    ui.upload(service, scope, "a", [upload])
    doc = list_documents(service.kb, "a")[0]
    refused = []
    try:
        ui.remove_document(service, scope, "a", doc["id"])
    except ScopeError:
        refused.append("delete")
    try:
        ui.resume(service, UiScope(("a",)), conv_id)
    except ScopeError:
        refused.append("resume")
    st.session_state["refused"] = refused


def test_a_read_only_ui_offers_no_writes_and_refuses_them(two_collections, monkeypatch):
    home, conv_ids = two_collections
    monkeypatch.setenv("MOERAG_UI_READ_ONLY", "true")
    at = run_page()
    assert "Add documents" not in [e.label for e in at.sidebar.expander]
    assert not at.sidebar.file_uploader
    assert not [b for b in at.sidebar.button if b.key and b.key.startswith("del-doc-")]
    assert at.sidebar.multiselect[0].options == ["a", "b"]

    before = {c: list_documents(KnowledgeBase(home), c) for c in ("a", "b")}
    direct = AppTest.from_function(_write_directly, args=(conv_ids["b"],), default_timeout=120).run()
    assert not direct.exception, direct.exception
    assert any("read-only" in e.value for e in direct.sidebar.error)
    assert direct.session_state["refused"] == ["delete", "resume"]
    assert {c: list_documents(KnowledgeBase(home), c) for c in ("a", "b")} == before
    assert not uploads_dir(home, "a").exists()


# --- Stop closes the stream ---------------------------------------------------------------------------


def _stop_mid_answer() -> None:
    """Runs as a Streamlit script: an answer streams, and the user presses Stop after its first
    tokens (Streamlit raises StopException at the page's next Streamlit call)."""
    from types import SimpleNamespace

    import streamlit as st
    from streamlit.runtime.scriptrunner_utils.exceptions import StopException

    import app.ui as ui
    from app.answers import Event
    from app.ui_access import UiScope

    def stream(question, **options):
        try:
            yield Event("status", "searching")
            yield Event("answer", "The first tokens")
            yield Event("answer", " and the rest")
        finally:
            st.session_state["closed"] = True

    def markdown_until_stop(text: str) -> str:
        if "first tokens" in text:
            raise StopException()
        return ui.as_text(text)

    service = SimpleNamespace(stream=stream, conversations=SimpleNamespace(create=lambda **kw: SimpleNamespace(id=1)))
    ui.answer_markdown = markdown_until_stop
    try:
        ui.ask(service, UiScope(), "What do owls eat?", {"collections": ["default"], "k": 3, "mode": "bm25", "web": False})
    except StopException:
        # Still inside the handler: the traceback keeps ask()'s frame, and the stream in it, alive.
        st.session_state["closed_at_stop"] = st.session_state.get("closed", False)
        raise


def test_stop_while_an_answer_streams_closes_the_stream(page_home):
    at = AppTest.from_function(_stop_mid_answer, default_timeout=60).run()
    assert at.session_state["closed_at_stop"] is True


# --- moerag ui --host ---------------------------------------------------------------------------------


@pytest.fixture
def no_exec(monkeypatch, tmp_path):
    """`moerag ui` would become Streamlit (os.execve): record the call instead."""
    import os

    calls = []

    def fake_execve(path, argv, env):
        calls.append((argv, env))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execve", fake_execve)
    monkeypatch.delenv("MOERAG_UI_PASSWORD", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))  # no ~/.streamlit/secrets.toml of the machine's
    monkeypatch.chdir(tmp_path)
    return calls


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "example.com", ""])
def test_ui_beyond_loopback_without_a_sign_in_refuses_to_start(cli, no_exec, host):
    r = cli("ui", "--host", host)
    assert r.code == 2, r
    assert "MOERAG_UI_PASSWORD" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert no_exec == []  # refused before Streamlit was started


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_ui_on_loopback_starts_without_a_password(cli, no_exec, host):
    r = cli("ui", "--host", host)
    assert r.code == 0, r
    (argv, env), = no_exec
    assert argv[argv.index("--server.address") + 1] == host and "MOERAG_UI_REQUIRE_AUTH" not in env


def test_ui_beyond_loopback_starts_with_a_password(cli, no_exec, monkeypatch):
    monkeypatch.setenv("MOERAG_UI_PASSWORD", PASSWORD)
    r = cli("ui", "--host", "0.0.0.0")
    assert r.code == 0, r
    (argv, env), = no_exec
    assert argv[argv.index("--server.address") + 1] == "0.0.0.0"
    assert env["MOERAG_UI_PASSWORD"] == PASSWORD and env["MOERAG_UI_REQUIRE_AUTH"] == "1"


def test_ui_beyond_loopback_counts_oidc_secrets_only_when_login_can_work(cli, no_exec, tmp_path, monkeypatch):
    import importlib.util

    secrets = tmp_path / ".streamlit" / "secrets.toml"
    secrets.parent.mkdir()
    secrets.write_text('[other]\nx = 1\n')
    assert cli("ui", "--host", "0.0.0.0").code == 2  # a secrets file without [auth] is no sign-in
    secrets.write_text('[auth]\nredirect_uri = "http://intranet:8501/oauth2callback"\ncookie_secret = "s3"\n'
                       'client_id = "moerag"\nclient_secret = "x"\n'
                       'server_metadata_url = "https://idp.example/.well-known/openid-configuration"\n')
    r = cli("ui", "--host", "0.0.0.0")
    if importlib.util.find_spec("authlib") is None:
        assert r.code == 2 and "Authlib" in r.stderr, r  # st.login could not work
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "authlib" else find_spec(name, *a))
        r = cli("ui", "--host", "0.0.0.0")
    assert r.code == 0, r
    assert no_exec[-1][1]["MOERAG_UI_REQUIRE_AUTH"] == "1"
