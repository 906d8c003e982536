"""Store benchmark: ~1M observations over 50k features with Zipf-like degrees, into SQLite and a
live Neo4j (started here from tools/neo4j-server).

Prints per store: write throughput (observations/s and aggregated edge updates/s), for Neo4j the
ratio of batched UNWIND writes to one query per edge (same edges, same run), and p50/p99 latency of
upstream, downstream, edge and prompt queries. Usage: python bench/store.py [--obs 1000000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from catalog import queries  # noqa: E402
from catalog.aggregate import Observations, aggregate_edges, node_stats  # noqa: E402
from catalog.ids import attn, resid  # noqa: E402
from catalog.neo4j_server import running_on_free_port  # noqa: E402
from catalog.schema import Batch, NodeInfo, Prompt  # noqa: E402
from catalog.stores import open_store  # noqa: E402

KINDS = ["attn_in", "resid_in", "direct"]
N_FEATURES = 50_000
PER_PROMPT = 1000
PROMPTS_PER_BATCH = 20


def feature_nodes() -> list[NodeInfo]:
    half = N_FEATURES // 2
    return [NodeInfo.of("bench", "rel", attn(i % 12, i // 12)) for i in range(half)] + \
           [NodeInfo.of("bench", "rel", resid(i % 12, i // 12)) for i in range(half)]


def zipf_index(rng, n, size, a=1.3):
    """Zipf-like ranks folded into [0, n), shuffled so popular features spread over layers."""
    return (rng.zipf(a, size) - 1) % n


def make_batches(n_obs: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    nodes = feature_nodes()
    uids = [n.uid for n in nodes]
    perm = rng.permutation(len(nodes))
    n_prompts = n_obs // PER_PROMPT
    for start in range(0, n_prompts, PROMPTS_PER_BATCH):
        ids = [f"s{seed}p{i:06d}" for i in range(start, min(n_prompts, start + PROMPTS_PER_BATCH))]  # seed: new prompts
        prompts = [Prompt(f"bench/{pid}", "bench", pid, f"prompt {pid}", [f"t{j}" for j in range(64)], "bench", f"h{pid}")
                   for pid in ids]
        m = len(prompts) * PER_PROMPT
        obs = Observations(np.repeat(np.arange(len(prompts)), PER_PROMPT), perm[zipf_index(rng, len(nodes), m)],
                           perm[zipf_index(rng, len(nodes), m)], rng.integers(0, 3, m), rng.integers(-1, 12, m),
                           rng.integers(0, 64, m), rng.integers(0, 64, m), rng.normal(0, 1, m))
        deltas, evidence = aggregate_edges(obs, uids, [p.uid for p in prompts], KINDS, 8)
        stats = node_stats(obs.dst, obs.prompt, np.abs(obs.value), uids, len(prompts))
        used = sorted(set(obs.src.tolist()) | set(obs.dst.tolist()))
        yield Batch("bench", prompts, [nodes[i] for i in used], deltas, evidence, stats)


def pct(xs, q):
    return float(np.percentile(np.array(xs) * 1000, q))


def latencies(store, rng, n=200) -> dict:
    edges = list(store.all_edges())
    feats = sorted({e.dst.split("|")[2] for e in edges})
    prompts = [p.uid for p in store.prompts([f"bench/s0p{i:06d}" for i in range(50)]).values()]
    out = {}
    for name, fn in (
            ("upstream", lambda: queries.upstream(store, feats[rng.integers(len(feats))], limit=20)),
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


def per_edge_baseline(store, batch: Batch, n: int) -> float:
    """Upserts/s when every aggregated edge is its own auto-commit query (the naive way)."""
    from catalog.stores.neo4j import WRITE_EDGES, _dense_heads

    rows = [{"key": e.key, "src": e.src, "dst": e.dst, "kind": e.kind, "n_prompts": e.n_prompts, "n_obs": e.n_obs,
             "sum": e.sum, "sumsq": e.sumsq, "sum_abs": e.sum_abs, "min": e.min, "max": e.max, "n_pos": e.n_pos,
             "heads": _dense_heads(e.head_sums)} for e in batch.edges[:n]]
    t = time.perf_counter()
    for row in rows:
        store.driver.execute_query(WRITE_EDGES, rows=[row], database_=store.database)
    return len(rows) / (time.perf_counter() - t)


def bench_store(url: str, n_obs: int, baseline: bool) -> None:
    store = open_store(url)
    t0 = time.perf_counter()
    n_edges = n_ev = 0
    agg_time = 0.0
    for batch in make_batches(n_obs):
        t = time.perf_counter()
        store.write_batch(batch)
        agg_time += time.perf_counter() - t
        n_edges += len(batch.edges)
        n_ev += len(batch.evidence)
    wall = time.perf_counter() - t0
    print(f"  write: {n_obs / agg_time:,.0f} observations/s, {n_edges / agg_time:,.0f} edge upserts/s "
          f"({n_edges:,} upserts, {n_ev:,} evidence rows; {agg_time:.0f} s in write_batch, {wall:.0f} s with "
          "synthetic aggregation)")
    if baseline:
        batched = n_edges / agg_time
        first = next(make_batches(PER_PROMPT * PROMPTS_PER_BATCH, seed=99))
        store.write_batch(first)  # new prompts, so the baseline updates edges the same way
        per_edge = per_edge_baseline(store, first, 2000)
        print(f"  one query per edge: {per_edge:,.0f} upserts/s -> batched is {batched / per_edge:.1f}x")
    for name, (p50, p99) in latencies(store, np.random.default_rng(1)).items():
        print(f"  {name:<10} p50 {p50:6.2f} ms   p99 {p99:6.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--obs", type=int, default=1_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        print(f"{args.obs:,} observations, {N_FEATURES:,} features, Zipf(1.3) degrees, evidence 8 per edge")
        print("SQLite:")
        bench_store(f"sqlite:///{tmp}/bench.db", args.obs, baseline=False)
        with running_on_free_port(f"{tmp}/neo4j", page_cache="1g", heap="3g") as neo:
            print("Neo4j:")
            bench_store(neo, args.obs, baseline=True)

if __name__ == "__main__":
    main()
