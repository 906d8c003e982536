"""GPT-2 Small with the seed's SAELens releases, as a user runs it: docs/ingest.md's GPT-2 commands (the
README's three among them), typed as written, offline on a Hugging Face cache laid out as the Hub serves
it (tests/hub_fixture.py), into SQLite and a live Neo4j; the numbers against TransformerLens and SAELens
directly; the loader's bad input answered in one line."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import ct_viewer
import httpx
import pytest
from conftest import _free_port, wait_healthy
from hub_fixture import ATTN_RELEASE, MODEL_REPO, RESID_RELEASE, build
from test_neuronpedia_export import validate

ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).parent / "circuit-catalog")
INGEST_DOC = (ROOT / "docs" / "ingest.md").read_text()
GPT2_BLOCK = INGEST_DOC.split("### GPT-2 Small with the seed's SAEs")[1].split("```bash")[1].split("```")[0]
COMMANDS = [shlex.split(line) for line in GPT2_BLOCK.strip().splitlines()]
PROMPT = "When Mary and John went to the store, John gave a drink to"
TARGET, SOURCE = "A5.44256", "R5.101"  # the doc's placeholders


@pytest.fixture(scope="session")
def hub(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("hf-home"))


def run_cli(args: list[str], hub: Path, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hub), "HF_HUB_OFFLINE": "1", "CIRCUIT_CATALOG_TORCH_THREADS": "1"}
    args = [CLI if a == "circuit-catalog" else a for a in args]
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        pytest.fail(f"{shlex.join(args[1:])} exited {proc.returncode}:\n{proc.stderr[-3000:]}", pytrace=False)
    return proc


def readme_command(name: str, nth: int = 0) -> list[str]:
    return [c for c in COMMANDS if c[1] == name][nth]


def refs_main(hub: Path, repo_id: str) -> str:
    return (hub / "hub" / ("models--" + repo_id.replace("/", "--")) / "refs" / "main").read_text()


def test_the_documented_blocks_are_what_the_tests_run():
    """docs/ingest.md's block is what the tests below run, and the README's three GPT-2 lines are in it."""
    assert [c[1] for c in COMMANDS] == ["trace", "ingest", "ingest", "upstream", "downstream", "feature", "edge",
                                        "diff", "patterns", "eval-saes", "spot-check", "serve"]
    assert all(c[0] == "circuit-catalog" for c in COMMANDS)
    readme = (ROOT / "README.md").read_text().split("## GPT-2 Small with the seed's SAEs")[1]
    readme_lines = readme.split("```bash")[1].split("```")[0].strip().splitlines()
    assert len(readme_lines) == 3 and set(readme_lines) <= set(GPT2_BLOCK.strip().splitlines())


def test_trace_prints_parseable_json_and_neuronpedia_and_a_tree(hub, tmp_path):
    line = readme_command("trace")
    traced = json.loads(run_cli(line, hub, tmp_path).stdout)  # stdout holds the answer alone
    assert traced["prompt"] == PROMPT and traced["tokens"][0] == "<|endoftext|>" and traced["tokens"][-1] == " to"
    assert traced["start"].startswith("A11.") and traced["start"].endswith(f"@{len(traced['tokens']) - 1}")
    fmt = line.index("--format") + 1
    graph = json.loads(run_cli(line[:fmt] + ["neuronpedia"] + line[fmt + 1:], hub, tmp_path).stdout)
    assert graph["metadata"]["prompt_tokens"] == traced["tokens"] and graph["nodes"] and graph["links"]
    validate(graph)  # Neuronpedia's schema
    ct_viewer.graph_models().Model(**graph)  # circuit-tracer's graph model
    assert {n["layer"] for n in graph["nodes"]} <= {"E", *map(str, range(12))}  # the viewer's rows: GPT-2's layers
    tree = run_cli(line[:fmt - 1] + line[fmt + 1:], hub, tmp_path)
    assert tree.stdout.splitlines()[0].startswith(traced["start"]) and "Loaded pretrained" not in tree.stdout
    assert "left out blocks.11.hook_resid_post (reads blocks.11.hook_resid_post)" in tree.stderr


@pytest.mark.parametrize("backend", ["sqlite", "neo4j"])
def test_readme_gpt2_commands_end_to_end(hub, tmp_path, backend, request):
    url = "sqlite:///gpt2.db"
    if backend == "neo4j":
        from conftest import wipe_neo4j

        url = request.getfixturevalue("neo4j_url")
        wipe_neo4j(url)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "text": t}) + "\n" for i, t in enumerate(
        ["The cat sat on the mat because it was warm.", "When Anna and Paul went to the park, Paul gave a ball to",
         "Alice was tired, so she went to bed early."])))

    def typed(line: list[str], **subst: str) -> list[str]:
        return [subst.get(a, a).replace("sqlite:///gpt2.db", url) for a in line]

    summaries = [json.loads(run_cli(typed(c), hub, tmp_path).stdout) for c in COMMANDS if c[1] == "ingest"]
    assert [s["prompts"] for s in summaries] == [24, 3] and all(s["edges"] > 0 for s in summaries)

    from catalog import queries
    from catalog.stores import open_store

    store = open_store(url if backend == "neo4j" else f"sqlite:///{tmp_path}/gpt2.db", create=False)
    runs = {r.run_id: r.manifest for r in store.runs()}
    manifest = runs["gpt2-ioi"]
    assert manifest["model"]["repo_id"] == MODEL_REPO and manifest["model"]["revision"] == refs_main(hub, MODEL_REPO)
    repos = {ATTN_RELEASE: "ckkissane/attn-saes-gpt2-small-all-layers", RESID_RELEASE: "jbloom/GPT2-Small-SAEs-Reformatted"}
    assert len(manifest["saes"]) == 24
    for sae in manifest["saes"]:
        release = sae["key"].split(":")[0]
        assert sae["repo_id"] == repos[release] and sae["revision"] == refs_main(hub, repos[release])
    assert any("blocks.11.hook_resid_post" in n for n in manifest["saes_left_out"])

    # the most connected layer-5 attention feature and its strongest source (random SAEs at a narrow width:
    # their errors are the strongest sources, so that may be an error node)
    target = queries.top_features(store, kind="attn", layer=5, limit=1, runs=["gpt2-ioi"])[0]["id"]
    up = json.loads(run_cli(typed(readme_command("upstream"), **{TARGET: target}), hub, tmp_path).stdout)
    assert up == queries.upstream(store, target, runs=["gpt2-ioi"], limit=20)
    source = up[0]["id"]
    answers = {c[1]: json.loads(run_cli(typed(c, **{TARGET: target, SOURCE: source}), hub, tmp_path).stdout)
               for c in COMMANDS if c[1] in ("downstream", "feature", "edge", "diff", "patterns")}
    index = target.split(".")[1]
    assert answers["feature"]["neuronpedia"] == f"https://www.neuronpedia.org/gpt2-small/5-att-kk/{index}"
    resid_ref = queries.top_features(store, kind="resid", layer=5, limit=1, runs=["gpt2-ioi"])[0]["id"]
    resid = queries.feature(store, resid_ref, runs=["gpt2-ioi"])
    assert resid["neuronpedia"] == f"https://www.neuronpedia.org/gpt2-small/5-res-jb/{resid_ref.split('.')[1]}"
    # what both fire on: contexts in GPT-2's own tokens (a leading space kept), found again by token search
    for shown in (answers["feature"], resid):
        assert shown["contexts"] and shown["histogram"]
        c = shown["contexts"][0]
        tokens = store.prompt(c["prompt"]).tokens
        assert c["token"] == tokens[c["pos"]] and c["tokens"] == tokens[c["start"]:c["pos"] + 5]
        found = store.token_activations(c["token"], ["gpt2-ioi"], 1 << 20)  # every feature with one on the token
        assert shown["uid"] in [node.uid for node, _ in found]
    assert (answers["edge"]["source"], answers["edge"]["target"]) == (source, target) and answers["edge"]["kinds"]
    assert answers["downstream"] is not None and answers["diff"]["feature"] == target
    assert answers["patterns"]["runs"] == ["gpt2-ioi"] and "pairs" in answers["patterns"]

    spot = json.loads(run_cli(typed(readme_command("spot-check")), hub, tmp_path).stdout)
    assert spot["n"] > 0

    port = _free_port()
    server = subprocess.Popen([CLI, *typed(readme_command("serve"))[1:], "--port", str(port)], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, server)
        assert httpx.get(f"{base}/features/{target}", params={"run": "gpt2-ioi"}).json()["id"] == target
        page = httpx.get(f"{base}/view/feature/{target}")
        assert page.status_code == 200 and target in page.text and "gpt2-small/5-att-kk" in page.text
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_eval_saes_needs_no_residual_saes_and_reports_only_what_it_spliced(hub, tmp_path):
    out = run_cli(readme_command("eval-saes"), hub, tmp_path)
    result = json.loads(out.stdout)
    assert [(r["kind"], r["layer"]) for r in result["saes"]] == [("attn", l) for l in range(12)]
    assert [c["layers"] for c in result["cross_sections"]] == [[0, 3], [2, 4], [5, 6], [7, 8], [9, 10, 11]]
    one = run_cli(["circuit-catalog", "eval-saes", "--model", "gpt2-small", "--saes", f"{ATTN_RELEASE}:blocks.5.hook_z",
                   "--n", "8", "--json"], hub, tmp_path)
    single = json.loads(one.stdout)
    assert [(r["kind"], r["layer"]) for r in single["saes"]] == [("attn", 5)]
    assert single["cross_sections"] == []  # no group of the seed's is whole with one layer's SAE
    assert {tuple(s["layers"]) for s in single["skipped_cross_sections"]} == {(0, 3), (2, 4), (5, 6), (7, 8), (9, 10, 11)}
    assert "cross-section [5, 6] skipped: no attention SAE at layers [6]" in run_cli(
        [a for a in one.args if a != "--json"], hub, tmp_path).stderr


def test_trace_edges_equal_transformerlens_and_saelens(hub, tmp_path):
    """Every edge the trace keeps into its start feature equals gradient x input through TransformerLens's
    forward with patterns and LN scales frozen, with SAELens's own SAEs; REST is what it dropped."""
    prompt = "When Mary and John went to the store"
    traced = json.loads(run_cli(["circuit-catalog", "trace", "--model", "gpt2-small", "--saes", ATTN_RELEASE, "--saes",
                                 RESID_RELEASE, "--prompt", prompt, "--format", "json", "--top", "1000", "--depth", "1"],
                                hub, tmp_path).stdout)
    start = traced["start"]
    layer, rest = start[1:].split(".", 1)
    index, pos = rest.split("@")
    env = {**os.environ, "HF_HOME": str(hub), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "tests")}
    ref = json.loads(subprocess.run([sys.executable, str(ROOT / "tests" / "gpt2_reference.py"), "--prompt", prompt,
                                     "--layer", layer, "--feature", index, "--pos", pos], env=env, check=True,
                                    capture_output=True, text=True).stdout)
    assert traced["tokens"] == ref["tokens"]
    node = next(n for n in traced["nodes"] if n["id"] == start)
    assert node["activation"] == pytest.approx(ref["activation"], rel=1e-4, abs=1e-6)
    assert node["pre_activation"] == pytest.approx(ref["pre_activation"], rel=1e-4, abs=1e-6)
    got: dict[tuple[str, int | None], float] = {}
    for e in traced["edges"]:
        if e["target"] != start:
            continue
        assert (e["source"], e["head"]) not in got, f"edge twice: {e}"
        got[(e["source"], e["head"])] = e["value"]
    rest = got.pop(("REST", None), 0.0)
    assert got.pop((f"A{layer}.BIAS@{pos}", None)) == pytest.approx(ref["bias"], rel=1e-4, abs=1e-6)
    want = {(e["source"], e["head"]): e["value"] for e in ref["edges"]}
    scale = max(abs(v) for v in want.values())
    for key, value in got.items():  # every kept edge, exact
        assert key in want, f"an edge the reference does not have: {key}"
        assert value == pytest.approx(want[key], rel=1e-4, abs=1e-5 * scale), key
    # what top-k pruning dropped is the REST edge, exactly
    assert rest == pytest.approx(sum(v for k, v in want.items() if k not in got), rel=1e-3, abs=1e-5 * scale)
    features = sum(".ERR" not in k[0] and ".BIAS" not in k[0] for k in got)
    assert features > 20


def test_loader_failures_are_one_clear_line(hub, tmp_path):
    base = ["circuit-catalog", "trace", "--model", "gpt2-small", "--prompt", "Hi"]
    alone = run_cli(base + ["--saes", f"{ATTN_RELEASE}:blocks.5.hook_z"], hub, tmp_path, check=False)
    assert alone.returncode == 2
    assert "add --saes gpt2-small-res-jb:blocks.5.hook_resid_pre" in alone.stderr.strip().splitlines()[-1]
    named = run_cli(base + ["--saes", f"{RESID_RELEASE}:blocks.11.hook_resid_post"], hub, tmp_path, check=False)
    assert named.returncode == 2 and "reads 'blocks.11.hook_resid_post'" in named.stderr

    empty = tmp_path / "empty-hf"
    empty.mkdir()
    missing = run_cli(base + ["--saes", ATTN_RELEASE], empty, tmp_path, check=False)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1].startswith("error: could not fetch model 'gpt2-small'")

    broken = tmp_path / "broken-hf"
    subprocess.run(["cp", "-a", str(hub), str(broken)], check=True)
    config = next((broken / "hub" / "models--gpt2" / "snapshots").iterdir()) / "config.json"
    hub_config = json.loads(config.read_text())
    del hub_config["n_ctx"]  # what transformers 5's save_pretrained writes
    config.unlink()  # a link into blobs/, shared with nothing else in this copy
    config.write_text(json.dumps(hub_config))
    bad = run_cli(base + ["--saes", ATTN_RELEASE], broken, tmp_path, check=False)
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "could not fetch" not in last and "could not be loaded" in last and "n_ctx" in last

    failed = run_cli(["circuit-catalog", "ingest", "--model", "gpt2-small", "--saes", ATTN_RELEASE, "--corpus", "ioi:4",
                      "--store", "sqlite:///left.db"], broken, tmp_path, check=False)
    assert failed.returncode == 2 and not (tmp_path / "left.db").exists()


def test_ioi_names_are_single_gpt2_tokens(hub):
    from tokenizers import Tokenizer

    from ingest import ioi

    snapshot = next((hub / "hub" / "models--gpt2" / "snapshots").iterdir())
    tok = Tokenizer.from_file(str(snapshot / "tokenizer.json"))
    assert tok.encode(" Mary").ids == [5335]  # GPT-2's own id: the real BPE, not a stand-in
    for word in ioi.NAMES + ioi.PLACES + ioi.OBJECTS:
        assert len(tok.encode(" " + word).ids) == 1, word


def test_ioi_prompts_use_the_right_article():
    import random

    from ingest import ioi

    rng = random.Random(0)
    texts = [make(rng).text for _ in range(300) for make in (ioi.ioi_prompt, ioi.abc_prompt, ioi.filler_prompt)]
    for obj in ioi.OBJECTS:
        wrong = ("a " if obj[0] in "aeiou" else "an ") + obj + " "
        assert not any(wrong in t + " " for t in texts), wrong
    assert any(" an apple " in t for t in texts) and any(" a book " in t for t in texts)
