"""An edge's evidence on Neo4j lives on its EDGE relationship, as parallel lists kept in the evidence
order (|value| descending, then prompt uid, src_pos, dst_pos, head): ``ev_prompt``, ``ev_src_pos``,
``ev_dst_pos``, ``ev_head`` (-1: none) and ``ev_value``. A window merges its rows with the stored lists
of the edges it touches, here, in numpy, and writes each changed list once.

Why lists and not one node per observation: (:Evidence) nodes were most of a window's write on
Neo4j (toy-ioi, three 256-prompt windows: reading the touched edges' nodes back 16.5 s, creating
1.1M nodes 8.8 s, and most of a 32 s commit of their records and two index entries each, out of 78 s).

No torch here: numpy arrays in, numpy arrays out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

LISTS = ("ev_prompt", "ev_src_pos", "ev_dst_pos", "ev_head", "ev_value")
DTYPES = (object, np.int64, np.int64, np.int64, np.float64)  # of the LISTS columns, in that order


@dataclass
class StoredLists:
    """Stored evidence lists as columns: row i is an entry of edge ``group[i]`` (int64); ``columns``
    [s] each, in LISTS order; each edge's entries are contiguous and in evidence order."""

    group: np.ndarray
    columns: list[np.ndarray]

    @classmethod
    def from_dict(cls, stored: dict[int, list[list[Any]]]) -> StoredLists:
        """From {edge: its five lists} as a read returns them."""
        group = np.array([g for g, lists in stored.items() for _ in lists[4]], dtype=np.int64)
        return cls(group, [np.array([x for lists in stored.values() for x in lists[c]], dtype=dt)
                           for c, dt in enumerate(DTYPES)])

    def regrouped(self, old: np.ndarray, new: np.ndarray) -> StoredLists:
        """The same entries with each edge renamed: group old[i] becomes new[i] ([k] each; a name may
        repeat with the same new name; every stored group must be among ``old``)."""
        names, first = np.unique(old, return_index=True)
        at = np.minimum(np.searchsorted(names, self.group), max(len(names) - 1, 0))
        if len(self.group) and not np.array_equal(names[at], self.group):
            raise ValueError(f"stored lists of {int((names[at] != self.group).sum())} entries name no given edge")
        return StoredLists(new[first][at] if len(self.group) else self.group, self.columns)


@dataclass
class MergedLists:
    """The evidence lists of the groups (edges) a window changes, grouped and in evidence order.

    group [g]: the group's id (the caller's edge identity); offsets [g + 1]: group i's entries are
    flat[offsets[i]:offsets[i + 1]] in each of ``columns`` (LISTS order: prompt uid (object), src_pos,
    dst_pos, head, value); grown [g]: entries minus the stored entries they replace; window_rows:
    the window's rows that are in a list now (indices into the candidate rows given)."""

    group: np.ndarray
    offsets: np.ndarray
    columns: list[np.ndarray]
    grown: np.ndarray
    window_rows: np.ndarray


def merge_lists(group: np.ndarray, prompt: np.ndarray, src_pos: np.ndarray, dst_pos: np.ndarray,
                head: np.ndarray, value: np.ndarray, stored: StoredLists, cap: int | None) -> MergedLists:
    """Merge a window's candidate rows ([e] columns; ``group`` [e] int64 names each row's edge,
    ``prompt`` [e] object uids) with the ``stored`` lists of their groups into each touched group's
    top ``cap`` (all if None). Only groups that gain a window row are returned: a group whose window
    rows all rank below its stored ones keeps its lists as they are."""
    old_group = stored.group
    old = [c.astype(dt, copy=False) for c, dt in zip(stored.columns, DTYPES, strict=True)]
    n_new = len(group)
    g = np.concatenate([group, old_group])
    cols = [np.concatenate([a, b]) for a, b in zip((prompt.astype(object), src_pos, dst_pos, head, value), old,
                                                   strict=True)]
    if not len(g):
        return MergedLists(g, np.zeros(1, np.int64), cols, g, np.zeros(0, np.int64))
    _, prompt_rank = np.unique(cols[0].astype(str), return_inverse=True)
    order = np.lexsort((cols[3], cols[2], cols[1], prompt_rank, -np.abs(cols[4]), g))
    sg = g[order]
    starts = np.flatnonzero(np.r_[True, sg[1:] != sg[:-1]])
    counts = np.diff(np.r_[starts, len(sg)])
    within = np.arange(len(sg)) - np.repeat(starts, counts)
    kept = order[within < cap] if cap is not None else order
    # a group is written only if one of the window's rows made it into its list
    kept_group = g[kept]
    changed_groups = np.unique(kept_group[kept < n_new])
    kept = kept[np.isin(kept_group, changed_groups)]  # still in (group, evidence) order
    kept_group = g[kept]
    sizes = np.bincount(np.searchsorted(changed_groups, kept_group), minlength=len(changed_groups))
    old_sizes = np.bincount(np.searchsorted(changed_groups, old_group[np.isin(old_group, changed_groups)]),
                            minlength=len(changed_groups)) if len(old_group) else np.zeros(len(changed_groups), np.int64)
    return MergedLists(changed_groups, np.r_[0, np.cumsum(sizes)].astype(np.int64), [c[kept] for c in cols],
                       sizes - old_sizes, np.sort(kept[kept < n_new]))

