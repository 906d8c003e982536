"""Issue 13: per-prompt graphs exported as the attribution-graph JSON Neuronpedia and circuit-tracer's
frontend read, validated against the published schema (restated in tests/schemas/)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import ct_viewer
import jsonschema
import pydantic
import pytest
from fastapi.testclient import TestClient
from test_store_conformance import _batches, _fill
from typer.testing import CliRunner

from api.app import create_app
from api.settings import Settings
from catalog.neuronpedia import to_neuronpedia

SCHEMA = json.loads((Path(__file__).parent / "schemas" / "neuronpedia-graph.schema.json").read_text())


def validate(graph: dict) -> None:
    jsonschema.Draft7Validator(SCHEMA).validate(graph)
    ids = [n["node_id"] for n in graph["nodes"]]
    assert len(ids) == len(set(ids)), "node ids collide"
    assert all(link["source"] in ids and link["target"] in ids for link in graph["links"])


def test_the_schema_rejects_what_the_published_one_rejects():
    """The restated schema is not vacuous: a graph missing a required field of each level fails."""
    good = to_neuronpedia(prompt="a b", tokens=["a", " b"], edges=[{"source": "EMB@0", "target": "A0.1@1", "value": 1.0}],
                          scan="m", slug="s", saes=[])
    validate(good)
    for path in (("metadata", "prompt_tokens"), ("nodes", 0, "jsNodeId"), ("links", 0, "weight"), ("qParams",)):
        broken = json.loads(json.dumps(good))
        parent = broken
        for step in path[:-1]:
            parent = parent[step]
        del parent[path[-1]]
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.Draft7Validator(SCHEMA).validate(broken)


def test_nodes_sit_in_their_layers_row_with_ids_that_never_collide():
    """Rows are the catalog's layers; feature codes are Cantor pairs (3L, 3L + 1 or 3L + 2, index); every
    position has an embedding node; REST sits at its target; the start node is pinned and clicked."""
    edges = [{"source": "R1.3@2", "target": "A1.3@2", "value": 0.5, "head": 0},
             {"source": "R1.3@2", "target": "A1.3@2", "value": 0.25, "head": 1},
             {"source": "R1.ERR@2", "target": "A1.3@2", "value": -0.125, "head": 2},
             {"source": "A1.ERR@2", "target": "R2.3@2", "value": 2.0, "head": None},
             {"source": "A1.3@2", "target": "R2.3@2", "value": 1.0, "head": None},
             {"source": "EMB@0", "target": "R1.3@2", "value": 0.75, "head": None},
             {"source": "POS@0", "target": "R1.3@2", "value": 0.0625, "head": None},
             {"source": "MLP1@2", "target": "R2.3@2", "value": -1.5, "head": None},
             {"source": "T0.3@2", "target": "R2.3@2", "value": 0.5, "head": None},
             {"source": "T0.ERR@2", "target": "R2.3@2", "value": -0.25, "head": None},
             {"source": "T0.BIAS@2", "target": "R2.3@2", "value": 0.125, "head": None},
             {"source": "REST", "target": "A1.3@2", "value": 0.01, "head": None}]
    saes = [{"kind": "attn", "layer": 1, "key": "r:a1"}, {"kind": "resid", "layer": 1, "key": "r:r1"},
            {"kind": "resid", "layer": 2, "key": "r:r2"}, {"kind": "transcoder", "layer": 0, "key": "r:t0"}]
    graph = to_neuronpedia(prompt="x y z", tokens=["<bos>", "x", "y"], edges=edges, scan="gpt2-small", slug="t",
                           saes=saes, activations={"A1.3@2": 2.5}, clicked="A1.3@2")
    validate(graph)
    by_clerp = {f"{n['clerp'].split(' (')[0]}@{n['ctx_idx']}": n for n in graph["nodes"]}
    # hand-computed: cantor(x, y) = (x + y)(x + y + 1) / 2 + y; R1.3 -> (3, 3) = 24, A1.3 -> (4, 3) = 31,
    # R2.3 -> (6, 3) = 48, T0.3 -> (2, 3) = 18; components: R ERR -1, A ERR -2, MLP -5, EMB -7, POS -8,
    # T ERR -11, T BIAS -12; REST into 31: -16 - 31
    assert {k: (n["node_id"], n["layer"], n["feature"]) for k, n in by_clerp.items()} == {
        "R1.3@2": ("1_24_2", "1", 24), "A1.3@2": ("1_31_2", "1", 31), "R2.3@2": ("2_48_2", "2", 48),
        "R1.ERR@2": ("1_-1_2", "1", -1), "A1.ERR@2": ("1_-2_2", "1", -2), "MLP1@2": ("1_-5_2", "1", -5),
        "T0.3@2": ("0_18_2", "0", 18), "T0.ERR@2": ("0_-11_2", "0", -11), "T0.BIAS@2": ("0_-12_2", "0", -12),
        "EMB@0": ("E_-7_0", "E", -7), "EMB@1": ("E_-7_1", "E", -7), "EMB@2": ("E_-7_2", "E", -7),
        "POS@0": ("E_-8_0", "E", -8), "REST into A1.3@2@2": ("1_-47_2", "1", -47)}
    assert graph["metadata"]["transcoder_list"] == ["", "", "r:t0", "r:r1", "r:a1", "", "r:r2"]
    assert graph["metadata"]["schema_version"] == 1
    assert by_clerp["A1.3@2"]["activation"] == 2.5 and by_clerp["R1.3@2"]["activation"] is None
    assert by_clerp["A1.3@2"]["feature_type"] == "attention sae feature"
    assert by_clerp["EMB@1"]["feature_type"] == "embedding"
    assert by_clerp["T0.3@2"]["feature_type"] == "cross layer transcoder"  # Neuronpedia's transcoder node types
    assert by_clerp["T0.ERR@2"]["feature_type"] == "mlp reconstruction error"
    links = {(link["source"], link["target"]): link["weight"] for link in graph["links"]}
    assert links[("1_24_2", "1_31_2")] == 0.75  # heads 0 and 1 summed: 0.5 + 0.25
    assert links[("1_-47_2", "1_31_2")] == 0.01
    assert links[("0_18_2", "2_48_2")] == 0.5
    assert len(links) == 11
    assert graph["qParams"]["clickedId"] == "1_31_2" and graph["qParams"]["pinnedIds"] == ["1_31_2"]
    assert graph["metadata"]["prompt_tokens"] == ["<bos>", "x", "y"] and graph["metadata"]["scan"] == "gpt2-small"
    ct_viewer.graph_models().Model(**graph)  # circuit-tracer's own graph model accepts it


def test_circuit_tracers_graph_model_rejects_what_it_should():
    """The acceptor is not vacuous: a null feature (what the export used to write) fails it."""
    graph = to_neuronpedia(prompt="a b", tokens=["a", " b"], edges=[{"source": "EMB@0", "target": "A0.1@1",
                                                                    "value": 1.0}], scan="m", slug="s", saes=[])
    model = ct_viewer.graph_models().Model
    model(**graph)
    graph["nodes"][0]["feature"] = None
    with pytest.raises(pydantic.ValidationError, match="int_type"):
        model(**graph)


def test_stored_graph_export_over_rest_on_both_stores(tmp_path, neo4j_url):
    from conftest import wipe_neo4j

    wipe_neo4j(neo4j_url)
    batches = _batches()
    bodies = []
    for url in (f"sqlite:///{tmp_path}/a.db", neo4j_url):
        _fill(url, batches)
        with TestClient(create_app(Settings(store=url, warm_patterns=False))) as client:
            r = client.get("/prompts/r1/p0002/graph", params={"format": "neuronpedia", "limit": 100})
            assert r.status_code == 200, r.text
            bodies.append(r.text)
            catalog = client.get("/prompts/r1/p0002/graph", params={"limit": 100}).json()
            assert client.get("/prompts/r1/p0002/graph", params={"format": "svg"}).status_code == 422
    assert bodies[0] == bodies[1]  # byte-identical on both stores
    graph = json.loads(bodies[0])
    validate(graph)
    ct_viewer.graph_models().Model(**graph)
    assert graph["metadata"]["prompt_tokens"] == [f"t{(2 + j * j) % 5}" for j in range(8)]  # catalog_data's prompt 2
    assert graph["metadata"]["prompt"] == "prompt number 2"
    # the links are the catalog graph's edges, per-head rows summed (summed here independently)
    want: dict[tuple[str, str], float] = defaultdict(float)
    for e in catalog["edges"]:
        want[(e["source"], e["target"])] += e["value"]
    clerp_at = {n["node_id"]: f"{n['clerp'].split(' ')[0]}@{n['ctx_idx']}" for n in graph["nodes"]}
    got = {(clerp_at[link["source"]], clerp_at[link["target"]]): link["weight"] for link in graph["links"]}
    assert got.keys() == want.keys()
    assert all(got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-12) for k in want)


def test_trace_exports_neuronpedia_json():
    from cli import app

    args = ["trace", "--model", "toy-ioi", "--saes", "toy-ioi", "--prompt",
            "When Mary and John went to the store, John gave a drink to", "--depth", "2", "--top", "3"]
    runner = CliRunner()
    exported = runner.invoke(app, [*args, "--format", "neuronpedia"])
    assert exported.exit_code == 0, exported.output
    graph = json.loads(exported.stdout)
    validate(graph)
    traced = json.loads(runner.invoke(app, [*args, "--format", "json"]).stdout)
    assert graph["metadata"]["prompt_tokens"] == traced["tokens"] and graph["metadata"]["scan"] == "toy-ioi"
    node_at = {n["node_id"]: n for n in graph["nodes"]}
    start = node_at[graph["qParams"]["clickedId"]]
    assert f"{start['clerp'].split(' ')[0]}@{start['ctx_idx']}" == traced["start"]
    activation = {n["id"]: n["activation"] for n in traced["nodes"]}
    assert start["activation"] == activation[traced["start"]]
    total = sum(e["value"] for e in traced["edges"])
    assert sum(link["weight"] for link in graph["links"]) == pytest.approx(total, rel=1e-9)
    assert runner.invoke(app, [*args, "--format", "png"]).exit_code == 2


def _contributors(graph: dict) -> dict[str, dict[str, list]]:
    """Per attention node (catalog id @ pos): its qk_tracing_results with viewer ids read back as
    catalog ids @ pos (from each node's clerp), every list sorted."""
    nodes = {n["node_id"]: n for n in graph["nodes"]} | graph.get("qk_only_nodes", {})
    name = lambda i: f"{nodes[i]['clerp'].split(' (')[0]}@{nodes[i]['ctx_idx']}"  # noqa: E731
    out = {}
    for n in graph["nodes"]:
        if "qk_tracing_results" in n:
            r = n["qk_tracing_results"]
            out[name(n["node_id"])] = {
                "pairs": sorted((name(q), name(k), v) for q, k, v in r["pair_wise_contributors"]),
                "q": sorted((name(q), v) for q, v in r["top_q_marginal_contributors"]),
                "k": sorted((name(k), v) for k, v in r["top_k_marginal_contributors"])}
    return out


def _name(node: str, layer: int, head: int, pos: int) -> str:
    """A trace's QK contributor as the export labels it: the head's biases are qk-only nodes."""
    return f"H{layer}.{head} {'query' if node == 'b_Q' else 'key'} bias@{pos}" if node in ("b_Q", "b_K") else node


def test_trace_qk_lands_on_the_attention_features_its_scores_explain():
    """trace --qk --format neuronpedia: each attention node's qk_tracing_results holds exactly the
    terms `trace --qk --format json` gives for the scores (head, t, s) behind that node's edges."""
    from cli import app

    args = ["trace", "--model", "toy-ioi", "--saes", "toy-ioi", "--prompt",
            "When Mary and John went to the store, John gave a drink to", "--depth", "2", "--top", "3", "--qk"]
    runner = CliRunner()
    exported = runner.invoke(app, [*args, "--format", "neuronpedia"])
    assert exported.exit_code == 0, exported.output
    graph = json.loads(exported.stdout)
    validate(graph)
    ct_viewer.graph_models().Model(**graph)
    traced = json.loads(runner.invoke(app, [*args, "--format", "json"]).stdout)
    want: dict = defaultdict(lambda: {"pairs": [], "q": [], "k": []})
    for e in traced["edges"]:
        dst, head = e["target"], e.get("head")
        if not dst.startswith("A") or head is None:
            continue
        layer, t, s = int(dst[1:].split(".")[0]), int(dst.split("@")[1]), int(e["source"].split("@")[1])
        for score in traced["qk"]:
            if (score["layer"], score["head"], score["query_pos"], score["key_pos"]) == (layer, head, t, s):
                mine = want[dst]
                if (head, s) in mine.setdefault("scores", set()):
                    continue
                mine["scores"].add((head, s))
                mine["pairs"] += [(_name(p["query"], layer, head, t), _name(p["key"], layer, head, s), p["value"])
                                  for p in score["pairs"]]
                mine["q"] += [(_name(m["node"], layer, head, t), m["value"]) for m in score["query_side"]]
                mine["k"] += [(_name(m["node"], layer, head, s), m["value"]) for m in score["key_side"]]
    want = {dst: {side: sorted(w[side]) for side in ("pairs", "q", "k")} for dst, w in want.items()}
    assert want and _contributors(graph) == want


def test_stored_qk_lands_on_the_attention_features_its_scores_explain(tmp_path):
    """GET /prompts/{uid}/graph?format=neuronpedia over a toy ingest: each attention node's
    qk_tracing_results are the prompt's stored QK observations (all_evidence, read here) of the scores
    (layer, head, t, s) behind its exported edges; pair = qk, q marginal = q_in, k marginal = k_in."""
    from catalog import queries
    from catalog.stores import open_store
    from ingest.jobs import JobOptions, run_job
    from ingest.model_with_saes import ModelWithSaes

    store = open_store(f"sqlite:///{tmp_path}/c.db", evidence_per_edge=None)
    run_job(ModelWithSaes.open("toy-ioi", ["toy-ioi"], "cpu"), "ioi:2:3", store,
            JobOptions(run="q", progress=False, mine=False))
    uid = "q/ioi-3-000001"
    graph = queries.prompt_graph_neuronpedia(store, uid, limit=400)
    validate(graph)
    ct_viewer.graph_models().Model(**graph)
    ref = lambda u, pos: f"{u.split('|')[2]}@{pos}"  # noqa: E731
    behind: dict = defaultdict(set)  # (layer, head, t, s) -> attention nodes whose exported edges went through it
    for e in queries.prompt_graph(store, uid, limit=400)["edges"]:
        if e["target"].startswith("A") and e["head"] is not None:
            layer = int(e["target"][1:].split(".")[0])
            behind[(layer, e["head"], int(e["target"].split("@")[1]), int(e["source"].split("@")[1]))].add(e["target"])
    want: dict = defaultdict(lambda: {"pairs": [], "q": [], "k": []})
    for v in store.all_evidence():
        if v.prompt != uid or v.kind not in ("q_in", "k_in", "qk"):
            continue
        layer = int(v.src.split("|")[2][1:].split(".")[0])
        for node in behind.get((layer, v.head, v.dst_pos, v.src_pos), ()):
            if v.kind == "qk":
                want[node]["pairs"].append((ref(v.src, v.dst_pos), ref(v.dst, v.src_pos), queries.rnd(v.value)))
            else:
                want[node]["q" if v.kind == "q_in" else "k"].append(
                    (ref(v.src, v.dst_pos if v.kind == "q_in" else v.src_pos), queries.rnd(v.value)))
    want = {node: {side: sorted(w[side]) for side in ("pairs", "q", "k")} for node, w in want.items()}
    assert want and _contributors(graph) == want
