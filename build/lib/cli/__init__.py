"""The ``circuit-catalog`` command: parse, call the library, print. It wires ``catalog`` (queries,
stores), ``ingest`` (compute) and ``api`` (serve); none of them imports it."""

from cli import compute, query, serve  # noqa: F401 - each registers its commands on the app
from cli.common import app


def main() -> None:
    app()


__all__ = ["app", "main"]
