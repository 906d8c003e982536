"""Store-independent questions with one answer format: fixed ordering (metric, then id), floats
rounded the same way, so equal queries print byte-identical JSON on SQLite and Neo4j."""

from __future__ import annotations

import functools
import math
import re
import sys
from collections.abc import Sequence
from typing import Any

from catalog.completeness import PARTITION_KINDS, by_layer, input_shares
from catalog.fires_on import MAX_CONTEXTS, by_token, token_query
from catalog.fires_on import contexts as top_contexts
from catalog.ids import NodeKind, NodeRef, NodeRefError, format_ref, parse_ref
from catalog.rounding import rnd as rnd  # re-exported: answers elsewhere round through it too
from catalog.runs import IncompatibleRuns, compatibility_groups, describe, holds_edges, select_runs
from catalog.schema import EDGE_KINDS, JSON, ROLES, EdgeStats, Evidence, NodeInfo, NodeStats, Run
from catalog.stores.base import ORDERS, Ambiguous, EdgeQuery, NotFound, Store

MAX_LIMIT = 1000


def canonical_ref(ref: str) -> str:
    """A user reference (A5.44256, L5.F44256, R3.ERR, ...) in canonical form, without position."""
    parsed = parse_ref(ref)
    if parsed.pos is not None:
        raise NodeRefError(f"{ref!r} names a position; catalog nodes aggregate over positions (drop '@...')")
    return format_ref(parsed.at(None))


def resolve(store: Store, ref: str, model: str | None = None) -> NodeInfo:
    """A user reference (A5.44256, L5.F44256, R3.ERR, ...) -> the catalog node it names."""
    canonical = canonical_ref(ref)
    return the_one(store, store.find_nodes(canonical, model), canonical, model)


def the_one(store: Store, found: list[NodeInfo], canonical: str, model: str | None) -> NodeInfo:
    """The node a reference names, from the nodes found for it; NotFound / Ambiguous otherwise."""
    if not found:
        raise NotFound(f"no node {canonical} in {store.url}" + (f" for model {model}" if model else ""))
    if len(found) > 1:
        raise Ambiguous(f"{canonical} exists for several models/releases: " + ", ".join(n.uid for n in found)
                        + "; pass --model")
    return found[0]


def variance(total: float, sumsq: float, n: int) -> float:
    """Population variance from n, sum and sum of squares, with what rounding leaves of E[x^2] - mean^2
    taken as zero: the two stores add the same float64 values in other orders, so their sums differ in the
    last bits, and an edge whose values are all equal would otherwise show std 0.0 on one store and 3e-9 on
    the other. A sum of n float64 terms is off by up to about n eps of its size, so below ``4 n eps E[x^2]``
    the difference is rounding, not spread (and cannot be told from it)."""
    if n <= 0:
        return 0.0
    mean_sq, mean = sumsq / n, total / n
    var = mean_sq - mean * mean
    return var if var > 4 * n * sys.float_info.epsilon * mean_sq else 0.0


def edge_stats(e: EdgeStats) -> JSON:
    mean = e.sum / e.n_obs if e.n_obs else 0.0
    var = variance(e.sum, e.sumsq, e.n_obs)
    return {"edge_kind": e.kind, "n_prompts": e.n_prompts, "n_obs": e.n_obs, "sum": rnd(e.sum), "mean": rnd(mean),
            "std": rnd(math.sqrt(var)), "sum_abs": rnd(e.sum_abs), "min": rnd(e.min), "max": rnd(e.max),
            "sign_share": rnd(max(e.n_pos, e.n_obs - e.n_pos) / e.n_obs if e.n_obs else 0.0),
            "heads": {str(h): rnd(v) for h, v in sorted(e.head_sums.items()) if v != 0.0}}


def roles_json(e: EdgeStats) -> list[JSON]:
    """The edge's positional roles (catalog.schema.ROLES order): observations with the role, their
    share of the edge's observations, and their share of its sum of |value|."""
    return [{"role": name, "n": e.roles[name][0], "share": rnd(e.roles[name][0] / e.n_obs if e.n_obs else 0.0),
             "abs_share": rnd(e.roles[name][1] / e.sum_abs if e.sum_abs else 0.0)}
            for name in ROLES if name in e.roles]


def node_json(n: NodeInfo, stats: NodeStats | None = None) -> JSON:
    out: JSON = {"id": n.ref, "uid": n.uid, "kind": n.kind, "layer": n.layer, "index": n.index, "model": n.model,
           "sae": n.sae}
    if stats is not None:
        out["activation"] = {"n_positions": stats.n_obs, "n_prompts": stats.n_prompts,
                             "mean": rnd(stats.sum_act / stats.n_obs if stats.n_obs else 0.0), "max": rnd(stats.max_act)}
    return out


def edge_query(*, edge_kinds: Sequence[str] | None = None, node_kinds: Sequence[str] | None = None,
               layers: Sequence[int] | None = None, min_count: int = 0, order: str = "abs", limit: int = 20,
               offset: int = 0) -> EdgeQuery:
    """Validate filters; raise ValueError naming the bad one."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    bad = [k for k in edge_kinds or () if k not in EDGE_KINDS]
    if bad:
        raise ValueError(f"unknown edge kind(s) {bad}: expected {', '.join(EDGE_KINDS)}")
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    if offset < 0 or min_count < 0:
        raise ValueError("offset and min_count must be >= 0")
    return EdgeQuery(tuple(edge_kinds) if edge_kinds else None, tuple(node_kinds) if node_kinds else None,
                     tuple(layers) if layers else None, min_count, order, limit, offset)


def neighbours(store: Store, ref: str, direction: str, *, model: str | None = None, runs: Sequence[str] | None = None,
               **filters: Any) -> list[JSON]:
    """Upstream (direction 'up') or downstream ('down') edges of a node, as JSON-ready dicts, id first,
    each edge summed over the runs selected (catalog.runs.select_runs)."""
    canonical = canonical_ref(ref)  # a reference that does not parse is the first thing to say
    q = edge_query(**filters)
    q.runs = select_runs(store, runs)
    found, rows = store.resolve_neighbours(canonical, model, direction, q)  # one round trip on Neo4j
    the_one(store, found, canonical, model)
    return [{"id": other.ref, "uid": other.uid, "kind": other.kind, "layer": other.layer, **edge_stats(e)}
            for other, e in rows]


def upstream(store: Store, ref: str, **kw: Any) -> list[JSON]:
    return neighbours(store, ref, "up", **kw)


def downstream(store: Store, ref: str, **kw: Any) -> list[JSON]:
    return neighbours(store, ref, "down", **kw)


QK_UNITS = "attention-score logits (pre-softmax), not feature pre-activations"


def head_qk(store: Store, ref: str, *, model: str | None = None, limit: int = 20,
            runs: Sequence[str] | None = None) -> JSON:
    """Why a head attends where it does, across the corpus: the query-side nodes (q_in) and key-side
    nodes (k_in) that raise or lower its scores, with their positional roles, and its largest
    query x key pairs (qk), each summed over the runs selected."""
    node = resolve(store, ref, model)
    if node.kind != NodeKind.HEAD:
        raise NotFound(f"{node.ref} is not an attention head (expected H{{layer}}.{{head}})")
    selected = select_runs(store, runs)

    def side(kind: str) -> list[JSON]:
        rows = neighbours(store, node.ref, "up", model=node.model, runs=selected, edge_kinds=[kind], limit=limit)
        for row in rows:
            found = store.edges_between(row["uid"], node.uid, selected)
            row["roles"] = next((roles_json(e) for e in found if e.kind == kind), [])
        return rows

    assert node.layer is not None and node.index is not None
    pairs = []
    for q_uid, k_uid, value in store.head_pairs(node.model, node.layer, node.index, limit, selected):
        e = next(x for x in store.edges_between(q_uid, k_uid, selected) if x.kind == "qk")
        pairs.append({"query": format_ref(node_ref_of(q_uid)), "key": format_ref(node_ref_of(k_uid)),
                      "value": rnd(value), "n_prompts": e.n_prompts, "roles_all_heads": roles_json(e)})
    return {"head": node.ref, "uid": node.uid, "runs": list(selected), "units": QK_UNITS,
            "query_side": side("q_in"), "key_side": side("k_in"), "pairs": pairs}


def evidence_json(evidence: list[Evidence], prompts: JSON) -> list[JSON]:
    out = []
    for v in evidence:
        p = prompts.get(v.prompt)
        tokens = p.tokens if p else []

        def tok(i: int, tokens: list[str] = tokens) -> str | None:
            return tokens[i] if 0 <= i < len(tokens) else None
        out.append({"prompt": v.prompt, "text": p.text if p else None, "src_pos": v.src_pos, "src_token": tok(v.src_pos),
                    "dst_pos": v.dst_pos, "dst_token": tok(v.dst_pos), "head": v.head, "value": rnd(v.value)})
    return out


def edge(store: Store, src: str, dst: str, *, model: str | None = None, evidence_limit: int = 20,
         runs: Sequence[str] | None = None) -> JSON:
    """Statistics of every edge kind between two nodes, with per-head split and evidence (prompts,
    tokens), summed over the runs selected."""
    s, d = resolve(store, src, model), resolve(store, dst, model)
    selected = select_runs(store, runs)
    found = store.edges_between(s.uid, d.uid, selected)
    if not found:
        raise NotFound(f"no edge {s.ref} -> {d.ref} in {store.url}" + _in_runs(runs))
    kinds = []
    for e in found:
        ev = store.evidence(s.uid, d.uid, e.kind, min(evidence_limit, MAX_LIMIT), selected)
        kinds.append({**edge_stats(e), "roles": roles_json(e),
                      "evidence": evidence_json(ev, store.prompts([v.prompt for v in ev]))})
    flags = {n.ref: sae_info(store, n)["sae_flags"] for n in (s, d)}
    through_flagged = [ref for ref, f in flags.items() if f and f["flagged"]]
    return {"source": s.ref, "target": d.ref, "source_uid": s.uid, "target_uid": d.uid, "runs": list(selected),
            "kinds": kinds,
            "sae_flags": flags, "through_flagged_sae": through_flagged}


def feature(store: Store, ref: str, *, model: str | None = None, runs: Sequence[str] | None = None,
            contexts: int = 10) -> JSON:
    """A node with its activation statistics summed over the runs selected, and what it fires on: its
    ``contexts`` top-activating contexts and its activation histogram (catalog.fires_on)."""
    if not 0 <= contexts <= MAX_CONTEXTS:
        raise ValueError(f"contexts must be between 0 and {MAX_CONTEXTS}, got {contexts}")
    node = resolve(store, ref, model)
    selected = select_runs(store, runs)
    found = store.node(node.uid, selected)
    if found is None:  # removed between the two reads
        raise NotFound(f"no node {node.ref} in {store.url}")
    info, stats = found
    shown, histogram = top_contexts(store, info.uid, selected, contexts)
    return {**node_json(info, stats), "runs": list(selected), **sae_info(store, info), "contexts": shown,
            "histogram": histogram, "inputs": input_shares_of(store, info, selected)}


def input_shares_of(store: Store, node: NodeInfo, runs: tuple[str, ...] | None) -> JSON | None:
    """The share of a decomposed node's incoming |attribution| carried by features, errors and the rest
    (catalog.completeness), over its MAX_LIMIT strongest incoming edges (``edges``; ``complete`` False when it
    has more); None for a node nothing is decomposed into."""
    if not node.is_feature:
        return None
    q = EdgeQuery(PARTITION_KINDS, None, None, 0, "abs", MAX_LIMIT, 0, runs)
    rows = store.neighbours(node.uid, "up", q)
    out = {k: (rnd(v) if v is not None else None) for k, v in input_shares(
        (parse_ref(other.ref), e) for other, e in rows).items()}
    return {**out, "edges": len(rows), "complete": len(rows) < MAX_LIMIT}


def completeness(store: Store, *, runs: Sequence[str] | None = None) -> JSON:
    """Per run selection: the share of |attribution| into each layer's features (by kind) that features, errors
    and the rest carry (catalog.completeness.by_layer), summed over every stored partition edge."""
    selected = select_runs(store, runs)
    rows = by_layer(store.all_edges(PARTITION_KINDS, selected), node_ref_of)
    return {"runs": list(selected), "layers": [{k: (rnd(v) if isinstance(v, float) else v) for k, v in r.items()}
                                               for r in rows]}


def features_by_token(store: Store, token: str, *, runs: Sequence[str] | None = None, limit: int = 20) -> JSON:
    """Features whose top activations sit on ``token`` (catalog.fires_on.by_token), in the runs selected."""
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    wanted = token_query(token)
    selected = select_runs(store, runs)
    return {"token": wanted, "runs": list(selected), "features": by_token(store, wanted, selected, limit)}


def _in_runs(runs: Sequence[str] | None) -> str:
    return f" in run(s) {', '.join(runs)}" if runs else ""


def sae_info(store: Store, node: NodeInfo) -> JSON:
    """Neuronpedia link (from ingest manifests) and SAE sufficiency flags (from eval-saes runs)."""
    out: JSON = {"neuronpedia": None, "sae_flags": None}
    if not node.is_feature:
        return out
    for run in store.runs():
        m = run.manifest
        for sae in m.get("saes", []):
            if sae.get("kind") == node.kind and sae.get("layer") == node.layer and sae.get("neuronpedia_id"):
                out["neuronpedia"] = f"https://www.neuronpedia.org/{sae['neuronpedia_id']}/{node.index}"
        ev = m.get("sae_eval")
        if ev and ev.get("model") == node.model:
            for row in ev["saes"]:
                if row.get("sae") == node.sae and row["kind"] == node.kind and row["layer"] == node.layer:
                    out["sae_flags"] = {"flagged": row["flagged"], "logit_diff_recovery": rnd(row["logit_diff_recovery"]),
                                        "kl": rnd(row["kl"]), "run": run.run_id}
    return out


def prompt(store: Store, uid: str) -> JSON:
    p = store.prompt(uid)
    if p is None:
        raise NotFound(f"no prompt {uid!r} in {store.url}")
    return {"uid": p.uid, "run": p.run, "prompt_id": p.prompt_id, "text": p.text, "tokens": p.tokens,
            "corpus": p.corpus, "content_hash": p.content_hash, "meta": p.meta}


def prompt_graph(store: Store, uid: str, limit: int = 200, around: str | None = None) -> JSON:
    """The stored observations of one prompt (the evidence the store kept, strongest first), with
    token positions; ``around`` (``A2.17@14``, or ``A2.17`` for all its positions) keeps only the
    edges on paths into or out of that node."""
    p = prompt(store, uid)
    limit = min(limit, MAX_LIMIT * 10)
    # around a node: its paths are looked for among all the prompt's stored edges, then the strongest kept
    ev = store.prompt_evidence(uid, MAX_LIMIT * 10 if around is not None else limit)
    edges = [{"source": f"{node_ref_of(v.src)}@{v.src_pos}", "target": f"{node_ref_of(v.dst)}@{v.dst_pos}",
              "kind": v.kind, "head": v.head, "value": rnd(v.value)} for v in ev]
    if around is not None:
        from catalog.prompt_graphs import neighbourhood

        edges = neighbourhood(edges, around)[:limit]
        if not edges:
            raise NotFound(f"{around} is in none of the {len(ev)} stored edges of prompt {uid!r}")
    return {"prompt": p, "around": around, "edges": edges}


def prompt_graph_neuronpedia(store: Store, uid: str, limit: int = 200, around: str | None = None) -> JSON:
    """:func:`prompt_graph` as attribution-graph JSON (catalog.neuronpedia), with the prompt's stored QK
    terms attached to the attention features whose edges they explain."""
    from catalog.neuronpedia import score_splits, to_neuronpedia

    graph = prompt_graph(store, uid, limit, around)
    p = graph["prompt"]
    run_ = store.run(p["run"])
    manifest = run_.manifest if run_ else {}
    # stored QK nodes are position-free; the side of a term says which of the score's positions is its own
    qk = [{"source": f"{node_ref_of(v.src)}@{v.dst_pos if v.kind != 'k_in' else v.src_pos}",
           "target": f"{node_ref_of(v.dst)}" + (f"@{v.src_pos}" if v.kind == "qk" else ""), "kind": v.kind,
           "head": v.head, "src_pos": v.src_pos, "dst_pos": v.dst_pos, "value": rnd(v.value)}
          for v in store.prompt_evidence(uid, MAX_LIMIT * 10, qk=True)]
    return to_neuronpedia(prompt=p["text"], tokens=p["tokens"], edges=graph["edges"],
                          scan=manifest_model(manifest).get("name") or "unknown",
                          slug=re.sub(r"[^A-Za-z0-9_-]+", "-", uid).strip("-").lower() or "prompt",
                          saes=manifest.get("saes", []), clicked=_start_node(graph["edges"], around),
                          qk=score_splits(qk),
                          description=f"circuit-catalog: stored evidence of prompt {uid} (run {p['run']})",
                          version=manifest.get("code_version", ""))


def _start_node(edges: list[JSON], around: str | None) -> str | None:
    """The node a viewer opens clicked and pinned: ``around`` (at the position of its strongest edge
    when it names none), else the target of the prompt's strongest edge."""
    if around is not None and parse_ref(around).pos is not None:
        return around
    want = parse_ref(around) if around is not None else None
    for e in edges:  # strongest first
        for side in ("target", "source"):
            if want is None or parse_ref(e[side]).at(None) == want:
                return str(e[side])
    return None


def top_features(store: Store, *, kind: str | None = None, by: str = "degree", limit: int = 20,
                 layer: int | None = None, runs: Sequence[str] | None = None) -> list[JSON]:
    """Nodes by degree or by total |sum| of their edges (each edge summed over the runs selected)."""
    if by not in ("degree", "total"):
        raise ValueError(f"by must be degree or total, got {by!r}")
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}")
    selected = select_runs(store, runs)
    return [{"id": n.ref, "uid": n.uid, "kind": n.kind, "layer": n.layer, "degree": deg, "total_abs": rnd(total)}
            for n, total, deg in store.top_nodes(kind, by, limit, layer, selected)]


def public_url(url: str) -> str:
    """A store URL without credentials (what a page or /healthz may show)."""
    return url.split("@")[-1] if "@" in url else url


def manifest_model(manifest: JSON) -> JSON:
    """The manifest's model record (ingest writes a dict; a bare name is read as {"name": name})."""
    model = manifest.get("model")
    return model if isinstance(model, dict) else {"name": model} if model else {}


def run_summary(r: Run) -> JSON:
    """The line a person reads about a run: what model, SAEs and corpus made it, how far it got."""
    m = r.manifest
    counts = m.get("counts", {})
    return {"run_id": r.run_id, "status": r.status, "kind": m.get("kind", "ingest"),
            "model": manifest_model(m).get("name"), "saes": [sae.get("key") for sae in m.get("saes", [])],
            "corpus": (m.get("corpus") or {}).get("spec"), "prompts": counts.get("prompts"),
            "finished": m.get("finished")}


def overview(store: Store, per_layer: int = 5, runs: Sequence[str] | None = None) -> JSON:
    """The catalog at a glance: counts, runs, the groups of runs that may be added together, and the
    strongest attention features of each layer (by total |attribution| over their edges) in the runs
    selected; when no selection is given and the stored runs do not share settings, the strongest
    features wait for a choice (``selection_error`` says so) instead of mixing them."""
    if not 1 <= per_layer <= 50:
        raise ValueError(f"per_layer must be between 1 and 50, got {per_layer}")
    runs_ = store.runs()
    groups = [{"settings": describe(s), "runs": ids} for s, ids in compatibility_groups([r for r in runs_ if holds_edges(r)])]
    out: JSON = {"store": public_url(store.url), "counts": store.counts(), "runs": [run_summary(r) for r in runs_],
                 "run_groups": groups, "strongest_attention": []}
    try:
        selected = select_runs(store, runs)
    except IncompatibleRuns as exc:
        if runs:
            raise
        return {**out, "selection_error": str(exc)}
    chosen = [r for r in runs_ if r.run_id in selected]
    layers = sorted({sae["layer"] for r in chosen for sae in r.manifest.get("saes", []) if sae.get("kind") == "attn"})
    out["strongest_attention"] = [{"layer": layer, "features": top_features(
        store, kind="attn", by="total", limit=per_layer, layer=layer, runs=selected)} for layer in layers]
    return out


def composition_counts(store: Store, runs: Sequence[str] | None = None) -> list[JSON]:
    """Attention->attention composition per (source layer, target layer): direct edges, and two-hop
    paths through one residual feature (A_l -> R_m -> A_L, l < m = L), in the runs selected."""
    selected = select_runs(store, runs)
    counts: dict[tuple[int, int, str], list[float]] = {}
    into_resid: dict[str, list[tuple[int, float]]] = {}
    for e in store.all_edges(("resid_in",), selected):
        if "|A" in e.src and ".ERR" not in e.src and ".BIAS" not in e.src:
            into_resid.setdefault(e.dst, []).append((_layer(e.src), e.sum))
    for e in store.all_edges(("direct", "attn_in"), selected):
        if not _is_attn_feature(e.dst):
            continue
        L = _layer(e.dst)
        if e.kind == "direct" and _is_attn_feature(e.src):
            c = counts.setdefault((_layer(e.src), L, "direct"), [0, 0.0])
            c[0] += 1
            c[1] += abs(e.sum)
        elif e.kind == "attn_in" and e.src in into_resid:
            for l, s in into_resid[e.src]:
                c = counts.setdefault((l, L, "via_resid"), [0, 0.0])
                c[0] += 1
                c[1] += abs(s * e.sum)
    return [{"source_layer": l, "target_layer": L, "path": path, "n_pairs": n, "total_abs": rnd(t)}
            for (l, L, path), (n, t) in sorted(counts.items())]


@functools.lru_cache(maxsize=1 << 17)
def node_ref_of(uid: str) -> NodeRef:
    """The parsed id of a catalog node uid (``model|sae|ref``; the ref holds no '|'). Cached: mining
    asks it for the same few thousand uids millions of times."""
    return parse_ref(uid.rpartition("|")[2])


def _is_attn_feature(uid: str) -> bool:
    return node_ref_of(uid).kind is NodeKind.ATTN


def _layer(uid: str) -> int:
    layer = node_ref_of(uid).layer
    if layer is None:
        raise ValueError(f"{uid} has no layer")
    return layer


def runs(store: Store) -> list[JSON]:
    return [{"run_id": r.run_id, "status": r.status, "manifest": r.manifest} for r in store.runs()]


def run(store: Store, run_id: str) -> JSON:
    r = store.run(run_id)
    if r is None:
        raise NotFound(f"no run {run_id!r} in {store.url}")
    return {"run_id": r.run_id, "status": r.status, "manifest": r.manifest}


__all__ = ["upstream", "downstream", "edge", "feature", "features_by_token", "prompt", "prompt_graph", "top_features",
           "composition_counts", "runs", "run", "resolve", "NotFound", "Ambiguous", "NodeRefError"]
