"""Publishing a compacted run into Neo4j (catalog.publish): every edge created once, CREATE only.

A run is new when it is published, so nothing is looked up but node ids: one transaction creates its
prompts and the nodes the dictionary lacks (under the writers' lock) and marks the run ``publishing``;
then each partition's edges go in CREATE-only batches of CHUNK relationships (a transaction each, so the
server never holds a run in its heap), its statistics and its prompts' evidence_edges after them; a last
transaction clears the mark. While the mark is on, ``done_prompts`` reports none of the run's prompts, and
the next publish first deletes what the interrupted one left (relationships, statistics, prompts), so a
killed publish ends, after a second one, with exactly the catalog of one that was not killed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from catalog.aggregate import WindowAggregate
from catalog.schema import EDGE_KINDS, NODE_ID_LIMIT, NodeInfo, Prompt, edge_key
from catalog.stores.base import StoreError, StoreUnavailable
from catalog.stores.neo4j_connection import Tx
from catalog.stores.neo4j_evidence import LISTS
from catalog.stores.neo4j_write import (
    COUNT_EVIDENCE,
    CREATE_STATS,
    LOCK,
    LOCKED,
    PROMPT_EVIDENCE_EDGES,
    Neo4jWrites,
    _chunks,
    _dense,
    _lists,
    _slices,
    _sub_lists,
)

PUBLISH_EDGES = """
UNWIND range(0, size($key) - 1) AS i
MATCH (s:Node {nid: $src[i]})
MATCH (d:Node {nid: $dst[i]})
CREATE (s)-[:EDGE {run: $run, key: $key[i], kind: $kind[i], n_prompts: $n_prompts[i], n_obs: $n_obs[i], sum: $sum[i],
                   sumsq: $sumsq[i], sum_abs: $sum_abs[i], min: $min[i], max: $max[i], n_pos: $n_pos[i],
                   head_sums: $heads[$hoff[i]..$hoff[i + 1]], role_n: $role_n[$roff[i]..$roff[i + 1]],
                   role_abs: $role_abs[$roff[i]..$roff[i + 1]], ev_prompt: $ev_prompt[$eoff[i]..$eoff[i + 1]],
                   ev_src_pos: $ev_src_pos[$eoff[i]..$eoff[i + 1]], ev_dst_pos: $ev_dst_pos[$eoff[i]..$eoff[i + 1]],
                   ev_head: $ev_head[$eoff[i]..$eoff[i + 1]], ev_value: $ev_value[$eoff[i]..$eoff[i + 1]]}]->(d)
"""

# what an interrupted publish of the run left, deleted a batch a transaction (an auto-commit query)
DROP_LEFTOVERS = (
    "MATCH ()-[r:EDGE]->() WHERE r.run = $run CALL (r) { DELETE r } IN TRANSACTIONS OF 10000 ROWS",
    "MATCH (x:Stats) WHERE x.run = $run CALL (x) { DELETE x } IN TRANSACTIONS OF 10000 ROWS",
    "MATCH (p:Prompt {run: $run}) CALL (p) { DELETE p } IN TRANSACTIONS OF 10000 ROWS",
)


class Neo4jPublish(Neo4jWrites):
    """``publish_run`` of the Store protocol."""

    def publish_run(self, run: str, prompts: list[Prompt], nodes: list[NodeInfo],
                    parts: Iterable[WindowAggregate]) -> bool:
        from neo4j.exceptions import ServiceUnavailable, SessionExpired

        try:
            with self.driver.session(database=self.database) as session:
                marked, stored = session.execute_read(_state, run)
                if stored and not marked:
                    if stored == len(prompts):
                        return False
                    raise StoreError(f"run {run!r} already has {stored} prompts in {self.url}: a run is published once")
                if marked:
                    for query in DROP_LEFTOVERS:
                        session.run(query, run=run).consume()
                ids = session.execute_write(self._start_publish, run, prompts, nodes)
                evidence = 0
                for part in parts:
                    evidence += self._publish_part(session, part, ids)
                session.execute_write(_end_publish, run, evidence)
        except (ServiceUnavailable, SessionExpired) as exc:  # after the driver's own retries
            raise StoreUnavailable(f"Neo4j at {self.url} stopped answering while run {run!r} was published "
                                   f"({type(exc).__name__}); publishing it again clears what was written") from None
        self._run_edges.pop(run, None)
        return True

    def _start_publish(self, tx: Tx, /, run: str, prompts: list[Prompt], nodes: list[NodeInfo]) -> np.ndarray:
        """Under the writers' lock: the run marked, its prompts created, missing nodes created; [nodes] their ids."""
        tx.run(LOCK).consume()
        _, next_id = tx.run(LOCKED).single()
        if tx.run("MATCH (r:Run {run_id: $run}) SET r.publishing = true RETURN count(r)", run=run).single()[0] != 1:
            raise StoreError(f"run {run!r} was never started in {self.url} (start_run comes first)")
        for part in _chunks(len(prompts)):
            tx.run("UNWIND $rows AS p CREATE (x:Prompt) SET x += p",
                   rows=[self._prompt_props(p) for p in prompts[part]]).consume()
        known = self._known_ids(tx, nodes)
        if next_id + sum(n.uid not in known for n in nodes) > NODE_ID_LIMIT:
            raise StoreError(f"node dictionary of {self.url} is full ({NODE_ID_LIMIT} nodes)")
        new = self._create_nodes(tx, nodes, known, next_id)
        self._ids.update(known)
        return np.array([known.get(n.uid, new.get(n.uid, -1)) for n in nodes], dtype=np.int64)

    def _publish_part(self, session: Any, part: WindowAggregate, ids: np.ndarray) -> int:
        """Create one partition's edges (each with its head and role lists and evidence), statistics and its
        prompts' evidence_edges; returns its evidence rows."""
        e, h, ro, v, s = part.edges, part.heads, part.roles, part.evidence, part.stats
        keys = edge_key(ids[e.src], ids[e.dst], e.kind)
        (heads,), hoff = _dense(keys, edge_key(ids[h.src], ids[h.dst], h.kind), h.head, h.sum)
        (role_n, role_abs), roff = _dense(keys, edge_key(ids[ro.src], ids[ro.dst], ro.kind), ro.role, ro.n, ro.sum_abs)
        # evidence comes grouped by edge in the edges' order (catalog.compact), best first within an edge
        v_keys = edge_key(ids[v.src], ids[v.dst], v.kind)
        order = np.argsort(keys, kind="stable")
        row = order[np.searchsorted(keys, v_keys, sorter=order)] if len(v) else np.zeros(0, np.int64)
        if len(v) and (np.diff(row) < 0).any():
            raise StoreError("a compacted partition's evidence is not grouped in its edges' order")
        width = np.bincount(row, minlength=len(keys))
        start = np.cumsum(width) - width
        uids = np.array([p.uid for p in part.prompts] or [""], dtype=object)
        ev = dict(zip(LISTS, (uids[v.prompt], v.src_pos, v.dst_pos, v.head, v.value), strict=True))
        kinds = np.array(EDGE_KINDS, dtype=object)[e.kind]
        for rows in _chunks(len(keys)):
            r = np.arange(rows.start, rows.stop)
            session.execute_write(_run_query, PUBLISH_EDGES, {
                "run": part.run, **_lists(key=keys[r], src=ids[e.src[r]], dst=ids[e.dst[r]], kind=kinds[r]),
                **_lists(**{c: getattr(e, c)[r] for c in ("n_prompts", "n_obs", "sum", "sumsq", "sum_abs", "min",
                                                          "max", "n_pos")}),
                **_sub_lists({"heads": heads}, hoff, r, "hoff"),
                **_sub_lists({"role_n": role_n, "role_abs": role_abs}, roff, r, "roff"),
                **_slices(ev, start[r], width[r], "eoff")})
        nids = ids[s.node]
        for rows in _chunks(len(nids)):
            session.execute_write(_run_query, CREATE_STATS, {"nid": nids[rows].tolist(), "run": part.run, **_lists(
                n_obs=s.n_obs[rows], n_prompts=s.n_prompts[rows], sum_act=s.sum_act[rows], max_act=s.max_act[rows])})
        # each prompt: the keys of the edges whose evidence holds one of its observations
        pairs = np.unique(np.stack([v.prompt, v_keys]), axis=1) if len(v) else np.zeros((2, 0), np.int64)
        per_prompt = np.bincount(pairs[0], minlength=len(part.prompts))
        has = np.flatnonzero(per_prompt)
        offsets = np.r_[0, np.cumsum(per_prompt)]
        for rows in _chunks(len(has)):
            p = has[rows]
            session.execute_write(_run_query, PROMPT_EVIDENCE_EDGES, {
                "uid": [part.prompts[i].uid for i in p.tolist()], **_sub_lists({"keys": pairs[1]}, offsets, p, "koff")})
        return len(v)


def _state(tx: Tx, run: str) -> tuple[bool, int]:
    """(whether an interrupted publish left the run marked, how many of its prompts are stored)."""
    row = tx.run("OPTIONAL MATCH (r:Run {run_id: $run}) OPTIONAL MATCH (p:Prompt {run: $run}) "
                 "RETURN coalesce(r.publishing, false), count(p)", run=run).single()
    return bool(row[0]), int(row[1])


def _end_publish(tx: Tx, run: str, evidence: int) -> None:
    tx.run(COUNT_EVIDENCE, n=evidence).consume()
    tx.run("MATCH (r:Run {run_id: $run}) REMOVE r.publishing", run=run).consume()


def _run_query(tx: Tx, query: str, params: dict[str, Any]) -> None:
    tx.run(query, params).consume()

