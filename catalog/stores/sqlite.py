"""The embedded store: one SQLite file in WAL mode, so readers (the API) keep working while one
writer ingests. Every window is one IMMEDIATE transaction: all of it lands or none of it does. An
edge's evidence is a blob on its row (``catalog.stores.sqlite_evidence``).

The file and its connections: sqlite_connection.py; every read: sqlite_read.py; every write: sqlite_write.py."""

from __future__ import annotations

from urllib.parse import unquote

from catalog.stores.base import StoreError
from catalog.stores.sqlite_connection import SCHEMA_VERSION, refuse_foreign
from catalog.stores.sqlite_write import SqliteWrites

__all__ = ["SCHEMA_VERSION", "SqliteStore", "open_url", "refuse_foreign"]


class SqliteStore(SqliteWrites):
    """The catalog in one SQLite file: the Store protocol (catalog/stores/base.py), reads and writes."""


def open_url(url: str, evidence_per_edge: int | None, create: bool) -> SqliteStore:
    """``sqlite:///relative.db`` or ``sqlite:////absolute.db`` (SQLAlchemy's convention)."""
    if not url.startswith("sqlite:///") or len(url) == len("sqlite:///"):
        raise StoreError(f"store URL {url!r}: write sqlite:///relative/path.db or sqlite:////absolute/path.db")
    return SqliteStore(unquote(url[len("sqlite:///"):]), url=url, evidence_per_edge=evidence_per_edge, create=create)
