"""top_per_group (catalog.evidence_rank) sorts the group, |value| and the tie key by catalog.lexsort,
whose packed prefix holds the group and the leading bits of |value| and whose tied rows are ordered
again by the full key; checked against a plain lexsort and a per-group count."""

from __future__ import annotations

import numpy as np
import pytest

from catalog.evidence_rank import tie_key, top_per_group


def _reference(group, absval, tie, n):
    order = np.lexsort((tie, -absval, group))
    if n is None:
        return order
    seen: dict[int, int] = {}
    kept = []
    for i in order.tolist():
        seen[group[i]] = seen.get(group[i], 0) + 1
        if seen[group[i]] <= n:
            kept.append(i)
    return np.array(kept, np.int64)


def _keys(order, group, absval, tie):
    """Rows that tie on every key are interchangeable: compare the keys, not the indices."""
    return [(group[i], absval[i], tie[i]) for i in order.tolist()]


@pytest.mark.parametrize("n", [None, 1, 3, 8])
@pytest.mark.parametrize("ties", [False, True])
def test_the_top_rows_of_each_group_are_those_of_a_full_lexsort(n, ties):
    rng = np.random.default_rng(7)
    for _ in range(60):
        size, groups = int(rng.integers(0, 300)), int(rng.integers(1, 40))
        group = rng.integers(0, groups, size)
        if ties:  # few distinct values, zeros and subnormals: ties at every key
            absval = np.abs(rng.choice(np.r_[rng.standard_normal(4), 0.0, 5e-324, 1e-300], size))
        else:
            absval = np.abs(rng.standard_normal(size))
        tie = rng.integers(0, 6, size)
        got = top_per_group(group, absval, tie, n)
        assert _keys(got, group, absval, tie) == _keys(_reference(group, absval, tie, n), group, absval, tie)


def test_values_that_differ_only_past_the_packed_bits_are_still_ordered():
    """With groups numbered up to 2^20 and six rows, 39 bits of |value| (not float32 values: all 63 of
    theirs count) are packed: 1 + k ulp for small k agree in them, and only the pass over tied rows
    orders them."""
    absval = 1.0 + np.arange(6) * np.finfo(float).eps
    group, tie = np.full(6, 2**20, np.int64), np.zeros(6, np.int64)
    assert top_per_group(group, absval, tie, 4).tolist() == [5, 4, 3, 2]


def test_many_groups_fall_back_to_a_full_sort():
    group = np.array([2**50, 3, 2**50, 3], np.int64)
    absval = np.array([1.0, 2.0, 3.0, 4.0])
    assert top_per_group(group, absval, np.zeros(4, np.int64), 1).tolist() == [3, 2]


def test_a_value_that_is_not_finite_is_refused():
    with pytest.raises(ValueError, match="finite"):
        top_per_group(np.zeros(1, np.int64), np.array([np.nan]), np.zeros(1, np.int64), 1)


def test_the_tie_key_orders_like_its_fields_and_refuses_what_does_not_fit():
    rng = np.random.default_rng(3)
    cols = [rng.integers(0, 5, 500), rng.integers(0, 1024, 500), rng.integers(0, 1024, 500), rng.integers(-1, 12, 500)]
    key = tie_key(*cols)
    assert np.argsort(key, kind="stable").tolist() == np.lexsort(cols[::-1]).tolist()
    with pytest.raises(ValueError, match="src_pos"):
        tie_key(np.zeros(1, np.int64), np.array([1 << 14]), np.zeros(1, np.int64), np.zeros(1, np.int64))


def test_blobs_merged_window_by_window_hold_each_edges_top_n_of_every_row():
    """catalog.stores.sqlite_evidence.merge, fed window after window with its own blobs, against the
    top N of all rows ever given, by a plain sort of Python tuples."""
    from catalog.stores.sqlite_evidence import EV_ROW, decode, merge, rows_of

    rng, cap = np.random.default_rng(11), 3
    blobs: dict[int, bytes] = {}
    seen: dict[int, list[tuple]] = {}
    rank = rng.permutation(40)  # prompt id -> rank of its uid
    for window in range(8):
        n = int(rng.integers(1, 60))
        keys = rng.integers(0, 9, n)
        value = rng.choice([-2.0, -1.0, 0.5, 1.0, 2.0, 0.25], n)  # ties galore, of both signs
        rows = rows_of(rng.integers(window * 5, window * 5 + 5, n), rng.integers(0, 4, n), rng.integers(0, 4, n),
                       rng.integers(-1, 2, n), value)
        stored = sorted(k for k in blobs if k in set(keys.tolist()))
        out = merge(keys, rows, np.array(stored, np.int64), [blobs[k] for k in stored], rank, cap)
        blobs.update(zip(out.keys.tolist(), out.blobs(), strict=True))
        for k, r in zip(keys.tolist(), rows.tolist(), strict=True):
            seen.setdefault(k, []).append(r)
        assert set(out.window_rows.tolist()) <= set(range(n))
    for k, rows_seen in seen.items():
        best = sorted(rows_seen, key=lambda r: (-abs(r[4]), rank[r[0]], r[1], r[2], r[3]))[:cap]
        assert decode([blobs[k]])[1].tolist() == best
        assert decode([blobs[k]])[1].dtype == EV_ROW
