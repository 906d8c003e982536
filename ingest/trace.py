"""Recursive trace of one prompt, as the Attention Circuit Explorer did: from (feature, position),
expand the top-N contributors at each step to depth K.

Every decomposed node in the result lists *all* its kept incoming edges (per head where a head
applies) plus its bias and REST edges, so they sum to its pre-activation; ``direct_edges`` gives
the attention->attention view of the same attention nodes, computed exactly over all positions.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from catalog.ids import NodeKind, NodeRefError, format_ref, parse_ref
from ingest.errors import UserFacingError
from ingest.lens import capture
from ingest.model_with_saes import ModelWithSaes
from ingest.rdfa import steps
from ingest.rdfa.blocks import position_blocks
from ingest.rdfa.graph import direct_closure, direct_into, full_graph
from ingest.rdfa.tensors import EDGE_KIND_NAMES, Code, EdgeTable, Pruning, code_to_ref

Key = tuple[int, int, int, int]  # (code, layer, index, pos)
FEATURE_CODES = (Code.ATTN, Code.RESID, Code.TC)  # the nodes a trace expands


def _ref(key: Key) -> str:
    return format_ref(code_to_ref(*key))


def _start(graph, session: ModelWithSaes, feature: str | None, pos: int) -> Key:
    n = graph.nodes
    if feature:
        try:
            ref = parse_ref(feature)
        except NodeRefError as exc:
            raise UserFacingError(str(exc)) from None
        kinds = {NodeKind.ATTN: (Code.ATTN, session.attn, "attention SAE"),
                 NodeKind.RESID: (Code.RESID, session.resid, "residual SAE"),
                 NodeKind.TRANSCODER: (Code.TC, session.transcoders, "transcoder")}
        if ref.kind not in kinds:
            raise UserFacingError(f"--feature {feature}: trace starts from an SAE or transcoder feature (A.., R.. or "
                                  "T..)")
        code, saes, what = kinds[ref.kind]
        if ref.layer not in saes:
            raise UserFacingError(f"--feature {feature}: no {what} at layer {ref.layer} "
                                  f"(this session has {what}s at layers {sorted(saes)})")
        if ref.index >= saes[ref.layer].d_sae:
            raise UserFacingError(f"--feature {feature}: index {ref.index} is past the width of the layer-{ref.layer} "
                                  f"{what} ({saes[ref.layer].d_sae} features)")
        hit = (n.code == code) & (n.layer == ref.layer) & (n.index == ref.index) & (n.pos == pos)
        if not hit.any():
            raise UserFacingError(f"feature {format_ref(ref.at(None))} is not active at position {pos} of this prompt")
        return (int(code), ref.layer, ref.index, pos)
    top_layer = max(session.attn)
    cand = (n.code == Code.ATTN) & (n.layer == top_layer) & (n.pos == pos)
    if not cand.any():
        raise UserFacingError(f"no attention feature of layer {top_layer} is active at position {pos}")
    i = torch.nonzero(cand).flatten()[n.act[cand].argmax()]
    return (int(Code.ATTN), top_layer, int(n.index[i]), pos)


def _incoming(table: EdgeTable) -> dict[Key, list[int]]:
    by_dst: dict[Key, list[int]] = defaultdict(list)
    cols = [table.dst_code.tolist(), table.dst_layer.tolist(), table.dst_index.tolist(), table.dst_pos.tolist()]
    for i, key in enumerate(zip(*cols)):
        by_dst[key].append(i)
    return by_dst


def _edge_json(table: EdgeTable, i: int) -> dict:
    src = (int(table.src_code[i]), int(table.src_layer[i]), int(table.src_index[i]), int(table.src_pos[i]))
    dst = (int(table.dst_code[i]), int(table.dst_layer[i]), int(table.dst_index[i]), int(table.dst_pos[i]))
    head = int(table.head[i])
    return {"source": _ref(src), "target": _ref(dst), "value": float(table.value[i]),
            "kind": EDGE_KIND_NAMES[int(table.kind[i])], "head": None if head < 0 else head}


def trace(session: ModelWithSaes, text: str, *, feature: str | None = None, pos: int = -1, depth: int = 3,
          top: int = 5, qk: bool = False) -> dict:
    """The trace as a JSON-ready dict: {prompt, tokens, nodes, edges, direct_edges}, and with ``qk`` the
    exact QK decomposition of the score behind each traced attention edge (ingest.trace_qk)."""
    if not text.strip():
        raise UserFacingError("the prompt is empty: give --prompt some text to trace")
    for name, value, low in (("--depth", depth, 1), ("--top", top, 1)):
        if not low <= value <= 1000:
            raise UserFacingError(f"{name} {value}: must be between {low} and 1000")
    ids = session.lm.tokenizer.encode(text)
    if len(ids) > session.lm.n_ctx:
        raise UserFacingError(f"prompt has {len(ids)} tokens; the model's context is {session.lm.n_ctx}")
    if not -len(ids) <= pos < len(ids):
        raise UserFacingError(f"--pos {pos} is outside the prompt's {len(ids)} tokens")
    pos %= len(ids)
    tokens, lengths = session.pad([ids])
    _, cap = capture(session.lm.model, tokens, lengths, session.transcoders)
    # the tree reads attn_in / resid_in / mlp_in only (trace --qk decomposes its own scores: ingest/trace_qk.py)
    graph = full_graph(cap, session.weights, session.attn, session.resid, Pruning(top_k=top, direct=False, qk=False),
                       session.transcoders)
    n = graph.nodes
    info = {(int(c), int(l), int(i), int(p)): (float(a), float(pr)) for c, l, i, p, a, pr in
            zip(n.code, n.layer, n.index, n.pos, n.act, n.pre)}
    by_dst = _incoming(graph.edges)
    start = _start(graph, session, feature, pos)
    expanded, frontier, edge_rows = [], [start], []
    for _ in range(depth):
        nxt = []
        for node in frontier:
            if node in expanded:
                continue
            expanded.append(node)
            rows = by_dst.get(node, [])
            edge_rows += rows
            nxt += _top_sources(graph.edges, rows, top)
        frontier = [k for k in dict.fromkeys(nxt) if k[0] in FEATURE_CODES and k not in expanded]
    edges = [_edge_json(graph.edges, i) for i in edge_rows]
    direct = _direct_for(session, cap, [k for k in expanded if k[0] == Code.ATTN], info, top)
    seen = dict.fromkeys([start] + expanded + [_key(graph.edges, i, "src") for i in edge_rows])
    nodes = [_node_json(k, info) for k in seen]
    result = {"prompt": text, "tokens": session.lm.tokenizer.spell(ids), "start": _ref(start), "nodes": nodes,
              "edges": edges, "direct_edges": direct, "pruning": {"top_k": top, "depth": depth}}
    if qk:
        from ingest.trace_qk import qk_decomposition, score_keys

        traced = graph.edges.select(torch.tensor(edge_rows, dtype=torch.long, device=graph.edges.value.device))
        result["qk"] = qk_decomposition(session.lm.model, cap, session.resid, score_keys(traced), top)
    return result


def _key(table: EdgeTable, i: int, side: str) -> Key:
    return tuple(int(getattr(table, f"{side}_{c}")[i]) for c in ("code", "layer", "index", "pos"))  # type: ignore


def _top_sources(table: EdgeTable, rows: list[int], top: int) -> list[Key]:
    """The ``top`` SAE-feature source nodes (the expandable ones) by |sum over heads| among ``rows``."""
    total: dict[Key, float] = defaultdict(float)
    for i in rows:
        key = _key(table, i, "src")
        if key[0] in FEATURE_CODES:
            total[key] += float(table.value[i])
    return sorted(total, key=lambda k: (-abs(total[k]), k))[:top]


def _node_json(key: Key, info: dict) -> dict:
    ref = code_to_ref(*key)
    act, pre = info.get(key, (None, None))
    return {"id": format_ref(ref), "kind": ref.kind.value,
            "layer": ref.layer, "index": ref.index, "pos": ref.pos, "activation": act, "pre_activation": pre}


def _direct_for(session: ModelWithSaes, cap, targets: list[Key], info: dict, top: int) -> list[dict]:
    """Exact direct attention->attention edges (all positions and heads) of the expanded attention nodes."""
    out = []
    acts = {l: steps.active_set(s, cap.z[l].flatten(-2), cap.valid) for l, s in session.attn.items()}
    tc_acts = {l: (s, steps.active_set(s, cap.mlp_in[l], cap.valid)) for l, s in session.transcoders.items()}
    blocks = position_blocks(cap, session.weights, {l: (session.attn[l], acts[l]) for l in session.attn}, tc_acts)
    for code, L, f, t in targets:
        b = torch.zeros(1, dtype=torch.long, device=cap.embed.device)
        tt = torch.tensor([t], device=b.device)
        ff = torch.tensor([f], device=b.device)
        sae = session.attn[L]
        table, kept = direct_into(cap, session.weights, blocks, sae, b, tt, ff, Pruning(top_k=top))
        pre = torch.tensor([info[(code, L, f, t)][1]], device=b.device)
        closure = direct_closure(b, tt, ff, pre, kept, steps.attn_constant(sae, session.weights.b_V[L])[ff], L)
        full = EdgeTable.cat([table, closure]).to("cpu")
        out += [_edge_json(full, i) for i in range(len(full))]
    return out


def render_tree(result: dict) -> object:
    """A rich Tree: each node with its token, activation, and its largest inputs (heads shown)."""
    from rich.tree import Tree

    tokens = result["tokens"]
    by_target: dict[str, list[dict]] = defaultdict(list)
    for e in result["edges"]:
        by_target[e["target"]].append(e)
    nodes = {n["id"]: n for n in result["nodes"]}

    def label(node_id: str, value: float | None = None, heads: str = "") -> str:
        n = nodes.get(node_id, {})
        pos = n.get("pos")
        tok = f" {tokens[pos]!r}" if pos is not None and pos < len(tokens) else ""
        act = f" act={n['activation']:.3f}" if n.get("activation") is not None else ""
        val = f"[bold]{value:+.3f}[/bold] " if value is not None else ""
        return f"{val}{node_id}{tok}{act}{heads}"

    def grow(tree, node_id: str, depth: int, seen: set) -> None:
        if node_id in seen or node_id not in by_target:
            return
        seen.add(node_id)
        total: dict[str, float] = defaultdict(float)
        heads: dict[str, list] = defaultdict(list)
        for e in by_target[node_id]:
            total[e["source"]] += e["value"]
            if e["head"] is not None:
                heads[e["source"]].append(f"h{e['head']}:{e['value']:+.2f}")
        for src in sorted(total, key=lambda s: -abs(total[s])):
            h = f" ({', '.join(heads[src])})" if heads[src] else ""
            grow(tree.add(label(src, total[src], h)), src, depth + 1, seen)

    root = Tree(f"{label(result['start'])}  pre={nodes[result['start']]['pre_activation']:.3f}")
    grow(root, result["start"], 0, set())
    return root
