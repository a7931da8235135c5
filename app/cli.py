"""`moerag`: the command line. A thin shell: parse flags, call the library, print.

Errors users can hit (MoeragError, and the engine's EngineError) become one red line and exit
code 1, here and only here.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from app.settings import Settings, load_settings
from retrieval.errors import MoeragError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="moerag: search and ask your documents, locally.")
docs_app = typer.Typer(no_args_is_help=True, help="List, show and remove documents.")
index_app = typer.Typer(no_args_is_help=True, help="Check or rebuild the FAISS index.")
app.add_typer(docs_app, name="docs")
app.add_typer(index_app, name="index")
model_app = typer.Typer(no_args_is_help=True, help="Inspect and quantize local MoE checkpoints (engine preview).")
app.add_typer(model_app, name="model")
conv_app = typer.Typer(no_args_is_help=True, help="List, show, rename and delete stored conversations.")
app.add_typer(conv_app, name="conversations")
keys_app = typer.Typer(no_args_is_help=True, help="API keys for the HTTP API (moerag serve).")
app.add_typer(keys_app, name="keys")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

HomeOpt = Annotated[Optional[Path], typer.Option("--home", help="Data directory (default: $MOERAG_HOME or ~/.moerag).")]
CollOpt = Annotated[Optional[str], typer.Option("--collection", "-c", help="Collection name (default: 'default').")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _settings(home: Path | None, **overrides) -> Settings:
    return load_settings(home=home).replace(**overrides)


def _kb(settings: Settings):
    from retrieval.index import IndexParams
    from retrieval.kb import KnowledgeBase

    params = IndexParams(exact_max=settings.exact_index_max, nprobe=settings.nprobe)
    return KnowledgeBase(settings.home, database_url=settings.database_url or None, index_params=params)


def _embedder(settings: Settings):
    from ingest.embedder import get_embedder

    return get_embedder(settings.embed_model)


class _RichProgress:
    """Files done / total, chunks embedded, chunks per second, time left."""

    def __init__(self, console: Console):
        self.bar = Progress(
            TextColumn("[bold]ingesting"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("files · {task.fields[chunks]} chunks · {task.fields[rate]} chunks/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = None
        self.chunks = 0

    def start(self, files: int) -> None:
        self.bar.start()
        self.task = self.bar.add_task("ingest", total=files, chunks=0, rate="-")

    def advance(self, *, files: int = 0, chunks: int = 0) -> None:
        self.chunks += chunks
        elapsed = self.bar.tasks[0].elapsed or 0
        rate = f"{self.chunks / elapsed:.0f}" if elapsed > 0.5 else "-"
        self.bar.update(self.task, advance=files, chunks=self.chunks, rate=rate)

    def stop(self) -> None:
        self.bar.stop()


# --- ingest ------------------------------------------------------------------------------------


@app.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="Files and folders to ingest (folders recursively).")],
    collection: CollOpt = None,
    prune: Annotated[bool, typer.Option("--prune", help="Remove documents under PATHS whose files are gone.")] = False,
    home: HomeOpt = None,
) -> None:
    """Parse, chunk and embed files into a collection; unchanged files are skipped."""
    from app.library import ingest_options
    from ingest.pipeline import ingest_paths

    s = _settings(home, collection=collection)
    kb = _kb(s)
    embedder = _embedder(s)
    options = ingest_options(s)
    progress = _RichProgress(err)
    try:
        report = ingest_paths(kb, embedder, paths, collection=s.collection, options=options, prune=prune, progress=progress)
    finally:
        progress.stop()
    table = Table(title=f"collection '{s.collection}' · {report.chunks} chunks embedded in {report.seconds:.1f} s")
    for status in ("added", "updated", "unchanged", "failed", "removed"):
        table.add_column(status, justify="right")
    table.add_row(*(str(report.count(st)) for st in ("added", "updated", "unchanged", "failed", "removed")))
    out.print(table)
    for r in report.failed:
        out.print(f"[red]failed[/] {escape(r.source)}: {escape(r.error or '')}")
    if report.failed:
        raise typer.Exit(2)


# --- search ------------------------------------------------------------------------------------


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    k: Annotated[int, typer.Option("-k", help="How many results.")] = 10,
    mode: Annotated[Optional[str], typer.Option("--mode", help="hybrid (default), dense or bm25.")] = None,
    collection: CollOpt = None,
    source: Annotated[Optional[str], typer.Option("--source", help="Only documents whose path starts with this.")] = None,
    web: Annotated[bool, typer.Option("--web", help="Also search the live web; one ranking with the knowledge base.")] = False,
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Search the knowledge base (dense + BM25, fused by reciprocal rank), and the web with --web."""
    s = _settings(home, collection=collection, search_mode=mode)
    src = str(Path(source).expanduser().resolve()) if source and Path(source).expanduser().exists() else source
    found = _service(s).search_items(query, collection=s.collection, k=k, mode=s.search_mode, source=src, web=web)
    if as_json:
        # Without --web: the array of results; with it: {"results", "skipped"} (and "warnings").
        print(json.dumps(found if web else found["results"], ensure_ascii=False, indent=2))
        return
    for w in found["warnings"]:
        err.print(f"[yellow]note[/]: {escape(w)}")
    if not found["results"]:
        out.print("No results.")
    for h in found["results"]:
        title, heading = h["document"]["title"], h["heading"] or ""
        if title and heading.startswith(title + " > "):  # the top heading usually repeats the title
            heading = heading[len(title) + 3 :]
        elif heading == title:
            heading = ""
        where = " · ".join(x for x in (f"p. {h['page']}" if h["page"] else "", heading) if x)
        origin = "[cyan]web[/] " if h["origin"] == "web" else ""
        out.print(f"[bold]{h['rank']}.[/] {origin}{escape(title or h['document']['source'])}  "
                  f"[dim]{escape(where)}  score {h['score']:.4f}[/]")
        out.print(f"   [dim]{escape(h['document']['source'])}[/]")
        snippet = " ".join(h["text"].split())
        out.print("   " + escape(snippet[:300] + ("…" if len(snippet) > 300 else "")))
    for sk in found["skipped"]:
        err.print(f"[dim]skipped {escape(sk['url'])}: {escape(sk['reason'])}[/]")


# --- docs --------------------------------------------------------------------------------------


@docs_app.command("list")
def docs_list(collection: CollOpt = None, as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """List the documents of a collection."""
    from app.library import list_documents

    s = _settings(home, collection=collection)
    docs = list_documents(_kb(s), s.collection)
    if as_json:
        print(json.dumps(docs, ensure_ascii=False, indent=2))
        return
    table = Table(title=f"collection '{s.collection}': {len(docs)} documents")
    for col in ("id", "status", "chunks", "title", "source"):
        table.add_column(col)
    for d in docs:
        status = "[green]ok[/]" if d["status"] == "ok" else f"[red]failed[/]: {escape(d['error'] or '')}"
        table.add_row(str(d["id"]), status, str(d["chunks"]), escape(d["title"] or ""), escape(d["source"]))
    out.print(table)


@docs_app.command("show")
def docs_show(doc_id: int, as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """Show one document and its chunks."""
    from app.library import document_row
    from retrieval.errors import NotFoundError
    from retrieval.store import Document

    kb = _kb(_settings(home))
    with kb.store.session() as session:
        doc = session.get(Document, doc_id)
        if doc is None:
            raise NotFoundError(f"No document with id {doc_id}. List them with: moerag docs list")
        info = document_row(doc)
        info["collection"] = doc.collection.name
        info["chunk_list"] = [
            {"id": c.id, "page": c.page, "heading": c.heading, "start": c.start, "end": c.end, "tokens": c.n_tokens, "text": c.text}
            for c in doc.chunks
        ]
    if as_json:
        print(json.dumps(info, ensure_ascii=False, indent=2))
        return
    for key in ("id", "collection", "title", "source", "type", "status", "error", "chunks", "size", "sha256", "updated_at"):
        if info.get(key) not in (None, ""):
            out.print(f"[bold]{key}[/]: {escape(str(info[key]))}")
    for c in info["chunk_list"]:
        where = " · ".join(x for x in (f"p. {c['page']}" if c["page"] else "", c["heading"] or "") if x)
        out.print(f"\n[bold]chunk {c['id']}[/] [dim]{escape(where)} [{c['start']}:{c['end']}] {c['tokens']} tokens[/]")
        out.print(escape(c["text"]))


@docs_app.command("rm")
def docs_rm(
    doc_ids: Annotated[Optional[list[int]], typer.Argument(help="Document ids (see: moerag docs list).")] = None,
    all_docs: Annotated[bool, typer.Option("--all", help="Remove every document of the collection.")] = False,
    collection: CollOpt = None,
    home: HomeOpt = None,
) -> None:
    """Remove documents (their chunks and vectors too)."""
    from app.library import delete_documents

    if not doc_ids and not all_docs:
        raise click.UsageError("Name document ids, or pass --all to empty the collection.")
    s = _settings(home, collection=collection)
    removed = delete_documents(_kb(s), s.collection, None if all_docs else doc_ids, lock_wait=s.lock_wait)
    out.print(f"Removed {removed} document(s) from '{s.collection}'.")


# --- index -------------------------------------------------------------------------------------


@index_app.command("check")
def index_check(collection: CollOpt = None, as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """Compare the FAISS and lexical indexes with the store; exit 1 if they disagree."""
    s = _settings(home, collection=collection)
    kb = _kb(s)
    with kb.store.session() as session:
        report = kb.check(session, kb.store.collection(session, s.collection))
    if as_json:
        print(json.dumps({**report.__dict__, "ok": report.ok}, indent=2))
    else:
        out.print(
            f"collection '{report.collection}': {report.chunks} chunks in the store, {report.index_chunks} in the "
            f"{report.kind} index (versions {report.store_version} / {report.index_version})"
        )
        for n in report.notes:
            out.print(f"[yellow]note[/]: {escape(n)}")
        for p in report.problems:
            out.print(f"[red]problem[/]: {escape(p)}")
        out.print("[green]consistent[/]" if report.ok else "[red]inconsistent[/]: fix with: moerag index rebuild")
    if not report.ok:
        raise typer.Exit(1)


@index_app.command("rebuild")
def index_rebuild(collection: CollOpt = None, home: HomeOpt = None) -> None:
    """Rebuild the FAISS index from the stored vectors (no re-embedding)."""
    s = _settings(home, collection=collection)
    kb = _kb(s)
    with kb.write_lock(), kb.store.session() as session:
        vi = kb.rebuild_index(session, kb.store.collection(session, s.collection))
    out.print(f"Rebuilt the {vi.kind} index of '{s.collection}' with {len(vi)} chunks.")


# --- eval --------------------------------------------------------------------------------------


@app.command("eval")
def eval_cmd(
    dataset: Annotated[Path, typer.Argument(help="BEIR dataset folder (corpus.jsonl, queries.jsonl, qrels/).")],
    mode: Annotated[Optional[str], typer.Option("--mode", help="hybrid, dense, bm25, or all.")] = None,
    split: Annotated[str, typer.Option("--split", help="qrels split to score.")] = "test",
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Measure retrieval quality (nDCG@10, Recall@10/100, MRR@10) on a BEIR dataset."""
    from app.evaluate import evaluate
    from retrieval.search import MODES

    s = _settings(home)
    # all: each retriever alone, then their fusion (the table's rows in that order)
    modes = sorted(MODES, key=lambda m: m == "hybrid") if mode == "all" else [mode or s.search_mode]
    progress = _RichProgress(err)
    try:
        rows = evaluate(
            dataset, settings=s, embedder=_embedder(s), modes=modes, split=split, progress=progress,
            on_phase=lambda msg: err.print(f"[dim]{msg}[/]"),
        )
    finally:
        progress.stop()
    if as_json:
        print(json.dumps(rows[0] if len(rows) == 1 else rows, indent=2))
        return
    table = Table(title=f"{dataset} ({split}): {rows[0]['queries']} queries, {rows[0]['documents']} documents, "
                        f"ingested in {rows[0]['ingest_seconds']:.0f} s")
    for col in ("mode", "nDCG@10", "Recall@10", "Recall@100", "MRR@10", "ms/query"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["mode"], *(f"{r[m]:.4f}" for m in ("ndcg@10", "recall@10", "recall@100", "mrr@10")),
                      f"{r['search_ms_per_query']:.1f}")
    out.print(table)


# --- ask, chat, conversations, ui ---------------------------------------------------------------

CollsOpt = Annotated[
    Optional[list[str]], typer.Option("--collection", "-c", help="Collection to search (repeat for several; default: 'default').")
]


def _service(s: Settings):
    from app.service import AnswerService

    return AnswerService(s)


@contextmanager
def _ctrl_c_stops(cancel: threading.Event) -> Iterator[None]:
    """While an answer streams, the first Ctrl-C sets `cancel`: the answer stops after its current
    step and what was written is kept. A second Ctrl-C interrupts at once. Off the main thread
    (the CLI run in-process) signals cannot be caught, and Ctrl-C is left as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_ctrl_c(_signum: int, _frame: Any) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _print_stream(events, *, show_sources: bool = True):
    """Reasoning dimmed, the answer as it streams, then warnings, sources and timings; returns the Answer.
    However printing ends (Ctrl-C included), `events` is closed: the answer releases what it holds."""
    from app.service import STOPPED_NOTE

    answer = None
    in_reasoning = False
    with closing(events):
        for ev in events:
            if ev.kind == "reasoning":
                if not in_reasoning:
                    out.print("[dim]thinking…[/]")
                    in_reasoning = True
                out.print(escape(ev.data), style="dim", end="")
            elif ev.kind == "answer":
                if in_reasoning:
                    out.print("\n")
                    in_reasoning = False
                out.print(escape(ev.data), end="")
            elif ev.kind == "done":
                answer = ev.data
    out.print()
    if answer is None:
        return None
    if answer.stopped:
        err.print("[yellow]stopped[/]: the answer above is incomplete.")
    for w in answer.warnings:
        if w != STOPPED_NOTE:
            err.print(f"[yellow]note[/]: {escape(w)}")
    if show_sources and answer.sources:
        out.print()
        for src in answer.sources:
            mark = "[bold]" if src.n in answer.citations else "[dim]"
            out.print(f"{mark}[{src.n}][/] {escape(src.title or src.source)} [dim]· {escape(src.where)}[/]")
    t = answer.timings
    speed = f" · {t['tokens_per_s']:.1f} tok/s" if t.get("tokens_per_s") else ""
    err.print(f"[dim]{answer.generator} · retrieval {t['retrieval_ms']:.0f} ms · first token {t['first_token_ms']:.0f} ms"
              f" · total {t['total_ms'] / 1000:.1f} s{speed}[/]")
    return answer


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    collection: CollsOpt = None,
    k: Annotated[Optional[int], typer.Option("-k", help="Sources to retrieve (default 8).")] = None,
    mode: Annotated[Optional[str], typer.Option("--mode", help="hybrid (default), dense or bm25.")] = None,
    conversation: Annotated[
        Optional[int], typer.Option("--conversation", help="Continue this stored conversation (see: moerag conversations list).")
    ] = None,
    web: Annotated[bool, typer.Option("--web", help="Also use live web results (one ranking with the knowledge base).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the final answer as JSON (nothing streamed).")] = False,
    home: HomeOpt = None,
) -> None:
    """Answer a question from the knowledge base (and the web with --web), citing sources as [n].
    Ctrl-C stops the answer (kept as far as it got, marked stopped) and exits with code 130."""
    s = _settings(home, search_mode=mode)
    service = _service(s)
    cancel = threading.Event()
    events = service.stream(question, collections=collection or None, k=k, conversation_id=conversation, web=web,
                            cancel=cancel)
    with _ctrl_c_stops(cancel):
        if as_json:
            with closing(events):
                answer = next(ev.data for ev in events if ev.kind == "done")
            print(json.dumps(answer.to_json(), ensure_ascii=False, indent=2))
        else:
            answer = _print_stream(events)
    if answer is not None and answer.stopped:
        raise typer.Exit(130)


@app.command()
def chat(
    collection: CollsOpt = None,
    resume: Annotated[Optional[int], typer.Option("--resume", help="Continue a stored conversation.")] = None,
    home: HomeOpt = None,
) -> None:
    """An interactive chat in the terminal (stored; /new starts over, /exit or Ctrl-D quits).
    Ctrl-C during an answer stops it (kept as far as it got); Ctrl-C at the prompt quits."""
    s = _settings(home)
    service = _service(s)
    convs = service.conversations
    if resume is not None:
        conv = convs.get(resume)
        out.print(f"[bold]{escape(conv.title or 'conversation')}[/] [dim]#{conv.id}, {len(conv.messages)} messages[/]")
        for m in conv.messages[-4:]:
            out.print(f"[dim]{m.role}: {escape(m.content[:300])}[/]")
    else:
        conv = convs.create(collections=collection or [])
    status = service.generator.status()
    err.print(f"[dim]generator: {escape(status.model)} · collections: {', '.join(collection or [s.collection])} · "
              "/new for a new conversation, /exit to quit[/]")
    while True:
        try:
            line = input("\nyou> ").strip()
        except EOFError:
            break
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/new":
            conv = convs.create(collections=collection or [])
            out.print("[dim]new conversation[/]")
            continue
        cancel = threading.Event()
        try:
            with _ctrl_c_stops(cancel):
                _print_stream(service.stream(line, conversation_id=conv.id, collections=collection or None, cancel=cancel))
        except KeyboardInterrupt:  # a second Ctrl-C: the stream was closed on the way out, and its row stored
            out.print()
            err.print("[yellow]stopped[/]")
        except MoeragError as exc:
            err.print(f"[red]Error:[/] {escape(str(exc))}")
    out.print(f"[dim]Saved as conversation {conv.id}; continue it with: moerag chat --resume {conv.id}[/]")


@conv_app.command("list")
def conversations_list(as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """Stored conversations, most recent first."""
    convs = _service(_settings(home)).conversations.list()
    if as_json:
        rows = [{"id": c.id, "title": c.title, "collections": c.collections, "updated_at": c.updated_at.isoformat()} for c in convs]
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    table = Table(title=f"{len(convs)} conversations")
    for col in ("id", "title", "updated"):
        table.add_column(col)
    for c in convs:
        table.add_row(str(c.id), escape(c.title or "(untitled)"), c.updated_at.strftime("%Y-%m-%d %H:%M"))
    out.print(table)


@conv_app.command("show")
def conversations_show(conversation_id: int, as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """One conversation with its messages and the sources each answer cited."""
    conv = _service(_settings(home)).conversations.get(conversation_id)
    if as_json:
        data = {"id": conv.id, "title": conv.title, "collections": conv.collections,
                "messages": [vars(m) for m in conv.messages]}
        print(json.dumps(data, ensure_ascii=False, indent=2))
        return
    out.print(f"[bold]{escape(conv.title or '(untitled)')}[/] [dim]#{conv.id}[/]")
    for m in conv.messages:
        out.print(f"\n[bold]{m.role}[/]: {escape(m.content)}")
        for src in m.sources:
            if src["n"] in m.citations:
                out.print(f"  [dim][{src['n']}] {escape(src['title'] or src['source'])} · {escape(src['source'])}[/]")


@conv_app.command("rename")
def conversations_rename(conversation_id: int, title: str, home: HomeOpt = None) -> None:
    """Give a conversation a new title."""
    _service(_settings(home)).conversations.rename(conversation_id, title)
    out.print(f"Renamed conversation {conversation_id}.")


@conv_app.command("rm")
def conversations_rm(conversation_ids: list[int], home: HomeOpt = None) -> None:
    """Delete conversations and their messages."""
    convs = _service(_settings(home)).conversations
    for cid in conversation_ids:
        convs.delete(cid)
    out.print(f"Deleted {len(conversation_ids)} conversation(s).")


@app.command()
def ui(
    port: Annotated[int, typer.Option("--port", help="Port to serve on.")] = 8501,
    host: Annotated[str, typer.Option("--host", help="Address to bind (0.0.0.0 to serve the network).")] = "127.0.0.1",
    home: HomeOpt = None,
) -> None:
    """Start the chat UI in the browser (Streamlit) at http://HOST:PORT.

    Beyond loopback it needs a sign-in: MOERAG_UI_PASSWORD, or Streamlit's OIDC login."""
    import os

    from app.ui_access import REQUIRE_AUTH_ENV, is_loopback, refusal

    s = _settings(home)
    env = {**os.environ, "MOERAG_HOME": str(s.home)}
    script = Path(__file__).with_name("ui.py")
    # Checked before Streamlit starts: a page open to the network without a sign-in would show
    # every document to anyone who finds the port.
    problem = refusal(host, s, script)
    if problem:
        err.print(f"[red]Error:[/] {escape(problem)}")
        raise typer.Exit(2)
    if not is_loopback(host):
        env[REQUIRE_AUTH_ENV] = "1"  # the page fails closed if it finds no sign-in either
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(script), "--server.port", str(port), "--server.address", host,
        "--server.headless", "true", "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
        "--client.toolbarMode", "viewer",
        "--server.maxUploadSize", str(max(1, int(s.max_file_mb))),
    ]
    err.print(f"moerag UI on [bold]http://{'localhost' if host in ('127.0.0.1', '0.0.0.0') else host}:{port}[/] "
              f"(data in {escape(str(s.home))}); Ctrl-C stops it.")
    sys.stdout.flush()
    sys.stderr.flush()
    # Become the Streamlit server (no child process): signals reach it directly, so stopping
    # `moerag ui` never leaves a server running.
    os.execve(sys.executable, cmd, env)


# --- the HTTP API: serve, keys ------------------------------------------------------------------


def _keys(s: Settings):
    from app.keys import Keys

    return Keys(_kb(s).store)


@app.command()
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to bind (0.0.0.0 to serve the network).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to serve on.")] = 8000,
    home: HomeOpt = None,
) -> None:
    """Serve the HTTP API: OpenAI-compatible chat, embeddings, knowledge base, metrics, widget."""
    import uvicorn

    from app.api import create_app

    s = _settings(home)
    api = create_app(s)
    if not _keys(s).list():
        err.print("[yellow]note[/]: no API keys yet; every call but /healthz needs one: moerag keys create --name NAME")
    err.print(f"moerag API on [bold]http://{host}:{port}[/] (OpenAPI docs at /docs, widget demo at /widget/demo)")
    uvicorn.run(api, host=host, port=port, log_level="warning")


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="What the key is for, e.g. the tool that uses it.")],
    collections: Annotated[
        Optional[str], typer.Option("--collections", help="Comma-separated collections the key may use (default: all).")
    ] = None,
    read_only: Annotated[bool, typer.Option("--read-only", help="The key cannot upload or delete documents.")] = False,
    web: Annotated[bool, typer.Option("--web", help="The key may ask for live web results (off by default).")] = False,
    home: HomeOpt = None,
) -> None:
    """Create an API key; its plaintext is printed once, alone on the last line."""
    scope = [c.strip() for c in (collections or "").split(",") if c.strip()]
    key, plaintext = _keys(_settings(home)).create(name, collections=scope, read_only=read_only, web=web)
    err.print(f"Created key {key.id} '{escape(key.name)}' ({'read-only' if key.read_only else 'read-write'}, "
              f"collections: {', '.join(key.collections) or 'all'}, web: {'yes' if key.web else 'no'}). "
              "It is shown only now; store it safely:")
    print(plaintext)


@keys_app.command("list")
def keys_list(as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """API keys (never their plaintext)."""
    rows = [
        {"id": k.id, "name": k.name, "hint": k.hint + "…", "collections": list(k.collections), "read_only": k.read_only,
         "web": k.web, "revoked": k.revoked, "created_at": k.created_at.isoformat()}
        for k in _keys(_settings(home)).list()
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{len(rows)} API keys")
    for col in ("id", "name", "key", "collections", "access", "web", "state"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["id"]), escape(r["name"]), r["hint"], escape(", ".join(r["collections"]) or "all"),
                      "read-only" if r["read_only"] else "read-write", "yes" if r["web"] else "no",
                      "[red]revoked[/]" if r["revoked"] else "active")
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(key: Annotated[str, typer.Argument(help="Key id or name (see: moerag keys list).")], home: HomeOpt = None) -> None:
    """Revoke an API key: it stops working at once."""
    revoked = _keys(_settings(home)).revoke(key)
    out.print(f"Revoked key {revoked.id} '{escape(revoked.name)}'.")


# --- engine: model info / quantize, generate ----------------------------------------------------


@model_app.command("info")
def model_info(
    path: Annotated[str, typer.Argument(help="Checkpoint directory (config.json + *.safetensors), .gguf file or hub id.")],
    as_json: JsonOpt = False,
) -> None:
    """Architecture, parameter counts, experts, layers, context, dtype and quantization of a checkpoint."""
    from engine.info import describe

    info = describe(path)
    rows = {
        "directory": str(info.directory),
        "architecture": f"{info.architecture} ({info.model_type})",
        "parameters": f"{info.total_params / 1e9:.3f} B total, {info.active_params / 1e9:.3f} B active per token",
        "layers": f"{info.layers} ({info.moe_layers} MoE)",
        "experts": f"{info.experts} routed, {info.experts_per_token} per token" if info.experts else "none (dense)",
        "hidden / vocab": f"{info.hidden_size} / {info.vocab_size}",
        "context": f"{info.context_length} tokens",
        "dtype": info.dtype,
        "format": f"{info.weight_format}, {info.bits_per_weight:.2f} bits per weight",
        "quantization": "none",
        "on disk": f"{info.checkpoint_bytes / 2**30:.2f} GiB",
    }
    if info.quantization:
        rows["quantization"] = f"{info.quantization['scheme']} (group size {info.quantization['group_size']})"
    if as_json:
        fields = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(info).items()}
        if fields["quantization"]:
            fields["quantization"] = {**fields["quantization"], "targets": list(fields["quantization"]["targets"])}
        print(json.dumps(fields, indent=2))
        return
    table = Table(show_header=False, box=None)
    for key, value in rows.items():
        table.add_row(f"[bold]{key}[/]", escape(value))
    out.print(table)


@model_app.command("quantize")
def model_quantize(
    src: Annotated[str, typer.Argument(help="Checkpoint directory, .gguf file or hub id to quantize.")],
    dst: Annotated[Path, typer.Argument(help="New directory for the quantized checkpoint.")],
    scheme: Annotated[str, typer.Option("--scheme", help="int4 (group-wise) or int8 (per channel).")] = "int4",
    group_size: Annotated[int, typer.Option("--group-size", help="int4 inputs per scale: 32, 64, 128 or 256.")] = 128,
) -> None:
    """Write a weight-only quantized safetensors checkpoint that loads directly (layer by layer, low memory)."""
    import time

    from engine.export import quantize_checkpoint

    start = time.perf_counter()
    quantize_checkpoint(src, dst, scheme=scheme, group_size=group_size)
    size = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
    out.print(f"Wrote {escape(str(dst))} ({scheme}, {size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s.")


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The question or instruction.")],
    model: Annotated[str, typer.Option("--model", help="Checkpoint directory, .gguf file or hub id.")],
    quantize: Annotated[Optional[str], typer.Option("--quantize", help="int8 or int4, applied while loading.")] = None,
    think: Annotated[
        Optional[bool], typer.Option("--think/--no-think", help="Qwen3's thinking switch (default: the template's).")
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="New tokens at most.")] = 512,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy.")] = 0.0,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Sampling seed.")] = None,
) -> None:
    """Stream a reply from a local model: reasoning dimmed, then the answer, then tokens/s."""
    import time

    import torch

    from engine import SamplingParams, load_model
    from engine.reasoning import ReasoningSplitter

    dtype = torch.float32 if quantize is None else torch.bfloat16  # the int kernels are fast with bf16
    llm = load_model(model, dtype=dtype, quantize=quantize)
    chat = getattr(llm.tokenizer, "chat_template", None) is not None
    messages = [{"role": "user", "content": prompt}]
    ids = llm.prompt_ids(messages, enable_thinking=think) if chat else llm.prompt_ids(prompt)
    splitter = ReasoningSplitter.after(llm.tokenizer.decode(ids))
    sampling = SamplingParams(temperature=temperature, seed=seed, max_new_tokens=max_tokens)
    tokens, start, first = 0, time.perf_counter(), None
    for token, delta in llm.stream_tokens(ids, sampling):
        if token is not None:
            tokens += 1
            first = first or time.perf_counter()
        for piece in splitter.feed(delta):
            out.print(escape(piece.text), style="dim" if piece.kind == "reasoning" else None, end="")
    for piece in splitter.close():
        out.print(escape(piece.text), style="dim" if piece.kind == "reasoning" else None, end="")
    end = time.perf_counter()
    decode = f"{(tokens - 1) / (end - first):.2f} tok/s decode" if first and tokens > 1 and end > first else "-"
    out.print()
    first_s = (first or end) - start
    err.print(f"[dim]{tokens} tokens in {end - start:.1f} s · {decode} · first token {first_s:.2f} s[/]")


def _is_engine_error(exc: BaseException) -> bool:
    # The engine (and torch) load only when an engine command runs; if engine.errors was never
    # imported, no EngineError can have been raised.
    errors = sys.modules.get("engine.errors")
    return errors is not None and isinstance(exc, errors.EngineError)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        rc = app(standalone_mode=False)
    except MoeragError as exc:
        err.print(f"[red]Error:[/] {escape(str(exc))}")
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        err.print("Interrupted. Everything committed so far is kept; run the command again to finish.")
        sys.exit(130)
    except Exception as exc:
        if not _is_engine_error(exc):
            raise
        err.print(f"[red]Error:[/] {escape(str(exc))}")
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
