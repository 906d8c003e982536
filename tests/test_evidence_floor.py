"""The evidence floor (catalog.aggregate.EvidenceFloor) lets a writer drop evidence rows before they
cost an insert: checked against a brute-force top-N of every row by Evidence.rank_key, on values
with many exact ties (as a toy model on templated prompts gives), for one writer and for two writers
sharing a store."""

from __future__ import annotations

import random

import numpy as np

from catalog.evidence_floor import EvidenceFloor, pack
from catalog.schema import Evidence

N = 3


def _rank(row: tuple) -> tuple:
    key, value, prompt, sp, dp, head = row
    return Evidence(src="s", dst="d", kind="attn_in", prompt=prompt, src_pos=sp, dst_pos=dp,
                    head=None if head < 0 else head, value=value).rank_key()


def _window(rng: random.Random, first_prompt: int, n_rows: int, seen: set) -> list[tuple]:
    """Rows (edge key, value, prompt uid, src_pos, dst_pos, head); values from a small set, so ties abound.
    Prompts come from one small pool here (a job never repeats a prompt), so ties on the prompt occur
    too; a row is one observation, so no two rows share edge, prompt, positions and head (``seen``)."""
    rows = []
    while len(rows) < n_rows:
        row = (rng.randrange(20), rng.choice([0.5, -0.5, 0.25, 1.0, -2.0, 0.125]),
               f"run/p{rng.randrange(first_prompt % 3, 10):03d}", rng.randrange(3), rng.randrange(3), rng.randrange(-1, 2))
        if (row[0], *row[2:]) not in seen:
            seen.add((row[0], *row[2:]))
            rows.append(row)
    return rows


def _columns(floor: EvidenceFloor, rows: list[tuple]) -> tuple[np.ndarray, ...]:
    keys = np.array([r[0] for r in rows], np.int64)
    absval = np.abs(np.array([r[1] for r in rows], np.float64))
    prompt = floor.prompt_ids([r[2] for r in rows])
    pos = pack(*(np.array([r[i] for r in rows], np.int64) for i in (3, 4, 5)))
    return keys, absval, prompt, pos


def _top(rows: list[tuple]) -> dict[int, list[tuple]]:
    """The top N rows of each edge, brute force."""
    out: dict[int, list[tuple]] = {}
    for row in sorted(rows, key=_rank):
        out.setdefault(row[0], [])
        if len(out[row[0]]) < N:
            out[row[0]].append(row)
    return out


def test_one_writer_drops_exactly_the_rows_that_rank_after_the_stored_nth():
    rng, floor, stored, seen = random.Random(0), EvidenceFloor(N), [], set()
    for w in range(12):
        rows = _window(rng, 4 * w, 40, seen)
        keep = floor.keep(*_columns(floor, rows))
        top = _top(stored)
        for row, kept in zip(rows, keep):
            full = top.get(row[0], [])
            could_enter = len(full) < N or _rank(row) <= _rank(full[-1])
            assert kept == could_enter, (w, row, full)
        kept = [r for r, k in zip(rows, keep) if k]
        after = _top(stored + kept)  # the store's merge
        floor.update(*_columns(floor, [r for r in kept if r in after[r[0]]]))
        stored = [r for rs in after.values() for r in rs]
    assert floor.value[:, -1].min() > -np.inf  # every edge got a full floor: the bound was tested, not only "new"


def test_two_writers_never_drop_a_row_that_belongs_in_the_top_n():
    rng, floors, stored, dropped, seen = random.Random(1), [EvidenceFloor(N), EvidenceFloor(N)], [], 0, set()
    for w in range(20):
        writer = floors[w % 2]
        rows = _window(rng, 4 * w, 30, seen)
        keep = writer.keep(*_columns(writer, rows))
        written = [r for r, k in zip(rows, keep) if k]
        best = _top(stored + rows)  # what the catalog must hold had every row been written
        assert all(k or row not in best[row[0]] for row, k in zip(rows, keep))
        dropped += int((~keep).sum())
        writer.update(*_columns(writer, written))
        stored = [r for rs in _top(stored + written).values() for r in rs]
    assert dropped > 100  # the floors did drop rows (the property above is not vacuous)


def test_a_floor_past_its_memory_bound_keeps_every_row_of_edges_it_cannot_hold():
    floor = EvidenceFloor(N, max_bytes=2 * (8 + 24 * N))  # room for two edges
    rows = [(k, 1.0, "run/p000", 0, 0, -1) for k in range(5) for _ in range(N)]
    floor.update(*_columns(floor, rows))
    assert floor.keys.tolist() == [0, 1]
    keep = floor.keep(*_columns(floor, [(k, 0.5, "run/p001", 0, 0, -1) for k in range(5)]))
    assert keep.tolist() == [False, False, True, True, True]
