"""`moerag docs`: list, show and remove a collection's documents (app.library's data functions)."""

from __future__ import annotations

import json
from typing import Annotated

import click
import typer
from rich.markup import escape
from rich.table import Table

from app.cli.common import CollOpt, HomeOpt, JsonOpt, cli_settings, knowledge_base, out

group = typer.Typer(no_args_is_help=True, help="List, show and remove documents.")


@group.command("list")
def docs_list(collection: CollOpt = None, as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """List the documents of a collection."""
    from app.library import list_documents

    s = cli_settings(home, collection=collection)
    docs = list_documents(knowledge_base(s), s.collection)
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


@group.command("show")
def docs_show(doc_id: int, as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """Show one document and its chunks."""
    from app.library import document_row
    from retrieval.errors import NotFoundError
    from retrieval.store import Document

    kb = knowledge_base(cli_settings(home))
    with kb.store.session() as session:
        doc = session.get(Document, doc_id)
        if doc is None:
            raise NotFoundError(f"No document with id {doc_id}. List them with: moerag docs list")
        info = document_row(doc)
        info["collection"] = doc.collection.name
        info["chunk_list"] = [
            {
                "id": c.id,
                "page": c.page,
                "heading": c.heading,
                "start": c.start,
                "end": c.end,
                "tokens": c.n_tokens,
                "text": c.text,
            }
            for c in doc.chunks
        ]
    if as_json:
        print(json.dumps(info, ensure_ascii=False, indent=2))
        return
    for key in (
        "id",
        "collection",
        "title",
        "source",
        "type",
        "status",
        "error",
        "chunks",
        "size",
        "sha256",
        "updated_at",
    ):
        if info.get(key) not in (None, ""):
            out.print(f"[bold]{key}[/]: {escape(str(info[key]))}")
    for c in info["chunk_list"]:
        where = " · ".join(x for x in (f"p. {c['page']}" if c["page"] else "", c["heading"] or "") if x)
        out.print(f"\n[bold]chunk {c['id']}[/] [dim]{escape(where)} [{c['start']}:{c['end']}] {c['tokens']} tokens[/]")
        out.print(escape(c["text"]))


@group.command("rm")
def docs_rm(
    doc_ids: Annotated[list[int] | None, typer.Argument(help="Document ids (see: moerag docs list).")] = None,
    all_docs: Annotated[bool, typer.Option("--all", help="Remove every document of the collection.")] = False,
    collection: CollOpt = None,
    home: HomeOpt = None,
) -> None:
    """Remove documents (their chunks and vectors too)."""
    from app.library import delete_documents

    if not doc_ids and not all_docs:
        raise click.UsageError("Name document ids, or pass --all to empty the collection.")
    s = cli_settings(home, collection=collection)
    removed = delete_documents(knowledge_base(s), s.collection, None if all_docs else doc_ids, lock_wait=s.lock_wait)
    out.print(f"Removed {removed} document(s) from '{s.collection}'.")
