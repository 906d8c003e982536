"""What a feature fires on: its top-activating contexts and activation histogram (the feature page's), and
features found by the token they fire on. Stores hand back the stored rows in no order; the order, the cut to
the top and every sum are made here, so both stores answer alike to the bit; floats are shown rounded as
catalog.queries rounds them (``rnd``), after the ranking.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from catalog.rounding import rnd
from catalog.schema import JSON, TOP_ACTIVATIONS, Prompt, TopActivation, hist_edges
from catalog.stores.base import Store

MAX_CONTEXTS = TOP_ACTIVATIONS
BEFORE, AFTER = 12, 4  # tokens shown before and after the activating token
FAR = 48  # a strongest source further back than this is named, not shown in the context
MAX_CANDIDATES = 2000  # features a token search ranks at most (those with the strongest activations on it)


def top_of(rows: list[TopActivation], n: int = TOP_ACTIVATIONS) -> list[TopActivation]:
    """The ``n`` strongest of a feature's stored activations, in the catalog's order (act descending, then
    prompt uid, then position): over several runs, or windows of one run, the same top a single run keeps."""
    return sorted(rows, key=TopActivation.order_key)[:n]


def contexts(store: Store, uid: str, runs: Sequence[str] | None, limit: int) -> tuple[list[JSON], list[JSON]]:
    """(a feature's ``limit`` top-activating contexts, its activation histogram) over the runs selected.
    A context holds the tokens around the activating one (``start`` is the first one's position), the
    activation, and the strongest attn_in / resid_in observation into the feature there: its source node,
    the position it reads from, head and attribution."""
    rows, hist = store.activations(uid, runs)
    top = top_of(rows, limit)
    prompts = store.prompts(sorted({t.prompt for t in top}))
    return [context_json(t, prompts[t.prompt]) for t in top if t.prompt in prompts], histogram_json(hist)


def context_json(t: TopActivation, prompt: Prompt) -> JSON:
    start = max(0, t.pos - BEFORE)
    if t.src is not None and t.pos - FAR <= t.src_pos < start:
        start = max(0, t.src_pos - 2)
    return {"prompt": t.prompt, "run": t.run, "pos": t.pos, "token": t.token, "activation": rnd(t.act),
            "start": start, "tokens": prompt.tokens[start:t.pos + AFTER + 1],
            "source": None if t.src is None else {
                "id": t.src.rpartition("|")[2], "uid": t.src, "pos": t.src_pos, "head": None if t.head < 0 else t.head,
                "token": prompt.tokens[t.src_pos] if t.src_pos < len(prompt.tokens) else "", "value": rnd(t.value)}}


def histogram_json(hist: dict[int, int]) -> list[JSON]:
    """Bins with activations, ascending: [low, high) and the count."""
    return [{"low": (edges := hist_edges(b))[0], "high": edges[1], "n": n} for b, n in sorted(hist.items())]


def by_token(store: Store, token: str, runs: Sequence[str] | None, limit: int) -> list[JSON]:
    """Features whose top activations sit on ``token``, most concentrated first: the share of the activation
    mass of a feature's top TOP_ACTIVATIONS (over the runs selected) that sits on the token, then how many of
    them do, then the strongest on it, then uid. Candidates are the MAX_CANDIDATES features with the strongest
    top activations on the token."""
    ranked: list[tuple[tuple[float, int, float, str], JSON]] = []
    for node, rows in store.token_activations(token, runs, MAX_CANDIDATES):
        top = top_of(rows)
        on = [t for t in top if t.token == token]
        if not on:  # its activations on the token are all below its top
            continue
        total = math.fsum(t.act for t in top)
        share = math.fsum(t.act for t in on) / total if total > 0 else len(on) / len(top)
        ranked.append(((-share, -len(on), -on[0].act, node.uid), {
            "id": node.ref, "uid": node.uid, "kind": node.kind, "layer": node.layer, "model": node.model,
            "share": rnd(share), "n_on_token": len(on), "n_top": len(top), "max_on_token": rnd(on[0].act),
            "example": {"prompt": on[0].prompt, "pos": on[0].pos}}))
    ranked.sort(key=lambda r: r[0])
    return [f for _, f in ranked[:limit]]


def token_query(text: str) -> str:
    """The token a search names: as typed, or inside double quotes where it has leading or trailing spaces
    (``" and"``), as GPT-2's tokens do."""
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    if not text:
        raise ValueError('name a token to search for, e.g. token=" and" (quotes keep its leading space)')
    return text
