"""Step 2 (``attn_in``) over every prompt of a batch at once, in bands of target positions: the form
for a GPU, where the per-prompt loop of ``steps.attn_in`` launches tens of thousands of small kernels
per batch (B x target chunks x ~25) and this one a few hundred per layer, whatever the batch.

Within a band [t0, t1) each prompt's targets (features at t0 <= t < t1) and source rows (s < t1) are
padded to the band's largest prompt, so one matmul gives value[h, b, target, row] for all prompts.
On CPU it is 2-4x slower than the loop (measured at B1x64 and B8x64 on the GPT-2 fixture: the
padded gathers copy what the loop reads as views), so ``graph.full_graph`` uses it on CUDA only.
Same edges and kept sums as ``steps.attn_in`` (tests/test_rdfa_exact.py runs both).
"""

from __future__ import annotations

import torch

from ingest.rdfa.steps import FlatRows, _flat_edges, _per_head_candidates, centered_W_V, select_edges, sized
from ingest.rdfa.tensors import ActiveSet, Code, EdgeKind, EdgeTable, Pruning
from ingest.rdfa.types import SaeWeights


def band_elements(device: torch.device) -> int:
    """Floats of one band's value tensor (the band also holds its pattern gather and top-k copies)."""
    return sized(device, 1 << 24)


def _ranges(starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Per prompt b the indices [starts[b], ends[b]) as one row of a [B, w] tensor, -1 padded."""
    w = max(1, int((ends - starts).max()))
    idx = starts[:, None] + torch.arange(w, device=starts.device)[None]
    return torch.where(idx < ends[:, None], idx, -1)


def attn_in_batched(rows: FlatRows, sigma: torch.Tensor, pattern: torch.Tensor, W_V: torch.Tensor,
                    sae: SaeWeights, targets: ActiveSet, pruning: Pruning,
                    elements: int | None = None) -> tuple[EdgeTable, torch.Tensor]:
    """``steps.attn_in``'s edges and kept sums [B, T, K]; shapes as there. ``elements``: the band budget."""
    B, T, K = targets.index.shape
    H, d, dh = W_V.shape
    dev = W_V.device
    elements = elements or band_elements(dev)
    P = (rows.vec / sigma[rows.prompt, rows.pos, None]) @ centered_W_V(W_V).permute(1, 0, 2).reshape(d, H * dh)
    P = P.view(-1, H, dh).permute(1, 0, 2).contiguous()  # [H, N, dh]
    tb, tt, tk = targets.mask.nonzero(as_tuple=True)  # sorted by (prompt, position)
    tf = targets.index[tb, tt, tk]
    E = sae.W_enc.view(H, dh, -1)[:, :, tf].transpose(1, 2).contiguous()  # [H, Nt, dh]
    t_key, r_key = tb * T + tt, rows.prompt * T + rows.pos
    first = torch.arange(B, device=dev) * T
    busiest = int(torch.bincount(tb, minlength=B).max()) * int(torch.bincount(rows.prompt, minlength=B).max())
    n_bands = max(1, min(T, -(-H * B * busiest // (2 * elements))))  # causal: a band reads about half the rows
    bounds = torch.linspace(0, T, n_bands + 1).round().long().tolist()
    kept_sum = torch.zeros(B, T, K, device=dev)
    tables = []
    for t0, t1 in zip(bounds[:-1], bounds[1:]):
        if t1 <= t0:
            continue
        tgt = _ranges(torch.searchsorted(t_key, first + t0), torch.searchsorted(t_key, first + t1))  # [B, n]
        row = _ranges(torch.searchsorted(r_key, first), torch.searchsorted(r_key, first + t1))  # [B, m]: s < t1
        n, m = tgt.shape[1], row.shape[1]
        tgt_ok, row_ok = tgt >= 0, row >= 0
        tg, rw = tgt.clamp(min=0), row.clamp(min=0)
        Y = (E[:, tg] * tgt_ok[None, :, :, None]) @ P[:, rw].transpose(2, 3)  # [H, B, n, m]
        # A[b, h, t of the target, s of the row]; s > t and padded rows give exact zeros, dropped
        A = pattern.gather(2, tt[tg][:, None, :, None].expand(B, H, n, T))  # [B, H, n, T]
        A = A.gather(3, (rows.pos[rw] * row_ok)[:, None, None, :].expand(B, H, n, m)) * row_ok[:, None, None, :]
        Y.mul_(A.transpose(0, 1))
        cand_val, cand_flat = _per_head_candidates(Y.view(H, B * n, m), pruning.top_k)
        (g,), c, vals, kept = select_edges(cand_val, tgt_ok.flatten(), pruning)
        flat = cand_flat[g, c]
        target, r = tgt.flatten()[g], row[g // n, flat % m]
        real = tg.flatten()[tgt_ok.flatten()]
        kept_sum[tb[real], tt[real], tk[real]] = kept[tgt_ok.flatten()]
        tables.append(_flat_edges(rows, r, Code.ATTN, sae.layer, tf[target], tt[target], flat // m, vals,
                                  EdgeKind.ATTN_IN))
    return EdgeTable.cat(tables), kept_sum
