"""Issue 12 §1: edges, node statistics and evidence are kept per run; every query sums over a
selection of runs, never over runs of different settings; diff puts two runs side by side. Checked
on both stores against an independent (plain-Python) aggregation of each run's own observations,
and the two stores against each other byte for byte."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest
from catalog_data import REFS, expected_edges, make_batch, random_observations, random_prompts
from conftest import wipe_neo4j
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import Settings
from catalog import queries
from catalog.diff import diff
from catalog.export import copy_catalog
from catalog.mining import mine
from catalog.runs import IncompatibleRuns
from catalog.stores import StoreError, open_store

N = 4
SAES = [{"key": "rel", "kind": "attn", "layer": 1}]
PRUNING = {"top_k": 50, "min_abs": 0.0, "direct": True, "direct_positions": "last"}


def manifest(**pruning) -> dict:
    return {"kind": "ingest", "model": {"name": "toy"}, "saes": SAES, "pruning": {**PRUNING, **pruning}}


# run -> (manifest, number of prompts, seed); r3 was pruned differently, so it never adds to r1/r2
RUNS = {"r1": (manifest(), 12, 1), "r2": (manifest(), 8, 2), "r3": (manifest(top_k=5), 6, 3)}


def fill(url: str, runs=("r1", "r2")) -> tuple:
    """Each run's prompts, written in two windows; returns the store and every run's raw rows."""
    store = open_store(url, evidence_per_edge=N)
    rows = {}
    for run in runs:
        meta, n, seed = RUNS[run]
        store.start_run(run, meta, resume=False)
        prompts = random_prompts(run, n)
        rows[run] = []
        for k, part in enumerate((prompts[: n // 2], prompts[n // 2:])):
            obs = random_observations(part, seed=10 * seed + k)
            rows[run] += obs
            assert store.write_window(make_batch(run, part, obs, N)) is True
        store.finish_run(run, "done", {})
    return store, rows


def check_upstream(store, rows, runs) -> int:
    """Every upstream row of every node, summed over ``runs``, equals the plain aggregation of
    those runs' observations alone."""
    expect = expected_edges([r for run in runs for r in rows[run]])
    checked = 0
    for ref in REFS:
        try:
            answer = queries.upstream(store, ref, runs=list(runs), order="count", limit=1000)
        except queries.NotFound:
            continue
        for row in answer:
            e = expect[(row["id"], ref, row["edge_kind"])]
            assert (row["n_obs"], row["n_prompts"]) == (e["n_obs"], len(e["prompts"])), (ref, row)
            assert row["sum"] == queries.rnd(e["sum"]) and row["sum_abs"] == queries.rnd(e["sum_abs"])
            assert (row["min"], row["max"]) == (queries.rnd(e["min"]), queries.rnd(e["max"]))
            assert row["heads"] == {str(h): queries.rnd(v) for h, v in sorted(e["heads"].items()) if v != 0.0}
            checked += 1
    assert checked == len(expect)  # and no edge of another run leaked in
    return checked


def test_each_run_and_their_sum_match_independent_aggregations(store_url):
    store, rows = fill(store_url)
    one = check_upstream(store, rows, ["r1"])
    two = check_upstream(store, rows, ["r2"])
    both = check_upstream(store, rows, ["r1", "r2"])
    assert both < one + two  # runs share edges: they were summed, not listed twice
    # the default selection is every run (they share settings)
    assert queries.upstream(store, "A1.2", limit=1000) == queries.upstream(store, "A1.2", runs=["r2", "r1"], limit=1000)


def test_evidence_and_activation_statistics_are_per_run(store_url):
    store, rows = fill(store_url)
    for run in ("r1", "r2"):
        by_edge: dict = {}
        for p, s, d, k, h, sp, dp, v in rows[run]:
            by_edge.setdefault((s, d, k), []).append((-abs(v), p, sp, dp, h, v))
        stored: dict = {}
        for ev in store.all_evidence((run,)):
            assert ev.prompt.startswith(run + "/")
            stored.setdefault((str(queries.node_ref_of(ev.src)), str(queries.node_ref_of(ev.dst)), ev.kind), []).append(
                (-abs(ev.value), ev.prompt, ev.src_pos, ev.dst_pos, -1 if ev.head is None else ev.head, ev.value))
        assert stored.keys() == by_edge.keys()
        for key, obs in by_edge.items():
            assert sorted(stored[key]) == sorted(obs)[:N], key  # each run keeps its own top N
    # an edge answer over one run shows that run's evidence only; over both, the top of the union
    src, dst, _ = next(k for k in expected_edges(rows["r1"]) if k in expected_edges(rows["r2"]))
    for runs in (["r1"], ["r2"], ["r1", "r2"]):
        e = queries.edge(store, src, dst, evidence_limit=50, runs=runs)
        assert e["runs"] == runs
        assert {v["prompt"].split("/")[0] for k in e["kinds"] for v in k["evidence"]} == set(runs)
    both_active = 0
    for ref in (r for r in REFS if r[0] in "AR" and "." in r and r[2] == "." and r[3:].isdigit()):
        one, two = (queries.feature(store, ref, runs=[run]).get("activation") for run in ("r1", "r2"))
        total = queries.feature(store, ref).get("activation")
        if one and two:
            both_active += 1
            assert total["n_positions"] == one["n_positions"] + two["n_positions"]
            assert total["n_prompts"] == one["n_prompts"] + two["n_prompts"]
            assert total["max"] == max(one["max"], two["max"])
        else:
            assert total == (one or two)
    assert both_active >= 3


def test_runs_of_different_settings_are_never_added(store_url):
    store, rows = fill(store_url, ("r1", "r2", "r3"))
    with pytest.raises(IncompatibleRuns) as refused:
        queries.upstream(store, "A1.2")
    assert refused.value.groups == [["r1", "r2"], ["r3"]]
    assert "top_k=50): r1, r2; group 2" in str(refused.value) and "top_k=5): r3" in str(refused.value)
    for call in (lambda: queries.edge(store, "R0.1", "A1.2"), lambda: queries.feature(store, "A1.2"),
                 lambda: queries.top_features(store), lambda: mine(store),
                 lambda: queries.upstream(store, "A1.2", runs=["r1", "r3"])):
        with pytest.raises(IncompatibleRuns):
            call()
    check_upstream(store, rows, ["r3"])
    check_upstream(store, rows, ["r1", "r2"])
    overview = queries.overview(store)
    assert overview["run_groups"] == [{"settings": "model toy, SAEs rel, pruning direct=True, direct_positions=last, "
                                                   "min_abs=0.0, top_k=50", "runs": ["r1", "r2"]},
                                      {"settings": "model toy, SAEs rel, pruning direct=True, direct_positions=last, "
                                                   "min_abs=0.0, top_k=5", "runs": ["r3"]}]
    assert overview["strongest_attention"] == [] and "r3" in overview["selection_error"]
    assert queries.overview(store, runs=["r3"])["strongest_attention"]
    with pytest.raises(queries.NotFound, match="no run 'r9'"):
        queries.upstream(store, "A1.2", runs=["r9"])
    store.start_run("sae-eval-toy", {"kind": "sae_eval"}, resume=True)  # holds no edges: not a group
    assert [g["runs"] for g in queries.overview(store)["run_groups"]] == [["r1", "r2"], ["r3"]]
    with pytest.raises(StoreError, match="holds no edges"):
        queries.upstream(store, "A1.2", runs=["sae-eval-toy"])


def test_rest_and_cli_select_runs_and_refuse_mixtures(store_url, tmp_path):
    store, rows = fill(store_url, ("r1", "r2", "r3"))
    with TestClient(create_app(Settings(store=store_url, warm_patterns=False)), raise_server_exceptions=False) as c:
        mixed = c.get("/features/A1.2/upstream")
        assert mixed.status_code == 409
        assert mixed.json()["groups"] == [["r1", "r2"], ["r3"]] and "Choose runs of one group" in mixed.json()["detail"]
        assert c.get("/features/A1.2/upstream", params={"run": ["r1", "r3"]}).status_code == 409
        assert c.get("/features/A1.x/upstream").status_code == 422  # a bad reference is said first
        assert c.get("/features/A9.9").status_code == 404
        assert c.get("/patterns/composition").status_code == 409
        one = c.get("/features/A1.2/upstream", params={"run": ["r1", "r2"], "limit": 500, "order": "count"})
        assert one.status_code == 200
        assert one.json()["items"] == queries.upstream(store, "A1.2", runs=["r1", "r2"], limit=500, order="count")
        assert c.get("/features/A1.2/upstream", params={"run": "r9"}).status_code == 404
        assert c.get("/features/A1.3", params={"run": "r3"}).json()["runs"] == ["r3"]
        page = c.get("/")
        assert page.status_code == 200 and "never added together" in page.text and "run-groups" in page.text
        assert c.get("/view/feature/A1.2").status_code == 409
        assert c.get("/view/feature/A1.2", params={"run": "r3"}).status_code == 200
        d = c.get("/features/A1.2/diff", params={"run": ["r1", "r3"]})
        assert d.status_code == 200 and d.json() == diff(store, "A1.2", "r1", "r3")
        assert c.get("/features/A1.2/diff", params={"run": "r1"}).status_code == 422
    if store_url.startswith("sqlite"):
        cli = [sys.executable, "-m", "cli"]
        out = subprocess.run([*cli, "upstream", "A1.2", "--store", store_url], capture_output=True, text=True)
        assert out.returncode == 2 and "group 1" in out.stderr and "r3" in out.stderr and "Traceback" not in out.stderr
        ok = subprocess.run([*cli, "upstream", "A1.2", "--store", store_url, "--run", "r1", "--run", "r2", "--json",
                             "--top", "1000", "--order", "count"], capture_output=True, text=True)
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout) == queries.upstream(store, "A1.2", runs=["r1", "r2"], limit=500, order="count")
        d = subprocess.run([*cli, "diff", "A1.2", "--store", store_url, "--run", "r1", "--run", "r3", "--json"],
                           capture_output=True, text=True)
        assert d.returncode == 0 and json.loads(d.stdout) == diff(store, "A1.2", "r1", "r3")
        one = subprocess.run([*cli, "diff", "A1.2", "--store", store_url, "--run", "r1"], capture_output=True, text=True)
        assert one.returncode == 2 and "exactly two --run" in one.stderr


def test_diff_ranks_by_change_per_prompt(store_url):
    store, rows = fill(store_url, ("r1", "r3"))
    result = diff(store, "A1.2", "r1", "r3", limit=1000)
    per_run = {run: expected_edges(rows[run]) for run in ("r1", "r3")}
    n_prompts = {"r1": RUNS["r1"][1], "r3": RUNS["r3"][1]}
    into = {(s, k) for run in per_run for (s, d, k) in per_run[run] if d == "A1.2"}
    assert result["runs"] == {"a": {"run": "r1", "prompts": 12}, "b": {"run": "r3", "prompts": 6}}
    assert result["n_edges"] == len(into) == len(result["edges"]) and not result["same_settings"]
    assert "top_k=5" in result["settings"]["b"]
    changes = []
    for row in result["edges"]:
        sides = {}
        for side, run in (("a", "r1"), ("b", "r3")):
            e = per_run[run].get((row["id"], "A1.2", row["edge_kind"]))
            assert (row[side] is None) == (e is None)
            if e is not None:
                assert row[side]["n_obs"] == e["n_obs"] and row[side]["n_prompts"] == len(e["prompts"])
                assert row[side]["per_prompt"] == queries.rnd(e["sum"] / n_prompts[run])
            sides[side] = e["sum"] / n_prompts[run] if e else 0.0
        assert row["change"] == queries.rnd(sides["b"] - sides["a"])
        changes.append(abs(sides["b"] - sides["a"]))
    assert changes == sorted(changes, reverse=True)
    with pytest.raises(ValueError, match="two different runs"):
        diff(store, "A1.2", "r1", "r1")


def test_per_run_answers_and_diff_are_byte_identical_on_both_stores(tmp_path, neo4j_url):
    wipe_neo4j(neo4j_url)
    stores = [fill(f"sqlite:///{tmp_path}/a.db", ("r1", "r2", "r3"))[0], fill(neo4j_url, ("r1", "r2", "r3"))[0]]

    def answers(s) -> str:
        out: list = []
        for runs in (["r1"], ["r2"], ["r1", "r2"], ["r3"]):
            for ref in REFS:
                for order in ("sum", "count"):
                    try:
                        out.append(queries.upstream(s, ref, runs=runs, order=order, limit=6))
                        out.append(queries.downstream(s, ref, runs=runs, order=order, limit=6, min_count=2))
                    except queries.NotFound:
                        out.append("not found")
            out += [queries.feature(s, "A1.3", runs=runs), queries.top_features(s, by="total", runs=runs),
                    queries.composition_counts(s, runs=runs), mine(s, runs=runs)]
            try:
                out.append(queries.edge(s, "R0.1", "A1.2", runs=runs, evidence_limit=6))
            except queries.NotFound as exc:
                out.append(str(exc).replace(s.url, "URL"))
        for ref in ("A1.2", "A2.1", "R1.3"):
            out += [diff(s, ref, "r1", "r2"), diff(s, ref, "r3", "r1", direction="down")]
        out.append({k: v for k, v in queries.overview(s).items() if k != "store"})
        return json.dumps(out)

    a, b = answers(stores[0]), answers(stores[1])
    assert len(a) > 50_000 and a == b


def test_export_keeps_each_run_apart(tmp_path, neo4j_url):
    wipe_neo4j(neo4j_url)
    src, rows = fill(f"sqlite:///{tmp_path}/a.db", ("r1", "r2", "r3"))
    copy_catalog(src, open_store(neo4j_url, evidence_per_edge=None))
    back = open_store(f"sqlite:///{tmp_path}/b.db", evidence_per_edge=None)
    copy_catalog(open_store(neo4j_url), back)
    for store in (open_store(neo4j_url), back):
        for runs in (["r1"], ["r3"], ["r1", "r2"]):
            check_upstream(store, rows, runs)
            assert sorted(store.all_evidence(runs)) == sorted(src.all_evidence(runs))
            assert diff(store, "A1.2", "r2", "r3") == diff(src, "A1.2", "r2", "r3")


def test_a_catalog_from_before_per_run_edges_is_refused_with_a_reason(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as c:
        c.execute("CREATE TABLE edges (id INTEGER PRIMARY KEY, src INTEGER, dst INTEGER, kind TEXT)")
    with pytest.raises(StoreError, match="before edges were kept per run"):
        open_store(f"sqlite:///{path}")


def test_a_catalog_of_an_older_format_is_refused_with_a_reason(tmp_path, neo4j_url):
    """Format 5 counts seven edge kinds (mlp_in) in its edge keys, on both stores: a format-4 catalog's keys
    (six kinds) would be misread, a format-3 catalog's evidence table (SQLite) or (:Evidence) nodes (Neo4j) would
    be invisible to every read, and a format-2 catalog's edge keys (three edge kinds) would be misread."""
    url = f"sqlite:///{tmp_path}/c.db"
    fill(url, ("r1",))
    for old, reason in ((4, "edge keys that counted six edge kinds"), (3, "its evidence in a table of its own"),
                        (2, "edge keys that counted three edge kinds")):
        with sqlite3.connect(tmp_path / "c.db") as c:
            c.execute(f"PRAGMA user_version = {old}")
        with pytest.raises(StoreError, match=f"catalog of format {old} .this version reads 5; format {old} had {reason}"):
            open_store(url)
    assert open_store(f"sqlite:///{tmp_path}/new.db").counts()["edges"] == 0  # a new one is fine
    wipe_neo4j(neo4j_url)
    open_store(neo4j_url).close()
    import neo4j

    with neo4j.GraphDatabase.driver(neo4j_url.replace("neo4j://", "bolt://"), auth=None) as d:
        d.execute_query("MERGE (x:Dictionary {name: 'nodes'}) SET x.schema = 4")
    with pytest.raises(StoreError, match="catalog of format 4 .this version reads 5"):
        open_store(neo4j_url)
    wipe_neo4j(neo4j_url)


def documented_cypher(source: str, target: str = "A1.2", kind: str = "attn_in") -> list[str]:
    """The Cypher queries docs/catalog.md shows, with its example names swapped for this catalog's."""
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "catalog.md").read_text()
    block = text.split("```cypher\n", 1)[1].split("```", 1)[0]
    swap = {"'A2.250'": f"'{target}'", "'R1.4'": f"'{source}'", "'ioi-train'": "'r1'", "'ioi-test'": "'r2'",
            "'attn_in'": f"'{kind}'"}
    out = []
    for part in block.split("\n\n"):
        query = "\n".join(line for line in part.splitlines() if not line.startswith("//"))
        for old, new in swap.items():
            query = query.replace(old, new)
        out.append(query)
    return out


def test_the_documented_cypher_answers_as_the_queries_do(neo4j_url):
    """docs/catalog.md's shapes for one run, for several runs, evidence and activations, run on a real
    server, agree with catalog.queries."""
    wipe_neo4j(neo4j_url)
    store, rows = fill(neo4j_url)
    want = queries.upstream(store, "A1.2", runs=["r1"], limit=20, order="abs")
    one_run, runs, evidence, activations, _ = documented_cypher(want[0]["id"], kind=want[0]["edge_kind"])
    got = store.cypher(one_run, {}, 100, 10)
    assert [(g["s.ref"], g["r.kind"], queries.rnd(g["r.sum"]), g["r.n_prompts"]) for g in got] == \
        [(w["id"], w["edge_kind"], w["sum"], w["n_prompts"]) for w in want]
    got = store.cypher(runs, {}, 100, 10)
    want = queries.upstream(store, "A1.2", runs=["r1", "r2"], limit=20, order="abs")
    assert [(g["s.ref"], g["kind"], queries.rnd(g["total"]), queries.rnd(g["mean"]), g["n_prompts"]) for g in got] == \
        [(w["id"], w["edge_kind"], w["sum"], w["mean"], w["n_prompts"]) for w in want]
    got = store.cypher(evidence, {}, 100, 10)
    kinds = queries.edge(store, want[0]["id"], "A1.2", runs=["r1"], evidence_limit=100)["kinds"]
    assert got and [(g["src_pos"], g["dst_pos"], g["value"]) for g in got] == \
        [(v["src_pos"], v["dst_pos"], v["value"]) for k in kinds if k["edge_kind"] == want[0]["edge_kind"]
         for v in k["evidence"]]  # best first, alike
    got = store.cypher(activations, {}, 100, 10)
    assert [g["run"] for g in got] == [r for r in ("r1", "r2") if queries.feature(store, "A1.2", runs=[r]).get("activation")]
    assert got
    for g in got:
        act = queries.feature(store, "A1.2", runs=[g["run"]])["activation"]
        assert (g["n_prompts"], g["n_positions"], queries.rnd(g["max_act"])) == \
            (act["n_prompts"], act["n_positions"], act["max"])
    active = next(r for r in ("A1.2", "A1.3", "A1.4", "A2.2") if queries.feature(store, r, runs=["r1"])["contexts"])
    fires_on = documented_cypher(want[0]["id"], active)[4]
    got = store.cypher(fires_on, {}, 100, 10)
    contexts = queries.feature(store, active, runs=["r1"], contexts=20)["contexts"]
    assert got and [(g["prompt"], g["pos"], g["token"], g["act"], g["reads_from"]) for g in got] == \
        [(c["prompt"], c["pos"], c["token"], c["activation"], c["source"]["pos"] if c["source"] else 0) for c in contexts]
