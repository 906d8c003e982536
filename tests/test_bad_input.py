"""Bad input tried as a new user would: each gets one clear line naming what is wrong (exit code 2 on
the CLI), never a traceback, and never a silent surprise in what is stored."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from catalog.stores import open_store
from cli import app
from ingest.corpora import open_corpus
from ingest.errors import UserFacingError
from ingest.jobs import JobOptions, run_job
from ingest.model_with_saes import ModelWithSaes
from ingest.trace import trace

TOY = ["--model", "toy-ioi", "--saes", "toy-ioi"]


@pytest.fixture(scope="module")
def toy():
    return ModelWithSaes.open("toy-ioi", ["toy-ioi"], "cpu")


@pytest.mark.parametrize("args, option", [
    (["upstream", "A1.1", "--top", "-1"], "--top"),
    (["upstream", "A1.1", "--top", "0"], "--top"),
    (["downstream", "A1.1", "--top", "1000000000"], "--top"),
    (["downstream", "A1.1", "--min-count", "-3"], "--min-count"),
    (["edge", "A0.1", "A1.1", "--evidence", "-1"], "--evidence"),
    (["top-features", "--limit", "0"], "--limit"),
    (["cypher", "MATCH (n) RETURN n", "--limit", "0"], "--limit"),
    (["cypher", "MATCH (n) RETURN n", "--timeout", "0"], "--timeout"),
    (["patterns", "--top", "0"], "--top"),
    (["patterns", "--min-prompts", "0"], "--min-prompts"),
    (["mine", "--min-prompts", "0"], "--min-prompts"),
    (["serve", "--port", "0"], "--port"),
    (["serve", "--port", "70000"], "--port"),
    (["trace", *TOY, "--prompt", "a b", "--top", "-1"], "--top"),
    (["trace", *TOY, "--prompt", "a b", "--depth", "0"], "--depth"),
    (["ingest", *TOY, "--corpus", "ioi:4", "--limit", "0"], "--limit"),
    (["ingest", *TOY, "--corpus", "ioi:4", "--batch-size", "0"], "--batch-size"),
    (["ingest", *TOY, "--corpus", "ioi:4", "--top-k", "0"], "--top-k"),
    (["ingest", *TOY, "--corpus", "ioi:4", "--min-abs", "-0.5"], "--min-abs"),
    (["ingest", *TOY, "--corpus", "ioi:4", "--evidence-per-edge", "-1"], "--evidence-per-edge"),
    (["ingest", *TOY, "--corpus", "ioi:4", "--threads", "0"], "--threads"),
    (["ingest", *TOY, "--corpus", "ioi:4", "--precision", "float64"], "--precision"),
    (["demo", "--prompts", "0"], "--prompts"),
    (["eval-saes", *TOY, "--n", "0"], "--n"),
    (["spot-check", *TOY, "--run", "r", "--n", "0"], "--n"),
    (["make-toy", "--threads", "0"], "--threads"),
])
def test_numeric_options_out_of_range_are_one_line_errors(args, option, tmp_path):
    result = CliRunner().invoke(app, [*args, *(["--store", f"sqlite:///{tmp_path}/c.db"]
                                             if args[0] in ("upstream", "downstream", "edge", "top-features",
                                                            "patterns", "mine", "ingest", "spot-check") else [])])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "c.db").exists()  # refused before anything was opened or written


def test_duplicate_ids_in_a_jsonl_corpus_are_bad_lines_not_a_crash(toy, tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text("\n".join(json.dumps(o) for o in [
        {"id": "a", "text": "When Mary and John went to the store, John gave a drink to"},
        {"id": "b", "text": "When Anna and Tom went to the park, Tom gave a book to"},
        {"id": "a", "text": "a different prompt under the same id"}]) + "\n")
    corpus = open_corpus(str(path))
    assert [i.prompt_id for i in corpus.items()] == ["a", "b"]
    assert [(b.line, b.reason) for b in corpus.bad_lines] == [(3, "duplicate id 'a' (first on line 1)")]
    store = open_store(f"sqlite:///{tmp_path}/c.db")
    summary = run_job(toy, str(path), store, JobOptions(run="dup", progress=False))
    assert summary.prompts == 2 and summary.bad_lines == 1
    manifest = store.run("dup").manifest
    assert manifest["bad_lines"] == [{"line": 3, "reason": "duplicate id 'a' (first on line 1)"}]
    assert sorted(p.prompt_id for p in store.all_prompts()) == ["a", "b"]


def test_txt_corpus_drops_a_byte_order_mark_and_reports_undecodable_lines(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes("\ufeffWhen Mary and John went to the store\n".encode() + b"bad \xff\xfe bytes\n" +
                     "caf\u00e9 au lait\n".encode())
    corpus = open_corpus(str(path))
    assert [i.text for i in corpus.items()] == ["When Mary and John went to the store", "caf\u00e9 au lait"]
    assert [(b.line, b.reason) for b in corpus.bad_lines] == [(2, "not UTF-8 (byte 4 of the line)")]


@pytest.mark.parametrize("feature, message", [
    ("A99.1", "no attention SAE at layer 99 (this session has attention SAEs at layers [0, 1, 2])"),
    ("R7.1", "no residual SAE at layer 7"),
    ("A2.999999999", "index 999999999 is past the width of the layer-2 attention SAE (256 features)"),
    ("T1.5", "no transcoder at layer 1 (this session has transcoders at layers [])"),  # none loaded (no --transcoders)
    ("MLP1", "trace starts from an SAE or transcoder feature (A.., R.. or T..)"),
])
def test_trace_says_what_is_wrong_with_a_start_feature(toy, feature, message):
    with pytest.raises(UserFacingError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        trace(toy, "When Mary and John went to the store, John gave a drink to", feature=feature)


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_trace_refuses_an_empty_prompt(toy, prompt):
    with pytest.raises(UserFacingError, match="the prompt is empty"):
        trace(toy, prompt)


def test_neo4j_server_detach_on_a_busy_port_and_stop_with_none_are_one_line(tmp_path):
    """``neo4j-server --detach`` on a port something else holds ends in one line naming the cause and the
    log (no traceback, no pid file left); ``--stop`` with no server running says so and exits 0."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    cli = str(Path(sys.executable).parent / "circuit-catalog")
    home = tmp_path / "data"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([cli, "neo4j-server", "--detach", "--port", str(port), "--home", str(home)],
                              capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert f"did not start on port {port}" in done.stderr and "Address already in use" in done.stderr
    assert str(home / "server.log") in done.stderr and not (home / "server.pid").exists()
    stop = subprocess.run([cli, "neo4j-server", "--stop", "--home", str(home)], capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0 and stop.stdout.strip() == f"no server started with --detach is running from {home}"
