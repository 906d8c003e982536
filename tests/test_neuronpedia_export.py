"""Issue 13: per-prompt graphs exported as the attribution-graph JSON Neuronpedia and circuit-tracer's
frontend read, validated against the published schema (restated in tests/schemas/)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import jsonschema
import pytest
from fastapi.testclient import TestClient
from test_store_conformance import _batches, _fill
from typer.testing import CliRunner

from api.app import create_app
from api.settings import Settings
from catalog.prompt_graphs import to_neuronpedia

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


def test_attention_and_residual_nodes_of_one_layer_never_collide():
    edges = [{"source": "R1.3@2", "target": "A1.3@2", "value": 0.5, "head": 0},
             {"source": "R1.3@2", "target": "A1.3@2", "value": 0.25, "head": 1},
             {"source": "R1.ERR@2", "target": "A1.3@2", "value": -0.125, "head": 2},
             {"source": "A1.ERR@2", "target": "R2.3@2", "value": 2.0, "head": None},
             {"source": "A1.3@2", "target": "R2.3@2", "value": 1.0, "head": None},
             {"source": "EMB@0", "target": "R1.3@2", "value": 0.75, "head": None},
             {"source": "POS@0", "target": "R1.3@2", "value": 0.0625, "head": None},
             {"source": "MLP1@2", "target": "R2.3@2", "value": -1.5, "head": None},
             {"source": "REST@2", "target": "A1.3@2", "value": 0.01, "head": None}]
    graph = to_neuronpedia(prompt="x y z", tokens=["<bos>", "x", "y"], edges=edges, scan="gpt2-small", slug="t",
                           saes=["r:a", "r:b"], activations={"A1.3@2": 2.5}, clicked="A1.3@2")
    validate(graph)
    by_clerp = {n["clerp"].split(" ")[0]: n for n in graph["nodes"]}
    # rows: E; R{L} at 3L+1; A{L} at 3L+2; MLP{L} at 3L+3 (hand-computed from the rule)
    assert {k: (n["node_id"], n["layer"], n["feature"], n["ctx_idx"]) for k, n in by_clerp.items()} == {
        "R1.3": ("4_3_2", "4", 3, 2), "A1.3": ("5_3_2", "5", 3, 2), "R1.ERR": ("4_-1_2", "4", -1, 2),
        "A1.ERR": ("5_-1_2", "5", -1, 2), "R2.3": ("7_3_2", "7", 3, 2), "EMB": ("E_emb_0", "E", None, 0),
        "POS": ("E_pos_0", "E", None, 0), "MLP1": ("6_mlp_2", "6", None, 2), "REST": ("5_rest_2", "5", None, 2)}
    assert by_clerp["A1.3"]["activation"] == 2.5 and by_clerp["R1.3"]["activation"] is None
    assert by_clerp["A1.3"]["feature_type"] == "attention sae feature"
    assert by_clerp["R1.3"]["feature_type"] == "residual sae feature"
    links = {(link["source"], link["target"]): link["weight"] for link in graph["links"]}
    assert links[("4_3_2", "5_3_2")] == 0.75  # heads 0 and 1 summed: 0.5 + 0.25
    assert len(links) == 8
    assert graph["qParams"]["clickedId"] == "5_3_2" and graph["qParams"]["pinnedIds"] == ["5_3_2"]
    assert graph["metadata"]["prompt_tokens"] == ["<bos>", "x", "y"] and graph["metadata"]["scan"] == "gpt2-small"


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
