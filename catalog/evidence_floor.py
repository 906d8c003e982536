"""What a writer knows of an edge's stored top-N evidence, so that evidence rows that cannot be kept
never cost a write (Neo4j's writer; SQLite's reads its edges' stored blobs under its lock instead).

Evidence is ranked by the total order of ``Evidence.rank_key`` (|value| descending, then prompt,
positions, head), and an edge's stored top N (per run) only ever improves: its N-th row never ranks
after the N-th best of any N rows ever stored for the edge. So a writer keeps, per edge, the N best
rows it stored itself over all its windows:

* **bound** (always): a new row that ranks after their N-th can never be kept. This holds whatever
  other writers do. Exact ties matter: a toy model on templated prompts, or a replayed graph,
  repeats values to the bit, and only the prompt breaks the tie.

It is a bound only, never the stored rows themselves: until SQLite format 4 a lone SQLite writer
also merged windows here exactly; both stores now merge against what is stored.

No torch here: numpy arrays, rows given as parallel columns ([e] each: edge key, |value|, prompt id,
``pack``ed positions).
"""

from __future__ import annotations

import numpy as np

Rows = tuple[np.ndarray, np.ndarray, np.ndarray]  # three parallel columns


def pack(src_pos: np.ndarray, dst_pos: np.ndarray, head: np.ndarray) -> np.ndarray:
    """[e] one int64 per row that orders like (src_pos, dst_pos, head), head -1 (none) first."""
    if len(src_pos) and (src_pos.max() >= 1 << 23 or dst_pos.max() >= 1 << 24 or head.max() >= (1 << 16) - 1):
        raise ValueError("evidence positions past 2^23 or heads past 2^16 do not fit the evidence floor")
    return (src_pos.astype(np.int64) << 40) | (dst_pos.astype(np.int64) << 16) | (head.astype(np.int64) + 1)


class EvidenceFloor:
    """Per edge key, the N best evidence rows this writer stored (one run). Memory: 8 + 24N bytes an
    edge, at most ``max_bytes``; edges past that get no floor (their rows are all sent to the
    store, which merges them). Prompts are held as ids into the floor's
    own table of uids (``prompt_ids``), ranked by uid."""

    def __init__(self, n: int | None, max_bytes: int = 1 << 30):
        self.n = n
        self.max_keys = max_bytes // (8 + 24 * (n or 1))
        self.keys = np.zeros(0, np.int64)  # [K] sorted, unique
        self.value = np.zeros((0, n or 0), np.float64)  # [K, N] |value|, best first; -inf where fewer than N
        self.prompt = np.zeros((0, n or 0), np.int64)  # [K, N] prompt id
        self.pos = np.zeros((0, n or 0), np.int64)  # [K, N] packed positions
        self._uids: list[str] = []  # prompt id -> uid
        self._ids: dict[str, int] = {}
        self._rank = np.zeros(0, np.int64)  # prompt id -> rank of its uid among all the floor knows

    def prompt_ids(self, uids: list[str]) -> np.ndarray:
        """[p] the floor's ids of these prompt uids (new ones are added)."""
        new = [u for u in dict.fromkeys(uids) if u not in self._ids]
        if new:
            self._ids.update((u, len(self._uids) + i) for i, u in enumerate(new))
            self._uids.extend(new)
            order = sorted(range(len(self._uids)), key=self._uids.__getitem__)
            self._rank = np.empty(len(self._uids), np.int64)
            self._rank[np.array(order, np.int64)] = np.arange(len(self._uids))
        return np.array([self._ids[u] for u in uids], np.int64)

    def _find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row of each key in the floor, and whether it has one."""
        at = np.searchsorted(self.keys, keys)
        if not len(self.keys):
            return at, np.zeros(len(keys), bool)
        return at, self.keys[np.minimum(at, len(self.keys) - 1)] == keys

    def keep(self, keys: np.ndarray, absval: np.ndarray, prompt: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """[e] bool: rows that may still enter their edge's top N (``prompt``: ids from ``prompt_ids``)."""
        if self.n is None or not len(self.keys):
            return np.ones(len(keys), bool)
        at, known = self._find(keys)
        at = np.minimum(at, len(self.keys) - 1)
        floor = self.value[at, -1]
        keep: np.ndarray = ~known | (absval > floor)
        tie = np.flatnonzero(known & (absval == floor))  # ranked by prompt, then positions and head
        if len(tie):
            fp, cp = self._rank[self.prompt[at[tie], -1]], self._rank[prompt[tie]]
            keep[tie] = (cp < fp) | ((cp == fp) & (pos[tie] <= self.pos[at[tie], -1]))
        return keep

    def _top(self, keys: np.ndarray, absval: np.ndarray, prompt: np.ndarray,
             pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, Rows]:
        """The top N of the floor's rows and the given ones, per key among ``keys``. Returns the touched
        keys [t], where they go (rows of the floor, and which of them the floor has) and the merged
        [t, N] value/prompt/pos."""
        n = self.n or 0
        touched = np.unique(keys)
        at, had = self._find(touched)
        old = at[had]
        cand_key = np.concatenate([np.repeat(touched[had], n), keys])
        cand_val = np.concatenate([self.value[old].ravel(), absval])
        cand_prompt = np.concatenate([self.prompt[old].ravel(), prompt])
        cand_pos = np.concatenate([self.pos[old].ravel(), pos])
        order = np.lexsort((cand_pos, self._rank[cand_prompt], -cand_val, cand_key))  # key, then evidence order
        k = cand_key[order]
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])  # one group per touched key, in its order
        counts = np.diff(np.r_[starts, len(k)])
        within = np.arange(len(k)) - np.repeat(starts, counts)
        best = within < n
        row, col, src = np.repeat(np.arange(len(touched)), counts)[best], within[best], order[best]
        value = np.full((len(touched), n), -np.inf)
        prompts, packed = np.zeros((len(touched), n), np.int64), np.zeros((len(touched), n), np.int64)
        value[row, col], prompts[row, col], packed[row, col] = cand_val[src], cand_prompt[src], cand_pos[src]
        return touched, at, had, (value, prompts, packed)

    def update(self, keys: np.ndarray, absval: np.ndarray, prompt: np.ndarray, pos: np.ndarray) -> None:
        """Take in rows just stored (call once their write is committed)."""
        if self.n is not None and len(keys):
            touched, at, had, merged = self._top(keys, absval, prompt, pos)
            self._apply(touched, at, had, merged)

    def _apply(self, touched: np.ndarray, at: np.ndarray, had: np.ndarray, merged: Rows) -> None:
        value, prompts, packed = merged
        old = at[had]
        self.value[old], self.prompt[old], self.pos[old] = value[had], prompts[had], packed[had]
        new = np.flatnonzero(~had)
        if len(self.keys) + len(new) > self.max_keys:
            new = new[: max(0, self.max_keys - len(self.keys))]
        self.keys = np.insert(self.keys, at[new], touched[new])
        self.value = np.insert(self.value, at[new], value[new], axis=0)
        self.prompt = np.insert(self.prompt, at[new], prompts[new], axis=0)
        self.pos = np.insert(self.pos, at[new], packed[new], axis=0)
