"""One prompt's graph as the attribution-graph JSON that Neuronpedia's graph page and circuit-tracer's
own viewer (``circuit_tracer/frontend``) draw.

The viewer's contract, read from its code (circuit-tracer 0.5.0, ``util-cg.js`` and
``init-cg-link-graph.js``), and how the catalog meets it:

* ``layer`` is the row and the viewer labels row ``n`` as ``L{n}``: every node of model layer L (R{L}
  features at resid_pre, A{L} features, T{L} transcoder features, their errors and biases, MLP{L}, ATTN{L})
  sits in row ``L``, EMB and POS in row ``E``. So the labels name layers as the catalog does.
* it groups nodes by ``(layer, feature, ctx_idx)`` and calls ``feature.toString()``: ``feature`` is an
  integer, unique within a row and position. With ``schema_version`` 1 the viewer reads it as a
  Cantor pair (x, index) and shows ``L{layer}/{index}``; x names the dictionary: ``3L`` for the
  residual SAE of layer L, ``3L + 1`` for its attention SAE, ``3L + 2`` for its transcoder
  (``metadata.transcoder_list[x]`` is that SAE's key, "" where absent). Transcoder features and errors carry
  Neuronpedia's own transcoder types (``cross layer transcoder``, ``mlp reconstruction error``). Component
  nodes have negative codes (``COMPONENT_CODE``); a REST node (what pruning removed from one target) takes
  ``REST_BASE - target's feature``, one per target.
* it labels the token axis only at positions holding an ``embedding`` node: an EMB node is exported
  at every position, with or without edges.
* ``qParams.pinnedIds`` and ``clickedId`` are applied on load: the start node is both.

QK attribution (why a head attended from t to s) goes where Neuronpedia's schema puts it: an
attention feature node's ``qk_tracing_results`` holds the exact split of the scores behind its
incoming attention edges (``pair_wise_contributors`` [query node, key node, value],
``top_q_marginal_contributors`` and ``top_k_marginal_contributors`` [node, value]; values in
attention-score logits); contributors that are not drawn nodes are described in the top-level
``qk_only_nodes``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from catalog.ids import NodeKind, NodeRef, parse_ref
from catalog.schema import JSON

SCHEMA_VERSION = 1  # feature = Cantor pair (dictionary slot, feature index), as circuit-tracer writes it
FEATURE_TYPE = {
    (NodeKind.ATTN, None): "attention sae feature", (NodeKind.RESID, None): "residual sae feature",
    (NodeKind.ERROR, NodeKind.ATTN): "attention sae error", (NodeKind.ERROR, NodeKind.RESID): "residual sae error",
    (NodeKind.BIAS, NodeKind.ATTN): "attention sae bias", (NodeKind.BIAS, NodeKind.RESID): "residual sae bias",
    (NodeKind.EMB, None): "embedding", (NodeKind.POS, None): "position embedding",
    (NodeKind.MLP, None): "mlp output", (NodeKind.ATTN_OUT, None): "attention output",
    (NodeKind.REST, None): "pruned inputs",
    # Neuronpedia's and circuit-tracer's names for a transcoder's nodes
    (NodeKind.TRANSCODER, None): "cross layer transcoder", (NodeKind.ERROR, NodeKind.TRANSCODER): "mlp reconstruction error",
    (NodeKind.BIAS, NodeKind.TRANSCODER): "transcoder bias",
}
COMPONENT_CODE = {
    (NodeKind.ERROR, NodeKind.RESID): -1, (NodeKind.ERROR, NodeKind.ATTN): -2,
    (NodeKind.BIAS, NodeKind.RESID): -3, (NodeKind.BIAS, NodeKind.ATTN): -4,
    (NodeKind.MLP, None): -5, (NodeKind.ATTN_OUT, None): -6, (NodeKind.EMB, None): -7, (NodeKind.POS, None): -8,
    (NodeKind.ERROR, NodeKind.TRANSCODER): -11, (NodeKind.BIAS, NodeKind.TRANSCODER): -12,  # -9, -10: QK biases
}
REST_BASE = -16  # REST into a target with feature code c has code REST_BASE - c (c >= 0 for SAE features)
QK_BIAS_TYPE = {"b_Q": "query bias", "b_K": "key bias"}


def cantor(x: int, y: int) -> int:
    """Cantor's pairing of two non-negative integers, as circuit-tracer encodes (layer, feature)."""
    return (x + y) * (x + y + 1) // 2 + y


SLOT_OF_KIND = {NodeKind.RESID: 0, NodeKind.ATTN: 1, NodeKind.TRANSCODER: 2}  # in a layer's order: resid_pre, attn, MLP


def dictionary_slot(ref: NodeRef) -> int:
    """The slot of a feature's SAE in ``transcoder_list``: 3L (residual), 3L + 1 (attention), 3L + 2 (transcoder)."""
    assert ref.layer is not None
    return 3 * ref.layer + SLOT_OF_KIND[ref.kind]


def transcoder_list(saes: list[JSON]) -> list[str]:
    """SAE keys by slot (see :func:`dictionary_slot`), "" where a layer lacks that SAE. ``saes``:
    manifest entries with ``kind`` (attn, resid or transcoder), ``layer`` and ``key``."""
    keys: dict[int, str] = {}
    for sae in saes:
        kind = NodeKind(sae["kind"])
        if kind in SLOT_OF_KIND:
            keys[dictionary_slot(NodeRef(kind, int(sae["layer"]), 0, None))] = str(sae.get("key") or "")
    return [keys.get(i, "") for i in range(max(keys) + 1)] if keys else []


def _row(ref: NodeRef, target: NodeRef | None) -> str:
    if ref.kind is NodeKind.REST:
        assert target is not None
        return _row(target, None)
    return "E" if ref.kind in (NodeKind.EMB, NodeKind.POS) else str(ref.layer)


def _code(ref: NodeRef, target: NodeRef | None) -> int:
    if ref.is_feature:
        assert ref.index is not None
        return cantor(dictionary_slot(ref), ref.index)
    if ref.kind is NodeKind.REST:
        assert target is not None
        return REST_BASE - _code(target, None)
    return COMPONENT_CODE[(ref.kind, ref.sae_kind if ref.kind in (NodeKind.ERROR, NodeKind.BIAS) else None)]


def node_json(node_id: str, target: str | None = None, activation: float | None = None) -> JSON:
    """The viewer node of catalog id ``node_id`` (with ``@pos``); REST needs its ``target``."""
    ref = parse_ref(node_id)
    dst = parse_ref(target) if target else None
    layer, code = _row(ref, dst), _code(ref, dst)
    pos = ref.pos if ref.pos is not None else (dst.pos if dst is not None and dst.pos is not None else 0)
    kind = FEATURE_TYPE[(ref.kind, ref.sae_kind if ref.kind in (NodeKind.ERROR, NodeKind.BIAS) else None)]
    label = f"REST into {dst}" if ref.kind is NodeKind.REST else str(ref.at(None))
    return {"node_id": f"{layer}_{code}_{pos}", "feature": code, "layer": layer, "ctx_idx": pos,
            "feature_type": kind, "jsNodeId": f"{layer}_{code}-{0 if ref.is_feature else pos}",
            "clerp": f"{label} ({kind})", "activation": activation}


def _qk_bias_node(name: str, layer: int, head: int, pos: int) -> JSON:
    """A qk-only node for the query (b_Q) or key (b_K) bias of one head: not a graph node."""
    kind, code = QK_BIAS_TYPE[name], -9 if name == "b_Q" else -10
    node_id = f"{layer}_{name}{head}_{pos}"  # a tag no drawn node's id has (theirs are {row}_{int}_{pos})
    return {"node_id": node_id, "feature": code, "layer": str(layer), "ctx_idx": pos, "feature_type": kind,
            "jsNodeId": node_id, "clerp": f"H{layer}.{head} {kind}", "activation": None}


@dataclass
class ScoreSplit:
    """The exact split of one head's score from query position t to key position s (attention-score
    logits): ``pairs`` (query node, key node, value), ``query_side`` / ``key_side`` (node, value).
    Nodes are catalog ids with ``@pos``, or ``b_Q`` / ``b_K`` for the head's biases."""

    layer: int
    head: int
    query_pos: int
    key_pos: int
    pairs: list[tuple[str, str, float]] = field(default_factory=list)
    query_side: list[tuple[str, float]] = field(default_factory=list)
    key_side: list[tuple[str, float]] = field(default_factory=list)

    @classmethod
    def from_trace(cls, entry: JSON) -> ScoreSplit:
        """From one entry of ``trace --qk``'s ``qk`` list (ingest.trace_qk.qk_decomposition)."""
        return cls(entry["layer"], entry["head"], entry["query_pos"], entry["key_pos"],
                   [(p["query"], p["key"], p["value"]) for p in entry["pairs"]],
                   [(m["node"], m["value"]) for m in entry["query_side"]],
                   [(m["node"], m["value"]) for m in entry["key_side"]])


def score_splits(evidence: list[JSON]) -> list[ScoreSplit]:
    """Stored QK evidence of one prompt (rows with source, target, kind, head, src_pos = s, dst_pos = t,
    value) grouped by score (layer, head, t, s)."""
    splits: dict[tuple[int, int, int, int], ScoreSplit] = {}
    for e in evidence:
        layer = parse_ref(e["target"] if e["kind"] != "qk" else e["source"]).layer
        assert layer is not None
        key = (layer, e["head"], e["dst_pos"], e["src_pos"])
        split = splits.setdefault(key, ScoreSplit(*key))
        if e["kind"] == "qk":
            split.pairs.append((e["source"], e["target"], e["value"]))
        else:
            (split.query_side if e["kind"] == "q_in" else split.key_side).append((e["source"], e["value"]))
    return [splits[k] for k in sorted(splits)]


class _Nodes:
    """The graph's nodes by catalog id (REST by ``REST>target``), and qk-only nodes beside them."""

    def __init__(self, activations: dict[str, float | None]):
        self.activations = activations
        self.drawn: dict[str, JSON] = {}
        self.qk_only: dict[str, JSON] = {}

    def add(self, node_id: str, target: str | None = None) -> JSON:
        key = f"{node_id}>{target}" if parse_ref(node_id).kind is NodeKind.REST else node_id
        if key not in self.drawn:
            self.drawn[key] = node_json(node_id, target, self.activations.get(node_id))
        return self.drawn[key]

    def contributor(self, name: str, split: ScoreSplit, pos: int) -> str:
        """The viewer id of a QK contributor: a drawn node's, else a qk-only node's."""
        if name in QK_BIAS_TYPE:
            node = _qk_bias_node(name, split.layer, split.head, pos)
        elif name in self.drawn:
            return str(self.drawn[name]["node_id"])
        else:
            node = node_json(name, None, self.activations.get(name))
        self.qk_only.setdefault(node["node_id"], node)
        return str(node["node_id"])


def _attach_qk(nodes: _Nodes, edges: list[JSON], splits: list[ScoreSplit]) -> None:
    """Each attention feature node's ``qk_tracing_results``: the splits of the scores (head, t, s)
    behind its incoming edges that went through a head."""
    by_score: dict[tuple[int, int, int, int], ScoreSplit] = {
        (s.layer, s.head, s.query_pos, s.key_pos): s for s in splits}
    scores_of: dict[str, list[ScoreSplit]] = defaultdict(list)
    for e in edges:
        dst = parse_ref(e["target"])
        if dst.kind is NodeKind.ATTN and e.get("head") is not None:
            src_pos = parse_ref(e["source"]).pos
            split = by_score.get((dst.layer, e["head"], dst.pos, src_pos))  # type: ignore[arg-type]
            if split is not None and split not in scores_of[e["target"]]:
                scores_of[e["target"]].append(split)
    for target, found in scores_of.items():
        results: JSON = {"pair_wise_contributors": [], "top_q_marginal_contributors": [],
                         "top_k_marginal_contributors": []}
        for s in found:
            results["pair_wise_contributors"] += [
                [nodes.contributor(q, s, s.query_pos), nodes.contributor(k, s, s.key_pos), v] for q, k, v in s.pairs]
            results["top_q_marginal_contributors"] += [[nodes.contributor(q, s, s.query_pos), v]
                                                       for q, v in s.query_side]
            results["top_k_marginal_contributors"] += [[nodes.contributor(k, s, s.key_pos), v] for k, v in s.key_side]
        nodes.drawn[target]["qk_tracing_results"] = results


def to_neuronpedia(*, prompt: str, tokens: list[str], edges: list[JSON], scan: str, slug: str,
                   saes: list[JSON], activations: dict[str, float | None] | None = None,
                   clicked: str | None = None, qk: list[ScoreSplit] | None = None, description: str = "",
                   version: str = "") -> JSON:
    """A per-prompt graph (``edges``: source and target ids with ``@pos``, ``value``, ``head``; per-head
    rows are summed into one link) as attribution-graph JSON; see the module docstring. ``saes``:
    the run's SAE manifest entries; ``activations``: node id -> activation where known (a trace knows
    them; stored evidence does not); ``qk``: score splits to attach (``trace --qk``, stored QK evidence)."""
    nodes = _Nodes(activations or {})
    for pos in range(len(tokens)):  # the viewer labels a token only where an embedding node sits
        nodes.add(f"EMB@{pos}")
    weights: dict[tuple[str, str], float] = defaultdict(float)
    for e in edges:
        src = nodes.add(e["source"], e["target"])
        dst = nodes.add(e["target"])
        weights[(src["node_id"], dst["node_id"])] += float(e["value"])
    _attach_qk(nodes, edges, qk or [])
    start = nodes.drawn[clicked]["node_id"] if clicked in nodes.drawn else None
    graph: JSON = {
        "metadata": {"slug": slug, "scan": scan, "prompt_tokens": tokens, "prompt": prompt,
                     "transcoder_list": transcoder_list(saes), "schema_version": SCHEMA_VERSION,
                     "info": {"description": description,
                              "generator": {"name": "circuit-catalog (RDFA)", "version": version}}},
        "qParams": {"pinnedIds": [start] if start else [], "supernodes": [], "linkType": "both",
                    "clickedId": start or "", "sg_pos": ""},
        "nodes": sorted(nodes.drawn.values(), key=lambda n: (n["layer"] != "E", int(n["layer"]) if n["layer"] != "E"
                                                             else 0, n["ctx_idx"], n["feature"])),
        "links": [{"source": s, "target": t, "weight": w} for (s, t), w in sorted(weights.items())],
    }
    if nodes.qk_only:
        graph["qk_only_nodes"] = dict(sorted(nodes.qk_only.items()))
    return graph
