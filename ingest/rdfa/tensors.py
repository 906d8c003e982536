"""Typed tensor bundles the RDFA steps pass between them.

Shapes use B prompts, T positions (right-padded; ``lengths`` marks the real ones), H heads,
d = d_model, dh = d_head, K active features per position (padded; ``mask`` marks real slots).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import torch

from catalog.ids import NodeKind, NodeRef


class Code(IntEnum):
    """Integer node kinds inside tensors (ids.NodeRef is the public form)."""

    ATTN = 0
    RESID = 1
    ERR_A = 2
    ERR_R = 3
    BIAS_A = 4
    BIAS_R = 5
    EMB = 6
    POS = 7
    MLP = 8
    ATTN_OUT = 9
    REST = 10
    HEAD = 11  # an attention head (index: the head): target of q_in / k_in edges
    TC = 12  # transcoder feature (reads LN2's output at its layer, writes the MLP's output)
    ERR_T = 13  # transcoder error: MLP output - reconstruction
    BIAS_T = 14  # transcoder bias: its decoder bias as a source; its features' encoder constant as an input


_TO_REF = {
    Code.ATTN: (NodeKind.ATTN, None), Code.RESID: (NodeKind.RESID, None),
    Code.ERR_A: (NodeKind.ERROR, NodeKind.ATTN), Code.ERR_R: (NodeKind.ERROR, NodeKind.RESID),
    Code.BIAS_A: (NodeKind.BIAS, NodeKind.ATTN), Code.BIAS_R: (NodeKind.BIAS, NodeKind.RESID),
    Code.EMB: (NodeKind.EMB, None), Code.POS: (NodeKind.POS, None), Code.MLP: (NodeKind.MLP, None),
    Code.ATTN_OUT: (NodeKind.ATTN_OUT, None), Code.REST: (NodeKind.REST, None), Code.HEAD: (NodeKind.HEAD, None),
    Code.TC: (NodeKind.TRANSCODER, None), Code.ERR_T: (NodeKind.ERROR, NodeKind.TRANSCODER),
    Code.BIAS_T: (NodeKind.BIAS, NodeKind.TRANSCODER),
}
_LAYERLESS = {Code.EMB, Code.POS, Code.REST}


def code_to_ref(code: int, layer: int, index: int, pos: int | None) -> NodeRef:
    """Tensor row -> NodeRef (index -1 and layer -1 mean 'none')."""
    kind, sae_kind = _TO_REF[Code(code)]
    return NodeRef(kind, None if Code(code) in _LAYERLESS else layer,
                   index if index >= 0 else None, None if Code(code) is Code.REST else pos, sae_kind)


class EdgeKind(IntEnum):
    ATTN_IN = 0  # into an attention feature, from the residual-SAE decomposition of its sources (step 2)
    RESID_IN = 1  # into a residual feature, from upstream components (steps 3-4)
    DIRECT = 2  # into an attention feature, from upstream components with no residual SAE between (step 5)
    # QK attribution (ingest/rdfa/qk.py) of the scores behind the attention edges: positions are the
    # score's (src_pos = key position s, dst_pos = query position t) on all three
    Q_IN = 3  # query-side node at t -> head: its share of the score
    K_IN = 4  # key-side node at s -> head
    QK = 5  # query-side node at t -> key-side node at s: one pairwise term of the score (head in ``head``)
    MLP_IN = 6  # into a transcoder feature at s, from upstream components of the MLP's input at s


EDGE_KIND_NAMES = {EdgeKind.ATTN_IN: "attn_in", EdgeKind.RESID_IN: "resid_in", EdgeKind.DIRECT: "direct",
                   EdgeKind.Q_IN: "q_in", EdgeKind.K_IN: "k_in", EdgeKind.QK: "qk", EdgeKind.MLP_IN: "mlp_in"}


@dataclass
class Capture:
    """One batch's activations, as the forward pass with cache gave them."""

    lengths: torch.Tensor  # [B] real tokens per prompt
    embed: torch.Tensor  # [B, T, d]  hook_embed
    pos_embed: torch.Tensor  # [B, T, d]  hook_pos_embed
    resid_pre: list[torch.Tensor]  # per layer [B, T, d]
    ln1_scale: list[torch.Tensor]  # per layer [B, T]   (LN1's sigma, frozen)
    pattern: list[torch.Tensor]  # per layer [B, H, T(dest), T(src)]
    z: list[torch.Tensor]  # per layer [B, T, H, dh]
    attn_out: list[torch.Tensor]  # per layer [B, T, d]
    mlp_out: list[torch.Tensor]  # per layer [B, T, d]
    # layers with a transcoder only: LN2's output (the MLP's input, hook_normalized) and LN2's sigma, frozen
    mlp_in: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, T, d]
    ln2_scale: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, T]

    @property
    def valid(self) -> torch.Tensor:
        """[B, T] True at real (non-padding) positions."""
        T = self.embed.shape[1]
        return torch.arange(T, device=self.lengths.device)[None, :] < self.lengths[:, None]


@dataclass
class Weights:
    """The model weights RDFA reads, per layer (processed: LN1 folded, so LN1 = center / sigma)."""

    W_V: list[torch.Tensor]  # [H, d, dh]
    b_V: list[torch.Tensor]  # [H, dh]
    W_O: list[torch.Tensor]  # [H, dh, d]
    b_O: list[torch.Tensor]  # [d]
    # the query/key side (QK attribution); empty lists where not loaded
    W_Q: list[torch.Tensor] = field(default_factory=list)  # [H, d, dh]
    W_K: list[torch.Tensor] = field(default_factory=list)  # [H, d, dh]
    b_Q: list[torch.Tensor] = field(default_factory=list)  # [H, dh]
    b_K: list[torch.Tensor] = field(default_factory=list)  # [H, dh]
    attn_scale: float = 1.0  # the score's divisor (sqrt(d_head) in GPT-2)

    @property
    def n_layers(self) -> int:
        return len(self.W_V)


@dataclass
class ActiveSet:
    """Active features of one SAE at every position, padded to K slots."""

    index: torch.Tensor  # [B, T, K] feature index (0 where masked)
    act: torch.Tensor  # [B, T, K] activation
    pre: torch.Tensor  # [B, T, K] pre-activation
    mask: torch.Tensor  # [B, T, K] real slot

    @property
    def K(self) -> int:
        return self.index.shape[-1]


@dataclass
class SourceRows:
    """Vectors in the residual stream at every position, one per upstream node.

    vec [B, T, R, d]; code/layer [R] (the same layout at every position); index [B, T, R]
    (feature index, -1 for components); valid [B, T, R].
    """

    vec: torch.Tensor
    code: torch.Tensor
    layer: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor

    def prefix(self, n: int) -> SourceRows:
        return SourceRows(self.vec[:, :, :n], self.code[:n], self.layer[:n], self.index[:, :, :n],
                          self.valid[:, :, :n])


@dataclass
class EdgeTable:
    """Edges as parallel 1-D tensors. ``head`` is -1 where it does not apply; ``prompt`` indexes the batch."""

    prompt: torch.Tensor
    src_code: torch.Tensor
    src_layer: torch.Tensor
    src_index: torch.Tensor
    src_pos: torch.Tensor
    dst_code: torch.Tensor
    dst_layer: torch.Tensor
    dst_index: torch.Tensor
    dst_pos: torch.Tensor
    head: torch.Tensor
    value: torch.Tensor
    kind: torch.Tensor

    COLUMNS = ("prompt", "src_code", "src_layer", "src_index", "src_pos", "dst_code", "dst_layer",
               "dst_index", "dst_pos", "head", "value", "kind")

    @classmethod
    def cat(cls, tables: list[EdgeTable]) -> EdgeTable:
        tables = [t for t in tables if t is not None]
        if not tables:
            return cls.empty()
        return cls(*[torch.cat([getattr(t, c) for t in tables]) for c in cls.COLUMNS])

    @classmethod
    def empty(cls) -> EdgeTable:
        z = torch.zeros(0, dtype=torch.long)
        return cls(z, z, z, z, z, z, z, z, z, z, torch.zeros(0), z)

    def __len__(self) -> int:
        return self.value.shape[0]

    def to(self, device) -> EdgeTable:
        return EdgeTable(*[getattr(self, c).to(device) for c in self.COLUMNS])

    def select(self, keep: torch.Tensor) -> EdgeTable:
        """The rows ``keep`` names: a bool mask [n] or row indices."""
        rows = _rows(keep)
        return EdgeTable(*[getattr(self, c).index_select(0, rows) for c in self.COLUMNS])


@dataclass
class NodeTable:
    """Decomposed nodes: every target of the graph, with its activation and pre-activation.

    ``explained`` = (pre - REST) / pre: the share of the pre-activation the kept edges account for.
    """

    prompt: torch.Tensor
    code: torch.Tensor
    layer: torch.Tensor
    index: torch.Tensor
    pos: torch.Tensor
    act: torch.Tensor
    pre: torch.Tensor
    explained: torch.Tensor

    COLUMNS = ("prompt", "code", "layer", "index", "pos", "act", "pre", "explained")

    @classmethod
    def cat(cls, tables: list[NodeTable]) -> NodeTable:
        tables = [t for t in tables if t is not None]
        return cls(*[torch.cat([getattr(t, c) for t in tables]) for c in cls.COLUMNS])

    def __len__(self) -> int:
        return self.pre.shape[0]

    def to(self, device) -> NodeTable:
        return NodeTable(*[getattr(self, c).to(device) for c in self.COLUMNS])

    def select(self, keep: torch.Tensor) -> NodeTable:
        """The rows ``keep`` names: a bool mask [n] or row indices."""
        rows = _rows(keep)
        return NodeTable(*[getattr(self, c).index_select(0, rows) for c in self.COLUMNS])


def _rows(keep: torch.Tensor) -> torch.Tensor:
    """Row indices of a mask, computed once: indexing each column by the mask (a nonzero per column)
    took 1.5 ms a column for 357k rows here, index_select 0.1 ms."""
    return keep.nonzero().squeeze(1) if keep.dtype == torch.bool else keep


@dataclass
class Pruning:
    """Which incoming edges of each decomposed node are kept.

    top_k: keep the k largest |value| edges per target (None: all); min_abs: drop edges with
    |value| below it; direct_positions: direct attention edges are computed through the top-N
    (source position, head) pairs of each target by step-1 DFA (None: all pairs, exact).
    What is dropped goes to the target's REST edge, so sums still hold.
    precision: the dtype of the large products that give edge values (float32: exact to float32
    rounding; bfloat16 or float16: faster on GPUs with tensor cores, and each edge value carries that
    dtype's rounding, which the target's REST edge absorbs; docs/rdfa.md states the error).
    """

    top_k: int | None = None
    min_abs: float = 0.0
    direct_positions: int | None = None
    direct: bool = True
    qk: bool = True  # QK attribution of the scores behind the kept attention edges (same top_k, min_abs)
    precision: str = "float32"

    PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

    def __post_init__(self) -> None:
        if self.precision not in self.PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: expected one of {', '.join(self.PRECISIONS)}")

    @property
    def dtype(self) -> torch.dtype:
        """What the edge products are computed in."""
        return self.PRECISIONS[self.precision]

    def manifest(self) -> dict:
        # float32 adds no key: the manifests of runs made before the option stay equal to today's
        return {"top_k": self.top_k, "min_abs": self.min_abs, "direct": self.direct,
                "direct_positions": self.direct_positions, "qk": self.qk,
                **({"precision": self.precision} if self.precision != "float32" else {})}


@dataclass
class Graph:
    """A batch's attribution graph: decomposed nodes, ``edges`` (attn_in + resid_in + mlp_in, partitioning
    every node's pre-activation) and ``direct`` (the alternative attention->attention view)."""

    nodes: NodeTable
    edges: EdgeTable
    direct: EdgeTable
    pruning: Pruning = field(default_factory=Pruning)
    qk: EdgeTable = field(default_factory=lambda: EdgeTable.empty())  # q_in, k_in and qk edges
