"""Issue 2: torch-free catalog/api, model and SAE loading, offline failures, the shipped toy."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import TINY_CFG

from catalog.ids import NodeKind
from ingest.errors import LoadError
from ingest.models import TOY_DIR, load_local_model, load_model, save_local_model
from ingest.saes import load_sae_dir, load_saes

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "cli"]


def test_catalog_and_api_never_import_torch():
    code = ("import sys, catalog, api, cli, catalog.queries, catalog.mining, catalog.export, "
            "catalog.stores.sqlite, catalog.stores.neo4j, api.app;"
            "heavy = [m for m in ('torch', 'transformer_lens', 'sae_lens') if m in sys.modules];"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_catalog_imports_neither_ingest_nor_api_nor_the_cli():
    """The rooms' dependencies run one way: cli -> (api, ingest) -> catalog."""
    import ast

    for path in (ROOT / "catalog").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] in ("ingest", "api", "cli")], (path, names)


def test_no_module_imports_itself_through_others():
    """No import circles among the project's modules (deferred imports inside functions count too): a
    newcomer reads a room's modules in one order. bench/ scripts import each other by bare name."""
    import ast

    import networkx as nx

    graph = nx.DiGraph()
    for room in ("catalog", "ingest", "api", "cli", "bench"):
        for path in (ROOT / room).rglob("*.py"):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
                for name in names:
                    target = f"bench.{name}" if room == "bench" and (ROOT / "bench" / f"{name}.py").exists() else name
                    if (ROOT / (target.replace(".", "/") + ".py")).exists():
                        graph.add_edge(module, target)
    assert graph.number_of_edges() > 100  # the walk found the project's imports
    assert list(nx.simple_cycles(graph)) == []


def test_each_store_reads_in_one_module_and_writes_in_another():
    """A store is <store>_connection.py (driver, schema), <store>_read.py and <store>_write.py: no query
    string of a read module changes the catalog, and the write modules are where the writes are."""
    import ast

    statement = re.compile(r"\b(INSERT|UPDATE|DELETE|DROP|CREATE|MERGE|REMOVE|DETACH)\b|\bSET [\w.]+ ?=|\bBEGIN\b")
    for store in ("sqlite", "neo4j"):
        found = {}
        for part in ("read", "write"):
            tree = ast.parse((ROOT / "catalog" / "stores" / f"{store}_{part}.py").read_text())
            docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                          if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef) and n.body
                          and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
            strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                       and id(n) not in docstrings]
            calls = [n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
            found[part] = [x for x in strings if statement.search(x)] + [c for c in calls if c in
                                                                         ("execute_write", "executemany", "commit")]
        assert found["read"] == [], (store, found["read"])
        assert len(found["write"]) > 5, store


def test_transformer_lens_is_used_through_one_module():
    """Imports of transformer_lens, forward passes with caches or hooks, and SAE hook names appear in
    ingest/lens.py only, so a move to TransformerLens 4 changes one file."""
    calls = re.compile(r"import transformer_lens|from transformer_lens|\.run_with_cache\(|\.run_with_hooks\(|"
                       r"\.load_and_process_state_dict\(|HookedTransformer\.from_pretrained\(|\"blocks\.\{")
    offenders = [f"{path.relative_to(ROOT)}:{n}" for room in ("catalog", "api", "ingest", "cli")
                 for path in (ROOT / room).rglob("*.py") if path.name != "lens.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if calls.search(line)]
    assert offenders == [], offenders


def test_help_lists_every_command_in_its_group():
    out = subprocess.run(CLI + ["--help"], capture_output=True, text=True, check=True,
                         env={**os.environ, "COLUMNS": "160"}).stdout
    groups = {"Query the catalog": ("upstream", "downstream", "edge", "top-features", "completeness", "feature", "features-on",
                                    "diff", "runs",
                                    "cypher", "export", "merge", "patterns", "mine"),
              "Compute (runs models)": ("make-toy", "trace", "ingest", "demo", "eval-saes", "spot-check"),
              "Serve": ("serve", "neo4j-server")}
    panels = re.split(r"^╭─ (.+?) ─", out, flags=re.M)
    listed = {panels[i].strip(): re.findall(r"^│ ([a-z][a-z0-9-]*) ", panels[i + 1], flags=re.M)
              for i in range(1, len(panels) - 1, 2)}
    for group, commands in groups.items():
        assert sorted(listed[group]) == sorted(commands), group


def test_local_model_round_trip_gives_identical_logits(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from ingest.models import build_processed

    torch.manual_seed(3)
    raw = HookedTransformer(HookedTransformerConfig(**{**TINY_CFG, "seed": 3}, device="cpu"))
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(TINY_CFG["d_vocab"])}, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    sd = {k: v.clone() for k, v in raw.state_dict().items()}
    save_local_model(tmp_path / "m", dict(TINY_CFG), sd, tok, name="tiny", bos_token="w0", revision="r1")
    loaded = load_local_model(tmp_path / "m", "cpu")
    tokens = torch.randint(0, TINY_CFG["d_vocab"], (2, 9))
    in_memory = build_processed(dict(TINY_CFG), sd, "cpu")
    assert torch.equal(loaded.model(tokens), in_memory(tokens))
    # processing must not change what the model computes (fold_ln etc. are exact rewrites)
    torch.testing.assert_close(torch.log_softmax(loaded.model(tokens), -1), torch.log_softmax(raw(tokens), -1),
                               atol=1e-4, rtol=1e-4)
    assert loaded.tokenizer.encode("w5 w7") == [0, 5, 7]


def test_sae_round_trip_matches_saelens(tmp_path):
    from sae_lens import SAE

    from ingest.toy.train import save_sae

    g = torch.Generator().manual_seed(0)
    w = {"W_enc": torch.randn(16, 24, generator=g), "b_enc": torch.randn(24, generator=g),
         "W_dec": torch.randn(24, 16, generator=g), "b_dec": torch.randn(16, generator=g)}
    save_sae(w, tmp_path / "blocks.1.hook_resid_pre", "blocks.1.hook_resid_pre", reshape=False)
    ours = load_sae_dir(tmp_path, "cpu", release="x")[0].weights
    theirs = SAE.load_from_disk(str(tmp_path / "blocks.1.hook_resid_pre"))
    x = torch.randn(5, 16, generator=g)
    assert torch.equal(ours.activation(ours.pre_activation(x)), theirs.encode(x))
    assert torch.equal(ours.decode(ours.activation(ours.pre_activation(x))), theirs(x))


def test_toy_loads_offline_with_its_saes():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    lm = load_model("toy-ioi")
    saes = load_saes(["toy-ioi"], lm.cfg)
    assert sorted(saes.attn) == sorted(saes.resid) == list(range(lm.cfg.n_layers))
    assert lm.processing == {"fold_ln": True, "center_writing_weights": True, "center_unembed": True,
                             "fold_value_biases": True}
    assert lm.cfg.normalization_type == "LNPre"


def test_transcoders_load_under_their_own_option_and_nowhere_else(tmp_path):
    """--transcoders toy-ioi loads three SAELens Transcoders (one per layer, keyed by their own release:id); a
    transcoder given as an SAE, an SAE given as a transcoder, and a skip transcoder are each one clear LoadError."""
    from sae_lens import SkipTranscoder, SkipTranscoderConfig
    from sae_lens.saes.sae import SAEMetadata

    lm = load_model("toy-ioi")
    saes = load_saes(["toy-ioi"], lm.cfg, transcoder_specs=["toy-ioi"])
    assert sorted(saes.transcoders) == [0, 1, 2] and len(saes.all()) == 9
    assert saes.key_of(NodeKind.TRANSCODER, 1) == "toy-ioi:blocks.1.ln2.hook_normalized"
    assert saes.transcoders[1].weights.W_dec.shape == (512, 64) and not saes.transcoders[1].weights.apply_b_dec_to_input
    toy_transcoders = str(TOY_DIR / "transcoders")
    with pytest.raises(LoadError, match="reads blocks.0.ln2.hook_normalized; pass transcoders with --transcoders"):
        load_saes([toy_transcoders], lm.cfg)
    with pytest.raises(LoadError, match="--transcoders .*toy-ioi-saes-folder: .* pass SAEs with --saes"):
        load_saes(["toy-ioi"], lm.cfg, transcoder_specs=[_link(tmp_path / "toy-ioi-saes-folder", TOY_DIR / "saes")])
    skip = SkipTranscoder(SkipTranscoderConfig(d_in=64, d_sae=8, d_out=64, apply_b_dec_to_input=False, metadata=SAEMetadata(
        hook_name="blocks.1.ln2.hook_normalized")))
    skip.save_model(tmp_path / "skip")
    with pytest.raises(LoadError, match="skip connection .W_skip.: not supported"):
        load_saes(["toy-ioi"], lm.cfg, transcoder_specs=[str(tmp_path / "skip")])


def _link(link, target) -> str:
    link.symlink_to(target)
    return str(link)


def test_mismatched_sae_is_refused_naming_both():
    from tiny import tiny_model

    model = tiny_model()
    with pytest.raises(LoadError) as exc:
        load_saes(["toy-ioi"], model.cfg)
    msg = str(exc.value)
    assert "blocks.0" in msg and "tiny-random" in msg and "64" in msg and "16" in msg


def test_offline_hub_model_fails_with_one_clear_line():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(CLI + ["trace", "--model", "gpt2-small", "--saes", "gpt2-small-res-jb",
                                "--prompt", "hi"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "could not fetch model 'gpt2-small'" in lines[0] and "--model PATH" in lines[0]


def test_offline_registry_sae_fails_with_a_clear_message():
    lm = load_model("toy-ioi")
    with pytest.raises(LoadError, match="could not fetch SAE gpt2-small-res-jb:blocks.0.hook_resid_pre"):
        load_saes(["gpt2-small-res-jb:blocks.0.hook_resid_pre"], lm.cfg)


def test_unknown_release_is_named():
    lm = load_model("toy-ioi")
    with pytest.raises(LoadError, match="not a directory on disk and not a SAELens release"):
        load_saes(["no-such-release"], lm.cfg)


def test_shipped_toy_has_learned_ioi_and_its_saes_reconstruct():
    """Held-out prompts (a seed the trainer never used); FVE through SAELens's own forward pass."""
    from sae_lens import SAE

    from ingest.toy.train import collect_activations, ioi_metrics
    from ingest.toy.vocab import build_tokenizer

    lm = load_model("toy-ioi")
    tok = build_tokenizer()
    m = ioi_metrics(lm.model, tok, n=400, seed=987654)
    assert m["ioi_accuracy"] >= 0.95 and m["ioi_logit_diff"] > 2.0
    acts = collect_activations(lm.model, tok, 300, seed=4242)
    for folder in sorted((TOY_DIR / "saes").iterdir()):
        sae = SAE.load_from_disk(str(folder))
        sae.turn_off_forward_pass_hook_z_reshaping()  # activations here are already flattened
        x = acts[folder.name]
        with torch.no_grad():
            recon = sae(x)
        fve = 1 - (recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        assert fve >= 0.8, (folder.name, float(fve))
    shipped = json.loads((TOY_DIR / "metrics.json").read_text())
    assert shipped["model"]["ioi_accuracy"] >= 0.95
    # each transcoder, through SAELens's Transcoder forward, rebuilds its MLP's output from the MLP's input
    pairs = {f"blocks.{l}.ln2.hook_normalized": f"blocks.{l}.hook_mlp_out" for l in range(lm.cfg.n_layers)}
    io = collect_activations(lm.model, tok, 300, seed=4242, names=[n for pair in pairs.items() for n in pair])
    folders = sorted((TOY_DIR / "transcoders").iterdir())
    assert [f.name for f in folders] == sorted(pairs)
    for folder in folders:
        transcoder = SAE.load_from_disk(str(folder))
        x, y = io[folder.name], io[pairs[folder.name]]
        with torch.no_grad():
            recon = transcoder(x)
        fve = 1 - (recon - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
        assert type(transcoder).__name__ == "Transcoder" and fve >= 0.9, (folder.name, float(fve))
        assert abs(float(fve) - shipped["transcoders"][folder.name]["fve"]) < 0.02  # what the docs report
