"""RDFA graph tensors -> catalog records (one Batch per write transaction).

Positions stay in the evidence; aggregation keys drop them. REST edges (what pruning removed)
belong to per-prompt views only and are not stored as catalog edges.
"""

from __future__ import annotations

import numpy as np
import torch

from catalog.aggregate import Observations, aggregate_edges, node_stats
from catalog.ids import NodeKind
from catalog.schema import Batch, NodeInfo, Prompt
from ingest.rdfa.tensors import EDGE_KIND_NAMES, Code, EdgeKind, EdgeTable, Graph, code_to_ref

KIND_NAMES = [EDGE_KIND_NAMES[k] for k in EdgeKind]
_ATTN_SIDE = {Code.ATTN, Code.ERR_A, Code.BIAS_A}
_RESID_SIDE = {Code.RESID, Code.ERR_R, Code.BIAS_R}


class NodeCatalog:
    """Maps tensor node rows (code, layer, index) to catalog NodeInfo, with the run's release labels."""

    def __init__(self, model: str, attn_release: str, resid_release: str):
        self.model, self.attn_release, self.resid_release = model, attn_release, resid_release

    def release(self, code: int) -> str:
        return self.attn_release if code in _ATTN_SIDE else self.resid_release if code in _RESID_SIDE else ""

    def info(self, code: int, layer: int, index: int) -> NodeInfo:
        return NodeInfo.of(self.model, self.release(code), code_to_ref(code, layer, index, None))


def _catalog_edges(t: EdgeTable) -> torch.Tensor:
    """Edges worth aggregating: not REST (pruning's remainder, per prompt only) and not an SAE's
    encoder constant (BIAS of the target's own SAE: the same value on every prompt, a weight)."""
    own_bias = (((t.src_code == Code.BIAS_A) & (t.dst_code == Code.ATTN)) |
                ((t.src_code == Code.BIAS_R) & (t.dst_code == Code.RESID))) & (t.src_layer == t.dst_layer)
    return (t.src_code != Code.REST) & ~own_bias


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _node_key(code: torch.Tensor, layer: torch.Tensor, index: torch.Tensor) -> np.ndarray:
    """(code, layer, index) packed into one int64 (layer and index may be -1)."""
    return (_np(code).astype(np.int64) << 48) | ((_np(layer).astype(np.int64) + 1) << 32) | (_np(index).astype(np.int64) + 1)


def _node_of_key(key: int) -> tuple[int, int, int]:
    return key >> 48, ((key >> 32) & 0xFFFF) - 1, (key & 0xFFFFFFFF) - 1


def graph_to_batch(graph: Graph, prompts: list[Prompt], nodes: NodeCatalog, run: str,
                   evidence_per_edge: int | None) -> Batch:
    """Aggregate one batch's graph (edges + direct view) into a Batch for Store.write_batch."""
    table = EdgeTable.cat([graph.edges, graph.direct]).to("cpu")
    table = table.select(_catalog_edges(table))
    gn = graph.nodes.to("cpu")
    src = _node_key(table.src_code, table.src_layer, table.src_index)
    dst = _node_key(table.dst_code, table.dst_layer, table.dst_index)
    uniq, inv = np.unique(np.concatenate([src, dst, _node_key(gn.code, gn.layer, gn.index)]), return_inverse=True)
    infos = [nodes.info(*_node_of_key(int(key))) for key in uniq]
    uids = [n.uid for n in infos]
    n = len(src)
    obs = Observations(_np(table.prompt), inv[:n], inv[n:2 * n], _np(table.kind), _np(table.head),
                       _np(table.src_pos), _np(table.dst_pos), _np(table.value).astype(np.float64))
    prompt_uids = [p.uid for p in prompts]
    deltas, evidence = aggregate_edges(obs, uids, prompt_uids, KIND_NAMES, evidence_per_edge)
    stats = node_stats(inv[2 * n:], _np(gn.prompt), _np(gn.act), uids, len(prompts))
    return Batch(run, prompts, infos, deltas, evidence, stats)


def is_feature_code(code: int) -> bool:
    return code in (Code.ATTN, Code.RESID)


SAE_KIND_OF = {Code.ATTN: NodeKind.ATTN, Code.RESID: NodeKind.RESID}
