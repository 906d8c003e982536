"""An edge's evidence in the SQLite catalog: one BLOB on its ``edges`` row (per run), the packed
rows of its top N in the evidence order (best first). A window merges its rows with the stored blobs
of the edges it reaches, here, in numpy, and each changed blob is written once with the edge's upsert.

Why blobs and not an ``evidence`` table: its rows were most of a window's write (a replayed
GPT-2-shaped window: inserting ~3M rows and deleting the displaced ones through the sqlite3 binding,
then committing two indexes of them, ~20 s of a 29 s write, against ~1M edge upserts).

Rows are ``EV_ROW``: the prompt's id in ``prompts``, src_pos, dst_pos, head (-1: none), value.
No torch here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from catalog.evidence_rank import sorted_unique, tie_key, top_per_group

EV_ROW = np.dtype([("prompt", "<i8"), ("src_pos", "<i4"), ("dst_pos", "<i4"), ("head", "<i4"), ("value", "<f8")])


def rows_of(prompt: np.ndarray, src_pos: np.ndarray, dst_pos: np.ndarray, head: np.ndarray,
            value: np.ndarray) -> np.ndarray:
    """[e] EV_ROW records of parallel columns."""
    rows = np.empty(len(prompt), EV_ROW)
    rows["prompt"], rows["src_pos"], rows["dst_pos"], rows["head"], rows["value"] = prompt, src_pos, dst_pos, head, value
    return rows


def decode(blobs: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Rows per blob [b] and the rows of all of them in order [sum] (EV_ROW)."""
    sizes = np.fromiter((len(b) for b in blobs), np.int64, len(blobs))
    return sizes // EV_ROW.itemsize, np.frombuffer(b"".join(blobs), EV_ROW)


@dataclass
class MergedBlobs:
    """keys [g]: the edges whose evidence changed; their new blobs, all in one buffer: edge i's is
    buffer[start[i]:start[i] + size[i]] (bytes); window_rows [k]: the window's rows (indices into the
    rows merged) that are in a blob now, ascending. One buffer, because the store binds it once and
    SQLite cuts it (substr): a Python bytes object per edge cost more than the rest of its write."""

    keys: np.ndarray
    buffer: bytes
    start: np.ndarray
    size: np.ndarray
    window_rows: np.ndarray

    @staticmethod
    def of(keys: np.ndarray, rows: np.ndarray, counts: np.ndarray, window_rows: np.ndarray) -> MergedBlobs:
        """Edge i's blob: the next counts[i] of ``rows`` (EV_ROW)."""
        size = counts.astype(np.int64) * EV_ROW.itemsize
        return MergedBlobs(keys, rows.tobytes(), np.cumsum(size) - size, size, window_rows)

    def blobs(self) -> list[bytes]:
        return [self.buffer[a:a + n] for a, n in zip(self.start.tolist(), self.size.tolist(), strict=True)]


def merge(keys: np.ndarray, rows: np.ndarray, stored_keys: np.ndarray, stored_blobs: Sequence[bytes],
          prompt_rank: np.ndarray, cap: int | None) -> MergedBlobs:
    """A window's rows (keys [e] int64 edge keys, rows [e] EV_ROW) merged with the stored blobs of the
    edges among them (``stored_keys`` [s], each key once) into each edge's top ``cap`` (all if None).
    ``prompt_rank`` [max prompt id + 1]: each prompt's rank by uid (the tie-break after |value|).

    A stored blob is its edge's exact top ``cap``, best first: a window row that does not beat the
    last row of a full blob can never enter it, so only the rows that do, and the stored rows of the
    edges they reach, are sorted. Only edges that take a window row are returned: an edge whose window
    rows all rank below its stored ones keeps its blob."""
    counts, old = decode(stored_blobs)
    w_abs, o_abs = np.abs(rows["value"]), np.abs(old["value"])
    w_tie, o_tie = (tie_key(prompt_rank[r["prompt"]], r["src_pos"], r["dst_pos"], r["head"]) for r in (rows, old))
    enter = np.ones(len(keys), bool)
    if cap is not None and len(stored_keys):
        by_key = np.argsort(stored_keys)
        at = by_key[np.minimum(np.searchsorted(stored_keys[by_key], keys), len(stored_keys) - 1)]
        last = np.cumsum(counts)[at] - 1
        full = (stored_keys[at] == keys) & (counts[at] >= cap)
        enter = ~full | (w_abs > o_abs[last]) | ((w_abs == o_abs[last]) & (w_tie < o_tie[last]))
    entering = np.flatnonzero(enter)
    touched = sorted_unique(keys[entering])
    at_touched = np.minimum(np.searchsorted(touched, stored_keys), max(0, len(touched) - 1))
    reached = np.repeat(touched[at_touched] == stored_keys if len(touched) else np.zeros(len(stored_keys), bool),
                        counts)  # [stored rows] of the edges reached
    group = np.concatenate([np.searchsorted(touched, keys[entering]),
                            np.searchsorted(touched, np.repeat(stored_keys, counts)[reached])])
    order = top_per_group(group, np.concatenate([w_abs[entering], o_abs[reached]]),
                          np.concatenate([w_tie[entering], o_tie[reached]]), cap)
    from_window = order < len(entering)
    changed = np.zeros(len(touched), bool)
    changed[group[order[from_window]]] = True
    kept = order[changed[group[order]]]  # still grouped, in the evidence order
    sizes = np.bincount(group[kept], minlength=len(touched))[changed]
    every = np.concatenate([rows[entering], old[reached]])
    return MergedBlobs.of(touched[changed], every[kept], sizes, np.sort(entering[order[from_window]]))
