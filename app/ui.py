"""The chat UI (`moerag ui`): Streamlit over AnswerService.

The main pane is the conversation: answers stream in, the model's reasoning fills a collapsible
section while it thinks, and each answer's [n] markers match its sources panel. The sidebar
holds the collection picker, generator status, retrieval settings, uploads, the document list
and the conversation history. Text from documents (and answers quoting them) is shown as text:
markdown that could load images or links, and any HTML, is escaped first.
"""

from __future__ import annotations

import re
from typing import Any

import streamlit as st

from app.library import delete_documents, ingest_uploads, list_documents
from app.service import AnswerService
from app.settings import load_settings
from retrieval.errors import MoeragError

MODES = ("hybrid", "dense", "bm25")
_MD_SPECIAL = re.compile(r"([\\\[\]<>!*_#|~$])")


def as_text(text: str) -> str:
    """Markdown that renders `text` literally: no HTML, images, links, emphasis or headings."""
    return _MD_SPECIAL.sub(r"\\\1", text).replace("\n", "  \n")


def answer_markdown(text: str) -> str:
    """An answer keeps its line breaks and citations, but nothing in it can load or run anything."""
    return as_text(text)


@st.cache_resource(show_spinner="Loading moerag…")
def get_service() -> AnswerService:
    return AnswerService(load_settings())


def _state() -> Any:
    s = st.session_state
    s.setdefault("conversation_id", None)
    s.setdefault("messages", [])  # dicts: role, content, reasoning, sources, citations, warnings, timings
    s.setdefault("uploads", 0)  # bumps the uploader's key to clear it after an ingest
    return s


# --- the sidebar -------------------------------------------------------------------------------------


def sidebar(service: AnswerService) -> dict[str, Any]:
    s = _state()
    st.sidebar.title("moerag")
    try:
        names = service.collections()
    except MoeragError as exc:
        st.sidebar.error(str(exc))
        names = []
    default = service.settings.collection
    if names:
        chosen = st.sidebar.multiselect("Collections", names, default=[default if default in names else names[0]])
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

    with st.sidebar.expander("Add documents", expanded=not names):
        target = st.text_input("Into collection", value=chosen[0] if chosen else default)
        files = st.file_uploader("Files", accept_multiple_files=True, key=f"uploader-{s.uploads}")
        if files and st.button("Ingest", type="primary"):
            upload(service, target, files)

    if chosen:
        documents(service, chosen[0])
    conversations(service)
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


def upload(service: AnswerService, collection: str, files: list[Any]) -> None:
    if not collection.strip():
        st.sidebar.error("Name the collection to add the files to.")
        return
    with st.sidebar.status(f"Ingesting {len(files)} file(s)…", expanded=True) as box:
        try:
            report = ingest_uploads(service.kb, service.embedder, [(f.name, f.getvalue()) for f in files],
                                    collection=collection.strip(), settings=service.settings, progress=_UiProgress())
        except MoeragError as exc:
            box.update(label="Upload failed", state="error")
            st.error(str(exc))
            return
        failed = [(f.name, r) for f, r in zip(files, report.results) if r.status == "failed"]
        for name, r in failed:
            st.error(f"{name}: {r.error}")
        added = sum(r.status in ("added", "updated") for r in report.results)
        box.update(label=f"{added} added, {len(failed)} failed, {report.chunks} chunks", state="error" if failed else "complete")
    if not failed:
        st.session_state.uploads += 1


def documents(service: AnswerService, collection: str) -> None:
    try:
        docs = list_documents(service.kb, collection)
    except MoeragError as exc:
        st.sidebar.error(str(exc))
        return
    with st.sidebar.expander(f"Documents in '{collection}' ({len(docs)})"):
        for d in docs:
            left, right = st.columns([5, 1])
            label = d["title"] or d["source"].rsplit("/", 1)[-1]
            state = f"{d['chunks']} chunks" if d["status"] == "ok" else f"failed: {d['error']}"
            left.caption(f"**{as_text(label)}**  \n{as_text(state)}")
            if right.button("✕", key=f"del-doc-{d['id']}", help=f"Delete {label}"):
                delete_documents(service.kb, collection, [d["id"]])
                st.rerun()


def conversations(service: AnswerService) -> None:
    s = _state()
    st.sidebar.subheader("Conversations")
    if st.sidebar.button("New conversation", use_container_width=True):
        s.conversation_id, s.messages = None, []
        st.rerun()
    store = service.conversations
    for conv in store.list(limit=30):
        left, right = st.sidebar.columns([5, 1])
        current = conv.id == s.conversation_id
        if left.button(("▸ " if current else "") + (conv.title or "untitled"), key=f"conv-{conv.id}", use_container_width=True):
            resume(service, conv.id)
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


def resume(service: AnswerService, conversation_id: int) -> None:
    conv = service.conversations.get(conversation_id)
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
        with st.expander(f"{mark} [{src['n']}] {as_text(src.get('title') or where)}{page}"):
            st.caption(f"{as_text(where)}{as_text(' · ' + src['heading']) if src.get('heading') else ''} · "
                       f"relevance {src.get('score', 0):.4f}")
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
            st.warning(w)
        if m["role"] == "assistant":
            show_sources(m.get("sources", []), m.get("citations", []))
            show_timings(m.get("timings", {}))


def ask(service: AnswerService, question: str, options: dict[str, Any]) -> None:
    s = _state()
    if s.conversation_id is None:
        s.conversation_id = service.conversations.create(title=question, collections=options["collections"]).id
    s.messages.append({"role": "user", "content": question})
    show_message(s.messages[-1])
    with st.chat_message("assistant"):
        thinking = st.empty()
        answer_box = st.empty()
        reasoning, answer = "", ""
        result = None
        try:
            with st.spinner("Searching…"):
                events = service.stream(question, conversation_id=s.conversation_id, collections=options["collections"],
                                        k=options["k"], mode=options["mode"], web=options["web"])
                first = next(events)
            for ev in _chain(first, events):
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
            st.error(str(exc))
            return
        thinking.empty()
        answer_box.empty()
    if result is not None:
        s.messages.append({
            "role": "assistant", "content": result.answer, "reasoning": result.reasoning,
            "sources": [x.to_json() for x in result.sources], "citations": result.citations,
            "warnings": result.warnings, "timings": result.timings,
        })
        st.rerun()


def _chain(first, rest):
    yield first
    yield from rest


def main() -> None:
    st.set_page_config(page_title="moerag", page_icon="📚", layout="wide")
    service = get_service()
    options = sidebar(service)
    s = _state()
    if not s.messages:
        st.markdown("### Ask your documents")
        st.caption("Answers cite their sources as [n]; open a source below an answer to check it.")
    for m in s.messages:
        show_message(m)
    question = st.chat_input("Ask a question…", disabled=not options["collections"])
    if question:
        ask(service, question, options)


main()
