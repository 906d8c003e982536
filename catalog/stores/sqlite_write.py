"""Every write of the SQLite catalog: a window is one IMMEDIATE transaction (all of it lands or none of it does), staged
through temp tables and upserted set-wise; an edge's evidence is a blob on its row (catalog/stores/sqlite_evidence.py)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from catalog.aggregate import WindowAggregate
from catalog.evidence_rank import sorted_unique
from catalog.feature_acts import tokens_at
from catalog.ids import check_stored_run_name
from catalog.schema import EDGE_KINDS, JSON, NODE_ID_LIMIT, NodeInfo, Prompt, Run, edge_key
from catalog.stores.base import StoreError
from catalog.stores.sqlite_connection import STAGING_TABLES
from catalog.stores.sqlite_evidence import EV_ROW, MergedBlobs, merge, rows_of
from catalog.stores.sqlite_read import PROMPT_COLS, SqliteReads

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

UPSERT_HIST = ("INSERT INTO node_hist VALUES (?, ?, ?, ?) ON CONFLICT(node, run, bin) DO UPDATE SET n = n + excluded.n")

SET_EVIDENCE = ("UPDATE edges SET ev = substr(?2, b.ev_start + 1, b.ev_size) FROM b_ev b "  # import only
                "WHERE edges.id = b.id AND edges.run = ?1")

STORED_EVIDENCE = "SELECT t.edge, e.ev FROM b_touched t JOIN edges e ON e.id = t.edge AND e.run = ? WHERE e.ev NOT NULL"


class SqliteWrites(SqliteReads):
    """The Store protocol's writes: windows, runs, imports and mined results."""

    def write_window(self, agg: WindowAggregate) -> bool:
        """Store a window's prompts and aggregates in one IMMEDIATE transaction; False if every
        prompt was stored already. Columns go through executemany into temp tables, then one
        set-based upsert per table."""
        def write(c: sqlite3.Connection) -> dict[str, int] | None:
            run = self._run_no(c, agg.run)
            if not self._claim_prompts(c, agg.run, agg.prompts):
                return None
            ids, new_ids = self._node_ids(c, agg.nodes)
            self._write_aggregate(c, agg, run, ids, self.evidence_per_edge)
            return new_ids

        return self._in_immediate_transaction(write)

    def publish_run(self, run: str, prompts: list[Prompt], nodes: list[NodeInfo],
                    parts: Iterable[WindowAggregate]) -> bool:
        """Store a compacted run (catalog.publish) in one IMMEDIATE transaction: its prompts, its nodes, and
        ``parts``, aggregates of disjoint edges whose rows name ``prompts`` and ``nodes``; each edge is
        written once. False, storing nothing, if every prompt was stored already."""
        def write(c: sqlite3.Connection) -> dict[str, int] | None:
            run_no = self._run_no(c, run)
            if not self._claim_prompts(c, run, prompts):
                return None
            ids, new_ids = self._node_ids(c, nodes)
            for part in parts:
                self._write_aggregate(c, part, run_no, ids, self.evidence_per_edge)
            return new_ids

        return self._in_immediate_transaction(write)

    def _in_immediate_transaction(self, write: Callable[[sqlite3.Connection], dict[str, int] | None]) -> bool:
        """Run ``write`` in one IMMEDIATE transaction: committed when it returns the node ids it created
        (taken in only then), rolled back when it returns None (nothing to store) or raises."""
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            new_ids = write(c)
            c.execute("ROLLBACK" if new_ids is None else "COMMIT")
        except BaseException:
            self._pending = {}
            c.execute("ROLLBACK")
            raise
        if new_ids is None:
            return False
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
        self._write_activations(c, agg, run, ids)
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

    def _write_activations(self, c: sqlite3.Connection, agg: WindowAggregate, run: int, ids: np.ndarray) -> None:
        """The window's top activations (with their tokens) and histogram counts, in key order."""
        t, g = agg.tops, agg.hists
        if len(t):
            prompt_ids = self._prompt_ids(c, agg.prompts)[t.prompt]
            src = np.where(t.src >= 0, ids[t.src.clip(0)], -1)
            at = np.lexsort((t.pos, prompt_ids, ids[t.node]))
            c.executemany("INSERT INTO node_top VALUES (?,?,?,?,?,?,?,?,?,?)", zip(*_lists(
                ids[t.node][at], np.full(len(t), run), prompt_ids[at], t.pos[at], t.act[at], tokens_at(agg)[at],
                src[at], t.src_pos[at], t.head[at], t.value[at])))
        at = np.lexsort((g.bin, ids[g.node]))
        c.executemany(UPSERT_HIST, zip(*_lists(ids[g.node][at], np.full(len(g), run), g.bin[at], g.n[at])))

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
        check_stored_run_name(run_id)
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

    def drop_run(self, run_id: str) -> None:
        """Delete a run and every row it holds, in one transaction (the segments of ``ingest --publish-every``
        once the run that replaces them is visible)."""
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            row = c.execute("SELECT no FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is not None:
                for table in ("edges", "edge_heads", "edge_roles", "node_stats", "node_top", "node_hist"):
                    c.execute(f"DELETE FROM {table} WHERE run = ?", (row[0],))
                gone = [r[0] for r in c.execute("SELECT uid FROM prompts WHERE run = ?", (run_id,))]
                c.execute("DELETE FROM prompts WHERE run = ?", (run_id,))
                c.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        for uid in gone if row is not None else ():
            self._prompt_id.pop(uid, None)

    def put_mined(self, key: str, fingerprint: str, stamp: str, result: str) -> None:
        self._conn.execute("INSERT INTO mined VALUES (?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET fingerprint = "
                           "excluded.fingerprint, stamp = excluded.stamp, result = excluded.result",
                           (key, fingerprint, stamp, result))

    def import_window(self, agg: WindowAggregate) -> None:
        """Bulk-load an exported catalog's rows (into an empty catalog: no prompt claim, every
        evidence row kept)."""
        def write(c: sqlite3.Connection) -> dict[str, int]:
            self._insert_prompts(c, agg.prompts, "INSERT OR IGNORE")
            ids, new_ids = self._node_ids(c, agg.nodes)
            self._write_aggregate(c, agg, self._run_no(c, agg.run), ids, None)
            return new_ids

        self._in_immediate_transaction(write)

    def import_runs(self, runs: list[Run]) -> None:
        self._conn.executemany(
            "INSERT INTO runs VALUES (?1, ?2, ?3, (SELECT COALESCE(MAX(no), -1) + 1 FROM runs)) "
            "ON CONFLICT(run_id) DO UPDATE SET status = ?2, manifest = ?3",
            [(r.run_id, r.status, json.dumps(r.manifest, sort_keys=True)) for r in runs])


def _lists(*columns: Any) -> list[list[Any]]:
    """numpy columns as Python lists (one C-level conversion each) for executemany."""
    return [np.asarray(col).tolist() for col in columns]

def _clear_staging(c: sqlite3.Connection) -> None:
    for table in STAGING_TABLES:
        c.execute(f"DELETE FROM temp.{table}")
