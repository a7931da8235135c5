"""Answers: `moerag ask` and `chat` in the terminal, `moerag ui` in the browser, and the stored
`moerag conversations` they continue.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from app.cli.common import HomeOpt, JsonOpt, answer_service, cli_settings, err, out
from retrieval.errors import MoeragError

commands = typer.Typer()
group = typer.Typer(no_args_is_help=True, help="List, show, rename and delete stored conversations.")

CollsOpt = Annotated[
    list[str] | None,
    typer.Option("--collection", "-c", help="Collection to search (repeat for several; default: 'default')."),
]


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
    err.print(
        f"[dim]{answer.generator} · retrieval {t['retrieval_ms']:.0f} ms · first token {t['first_token_ms']:.0f} ms"
        f" · total {t['total_ms'] / 1000:.1f} s{speed}[/]"
    )
    return answer


@commands.command()
def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    collection: CollsOpt = None,
    k: Annotated[int | None, typer.Option("-k", help="Sources to retrieve (default 8).")] = None,
    mode: Annotated[str | None, typer.Option("--mode", help="hybrid (default), dense or bm25.")] = None,
    conversation: Annotated[
        int | None,
        typer.Option("--conversation", help="Continue this stored conversation (see: moerag conversations list)."),
    ] = None,
    web: Annotated[
        bool, typer.Option("--web", help="Also use live web results (one ranking with the knowledge base).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the final answer as JSON (nothing streamed).")] = False,
    home: HomeOpt = None,
) -> None:
    """Answer a question from the knowledge base (and the web with --web), citing sources as \\[n].
    Ctrl-C stops the answer (kept as far as it got, marked stopped) and exits with code 130."""
    s = cli_settings(home, search_mode=mode)
    service = answer_service(s)
    cancel = threading.Event()
    events = service.stream(
        question, collections=collection or None, k=k, conversation_id=conversation, web=web, cancel=cancel
    )
    with _ctrl_c_stops(cancel):
        if as_json:
            with closing(events):
                answer = next(ev.data for ev in events if ev.kind == "done")
            print(json.dumps(answer.to_json(), ensure_ascii=False, indent=2))
        else:
            answer = _print_stream(events)
    if answer is not None and answer.stopped:
        raise typer.Exit(130)


@commands.command()
def chat(
    collection: CollsOpt = None,
    resume: Annotated[int | None, typer.Option("--resume", help="Continue a stored conversation.")] = None,
    home: HomeOpt = None,
) -> None:
    """An interactive chat in the terminal (stored; /new starts over, /exit or Ctrl-D quits).
    Ctrl-C during an answer stops it (kept as far as it got); Ctrl-C at the prompt quits."""
    s = cli_settings(home)
    service = answer_service(s)
    convs = service.conversations
    if resume is not None:
        conv = convs.get(resume)
        out.print(f"[bold]{escape(conv.title or 'conversation')}[/] [dim]#{conv.id}, {len(conv.messages)} messages[/]")
        for m in conv.messages[-4:]:
            out.print(f"[dim]{m.role}: {escape(m.content[:300])}[/]")
    else:
        conv = convs.create(collections=collection or [])
    status = service.generator.status()
    err.print(
        f"[dim]generator: {escape(status.model)} · collections: {', '.join(collection or [s.collection])} · "
        "/new for a new conversation, /exit to quit[/]"
    )
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
                _print_stream(
                    service.stream(line, conversation_id=conv.id, collections=collection or None, cancel=cancel)
                )
        except KeyboardInterrupt:  # a second Ctrl-C: the stream was closed on the way out, and its row stored
            out.print()
            err.print("[yellow]stopped[/]")
        except MoeragError as exc:
            err.print(f"[red]Error:[/] {escape(str(exc))}")
    out.print(f"[dim]Saved as conversation {conv.id}; continue it with: moerag chat --resume {conv.id}[/]")


@group.command("list")
def conversations_list(as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """Stored conversations, most recent first."""
    convs = answer_service(cli_settings(home)).conversations.list()
    if as_json:
        rows = [
            {"id": c.id, "title": c.title, "collections": c.collections, "updated_at": c.updated_at.isoformat()}
            for c in convs
        ]
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    table = Table(title=f"{len(convs)} conversations")
    for col in ("id", "title", "updated"):
        table.add_column(col)
    for c in convs:
        table.add_row(str(c.id), escape(c.title or "(untitled)"), c.updated_at.strftime("%Y-%m-%d %H:%M"))
    out.print(table)


@group.command("show")
def conversations_show(conversation_id: int, as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """One conversation with its messages and the sources each answer cited."""
    conv = answer_service(cli_settings(home)).conversations.get(conversation_id)
    if as_json:
        data = {
            "id": conv.id,
            "title": conv.title,
            "collections": conv.collections,
            "messages": [vars(m) for m in conv.messages],
        }
        print(json.dumps(data, ensure_ascii=False, indent=2))
        return
    out.print(f"[bold]{escape(conv.title or '(untitled)')}[/] [dim]#{conv.id}[/]")
    for m in conv.messages:
        out.print(f"\n[bold]{m.role}[/]: {escape(m.content)}")
        for src in m.sources:
            if src["n"] in m.citations:
                out.print(f"  [dim][{src['n']}] {escape(src['title'] or src['source'])} · {escape(src['source'])}[/]")


@group.command("rename")
def conversations_rename(conversation_id: int, title: str, home: HomeOpt = None) -> None:
    """Give a conversation a new title."""
    answer_service(cli_settings(home)).conversations.rename(conversation_id, title)
    out.print(f"Renamed conversation {conversation_id}.")


@group.command("rm")
def conversations_rm(conversation_ids: list[int], home: HomeOpt = None) -> None:
    """Delete conversations and their messages."""
    convs = answer_service(cli_settings(home)).conversations
    for cid in conversation_ids:
        convs.delete(cid)
    out.print(f"Deleted {len(conversation_ids)} conversation(s).")


@commands.command()
def ui(
    port: Annotated[int, typer.Option("--port", help="Port to serve on.")] = 8501,
    host: Annotated[str, typer.Option("--host", help="Address to bind (0.0.0.0 to serve the network).")] = "127.0.0.1",
    home: HomeOpt = None,
) -> None:
    """Start the chat UI in the browser (Streamlit) at http://HOST:PORT.

    Beyond loopback it needs a sign-in: MOERAG_UI_PASSWORD, or Streamlit's OIDC login."""
    import os

    from app.ui_access import REQUIRE_AUTH_ENV, is_loopback, refusal

    s = cli_settings(home)
    env = {**os.environ, "MOERAG_HOME": str(s.home)}
    script = Path(__file__).parents[1] / "ui.py"  # app/ui.py
    # Checked before Streamlit starts: a page open to the network without a sign-in would show
    # every document to anyone who finds the port.
    problem = refusal(host, s, script)
    if problem:
        err.print(f"[red]Error:[/] {escape(problem)}")
        raise typer.Exit(2)
    if not is_loopback(host):
        env[REQUIRE_AUTH_ENV] = "1"  # the page fails closed if it finds no sign-in either
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(script),
        "--server.port",
        str(port),
        "--server.address",
        host,
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
        "--client.toolbarMode",
        "viewer",
        "--server.maxUploadSize",
        str(max(1, int(s.max_file_mb))),
    ]
    err.print(
        f"moerag UI on [bold]http://{'localhost' if host in ('127.0.0.1', '0.0.0.0') else host}:{port}[/] "
        f"(data in {escape(str(s.home))}); Ctrl-C stops it."
    )
    sys.stdout.flush()
    sys.stderr.flush()
    # Become the Streamlit server (no child process): signals reach it directly, so stopping
    # `moerag ui` never leaves a server running.
    os.execve(sys.executable, cmd, env)
