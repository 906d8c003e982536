"""Issue 3 on the shipped toy: `trace --json` is complete at every node, checked against
pre-activations recomputed with SAELens's own encoder on TransformerLens's cache."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict

import pytest
import torch

from catalog.ids import parse_ref
from ingest.models import TOY_DIR, load_model

PROMPT = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def traced():
    out = subprocess.run([sys.executable, "-m", "cli", "trace", "--model", "toy-ioi", "--saes", "toy-ioi",
                          "--prompt", PROMPT, "--depth", "3", "--top", "4", "--json"],
                         capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout)


def _independent_pre(ref: str) -> float:
    from sae_lens import SAE

    r = parse_ref(ref)
    lm = load_model("toy-ioi")
    _, cache = lm.model.run_with_cache(torch.tensor([lm.tokenizer.encode(PROMPT)]))
    if r.kind.value == "attn":
        sae = SAE.load_from_disk(str(TOY_DIR / "saes" / f"blocks.{r.layer}.attn.hook_z"))
        x = cache[f"blocks.{r.layer}.attn.hook_z"][0, r.pos]  # [n_heads, d_head]: SAELens reshapes hook_z
    else:
        sae = SAE.load_from_disk(str(TOY_DIR / "saes" / f"blocks.{r.layer}.hook_resid_pre"))
        x = cache[f"blocks.{r.layer}.hook_resid_pre"][0, r.pos]
    _, sae_cache = sae.run_with_cache(x[None])  # SAELens's own encoder, read at its pre-activation hook
    return float(sae_cache["hook_sae_acts_pre"][0, r.index])


def test_tokens_are_the_tokenizers_spelling(traced):
    assert traced["tokens"][0] == "<|endoftext|>"
    assert traced["tokens"][1:] == ["When", "Mary", "and", "John", "went", "to", "the", "store", ",", "John", "gave",
                                    "a", "drink", "to"]


def test_default_start_is_the_most_active_top_layer_attention_feature_at_the_last_token(traced):
    start = parse_ref(traced["start"])
    assert start.kind.value == "attn" and start.layer == 2 and start.pos == len(traced["tokens"]) - 1


def test_every_decomposed_node_is_complete(traced):
    nodes = {n["id"]: n for n in traced["nodes"]}
    for name in ("edges", "direct_edges"):
        sums: dict = defaultdict(float)
        for e in traced[name]:
            sums[e["target"]] += e["value"]
        assert len(sums) >= (3 if name == "edges" else 1)
        for target, total in sums.items():
            pre = nodes[target]["pre_activation"]
            assert total == pytest.approx(pre, rel=1e-4, abs=1e-5), (name, target)
            assert pre == pytest.approx(_independent_pre(target), rel=1e-5, abs=1e-6)


def test_attention_edges_carry_heads_and_each_contribution_appears_once(traced):
    seen = set()
    for e in traced["edges"]:
        key = (e["source"], e["target"], e["head"])
        assert key not in seen
        seen.add(key)
        src = e["source"]
        if e["kind"] == "attn_in" and not src.startswith(("REST", "A")):
            assert e["head"] is not None
        if e["kind"] == "resid_in":
            assert e["head"] is None


def test_bad_feature_and_position_are_refused():
    base = [sys.executable, "-m", "cli", "trace", "--model", "toy-ioi", "--saes", "toy-ioi", "--prompt", PROMPT]
    out = subprocess.run(base + ["--feature", "A2.x"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "cannot parse node reference 'A2.x'" in out.stderr
    out = subprocess.run(base + ["--pos", "99"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "--pos 99 is outside" in out.stderr


def test_qk_splits_each_traced_heads_score_exactly():
    """`trace --qk`: for every head and (t, s) behind a traced attention edge, the terms shown plus the
    rest equal TransformerLens's own attention score, and each side's marginals add up to it too."""
    out = subprocess.run([sys.executable, "-m", "cli", "trace", "--model", "toy-ioi", "--saes", "toy-ioi",
                          "--prompt", PROMPT, "--depth", "2", "--top", "4", "--qk", "--json"],
                         capture_output=True, text=True, check=True, timeout=300)
    result = json.loads(out.stdout)
    lm = load_model("toy-ioi")
    _, cache = lm.model.run_with_cache(torch.tensor([lm.tokenizer.encode(PROMPT)]))
    heads = {(parse_ref(e["target"]).layer, e["head"], parse_ref(e["target"]).pos, parse_ref(e["source"]).pos)
             for e in result["edges"] if e["kind"] == "attn_in" and e["head"] is not None}
    assert heads and {(q["layer"], q["head"], q["query_pos"], q["key_pos"]) for q in result["qk"]} == heads
    for q in result["qk"]:
        want = float(cache[f"blocks.{q['layer']}.attn.hook_attn_scores"][0, q["head"], q["query_pos"], q["key_pos"]])
        assert q["score"] == pytest.approx(want, rel=1e-4, abs=1e-5)
        assert sum(p["value"] for p in q["pairs"]) + q["pairs_rest"] == pytest.approx(want, rel=1e-4, abs=1e-5)
        assert len(q["pairs"]) == 4 and q["units"].startswith("attention-score logits")
        assert all(p["query"].endswith(f"@{q['query_pos']}") or p["query"] == "b_Q" for p in q["pairs"])
        assert all(p["key"].endswith(f"@{q['key_pos']}") or p["key"] == "b_K" for p in q["pairs"])
    tree = subprocess.run([sys.executable, "-m", "cli", "trace", "--model", "toy-ioi", "--saes", "toy-ioi",
                           "--prompt", PROMPT, "--depth", "2", "--top", "4", "--qk"],
                          capture_output=True, text=True, check=True, timeout=300)
    assert "QK: why each traced head attended" in tree.stdout and "score" in tree.stdout
