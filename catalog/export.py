"""Copy a catalog between stores (SQLite <-> Neo4j), losslessly, in bounded chunks.

Rows read from the source become the same columnar WindowAggregate an ingest writes, so the target
loads them through its bulk path (import_window: no prompt claim, no evidence trim).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any, TypeVar

import numpy as np

from catalog.aggregate import (
    EdgeColumns,
    EvidenceColumns,
    HeadColumns,
    HistColumns,
    RoleColumns,
    StatColumns,
    TopColumns,
    WindowAggregate,
    empty_columns,
)
from catalog.runs import EXPORTING
from catalog.schema import EDGE_KINDS, JSON, ROLES, Prompt, Run
from catalog.stores.base import Store, StoreError

T = TypeVar("T")


def _chunks(items: Iterable[T], n: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(islice(it, n)):
        yield chunk


def copy_catalog(src: Store, dst: Store, chunk: int = 20_000) -> JSON:
    """Runs, prompts, nodes, per run: node statistics, edges (+head sums) and all evidence, and the
    stored mining results;
    returns the counts copied (edges and evidence: stored rows, one per edge and run)."""
    if not getattr(dst, "queryable", True):  # neo4j-import:DIR
        return copy_into_import_files(src, dst, chunk)
    if dst.runs() or next(iter(dst.all_nodes()), None) is not None:
        cut = [r.run_id for r in dst.runs() if r.status == EXPORTING]
        raise StoreError(f"export target {dst.url} is not empty; export into an empty catalog" + (
            f" (an earlier export into it was interrupted: runs {', '.join(cut)} are incomplete; delete what it "
            "holds first)" if cut else ""))
    runs = src.runs()
    # first, marked incomplete: the target files each run's rows under the run, and queries refuse a run that
    # is still EXPORTING; each run gets its own status back once all of its rows are in
    dst.import_runs([Run(r.run_id, EXPORTING, r.manifest) for r in runs])
    nodes = [n for n, _ in src.all_nodes()]
    row = {n.uid: i for i, n in enumerate(nodes)}
    prompts = list(src.all_prompts())
    prompt_row = {p.uid: i for i, p in enumerate(prompts)}
    kind = {k: i for i, k in enumerate(EDGE_KINDS)}

    def window(run: str, **cols: Any) -> WindowAggregate:
        return WindowAggregate(run, [], nodes, **{
            "edges": empty_columns(EdgeColumns), "heads": empty_columns(HeadColumns),
            "evidence": empty_columns(EvidenceColumns), "stats": empty_columns(StatColumns), "evidence_cap": None,
            "roles": empty_columns(RoleColumns),
            **cols})
    counts = {"nodes": len(nodes), "edges": 0, "evidence": 0, "prompts": 0, "runs": len(runs), "mined": 0}
    for prompts_part in _chunks(prompts, chunk):
        agg = window(prompts_part[0].run)
        agg.prompts = prompts_part
        dst.import_window(agg)
        counts["prompts"] += len(prompts_part)
    for run in (r.run_id for r in runs):
        stats = [(row[n.uid], s) for n, s in src.all_nodes((run,)) if s is not None]
        tops, hists, top_prompts = activation_columns(src, run, row, {p.uid: p for p in prompts})
        agg = window(run, stats=StatColumns(*_arrays(
            stats, lambda r: r[0], lambda r: r[1].n_obs, lambda r: r[1].n_prompts, lambda r: r[1].sum_act,
            lambda r: r[1].max_act)), tops=tops, hists=hists)  # with their statistics: Neo4j keeps them on its Stats
        agg.prompts = top_prompts  # stored above already
        dst.import_window(agg)
        for edges_part in _chunks(src.all_edges(runs=(run,)), chunk):
            heads = [(row[e.src], row[e.dst], kind[e.kind], h, v) for e in edges_part
                     for h, v in sorted(e.head_sums.items())]
            roles = [(row[e.src], row[e.dst], kind[e.kind], ROLES.index(name), n, a) for e in edges_part
                     for name, (n, a) in sorted(e.roles.items())]
            dst.import_window(window(
                run, edges=EdgeColumns(*_arrays(
                    edges_part, lambda e: row[e.src], lambda e: row[e.dst], lambda e: kind[e.kind],
                    *(lambda e, c=c: getattr(e, c) for c in (
                        "n_prompts", "n_obs", "sum", "sumsq", "sum_abs", "min", "max", "n_pos")))),
                heads=HeadColumns(*_arrays(heads, *(lambda r, i=i: r[i] for i in range(5)))),
                roles=RoleColumns(*_arrays(roles, *(lambda r, i=i: r[i] for i in range(6))))))
            counts["edges"] += len(edges_part)
        for evidence_part in _chunks(src.all_evidence((run,)), chunk):
            used = sorted({v.prompt for v in evidence_part})
            local = {uid: i for i, uid in enumerate(used)}
            agg = window(run, evidence=EvidenceColumns(*_arrays(
                evidence_part, lambda v: row[v.src], lambda v: row[v.dst], lambda v: kind[v.kind],
                lambda v: local[v.prompt],  # noqa: B023 - consumed here
                lambda v: v.src_pos, lambda v: v.dst_pos, lambda v: -1 if v.head is None else v.head,
                lambda v: v.value)))
            agg.prompts = [prompts[prompt_row[uid]] for uid in used]  # stored above already: inserts are no-ops
            dst.import_window(agg)
            counts["evidence"] += len(evidence_part)
    # stored mining results stay current: their fingerprints (runs, status, prompt counts) are copied too
    for key, state, stamp, result in src.all_mined():
        dst.put_mined(key, state, stamp, result)
        counts["mined"] += 1
    dst.import_runs(runs)  # last: every row is in
    return counts


def activation_columns(src: Store, run: str, row: dict[str, int],
                       prompts: dict[str, Prompt]) -> tuple[TopColumns, HistColumns, list[Prompt]]:
    """A run's top activations and histograms in ``src`` as columns naming nodes by ``row`` and prompts by their
    place in the list returned with them."""
    tops: list[tuple[Any, ...]] = []
    hists: list[tuple[int, int, int]] = []
    used: dict[str, int] = {}
    for uid, rows, hist in src.all_activations((run,)):
        for t in rows:
            at = used.setdefault(t.prompt, len(used))
            tops.append((row[uid], at, t.pos, t.act, -1 if t.src is None else row[t.src], t.src_pos, t.head, t.value))
        hists += [(row[uid], b, n) for b, n in sorted(hist.items())]
    return (TopColumns(*_arrays(tops, *(lambda r, i=i: r[i] for i in range(8)))) if tops else
            empty_columns(TopColumns),
            HistColumns(*_arrays(hists, *(lambda r, i=i: r[i] for i in range(3)))) if hists else
            empty_columns(HistColumns),
            [prompts[uid] for uid in used])


def _arrays(rows: Sequence[Any], *getters: Callable[[Any], Any]) -> list[np.ndarray]:
    """One numpy column per getter (float64 where the values are floats, else int64)."""
    out = []
    for get in getters:
        values = [get(r) for r in rows]
        out.append(np.array(values, dtype=np.float64 if values and isinstance(values[0], float) else np.int64))
    return out


def copy_into_import_files(src: Store, files: Any, chunk: int = 20_000) -> JSON:
    """``export --to neo4j-import:DIR``: every run of ``src`` written as Neo4j import files (its prompts, node
    statistics and edges, each edge one row with its head sums, roles and evidence list, read a chunk of edges
    at a time), for ``neo4j-server --import DIR`` to build a new database from; the runs keep their status and
    manifest. Stored mining results are not carried: ``mine`` stores them again once the database is up."""
    if files.runs():
        raise StoreError(f"{files.url} holds import files already; export into an empty folder")
    nodes = [n for n, _ in src.all_nodes()]
    row = {n.uid: i for i, n in enumerate(nodes)}
    kind = {k: i for i, k in enumerate(EDGE_KINDS)}
    by_run: dict[str, list[Any]] = {}
    for p in src.all_prompts():
        by_run.setdefault(p.run, []).append(p)
    counts = {"nodes": len(nodes), "edges": 0, "evidence": 0, "prompts": 0, "runs": 0}
    for run in src.runs():
        prompts = by_run.get(run.run_id, [])
        prompt_row = {p.uid: i for i, p in enumerate(prompts)}

        def parts(run_id: str = run.run_id, prompts: list[Any] = prompts,
                  prompt_row: dict[str, int] = prompt_row) -> Iterator[WindowAggregate]:
            stats = [(row[n.uid], s) for n, s in src.all_nodes((run_id,)) if s is not None]
            tops, hists, top_prompts = activation_columns(src, run_id, row, {p.uid: p for p in prompts})
            # the window's prompts are the run's: name the top activations' prompts by their rows there
            if len(tops):
                tops.prompt = np.array([prompt_row[p.uid] for p in top_prompts], np.int64)[tops.prompt]
            first = True
            for edges in _chunks(src.all_edges(runs=(run_id,)), chunk):
                lists = src.evidence_of_edges([(e.src, e.dst, e.kind) for e in edges], 1 << 30, (run_id,))
                evidence = [v for rows in lists for v in rows]
                heads = [(row[e.src], row[e.dst], kind[e.kind], h, v) for e in edges
                         for h, v in sorted(e.head_sums.items())]
                roles = [(row[e.src], row[e.dst], kind[e.kind], ROLES.index(name), n, a) for e in edges
                         for name, (n, a) in sorted(e.roles.items())]
                part = WindowAggregate(run_id, prompts, nodes, edges=EdgeColumns(*_arrays(
                    edges, lambda e: row[e.src], lambda e: row[e.dst], lambda e: kind[e.kind],
                    *(lambda e, c=c: getattr(e, c) for c in (
                        "n_prompts", "n_obs", "sum", "sumsq", "sum_abs", "min", "max", "n_pos")))),
                    heads=HeadColumns(*_arrays(heads, *(lambda r, i=i: r[i] for i in range(5)))),
                    roles=RoleColumns(*_arrays(roles, *(lambda r, i=i: r[i] for i in range(6)))),
                    evidence=EvidenceColumns(*_arrays(
                        evidence, lambda v: row[v.src], lambda v: row[v.dst], lambda v: kind[v.kind],
                        lambda v: prompt_row[v.prompt], lambda v: v.src_pos, lambda v: v.dst_pos,
                        lambda v: -1 if v.head is None else v.head, lambda v: v.value)),
                    stats=StatColumns(*_arrays(
                        stats if first else [], lambda r: r[0], lambda r: r[1].n_obs, lambda r: r[1].n_prompts,
                        lambda r: r[1].sum_act, lambda r: r[1].max_act)), evidence_cap=None,
                    tops=tops if first else empty_columns(TopColumns),
                    hists=hists if first else empty_columns(HistColumns))
                first = False
                counts["edges"] += len(edges)
                counts["evidence"] += len(evidence)
                yield part
            if first and stats:  # a run without edges: its statistics alone
                yield WindowAggregate(run_id, prompts, nodes, edges=empty_columns(EdgeColumns),
                                      heads=empty_columns(HeadColumns), roles=empty_columns(RoleColumns),
                                      evidence=empty_columns(EvidenceColumns), evidence_cap=None,
                                      stats=StatColumns(*_arrays(stats, lambda r: r[0], lambda r: r[1].n_obs,
                                                                 lambda r: r[1].n_prompts, lambda r: r[1].sum_act,
                                                                 lambda r: r[1].max_act)), tops=tops, hists=hists)

        files.start_run(run.run_id, run.manifest, resume=False)
        files.publish_run(run.run_id, prompts, nodes, parts())
        files.finish_run(run.run_id, run.status, run.manifest)
        counts["prompts"] += len(prompts)
        counts["runs"] += 1
    return counts
