"""The HTTP API from the command line: `moerag serve`, and `moerag keys`, the API keys it checks."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from app.cli.common import HomeOpt, JsonOpt, cli_settings, err, knowledge_base, out
from app.settings import Settings

commands = typer.Typer()
group = typer.Typer(no_args_is_help=True, help="API keys for the HTTP API (moerag serve).")


def _keys(s: Settings):
    from app.keys import Keys

    return Keys(knowledge_base(s).store)


@commands.command()
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to bind (0.0.0.0 to serve the network).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to serve on.")] = 8000,
    home: HomeOpt = None,
) -> None:
    """Serve the HTTP API: OpenAI-compatible chat, embeddings, knowledge base, metrics, widget."""
    import uvicorn

    from app.api import create_app

    s = cli_settings(home)
    api = create_app(s)
    if not _keys(s).list():
        err.print("[yellow]note[/]: no API keys yet; every call but /healthz needs one: moerag keys create --name NAME")
    err.print(f"moerag API on [bold]http://{host}:{port}[/] (OpenAPI docs at /docs, widget demo at /widget/demo)")
    uvicorn.run(api, host=host, port=port, log_level="warning")


@group.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="What the key is for, e.g. the tool that uses it.")],
    collections: Annotated[
        str | None, typer.Option("--collections", help="Comma-separated collections the key may use (default: all).")
    ] = None,
    read_only: Annotated[bool, typer.Option("--read-only", help="The key cannot upload or delete documents.")] = False,
    web: Annotated[bool, typer.Option("--web", help="The key may ask for live web results (off by default).")] = False,
    home: HomeOpt = None,
) -> None:
    """Create an API key; its plaintext is printed once, alone on the last line."""
    scope = [c.strip() for c in (collections or "").split(",") if c.strip()]
    key, plaintext = _keys(cli_settings(home)).create(name, collections=scope, read_only=read_only, web=web)
    err.print(
        f"Created key {key.id} '{escape(key.name)}' ({'read-only' if key.read_only else 'read-write'}, "
        f"collections: {', '.join(key.collections) or 'all'}, web: {'yes' if key.web else 'no'}). "
        "It is shown only now; store it safely:"
    )
    print(plaintext)


@group.command("list")
def keys_list(as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """API keys (never their plaintext)."""
    rows = [
        {
            "id": k.id,
            "name": k.name,
            "hint": k.hint + "…",
            "collections": list(k.collections),
            "read_only": k.read_only,
            "web": k.web,
            "revoked": k.revoked,
            "created_at": k.created_at.isoformat(),
        }
        for k in _keys(cli_settings(home)).list()
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{len(rows)} API keys")
    for col in ("id", "name", "key", "collections", "access", "web", "state"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r["id"]),
            escape(r["name"]),
            r["hint"],
            escape(", ".join(r["collections"]) or "all"),
            "read-only" if r["read_only"] else "read-write",
            "yes" if r["web"] else "no",
            "[red]revoked[/]" if r["revoked"] else "active",
        )
    out.print(table)


@group.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="Key id or name (see: moerag keys list).")], home: HomeOpt = None
) -> None:
    """Revoke an API key: it stops working at once."""
    revoked = _keys(cli_settings(home)).revoke(key)
    out.print(f"Revoked key {revoked.id} '{escape(revoked.name)}'.")
