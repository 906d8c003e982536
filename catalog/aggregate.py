"""Pure aggregation: one batch's observations -> EdgeDelta per edge + evidence bounded per edge.

Observations arrive as parallel numpy arrays (what RDFA produced, positions kept); nodes and
prompts are referred to by their index in the batch's lists. No torch.
"""

from __future__ import annotations

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
    deltas = [EdgeDelta(node_uids[src_i[e]], node_uids[dst_i[e]], kind_names[kind_i[e]], int(n_prompts[e]),
                        int(n_obs[e]), float(sums[e]), float(sumsq[e]), float(sum_abs[e]), float(mins[e]),
                        float(maxs[e]), int(n_pos[e]), heads.get(e, {})) for e in range(m)]
    keep = _top_evidence(inv, obs, prompt_uids, evidence_per_edge)
    evidence = [Evidence(node_uids[obs.src[i]], node_uids[obs.dst[i]], kind_names[obs.kind[i]],
                         prompt_uids[obs.prompt[i]], int(obs.src_pos[i]), int(obs.dst_pos[i]),
                         None if obs.head[i] < 0 else int(obs.head[i]), float(obs.value[i])) for i in keep]
    return deltas, evidence


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
