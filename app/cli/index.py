"""`moerag index`: compare a collection's FAISS and lexical indexes with the store, or rebuild FAISS."""

from __future__ import annotations

import json

import typer
from rich.markup import escape

from app.cli.common import CollOpt, HomeOpt, JsonOpt, cli_settings, knowledge_base, out

group = typer.Typer(no_args_is_help=True, help="Check or rebuild the FAISS index.")


@group.command("check")
def index_check(collection: CollOpt = None, as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """Compare the FAISS and lexical indexes with the store; exit 1 if they disagree."""
    s = cli_settings(home, collection=collection)
    kb = knowledge_base(s)
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


@group.command("rebuild")
def index_rebuild(collection: CollOpt = None, home: HomeOpt = None) -> None:
    """Rebuild the FAISS index from the stored vectors (no re-embedding)."""
    s = cli_settings(home, collection=collection)
    kb = knowledge_base(s)
    with kb.write_lock(), kb.store.session() as session:
        vi = kb.rebuild_index(session, kb.store.collection(session, s.collection))
    out.print(f"Rebuilt the {vi.kind} index of '{s.collection}' with {len(vi)} chunks.")
