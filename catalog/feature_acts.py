"""What a feature fires on, as the stores keep it: a window's or partition's top activations and histograms
(``TopColumns``, ``HistColumns``) cut into one list per statistics row, the form Neo4j keeps them in (lists on
each ``(:Stats)`` node, like an edge's evidence) and the importer's files write; and the token each top
activation sits on, stored beside it so that features can be searched by token. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from catalog.aggregate import WindowAggregate

SEP = "\x1f"  # between the tokens of token_text (no token holds it: the importer's files refuse it too)
TOP_LISTS = ("top_prompt", "top_pos", "top_act", "top_token", "top_src", "top_src_pos", "top_head", "top_value")
HIST_LISTS = ("hist_bin", "hist_n")


def tokens_at(agg: WindowAggregate) -> np.ndarray:
    """[t] object: the token each of ``agg.tops``'s activations sits on ("" past a prompt's stored tokens)."""
    t = agg.tops
    return np.array([toks[pos] if pos < len(toks) else "" for toks, pos in zip(
        (agg.prompts[p].tokens for p in t.prompt.tolist()), t.pos.tolist(), strict=True)] or [""], dtype=object)[:len(t)]


@dataclass
class StatLists:
    """Per statistics row of a window (``agg.stats``, [s]) its top-activation and histogram lists: flat arrays
    (TOP_LISTS, HIST_LISTS) cut by start [s] and width [s]."""

    top: dict[str, np.ndarray]
    top_start: np.ndarray
    top_width: np.ndarray
    hist: dict[str, np.ndarray]
    hist_start: np.ndarray
    hist_width: np.ndarray
    token_text: list[str]  # [s] each row's token_text


def token_text(tokens: list[str]) -> str:
    """The distinct tokens of a feature's top activations as one string, each between separators, so that
    ``token_text(...) CONTAINS token_text([t])`` says whether token t is among them (Neo4j's text index answers
    that; concatenating two such strings keeps it true)."""
    return SEP + SEP.join(sorted(set(tokens))) + SEP if tokens else ""


def stat_lists(agg: WindowAggregate, ids: np.ndarray) -> StatLists:
    """``agg``'s tops and histograms grouped by statistics row, once its nodes have dictionary ids ``ids``
    [nodes] (a top activation's source by its id, -1 where none). Each feature's rows keep their order
    (strongest first; bins ascending)."""
    t, g = agg.tops, agg.hists
    if not (np.isin(t.node, agg.stats.node).all() and np.isin(g.node, agg.stats.node).all()):
        raise ValueError("a window holds top activations or histograms of a feature without its statistics")
    top_order, top_start, top_width = _spans(agg.stats.node, t.node)
    hist_order, hist_start, hist_width = _spans(agg.stats.node, g.node)
    uids = np.array([p.uid for p in agg.prompts] or [""], dtype=object)
    src = np.where(t.src >= 0, ids[t.src.clip(0)] if len(ids) else t.src, -1)
    top = dict(zip(TOP_LISTS, (uids[t.prompt], t.pos, t.act, tokens_at(agg), src, t.src_pos, t.head, t.value),
                   strict=True))
    grouped = {k: v[top_order] for k, v in top.items()}
    tokens = grouped["top_token"].tolist()
    texts = [token_text(tokens[a:a + w]) for a, w in zip(top_start.tolist(), top_width.tolist(), strict=True)]
    return StatLists(grouped, top_start, top_width, {"hist_bin": g.bin[hist_order], "hist_n": g.n[hist_order]},
                     hist_start, hist_width, texts)


def _spans(stat_node: np.ndarray, item_node: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order [k] grouping items by node, keeping their order within a node; start [s] and width [s] of each
    statistics row's items in that order)."""
    order = np.argsort(item_node, kind="stable")
    by_node = item_node[order]
    start = np.searchsorted(by_node, stat_node, "left")
    return order, start, np.searchsorted(by_node, stat_node, "right") - start
