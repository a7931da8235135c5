"""What every command shares: the consoles, the common options, the objects a command builds
from its settings (knowledge base, embedder, answer service), the ingest progress bar, and
`run`, the one place where errors become exit codes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, NoReturn

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from app.settings import Settings, load_settings
from retrieval.errors import MoeragError

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

HomeOpt = Annotated[Path | None, typer.Option("--home", help="Data directory (default: $MOERAG_HOME or ~/.moerag).")]
CollOpt = Annotated[str | None, typer.Option("--collection", "-c", help="Collection name (default: 'default').")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def cli_settings(home: Path | None, **overrides) -> Settings:
    """The settings of `home` (file and environment), with the command's flags on top."""
    return load_settings(home=home).replace(**overrides)


def knowledge_base(settings: Settings):
    from retrieval.index import IndexParams
    from retrieval.kb import KnowledgeBase

    params = IndexParams(exact_max=settings.exact_index_max, nprobe=settings.nprobe)
    return KnowledgeBase(settings.home, database_url=settings.database_url or None, index_params=params)


def load_embedder(settings: Settings):
    from ingest.embedder import get_embedder

    return get_embedder(settings.embed_model)


def answer_service(settings: Settings):
    from app.service import AnswerService

    return AnswerService(settings)


class RichProgress:
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


def _is_engine_error(exc: BaseException) -> bool:
    # The engine (and torch) load only when an engine command runs; if engine.errors was never
    # imported, no EngineError can have been raised.
    errors = sys.modules.get("engine.errors")
    return errors is not None and isinstance(exc, errors.EngineError)


def run(command: typer.Typer) -> NoReturn:
    """Run `command` on sys.argv and exit with its code. Errors users can hit (MoeragError, and the
    engine's EngineError) become one red line and exit code 1; a usage error (click's or Typer's
    copy of it) shows its own message, and help where it asks for it, with its code (2); Ctrl-C exits 130. Anything else is a bug and keeps its traceback."""
    try:
        rc = command(standalone_mode=False)
    except MoeragError as exc:
        err.print(f"[red]Error:[/] {escape(str(exc))}")
        sys.exit(1)
    except (click.ClickException, typer.TyperException) as exc:  # Typer raises its own copy of click's
        exc.show() if hasattr(exc, "show") else err.print(f"Error: {escape(exc.format_message())}")
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, typer.Abort, KeyboardInterrupt):
        err.print("Interrupted. Everything committed so far is kept; run the command again to finish.")
        sys.exit(130)
    except Exception as exc:
        if not _is_engine_error(exc):
            raise
        err.print(f"[red]Error:[/] {escape(str(exc))}")
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)
