"""One prompt's graph, for people and for other viewers: the layered layout rows the pages draw,
the neighbourhood of a chosen node, and the attribution-graph JSON that Neuronpedia's graph page and
circuit-tracer's frontend read.

The published schema (neuronpedia, apps/webapp/app/api/graph/graph-schema.json) requires
``metadata`` {slug, scan, prompt_tokens, prompt}, ``qParams``, ``nodes`` [{node_id, feature, layer,
ctx_idx, feature_type, jsNodeId, clerp}] and ``links`` [{source, target, weight}]; tests validate
the export against it (tests/schemas/).

Rows (the ``layer`` a viewer stacks nodes by), in the order the residual stream is written::

    E        EMB, POS (token and position embeddings)
    3L + 1   R{L}.*  residual SAE features, error and bias at resid_pre of layer L
    3L + 2   A{L}.*  attention SAE features, error and bias of layer L; ATTN{L}
    3L + 3   MLP{L}

so an attention and a residual feature of one layer never share a row, and the node ids
``{row}_{index}_{pos}`` of two features never collide. Components have no index: their id carries
a tag instead (``ERR`` -> -1, as circuit-tracer marks error nodes; ``bias``, ``mlp``, ``attn``,
``emb``, ``pos``, ``rest``).
"""

from __future__ import annotations

from collections import defaultdict, deque

from catalog.ids import NodeKind, NodeRef, parse_ref
from catalog.schema import JSON

FEATURE_TYPE = {
    (NodeKind.ATTN, None): "attention sae feature", (NodeKind.RESID, None): "residual sae feature",
    (NodeKind.ERROR, NodeKind.ATTN): "attention sae error", (NodeKind.ERROR, NodeKind.RESID): "residual sae error",
    (NodeKind.BIAS, NodeKind.ATTN): "attention sae bias", (NodeKind.BIAS, NodeKind.RESID): "residual sae bias",
    (NodeKind.EMB, None): "embedding", (NodeKind.POS, None): "position embedding",
    (NodeKind.MLP, None): "mlp output", (NodeKind.ATTN_OUT, None): "attention output",
    (NodeKind.REST, None): "pruned inputs",
}
_TAG = {NodeKind.ERROR: "-1", NodeKind.BIAS: "bias", NodeKind.MLP: "mlp", NodeKind.ATTN_OUT: "attn",
        NodeKind.EMB: "emb", NodeKind.POS: "pos", NodeKind.REST: "rest"}


def display_row(ref: NodeRef, target: NodeRef | None = None) -> int:
    """The row of ``ref`` in a layered drawing (0 = embeddings, then by where it is written to the
    residual stream). REST has no layer of its own: it sits in its target's row."""
    k = ref.kind
    if k in (NodeKind.EMB, NodeKind.POS):
        return 0
    if k is NodeKind.REST:
        return display_row(target) if target is not None else 0
    assert ref.layer is not None
    if k is NodeKind.MLP:
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


def _node(node_id: str, target: str | None, activation: float | None) -> JSON:
    ref = parse_ref(node_id)
    row = display_row(ref, parse_ref(target) if target else None)
    layer = "E" if row == 0 else str(row)
    pos = ref.pos if ref.pos is not None else 0
    if ref.is_feature:
        feature, key, js = ref.index, f"{layer}_{ref.index}_{pos}", f"{layer}_{ref.index}-0"
    else:
        tag = _TAG[ref.kind]
        feature, key, js = (-1 if ref.kind is NodeKind.ERROR else None), f"{layer}_{tag}_{pos}", f"{layer}_{tag}-{pos}"
    kind = FEATURE_TYPE[(ref.kind, ref.sae_kind if ref.kind in (NodeKind.ERROR, NodeKind.BIAS) else None)]
    return {"node_id": key, "feature": feature, "layer": layer, "ctx_idx": pos, "feature_type": kind,
            "jsNodeId": js, "clerp": f"{ref.at(None)} ({kind})", "activation": activation}


def to_neuronpedia(*, prompt: str, tokens: list[str], edges: list[JSON], scan: str, slug: str,
                   saes: list[str], activations: dict[str, float | None] | None = None,
                   clicked: str | None = None, description: str = "", version: str = "") -> JSON:
    """A per-prompt graph (``edges``: source and target ids with ``@pos``, ``value``; per-head rows
    are summed into one link) as attribution-graph JSON. ``activations`` maps node ids to their
    activation where known (a trace knows them; stored evidence does not)."""
    activations = activations or {}
    nodes: dict[str, JSON] = {}
    weights: dict[tuple[str, str], float] = defaultdict(float)
    for e in edges:
        src = nodes.setdefault(e["source"] if parse_ref(e["source"]).kind is not NodeKind.REST
                               else f"{e['source']}>{e['target']}",
                               _node(e["source"], e["target"], activations.get(e["source"])))
        dst = nodes.setdefault(e["target"], _node(e["target"], None, activations.get(e["target"])))
        weights[(src["node_id"], dst["node_id"])] += float(e["value"])
    by_id = {n["node_id"]: n for n in nodes.values()}  # REST nodes of one row and position merge here
    start = by_id.get(nodes[clicked]["node_id"]) if clicked in nodes else None
    return {
        "metadata": {"slug": slug, "scan": scan, "prompt_tokens": tokens, "prompt": prompt, "transcoder_list": saes,
                     "schema_version": 1,
                     "info": {"description": description,
                              "generator": {"name": "circuit-catalog (RDFA)", "version": version}}},
        "qParams": {"pinnedIds": [start["node_id"]] if start else [], "supernodes": [], "linkType": "both",
                    "clickedId": start["node_id"] if start else "", "sg_pos": ""},
        "nodes": sorted(by_id.values(), key=lambda n: (n["layer"] != "E", int(n["layer"]) if n["layer"] != "E" else 0,
                                                       n["ctx_idx"], n["node_id"])),
        "links": [{"source": s, "target": t, "weight": w} for (s, t), w in sorted(weights.items())],
    }
