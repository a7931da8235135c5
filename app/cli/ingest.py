"""`moerag ingest`: files and folders into a collection, with a progress bar and a summary table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from app.cli.common import CollOpt, HomeOpt, RichProgress, cli_settings, err, knowledge_base, load_embedder, out

commands = typer.Typer()


@commands.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="Files and folders to ingest (folders recursively).")],
    collection: CollOpt = None,
    prune: Annotated[bool, typer.Option("--prune", help="Remove documents under PATHS whose files are gone.")] = False,
    home: HomeOpt = None,
) -> None:
    """Parse, chunk and embed files into a collection; unchanged files are skipped."""
    from app.library import ingest_options
    from ingest.pipeline import ingest_paths

    s = cli_settings(home, collection=collection)
    kb = knowledge_base(s)
    embedder = load_embedder(s)
    options = ingest_options(s)
    progress = RichProgress(err)
    try:
        report = ingest_paths(
            kb, embedder, paths, collection=s.collection, options=options, prune=prune, progress=progress
        )
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
