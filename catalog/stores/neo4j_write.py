"""Every write of the Neo4j catalog. One window is one transaction: every lookup first, then the writers' lock, then
UNWIND over parallel arrays of primitives (CHUNK rows a query); nodes found by their indexed nid, edges by their
indexed key or, while a writer is its run's only one, from its own copy of what it stored (neo4j_edges.py); evidence
lists merged client-side (neo4j_evidence.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np

from catalog.aggregate import WindowAggregate
from catalog.evidence_floor import EvidenceFloor, pack
from catalog.feature_acts import StatLists, stat_lists
from catalog.ids import check_stored_run_name
from catalog.schema import EDGE_KINDS, JSON, NODE_ID_LIMIT, NodeInfo, Prompt, Run, edge_key
from catalog.stores.base import StoreError, StoreUnavailable
from catalog.stores.neo4j_connection import SCHEMA_VERSION, Tx
from catalog.stores.neo4j_edges import RunEdges, spans
from catalog.stores.neo4j_evidence import LISTS, MergedLists, StoredLists, merge_lists
from catalog.stores.neo4j_read import Neo4jReads

CHUNK = 20_000  # rows per UNWIND query

# Queries name the index they seek with (USING INDEX SEEK): a plan compiled while the catalog is empty
# would otherwise scan every edge per row once it is not. A bare USING INDEX is not enough: it allows
# an index *scan* filtered per row, which the planner chose for FIND_EDGES when its first 20k-key list
# was planned right after the first window's commit (PROFILE: 462M db hits, 190 s instead of 1 s; the
# cache keys plans by list-size bucket, so smaller lists of the same query were planned well).
# Edges are looked up by key before the window writes anything and updated by element id.
# Every writer takes this lock, so windows of concurrent shards apply one after another: an edge is
# never created twice, and node ids are handed out in one sequence. The lock is a write that always
# changes the node (a counter): a REMOVE of a property the node lacks, used before, took no lock at
# all, and two shards handed out the same nids (a ConstraintError, seen in the shard test and
# reproduced by two concurrent writers). Being a write, the lock is taken *after* the window's
# lookups (see _window_tx); the counter then says whether another writer committed in between.
LOCK = (f"MERGE (d:Dictionary {{name: 'nodes'}}) ON CREATE SET d.next = 0, d.schema = {SCHEMA_VERSION} "
        "SET d.writes = coalesce(d.writes, 0) + 1")

WRITES = "OPTIONAL MATCH (d:Dictionary {name: 'nodes'}) RETURN coalesce(d.writes, 0)"

RUN_HAS_PROMPTS = "OPTIONAL MATCH (p:Prompt {run: $run}) WITH p LIMIT 1 RETURN p IS NOT NULL"

LOCKED = "MATCH (d:Dictionary {name: 'nodes'}) RETURN d.writes, d.next"

CREATE_NODES = """
UNWIND range(0, size($uid) - 1) AS i
CREATE (n:Node {nid: $base + i, uid: $uid[i], model: $model[i], sae: $sae[i], ref: $ref[i], kind: $kind[i],
                layer: $layer[i], index: $index[i]})
WITH n, i WHERE $feature[i] SET n:Feature
"""

# the run's stored edges among $keys, with the evidence lists of those flagged in $lists
FIND_EDGES = """
UNWIND range(0, size($keys) - 1) AS i
MATCH ()-[r:EDGE {key: $keys[i]}]->() USING INDEX SEEK r:EDGE(key) WHERE r.run = $run
RETURN $keys[i], elementId(r),
       CASE WHEN $lists[i] THEN [r.ev_prompt, r.ev_src_pos, r.ev_dst_pos, r.ev_head, r.ev_value] END
"""

UPDATE_EDGES = """
UNWIND range(0, size($eid) - 1) AS i
MATCH ()-[r]->() WHERE elementId(r) = $eid[i]
WITH r, i, $heads[$hoff[i]..$hoff[i + 1]] AS h, $role_n[$roff[i]..$roff[i + 1]] AS rn,
     $role_abs[$roff[i]..$roff[i + 1]] AS ra, coalesce(r.role_n, []) AS old_n, coalesce(r.role_abs, []) AS old_a
SET r.n_prompts = r.n_prompts + $n_prompts[i], r.n_obs = r.n_obs + $n_obs[i], r.sum = r.sum + $sum[i],
    r.sumsq = r.sumsq + $sumsq[i], r.sum_abs = r.sum_abs + $sum_abs[i], r.n_pos = r.n_pos + $n_pos[i],
    r.min = CASE WHEN $min[i] < r.min THEN $min[i] ELSE r.min END,
    r.max = CASE WHEN $max[i] > r.max THEN $max[i] ELSE r.max END,
    r.head_sums = [j IN range(0, CASE WHEN size(r.head_sums) > size(h) THEN size(r.head_sums) ELSE size(h) END - 1)
                   | coalesce(r.head_sums[j], 0.0) + coalesce(h[j], 0.0)],
    r.role_n = [j IN range(0, CASE WHEN size(old_n) > size(rn) THEN size(old_n) ELSE size(rn) END - 1)
                | coalesce(old_n[j], 0) + coalesce(rn[j], 0)],
    r.role_abs = [j IN range(0, CASE WHEN size(old_a) > size(ra) THEN size(old_a) ELSE size(ra) END - 1)
                  | coalesce(old_a[j], 0.0) + coalesce(ra[j], 0.0)]
"""

CREATE_EDGES = """
UNWIND range(0, size($key) - 1) AS i
MATCH (s:Node {nid: $src[i]})
MATCH (d:Node {nid: $dst[i]})
CREATE (s)-[r:EDGE {run: $run, key: $key[i], kind: $kind[i], n_prompts: $n_prompts[i], n_obs: $n_obs[i], sum: $sum[i],
                   sumsq: $sumsq[i], sum_abs: $sum_abs[i], min: $min[i], max: $max[i], n_pos: $n_pos[i],
                   head_sums: $heads[$hoff[i]..$hoff[i + 1]], role_n: $role_n[$roff[i]..$roff[i + 1]],
                   role_abs: $role_abs[$roff[i]..$roff[i + 1]], ev_prompt: $ev_prompt[$eoff[i]..$eoff[i + 1]],
                   ev_src_pos: $ev_src_pos[$eoff[i]..$eoff[i + 1]], ev_dst_pos: $ev_dst_pos[$eoff[i]..$eoff[i + 1]],
                   ev_head: $ev_head[$eoff[i]..$eoff[i + 1]], ev_value: $ev_value[$eoff[i]..$eoff[i + 1]]}]->(d)
RETURN collect($key[i]), collect(elementId(r))  // one record: decoding a record a row cost 3 s in 110k
"""

FIND_STATS = """
UNWIND $keys AS k
MATCH (x:Stats {nid: k, run: $run}) USING INDEX SEEK x:Stats(nid, run)
RETURN k, elementId(x)
"""

UPDATE_STATS = """
UNWIND range(0, size($eid) - 1) AS i
MATCH (x:Stats) WHERE elementId(x) = $eid[i]
SET x.n_obs = x.n_obs + $n_obs[i], x.n_prompts = x.n_prompts + $n_prompts[i], x.sum_act = x.sum_act + $sum_act[i],
    x.max_act = CASE WHEN $max_act[i] > x.max_act THEN $max_act[i] ELSE x.max_act END,
    x.top_prompt = coalesce(x.top_prompt, []) + $top_prompt[$toff[i]..$toff[i + 1]],
    x.top_pos = coalesce(x.top_pos, []) + $top_pos[$toff[i]..$toff[i + 1]],
    x.top_act = coalesce(x.top_act, []) + $top_act[$toff[i]..$toff[i + 1]],
    x.top_token = coalesce(x.top_token, []) + $top_token[$toff[i]..$toff[i + 1]],
    x.top_src = coalesce(x.top_src, []) + $top_src[$toff[i]..$toff[i + 1]],
    x.top_src_pos = coalesce(x.top_src_pos, []) + $top_src_pos[$toff[i]..$toff[i + 1]],
    x.top_head = coalesce(x.top_head, []) + $top_head[$toff[i]..$toff[i + 1]],
    x.top_value = coalesce(x.top_value, []) + $top_value[$toff[i]..$toff[i + 1]],
    x.hist_bin = coalesce(x.hist_bin, []) + $hist_bin[$goff[i]..$goff[i + 1]],
    x.hist_n = coalesce(x.hist_n, []) + $hist_n[$goff[i]..$goff[i + 1]],
    x.top_tokens = coalesce(x.top_tokens, '') + $top_tokens[i]
"""

CREATE_STATS = """
UNWIND range(0, size($nid) - 1) AS i
CREATE (:Stats {nid: $nid[i], run: $run, n_obs: $n_obs[i], n_prompts: $n_prompts[i], sum_act: $sum_act[i],
                max_act: $max_act[i],
                top_prompt: $top_prompt[$toff[i]..$toff[i + 1]],
                top_pos: $top_pos[$toff[i]..$toff[i + 1]],
                top_act: $top_act[$toff[i]..$toff[i + 1]],
                top_token: $top_token[$toff[i]..$toff[i + 1]],
                top_src: $top_src[$toff[i]..$toff[i + 1]],
                top_src_pos: $top_src_pos[$toff[i]..$toff[i + 1]],
                top_head: $top_head[$toff[i]..$toff[i + 1]],
                top_value: $top_value[$toff[i]..$toff[i + 1]],
                hist_bin: $hist_bin[$goff[i]..$goff[i + 1]],
                hist_n: $hist_n[$goff[i]..$goff[i + 1]], top_tokens: $top_tokens[i]})
"""

SET_EVIDENCE = """
UNWIND range(0, size($eid) - 1) AS i
MATCH ()-[r]->() WHERE elementId(r) = $eid[i]
SET r.ev_prompt = $ev_prompt[$eoff[i]..$eoff[i + 1]], r.ev_src_pos = $ev_src_pos[$eoff[i]..$eoff[i + 1]],
    r.ev_dst_pos = $ev_dst_pos[$eoff[i]..$eoff[i + 1]], r.ev_head = $ev_head[$eoff[i]..$eoff[i + 1]],
    r.ev_value = $ev_value[$eoff[i]..$eoff[i + 1]]
"""

PROMPT_EVIDENCE_EDGES = """
UNWIND range(0, size($uid) - 1) AS i
MATCH (p:Prompt {uid: $uid[i]})
SET p.evidence_edges = coalesce(p.evidence_edges, []) + $keys[$koff[i]..$koff[i + 1]]
"""

COUNT_EVIDENCE = "MATCH (d:Dictionary {name: 'nodes'}) SET d.evidence = coalesce(d.evidence, 0) + $n"


class Neo4jWrites(Neo4jReads):
    """The Store protocol's writes: windows, runs, imports and mined results."""

    def write_window(self, agg: WindowAggregate) -> bool:
        """Store a window in one transaction; False if every prompt was stored already."""
        from neo4j.exceptions import ServiceUnavailable, SessionExpired

        try:
            with self.driver.session(database=self.database) as session:
                done = session.execute_write(self._window_tx, agg, True)
        except (ServiceUnavailable, SessionExpired) as exc:  # after the driver's own retries
            raise StoreUnavailable(f"Neo4j at {self.url} stopped answering during a write ({type(exc).__name__}); "
                                   "this window was not stored, the windows committed before it were") from None
        if done is None:
            return False
        self._ids.update(done)  # only once committed: a rolled-back id may be handed out again
        if self._new_edges is not None:
            run, copy, *rows = self._new_edges
            self._run_edges[run] = copy.after(*rows)
            self._new_edges = None
        if self._stored_evidence is not None:
            run, *rows = self._stored_evidence
            self._floor(run).update(*rows)
            self._stored_evidence = None
        return True

    def _floor(self, run: str) -> EvidenceFloor:
        return self._floors.setdefault(run, EvidenceFloor(self.evidence_per_edge))

    def import_window(self, agg: WindowAggregate) -> None:
        """Bulk-load an exported catalog's rows (into an empty catalog: no prompt claim, no trim)."""
        with self.driver.session(database=self.database) as session:
            written: dict[str, int] | None = session.execute_write(self._window_tx, agg, False)
        self._ids.update(written or {})

    def import_runs(self, runs: list[Run]) -> None:
        self.driver.execute_query(
            "UNWIND $rows AS r MERGE (x:Run {run_id: r.run_id}) SET x.status = r.status, x.manifest = r.manifest",
            rows=[{"run_id": r.run_id, "status": r.status, "manifest": json.dumps(r.manifest, sort_keys=True)}
                  for r in runs], database_=self.database)

    def _window_tx(self, tx: Tx, /, agg: WindowAggregate, ingest: bool) -> dict[str, int] | None:
        """Look up, lock, write. Every lookup the window needs (stored prompts, node ids, edges and
        the evidence lists it merges with) runs before the lock, so concurrent shards overlap their
        reads and hold the lock only to write. The lock's counter then tells whether another writer
        committed since the lookups began (it grew by more than this lock's one); only then are they
        repeated, now under the lock, where nobody else can write. Nothing read before the lock is
        used unless the counter says no commit came in between: such a read may have seen part of
        another writer's window (read committed isolation streams rows and reads their properties as
        it goes)."""
        self._new_edges = None
        seen = tx.run(WRITES).single()[0]
        copy = self._edge_copy(tx, agg.run, seen) if ingest else None
        looked_up = self._look_up(tx, agg, ingest, copy)
        tx.run(LOCK).consume()
        writes, next_id = tx.run(LOCKED).single()
        if writes != seen + 1 or (looked_up is not None and self._nodes_appeared(tx, agg, looked_up[0])):
            if copy is not None:
                copy = self._run_edges[agg.run] = None  # another writer committed: this copy may miss its edges
            looked_up = self._look_up(tx, agg, ingest, None)
        if looked_up is None:
            return None
        known, found, stored, stats_found, candidates = looked_up
        # ---- writes
        tx.run(f"UNWIND $rows AS p {'CREATE (x:Prompt)' if ingest else 'MERGE (x:Prompt {uid: p.uid})'} SET x += p",
               rows=[self._prompt_props(p) for p in agg.prompts])
        new = self._create_nodes(tx, agg.nodes, known, next_id)
        ids = np.array([known.get(n.uid, new.get(n.uid, -1)) for n in agg.nodes], dtype=np.int64)
        self._write_stats(tx, agg, ids, stats_found)
        merged = self._merge_evidence(agg, ids, stored, candidates)
        created = self._write_edges(tx, agg, ids, found, merged)
        self._write_evidence(tx, agg, ids, found, merged, candidates)
        if copy is not None:
            self._new_edges = (agg.run, copy, writes, *created, _group_keys(agg, ids, merged.group), merged.offsets,
                               merged.columns)
        return {**known, **new}

    def _edge_copy(self, tx: Tx, run: str, seen: int) -> RunEdges | None:
        """This writer's copy of the run's stored edges if it may stand in for their lookups (the write
        counter reads ``seen``, as after the copy's commit), else None; the first window of a run
        starts an empty copy if the run has no prompt stored. The caller still checks under the lock
        that nobody committed since ``seen``."""
        if run not in self._run_edges:
            self._run_edges[run] = None if tx.run(RUN_HAS_PROMPTS, run=run).single()[0] else RunEdges.empty(seen)
        copy = self._run_edges[run]
        if copy is not None and copy.writes != seen:
            copy = self._run_edges[run] = None  # another writer committed since: it may have stored edges of the run
        return copy

    def _look_up(self, tx: Tx, agg: WindowAggregate, ingest: bool, copy: RunEdges | None) -> tuple[Any, ...] | None:
        """What the window's writes depend on: known node ids, stored edges and Stats by key, the
        evidence rows that may enter their edge's list and the stored lists they compete with (from
        ``copy`` if given, else read); None when an ingest window's prompts are stored already."""
        if ingest and self._prompts_stored(tx, agg):
            return None
        known = self._known_ids(tx, agg.nodes)
        ids = np.array([known.get(n.uid, -1) for n in agg.nodes], dtype=np.int64)
        candidates = self._evidence_candidates(agg, ids, ingest)
        found, stored = self._find_edges(tx, agg, ids, candidates, copy)
        return known, found, stored, self._find_stats(tx, agg, ids), candidates

    @staticmethod
    def _nodes_appeared(tx: Tx, agg: WindowAggregate, known: dict[str, int]) -> bool:
        """Under the lock: did a node the lookups missed get stored meanwhile? The counter missed one
        such commit in the shard test after a deadlock retry (a ConstraintError on Node.uid)."""
        missing = [n.uid for n in agg.nodes if n.uid not in known]
        return bool(missing) and tx.run("UNWIND $uids AS u MATCH (n:Node {uid: u}) RETURN count(n)",
                                        uids=missing).single()[0] > 0

    def _prompts_stored(self, tx: Tx, agg: WindowAggregate) -> bool:
        uids = [p.uid for p in agg.prompts]
        have = {r[0] for r in tx.run("MATCH (p:Prompt) WHERE p.uid IN $uids RETURN p.uid", uids=uids)}
        if have and len(have) != len(set(uids)):
            raise StoreError(f"window overlaps {len(have)} prompts already stored for run {agg.run} "
                             "(resume filters stored prompts before batching)")
        return bool(have)

    def _known_ids(self, tx: Tx, nodes: list[NodeInfo]) -> dict[str, int]:
        """Dictionary ids of the nodes stored already (cached, or read)."""
        known = {n.uid: self._ids[n.uid] for n in nodes if n.uid in self._ids}
        missing = [n.uid for n in nodes if n.uid not in known]
        if missing:
            known.update((r[0], r[1]) for r in tx.run("UNWIND $uids AS u MATCH (n:Node {uid: u}) RETURN u, n.nid",
                                                     uids=missing))
        return known

    def _create_nodes(self, tx: Tx, nodes: list[NodeInfo], known: dict[str, int], next_id: int) -> dict[str, int]:
        """Create the nodes the dictionary lacks (under the lock) and return their new ids."""
        create = [n for n in nodes if n.uid not in known]
        if not create:
            return {}
        if next_id + len(create) > NODE_ID_LIMIT:
            raise StoreError(f"node dictionary of {self.url} is full ({NODE_ID_LIMIT} nodes)")
        tx.run(CREATE_NODES, base=next_id, uid=[n.uid for n in create], model=[n.model for n in create],
               sae=[n.sae for n in create], ref=[n.ref for n in create], kind=[n.kind for n in create],
               layer=[n.layer for n in create], index=[n.index for n in create],
               feature=[n.is_feature for n in create])
        tx.run("MATCH (d:Dictionary {name: 'nodes'}) SET d.next = d.next + $k", k=len(create))
        return {n.uid: next_id + i for i, n in enumerate(create)}

    def _evidence_candidates(self, agg: WindowAggregate, ids: np.ndarray, ingest: bool) -> tuple[np.ndarray, np.ndarray]:
        """The window's evidence rows that may enter their edge's list ([c] row indices: at ingest, those
        that this writer's floor does not rule out; on import, all) and the keys [t] of their edges
        that may be stored (both nodes known), whose stored lists they compete with."""
        v = agg.evidence
        known = (ids[v.src] >= 0) & (ids[v.dst] >= 0)
        keys = np.where(known, edge_key(np.maximum(ids[v.src], 0), np.maximum(ids[v.dst], 0), v.kind), -1)
        keep = np.ones(len(v), bool)
        if ingest and self.evidence_per_edge is not None and len(v):
            floor = self._floor(agg.run)  # a bound only: see EvidenceFloor for why this store never reads it as exact
            keep = floor.keep(keys, np.abs(v.value), floor.prompt_ids([p.uid for p in agg.prompts])[v.prompt],
                              pack(v.src_pos, v.dst_pos, v.head)) | ~known
        rows = np.flatnonzero(keep)
        return rows, np.unique(keys[rows][known[rows]])

    def _merge_evidence(self, agg: WindowAggregate, ids: np.ndarray, stored: StoredLists,
                        candidates: tuple[np.ndarray, np.ndarray]) -> MergedLists:
        """The new evidence lists of the edges the window's candidate rows change (their top N by the
        total order of Evidence.rank_key), grouped by the edge's identity in the window (_window_edge).
        Every stored list read is the list of some candidate row's edge (nodes keep their ids)."""
        v, (rows, _) = agg.evidence, candidates
        group = _window_edge(agg, v.src[rows], v.dst[rows], v.kind[rows])
        keys = edge_key(ids[v.src[rows]], ids[v.dst[rows]], v.kind[rows])
        prompt_uids = np.array([p.uid for p in agg.prompts] or [""], dtype=object)
        return merge_lists(group, prompt_uids[v.prompt[rows]], v.src_pos[rows], v.dst_pos[rows], v.head[rows],
                           v.value[rows], stored.regrouped(keys, group), self.evidence_per_edge)

    def _write_evidence(self, tx: Tx, agg: WindowAggregate, ids: np.ndarray, found: dict[int, str],
                        merged: MergedLists, candidates: tuple[np.ndarray, np.ndarray]) -> None:
        """Set the changed evidence lists of stored edges (new edges got theirs with the edge), add to
        each prompt's evidence_edges the keys where its rows went, and count the rows."""
        v, (rows, _) = agg.evidence, candidates
        keys = _group_keys(agg, ids, merged.group)
        stored = np.array([k in found for k in keys.tolist()], dtype=bool)
        if not np.isin(keys[~stored], edge_key(ids[agg.edges.src], ids[agg.edges.dst], agg.edges.kind)).all():
            raise StoreError(f"window of run {agg.run} has evidence of edges that are neither stored nor in the window")
        take = np.flatnonzero(stored)
        for part in _chunks(len(take)):
            g = take[part]
            tx.run(SET_EVIDENCE, eid=[found[k] for k in keys[g].tolist()],
                   **_sub_lists(dict(zip(LISTS, merged.columns, strict=True)), merged.offsets, g, "eoff"))
        went = rows[merged.window_rows]  # the window's evidence rows that are in a list now
        w_keys, w_prompt = edge_key(ids[v.src[went]], ids[v.dst[went]], v.kind[went]), v.prompt[went]
        order = np.lexsort((w_keys, w_prompt))
        w_keys, w_prompt = w_keys[order], w_prompt[order]
        first = np.r_[True, (w_keys[1:] != w_keys[:-1]) | (w_prompt[1:] != w_prompt[:-1])] if len(order) else order > 0
        w_keys, w_prompt = w_keys[first], w_prompt[first]
        per_prompt = np.bincount(w_prompt, minlength=len(agg.prompts))
        has = np.flatnonzero(per_prompt)
        offsets = np.r_[0, np.cumsum(per_prompt)]
        for part in _chunks(len(has)):
            p = has[part]
            tx.run(PROMPT_EVIDENCE_EDGES, uid=[agg.prompts[i].uid for i in p.tolist()],
                   **_sub_lists({"keys": w_keys}, offsets, p, "koff"))
        tx.run(COUNT_EVIDENCE, n=int(merged.grown.sum()))
        floor = self._floor(agg.run)
        self._stored_evidence = (agg.run, edge_key(ids[v.src[went]], ids[v.dst[went]], v.kind[went]),
                                 np.abs(v.value[went]), floor.prompt_ids([p.uid for p in agg.prompts])[v.prompt[went]],
                                 pack(v.src_pos[went], v.dst_pos[went], v.head[went]))

    @staticmethod
    def _prompt_props(p: Prompt) -> JSON:
        return {"uid": p.uid, "run": p.run, "prompt_id": p.prompt_id, "text": p.text, "tokens": p.tokens,
                "corpus": p.corpus, "content_hash": p.content_hash, "meta": json.dumps(p.meta, sort_keys=True)}

    @staticmethod
    def _find_stats(tx: Tx, agg: WindowAggregate, ids: np.ndarray) -> dict[int, str]:
        """Element ids of the run's Stats nodes that the window adds to, by node id."""
        nids = ids[agg.stats.node]
        found: dict[int, str] = {}
        keys = nids[nids >= 0]
        for part in _chunks(len(keys)):
            found.update((r[0], r[1]) for r in tx.run(FIND_STATS, keys=keys[part].tolist(), run=agg.run))
        return found

    @staticmethod
    def _write_stats(tx: Tx, agg: WindowAggregate, ids: np.ndarray, found: dict[int, str]) -> None:
        """Add the window's statistics into the run's Stats nodes; their top-activation and histogram lists
        grow by the window's (reads take the top of them and add the bins)."""
        s = agg.stats
        acts = stat_lists(agg, ids)
        nids = ids[s.node]
        old = np.array([k in found for k in nids.tolist()], dtype=bool)
        for mask, query in ((old, UPDATE_STATS), (~old, CREATE_STATS)):
            rows = np.flatnonzero(mask)
            for part in _chunks(len(rows)):
                r = rows[part]
                where = ({"eid": [found[k] for k in nids[r].tolist()]} if query is UPDATE_STATS else
                         {"nid": nids[r].tolist(), "run": agg.run})
                tx.run(query, **where, **_lists(n_obs=s.n_obs[r], n_prompts=s.n_prompts[r], sum_act=s.sum_act[r],
                                                max_act=s.max_act[r]), **stat_list_params(acts, r))

    def _find_edges(self, tx: Tx, agg: WindowAggregate, ids: np.ndarray, candidates: tuple[np.ndarray, np.ndarray],
                    copy: RunEdges | None) -> tuple[dict[int, str], StoredLists]:
        """Element ids of the window's edges that are stored already, by key, and the evidence lists of
        those that candidate rows compete with (grouped by key), from ``copy`` or else read. Covers the
        edges of the window's evidence too (an import sends evidence without its edges)."""
        e, v = agg.edges, agg.evidence
        ends = (ids[e.src] >= 0) & (ids[e.dst] >= 0)  # an edge to a node not stored yet is new
        v_ends = (ids[v.src] >= 0) & (ids[v.dst] >= 0)
        keys = np.unique(np.concatenate([edge_key(ids[e.src], ids[e.dst], e.kind)[ends],
                                         edge_key(ids[v.src], ids[v.dst], v.kind)[v_ends]]))
        want = np.isin(keys, candidates[1])
        if copy is not None:
            return copy.found(keys), copy.lists(keys[want])
        found: dict[int, str] = {}
        stored: dict[int, list[list[Any]]] = {}
        for part in _chunks(len(keys)):
            for k, eid, lists in tx.run(FIND_EDGES, keys=keys[part].tolist(), lists=want[part].tolist(), run=agg.run):
                found[k] = eid
                if lists is not None:
                    stored[k] = lists
        return found, StoredLists.from_dict(stored)

    @staticmethod
    def _write_edges(tx: Tx, agg: WindowAggregate, ids: np.ndarray, found: dict[int, str],
                     merged: MergedLists) -> tuple[np.ndarray, np.ndarray]:
        """Add the window's edges: update the stored ones (``found``), create the rest with their
        evidence lists; returns the created edges' keys [a] and element ids [a]."""
        e, h, ro = agg.edges, agg.heads, agg.roles
        keys = edge_key(ids[e.src], ids[e.dst], e.kind)
        (heads,), offsets = _dense(keys, edge_key(ids[h.src], ids[h.dst], h.kind), h.head, h.sum)
        (role_n, role_abs), role_offsets = _dense(keys, edge_key(ids[ro.src], ids[ro.dst], ro.kind), ro.role,
                                                  ro.n, ro.sum_abs)
        kinds = np.array(EDGE_KINDS, dtype=object)[e.kind]
        old = np.array([k in found for k in keys.tolist()], dtype=bool)
        # each new edge's evidence list: its group's entries in merged (none if it has no group)
        group = _window_edge(agg, e.src, e.dst, e.kind)
        at = np.minimum(np.searchsorted(merged.group, group), max(len(merged.group) - 1, 0))
        has = (merged.group[at] == group) if len(merged.group) else np.zeros(len(group), bool)
        ev_start = np.where(has, merged.offsets[at], 0)
        ev_width = np.where(has, merged.offsets[np.minimum(at + 1, len(merged.offsets) - 1)] - ev_start, 0)
        cols = dict(n_prompts=e.n_prompts, n_obs=e.n_obs, sum=e.sum, sumsq=e.sumsq, sum_abs=e.sum_abs, min=e.min,
                    max=e.max, n_pos=e.n_pos)
        created: list[Any] = []
        for mask, query in ((old, UPDATE_EDGES), (~old, CREATE_EDGES)):
            rows = np.flatnonzero(mask)
            for part in _chunks(len(rows)):
                r = rows[part]
                extra = ({"eid": [found[k] for k in keys[r].tolist()]} if query is UPDATE_EDGES else
                         {"run": agg.run, **_lists(key=keys[r], src=ids[e.src[r]], dst=ids[e.dst[r]], kind=kinds[r]),
                          **_slices(dict(zip(LISTS, merged.columns, strict=True)), ev_start[r], ev_width[r], "eoff")})
                result = tx.run(query, _lists(**{c: v[r] for c, v in cols.items()}), **extra,
                                **_sub_lists({"heads": heads}, offsets, r, "hoff"),
                                **_sub_lists({"role_n": role_n, "role_abs": role_abs}, role_offsets, r, "roff"))
                if query is CREATE_EDGES:
                    created.append(result.single())
                else:
                    result.consume()
        return (np.array([k for keys, _ in created for k in keys], np.int64),
                np.array([eid for _, eids in created for eid in eids], dtype=object))

    def start_run(self, run_id: str, manifest: JSON, resume: bool) -> None:
        check_stored_run_name(run_id)
        def tx_fn(tx: Tx) -> None:
            # lock the Run node before reading it: a shard starting while another finishes keeps its counts
            rows = list(tx.run("MERGE (r:Run {run_id: $id}) ON CREATE SET r.__new = true SET r.__lock = true REMOVE r.__lock "
                               "WITH r, r.__new AS new REMOVE r.__new RETURN r.status, r.manifest, new", id=run_id))
            exists = not rows[0][2]
            if exists and not resume:
                raise StoreError(f"run {run_id!r} already exists in {self.url} (status {rows[0][0]}); pass --resume "
                                 "to continue it or choose another --run")
            new = manifest
            if exists:
                old = json.loads(rows[0][1])
                new = {**old, "resumed": old.get("resumed", 0) + 1}
            tx.run("MATCH (r:Run {run_id: $id}) SET r.status = 'running', r.manifest = $m", id=run_id,
                   m=json.dumps(new, sort_keys=True))

        with self.driver.session(database=self.database) as session:
            session.execute_write(tx_fn)

    def finish_run(self, run_id: str, status: str, updates: JSON) -> None:
        def tx_fn(tx: Tx) -> None:
            # lock the Run node before reading it, so shards finishing together keep each other's counts: a SET (a
            # REMOVE of a property the node lacks takes no lock; two shards' counts were lost so, one overwriting)
            rows = list(tx.run("MERGE (r:Run {run_id: $id}) SET r.__lock = true REMOVE r.__lock RETURN r.manifest",
                               id=run_id))
            old = json.loads(rows[0][0]) if rows and rows[0][0] else {}
            tx.run("MATCH (r:Run {run_id: $id}) SET r.status = $s, r.manifest = $m", id=run_id, s=status,
                   m=json.dumps({**old, **updates}, sort_keys=True))

        with self.driver.session(database=self.database) as session:
            session.execute_write(tx_fn)

    def put_mined(self, key: str, fingerprint: str, stamp: str, result: str) -> None:
        self.driver.execute_query("MERGE (m:Mined {key: $key}) SET m.fingerprint = $fingerprint, m.stamp = $stamp, "
                                  "m.result = $result", key=key, fingerprint=fingerprint, stamp=stamp, result=result,
                                  database_=self.database)


def _lists(**columns: Any) -> dict[str, list[Any]]:
    return {name: np.asarray(col).tolist() for name, col in columns.items()}

def stat_list_params(acts: StatLists, rows: np.ndarray) -> JSON:
    """Query parameters of the top-activation and histogram lists of statistics rows ``rows`` (offsets
    ``toff``, ``goff``)."""
    return {**_slices(acts.top, acts.top_start[rows], acts.top_width[rows], "toff"),
            **_slices(acts.hist, acts.hist_start[rows], acts.hist_width[rows], "goff"),
            "top_tokens": [acts.token_text[r] for r in np.asarray(rows).tolist()]}

def _chunks(n: int, size: int = CHUNK) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))

def _dense(edge_keys: np.ndarray, item_keys: np.ndarray, index: np.ndarray,
           *values: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-edge lists (per head, per role) as flat arrays plus offsets: edge i's list is
    flat[off[i]:off[i+1]], dense up to its largest index (0 where nothing contributed), empty for edges
    without items. ``item_keys`` [k]: the edge key of each item; ``index`` [k] its place in the list."""
    m = len(edge_keys)
    order = np.argsort(edge_keys)
    row = order[np.searchsorted(edge_keys, item_keys, sorter=order)] if len(item_keys) else np.zeros(0, np.int64)
    width = np.zeros(m, np.int64)
    np.maximum.at(width, row, index + 1)
    offsets = np.concatenate([[0], np.cumsum(width)])
    flats = []
    for v in values:
        flat = np.zeros(offsets[-1], v.dtype)
        np.add.at(flat, offsets[row] + index, v)
        flats.append(flat)
    return flats, offsets

def _sub_lists(flats: dict[str, np.ndarray], offsets: np.ndarray, rows: np.ndarray, offsets_name: str) -> JSON:
    """The lists of edges ``rows`` as query parameters: each flat array cut to them, and their offsets."""
    return _slices(flats, offsets[rows], offsets[rows + 1] - offsets[rows], offsets_name)

def _slices(flats: dict[str, np.ndarray], starts: np.ndarray, widths: np.ndarray, offsets_name: str) -> JSON:
    """Query parameters for one list per row: row i's list is flat[starts[i]:starts[i] + widths[i]] of
    each flat array; they travel concatenated, with their offsets."""
    take = spans(starts, widths)
    return {**{name: flat[take].tolist() for name, flat in flats.items()},
            offsets_name: np.concatenate([[0], np.cumsum(widths)]).tolist()}

def _window_edge(agg: WindowAggregate, src: np.ndarray, dst: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """[k] an edge's identity within a window, from its nodes' rows and kind (known before node ids are)."""
    identity: np.ndarray = (src.astype(np.int64) * len(agg.nodes) + dst) * len(EDGE_KINDS) + kind
    return identity

def _group_keys(agg: WindowAggregate, ids: np.ndarray, group: np.ndarray) -> np.ndarray:
    """[g] the catalog edge keys of _window_edge identities, once every node has its id."""
    pair, kind = np.divmod(group, len(EDGE_KINDS))
    src, dst = np.divmod(pair, len(agg.nodes))
    keys: np.ndarray = edge_key(ids[src], ids[dst], kind)
    return keys
