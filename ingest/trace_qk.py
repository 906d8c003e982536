"""``trace --qk``: why each traced attention edge's head attended from t to s.

For every (layer, head, query position t, key position s) that carries a traced ``attn_in`` edge,
the head's pre-softmax score is split exactly (ingest/rdfa/qk.py) over the residual SAE's
decomposition of resid_pre at t (query side) and at s (key side): each active feature (activation x
decoder row), the decoder bias and the error, plus the query bias b_Q on the query side and the key
bias b_K on the key side. Every (query-side, key-side) pair is one term; all terms add up to the
score. Shown: the largest pairs, each side's marginals (a node's pairs summed: what a q_in / k_in
edge carries), and the rest. Units: attention-score logits, not feature pre-activations.
"""

from __future__ import annotations

import torch

from catalog.ids import NodeKind, format_ref, resid, sae_bias, sae_error
from ingest.lens import qk_weights
from ingest.rdfa.qk import qk_terms
from ingest.rdfa.tensors import Capture, EdgeKind, EdgeTable
from ingest.rdfa.types import SaeWeights

UNITS = "attention-score logits (pre-softmax), not feature pre-activations"


def score_keys(table: EdgeTable) -> list[tuple[int, int, int, int]]:
    """Distinct (layer, head, t, s) of the attn_in edges in ``table`` that went through a head (a node's
    constant and REST edges carry head -1), sorted."""
    rows = ((table.kind == EdgeKind.ATTN_IN) & (table.head >= 0)).nonzero().flatten().tolist()
    return sorted({(int(table.dst_layer[i]), int(table.head[i]), int(table.dst_pos[i]), int(table.src_pos[i]))
                   for i in rows})


def _side(sae: SaeWeights, x: torch.Tensor, layer: int, pos: int) -> tuple[torch.Tensor, list[str]]:
    """[N, d] the residual SAE's decomposition of ``x`` (resid_pre at one position) and the node ids."""
    acts = sae.activation(sae.pre_activation(x))
    on = acts.nonzero().flatten()
    rows = torch.cat([acts[on, None] * sae.W_dec[on], sae.b_dec[None], (x - sae.decode(acts))[None]])
    names = [format_ref(resid(layer, int(i), pos)) for i in on.tolist()]
    names += [format_ref(sae_bias(NodeKind.RESID, layer, pos)), format_ref(sae_error(NodeKind.RESID, layer, pos))]
    return rows, names


def qk_decomposition(model, cap: Capture, resid_saes: dict[int, SaeWeights], keys: list[tuple[int, int, int, int]],
                     top: int) -> list[dict]:
    """One entry per (layer, head, t, s) of prompt 0 of ``cap``: score, largest pairs, marginals."""
    out = []
    for layer, head, t, s in keys:
        x, scale = cap.resid_pre[layer][0], cap.ln1_scale[layer][0]
        q_rows, q_names = _side(resid_saes[layer], x[t], layer, t)
        k_rows, k_names = _side(resid_saes[layer], x[s], layer, s)
        W_Q, W_K, b_Q, b_K, attn_scale = qk_weights(model, layer)
        h = slice(head, head + 1)
        terms = qk_terms(q_rows, k_rows, scale[t], scale[s], W_Q[h], W_K[h], b_Q[h], b_K[h], attn_scale)
        # the full (query side + b_Q) x (key side + b_K) matrix: every entry a term, all adding to the score
        full = torch.zeros(len(q_names) + 1, len(k_names) + 1, dtype=terms.pairs.dtype)
        full[:-1, :-1] = terms.pairs[0]
        full[:-1, -1] = terms.query_bias[0]
        full[-1, :-1] = terms.key_bias[0]
        full[-1, -1] = terms.bias_bias[0]
        q_all, k_all = q_names + ["b_Q"], k_names + ["b_K"]
        flat = full.flatten()
        order = flat.abs().argsort(descending=True)[:top].tolist()
        pairs = [{"query": q_all[i // full.shape[1]], "key": k_all[i % full.shape[1]], "value": float(flat[i])}
                 for i in order]
        score = float(full.sum())

        def marginals(values: torch.Tensor, names: list[str]) -> list[dict]:
            keep = values.abs().argsort(descending=True)[:top].tolist()
            return [{"node": names[i], "value": float(values[i])} for i in keep]

        out.append({"layer": layer, "head": head, "query_pos": t, "key_pos": s, "score": score, "units": UNITS,
                    "pairs": pairs, "pairs_rest": score - sum(p["value"] for p in pairs),
                    "query_side": marginals(full.sum(1), q_all), "key_side": marginals(full.sum(0), k_all)})
    return out


def render_qk(result: dict) -> str:
    """Text lines for the tree view: per head and (t, s), the score and its largest terms."""
    tokens = result["tokens"]
    lines = [f"QK: why each traced head attended from t to s ({UNITS})"]
    for e in result.get("qk", []):
        t, s = e["query_pos"], e["key_pos"]
        terms = ", ".join(f"{p['query']} x {p['key']} {p['value']:+.3f}" for p in e["pairs"])
        lines.append(f"  L{e['layer']} h{e['head']} {t} {tokens[t]!r} -> {s} {tokens[s]!r}: score {e['score']:+.3f} = "
                     f"{terms} (rest {e['pairs_rest']:+.3f})")
    return "\n".join(lines)
