"""Steps 3-5 over blocks of positions, each padded only to its own busiest position.

The sources of steps 4 and 5 (and of transcoders' ``mlp_in``) are every upstream component at a position:
EMB, POS, and per layer the attention features (padded to K slots), error and bias, and the MLP output (or
its transcoder's features, error and bias). Padding every position to
the batch's largest K would let one position that fires thousands of features (a BOS position, say)
multiply the memory of all. So positions are grouped by their number of active attention features
(powers of two; transcoder features count too), each group cut into blocks of at most BLOCK_ELEMENTS floats of source vectors, and
each block padded to its own largest K. The Python loop runs over blocks, never over features.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from catalog.ids import NodeKind
from ingest.rdfa import steps
from ingest.rdfa.tensors import ActiveSet, Capture, Code, EdgeKind, EdgeTable, Pruning, SourceRows, Weights
from ingest.rdfa.types import SaeWeights

# floats of source vectors per block (32 MB in float32): each layer's features are padded to the block's
# busiest position, so fewer positions a block pad less (at GPT-2 scale, B8x64: 80% of the row slots are
# real at 32 MB against 55% at 256 MB, and steps 3-5 took 6.4 s against 7.0 s, with 50 blocks against 8)
BLOCK_ELEMENTS = 1 << 23


@dataclass
class PositionBlock:
    """Source rows of P positions: ``rows`` is [1, P, R, d] (P in place of T); position p is
    position ``pos[p]`` of prompt ``prompt[p]``; ``rows.prefix(ends[L])`` sums to resid_pre of layer L,
    ``rows.prefix(mids[L])`` to resid_mid (steps.component_rows)."""

    prompt: torch.Tensor  # [P]
    pos: torch.Tensor  # [P]
    rows: SourceRows
    ends: list[int]
    mids: list[int]
    _by_norm: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def rows_by_norm(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The norms of each position's first ``n`` rows, sorted descending, and their order: [P, n] each.
        Steps 4 and 5 of a layer read the same rows, so they share one sort (the bounds' first passes)."""
        if n not in self._by_norm:
            self._by_norm[n] = torch.linalg.vector_norm(self.rows.vec[0, :, :n], dim=-1).sort(dim=-1, descending=True)
        return self._by_norm[n]


def _take(act: ActiveSet, b: torch.Tensor, s: torch.Tensor) -> ActiveSet:
    """The active set at positions (b, s) [P] as [1, P, K'], K' the largest count among them (slots are
    sorted by |activation|, real ones first, so cutting at K' loses none)."""
    mask = act.mask[b, s]
    k = max(1, int(mask.sum(-1).max())) if mask.numel() else 1
    return ActiveSet(act.index[b, s, :k][None], act.act[b, s, :k][None], act.pre[b, s, :k][None], mask[:, :k][None])


def _view(cap: Capture, b: torch.Tensor, s: torch.Tensor) -> Capture:
    """What component_rows reads of ``cap``, at positions (b, s) [P] only, as one prompt of P positions."""
    at = lambda xs: [x[b, s][None] for x in xs]  # noqa: E731
    return Capture(lengths=torch.tensor([b.shape[0]], device=b.device), embed=cap.embed[b, s][None],
                   pos_embed=cap.pos_embed[b, s][None], resid_pre=[], ln1_scale=[], pattern=[], z=at(cap.z),
                   attn_out=at(cap.attn_out), mlp_out=at(cap.mlp_out))


def position_blocks(cap: Capture, weights: Weights, attn: dict[int, tuple[SaeWeights, ActiveSet]],
                    transcoders: dict[int, tuple[SaeWeights, ActiveSet]] | None = None) -> list[PositionBlock]:
    """Every valid position of the batch in exactly one block; see the module docstring."""
    transcoders = transcoders or {}
    b, s = cap.valid.nonzero(as_tuple=True)
    count = sum((act.mask[b, s].sum(-1) for _, act in [*attn.values(), *transcoders.values()]), torch.zeros_like(b))
    group = torch.ceil(torch.log2(count.double() + 1)).long()
    d = cap.embed.shape[-1]
    blocks = []
    for g in torch.unique(group).tolist():
        bg, sg = b[group == g], s[group == g]
        n_rows = _n_rows(attn, bg, sg, weights.n_layers) + _n_rows(transcoders, bg, sg, weights.n_layers) - 2
        step = max(1, steps.sized(b.device, BLOCK_ELEMENTS) // (n_rows * d))
        for i in range(0, bg.shape[0], step):
            pb, ps = bg[i:i + step], sg[i:i + step]
            taken = {l: (sae, _take(act, pb, ps)) for l, (sae, act) in attn.items()}
            taken_tc = {l: (sae, _take(act, pb, ps)) for l, (sae, act) in transcoders.items()}
            rows, ends, mids = steps.component_rows(_view(cap, pb, ps), weights, taken, weights.n_layers, taken_tc)
            blocks.append(PositionBlock(pb, ps, rows, ends, mids))
    return blocks


def _n_rows(saes: dict[int, tuple[SaeWeights, ActiveSet]], b: torch.Tensor, s: torch.Tensor, n_layers: int) -> int:
    """Source rows per position of one half of each layer (attention or MLP) when positions (b, s) share one
    padding, plus EMB and POS: per layer its SAE's features + error + bias, or one row without an SAE."""
    rows = 2
    for l in range(n_layers):
        rows += int(saes[l][1].mask[b, s].sum(-1).max()) + 2 if l in saes else 1
    return rows


def resid_in_by_block(blocks: list[PositionBlock], sae: SaeWeights, targets: ActiveSet, pruning: Pruning,
                      ln2_scale: torch.Tensor | None = None) -> tuple[EdgeTable, torch.Tensor]:
    """Step 4 into every active feature of ``targets`` [B, T, K], block by block. Returns kept edges
    and the kept sum per target [B, T, K]. A transcoder's targets (``mlp_in``) read the rows up to its layer's
    attention output, through LN2's frozen scale ``ln2_scale`` [B, T]."""
    kept_sum = torch.zeros(targets.index.shape, device=targets.index.device)
    tables = []
    transcoder = sae.kind is NodeKind.TRANSCODER
    for blk in blocks:
        sub = _take(targets, blk.prompt, blk.pos)
        rows = blk.rows.prefix((blk.mids if transcoder else blk.ends)[sae.layer])
        scale = 1 / ln2_scale[blk.prompt, blk.pos][None] if transcoder else None  # [1, P]
        norms, order = blk.rows_by_norm(rows.vec.shape[2])
        table, kept = steps.resid_in(rows, sae, sub, pruning, scale, (norms[None], order[None]))
        kept_sum[blk.prompt, blk.pos, :sub.K] = kept[0]
        local = table.dst_pos
        table.prompt, table.src_pos, table.dst_pos = blk.prompt[local], blk.pos[local], blk.pos[local]
        tables.append(table)
    return EdgeTable.cat(tables), kept_sum


def direct_by_block(blocks: list[PositionBlock], pairs: steps.DirectPairs, sae: SaeWeights, tb: torch.Tensor,
           tt: torch.Tensor, tf: torch.Tensor, B: int, T: int, pruning: Pruning) -> tuple[EdgeTable, torch.Tensor]:
    """Step 5's edges into the attention features (tb, tt, tf) [N] through their selected pairs:
    value = scale[n,p] * vec[b, s[n,p], r] . query[n,p], r over the rows of layers < sae.layer.

    Each pair's candidates are its top-k rows (all rows when top_k is None); the target keeps the top k
    of its pairs' candidates. Returns kept edges and the kept sum per target [N].
    """
    N, P = pairs.pos.shape
    dev = tb.device
    n_cand = pruning.top_k if pruning.top_k is not None else max(blk.ends[sae.layer] for blk in blocks)
    val = torch.zeros(N, P, n_cand, device=dev)
    code = torch.full((N, P, n_cand), int(Code.REST), dtype=torch.long, device=dev)
    layer, index = torch.full_like(code, -1), torch.full_like(code, -1)
    block_of = torch.full((B, T), -1, dtype=torch.long, device=dev)  # position -> its block
    local_of = torch.full((B, T), -1, dtype=torch.long, device=dev)  # ... and its index there
    for i, blk in enumerate(blocks):
        block_of[blk.prompt, blk.pos] = i
        local_of[blk.prompt, blk.pos] = torch.arange(blk.prompt.shape[0], device=dev)
    # every pair by its source's block (-1: a padding position, chosen only when all pairs are): one sort
    pair_block = block_of[tb[:, None], pairs.pos].flatten()
    order = torch.argsort(pair_block, stable=True)
    ends = torch.searchsorted(pair_block[order], torch.arange(-1, len(blocks), device=dev), right=True).tolist()
    bounded = []  # (block, its rows, its pairs, their positions there) of the blocks whose products are bounded
    for i, blk in enumerate(blocks):
        chosen = order[ends[i]:ends[i + 1]]
        if chosen.numel() == 0:
            continue
        loc = local_of[tb[chosen // P], pairs.pos.flatten()[chosen]]
        by_position = torch.argsort(loc, stable=True)  # rows_dot takes each position's queries together
        chosen, loc = chosen[by_position], loc[by_position]
        rows = blk.rows.prefix(blk.ends[sae.layer])
        if pruning.top_k is not None and steps.BOUNDED and steps.bounds_rows(rows.vec.shape[2], pruning.top_k, dev):
            bounded.append((blk, rows, chosen, loc))
            continue
        n, p = chosen // P, chosen % P
        query = pairs.query.index_select(0, pairs.query_row.flatten()[chosen])  # [M, d] (chosen = n * P + p)
        v = steps.rows_dot(rows.vec[0].to(pruning.dtype), loc, query.to(pruning.dtype)).float()  # [M, R]
        v.mul_(pairs.scale.flatten()[chosen, None])
        k = min(n_cand, v.shape[1])
        r = v.abs().topk(k, dim=-1).indices if k < v.shape[1] else torch.arange(k, device=dev).expand(len(n), k)
        val[n, p, :k] = v.gather(1, r)
        code[n, p, :k], layer[n, p, :k], index[n, p, :k] = rows.code[r], rows.layer[r], rows.index[0, loc[:, None], r]
    if bounded:  # only what can be among a pair's top_k and reach min_abs is computed, every block at once
        chosen = torch.cat([c for _, _, c, _ in bounded])
        scale = pairs.scale.flatten()[chosen]  # [M]
        at_least = torch.where(scale != 0, pruning.min_abs / scale.abs(), torch.inf)  # scale 0: all values 0
        parts = [steps.RowsPart(rows.vec[0].to(pruning.dtype), *blk.rows_by_norm(rows.vec.shape[2]), loc)
                 for blk, rows, _, loc in bounded]
        v, r = steps.rows_dot_top_parts(parts, pairs.query.to(pruning.dtype), pairs.query_row.flatten()[chosen],
                                        pruning.top_k, at_least, steps.TargetsOf(chosen, P, N, scale))
        v.mul_(scale[:, None])
        n, p, k, first = chosen // P, chosen % P, r.shape[1], 0
        val[n, p, :k] = v
        for _, rows, c, loc in bounded:
            m = slice(first, first + c.shape[0])
            r_m = r[m]
            code[n[m], p[m], :k], layer[n[m], p[m], :k] = rows.code[r_m], rows.layer[r_m]
            index[n[m], p[m], :k] = rows.index[0, loc[:, None], r_m]
            first += c.shape[0]
    # s > t carries zero attention, padded feature slots are zero vectors: both give exact zeros, dropped
    (n,), j, vals, kept = steps.select_edges(val.reshape(N, -1), torch.ones_like(tb, dtype=torch.bool), pruning)
    p, c = j // n_cand, j % n_cand
    full = lambda x: torch.full_like(n, int(x))  # noqa: E731
    table = EdgeTable(tb[n], code[n, p, c], layer[n, p, c], index[n, p, c], pairs.pos[n, p], full(Code.ATTN),
                      full(sae.layer), tf[n], tt[n], pairs.head[n, p], vals, full(EdgeKind.DIRECT))
    return table, kept

