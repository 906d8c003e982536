"""Issue 15 §2: QK attribution at ingest. Stored q_in / k_in / qk edges against TransformerLens's own
hook_attn_scores, hook_q and hook_k (nothing here calls the code under test for expected values):

    score[h, t, s] = sum of q_in over the query side + b_Q[h] . k[s, h] / sqrt(d_head)
                   = sum of k_in over the key side + q[t, h] . b_K[h] / sqrt(d_head)
                   = sum of qk over all pairs + the two bias sides - b_Q[h] . b_K[h] / sqrt(d_head)

(the q_in of a query-side node holds its pairs with every key-side node plus its term with b_K).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
import torch

from catalog import queries
from catalog.ids import parse_ref
from catalog.schema import ROLES
from catalog.stores import open_store
from ingest.jobs import JobOptions, run_job
from ingest.model_with_saes import ModelWithSaes
from ingest.rdfa.tensors import Pruning

RTOL = 1e-4


@pytest.fixture(scope="module")
def toy():
    return ModelWithSaes.open("toy-ioi", ["toy-ioi"], "cpu")


@pytest.fixture(scope="module")
def exact(toy, tmp_path_factory):
    """A catalog with every observation kept: no pruning, no evidence cap."""
    url = f"sqlite:///{tmp_path_factory.mktemp('qk')}/c.db"
    store = open_store(url, evidence_per_edge=None)
    run_job(toy, "ioi:3:7", store, JobOptions(run="q", progress=False, mine=False,
                                              pruning=Pruning(top_k=None, min_abs=0.0, direct_positions=2)))
    return store


@pytest.fixture(scope="module")
def pruned(toy, tmp_path_factory):
    """A catalog pruned as by default, with every observation of the kept edges as evidence."""
    url = f"sqlite:///{tmp_path_factory.mktemp('qk')}/p.db"
    store = open_store(url, evidence_per_edge=None)
    run_job(toy, "ioi:3:7", store, JobOptions(run="q", progress=False, mine=False))
    return store


def _sums(store) -> dict:
    """(prompt, layer, head, t, s) -> {kind: summed value} over every stored QK observation."""
    out: dict = defaultdict(lambda: defaultdict(float))
    for v in store.all_evidence():
        if v.kind in ("q_in", "k_in", "qk"):
            layer = parse_ref(v.dst.split("|")[2]).layer
            out[(v.prompt, layer, v.head, v.dst_pos, v.src_pos)][v.kind] += v.value
    return out


def test_stored_qk_edges_add_up_to_the_models_attention_scores(toy, exact):
    model = toy.lm.model
    prompts = {p.uid: p for p in exact.all_prompts()}
    sums = _sums(exact)
    assert len(sums) > 50
    checked = 0
    for uid, prompt in prompts.items():
        with torch.no_grad():
            _, cache = model.run_with_cache(torch.tensor([toy.lm.tokenizer.encode(prompt.text)]))
        for (p, layer, h, t, s), by_kind in sums.items():
            if p != uid:
                continue
            attn = model.blocks[layer].attn
            b_Q, b_K = attn.b_Q.detach(), attn.b_K.detach()
            scale = attn.attn_scale
            score = float(cache[f"blocks.{layer}.attn.hook_attn_scores"][0, h, t, s])
            q, k = cache[f"blocks.{layer}.attn.hook_q"][0, t, h], cache[f"blocks.{layer}.attn.hook_k"][0, s, h]
            query_bias_side = float(b_Q[h] @ k) / scale  # b_Q with the whole key side
            key_bias_side = float(q @ b_K[h]) / scale
            both_biases = float(b_Q[h] @ b_K[h]) / scale
            assert by_kind["q_in"] + query_bias_side == pytest.approx(score, rel=RTOL, abs=1e-4)
            assert by_kind["k_in"] + key_bias_side == pytest.approx(score, rel=RTOL, abs=1e-4)
            assert by_kind["qk"] + query_bias_side + key_bias_side - both_biases == pytest.approx(score, rel=RTOL,
                                                                                                 abs=1e-4)
            checked += 1
    assert checked == len(sums)


def test_scores_decomposed_are_those_of_the_kept_attention_edges(exact):
    """Each decomposed (prompt, layer, head, t, s) carries an attn_in or direct edge, and each of those
    edges' scores was decomposed."""
    heads = {(v.prompt, parse_ref(v.dst.split("|")[2]).layer, v.head, v.dst_pos, v.src_pos)
             for v in exact.all_evidence() if v.kind in ("attn_in", "direct") and v.head is not None}
    assert set(_sums(exact)) == heads


def test_heads_are_nodes_and_their_qk_is_queryable(exact):
    head = next(e.dst for e in exact.all_edges(("k_in",)))
    ref = head.split("|")[2]
    assert parse_ref(ref).kind.value == "head"
    up = queries.upstream(exact, ref, edge_kinds=["k_in"], limit=5)
    assert up and all(r["edge_kind"] == "k_in" for r in up)
    q_side = queries.upstream(exact, ref, edge_kinds=["q_in"], limit=5)
    assert q_side and all(r["edge_kind"] == "q_in" for r in q_side)


def test_head_qk_answers_from_all_observations_and_alike_on_both_stores(pruned, neo4j_url):
    """GET /heads/{ref}/qk: each side and the pairs against plain sums of every stored observation,
    and the same JSON from Neo4j (the catalog exported there)."""
    from conftest import wipe_neo4j
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import Settings
    from catalog.export import copy_catalog

    evidence = list(pruned.all_evidence())
    head_uid = max({v.dst for v in evidence if v.kind == "k_in"},
                   key=lambda u: (sum(1 for v in evidence if v.dst == u), u))
    ref = head_uid.split("|")[2]
    layer, head = parse_ref(ref).layer, parse_ref(ref).index
    answer = queries.head_qk(pruned, ref, limit=5)
    for side, kind in (("query_side", "q_in"), ("key_side", "k_in")):
        total: dict = defaultdict(float)
        for v in evidence:
            if v.kind == kind and v.dst == head_uid:
                total[v.src.split("|")[2]] += v.value
        best = sorted(total, key=lambda r: (-round(abs(total[r]), 9), r))[:5]
        assert [row["id"] for row in answer[side]] == best
        assert [row["sum"] for row in answer[side]] == [queries.rnd(total[r]) for r in best]
        assert all(row["roles"] for row in answer[side])
    pairs: dict = defaultdict(float)
    for v in evidence:
        if v.kind == "qk" and v.head == head and parse_ref(v.src.split("|")[2]).layer == layer:
            pairs[(v.src, v.dst)] += v.value
    best = sorted(pairs, key=lambda k: (-round(abs(pairs[k]), 9), k))[:5]
    assert [(p["query"], p["key"]) for p in answer["pairs"]] == [(a.split("|")[2], b.split("|")[2]) for a, b in best]
    assert [p["value"] for p in answer["pairs"]] == [queries.rnd(pairs[k]) for k in best]
    wipe_neo4j(neo4j_url)
    copy_catalog(pruned, open_store(neo4j_url, evidence_per_edge=None))
    bodies = []
    for url in (pruned.url, neo4j_url):
        with TestClient(create_app(Settings(store=url, warm_patterns=False))) as client:
            r = client.get(f"/heads/{ref}/qk", params={"limit": 5})
            assert r.status_code == 200 and "logits" in r.json()["units"]
            bodies.append(r.content)
            assert client.get("/heads/A1.2/qk").status_code == 404  # not a head
            assert client.get("/heads/H1.x/qk").status_code == 422
    assert bodies[0] == bodies[1]
    # docs/catalog.md's QK walk, on the live server, against the stored roles read through the store
    text = (Path(__file__).parent.parent / "docs" / "catalog.md").read_text()
    walk = text.split("A QK walk", 1)[1].split("```cypher\n", 1)[1].split("```", 1)[0]
    k_in = [e for e in pruned.all_edges(("k_in",)) if "S1->END" in e.roles]
    walked = max({e.dst for e in k_in}, key=lambda u: (sum(e.roles["S1->END"][1] for e in k_in if e.dst == u), u))
    walk = "\n".join(line for line in walk.splitlines() if not line.startswith("//"))
    rows = open_store(neo4j_url).cypher(walk.replace("'H1.3'", f"'{walked.split('|')[2]}'"), {}, 100, 10.0)
    code = ROLES.index("S1->END")
    toward = {e.src.split("|")[2]: e.roles["S1->END"][1] for e in k_in if e.dst == walked}
    best = sorted(toward, key=lambda r: (-toward[r], r))[:10]
    assert code == 18 and [r["key_side"] for r in rows] == best and best
    assert [round(r["toward_s1"], 6) for r in rows] == [round(toward[r], 6) for r in best]
    wipe_neo4j(neo4j_url)
