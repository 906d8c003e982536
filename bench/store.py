"""Store benchmark: ~1M observations over 50k features with Zipf-like degrees, spread over 5 runs of
one setting (edges are stored per run, so a query sums 5 rows per edge), into SQLite and a live
Neo4j (started here from tools/neo4j-server).

Prints per store: write throughput (observations/s and aggregated edge updates/s), for Neo4j the
ratio of batched UNWIND writes to one query per edge (same edges, same run), p50/p99 latency of
upstream (over all runs and over one), downstream, edge, diff and prompt queries, and the API's
latency at 8 clients (bench/api_load.py), each against its target: upstream p50 <= 10 ms and API
p99 <= 50 ms on both stores. Usage: python bench/store.py [--obs 1000000] [--runs 5] [--no-api]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from synthetic_catalog import N_FEATURES, PER_PROMPT, PROMPTS_PER_BATCH, fill_runs, make_batches, run_ids  # noqa: E402

from catalog import queries  # noqa: E402
from catalog.diff import diff  # noqa: E402
from catalog.stores import open_store  # noqa: E402
from cli.neo4j_server import running_on_free_port  # noqa: E402

KINDS = ["attn_in", "resid_in", "direct"]
P50_TARGET_MS, API_P99_TARGET_MS = 10.0, 50.0


def pct(xs, q):
    return float(np.percentile(np.array(xs) * 1000, q))


def latencies(store, rng, runs: list[str], n=200) -> dict:
    edges = list(store.all_edges())
    feats = sorted({e.dst.split("|")[2] for e in edges})
    prompts = [p.uid for p in store.prompts([f"{runs[0]}/s0p{i:06d}" for i in range(50)]).values()]
    out = {}
    for name, fn in (
            ("upstream", lambda: queries.upstream(store, feats[rng.integers(len(feats))], limit=20)),
            ("upstream, one run", lambda: queries.upstream(store, feats[rng.integers(len(feats))], limit=20,
                                                             runs=runs[:1])),
            ("diff", lambda: diff(store, feats[rng.integers(len(feats))], runs[0], runs[-1], limit=20)),
            ("downstream", lambda: queries.downstream(store, feats[rng.integers(len(feats))], limit=20)),
            ("edge", lambda: (lambda e: queries.edge(store, e.src.split("|")[2], e.dst.split("|")[2]))(
                edges[rng.integers(len(edges))])),
            ("prompt", lambda: queries.prompt_graph(store, prompts[rng.integers(len(prompts))], limit=200))):
        fn()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[name] = (pct(times, 50), pct(times, 99))
    return out


def per_edge_baseline(store, batch, n: int) -> float:
    """Upserts/s when every aggregated edge is its own auto-commit lookup and update (the naive way)."""
    from catalog.schema import edge_key
    from catalog.stores.neo4j import FIND_EDGES, UPDATE_EDGES

    e = batch.edges
    ids = np.array([store._ids[node.uid] for node in batch.nodes], dtype=np.int64)
    keys = edge_key(ids[e.src], ids[e.dst], e.kind)[:n].tolist()
    t = time.perf_counter()
    for i, key in enumerate(keys):
        eid = store.driver.execute_query(FIND_EDGES, keys=[key], run=batch.run, database_=store.database).records[0][1]
        store.driver.execute_query(UPDATE_EDGES, eid=[eid], n_prompts=[int(e.n_prompts[i])], n_obs=[int(e.n_obs[i])],
                                   sum=[float(e.sum[i])], sumsq=[float(e.sumsq[i])], sum_abs=[float(e.sum_abs[i])],
                                   min=[float(e.min[i])], max=[float(e.max[i])], n_pos=[int(e.n_pos[i])], heads=[],
                                   hoff=[0, 0], database_=store.database)
    return len(keys) / (time.perf_counter() - t)


def bench_store(url: str, n_obs: int, n_runs: int, baseline: bool, api: bool) -> None:
    store = open_store(url)
    t0 = time.perf_counter()
    n_edges = n_ev = 0
    agg_time = 0.0
    for batch in fill_runs(store, n_obs, n_runs):
        t = time.perf_counter()
        store.write_window(batch)
        agg_time += time.perf_counter() - t
        n_edges += len(batch.edges)
        n_ev += len(batch.evidence)
    wall = time.perf_counter() - t0
    print(f"  write: {n_obs / agg_time:,.0f} observations/s, {n_edges / agg_time:,.0f} edge upserts/s "
          f"({n_edges:,} upserts, {n_ev:,} evidence rows; {agg_time:.0f} s in write_window, {wall:.0f} s with "
          "synthetic aggregation)")
    if baseline:
        batched = n_edges / agg_time
        first = next(make_batches(PER_PROMPT * PROMPTS_PER_BATCH, seed=99, run=run_ids(n_runs)[-1]))
        store.write_window(first)  # new prompts, so the baseline updates edges the same way
        per_edge = per_edge_baseline(store, first, 2000)
        print(f"  one query per edge: {per_edge:,.0f} upserts/s -> batched is {batched / per_edge:.1f}x")
    print(f"  {store.counts()['edges']:,} edge rows (one per edge and run) in {n_runs} runs")
    for name, (p50, p99) in latencies(store, np.random.default_rng(1), run_ids(n_runs)).items():
        verdict = f"   target p50 <= {P50_TARGET_MS:g} ms: {'met' if p50 <= P50_TARGET_MS else 'MISSED'}" \
            if name == "upstream" else ""
        print(f"  {name:<18} p50 {p50:6.2f} ms   p99 {p99:6.2f} ms{verdict}")
    if api:
        from api_load import serve_and_measure

        feats = sorted({e.dst.split("|")[2] for e in store.all_edges()})
        serve_and_measure(url, feats, 400, workers=1)
        p99 = serve_and_measure(url, feats, 400, workers=2)
        print(f"  API target p99 <= {API_P99_TARGET_MS:g} ms (2 server processes): "
              f"{'met' if p99 <= API_P99_TARGET_MS else 'MISSED'}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--obs", type=int, default=1_000_000, help="observations in all runs together")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-api", dest="api", action="store_false", help="skip the API load over HTTP")
    ap.add_argument("--no-baseline", dest="baseline", action="store_false",
                    help="skip Neo4j's one-query-per-edge baseline")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        print(f"{args.obs:,} observations in {args.runs} runs of one setting, {N_FEATURES:,} features, Zipf(1.3) "
              "degrees, evidence 8 per edge and run")
        print("SQLite:")
        bench_store(f"sqlite:///{tmp}/bench.db", args.obs, args.runs, baseline=False, api=args.api)
        with running_on_free_port(f"{tmp}/neo4j", page_cache="1g", heap="3g") as neo:
            print("Neo4j:")
            bench_store(neo, args.obs, args.runs, baseline=args.baseline, api=args.api)

if __name__ == "__main__":
    main()
