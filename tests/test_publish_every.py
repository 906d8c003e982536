"""Issue 35 §3: ``ingest --publish-every``. While a job runs, each segment it publishes makes the run queryable: what a
query reads is exactly the windows the visible segments cover (checked against a plain-Python aggregation of
those spooled windows after every segment), never a segment twice, and when segments pile up one replaces them
all. When the job ends the run is published whole, as without segments, and no segment is left."""

from __future__ import annotations

import math

import pytest
from test_compact import independent

import catalog.publish_every
import catalog.runs
import ingest.jobs
from catalog import queries
from catalog.runs import select_runs
from catalog.spool import Spool, default_spool
from catalog.stores import open_store
from ingest.jobs import JobOptions, run_job
from ingest.model_with_saes import ModelWithSaes

CAP = 3


@pytest.fixture(scope="module")
def toy():
    return ModelWithSaes.open("toy-ioi", ["toy-ioi"], "cpu")


def _visible_edges(store) -> dict:
    """(src, dst, kind) -> [n_obs, n_prompts, sum] summed over the runs a query of run "r" reads."""
    out: dict = {}
    for e in store.all_edges(runs=select_runs(store, ["r"])):
        row = out.setdefault((e.src, e.dst, e.kind), [0, 0, 0.0])
        row[0] += e.n_obs
        row[1] += e.n_prompts
        row[2] += e.sum
    return out


def test_each_segment_shows_exactly_the_windows_it_covers_and_the_end_leaves_the_run_whole(toy, store_url,
                                                                                            monkeypatch, tmp_path):
    monkeypatch.setattr(catalog.publish_every, "MAX_SEGMENTS", 2)
    seen: list[dict] = []
    real = ingest.jobs.publish_segment

    def observed(spool, run, store, **kw):
        done = real(spool, run, store, **kw)
        reader = open_store(store_url, create=False)  # another connection, as the API's
        catalog.runs._runs_read.clear()  # a list of runs read within RUNS_REUSE_S may be reused: read it now
        chosen = select_runs(reader, ["r"])
        covered = sorted(w for s in chosen if s != "r" for w in reader.run(s).manifest["windows"])
        want = independent(spool.folder, CAP, [spool.run_dir("r") / name for name in covered])
        got = _visible_edges(reader)
        assert got.keys() == want["edges"].keys()
        for key, (n_prompts, n_obs, total, *_) in want["edges"].items():
            assert got[key][:2] == [n_obs, n_prompts], key
            assert math.isclose(got[key][2], total, rel_tol=1e-12, abs_tol=1e-12), key
        shown = [s for s in chosen if s != "r"]
        seen.append({"shown": shown, "stored": sorted(r.run_id for r in reader.runs() if r.run_id != "r"),
                     "covered": len(covered), **done})
        return done

    monkeypatch.setattr(ingest.jobs, "publish_segment", observed)
    store = open_store(store_url, evidence_per_edge=CAP)
    run_job(toy, "ioi:40:4", store, JobOptions(run="r", batch_size=4, window=4, progress=False, mine=False,
                                                publish_every_prompts=8, compact_workers=1), log=lambda _: None)
    # windows of 4 prompts, a segment every 8: five segments; at most two shown, the third covers all so far
    assert [s["covered"] for s in seen] == [2, 4, 6, 8, 10]
    assert [s["windows"] for s in seen] == [2, 2, 6, 2, 10]  # each segment's own
    assert [s["shown"] for s in seen] == [["r~0001"], ["r~0001", "r~0002"], ["r~0003"], ["r~0003", "r~0004"],
                                          ["r~0005"]]
    assert [s["stored"] for s in seen][2] == ["r~0003"]  # the replaced ones dropped
    assert [r.run_id for r in store.runs()] == ["r"] and store.run("r").status == "done"
    assert select_runs(store, ["r"]) == ("r",) and len(store.done_prompts("r")) == 40
    assert not Spool(default_spool(store_url), CAP).run_dir("r").exists()
    # the whole run: what a job without segments stores
    plain = open_store(f"sqlite:///{tmp_path}/plain.db", evidence_per_edge=CAP)
    run_job(toy, "ioi:40:4", plain, JobOptions(run="r", batch_size=4, window=4, progress=False, mine=False,
                                                compact_workers=1), log=lambda _: None)
    for ref in ("A2.186", "R1.ERR", "A1.3"):
        try:
            assert queries.upstream(store, ref, limit=50) == queries.upstream(plain, ref, limit=50)
        except queries.NotFound:
            pass
    assert sorted(map(repr, store.all_evidence())) == sorted(map(repr, plain.all_evidence()))
    assert {(e.src, e.dst, e.kind, e.n_obs) for e in store.all_edges()} == {
        (e.src, e.dst, e.kind, e.n_obs) for e in plain.all_edges()}


def test_publish_every_is_parsed_and_refused_where_it_cannot_apply():
    from typer.testing import CliRunner

    from cli import app
    from ingest.errors import UserFacingError
    from ingest.job_options import parse_publish_every

    assert parse_publish_every("500") == (500, None) and parse_publish_every("2.5m") == (None, 150.0)
    assert parse_publish_every(None) == (None, None)
    for bad in ("0", "x", "-3m", "m"):
        with pytest.raises(UserFacingError, match="--publish-every"):
            parse_publish_every(bad)
    result = CliRunner().invoke(app, ["ingest", "--model", "toy-ioi", "--saes", "toy-ioi", "--corpus", "ioi:8",
                                      "--run", "x", "--publish-every", "4", "--shard", "0/2"])
    assert result.exit_code == 2 and "not with --partials, --shard" in result.output


def test_segments_left_by_a_job_killed_after_its_run_was_done_go_with_the_next_job(toy, tmp_path):
    """Killed between marking its run done and dropping its segments, a job leaves them stored but unread; the
    next job on the catalog drops them and nothing else."""
    store = open_store(f"sqlite:///{tmp_path}/c.db", evidence_per_edge=CAP)
    run_job(toy, "ioi:4:1", store, JobOptions(run="r", batch_size=4, progress=False, mine=False), log=lambda _: None)
    store.start_run("r~0001", {**store.run("r").manifest, "segment_of": "r", "windows": []}, resume=False)
    store.finish_run("r~0001", "done", {})
    assert select_runs(store, ["r"]) == ("r",)  # unread already: its run is done
    run_job(toy, "ioi:4:2", store, JobOptions(run="z", batch_size=4, progress=False, mine=False), log=lambda _: None)
    assert [r.run_id for r in store.runs()] == ["r", "z"] and len(store.done_prompts("r")) == 4
