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


def window(writer: int, w: int, run: str | None = None, offset: int | None = None):
    """A window whose every node is new: features A0.{offset + j} of this writer and window (or of the
    ``offset`` given: windows of one offset share their nodes and edges)."""
    offset = (writer * WINDOWS + w) * NODES_PER_WINDOW if offset is None else offset
    run = run or f"run{writer}"
    nodes = [NodeInfo.of("toy", "rel", parse_ref(f"A0.{offset + j}")) for j in range(NODES_PER_WINDOW)]
    prompts = [Prompt(f"{run}/p{writer}-{w}-{i}", run, f"p{writer}-{w}-{i}", "text", ["a", "b"], "test", f"h{w}{i}")
               for i in range(4)]
    rng = np.random.default_rng(writer * 100 + w)
    n = ROWS_PER_WINDOW
    cols = [rng.integers(0, 4, n), rng.integers(0, NODES_PER_WINDOW, n), rng.integers(0, NODES_PER_WINDOW, n),
            rng.integers(0, 3, n), rng.integers(-1, 4, n), rng.integers(0, 2, n), rng.integers(0, 2, n), rng.normal(0, 1, n)]
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

    def look_up_then_let_the_other_commit(tx, agg, ingest):
        found = look_up(tx, agg, ingest)
        if not interleaved:  # the first lookups only: the second pass runs under the lock
            interleaved.append(fast.write_window(second))
        return found

    slow._look_up = look_up_then_let_the_other_commit
    assert slow.write_window(first) and interleaved == [True]
    assert snapshot(slow) == expected
    read = lambda q: slow.cypher(q, {}, limit=10_000, timeout_s=30)  # noqa: E731
    assert read("MATCH (n:Node) RETURN count(n) AS n") == [{"n": NODES_PER_WINDOW}]
