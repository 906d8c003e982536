"""Step 2 (``attn_in``): a fixed handful of kernels per band of target positions; on a GPU over every
prompt of the batch at once, so the kernels launched do not grow with the batch; on the CPU prompt by
prompt (prompt_groups).

value[h, target (b,t,f), row (b,s,r)] = A[b,h,t,s] * M[h, target, row],
M = (center(vec_r) / sigma[b,s]) W_V[h] . W_enc[h-slice, f]; each target keeps its top_k |value|.

Four ideas keep it cheap:
- **Blocks of rows.** The source rows of each position (its active features, error, bias) are laid
  out in blocks of GROUP rows, padded per position, so every block lies at one source position and
  A is constant over it. The top_k values of a target lie in the top_k blocks by the block's largest
  |value| = A * max |M| over the block (each of those blocks holds an entry at least as large as any
  entry outside them), so A multiplies one number per block, never every entry, and the top-k runs
  over GROUP-times fewer numbers; only the chosen blocks' entries are read again.
- **Prompts padded, not looped (GPU).** One batched matmul [H, B, n, dh] x [H, B, dh, m] per band: each
  prompt's targets in the band and its rows up to the band's last position, padded to the busiest.
- **Bounds skip most blocks** (with top_k): |value| <= A[b,h,t,s] * |E[h, f]| * max |P| over the block, by
  Cauchy-Schwarz. A first pass computes, for the targets at each band position, that position's
  BOUND_FIRST blocks of largest A * max |P| exactly: a target's top_k-th |value| there (or min_abs, if
  larger) is a floor that its kept edges reach. Only blocks whose bound reaches some target's floor enter M
  (the band's union, per prompt and head): about a fifth on the GPT-2-shaped fixture. Every edge kept
  without the bounds is still kept. The positions' floors are computed once for all bands of a group of
  prompts when they fit (_group_bounds; on the CPU they mostly do), so a band only takes a union.
- **Bands of target positions** for causality (a target reads rows at s <= t only), their bounds set
  so that bands hold about equal work: at least MIN_BANDS, more when the work exceeds the device's
  budget (``steps.sized``), so the kernels launched per batch do not grow with the batch.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from ingest.rdfa.steps import BOUND_SLACK, FlatRows, _flat_edges, centered_W_V, gather_rows, heads_first, select_edges, sized
from ingest.rdfa.tensors import ActiveSet, Code, EdgeKind, EdgeTable, Pruning
from ingest.rdfa.types import SaeWeights

GROUP = 8  # rows per block: a position's rows are padded to a multiple of it (~10% at GPT-2's L0)
MIN_BANDS = 8  # causal waste ~1/(2 x bands) of the work
BAND_ELEMENTS = 1 << 23  # floats of M per band at most (32 MB; a GPU's grows with its memory)
# Below these a band's ~20 operators cost more than its products (a toy model's prompt: ~10^4 products a
# layer), so small work gets fewer bands, and a small batch is taken whole even on the CPU
MIN_BAND_WORK = 1 << 20  # floats of M a band holds at least, unless MIN_BANDS already fit
SMALL_BATCH_WORK = 1 << 22  # a batch whose padded M is at most this goes in one group of prompts
BOUNDED = True  # skip the blocks whose Cauchy-Schwarz bound is below every target's floor (with top_k)
BOUND_FIRST = 16  # blocks per band position computed first: their top_k-th |value| is a target's floor


@dataclass
class RowBlocks:
    """The rows of each prompt in blocks of GROUP, position by position, stored slot-major so that a
    block's largest entry is an elementwise max over GROUP contiguous slices (a reduction over a short
    innermost axis was 7x slower on the CPU).

    slot_row [B, G, NB]: the row in slot g of block j (-1: padding); block_pos [B, NB]: each block's
    source position (T for padding blocks); before [B, T+1]: how many of a prompt's blocks lie at s < t.
    """

    slot_row: torch.Tensor
    block_pos: torch.Tensor
    before: torch.Tensor


def row_blocks(rows: FlatRows, B: int, T: int) -> RowBlocks:
    """The block layout of ``rows`` (sorted by prompt, then position)."""
    dev = rows.prompt.device
    key = rows.prompt * T + rows.pos
    count = torch.bincount(key, minlength=B * T)  # rows per position [B*T]
    n_blocks = (count + GROUP - 1) // GROUP
    before = torch.zeros(B, T + 1, dtype=torch.long, device=dev)
    before[:, 1:] = n_blocks.view(B, T).cumsum(1)
    first_of_position = before[:, :-1].flatten()  # each position's first block within its prompt
    NB = max(1, int(before[:, -1].max()))
    rank = torch.arange(key.shape[0], device=dev) - (torch.cumsum(count, 0) - count)[key]
    slot_row = torch.full((B, GROUP, NB), -1, dtype=torch.long, device=dev)
    slot_row[rows.prompt, rank % GROUP, first_of_position[key] + rank // GROUP] = torch.arange(key.shape[0], device=dev)
    block_key = torch.repeat_interleave(torch.arange(B * T, device=dev), n_blocks)  # every block's position
    first_block = torch.cumsum(n_blocks, 0) - n_blocks  # of each position, counting all prompts'
    within = first_of_position[block_key] + torch.arange(block_key.shape[0], device=dev) - first_block[block_key]
    block_pos = torch.full((B, NB), T, dtype=torch.long, device=dev)
    block_pos[block_key // T, within] = block_key % T
    return RowBlocks(slot_row, block_pos, before)


def band_bounds(targets_at: torch.Tensor, before: torch.Tensor, heads: int, budget: int) -> list[tuple[int, int]]:
    """Bands [t0, t1) of target positions holding about equal work: targets_at [B, T] targets per
    position, before [B, T+1] blocks at s < t, of the B prompts one band loop takes together. A band's
    work is B x heads x (its busiest prompt's targets) x (its busiest prompt's slots up to t1): the size
    of its M. At least MIN_BANDS bands, fewer when each would hold under MIN_BAND_WORK."""
    B, T = targets_at.shape
    cum = torch.zeros(B, T + 1, dtype=torch.long, device=targets_at.device)
    cum[:, 1:] = targets_at.cumsum(1)
    cum_l, slots = cum.T.tolist(), (before.amax(0) * GROUP).tolist()  # [T+1][B], [T+1]

    def work(t0: int, t1: int) -> int:
        return B * heads * max(b - a for a, b in zip(cum_l[t0], cum_l[t1])) * slots[t1]

    total = work(0, T) // 2 + 1  # the causal work, about
    n_bands = max(min(MIN_BANDS, -(-total // MIN_BAND_WORK)), -(-total // budget))
    if n_bands == 1:
        return [(0, T)]
    share = -(-total // n_bands)
    bounds, t0 = [], 0
    while t0 < T:
        t1 = t0 + 1
        while t1 < T and work(t0, t1 + 1) <= share:
            t1 += 1
        bounds.append((t0, t1))
        t0 = t1
    return bounds


PROMPTS_TOGETHER: bool | None = None  # one group of all prompts (None: on CUDA, or a small batch); else one each


def prompt_groups(targets_at: torch.Tensor, before: torch.Tensor, heads: int) -> list[range]:
    """The prompts each band loop covers (targets_at [B, T], before [B, T+1] as band_bounds takes them). A
    GPU takes the whole batch at once (padding each band to its busiest prompt: ~2x the products at GPT-2
    scale, but a fixed number of kernels); the CPU goes prompt by prompt, which pads nothing (the padded
    form was 1.5-2x slower there), unless the whole batch's padded M is small: a toy model's batch of 8
    prompts went through ~90 band loops a layer, 2.6x slower than the step it replaced."""
    B = targets_at.shape[0]
    together = PROMPTS_TOGETHER
    if together is None:
        padded = B * heads * int(targets_at.sum(1).max()) * int(before[:, -1].max()) * GROUP
        together = targets_at.device.type == "cuda" or padded <= SMALL_BATCH_WORK
    return [range(B)] if together else [range(b, b + 1) for b in range(B)]


@dataclass
class Layer:
    """One layer's step-2 operands, every prompt: P [H, B, G, NB + 1, dh] (each slot's row through each
    head, zero in padding slots; block NB is all padding), E [H, Nt, dh] (each target's encoder column by
    head), A [B, H, T, T+1] (the pattern, a zero column for padding blocks); targets (tb, tt, tk, tf) [Nt]
    sorted by (prompt, position). For the bound: P_norm [H, B, NB + 1] (each block's largest row norm by
    head), E_norm [H, Nt], block_pos [B, NB + 1] (the layout's, T for block NB); None without it."""

    rows: FlatRows
    layout: RowBlocks
    P: torch.Tensor
    E: torch.Tensor
    A: torch.Tensor
    tb: torch.Tensor
    tt: torch.Tensor
    tk: torch.Tensor
    tf: torch.Tensor
    P_norm: torch.Tensor | None = None
    E_norm: torch.Tensor | None = None
    block_pos: torch.Tensor | None = None
    first_at: list[int] | None = None  # [B*T]: how many targets lie at flat positions b * T + t <= each (attn_in)


def attn_in(rows: FlatRows, sigma: torch.Tensor, pattern: torch.Tensor, W_V: torch.Tensor,
            sae: SaeWeights, targets: ActiveSet, pruning: Pruning,
            budget: int | None = None) -> tuple[EdgeTable, torch.Tensor]:
    """Step 2: per-head edges from every source row at s <= t into every active feature f at t.

    ``rows``: the residual SAE decomposition of each position (steps.resid_sae_rows); ``sigma`` [B, T]
    LN1's scale; ``pattern`` [B, H, T, T]; ``W_V`` [H, d, dh]; ``targets`` the active attention
    features [B, T, K]; ``budget``: floats of M per band at most. Returns the kept edges and the kept
    sum per target [B, T, K].
    """
    B, T, K = targets.index.shape
    H, d, dh = W_V.shape
    dev = W_V.device
    kept_sum = torch.zeros(B, T, K, device=dev)
    tb, tt, tk = targets.mask.nonzero(as_tuple=True)  # sorted by (prompt, position)
    if tb.numel() == 0:
        return EdgeTable.empty(), kept_sum
    layout = row_blocks(rows, B, T)
    slot_row = torch.nn.functional.pad(layout.slot_row, (0, 1), value=-1).flatten()  # block NB: all padding
    space = Workspace.get(dev)
    P = slots_through_W_V(rows, W_V, sigma, slot_row, space.take("P", (H, slot_row.numel(), dh)))
    P = P.view(H, B, GROUP, -1, dh)
    tf = targets.index[tb, tt, tk]
    E = heads_first(sae.W_enc.T.view(-1, H, dh), tf, space.take("E", (H, tf.shape[0], dh), sae.W_enc.dtype))
    layer = Layer(rows, layout, P.to(pruning.dtype), E.to(pruning.dtype), torch.nn.functional.pad(pattern, (0, 1)),
                  tb, tt, tk, tf)
    if BOUNDED and pruning.top_k is not None:
        layer.P_norm = torch.linalg.vector_norm(P, dim=-1).amax(2)  # [H, B, NB + 1], from the float32 rows
        layer.E_norm = torch.linalg.vector_norm(E, dim=-1)
        layer.block_pos = torch.nn.functional.pad(layout.block_pos, (0, 1), value=T)
    targets_at = targets.mask.sum(-1)
    budget = budget or sized(dev, BAND_ELEMENTS)
    layer.first_at = torch.cumsum(targets_at.flatten(), 0).tolist()
    kept = torch.zeros(tb.shape[0], device=dev)  # each target's kept sum
    found = []
    for group in prompt_groups(targets_at, layout.before, H):
        g = slice(group.start, group.stop)
        bounds = _group_bounds(layer, group, pruning, budget) if layer.P_norm is not None else None
        found += [_band(layer, group, t0, t1, kept, pruning, bounds)
                  for t0, t1 in band_bounds(targets_at[g], layout.before[g], H, budget)]
    kept_sum[tb, tt, tk] = kept
    # the bands' edges: built once a layer (per band, its dozen gathers and fills were ~15% of the step)
    r, target, head, value = (torch.cat(column) for column in zip(*found))
    return _flat_edges(rows, r, Code.ATTN, sae.layer, tf[target], tt[target], head, value, EdgeKind.ATTN_IN), kept_sum


def slots_through_W_V(rows: FlatRows, W_V: torch.Tensor, sigma: torch.Tensor, slot_row: torch.Tensor,
                      out: torch.Tensor) -> torch.Tensor:
    """Each slot's row through each head, over LN1's frozen scale: out[h, i] = (vec[r] / sigma[r]) @ center(W_V[h])
    for r = slot_row[i] [M] (zero where -1: padding), out [H, M, dh]; (vec / sigma) W == (vec W) / sigma.

    A feature row's product is its activation times its decoder row's (``SaeWeights.decoder_through``), so each head
    is gathered from that table straight into its slots; only error and bias rows are multiplied. Building the rows'
    products in row order and then copying them into slots took twice the passes over P (~3% of a GPT-2 graph).
    The same operations in the same order as ``FlatRows.through``, so the same bits."""
    H, d, dh = W_V.shape
    prepare = lambda: centered_W_V(W_V).permute(1, 0, 2).reshape(d, H * dh)  # noqa: E731
    table = rows.sae.decoder_through("W_V", (W_V,), prepare).view(-1, H, dh)  # [d_sae, H, dh]
    real = slot_row >= 0
    row = slot_row.clamp(min=0)
    feature = rows.index[row]  # -1: an error or bias row
    at = feature.clamp(min=0)  # error, bias and padding slots read feature 0 here: replaced or zeroed below
    for h in range(H):
        torch.index_select(table[:, h], 0, at, out=out[h])
    other = (real & (feature < 0)).nonzero().flatten()
    out.index_copy_(1, other, (rows.vec[row[other]] @ prepare()).view(-1, H, dh).transpose(0, 1))
    out.mul_(torch.where(feature >= 0, rows.act[row], 1.0).mul_(real)[None, :, None])  # activations; padding 0
    return out.div_(sigma[rows.prompt[row], rows.pos[row]][None, :, None])


def _band_targets(layer: Layer, group: range, t0: int, t1: int
                  ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int] | None]:
    """The targets at t0 <= t < t1 of prompts ``group``, padded per prompt: tgt [B, n] (indices into the
    layer's targets) and ok [B, n] (which are real); for one prompt also their span (start, end): they are the
    layer's targets start <= i < end (sorted by prompt and position), so a band reads them as views."""
    T, dev = layer.A.shape[2], layer.P.device
    if len(group) == 1:
        at = group.start * T
        start, end = (layer.first_at[at + t - 1] if at + t > 0 else 0 for t in (t0, t1))
        return (torch.arange(start, end, device=dev)[None], torch.ones(1, end - start, dtype=torch.bool, device=dev),
                (start, end))
    first = torch.arange(group.start, group.stop, device=dev) * T
    t_key = layer.tb * T + layer.tt
    start, end = torch.searchsorted(t_key, first + t0), torch.searchsorted(t_key, first + t1)
    n = int((end - start).max())
    tgt = start[:, None] + torch.arange(n, device=dev)  # [B, n]
    ok = tgt < end[:, None]
    return torch.where(ok, tgt, 0), ok, None


def _group_bounds(layer: Layer, group: range, pruning: Pruning, budget: int
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`_thresholds` of every position of prompts ``group`` at once, when its first pass fits in four
    times ``budget`` floats (on the CPU, prompt by prompt, it mostly does: 90 of 96 prompt-layers at GPT-2's
    B8x64): each band then takes only a union of blocks, instead of ~25 operators a band for its own first
    pass. None: each band computes its own."""
    tgt, ok, _ = _band_targets(layer, group, 0, layer.A.shape[2])
    if tgt.shape[1] == 0:
        return None
    B, dh = len(group), layer.P.shape[-1]
    T = layer.A.shape[2]
    at = (torch.arange(B, device=tgt.device)[:, None] * T + layer.tt[tgt])[ok]  # each target's (prompt, position)
    widest = int(torch.bincount(at, minlength=B * T).max())  # the most targets at one position
    if B * T * min(BOUND_FIRST, layer.P.shape[0] * layer.P.shape[3]) * widest * max(dh, GROUP) > 4 * budget:
        return None
    return _thresholds(layer, group, 0, T, tgt, ok, pruning)


def _band(layer: Layer, group: range, t0: int, t1: int, kept: torch.Tensor, pruning: Pruning,
          bounds: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """The kept edges into the targets at t0 <= t < t1 of prompts ``group``: (row, target, head, value) [n_e]
    (target: an index into the layer's targets); their kept sums go into ``kept`` [Nt]. ``bounds``: the group's
    :func:`_group_bounds`, if computed."""
    H, _, _, _, dh = layer.P.shape
    B, T = len(group), layer.A.shape[2]
    dev = layer.P.device
    g = slice(group.start, group.stop)
    tgt, ok, span = _band_targets(layer, group, t0, t1)
    n, mb = tgt.shape[1], max(1, int(layer.layout.before[g, t1].max()))
    if n == 0:
        none = torch.zeros(0, dtype=torch.long, device=dev)
        return none, none, none, torch.zeros(0, device=dev)
    space = Workspace.get(dev)
    if span is None:
        Eb, t_of = layer.E.index_select(1, tgt.flatten()).view(H, B, n, dh), layer.tt[tgt]
    else:  # one prompt's targets: a slice, no copy
        Eb, t_of = layer.E[:, None, span[0]:span[1]], layer.tt[None, span[0]:span[1]]
    # A[b, h, t of each target, s of each block] is A (contiguous [B, H, T, T+1]) at a_row + s: [B, n, H]
    prompt_head = torch.arange(group.start, group.stop, device=dev)[:, None, None] * H + torch.arange(H, device=dev)
    a_row = (prompt_head * T + t_of[:, :, None]) * (T + 1)
    if layer.P_norm is None:  # every block below mb; the block of slot u of head h is u
        blocks, U = None, mb
        Pb = space.take("rows", (H, B, GROUP, mb, dh), layer.P.dtype).copy_(layer.P[:, g, :, :mb])
        pos = layer.layout.block_pos[g, None, None, :mb]  # [B, 1, 1, mb]
    else:  # only the blocks some target's floor needs: blocks [B, H, U] (NB: the padding block)
        blocks = _needed_blocks(layer, group, t0, t1, mb, tgt, ok, pruning, bounds)
        U = blocks.shape[2]
        Pb = _gather_blocks(layer, group, blocks, space)
        pos = layer.block_pos[g].gather(1, blocks.view(B, H * U)).view(B, 1, H, U)
    A_blk = torch.take(layer.A, a_row[..., None] + pos).view(B * n, H * U)  # one flat gather, [B, n, H, U]
    width = GROUP * U
    dtype = layer.P.dtype  # the products' (Pruning.precision); scores and values below are float32
    M = torch.matmul(Eb, Pb.view(H, B, width, dh).transpose(2, 3),
                     out=space.take("M", (H, B, n, width), dtype))  # slot g*U + u
    # |M| of each block's largest entry [H, B, n, U]: |M| then a max over slots (1.4x faster than max and min)
    slots = torch.abs(M, out=space.take("abs", M.shape, dtype)).view(H, B, n, GROUP, U)
    largest = torch.amax(slots, dim=3, out=space.take("largest", (H, B, n, U), dtype))
    score = largest.permute(1, 2, 0, 3).reshape(B * n, H * U) * A_blk  # each block's largest |value|
    if pruning.top_k is not None and pruning.top_k < H * U:
        blk = score.topk(pruning.top_k, dim=1).indices  # [B*n, kb]: (head, slot) = divmod(blk, U)
    else:
        blk = torch.arange(H * U, device=dev).expand(B * n, -1)
    h, u = blk // U, blk % U
    row = torch.arange(B * n, device=dev)[:, None]
    base = ((h * B + row // n) * n + row % n) * width + u  # slot 0 of the block in M
    entries = base[:, :, None] + torch.arange(GROUP, device=dev) * U  # [B*n, kb, G]
    cand = M.view(-1)[entries] * A_blk.gather(1, blk)[:, :, None]
    (i,), c, vals, kept_band = select_edges(cand.flatten(1), ok.flatten(), pruning)
    c_blk, c_slot = c // GROUP, c % GROUP
    b_i, h_i, u_i = i // n, h[i, c_blk], u[i, c_blk]
    j = u_i if blocks is None else blocks[b_i, h_i, u_i]
    r = layer.layout.slot_row[b_i + group.start, c_slot, j]
    if span is None:
        kept[tgt[ok]] = kept_band[ok.flatten()]
        return r, tgt.flatten()[i], h_i, vals
    kept[span[0]:span[1]] = kept_band
    return r, i + span[0], h_i, vals


def _needed_blocks(layer: Layer, group: range, t0: int, t1: int, mb: int, tgt: torch.Tensor, ok: torch.Tensor,
                   pruning: Pruning, bounds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The blocks below ``mb`` that may hold a kept edge of some target of the band, per prompt and head:
    [B, H, U] in ascending order, padded with the all-padding block NB: the union over the band's positions of
    the blocks whose key reaches the position's threshold (:func:`_thresholds`, or the group's ``bounds``).
    ``tgt``, ``ok`` [B, n]: the band's targets and which are real."""
    key, threshold = (_thresholds(layer, group, t0, t1, tgt, ok, pruning) if bounds is None
                      else (bounds[0][:, :, t0:t1], bounds[1][:, :, t0:t1]))
    union = (key[..., :mb] >= threshold[..., None]).any(2)  # [B, H, mb]
    U = max(1, int(union.sum(-1).max()))
    ids = torch.where(union, torch.arange(mb, device=union.device), layer.P.shape[3] - 1)
    return ids.sort(dim=-1).values[..., :U].contiguous()


def _thresholds(layer: Layer, group: range, t0: int, t1: int, tgt: torch.Tensor, ok: torch.Tensor,
                pruning: Pruning) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block's key and each position's threshold, for positions t0 <= t < t1 of prompts ``group`` and
    the blocks below the last one's: key [B, H, Tb, mb], threshold [B, H, Tb]. A block holds no kept edge of
    the targets at t when its key is below t's threshold.

    |value| of an entry of block j into target n at t <= key[b, h, t, j] * |E[h, n]|, key = A[b, h, t, s_j] *
    max |P[h, b, ., j]|. Each position's BOUND_FIRST blocks of largest key are computed exactly for its
    targets (in float32): a target's top_k-th |value| there is a floor that its kept edges reach, and so
    is min_abs. The threshold is the min over the position's targets of floor / |E[h, n]| (with
    steps.BOUND_SLACK). All of it is per position, not per target: ~40x less than the targets' own bounds at
    GPT-2's L0. ``tgt``, ``ok`` [B, n]: the targets of those positions and which are real."""
    H, B_all, _, NB1, dh = layer.P.shape
    B, n = tgt.shape
    Tb = t1 - t0
    dev = tgt.device
    g = slice(group.start, group.stop)
    mb = max(1, int(layer.layout.before[g, t1].max()))
    pos = layer.layout.block_pos[g, None, None, :mb].expand(B, H, Tb, mb)
    key = layer.A[g, :, t0:t1].gather(3, pos).mul_(layer.P_norm[:, g, None, :mb].permute(1, 0, 2, 3))  # [B,H,Tb,mb]
    k1 = min(BOUND_FIRST, H * mb)
    top = key.permute(0, 2, 1, 3).reshape(B * Tb, H * mb).topk(k1, dim=1).indices  # [B*Tb, k1]
    h1, j1 = top // mb, top % mb
    # those blocks' entries into every target at their position: [B*Tb*k1, w, G], w the most targets at a position
    at = (torch.arange(B, device=dev)[:, None] * Tb + layer.tt[tgt] - t0).flatten()  # [B*n] position of each
    count = torch.bincount(at[ok.flatten()], minlength=B * Tb)
    w = max(1, int(count.max()))
    real = ok.flatten().nonzero().flatten()
    at = at[real]  # sorted: prompt-major, each prompt's targets by position
    rank = torch.arange(at.shape[0], device=dev) - torch.searchsorted(at, at)
    seat = torch.full((B * Tb, w), -1, dtype=torch.long, device=dev)  # the targets at each position
    seat[at, rank] = tgt.flatten()[real]
    E1 = gather_rows(layer.E, h1[:, :, None], seat.clamp(min=0)[:, None, :]).float()  # [B*Tb, k1, w, dh]
    prompt = (torch.arange(B, device=dev) + group.start).repeat_interleave(Tb)[:, None]  # [B*Tb, 1]
    rows = ((h1 * B_all + prompt) * GROUP)[..., None] + torch.arange(GROUP, device=dev)  # [B*Tb, k1, G]
    P1 = gather_rows(layer.P.view(-1, NB1, dh), rows, j1[..., None]).float()  # [B*Tb, k1, G, dh]
    A1 = layer.A[g, :, t0:t1].permute(0, 2, 1, 3).reshape(B * Tb, H, -1)[
        torch.arange(B * Tb, device=dev)[:, None], h1, layer.layout.block_pos[prompt, j1]]  # [B*Tb, k1]
    values = (E1 @ P1.transpose(2, 3)).abs_().mul_(A1[:, :, None, None])  # [B*Tb, k1, w, G]
    values = values.permute(0, 2, 1, 3).reshape(B * Tb, w, k1 * GROUP)
    slack = BOUND_SLACK[layer.P.dtype]
    k = pruning.top_k or 1
    floor = (values.topk(k, dim=2).values[..., -1] / slack if k <= k1 * GROUP
             else values.new_zeros(B * Tb, w)).clamp_(min=pruning.min_abs)  # [B*Tb, w]
    # the smallest floor / |E[h, n]| over each position's targets, per head: [B*Tb, H]
    E_norm = layer.E_norm[:, seat.clamp(min=0)].permute(1, 0, 2)  # [B*Tb, H, w]
    needy = (seat >= 0)[:, None, :] & (E_norm > 0)  # a zero encoder slice gives zero values: nothing to keep
    ratio = torch.where(needy, floor[:, None, :] / (E_norm * slack), torch.inf)
    return key, ratio.amin(2).view(B, Tb, H).permute(0, 2, 1)  # [B, H, Tb]


def _gather_blocks(layer: Layer, group: range, blocks: torch.Tensor, space: Workspace) -> torch.Tensor:
    """P's rows of ``blocks`` [B, H, U] as [H, B, G, U, dh], slot-major like P (a workspace buffer)."""
    H, B_all, _, NB1, dh = layer.P.shape
    B, _, U = blocks.shape
    dev = blocks.device
    prompt = torch.arange(group.start, group.stop, device=dev)
    head_prompt = (torch.arange(H, device=dev)[:, None] * B_all + prompt) * GROUP  # [H, B]
    slot = (head_prompt[:, :, None] + torch.arange(GROUP, device=dev)) * NB1  # [H, B, G]
    index = slot[..., None] + blocks.permute(1, 0, 2)[:, :, None, :]  # [H, B, G, U]
    out = space.take("rows", (H, B, GROUP, U, dh), layer.P.dtype)
    return torch.index_select(layer.P.view(-1, dh), 0, index.flatten(), out=out.view(-1, dh)).view(H, B, GROUP, U, dh)


class Workspace:
    """Scratch buffers reused across bands, layers and batches, one set per thread and device.

    On the CPU a fresh tensor above glibc's mmap threshold (32 MB at most) is new pages every time,
    and touching them cost more than the matmul filling them (a 35 MB bmm output: 13 ms fresh, 4 ms
    into a reused buffer); CUDA's caching allocator already reuses memory, so there it allocates.
    """

    _local = threading.local()

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    @classmethod
    def get(cls, device: torch.device) -> Workspace:
        spaces = cls._local.__dict__.setdefault("spaces", {})
        return spaces.setdefault(str(device), cls(device))

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An uninitialised tensor of ``shape``, valid until the next take of ``name``."""
        numel = math.prod(shape)
        if self.device.type == "cuda":
            return torch.empty(shape, device=self.device, dtype=dtype)
        buf = self.buffers.get((name, dtype))
        if buf is None or buf.numel() < numel:
            buf = self.buffers[(name, dtype)] = torch.empty(numel, device=self.device, dtype=dtype)
        return buf[:numel].view(shape)
