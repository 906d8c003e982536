"""What feeds a feature in one run against another: upstream edges side by side, ranked by change.

Runs differ in size, so the comparable number is an edge's attribution *per prompt of its run*
(its sum over the run divided by the run's prompt count: mean attribution per observation times
how often it is observed); ``change`` is run B's minus run A's. Each side also shows how many
prompts and observations (its evidence count) back it. The two runs are never added together, so
they may differ in settings; the answer says whether they do.
"""

from __future__ import annotations

from collections.abc import Sequence

from catalog.queries import MAX_LIMIT, resolve, rnd
from catalog.runs import describe, select_runs, settings_of
from catalog.schema import EDGE_KINDS, JSON, EdgeStats, NodeInfo
from catalog.stores.base import EdgeQuery, Store

EVERY_EDGE = 1_000_000  # a node's upstream edges in one run are read whole: the ranking needs all of them


def _side(e: EdgeStats | None, n_prompts: int) -> JSON | None:
    if e is None:
        return None
    return {"n_prompts": e.n_prompts, "n_obs": e.n_obs, "sum": rnd(e.sum), "mean": rnd(e.sum / e.n_obs if e.n_obs else 0.0),
            "per_prompt": rnd(e.sum / n_prompts if n_prompts else 0.0)}


def diff(store: Store, ref: str, run_a: str, run_b: str, *, model: str | None = None, limit: int = 20,
         edge_kinds: Sequence[str] | None = None, direction: str = "up") -> JSON:
    """Edges into (``direction`` 'up') or out of ('down') ``ref`` in runs A and B, side by side, ranked
    by |change in attribution per prompt|, then by id and edge kind."""
    if run_a == run_b:
        raise ValueError(f"diff needs two different runs, got {run_a!r} twice")
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    bad = [k for k in edge_kinds or () if k not in EDGE_KINDS]
    if bad:
        raise ValueError(f"unknown edge kind(s) {bad}: expected {', '.join(EDGE_KINDS)}")
    for run in (run_a, run_b):
        select_runs(store, [run])  # exists and holds edges
    node = resolve(store, ref, model)
    sides: list[dict[tuple[str, str], tuple[NodeInfo, EdgeStats]]] = []
    prompts = []
    for run in (run_a, run_b):
        q = EdgeQuery(tuple(edge_kinds) if edge_kinds else None, None, None, 0, "abs", EVERY_EDGE, 0, (run,))
        sides.append({(other.uid, e.kind): (other, e) for other, e in store.neighbours(node.uid, direction, q)})
        prompts.append(store.prompt_count(run))
    rows = []
    for key in sides[0].keys() | sides[1].keys():
        a, b = sides[0].get(key), sides[1].get(key)
        other = (a or b or sides[1][key])[0]  # one side holds it
        per_a = a[1].sum / prompts[0] if a and prompts[0] else 0.0
        per_b = b[1].sum / prompts[1] if b and prompts[1] else 0.0
        rows.append((-abs(per_b - per_a), other.uid, key[1], {
            "id": other.ref, "uid": other.uid, "kind": other.kind, "layer": other.layer, "edge_kind": key[1],
            "change": rnd(per_b - per_a), "a": _side(a[1] if a else None, prompts[0]),
            "b": _side(b[1] if b else None, prompts[1])}))
    rows.sort(key=lambda r: r[:3])
    settings = {r.run_id: settings_of(r) for r in store.runs() if r.run_id in (run_a, run_b)}
    same = settings[run_a] == settings[run_b]
    return {"feature": node.ref, "uid": node.uid, "direction": direction,
            "runs": {"a": {"run": run_a, "prompts": prompts[0]}, "b": {"run": run_b, "prompts": prompts[1]}},
            "same_settings": same,
            "settings": None if same else {"a": describe(settings[run_a]), "b": describe(settings[run_b])},
            "n_edges": len(rows), "edges": [r[3] for r in rows[:limit]]}
