"""The chat UI (`moerag ui`): Streamlit over AnswerService.

The main pane is the conversation: answers stream in, the model's reasoning fills a collapsible
section while it thinks, and each answer's [n] markers match its sources panel. The sidebar
holds the collection picker, generator status, retrieval settings, uploads, the document list
and the conversation history. Every string that comes from documents, web pages, users or
errors is shown as text: Markdown and HTML in it are escaped (`as_text`, `as_label`) or it goes
to a widget that renders plain text (st.text). Who may open the page and which collections it
shows are decided by app.ui_access (MOERAG_UI_PASSWORD, MOERAG_UI_COLLECTIONS, MOERAG_UI_READ_ONLY).
"""

from __future__ import annotations

import itertools
import os
import re
import threading
import time
from typing import Any

import streamlit as st

from app.library import delete_documents, ingest_uploads, list_documents
from app.service import AnswerService
from app.settings import Settings, load_settings
from app.ui_access import REQUIRE_AUTH_ENV, ScopeError, UiScope, oidc_providers, password_matches
from retrieval.errors import MoeragError
from retrieval.search import MODES

WRONG_PASSWORD_DELAY_S = 1.0
# Characters that start inline Markdown (and Streamlit's $LaTeX$, :color[...]) anywhere in a line;
# `&` starts an HTML entity. A backslash before any ASCII punctuation shows it as itself.
_MD_INLINE = re.compile(r"([\\`*_\[\]<>!&#|~$])")
# Characters that start a block only at the beginning of a line: lists, setext headings; and
# indentation, which after a blank line makes a code block.
_MD_LINE_START = re.compile(r"^([ \t]*)([-+=])", re.MULTILINE)
_MD_ORDERED = re.compile(r"^([ \t]*\d{1,9})([.)])", re.MULTILINE)
_MD_INDENT = re.compile(r"^[ \t]+", re.MULTILINE)


def as_text(text: str) -> str:
    """Markdown that renders `text` literally: no HTML, images, links, emphasis, headings or lists.
    Line breaks are kept. Streamlit body text (st.markdown, st.caption, st.warning, st.error,
    st.info, tooltips) gets this."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _MD_INLINE.sub(r"\\\1", text)
    text = _MD_ORDERED.sub(r"\1\\\2", _MD_LINE_START.sub(r"\1\\\2", text))
    text = _MD_INDENT.sub(lambda m: m.group(0).replace(" ", "&#32;").replace("\t", "&#9;"), text)
    return text.replace("\n", "  \n")


def as_label(text: str) -> str:
    """`as_text` for a widget label (buttons, expanders): one line, whitespace runs collapsed."""
    return as_text(" ".join(text.split()))


def answer_markdown(text: str) -> str:
    """An answer keeps its line breaks and citations, but nothing in it can load or run anything."""
    return as_text(text)


@st.cache_resource(show_spinner="Loading moerag…")
def get_service() -> AnswerService:
    return AnswerService(load_settings())


@st.cache_resource
def _wrong_password_lock() -> threading.Lock:
    """One per server: wrong passwords are answered one at a time, each after a delay, however
    many sessions guess at once."""
    return threading.Lock()


def _state() -> Any:
    s = st.session_state
    s.setdefault("conversation_id", None)
    s.setdefault("messages", [])  # dicts: role, content, reasoning, sources, citations, warnings, timings
    s.setdefault("uploads", 0)  # bumps the uploader's key to clear it after an ingest
    s.setdefault("signed_in", False)  # the UI password was given in this session
    return s


# --- signing in ---------------------------------------------------------------------------------------


def _oidc() -> list[str | None]:
    """Providers of Streamlit's OIDC login as this server reads its secrets ([] when none)."""
    try:
        auth = st.secrets.get("auth")
    except FileNotFoundError:  # no secrets.toml (or an unreadable one): no OIDC
        return []
    return oidc_providers(auth)


def sign_in(settings: Settings) -> None:
    """Stop the page here unless this session has signed in: Streamlit's OIDC login when secrets
    configure it, and the UI password when it is set (both, when both are)."""
    providers = _oidc()
    if os.environ.get(REQUIRE_AUTH_ENV) == "1" and not settings.ui_password and not providers:
        st.error("This UI is served beyond this machine but no sign-in is configured: "
                 "set MOERAG_UI_PASSWORD (or an [auth] section in .streamlit/secrets.toml) and restart it.")
        st.stop()
    if providers and not st.user.get("is_logged_in"):
        st.markdown("### moerag")
        for provider in providers:
            label = "Log in" if provider is None else f"Log in with {as_label(provider)}"
            st.button(label, key=f"login-{provider}", on_click=st.login, args=(provider,) if provider else ())
        st.stop()
    if settings.ui_password and not _state().signed_in:
        password_form(settings.ui_password)
        st.stop()


def password_form(expected: str) -> None:
    st.markdown("### moerag")
    with st.form("password", clear_on_submit=True):  # cleared: the password never comes back to the page
        given = st.text_input("Password", type="password")
        submitted = st.form_submit_button("Open")
    if not submitted:
        return
    if password_matches(given, expected):
        _state().signed_in = True
        st.rerun()
    with _wrong_password_lock():
        time.sleep(WRONG_PASSWORD_DELAY_S)
    st.error("Wrong password.")


def sign_out_button(settings: Settings) -> None:
    if not settings.ui_password and not _oidc():
        return
    if st.sidebar.button("Sign out"):
        _state().signed_in = False
        if _oidc() and st.user.get("is_logged_in"):
            st.logout()
        st.rerun()


# --- the sidebar -------------------------------------------------------------------------------------


def sidebar(service: AnswerService, scope: UiScope) -> dict[str, Any]:
    s = _state()
    st.sidebar.title("moerag")
    try:
        names = scope.visible(service.collections())
    except MoeragError as exc:
        st.sidebar.error(as_text(str(exc)))
        names = []
    default = service.settings.collection
    if not scope.allows(default):
        default = scope.collections[0]
    if names:
        chosen = st.sidebar.multiselect("Collections", names, default=[default if default in names else names[0]])
    elif scope.read_only:
        st.sidebar.info("There is nothing to search yet: documents are added with: moerag ingest PATH")
        chosen = []
    else:
        st.sidebar.info("The knowledge base is empty. Upload files below, or run: moerag ingest PATH")
        chosen = []

    status = service.generator.status()
    st.sidebar.caption(f"Generator: **{as_text(status.name)}** · {as_text(status.model)}")
    if status.note:
        st.sidebar.caption(as_text(status.note))

    with st.sidebar.expander("Retrieval", expanded=False):
        k = st.slider("Sources per answer (k)", 1, 20, service.settings.answer_k)
        mode = st.selectbox("Mode", MODES, index=MODES.index(service.settings.search_mode))
        provider = service.settings.web_provider
        web = st.toggle("Search the web", value=False, disabled=provider == "none",
                        help=f"Also search the live web ({provider}); results are ranked with your documents."
                        if provider != "none" else "Web search is off (MOERAG_WEB_PROVIDER=none).")

    if not scope.read_only:
        with st.sidebar.expander("Add documents", expanded=not names):
            target = st.text_input("Into collection", value=chosen[0] if chosen else default)
            files = st.file_uploader("Files", accept_multiple_files=True, key=f"uploader-{s.uploads}")
            if files and st.button("Ingest", type="primary"):
                upload(service, scope, target, files)

    if chosen:
        documents(service, scope, chosen[0])
    conversations(service, scope)
    sign_out_button(service.settings)
    return {"collections": chosen, "k": k, "mode": mode, "web": web}


class _UiProgress:
    """The ingest pipeline's progress, drawn as a Streamlit progress bar."""

    def __init__(self) -> None:
        self.bar = st.progress(0.0, text="ingesting…")
        self.total, self.done, self.chunks = 1, 0, 0

    def start(self, files: int) -> None:
        self.total = max(files, 1)

    def advance(self, *, files: int = 0, chunks: int = 0) -> None:
        self.done += files
        self.chunks += chunks
        self.bar.progress(min(self.done / self.total, 1.0), text=f"{self.done}/{self.total} files · {self.chunks} chunks")


def upload(service: AnswerService, scope: UiScope, collection: str, files: list[Any]) -> None:
    """Ingest uploaded files into `collection`, if this UI may write there; errors are shown."""
    collection = collection.strip()
    if not collection:
        st.sidebar.error("Name the collection to add the files to.")
        return
    try:
        scope.check_write(collection)
    except ScopeError as exc:
        st.sidebar.error(as_text(str(exc)))
        return
    with st.sidebar.status(f"Ingesting {len(files)} file(s)…", expanded=True) as box:
        try:
            report = ingest_uploads(service.kb, service.embedder, [(f.name, f) for f in files],
                                    collection=collection, settings=service.settings, progress=_UiProgress())
        except MoeragError as exc:
            box.update(label="Upload failed", state="error")
            st.error(as_text(str(exc)))
            return
        failed = [(f.name, r) for f, r in zip(files, report.results) if r.status == "failed"]
        for name, r in failed:
            st.error(as_text(f"{name}: {r.error}"))
        added = sum(r.status in ("added", "updated") for r in report.results)
        box.update(label=f"{added} added, {len(failed)} failed, {report.chunks} chunks", state="error" if failed else "complete")
    if not failed:
        st.session_state.uploads += 1


def remove_document(service: AnswerService, scope: UiScope, collection: str, doc_id: int) -> None:
    scope.check_write(collection)
    delete_documents(service.kb, collection, [doc_id], lock_wait=service.settings.lock_wait)


def documents(service: AnswerService, scope: UiScope, collection: str) -> None:
    try:
        scope.check_read([collection])
        docs = list_documents(service.kb, collection)
    except MoeragError as exc:
        st.sidebar.error(as_text(str(exc)))
        return
    with st.sidebar.expander(f"Documents in '{as_label(collection)}' ({len(docs)})"):
        for d in docs:
            left, right = st.columns([5, 1])
            label = d["title"] or d["source"].rsplit("/", 1)[-1]
            state = f"{d['chunks']} chunks" if d["status"] == "ok" else f"failed: {d['error']}"
            left.caption(f"**{as_label(label)}**  \n{as_text(state)}")
            if scope.read_only:
                continue
            if right.button("✕", key=f"del-doc-{d['id']}", help=f"Delete {as_text(label)}"):
                try:
                    remove_document(service, scope, collection, d["id"])
                except MoeragError as exc:
                    st.sidebar.error(as_text(str(exc)))
                    return
                st.rerun()


def conversation_collections(service: AnswerService, conv: Any) -> list[str]:
    """The collections a conversation searches (none stored: the default one)."""
    return list(conv.collections) or [service.settings.collection]


def conversations(service: AnswerService, scope: UiScope) -> None:
    s = _state()
    st.sidebar.subheader("Conversations")
    if st.sidebar.button("New conversation", use_container_width=True):
        s.conversation_id, s.messages = None, []
        st.rerun()
    store = service.conversations
    shown = [c for c in store.list(limit=200) if all(map(scope.allows, conversation_collections(service, c)))][:30]
    for conv in shown:
        left, right = st.sidebar.columns([5, 1])
        current = conv.id == s.conversation_id
        if left.button(("▸ " if current else "") + as_label(conv.title or "untitled"), key=f"conv-{conv.id}",
                       use_container_width=True):
            try:
                resume(service, scope, conv.id)
            except MoeragError as exc:
                st.sidebar.error(as_text(str(exc)))
                return
            st.rerun()
        if right.button("✕", key=f"del-conv-{conv.id}", help="Delete this conversation"):
            store.delete(conv.id)
            if current:
                s.conversation_id, s.messages = None, []
            st.rerun()
    if s.conversation_id is not None:
        with st.sidebar.expander("Rename this conversation"):
            title = st.text_input("Title", key="rename-title")
            if st.button("Rename") and title.strip():
                store.rename(s.conversation_id, title)
                st.rerun()


def resume(service: AnswerService, scope: UiScope, conversation_id: int) -> None:
    conv = service.conversations.get(conversation_id)
    scope.check_read(conversation_collections(service, conv))
    s = _state()
    s.conversation_id = conv.id
    s.messages = [
        {"role": m.role, "content": m.content, "reasoning": m.reasoning, "sources": m.sources,
         "citations": m.citations, "warnings": m.warnings, "timings": m.timings}
        for m in conv.messages
    ]


# --- the conversation -----------------------------------------------------------------------------------


def show_sources(sources: list[dict[str, Any]], citations: list[int]) -> None:
    if not sources:
        return
    st.caption("Sources")
    for src in sources:
        where = src.get("url") or src.get("source", "")
        page = f" · p. {src['page']}" if src.get("page") else ""
        if src.get("origin") == "web":
            page = f" · web: {src.get('domain') or ''}"
        mark = "●" if src["n"] in citations else "○"
        with st.expander(f"{mark} [{src['n']}] " + as_label(f"{src.get('title') or where}{page}")):
            heading = f" · {src['heading']}" if src.get("heading") else ""
            st.caption(as_text(f"{where}{heading}") + f" · relevance {src.get('score', 0):.4f}")
            st.text(src.get("snippet") or src.get("text", ""))


def show_timings(t: dict[str, float]) -> None:
    if not t:
        return
    speed = f" · {t['tokens_per_s']:.1f} tokens/s" if t.get("tokens_per_s") else ""
    st.caption(f"retrieval {t.get('retrieval_ms', 0):.0f} ms · first token {t.get('first_token_ms', 0):.0f} ms · "
               f"total {t.get('total_ms', 0) / 1000:.1f} s{speed}")


def show_message(m: dict[str, Any]) -> None:
    with st.chat_message(m["role"]):
        if m.get("reasoning"):
            with st.expander("Reasoning"):
                st.text(m["reasoning"])
        st.markdown(answer_markdown(m["content"]))
        for w in m.get("warnings", []):
            st.warning(as_text(w))
        if m["role"] == "assistant":
            show_sources(m.get("sources", []), m.get("citations", []))
            show_timings(m.get("timings", {}))


def ask(service: AnswerService, scope: UiScope, question: str, options: dict[str, Any]) -> None:
    s = _state()
    try:
        scope.check_read(options["collections"])
    except ScopeError as exc:
        st.error(as_text(str(exc)))
        return
    if s.conversation_id is None:
        s.conversation_id = service.conversations.create(title=question, collections=options["collections"]).id
    s.messages.append({"role": "user", "content": question})
    show_message(s.messages[-1])
    with st.chat_message("assistant"):
        thinking = st.empty()
        answer_box = st.empty()
        reasoning, answer = "", ""
        result = None
        events = service.stream(question, conversation_id=s.conversation_id, collections=options["collections"],
                                k=options["k"], mode=options["mode"], web=options["web"])
        try:
            with st.spinner("Searching…"):
                first = next(events)
            for ev in itertools.chain([first], events):
                if ev.kind == "reasoning":
                    reasoning += ev.data
                    with thinking.container():
                        with st.expander("Reasoning (thinking…)", expanded=True):
                            st.text(reasoning)
                elif ev.kind == "answer":
                    answer += ev.data
                    answer_box.markdown(answer_markdown(answer) + " ▌")
                elif ev.kind == "done":
                    result = ev.data
        except MoeragError as exc:
            st.error(as_text(str(exc)))
            return
        finally:
            # Streamlit's Stop, or a rerun while the answer streams, raises here: closing the
            # stream now (not when the garbage collector gets to it) ends the generation and
            # releases what it holds (the engine, its conversation rows).
            events.close()
        thinking.empty()
        answer_box.empty()
    if result is not None:
        s.messages.append({
            "role": "assistant", "content": result.answer, "reasoning": result.reasoning,
            "sources": [x.to_json() for x in result.sources], "citations": result.citations,
            "warnings": result.warnings, "timings": result.timings,
        })
        st.rerun()


def main() -> None:
    st.set_page_config(page_title="moerag", page_icon="📚", layout="wide")
    service = get_service()
    sign_in(service.settings)
    scope = UiScope.from_settings(service.settings)
    options = sidebar(service, scope)
    s = _state()
    if not s.messages:
        st.markdown("### Ask your documents")
        st.caption("Answers cite their sources as [n]; open a source below an answer to check it.")
    for m in s.messages:
        show_message(m)
    question = st.chat_input("Ask a question…", disabled=not options["collections"])
    if question:
        ask(service, scope, question, options)


if __name__ == "__main__":  # Streamlit runs this file as __main__; tests import it as app.ui
    main()
