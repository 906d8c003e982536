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
import torch  # noqa: E402

from catalog import queries  # noqa: E402
from catalog.ids import attn, resid  # noqa: E402
from catalog.schema import NodeInfo, Prompt  # noqa: E402
from catalog.stores import open_store  # noqa: E402
from cli.neo4j_server import running_on_free_port  # noqa: E402
from ingest.reduce import Activations, Observations  # noqa: E402
from ingest.to_catalog import aggregate_rows  # noqa: E402

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
    perm = rng.permutation(len(nodes))
    n_prompts = n_obs // PER_PROMPT
    for start in range(0, n_prompts, PROMPTS_PER_BATCH):
        ids = [f"s{seed}p{i:06d}" for i in range(start, min(n_prompts, start + PROMPTS_PER_BATCH))]  # seed: new prompts
        prompts = [Prompt(f"bench/{pid}", "bench", pid, f"prompt {pid}", [f"t{j}" for j in range(64)], "bench", f"h{pid}")
                   for pid in ids]
        m = len(prompts) * PER_PROMPT
        cols = [np.repeat(np.arange(len(prompts)), PER_PROMPT), perm[zipf_index(rng, len(nodes), m)],
                perm[zipf_index(rng, len(nodes), m)], rng.integers(0, 3, m), rng.integers(-1, 12, m),
                rng.integers(0, 64, m), rng.integers(0, 64, m), rng.normal(0, 1, m)]
        obs = Observations(*(torch.from_numpy(np.ascontiguousarray(c)) for c in cols))
        acts = Activations(obs.dst, obs.prompt, obs.value.abs())
        yield aggregate_rows(obs, acts, nodes, "bench", prompts, 8)


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


def per_edge_baseline(store, batch, n: int) -> float:
    """Upserts/s when every aggregated edge is its own auto-commit lookup and update (the naive way)."""
    from catalog.schema import edge_key
    from catalog.stores.neo4j import FIND_EDGES, UPDATE_EDGES

    e = batch.edges
    ids = np.array([store._ids[node.uid] for node in batch.nodes], dtype=np.int64)
    keys = edge_key(ids[e.src], ids[e.dst], e.kind)[:n].tolist()
    t = time.perf_counter()
    for i, key in enumerate(keys):
        eid = store.driver.execute_query(FIND_EDGES, keys=[key], database_=store.database).records[0][1]
        store.driver.execute_query(UPDATE_EDGES, eid=[eid], n_prompts=[int(e.n_prompts[i])], n_obs=[int(e.n_obs[i])],
                                   sum=[float(e.sum[i])], sumsq=[float(e.sumsq[i])], sum_abs=[float(e.sum_abs[i])],
                                   min=[float(e.min[i])], max=[float(e.max[i])], n_pos=[int(e.n_pos[i])], heads=[],
                                   hoff=[0, 0], database_=store.database)
    return len(keys) / (time.perf_counter() - t)


def bench_store(url: str, n_obs: int, baseline: bool) -> None:
    store = open_store(url)
    t0 = time.perf_counter()
    n_edges = n_ev = 0
    agg_time = 0.0
    for batch in make_batches(n_obs):
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
        first = next(make_batches(PER_PROMPT * PROMPTS_PER_BATCH, seed=99))
        store.write_window(first)  # new prompts, so the baseline updates edges the same way
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
