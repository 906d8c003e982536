"""Publishing a compacted run into Neo4j (catalog.publish): every edge created once, CREATE only.

A run is new when it is published, so nothing is looked up but node ids: one transaction creates its
prompts and the nodes the dictionary lacks (under the writers' lock) and marks the run ``publishing``;
then each partition's edges go in CREATE-only batches of EDGE_CHUNK relationships (a transaction each, so the
server never holds a run in its heap; PUBLISH_WRITERS sessions at once), its statistics and its prompts'
evidence_edges after them; a last transaction clears the mark. While the mark is on, ``done_prompts``
reports none of the run's prompts, and the next publish first deletes what the interrupted one left
(relationships, statistics, prompts), so a killed publish ends, after a second one, with exactly the catalog
of one that was not killed.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from catalog.aggregate import WindowAggregate
from catalog.feature_acts import stat_lists
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
    stat_list_params,
)

# Measured on the 2-core VM, 486,535 edges of a 64-prompt replay into a live server (bench/spool_publish.py):
# the server is the bottleneck (one Bolt worker thread busy, commits 53% of its samples, query execution 31%).
# Two sessions creating disjoint batches at once keep two server threads busy: publish 44 s instead of 60 s.
# Batches of 5k relationships instead of 20k: the server's GC pauses 4.4 s instead of 15.9 s (JFR).
PUBLISH_WRITERS = 2
EDGE_CHUNK = 5_000

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


# a run's evidence rows leave the counter, and the run is noted as being dropped, in one transaction
# (a run whose publish was cut short has not been counted yet: it is marked publishing until its last batch)
UNCOUNT_EVIDENCE = ("OPTIONAL MATCH (x:Run {run_id: $run}) WITH coalesce(x.publishing, false) AS marked "
                    "MATCH ()-[r:EDGE]->() WHERE r.run = $run AND NOT marked "
                    "WITH sum(size(coalesce(r.ev_value, []))) AS n "
                    "MATCH (d:Dictionary {name: 'nodes'}) SET d.evidence = d.evidence - n, "
                    "d.dropping = coalesce(d.dropping, []) + $run")


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

    def drop_run(self, run: str) -> None:
        """Delete a run and every row it holds (the segments of ``ingest --publish-every`` once the run that
        replaces them is visible): its evidence rows leave the counter first, then its rows go a batch a
        transaction, the Run node last, so a drop that is killed is finished by the next one."""
        with self.driver.session(database=self.database) as session:
            if not self._dropping(session, run):
                session.execute_write(_run_query, UNCOUNT_EVIDENCE, {"run": run})
            for query in DROP_LEFTOVERS:
                session.run(query, run=run).consume()
            session.execute_write(_run_query, "MATCH (r:Run {run_id: $run}) DELETE r WITH count(*) AS _ "
                                  "MATCH (d:Dictionary {name: 'nodes'}) SET d.dropping = [x IN d.dropping "
                                  "WHERE x <> $run]", {"run": run})
        self._run_edges.pop(run, None)

    @staticmethod
    def _dropping(session: Any, run: str) -> bool:
        """Whether a drop of ``run`` began (its evidence already left the counter) and was cut short."""
        row = session.run("OPTIONAL MATCH (d:Dictionary {name: 'nodes'}) RETURN $run IN coalesce(d.dropping, [])",
                          run=run).single()
        return bool(row[0])

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
        rows = part_rows(part, ids)
        self._create_edges(part.run, rows)
        s = part.stats
        nids = ids[s.node]
        acts = stat_lists(part, ids)
        for chunk in _chunks(len(nids)):
            session.execute_write(_run_query, CREATE_STATS, {"nid": nids[chunk].tolist(), "run": part.run, **_lists(
                n_obs=s.n_obs[chunk], n_prompts=s.n_prompts[chunk], sum_act=s.sum_act[chunk],
                max_act=s.max_act[chunk]), **stat_list_params(acts, np.arange(chunk.start, chunk.stop))})
        has, offsets = rows.prompts_with_evidence, rows.prompt_offsets
        for chunk in _chunks(len(has)):
            p = has[chunk]
            session.execute_write(_run_query, PROMPT_EVIDENCE_EDGES, {
                "uid": [part.prompts[i].uid for i in p.tolist()],
                **_sub_lists({"keys": rows.prompt_keys}, offsets, p, "koff")})
        return len(part.evidence)

    def _create_edges(self, run: str, rows: PartRows) -> None:
        """CREATE ``rows``' edges in batches of EDGE_CHUNK, PUBLISH_WRITERS transactions at once (a session each:
        the driver is shared between threads, sessions are not). The batches are disjoint and the run is marked
        publishing throughout, so their order does not matter; the first failure cancels the batches not begun
        and is raised (the next publish deletes what was written)."""
        def create(chunk: slice) -> None:
            r = np.arange(chunk.start, chunk.stop)
            params = {"run": run, **_lists(key=rows.keys[r], src=rows.src[r], dst=rows.dst[r], kind=rows.kinds[r]),
                      **_lists(**{c: v[r] for c, v in rows.scalars.items()}),
                      **_sub_lists({"heads": rows.heads}, rows.hoff, r, "hoff"),
                      **_sub_lists({"role_n": rows.role_n, "role_abs": rows.role_abs}, rows.roff, r, "roff"),
                      **_slices(rows.evidence, rows.ev_start[r], rows.ev_width[r], "eoff")}
            with self.driver.session(database=self.database) as session:
                session.execute_write(_run_query, PUBLISH_EDGES, params)

        with ThreadPoolExecutor(PUBLISH_WRITERS, thread_name_prefix="publish") as pool:
            batches = [pool.submit(create, chunk) for chunk in _chunks(len(rows.keys), EDGE_CHUNK)]
            try:
                for batch in batches:
                    batch.result()
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise


@dataclass
class PartRows:
    """A compacted partition as the rows a published catalog holds: per edge [m] its key, end nids, kind name,
    scalar columns, and its lists (flat arrays cut by offsets [m + 1] or start/width [m]); per prompt the keys
    of the edges whose evidence holds one of its observations (``prompt_keys`` cut by ``prompt_offsets``
    [n_prompts + 1]; ``prompts_with_evidence`` the rows of prompts with any)."""

    keys: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    kinds: np.ndarray
    scalars: dict[str, np.ndarray]
    heads: np.ndarray
    hoff: np.ndarray
    role_n: np.ndarray
    role_abs: np.ndarray
    roff: np.ndarray
    evidence: dict[str, np.ndarray]  # LISTS: ev_prompt (uids), ev_src_pos, ev_dst_pos, ev_head, ev_value
    ev_start: np.ndarray
    ev_width: np.ndarray
    prompt_keys: np.ndarray
    prompt_offsets: np.ndarray
    prompts_with_evidence: np.ndarray


SCALARS = ("n_prompts", "n_obs", "sum", "sumsq", "sum_abs", "min", "max", "n_pos")


def part_rows(part: WindowAggregate, ids: np.ndarray) -> PartRows:
    """The rows of ``part`` once its nodes have dictionary ids ``ids`` [nodes] (both publish routes)."""
    e, h, ro, v = part.edges, part.heads, part.roles, part.evidence
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
    uids = np.array([p.uid for p in part.prompts] or [""], dtype=object)
    # each prompt: the keys of the edges whose evidence holds one of its observations
    # its distinct (prompt, key) pairs in (prompt, key) order: a lexsort, ~8x np.unique(axis=1)'s time less
    by = np.lexsort((v_keys, v.prompt))
    prompt_of, key_of = v.prompt[by].astype(np.int64), v_keys[by]
    first = np.r_[True, (np.diff(prompt_of) != 0) | (np.diff(key_of) != 0)] if len(v) else np.zeros(0, bool)
    pairs = np.stack([prompt_of[first], key_of[first]])
    per_prompt = np.bincount(pairs[0], minlength=len(part.prompts))
    return PartRows(
        keys=keys, src=ids[e.src], dst=ids[e.dst], kinds=np.array(EDGE_KINDS, dtype=object)[e.kind],
        scalars={c: getattr(e, c) for c in SCALARS}, heads=heads, hoff=hoff, role_n=role_n, role_abs=role_abs,
        roff=roff, evidence=dict(zip(LISTS, (uids[v.prompt], v.src_pos, v.dst_pos, v.head, v.value), strict=True)),
        ev_start=np.cumsum(width) - width, ev_width=width, prompt_keys=pairs[1],
        prompt_offsets=np.r_[0, np.cumsum(per_prompt)], prompts_with_evidence=np.flatnonzero(per_prompt))


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

