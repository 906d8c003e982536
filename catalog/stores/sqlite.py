"""The embedded store: one SQLite file in WAL mode, so readers (the API) keep working while one
writer ingests. Every window is one IMMEDIATE transaction: all of it lands or none of it does. An
edge's evidence is a blob on its row (``catalog.stores.sqlite_evidence``)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np

from catalog.aggregate import WindowAggregate
from catalog.evidence_rank import sorted_unique
from catalog.ids import check_run_name
from catalog.schema import EDGE_KINDS, JSON, NODE_ID_LIMIT, ROLES, EdgeStats, Evidence, NodeInfo, NodeStats, Prompt, Run, edge_key
from catalog.stores.base import CypherUnsupported, EdgeQuery, Runs, StoreError, StoreUnavailable
from catalog.stores.sqlite_evidence import EV_ROW, MergedBlobs, decode, merge, rows_of

SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (id INTEGER PRIMARY KEY, uid TEXT UNIQUE NOT NULL, model TEXT, sae TEXT,
    ref TEXT, kind TEXT, layer INTEGER, idx INTEGER);
CREATE INDEX IF NOT EXISTS nodes_ref ON nodes(ref);
CREATE TABLE IF NOT EXISTS node_stats (node INTEGER NOT NULL, run INTEGER NOT NULL, n_obs INTEGER, n_prompts INTEGER,
    sum_act REAL, max_act REAL, PRIMARY KEY (node, run)) WITHOUT ROWID;
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
SCHEMA_VERSION = 4  # PRAGMA user_version; 3: six edge kinds (QK) in the edge keys; 4: evidence on the edges
# edges.id is catalog.schema.edge_key(src, dst, kind): upserts find their edge by it. Edges (with their
# evidence: ``ev``, EV_ROW records of its top N, prompts by prompts.id), their head sums and node statistics
# are kept per run: ``run`` is the run's number (runs.no). prompts.evidence_edges: int64 keys of the edges
# whose evidence took one of the prompt's observations when it was written (a later window may have
# displaced them since).
PAGE_SIZE = 16384
# prompts per window when the job names none: bench/ingest_pipeline.py --only windows (toy-ioi): the
# write's cost grows with a window's distinct edges, which saturate, so fewer windows write less,
# while the halving tail keeps the last, never overlapped, write small
DEFAULT_WINDOW = 256
# a write here costs about its window's size, so the last windows halve down to one batch (ingest.jobs.cut_windows)
TAIL_WINDOW = 1
FORMATS = {2: "edge keys that counted three edge kinds", 3: "its evidence in a table of its own"}
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
# an edge's src, dst and kind are read off its key (catalog.schema.edge_key) rather than bound
KIND_OF_KEY = f"CASE id % {len(EDGE_KINDS)} " + " ".join(f"WHEN {i} THEN '{k}'" for i, k in enumerate(EDGE_KINDS)) + " END"
UPSERT_EDGES = (
    f"INSERT INTO edges SELECT id, ?1, id / {len(EDGE_KINDS) * NODE_ID_LIMIT}, id / {len(EDGE_KINDS)} % {NODE_ID_LIMIT}, "
    f"{KIND_OF_KEY}, n_prompts, n_obs, sum, sumsq, sum_abs, min, max, n_pos, "
    "CASE WHEN ev_size > 0 THEN substr(?2, ev_start + 1, ev_size) END "
    "FROM b_edges WHERE true ON CONFLICT(id, run) DO UPDATE SET "
    "n_prompts = n_prompts + excluded.n_prompts, n_obs = n_obs + excluded.n_obs, sum = sum + excluded.sum, "
    "sumsq = sumsq + excluded.sumsq, sum_abs = sum_abs + excluded.sum_abs, min = min(min, excluded.min), "
    "max = max(max, excluded.max), n_pos = n_pos + excluded.n_pos, ev = coalesce(excluded.ev, ev)")
UPSERT_HEADS = ("INSERT INTO edge_heads SELECT edge, ?, head, sum FROM b_heads WHERE true "
                "ON CONFLICT(edge, run, head) DO UPDATE SET sum = sum + excluded.sum")
UPSERT_ROLES = ("INSERT INTO edge_roles SELECT edge, ?, role, n, sum_abs FROM b_roles WHERE true "
                "ON CONFLICT(edge, run, role) DO UPDATE SET n = n + excluded.n, sum_abs = sum_abs + excluded.sum_abs")
UPSERT_STATS = (
    "INSERT INTO node_stats SELECT node, ?, n_obs, n_prompts, sum_act, max_act FROM b_stats WHERE true "
    "ON CONFLICT(node, run) DO UPDATE SET "
    "n_obs = n_obs + excluded.n_obs, n_prompts = n_prompts + excluded.n_prompts, "
    "sum_act = sum_act + excluded.sum_act, max_act = max(max_act, excluded.max_act)")
SET_EVIDENCE = ("UPDATE edges SET ev = substr(?2, b.ev_start + 1, b.ev_size) FROM b_ev b "  # import only
                "WHERE edges.id = b.id AND edges.run = ?1")
STORED_EVIDENCE = "SELECT t.edge, e.ev FROM b_touched t JOIN edges e ON e.id = t.edge AND e.run = ? WHERE e.ev NOT NULL"
# reads sum an edge's rows over the selected runs (GROUP BY e.id). Orderings compare metrics rounded
# to ORDER_DECIMALS: sums of the same numbers in another order (Neo4j's) may differ in the last bit,
# and exact ties must stay ties for both stores to break them by id alike.
ORDER_DECIMALS = 9
METRIC = {name: f"round({expr}, {ORDER_DECIMALS})" for name, expr in {
    "sum": "SUM(e.sum)", "mean": "SUM(e.sum) / SUM(e.n_obs)", "count": "SUM(e.n_prompts)",
    "abs": "abs(SUM(e.sum))"}.items()}
EDGE_COLS = ("e.kind, SUM(e.n_prompts), SUM(e.n_obs), SUM(e.sum), SUM(e.sumsq), SUM(e.sum_abs), MIN(e.min), "
             "MAX(e.max), SUM(e.n_pos), e.id")
STAT_COLS = "SUM(s.n_obs), SUM(s.n_prompts), SUM(s.sum_act), MAX(s.max_act)"
NODE_COLS = "{a}.uid, {a}.model, {a}.sae, {a}.ref, {a}.kind, {a}.layer, {a}.idx"
PROMPT_COLS = "uid, run, prompt_id, text, tokens, corpus, content_hash, meta"


CATALOG_TABLES = {"nodes", "node_stats", "edges", "edge_heads", "edge_roles", "prompts", "runs", "mined"}


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


class SqliteStore:
    def __init__(self, path: str, *, url: str, evidence_per_edge: int | None, create: bool = True):
        self.url, self.path, self.evidence_per_edge = url, path, evidence_per_edge
        self.max_window_edges: int | None = None  # one file on this machine: the window's own bounds do
        self.default_window, self.tail_window = DEFAULT_WINDOW, TAIL_WINDOW
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

    # ---- writes -------------------------------------------------------------------------------
    def write_window(self, agg: WindowAggregate) -> bool:
        """Store a window's prompts and aggregates in one IMMEDIATE transaction; False if every
        prompt was stored already. Columns go through executemany into temp tables, then one
        set-based upsert per table."""
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            run = self._run_no(c, agg.run)
            if not self._claim_prompts(c, agg.run, agg.prompts):
                c.execute("ROLLBACK")
                return False
            ids, new_ids = self._node_ids(c, agg.nodes)
            self._write_aggregate(c, agg, run, ids, self.evidence_per_edge)
            c.execute("COMMIT")
        except BaseException:
            self._pending = {}
            c.execute("ROLLBACK")
            raise
        self._committed(new_ids)
        return True

    def _committed(self, new_ids: dict[str, int]) -> None:
        """Take in the node and prompt ids a write saw, once it committed: a rolled-back id may be
        handed out again, to another node or prompt."""
        self._ids.update(new_ids)
        self._prompt_uid.update(self._pending)
        self._prompt_id.update((uid, i) for i, uid in self._pending.items())
        self._pending = {}

    def _run_no(self, c: sqlite3.Connection, run_id: str) -> int:
        row = c.execute("SELECT no FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise StoreError(f"run {run_id!r} was never started in {self.url} (start_run comes first)")
        no: int = row[0]
        return no

    def _claim_prompts(self, c: sqlite3.Connection, run: str, prompts: list[Prompt]) -> bool:
        uids = [p.uid for p in prompts]
        have = set()
        for i in range(0, len(uids), 900):
            part = uids[i:i + 900]
            have |= {r[0] for r in c.execute(f"SELECT uid FROM prompts WHERE uid IN ({','.join('?' * len(part))})", part)}
        if have and len(have) == len(set(uids)):
            return False
        if have:
            raise StoreError(f"window overlaps {len(have)} prompts already stored for run {run} "
                             "(resume filters stored prompts before batching)")
        self._insert_prompts(c, prompts, "INSERT")
        return True

    @staticmethod
    def _insert_prompts(c: sqlite3.Connection, prompts: list[Prompt], verb: str) -> None:
        c.executemany(f"{verb} INTO prompts({PROMPT_COLS}) VALUES (?,?,?,?,?,?,?,?)",
                      [(p.uid, p.run, p.prompt_id, p.text, json.dumps(p.tokens), p.corpus, p.content_hash,
                        json.dumps(p.meta, sort_keys=True)) for p in prompts])

    def _node_ids(self, c: sqlite3.Connection, nodes: list[NodeInfo]) -> tuple[np.ndarray, dict[str, int]]:
        """Dictionary ids of ``nodes`` (created where missing), and the ones not cached before."""
        missing = [n for n in nodes if n.uid not in self._ids]
        new: dict[str, int] = {}
        if missing:
            _clear_staging(c)
            c.executemany("INSERT OR IGNORE INTO nodes(uid, model, sae, ref, kind, layer, idx) VALUES (?,?,?,?,?,?,?)",
                          [(n.uid, n.model, n.sae, n.ref, n.kind, n.layer, n.index) for n in missing])
            c.executemany("INSERT OR IGNORE INTO b_uids VALUES (?)", [(n.uid,) for n in missing])
            new = dict(c.execute("SELECT n.uid, n.id FROM b_uids b JOIN nodes n ON n.uid = b.uid"))
            if new and max(new.values()) >= NODE_ID_LIMIT:
                raise StoreError(f"node dictionary of {self.url} is full ({NODE_ID_LIMIT} nodes)")
        ids = np.array([self._ids.get(n.uid) or new[n.uid] for n in nodes], dtype=np.int64)
        return ids, new

    def _write_aggregate(self, c: sqlite3.Connection, agg: WindowAggregate, run: int, ids: np.ndarray,
                         cap: int | None) -> None:
        """Stage each table's rows in its key order, then upsert them. Why sorted: staging inserts
        become appends and each upsert walks its table's B-tree once, in order (1M replayed edge
        rows: bound in 2.4 s sorted, 4.8 s not)."""
        _clear_staging(c)
        e, h, r, s = agg.edges, agg.heads, agg.roles, agg.stats
        head_edge = edge_key(ids[h.src], ids[h.dst], h.kind)
        at = np.lexsort((h.head, head_edge))
        c.executemany("INSERT INTO b_heads VALUES (?,?,?)", zip(*_lists(head_edge[at], h.head[at], h.sum[at])))
        c.execute(UPSERT_HEADS, (run,))
        role_edge = edge_key(ids[r.src], ids[r.dst], r.kind)
        at = np.lexsort((r.role, role_edge))
        c.executemany("INSERT INTO b_roles VALUES (?,?,?,?)",
                      zip(*_lists(role_edge[at], r.role[at], r.n[at], r.sum_abs[at])))
        c.execute(UPSERT_ROLES, (run,))
        at = np.argsort(ids[s.node])
        c.executemany("INSERT INTO b_stats VALUES (?,?,?,?,?)",
                      zip(*_lists(ids[s.node][at], s.n_obs[at], s.n_prompts[at], s.sum_act[at], s.max_act[at])))
        c.execute(UPSERT_STATS, (run,))
        merged = self._write_evidence(c, agg, run, ids, cap)
        keys = edge_key(ids[e.src], ids[e.dst], e.kind)
        at = np.argsort(keys)
        keys = keys[at]
        # each edge's new blob, as its place in merged.buffer (size 0: its evidence did not change)
        ev_start, ev_size = np.zeros(len(keys), np.int64), np.zeros(len(keys), np.int64)
        if len(merged.keys):
            where = np.minimum(np.searchsorted(keys, merged.keys), max(0, len(keys) - 1))
            hit = keys[where] == merged.keys if len(keys) else np.zeros(len(merged.keys), bool)
            ev_start[where[hit]], ev_size[where[hit]] = merged.start[hit], merged.size[hit]
            if not hit.all():  # an import's evidence reaches edges stored by an earlier window
                c.executemany("INSERT INTO b_ev VALUES (?,?,?)",
                              zip(*_lists(merged.keys[~hit], merged.start[~hit], merged.size[~hit])))
                c.execute(SET_EVIDENCE, (run, merged.buffer))
        c.executemany("INSERT INTO b_edges VALUES (?,?,?,?,?,?,?,?,?,?,?)", zip(*_lists(
            keys, e.n_prompts[at], e.n_obs[at], e.sum[at], e.sumsq[at], e.sum_abs[at], e.min[at], e.max[at],
            e.n_pos[at], ev_start, ev_size)))
        c.execute(UPSERT_EDGES, (run, merged.buffer))

    def _write_evidence(self, c: sqlite3.Connection, agg: WindowAggregate, run: int, ids: np.ndarray,
                        cap: int | None) -> MergedBlobs:
        """Merge the window's evidence with the stored blobs of the edges it reaches (read here,
        under the write lock) into each edge's top ``cap``; appends each prompt's edges to its
        evidence_edges. Returns the changed edges' blobs, for the edge upsert to write."""
        v = agg.evidence
        if not len(v):
            return MergedBlobs.of(np.zeros(0, np.int64), np.zeros(0, EV_ROW), np.zeros(0, np.int64), np.zeros(0, np.int64))
        keys = edge_key(ids[v.src], ids[v.dst], v.kind)
        window_ids = self._prompt_ids(c, agg.prompts)
        rows = rows_of(window_ids[v.prompt], v.src_pos, v.dst_pos, v.head, v.value)
        # integers only, so JSON text is exact, and json_each parses it in C (1M keys: 0.6 s, executemany 1.0 s)
        c.execute("INSERT INTO b_touched SELECT value FROM json_each(?)", (json.dumps(sorted_unique(keys).tolist()),))
        stored_keys, blobs = np.zeros(0, np.int64), ()
        if stored := c.execute(STORED_EVIDENCE, (run,)).fetchall():
            stored_edge, blobs = zip(*stored)
            stored_keys = np.array(stored_edge, np.int64)
        merged = merge(keys, rows, stored_keys, blobs, self._rank, cap)
        went = merged.window_rows
        by_prompt = np.argsort(v.prompt[went], kind="stable")
        prompt_of, key_of = v.prompt[went][by_prompt], keys[went][by_prompt]
        bounds = np.flatnonzero(np.r_[True, prompt_of[1:] != prompt_of[:-1], True]).tolist() if len(went) else [0]
        c.executemany("UPDATE prompts SET evidence_edges = CAST(coalesce(evidence_edges, x'') || ? AS BLOB) WHERE id = ?",
                      [(sorted_unique(key_of[a:b]).tobytes(), int(window_ids[prompt_of[a]]))
                       for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
        return merged

    def _prompt_ids(self, c: sqlite3.Connection, prompts: list[Prompt]) -> np.ndarray:
        """[p] the ids of ``prompts`` in the prompts table. Learns the prompts stored (by anyone, or by
        the open write) since the last look, and ranks every prompt seen by uid (``_rank``)."""
        new = dict(c.execute("SELECT id, uid FROM prompts WHERE id > ?", (max(self._prompt_uid, default=0),)))
        self._pending = new
        if new:
            every = {**self._prompt_uid, **new}
            ranked = sorted(every, key=every.__getitem__)
            self._rank = np.zeros(max(every) + 1, np.int64)
            self._rank[np.array(ranked, np.int64)] = np.arange(len(ranked))
        new_id = {uid: i for i, uid in new.items()}
        missing = [p.uid for p in prompts if p.uid not in self._prompt_id and p.uid not in new_id]
        if missing:
            raise StoreError(f"prompt {missing[0]!r} is not in {self.url}: a window's evidence names stored prompts only")
        return np.array([self._prompt_id.get(p.uid, new_id.get(p.uid, -1)) for p in prompts], np.int64)

    def start_run(self, run_id: str, manifest: JSON, resume: bool) -> None:
        check_run_name(run_id)
        c = self._conn
        c.execute("BEGIN IMMEDIATE")  # a shard starting while another finishes must not drop its counts
        try:
            row = c.execute("SELECT status, manifest FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row and not resume:
                raise StoreError(f"run {run_id!r} already exists in {self.url} (status {row[0]}); pass --resume "
                                 "to continue it or choose another --run")
            if row:
                merged = {**json.loads(row[1]), "resumed": json.loads(row[1]).get("resumed", 0) + 1}
                c.execute("UPDATE runs SET status = 'running', manifest = ? WHERE run_id = ?",
                          (json.dumps(merged, sort_keys=True), run_id))
            else:
                c.execute("INSERT INTO runs VALUES (?, 'running', ?, (SELECT COALESCE(MAX(no), -1) + 1 FROM runs))",
                          (run_id, json.dumps(manifest, sort_keys=True)))
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def finish_run(self, run_id: str, status: str, updates: JSON) -> None:
        c = self._conn
        c.execute("BEGIN IMMEDIATE")  # shards finishing together must not overwrite each other's counts
        try:
            row = c.execute("SELECT manifest FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            manifest = {**json.loads(row[0]), **updates} if row else updates
            c.execute("UPDATE runs SET status = ?, manifest = ? WHERE run_id = ?",
                      (status, json.dumps(manifest, sort_keys=True), run_id))
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    # ---- reads --------------------------------------------------------------------------------
    def done_prompts(self, run: str) -> set[str]:
        return {r[0] for r in self._conn.execute("SELECT prompt_id FROM prompts WHERE run = ?", (run,))}

    def runs(self) -> list[Run]:
        return [Run(r[0], r[1], json.loads(r[2])) for r in
                self._conn.execute("SELECT run_id, status, manifest FROM runs ORDER BY run_id")]

    def run(self, run_id: str) -> Run | None:
        r = self._conn.execute("SELECT run_id, status, manifest FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return Run(r[0], r[1], json.loads(r[2])) if r else None

    def find_nodes(self, ref: str, model: str | None = None) -> list[NodeInfo]:
        sql = f"SELECT {NODE_COLS.format(a='n')} FROM nodes n WHERE n.ref = ?" + (" AND n.model = ?" if model else "")
        return [NodeInfo(*r) for r in self._conn.execute(sql + " ORDER BY n.uid", (ref, model) if model else (ref,))]

    def node(self, uid: str, runs: Runs = None) -> tuple[NodeInfo, NodeStats | None] | None:
        among, args = _among("s", runs)
        r = self._conn.execute(f"SELECT {NODE_COLS.format(a='n')}, {STAT_COLS} FROM nodes n LEFT JOIN node_stats s "
                               f"ON s.node = n.id AND {among} WHERE n.uid = ? GROUP BY n.id", [*args, uid]).fetchone()
        if r is None:
            return None
        return NodeInfo(*r[:7]), (NodeStats(uid, *r[7:]) if r[7] is not None else None)

    def _heads(self, edge_ids: list[int], runs: Runs) -> dict[int, dict[int, float]]:
        out: dict[int, dict[int, float]] = {}
        among, args = _among("h", runs)
        for i in range(0, len(edge_ids), 900):
            part = edge_ids[i:i + 900]
            for e, head, total in self._conn.execute(
                    f"SELECT edge, head, SUM(sum) FROM edge_heads h WHERE edge IN ({','.join('?' * len(part))}) "
                    f"AND {among} GROUP BY edge, head", [*part, *args]):
                out.setdefault(e, {})[head] = total
        return out

    def _roles(self, edge_ids: list[int], runs: Runs) -> dict[int, dict[str, tuple[int, float]]]:
        out: dict[int, dict[str, tuple[int, float]]] = {}
        among, args = _among("r", runs)
        for i in range(0, len(edge_ids), 900):
            part = edge_ids[i:i + 900]
            for e, role, n, total in self._conn.execute(
                    f"SELECT edge, role, SUM(n), SUM(sum_abs) FROM edge_roles r WHERE edge IN "
                    f"({','.join('?' * len(part))}) AND {among} GROUP BY edge, role ORDER BY edge, role",
                    [*part, *args]):
                out.setdefault(e, {})[ROLES[role]] = (n, total)
        return out

    def neighbours(self, uid: str, direction: str, q: EdgeQuery) -> list[tuple[NodeInfo, EdgeStats]]:
        this, other = ("dst", "src") if direction == "up" else ("src", "dst")
        among, run_args = _among("e", q.runs)
        where = [f"e.{this} = (SELECT id FROM nodes WHERE uid = ?)", among]
        args: list[Any] = [uid, *run_args]
        for col, values in (("e.kind", q.edge_kinds), ("o.kind", q.node_kinds), ("o.layer", q.layers)):
            if values:
                where.append(f"{col} IN ({','.join('?' * len(values))})")
                args += list(values)
        rows = self._conn.execute(
            f"SELECT {NODE_COLS.format(a='o')}, {EDGE_COLS} FROM edges e JOIN nodes o ON o.id = e.{other} "
            f"WHERE {' AND '.join(where)} GROUP BY e.id HAVING SUM(e.n_prompts) >= ? "
            f"ORDER BY {METRIC[q.order]} DESC, o.uid, e.kind LIMIT ? OFFSET ?",
            args + [q.min_count, q.limit, q.offset]).fetchall()
        heads = self._heads([r[-1] for r in rows], q.runs)
        out = []
        for r in rows:
            node = NodeInfo(*r[:7])
            src, dst = (node.uid, uid) if direction == "up" else (uid, node.uid)
            out.append((node, EdgeStats.of(src, dst, r[7:16], heads.get(r[16], {}))))
        return out

    def resolve_neighbours(self, ref: str, model: str | None, direction: str,
                           q: EdgeQuery) -> tuple[list[NodeInfo], list[tuple[NodeInfo, EdgeStats]]]:
        found = self.find_nodes(ref, model)
        return found, self.neighbours(found[0].uid, direction, q) if len(found) == 1 else []

    def edges_between(self, src: str, dst: str, runs: Runs = None) -> list[EdgeStats]:
        among, args = _among("e", runs)
        rows = self._conn.execute(
            f"SELECT {EDGE_COLS} FROM edges e JOIN nodes s ON s.id = e.src JOIN nodes d ON d.id = e.dst "
            f"WHERE s.uid = ? AND d.uid = ? AND {among} GROUP BY e.id ORDER BY e.kind", [src, dst, *args]).fetchall()
        heads, roles = self._heads([r[-1] for r in rows], runs), self._roles([r[-1] for r in rows], runs)
        return [EdgeStats.of(src, dst, r[:9], heads.get(r[9], {}), roles.get(r[9], {})) for r in rows]

    def head_pairs(self, model: str, layer: int, head: int, limit: int,
                   runs: Runs = None) -> list[tuple[str, str, float]]:
        among, args = _among("h", runs)
        return [(a, b, v) for a, b, v in self._conn.execute(
            f"SELECT s.uid, d.uid, SUM(h.sum) AS v FROM edge_heads h JOIN edges e ON e.id = h.edge AND e.run = h.run "
            f"JOIN nodes s ON s.id = e.src JOIN nodes d ON d.id = e.dst WHERE e.kind = 'qk' AND s.model = ? "
            f"AND s.layer = ? AND h.head = ? AND {among} GROUP BY e.id HAVING v != 0 "
            f"ORDER BY round(abs(v), {ORDER_DECIMALS}) DESC, s.uid, d.uid LIMIT ?", [model, layer, head, *args, limit])]

    def evidence(self, src: str, dst: str, kind: str, limit: int, runs: Runs = None) -> list[Evidence]:
        among, args = _among("e", runs)
        blobs = [b for (b,) in self._conn.execute(
            "SELECT e.ev FROM edges e JOIN nodes s ON s.id = e.src JOIN nodes d ON d.id = e.dst WHERE s.uid = ? "
            f"AND d.uid = ? AND e.kind = ? AND e.ev NOT NULL AND {among}", [src, dst, kind, *args])]
        rows = decode(blobs)[1]
        uid = self._uids_of(rows["prompt"])
        return sorted((Evidence(src, dst, kind, uid[p], sp, dp, None if h < 0 else h, v)
                       for p, sp, dp, h, v in rows.tolist()), key=Evidence.rank_key)[:limit]

    def _uids_of(self, prompt_ids: np.ndarray) -> dict[int, str]:
        wanted = np.unique(prompt_ids).tolist()
        out: dict[int, str] = {}
        for i in range(0, len(wanted), 900):
            part = wanted[i:i + 900]
            out.update(self._conn.execute(f"SELECT id, uid FROM prompts WHERE id IN ({','.join('?' * len(part))})", part))
        return out

    def evidence_of_edges(self, edges: Sequence[tuple[str, str, str]], limit: int,
                          runs: Runs = None) -> list[list[Evidence]]:
        return [self.evidence(src, dst, kind, limit, runs) for src, dst, kind in edges]  # in-process: no trip to batch

    def _prompt(self, r: Sequence[Any]) -> Prompt:
        return Prompt(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6], json.loads(r[7]))

    def prompt(self, uid: str) -> Prompt | None:
        r = self._conn.execute(f"SELECT {PROMPT_COLS} FROM prompts WHERE uid = ?", (uid,)).fetchone()
        return self._prompt(r) if r else None

    def prompts(self, uids: list[str]) -> dict[str, Prompt]:
        uids = sorted(set(uids))
        rows = self._conn.execute(f"SELECT {PROMPT_COLS} FROM prompts WHERE uid IN ({','.join('?' * len(uids))})",
                                  uids) if uids else []
        return {r[0]: self._prompt(r) for r in rows}

    def prompt_evidence(self, uid: str, limit: int) -> list[Evidence]:
        """The prompt's rows still in the evidence of the edges its evidence_edges name (a later
        window may have displaced some), attention-output edges only, strongest first."""
        row = self._conn.execute("SELECT p.id, p.evidence_edges, r.no FROM prompts p JOIN runs r ON r.run_id = p.run "
                                 "WHERE p.uid = ?", (uid,)).fetchone()
        if row is None or not row[1]:
            return []
        prompt_id, keys, run = row
        out: list[Evidence] = []
        cur = self._conn.execute(
            "SELECT s.uid, d.uid, e.kind, e.ev FROM edges e JOIN nodes s ON s.id = e.src JOIN nodes d ON d.id = e.dst "
            "WHERE e.id IN (SELECT value FROM json_each(?)) AND e.run = ? AND e.kind NOT IN ('q_in', 'k_in', 'qk')",
            (json.dumps(np.unique(np.frombuffer(keys, np.int64)).tolist()), run))
        while part := cur.fetchmany(5000):
            counts, rows = decode([r[3] for r in part])
            mine = np.flatnonzero(rows["prompt"] == prompt_id)
            edge = np.repeat(np.arange(len(part)), counts)[mine]
            for (s, d, k, _), (_, sp, dp, h, v) in zip((part[i] for i in edge.tolist()), rows[mine].tolist(), strict=True):
                out.append(Evidence(s, d, k, uid, sp, dp, None if h < 0 else h, v))
        out.sort(key=lambda e: (-abs(e.value), e.src, e.dst, e.kind, e.src_pos, e.dst_pos, -1 if e.head is None else e.head))
        return out[:limit]

    def top_nodes(self, node_kind: str | None, by: str, limit: int, layer: int | None = None,
                  runs: Runs = None) -> list[tuple[NodeInfo, float, int]]:
        """Nodes (of a kind, of a layer) by degree or total |sum| over the edges at either end (each
        edge's sum over the selected runs first); the candidates are chosen first, so only their edges
        are read (through edges_src / edges_dst). A self-loop counts once, as Neo4j's undirected match
        counts it."""
        metric = {"degree": "COUNT(*)", "total": f"round(SUM(a), {ORDER_DECIMALS})"}[by]
        among, args = _among("e", runs)
        rows = self._conn.execute(
            "WITH cand AS (SELECT id FROM nodes WHERE (? IS NULL OR kind = ?) AND (? IS NULL OR layer = ?)), "
            f"ends AS (SELECT e.src AS node, e.id AS edge, e.sum AS s FROM edges e JOIN cand c ON e.src = c.id "
            f"WHERE {among} UNION ALL SELECT e.dst, e.id, e.sum FROM edges e JOIN cand c ON e.dst = c.id "
            f"WHERE e.src != e.dst AND {among}), per_edge AS (SELECT node, abs(SUM(s)) AS a FROM ends "
            f"GROUP BY node, edge) SELECT {NODE_COLS.format(a='n')}, SUM(a), COUNT(*) FROM per_edge "
            f"JOIN nodes n ON n.id = per_edge.node GROUP BY n.id ORDER BY {metric} DESC, n.uid LIMIT ?",
            [node_kind, node_kind, layer, layer, *args, *args, limit]).fetchall()
        return [(NodeInfo(*r[:7]), r[7], r[8]) for r in rows]

    def counts(self) -> dict[str, int]:
        out = {t: self._conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]  # noqa: S608 - fixed names
               for t in ("runs", "prompts", "nodes", "edges")}
        ev_bytes = self._conn.execute("SELECT COALESCE(SUM(length(ev)), 0) FROM edges").fetchone()[0]
        return {**out, "evidence": ev_bytes // EV_ROW.itemsize}

    def prompt_count(self, run: str) -> int:
        n: int = self._conn.execute("SELECT COUNT(*) FROM prompts WHERE run = ?", (run,)).fetchone()[0]
        return n

    def put_mined(self, key: str, fingerprint: str, stamp: str, result: str) -> None:
        self._conn.execute("INSERT INTO mined VALUES (?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET fingerprint = "
                           "excluded.fingerprint, stamp = excluded.stamp, result = excluded.result",
                           (key, fingerprint, stamp, result))

    def get_mined(self, key: str) -> tuple[str, str, str] | None:
        row = self._conn.execute("SELECT fingerprint, stamp, result FROM mined WHERE key = ?", (key,)).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def mined_stamp(self, key: str) -> tuple[str, str] | None:
        row = self._conn.execute("SELECT fingerprint, stamp FROM mined WHERE key = ?", (key,)).fetchone()
        return (row[0], row[1]) if row else None

    def all_mined(self) -> Iterator[tuple[str, str, str, str]]:
        yield from self._conn.execute("SELECT key, fingerprint, stamp, result FROM mined ORDER BY key")

    # ---- bulk (export, mining) ------------------------------------------------------------------
    def all_edges(self, edge_kinds: tuple[str, ...] | None = None, runs: Runs = None) -> Iterator[EdgeStats]:
        among, args = _among("e", runs)
        kinds = f"AND e.kind IN ({','.join('?' * len(edge_kinds))})" if edge_kinds else ""
        cur = self._conn.execute(f"SELECT s.uid, d.uid, {EDGE_COLS} FROM edges e JOIN nodes s ON s.id = e.src "
                                 f"JOIN nodes d ON d.id = e.dst WHERE {among} {kinds} GROUP BY e.id ORDER BY e.id",
                                 [*args, *(edge_kinds or ())])
        while rows := cur.fetchmany(5000):
            heads, roles = self._heads([r[-1] for r in rows], runs), self._roles([r[-1] for r in rows], runs)
            for r in rows:
                yield EdgeStats.of(r[0], r[1], r[2:11], heads.get(r[11], {}), roles.get(r[11], {}))

    def all_nodes(self, runs: Runs = None) -> Iterator[tuple[NodeInfo, NodeStats | None]]:
        among, args = _among("s", runs)
        for r in self._conn.execute(f"SELECT {NODE_COLS.format(a='n')}, {STAT_COLS} FROM nodes n LEFT JOIN "
                                    f"node_stats s ON s.node = n.id AND {among} GROUP BY n.id ORDER BY n.id",
                                    args).fetchall():
            yield NodeInfo(*r[:7]), (NodeStats(r[0], *r[7:]) if r[7] is not None else None)

    def all_prompts(self) -> Iterator[Prompt]:
        for r in self._conn.execute(f"SELECT {PROMPT_COLS} FROM prompts ORDER BY uid").fetchall():
            yield self._prompt(r)

    def all_evidence(self, runs: Runs = None) -> Iterator[Evidence]:
        among, args = _among("e", runs)
        uid = dict(self._conn.execute("SELECT id, uid FROM prompts").fetchall())
        cur = self._conn.execute("SELECT s.uid, d.uid, e.kind, e.ev FROM edges e JOIN nodes s ON s.id = e.src "
                                 f"JOIN nodes d ON d.id = e.dst WHERE e.ev NOT NULL AND {among} ORDER BY e.id, e.run",
                                 args)
        while part := cur.fetchmany(5000):
            counts, rows = decode([r[3] for r in part])
            edge = np.repeat(np.arange(len(part)), counts).tolist()
            for i, (p, sp, dp, h, v) in zip(edge, rows.tolist(), strict=True):
                yield Evidence(part[i][0], part[i][1], part[i][2], uid[p], sp, dp, None if h < 0 else h, v)

    def import_window(self, agg: WindowAggregate) -> None:
        """Bulk-load an exported catalog's rows (into an empty catalog: no prompt claim, every
        evidence row kept)."""
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            self._insert_prompts(c, agg.prompts, "INSERT OR IGNORE")
            ids, new_ids = self._node_ids(c, agg.nodes)
            self._write_aggregate(c, agg, self._run_no(c, agg.run), ids, None)
            c.execute("COMMIT")
        except BaseException:
            self._pending = {}
            c.execute("ROLLBACK")
            raise
        self._committed(new_ids)

    def import_runs(self, runs: list[Run]) -> None:
        self._conn.executemany(
            "INSERT INTO runs VALUES (?1, ?2, ?3, (SELECT COALESCE(MAX(no), -1) + 1 FROM runs)) "
            "ON CONFLICT(run_id) DO UPDATE SET status = ?2, manifest = ?3",
            [(r.run_id, r.status, json.dumps(r.manifest, sort_keys=True)) for r in runs])

    def cypher(self, query: str, params: JSON, limit: int, timeout_s: float) -> list[JSON]:
        raise CypherUnsupported("Cypher needs the Neo4j store: this catalog is SQLite "
                                f"({self.url}); export it with `circuit-catalog export --from {self.url} "
                                "--to neo4j://127.0.0.1:7687` or query it with the other commands")


def _among(alias: str, runs: Runs) -> tuple[str, list[str]]:
    """SQL restricting ``alias``'s rows to the runs named (by their numbers), and its arguments."""
    if runs is None:
        return "1", []
    return f"{alias}.run IN (SELECT no FROM runs WHERE run_id IN ({','.join('?' * len(runs))}))", list(runs)


def _lists(*columns: Any) -> list[list[Any]]:
    """numpy columns as Python lists (one C-level conversion each) for executemany."""
    return [np.asarray(col).tolist() for col in columns]


def _clear_staging(c: sqlite3.Connection) -> None:
    for table in STAGING_TABLES:
        c.execute(f"DELETE FROM temp.{table}")


def open_url(url: str, evidence_per_edge: int | None, create: bool) -> SqliteStore:
    """``sqlite:///relative.db`` or ``sqlite:////absolute.db`` (SQLAlchemy's convention)."""
    if not url.startswith("sqlite:///") or len(url) == len("sqlite:///"):
        raise StoreError(f"store URL {url!r}: write sqlite:///relative/path.db or sqlite:////absolute/path.db")
    return SqliteStore(unquote(url[len("sqlite:///"):]), url=url, evidence_per_edge=evidence_per_edge, create=create)
