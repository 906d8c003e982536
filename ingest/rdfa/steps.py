"""The step functions of docs/rdfa.md, vectorized over prompts, positions and features.

Each returns an EdgeTable of kept edges (pruned per target) and, per target, the sum of what was
kept, so the caller can add the bias and REST edges that make every node's inputs sum to its
pre-activation. Step 2 (``attn_in``) is ingest/rdfa/step2.py. Python loops run over the prompts of a
batch, memory blocks and (step 5) heads, buckets of positions and the positions that need rows past the
first pass; never over features. On CUDA,
step 5's row products take their batched form (rows_dot_batched) and blocks grow with free memory (sized).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from catalog.ids import NodeKind
from ingest.rdfa.tensors import ActiveSet, Code, EdgeKind, EdgeTable, Pruning, SourceRows
from ingest.rdfa.types import SaeWeights

CHUNK_ELEMENTS = 1 << 24  # floats per intermediate block (64 MB in float32)
BOUNDED = True  # steps 4 and 5 multiply only the rows whose Cauchy-Schwarz bound can reach a kept edge (top_k)
FIRST_ROWS = 32  # rows of largest norm multiplied first at each position, for the floors (steps 4 and 5)
# the slack of every Cauchy-Schwarz bound (here and in step 2) for float rounding between a product, its bound
# and the floor, all rounded differently: ~1e-6 relative in float32 at d_model 768 (d_head 64: less);
# bfloat16 / float16 inputs carry up to 2^-9 / 2^-12 each
BOUND_SLACK = {torch.float32: 1 + 1e-4, torch.bfloat16: 1.03, torch.float16: 1.01}


def device_free_bytes(device: torch.device) -> int | None:
    """A GPU's free memory; None on the CPU, whose blocks keep their cache- or RAM-friendly sizes.
    (bench/rdfa.py replaces it to count a GPU's operators on a machine without one.)"""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def sized(device: torch.device, elements: int) -> int:
    """A memory block of ``elements`` floats (the CPU's size: cache- or RAM-friendly), or on a GPU a 64th of
    the free memory when that is larger: a GPU's blocks grow with its memory, so the kernels launched per
    batch stop growing with the batch (a block's intermediates are a few times its size)."""
    free = device_free_bytes(device)
    return elements if free is None else max(elements, free // (4 * 64))


def active_set(sae: SaeWeights, x: torch.Tensor, valid: torch.Tensor) -> ActiveSet:
    """Encode ``x`` [B, T, d_in]; keep the nonzero features of each valid position [B, T], padded to K (slots
    in feature order, real ones first)."""
    pre = sae.pre_activation(x)
    fires = sae.fires(pre)
    if fires is None:  # a top-k SAE: its activations, then where they are nonzero
        act = sae.activation(pre)
        return pack_active(pre, act != 0, act, valid)
    return pack_active(pre, fires, pre, valid)


def pack_active(pre: torch.Tensor, fires: torch.Tensor, act: torch.Tensor, valid: torch.Tensor) -> ActiveSet:
    """The entries where ``fires`` [B, T, d_sae] at valid positions [B, T], packed into K slots per position,
    with their activations from ``act`` [B, T, d_sae] (or anything equal to it there: a ReLU's pre-activations).
    One nonzero and a scatter: a top-K over d_sae (K the busiest position's count) cost ~10x more at GPT-2
    width; and no pass over [B, T, d_sae] masks the padding (a batch has little): the entries are filtered."""
    B, T, _ = fires.shape
    b, t, f = fires.nonzero(as_tuple=True)  # sorted by (b, t, f)
    if not bool(valid.all()):
        real = valid[b, t]
        b, t, f = b[real], t[real], f[real]
    position = b * T + t
    counts = torch.bincount(position, minlength=B * T)
    K = max(1, int(counts.max())) if counts.numel() else 1
    slot = torch.arange(position.shape[0], device=fires.device) - (torch.cumsum(counts, 0) - counts)[position]
    index = torch.zeros(B, T, K, dtype=torch.long, device=fires.device)
    index[b, t, slot] = f
    mask = torch.zeros(B, T, K, dtype=torch.bool, device=fires.device)
    mask[b, t, slot] = True
    return ActiveSet(index, act.gather(-1, index) * mask, pre.gather(-1, index), mask)


def center(v: torch.Tensor) -> torch.Tensor:
    """LayerNorm's centering over the last (d_model) axis."""
    return v - v.mean(-1, keepdim=True)


def centered_W_V(W_V: torch.Tensor) -> torch.Tensor:
    """W_V [H, d, dh] minus its mean over d, so that center(x) @ W_V[h] == x @ centered_W_V[h]."""
    return W_V - W_V.mean(1, keepdim=True)


def heads_first(x: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[h, i] = x[index[i], h], zero where index[i] < 0: x [N, H, dh], index [M] -> out [H, M, dh], head by
    head. A gather of whole rows then a permuted copy was ~2x slower on the CPU (two passes over fresh memory)."""
    padding = index < 0
    at = index.clamp(min=0)
    for h in range(x.shape[1]):
        torch.index_select(x[:, h], 0, at, out=out[h])
    return out.index_fill_(1, padding.nonzero().flatten(), 0)


def gather_rows(x: torch.Tensor, *index: torch.Tensor) -> torch.Tensor:
    """x[index] for x [..., d] whose rows lie whole in memory (the last axis contiguous, every other stride a multiple
    of d: a prefix of a block's rows, say) and one index tensor per leading axis (broadcast together): [*shape, d].
    By flat row number and index_select, which copies whole rows: advanced indexing with two or three index tensors
    was 2-3x slower on the CPU for the same rows (steps 2, 4 and 5 gather ~10^9 floats of rows a GPT-2 batch).
    The indices are the callers' own, in range by construction: only the flat row number is bounds-checked."""
    d = x.shape[-1]
    row_strides = [s // d for s in x.stride()[:-1]]
    if x.numel() == 0 or x.stride(-1) != 1 or any(s % d for s in x.stride()[:-1]):
        return x[index]
    flat = sum(i * s for i, s in zip(index, row_strides))
    span = 1 + sum((n - 1) * s for n, s in zip(x.shape[:-1], row_strides))  # rows from the first to the last
    rows = x.as_strided((span, d), (d, 1))  # every row of x's memory between them, in order
    return rows.index_select(0, flat.flatten()).view(*flat.shape, d)


@dataclass
class FlatRows:
    """Source vectors of step 2 as a ragged list sorted by (prompt, position): no padding, so a position
    where thousands of features fire costs what it holds and no more.

    vec [N, d]; prompt, pos, code, layer, index [N] (index -1 for error and bias rows); act [N] the
    activation of a feature row (vec = act * W_dec[index]), 0 for the others; ``sae`` the dictionary
    whose decomposition they are.
    """

    vec: torch.Tensor
    prompt: torch.Tensor
    pos: torch.Tensor
    code: torch.Tensor
    layer: torch.Tensor
    index: torch.Tensor
    act: torch.Tensor
    sae: SaeWeights

    def through(self, name: str, source: tuple[torch.Tensor, ...], prepare: Callable[[], torch.Tensor]
                ) -> torch.Tensor:
        """vec @ W [N, n], W = prepare() [d, n] a function of the weights ``source`` alone. Feature rows are
        read off the SAE's W_dec @ W (``name``, SaeWeights.decoder_through) and scaled by their activation;
        only error and bias rows are multiplied. The rows' own product was ~11% of step 2 and a fifth of
        QK at GPT-2 scale."""
        cached = self.sae.decoder_through(name, source, prepare)
        feature = self.index >= 0
        out = torch.empty(self.vec.shape[0], cached.shape[1], device=cached.device, dtype=cached.dtype)
        f, o = feature.nonzero().flatten(), (~feature).nonzero().flatten()
        out[f] = cached.index_select(0, self.index[f]).mul_(self.act[f, None])
        out[o] = self.vec[o] @ prepare()
        return out


def resid_sae_rows(sae: SaeWeights, x: torch.Tensor, active: ActiveSet, valid: torch.Tensor) -> FlatRows:
    """Step 2's sources: x = sum_j a_j W_dec[j] + b_dec + error at every valid position, one row each
    for the active features, the error and the bias; ``x`` [B, T, d]."""
    B, T, d = x.shape
    fb, fs, fk = active.mask.nonzero(as_tuple=True)
    f_index = active.index[fb, fs, fk]
    feats = active.act[fb, fs, fk, None] * sae.W_dec.index_select(0, f_index)  # [Nf, d]
    # index_add_ over flat positions: index_put_(accumulate=True) took ~3x longer on CPU
    recon = torch.zeros(B * T, d, device=x.device, dtype=x.dtype).index_add_(0, fb * T + fs, feats).view(B, T, d)
    vb, vs = valid.nonzero(as_tuple=True)
    err = gather_rows(x - recon - sae.b_dec, vb, vs)
    nv, nf = vb.shape[0], fb.shape[0]
    vec = torch.cat([feats, err, sae.b_dec.expand(nv, d)])
    prompt, pos = torch.cat([fb, vb, vb]), torch.cat([fs, vs, vs])
    code = torch.cat([torch.full((nf,), int(Code.RESID)), torch.full((nv,), int(Code.ERR_R)),
                      torch.full((nv,), int(Code.BIAS_R))]).to(x.device)
    index = torch.cat([f_index, torch.full((2 * nv,), -1, device=x.device)])
    act = torch.cat([active.act[fb, fs, fk], x.new_zeros(2 * nv)])
    order = torch.sort(prompt * T + pos, stable=True).indices  # features, then error, then bias at each position
    return FlatRows(vec.index_select(0, order), prompt[order], pos[order], code[order],
                    torch.full_like(order, sae.layer), index[order], act[order], sae)


def select_edges(value: torch.Tensor, valid: torch.Tensor, pruning: Pruning
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


def _flat_edges(rows: FlatRows, r, dst_code, dst_layer, dst_index, dst_pos, head, value, kind) -> EdgeTable:
    n = r.shape[0]
    full = lambda v: torch.full((n,), int(v), device=r.device, dtype=torch.long)  # noqa: E731
    return EdgeTable(rows.prompt[r], rows.code[r], rows.layer[r], rows.index[r], rows.pos[r], full(dst_code),
                     full(dst_layer), dst_index, dst_pos, head, value, full(kind))


def _edges(b, rows: SourceRows, s, r, dst_code, dst_layer, dst_index, dst_pos, head, value, kind) -> EdgeTable:
    n = b.shape[0]
    full = lambda v: torch.full((n,), int(v), device=b.device, dtype=torch.long)  # noqa: E731
    return EdgeTable(b, rows.code[r], rows.layer[r], rows.index[b, s, r], s, full(dst_code), full(dst_layer),
                     dst_index, dst_pos, head, value, full(kind))


def component_rows(cap, weights, attn_saes: dict[int, tuple[SaeWeights, ActiveSet]], n_layers: int,
                   transcoders: dict[int, tuple[SaeWeights, ActiveSet]] | None = None
                   ) -> tuple[SourceRows, list[int], list[int]]:
    """Steps 3-4's sources at every position, ordered EMB, POS, then per layer l its attention
    output (features c_k W_dec[k] W_O, error, bias b_dec W_O + b_O; or the whole output when layer l
    has no attention SAE) and its MLP output (with a transcoder at l: features c_k W_dec[k], error, bias
    b_dec; else the whole output). ``ends[L]`` is the row count of layers < L, so ``rows.prefix(ends[L])``
    sums to resid_pre of layer L at every position; ``mids[L]`` adds layer L's attention rows (resid_mid, the
    MLP's input before LN2).
    """
    transcoders = transcoders or {}
    B, T, d = cap.embed.shape
    dev = cap.embed.device
    none = torch.full((B, T, 1), -1, device=dev)
    valid = cap.valid[..., None]
    codes, layers, indices, oks = [Code.EMB, Code.POS], [-1, -1], [none, none], [valid, valid]
    ends, mids = [2], []

    def add_sae(code: Code, err: Code, bias: Code, l: int, act: ActiveSet) -> None:
        codes.extend([code] * act.K + [err, bias])
        layers.extend([l] * (act.K + 2))
        indices.extend([act.index, none, none])
        oks.extend([act.mask, valid, valid])

    def add_leaf(code: Code, l: int) -> None:
        codes.append(code)
        layers.append(l)
        indices.append(none)
        oks.append(valid)

    for l in range(n_layers):
        if l in attn_saes:
            add_sae(Code.ATTN, Code.ERR_A, Code.BIAS_A, l, attn_saes[l][1])
        else:
            add_leaf(Code.ATTN_OUT, l)
        mids.append(len(codes))
        if l in transcoders:
            add_sae(Code.TC, Code.ERR_T, Code.BIAS_T, l, transcoders[l][1])
        else:
            add_leaf(Code.MLP, l)
        ends.append(len(codes))
    # filled in place: building pieces and concatenating them copied every vector twice (70% of the time)
    vec = torch.empty(B, T, len(codes), d, device=dev, dtype=cap.embed.dtype)
    vec[:, :, 0], vec[:, :, 1] = cap.embed, cap.pos_embed
    r = 2
    for l in range(n_layers):
        W_O = weights.W_O[l].reshape(-1, d)  # [H*dh, d]
        if l in attn_saes:
            sae, act = attn_saes[l]
            feats = vec[:, :, r:r + act.K]  # c_k W_dec[k] W_O: [B,T,K,d]; padded slots have c_k = 0
            through = sae.decoder_through("W_O", (W_O,), lambda W=W_O: W).index_select(0, act.index.flatten())
            through = through.view(B, T, act.K, d)
            torch.mul(through, act.act[..., None], out=feats)
            bias = sae.b_dec @ W_O
            # the error through W_O: (z - sum_k c_k W_dec[k] - b_dec) W_O, by linearity
            vec[:, :, r + act.K] = cap.z[l].flatten(-2) @ W_O - feats.sum(2) - bias
            vec[:, :, r + act.K + 1] = bias + weights.b_O[l]
            r += act.K + 2
        else:
            vec[:, :, r] = cap.attn_out[l]
            r += 1
        if l in transcoders:
            tc, act = transcoders[l]
            feats = vec[:, :, r:r + act.K]  # c_k W_dec[k]: [B,T,K,d], already in the residual stream
            torch.mul(tc.W_dec.index_select(0, act.index.flatten()).view(B, T, act.K, d), act.act[..., None], out=feats)
            vec[:, :, r + act.K] = cap.mlp_out[l] - feats.sum(2) - tc.b_dec  # the error: the MLP output not rebuilt
            vec[:, :, r + act.K + 1] = tc.b_dec
            r += act.K + 2
        else:
            vec[:, :, r] = cap.mlp_out[l]
            r += 1
    rows = SourceRows(vec, torch.tensor([int(c) for c in codes], device=dev),
                      torch.tensor(layers, device=dev), torch.cat(indices, 2), torch.cat(oks, 2))
    return rows, ends, mids


def resid_in(rows: SourceRows, sae: SaeWeights, targets: ActiveSet, pruning: Pruning,
             position_scale: torch.Tensor | None = None,
             by_norm: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[EdgeTable, torch.Tensor]:
    """Step 4: edges into every active residual feature j at s from the rows at s.

    value[b,s,k,r] = vec[b,s,r] . W_enc[:, j]. Returns kept edges and the kept sum per target [B,T,K].
    A transcoder (``sae.kind`` TRANSCODER) reads LN2's output, center(resid_mid) / sigma2: its edges are
    ``mlp_in``, value[b,s,k,r] = vec[b,s,r] . center(W_enc[:, j]) * position_scale[b,s] (1 / sigma2 [B,T]).
    With top_k, only the rows that can hold a kept edge are multiplied (:func:`bounded_values`; ``by_norm``:
    the rows' norms [B,T,R] sorted descending and their order, when the caller has them).
    """
    B, T, K = targets.index.shape
    R = rows.vec.shape[2]
    transcoder = sae.kind is NodeKind.TRANSCODER
    code, kind = (Code.TC, EdgeKind.MLP_IN) if transcoder else (Code.RESID, EdgeKind.RESID_IN)
    kept = torch.zeros(B, T, K, device=rows.vec.device)
    tables = []
    bounded = BOUNDED and pruning.top_k is not None and pruning.top_k <= FIRST_ROWS and R > 2 * FIRST_ROWS
    if bounded:
        norms, order = by_norm if by_norm is not None else torch.linalg.vector_norm(rows.vec, dim=-1).sort(
            dim=-1, descending=True)  # [B, T, R]
        scale = position_scale.abs() if position_scale is not None else torch.ones(B, T, device=rows.vec.device)
        at_least = torch.where(scale > 0, pruning.min_abs / scale, torch.inf)  # min_abs before the scale
    step = max(1, sized(rows.vec.device, CHUNK_ELEMENTS) // max(1, B * T * R))  # a busy position: K x R values
    for k0 in range(0, K, step):
        enc = sae.encoder_columns(targets.index[:, :, k0:k0 + step])  # [B,T,k,d]
        if transcoder:  # center(x) . w == x . center(w): LN2's centering moves onto the encoder column
            enc = center(enc)
        mask = targets.mask[:, :, k0:k0 + step]
        if bounded:  # [B,T,k,n] of the rows order[..., :n] (in the products' dtype, then float32)
            value, row_of = bounded_values(enc.to(pruning.dtype), rows.vec, norms, order, at_least[..., None],
                                           pruning.top_k, mask)
        else:  # [B,T,k,R] (padded slots hold zero vectors)
            value = (enc.to(pruning.dtype) @ rows.vec.to(pruning.dtype).transpose(-1, -2)).float()
        if position_scale is not None:
            value.mul_(position_scale[:, :, None, None])
        (b, s, k), r, vals, kept[:, :, k0:k0 + step] = select_edges(value, mask, pruning)
        if bounded:
            r = row_of[b, s, r]
        k = k + k0
        tables.append(_edges(b, rows, s, r, code, sae.layer, targets.index[b, s, k], s,
                             torch.full_like(b, -1), vals, kind))
    return EdgeTable.cat(tables), kept


def bounded_values(enc: torch.Tensor, vec: torch.Tensor, norms: torch.Tensor, order: torch.Tensor,
                   at_least: torch.Tensor, top: int, mask: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The products of steps 4 and 5 that may be among a target's ``top`` |values| at least ``at_least``:
    enc [B,T,k,d] (the targets' vectors at each position, in the products' dtype), vec [B,T,R,d] (the rows
    there), their norms [B,T,R] sorted descending with the rows' ``order``, at_least [B,T,k] (broadcastable),
    mask [B,T,k] (real targets; all when None). Returns value [B,T,k,n] = enc . vec[rows] in float32 and
    rows [B,T,n], in row order, so that equal values (common in bfloat16) tie in a top-k as in the dense
    product.

    |enc . vec_r| <= |enc| |vec_r| (Cauchy-Schwarz): the FIRST_ROWS rows of largest norm at each position
    are multiplied first; a target's ``top``-th |value| among them (or at_least, if larger) is a floor that
    its kept edges reach, so a row whose norm is below every target's floor / |enc| holds none
    (:func:`first_rows`). Then the longest such prefix of the positions' norm-sorted rows is multiplied: one
    batched product (on the GPT-2-shaped fixture, a quarter of step 4's rows; step 5 goes through
    :func:`rows_dot_top_parts`, which shares the two passes)."""
    first, limit = first_rows(enc, vec, order, at_least, top, mask)
    need = int((norms >= limit.amin(-1, keepdim=True)).sum(-1).max())  # rows at or above the lowest limit
    return rows_up_to(enc, vec, order, first, need)


def first_rows(enc: torch.Tensor, vec: torch.Tensor, order: torch.Tensor, at_least: torch.Tensor, top: int,
               mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first pass of :func:`bounded_values` (same arguments): the products of each position's FIRST_ROWS
    rows of largest norm, first [B,T,k,F] (float32), and each target's limit [B,T,k]: no row whose norm is
    below it holds one of the target's kept edges (inf for a masked target or a zero vector)."""
    B, T, _, _ = vec.shape
    at = torch.arange(B, device=vec.device)[:, None, None], torch.arange(T, device=vec.device)[None, :, None]
    first = (enc @ gather_rows(vec, *at, order[..., :FIRST_ROWS]).to(enc.dtype).transpose(-1, -2)).float()  # [B,T,k,F]
    return first, _limits(first, enc, at_least, top, mask)


def _limits(first: torch.Tensor, enc: torch.Tensor, at_least: torch.Tensor, top: int,
            mask: torch.Tensor | None) -> torch.Tensor:
    """Each target's limit [...] from its first-pass values ``first`` [..., F] and its vector ``enc`` [..., d]
    (:func:`first_rows`)."""
    slack = BOUND_SLACK[enc.dtype]
    floor = first.abs().topk(top, dim=-1).values[..., -1] / slack
    limit = torch.maximum(floor, at_least) / (torch.linalg.vector_norm(enc, dim=-1).float() * slack)
    limit = torch.nan_to_num(limit, nan=torch.inf)  # 0 / 0: a zero vector, whose values are all 0
    return limit if mask is None else torch.where(mask, limit, torch.inf)


def rows_up_to(enc: torch.Tensor, vec: torch.Tensor, order: torch.Tensor, first: torch.Tensor, need: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`bounded_values`' result from its first pass ``first`` [B,T,k,F]: the products of the rows
    order[..., F:need] added, then every row in row order: value [B,T,k,max(need, F)], rows [B,T,max(need, F)]."""
    if need > FIRST_ROWS:
        B, T, _, _ = vec.shape
        at = torch.arange(B, device=vec.device)[:, None, None], torch.arange(T, device=vec.device)[None, :, None]
        rest = (enc @ gather_rows(vec, *at, order[..., FIRST_ROWS:need]).to(enc.dtype).transpose(-1, -2)).float()
        first = torch.cat([first, rest], -1)
    rows, by_row = order[..., :max(need, FIRST_ROWS)].sort(dim=-1)
    return first.gather(-1, by_row[:, :, None, :].expand_as(first)), rows


@dataclass
class DirectPairs:
    """Step 5's selected (source position, head) pairs of N targets: P pairs each, [N, P]; the query of pair
    (n, p) is row ``query_row[n, p]`` of ``query`` [Q, d], center(W_V[h] W_enc[h-slice, f]), one row per distinct
    (head, feature) of the pairs, in head order; ``scale`` = A[b,h,t,s] / sigma[b,s]."""

    head: torch.Tensor
    pos: torch.Tensor
    scale: torch.Tensor
    query: torch.Tensor
    query_row: torch.Tensor


def direct_pairs(cap_resid: torch.Tensor, sigma: torch.Tensor, pattern: torch.Tensor, W_V, b_V, sae: SaeWeights,
                 tb: torch.Tensor, tt: torch.Tensor, tf: torch.Tensor, pruning: Pruning) -> DirectPairs:
    """Step 5's pairs for the attention features (tb, tt, tf) [N] = (prompt, position, feature): the top
    ``pruning.direct_positions`` (s, h) pairs of each target by step-1 DFA, A[h,t,s] v[s,h] . W_enc[h,:,f]
    (all pairs when None: exact). ``cap_resid`` [B, S, d], ``sigma`` [B, S], ``pattern`` [B, H, S, S]."""
    H, d, dh = W_V.shape
    B, S, _ = cap_resid.shape
    N = tb.shape[0]
    dev = tb.device
    n_pairs = S * H if pruning.direct_positions is None else min(S * H, pruning.direct_positions)
    W_Vc = centered_W_V(W_V)
    v = ((cap_resid / sigma[..., None]) @ W_Vc.permute(1, 0, 2).reshape(d, H * dh)).view(B, S, H, dh)
    v_low = (v + b_V).permute(2, 0, 1, 3).to(pruning.dtype)  # [H, B, S, dh]
    enc = sae.W_enc.T.view(-1, H, dh)  # [d_sae, H, dh]: each feature's encoder column by head
    h = torch.empty(N, n_pairs, dtype=torch.long, device=dev)
    s = torch.empty_like(h)
    # targets padded per prompt, [B, n]: every prompt's step-1 DFA in one matmul per chunk of columns
    count = torch.bincount(tb, minlength=B)
    first = torch.cumsum(count, 0) - count
    widest = int(count.max()) if N else 0
    chunk = max(1, sized(dev, CHUNK_ELEMENTS) // (B * S * H))
    for c0 in range(0, widest, chunk):
        column = torch.arange(c0, min(widest, c0 + chunk), device=dev)
        ok = column[None, :] < count[:, None]
        sel = torch.where(ok, first[:, None] + column, 0)  # [B, c]
        c = column.shape[0]
        E_sel = heads_first(enc, tf[sel.flatten()], enc.new_empty(H, B * c, dh)).view(H, B, c, dh)
        dfa = (E_sel.to(pruning.dtype) @ v_low.transpose(2, 3)).float().abs_()  # |v . W_enc| [H, B, c, S]
        # A[b, h, t of each target, :]: rows of the pattern viewed [B*H*S, S]
        at = ((torch.arange(B, device=dev)[:, None, None] * H + torch.arange(H, device=dev)[:, None]) * S
              + tt[sel][:, None, :])  # [B, H, c]
        A_sel = pattern.reshape(B * H * S, S).index_select(0, at.flatten()).view(B, H, c, S)
        later = (torch.arange(S, device=dev) > tt[sel][..., None]).float().neg_()[:, :, None, :]  # -1: s > t
        # |A v . W_enc| (A >= 0), -1 at s > t (never chosen), in the top-k's layout [B, c, H, S]: one pass
        score = torch.addcmul(later, dfa.permute(1, 2, 0, 3), A_sel.transpose(1, 2),
                              out=torch.empty(B, c, H, S, device=dev))
        pairs = score.view(B * c, H * S).topk(n_pairs, dim=-1).indices[ok.flatten()]
        real = sel[ok]
        h[real], s[real] = pairs // S, pairs % S
    # a pair's query, center(W_V[h] W_enc[h-slice, f]), depends on its (head, feature) alone, and features recur
    # across positions: one row per distinct pair of the layer (~10x fewer than pairs on the GPT-2-shaped fixture;
    # the products were a third of this step), head by head into consecutive rows
    key = h * sae.d_sae + tf[:, None]  # [N, P]: sorted, the rows of one head are consecutive
    distinct, query_row = torch.unique(key.flatten(), return_inverse=True)
    some_target = torch.empty_like(distinct).scatter_(0, query_row, torch.arange(N, device=dev).repeat_interleave(n_pairs))
    q = torch.empty(distinct.shape[0], d, device=dev)
    start = 0
    for head, c in enumerate(torch.bincount(distinct // sae.d_sae, minlength=H).tolist()):
        torch.mm(enc[tf[some_target[start:start + c]], head], W_Vc[head].T, out=q[start:start + c])
        start += c
    scale = pattern[tb[:, None], h, tt[:, None], s] / sigma[tb[:, None], s]  # [N,P]
    return DirectPairs(h, s, scale, q, query_row.view(N, n_pairs))


def rows_dot(vec: torch.Tensor, loc: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """out[m, r] = vec[loc[m], r] . q[m]  for vec [S, R, d], loc [M] sorted ascending, q [M, d] -> [M, R].

    One matmul per run of equal ``loc``: that position's source rows against every query that chose
    it, so source rows are never copied per query and each product lands in place. On CUDA:
    rows_dot_batched (2.5x slower on CPU, where gathering the chosen positions' rows copies [U, R, d]
    that this loop reads in place).
    """
    if vec.is_cuda if BATCHED_ROWS_DOT is None else BATCHED_ROWS_DOT:
        return rows_dot_batched(vec, loc, q)
    uniq, counts = torch.unique_consecutive(loc, return_counts=True)
    out = torch.empty(q.shape[0], vec.shape[1], device=q.device, dtype=q.dtype)
    start = 0
    for k, c in zip(uniq.tolist(), counts.tolist()):  # one matmul per chosen position
        torch.matmul(q[start:start + c], vec[k].T, out=out[start:start + c])  # vec[k]: a view, no copy
        start += c
    return out


BATCHED_ROWS_DOT: bool | None = None  # rows_dot_batched: None = on CUDA only (slower on CPU)


def bounds_rows(R: int, top: int, device: torch.device) -> bool:
    """Whether step 5's products of R rows a position go through :func:`rows_dot_top_parts` (on the CPU, with a
    top of at most FIRST_ROWS and rows enough for the first pass to leave some out)."""
    return R > 2 * FIRST_ROWS and top <= FIRST_ROWS and not (
        device.type == "cuda" if BATCHED_ROWS_DOT is None else BATCHED_ROWS_DOT)


@dataclass
class RowsPart:
    """One block's rows for :func:`rows_dot_top_parts`: vec [S, R, d], their norms [S, R] sorted descending and
    their ``order`` [S, R] (PositionBlock.rows_by_norm), and the position of each of the part's queries, loc
    [M_i] sorted ascending."""

    vec: torch.Tensor
    norms: torch.Tensor
    order: torch.Tensor
    loc: torch.Tensor


def rows_dot_top_parts(parts: list[RowsPart], source: torch.Tensor, index: torch.Tensor, top: int,
                       at_least: torch.Tensor, targets: TargetsOf | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 5's row products where they matter, over the blocks of a layer at once: query m is source[index[m]]
    ([Q, d], in the products' dtype; ``index`` [M] takes the parts' queries in their order) at position
    loc[m] of its part, at_least [M]. Returns value (float32), row [M, top] (``top`` <= FIRST_ROWS < every
    part's R): value[m, i] = vec[loc[m], row[m, i]] . source[index[m]], sorted by |value| descending, holding
    every row whose |value| is among the ``top`` largest of query m and at least at_least[m] (what step 5 may
    keep; with ``targets``, below).

    Each position's FIRST_ROWS rows of largest norm are multiplied first and a query needs only the rows whose
    norm reaches its limit (:func:`first_rows`): at ~10 queries a position most positions need nothing more
    (on the GPT-2-shaped fixture, 3 in 4), and one call a position was mostly operator overhead. So the first
    pass is batched over every chosen position of the layer, positions bucketed by their count of queries
    (powers of two, queries padded to the bucket's largest), and only the positions that need more rows go one
    by one, their queries in groups by need (:func:`_query_groups`).

    With ``targets`` (the step-5 target of each query, which keeps its ``top`` largest values over all of its
    queries), a query's floor is its target's ``top``-th largest first-pass value over them all, rather than
    its own: no row below it can be among the target's kept edges either, and the rows a target's weaker pair
    needs shrink (the values returned for such a query need not be its own top, only hold every row that can
    be among its target's)."""
    dev, d = source.device, source.shape[1]
    M = index.shape[0]
    value = torch.empty(M, top, device=dev)
    row = torch.empty(M, top, device=dev, dtype=torch.long)
    if M == 0:
        return value, row
    # every chosen position: its part, its position there, its count of queries and the first of them
    part_of, loc_of, counts = [], [], []
    for i, part in enumerate(parts):
        uniq, count = torch.unique_consecutive(part.loc, return_counts=True)
        part_of.append(torch.full_like(uniq, i))
        loc_of.append(uniq)
        counts.append(count)
    part_at, loc_at, count = torch.cat(part_of), torch.cat(loc_of), torch.cat(counts)
    start = torch.cumsum(count, 0) - count
    firsts = torch.cat([gather_rows(part.vec, uniq[:, None], part.order[uniq, :FIRST_ROWS]).to(source.dtype)
                        for part, uniq in zip(parts, loc_of)])  # [U, F, d]: each position's first rows
    first_order = torch.cat([part.order[uniq, :FIRST_ROWS] for part, uniq in zip(parts, loc_of)])  # [U, F]
    next_norm = torch.cat([part.norms[uniq, FIRST_ROWS] for part, uniq in zip(parts, loc_of)])  # [U]
    by_row_rows, by_row = first_order.sort(dim=1)  # row order, so that equal values tie as in the dense product
    bucket = torch.ceil(torch.log2(count.double())).long()
    buckets = []
    for g in torch.unique(bucket).tolist():  # the first pass, a bucket of positions at a time
        members = (bucket == g).nonzero().flatten()  # [Ug]
        C = int(count[members].max())
        slot = start[members, None] + torch.arange(C, device=dev)  # [Ug, C]
        real = torch.arange(C, device=dev) < count[members, None]
        slot = torch.where(real, slot, 0)  # padding reads query 0, whose values are never used
        enc = source.index_select(0, index[slot.flatten()]).view(-1, C, d)  # [Ug, C, d]
        first = torch.bmm(enc, firsts[members].transpose(1, 2)).float()  # [Ug, C, F]
        in_row_order = first.gather(2, by_row[members, None, :].expand_as(first))
        best = in_row_order.abs().topk(top, dim=2).indices  # [Ug, C, top]
        taken = slot[real]
        value[taken] = in_row_order.gather(2, best)[real]
        row[taken] = by_row_rows[members, None, :].expand(-1, C, -1).gather(2, best)[real]
        buckets.append((members, slot, real, enc, first))
    if targets is not None:
        at_least = torch.maximum(at_least, targets.floor(value) / BOUND_SLACK[source.dtype])
    later = []  # (position, its queries [1, 1, c, d], first [1, 1, c, F], limit [c]) of those needing more rows
    counts, parts_at, locs_at, starts = count.tolist(), part_at.tolist(), loc_at.tolist(), start.tolist()  # one sync
    for members, slot, real, enc, first in buckets:
        limit = _limits(first, enc, at_least[slot], top, real)  # [Ug, C]
        # a position whose next row reaches some query's limit: rows past the first pass may hold kept edges
        member = members.tolist()
        for j in (next_norm[members] >= limit.amin(1)).nonzero().flatten().tolist():
            u = member[j]
            later.append((u, enc[j:j + 1, :counts[u]][None], first[j:j + 1, :counts[u]][None], limit[j, :counts[u]]))
    for u, enc, first, limit in later:  # the positions that need rows past the first pass
        part, k, s0 = parts[parts_at[u]], locs_at[u], starts[u]
        rows_k, order_k = part.vec[None, None, k], part.order[None, None, k]
        for group, need in _query_groups(part.norms[k], limit):  # queries [c_g] (None: all) and rows they need
            values, cols = rows_up_to(enc if group is None else enc[:, :, group], rows_k, order_k,
                                      first if group is None else first[:, :, group], need)
            values, cols = values[0, 0], cols[0, 0]  # [c_g, n], [n]
            best = values.abs().topk(top, dim=1).indices
            at = slice(s0, s0 + enc.shape[2]) if group is None else group + s0
            value[at], row[at] = values.gather(1, best), cols[best]
    return value, row


@dataclass
class TargetsOf:
    """The step-5 target of each query of :func:`rows_dot_top_parts`: query m is pair ``pair[m]`` = n * P + p of
    target n (P pairs a target, N targets), and its values count scaled by ``scale`` [M] (A / sigma)."""

    pair: torch.Tensor
    P: int
    N: int
    scale: torch.Tensor

    def floor(self, value: torch.Tensor) -> torch.Tensor:
        """Each query's floor before its scale [M] from first-pass values ``value`` [M, top] (each query's
        largest): its target's top-th largest |scale * value| over all of its queries, / |scale| (inf where the
        scale is 0: every value of that query is 0)."""
        top = value.shape[1]
        scaled = torch.zeros(self.N * self.P, top, device=value.device)
        scaled[self.pair] = (value * self.scale[:, None]).abs_()
        floor = scaled.view(self.N, self.P * top).topk(top, dim=1).values[:, -1]  # [N]
        scale = self.scale.abs()
        return torch.where(scale > 0, floor[self.pair // self.P] / scale, torch.inf)


SPLIT_QUERIES = 64  # a position chosen by at least this many queries multiplies them in groups by the rows they need
QUERY_GROUPS = 4  # at most this many groups (each costs ~10 operators), besides those the first pass settles


def _query_groups(norms: torch.Tensor, limit: torch.Tensor) -> list[tuple[torch.Tensor | None, int]]:
    """The queries of one position in groups, each with the number of norm-sorted rows it multiplies: norms [R]
    descending, limit [c] (first_rows). A query needs the rows whose norm reaches its limit, and at a busy
    position (a BOS-like one that most targets attend to, with thousands of rows) these range from the first
    pass alone to most rows: one prefix for all was ~2x the products of a prefix per query on the GPT-2-shaped
    fixture. So queries sorted by need go in QUERY_GROUPS parts of equal size, leaving out those that need no
    more than the first pass (whose top the first pass settles). Returns (query indices or None for all, rows
    needed)."""
    need = torch.searchsorted(-norms, -limit, right=True)  # rows whose norm >= limit [c]
    most = int(need.max())
    if limit.shape[0] < SPLIT_QUERIES or most <= FIRST_ROWS:
        return [(None, most)]
    need, by_need = need.sort()
    settled = int(torch.searchsorted(need, FIRST_ROWS, right=True))  # need <= FIRST_ROWS: the first pass is all
    cuts = [settled] + [settled + (need.shape[0] - settled) * (i + 1) // QUERY_GROUPS for i in range(QUERY_GROUPS)]
    return [(by_need[a:b], int(need[b - 1])) for a, b in zip(cuts, cuts[1:]) if b > a]


def rows_dot_batched(vec: torch.Tensor, loc: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """:func:`rows_dot` for a GPU: positions bucketed by how many queries chose them (powers of two),
    one batched matmul per bucket, [U, C, d] x [U, d, R] with C the bucket's largest count, so the
    kernels launched do not grow with the batch (the loop launches ~3 per chosen position: ~10^5 a
    B32x128 batch of GPT-2)."""
    M, R = q.shape[0], vec.shape[1]
    out = torch.empty(M, R, device=q.device, dtype=q.dtype)
    if M == 0:
        return out
    uniq, inverse, counts = torch.unique_consecutive(loc, return_inverse=True, return_counts=True)
    rank = torch.arange(M, device=q.device) - (torch.cumsum(counts, 0) - counts)[inverse]  # within its position
    bucket = torch.ceil(torch.log2(counts.double())).long()  # per chosen position
    for g in torch.unique(bucket).tolist():  # at most log2(M) + 1 buckets
        members = (bucket == g).nonzero().flatten()  # chosen positions of this bucket [U]
        local = torch.full_like(uniq, -1)
        local[members] = torch.arange(members.shape[0], device=q.device)
        entries = (local[inverse] >= 0).nonzero().flatten()  # its queries
        u, c = local[inverse[entries]], rank[entries]
        queries = torch.zeros(members.shape[0], int(counts[members].max()), q.shape[1], device=q.device, dtype=q.dtype)
        queries[u, c] = q[entries]
        values = torch.bmm(queries, vec[uniq[members]].transpose(1, 2))  # [U, C, R]
        out[entries] = values[u, c]
    return out


def attn_constant(sae: SaeWeights, b_V: torch.Tensor) -> torch.Tensor:
    """Step 1's bias node: b_enc - b_dec.W_enc plus the b_V term (zero once b_V is folded), [d_sae]."""
    H, dh = b_V.shape
    # kept with the SAE: a d_in x d_sae product of fixed weights each layer and batch was ~1% of a GPT-2 graph
    return sae.cached("attn_constant", (b_V,), lambda: sae.encoder_constant() + (b_V.reshape(1, H * dh) @ sae.W_enc)[0])

