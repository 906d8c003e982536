"""Issue 7 on the toy model: numbers from real forward passes flag a broken SAE and pass an
identity-like one; frozen ablation equals DFA; results reach the catalog, CLI and API."""

from __future__ import annotations

import copy
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from catalog import queries
from catalog.ids import NodeKind
from catalog.stores import open_store
from ingest.evaluate import eval_saes, spot_check
from ingest.jobs import JobOptions, run_job
from ingest.model_with_saes import ModelWithSaes
from ingest.rdfa.types import SaeWeights


@pytest.fixture(scope="module")
def toy():
    return ModelWithSaes.open("toy-ioi", ["toy-ioi"], "cpu")


def _identity_like(layer: int, d: int) -> SaeWeights:
    eye = torch.eye(d)
    return SaeWeights(NodeKind.ATTN, layer, torch.cat([eye, -eye], 1), torch.zeros(2 * d), torch.cat([eye, -eye], 0),
                      torch.zeros(d))


def _zeroed_decoder(sae: SaeWeights) -> SaeWeights:
    broken = copy.copy(sae)
    broken.W_dec, broken.b_dec = torch.zeros_like(sae.W_dec), torch.zeros_like(sae.b_dec)
    return broken


def test_zeroed_decoder_is_flagged_and_identity_is_not(toy):
    session = copy.copy(toy)
    d = toy.lm.cfg.n_heads * toy.lm.cfg.d_head
    session.attn = {**toy.attn, 0: _identity_like(0, d), 1: _zeroed_decoder(toy.attn[1])}
    result = eval_saes(session, n=60, groups=[[0, 1]])
    rows = {(r["kind"], r["layer"]): r for r in result["saes"]}
    ident, broken = rows[("attn", 0)], rows[("attn", 1)]
    assert result["clean_logit_diff"] > 2
    assert ident["logit_diff"] == pytest.approx(result["clean_logit_diff"], abs=1e-3) and ident["kl"] < 1e-6
    assert ident["logit_diff_recovery"] == pytest.approx(1.0, abs=1e-3) and not ident["flagged"]
    assert broken["flagged"] and broken["kl"] > ident["kl"]
    # a zeroed decoder writes nothing; mean ablation writes the mean: they differ, and both are measured
    assert broken["logit_diff"] != broken["mean_ablation_logit_diff"]
    assert result["cross_sections"][0]["layers"] == [0, 1]
    assert result["cross_sections"][0]["logit_diff"] == pytest.approx(broken["logit_diff"], abs=1e-3)


def test_a_transcoder_is_spliced_in_for_its_mlp(toy):
    """eval-saes with transcoders: a transcoder that decodes to nothing is zero-ablating its MLP (compared with a
    plain TransformerLens hook that zeroes hook_mlp_out), and the shipped toy transcoders keep the task."""
    from ingest.lens import run_with_hooks

    session = ModelWithSaes.open("toy-ioi", ["toy-ioi"], "cpu", transcoder_specs=["toy-ioi"])
    session.transcoders = {**session.transcoders, 1: _zeroed_decoder(session.transcoders[1])}
    result = eval_saes(session, n=60, groups=[[0, 1]])
    rows = {(r["kind"], r["layer"]): r for r in result["saes"]}
    from ingest.evaluate import _batch, _prompts  # the same prompts eval_saes reads

    tokens, last, io, s = _batch(session, _prompts(session, "ioi", 60, 0))
    with torch.no_grad():
        logits = run_with_hooks(session.lm.model, tokens, [("blocks.1.hook_mlp_out", lambda act, hook: torch.zeros_like(act))])
    ar = torch.arange(len(tokens))
    zeroed = float((logits[ar, last, io] - logits[ar, last, s]).mean())
    assert rows[("transcoder", 1)]["logit_diff"] == pytest.approx(zeroed, abs=1e-4)
    for layer in (0, 2):
        kept = rows[("transcoder", layer)]
        assert not kept["flagged"] and abs(kept["logit_diff_recovery"] - 1) < 0.1 and kept["kl"] < 0.05


def test_frozen_ablation_equals_dfa_and_results_reach_the_catalog(toy, tmp_path):
    url = f"sqlite:///{tmp_path}/c.db"
    store = open_store(url)
    run_job(toy, "ioi:6", store, JobOptions(run="r", progress=False))
    result = spot_check(toy, store, "r", n=12)
    assert result["n"] == 12
    assert result["max_abs_frozen_minus_dfa"] < 1e-4
    assert len(result["edges"]) == 12 and all(abs(e["dfa"]) > 0 for e in result["edges"])
    dfa, unfrozen = [e["dfa"] for e in result["edges"]], [e["unfrozen"] for e in result["edges"]]
    assert result["unfrozen_correlation"] == pytest.approx(float(np.corrcoef(dfa, unfrozen)[0, 1]), abs=1e-5)
    assert result["unfrozen_mean_abs_error"] == pytest.approx(float(np.mean(np.abs(np.subtract(unfrozen, dfa)))),
                                                              rel=1e-5)


def test_frozen_ablation_of_transcoder_features_equals_dfa(tmp_path):
    """With transcoders, a transcoder feature zeroed in its MLP's output (read from the MLP's input) moves a later
    feature's pre-activation by exactly its stored edge (mlp_in into transcoder features, resid_in out of them)
    when everything else is frozen: a causal check of the transcoder edges, independent of RDFA's algebra."""
    session = ModelWithSaes.open("toy-ioi", ["toy-ioi"], "cpu", transcoder_specs=["toy-ioi"])
    store = open_store(f"sqlite:///{tmp_path}/t.db")
    run_job(session, "ioi:6", store, JobOptions(run="t", progress=False))
    result = spot_check(session, store, "t", n=60)
    rows = result["edges"]
    assert result["n"] == 60 and result["max_abs_frozen_minus_dfa"] < 1e-4
    from_t = [r for r in rows if r["source"].startswith("T")]
    into_t = [r for r in rows if r["target"].startswith("T")]
    assert len(from_t) >= 5 and len(into_t) >= 5, (len(from_t), len(into_t))
    assert all(abs(r["frozen"] - r["dfa"]) < 1e-4 and r["dfa"] != 0 for r in from_t + into_t)
    # a session without the run's transcoders checks only the edges it can recompute
    plain = spot_check(ModelWithSaes.open("toy-ioi", ["toy-ioi"], "cpu"), store, "t", n=20)
    assert plain["n"] == 20 and not any("T" in (r["source"][0], r["target"][0]) for r in plain["edges"])


def test_eval_saes_cli_stores_flags_that_features_and_edges_show(toy, tmp_path):
    url = f"sqlite:///{tmp_path}/c.db"
    store = open_store(url)
    run_job(toy, "ioi:4", store, JobOptions(run="r", progress=False))
    out = subprocess.run([sys.executable, "-m", "cli", "eval-saes", "--model", "toy-ioi", "--saes", "toy-ioi",
                          "--n", "40", "--store", url, "--plot", str(tmp_path / "p.png"), "--max-kl", "0"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "p.png").stat().st_size > 10_000
    # --max-kl 0: any spliced SAE changes the logits a little, so every SAE is flagged, and the
    # catalog says so next to features and edges
    feature = lambda uid, p: re.fullmatch(p + r"\d+", uid.split("|")[2])  # noqa: E731
    e = max((e for e in store.all_edges() if feature(e.src, r"R2\.") and feature(e.dst, r"A2\.")), key=lambda e: e.n_obs)
    edge = queries.edge(store, e.src.split("|")[2], e.dst.split("|")[2])
    assert edge["sae_flags"][e.dst.split("|")[2]]["flagged"] is True
    assert edge["through_flagged_sae"] == [e.src.split("|")[2], e.dst.split("|")[2]]
    feat = queries.feature(store, e.dst.split("|")[2])
    assert feat["sae_flags"]["flagged"] is True and feat["sae_flags"]["kl"] > 0
