"""Every read of the SQLite catalog: queries sum the selected runs' rows (``_among``), and orderings compare rounded
metrics so that both stores order alike (catalog/stores/neo4j_read.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from catalog.schema import JSON, ROLES, EdgeStats, Evidence, NodeInfo, NodeStats, Prompt, Run, TopActivation
from catalog.stores.base import CypherUnsupported, EdgeQuery, Runs
from catalog.stores.sqlite_connection import SqliteConnection
from catalog.stores.sqlite_evidence import EV_ROW, decode

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

# a feature's top activations as TopActivation fields, after its node's uid
TOP_ROWS = ("SELECT n.uid, p.uid, t.pos, t.act, t.token, r.run_id, s.uid, t.src_pos, t.head, t.value FROM node_top t "
            "JOIN nodes n ON n.id = t.node JOIN prompts p ON p.id = t.prompt JOIN runs r ON r.no = t.run "
            "LEFT JOIN nodes s ON s.id = t.src")


class SqliteReads(SqliteConnection):
    """The Store protocol's reads (catalog/stores/base.py)."""

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

    def prompt_evidence(self, uid: str, limit: int, qk: bool = False) -> list[Evidence]:
        """The prompt's rows still in the evidence of the edges its evidence_edges name (a later
        window may have displaced some), RDFA edges (or with ``qk`` QK terms) only, strongest first."""
        row = self._conn.execute("SELECT p.id, p.evidence_edges, r.no FROM prompts p JOIN runs r ON r.run_id = p.run "
                                 "WHERE p.uid = ?", (uid,)).fetchone()
        if row is None or not row[1]:
            return []
        prompt_id, keys, run = row
        out: list[Evidence] = []
        cur = self._conn.execute(
            "SELECT s.uid, d.uid, e.kind, e.ev FROM edges e JOIN nodes s ON s.id = e.src JOIN nodes d ON d.id = e.dst "
            "WHERE e.id IN (SELECT value FROM json_each(?)) AND e.run = ? AND e.kind "
            f"{'IN' if qk else 'NOT IN'} ('q_in', 'k_in', 'qk')",
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

    def get_mined(self, key: str) -> tuple[str, str, str] | None:
        row = self._conn.execute("SELECT fingerprint, stamp, result FROM mined WHERE key = ?", (key,)).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def mined_stamp(self, key: str) -> tuple[str, str] | None:
        row = self._conn.execute("SELECT fingerprint, stamp FROM mined WHERE key = ?", (key,)).fetchone()
        return (row[0], row[1]) if row else None

    def all_mined(self) -> Iterator[tuple[str, str, str, str]]:
        yield from self._conn.execute("SELECT key, fingerprint, stamp, result FROM mined ORDER BY key")

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

    def activations(self, uid: str, runs: Runs = None) -> tuple[list[TopActivation], dict[int, int]]:
        among, args = _among("t", runs)
        tops = [TopActivation(*r[1:]) for r in self._conn.execute(
            f"{TOP_ROWS} WHERE t.node = (SELECT id FROM nodes WHERE uid = ?) AND {among}", [uid, *args])]
        among, args = _among("h", runs)
        hist = dict(self._conn.execute(f"SELECT bin, SUM(n) FROM node_hist h WHERE h.node = (SELECT id FROM nodes "
                                       f"WHERE uid = ?) AND {among} GROUP BY bin ORDER BY bin", [uid, *args]))
        return tops, hist

    def all_activations(self, runs: Runs = None) -> Iterator[tuple[str, list[TopActivation], dict[int, int]]]:
        among, args = _among("t", runs)
        tops: dict[str, list[TopActivation]] = {}
        for r in self._conn.execute(f"{TOP_ROWS} WHERE {among}", args):
            tops.setdefault(r[0], []).append(TopActivation(*r[1:]))
        among, args = _among("h", runs)
        hists: dict[str, dict[int, int]] = {}
        for node, b, n in self._conn.execute(f"SELECT n.uid, h.bin, SUM(h.n) FROM node_hist h JOIN nodes n ON "
                                             f"n.id = h.node WHERE {among} GROUP BY h.node, h.bin ORDER BY h.bin", args):
            hists.setdefault(node, {})[b] = n
        for node in sorted(tops.keys() | hists.keys()):
            yield node, tops.get(node, []), hists.get(node, {})

    def token_activations(self, token: str, runs: Runs, max_nodes: int) -> list[tuple[NodeInfo, list[TopActivation]]]:
        among, args = _among("t", runs)
        found = self._conn.execute(
            f"SELECT {NODE_COLS.format(a='n')}, n.id FROM (SELECT t.node, MAX(t.act) AS best FROM node_top t "
            f"WHERE t.token = ? AND {among} GROUP BY t.node) c JOIN nodes n ON n.id = c.node "
            "ORDER BY c.best DESC, n.uid LIMIT ?", [token, *args, max_nodes]).fetchall()
        tops: dict[str, list[TopActivation]] = {}
        for i in range(0, len(found), 900):
            part = [r[7] for r in found[i:i + 900]]
            for r in self._conn.execute(f"{TOP_ROWS} WHERE t.node IN ({','.join('?' * len(part))}) AND {among}",
                                        [*part, *args]):
                tops.setdefault(r[0], []).append(TopActivation(*r[1:]))
        return [(NodeInfo(*r[:7]), tops[r[0]]) for r in found]

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

    def cypher(self, query: str, params: JSON, limit: int, timeout_s: float) -> list[JSON]:
        raise CypherUnsupported("Cypher needs the Neo4j store: this catalog is SQLite "
                                f"({self.url}); export it with `circuit-catalog export --from {self.url} "
                                "--to neo4j://127.0.0.1:7687` or query it with the other commands")


def _among(alias: str, runs: Runs) -> tuple[str, list[str]]:
    """SQL restricting ``alias``'s rows to the runs named (by their numbers), and its arguments."""
    if runs is None:
        return "1", []
    return f"{alias}.run IN (SELECT no FROM runs WHERE run_id IN ({','.join('?' * len(runs))}))", list(runs)
