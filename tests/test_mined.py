"""Issue 15 §5: composition patterns mined once, stored in the catalog, and served while current."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient
from test_mining import _catalog

from api.app import create_app
from api.settings import Settings
from catalog.aggregate import EdgeColumns, EvidenceColumns, HeadColumns, StatColumns, WindowAggregate, empty_columns
from catalog.mined import CHECK_REUSE_S, STORED_TOP, mine_and_store, selection_key, stored_patterns
from catalog.mining import mine
from catalog.schema import Prompt
from ingest.jobs import JobOptions, run_job
from ingest.model_with_saes import ModelWithSaes

CLI = [sys.executable, "-m", "cli"]


@pytest.fixture(scope="module")
def toy():
    return ModelWithSaes.open("toy-ioi", ["toy-ioi"], "cpu")


def _live(store, top, min_prompts=2, runs=None):
    return mine(store, top=top, min_prompts=min_prompts, runs=runs)


def _without_time(result):
    return {k: v for k, v in result.items() if k != "mined"}


def test_stored_result_cut_to_any_top_equals_mining_that_top_live(store_url):
    store = _catalog(store_url)
    assert stored_patterns(store, 20, 1, None) is None  # nothing stored yet
    result, _ = mine_and_store(store, min_prompts=1)
    assert result["mined"] and len(result["pairs"]) > 20  # the noise pairs make a long list
    for top in (1, 3, 20, STORED_TOP):
        stored = stored_patterns(store, top, 1, None)
        assert stored is not None and stored["mined"] == result["mined"]
        assert _without_time(stored) == _without_time(_live(store, top, 1))
    assert stored_patterns(store, 20, 2, None) is None  # another min_prompts is another selection
    assert stored_patterns(store, 20, 1, ["m"]) is not None  # naming the only run selects the same runs


def test_a_window_written_after_mining_makes_the_stored_result_stale(store_url):
    store = _catalog(store_url)
    mine_and_store(store)
    late = Prompt("m/late", "m", "late", "a late prompt", ["t"], "t", "hl")
    store.write_window(WindowAggregate("m", [late], [], empty_columns(EdgeColumns), empty_columns(HeadColumns),
                                       empty_columns(EvidenceColumns), empty_columns(StatColumns), None))
    assert stored_patterns(store, 20, 2, None) is None
    mine_and_store(store)
    assert stored_patterns(store, 20, 2, None) is not None
    store.finish_run("m", "done", {"finished": "2026-12-01T00:00:00+00:00"})  # a resumed run finishing again
    assert stored_patterns(store, 20, 2, None) is None


def test_api_serves_the_stored_result_and_mines_live_when_stale(store_url):
    store = _catalog(store_url)
    result, _ = mine_and_store(store)
    with TestClient(create_app(Settings(store=store_url, warm_patterns=False))) as client:
        served = client.get("/patterns/composition", params={"top": 5}).json()
        assert served["mined"] == result["mined"]
        assert _without_time(served) == _without_time(_live(store, 5))
        live = client.get("/patterns/composition", params={"top": 5, "min_prompts": 3}).json()
        assert live["mined"] is None and live["pairs"] == _live(store, 5, 3)["pairs"]
        page = client.get("/view/patterns")
        assert page.status_code == 200 and result["pairs"][0]["source"] in page.text
        # answers are cached by the stored result's stamp: a window landing makes them stale at once
        assert client.get("/patterns/composition", params={"top": 5}).json() == served
        late = Prompt("m/late", "m", "late", "a late prompt", ["t"], "t", "hl")
        store.write_window(WindowAggregate("m", [late], [], empty_columns(EdgeColumns), empty_columns(HeadColumns),
                                           empty_columns(EvidenceColumns), empty_columns(StatColumns), None))
        time.sleep(CHECK_REUSE_S)  # the server checks the stored result's freshness at most once a second
        assert client.get("/patterns/composition", params={"top": 5}).json()["mined"] is None
        again, _ = mine_and_store(store)
        time.sleep(CHECK_REUSE_S)
        assert client.get("/patterns/composition", params={"top": 5}).json()["mined"] == again["mined"]


def test_ingest_stores_its_patterns_and_the_cli_mines_on_demand(toy, tmp_path):
    from catalog.stores import open_store

    url = f"sqlite:///{tmp_path}/c.db"
    store = open_store(url)
    logs: list[str] = []
    summary = run_job(toy, "ioi:8:3", store, JobOptions(run="a", progress=False), log=logs.append)
    assert summary.mining_seconds > 0 and any("mined the composition patterns of a" in m for m in logs)
    assert stored_patterns(store, 20, 2, ["a"]) is not None
    # a second run: the job mines it alone and the default selection (both runs)
    run_job(toy, "ioi:8:5", store, JobOptions(run="b", progress=False), log=logs.append)
    assert store.get_mined(selection_key(["a", "b"], 2)) is not None
    assert stored_patterns(store, 20, 2, None) is not None and stored_patterns(store, 20, 2, ["b"]) is not None
    run_job(toy, "ioi:4:9", store, JobOptions(run="c", progress=False, mine=False))
    assert stored_patterns(store, 20, 2, ["c"]) is None
    out = subprocess.run([*CLI, "mine", "--store", url, "--run", "c", "--min-prompts", "1"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["runs"] == ["c"]
    assert stored_patterns(store, 20, 1, ["c"]) is not None
    shown = subprocess.run([*CLI, "patterns", "--store", url, "--run", "c", "--min-prompts", "1", "--json"],
                           capture_output=True, text=True)
    assert json.loads(shown.stdout)["mined"] is not None
    plain = subprocess.run([*CLI, "patterns", "--store", url, "--run", "c", "--min-prompts", "1"],
                           capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert plain.returncode == 0 and all(title in plain.stdout for title in (
        "V-composition", "K/Q-composition into heads", "mechanisms")), plain.stdout[-500:]
