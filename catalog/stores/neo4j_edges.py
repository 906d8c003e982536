"""A Neo4j writer's own copy of the EDGE relationships it stored for a run, so that its next window
need not look them up.

Looking a window's edges up (each one's element id, by the indexed key, and the evidence lists that its
rows compete with) was 6-7 s of the 27-29 s that a toy-ioi window of 110k edges took to write, 3.6 s
of it the driver decoding 85k lists into Python objects, and it is the last window's write that a job
waits for. A writer that stored every edge of its run itself already knows all of that: the element
ids its creates returned and the lists it wrote. That holds only while it is the only writer: a copy
names the dictionary's write counter as it was after the commit it reflects, and the store uses it
only while the counter still reads so at the start of a window (no window of any run was committed by
anyone else since) and reads one more under the lock. Otherwise the store drops it and looks the edges
up as before, for the rest of the run. A copy starts only at a run with no prompt stored (so with no
edge either: edges are written with their prompts) and is dropped when it would pass EDGE_LIMIT edges.

No torch here: numpy arrays in, numpy arrays out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from catalog.stores.neo4j_evidence import DTYPES, StoredLists

EDGE_LIMIT = 2_000_000  # ~0.5 KB an edge (element id, key, up to 8 entries of 5 lists): ~1 GB at most


@dataclass
class RunEdges:
    """Every stored edge of one run, as its writer left it.

    writes: the dictionary's write counter after the commit this copy reflects; keys [n] int64, sorted;
    eids [n] object: their element ids; ev_offsets [n + 1]: edge i's evidence entries are rows
    ev_offsets[i]:ev_offsets[i + 1] of ``ev`` (the LISTS columns, in evidence order)."""

    writes: int
    keys: np.ndarray
    eids: np.ndarray
    ev_offsets: np.ndarray
    ev: list[np.ndarray]

    @classmethod
    def empty(cls, writes: int) -> RunEdges:
        return cls(writes, np.zeros(0, np.int64), np.zeros(0, object), np.zeros(1, np.int64),
                   [np.zeros(0, dt) for dt in DTYPES])

    def _rows(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(which of ``keys`` are stored [k] bool, their rows here [h])."""
        at = np.minimum(np.searchsorted(self.keys, keys), max(len(self.keys) - 1, 0))
        hit = self.keys[at] == keys if len(self.keys) else np.zeros(len(keys), bool)
        return hit, at[hit]

    def found(self, keys: np.ndarray) -> dict[int, str]:
        """{key: element id} of those of ``keys`` [k] that are stored."""
        hit, rows = self._rows(keys)
        return dict(zip(keys[hit].tolist(), self.eids[rows].tolist(), strict=True))

    def lists(self, keys: np.ndarray) -> StoredLists:
        """The stored evidence lists of those of ``keys`` [k] (unique) that are stored, grouped by key."""
        hit, rows = self._rows(keys)
        starts, widths = self.ev_offsets[rows], self.ev_offsets[rows + 1] - self.ev_offsets[rows]
        return StoredLists(np.repeat(keys[hit], widths), [c[spans(starts, widths)] for c in self.ev])

    def after(self, writes: int, new_keys: np.ndarray, new_eids: np.ndarray, changed_keys: np.ndarray,
              changed_offsets: np.ndarray, changed: list[np.ndarray]) -> RunEdges | None:
        """The copy once a window is committed: ``new_keys`` [a] created with element ids ``new_eids``
        [a]; the edges ``changed_keys`` [c] (stored or new) hold the lists ``changed`` (LISTS columns,
        edge j's rows changed_offsets[j]:changed_offsets[j + 1]); every other edge keeps its lists.
        None when the run passes EDGE_LIMIT edges."""
        keys = np.concatenate([self.keys, new_keys])
        if len(keys) > EDGE_LIMIT:
            return None
        order = np.argsort(keys, kind="stable")
        keys, eids = keys[order], np.concatenate([self.eids, new_eids])[order]
        # each edge's entries come from the changed lists, else from its old ones (new edges: none)
        starts = np.concatenate([self.ev_offsets[:-1], np.zeros(len(new_keys), np.int64)])[order]
        widths = np.concatenate([np.diff(self.ev_offsets), np.zeros(len(new_keys), np.int64)])[order]
        rows = np.searchsorted(keys, changed_keys)
        starts[rows] = changed_offsets[:-1] + len(self.ev[0])
        widths[rows] = np.diff(changed_offsets)
        take = spans(starts, widths)
        ev = [np.concatenate([old, new.astype(dt, copy=False)])[take]
              for old, new, dt in zip(self.ev, changed, DTYPES, strict=True)]
        return RunEdges(writes, keys, eids, np.concatenate([[0], np.cumsum(widths)]).astype(np.int64), ev)


def spans(starts: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The indices starts[i]:starts[i] + widths[i] of every i, concatenated."""
    at = np.cumsum(widths) - widths
    take: np.ndarray = np.repeat(starts, widths) + np.arange(widths.sum()) - np.repeat(at, widths)
    return take
