"""The production store: Neo4j over Bolt with the official driver.

Graph model: (:Node {uid, model, release, ref, kind, layer, index}) — features also carry the
label :Feature — joined by [:EDGE {key, kind, n_prompts, n_obs, sum, sumsq, sum_abs, min, max,
n_pos, head_sums}] (head_sums: a list indexed by head). Evidence is (:Evidence {edge_key, prompt,
src_pos, dst_pos, head, value, absval}), prompts are (:Prompt {uid, run, ...}), runs (:Run).
Writes go through batched UNWIND inside execute_write: one transaction per Batch (whole prompts).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Iterator

from catalog.schema import Batch, EdgeDelta, Evidence, NodeInfo, NodeStats, Prompt, Run
from catalog.stores.base import CypherRefused, EdgeQuery, StoreError, StoreUnavailable

SCHEMA = [
    "CREATE CONSTRAINT node_uid IF NOT EXISTS FOR (n:Node) REQUIRE n.uid IS UNIQUE",
    "CREATE CONSTRAINT prompt_uid IF NOT EXISTS FOR (p:Prompt) REQUIRE p.uid IS UNIQUE",
    "CREATE CONSTRAINT run_id IF NOT EXISTS FOR (r:Run) REQUIRE r.run_id IS UNIQUE",
    "CREATE INDEX node_ref IF NOT EXISTS FOR (n:Node) ON (n.ref)",
    "CREATE INDEX prompt_run IF NOT EXISTS FOR (p:Prompt) ON (p.run)",
    "CREATE INDEX evidence_edge IF NOT EXISTS FOR (e:Evidence) ON (e.edge_key)",
    "CREATE INDEX evidence_prompt IF NOT EXISTS FOR (e:Evidence) ON (e.prompt)",
    "CREATE INDEX edge_key IF NOT EXISTS FOR ()-[r:EDGE]-() ON (r.key)",
]
METRIC = {"sum": "r.sum", "mean": "r.sum / r.n_obs", "count": "r.n_prompts", "abs": "abs(r.sum)"}
NODE_RET = "{a}.uid, {a}.model, {a}.release, {a}.ref, {a}.kind, {a}.layer, {a}.index"
EDGE_RET = "r.kind, r.n_prompts, r.n_obs, r.sum, r.sumsq, r.sum_abs, r.min, r.max, r.n_pos, r.head_sums"
EVIDENCE_ORDER = "x.absval DESC, x.prompt, x.src_pos, x.dst_pos, x.head"

WRITE_EDGES = """
UNWIND $rows AS e
MATCH (d:Node {uid: e.dst})
REMOVE d.__lock
WITH e, d
OPTIONAL MATCH ()-[r:EDGE {key: e.key}]->()
FOREACH (_ IN CASE WHEN r IS NULL THEN [] ELSE [1] END |
  SET r.n_prompts = r.n_prompts + e.n_prompts, r.n_obs = r.n_obs + e.n_obs, r.sum = r.sum + e.sum,
      r.sumsq = r.sumsq + e.sumsq, r.sum_abs = r.sum_abs + e.sum_abs, r.n_pos = r.n_pos + e.n_pos,
      r.min = CASE WHEN e.min < r.min THEN e.min ELSE r.min END,
      r.max = CASE WHEN e.max > r.max THEN e.max ELSE r.max END,
      r.head_sums = [i IN range(0, CASE WHEN size(r.head_sums) > size(e.heads) THEN size(r.head_sums)
                     ELSE size(e.heads) END - 1) | coalesce(r.head_sums[i], 0.0) + coalesce(e.heads[i], 0.0)])
WITH e, d, r
OPTIONAL MATCH (s:Node {uid: e.src}) WHERE r IS NULL
FOREACH (_ IN CASE WHEN r IS NULL THEN [1] ELSE [] END |
  CREATE (s)-[:EDGE {key: e.key, kind: e.kind, n_prompts: e.n_prompts, n_obs: e.n_obs, sum: e.sum, sumsq: e.sumsq,
                     sum_abs: e.sum_abs, min: e.min, max: e.max, n_pos: e.n_pos, head_sums: e.heads}]->(d))
WITH e, r WHERE r IS NOT NULL
RETURN e.key
"""
# Why not MERGE (s)-[r:EDGE {key}]->(d): between two hub nodes MERGE expands their relationships
# (O(degree) per row). The key index seeks the edge directly; REMOVE on a property the target never
# has takes its write lock without changing it, so concurrent writers (shards) cannot both create
# the same edge. It returns the keys that existed already (read under that lock): only their evidence
# can exceed the per-edge cap, since a batch brings at most the cap per edge.
TRIM_EVIDENCE = f"""
UNWIND $keys AS k
MATCH (x:Evidence {{edge_key: k}})
WITH k, x ORDER BY {EVIDENCE_ORDER}
WITH k, collect(x) AS xs
UNWIND xs[$n..] AS gone
DELETE gone
"""


def _dense_heads(head_sums: dict[int, float]) -> list[float]:
    if not head_sums:
        return []
    out = [0.0] * (max(head_sums) + 1)
    for h, v in head_sums.items():
        out[h] = v
    return out


class Neo4jStore:
    def __init__(self, bolt: str, user: str | None, password: str | None, database: str, *, url: str,
                 evidence_per_edge: int | None):
        import neo4j

        self.url, self.database, self.evidence_per_edge = url, database, evidence_per_edge
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
    def write_batch(self, batch: Batch) -> bool:
        with self.driver.session(database=self.database) as session:
            return session.execute_write(self._write_tx, batch)

    def _write_tx(self, tx, batch: Batch) -> bool:
        uids = [p.uid for p in batch.prompts]
        have = {r[0] for r in tx.run("MATCH (p:Prompt) WHERE p.uid IN $uids RETURN p.uid", uids=uids)}
        if have and len(have) == len(set(uids)):
            return False
        if have:
            raise StoreError(f"batch overlaps {len(have)} prompts already stored for run {batch.run} "
                             "(resume filters stored prompts before batching)")
        tx.run("UNWIND $rows AS p CREATE (x:Prompt) SET x = p", rows=[self._prompt_props(p) for p in batch.prompts])
        self._write_nodes(tx, batch.nodes)
        self._write_stats(tx, batch.node_stats)
        existing = self._write_edges(tx, batch.edges)
        per_key = Counter(v.edge_key for v in batch.evidence)
        over = {k for k, n in per_key.items() if self.evidence_per_edge is not None and n > self.evidence_per_edge}
        self._write_evidence(tx, batch.evidence, trim_keys=(existing & per_key.keys()) | over)
        return True

    @staticmethod
    def _prompt_props(p: Prompt) -> dict:
        return {"uid": p.uid, "run": p.run, "prompt_id": p.prompt_id, "text": p.text, "tokens": p.tokens,
                "corpus": p.corpus, "content_hash": p.content_hash, "meta": json.dumps(p.meta, sort_keys=True)}

    @staticmethod
    def _write_nodes(tx, nodes: list[NodeInfo]) -> None:
        for feature in (True, False):
            rows = [{"uid": n.uid, "model": n.model, "release": n.release, "ref": n.ref, "kind": n.kind,
                     "layer": n.layer, "index": n.index} for n in nodes if n.is_feature == feature]
            label = "SET x:Feature" if feature else ""
            for i in range(0, len(rows), 10000):
                tx.run(f"UNWIND $rows AS n MERGE (x:Node {{uid: n.uid}}) ON CREATE SET x += n {label}",
                       rows=rows[i:i + 10000])

    @staticmethod
    def _write_stats(tx, stats: list[NodeStats]) -> None:
        rows = [{"uid": s.uid, "n_obs": s.n_obs, "n_prompts": s.n_prompts, "sum_act": s.sum_act, "max_act": s.max_act}
                for s in stats]
        tx.run("UNWIND $rows AS s MATCH (x:Node {uid: s.uid}) SET x.n_obs = coalesce(x.n_obs, 0) + s.n_obs, "
               "x.n_prompts = coalesce(x.n_prompts, 0) + s.n_prompts, x.sum_act = coalesce(x.sum_act, 0.0) + s.sum_act, "
               "x.max_act = CASE WHEN x.max_act IS NULL OR s.max_act > x.max_act THEN s.max_act ELSE x.max_act END",
               rows=rows)

    @staticmethod
    def _write_edges(tx, edges: list[EdgeDelta]) -> set[str]:
        """Add the deltas; returns the keys of edges that were stored before."""
        rows = [{"key": e.key, "src": e.src, "dst": e.dst, "kind": e.kind, "n_prompts": e.n_prompts, "n_obs": e.n_obs,
                 "sum": e.sum, "sumsq": e.sumsq, "sum_abs": e.sum_abs, "min": e.min, "max": e.max, "n_pos": e.n_pos,
                 "heads": _dense_heads(e.head_sums)} for e in edges]
        existing: set[str] = set()
        for i in range(0, len(rows), 10000):
            existing.update(r[0] for r in tx.run(WRITE_EDGES, rows=rows[i:i + 10000]))
        return existing

    def _write_evidence(self, tx, evidence: list[Evidence], trim_keys: set[str]) -> None:
        """Create evidence nodes, then cut the edges in ``trim_keys`` back to the per-edge cap."""
        rows = [{"edge_key": v.edge_key, "prompt": v.prompt, "src_pos": v.src_pos, "dst_pos": v.dst_pos,
                 "head": -1 if v.head is None else v.head, "value": v.value, "absval": abs(v.value)} for v in evidence]
        for i in range(0, len(rows), 10000):
            tx.run("UNWIND $rows AS v CREATE (x:Evidence) SET x = v", rows=rows[i:i + 10000])
        if trim_keys and self.evidence_per_edge is not None:
            keys = sorted(trim_keys)
            for i in range(0, len(keys), 5000):
                tx.run(TRIM_EVIDENCE, keys=keys[i:i + 5000], n=self.evidence_per_edge)

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
        key = f"{src}>{dst}>{kind}"
        rows = self._read(f"MATCH (x:Evidence {{edge_key: $k}}) RETURN x.prompt, x.src_pos, x.dst_pos, x.head, x.value "
                          f"ORDER BY {EVIDENCE_ORDER} LIMIT $limit", k=key, limit=limit)
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
        rows = self._read("MATCH (x:Evidence {prompt: $uid}) WITH x, split(x.edge_key, '>') AS k "
                          "RETURN k[0], k[1], k[2], x.src_pos, x.dst_pos, x.head, x.value "
                          "ORDER BY x.absval DESC, k[0], k[1], k[2], x.src_pos, x.dst_pos, x.head LIMIT $limit",
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
            for r in s.run("MATCH (x:Evidence) RETURN x.edge_key, x.prompt, x.src_pos, x.dst_pos, x.head, x.value"):
                src, dst, kind = r[0].split(">")
                yield Evidence(src, dst, kind, r[1], r[2], r[3], None if r[4] < 0 else r[4], r[5])

    def import_rows(self, nodes, stats, edges, evidence, prompts, runs) -> None:
        def tx_fn(tx):
            self._write_nodes(tx, nodes)
            self._write_stats(tx, stats)
            self._write_edges(tx, edges)
            self._write_evidence(tx, evidence, trim_keys=set())
            tx.run("UNWIND $rows AS p MERGE (x:Prompt {uid: p.uid}) SET x = p",
                   rows=[self._prompt_props(p) for p in prompts])
            tx.run("UNWIND $rows AS r MERGE (x:Run {run_id: r.run_id}) SET x.status = r.status, x.manifest = r.manifest",
                   rows=[{"run_id": r.run_id, "status": r.status, "manifest": json.dumps(r.manifest, sort_keys=True)}
                         for r in runs])

        with self.driver.session(database=self.database) as session:
            session.execute_write(tx_fn)

    # ---- Cypher passthrough (read-only) -------------------------------------------------------
    def cypher(self, query: str, params: dict, limit: int, timeout_s: float) -> list[dict]:
        from catalog.cypher import run_read_only

        return run_read_only(self.driver, self.database, query, params, limit, timeout_s)


__all__ = ["Neo4jStore", "CypherRefused"]
