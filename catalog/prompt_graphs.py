"""One prompt's graph as the pages draw it: the layered layout rows and the neighbourhood of a chosen
node (catalog.neuronpedia exports it for Neuronpedia and circuit-tracer's viewer).

Rows, in the order the residual stream is written::

    E        EMB, POS (token and position embeddings)
    3L + 1   R{L}.*  residual SAE features, error and bias at resid_pre of layer L
    3L + 2   A{L}.*  attention SAE features, error and bias of layer L; ATTN{L}
    3L + 3   MLP{L}, or T{L}.* transcoder features, error and bias (the MLP's output, decomposed)

so an attention and a residual feature of one layer never share a row.
"""

from __future__ import annotations

from collections import defaultdict, deque

from catalog.ids import NodeKind, NodeRef, parse_ref
from catalog.schema import JSON


def display_row(ref: NodeRef, target: NodeRef | None = None) -> int:
    """The row of ``ref`` in a layered drawing (0 = embeddings, then by where it is written to the
    residual stream). REST has no layer of its own: it sits in its target's row."""
    k = ref.kind
    if k in (NodeKind.EMB, NodeKind.POS):
        return 0
    if k is NodeKind.REST:
        return display_row(target) if target is not None else 0
    assert ref.layer is not None
    if k in (NodeKind.MLP, NodeKind.TRANSCODER) or ref.sae_kind is NodeKind.TRANSCODER:
        return 3 * ref.layer + 3
    attn_side = k in (NodeKind.ATTN, NodeKind.ATTN_OUT) or ref.sae_kind is NodeKind.ATTN
    return 3 * ref.layer + (2 if attn_side else 1)


def neighbourhood(edges: list[JSON], around: str) -> list[JSON]:
    """The edges on a path into or out of ``around`` (``A2.17@14``, or ``A2.17`` for every position
    of it) in one prompt's graph: its ancestors' edges and its descendants' edges."""
    ref = parse_ref(around)
    seeds = {e[side] for e in edges for side in ("source", "target")
             if (parse_ref(e[side]) == ref if ref.pos is not None else parse_ref(e[side]).at(None) == ref)}
    into, out_of = defaultdict(list), defaultdict(list)
    for i, e in enumerate(edges):
        into[e["target"]].append(i)
        out_of[e["source"]].append(i)
    keep: set[int] = set()
    for index, far_end in ((into, "source"), (out_of, "target")):
        seen, queue = set(seeds), deque(seeds)
        while queue:
            for i in index[queue.popleft()]:
                keep.add(i)
                if edges[i][far_end] not in seen:
                    seen.add(edges[i][far_end])
                    queue.append(edges[i][far_end])
    return [e for i, e in enumerate(edges) if i in keep]
