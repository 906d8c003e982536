"""Issue 35: spool, compact, publish. A run's spooled windows, compacted in several key-range partitions by
parallel processes and published each edge once, hold exactly what an independent plain-Python aggregation
of every spooled row gives (counts exact, sums to float64 rounding, the same evidence, rank_key's order), on
both stores; the partition count never changes a bit of the compaction; publishing twice stores nothing
twice, and a run is published once."""

from __future__ import annotations

import math
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from catalog.compact import compact, layout, load_part
from catalog.fires_on import top_of
from catalog.publish import publish_folder, publish_run
from catalog.schema import EDGE_KINDS, ROLES, TOP_ACTIVATIONS, Evidence
from catalog.spool import Spool, load_window, window_meta
from catalog.stores import neo4j_publish, open_store
from catalog.stores.base import StoreError
from ingest.jobs import JobOptions, run_job
from ingest.model_with_saes import ModelWithSaes

CAP = 3  # evidence per edge: small, so that windows' top lists compete


@pytest.fixture(scope="module")
def spooled(tmp_path_factory) -> Path:
    """ioi:20 in windows of one batch of 4 (five windows), spooled as a job array would."""
    folder = tmp_path_factory.mktemp("spool")
    toy = ModelWithSaes.open("toy-ioi", ["toy-ioi"], "cpu")
    run_job(toy, "ioi:20:9", Spool(folder, CAP), JobOptions(run="r", batch_size=4, window=4, progress=False,
                                                              mine=False), log=lambda _: None)
    assert len(Spool(folder, CAP).windows("r")) == 5
    return folder


def independent(folder: Path, cap: int = CAP, paths: list[Path] | None = None) -> dict:
    """Every spooled row (of ``paths``, default every window of run "r") aggregated in plain Python, keyed by
    node uids: the catalog a publish must hold."""
    edges: dict = {}
    heads: dict = defaultdict(float)
    roles: dict = defaultdict(lambda: [0, 0.0])
    evidence: dict = defaultdict(list)
    stats: dict = {}
    tops: dict = defaultdict(list)
    hists: dict = defaultdict(lambda: defaultdict(int))
    for path in Spool(folder, cap).windows("r") if paths is None else paths:
        w = load_window(path)
        uid = [n.uid for n in w.nodes]
        e = w.edges
        for i in range(len(e)):
            key = (uid[e.src[i]], uid[e.dst[i]], EDGE_KINDS[e.kind[i]])
            row = [int(e.n_prompts[i]), int(e.n_obs[i]), float(e.sum[i]), float(e.sumsq[i]), float(e.sum_abs[i]),
                   float(e.min[i]), float(e.max[i]), int(e.n_pos[i])]
            old = edges.get(key)
            edges[key] = row if old is None else [old[0] + row[0], old[1] + row[1], old[2] + row[2], old[3] + row[3],
                                                  old[4] + row[4], min(old[5], row[5]), max(old[6], row[6]),
                                                  old[7] + row[7]]
        h = w.heads
        for i in range(len(h)):
            heads[(uid[h.src[i]], uid[h.dst[i]], EDGE_KINDS[h.kind[i]], int(h.head[i]))] += float(h.sum[i])
        r = w.roles
        for i in range(len(r)):
            cell = roles[(uid[r.src[i]], uid[r.dst[i]], EDGE_KINDS[r.kind[i]], ROLES[r.role[i]])]
            cell[0] += int(r.n[i])
            cell[1] += float(r.sum_abs[i])
        v = w.evidence
        for i in range(len(v)):
            key = (uid[v.src[i]], uid[v.dst[i]], EDGE_KINDS[v.kind[i]])
            evidence[key].append(Evidence(*key, w.prompts[v.prompt[i]].uid, int(v.src_pos[i]), int(v.dst_pos[i]),
                                          None if v.head[i] < 0 else int(v.head[i]), float(v.value[i])))
        s = w.stats
        for i in range(len(s)):
            old = stats.get(uid[s.node[i]])
            row = [int(s.n_obs[i]), int(s.n_prompts[i]), float(s.sum_act[i]), float(s.max_act[i])]
            stats[uid[s.node[i]]] = row if old is None else [old[0] + row[0], old[1] + row[1], old[2] + row[2],
                                                              max(old[3], row[3])]
        t = w.tops
        for i in range(len(t)):
            tops[uid[t.node[i]]].append((w.prompts[t.prompt[i]].uid, int(t.pos[i]), float(t.act[i]),
                                         uid[t.src[i]] if t.src[i] >= 0 else None, int(t.src_pos[i]), int(t.head[i]),
                                         float(t.value[i])))
        g = w.hists
        for i in range(len(g)):
            hists[uid[g.node[i]]][int(g.bin[i])] += int(g.n[i])
    kept = {k: sorted(rows, key=Evidence.rank_key)[:cap] for k, rows in evidence.items()}
    top = {k: sorted(rows, key=lambda r: (-r[2], r[0], r[1]))[:TOP_ACTIVATIONS] for k, rows in tops.items()}
    return {"edges": edges, "heads": heads, "roles": roles, "evidence": kept, "stats": stats, "tops": top,
            "hists": {k: dict(v) for k, v in hists.items()}}


def close(a: float, b: float) -> bool:
    """Float64 sums of the same terms in another order: equal to within their rounding."""
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


def test_a_partitioned_parallel_publish_holds_the_independent_aggregation(spooled, store_url, tmp_path, monkeypatch):
    """On Neo4j the edges go in batches of 16 here, PUBLISH_WRITERS sessions at once (5,000 in production)."""
    monkeypatch.setattr(neo4j_publish, "EDGE_CHUNK", 16)
    store = open_store(store_url, evidence_per_edge=CAP)
    folder = tmp_path / "copy"
    shutil.copytree(spooled, folder)
    report = publish_folder(folder, lambda cap: store, mem=1 << 20, workers=2)["runs"]["r"]
    assert report["windows_published"] == 5 and report["prompts_published"] == 20 and report["status"] == "done"
    want = independent(spooled)
    heads, roles = defaultdict(dict), defaultdict(dict)  # per edge
    for (*key, head), total in want["heads"].items():
        if total:
            heads[tuple(key)][head] = total
    for (*key, role), (n, _) in want["roles"].items():
        roles[tuple(key)][role] = n
    got = {(e.src, e.dst, e.kind): e for e in store.all_edges()}
    assert got.keys() == want["edges"].keys() and report["edges_published"] == len(got)
    assert len(got) > 20 * neo4j_publish.EDGE_CHUNK * neo4j_publish.PUBLISH_WRITERS  # on Neo4j: many more batches than writers
    for key, (n_prompts, n_obs, s, sq, sa, lo, hi, n_pos) in want["edges"].items():
        e = got[key]
        assert (e.n_prompts, e.n_obs, e.min, e.max, e.n_pos) == (n_prompts, n_obs, lo, hi, n_pos), key
        assert close(e.sum, s) and close(e.sumsq, sq) and close(e.sum_abs, sa), key
        assert e.head_sums.keys() == heads[key].keys(), key
        assert all(close(total, heads[key][head]) for head, total in e.head_sums.items()), key
        assert {r: n for r, (n, _) in e.roles.items()} == roles[key], key
    evidence = defaultdict(list)
    for v in store.all_evidence():
        evidence[(v.src, v.dst, v.kind)].append(v)
    assert {k: sorted(rows, key=Evidence.rank_key) for k, rows in evidence.items()} == want["evidence"]
    stats = {n.uid: (s.n_obs, s.n_prompts, s.max_act) for n, s in store.all_nodes() if s}
    assert stats == {uid: (a, b, d) for uid, (a, b, _, d) in want["stats"].items()}
    assert all(close(s.sum_act, want["stats"][n.uid][2]) for n, s in store.all_nodes() if s)
    stored = {uid: ([(t.prompt, t.pos, t.act, t.src, t.src_pos, t.head, t.value) for t in top_of(rows)], hist)
              for uid, rows, hist in store.all_activations()}
    assert stored == {uid: (want["tops"][uid], want["hists"][uid]) for uid in want["hists"]}
    assert max(len(rows) for rows, _ in stored.values()) == TOP_ACTIVATIONS  # windows' top lists competed
    spooled_uids = [p["uid"] for path in Spool(spooled, CAP).windows("r") for p in window_meta(path)["prompts"]]
    assert sorted(p.uid for p in store.all_prompts()) == sorted(spooled_uids) and len(spooled_uids) == 20
    again = publish_folder(folder, lambda cap: store)["runs"]["r"]
    assert again["windows_published"] == 0 and again["windows_published_before"] == 5


def test_the_partition_count_does_not_change_a_bit_of_the_compaction(spooled, tmp_path):
    paths = Spool(spooled, CAP).windows("r")
    one, many = layout("r", paths), layout("r", paths, mem=1 << 20)
    assert one.n_parts == 1 and many.n_parts > 3
    whole = load_part(one, compact(one, tmp_path / "one")[0])
    parts = [load_part(many, p) for p in compact(many, tmp_path / "many", workers=2)]
    for name in ("edges", "heads", "roles", "evidence", "stats", "tops", "hists"):
        cols = [getattr(p, name).columns() for p in parts]
        merged = {c: np.concatenate([x[c] for x in cols]) for c in cols[0]}
        mine = getattr(whole, name).columns()
        order_m = np.lexsort(list(merged.values())[::-1])
        order_w = np.lexsort(list(mine.values())[::-1])
        for c in mine:
            assert np.array_equal(merged[c][order_m], mine[c][order_w]), (name, c)  # bit for bit


def test_a_run_is_published_once(spooled, tmp_path):
    """More windows spooled after a run was published are refused by name, not added twice."""
    store = open_store(f"sqlite:///{tmp_path}/c.db", evidence_per_edge=CAP)
    folder = tmp_path / "copy"
    shutil.copytree(spooled, folder)
    paths = Spool(folder, CAP).windows("r")
    hidden = paths[-1].rename(tmp_path / paths[-1].name)
    publish_folder(folder, lambda cap: store)
    hidden.rename(paths[-1])
    with pytest.raises(StoreError, match="a run is published once"):
        publish_run(Spool(folder, CAP), "r", store)
    assert len(store.done_prompts("r")) == 16
