"""The production store: Neo4j over Bolt with the official driver.

Graph model: (:Node {nid, uid, model, sae, ref, kind, layer, index}) — features also carry the label
:Feature; ``nid`` is the node dictionary's integer id — joined by [:EDGE {key, kind, n_prompts, n_obs,
sum, sumsq, sum_abs, min, max, n_pos, head_sums}] (``key`` = catalog.schema.edge_key of the two nids
and the kind; head_sums: a list indexed by head). Evidence is (:Evidence {edge, prompt, src_pos,
dst_pos, head, value, absval}) with ``edge`` the edge's key; prompts are (:Prompt {uid, run, ...}),
runs (:Run). One window is one transaction: every query in it UNWINDs parallel arrays of primitives
(CHUNK rows each), nodes are found by their indexed integer nid, edges by their indexed integer key.
"""

from __future__ import annotations

import json
from typing import Iterator

import numpy as np

from catalog.aggregate import EvidenceFloor, WindowAggregate
from catalog.schema import (EDGE_KINDS, NODE_ID_LIMIT, EdgeDelta, Evidence, NodeInfo, NodeStats, Prompt, Run,
                            edge_key)
from catalog.stores.base import CypherRefused, EdgeQuery, StoreError, StoreUnavailable

SCHEMA = [
    "CREATE CONSTRAINT node_uid IF NOT EXISTS FOR (n:Node) REQUIRE n.uid IS UNIQUE",
    "CREATE CONSTRAINT node_nid IF NOT EXISTS FOR (n:Node) REQUIRE n.nid IS UNIQUE",
    "CREATE CONSTRAINT prompt_uid IF NOT EXISTS FOR (p:Prompt) REQUIRE p.uid IS UNIQUE",
    "CREATE CONSTRAINT run_id IF NOT EXISTS FOR (r:Run) REQUIRE r.run_id IS UNIQUE",
    "CREATE CONSTRAINT dictionary_name IF NOT EXISTS FOR (d:Dictionary) REQUIRE d.name IS UNIQUE",
    "CREATE INDEX node_ref IF NOT EXISTS FOR (n:Node) ON (n.ref)",
    "CREATE INDEX prompt_run IF NOT EXISTS FOR (p:Prompt) ON (p.run)",
    "CREATE INDEX evidence_edge IF NOT EXISTS FOR (e:Evidence) ON (e.edge)",
    "CREATE INDEX evidence_prompt IF NOT EXISTS FOR (e:Evidence) ON (e.prompt)",
    "CREATE INDEX edge_key IF NOT EXISTS FOR ()-[r:EDGE]-() ON (r.key)",
]
CHUNK = 20_000  # rows per UNWIND query
METRIC = {"sum": "r.sum", "mean": "r.sum / r.n_obs", "count": "r.n_prompts", "abs": "abs(r.sum)"}
NODE_RET = "{a}.uid, {a}.model, {a}.sae, {a}.ref, {a}.kind, {a}.layer, {a}.index"
EDGE_RET = "r.kind, r.n_prompts, r.n_obs, r.sum, r.sumsq, r.sum_abs, r.min, r.max, r.n_pos, r.head_sums"
EVIDENCE_ORDER = "x.absval DESC, x.prompt, x.src_pos, x.dst_pos, x.head"

# Every writer takes this lock first, so windows of concurrent shards apply one after another: an
# edge is never created twice, and node ids are handed out in one sequence. (REMOVE of a property
# the node never has takes its write lock without changing it.)
LOCK = "MERGE (d:Dictionary {name: 'nodes'}) ON CREATE SET d.next = 0 REMOVE d.__lock RETURN d.next"
CREATE_NODES = """
UNWIND range(0, size($uid) - 1) AS i
CREATE (n:Node {nid: $base + i, uid: $uid[i], model: $model[i], sae: $sae[i], ref: $ref[i], kind: $kind[i],
                layer: $layer[i], index: $index[i]})
WITH n, i WHERE $feature[i] SET n:Feature
"""
UPDATE_EDGES = """
UNWIND range(0, size($key) - 1) AS i
MATCH ()-[r:EDGE {key: $key[i]}]->()
WITH r, i, $heads[$hoff[i]..$hoff[i + 1]] AS h
SET r.n_prompts = r.n_prompts + $n_prompts[i], r.n_obs = r.n_obs + $n_obs[i], r.sum = r.sum + $sum[i],
    r.sumsq = r.sumsq + $sumsq[i], r.sum_abs = r.sum_abs + $sum_abs[i], r.n_pos = r.n_pos + $n_pos[i],
    r.min = CASE WHEN $min[i] < r.min THEN $min[i] ELSE r.min END,
    r.max = CASE WHEN $max[i] > r.max THEN $max[i] ELSE r.max END,
    r.head_sums = [j IN range(0, CASE WHEN size(r.head_sums) > size(h) THEN size(r.head_sums) ELSE size(h) END - 1)
                   | coalesce(r.head_sums[j], 0.0) + coalesce(h[j], 0.0)]
RETURN $key[i]
"""
CREATE_EDGES = """
UNWIND range(0, size($key) - 1) AS i
MATCH (s:Node {nid: $src[i]})
MATCH (d:Node {nid: $dst[i]})
CREATE (s)-[:EDGE {key: $key[i], kind: $kind[i], n_prompts: $n_prompts[i], n_obs: $n_obs[i], sum: $sum[i],
                   sumsq: $sumsq[i], sum_abs: $sum_abs[i], min: $min[i], max: $max[i], n_pos: $n_pos[i],
                   head_sums: $heads[$hoff[i]..$hoff[i + 1]]}]->(d)
"""
WRITE_STATS = """
UNWIND range(0, size($node) - 1) AS i
MATCH (x:Node {nid: $node[i]})
SET x.n_obs = coalesce(x.n_obs, 0) + $n_obs[i], x.n_prompts = coalesce(x.n_prompts, 0) + $n_prompts[i],
    x.sum_act = coalesce(x.sum_act, 0.0) + $sum_act[i],
    x.max_act = CASE WHEN x.max_act IS NULL OR $max_act[i] > x.max_act THEN $max_act[i] ELSE x.max_act END
"""
CREATE_EVIDENCE = """
UNWIND range(0, size($edge) - 1) AS i
CREATE (:Evidence {edge: $edge[i], prompt: $prompt[i], src_pos: $src_pos[i], dst_pos: $dst_pos[i], head: $head[i],
                   value: $value[i], absval: abs($value[i])})
"""
TRIM_EVIDENCE = f"""
UNWIND $keys AS k
MATCH (x:Evidence {{edge: k}})
WITH k, x ORDER BY {EVIDENCE_ORDER}
WITH k, collect(x) AS xs
UNWIND xs[$n..] AS gone
DELETE gone
"""


def _lists(**columns) -> dict[str, list]:
    return {name: np.asarray(col).tolist() for name, col in columns.items()}


def _chunks(n: int):
    for i in range(0, n, CHUNK):
        yield slice(i, min(i + CHUNK, n))


class Neo4jStore:
    def __init__(self, bolt: str, user: str | None, password: str | None, database: str, *, url: str,
                 evidence_per_edge: int | None):
        import neo4j

        self.url, self.database, self.evidence_per_edge = url, database, evidence_per_edge
        self._ids: dict[str, int] = {}  # node uid -> dictionary id, for nodes committed by this process
        self._floor = EvidenceFloor(evidence_per_edge)
        self._stored_evidence: tuple[np.ndarray, np.ndarray] | None = None  # rows of the open write
        auth = (user, password or "") if user else None
        try:
            # notifications off: the server warns about absent property keys on every query of an empty catalog
            self.driver = neo4j.GraphDatabase.driver(bolt, auth=auth, connection_timeout=10,
                                                     notifications_min_severity="OFF")
            self.driver.verify_connectivity()
            for stmt in SCHEMA:
                self.driver.execute_query(stmt, database_=database)
        except Exception as exc:  # driver raises ServiceUnavailable, AuthError, ...; all mean "cannot use it"
            raise StoreUnavailable(f"cannot reach Neo4j at {bolt} (database {database}): {type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else ''}") from None

    def close(self) -> None:
        self.driver.close()

    def _read(self, query: str, **params) -> list:
        return self.driver.execute_query(query, params, database_=self.database, routing_="r").records

    # ---- writes -------------------------------------------------------------------------------
    def write_window(self, agg: WindowAggregate) -> bool:
        """Store a window in one transaction; False if every prompt was stored already."""
        with self.driver.session(database=self.database) as session:
            done = session.execute_write(self._window_tx, agg, True)
        if done is None:
            return False
        self._ids.update(done)  # only once committed: a rolled-back id may be handed out again
        self._floor.update(*self._stored_evidence)
        return True

    def import_window(self, agg: WindowAggregate) -> None:
        """Bulk-load an exported catalog's rows (into an empty catalog: no prompt claim, no trim)."""
        with self.driver.session(database=self.database) as session:
            self._ids.update(session.execute_write(self._window_tx, agg, False))

    def import_runs(self, runs: list[Run]) -> None:
        self.driver.execute_query(
            "UNWIND $rows AS r MERGE (x:Run {run_id: r.run_id}) SET x.status = r.status, x.manifest = r.manifest",
            rows=[{"run_id": r.run_id, "status": r.status, "manifest": json.dumps(r.manifest, sort_keys=True)}
                  for r in runs], database_=self.database)

    def _window_tx(self, tx, agg: WindowAggregate, ingest: bool) -> dict[str, int] | None:
        next_id = tx.run(LOCK).single()[0]
        if ingest:
            if not self._claim_prompts(tx, agg):
                return None
        else:
            tx.run("UNWIND $rows AS p MERGE (x:Prompt {uid: p.uid}) SET x = p",
                   rows=[self._prompt_props(p) for p in agg.prompts])
        ids, new = self._node_ids(tx, agg.nodes, next_id)
        self._write_stats(tx, agg, ids)
        existing = self._write_edges(tx, agg, ids)
        self._write_evidence(tx, agg, ids, existing if ingest else None)
        return new

    def _write_evidence(self, tx, agg: WindowAggregate, ids: np.ndarray, existing: np.ndarray | None) -> None:
        """Create the window's evidence, then cut edges back to the per-edge cap: those in ``existing``
        (stored before), or every touched edge when the window kept more than the cap. None: no cut."""
        v = agg.evidence
        prompt_uids = np.array([p.uid for p in agg.prompts] or [""], dtype=object)
        keys = edge_key(ids[v.src], ids[v.dst], v.kind)
        keep = self._floor.keep(keys, np.abs(v.value)) if existing is not None else np.ones(len(keys), bool)
        keys, prompt, src_pos, dst_pos, head, value = (
            keys[keep], v.prompt[keep], v.src_pos[keep], v.dst_pos[keep], v.head[keep], v.value[keep])
        for part in _chunks(len(keys)):
            tx.run(CREATE_EVIDENCE, _lists(edge=keys[part], prompt=prompt_uids[prompt[part]], src_pos=src_pos[part],
                                           dst_pos=dst_pos[part], head=head[part], value=value[part]))
        self._stored_evidence = (keys, np.abs(value))
        cap = self.evidence_per_edge
        if existing is not None and cap is not None and len(keys):
            touched = np.unique(keys)
            every = agg.evidence_cap is None or agg.evidence_cap > cap
            # new edges hold at most the cap already; stored ones only overflow where rows were added
            trim = touched if every else np.intersect1d(existing, touched)
            for part in _chunks(len(trim)):
                tx.run(TRIM_EVIDENCE, keys=trim[part].tolist(), n=cap)

    def _claim_prompts(self, tx, agg: WindowAggregate) -> bool:
        uids = [p.uid for p in agg.prompts]
        have = {r[0] for r in tx.run("MATCH (p:Prompt) WHERE p.uid IN $uids RETURN p.uid", uids=uids)}
        if have and len(have) == len(set(uids)):
            return False
        if have:
            raise StoreError(f"window overlaps {len(have)} prompts already stored for run {agg.run} "
                             "(resume filters stored prompts before batching)")
        tx.run("UNWIND $rows AS p CREATE (x:Prompt) SET x = p", rows=[self._prompt_props(p) for p in agg.prompts])
        return True

    @staticmethod
    def _prompt_props(p: Prompt) -> dict:
        return {"uid": p.uid, "run": p.run, "prompt_id": p.prompt_id, "text": p.text, "tokens": p.tokens,
                "corpus": p.corpus, "content_hash": p.content_hash, "meta": json.dumps(p.meta, sort_keys=True)}

    def _node_ids(self, tx, nodes: list[NodeInfo], next_id: int) -> tuple[np.ndarray, dict[str, int]]:
        """Dictionary ids of ``nodes`` (created where missing, under the lock), and the uncached ones."""
        missing = [n.uid for n in nodes if n.uid not in self._ids]
        found = {r[0]: r[1] for r in tx.run("UNWIND $uids AS u MATCH (n:Node {uid: u}) RETURN u, n.nid",
                                            uids=missing)} if missing else {}
        create = [n for n in nodes if n.uid not in self._ids and n.uid not in found]
        if create:
            if next_id + len(create) > NODE_ID_LIMIT:
                raise StoreError(f"node dictionary of {self.url} is full ({NODE_ID_LIMIT} nodes)")
            tx.run(CREATE_NODES, base=next_id, uid=[n.uid for n in create], model=[n.model for n in create],
                   sae=[n.sae for n in create], ref=[n.ref for n in create], kind=[n.kind for n in create],
                   layer=[n.layer for n in create], index=[n.index for n in create],
                   feature=[n.is_feature for n in create])
            tx.run("MATCH (d:Dictionary {name: 'nodes'}) SET d.next = d.next + $k", k=len(create))
            found.update({n.uid: next_id + i for i, n in enumerate(create)})
        ids = np.array([self._ids.get(n.uid, found.get(n.uid, -1)) for n in nodes], dtype=np.int64)
        return ids, found

    @staticmethod
    def _write_stats(tx, agg: WindowAggregate, ids: np.ndarray) -> None:
        s = agg.stats
        for part in _chunks(len(s)):
            tx.run(WRITE_STATS, _lists(node=ids[s.node[part]], n_obs=s.n_obs[part], n_prompts=s.n_prompts[part],
                                       sum_act=s.sum_act[part], max_act=s.max_act[part]))

    @staticmethod
    def _write_edges(tx, agg: WindowAggregate, ids: np.ndarray) -> np.ndarray:
        """Add the window's edges: update the stored ones, create the rest. Returns the keys that
        existed before (only their evidence can exceed the per-edge cap)."""
        e, h = agg.edges, agg.heads
        keys = edge_key(ids[e.src], ids[e.dst], e.kind)
        heads, offsets = _dense_heads(keys, edge_key(ids[h.src], ids[h.dst], h.kind), h.head, h.sum)
        kinds = np.array(EDGE_KINDS, dtype=object)[e.kind]
        existing = []
        for part in _chunks(len(e)):
            cols = dict(key=keys[part], n_prompts=e.n_prompts[part], n_obs=e.n_obs[part], sum=e.sum[part],
                        sumsq=e.sumsq[part], sum_abs=e.sum_abs[part], min=e.min[part], max=e.max[part],
                        n_pos=e.n_pos[part])
            lo, hi = offsets[part.start], offsets[part.stop]
            hcols = dict(heads=heads[lo:hi].tolist(), hoff=(offsets[part.start:part.stop + 1] - lo).tolist())
            updated = np.array([r[0] for r in tx.run(UPDATE_EDGES, _lists(**cols), **hcols)], dtype=np.int64)
            new = ~np.isin(keys[part], updated)
            if new.any():
                lo_rows = np.nonzero(new)[0] + part.start
                tx.run(CREATE_EDGES, _lists(**{k: v[new] for k, v in cols.items()}, src=ids[e.src[lo_rows]],
                                            dst=ids[e.dst[lo_rows]], kind=kinds[lo_rows]),
                       **_sub_heads(heads, offsets, lo_rows))
            existing.append(updated)
        return np.concatenate(existing) if existing else np.zeros(0, np.int64)

    def start_run(self, run_id: str, manifest: dict, resume: bool) -> None:
        rows = self._read("MATCH (r:Run {run_id: $id}) RETURN r.status, r.manifest", id=run_id)
        if rows and not resume:
            raise StoreError(f"run {run_id!r} already exists in {self.url} (status {rows[0][0]}); pass --resume to "
                             "continue it or choose another --run")
        if rows:
            old = json.loads(rows[0][1])
            manifest = {**old, "resumed": old.get("resumed", 0) + 1}
        self.driver.execute_query("MERGE (r:Run {run_id: $id}) SET r.status = 'running', r.manifest = $m",
                                  id=run_id, m=json.dumps(manifest, sort_keys=True), database_=self.database)

    def finish_run(self, run_id: str, status: str, updates: dict) -> None:
        def tx_fn(tx):
            # lock the Run node before reading it, so shards finishing together keep each other's counts
            rows = list(tx.run("MERGE (r:Run {run_id: $id}) REMOVE r.__lock RETURN r.manifest", id=run_id))
            old = json.loads(rows[0][0]) if rows and rows[0][0] else {}
            tx.run("MATCH (r:Run {run_id: $id}) SET r.status = $s, r.manifest = $m", id=run_id, s=status,
                   m=json.dumps({**old, **updates}, sort_keys=True))

        with self.driver.session(database=self.database) as session:
            session.execute_write(tx_fn)

    # ---- reads --------------------------------------------------------------------------------
    def done_prompts(self, run: str) -> set[str]:
        return {r[0] for r in self._read("MATCH (p:Prompt {run: $run}) RETURN p.prompt_id", run=run)}

    def runs(self) -> list[Run]:
        return [Run(r[0], r[1], json.loads(r[2])) for r in
                self._read("MATCH (r:Run) RETURN r.run_id, r.status, r.manifest ORDER BY r.run_id")]

    def run(self, run_id: str) -> Run | None:
        rows = self._read("MATCH (r:Run {run_id: $id}) RETURN r.run_id, r.status, r.manifest", id=run_id)
        return Run(rows[0][0], rows[0][1], json.loads(rows[0][2])) if rows else None

    def find_nodes(self, ref: str, model: str | None = None) -> list[NodeInfo]:
        rows = self._read(f"MATCH (n:Node {{ref: $ref}}) WHERE $model IS NULL OR n.model = $model "
                          f"RETURN {NODE_RET.format(a='n')} ORDER BY n.uid", ref=ref, model=model)
        return [NodeInfo(*r) for r in rows]

    def node(self, uid: str):
        rows = self._read(f"MATCH (n:Node {{uid: $uid}}) RETURN {NODE_RET.format(a='n')}, n.n_obs, n.n_prompts, "
                          "n.sum_act, n.max_act", uid=uid)
        if not rows:
            return None
        r = rows[0]
        return NodeInfo(*r[:7]), (NodeStats(uid, *r[7:]) if r[7] is not None else None)

    @staticmethod
    def _delta(src: str, dst: str, r) -> EdgeDelta:
        heads = {h: v for h, v in enumerate(r[9] or []) if v != 0.0}
        return EdgeDelta(src, dst, *r[:9], heads)

    def neighbours(self, uid: str, direction: str, q: EdgeQuery):
        pattern = "(o:Node)-[r:EDGE]->(t:Node {uid: $uid})" if direction == "up" else \
            "(t:Node {uid: $uid})-[r:EDGE]->(o:Node)"
        rows = self._read(
            f"MATCH {pattern} WHERE r.n_prompts >= $min_count AND ($ek IS NULL OR r.kind IN $ek) "
            "AND ($nk IS NULL OR o.kind IN $nk) AND ($layers IS NULL OR o.layer IN $layers) "
            f"RETURN {NODE_RET.format(a='o')}, {EDGE_RET} ORDER BY {METRIC[q.order]} DESC, o.uid, r.kind "
            "SKIP $offset LIMIT $limit", uid=uid, min_count=q.min_count,
            ek=list(q.edge_kinds) if q.edge_kinds else None, nk=list(q.node_kinds) if q.node_kinds else None,
            layers=list(q.layers) if q.layers else None, offset=q.offset, limit=q.limit)
        out = []
        for r in rows:
            node = NodeInfo(*r[:7])
            src, dst = (node.uid, uid) if direction == "up" else (uid, node.uid)
            out.append((node, self._delta(src, dst, r[7:])))
        return out

    def edges_between(self, src: str, dst: str) -> list[EdgeDelta]:
        rows = self._read(f"MATCH (:Node {{uid: $s}})-[r:EDGE]->(:Node {{uid: $d}}) RETURN {EDGE_RET} ORDER BY r.kind",
                          s=src, d=dst)
        return [self._delta(src, dst, r) for r in rows]

    def evidence(self, src: str, dst: str, kind: str, limit: int) -> list[Evidence]:
        rows = self._read(f"MATCH (:Node {{uid: $s}})-[r:EDGE {{kind: $kind}}]->(:Node {{uid: $d}}) "
                          f"MATCH (x:Evidence {{edge: r.key}}) RETURN x.prompt, x.src_pos, x.dst_pos, x.head, x.value "
                          f"ORDER BY {EVIDENCE_ORDER} LIMIT $limit", s=src, d=dst, kind=kind, limit=limit)
        return [Evidence(src, dst, kind, p, sp, dp, None if h < 0 else h, v) for p, sp, dp, h, v in rows]

    @staticmethod
    def _prompt(r) -> Prompt:
        return Prompt(r["uid"], r["run"], r["prompt_id"], r["text"], list(r["tokens"]), r["corpus"],
                      r["content_hash"], json.loads(r["meta"]))

    def prompt(self, uid: str) -> Prompt | None:
        rows = self._read("MATCH (p:Prompt {uid: $uid}) RETURN p", uid=uid)
        return self._prompt(rows[0][0]) if rows else None

    def prompts(self, uids: list[str]) -> dict[str, Prompt]:
        rows = self._read("MATCH (p:Prompt) WHERE p.uid IN $uids RETURN p", uids=sorted(set(uids)))
        return {r[0]["uid"]: self._prompt(r[0]) for r in rows}

    def prompt_evidence(self, uid: str, limit: int) -> list[Evidence]:
        rows = self._read("MATCH (x:Evidence {prompt: $uid}) MATCH (s:Node)-[r:EDGE {key: x.edge}]->(d:Node) "
                          "RETURN s.uid, d.uid, r.kind, x.src_pos, x.dst_pos, x.head, x.value "
                          "ORDER BY x.absval DESC, s.uid, d.uid, r.kind, x.src_pos, x.dst_pos, x.head LIMIT $limit",
                          uid=uid, limit=limit)
        return [Evidence(s, d, k, uid, sp, dp, None if h < 0 else h, v) for s, d, k, sp, dp, h, v in rows]

    def top_nodes(self, node_kind: str | None, by: str, limit: int):
        metric = {"degree": "degree", "total": "total"}[by]
        rows = self._read(
            "MATCH (n:Node) WHERE $kind IS NULL OR n.kind = $kind "
            "MATCH (n)-[r:EDGE]-() WITH n, sum(abs(r.sum)) AS total, count(r) AS degree "
            f"RETURN {NODE_RET.format(a='n')}, total, degree ORDER BY {metric} DESC, n.uid LIMIT $limit",
            kind=node_kind, limit=limit)
        return [(NodeInfo(*r[:7]), r[7], r[8]) for r in rows]

    # ---- bulk (export) ------------------------------------------------------------------------
    def all_edges(self, edge_kinds=None) -> Iterator[EdgeDelta]:
        with self.driver.session(database=self.database, default_access_mode="READ") as s:
            for r in s.run(f"MATCH (a:Node)-[r:EDGE]->(b:Node) WHERE $ek IS NULL OR r.kind IN $ek "
                           f"RETURN a.uid, b.uid, {EDGE_RET}", ek=list(edge_kinds) if edge_kinds else None):
                yield self._delta(r[0], r[1], r[2:])

    def all_nodes(self):
        with self.driver.session(database=self.database, default_access_mode="READ") as s:
            for r in s.run(f"MATCH (n:Node) RETURN {NODE_RET.format(a='n')}, n.n_obs, n.n_prompts, n.sum_act, n.max_act"):
                yield NodeInfo(*r[:7]), (NodeStats(r[0], *r[7:]) if r[7] is not None else None)

    def all_prompts(self) -> Iterator[Prompt]:
        with self.driver.session(database=self.database, default_access_mode="READ") as s:
            for r in s.run("MATCH (p:Prompt) RETURN p ORDER BY p.uid"):
                yield self._prompt(r[0])

    def all_evidence(self) -> Iterator[Evidence]:
        with self.driver.session(database=self.database, default_access_mode="READ") as s:
            for r in s.run("MATCH (x:Evidence) MATCH (a:Node)-[r:EDGE {key: x.edge}]->(b:Node) "
                           "RETURN a.uid, b.uid, r.kind, x.prompt, x.src_pos, x.dst_pos, x.head, x.value"):
                yield Evidence(r[0], r[1], r[2], r[3], r[4], r[5], None if r[6] < 0 else r[6], r[7])

    # ---- Cypher passthrough (read-only) -------------------------------------------------------
    def cypher(self, query: str, params: dict, limit: int, timeout_s: float) -> list[dict]:
        from catalog.cypher import run_read_only

        return run_read_only(self.driver, self.database, query, params, limit, timeout_s)


__all__ = ["Neo4jStore", "CypherRefused"]


def _dense_heads(edge_keys: np.ndarray, head_keys: np.ndarray, head: np.ndarray, sums: np.ndarray):
    """Per-head sums as one flat array plus offsets: edge i's list is flat[off[i]:off[i+1]], dense up to
    its largest head (0.0 where a head never contributed), empty for edges without heads."""
    m = len(edge_keys)
    order = np.argsort(edge_keys)
    row = order[np.searchsorted(edge_keys, head_keys, sorter=order)] if len(head_keys) else np.zeros(0, np.int64)
    width = np.zeros(m, np.int64)
    np.maximum.at(width, row, head + 1)
    offsets = np.concatenate([[0], np.cumsum(width)])
    flat = np.zeros(offsets[-1], np.float64)
    np.add.at(flat, offsets[row] + head, sums)
    return flat, offsets


def _sub_heads(flat: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> dict:
    widths = offsets[rows + 1] - offsets[rows]
    starts = np.cumsum(widths) - widths
    take = np.repeat(offsets[rows], widths) + np.arange(widths.sum()) - np.repeat(starts, widths)
    return {"heads": flat[take].tolist(), "hoff": np.concatenate([[0], np.cumsum(widths)]).tolist()}
