"""QK attribution at ingest: the scores behind a layer's kept attention edges, split exactly.

For every (prompt b, head h, query position t, key position s) that carries a kept ``attn_in`` or
``direct`` edge of layer L, the pre-softmax score of h from t to s is decomposed over the residual
SAE decomposition of resid_pre[L] at t (query side) and at s (key side) -- each active feature, the
error and the decoder bias -- as ingest/rdfa/qk.py derives (LN1's scale frozen):

    score = sum_ij pair_ij + sum_i query_bias_i + sum_j key_bias_j + bias_bias

Three edge kinds come out, all with head h, src_pos = s and dst_pos = t (the score's positions):
``q_in`` query-side node -> head H{L}.{h}, value pair_i. + query_bias_i (its whole share);
``k_in`` key-side node -> head, value pair_.j + key_bias_j; ``qk`` query-side node -> key-side node,
value pair_ij. Pruning keeps the top_k of each per score (and |value| >= min_abs), like RDFA's.
Units: attention-score logits, not feature pre-activations.
"""

from __future__ import annotations

import torch

from ingest.rdfa.steps import FlatRows
from ingest.rdfa.tensors import Code, EdgeKind, EdgeTable, Pruning

PAIRS_PER_CHUNK = 1 << 19  # pairwise terms computed at once (each gathers two [dh] vectors)


def score_keys(tables: list[EdgeTable], n_heads: int, T: int) -> torch.Tensor:
    """[n, 4] distinct (prompt, head, t, s) of the edges in ``tables`` that went through a head, sorted."""
    parts = []
    for table in tables:
        on = table.head >= 0
        b, h, t, s = table.prompt[on], table.head[on], table.dst_pos[on], table.src_pos[on]
        parts.append(((b * n_heads + h) * T + t) * T + s)
    if not parts:
        return torch.zeros(0, 4, dtype=torch.long)
    code = torch.unique(torch.cat(parts))
    s, code = code % T, code // T
    t, code = code % T, code // T
    return torch.stack([code // n_heads, code % n_heads, t, s], 1)


def _ragged(starts: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For groups of ``counts`` items beginning at ``starts``: (group of each item, item index)."""
    group = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    first = torch.cumsum(counts, 0) - counts
    within = torch.arange(int(counts.sum()), device=counts.device) - first[group]
    return group, starts[group] + within


def top_per_group(group: torch.Tensor, value: torch.Tensor, pruning: Pruning) -> torch.Tensor:
    """Indices of the top_k |value| of each group (ties: input order), |value| >= min_abs, non-zero."""
    order = torch.argsort(-value.abs(), stable=True)
    order = order[torch.argsort(group[order], stable=True)]
    if pruning.top_k is not None:
        _, counts = torch.unique_consecutive(group[order], return_counts=True)
        first = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(order), device=order.device) - torch.repeat_interleave(first, counts)
        order = order[rank < pruning.top_k]
    v = value[order]
    return order[(v.abs() >= pruning.min_abs) & (v != 0)]


def qk_edges(rows: FlatRows, sigma: torch.Tensor, keys: torch.Tensor, W_Q: torch.Tensor, W_K: torch.Tensor,
             b_Q: torch.Tensor, b_K: torch.Tensor, attn_scale: float, layer: int, pruning: Pruning) -> EdgeTable:
    """q_in, k_in and qk edges of the scores ``keys`` [n, 4] (prompt, head, t, s) of one layer.

    rows: the residual SAE decomposition of resid_pre[layer] (steps.resid_sae_rows), sorted by
    (prompt, position); sigma [B, T]: LN1's scale; W_Q, W_K [H, d, dh], b_Q, b_K [H, dh] processed."""
    T = sigma.shape[1]
    H, d, dh = W_Q.shape
    x = rows.vec / sigma[rows.prompt, rows.pos, None]  # LN1 with its scale frozen; centering is in the weights
    Q = (x @ (W_Q - W_Q.mean(1, keepdim=True)).permute(1, 0, 2).reshape(d, H * dh)).view(-1, H, dh)
    K = (x @ (W_K - W_K.mean(1, keepdim=True)).permute(1, 0, 2).reshape(d, H * dh)).view(-1, H, dh)
    b, h, t, s = keys.unbind(1)
    row_key = rows.prompt * T + rows.pos
    q0, q1 = torch.searchsorted(row_key, b * T + t), torch.searchsorted(row_key, b * T + t, right=True)
    k0, k1 = torch.searchsorted(row_key, b * T + s), torch.searchsorted(row_key, b * T + s, right=True)
    nq, nk = q1 - q0, k1 - k0
    # each side's rows of each score, flat: (score, row) with the bias term of the other side
    q_score, q_row = _ragged(q0, nq)
    k_score, k_row = _ragged(k0, nk)
    q_share = (Q[q_row, h[q_score]] * b_K[h[q_score]]).sum(-1) / attn_scale
    k_share = (b_Q[h[k_score]] * K[k_row, h[k_score]]).sum(-1) / attn_scale
    q_first, k_first = torch.cumsum(nq, 0) - nq, torch.cumsum(nk, 0) - nk
    pairs = []
    n_pairs = nq * nk
    cum = torch.cumsum(n_pairs, 0)
    c0 = 0
    while c0 < len(keys):
        done = int(cum[c0 - 1]) if c0 else 0
        c1 = max(c0 + 1, int(torch.searchsorted(cum, done + PAIRS_PER_CHUNK, right=True)))
        score, flat = _ragged(torch.zeros(c1 - c0, dtype=torch.long, device=keys.device), n_pairs[c0:c1])
        score = score + c0
        i, j = flat // nk[score], flat % nk[score]
        head = h[score]
        value = (Q[q0[score] + i, head] * K[k0[score] + j, head]).sum(-1) / attn_scale
        q_share.index_add_(0, q_first[score] + i, value)
        k_share.index_add_(0, k_first[score] + j, value)
        keep = top_per_group(score, value, pruning)
        sc, qi, kj = score[keep], (q0[score] + i)[keep], (k0[score] + j)[keep]
        pairs.append(EdgeTable(b[sc], rows.code[qi], rows.layer[qi], rows.index[qi], s[sc], rows.code[kj],
                               rows.layer[kj], rows.index[kj], t[sc], h[sc], value[keep], torch.full_like(sc, EdgeKind.QK)))
        c0 = c1
    return EdgeTable.cat([_into_head(rows, q_score, q_row, q_share, b, h, t, s, layer, EdgeKind.Q_IN, pruning),
                          _into_head(rows, k_score, k_row, k_share, b, h, t, s, layer, EdgeKind.K_IN, pruning),
                          *pairs])


def _into_head(rows: FlatRows, score: torch.Tensor, row: torch.Tensor, value: torch.Tensor, b: torch.Tensor,
               h: torch.Tensor, t: torch.Tensor, s: torch.Tensor, layer: int, kind: EdgeKind,
               pruning: Pruning) -> EdgeTable:
    keep = top_per_group(score, value, pruning)
    sc, r = score[keep], row[keep]
    full = lambda v: torch.full_like(sc, int(v))  # noqa: E731
    return EdgeTable(b[sc], rows.code[r], rows.layer[r], rows.index[r], s[sc], full(Code.HEAD), full(layer), h[sc],
                     t[sc], h[sc], value[keep], full(kind))
