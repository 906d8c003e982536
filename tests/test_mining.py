"""Mining on a hand-built catalog with planted compositions: a direct pair and a pair through one
residual feature recur on 30 of 60 prompts; everything else is random noise."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from catalog.ids import parse_ref
from catalog.mining import mine, null_z
from catalog.queries import rnd
from catalog.schema import EDGE_KINDS, NodeInfo, Prompt
from catalog.stores import open_store
from ingest.reduce import Activations, Observations
from ingest.to_catalog import aggregate_rows

KINDS = list(EDGE_KINDS)
REFS = [f"A{l}.{i}" for l in range(3) for i in range(12)] + [f"R{l}.{i}" for l in range(3) for i in range(12)]


def _catalog(url: str, chain: bool = False, mlp: bool = False):
    rng = random.Random(7)
    infos = [NodeInfo.of("toy", "rel", parse_ref(r)) for r in [*REFS, "H1.2", "H1.1", "T1.4", "T1.ERR"]]
    idx = {n.ref: i for i, n in enumerate(infos)}
    # the token at 9 repeats the token at 2: the planted direct pair (2 -> 9) reads a duplicate token
    prompts = [Prompt(f"m/p{i:03d}", "m", f"p{i:03d}", f"prompt {i}", [f"t{j}" for j in range(9)] + ["t2"], "t",
                      f"h{i}") for i in range(60)]
    rows = []  # (prompt index, src, dst, kind, head, src_pos, dst_pos, value)
    for p in range(60):
        if p % 2 == 0:  # the planted patterns, on every even prompt
            rows.append((p, "A0.5", "A2.7", "direct", 3, 2, 9, 1.5 + 0.1 * rng.random()))
            rows.append((p, "A0.3", "R1.4", "resid_in", -1, 4, 4, 2.0))
            rows.append((p, "R1.4", "A1.9", "attn_in", 1, 4, 8, 1.2))
            rows.append((p, "R1.4", "H1.2", "k_in", 2, 4, 8, 0.7))  # R1.4 on the key side of head 1.2's scores
            if mlp:  # A0.8 builds the transcoder feature T1.4 at 8 (with T1.ERR's help), which A2.7 reads from 8 at 9
                rows.append((p, "A0.8", "T1.4", "mlp_in", -1, 8, 8, 1.5))
                rows.append((p, "T1.ERR", "T1.4", "mlp_in", -1, 8, 8, 0.5))
                rows.append((p, "T1.4", "A2.7", "direct", 0, 8, 9, 0.8))
            if chain:  # R1.4 also on the key side of head 1.1, which writes A1.9; A1.9 feeds A2.7
                rows.append((p, "R1.4", "H1.1", "k_in", 1, 4, 8, 0.9))
                rows.append((p, "A1.9", "A2.7", "direct", 3, 8, 9, 1.1))
        for _ in range(20):  # noise among the other features
            src, dst = rng.choice(REFS[12:36] + REFS[36:]), rng.choice(REFS[13:36])
            if parse_ref(src).layer < parse_ref(dst).layer or src[0] == "R":
                kind = "resid_in" if dst[0] == "R" else rng.choice(["direct", "attn_in"])
                rows.append((p, src, dst, kind, rng.randrange(4), rng.randrange(10), rng.randrange(10), rng.gauss(0, 0.3)))
    a = lambda i, dt=torch.long: torch.tensor([r[i] if i not in (1, 2) else idx[r[i]] for r in rows], dtype=dt)  # noqa: E731
    obs = Observations(a(0), a(1), a(2), torch.tensor([KINDS.index(r[3]) for r in rows]), a(4), a(5), a(6),
                       a(7, torch.float64))
    acts = Activations(torch.cat([obs.src, obs.dst]), torch.cat([obs.prompt, obs.prompt]),
                       torch.ones(2 * len(rows), dtype=torch.float64))
    store = open_store(url, evidence_per_edge=None)
    store.start_run("m", {}, resume=False)
    store.write_window(aggregate_rows(obs, acts, infos, "m", prompts, None))
    return store


def test_planted_direct_and_via_resid_compositions_are_found_above_the_null(store_url):
    store = _catalog(store_url)
    result = mine(store, top=10, min_prompts=5)
    pairs = {(p["source"], p["target"], p["path"]): p for p in result["pairs"]}
    direct = pairs[("A0.5", "A2.7", "direct")]
    assert direct["n_prompts"] == 30 and direct["sign_share"] == 1.0 and list(direct["heads"]) == ["3"]
    assert direct["z_score"] > 3  # recurs far more often than shuffled prompt assignments would give
    via = pairs[("A0.3", "A1.9", "via_resid")]
    assert via["via"] == ["R1.4"] and via["n_prompts"] == 30
    assert via["total"] == pytest.approx(30 * 1.2 * (60.0 / 60.0), rel=1e-4)  # A0.3 is all of R1.4's input
    assert [e["prompt"] for e in via["exemplars"]] == ["m/p000", "m/p002", "m/p004"]
    assert {(p["source"], p["target"]) for p in result["pairs"]} == {("A0.5", "A2.7"), ("A0.3", "A1.9")}
    # with every pair admitted, the noise shows up, and the planted pairs still outrank all of it
    everything = mine(store, top=100, min_prompts=1)["pairs"]
    noise = [p for p in everything if p["source"] not in ("A0.5", "A0.3")]
    assert len(noise) > 10
    assert {(p["source"], p["target"]) for p in everything[:2]} == {("A0.5", "A2.7"), ("A0.3", "A1.9")}
    assert max(abs(p["total"]) for p in noise) < min(direct["total"], via["total"])


def test_a_composition_through_an_mlp_is_found_with_its_null_and_positions(store_url):
    """With transcoders: A0.8 -mlp_in-> T1.4 -direct-> A2.7 on the 30 even prompts is a via_mlp pair ranked
    among the V pairs, with A0.8's share of T1.4's input (1.5 of 2.0) times T1.4's attribution to A2.7 as its
    total, its prompts counted where both hops meet at T1.4's position, the null and where its attention
    (the direct hop, 8 -> 9: offset 1, previous token) reads."""
    store = _catalog(store_url, mlp=True)
    result = mine(store, top=10, min_prompts=5)
    pairs = {(p["source"], p["target"], p["path"]): p for p in result["pairs"]}
    via = pairs[("A0.8", "A2.7", "via_mlp")]
    assert via["via"] == ["T1.4"] and via["n_prompts"] == 30 and list(via["heads"]) == ["0"]
    assert via["total"] == pytest.approx(30 * 0.8 * 1.5 / 2.0, rel=1e-6)
    assert via["z_score"] > 3
    assert via["position"]["offset"]["role"] == "offset 1" and via["position"]["relation"]["role"] == "previous"
    assert [e["prompt"] for e in via["exemplars"]] == ["m/p000", "m/p002", "m/p004"]
    everything = mine(store, 100, 1)["pairs"]
    assert [p["source"] for p in everything if p["path"] == "via_mlp"] == ["A0.8"]  # never an error node


def test_null_baseline_separates_recurrence_from_chance():
    # 30 shared prompts out of 60 when each fires on 30: exactly chance would be 15
    assert null_z(30, 30, 30, 60) == pytest.approx(7.68, abs=0.01)
    assert null_z(15, 30, 30, 60) == pytest.approx(0.0, abs=1e-9)
    assert null_z(5, 60, 30, 60) is None  # a feature on every prompt: the shuffle changes nothing
    # check the closed form against an actual shuffle of prompt assignments
    rng = np.random.default_rng(0)
    src = np.zeros(60, bool)
    src[:30] = True
    shared = [int((src & rng.permutation(src)).sum()) for _ in range(20000)]
    assert np.mean(shared) == pytest.approx(15.0, abs=0.05)
    assert (30 - np.mean(shared)) / np.std(shared) == pytest.approx(7.68, rel=0.02)


def test_pairs_name_where_their_attention_reads_against_the_base_rate(store_url):
    """Issue 15 §4: each pair's dominant relation, offset and role pair with its |value| share, and
    the base rate of that role over every attention observation (computed here from the rows)."""
    store = _catalog(store_url)
    result = mine(store, top=10, min_prompts=5)
    pairs = {(p["source"], p["target"], p["path"]): p for p in result["pairs"]}
    direct = pairs[("A0.5", "A2.7", "direct")]["position"]
    assert direct["relation"]["role"] == "duplicate" and direct["relation"]["share"] == 1.0
    assert direct["offset"] == {"role": "offset 4-7", "share": 1.0, "base": result["base_rates"]["offset 4-7"]}
    assert direct["pair"] is None  # these prompts name no IOI positions
    via = pairs[("A0.3", "A1.9", "via_resid")]["position"]
    assert via["offset"]["role"] == "offset 4-7" and via["offset"]["share"] > 0.9  # R1.4@4 -> A1.9@8
    # the base rate of duplicate reading, from the stored aggregates and from the rows themselves
    prompts = {p.uid: p for p in store.all_prompts()}
    attn = [v for v in store.all_evidence() if v.kind in ("attn_in", "direct")]
    dup = sum(abs(v.value) for v in attn if v.head is not None and v.src_pos != v.dst_pos
              and prompts[v.prompt].tokens[v.src_pos] == prompts[v.prompt].tokens[v.dst_pos])
    assert direct["relation"]["base"] == rnd(dup / sum(abs(v.value) for v in attn)) < 0.5


def test_k_composition_through_a_residual_feature_on_the_key_side(store_url):
    """A0.3 is all of R1.4's input, and R1.4 sits on the key side of head H1.2's scores on the even
    prompts: a K-composition pair A0.3 -> H1.2 of 30 x 0.7 logits, chained at the key position."""
    result = mine(_catalog(store_url), top=10, min_prompts=5)
    qk = {(p["source"], p["target"], p["path"]): p for p in result["qk_pairs"]}
    pair = qk[("A0.3", "H1.2", "k_via_resid")]
    assert pair["via"] == ["R1.4"] and pair["n_prompts"] == 30 and pair["heads"] == {"2": rnd(30 * 0.7)}
    assert pair["total"] == pytest.approx(30 * 0.7, rel=1e-6)
    assert pair["position"]["offset"]["role"] == "offset 4-7" and [e["prompt"] for e in pair["exemplars"]] == \
        ["m/p000", "m/p002", "m/p004"]
    assert all(p["path"] != "k_via_resid" for p in result["pairs"])  # logits never rank among V pairs


def test_a_k_composition_chain_through_the_head_that_writes_a_feature(store_url):
    """A0.3 -> R1.4 on head 1.1's key side; head 1.1 writes A1.9 (all of its per-head attribution);
    A1.9 feeds A2.7 directly: the chain A0.3 -> H1.1 -> A1.9 -> A2.7 with each hop's numbers."""
    result = mine(_catalog(store_url, chain=True), top=50, min_prompts=5)
    found = [c for c in result["qk_chains"] if c["chain"] == ["A0.3", "H1.1", "A1.9", "A2.7"]]
    assert len(found) == 1
    c = found[0]
    assert c["paths"] == ["k_via_resid", "writes", "direct"] and c["head_share"] > 0.9
    assert c["qk_total"] == pytest.approx(30 * 0.9, rel=1e-6)
    assert c["v_total"] == pytest.approx(30 * 1.1, rel=1e-6)
    assert c["score"] == rnd(abs(c["qk_total"]) * c["head_share"] * abs(c["v_total"]))
    assert not [c for c in result["qk_chains"] if c["chain"][1] == "H1.2"]  # head 1.2 writes no feature here
