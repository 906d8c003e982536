"""RDFA graph tensors -> device observations -> the catalog's columnar WindowAggregate.

Positions stay in the evidence; aggregation keys drop them. REST edges (what pruning removed)
belong to per-prompt views only and are not stored as catalog edges, and neither are an SAE's
encoder constants (the same value on every prompt: a weight).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from catalog.aggregate import (
    EdgeColumns,
    EvidenceColumns,
    HeadColumns,
    HistColumns,
    RoleColumns,
    StatColumns,
    TopColumns,
    WindowAggregate,
)
from catalog.schema import NodeInfo, Prompt
from ingest.rdfa.tensors import Code, EdgeKind, EdgeTable, Graph, code_to_ref
from ingest.reduce import N_KINDS, Activations, Observations, Partial, reduce_batch
from ingest.roles import PromptPositions, role_rows

_FEATURE_CODES = (Code.ATTN, Code.RESID, Code.TC)
_SIDES = {Code.ATTN: "attn", Code.ERR_A: "attn", Code.BIAS_A: "attn", Code.RESID: "resid", Code.ERR_R: "resid",
          Code.BIAS_R: "resid", Code.TC: "transcoders", Code.ERR_T: "transcoders", Code.BIAS_T: "transcoders"}
_LAYERLESS = (Code.EMB, Code.POS)


@dataclass
class SaeKeys:
    """The catalog key of each layer's SAE (``LoadedSae.key``) and its width."""

    attn: dict[int, tuple[str, int]]  # layer -> (key, d_sae)
    resid: dict[int, tuple[str, int]]
    transcoders: dict[int, tuple[str, int]] = field(default_factory=dict)

    def side(self, code: int) -> dict[int, tuple[str, int]]:
        """The SAEs a node code belongs to (features, errors and biases); empty for components."""
        name = _SIDES.get(Code(code))
        return getattr(self, name) if name else {}


class NodeSlots:
    """Dense integer slots for every node a run can produce, (code, layer, index) <-> slot.

    Each (code, layer) owns a block of slots: d_sae wide for features, one slot for a component.
    Slots are local to a job (the store's node dictionary gives catalog ids); decoding builds a
    NodeInfo once per slot, only for slots that occur.
    """

    def __init__(self, model: str, n_layers: int, saes: SaeKeys, n_heads: int = 0):
        self.model, self.saes, self.n_heads = model, saes, n_heads
        self._start = torch.full((len(Code), n_layers + 1), -1, dtype=torch.long)
        blocks, size = [], 0
        for code in Code:
            if code is Code.REST:
                continue
            for layer in ([-1] if code in _LAYERLESS else range(n_layers)):
                width = self._width(code, layer)
                if width:
                    self._start[code, layer + 1] = size
                    blocks.append((size, int(code), layer))
                    size += width
        self.size = size
        self._block_start = np.array([b[0] for b in blocks], dtype=np.int64)
        self._blocks = blocks
        self._info_at = np.full(size, None, dtype=object)  # slot -> NodeInfo, built on first use
        self._block_first: dict[int, NodeInfo] = {}  # an indexed block's node of index 0
        self._device_start: dict[torch.device, torch.Tensor] = {}

    def _width(self, code: Code, layer: int) -> int:
        if code in _FEATURE_CODES:
            table = self.saes.side(code)
            return table[layer][1] if layer in table else 0
        if code in _SIDES:  # an SAE's error or bias
            return int(layer in self.saes.side(code))
        if code is Code.ATTN_OUT:
            return int(layer not in self.saes.attn)
        if code is Code.MLP:  # a leaf where no transcoder decomposes the MLP
            return int(layer not in self.saes.transcoders)
        if code is Code.HEAD:  # heads whose scores QK attribution explains: layers with an attention SAE
            return self.n_heads if layer in self.saes.attn else 0
        return 1

    def slot(self, code: torch.Tensor, layer: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Slots of nodes given as parallel tensors (layer and index -1 where absent)."""
        start = self._device_start.get(code.device)
        if start is None:
            start = self._device_start.setdefault(code.device, self._start.to(code.device))
        base = start.view(-1).index_select(0, code * start.shape[1] + layer + 1)  # flat: 2-D fancy indexing is slower
        if len(base) and bool((base < 0).any()):
            raise ValueError("RDFA produced a node the run's SAEs do not define")
        return base + index.clamp(min=0)

    def info(self, slot: int) -> NodeInfo:
        node = self._info_at[slot]
        if node is None:
            b = int(np.searchsorted(self._block_start, slot, side="right")) - 1
            start, code, layer = self._blocks[b]
            if code in _FEATURE_CODES or code == Code.HEAD:
                node = self._indexed(b, slot - start)
            else:
                node = self._canonical(code, layer, -1)
            self._info_at[slot] = node
        return node

    def infos(self, slots: np.ndarray) -> list[NodeInfo]:
        """NodeInfo of each slot [k] (int64): one object-array gather, building only slots not seen
        before (a GPT-2 window names ~10^5 nodes; a dict lookup each took 0.3 s a window)."""
        got = self._info_at[slots]
        for at in np.flatnonzero(np.equal(got, None)).tolist():
            got[at] = self.info(int(slots[at]))
        return got.tolist()

    def _canonical(self, code: int, layer: int, index: int) -> NodeInfo:
        table = self.saes.side(code)
        sae = table[layer][0] if layer in table else ""
        return NodeInfo.of(self.model, sae, code_to_ref(code, layer, index, None))

    def _indexed(self, block: int, index: int) -> NodeInfo:
        """A feature's or head's NodeInfo from its block's canonical one (a GPT-2 catalog has ~6x10^5
        feature slots; building each through NodeRef and format_ref cost 25 us). Ids of indexed nodes
        end in ``.<index>`` (catalog.ids.format_ref); tests compare every slot with NodeInfo.of."""
        first = self._block_first.get(block)
        if first is None:
            _, code, layer = self._blocks[block]
            first = self._block_first[block] = self._canonical(code, layer, 0)
        ref = f"{first.ref[:-1]}{index}"
        return NodeInfo(f"{first.uid[:-1]}{index}", first.model, first.sae, ref, first.kind, first.layer, index)


def _catalog_edges(t: EdgeTable) -> torch.Tensor:
    """Edges worth aggregating: not REST and not an SAE's encoder constant (BIAS of the target's own SAE)."""
    own_bias = (((t.src_code == Code.BIAS_A) & (t.dst_code == Code.ATTN)) |
                ((t.src_code == Code.BIAS_R) & (t.dst_code == Code.RESID)) |
                ((t.src_code == Code.BIAS_T) & (t.dst_code == Code.TC))) & (t.src_layer == t.dst_layer) & \
        (t.kind != EdgeKind.QK)  # a qk pair with a decoder bias on one side is a term of a score, not a constant
    return (t.src_code != Code.REST) & ~own_bias


def observations(graph: Graph, slots: NodeSlots, first_prompt: int) -> tuple[Observations, Activations]:
    """A batch's graph as device observations; its prompt i is row ``first_prompt + i`` of the window.
    Each table's kept rows are picked before anything is joined, and only the eight columns an
    observation has are joined (a GPT-2-shaped prompt's 534k rows, alternated in one process: 29-30
    ms when all twelve columns were joined first, 20-26 ms so)."""
    parts = []
    for t in (graph.edges, graph.direct, graph.qk):
        if t is None:
            continue
        rows = _catalog_edges(t).nonzero().squeeze(1)
        pick = lambda x, rows=rows: x.index_select(0, rows)  # noqa: E731
        parts.append((pick(t.prompt) + first_prompt, slots.slot(pick(t.src_code), pick(t.src_layer), pick(t.src_index)),
                      slots.slot(pick(t.dst_code), pick(t.dst_layer), pick(t.dst_index)), pick(t.kind), pick(t.head),
                      pick(t.src_pos), pick(t.dst_pos), pick(t.value)))
    if not parts:  # no edge table at all: empty columns on the graph's device
        e = EdgeTable.empty().to(graph.nodes.prompt.device)
        parts.append((e.prompt, e.src_index, e.dst_index, e.kind, e.head, e.src_pos, e.dst_pos, e.value))
    obs = Observations(*(torch.cat(column) for column in zip(*parts)))
    n = graph.nodes
    return obs, Activations(slots.slot(n.code, n.layer, n.index), n.prompt + first_prompt, n.act, n.pos)


def to_window(part: Partial, nodes_of: Callable[[np.ndarray], list[NodeInfo]], n_slots: int, run: str,
              prompts: list[Prompt], cap: int | None, n_observations: int) -> WindowAggregate:
    """Decode a window's Partial into the catalog's columnar record (one device->host copy);
    ``nodes_of(slots)`` names the nodes of slots [k] (NodeSlots.infos)."""
    pair, kind = part.edge_key // N_KINDS, part.edge_key % N_KINDS
    src, dst = pair // n_slots, pair % n_slots
    # the window's node rows: slots that occur, ascending; marked and renumbered through dense
    # [n_slots] tables (a unique and nine searchsorted calls took ~0.5 s a GPT-2 window here)
    seen = torch.zeros(n_slots, dtype=torch.bool, device=part.edge_key.device)
    has_src = (part.top_src >= 0).nonzero().squeeze(1)
    for e in (src, dst, part.node, part.top_src.index_select(0, has_src)):
        seen[e] = True
    used = seen.nonzero().squeeze(1)
    row_of = torch.full((n_slots,), -1, dtype=torch.long, device=used.device)
    row_of[used] = torch.arange(len(used), device=used.device)
    src, dst, node, top_node, hist_node = (row_of.index_select(0, e) for e in (
        src, dst, part.node, part.top_node, part.hist_node))
    top_src = torch.full_like(part.top_src, -1).index_copy_(
        0, has_src, row_of.index_select(0, part.top_src.index_select(0, has_src)))
    host = lambda x: x.cpu().numpy()  # noqa: E731
    of_edge = lambda rows: [host(x.index_select(0, rows)) for x in (src, dst, kind)]  # noqa: E731
    return WindowAggregate(
        run, prompts, nodes_of(host(used)),
        EdgeColumns(host(src), host(dst), host(kind), *(host(getattr(part, c)) for c in (
            "n_prompts", "n_obs", "sum", "sumsq", "sum_abs", "min", "max", "n_pos"))),
        HeadColumns(*of_edge(part.head_edge), host(part.head), host(part.head_sum)),
        EvidenceColumns(*of_edge(part.ev_edge), host(part.ev_prompt), host(part.ev_src_pos), host(part.ev_dst_pos),
                        host(part.ev_head), host(part.ev_value)),
        StatColumns(host(node), host(part.node_n_obs), host(part.node_n_prompts), host(part.node_sum_act),
                    host(part.node_max_act)),
        cap, n_observations,
        RoleColumns(*of_edge(part.role_edge), host(part.role), host(part.role_n), host(part.role_abs)),
        tops=TopColumns(host(top_node), host(part.top_prompt), host(part.top_pos), host(part.top_act), host(top_src),
                        host(part.top_src_pos), host(part.top_head), host(part.top_value)),
        hists=HistColumns(host(hist_node), host(part.hist_bin), host(part.hist_n)))


def with_roles(obs: Observations, prompts: list[Prompt]) -> Observations:
    """``obs`` with the positional roles of its attention observations; ``obs.prompt`` indexes ``prompts``."""
    obs.role_row, obs.role_code = role_rows(obs.prompt, obs.head, obs.src_pos, obs.dst_pos,
                                            PromptPositions.of(prompts, obs.prompt.device))
    return obs


def aggregate_rows(obs: Observations, acts: Activations, nodes: list[NodeInfo], run: str, prompts: list[Prompt],
                   cap: int | None, prompt_rank: torch.Tensor | None = None) -> WindowAggregate:
    """One WindowAggregate from observations whose node slots are rows of ``nodes`` (hand-built
    catalogs: tests and benchmarks), with their positional roles; prompts are ranked by uid unless
    ``prompt_rank`` is given."""
    with_roles(obs, prompts)
    rank = prompt_ranks(prompts, obs.value.device) if prompt_rank is None else prompt_rank
    part = reduce_batch(obs, acts, rank, len(nodes), cap)
    return to_window(part, lambda slots: [nodes[s] for s in slots.tolist()], len(nodes), run, prompts, cap,
                     len(obs.value))


def prompt_ranks(prompts: list[Prompt], device) -> torch.Tensor:
    """[P] rank of each prompt's uid among ``prompts`` (evidence ties are broken by uid)."""
    order = sorted(range(len(prompts)), key=lambda i: prompts[i].uid)
    rank = torch.empty(len(prompts), dtype=torch.long)
    rank[torch.tensor(order, dtype=torch.long)] = torch.arange(len(prompts))
    return rank.to(device)
