"""The full attribution graph of a batch of prompts (docs/rdfa.md steps 1-5).

For every layer L with an attention SAE (which needs the residual SAE of L to decompose its
sources): edges into every active attention feature from residual features, errors and biases
at every source position, per head (``attn_in``), plus the SAE's bias node, plus the direct
attention->attention view (``direct``), plus the QK attribution of the scores behind those
edges (``qk``: q_in, k_in, qk; ingest/rdfa/qk_step.py). For every layer with a residual SAE: edges into every
active residual feature from EMB, POS, upstream attention features / errors / biases and MLP
outputs, or the features, errors and biases of their transcoders (``resid_in``). For every layer with a
transcoder: edges into every active transcoder feature from the same components up to the layer's own
attention output, through LN2's frozen scale (``mlp_in``). Each target also gets a REST edge carrying what
pruning removed, so the incoming values of every decomposed node sum to its pre-activation.
"""

from __future__ import annotations

import torch

from catalog.ids import NodeKind
from ingest.rdfa import steps
from ingest.rdfa.blocks import PositionBlock, direct_by_block, position_blocks, resid_in_by_block
from ingest.rdfa.qk_step import qk_edges, score_keys
from ingest.rdfa.step2 import attn_in
from ingest.rdfa.tensors import ActiveSet, Capture, Code, EdgeKind, EdgeTable, Graph, NodeTable, Pruning, Weights
from ingest.rdfa.types import SaeWeights


def full_graph(cap: Capture, weights: Weights, attn_saes: dict[int, SaeWeights],
               resid_saes: dict[int, SaeWeights], pruning: Pruning | None = None,
               transcoders: dict[int, SaeWeights] | None = None) -> Graph:
    """Attribution graph of every decomposable node of the batch. See the module docstring. ``cap`` holds
    the MLP inputs and LN2 scales of the layers with a transcoder (lens.capture's ``mlp_layers``)."""
    pruning = pruning or Pruning()
    transcoders = transcoders or {}
    check_decomposable(attn_saes, resid_saes)
    if missing := sorted(set(transcoders) - set(cap.mlp_in)):
        raise ValueError(f"transcoders at layers {missing} read the MLP inputs there: capture them "
                         "(ingest.lens.capture's mlp_layers)")
    valid = cap.valid
    attn_act = {l: steps.active_set(s, cap.z[l].flatten(-2), valid) for l, s in attn_saes.items()}
    resid_act = {l: steps.active_set(s, cap.resid_pre[l], valid) for l, s in resid_saes.items()}
    tc_act = {l: steps.active_set(s, cap.mlp_in[l], valid) for l, s in transcoders.items()}
    blocks = position_blocks(cap, weights, {l: (attn_saes[l], attn_act[l]) for l in attn_saes},
                             {l: (transcoders[l], tc_act[l]) for l in transcoders})
    nodes, edges, direct, qk = [], [], [], []
    for L, sae in sorted(resid_saes.items()):
        table, kept = resid_in_by_block(blocks, sae, resid_act[L], pruning)
        const = sae.encoder_constant()[resid_act[L].index]
        n, e = _close_targets(resid_act[L], Code.RESID, L, const, kept, Code.BIAS_R, EdgeKind.RESID_IN)
        nodes.append(n)
        edges += [table, e]
    for L, tc in sorted(transcoders.items()):
        table, kept = resid_in_by_block(blocks, tc, tc_act[L], pruning, cap.ln2_scale[L])
        const = tc.encoder_constant()[tc_act[L].index]
        n, e = _close_targets(tc_act[L], Code.TC, L, const, kept, Code.BIAS_T, EdgeKind.MLP_IN)
        nodes.append(n)
        edges += [table, e]
    for L, sae in sorted(attn_saes.items()):
        sigma, pattern = cap.ln1_scale[L], cap.pattern[L]
        rows = steps.resid_sae_rows(resid_saes[L], cap.resid_pre[L], resid_act[L], valid)
        table, kept = attn_in(rows, sigma, pattern, weights.W_V[L], sae, attn_act[L], pruning)
        constant = steps.attn_constant(sae, weights.b_V[L])  # [d_sae]
        n, e = _close_targets(attn_act[L], Code.ATTN, L, constant[attn_act[L].index], kept, Code.BIAS_A,
                              EdgeKind.ATTN_IN)
        nodes.append(n)
        edges += [table, e]
        if pruning.direct:
            direct.append(_direct_layer(cap, weights, blocks, sae, attn_act[L], L, constant, pruning))
        if pruning.qk and weights.W_Q:
            keys = score_keys([table, *direct[-1:]] if pruning.direct else [table], weights.W_Q[L].shape[0],
                              valid.shape[1])
            qk.append(qk_edges(rows, sigma, keys.to(sigma.device), weights.W_Q[L], weights.W_K[L], weights.b_Q[L],
                               weights.b_K[L], weights.attn_scale, L, pruning))
    return Graph(NodeTable.cat(nodes), EdgeTable.cat(edges), EdgeTable.cat(direct), pruning, EdgeTable.cat(qk))


def check_decomposable(attn_saes: dict, resid_saes: dict) -> None:
    missing = sorted(set(attn_saes) - set(resid_saes))
    if missing:
        raise ValueError(f"attention SAEs at layers {missing} need residual (resid_pre) SAEs at the same "
                         "layers to decompose their sources; add them with --saes")


def _close_targets(act: ActiveSet, code: Code, layer: int, const: torch.Tensor, kept: torch.Tensor,
                   bias_code: Code, kind: EdgeKind) -> tuple[NodeTable, EdgeTable]:
    """Node rows for the active targets, and their bias and REST edges (REST = pre - bias - kept)."""
    b, t, k = act.mask.nonzero(as_tuple=True)
    pre = act.pre[b, t, k]
    c = const[b, t, k]
    rest = pre - c - kept[b, t, k]
    idx = act.index[b, t, k]
    full = lambda v: torch.full_like(b, int(v))  # noqa: E731
    explained = torch.where(pre != 0, (pre - rest) / pre, torch.ones_like(pre))
    nodes = NodeTable(b, full(code), full(layer), idx, t, act.act[b, t, k], pre, explained)
    none = full(-1)
    bias = EdgeTable(b, full(bias_code), full(layer), none, t, full(code), full(layer), idx, t, none, c, full(kind))
    rest_e = EdgeTable(b, full(Code.REST), none, none, none, full(code), full(layer), idx, t, none, rest, full(kind))
    return nodes, EdgeTable.cat([bias, rest_e])


def direct_into(cap: Capture, weights: Weights, blocks: list[PositionBlock], sae: SaeWeights, b: torch.Tensor,
                t: torch.Tensor, f: torch.Tensor, pruning: Pruning) -> tuple[EdgeTable, torch.Tensor]:
    """Step 5 into the attention features (b, t, f) [N] of layer sae.layer: kept edges, kept sum [N]."""
    L = sae.layer
    pairs = steps.direct_pairs(cap.resid_pre[L], cap.ln1_scale[L], cap.pattern[L], weights.W_V[L], weights.b_V[L],
                               sae, b, t, f, pruning)
    return direct_by_block(blocks, pairs, sae, b, t, f, *cap.valid.shape, pruning)


def _direct_layer(cap: Capture, weights: Weights, blocks: list[PositionBlock], sae: SaeWeights, act: ActiveSet,
                  L: int, constant: torch.Tensor, pruning: Pruning) -> EdgeTable:
    """Direct edges into every active attention feature of layer L, with bias and REST edges."""
    b, t, k = act.mask.nonzero(as_tuple=True)
    f = act.index[b, t, k]
    table, kept = direct_into(cap, weights, blocks, sae, b, t, f, pruning)
    return EdgeTable.cat([table, direct_closure(b, t, f, act.pre[b, t, k], kept, constant[f], L)])


def direct_closure(b, t, f, pre, kept, const, L) -> EdgeTable:
    """Bias and REST edges of the direct view for targets (b, t, f)."""
    full = lambda v: torch.full_like(b, int(v))  # noqa: E731
    none = full(-1)
    kind = full(EdgeKind.DIRECT)
    bias = EdgeTable(b, full(Code.BIAS_A), full(L), none, t, full(Code.ATTN), full(L), f, t, none, const, kind)
    rest = EdgeTable(b, full(Code.REST), none, none, none, full(Code.ATTN), full(L), f, t, none,
                     pre - const - kept, kind)
    return EdgeTable.cat([bias, rest])


SAE_KINDS = {NodeKind.ATTN: Code.ATTN, NodeKind.RESID: Code.RESID, NodeKind.TRANSCODER: Code.TC}
