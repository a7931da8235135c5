"""`moerag`: the command line. A thin shell: parse flags, call the library, print.

One module per group of commands, each a Typer of its own: `commands` (mounted at the top:
`moerag ingest`) and `group` (mounted under its name: `moerag docs list`). This file assembles
them in the order `moerag --help` lists them. What they share (consoles, options, settings,
the knowledge base) is in common.py, with `run`: errors users can hit (MoeragError, and the
engine's EngineError) become one red line and exit code 1 there and only there.
"""

from __future__ import annotations

import logging

import typer

from app.cli import chat, docs, index, ingest, keys, model, search
from app.cli.common import run

__all__ = ["app", "main"]

app = typer.Typer(add_completion=False, no_args_is_help=True, help="moerag: search and ask your documents, locally.")
for module in (ingest, search, chat, keys, model):
    app.add_typer(module.commands)
app.add_typer(docs.group, name="docs")
app.add_typer(index.group, name="index")
app.add_typer(model.group, name="model")
app.add_typer(chat.group, name="conversations")
app.add_typer(keys.group, name="keys")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run(app)
