"""RunEdges (a Neo4j writer's copy of its run's stored edges) against a plain dict kept beside it: after
any sequence of windows, which keys are stored, their element ids and their evidence lists are those of
the dict, whichever edges were created, changed or left alone."""

from __future__ import annotations

import random

import numpy as np
import pytest

from catalog.stores import neo4j_edges
from catalog.stores.neo4j_edges import RunEdges


def _lists(rng: random.Random, n: int) -> list[list]:
    rows = [(f"run/p{rng.randrange(50)}", rng.randrange(9), rng.randrange(9), rng.randrange(-1, 3),
             rng.choice([0.5, -1.5, 2.0])) for _ in range(n)]
    return [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in range(5)]


def _columns(lists_by_key: list[list[list]]) -> tuple[np.ndarray, list[np.ndarray]]:
    widths = [len(lists[4]) for lists in lists_by_key]
    cols = [np.array([x for lists in lists_by_key for x in lists[c]], dtype=object if c == 0 else None)
            for c in range(5)]
    return np.r_[0, np.cumsum(widths)].astype(np.int64), [c if len(c) else c.astype(np.int64) for c in cols]


@pytest.mark.parametrize("seed", range(5))
def test_the_copy_after_windows_equals_a_dict_of_what_was_written(seed):
    rng = random.Random(seed)
    expected: dict[int, tuple[str, list[list]]] = {}
    copy = RunEdges.empty(writes=0)
    for w in range(1, 6):
        new_keys = rng.sample(sorted(set(range(-40, 400, 3)) - set(expected)), rng.randrange(0, 30))
        new_eids = [f"5:db:{k}" for k in new_keys]
        # changed: some stored edges and some new ones get new lists (possibly empty: never written)
        pool = list(expected) + new_keys
        changed = rng.sample(pool, rng.randrange(0, len(pool) + 1)) if pool else []
        changed.sort()
        changed_lists = [_lists(rng, rng.randrange(0, 5)) for _ in changed]
        for k, eid in zip(new_keys, new_eids, strict=True):
            expected[k] = (eid, [[] for _ in range(5)])
        for k, lists in zip(changed, changed_lists, strict=True):
            expected[k] = (expected[k][0], lists)
        offsets, cols = _columns(changed_lists)
        copy = copy.after(w, np.array(new_keys, np.int64), np.array(new_eids, dtype=object),
                          np.array(changed, np.int64), offsets, cols)
        assert copy.writes == w
        some_stored = set(rng.sample(sorted(expected), min(5, len(expected))))
        probe = np.array(sorted(set(rng.sample(range(-60, 420), 80)) | some_stored), np.int64)
        assert copy.found(probe) == {k: expected[k][0] for k in probe.tolist() if k in expected}
        stored = copy.lists(probe)
        got: dict[int, list[tuple]] = {}
        for i, g in enumerate(stored.group.tolist()):
            got.setdefault(g, []).append(tuple(c[i] for c in stored.columns))
        want = {k: list(zip(*expected[k][1], strict=True)) for k in probe.tolist() if k in expected}
        assert got == {k: rows for k, rows in want.items() if rows}


def test_the_copy_is_dropped_past_its_edge_limit(monkeypatch):
    monkeypatch.setattr(neo4j_edges, "EDGE_LIMIT", 3)
    empty = (np.zeros(0, np.int64), np.zeros(1, np.int64), [np.zeros(0, object)] + [np.zeros(0, np.int64)] * 4)
    copy = RunEdges.empty(0).after(1, np.array([1, 2, 3]), np.array(["a", "b", "c"], dtype=object), *empty)
    assert copy is not None and copy.found(np.array([3, 4])) == {3: "c"}
    assert copy.after(2, np.array([4]), np.array(["d"], dtype=object), *empty) is None
