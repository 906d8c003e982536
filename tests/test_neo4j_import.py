"""Issue 35 §3: publishing into an empty Neo4j through its offline importer. The same spool published into a live
server (CREATE batches) and written as import files, imported by ``neo4j-admin database import full`` into a new
database and served, answers every read identically, byte for byte; a killed write of the files leaves nothing
half-written; what the importer cannot carry, or a home that holds a database, is refused in one line."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import wipe_neo4j
from test_store_conformance import snapshot
from typer.testing import CliRunner

from catalog import queries
from catalog.publish import publish_folder
from catalog.spool import Spool
from catalog.stores import open_store
from catalog.stores.base import StoreError
from catalog.stores.neo4j_import import Neo4jImportFiles
from cli import app, neo4j_server
from ingest.jobs import JobOptions, run_job
from ingest.model_with_saes import ModelWithSaes

CAP = 3
# ids and texts with what CSV quoting must carry: commas, quotes, semicolons, newlines, non-ASCII
TRICKY = [{"id": 'p,1 "quoted";', "text": "When Mary and John went to the store, John gave a drink to"},
          {"id": "p2\nline", "text": 'When "Tom" and Anna went to the park; Anna gave a ball to'},
          {"id": "p3 ü", "text": "When Mary and John went to the office,\nMary gave a book to"},
          *({"id": f"q{i}", "text": f"When John and Mary went to the garden {i}, John gave a key to"}
            for i in range(9))]


@pytest.fixture(scope="module")
def spooled(tmp_path_factory) -> Path:
    """The tricky corpus on the toy model, spooled in windows of 4 prompts, as a job array spools."""
    folder = tmp_path_factory.mktemp("spool")
    corpus = folder.parent / "tricky.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in TRICKY))
    toy = ModelWithSaes.open("toy-ioi", ["toy-ioi"], "cpu")
    run_job(toy, str(corpus), Spool(folder, CAP), JobOptions(run="r", batch_size=4, window=4, progress=False,
                                                               mine=False), log=lambda _: None)
    return folder


def answers(store) -> str:
    """Every read the catalog serves, over every node it holds, as the API prints it."""
    out: list = [snapshot(store)]
    refs = sorted({e.src.split("|")[2] for e in store.all_edges()} | {e.dst.split("|")[2] for e in store.all_edges()})
    for ref in refs:
        for fn in (queries.upstream, queries.downstream):
            try:
                out.append(fn(store, ref, order="abs", limit=20))
            except queries.NotFound:
                out.append("not found")
    for p in store.all_prompts():
        out.append(queries.prompt_graph(store, p.uid, limit=60))
    tokens = sorted({t for p in store.all_prompts() for t in p.tokens})  # quotes, ü, newlines among them
    out += [queries.features_by_token(store, f'"{t}"', limit=50) for t in tokens]
    out += [queries.feature(store, ref, contexts=20) for ref in refs if ref[0] in "AR" and ref[1].isdigit()]
    out += [queries.top_features(store, by="degree"), queries.composition_counts(store), queries.runs(store),
            {k: v for k, v in queries.overview(store).items() if k != "store"}]
    return json.dumps(out, sort_keys=True, default=str)


def test_the_imported_database_answers_as_the_live_publish(spooled, neo4j_url, tmp_path):
    wipe_neo4j(neo4j_url)
    live = open_store(neo4j_url, evidence_per_edge=CAP)
    shutil.copytree(spooled, tmp_path / "spool")  # one path: the runs' manifests name it (merged_from)
    publish_folder(tmp_path / "spool", lambda cap: live, mem=1 << 20, workers=2)
    shutil.rmtree(tmp_path / "spool")
    shutil.copytree(spooled, tmp_path / "spool")
    files = tmp_path / "files"
    report = publish_folder(tmp_path / "spool", lambda cap: open_store(f"neo4j-import:{files}", evidence_per_edge=cap),
                            mem=1 << 20, workers=2)["runs"]["r"]
    assert report["prompts_published"] == len(TRICKY) and report["status"] == "done"
    home = tmp_path / "home"
    summary = neo4j_server.import_files(str(home), str(files))
    assert "IMPORT DONE" in summary
    proc, url = neo4j_server.start_on_free_port(str(home), page_cache="64m", heap="512m")
    try:
        imported = open_store(url, evidence_per_edge=CAP)
        want = answers(live)
        assert len(want) > 50_000 and '"p,1 \\"quoted\\";"' in want
        assert answers(imported) == want
        # the imported catalog takes live writes afterwards: the node dictionary and its counter carried over
        assert imported.done_prompts("r") == {row["id"] for row in TRICKY}
        with pytest.raises(StoreError, match="a run is published once|already"):
            imported.start_run("r", {}, resume=False)
        imported.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_a_killed_write_of_the_files_leaves_no_run_and_a_second_one_completes(spooled, tmp_path):
    files = Neo4jImportFiles(tmp_path / "files", CAP)
    files.start_run("r", {"model": "toy"}, resume=False)
    from catalog.compact import compact, layout, load_part

    lay = layout("r", Spool(spooled, CAP).windows("r"), mem=1 << 20)
    parts = compact(lay, tmp_path / "parts")
    assert len(parts) > 1

    def dies_after_one_part():
        yield load_part(lay, parts[0])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.publish_run("r", lay.prompts, lay.nodes, dies_after_one_part())
    assert files.published_runs() == [] and files.done_prompts("r") == set()
    assert files.publish_run("r", lay.prompts, lay.nodes, (load_part(lay, p) for p in parts)) is True
    assert files.publish_run("r", lay.prompts, lay.nodes, iter(())) is False
    assert [p.name for p in files.published_runs()] == ["run-r"] and not list(files.folder.glob(".writing-*"))
    edge_rows = 0
    for path in (files.folder / "run-r").glob("edges-*.csv"):
        with open(path, newline="") as fh:
            edge_rows += sum(1 for _ in csv.reader(fh))  # fields hold newlines: a prompt id has one
    assert edge_rows == sum(len(load_part(lay, p).edges) for p in parts)


def test_what_the_importer_cannot_take_is_refused_in_one_line(spooled, tmp_path):
    files = Neo4jImportFiles(tmp_path / "files", CAP)
    with pytest.raises(StoreError, match="nothing to import"):
        files.import_arguments()
    with pytest.raises(StoreError, match="not a catalog to query.*neo4j-server --import"):
        files.all_edges()
    from catalog.compact import compact, layout, load_part

    lay = layout("r", Spool(spooled, CAP).windows("r"))
    parts = [load_part(lay, p) for p in compact(lay, tmp_path / "parts")]
    lay.prompts[0].tokens[1] = "a\x1fb"
    files.start_run("r", {}, resume=False)
    with pytest.raises(StoreError, match="U\\+001F.*live server"):
        files.publish_run("r", lay.prompts, lay.nodes, iter(parts))
    home = tmp_path / "home"
    (home / "data" / "databases" / "neo4j").mkdir(parents=True)
    result = CliRunner().invoke(app, ["neo4j-server", "--home", str(home), "--import", str(tmp_path / "files")])
    assert result.exit_code != 0 and "holds a database already" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_ingest_publishes_into_import_files_and_says_how_to_load_them(tmp_path):
    """The user's route: `ingest --store neo4j-import:DIR` spools, compacts and writes the files (mining waits for
    a database), and its import.sh is the importer's whole command line over them."""
    files = tmp_path / "files"
    result = CliRunner().invoke(app, ["ingest", "--model", "toy-ioi", "--saes", "toy-ioi", "--corpus", "ioi:8",
                                      "--run", "i8", "--store", f"neo4j-import:{files}", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "`circuit-catalog mine` stores its patterns once the database is imported" in result.output
    from catalog.spool import default_spool

    assert default_spool(f"neo4j-import:{files}") == tmp_path / "files.spool"  # beside the files, as for SQLite
    assert not (tmp_path / "files.spool").exists()  # removed once the files are written
    target = Neo4jImportFiles(files, None)
    assert target.runs()[0].status == "done" and len(target.done_prompts("i8")) == 8
    arguments = target.import_arguments()
    script = (files / "import.sh").read_text()
    assert 'exec "${NEO4J_ADMIN:-neo4j-admin}" database import full neo4j --id-type=INTEGER' in script
    assert all(a.split("=", 1)[0] in script for a in arguments)
    listed = [f for a in arguments if a.startswith(("--nodes=", "--relationships=")) for f in a.split("=", 1)[1].split(",")]
    assert all((files / f).is_file() for f in listed) and "run-i8/edges-00000.csv" in listed


def test_export_of_a_catalog_through_the_importer_answers_as_the_catalog(toy_two_runs, tmp_path):
    """`export --to neo4j-import:DIR` then `neo4j-server --import DIR`: a SQLite catalog of two runs, loaded into
    a new Neo4j database by the importer, answers every read as the SQLite catalog does, byte for byte."""
    files = tmp_path / "files"
    result = CliRunner().invoke(app, ["export", "--from", toy_two_runs, "--to", f"neo4j-import:{files}"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["runs"] == 2
    home = tmp_path / "home"
    neo4j_server.import_files(str(home), str(files))
    proc, url = neo4j_server.start_on_free_port(str(home), page_cache="64m", heap="512m")
    try:
        want = answers(open_store(toy_two_runs, create=False))
        assert len(want) > 50_000
        assert answers(open_store(url, create=False)) == want
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    again = CliRunner().invoke(app, ["export", "--from", toy_two_runs, "--to", f"neo4j-import:{files}"])
    assert again.exit_code != 0 and "holds import files already" in again.output


@pytest.fixture
def toy_two_runs(tmp_path) -> str:
    """Two toy runs of one setting in a SQLite catalog (mining off: stored patterns do not travel)."""
    url = f"sqlite:///{tmp_path}/two.db"
    toy = ModelWithSaes.open("toy-ioi", ["toy-ioi"], "cpu")
    for run, corpus in (("a", "ioi:12:1"), ("b", "abc:8:2")):
        run_job(toy, corpus, open_store(url, evidence_per_edge=CAP), JobOptions(run=run, batch_size=4, progress=False,
                                                                               mine=False), log=lambda _: None)
    return url
