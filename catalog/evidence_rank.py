"""The top N evidence rows of each group (edge), in the evidence order: |value| descending, then a
tie key (``tie_key``: prompt rank by uid, src_pos, dst_pos, head). Sorted by catalog.lexsort (a
four-key ``np.lexsort`` of a GPT-2-shaped window's ~12M candidate rows took 13 s on the 2-core VM).
No torch here.
"""

from __future__ import annotations

import numpy as np

from catalog.lexsort import bits_needed, lex_order

_BITS = 63  # non-negative float64 bit patterns order like the floats they hold, in 63 bits
_TIE = ((27, "prompt rank"), (14, "src_pos"), (14, "dst_pos"), (8, "head + 1"))  # bits of tie_key's fields


def sorted_unique(x: np.ndarray) -> np.ndarray:
    """np.unique by a sort: numpy 2's hashing np.unique took ~0.4 s for 3M int64 keys here."""
    s = np.sort(x, kind="stable")
    return s[np.r_[True, s[1:] != s[:-1]]] if len(s) else s


def tie_key(rank: np.ndarray, src_pos: np.ndarray, dst_pos: np.ndarray, head: np.ndarray) -> np.ndarray:
    """[e] one int64 ordering like (rank, src_pos, dst_pos, head), head -1 (none) first."""
    out = np.zeros(len(rank), np.int64)
    for (bits, name), col in zip(_TIE, (rank, src_pos, dst_pos, np.asarray(head) + 1), strict=True):
        if len(col) and (col.min() < 0 or col.max() >= 1 << bits):
            raise ValueError(f"evidence {name} outside [0, 2^{bits}) does not fit the evidence order's key")
        out = (out << bits) | col.astype(np.int64)
    return out


def descending(absval: np.ndarray) -> np.ndarray:
    """[e] int64 >= 0 that orders ascending as |value| does descending (absval: finite, >= 0)."""
    if not np.isfinite(absval).all() or (absval < 0).any():
        raise ValueError("evidence values must be finite")
    return np.int64(2**_BITS - 1) - np.ascontiguousarray(absval, np.float64).view(np.int64)


def top_per_group(group: np.ndarray, absval: np.ndarray, tie: np.ndarray, n: int | None) -> np.ndarray:
    """Indices of the best ``n`` rows (all if None) of each group, ordered by group ascending, then
    the evidence order. group [e] int64 >= 0, absval [e] float64 >= 0, tie [e] int64 (``tie_key``).
    |value| is ordered by its bit pattern: 31 bits where every value is a float32 (RDFA's are), so
    more of the prefix that catalog.lexsort sorts in one pass is left to the tie key."""
    if not len(group):
        return np.zeros(0, np.int64)
    desc = descending(absval)
    narrow = absval.astype(np.float32)
    if (narrow == absval).all():
        desc, value_bits = np.int64(2**31 - 1) - narrow.view(np.int32).astype(np.int64), 31
    else:
        value_bits = _BITS
    order = lex_order([(group, bits_needed(group)), (desc, value_bits), (tie, bits_needed(tie))])
    if n is None:
        return order
    g = group[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    within = np.arange(len(g)) - np.repeat(starts, np.diff(np.r_[starts, len(g)]))
    return order[within < n]
