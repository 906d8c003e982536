"""Issue 4: both stores, the same answers — checked against an independent aggregation, against
each other byte for byte, and under repeated, crashed and failed writes."""

from __future__ import annotations

import json
import math
import struct

import pytest
from catalog_data import (
    MODEL,
    REFS,
    RELEASE,
    expected_activations,
    expected_edges,
    expected_roles,
    make_batch,
    random_activations,
    random_observations,
    random_prompts,
)
from conftest import wipe_neo4j

from catalog import queries
from catalog.export import copy_catalog
from catalog.fires_on import top_of
from catalog.ids import parse_ref
from catalog.mined import mine_and_store, stored_patterns
from catalog.schema import ROLES, TOP_ACTIVATIONS, NodeInfo
from catalog.stores import StoreUnavailable, open_store
from catalog.stores.base import CypherUnsupported

N = 4  # evidence kept per edge in these tests


def _batches(run="r1"):
    p1, p2 = random_prompts(run, 10), random_prompts(run, 10, start=10)
    r1, r2 = random_observations(p1, seed=1), random_observations(p2, seed=2)
    return (p1, r1, make_batch(run, p1, r1, N)), (p2, r2, make_batch(run, p2, r2, N))


def _fill(url, batches):
    store = open_store(url, evidence_per_edge=N)
    store.start_run("r1", {"model": "toy", "note": "conformance"}, resume=False)
    for _, _, b in batches:
        assert store.write_window(b) is True
    store.finish_run("r1", "done", {"prompts": 20})
    return store


def _no_head_first(v) -> tuple:
    return tuple(-1 if x is None else x for x in v)  # head None (an observation of no head) sorts first


def snapshot(store) -> dict:
    """Everything a catalog holds, in a canonical order (floats rounded as queries round them)."""
    edges = sorted((e.src, e.dst, e.kind, e.n_prompts, e.n_obs, queries.rnd(e.sum), queries.rnd(e.sumsq),
                    queries.rnd(e.sum_abs), e.min, e.max, e.n_pos,
                    tuple(sorted((h, queries.rnd(v)) for h, v in e.head_sums.items() if v)),
                    tuple(sorted((name, n, queries.rnd(a)) for name, (n, a) in e.roles.items())))
                   for e in store.all_edges())
    stats = sorted((n.uid, s.n_obs, s.n_prompts, queries.rnd(s.sum_act), s.max_act) for n, s in store.all_nodes() if s)
    activations = [(uid, tuple(sorted(tops, key=lambda t: (t.order_key(), t.run))), tuple(sorted(hist.items())))
                   for uid, tops, hist in store.all_activations()]
    return {"edges": edges, "evidence": sorted(store.all_evidence(), key=_no_head_first), "stats": stats,
            "activations": activations,
            "prompts": sorted((p.uid, p.text, tuple(p.tokens), json.dumps(p.meta)) for p in store.all_prompts()),
            "runs": [(r.run_id, r.status, json.dumps(r.manifest, sort_keys=True)) for r in store.runs()],
            "mined": list(store.all_mined())}


def test_answers_match_an_independent_aggregation(store_url):
    batches = _batches()
    store = _fill(store_url, batches)
    expect = expected_edges(batches[0][1] + batches[1][1])
    checked = 0
    for ref in REFS:
        if ref[0] not in "ART" or ".E" in ref or ".B" in ref or ref.startswith("ATTN"):
            continue
        for row in queries.upstream(store, ref, order="count", limit=1000):
            e = expect[(row["id"], ref, row["edge_kind"])]
            assert row["n_obs"] == e["n_obs"] and row["n_prompts"] == len(e["prompts"])
            assert row["sum"] == queries.rnd(e["sum"])
            assert row["min"] == queries.rnd(e["min"]) and row["max"] == queries.rnd(e["max"])
            n, mean = e["n_obs"], e["sum"] / e["n_obs"]
            assert row["mean"] == queries.rnd(mean) and row["sum_abs"] == queries.rnd(e["sum_abs"])
            assert row["std"] == pytest.approx(math.sqrt(max(0.0, e["sumsq"] / n - mean * mean)), rel=1e-5, abs=1e-9)
            assert row["sign_share"] == queries.rnd(max(e["n_pos"], n - e["n_pos"]) / n)
            assert row["heads"] == {str(h): queries.rnd(v) for h, v in sorted(e["heads"].items()) if v != 0.0}
            checked += 1
    assert checked == len(expect)  # every aggregated edge was seen exactly once


def test_top_activations_and_histograms_match_an_independent_computation(store_url):
    """Issue 36 §2: each feature's top activations (with the token each sits on and the strongest attn_in /
    resid_in observation into it there) and its histogram, written window by window, as plain Python
    computes them from the rows; the feature query shows them; a token search ranks features by the share of
    their top activations' mass on the token."""
    batches = _batches()
    store = _fill(store_url, batches)
    prompts = batches[0][0] + batches[1][0]
    acts = [a for p, rows, _ in batches for a in random_activations(p, len(rows))]
    want = expected_activations(prompts, batches[0][1] + batches[1][1], acts, TOP_ACTIVATIONS)
    assert sum(len(kept) for kept, _ in want.values()) == len(acts) and any(k[0][4] for k, _ in want.values())
    for ref, (kept, hist) in want.items():
        tops, got_hist = store.activations(NodeInfo.of(MODEL, RELEASE, parse_ref(ref)).uid)
        got = [(t.prompt, t.pos, t.act, t.token, t.src and t.src.rpartition("|")[2], t.src_pos, t.head, t.value)
               for t in top_of(tops)]
        assert got == kept, ref
        assert got_hist == hist, ref
        f = queries.feature(store, ref, contexts=3)
        assert [(c["prompt"], c["pos"], c["activation"], c["tokens"][c["pos"] - c["start"]]) for c in f["contexts"]] == \
            [k[:4] for k in kept[:3]]
        low = {b: struct.unpack("<f", struct.pack("<i", b << 21))[0] for b in hist}  # a bin's float32 bit pattern
        assert [(b["low"], b["n"]) for b in f["histogram"]] == [(low[b], hist[b]) for b in sorted(hist)]
    token = "t1"
    shares = {}
    for ref, (kept, _) in want.items():
        on = [k[2] for k in kept if k[3] == token]
        if on:
            shares[ref] = (sum(on) / sum(k[2] for k in kept), len(on), max(on))
    ranked = sorted(shares, key=lambda r: (-shares[r][0], -shares[r][1], -shares[r][2],
                                           NodeInfo.of(MODEL, RELEASE, parse_ref(r)).uid))
    found = queries.features_by_token(store, f'"{token}"', limit=100)
    assert found["token"] == token and [f["id"] for f in found["features"]] == ranked and len(ranked) > 3
    assert [f["share"] for f in found["features"]] == [queries.rnd(shares[r][0]) for r in ranked]
    if store_url.startswith("neo4j"):  # the search finds its Stats nodes through the text index, not a scan
        from catalog.stores.neo4j_read import TOKEN_SEARCH

        plan = store.driver.execute_query(f"EXPLAIN {TOKEN_SEARCH} RETURN s", token=token, needle=token, runs=None,
                                          database_=store.database).summary.plan
        operators, todo = [], [plan]
        while todo:
            op = todo.pop()
            operators.append(op["operatorType"].split("@")[0])
            todo += op.get("children", [])
        assert "NodeIndexContainsScan" in operators and "NodeByLabelScan" not in operators, operators


def test_positional_roles_match_an_independent_computation(store_url):
    """Issue 15 §3: every attention observation's roles (tokens, offsets, the meta's IOI positions),
    counted and |value|-summed per edge over all observations, not only the kept evidence."""
    batches = _batches()
    store = _fill(store_url, batches)
    expect = expected_roles(batches[0][1] + batches[1][1], batches[0][0] + batches[1][0])
    got = {(e.src.split("|")[2], e.dst.split("|")[2], e.kind): e.roles for e in store.all_edges()}
    assert sum(bool(r) for r in got.values()) == len(expect) > 50
    for key, roles in got.items():
        want = {name: (n, queries.rnd(a)) for name, (n, a) in expect.get(key, {}).items()}
        assert {name: (n, queries.rnd(a)) for name, (n, a) in roles.items()} == want, key
    seen = {name for roles in got.values() for name in roles}
    assert {"duplicate", "induction", "previous", "first", "offset 0", "offset 4-7", "S1->S2", "S2->END"} <= seen
    detail = queries.edge(store, *next((s, d) for (s, d, k), r in got.items() if r and k == "direct"))
    direct = next(k for k in detail["kinds"] if k["edge_kind"] == "direct")
    roles = got[(detail["source"], detail["target"], "direct")]
    assert [r["role"] for r in direct["roles"]] == [name for name in ROLES if name in roles]
    assert all(r["n"] == roles[r["role"]][0] and r["share"] == queries.rnd(r["n"] / direct["n_obs"])
               for r in direct["roles"])


def test_evidence_is_the_top_n_of_all_observations(store_url):
    batches = _batches()
    store = _fill(store_url, batches)
    rows = batches[0][1] + batches[1][1]
    by_edge: dict = {}
    for p, s, d, k, h, sp, dp, v in rows:
        by_edge.setdefault((s, d, k), []).append((-abs(v), p, sp, dp, h, v))
    stored = {}
    for ev in store.all_evidence():
        stored.setdefault((ev.src.split("|")[2], ev.dst.split("|")[2], ev.kind), []).append(
            (-abs(ev.value), ev.prompt, ev.src_pos, ev.dst_pos, -1 if ev.head is None else ev.head, ev.value))
    assert stored.keys() == by_edge.keys()
    for key, obs in by_edge.items():
        assert sorted(stored[key]) == sorted(obs)[:N], key


def test_a_prompts_evidence_is_what_its_observations_kept_in_their_edges_top_n(store_url):
    """prompt_evidence (the prompt page's graph) lists the prompt's observations that are in their
    edge's top N after both batches (some the second batch displaced), QK kinds left out, best first,
    and with qk=True its QK terms alike; computed here from the raw observations. counts() counts every kept row."""
    cap = 1  # these batches repeat few edges, so only a cap of one displaces rows
    p1, p2 = random_prompts("r1", 10), random_prompts("r1", 10, start=10)
    r1, r2 = random_observations(p1, seed=1), random_observations(p2, seed=2)
    store = open_store(store_url, evidence_per_edge=cap)
    store.start_run("r1", {"model": "toy"}, resume=False)
    assert store.write_window(make_batch("r1", p1, r1, cap)) and store.write_window(make_batch("r1", p2, r2, cap))
    rows = r1 + r2
    by_edge: dict = {}
    for p, s, d, k, h, sp, dp, v in rows:
        by_edge.setdefault((s, d, k), []).append((-abs(v), p, sp, dp, h, v))
    kept = [(edge, row) for edge, obs in by_edge.items() for row in sorted(obs)[:cap]]
    assert store.counts()["evidence"] == len(kept)
    displaced = 0
    for prompt in sorted({r[0] for r in rows}):
        want = sorted((-abs(v), s, d, k, sp, dp, h, v) for (s, d, k), (_, p, sp, dp, h, v) in kept
                      if p == prompt and k not in ("q_in", "k_in", "qk"))
        got = [(-abs(e.value), e.src.split("|")[2], e.dst.split("|")[2], e.kind, e.src_pos, e.dst_pos,
                -1 if e.head is None else e.head, e.value) for e in store.prompt_evidence(prompt, 10_000)]
        assert sorted(got) == want, prompt  # ties are broken by uid in the store; refs order otherwise
        assert [g[0] for g in got] == [w[0] for w in want]  # best first
        assert store.prompt_evidence(prompt, 3) == store.prompt_evidence(prompt, 10_000)[:3]
        want_qk = sorted((-abs(v), s, d, k, sp, dp, h, v) for (s, d, k), (_, p, sp, dp, h, v) in kept
                         if p == prompt and k in ("q_in", "k_in", "qk"))
        got_qk = [(-abs(e.value), e.src.split("|")[2], e.dst.split("|")[2], e.kind, e.src_pos, e.dst_pos,
                   -1 if e.head is None else e.head, e.value) for e in store.prompt_evidence(prompt, 10_000, qk=True)]
        assert sorted(got_qk) == want_qk and [g[0] for g in got_qk] == [w[0] for w in want_qk], prompt
        displaced += sum(1 for p, s, d, k, *_ in rows if p == prompt) - len(want) - len(want_qk)
    assert displaced > 100  # of the 139 edges seen more than once, most kept a row of the other prompt


def test_evidence_of_many_edges_is_each_edges_top_rows_in_order(store_url, monkeypatch):
    """What mining reads at once: per edge asked (in the order asked, a missing edge answering nothing)
    its ``limit`` best observations by the evidence order, read in several queries on Neo4j."""
    import catalog.stores.neo4j_read as neo4j_read

    monkeypatch.setattr(neo4j_read, "EDGES_PER_READ", 7)
    batches = _batches()
    store = _fill(store_url, batches)
    by_edge: dict = {}
    for p, s, d, k, h, sp, dp, v in batches[0][1] + batches[1][1]:
        by_edge.setdefault((s, d, k), []).append((-abs(v), p, sp, dp, h, v))
    edges = sorted({(e.src, e.dst, e.kind) for e in store.all_edges()}, reverse=True)
    assert len(edges) > 20
    asked = edges[:10] + [(edges[0][0], edges[0][1], "no-such-kind")] + edges[10:]
    limit = N - 1
    answers = store.evidence_of_edges(asked, limit)
    assert len(answers) == len(asked) and answers[10] == []
    for (src, dst, kind), rows in zip(asked[:10] + asked[11:], answers[:10] + answers[11:]):
        expected = sorted(by_edge[src.split("|")[2], dst.split("|")[2], kind])[:limit]
        assert [(-abs(v.value), v.prompt, v.src_pos, v.dst_pos, -1 if v.head is None else v.head, v.value)
                for v in rows] == expected
        assert all((v.src, v.dst, v.kind) == (src, dst, kind) for v in rows)
    assert store.evidence_of_edges(asked[:3], limit, runs=["other-run"]) == [[], [], []]


def test_evidence_of_an_edge_seen_in_many_batches_is_its_top_n(store_url):
    """Three edges observed 6 times in every one of three batches: each write must cut the stored
    evidence (old and new) back to the top N, whichever batch created the edge."""
    import random

    rng = random.Random(7)
    store = open_store(store_url, evidence_per_edge=N)
    store.start_run("r1", {"model": "toy"}, resume=False)
    every = []
    for k in range(3):
        prompts = random_prompts("r1", 3, start=3 * k)
        rows = [(p.uid, src, "A1.2", "attn_in", h, pos, 7, round(rng.gauss(0, 1), 3))
                for p in prompts for src in ("R0.1", "R1.4") + (("EMB",) if k else ()) for h, pos in ((0, 1), (2, 5))]
        every += rows
        assert store.write_window(make_batch("r1", prompts, rows, N)) is True
    want: dict = {}
    for p, s, _d, _kind, h, sp, dp, v in every:
        want.setdefault(s, []).append((-abs(v), p, sp, dp, h, v))
    got: dict = {}
    for ev in store.all_evidence():
        got.setdefault(ev.src.split("|")[2], []).append((-abs(ev.value), ev.prompt, ev.src_pos, ev.dst_pos, ev.head, ev.value))
    assert {s: len(v) for s, v in want.items()} == {"R0.1": 18, "R1.4": 18, "EMB": 12}
    assert {s: sorted(v) for s, v in got.items()} == {s: sorted(v)[:N] for s, v in want.items()}


def test_both_stores_print_byte_identical_json(tmp_path, neo4j_url):
    wipe_neo4j(neo4j_url)
    batches = _batches()
    stores = [_fill(f"sqlite:///{tmp_path}/a.db", batches), _fill(neo4j_url, batches)]

    def answers(s):
        out = []
        for ref in REFS:
            for order in ("sum", "mean", "count", "abs"):
                for fn in (queries.upstream, queries.downstream):
                    try:
                        out.append(fn(s, ref, order=order, limit=7))
                        out.append(fn(s, ref, order=order, limit=5, offset=3, node_kinds=["attn"], min_count=2))
                    except queries.NotFound:
                        out.append("not found")
        out.append(queries.edge(s, "R0.1", "A1.2") if s.edges_between("toy|rel|R0.1", "toy|rel|A1.2") else None)
        for e in sorted(s.all_edges(), key=lambda e: e.key)[:15]:
            out.append(queries.edge(s, e.src.split("|")[2], e.dst.split("|")[2], evidence_limit=3))
        out += [queries.top_features(s, by="degree"), queries.top_features(s, kind="attn", by="total"),
                queries.composition_counts(s), queries.prompt_graph(s, "r1/p0003", limit=50), queries.runs(s),
                queries.feature(s, "A1.3"), queries.prompt_graph(s, "r1/p0003", limit=80, around="A1.3"),
                queries.prompt_graph_neuronpedia(s, "r1/p0004", limit=60),
                {k: v for k, v in queries.overview(s).items() if k != "store"},
                [queries.top_features(s, kind="attn", by="total", layer=layer, limit=4) for layer in range(3)]]
        return json.dumps(out, sort_keys=False)

    a, b = answers(stores[0]), answers(stores[1])
    assert len(a) > 20_000
    assert a == b


def test_writing_a_batch_again_changes_nothing(store_url):
    (b1, b2) = _batches()
    store = _fill(store_url, [b1, b2])
    before = snapshot(store)
    assert store.write_window(b1[2]) is False
    assert store.write_window(b2[2]) is False
    assert snapshot(store) == before


def test_crash_between_batches_then_retry_equals_one_clean_run(store_url):
    (b1, b2) = _batches()
    store = open_store(store_url, evidence_per_edge=N)
    store.start_run("r1", {"model": "toy", "note": "conformance"}, resume=False)
    store.write_window(b1[2])
    store.close()  # the job dies here; the next process retries from the start
    store = open_store(store_url, evidence_per_edge=N)
    assert store.write_window(b1[2]) is False
    assert store.write_window(b2[2]) is True
    store.finish_run("r1", "done", {"prompts": 20})
    crashed = snapshot(store)
    if store_url.startswith("neo4j"):
        wipe_neo4j(store_url)
    else:
        store.close()
        store_url = store_url.replace("catalog.db", "clean.db")
    assert snapshot(_fill(store_url, [b1, b2])) == crashed


def test_a_failing_batch_stores_nothing(store_url, monkeypatch):
    (b1, b2) = _batches()
    store = _fill(store_url, [b1])
    before = snapshot(store)

    def boom(*a, **k):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(type(store), "_write_evidence", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        store.write_window(b2[2])
    assert snapshot(store) == before
    assert store.done_prompts("r1") == {p.prompt_id for p in b1[0]}
    monkeypatch.undo()
    assert store.write_window(b2[2]) is True


def test_evidence_drill_down_reaches_prompts_and_tokens(store_url):
    batches = _batches()
    store = _fill(store_url, batches)
    e = max(store.all_edges(), key=lambda e: e.n_obs)
    out = queries.edge(store, e.src.split("|")[2], e.dst.split("|")[2], evidence_limit=10)
    kind = next(k for k in out["kinds"] if k["edge_kind"] == e.kind)
    assert 0 < len(kind["evidence"]) <= N
    for ev in kind["evidence"]:
        prompt = store.prompt(ev["prompt"])
        assert ev["text"] == prompt.text
        assert ev["src_token"] == prompt.tokens[ev["src_pos"]] and ev["dst_token"] == prompt.tokens[ev["dst_pos"]]


def test_export_round_trip_is_lossless(tmp_path, neo4j_url):
    wipe_neo4j(neo4j_url)
    src = _fill(f"sqlite:///{tmp_path}/src.db", _batches())
    mine_and_store(src)
    mid = open_store(neo4j_url, evidence_per_edge=None)
    counts = copy_catalog(src, mid)
    back = open_store(f"sqlite:///{tmp_path}/back.db", evidence_per_edge=None)
    assert copy_catalog(mid, back) == counts
    assert counts["edges"] > 100 and counts["evidence"] > 100 and counts["prompts"] == 20 and counts["mined"] == 1
    assert snapshot(src) == snapshot(mid) == snapshot(back)
    assert stored_patterns(back, 20, 2, None) is not None  # still current in the copy


def test_export_refuses_a_non_empty_target(tmp_path):
    src = _fill(f"sqlite:///{tmp_path}/a.db", _batches())
    with pytest.raises(Exception, match="not empty"):
        copy_catalog(src, src)


def test_sqlite_says_cypher_needs_neo4j(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/x.db")
    with pytest.raises(CypherUnsupported, match="Cypher needs the Neo4j store"):
        store.cypher("MATCH (n) RETURN n", {}, 10, 1.0)


def test_unreachable_neo4j_is_one_clear_line():
    with pytest.raises(StoreUnavailable, match="cannot reach Neo4j at neo4j://127.0.0.1:9") as exc:
        open_store("neo4j://127.0.0.1:9")
    assert "\n" not in str(exc.value)


def test_missing_sqlite_catalog_for_queries(tmp_path):
    with pytest.raises(StoreUnavailable, match="no catalog at"):
        open_store(f"sqlite:///{tmp_path}/nothing.db", create=False)


def test_unknown_and_malformed_references(store_url):
    store = _fill(store_url, _batches())
    with pytest.raises(queries.NotFound, match="no node A9.9"):
        queries.upstream(store, "A9.9")
    with pytest.raises(queries.NodeRefError, match="cannot parse node reference 'A9'"):
        queries.upstream(store, "A9")



def test_an_interrupted_export_leaves_runs_that_queries_refuse(tmp_path, store_url):
    """An export stopped after its first edge chunk: the target's run is 'exporting', not done; every
    query refuses it naming why, and a second export says an earlier one was interrupted."""
    src = _fill(f"sqlite:///{tmp_path}/src.db", _batches())
    dst = open_store(store_url, evidence_per_edge=None)
    real, calls = dst.import_window, []

    def dies_on_the_third(agg):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(agg)

    dst.import_window = dies_on_the_third  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        copy_catalog(src, dst, chunk=50)
    dst.import_window = real  # type: ignore[method-assign]
    assert [(r.run_id, r.status) for r in dst.runs()] == [("r1", "exporting")]
    with pytest.raises(Exception, match="incomplete: an export into this catalog was interrupted"):
        queries.top_features(dst)
    with pytest.raises(Exception, match="an earlier export into it was interrupted: runs r1"):
        copy_catalog(src, open_store(store_url, evidence_per_edge=None))
    fresh = open_store(f"sqlite:///{tmp_path}/fresh.db", evidence_per_edge=None)
    copy_catalog(src, fresh)
    assert [(r.run_id, r.status) for r in fresh.runs()] == [(r.run_id, r.status) for r in src.runs()]


def test_input_shares_match_an_independent_computation(store_url):
    """How much of each target the features explain (catalog.completeness), per layer and kind and per node:
    |value| summed by hand over the partition observations (attn_in, resid_in, mlp_in), split by the source's
    id (A/R/T features; .ERR errors; the rest), on both stores."""
    batches = _batches()
    store = _fill(store_url, batches)
    rows = batches[0][1] + batches[1][1]

    def source_class(ref: str) -> str:
        return "errors" if ref.endswith(".ERR") else "features" if ref[0] in "ART" and ref[1].isdigit() and \
            ".B" not in ref else "other"

    by_layer: dict = {}
    by_node: dict = {}
    for _, src, dst, kind, *_rest, value in rows:
        if kind not in ("attn_in", "resid_in", "mlp_in"):
            continue
        for key, table in (((dst[0], int(dst[1])), by_layer), (dst, by_node)):
            cell = table.setdefault(key, {"features": 0.0, "errors": 0.0, "other": 0.0})
            cell[source_class(src)] += abs(value)
    kinds = {"A": "attn", "R": "resid", "T": "transcoder"}
    got = {(kinds_row["kind"], kinds_row["layer"]): kinds_row for kinds_row in queries.completeness(store)["layers"]}
    assert set(got) == {(kinds[k], layer) for k, layer in by_layer} and any(k == "transcoder" for k, _ in got)
    for (k, layer), cell in by_layer.items():
        total = sum(cell.values())
        row = got[(kinds[k], layer)]
        for name in ("features", "errors", "other"):
            assert row[name] == queries.rnd(cell[name] / total), (k, layer, name)
    for ref in ("T1.2", "A1.3", "R2.0"):
        cell = by_node[ref]
        inputs = queries.feature(store, ref)["inputs"]
        assert inputs["complete"] and inputs["features"] == queries.rnd(cell["features"] / sum(cell.values()))
        assert inputs["errors"] == queries.rnd(cell["errors"] / sum(cell.values()))
