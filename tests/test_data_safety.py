"""Ways data could be lost or mixed with exit code 0, each refused with one line: run names that make
prompt ids ambiguous, a resume with other SAEs or options, a read-only command on a file that is not a
catalog, a truncated prompt's text; faults told in one line with what was kept (Ctrl-C, a Neo4j killed
mid-write, bad options); and numbers both stores print alike (std) or that batch size moves only by
float32 rounding."""

from __future__ import annotations

import hashlib
import json
import math
import random
import sqlite3

import pytest
from typer.testing import CliRunner

from catalog import queries
from catalog.queries import variance
from catalog.stores import open_store
from cli import app

TOY = ["--model", "toy-ioi", "--saes", "toy-ioi"]


def ingest(*args: str):
    return CliRunner().invoke(app, ["ingest", *TOY, "--no-progress", "--no-mine", *args])


@pytest.mark.parametrize("name", ["a/b", "", "two\nlines", "x" * 5000, "-leading-dash", "sp ace"])
def test_run_names_that_could_collide_or_mislead_are_refused_by_every_store(name, store_url):
    store = open_store(store_url)
    with pytest.raises(ValueError, match="run name .* is not allowed"):
        store.start_run(name, {"kind": "ingest"}, False)
    assert store.runs() == []


def test_run_a_over_ids_b_slash_n_and_run_a_slash_b_cannot_share_prompts(tmp_path):
    """Run ``a`` over ids ``b/0..3``; run ``a/b`` over ids ``0..3`` would have named the same prompts (uid
    ``run/id``) and ended 'done' with 0 prompts. It is refused before the model loads; ``a`` is untouched."""
    url = f"sqlite:///{tmp_path}/c.db"
    texts = ["When Mary and John went to the store, John gave a drink to"] * 4
    (tmp_path / "ab.jsonl").write_text("".join(json.dumps({"id": f"b/{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    (tmp_path / "plain.jsonl").write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    first = ingest("--corpus", str(tmp_path / "ab.jsonl"), "--store", url, "--run", "a")
    assert first.exit_code == 0, first.output
    second = ingest("--corpus", str(tmp_path / "plain.jsonl"), "--store", url, "--run", "a/b")
    assert second.exit_code == 2 and "run name 'a/b' is not allowed" in second.output
    store = open_store(url, create=False)
    assert [r.run_id for r in store.runs()] == ["a"] and store.prompt_count("a") == 4


@pytest.mark.parametrize("change, says", [
    (["--saes-folder"], "other SAEs"),
    (["--evidence-per-edge", "3"], "evidence_per_edge"),
])
def test_resume_with_other_saes_or_options_is_refused(tmp_path, change, says):
    from ingest.models import TOY_DIR

    url = f"sqlite:///{tmp_path}/c.db"
    started = ingest("--corpus", "ioi:4", "--store", url, "--run", "r", "--batch-size", "4")
    assert started.exit_code == 0, started.output
    args = ["--corpus", "ioi:4", "--store", url, "--run", "r", "--batch-size", "4", "--resume"]
    if change == ["--saes-folder"]:  # the same toy SAEs named as a folder: another SAE key in the catalog
        result = CliRunner().invoke(app, ["ingest", "--model", "toy-ioi", "--saes", str(TOY_DIR / "saes"),
                                          "--no-progress", "--no-mine", *args])
    else:
        result = ingest(*args, *change)
    assert result.exit_code == 2 and says in result.output, result.output
    store = open_store(url, create=False)
    assert store.prompt_count("r") == 4  # nothing added, nothing mixed
    assert {s["key"] for s in store.run("r").manifest["saes"]} == {f"toy-ioi:{p.name}" for p in (TOY_DIR / "saes").iterdir()}


@pytest.mark.parametrize("content", ["tables", "text", "empty-sqlite"])
def test_read_only_commands_leave_a_foreign_file_untouched(tmp_path, content):
    path = tmp_path / "other-app.db"
    if content == "tables":
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE accounts (id INTEGER, owner TEXT)")
            conn.execute("INSERT INTO accounts VALUES (1, 'me')")
    elif content == "text":
        path.write_text("not a database at all\n" * 100)
    else:
        sqlite3.connect(path).close()  # an empty file: SQLite writes nothing for an unused connection
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    for command in (["runs"], ["top-features"], ["upstream", "A1.1"], ["feature", "A1.1"]):
        result = CliRunner().invoke(app, [*command, "--store", f"sqlite:///{path}"])
        assert result.exit_code == 2, (command, result.output)
        assert "not a circuit-catalog catalog" in result.output and "left untouched" in result.output
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-app.db"]  # no -wal, no -shm
    if content == "tables":  # and an ingest does not write into another app's database either
        assert ingest("--corpus", "ioi:4", "--store", f"sqlite:///{path}").exit_code == 2
        assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_std_of_equal_values_is_zero_whatever_the_order_of_their_sums():
    """The two stores add the same float64 values in other orders: equal values must give std 0 from
    either sum (SQLite printed 0.0, Neo4j 2.6e-09), and a real spread must survive."""
    rng = random.Random(0)
    for _ in range(200):
        v, n = rng.uniform(-3, 3), rng.randrange(2, 400)
        values = [v] * n
        forward = (math.fsum(values[:1]) + sum(values[1:]), sum(x * x for x in values))
        shuffled = values[::-1]
        backward = (sum(shuffled), sum(x * x for x in reversed(shuffled)))
        assert variance(forward[0], forward[1], n) == 0.0
        assert variance(backward[0], backward[1], n) == 0.0
    spread = [1.0, 2.0, 3.0, 4.0]
    assert variance(sum(spread), sum(x * x for x in spread), 4) == pytest.approx(1.25, rel=1e-12)
    assert variance(0.0, 0.0, 0) == 0.0


@pytest.mark.parametrize("args, says", [
    (["--device", "nonsense"], "--device 'nonsense' is not a device"),
    (["--max-tokens", "0"], "Invalid value for '--max-tokens'"),
    (["--corpus-dir"], "is a directory"),
])
def test_ingest_bad_options_are_one_line_and_store_nothing(tmp_path, args, says):
    corpus = ["--corpus", str(tmp_path)] if args == ["--corpus-dir"] else ["--corpus", "ioi:4"]
    result = ingest(*corpus, *([] if args == ["--corpus-dir"] else args), "--store", f"sqlite:///{tmp_path}/c.db")
    assert result.exit_code == 2 and says in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "c.db").exists()


def test_truncate_stores_the_text_its_tokens_cover(tmp_path):
    """--truncate kept a whole 10 MB line as the prompt's text (and its exemplars in mining); it keeps the
    part the kept tokens cover, and says how long the line was."""
    words = ("When Mary and John went to the store , John gave a drink to Mary . " * 2000).split()
    (tmp_path / "long.jsonl").write_text(json.dumps({"id": "long", "text": " ".join(words)}) + "\n")
    url = f"sqlite:///{tmp_path}/c.db"
    result = CliRunner().invoke(app, ["ingest", *TOY, "--no-progress", "--corpus", str(tmp_path / "long.jsonl"),
                                      "--store", url, "--run", "t", "--truncate"])
    assert result.exit_code == 0, result.output
    store = open_store(url, create=False)
    prompt = store.prompt("t/long")
    assert len(prompt.tokens) == 32  # the toy's context, BOS included
    assert prompt.text == " ".join(words[:31]) and prompt.meta["truncated_from_tokens"] == len(words) + 1
    patterns = CliRunner().invoke(app, ["patterns", "--store", url, "--json", "--min-prompts", "1"])
    assert patterns.exit_code == 0 and len(patterns.output) < 200_000


def test_words_the_toy_tokenizer_does_not_know_are_counted_not_silent(tmp_path):
    (tmp_path / "oov.jsonl").write_text(json.dumps({"id": "x", "text": "When Mary and zorblax went to the flibber ,"}) + "\n"
                                        + json.dumps({"id": "y", "text": "When Mary and John went to the store ,"}) + "\n")
    url = f"sqlite:///{tmp_path}/c.db"
    result = CliRunner().invoke(app, ["ingest", *TOY, "--no-progress", "--no-mine", "--corpus", str(tmp_path / "oov.jsonl"),
                                      "--store", url, "--run", "u"])
    assert result.exit_code == 0, result.output
    assert "1 prompt(s) hold 2 word(s) the tokenizer does not know" in result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert (summary["unknown_tokens"], summary["prompts_with_unknown_tokens"]) == (2, 1)
    store = open_store(url, create=False)
    assert store.prompt("u/x").meta["unknown_tokens"] == 2 and "unknown_tokens" not in store.prompt("u/y").meta
    assert store.run("u").manifest["counts"]["unknown_tokens"] == 2


def test_ctrl_c_says_what_was_kept_and_how_to_resume(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    cli = str(Path(sys.executable).parent / "circuit-catalog")
    url = f"sqlite:///{tmp_path}/c.db"
    proc = subprocess.Popen([cli, "ingest", *TOY, "--corpus", "ioi:4000", "--store", url, "--run", "c", "--window", "64",
                             "--no-progress", "--no-mine"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "CIRCUIT_CATALOG_TORCH_THREADS": "1"},
                            # Ctrl-C as in a terminal: a test session started in the background of a
                            # non-interactive shell (`make test &`) ignores SIGINT, and its children inherit that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "c.db").exists():
        time.sleep(0.2)
    time.sleep(3)  # a few windows in
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and out == ""
    assert "spooled in this job before it stopped, kept in" in err
    assert "; the same command with --resume continues from there" in err
    run = open_store(url, create=False).run("c")
    assert run.status == "failed" and run.manifest["error"] == "interrupted"


def test_batch_size_changes_sums_only_by_float32_rounding(tmp_path):
    """Batch size does not change which edges, counts or prompts a run stores; float32 kernels of other
    shapes round differently, so a sum moves by at most 2e-5 of its edge's sum |value| (measured 7.8e-6 on
    ioi:48, batch 1 vs 8), and evidence differs only where a row ties with the last kept one to that
    rounding. (Relative to |sum| the change is larger where an edge's values cancel: 6.5e-4 there.)"""
    from ingest.jobs import JobOptions, run_job
    from ingest.model_with_saes import ModelWithSaes

    session = ModelWithSaes.open("toy-ioi", ["toy-ioi"], "cpu")
    edges, evidence = {}, {}
    for size in (1, 8):
        store = open_store(f"sqlite:///{tmp_path}/b{size}.db")
        run_job(session, "ioi:48", store, JobOptions(run="r", batch_size=size, progress=False, mine=False),
                log=lambda m: None)
        edges[size] = {(e.src, e.dst, e.kind): e for e in store.all_edges()}
        evidence[size] = {}
        for v in store.all_evidence():
            evidence[size].setdefault((v.src, v.dst, v.kind), {})[(v.prompt, v.src_pos, v.dst_pos, v.head)] = v.value
    one, eight = edges[1], edges[8]
    assert one.keys() == eight.keys()
    for key, a in one.items():
        b = eight[key]
        assert (a.n_obs, a.n_prompts, a.n_pos) == (b.n_obs, b.n_prompts, b.n_pos), key
        assert abs(a.sum - b.sum) <= 2e-5 * a.sum_abs, key
        assert abs(a.sum_abs - b.sum_abs) <= 2e-5 * a.sum_abs, key
    differing = 0
    for key, rows in evidence[1].items():
        other = evidence[8][key]
        if rows.keys() == other.keys():
            continue
        differing += 1
        floor = min(abs(v) for v in other.values())
        for row in rows.keys() - other.keys():  # in one list only: a near-tie with the other's last row
            assert abs(abs(rows[row]) - floor) <= 2e-5 * max(abs(v) for v in rows.values()), (key, row)
    assert differing < len(evidence[1]) // 100


def test_tables_keep_their_cells_whole_when_stdout_is_not_a_terminal(tmp_path):
    """Piped or captured, rich used to lay tables out in 80 columns: headers and numbers were cut ('0.05430…')
    or wrapped. Off a terminal the CLI lays them out 250 wide."""
    from test_store_conformance import _batches, _fill

    url = f"sqlite:///{tmp_path}/c.db"
    _fill(url, _batches())
    ref = queries.top_features(open_store(url, create=False), kind="attn", limit=1)[0]["id"]
    result = CliRunner().invoke(app, ["upstream", ref, "--store", url, "--top", "5"])
    assert result.exit_code == 0 and "…" not in result.output, result.output
    header = next(line for line in result.output.splitlines() if "edge_kind" in line)
    assert all(c in header for c in ("n_prompts", "sign_share"))
    rows = [line for line in result.output.splitlines() if line.startswith("│")]
    assert len(rows) == len(queries.upstream(open_store(url, create=False), ref, limit=5))


def test_neo4j_killed_during_an_ingest_is_one_line_and_resume_is_offered(tmp_path):
    """kill -9 of the server while the job publishes (the only time it writes to the store): ~50 s of retry
    warnings and 167 lines of chained tracebacks became one line naming the store, plus what was kept and
    that --resume continues (resuming after a killed publish: tests/test_ingest.py)."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from cli.neo4j_server import start_on_free_port

    server, url = start_on_free_port(str(tmp_path / "neo4j"), page_cache="64m", heap="512m")
    cli = str(Path(sys.executable).parent / "circuit-catalog")
    job = [cli, "ingest", *TOY, "--corpus", "ioi:400", "--store", url, "--run", "k", "--window", "64", "--no-progress",
           "--no-mine"]
    proc = subprocess.Popen(job, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "CIRCUIT_CATALOG_TORCH_THREADS": "1"})
    try:
        said = []
        for line in proc.stderr:  # the job says when it starts to publish
            said.append(line)
            if "publishing into" in line:
                server.send_signal(signal.SIGKILL)
                break
        server.wait(timeout=30)
        out, err = proc.communicate(timeout=240)
    finally:
        server.kill()
        proc.kill()
    lines = [*said, *err.splitlines(keepends=True)]
    assert proc.returncode == 2 and out == "" and "Traceback" not in "".join(lines), "".join(lines)[-3000:]
    assert len(lines) <= 4, lines
    assert any("400 prompt(s) spooled" in line and "--resume continues" in line for line in lines), lines
    assert lines[-1].startswith("error: ") and url.split("//")[1] in lines[-1], lines[-1]


def test_ctrl_c_while_mining_says_the_run_is_done_and_how_to_mine(tmp_path, monkeypatch):
    import ingest.jobs as jobs
    from ingest.model_with_saes import ModelWithSaes

    def interrupted(store, run):
        raise KeyboardInterrupt
        yield  # a generator, as mine_after_ingest is

    monkeypatch.setattr(jobs, "mine_after_ingest", interrupted)
    url = f"sqlite:///{tmp_path}/c.db"
    said: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        jobs.run_job(ModelWithSaes.open("toy-ioi", ["toy-ioi"], "cpu"), "ioi:8", open_store(url),
                     jobs.JobOptions(run="m", progress=False), log=said.append)
    assert said[-1] == (f"run 'm' is stored and done; mining its patterns was interrupted: "
                        f"`circuit-catalog mine --run m --store {url}` stores them")
    assert open_store(url, create=False).run("m").status == "done"


def test_eval_saes_refuses_a_named_group_it_cannot_splice_whole(tmp_path):
    result = CliRunner().invoke(app, ["eval-saes", *TOY, "--groups", "0,5", "--n", "4", "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 2 and "--groups: no attention SAE at layers [5] of group [0, 5]" in result.output
    assert not (tmp_path / "p.png").exists()
