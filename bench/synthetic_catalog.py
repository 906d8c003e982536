"""A synthetic catalog for the store and API benchmarks: ~1M observations over 50k features with Zipf-like
degrees, written as runs of one setting (bench/store.py times the writes and queries, bench/api_load.py
serves it over HTTP; both import this, not each other)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

from catalog.ids import attn, resid  # noqa: E402
from catalog.schema import NodeInfo, Prompt  # noqa: E402
from ingest.reduce import Activations, Observations  # noqa: E402
from ingest.to_catalog import aggregate_rows  # noqa: E402

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


RUN_MANIFEST = {"kind": "ingest", "model": {"name": "bench"}, "saes": [{"key": "rel"}],
                "pruning": {"top_k": 50, "min_abs": 0.0, "direct": True, "direct_positions": "last"}}


def run_ids(n_runs: int) -> list[str]:
    return [f"bench-{k}" for k in range(n_runs)]


def make_batches(n_obs: int, seed: int = 0, run: str = "bench-0"):
    rng = np.random.default_rng(seed)
    nodes = feature_nodes()
    perm = np.random.default_rng(0).permutation(len(nodes))  # the same popular features in every run
    n_prompts = n_obs // PER_PROMPT
    for start in range(0, n_prompts, PROMPTS_PER_BATCH):
        ids = [f"s{seed}p{i:06d}" for i in range(start, min(n_prompts, start + PROMPTS_PER_BATCH))]  # seed: new prompts
        prompts = [Prompt(f"{run}/{pid}", run, pid, f"prompt {pid}", [f"t{j}" for j in range(64)], "bench", f"h{pid}")
                   for pid in ids]
        m = len(prompts) * PER_PROMPT
        cols = [np.repeat(np.arange(len(prompts)), PER_PROMPT), perm[zipf_index(rng, len(nodes), m)],
                perm[zipf_index(rng, len(nodes), m)], rng.integers(0, 3, m), rng.integers(-1, 12, m),
                rng.integers(0, 64, m), rng.integers(0, 64, m), rng.normal(0, 1, m)]
        obs = Observations(*(torch.from_numpy(np.ascontiguousarray(c)) for c in cols))
        # one activation per (prompt, feature, position) that an observation reaches, as RDFA's targets are
        _, first = np.unique((cols[0] * len(nodes) + cols[2]) * 64 + cols[6], return_index=True)
        at = torch.from_numpy(first)
        acts = Activations(obs.dst[at], obs.prompt[at], obs.value.abs()[at], obs.dst_pos[at])
        yield aggregate_rows(obs, acts, nodes, run, prompts, 8)


def fill_runs(store, n_obs: int, n_runs: int):
    """Write ``n_obs`` observations, split evenly over ``n_runs`` runs of one setting; yields each
    window after it is written (for timing)."""
    for k, run in enumerate(run_ids(n_runs)):
        store.start_run(run, RUN_MANIFEST, resume=False)
        yield from make_batches(n_obs // n_runs, seed=k, run=run)
        store.finish_run(run, "done", {})
