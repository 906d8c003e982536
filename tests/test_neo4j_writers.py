"""Concurrent writers on one Neo4j catalog (the shards of one run, or two jobs): windows apply one after
another under the dictionary lock, so node ids are handed out once each and no write fails. A REMOVE of
an absent property was once the lock; it locked nothing, and two writers gave out the same ids."""

from __future__ import annotations

import multiprocessing

import numpy as np
import torch

from catalog.ids import parse_ref
from catalog.schema import NodeInfo, Prompt
from catalog.stores import open_store
from ingest.reduce import Activations, Observations
from ingest.to_catalog import aggregate_rows

WINDOWS, NODES_PER_WINDOW, ROWS_PER_WINDOW = 6, 300, 6000


def window(writer: int, w: int, run: str | None = None, offset: int | None = None, n_nodes: int = NODES_PER_WINDOW,
           scale: float = 1.0):
    """A window whose every node is new: features A0.{offset + j} of this writer and window (or of the
    ``offset`` given: windows of one offset share their nodes and edges); ``n_nodes`` nodes, values
    drawn from N(0, scale)."""
    offset = (writer * WINDOWS + w) * NODES_PER_WINDOW if offset is None else offset
    run = run or f"run{writer}"
    nodes = [NodeInfo.of("toy", "rel", parse_ref(f"A0.{offset + j}")) for j in range(n_nodes)]
    prompts = [Prompt(f"{run}/p{writer}-{w}-{i}", run, f"p{writer}-{w}-{i}", "text", ["a", "b"], "test", f"h{w}{i}")
               for i in range(4)]
    rng = np.random.default_rng(writer * 100 + w)
    n = ROWS_PER_WINDOW
    cols = [rng.integers(0, 4, n), rng.integers(0, n_nodes, n), rng.integers(0, n_nodes, n),
            rng.integers(0, 3, n), rng.integers(-1, 4, n), rng.integers(0, 2, n), rng.integers(0, 2, n),
            rng.normal(0, scale, n)]
    obs = Observations(*(torch.from_numpy(np.ascontiguousarray(c)) for c in cols))
    return aggregate_rows(obs, Activations(obs.dst, obs.prompt, obs.value.abs()), nodes, run, prompts, 4)


def _write(url: str, writer: int, out) -> None:
    torch.set_num_threads(1)
    try:
        store = open_store(url, evidence_per_edge=4)
        store.start_run(f"run{writer}", {"kind": "test"}, resume=False)
        for w in range(WINDOWS):
            assert store.write_window(window(writer, w))
        out.put("ok")
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out.put(f"{type(exc).__name__}: {exc}"[:600])


def test_two_concurrent_writers_hand_out_each_node_id_once(neo4j_url):
    from conftest import wipe_neo4j

    wipe_neo4j(neo4j_url)
    open_store(neo4j_url).close()  # the schema exists; what races here is the window writes
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_write, args=(neo4j_url, k, out)) for k in range(2)]
    for p in procs:
        p.start()
    answers = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert answers == ["ok", "ok"]
    store = open_store(neo4j_url)
    read = lambda q: store.cypher(q, {}, limit=10_000, timeout_s=30)  # noqa: E731
    nids = [r["nid"] for r in read("MATCH (n:Node) RETURN n.nid AS nid ORDER BY nid")]
    assert nids == list(range(2 * WINDOWS * NODES_PER_WINDOW))
    assert read("MATCH (d:Dictionary {name: 'nodes'}) RETURN d.next AS next") == [{"next": len(nids)}]


def test_a_writer_that_commits_during_anothers_lookups_is_seen_before_it_writes(neo4j_url):
    """A writer looks its window up before it takes the lock; when another writer of the same run and
    nodes commits in between (the lock's counter grew by two), the lookups are repeated under the lock:
    every node exists once and every edge once per run, with both windows' sums, as if one writer had
    written both."""
    from conftest import wipe_neo4j
    from test_store_conformance import snapshot

    first, second = window(0, 0, run="r", offset=0), window(1, 0, run="r", offset=0)
    wipe_neo4j(neo4j_url)
    alone = open_store(neo4j_url, evidence_per_edge=4)
    alone.start_run("r", {"kind": "test"}, resume=False)
    assert alone.write_window(second) and alone.write_window(first)
    expected = snapshot(alone)

    wipe_neo4j(neo4j_url)
    slow, fast = open_store(neo4j_url, evidence_per_edge=4), open_store(neo4j_url, evidence_per_edge=4)
    slow.start_run("r", {"kind": "test"}, resume=False)
    look_up, interleaved = slow._look_up, []

    def look_up_then_let_the_other_commit(tx, agg, ingest, copy):
        found = look_up(tx, agg, ingest, copy)
        if not interleaved:  # the first lookups only: the second pass runs under the lock
            interleaved.append(fast.write_window(second))
        return found

    slow._look_up = look_up_then_let_the_other_commit
    assert slow.write_window(first) and interleaved == [True]
    assert snapshot(slow) == expected
    read = lambda q: slow.cypher(q, {}, limit=10_000, timeout_s=30)  # noqa: E731
    assert read("MATCH (n:Node) RETURN count(n) AS n") == [{"n": NODES_PER_WINDOW}]


def _find_edges_queries(store) -> list[int]:
    """Counts, into the list returned, the FIND_EDGES lookups ``store``'s transactions run."""
    from catalog.stores.neo4j import FIND_EDGES

    calls: list[int] = []
    window_tx = store._window_tx

    def counting(tx, agg, ingest):
        run = tx.run

        def counted(query, *args, **kwargs):
            calls.extend([1] if query == FIND_EDGES else [])
            return run(query, *args, **kwargs)

        tx.run = counted
        return window_tx(tx, agg, ingest)

    store._window_tx = counting
    return calls


def _recurring_windows() -> list:
    """Three windows of run "r" over the same 20 nodes (~1200 edges, each in every window, with ~5
    observations a window), the second's values large enough to displace the first's evidence."""
    return [window(k, 0, run="r", offset=0, n_nodes=20, scale=100.0 if k == 1 else 1.0) for k in range(3)]


def _written_alone(url: str, windows: list) -> dict:
    """The catalog of run "r" that one writer makes of ``windows``, written in that order into a wiped
    database (test_store_conformance.snapshot)."""
    from conftest import wipe_neo4j
    from test_store_conformance import snapshot

    wipe_neo4j(url)
    alone = open_store(url, evidence_per_edge=4)
    alone.start_run("r", {"kind": "test"}, resume=False)
    assert all(alone.write_window(w) for w in windows)
    return snapshot(alone)


def test_a_commit_while_anothers_lookups_stream_is_read_again_under_the_lock(neo4j_url):
    """A writer reads its window's stored edges and their evidence lists before it takes the lock,
    streamed in batches of the driver's fetch size. When another writer changes some of those lists
    and commits while that read is still streaming, the rows read after the commit are from after it
    and the rows before from before (read committed isolation). The writer must not use such a read:
    it reads again under the lock, and the catalog is as if one writer had written the three windows
    in commit order. (With evidence as nodes, this read once saw nodes deleted mid-stream and died on
    their null properties in CI's shard test.)"""
    from conftest import wipe_neo4j
    from neo4j import Result
    from test_store_conformance import snapshot

    from catalog.stores.neo4j import FIND_EDGES

    # the lookup streams more rows than one fetch holds, and the displacing window's rows outrank
    # every stored one
    base, displacing, last = _recurring_windows()
    expected = _written_alone(neo4j_url, [base, displacing, last])

    wipe_neo4j(neo4j_url)
    first, fast, slow = (open_store(neo4j_url, evidence_per_edge=4) for _ in range(3))
    first.start_run("r", {"kind": "test"}, resume=False)
    assert first.write_window(base)
    streamed: list[int] = []
    run = Result.__iter__

    def stream_then_let_the_other_commit(result):
        for i, record in enumerate(run(result)):
            if i == 1 and not streamed and result._metadata.get("query") == FIND_EDGES:
                streamed.append(1)
                assert fast.write_window(displacing)
            yield record

    Result.__iter__ = stream_then_let_the_other_commit
    try:
        assert slow.write_window(last)
    finally:
        Result.__iter__ = run
    assert streamed == [1]
    assert snapshot(slow) == expected


def test_a_lone_writer_uses_its_copy_of_the_runs_edges_and_stores_what_lookups_would(neo4j_url):
    """A writer that stored every edge of its run itself takes element ids and evidence lists from its
    own copy instead of looking them up: after the first window no lookup runs, and the catalog is the
    one written with every edge looked up (the copy disabled)."""
    from conftest import wipe_neo4j
    from test_store_conformance import snapshot

    windows = _recurring_windows()
    wipe_neo4j(neo4j_url)
    looked_up = open_store(neo4j_url, evidence_per_edge=4)
    looked_up._edge_copy = lambda tx, run, seen: None
    looked_up.start_run("r", {"kind": "test"}, resume=False)
    lookups = _find_edges_queries(looked_up)
    assert all(looked_up.write_window(w) for w in windows)
    assert len(lookups) == len(windows) - 1  # the copy off: each later window looks its edges up (the first knows no node)
    expected = snapshot(looked_up)

    wipe_neo4j(neo4j_url)
    lone = open_store(neo4j_url, evidence_per_edge=4)
    lone.start_run("r", {"kind": "test"}, resume=False)
    lookups = _find_edges_queries(lone)
    assert all(lone.write_window(w) for w in windows)
    assert lookups == []
    assert len(lone._run_edges["r"].keys) == len(expected["edges"])
    assert snapshot(lone) == expected


def test_a_writer_drops_its_copy_once_another_writer_commits(neo4j_url):
    """When another writer stores a window of the same run between two of this writer's, its copy
    lacks that window's edges: it must look them up again (and from then on), or it would create a
    second relationship for each. A writer joining a run with prompts stored starts no copy."""
    from conftest import wipe_neo4j
    from test_store_conformance import snapshot

    first, second, third = _recurring_windows()
    expected = _written_alone(neo4j_url, [first, second, third])

    wipe_neo4j(neo4j_url)
    this, other = open_store(neo4j_url, evidence_per_edge=4), open_store(neo4j_url, evidence_per_edge=4)
    this.start_run("r", {"kind": "test"}, resume=False)
    lookups = _find_edges_queries(this)
    assert this.write_window(first) and this._run_edges["r"] is not None
    assert other.write_window(second) and other._run_edges["r"] is None  # the run had prompts: no copy
    assert this.write_window(third)
    assert this._run_edges["r"] is None and len(lookups) == 1
    assert snapshot(this) == expected
