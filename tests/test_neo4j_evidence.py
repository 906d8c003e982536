"""merge_lists (the Neo4j store's evidence merge, numpy only) against plain Python: each touched edge's
top ``cap`` of its window rows and stored list, in the evidence order (|value| descending, then prompt
uid, src_pos, dst_pos, head), with ties on |value| everywhere; only edges a window row entered are
rewritten."""

from __future__ import annotations

import random

import numpy as np
import pytest

from catalog.stores.neo4j_evidence import StoredLists, merge_lists


def _case(seed: int, cap: int | None):
    rng = random.Random(seed)
    # the rows below name prompts by number; uid_of spells them out, in an order that is not theirs
    uid_of = {i: f"run/p{11 - i:03d}" for i in range(12)}
    values = [0.5, -0.5, 0.25, 1.0, -2.0]  # few values: ties on |value| everywhere
    def row(prompts):  # a window's prompts are new: stored lists name earlier prompts only
        return (rng.choice(prompts), rng.randrange(4), rng.randrange(4), rng.randrange(-1, 2), rng.choice(values))
    window = sorted({(rng.randrange(5), *row(range(0, 12, 2))) for _ in range(60)})
    rng.shuffle(window)
    stored: dict[int, list[list]] = {}
    for g in range(0, 7, 2):  # groups 0, 2, 4 also appear in the window; 6 does not
        rows = sorted({row(range(1, 12, 2)) for _ in range(rng.randrange(1, 6))},
                      key=lambda r: (-abs(r[4]), uid_of[r[0]], *r[1:4]))
        rows = rows[:cap] if cap is not None else rows
        stored[g] = [[uid_of[r[0]] for r in rows], *([r[c] for r in rows] for c in range(1, 5))]
    window = [(g, uid_of[p], *rest) for g, p, *rest in window]
    return window, stored


@pytest.mark.parametrize("cap", [None, 1, 3])
@pytest.mark.parametrize("seed", range(4))
def test_merge_keeps_each_edge_top_cap_in_evidence_order(seed, cap):
    window, stored = _case(seed, cap)
    cols = [np.array(c, dtype=object if k == 1 else None) for k, c in enumerate(zip(*window, strict=True))]
    merged = merge_lists(cols[0], cols[1], cols[2], cols[3], cols[4], cols[5].astype(np.float64),
                         StoredLists.from_dict(stored), cap)

    def rank(r):
        return (-abs(r[4]), r[0], r[1], r[2], r[3])
    expected = {}
    for g in sorted({w[0] for w in window} | set(stored)):
        new = [(w[1:], True) for w in window if w[0] == g]
        old = [(r, False) for r in zip(*stored.get(g, [[]] * 5), strict=True)]
        top = sorted(new + old, key=lambda x: rank(x[0]))[:cap]
        if any(is_new for _, is_new in top):  # only groups a window row entered are rewritten
            expected[g] = ([r for r, _ in top], len(top) - len(old))
    assert merged.group.tolist() == sorted(expected)
    for i, g in enumerate(merged.group.tolist()):
        a, b = merged.offsets[i], merged.offsets[i + 1]
        got = list(zip(*(c[a:b].tolist() for c in merged.columns), strict=True))
        assert got == [tuple(r) for r in expected[g][0]], g
        assert merged.grown[i] == expected[g][1]
    # the window rows in a list now, by their index among the rows given
    kept = sorted(k for k, w in enumerate(window) if w[0] in expected and w[1:] in expected[w[0]][0])
    assert merged.window_rows.tolist() == kept


def test_stored_lists_of_an_edge_not_given_are_refused():
    stored = StoredLists.from_dict({7: [["run/p1"], [0], [1], [-1], [0.5]]})
    assert stored.regrouped(np.array([7, 7, 9]), np.array([2, 2, 3])).group.tolist() == [2]
    with pytest.raises(ValueError, match="name no given edge"):
        stored.regrouped(np.array([9]), np.array([3]))
