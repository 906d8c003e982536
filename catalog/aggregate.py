"""Pure aggregation: one batch's observations -> EdgeDelta per edge + evidence bounded per edge.

Observations arrive as parallel numpy arrays (what RDFA produced, positions kept); nodes and
prompts are referred to by their index in the batch's lists. No torch.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from catalog.schema import EdgeDelta, Evidence, NodeStats


@dataclass
class Observations:
    """Edges of several prompts: one row per (prompt, src@pos, dst@pos, kind, head). head -1: none."""

    prompt: np.ndarray  # int, index into the batch's prompt uids
    src: np.ndarray  # int, index into the batch's node uids
    dst: np.ndarray
    kind: np.ndarray  # int, index into kind_names
    head: np.ndarray
    src_pos: np.ndarray
    dst_pos: np.ndarray
    value: np.ndarray  # float64


def aggregate_edges(obs: Observations, node_uids: list[str], prompt_uids: list[str], kind_names: list[str],
                    evidence_per_edge: int | None) -> tuple[list[EdgeDelta], list[Evidence]]:
    """Group by (src, dst, kind); sums in float64; evidence = top-N |value| per edge (all if None)."""
    if len(obs.value) == 0:
        return [], []
    n_nodes, n_kinds = len(node_uids), len(kind_names)
    key = (obs.src.astype(np.int64) * n_nodes + obs.dst) * n_kinds + obs.kind
    keys, inv = np.unique(key, return_inverse=True)
    m = len(keys)
    v = obs.value.astype(np.float64)
    n_obs = np.bincount(inv, minlength=m)
    sums = np.bincount(inv, v, m)
    sumsq = np.bincount(inv, v * v, m)
    sum_abs = np.bincount(inv, np.abs(v), m)
    n_pos = np.bincount(inv, (v > 0).astype(np.float64), m).astype(np.int64)
    mins = np.full(m, np.inf)
    maxs = np.full(m, -np.inf)
    np.minimum.at(mins, inv, v)
    np.maximum.at(maxs, inv, v)
    n_prompts = np.bincount(np.unique(inv.astype(np.int64) * (len(prompt_uids) + 1) + obs.prompt) // (len(prompt_uids) + 1),
                            minlength=m)
    heads = _head_sums(inv, obs.head, v, m)
    src_i, rem = np.divmod(keys, n_nodes * n_kinds)
    dst_i, kind_i = np.divmod(rem, n_kinds)
    cols = [a.tolist() for a in (src_i, dst_i, kind_i, n_prompts, n_obs, sums, sumsq, sum_abs, mins, maxs, n_pos)]
    deltas = [EdgeDelta(node_uids[s], node_uids[d], kind_names[k], *rest, heads.get(e, {}))
              for e, (s, d, k, *rest) in enumerate(zip(*cols))]
    keep = _top_evidence(inv, obs, prompt_uids, evidence_per_edge)
    cols = [a[keep].tolist() for a in (obs.src, obs.dst, obs.kind, obs.prompt, obs.src_pos, obs.dst_pos, obs.head,
                                       obs.value)]
    with _no_gc():  # 1e5 short-lived tuples would otherwise trigger repeated full GC passes
        evidence = [Evidence(node_uids[s], node_uids[d], kind_names[k], prompt_uids[p], sp, dp, None if h < 0 else h, v)
                    for s, d, k, p, sp, dp, h, v in zip(*cols)]
    return deltas, evidence


@contextmanager
def _no_gc():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _head_sums(inv: np.ndarray, head: np.ndarray, v: np.ndarray, m: int) -> dict[int, dict[int, float]]:
    has = head >= 0
    if not has.any():
        return {}
    n_heads = int(head.max()) + 1
    flat = np.bincount(inv[has] * n_heads + head[has], v[has], m * n_heads).reshape(m, n_heads)
    seen = np.bincount(inv[has] * n_heads + head[has], minlength=m * n_heads).reshape(m, n_heads) > 0
    return {int(e): {int(h): float(flat[e, h]) for h in np.nonzero(seen[e])[0]} for e in np.nonzero(seen.any(1))[0]}


def _top_evidence(inv, obs: Observations, prompt_uids: list[str], n: int | None) -> np.ndarray:
    """Row indices of the top-n |value| observations of each edge, ties broken as Evidence.rank_key."""
    prompt_rank = np.argsort(np.argsort(np.array(prompt_uids, dtype=object)))  # rank by uid string
    order = np.lexsort((obs.head, obs.dst_pos, obs.src_pos, prompt_rank[obs.prompt], -np.abs(obs.value), inv))
    if n is None:
        return order
    grouped = inv[order]
    start = np.searchsorted(grouped, grouped, side="left")
    rank = np.arange(len(order)) - start
    return order[rank < n]


def node_stats(node_uid_idx: np.ndarray, prompt_idx: np.ndarray, act: np.ndarray, node_uids: list[str],
               n_prompts_total: int) -> list[NodeStats]:
    """Per node: active positions, prompts it was active in, sum and max of activation."""
    if len(act) == 0:
        return []
    keys, inv = np.unique(node_uid_idx, return_inverse=True)
    m = len(keys)
    n_obs = np.bincount(inv, minlength=m)
    sums = np.bincount(inv, act.astype(np.float64), m)
    maxs = np.full(m, -np.inf)
    np.maximum.at(maxs, inv, act.astype(np.float64))
    n_prompts = np.bincount(np.unique(inv.astype(np.int64) * (n_prompts_total + 1) + prompt_idx) // (n_prompts_total + 1),
                            minlength=m)
    return [NodeStats(node_uids[keys[i]], int(n_obs[i]), int(n_prompts[i]), float(sums[i]), float(maxs[i]))
            for i in range(m)]


def merge_evidence(existing: list[Evidence], new: list[Evidence], n: int | None) -> list[Evidence]:
    """The evidence an edge keeps after ``new`` arrives: top-n by Evidence.rank_key."""
    merged = sorted(set(existing) | set(new), key=Evidence.rank_key)
    return merged if n is None else merged[:n]
