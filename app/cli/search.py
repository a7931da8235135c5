"""`moerag search` and `moerag eval`: the knowledge base's ranking (with the web's, on --web),
and that ranking measured on a BEIR dataset.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from app.cli.common import (
    CollOpt,
    HomeOpt,
    JsonOpt,
    RichProgress,
    answer_service,
    cli_settings,
    err,
    load_embedder,
    out,
)

commands = typer.Typer()


@commands.command()
def search(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    k: Annotated[int, typer.Option("-k", help="How many results.")] = 10,
    mode: Annotated[str | None, typer.Option("--mode", help="hybrid (default), dense or bm25.")] = None,
    collection: CollOpt = None,
    source: Annotated[str | None, typer.Option("--source", help="Only documents whose path starts with this.")] = None,
    web: Annotated[
        bool, typer.Option("--web", help="Also search the live web; one ranking with the knowledge base.")
    ] = False,
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Search the knowledge base (dense + BM25, fused by reciprocal rank), and the web with --web."""
    s = cli_settings(home, collection=collection, search_mode=mode)
    src = str(Path(source).expanduser().resolve()) if source and Path(source).expanduser().exists() else source
    found = answer_service(s).search_items(query, collection=s.collection, k=k, mode=s.search_mode, source=src, web=web)
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
        out.print(
            f"[bold]{h['rank']}.[/] {origin}{escape(title or h['document']['source'])}  "
            f"[dim]{escape(where)}  score {h['score']:.4f}[/]"
        )
        out.print(f"   [dim]{escape(h['document']['source'])}[/]")
        snippet = " ".join(h["text"].split())
        out.print("   " + escape(snippet[:300] + ("…" if len(snippet) > 300 else "")))
    for sk in found["skipped"]:
        err.print(f"[dim]skipped {escape(sk['url'])}: {escape(sk['reason'])}[/]")


@commands.command("eval")
def eval_cmd(
    dataset: Annotated[Path, typer.Argument(help="BEIR dataset folder (corpus.jsonl, queries.jsonl, qrels/).")],
    mode: Annotated[str | None, typer.Option("--mode", help="hybrid, dense, bm25, or all.")] = None,
    split: Annotated[str, typer.Option("--split", help="qrels split to score.")] = "test",
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Measure retrieval quality (nDCG@10, Recall@10/100, MRR@10) on a BEIR dataset."""
    from app.evaluate import evaluate
    from retrieval.search import MODES

    s = cli_settings(home)
    # all: each retriever alone, then their fusion (the table's rows in that order)
    modes = sorted(MODES, key=lambda m: m == "hybrid") if mode == "all" else [mode or s.search_mode]
    progress = RichProgress(err)
    try:
        rows = evaluate(
            dataset,
            settings=s,
            embedder=load_embedder(s),
            modes=modes,
            split=split,
            progress=progress,
            on_phase=lambda msg: err.print(f"[dim]{msg}[/]"),
        )
    finally:
        progress.stop()
    if as_json:
        print(json.dumps(rows[0] if len(rows) == 1 else rows, indent=2))
        return
    table = Table(
        title=f"{dataset} ({split}): {rows[0]['queries']} queries, {rows[0]['documents']} documents, "
        f"ingested in {rows[0]['ingest_seconds']:.0f} s"
    )
    for col in ("mode", "nDCG@10", "Recall@10", "Recall@100", "MRR@10", "ms/query"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["mode"],
            *(f"{r[m]:.4f}" for m in ("ndcg@10", "recall@10", "recall@100", "mrr@10")),
            f"{r['search_ms_per_query']:.1f}",
        )
    out.print(table)
