"""Issue 5: corpora (bad lines), long prompts, kill -9 + resume, shards — on both stores."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wipe_neo4j
from test_store_conformance import snapshot

from catalog.spool import Spool, default_spool
from catalog.stores import open_store
from ingest.corpora import open_corpus
from ingest.errors import UserFacingError
from ingest.jobs import JobOptions, cut_windows, run_job
from ingest.model_with_saes import ModelWithSaes
from ingest.rdfa.tensors import Pruning

CLI = [sys.executable, "-m", "cli"]
JOB = ["ingest", "--model", "toy-ioi", "--saes", "toy-ioi", "--batch-size", "4", "--no-progress", "--run", "r"]


@pytest.fixture(scope="module")
def toy():
    return ModelWithSaes.open("toy-ioi", ["toy-ioi"], "cpu")


def test_ioi_corpus_records_names_and_positions(toy, tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/c.db")
    run_job(toy, "ioi:6:3", store, JobOptions(run="ioi", progress=False))
    prompts = list(store.all_prompts())
    assert len(prompts) == 6
    for p in prompts:
        m = p.meta
        assert p.tokens[m["io_pos"]] == m["io"] and p.tokens[m["s1_pos"]] == m["s"] == p.tokens[m["s2_pos"]]
        assert m["end_pos"] == len(p.tokens) - 1 and m["order"] in ("ABBA", "BABA") and m["answer"] == m["io"]
        assert m["s1_pos"] < m["s2_pos"] and p.text.count(m["io"]) == 1


def test_abc_corpus_has_three_distinct_names():
    items = open_corpus("abc:20:1").items()
    assert len(items) == 20
    for it in items:
        assert len({it.meta["a"], it.meta["b"], it.meta["c"]}) == 3 and it.meta["c"] in it.text


def test_jsonl_bad_lines_are_reported_counted_and_skipped(toy, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "When Mary and John went to the store, John gave a drink to", "id": "a"}\n'
                    "not json at all\n"
                    '{"id": "no-text"}\n'
                    '{"text": "   "}\n'
                    '{"text": "Then, Tom and Amy went to the park. Tom gave an apple to", "meta": {"k": 1}}\n')
    store = open_store(f"sqlite:///{tmp_path}/c.db")
    logs = []
    summary = run_job(toy, str(path), store, JobOptions(run="j", progress=False), log=logs.append)
    assert summary.prompts == 2 and summary.bad_lines == 3
    assert store.done_prompts("j") == {"a", "line-000005"}
    bad = store.run("j").manifest["bad_lines"]
    assert bad == [{"line": 2, "reason": "not JSON (Expecting value)"}, {"line": 3, "reason": 'no "text" string'},
                   {"line": 4, "reason": "empty text"}]
    assert any("corpus line 2" in line for line in logs)


def test_txt_corpus_skips_empty_lines(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("When Mary and John went to the store, John gave a drink to\n\nThe apple was at the park.\n")
    corpus = open_corpus(str(path))
    assert [i.prompt_id for i in corpus.items()] == ["line-000001", "line-000003"]
    assert [(b.line, b.reason) for b in corpus.bad_lines] == [(2, "empty line")]


@pytest.mark.parametrize("spec,msg", [("ioi:x", "expected ioi:N"), ("nope.csv", "not understood"),
                                      ("missing.jsonl", "does not exist"), ("ioi:0", "positive")])
def test_bad_corpus_specs(spec, msg):
    with pytest.raises(UserFacingError, match=msg):
        open_corpus(spec)


def test_hf_corpus_offline_is_a_clear_error():
    with pytest.raises(UserFacingError, match="could not load dataset"):
        open_corpus("hf:no-such-user/no-such-dataset").items()


def test_long_prompts_refused_by_default_skipped_or_truncated(toy, tmp_path):
    path = tmp_path / "long.jsonl"
    long_text = " ".join(["Mary went to the store and bought a drink."] * 6)
    path.write_text(json.dumps({"text": long_text, "id": "long-one"}) + "\n" +
                    json.dumps({"text": "John saw Mary at the park today.", "id": "short"}) + "\n")
    store = open_store(f"sqlite:///{tmp_path}/c.db")
    with pytest.raises(UserFacingError, match="prompt 'long-one' has 6[0-9] tokens, more than the limit of 32"):
        run_job(toy, str(path), store, JobOptions(run="a", progress=False))
    assert store.done_prompts("a") == set()
    s = run_job(toy, str(path), store, JobOptions(run="b", long_policy="skip", progress=False))
    assert (s.prompts, s.skipped_long) == (1, 1)
    run_job(toy, str(path), store, JobOptions(run="c", long_policy="truncate", progress=False))
    assert len(store.prompt("c/long-one").tokens) == 32


def _ingest(store_url, *extra, check=True):
    return subprocess.run(CLI + JOB + ["--store", store_url, *extra], capture_output=True, text=True, check=check,
                          timeout=600)


def _catalog(store_url):
    snap = snapshot(open_store(store_url))
    snap["runs"] = [(r[0], r[1]) for r in snap["runs"]]  # manifests hold times and resume counts
    # stored mining results: their content (fingerprints and stamps hold finish times)
    snap["mined"] = [(key, {k: v for k, v in json.loads(result).items() if k != "mined"})
                     for key, _, _, result in snap["mined"]]
    return snap


def _fresh(store_url, name, tmp_path):
    if store_url.startswith("neo4j"):
        wipe_neo4j(store_url)
        return store_url
    return f"sqlite:///{tmp_path}/{name}.db"


_UNINTERRUPTED: dict[tuple[str, tuple[str, ...]], dict] = {}


def _uninterrupted(store_url, tmp_path, *args):
    """The catalog of one uninterrupted ``ingest *args`` on this kind of store, run once per test session:
    the kill -9 and Ray tests compare with the same run (a CLI run costs ~25 s of imports, model load and
    mining). On Neo4j this wipes the database: snapshot what is there first."""
    key = (store_url.split(":")[0], args)
    if key not in _UNINTERRUPTED:
        url = _fresh(store_url, "clean", tmp_path)
        _ingest(url, *args)
        _UNINTERRUPTED[key] = _catalog(url)
    return _UNINTERRUPTED[key]


DIE_AT = [sys.executable, str(Path(__file__).parent / "die_at.py")]
# two batches of 4 per window
WINDOWED = ["--window", "8"]


def _spooled(store_url, run="r") -> Spool:
    return Spool(default_spool(store_url), None)


# ioi:24 in batches of 4, windows of 8 (no halving tail): 3 windows; a compaction allowed 1 MiB splits the
# spool into several partitions
PARTITIONED = ["--compact-mem", "1"]


@pytest.mark.parametrize("point,at,spooled", [("spool", 2, 8), ("batch", 4, 8), ("compact", 1, 24), ("publish", 1, 24)],
                         ids=["inside-a-spool-write", "mid-window", "mid-compaction", "mid-publish"])
def test_kill_9_then_resume_equals_an_uninterrupted_run(store_url, tmp_path, point, at, spooled):
    """kill -9 while spooling the second window, while computing the second window, after the first of several
    compacted partitions, or inside the publish after its first partition: the catalog holds none of the run,
    the spool exactly the whole windows before the kill, and --resume completes the run into exactly the catalog
    of one uninterrupted process."""
    corpus = ["--corpus", "ioi:24:5"]
    inline = ["--compact-workers", "1"]  # the hook is in this process: no compaction processes
    died = subprocess.run(DIE_AT + [point, str(at), "--"] + JOB + WINDOWED + PARTITIONED + inline + [
                          "--store", store_url, *corpus],
                          capture_output=True, text=True, timeout=600)
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert open_store(store_url).done_prompts("r") == set()
    assert len(_spooled(store_url).done_prompts("r")) == spooled  # whole windows only
    if point == "compact":
        assert [p.name for p in _spooled(store_url).run_dir("r").glob("compacted-*/part-*.npz")] == ["part-0.npz"]
    refused = _ingest(store_url, *WINDOWED, *corpus, check=False)
    assert refused.returncode == 2 and "pass --resume" in refused.stderr
    _ingest(store_url, *WINDOWED, *PARTITIONED, *corpus, "--resume")
    resumed = _catalog(store_url)
    assert len(resumed["prompts"]) == 24
    assert not _spooled(store_url).run_dir("r").exists()  # published: the spool is gone
    assert _uninterrupted(store_url, tmp_path, *WINDOWED, *corpus) == resumed


def test_kill_9_between_segments_then_resume_equals_an_uninterrupted_run(store_url, tmp_path):
    """--publish-every: kill -9 once the second segment is stored but before the run lists it. Queries then read
    the first segment only (8 prompts, exactly), the second is invisible; --resume drops it, publishes on, and
    ends with exactly the catalog of one uninterrupted process without segments, none of them left."""
    from catalog import queries
    from catalog.runs import select_runs
    from catalog.spool import load_window

    corpus = ["--corpus", "ioi:24:5"]
    died = subprocess.run(DIE_AT + ["segment", "2", "--"] + JOB + WINDOWED + ["--publish-every", "8", "--store",
                          store_url, *corpus], capture_output=True, text=True, timeout=600)
    assert died.returncode == -signal.SIGKILL, died.stderr
    store = open_store(store_url)
    assert select_runs(store, ["r"]) == ("r", "r~0001")
    assert sorted(r.run_id for r in store.runs()) == ["r", "r~0001", "r~0002"]  # r~0002: stored, not shown
    assert len(store.done_prompts("r~0001")) == 8 and store.done_prompts("r") == set()
    shown = store.run("r~0001").manifest["windows"]
    assert len(shown) == 1
    window = load_window(_spooled(store_url).run_dir("r") / shown[0])  # what the first segment covers
    assert sum(e.n_obs for e in store.all_edges(runs=select_runs(store, ["r"]))) == int(window.edges.n_obs.sum())
    assert queries.overview(store)["counts"]["prompts"] == 16  # both segments' rows are stored, one is read
    _ingest(store_url, *WINDOWED, *corpus, "--publish-every", "8", "--resume")
    resumed = _catalog(store_url)
    assert [r[0] for r in resumed["runs"]] == ["r"] and len(resumed["prompts"]) == 24
    assert _uninterrupted(store_url, tmp_path, *WINDOWED, *corpus) == resumed


def test_windows_are_full_until_the_halving_tail():
    """Full windows while two or more are left, then halves of what is left (rounded up) down to one
    batch, in corpus order; every batch exactly once."""
    sizes = lambda n, w: [len(x) for x in cut_windows(list(range(n)), w)]  # noqa: E731
    assert sizes(63, 32) == [32, 16, 8, 4, 2, 1]  # the demo: 500 prompts in batches of 8, --window 256
    assert sizes(6, 2) == [2, 2, 1, 1]
    assert sizes(10, 2) == [2, 2, 2, 2, 1, 1]
    assert sizes(7, 10) == [4, 2, 1]
    assert sizes(5, 1) == [1, 1, 1, 1, 1]
    assert sizes(0, 4) == []
    assert [b for w in cut_windows(list(range(63)), 32) for b in w] == list(range(63))


def test_the_halving_tail_stops_at_the_tail_window():
    """A tail floor keeps the last windows at least that large, except what is left at the very end
    (Neo4j's floor is its window: a write there costs about a full one whatever the window's size);
    every batch exactly once."""
    sizes = lambda n, w, t: [len(x) for x in cut_windows(list(range(n)), w, t)]  # noqa: E731
    assert sizes(250, 128, 32) == [125, 63, 32, 30]  # ioi:2000 in batches of 8, windows of 1024, floor 256
    assert sizes(250, 128, 128) == [128, 122]  # the same with Neo4j's floor: no halving
    assert sizes(63, 32, 8) == [32, 16, 8, 7]
    assert sizes(63, 32, 1) == [32, 16, 8, 4, 2, 1]  # a floor of one batch is the plain halving tail
    assert sizes(7, 10, 100) == [7]  # a floor above the window: one window of what there is
    assert sizes(40, 8, 8) == [8] * 5  # a floor of a full window: no tail at all
    assert [b for w in cut_windows(list(range(250)), 128, 32) for b in w] == list(range(250))


@pytest.mark.parametrize("flag", ["--window", "--tail-window"])
def test_window_below_one_is_refused_before_anything_is_written(tmp_path, flag):
    db = tmp_path / "c.db"
    out = _ingest(f"sqlite:///{db}", "--corpus", "ioi:4", flag, "0", check=False)
    assert out.returncode == 2 and f"{flag} 0: must be at least 1" in out.stderr
    assert not db.exists()


def test_window_cuts_do_not_change_the_catalog(toy, store_url, tmp_path):
    """One window per batch, early flushes forced by a tiny memory bound or a tiny edge bound (the
    one a Neo4j store sets for its server's heap), windows as large as the corpus cut 2 + 1 batches
    (the halving tail) and one window of it all (a tail floor of the whole corpus, as Neo4j's is)
    store the same catalog (counts exact, sums to 6 significant digits, same evidence)."""
    runs = [dict(window=4), dict(window=1000, window_mem=1), dict(window=1000, tail_window=1),
            dict(window=1000, window_edges=1), dict(window=1000, tail_window=1000)]
    catalogs = []
    for k, extra in enumerate(runs):
        url = _fresh(store_url, f"w{k}", tmp_path)
        s = run_job(toy, "ioi:12:3", open_store(url), JobOptions(run="r", batch_size=4, progress=False, **extra))
        assert s.prompts == 12 and s.windows == (3, 3, 2, 3, 1)[k]
        catalogs.append(_catalog(url))
    assert all(c == catalogs[0] for c in catalogs[1:])


def test_a_job_without_a_window_spools_windows_of_the_default_size(toy, tmp_path, monkeypatch):
    """No --window: windows of catalog.spool.DEFAULT_WINDOW prompts, no halving tail (a spool write is never
    waited on); the manifest records both; ones given win."""
    import catalog.spool

    store = open_store(f"sqlite:///{tmp_path}/c.db")
    monkeypatch.setattr(catalog.spool, "DEFAULT_WINDOW", 4)  # one batch of 4 a window
    s = run_job(toy, "ioi:12:3", store, JobOptions(run="d", batch_size=4, progress=False))
    assert s.windows == 3 and store.run("d").manifest["window"] == 4 and store.run("d").manifest["tail_window"] == 4
    s = run_job(toy, "ioi:12:3", store, JobOptions(run="g", batch_size=4, progress=False, window=1000))
    assert s.windows == 1 and store.run("g").manifest["window"] == 1000  # no halving: one window of it all
    s = run_job(toy, "ioi:12:3", store, JobOptions(run="u", batch_size=4, progress=False, window=1000, tail_window=4))
    assert s.windows == 2 and store.run("u").manifest["tail_window"] == 4  # 2 + 1 batches: the halving tail


def test_shards_give_the_same_catalog_as_one_process(store_url, tmp_path):
    """Shards spool into one folder; the one that ends last publishes (and mines) the whole run, once."""
    corpus = ["--corpus", "ioi:16:6"]
    procs = [subprocess.Popen(CLI + JOB + ["--store", store_url, *corpus, "--shard", f"{i}/2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    errors = [p.stderr.read() for p in procs]
    assert [p.wait(timeout=600) for p in procs] == [0, 0], errors
    assert sum("the run is published when its last shard ends" in e for e in errors) <= 1
    assert not Spool(default_spool(store_url), None).run_dir("r").exists()  # published: the spool is gone
    sharded = _catalog(store_url)
    assert sharded["runs"] == [("r", "done")]
    manifest = open_store(store_url).run("r").manifest
    assert manifest["counts_shard0"]["prompts"] + manifest["counts_shard1"]["prompts"] == 16
    one_url = _fresh(store_url, "one", tmp_path)
    _ingest(one_url, *corpus)
    single = _catalog(one_url)
    assert len(single["prompts"]) == 16
    for key in ("edges", "evidence", "stats", "activations", "prompts", "mined"):
        assert sharded[key] == single[key], key


def test_an_ingest_with_transcoders_stores_the_same_catalog_on_both_stores(tmp_path, neo4j_url):
    """The toy model's own transcoders through the command a user runs: SQLite and a live Neo4j hold the same
    catalog, with transcoder features, mlp_in edges into them and no MLP leaf left, and the manifest names them."""
    import re

    wipe_neo4j(neo4j_url)
    sqlite = f"sqlite:///{tmp_path}/t.db"
    for url in (sqlite, neo4j_url):
        _ingest(url, "--corpus", "ioi:8:2", "--transcoders", "toy-ioi")
    on_sqlite, on_neo4j = _catalog(sqlite), _catalog(neo4j_url)
    assert on_sqlite == on_neo4j
    edges = on_sqlite["edges"]
    assert {e[2] for e in edges} >= {"mlp_in", "resid_in", "attn_in", "direct"}
    assert any(e[2] == "mlp_in" and "|T1." in e[1] and "|T0." in e[0] for e in edges)  # MLP0 feeds MLP1, decomposed
    assert not any(re.search(r"\|MLP\d+$", uid) for e in edges for uid in e[:2])
    saes = open_store(sqlite).run("r").manifest["saes"]
    assert sorted(s["layer"] for s in saes if s["kind"] == "transcoder") == [0, 1, 2]
    wipe_neo4j(neo4j_url)


def test_manifest_records_what_reproduces_a_run(toy, tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/c.db")
    run_job(toy, "ioi:4", store, JobOptions(run="m", progress=False))
    m = store.run("m").manifest
    assert m["model"]["name"] == "toy-ioi" and m["model"]["processing"]["fold_ln"] is True
    assert len(m["saes"]) == 6 and all(len(s["weights_hash"]) == 32 for s in m["saes"])
    assert m["pruning"] == {"top_k": 5, "min_abs": 0.01, "direct": True, "direct_positions": 2, "qk": True}
    assert m["corpus"]["spec"] == "ioi:4" and len(m["corpus"]["fingerprint"]) == 32
    assert m["counts"]["prompts"] == 4 and m["dtype"] == "float32" and m["device"] == "cpu"
    assert store.run("m").status == "done" and m["started"] and m["finished"]


def test_a_reduced_precision_run_says_so_in_its_manifest(toy, tmp_path):
    """ingest --precision bfloat16 reaches the attribution and the run's manifest; float32 runs keep the
    manifest they had before the option."""
    store = open_store(f"sqlite:///{tmp_path}/c.db")
    pruning = Pruning(top_k=5, min_abs=0.01, direct_positions=2, precision="bfloat16")
    run_job(toy, "ioi:2", store, JobOptions(run="b", progress=False, pruning=pruning, mine=False))
    assert store.run("b").manifest["pruning"]["precision"] == "bfloat16"
    assert store.run("b").status == "done"
