"""ingest.reduce's sort/segment arithmetic against plain-Python references: the evidence order
(both its packed two-sort path, taken for float32 values, and its three-sort path), distinct prompt
counts (dense table and sorted pairs), and merges that do not depend on how batches were split."""

from __future__ import annotations

import random
import struct
from collections import Counter
from dataclasses import fields

import pytest
import torch

import ingest.reduce as reduce_module
from ingest.reduce import (
    Activations,
    Observations,
    _contenders,
    _distinct_prompts,
    _pairs,
    merge,
    reduce_batch,
    top_evidence,
)


def _rows(seed: int, n: int, n_groups: int, float32: bool):
    rng = random.Random(seed)
    pool = [rng.gauss(0, 1) for _ in range(5)] + [0.0, -0.0, 1e-30]  # few values: ties at every key
    vals = [rng.choice(pool) * rng.choice([1, -1]) if rng.random() < 0.6 else rng.gauss(0, 1) for _ in range(n)]
    if float32:
        vals = [float(torch.tensor(v, dtype=torch.float32)) for v in vals]
    else:  # bits past float32's 23: the packed key cannot hold them
        vals = [v + 1e-12 * rng.random() for v in vals]
    return ([rng.randrange(n_groups) for _ in range(n)], vals, [rng.randrange(6) for _ in range(n)],
            [rng.randrange(5) for _ in range(n)], [rng.randrange(5) for _ in range(n)],
            [rng.randrange(-1, 3) for _ in range(n)])


def _reference(group, vals, rank, sp, dp, head, cap):
    by = sorted(range(len(vals)), key=lambda i: (group[i], -abs(vals[i]), rank[i], sp[i], dp[i], head[i]))
    kept, seen = [], {}
    for i in by:
        seen[group[i]] = seen.get(group[i], 0) + 1
        if cap is None or seen[group[i]] <= cap:
            kept.append(i)
    return kept


@pytest.mark.parametrize("float32", [True, False])
@pytest.mark.parametrize("cap", [None, 1, 3])
@pytest.mark.parametrize("contend", [False, True])
def test_evidence_order_is_a_plain_sort_by_group_then_abs_value_then_the_tie_key(float32, cap, contend, monkeypatch):
    """``contend``: the rows that cannot be kept are left out before the sort (``_contenders``), as a
    GPT-2-shaped batch's are, here at every size."""
    if contend:
        monkeypatch.setattr(reduce_module, "CONTEND_ROWS", 0)
    for seed in range(25):
        n_groups = [1, 7, 300][seed % 3]
        cols = _rows(seed, 400, n_groups, float32)
        t = [torch.tensor(c, dtype=torch.float64 if k == 1 else torch.long) for k, c in enumerate(cols)]
        got = top_evidence(t[0], n_groups, *t[1:], cap, contend=contend).tolist()
        want = _reference(*cols, cap)
        # rows equal on every key are interchangeable: compare what the rows hold, not their indices
        assert [tuple(c[i] for c in cols) for i in got] == [tuple(c[i] for c in cols) for i in want]


def test_the_contenders_leave_out_rows_and_keep_every_row_of_each_groups_top(monkeypatch):
    """Where most rows are in groups larger than the cap, the filter leaves rows out, and every row of each
    group's top ``cap`` in the plain sort is among those it keeps."""
    monkeypatch.setattr(reduce_module, "CONTEND_ROWS", 0)
    for seed in range(20):
        cols = _rows(seed, 500, 4, float32=True)
        t = [torch.tensor(c, dtype=torch.float64 if k == 1 else torch.long) for k, c in enumerate(cols)]
        rows = _contenders(t[0], t[1], 4, 3)
        assert rows is not None and len(rows) < 500
        assert set(_reference(*cols, 3)) <= set(rows.tolist())
    few = torch.arange(40) % 20  # two rows a group, cap 3: every group keeps all, nothing to filter
    assert _contenders(few, torch.ones(40), 20, 3) is None


@pytest.mark.parametrize("m", [50, 1 << 21])  # a table of every (edge, sub); too wide for one: the sort
def test_edge_sub_pairs_are_the_sorted_distinct_pairs_and_each_rows_place(m):
    rng = random.Random(m)
    edge = [rng.randrange(m) if rng.random() < 0.2 else rng.randrange(5) for _ in range(3000)]
    sub = [rng.randrange(12) for _ in range(3000)]
    pair_edge, pair_sub, place = _pairs(torch.tensor(edge), torch.tensor(sub), m, 256)
    want = sorted(set(zip(edge, sub, strict=True)))
    assert list(zip(pair_edge.tolist(), pair_sub.tolist(), strict=True)) == want
    assert place.tolist() == [want.index(p) for p in zip(edge, sub, strict=True)]


def test_distinct_prompts_dense_and_sorted_paths_count_like_sets():
    rng = random.Random(3)
    for span, n in ((1, 50), (4, 300), (5000, 200)):  # the last is too wide for the dense table
        m = 40 if span < 5000 else 30000
        inv = [rng.randrange(m) for _ in range(n)]
        prompt = [1000 + rng.randrange(span) for _ in range(n)]
        got = _distinct_prompts(torch.tensor(inv), torch.tensor(prompt), m, 1000 + span).tolist()
        want = [len({p for g, p in zip(inv, prompt, strict=True) if g == k}) for k in range(m)]
        assert got == want
    assert _distinct_prompts(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 3, 4).tolist() == [0] * 3


def _batch(seed: int, prompts: range, n_slots: int):
    rng = random.Random(seed)
    n = 80 * len(prompts)
    col = lambda f: torch.tensor([f() for _ in range(n)], dtype=torch.long)  # noqa: E731
    obs = Observations(torch.tensor([prompts[i % len(prompts)] for i in range(n)]), col(lambda: rng.randrange(n_slots)),
                       col(lambda: rng.randrange(n_slots)), col(lambda: rng.randrange(3)), col(lambda: rng.randrange(-1, 3)),
                       col(lambda: rng.randrange(6)), col(lambda: rng.randrange(6)),
                       torch.tensor([rng.choice([0.25, -0.5, rng.gauss(0, 1)]) for _ in range(n)], dtype=torch.float32))
    # six activations a prompt at positions 0-5, values that tie across prompts and positions
    acts = Activations(torch.tensor([rng.randrange(n_slots) for _ in prompts for _ in range(6)]),
                       torch.tensor([p for p in prompts for _ in range(6)]),
                       torch.tensor([rng.choice([0.5, 2.0, rng.random() * 3]) for _ in prompts for _ in range(6)],
                                    dtype=torch.float32),
                       torch.tensor([t for _ in prompts for t in range(6)]))
    return obs, acts


def test_a_window_is_the_same_whatever_batches_it_was_cut_into():
    n_slots, rank = 9, torch.tensor([3, 0, 5, 1, 4, 2])  # prompts ranked by uid, not by row
    batches = [_batch(s, range(k, k + 2), n_slots) for s, k in ((1, 0), (2, 2), (3, 4))]
    parts = [reduce_batch(o, a, rank, n_slots, 4) for o, a in batches]
    whole_obs = Observations(*[torch.cat([getattr(o, f.name) for o, _ in batches]) for f in fields(Observations)
                               if f.name not in ("role_row", "role_code")])
    whole_acts = Activations(*[torch.cat([getattr(a, f.name) for _, a in batches]) for f in fields(Activations)])
    one = reduce_batch(whole_obs, whole_acts, rank, n_slots, 4)
    for merged in (merge(parts, rank, 4), merge(parts[::-1], rank, 4), merge([merge(parts[1:], rank, 4), parts[0]], rank, 4)):
        for f in fields(one):
            a, b = getattr(merged, f.name), getattr(one, f.name)
            if a.dtype == torch.float64 and f.name in ("sum", "sumsq", "sum_abs", "head_sum", "node_sum_act", "role_abs"):
                assert torch.allclose(a, b, rtol=1e-12, atol=0), f.name  # float64 sums in another order
            else:
                assert torch.equal(a, b), f.name


def test_a_batch_reduces_alike_with_and_without_the_evidence_filter(monkeypatch):
    """reduce_batch leaves out the observations that cannot be kept before the evidence sort (on GPT-2-shaped
    batches): forced at this size, every column equals the reduction that sorts every observation."""
    n_slots, rank = 3, torch.tensor([3, 0, 5, 1, 4, 2])  # 240 observations of 27 edge keys: ~9 an edge
    obs, acts = _batch(5, range(0, 3), n_slots)
    every = reduce_batch(obs, acts, rank, n_slots, 2)
    monkeypatch.setattr(reduce_module, "CONTEND_ROWS", 0)
    left: list[int] = []

    def counted(group, value, n_groups, cap):
        rows = _contenders(group, value, n_groups, cap)
        left.append(len(group) - (len(group) if rows is None else len(rows)))
        return rows

    monkeypatch.setattr(reduce_module, "_contenders", counted)
    filtered = reduce_batch(obs, acts, rank, n_slots, 2)
    assert left and left[0] > 0  # observations were left out of the sort
    for f in fields(every):
        assert torch.equal(getattr(every, f.name), getattr(filtered, f.name)), f.name
    # the filter's class maxima through torch's scatter, as CUDA tensors take it
    from ingest import segments

    monkeypatch.setattr(reduce_module, "segment_extreme", segments._torch_extreme)
    as_on_cuda = reduce_batch(obs, acts, rank, n_slots, 2)
    assert left[-1] > 0
    for f in fields(every):
        assert torch.equal(getattr(every, f.name), getattr(as_on_cuda, f.name)), f.name


def test_the_torch_paths_cuda_takes_reduce_and_merge_alike(monkeypatch):
    """CI has no GPU: run reduce_batch and merge once through numpy (the CPU path) and once through
    torch's own sorts and scatters (what CUDA tensors take), and compare every column."""
    from ingest import segments

    n_slots, rank = 9, torch.tensor([3, 0, 5, 1, 4, 2])
    batches = [_batch(s, range(k, k + 2), n_slots) for s, k in ((1, 0), (2, 2), (3, 4))]

    def window():
        return merge([reduce_batch(o, a, rank, n_slots, 4) for o, a in batches], rank, 4)

    on_cpu = window()
    monkeypatch.setattr(reduce_module, "unique_inverse", segments._torch_unique_inverse)
    monkeypatch.setattr(reduce_module, "order_by", lambda keys: segments._torch_order(keys))
    monkeypatch.setattr(reduce_module, "segment_extreme", segments._torch_extreme)
    as_on_cuda = window()
    for f in fields(on_cpu):
        assert torch.equal(getattr(on_cpu, f.name), getattr(as_on_cuda, f.name)), f.name


def _float32_bits(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", x))[0]


@pytest.mark.parametrize("cap", [1, 3, 100])
def test_top_activations_their_strongest_source_and_histograms_match_plain_python(monkeypatch, cap):
    """Each node's top activations (act descending, then prompt rank, then position), the strongest attn_in /
    resid_in observation into each (|value| descending, then source slot, source position, head), and the
    (node, bin) counts of every activation, spelled out in plain Python; for one batch and for merged ones."""

    monkeypatch.setattr(reduce_module, "TOP_ACTIVATIONS", cap)
    n_slots, rank = 9, torch.tensor([3, 0, 5, 1, 4, 2])
    batches = [_batch(s, range(k, k + 2), n_slots) for s, k in ((1, 0), (2, 2), (3, 4))]
    acts = [(int(n), int(p), int(t), float(a)) for _, x in batches
            for n, p, t, a in zip(x.node, x.prompt, x.pos, x.act, strict=True)]
    obs = [(int(p), int(s), int(d), int(k), int(h), int(sp), int(dp), float(v)) for o, _ in batches
           for p, s, d, k, h, sp, dp, v in zip(o.prompt, o.src, o.dst, o.kind, o.head, o.src_pos, o.dst_pos, o.value,
                                               strict=True)]
    want_tops = []
    for node in sorted({a[0] for a in acts}):
        mine = sorted((a for a in acts if a[0] == node), key=lambda a: (-a[3], int(rank[a[1]]), a[2]))[:cap]
        for n, p, t, a in mine:
            feeding = [o for o in obs if o[0] == p and o[2] == n and o[6] == t and o[3] in (0, 1)]
            best = min(feeding, key=lambda o: (-abs(o[7]), o[1], o[5], o[4]), default=None)
            src = (best[1], best[5], best[4], best[7]) if best else (-1, 0, -1, 0.0)
            want_tops.append((n, p, t, a, *src))
    want_hist = sorted(Counter((n, _float32_bits(a) >> 21) for n, _, _, a in acts).items())
    one_batch_each = [reduce_batch(o, a, rank, n_slots, 4) for o, a in batches]
    for part in (merge(one_batch_each, rank, 4), merge(one_batch_each[::-1], rank, 4)):
        got = list(zip(*(getattr(part, c).tolist() for c in ("top_node", "top_prompt", "top_pos", "top_act", "top_src",
                                                              "top_src_pos", "top_head", "top_value")), strict=True))
        assert got == want_tops
        got_hist = [((n, b), c) for n, b, c in zip(part.hist_node.tolist(), part.hist_bin.tolist(),
                                                    part.hist_n.tolist(), strict=True)]
        assert got_hist == want_hist
