"""Every read of the Neo4j catalog: one auto-commit read a query, each summing the selected runs' relationships
(``RUNS``), with orderings on rounded metrics so that both stores order alike (catalog/stores/sqlite_read.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

from catalog.feature_acts import token_text
from catalog.schema import JSON, ROLES, EdgeStats, Evidence, NodeInfo, NodeStats, Prompt, Run, TopActivation
from catalog.stores.base import EdgeQuery, Runs
from catalog.stores.neo4j_connection import Neo4jConnection, _runs

# 4: evidence as lists on the EDGE relationship instead of (:Evidence) nodes
# reads sum an edge's relationships over the selected runs: RUNS filters them, EDGE_SUMS sums them
RUNS = "($runs IS NULL OR r.run IN $runs)"

EDGE_SUMS = ("sum(r.n_prompts) AS n_prompts, sum(r.n_obs) AS n_obs, sum(r.sum) AS total, sum(r.sumsq) AS sumsq, "
             "sum(r.sum_abs) AS sum_abs, min(r.min) AS low, max(r.max) AS high, sum(r.n_pos) AS n_pos, "
             "collect(r.head_sums) AS heads")

EDGE_RET = "kind, n_prompts, n_obs, total, sumsq, sum_abs, low, high, n_pos, heads"

# the per-role lists, read only where an answer shows roles (edge detail, all_edges)
ROLE_SUMS = "collect(r.role_n) AS role_n, collect(r.role_abs) AS role_abs"

ROLE_RET = "role_n, role_abs"

ORDER_DECIMALS = 9  # orderings compare rounded metrics: see catalog.stores.sqlite (last-bit differences of sums)

METRIC = {name: f"round({expr}, {ORDER_DECIMALS})" for name, expr in {
    "sum": "total", "mean": "total / n_obs", "count": "n_prompts", "abs": "abs(total)"}.items()}

NODE_RET = "{a}.uid, {a}.model, {a}.sae, {a}.ref, {a}.kind, {a}.layer, {a}.index"

STATS = ("OPTIONAL MATCH (s:Stats {nid: n.nid}) USING INDEX SEEK s:Stats(nid) WHERE $runs IS NULL OR s.run IN $runs "
         "WITH n, count(s) AS n_stats, sum(s.n_obs) AS n_obs, sum(s.n_prompts) AS n_prompts, "
         "sum(s.sum_act) AS sum_act, max(s.max_act) AS max_act")

# an edge's evidence lists, one row per entry (EV_ROWS yields prompt, src_pos, dst_pos, head, value of
# relationship r), and their order across runs (each run's list is in this order already)
EV_ROWS = ("UNWIND range(0, size(r.ev_value) - 1) AS j WITH r, r.ev_prompt[j] AS prompt, r.ev_src_pos[j] AS src_pos, "
           "r.ev_dst_pos[j] AS dst_pos, r.ev_head[j] AS head, r.ev_value[j] AS value")

EVIDENCE_ORDER = "abs(value) DESC, prompt, src_pos, dst_pos, head"

EDGES_PER_READ = 1000

# a feature's top activations, one row each, from Stats node s of Node n: TopActivation's fields after n.uid
TOP_ROWS = ("UNWIND range(0, size(coalesce(s.top_act, [])) - 1) AS j "
            "OPTIONAL MATCH (src:Node {nid: s.top_src[j]}) "
            "RETURN n.uid, s.top_prompt[j], s.top_pos[j], s.top_act[j], s.top_token[j], s.run, src.uid, "
            "s.top_src_pos[j], s.top_head[j], s.top_value[j]")
STATS_OF = "MATCH (s:Stats {nid: n.nid}) USING INDEX SEEK s:Stats(nid) WHERE $runs IS NULL OR s.run IN $runs"
# the Stats nodes with a top activation on $token, through the text index on top_tokens ($needle: token_text([token]))
TOKEN_SEARCH = ("MATCH (s:Stats) USING TEXT INDEX s:Stats(top_tokens) WHERE s.top_tokens CONTAINS $needle "
                "AND ($runs IS NULL OR s.run IN $runs) AND $token IN s.top_token")
HIST_ROWS = ("UNWIND range(0, size(coalesce(s.hist_bin, [])) - 1) AS j "
             "WITH n, s.hist_bin[j] AS bin, sum(s.hist_n[j]) AS count RETURN n.uid, bin, count ORDER BY bin")

# rows come in order per edge: the subquery orders them, and UNWIND keeps the edges' order
EVIDENCE_OF_EDGES = f"""
UNWIND range(0, size($s) - 1) AS i
CALL (i) {{
  MATCH (:Node {{uid: $s[i]}})-[r:EDGE {{kind: $kind[i]}}]->(:Node {{uid: $d[i]}}) WHERE $runs IS NULL OR r.run IN $runs
  {EV_ROWS}
  RETURN prompt, src_pos, dst_pos, head, value ORDER BY {EVIDENCE_ORDER} LIMIT $limit
}}
RETURN i, prompt, src_pos, dst_pos, head, value
"""


class Neo4jReads(Neo4jConnection):
    """The Store protocol's reads (catalog/stores/base.py)."""

    def done_prompts(self, run: str) -> set[str]:
        # a run whose publish was interrupted (catalog/stores/neo4j_publish.py) has none: they are written again
        return {r[0] for r in self._read("MATCH (p:Prompt {run: $run}) WHERE NOT EXISTS { (:Run {run_id: $run, "
                                         "publishing: true}) } RETURN p.prompt_id", run=run)}

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

    def node(self, uid: str, runs: Runs = None) -> tuple[NodeInfo, NodeStats | None] | None:
        rows = self._read(f"MATCH (n:Node {{uid: $uid}}) {STATS} RETURN {NODE_RET.format(a='n')}, n_stats, n_obs, "
                          "n_prompts, sum_act, max_act", uid=uid, runs=_runs(runs))
        if not rows:
            return None
        r = rows[0]
        return NodeInfo(*r[:7]), (NodeStats(uid, *r[8:]) if r[7] else None)

    @staticmethod
    def _delta(src: str, dst: str, r: Sequence[Any]) -> EdgeStats:
        """EdgeStats from the EDGE_RET columns: the per-run head lists are added here, index by index."""
        heads: dict[int, float] = {}
        for per_run in r[9]:
            for h, v in enumerate(per_run or []):
                heads[h] = heads.get(h, 0.0) + v
        roles: dict[str, tuple[int, float]] = {}
        if len(r) > 10:  # ROLE_RET read
            for per_run_n, per_run_abs in zip(r[10], r[11], strict=True):
                for code, (n, a) in enumerate(zip(per_run_n or [], per_run_abs or [], strict=True)):
                    if n:
                        old = roles.get(ROLES[code], (0, 0.0))
                        roles[ROLES[code]] = (old[0] + n, old[1] + a)
        return EdgeStats.of(src, dst, r[:9], {h: v for h, v in heads.items() if v != 0.0}, roles)

    @staticmethod
    def _neighbours_query(direction: str, q: EdgeQuery) -> str:
        """Edges of the node bound to ``t``, summed per (other node, kind) over the runs, one page."""
        pattern = "(o:Node)-[r:EDGE]->(t)" if direction == "up" else "(t)-[r:EDGE]->(o:Node)"
        return (f"MATCH {pattern} WHERE {RUNS} AND ($ek IS NULL OR r.kind IN $ek) "
                "AND ($nk IS NULL OR o.kind IN $nk) AND ($layers IS NULL OR o.layer IN $layers) "
                f"WITH o, r.kind AS kind, {EDGE_SUMS} WHERE n_prompts >= $min_count "
                f"RETURN o, {EDGE_RET} ORDER BY {METRIC[q.order]} DESC, o.uid, kind SKIP $offset LIMIT $limit")

    @staticmethod
    def _neighbour_params(q: EdgeQuery) -> JSON:
        return {"min_count": q.min_count, "runs": _runs(q.runs), "offset": q.offset, "limit": q.limit,
                "ek": list(q.edge_kinds) if q.edge_kinds else None,
                "nk": list(q.node_kinds) if q.node_kinds else None, "layers": list(q.layers) if q.layers else None}

    def _neighbour_rows(self, uid: str, direction: str, rows: list[Any]) -> list[tuple[NodeInfo, EdgeStats]]:
        """Rows of ``_neighbours_query`` (the other node ``o``, then EDGE_RET) as (node, stats)."""
        out = []
        for r in rows:
            o = r["o"]
            node = NodeInfo(o["uid"], o["model"], o["sae"], o["ref"], o["kind"], o.get("layer"), o.get("index"))
            src, dst = (node.uid, uid) if direction == "up" else (uid, node.uid)
            out.append((node, self._delta(src, dst, [r[k] for k in EDGE_RET.split(", ")])))
        return out

    def neighbours(self, uid: str, direction: str, q: EdgeQuery) -> list[tuple[NodeInfo, EdgeStats]]:
        rows = self._read(f"MATCH (t:Node {{uid: $uid}}) {self._neighbours_query(direction, q)}", uid=uid,
                          **self._neighbour_params(q))
        return self._neighbour_rows(uid, direction, rows)

    def resolve_neighbours(self, ref: str, model: str | None, direction: str,
                           q: EdgeQuery) -> tuple[list[NodeInfo], list[tuple[NodeInfo, EdgeStats]]]:
        """One round trip: the nodes found for ``ref`` and, when exactly one, its edges (an API request
        spends most of its time on round trips: measured 195 -> 296 requests/s without the second)."""
        rows = self._read(
            "MATCH (t:Node {ref: $ref}) WHERE $model IS NULL OR t.model = $model "
            f"WITH collect(t) AS found OPTIONAL CALL (found) {{ WITH found WHERE size(found) = 1 "
            f"WITH found[0] AS t {self._neighbours_query(direction, q)} }} "
            f"RETURN [f IN found | [{NODE_RET.format(a='f')}]] AS found, o, {EDGE_RET} "
            f"ORDER BY {METRIC[q.order]} DESC, o.uid, kind", ref=ref, model=model, **self._neighbour_params(q))
        found = sorted((NodeInfo(*f) for f in rows[0]["found"]), key=lambda n: n.uid) if rows else []
        if len(found) != 1:
            return found, []
        return found, self._neighbour_rows(found[0].uid, direction, [r for r in rows if r["o"] is not None])

    def edges_between(self, src: str, dst: str, runs: Runs = None) -> list[EdgeStats]:
        rows = self._read(f"MATCH (:Node {{uid: $s}})-[r:EDGE]->(:Node {{uid: $d}}) WHERE {RUNS} "
                          f"WITH r.kind AS kind, {EDGE_SUMS}, {ROLE_SUMS} RETURN {EDGE_RET}, {ROLE_RET} ORDER BY kind",
                          s=src, d=dst, runs=_runs(runs))
        return [self._delta(src, dst, r) for r in rows]

    def head_pairs(self, model: str, layer: int, head: int, limit: int,
                   runs: Runs = None) -> list[tuple[str, str, float]]:
        rows = self._read(f"MATCH (s:Node)-[r:EDGE {{kind: 'qk'}}]->(d:Node) WHERE s.model = $model AND "
                          f"s.layer = $layer AND {RUNS} WITH s, d, sum(coalesce(r.head_sums[$head], 0.0)) AS v "
                          f"WHERE v <> 0 RETURN s.uid, d.uid, v ORDER BY round(abs(v), {ORDER_DECIMALS}) DESC, "
                          "s.uid, d.uid LIMIT $limit", model=model, layer=layer, head=head, runs=_runs(runs),
                          limit=limit)
        return [(r[0], r[1], r[2]) for r in rows]

    def evidence(self, src: str, dst: str, kind: str, limit: int, runs: Runs = None) -> list[Evidence]:
        rows = self._read(f"MATCH (:Node {{uid: $s}})-[r:EDGE {{kind: $kind}}]->(:Node {{uid: $d}}) WHERE {RUNS} "
                          f"{EV_ROWS} RETURN prompt, src_pos, dst_pos, head, value "
                          f"ORDER BY {EVIDENCE_ORDER} LIMIT $limit", s=src, d=dst, kind=kind, limit=limit,
                          runs=_runs(runs))
        return [Evidence(src, dst, kind, p, sp, dp, None if h < 0 else h, v) for p, sp, dp, h, v in rows]

    def evidence_of_edges(self, edges: Sequence[tuple[str, str, str]], limit: int,
                          runs: Runs = None) -> list[list[Evidence]]:
        """One query per EDGES_PER_READ edges, each edge's rows as ``evidence`` orders them (a query per
        edge cost ~2 ms of round trip; mining a 24-prompt toy catalog asked for 6k edges)."""
        out: list[list[Evidence]] = [[] for _ in edges]
        for start in range(0, len(edges), EDGES_PER_READ):
            part = edges[start:start + EDGES_PER_READ]
            for i, p, sp, dp, h, v in self._read(EVIDENCE_OF_EDGES, s=[e[0] for e in part], d=[e[1] for e in part],
                                                 kind=[e[2] for e in part], limit=limit, runs=_runs(runs)):
                src, dst, kind = part[i]
                out[start + i].append(Evidence(src, dst, kind, p, sp, dp, None if h < 0 else h, v))
        return out

    @staticmethod
    def _prompt(r: Any) -> Prompt:
        return Prompt(r["uid"], r["run"], r["prompt_id"], r["text"], list(r["tokens"]), r["corpus"],
                      r["content_hash"], json.loads(r["meta"]))

    def prompt(self, uid: str) -> Prompt | None:
        rows = self._read("MATCH (p:Prompt {uid: $uid}) RETURN p", uid=uid)
        return self._prompt(rows[0][0]) if rows else None

    def prompts(self, uids: list[str]) -> dict[str, Prompt]:
        rows = self._read("MATCH (p:Prompt) WHERE p.uid IN $uids RETURN p", uids=sorted(set(uids)))
        return {r[0]["uid"]: self._prompt(r[0]) for r in rows}

    def prompt_evidence(self, uid: str, limit: int, qk: bool = False) -> list[Evidence]:
        # evidence_edges may name an edge whose list has since lost the prompt's rows: filtered here
        rows = self._read("MATCH (p:Prompt {uid: $uid}) UNWIND p.evidence_edges AS k WITH DISTINCT p, k "
                          "MATCH (s:Node)-[r:EDGE {key: k}]->(d:Node) USING INDEX SEEK r:EDGE(key) WHERE r.run = p.run "
                          f"AND {'' if qk else 'NOT '}r.kind IN ['q_in', 'k_in', 'qk'] WITH s, d, r {EV_ROWS}, s, d "
                          "WHERE prompt = $uid "
                          "RETURN s.uid, d.uid, r.kind, src_pos, dst_pos, head, value "
                          "ORDER BY abs(value) DESC, s.uid, d.uid, r.kind, src_pos, dst_pos, head LIMIT $limit",
                          uid=uid, limit=limit)
        return [Evidence(s, d, k, uid, sp, dp, None if h < 0 else h, v) for s, d, k, sp, dp, h, v in rows]

    def top_nodes(self, node_kind: str | None, by: str, limit: int, layer: int | None = None,
                  runs: Runs = None) -> list[tuple[NodeInfo, float, int]]:
        metric = {"degree": "degree", "total": f"round(total, {ORDER_DECIMALS})"}[by]
        rows = self._read(
            "MATCH (n:Node) WHERE ($kind IS NULL OR n.kind = $kind) AND ($layer IS NULL OR n.layer = $layer) "
            f"MATCH (n)-[r:EDGE]-() WHERE {RUNS} WITH n, r.key AS key, sum(r.sum) AS edge_sum "
            "WITH n, sum(abs(edge_sum)) AS total, count(key) AS degree "
            f"RETURN {NODE_RET.format(a='n')}, total, degree ORDER BY {metric} DESC, n.uid LIMIT $limit",
            kind=node_kind, layer=layer, limit=limit, runs=_runs(runs))
        return [(NodeInfo(*r[:7]), r[7], r[8]) for r in rows]

    def counts(self) -> dict[str, int]:
        """From Neo4j's count store and the evidence counter the writers keep (constant time)."""
        row = self._read("CALL () { MATCH (r:Run) RETURN count(r) AS runs } "
                         "CALL () { MATCH (p:Prompt) RETURN count(p) AS prompts } "
                         "CALL () { MATCH (n:Node) RETURN count(n) AS nodes } "
                         "CALL () { MATCH ()-[e:EDGE]->() RETURN count(e) AS edges } "
                         "CALL () { OPTIONAL MATCH (d:Dictionary {name: 'nodes'}) "
                         "RETURN coalesce(d.evidence, 0) AS evidence } "
                         "RETURN runs, prompts, nodes, edges, evidence")[0]
        return {k: row[k] for k in ("runs", "prompts", "nodes", "edges", "evidence")}

    def prompt_count(self, run: str) -> int:
        n: int = self._read("MATCH (p:Prompt {run: $run}) RETURN count(p)", run=run)[0][0]
        return n

    def get_mined(self, key: str) -> tuple[str, str, str] | None:
        rows = self._read("MATCH (m:Mined {key: $key}) RETURN m.fingerprint, m.stamp, m.result", key=key)
        return (rows[0][0], rows[0][1], rows[0][2]) if rows else None

    def mined_stamp(self, key: str) -> tuple[str, str] | None:
        rows = self._read("MATCH (m:Mined {key: $key}) RETURN m.fingerprint, m.stamp", key=key)
        return (rows[0][0], rows[0][1]) if rows else None

    def all_mined(self) -> Iterator[tuple[str, str, str, str]]:
        for r in self._read("MATCH (m:Mined) RETURN m.key, m.fingerprint, m.stamp, m.result ORDER BY m.key"):
            yield r[0], r[1], r[2], r[3]

    def all_edges(self, edge_kinds: tuple[str, ...] | None = None, runs: Runs = None) -> Iterator[EdgeStats]:
        with self.driver.session(database=self.database, default_access_mode="READ") as s:
            # summed per source node in a subquery: one node's edges in memory at a time, rows streamed
            for r in s.run(f"MATCH (a:Node) CALL (a) {{ MATCH (a)-[r:EDGE]->(b:Node) WHERE ($ek IS NULL OR "
                           f"r.kind IN $ek) AND {RUNS} WITH b.uid AS dst, r.kind AS kind, {EDGE_SUMS}, {ROLE_SUMS} "
                           f"RETURN dst, {EDGE_RET}, {ROLE_RET} }} RETURN a.uid AS src, dst, {EDGE_RET}, {ROLE_RET}",
                           ek=list(edge_kinds) if edge_kinds else None, runs=_runs(runs)):
                yield self._delta(r[0], r[1], r[2:])

    def all_nodes(self, runs: Runs = None) -> Iterator[tuple[NodeInfo, NodeStats | None]]:
        with self.driver.session(database=self.database, default_access_mode="READ") as s:
            for r in s.run(f"MATCH (n:Node) {STATS} RETURN {NODE_RET.format(a='n')}, n_stats, n_obs, n_prompts, "
                           "sum_act, max_act", runs=_runs(runs)):
                yield NodeInfo(*r[:7]), (NodeStats(r[0], *r[8:]) if r[7] else None)

    def activations(self, uid: str, runs: Runs = None) -> tuple[list[TopActivation], dict[int, int]]:
        tops = [TopActivation(*r[1:]) for r in self._read(f"MATCH (n:Node {{uid: $uid}}) {STATS_OF} {TOP_ROWS}",
                                                           uid=uid, runs=_runs(runs))]
        hist = {r[1]: r[2] for r in self._read(f"MATCH (n:Node {{uid: $uid}}) {STATS_OF} {HIST_ROWS}", uid=uid,
                                                runs=_runs(runs))}
        return tops, hist

    def all_activations(self, runs: Runs = None) -> Iterator[tuple[str, list[TopActivation], dict[int, int]]]:
        tops: dict[str, list[TopActivation]] = {}
        hists: dict[str, dict[int, int]] = {}
        with self.driver.session(database=self.database, default_access_mode="READ") as s:
            for r in s.run(f"MATCH (n:Node) {STATS_OF} {TOP_ROWS}", runs=_runs(runs)):
                tops.setdefault(r[0], []).append(TopActivation(*r[1:]))
            for r in s.run(f"MATCH (n:Node) {STATS_OF} {HIST_ROWS}", runs=_runs(runs)):
                hists.setdefault(r[0], {})[r[1]] = r[2]
        for node in sorted(tops.keys() | hists.keys()):
            yield node, tops.get(node, []), hists.get(node, {})

    def token_activations(self, token: str, runs: Runs, max_nodes: int) -> list[tuple[NodeInfo, list[TopActivation]]]:
        found = self._read(
            f"{TOKEN_SEARCH} "
            "WITH s.nid AS nid, max(reduce(m = -1.0, j IN range(0, size(s.top_token) - 1) | CASE WHEN "
            "s.top_token[j] = $token AND s.top_act[j] > m THEN s.top_act[j] ELSE m END)) AS best "
            f"MATCH (n:Node {{nid: nid}}) RETURN {NODE_RET.format(a='n')} ORDER BY best DESC, n.uid LIMIT $max",
            token=token, needle=token_text([token]), runs=_runs(runs), max=max_nodes)
        tops: dict[str, list[TopActivation]] = {}
        for r in self._read(f"UNWIND $uids AS uid MATCH (n:Node {{uid: uid}}) {STATS_OF} {TOP_ROWS}",
                            uids=[r[0] for r in found], runs=_runs(runs)):
            tops.setdefault(r[0], []).append(TopActivation(*r[1:]))
        return [(NodeInfo(*r), tops[r[0]]) for r in found]

    def all_prompts(self) -> Iterator[Prompt]:
        with self.driver.session(database=self.database, default_access_mode="READ") as s:
            for r in s.run("MATCH (p:Prompt) RETURN p ORDER BY p.uid"):
                yield self._prompt(r[0])

    def all_evidence(self, runs: Runs = None) -> Iterator[Evidence]:
        with self.driver.session(database=self.database, default_access_mode="READ") as s:
            for r in s.run(f"MATCH (a:Node)-[r:EDGE]->(b:Node) WHERE {RUNS} {EV_ROWS}, a, b "
                           "RETURN a.uid, b.uid, r.kind, prompt, src_pos, dst_pos, head, value", runs=_runs(runs)):
                yield Evidence(r[0], r[1], r[2], r[3], r[4], r[5], None if r[6] < 0 else r[6], r[7])

    def cypher(self, query: str, params: JSON, limit: int, timeout_s: float) -> list[JSON]:
        from catalog.stores.neo4j_cypher import run_read_only

        return run_read_only(self.driver, self.database, query, params, limit, timeout_s)
