"""Composition patterns that recur across a corpus (no torch; networkx for the pattern graph).

* Pairs A_l.k -> A_L.f (l < L): ``direct`` (the exact direct edge, no residual SAE between) and
  ``via_resid`` (A_l.k -resid_in-> R_L.j -attn_in-> A_L.f; its total is sum_j sum(j->f) *
  sum(k->j) / in(j), k's share of j times j's attribution to f; its prompts are those whose
  stored evidence chains the two hops at the same position).
* Null baseline: the number of prompts a pair recurs in, against the same count when the prompts
  of f's activity are shuffled among the corpus's prompts. That shuffle's distribution is
  hypergeometric, so its mean n_k n_f / N and variance are exact, and ``z_score`` says how
  many standard deviations the observed recurrence lies above it.
* Through an MLP (``via_mlp``, with transcoders): A_l.k -mlp_in-> T_m.j -direct-> A_L.f (l <= m < L), scored
  and counted like via_resid (k's share of the transcoder feature's input times its attribution to f;
  prompts where the evidence chains both hops at the transcoder feature's position), with the same null
  and positional reading (of the attention hop); ranked among the V pairs.
* K- and Q-composition (``qk_pairs``): A_l.k -resid_in-> R_L.j -k_in (or q_in)-> head H_L.h, scored
  like via_resid (k's share of j times j's share of the head's scores), in attention-score logits, so
  ranked apart from the V pairs; chained at the residual feature's position on the key (query) side.
* Chains of three attention features and hubs come from the graph of V pairs; ``qk_chains`` join the
  halves: A_l.x -(K or Q)-> head H_L.h -writes-> A_L.y -(V)-> A_M.z, with each hop's role pair.
* Positions: each pair's dominant positional relation, offset and role pair (catalog.schema.ROLES)
  with its share of the pair's |value|, against the same share over every attention observation
  of the selection (the base rate): a duplicate share of 0.9 against a base of 0.05 names a
  duplicate-token reading, not chance.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import networkx as nx
import numpy as np

from catalog.ids import NodeKind
from catalog.queries import _is_attn_feature, _layer, edge_stats, node_ref_of, rnd
from catalog.runs import select_runs
from catalog.schema import JSON, OFFSETS, RELATIONS, ROLE_PAIRS, ROLES, EdgeStats, Evidence
from catalog.stores.base import Runs, Store

MAX_PAIRS_SCANNED = 200


def _ref(uid: str) -> str:
    return str(node_ref_of(uid))


def null_z(n_pair: int, n_src: int, n_dst: int, n_total: int) -> float | None:
    """z of ``n_pair`` co-occurrences against shuffled prompt assignments (hypergeometric)."""
    if n_total < 2 or not n_src or not n_dst:
        return None
    mean = n_src * n_dst / n_total
    var = mean * (n_total - n_src) * (n_total - n_dst) / (n_total * (n_total - 1))
    return rnd((n_pair - mean) / math.sqrt(var)) if var > 0 else None


def _prompt_counts(store: Store, runs: Runs) -> tuple[dict[str, int], int]:
    counts = {n.uid: s.n_prompts for n, s in store.all_nodes(runs) if s is not None}
    n_total = sum(store.prompt_count(run) for run in runs or ())
    return counts, n_total


def attention_scan(store: Store, runs: Runs) -> tuple[dict[str, float], dict[str, dict[int, float]]]:
    """One pass over the attention edges (attn_in, direct) of the selection: the null for positional
    roles (each role's share of the |value| of every attention observation), and which heads write
    each attention feature (per head, its share of the |per-head sums| into the feature)."""
    mass: dict[str, float] = defaultdict(float)
    writes: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    total = 0.0
    for e in sorted(store.all_edges(("attn_in", "direct"), runs), key=lambda e: (e.src, e.dst, e.kind)):
        total += e.sum_abs
        for name, (_, a) in e.roles.items():
            mass[name] += a
        if e.kind == "attn_in":
            for h, v in e.head_sums.items():
                writes[e.dst][h] += abs(v)
    shares = {f: {h: v / sum(by_head.values()) for h, v in by_head.items()}
              for f, by_head in writes.items() if sum(by_head.values())}
    return ({name: mass[name] / total for name in ROLES if name in mass} if total else {}), shares


def qk_chains(qk_pairs: list[JSON], pairs: list[JSON], writes: dict[str, dict[int, float]],
              min_share: float = 0.5) -> list[JSON]:
    """Mechanisms across the two halves of attention: A_l.x feeds head H_L.h's key (query) side; the head
    writes A_L.y (its share of A_L.y's per-head attribution >= ``min_share``); A_L.y feeds A_M.z (V).
    ``score`` = |K/Q total| (logits) x the head's share x |V total|: a ranking, not a quantity."""
    by_source: dict[str, list[JSON]] = defaultdict(list)
    for v in pairs:
        by_source[v["source_uid"]].append(v)
    out = []
    for k in qk_pairs:
        head = node_ref_of(k["target_uid"])
        for written, share_by_head in writes.items():
            share = share_by_head.get(head.index or 0, 0.0) if _layer(written) == head.layer else 0.0
            if share < min_share:
                continue
            for v in by_source.get(written, []):
                where = [x["position"]["pair"]["role"] if x["position"] and x["position"]["pair"] else None
                         for x in (k, v)]
                out.append({"chain": [k["source"], k["target"], v["source"], v["target"]],
                            "paths": [k["path"], "writes", v["path"]], "positions": where,
                            "qk_total": k["total"], "head_share": rnd(share), "v_total": v["total"],
                            "score": rnd(abs(k["total"] or 0) * share * abs(v["total"] or 0))})
    out.sort(key=lambda c: (-float(c["score"] or 0), c["chain"], c["paths"]))
    return out


def position(roles: dict[str, tuple[int, float]], sum_abs: float, base: dict[str, float]) -> JSON | None:
    """Where a pattern's attention reads: its dominant relation, offset and role pair, each with its
    share of the pattern's |value| and the same share over every attention observation (``base``)."""
    if not roles or not sum_abs:
        return None

    def dominant(names: tuple[str, ...]) -> JSON | None:
        present = [n for n in names if n in roles]
        if not present:
            return None
        best = min(present, key=lambda n: (-round(roles[n][1], 9), ROLES.index(n)))
        return {"role": best, "share": rnd(roles[best][1] / sum_abs), "base": rnd(base.get(best, 0.0))}

    return {"relation": dominant(RELATIONS), "offset": dominant(OFFSETS), "pair": dominant(ROLE_PAIRS)}


def direct_pairs(store: Store, counts: dict[str, int], n_total: int, min_prompts: int, runs: Runs,
                 base: dict[str, float]) -> list[JSON]:
    out: list[JSON] = []
    for e in store.all_edges(("direct",), runs):
        if _is_attn_feature(e.src) and _is_attn_feature(e.dst) and e.n_prompts >= min_prompts:
            stats = edge_stats(e)
            out.append({"source": _ref(e.src), "target": _ref(e.dst), "source_uid": e.src, "target_uid": e.dst,
                        "path": "direct", "n_prompts": e.n_prompts, "total": stats["sum"], "mean": stats["mean"],
                        "sign_share": stats["sign_share"], "heads": stats["heads"],
                        "position": position(e.roles, e.sum_abs, base),
                        "z_score": null_z(e.n_prompts, counts.get(e.src, 0), counts.get(e.dst, 0), n_total)})
    return out


VIA_PATHS = {("resid_in", "attn_in"): "via_resid", ("resid_in", "k_in"): "k_via_resid",
             ("resid_in", "q_in"): "q_via_resid", ("mlp_in", "direct"): "via_mlp"}


def _is_head(uid: str) -> bool:
    return node_ref_of(uid).kind is NodeKind.HEAD


def via_resid_pairs(store: Store, counts: dict[str, int], n_total: int, min_prompts: int, runs: Runs,
                    base: dict[str, float], down_kind: str = "attn_in", up_kind: str = "resid_in") -> list[JSON]:
    """Two-hop pairs through one residual feature (or, ``up_kind`` mlp_in, one transcoder feature), scored
    from aggregates, counted from evidence.

    The join (every attention feature into a residual feature) x (that residual feature into every
    later attention feature) has millions of rows on a corpus-sized catalog, so it runs in numpy:
    edges sorted by uid first, so the sums do not depend on the order a store returns edges in.
    ``down_kind``: attn_in (V-composition: into attention features), k_in or q_in (K-/Q-composition:
    into heads, through the residual feature on the key or query side of their scores); with ``up_kind``
    mlp_in, direct (a transcoder feature's output straight into later attention features)."""
    ups = sorted(store.all_edges((up_kind,), runs), key=lambda e: (e.src, e.dst))
    total_in: dict[str, float] = defaultdict(float)
    for e in ups:
        total_in[e.dst] += e.sum
    ups = [e for e in ups if _is_attn_feature(e.src)]
    fed = {e.dst for e in ups}
    into = _is_attn_feature if down_kind in ("attn_in", "direct") else _is_head
    downs = sorted((e for e in store.all_edges((down_kind,), runs)
                    if e.src in fed and total_in[e.src] and into(e.dst)), key=lambda e: (e.src, e.dst))
    if not ups or not downs:
        return []
    uids = sorted({e.src for e in ups} | {e.dst for e in downs})
    uid_id = {u: i for i, u in enumerate(uids)}  # int order == uid order, so int keys sort as uid pairs
    mids = sorted(fed)
    mid_id = {m: i for i, m in enumerate(mids)}
    up_mid = np.array([mid_id[e.dst] for e in ups])
    by_mid = np.argsort(up_mid, kind="stable")
    up_src = np.array([uid_id[e.src] for e in ups])[by_mid]
    up_layer = np.array([_layer(e.src) for e in ups])[by_mid]
    up_sum = np.array([e.sum for e in ups])[by_mid]
    n_up = np.bincount(up_mid, minlength=len(mids))
    first_up = np.cumsum(n_up) - n_up
    down_mid = np.array([mid_id[e.src] for e in downs])
    down_dst = np.array([uid_id[e.dst] for e in downs])
    down_layer = np.array([_layer(e.dst) for e in downs])
    down_sum = np.array([e.sum for e in downs])
    mid_total = np.array([total_in[m] for m in mids])
    # every (down, up) pair that meets at the same residual feature
    reps = n_up[down_mid]
    d = np.repeat(np.arange(len(downs)), reps)
    u = np.repeat(first_up[down_mid], reps) + (np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps))
    keep = up_layer[u] < down_layer[d]
    d, u = d[keep], u[keep]
    contrib = down_sum[d] * up_sum[u] / mid_total[down_mid[d]]
    pair = up_src[u] * len(uids) + down_dst[d]
    keys, which = np.unique(pair, return_inverse=True)
    score = np.bincount(which, weights=contrib, minlength=len(keys))
    best = np.lexsort((keys, -np.abs(score)))[:MAX_PAIRS_SCANNED]
    hop_rows = defaultdict(list)  # best pair -> its (up, down) hops, in join order
    chosen = np.isin(which, best)
    up_edges = [ups[i] for i in by_mid]
    for w, ui, di in zip(which[chosen].tolist(), u[chosen].tolist(), d[chosen].tolist()):
        hop_rows[w].append((up_edges[ui], downs[di]))
    out = []
    # the residual feature's position in the second hop's evidence: s (attn_in, k_in) or t (q_in)
    placed = _PlacedEvidence(store, runs)
    placed.read([e for w in best.tolist() for hop in hop_rows[w] for e in hop])
    for w in best.tolist():
        src, dst = uids[int(keys[w]) // len(uids)], uids[int(keys[w]) % len(uids)]
        hops = hop_rows[w]
        prompts, heads = _chained_prompts(placed, hops, "dst_pos" if down_kind == "q_in" else "src_pos")
        if len(prompts) < min_prompts:
            continue
        total = float(score[w])
        roles: dict[str, tuple[int, float]] = {}
        for down in {id(d): d for _, d in hops}.values():  # the attention hops (resid -> attn), each once
            for name, (n, a) in down.roles.items():
                roles[name] = (roles.get(name, (0, 0.0))[0] + n, roles.get(name, (0, 0.0))[1] + a)
        out.append({"source": _ref(src), "target": _ref(dst), "source_uid": src, "target_uid": dst,
                    "path": VIA_PATHS[(up_kind, down_kind)], "via": sorted({_ref(up.dst) for up, _ in hops}),
                    "n_prompts": len(prompts), "total": rnd(total), "mean": rnd(total / len(prompts)),
                    "sign_share": None, "heads": {str(h): rnd(v) for h, v in sorted(heads.items())},
                    "position": position(roles, sum(d.sum_abs for d in {id(d): d for _, d in hops}.values()), base),
                    "z_score": null_z(len(prompts), counts.get(src, 0), counts.get(dst, 0), n_total),
                    "exemplars": sorted(prompts)[:3]})
    return out


class _PlacedEvidence:
    """The stored evidence of the edges a mining pass chains, read at once and once: the best pairs
    share their hops (one residual feature's up edge serves every pair through it), and reading them
    per pair made ~14k evidence queries (~2 ms each on Neo4j) for 600 pairs of a 24-prompt toy catalog."""

    def __init__(self, store: Store, runs: Runs):
        self.store, self.runs = store, runs
        self._rows: dict[tuple[str, str, str], list[Evidence]] = {}

    def read(self, edges: Sequence[EdgeStats]) -> None:
        missing = list(dict.fromkeys((e.src, e.dst, e.kind) for e in edges if (e.src, e.dst, e.kind) not in self._rows))
        self._rows.update(zip(missing, self.store.evidence_of_edges(missing, 1000, self.runs)))

    def at(self, edge: EdgeStats, field: str) -> list[tuple[str, int]]:
        """(prompt, ``field``) of each evidence row of ``edge`` (read first if it was not)."""
        if (edge.src, edge.dst, edge.kind) not in self._rows:
            self.read([edge])
        return [(v.prompt, getattr(v, field)) for v in self._rows[edge.src, edge.dst, edge.kind]]


def _chained_prompts(placed: _PlacedEvidence, hops: list[tuple[EdgeStats, EdgeStats]],
                     at: str = "src_pos") -> tuple[set[str], dict[int, float]]:
    """Prompts whose evidence has hop 1 (k@p -> j@p) and hop 2 from j@p (p: the evidence field ``at`` of
    hop 2) at the same p; head sums of hop 2."""
    prompts: set[str] = set()
    heads: dict[int, float] = defaultdict(float)
    for up, down in hops:
        first = set(placed.at(up, "dst_pos"))
        prompts.update(prompt for prompt, pos in placed.at(down, at) if (prompt, pos) in first)
        for h, s in down.head_sums.items():
            heads[h] += s
    return prompts, heads


def _exemplars(store: Store, pair: JSON, runs: Runs, n: int = 3) -> list[JSON]:
    if pair["path"] == "direct":
        ev = store.evidence(pair["source_uid"], pair["target_uid"], "direct", 50, runs)
        uids = list(dict.fromkeys(v.prompt for v in ev))[:n]
    else:
        uids = pair.get("exemplars", [])[:n]
    prompts = store.prompts(uids)
    return [{"prompt": u, "text": _clip(prompts[u].text) if u in prompts else None} for u in uids]


EXEMPLAR_CHARS = 500  # an exemplar shows where a pattern occurs; the prompt itself is one link away


def _clip(text: str) -> str:
    """At most EXEMPLAR_CHARS of a prompt's text (a corpus of long documents made a 400 MB answer)."""
    return text if len(text) <= EXEMPLAR_CHARS else text[:EXEMPLAR_CHARS - 1] + "…"


def mine(store: Store, top: int = 20, min_prompts: int = 2, runs: Sequence[str] | None = None) -> JSON:
    """Pairs (ranked by |total|), chains of three, hubs; each pattern with exemplar prompts; over the
    runs named (default: every run, if they share settings; see catalog.runs)."""
    selected = select_runs(store, runs)
    counts, n_total = _prompt_counts(store, selected)
    base, writes = attention_scan(store, selected)
    pairs = (direct_pairs(store, counts, n_total, min_prompts, selected, base)
             + via_resid_pairs(store, counts, n_total, min_prompts, selected, base)
             + via_resid_pairs(store, counts, n_total, min_prompts, selected, base, "direct", "mlp_in"))
    pairs.sort(key=lambda p: (-abs(p["total"] or 0), p["source"], p["target"], p["path"]))
    # K- and Q-composition: their totals are attention-score logits, so they rank apart from V's
    qk_pairs = [p for kind in ("k_in", "q_in")
                for p in via_resid_pairs(store, counts, n_total, min_prompts, selected, base, kind)]
    qk_pairs.sort(key=lambda p: (-abs(p["total"] or 0), p["source"], p["target"], p["path"]))
    graph = nx.DiGraph()
    for p in pairs:
        w = abs(p["total"] or 0)
        if not graph.has_edge(p["source"], p["target"]) or graph[p["source"]][p["target"]]["w"] < w:
            graph.add_edge(p["source"], p["target"], w=w, path=p["path"])
    chains: list[JSON] = []
    for mid in graph.nodes:
        for a in graph.predecessors(mid):
            for c in graph.successors(mid):
                w = min(graph[a][mid]["w"], graph[mid][c]["w"])
                chains.append({"chain": [a, mid, c], "strength": rnd(w),
                               "paths": [graph[a][mid]["path"], graph[mid][c]["path"]]})
    chains.sort(key=lambda c: (-float(c["strength"]), c["chain"]))
    hubs = [{"id": n, "fed_by": graph.in_degree(n), "feeds": graph.out_degree(n)} for n in graph.nodes]
    hubs.sort(key=lambda h: (-(h["fed_by"] + h["feeds"]), h["id"]))
    mechanisms = qk_chains(qk_pairs, pairs, writes)
    shown, shown_qk = pairs[:top], qk_pairs[:top]
    for p in shown + shown_qk:
        p["exemplars"] = _exemplars(store, p, selected)
        p.pop("source_uid"), p.pop("target_uid")
    return {"runs": list(selected), "n_prompts": n_total, "pairs": shown, "qk_pairs": shown_qk,
            "chains": chains[:top], "qk_chains": mechanisms[:top], "hubs": hubs[:top],
            "null": "hypergeometric: prompts shared by source and target under shuffled prompt assignment; "
                    "positions: each role's share of the |value| of every attention observation (base)",
            "base_rates": {name: rnd(v) for name, v in base.items()},
            "mined": None}  # catalog.mined sets when a stored result was mined
