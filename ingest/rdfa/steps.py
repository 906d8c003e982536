"""The step functions of shared/RDFA.md, vectorized over prompts, positions and features.

Each returns an EdgeTable of kept edges (pruned per target) and, per target, the sum of what was
kept, so the caller can add the bias and REST edges that make every node's inputs sum to its
pre-activation. Python loops run over layers and memory chunks only.
"""

from __future__ import annotations

import torch

from ingest.rdfa.tensors import ActiveSet, Code, EdgeKind, EdgeTable, Pruning, SourceRows
from ingest.rdfa.types import SaeWeights

CHUNK_ELEMENTS = 1 << 24  # floats per intermediate block (64 MB in float32)


def active_set(sae: SaeWeights, x: torch.Tensor, valid: torch.Tensor) -> ActiveSet:
    """Encode ``x`` [B, T, d_in]; keep the nonzero features of each valid position, padded to K."""
    pre = sae.pre_activation(x)
    act = sae.activation(pre) * valid[..., None]
    K = max(1, int((act != 0).sum(-1).max()))
    top, idx = act.abs().topk(K, dim=-1)
    mask = top > 0
    return ActiveSet(idx * mask, act.gather(-1, idx) * mask, pre.gather(-1, idx), mask)


def center(v: torch.Tensor) -> torch.Tensor:
    """LayerNorm's centering over the last (d_model) axis."""
    return v - v.mean(-1, keepdim=True)


def resid_sae_rows(sae: SaeWeights, x: torch.Tensor, active: ActiveSet, valid: torch.Tensor) -> SourceRows:
    """Step 2's sources at every position: x = sum_j a_j W_dec[j] + b_dec + error, as rows [B,T,K+2,d]."""
    B, T, K = active.index.shape
    feats = active.act[..., None] * sae.W_dec[active.index]  # [B,T,K,d]
    bias = sae.b_dec.expand(B, T, -1)
    err = x - feats.sum(2) - bias
    vec = torch.cat([feats, err[:, :, None], bias[:, :, None]], dim=2)
    dev = x.device
    code = torch.tensor([Code.RESID] * K + [Code.ERR_R, Code.BIAS_R], device=dev)
    layer = torch.full((K + 2,), sae.layer, device=dev)
    index = torch.cat([active.index, torch.full((B, T, 2), -1, device=dev)], dim=2)
    ok = torch.cat([active.mask, valid[..., None].expand(B, T, 2)], dim=2)
    return SourceRows(vec, code, layer, index, ok)


def _select(value: torch.Tensor, valid: torch.Tensor, pruning: Pruning
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the top-k |value| candidates of each target (last axis), then drop |value| < min_abs and
    exact zeros. ``valid`` [...] marks real targets.

    Returns (target indices tuple-able [n, ndim-1], candidate index [n], value [n], kept sum per target).
    """
    if pruning.top_k is not None and pruning.top_k < value.shape[-1]:
        cand = value.abs().topk(pruning.top_k, dim=-1).indices
        picked = value.gather(-1, cand)
    else:
        picked = value
        cand = None
    keep = (picked.abs() >= pruning.min_abs) & (picked != 0) & valid[..., None]
    kept_sum = (picked * keep).sum(-1)
    where = keep.nonzero(as_tuple=True)
    flat = where[-1] if cand is None else cand[where]
    return where[:-1], flat, picked[where], kept_sum


def attn_in(rows: SourceRows, sigma: torch.Tensor, pattern: torch.Tensor, W_V: torch.Tensor,
            sae: SaeWeights, targets: ActiveSet, pruning: Pruning) -> tuple[EdgeTable, torch.Tensor]:
    """Step 2: per-head edges from every source row at every s <= t into every active feature at t.

    value[b,t,k,h,s,r] = A[b,h,t,s] * (center(vec[b,s,r]) / sigma[b,s]) W_V[h] . W_enc[h-slice, f]
    Returns kept edges and the kept sum per target [B, T, K].
    """
    B, T, K = targets.index.shape
    H, d, dh = W_V.shape
    R = rows.vec.shape[2]
    P = torch.einsum("bsrd,hde->bhsre", center(rows.vec) / sigma[:, :, None, None], W_V)  # [B,H,S,R,dh]
    E = sae.W_enc.view(H, dh, -1)[:, :, targets.index].permute(2, 0, 3, 4, 1)  # [B,H,T,K,dh]
    kept_sum = torch.zeros(B, T, K, device=W_V.device)
    tables = []
    tc = max(1, CHUNK_ELEMENTS // max(1, B * H * K * T * R))
    for t0 in range(0, T, tc):
        t1 = min(T, t0 + tc)
        S = t1  # causal: no source after the chunk's last destination
        Y = E[:, :, t0:t1].reshape(B, H, (t1 - t0) * K, dh) @ P[:, :, :S].reshape(B, H, S * R, dh).transpose(-1, -2)
        # Padded sources need no mask: every real target t has zero attention to s > t.
        Y = Y.view(B, H, t1 - t0, K, S, R).mul_(pattern[:, :, t0:t1, None, :S, None])
        value = Y.permute(0, 2, 3, 1, 4, 5).reshape(B, t1 - t0, K, H * S * R)
        (b, tt, k), flat, vals, kept = _select(value, targets.mask[:, t0:t1], pruning)
        kept_sum[:, t0:t1] = kept
        h, rest = flat // (S * R), flat % (S * R)
        s, r = rest // R, rest % R
        t = tt + t0
        tables.append(_edges(b, rows, s, r, Code.ATTN, sae.layer, targets.index[b, t, k], t, h, vals,
                             EdgeKind.ATTN_IN))
    return EdgeTable.cat(tables), kept_sum


def _edges(b, rows: SourceRows, s, r, dst_code, dst_layer, dst_index, dst_pos, head, value, kind) -> EdgeTable:
    n = b.shape[0]
    full = lambda v: torch.full((n,), int(v), device=b.device, dtype=torch.long)  # noqa: E731
    return EdgeTable(b, rows.code[r], rows.layer[r], rows.index[b, s, r], s, full(dst_code), full(dst_layer),
                     dst_index, dst_pos, head, value, full(kind))


def component_rows(cap, weights, attn_saes: dict[int, tuple[SaeWeights, ActiveSet]], n_layers: int
                   ) -> tuple[SourceRows, list[int]]:
    """Steps 3-4's sources at every position, ordered EMB, POS, then per layer l its attention
    output (features c_k W_dec[k] W_O, error, bias b_dec W_O + b_O; or the whole output when layer l
    has no attention SAE) and its MLP output. ``ends[L]`` is the row count of layers < L, so
    ``rows.prefix(ends[L])`` sums to resid_pre of layer L at every position.
    """
    B, T, d = cap.embed.shape
    dev = cap.embed.device
    vecs, codes, layers, indices, oks = [cap.embed[:, :, None], cap.pos_embed[:, :, None]], [Code.EMB, Code.POS], [-1, -1], [], []
    none = torch.full((B, T, 1), -1, device=dev)
    valid = cap.valid[..., None]
    indices += [none, none]
    oks += [valid, valid]
    ends = [2]
    for l in range(n_layers):
        W_O = weights.W_O[l].reshape(-1, d)  # [H*dh, d]
        if l in attn_saes:
            sae, act = attn_saes[l]
            feats_z = act.act[..., None] * sae.W_dec[act.index]  # [B,T,K,H*dh]
            z = cap.z[l].flatten(-2)
            err_z = z - feats_z.sum(2) - sae.b_dec
            vecs += [feats_z @ W_O, (err_z @ W_O)[:, :, None], (sae.b_dec @ W_O + weights.b_O[l]).expand(B, T, 1, d)]
            codes += [Code.ATTN] * act.K + [Code.ERR_A, Code.BIAS_A]
            layers += [l] * (act.K + 2)
            indices += [act.index, none, none]
            oks += [act.mask, valid, valid]
        else:
            vecs.append(cap.attn_out[l][:, :, None])
            codes.append(Code.ATTN_OUT)
            layers.append(l)
            indices.append(none)
            oks.append(valid)
        vecs.append(cap.mlp_out[l][:, :, None])
        codes.append(Code.MLP)
        layers.append(l)
        indices.append(none)
        oks.append(valid)
        ends.append(len(codes))
    rows = SourceRows(torch.cat(vecs, 2), torch.tensor([int(c) for c in codes], device=dev),
                      torch.tensor(layers, device=dev), torch.cat(indices, 2), torch.cat(oks, 2))
    return rows, ends


def resid_in(rows: SourceRows, sae: SaeWeights, targets: ActiveSet, pruning: Pruning
             ) -> tuple[EdgeTable, torch.Tensor]:
    """Step 4: edges into every active residual feature j at s from the rows at s.

    value[b,s,k,r] = vec[b,s,r] . W_enc[:, j]. Returns kept edges and the kept sum per target [B,T,K].
    """
    enc = sae.W_enc.T[targets.index]  # [B,T,K,d]
    value = enc @ rows.vec.transpose(-1, -2)  # [B,T,K,R]; padded slots hold zero vectors
    (b, s, k), r, vals, kept = _select(value, targets.mask, pruning)
    table = _edges(b, rows, s, r, Code.RESID, sae.layer, targets.index[b, s, k], s,
                   torch.full_like(b, -1), vals, EdgeKind.RESID_IN)
    return table, kept


def direct(rows: SourceRows, cap_resid: torch.Tensor, sigma: torch.Tensor, pattern: torch.Tensor, W_V, b_V,
           sae: SaeWeights, tb: torch.Tensor, tt: torch.Tensor, tf: torch.Tensor, pruning: Pruning
           ) -> tuple[EdgeTable, torch.Tensor]:
    """Step 5: per-head direct edges from upstream components (rows, no residual SAE) into the
    attention features (tb, tt, tf) [N] = (prompt, position, feature).

    Sources are taken through the top ``pruning.direct_positions`` (s, h) pairs of each target by
    step-1 DFA, A[h,t,s] v[s,h] . W_enc[h,:,f] (all pairs when None: exact).
    value = A[b,h,t,s] / sigma[b,s] * vec[b,s,r] . center(W_V[h] W_enc[h-slice, f]).
    Returns kept edges and the kept sum per target [N].
    """
    H, d, dh = W_V.shape
    B, S, R, _ = rows.vec.shape
    N = tb.shape[0]
    n_pairs = S * H if pruning.direct_positions is None else min(S * H, pruning.direct_positions)
    v = torch.einsum("bsd,hde->bshe", center(cap_resid) / sigma[..., None], W_V) + b_V  # [B,S,H,dh]
    h_sel, s_sel, scale, q_sel = [], [], [], []
    chunk = max(1, CHUNK_ELEMENTS // (S * H * dh + H * d))
    for n0 in range(0, N, chunk):  # memory chunks over targets
        b, t = tb[n0:n0 + chunk], tt[n0:n0 + chunk]
        e = sae.W_enc.view(H, dh, -1)[:, :, tf[n0:n0 + chunk]].permute(2, 0, 1)  # [n,H,dh]
        A = pattern[b, :, t, :]  # [n,H,S]
        dfa = torch.einsum("nshe,nhe->nhs", v[b], e) * A  # [n,H,S]: each target against its own prompt
        causal = torch.arange(S, device=b.device)[None, None, :] <= t[:, None, None]
        pairs = torch.where(causal, dfa.abs(), -1.0).reshape(len(b), H * S).topk(n_pairs, dim=-1).indices
        h, s = pairs // S, pairs % S  # [n,P]
        Q = center(torch.einsum("hde,nhe->nhd", W_V, e))  # [n,H,d]
        ar = torch.arange(len(b), device=b.device)[:, None]
        h_sel.append(h), s_sel.append(s)
        scale.append(A[ar, h, s] / sigma[b[:, None], s])
        q_sel.append(Q[ar, h])  # [n,P,d]
    h, s, scale, q = torch.cat(h_sel), torch.cat(s_sel), torch.cat(scale), torch.cat(q_sel)
    value = _rows_dot(rows.vec, tb, s, q) * scale[..., None]  # [N,P,R]
    # s > t carries zero attention, padded feature slots zero vectors: both give exact zeros
    (n,), j, vals, kept = _select(value.reshape(N, -1), torch.ones_like(tb, dtype=torch.bool), pruning)
    p, r = j // R, j % R
    table = _edges(tb[n], rows, s[n, p], r, Code.ATTN, sae.layer, tf[n], tt[n], h[n, p], vals, EdgeKind.DIRECT)
    return table, kept


def _rows_dot(vec: torch.Tensor, b: torch.Tensor, s: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """out[n,p,r] = vec[b[n], s[n,p], r] . q[n,p]  for vec [B,S,R,d], q [N,P,d] -> [N,P,R].

    Grouped by (prompt, position): each group is one matmul of that position's source rows against
    every query that selected it, so source rows are never copied per target.
    """
    N, P, d = q.shape
    S, R = vec.shape[1], vec.shape[2]
    key = (b[:, None] * S + s).reshape(-1)
    order = torch.argsort(key)
    uniq, counts = torch.unique_consecutive(key[order], return_counts=True)
    flat_q = q.reshape(-1, d)[order]
    out = torch.empty(N * P, R, device=q.device, dtype=q.dtype)
    rows = vec.reshape(-1, R, d)
    start = 0
    for k, c in zip(uniq.tolist(), counts.tolist()):  # one matmul per selected (prompt, position)
        out[order[start:start + c]] = flat_q[start:start + c] @ rows[k].T
        start += c
    return out.view(N, P, R)


def attn_constant(sae: SaeWeights, b_V: torch.Tensor) -> torch.Tensor:
    """Step 1's bias node: b_enc - b_dec.W_enc plus the b_V term (zero once b_V is folded), [d_sae]."""
    H, dh = b_V.shape
    return sae.encoder_constant() + torch.einsum("he,hef->f", b_V, sae.W_enc.view(H, dh, -1))

