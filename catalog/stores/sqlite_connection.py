"""The SQLite catalog file: its schema and format checks, a file that is not a catalog refused untouched, and one
connection per thread (WAL, so readers keep working while one writer ingests). Reads are in sqlite_read.py, writes in
sqlite_write.py; catalog/stores/sqlite.py puts them together."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path

import numpy as np

from catalog.stores.base import StoreError, StoreUnavailable

SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (id INTEGER PRIMARY KEY, uid TEXT UNIQUE NOT NULL, model TEXT, sae TEXT,
    ref TEXT, kind TEXT, layer INTEGER, idx INTEGER);
CREATE INDEX IF NOT EXISTS nodes_ref ON nodes(ref);
CREATE TABLE IF NOT EXISTS node_stats (node INTEGER NOT NULL, run INTEGER NOT NULL, n_obs INTEGER, n_prompts INTEGER,
    sum_act REAL, max_act REAL, PRIMARY KEY (node, run)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS node_top (node INTEGER NOT NULL, run INTEGER NOT NULL, prompt INTEGER NOT NULL,
    pos INTEGER NOT NULL, act REAL, token TEXT, src INTEGER, src_pos INTEGER, head INTEGER, value REAL,
    PRIMARY KEY (node, run, prompt, pos)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS node_top_token ON node_top(token);
CREATE TABLE IF NOT EXISTS node_hist (node INTEGER NOT NULL, run INTEGER NOT NULL, bin INTEGER NOT NULL, n INTEGER,
    PRIMARY KEY (node, run, bin)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS edges (id INTEGER NOT NULL, run INTEGER NOT NULL, src INTEGER NOT NULL,
    dst INTEGER NOT NULL, kind TEXT NOT NULL, n_prompts INTEGER, n_obs INTEGER, sum REAL, sumsq REAL, sum_abs REAL,
    min REAL, max REAL, n_pos INTEGER, ev BLOB, PRIMARY KEY (id, run)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS edges_dst ON edges(dst);
CREATE INDEX IF NOT EXISTS edges_src ON edges(src);
CREATE TABLE IF NOT EXISTS edge_heads (edge INTEGER, run INTEGER, head INTEGER, sum REAL,
    PRIMARY KEY(edge, run, head)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS edge_roles (edge INTEGER, run INTEGER, role INTEGER, n INTEGER, sum_abs REAL,
    PRIMARY KEY(edge, run, role)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS prompts (id INTEGER PRIMARY KEY, uid TEXT UNIQUE NOT NULL, run TEXT, prompt_id TEXT,
    text TEXT, tokens TEXT, corpus TEXT, content_hash TEXT, meta TEXT, evidence_edges BLOB);
CREATE INDEX IF NOT EXISTS prompts_run ON prompts(run);
CREATE TABLE IF NOT EXISTS runs (run_id TEXT PRIMARY KEY, status TEXT, manifest TEXT, no INTEGER UNIQUE NOT NULL);
CREATE TABLE IF NOT EXISTS mined (key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, stamp TEXT NOT NULL,
    result TEXT NOT NULL);
"""

SCHEMA_VERSION = 5  # PRAGMA user_version; 3: six edge kinds (QK) in the edge keys; 4: evidence on the edges;
# 5: seven edge kinds (mlp_in, transcoders) in the edge keys

# edges.id is catalog.schema.edge_key(src, dst, kind): upserts find their edge by it. Edges (with their
# evidence: ``ev``, EV_ROW records of its top N, prompts by prompts.id), their head sums and node statistics
# are kept per run: ``run`` is the run's number (runs.no). prompts.evidence_edges: int64 keys of the edges
# whose evidence took one of the prompt's observations when it was written (a later window may have
# displaced them since). node_top: a feature's top activations per run (catalog.schema.TOP_ACTIVATIONS; a run
# written window by window keeps each window's, and reads take the top of them), with the token each sits on
# and the strongest observation into it (src: node id, -1 where none); node_hist: its activation histogram.
PAGE_SIZE = 16384

FORMATS = {2: "edge keys that counted three edge kinds", 3: "its evidence in a table of its own",
           4: "edge keys that counted six edge kinds"}

STAGING = """
CREATE TEMP TABLE IF NOT EXISTS b_edges (id INTEGER PRIMARY KEY, n_prompts INTEGER, n_obs INTEGER, sum REAL,
    sumsq REAL, sum_abs REAL, min REAL, max REAL, n_pos INTEGER, ev_start INTEGER, ev_size INTEGER);
CREATE TEMP TABLE IF NOT EXISTS b_heads (edge INTEGER, head INTEGER, sum REAL);
CREATE TEMP TABLE IF NOT EXISTS b_roles (edge INTEGER, role INTEGER, n INTEGER, sum_abs REAL);
CREATE TEMP TABLE IF NOT EXISTS b_stats (node INTEGER, n_obs INTEGER, n_prompts INTEGER, sum_act REAL, max_act REAL);
CREATE TEMP TABLE IF NOT EXISTS b_touched (edge INTEGER PRIMARY KEY);
CREATE TEMP TABLE IF NOT EXISTS b_ev (id INTEGER PRIMARY KEY, ev_start INTEGER, ev_size INTEGER);
CREATE TEMP TABLE IF NOT EXISTS b_uids (uid TEXT PRIMARY KEY);
"""

STAGING_TABLES = ("b_edges", "b_heads", "b_roles", "b_stats", "b_touched", "b_ev", "b_uids")

CATALOG_TABLES = {"nodes", "node_stats", "node_top", "node_hist", "edges", "edge_heads", "edge_roles", "prompts", "runs", "mined"}


class SqliteConnection:
    """A catalog file opened (created, checked, migrated when it holds nothing) with a connection per thread."""

    def __init__(self, path: str, *, url: str, evidence_per_edge: int | None, create: bool = True):
        self.url, self.path, self.evidence_per_edge = url, path, evidence_per_edge
        if not create and not Path(path).exists():
            raise StoreUnavailable(f"no catalog at {path} (from {url}); run an ingest or the demo first")
        refuse_foreign(path, create)
        self._local = threading.local()
        self._ids: dict[str, int] = {}  # node uid -> dictionary id, for nodes committed by this process
        # prompts.id <-> uid of committed prompts this process has seen (evidence names prompts by id, and
        # ranks them by uid); ``_pending``: those the open write saw, taken in once it commits
        self._prompt_uid: dict[int, str] = {}
        self._prompt_id: dict[str, int] = {}
        self._pending: dict[int, str] = {}
        self._rank: np.ndarray = np.zeros(0, np.int64)  # prompt id -> rank of its uid among those seen
        try:
            edge_columns = [r[1] for r in self._conn.execute("PRAGMA table_info(edges)")]
            if edge_columns and "run" not in edge_columns:
                raise StoreError(f"{path} holds a catalog from before edges were kept per run; its numbers "
                                 "cannot be split by run. Ingest its corpora again into a new catalog (delete "
                                 "the file, or choose another path)")
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if edge_columns and version != SCHEMA_VERSION:
                if self._conn.execute("SELECT 1 FROM edges UNION ALL SELECT 1 FROM prompts LIMIT 1").fetchone():
                    raise StoreError(f"{path} holds a catalog of format {version} (this version reads "
                                     f"{SCHEMA_VERSION}; format {version} had {FORMATS.get(version, 'another layout')}); "
                                     "ingest its corpora again into a new catalog (delete the file, or choose "
                                     "another path)")
                for table in ("edges", "prompts", "evidence"):  # an older layout holding nothing: made anew
                    self._conn.execute(f"DROP TABLE IF EXISTS {table}")
            mined_columns = [r[1] for r in self._conn.execute("PRAGMA table_info(mined)")]
            if mined_columns and "stamp" not in mined_columns:  # derived data of an earlier build: mine again
                self._conn.execute("DROP TABLE mined")
            self._conn.executescript(SCHEMA)
            if version != SCHEMA_VERSION:  # a new (or edgeless) catalog
                self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open SQLite catalog {path}: {exc}") from None

    @property
    def _conn(self) -> sqlite3.Connection:
        """One connection per thread (sqlite3 connections are not shared across threads)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            # a new file only (a no-op on one that exists): a replayed GPT-2-shaped window's write
            # took 90 s with 4 KiB pages, 84 s with 16 KiB (the commit: 9.7 -> 6.9 s)
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=OFF")
            conn.execute("PRAGMA temp_store=MEMORY")
            conn.execute("PRAGMA cache_size=-262144")  # 256 MiB: window upserts touch index pages all over
            conn.executescript(STAGING)  # per connection; executescript would commit an open transaction
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def refuse_foreign(path: str, create: bool) -> None:
    """Refuse, without changing a byte, a file that is not a catalog: not SQLite, a database of tables
    that are not the catalog's, or (for a command that only reads) one without the catalog's tables. Opening
    it as a catalog would add tables, switch it to WAL and set user_version."""
    file = Path(path)
    if not file.exists():
        return
    if file.stat().st_size == 0:
        if not create:
            raise StoreError(f"{path} is not a circuit-catalog catalog (an empty file); it was left untouched")
        return
    try:
        with contextlib.closing(sqlite3.connect(f"{file.resolve().as_uri()}?mode=ro", uri=True)) as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as exc:
        raise StoreError(f"{path} is not a circuit-catalog catalog ({exc}); it was left untouched") from None
    if not tables & CATALOG_TABLES and (tables or not create):  # a catalog of an older format is told apart below
        shown = ", ".join(sorted(tables)[:5]) or "no tables"
        raise StoreError(f"{path} is not a circuit-catalog catalog (it has {shown}); it was left untouched")
