"""What every command shares: the Typer app, option types, printing, and turning user errors into
one line. The commands live in cli.query (read the catalog), cli.compute (run models: the only
modules that import ``ingest``, inside their bodies, so query commands never import torch) and
cli.serve."""

from __future__ import annotations

import functools
import json
import logging
from typing import Annotated

import typer

from catalog.stores import StoreError

# the Neo4j driver logs each retry of a failed transaction as a warning (half a minute of them when the
# server is gone), and a connection found dead as an error; the one line that matters is the error the store
# raises once the retries are spent
logging.getLogger("neo4j").setLevel(logging.CRITICAL)

app = typer.Typer(help="A graph-database catalog of feature circuits (RDFA edges across prompt corpora).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

QUERY, COMPUTE, SERVE = "Query the catalog", "Compute (runs models)", "Serve"
StoreOpt = Annotated[str, typer.Option("--store", help="sqlite:///path.db or neo4j://host:port")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]
ModelSel = Annotated[str | None, typer.Option("--model", help="model name, when the catalog holds several")]
RunSel = Annotated[list[str] | None, typer.Option(
    "--run", help="a run to sum over (repeat for several); default: every run, when they share model, SAEs and pruning")]


def friendly(fn):
    """Turn the errors users cause into one clear line and exit code 2 (no traceback).

    ingest's UserFacingError is matched by name: importing ingest here would pull torch into
    every query command."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from catalog.ids import NodeRefError

        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            user_error = isinstance(exc, (StoreError, NodeRefError, ValueError, FileNotFoundError)) or \
                any(c.__name__ == "UserFacingError" for c in type(exc).__mro__)
            if not user_error:
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
    return wrapper


def emit(data, as_json: bool, table_cols: list[str] | None = None) -> None:
    if as_json or table_cols is None:
        typer.echo(json.dumps(data, indent=1, ensure_ascii=False))
        return
    from rich.table import Table

    table = Table(*table_cols)
    for row in data:
        table.add_row(*[str(row.get(c, "")) for c in table_cols])
    console().print(table)


def console():
    """A rich Console for stdout: the terminal's width, or, when stdout is a file or a pipe, wide enough
    that a table keeps one line a row (rich's default there is 80 columns, which wrapped a row over ten)."""
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=250)


def bounded(low: float, high: float | None = None, help: str | None = None):
    """A numeric option Click checks before the command runs: out of range is a one-line usage error
    naming the option (exit code 2), never a traceback from deep inside."""
    return typer.Option(min=low, max=high, help=help)


Top = Annotated[int, bounded(1, 1000, "rows to show")]
MinCount = Annotated[int, bounded(0, help="only edges seen in at least this many prompts")]
Threads = Annotated[int, bounded(1, 256, "torch threads")]
Port = Annotated[int, bounded(1, 65535)]

