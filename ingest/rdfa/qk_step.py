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

from ingest.rdfa.steps import FlatRows, sized
from ingest.rdfa.tensors import Code, EdgeKind, EdgeTable, Pruning

CHUNK_ELEMENTS = 1 << 22  # padded pairwise terms computed at once (scores x query rows x key rows)


def centered(W: torch.Tensor) -> torch.Tensor:
    """W [H, d, dh] centred over d and flattened head-major to [d, H*dh]: center(x) @ W[h] == x @ this."""
    H, d, dh = W.shape
    return (W - W.mean(1, keepdim=True)).permute(1, 0, 2).reshape(d, H * dh)


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


def _top_rows(v: torch.Tensor, pruning: Pruning) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``v`` [C, M] (padding holds exact zeros): the top_k |value| entries, then |value| >=
    min_abs and non-zero. Returns (row, column) [n] each."""
    if pruning.top_k is not None and pruning.top_k < v.shape[1]:
        col = v.abs().topk(pruning.top_k, dim=1).indices  # [C, k]
        picked = v.gather(1, col)
    else:
        col, picked = torch.arange(v.shape[1], device=v.device).expand_as(v), v
    keep = (picked.abs() >= pruning.min_abs) & (picked != 0)
    row, j = keep.nonzero(as_tuple=True)
    return row, col[row, j]


def _top_pairs(pair: torch.Tensor, pruning: Pruning) -> tuple[torch.Tensor, ...]:
    """The top_k |value| entries of each score's pairs ``pair`` [C, wq, wk] (padding holds exact zeros), then
    |value| >= min_abs and non-zero: (score, query row, key row, value) [n] each.

    The k largest entries of a matrix lie in its k rows of largest row maximum (each of those rows holds an
    entry at least as large as any entry outside them), so the top-k runs over k rows instead of all wq:
    a top-k costs ~5 ns an entry on the CPU, a row maximum a fraction of that."""
    C, wq, wk = pair.shape
    if pruning.top_k is None or pruning.top_k >= wq * wk:
        c, flat = _top_rows(pair.flatten(1), pruning)
        return c, flat // wk, flat % wk, pair.flatten(1)[c, flat]
    magnitude = pair.abs()
    rows = magnitude.amax(2).topk(min(pruning.top_k, wq), dim=1).indices  # [C, k]
    within = magnitude.gather(1, rows[:, :, None].expand(-1, -1, wk))  # [C, k, wk]
    top = within.flatten(1).topk(pruning.top_k, dim=1).indices  # [C, top_k]
    i, j = rows.gather(1, top // wk), top % wk
    picked = pair[torch.arange(C, device=pair.device)[:, None], i, j]
    keep = (picked.abs() >= pruning.min_abs) & (picked != 0)
    c, n = keep.nonzero(as_tuple=True)
    return c, i[c, n], j[c, n], picked[c, n]


def _padded(start: torch.Tensor, count: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices [C, width] of each score's rows (start, start+1, ...; repeated past its count) and
    the mask [C, width] of the real ones."""
    offsets = torch.arange(width, device=start.device)
    valid = offsets[None, :] < count[:, None]
    return start[:, None] + torch.minimum(offsets[None, :], (count - 1).clamp(min=0)[:, None]), valid


def qk_edges(rows: FlatRows, sigma: torch.Tensor, keys: torch.Tensor, W_Q: torch.Tensor, W_K: torch.Tensor,
             b_Q: torch.Tensor, b_K: torch.Tensor, attn_scale: float, layer: int, pruning: Pruning) -> EdgeTable:
    """q_in, k_in and qk edges of the scores ``keys`` [n, 4] (prompt, head, t, s) of one layer.

    rows: the residual SAE decomposition of resid_pre[layer] (steps.resid_sae_rows), sorted by
    (prompt, position); sigma [B, T]: LN1's scale; W_Q, W_K [H, d, dh], b_Q, b_K [H, dh] processed.
    Scores go in chunks, each padded to its largest query and key side and multiplied as one batched
    matmul [C, nq, dh] x [C, dh, nk]; scores are ordered by size first so that padding stays small."""
    T = sigma.shape[1]
    H, d, dh = W_Q.shape
    # every row's query (already over the score's divisor) and key by head, flat [N*H, dh], and one zero
    # row last: padding gathers it, so padded entries are exact zeros that no mask has to clear. LN1 with
    # its scale frozen: (vec / sigma) W == (vec W) / sigma; its centering is in the weights
    QK = rows.through(f"W_Q/{attn_scale}|W_K", (W_Q, W_K), lambda: torch.cat([centered(W_Q) / attn_scale, centered(W_K)], 1))
    QK.div_(sigma[rows.prompt, rows.pos, None])
    Q, K = QK[:, :H * dh].reshape(-1, dh), QK[:, H * dh:].reshape(-1, dh)
    zero_row = Q.shape[0]
    Q, K = torch.cat([Q, Q.new_zeros(1, dh)]), torch.cat([K, K.new_zeros(1, dh)])
    b_Q = b_Q / attn_scale
    row_key = rows.prompt * T + rows.pos
    b, h, t, s = keys.unbind(1)
    q0, q1 = torch.searchsorted(row_key, b * T + t), torch.searchsorted(row_key, b * T + t, right=True)
    k0, k1 = torch.searchsorted(row_key, b * T + s), torch.searchsorted(row_key, b * T + s, right=True)
    nq, nk = q1 - q0, k1 - k0
    by_size = torch.argsort(torch.maximum(nq, nk), stable=True)
    sizes = torch.maximum(nq, nk)[by_size].tolist()
    tables, c0 = [], 0
    budget = sized(sigma.device, CHUNK_ELEMENTS)
    while c0 < len(keys):
        c1 = c0 + 1
        while c1 < len(keys) and (c1 - c0 + 1) * sizes[c1] ** 2 <= budget:
            c1 += 1
        sc = by_size[c0:c1]
        width = sizes[c1 - 1]
        qi, q_ok = _padded(q0[sc], nq[sc], width)
        kj, k_ok = _padded(k0[sc], nk[sc], width)
        hh = h[sc]
        C = hh.shape[0]
        Qg = Q.index_select(0, torch.where(q_ok, qi * H + hh[:, None], zero_row).flatten()).view(C, width, dh)
        Kg = K.index_select(0, torch.where(k_ok, kj * H + hh[:, None], zero_row).flatten()).view(C, width, dh)
        pair = torch.bmm(Qg.to(pruning.dtype), Kg.to(pruning.dtype).transpose(1, 2)).float()  # [C, w(q), w(k)]
        # a side's share: its pairs with the whole other side plus its term with the other side's bias, i.e.
        # its row against the other side's rows summed with that bias (padding rows are zero): one
        # matrix-vector product per score instead of sums over the pairs (~10% of QK at GPT-2 scale)
        q_share = torch.bmm(Qg, (Kg.sum(1) + b_K[hh])[:, :, None])[:, :, 0]  # [C, w(q)]
        k_share = torch.bmm(Kg, (Qg.sum(1) + b_Q[hh])[:, :, None])[:, :, 0]  # [C, w(k)]
        for share, idx, kind in ((q_share, qi, EdgeKind.Q_IN), (k_share, kj, EdgeKind.K_IN)):
            c, j = _top_rows(share, pruning)
            r, g = idx[c, j], sc[c]
            full = lambda v, g=g: torch.full_like(g, int(v))  # noqa: E731
            tables.append(EdgeTable(b[g], rows.code[r], rows.layer[r], rows.index[r], s[g], full(Code.HEAD),
                                    full(layer), h[g], t[g], h[g], share[c, j], full(kind)))
        c, i, j, value = _top_pairs(pair, pruning)
        qr, kr, g = qi[c, i], kj[c, j], sc[c]
        tables.append(EdgeTable(b[g], rows.code[qr], rows.layer[qr], rows.index[qr], s[g], rows.code[kr],
                                rows.layer[kr], rows.index[kr], t[g], h[g], value, torch.full_like(g, int(EdgeKind.QK))))
        c0 = c1
    return EdgeTable.cat(tables)
