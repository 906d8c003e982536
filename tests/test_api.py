"""Issue 6: the REST API on both stores — answers, errors, pagination, read-only Cypher."""

from __future__ import annotations

import re

import pytest
from catalog_data import random_prompts
from conftest import wait_healthy
from fastapi.testclient import TestClient
from test_store_conformance import _batches, _fill

from api.app import create_app
from api.settings import Settings
from catalog import queries
from catalog.stores import open_store


@pytest.fixture
def client(store_url):
    _fill(store_url, _batches())
    with TestClient(create_app(Settings(store=store_url)), raise_server_exceptions=False) as c:
        yield c


def test_feature_and_errors(client):
    r = client.get("/features/A1.3")
    assert r.status_code == 200 and r.json()["id"] == "A1.3" and r.json()["kind"] == "attn"
    assert r.json()["activation"]["n_prompts"] >= 1
    assert client.get("/features/L1.F3").json()["uid"] == r.json()["uid"]  # the seed's alias
    bad = client.get("/features/A1.x")
    assert bad.status_code == 422 and "cannot parse node reference 'A1.x'" in bad.json()["detail"]
    missing = client.get("/features/A9.9")
    assert missing.status_code == 404 and "A9.9" in missing.json()["detail"]


def test_upstream_filters_order_and_cursor_pagination(client, store_url):
    store = open_store(store_url)
    full = queries.upstream(store, "A2.1", order="count", limit=50)
    assert len(full) > 6
    page1 = client.get("/features/A2.1/upstream", params={"order": "count", "limit": 4}).json()
    page2 = client.get("/features/A2.1/upstream", params={"order": "count", "limit": 4,
                                                          "cursor": page1["next_cursor"]}).json()
    assert page1["items"] + page2["items"] == full[:8]
    only_attn = client.get("/features/A2.1/upstream", params={"kind": "attn", "edge_kind": "direct"}).json()["items"]
    assert only_attn and all(i["kind"] == "attn" and i["edge_kind"] == "direct" for i in only_attn)
    assert client.get("/features/A2.1/upstream", params={"limit": 10_000}).status_code == 422
    assert client.get("/features/A2.1/upstream", params={"order": "nope"}).status_code == 422
    assert client.get("/features/A2.1/upstream", params={"cursor": "garbage"}).status_code == 422
    down = client.get("/features/R0.1/downstream", params={"layer": 1, "limit": 500}).json()["items"]
    every = client.get("/features/R0.1/downstream", params={"limit": 500}).json()["items"]
    assert down and down == [i for i in every if i["layer"] == 1]


def test_edge_prompt_and_runs(client, store_url):
    store = open_store(store_url)
    e = max(store.all_edges(), key=lambda e: e.n_obs)
    src, dst = e.src.split("|")[2], e.dst.split("|")[2]
    body = client.get(f"/edges/{src}/{dst}").json()
    assert body["kinds"] and body["kinds"][0]["evidence"][0]["text"].startswith("prompt number")
    assert body == queries.edge(store, src, dst)
    uid = body["kinds"][0]["evidence"][0]["prompt"]
    written = {p.uid: p for p in random_prompts("r1", 20)}  # the prompts _batches wrote (tests/catalog_data.py)
    answer = client.get(f"/prompts/{uid}").json()
    assert answer["text"] == written[uid].text and answer["tokens"] == written[uid].tokens
    assert client.get(f"/prompts/{uid}/graph").json()["edges"]
    assert client.get("/prompts/r1/nope").status_code == 404
    assert client.get("/runs").json()[0]["run_id"] == "r1"
    assert client.get("/runs/r1").json()["status"] == "done"
    assert client.get("/runs/zzz").status_code == 404
    assert client.get("/healthz").json()["ok"] is True


def test_cypher_on_sqlite_is_501(tmp_path):
    url = f"sqlite:///{tmp_path}/c.db"
    _fill(url, _batches())
    with TestClient(create_app(Settings(store=url))) as c:
        r = c.post("/cypher", json={"query": "MATCH (n) RETURN n LIMIT 1"})
    assert r.status_code == 501 and "Cypher needs the Neo4j store" in r.json()["detail"]


WRITES = [
    "CREATE (n:Hack) RETURN n",
    "MERGE (n:Node {uid: 'x'}) RETURN n",
    "MATCH (n:Node) SET n.pwned = true RETURN count(n)",
    "MATCH (n:Node) DETACH DELETE n",
    "MATCH ()-[r:EDGE]->() DELETE r",
    "CREATE INDEX hack IF NOT EXISTS FOR (n:Node) ON (n.pwned)",
    "DROP CONSTRAINT node_uid",
    "LOAD CSV FROM 'file:///etc/passwd' AS line RETURN line",
    "CALL dbms.listConfig() YIELD name RETURN name",
    "CALL db.createLabel('Hack')",
    "MATCH (n:Node) CALL { WITH n SET n.x = 1 } IN TRANSACTIONS RETURN 1",
    "MATCH (n:Node) FOREACH (i IN [1] | CREATE (:Hack)) RETURN 1",
    "SHOW USERS",
    "CREATE USER hacker SET PASSWORD 'password123'",
    "EXPLAIN MATCH (n) RETURN n",
    "USE system SHOW DATABASES",
]


def test_cypher_reads_with_parameters_and_refuses_every_write(tmp_path, neo4j_url):
    from conftest import wipe_neo4j

    wipe_neo4j(neo4j_url)
    store = _fill(neo4j_url, _batches())
    before = store.cypher("MATCH (n) RETURN count(n) AS n", {}, 10, 5)[0]["n"]
    with TestClient(create_app(Settings(store=neo4j_url, cypher_row_cap=7, cypher_timeout_s=2))) as c:
        ok = c.post("/cypher", json={"query": "MATCH (n:Feature {ref: $ref}) RETURN n.uid AS uid", "params": {"ref": "A1.3"}})
        assert ok.status_code == 200 and ok.json()["rows"] == [{"uid": "toy|rel|A1.3"}]
        capped = c.post("/cypher", json={"query": "UNWIND range(1, 100) AS i RETURN i"}).json()
        assert len(capped["rows"]) == 7 and capped["truncated"] is True
        slow = c.post("/cypher", json={"query": "UNWIND range(1, 100000) AS a UNWIND range(1, 100000) AS b "
                                                "WITH a, b WHERE a * b = -1 RETURN count(*)"})  # 1e10 rows
        assert slow.status_code == 400 and "limit" in slow.json()["detail"]
        for q in WRITES:
            r = c.post("/cypher", json={"query": q})
            assert r.status_code == 400, q
            assert r.json()["detail"] and "Traceback" not in r.text, q
        huge = c.post("/cypher", json={"query": "RETURN $x AS x", "params": {"x": 2 ** 70}})
        assert huge.status_code == 400 and "parameter" in huge.json()["detail"]
        injected = c.post("/cypher", json={"query": "MATCH (n:Feature {ref: $ref}) RETURN n.uid AS uid",
                                           "params": {"ref": "A1.3'}) DETACH DELETE n //"}})
        assert injected.status_code == 200 and injected.json()["rows"] == []
    after = store.cypher("MATCH (n) RETURN count(n) AS n", {}, 10, 5)[0]["n"]
    assert after == before
    assert store.cypher("MATCH (n:Hack) RETURN count(n) AS n", {}, 10, 5)[0]["n"] == 0


def test_store_down_is_503_with_retry_hint():
    with TestClient(create_app(Settings(store="neo4j://127.0.0.1:9"))) as c:
        r = c.get("/features/A1.1")
    assert r.status_code == 503 and r.headers["Retry-After"] == "5" and "retry" in r.json()["detail"]


def test_a_served_app_freezes_what_start_up_built_and_a_library_app_does_not(tmp_path):
    """`serve` freezes the start-up heap out of the collector's sight (the p99 of bench/api_load.py);
    an app built in a longer-lived process (tests, notebooks) leaves the collector alone."""
    import gc

    url = f"sqlite:///{tmp_path}/c.db"
    try:
        gc.unfreeze()
        with TestClient(create_app(Settings(store=url, warm_patterns=False))):
            assert gc.get_freeze_count() == 0
        with TestClient(create_app(Settings(store=url, warm_patterns=False, freeze_gc=True))):
            assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()


def test_binds_to_localhost_and_refuses_limits_below_one():
    assert Settings().host == "127.0.0.1"
    for name in ("max_limit", "cypher_row_cap", "evidence_limit"):
        with pytest.raises(ValueError, match="must be at least 1"):
            Settings(**{name: 0})


def test_api_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from api.app import create_app; create_app(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_openapi_describes_every_response():
    """Each operation's 200 answer has a schema (a response model), not an untyped object."""
    spec = TestClient(create_app(Settings(store="sqlite:///unused.db", warm_patterns=False))).get("/openapi.json").json()
    operations = [(path, method, op) for path, ops in spec["paths"].items() for method, op in ops.items()]
    assert len(operations) >= 12
    for path, method, op in operations:
        schema = op["responses"]["200"]["content"]["application/json"]["schema"]
        described = "$ref" in schema or "anyOf" in schema or schema.get("type") == "array" and "$ref" in schema["items"]
        assert described, (method, path, schema)
    upstream = spec["components"]["schemas"]["Neighbour"]["properties"]
    assert {"id", "edge_kind", "n_prompts", "sum", "sign_share", "heads"} <= set(upstream)


def test_every_hot_answer_is_checked_against_its_model_in_the_tests(tmp_path, monkeypatch):
    """Production skips validating the hot answers; the tests validate each (check_responses), so a
    field a query adds without a response model fails instead of leaving the schema behind."""
    url = f"sqlite:///{tmp_path}/c.db"
    _fill(url, _batches())
    real = queries.feature
    monkeypatch.setattr(queries, "feature", lambda *a, **k: {**real(*a, **k), "surprise": 1})
    with TestClient(create_app(Settings(store=url, check_responses=True)), raise_server_exceptions=False) as c:
        assert c.get("/features/A1.3").status_code == 500
    with TestClient(create_app(Settings(store=url, check_responses=False)), raise_server_exceptions=False) as c:
        r = c.get("/features/A1.3")
        assert r.status_code == 200 and r.json()["surprise"] == 1 and r.json()["id"] == "A1.3"


def test_serve_with_several_worker_processes_answers_as_one(tmp_path):
    """`serve --workers 2`: each worker builds the app from the environment the command sets."""
    import socket
    import subprocess
    import sys

    import httpx

    url = f"sqlite:///{tmp_path}/w.db"
    _fill(url, _batches())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--store", url, "--port", str(port), "--workers",
                               "2", "--no-access-log"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", server, 30)
        answers = [httpx.get(f"http://127.0.0.1:{port}/features/A2.1/upstream", params={"limit": 50}).json()["items"]
                   for _ in range(6)]
        assert answers[0] and all(a == queries.upstream(open_store(url), "A2.1", limit=50) for a in answers)
    finally:
        server.terminate()
        _, err = server.communicate(timeout=30)
    assert "Started parent process" in err and err.count("Started server process") == 2


def test_shutdown_waits_for_the_patterns_warm_up_which_uses_its_own_store(store_url):
    """The warm-up mines on a store of its own and shutdown joins it before closing the app's store:
    closing a Neo4j driver whose connection another thread is using broke a later test in CI."""
    import threading

    _fill(store_url, _batches()).close()
    app = create_app(Settings(store=store_url))
    with TestClient(app):
        pass  # no request: only the warm-up touches the catalog
    assert not [t for t in threading.enumerate() if t.name == "patterns-warm-up"]
    assert app.state.store is None  # the app's own store was never opened by the warm-up
    assert len(app.state._mined) == 1  # the warm-up finished its mining before shutdown returned


COMMANDS = [  # each refused whatever hides its first word: comments, case, whitespace, USE, CALL {}
    "/**/ SHOW TRANSACTIONS", "/* c */ SHOW PROCEDURES", "// line\nshow settings", "  sHoW   IndEXes",
    "/**/ TERMINATE TRANSACTIONS 'neo4j-transaction-1'", "USE neo4j SHOW TRANSACTIONS", "USE neo4j /**/ SHOW FUNCTIONS",
    "CALL () { SHOW TRANSACTIONS YIELD transactionId RETURN transactionId } RETURN transactionId",
    "SHOW TRANSACTIONS YIELD transactionId TERMINATE TRANSACTIONS transactionId",
    "CALL dbms.listConfig()", "/**/ CALL dbms.components()", "USE system MATCH (n) RETURN n",
    "/* x */ EXPLAIN MATCH (n) RETURN n", "/**/ PROFILE MATCH (n) RETURN n",
    "MATCH (n) CALL (n) { WITH n RETURN n AS m } IN TRANSACTIONS RETURN m",
]


def test_cypher_refuses_commands_by_what_neo4j_runs_and_keeps_serving(tmp_path, neo4j_url):
    """The guard decides on the plan: SHOW/TERMINATE (query type 'r' to the planner), procedures off the
    allow-list, another database, EXPLAIN/PROFILE behind a comment; an open write of another client
    survives a TERMINATE sent through the endpoint; the allow-list's CALL db.labels() runs."""
    import neo4j
    from conftest import wipe_neo4j

    wipe_neo4j(neo4j_url)
    _fill(neo4j_url, _batches())
    driver = neo4j.GraphDatabase.driver(neo4j_url.replace("neo4j://", "bolt://"), auth=None)
    with TestClient(create_app(Settings(store=neo4j_url, cypher_timeout_s=5))) as c, driver.session() as other:
        writer = other.begin_transaction(metadata={"who": "survivor"})  # another client's write, open meanwhile
        writer.run("CREATE (:Survivor)").consume()
        with driver.session() as admin:
            tx_id = admin.run("SHOW TRANSACTIONS YIELD transactionId, metaData "
                              "WHERE metaData.who = 'survivor' RETURN transactionId").single(strict=True)[0]
        for q in COMMANDS + [f"/**/ TERMINATE TRANSACTIONS '{tx_id}'"]:
            r = c.post("/cypher", json={"query": q})
            assert r.status_code == 400, (q, r.text)
            assert "Traceback" not in r.text, q
        writer.commit()  # still open: nothing terminated it
        labels = c.post("/cypher", json={"query": "CALL db.labels() YIELD label RETURN label ORDER BY label"})
        assert labels.status_code == 200 and {"label": "Survivor"} in labels.json()["rows"]
        big = c.post("/cypher", json={"query": "RETURN size($x) AS n", "params": {"x": "a" * (2 << 20)}})
        assert big.status_code == 400 and "parameters" in big.json()["detail"]
        ok = c.post("/cypher", json={"query": "MATCH (n:Survivor) RETURN count(n) AS n"})
        assert ok.status_code == 200 and ok.json()["rows"] == [{"n": 1}]
    driver.close()


def test_cypher_bounds_time_and_memory_inside_the_server_and_it_serves_again(tmp_path):
    """The issue's hostile queries are refused before they run (range() bounds); what passes that check and
    still runs away (nested lists, a doubling reduce) is ended inside the server: the runaway watchdog after
    the timeout plus its grace, -XX:+ExitOnOutOfMemoryError on a full heap. The supervisor restarts the
    server, the caller gets a 503, and the catalog is served again, whole. A dedicated server: it restarts."""
    import time
    from pathlib import Path

    from cli.neo4j_server import start_on_free_port

    server, url = start_on_free_port(str(tmp_path / "neo4j"), page_cache="64m", heap="512m", runaway_grace_s=2)
    log = Path(tmp_path / "neo4j" / "server.log")
    try:
        _fill(url, _batches())
        count = "MATCH ()-[r]->() RETURN count(r) AS n"
        with TestClient(create_app(Settings(store=url, cypher_timeout_s=2))) as c:
            stored = c.post("/cypher", json={"query": count}).json()["rows"]
            assert stored[0]["n"] > 0
            for q, says in [("RETURN reduce(s=0, x IN range(1,4000000000) | s+x)", "span 4,000,000,000 values"),
                            ("RETURN size([x IN range(1,200000000) | x])", "span 200,000,000 values"),
                            ("/* range(1,2) */ RETURN range(1, toInteger('9999999999'))", "bound \"toInteger('')\""),
                            ("RETURN range(0, $n)", "span 5,000,001 values")]:
                started = time.monotonic()
                r = c.post("/cypher", json={"query": q, "params": {"n": 5_000_000}})
                assert r.status_code == 400 and says in r.json()["detail"], (q, r.text)
                assert time.monotonic() - started < 1, q  # refused before anything ran
            for q, reason in [("WITH range(1, 1000000) AS r RETURN size([a IN r WHERE size([b IN r WHERE b = a]) > 0])",
                               "(runaway query)"),
                              ("RETURN size(reduce(s = 'ab', x IN range(1, 40) | s + s)) AS n", "(out of heap)")]:
                restarts = log.read_text().count("RESTARTING")
                started = time.monotonic()
                r = c.post("/cypher", json={"query": q})
                assert r.status_code == 503 and "restarts the server" in r.json()["detail"], (q, r.text)
                assert time.monotonic() - started < 30, q  # timeout 2 s + grace 2 s + the watchdog's 1 s poll
                deadline = time.monotonic() + 120
                while log.read_text().count("READY") <= restarts + 1 and time.monotonic() < deadline:
                    time.sleep(0.5)
                assert log.read_text().count("RESTARTING") == restarts + 1 and reason in log.read_text()
                for _ in range(60):  # the API's driver reconnects on its own
                    again = c.post("/cypher", json={"query": count})
                    if again.status_code == 200:
                        break
                    time.sleep(0.5)
                assert again.status_code == 200 and again.json()["rows"] == stored, again.text
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_range_bounds_are_read_from_the_query_not_from_its_strings_comments_or_quoted_names():
    """check_ranges (the part of the Cypher bound that runs before anything is sent) sees the code only."""
    from catalog.stores.base import CypherRefused
    from catalog.stores.neo4j_cypher import check_ranges

    check_ranges("RETURN 'range(1, 9999999999)', `a(b` /* range(1, 9999999999) */, range(0, size($x) - 1)\n"
                 "// range(1, 9999999999)", {"x": [1, 2]})
    check_ranges("RETURN [a IN range(1, 1000) | [b IN range(1, 1000) | a * b]]", {})  # 10^6: the bound itself
    check_ranges("RETURN range(size($x), 10), range(1, 10, size($x)), range(0, size($x) - 1)", {"x": [1, 2]})
    for query, params, says in [
            ("RETURN [a IN range(1, 1001) | [b IN range(1, 1000) | a * b]]", {}, "span 1,001,000 values"),
            ("RETURN `a)b`, range(1, $n)", {"n": 2_000_000}, "span 2,000,000 values"),
            ("RETURN range(1, $n)", {"n": "9"}, "bound '$n' is not allowed"),
            ("RETURN RANGE (1, 10 * 1000000000)", {}, "bound '10 * 1000000000' is not allowed"),
            # a size() bound is no way around the bound: as a start or step it counts as its least value
            ("RETURN range(size($x), 4000000000)", {"x": [1]}, "span 4,000,000,001 values"),
            ("RETURN range(0, 4000000000, size($x))", {"x": [1]}, "span 4,000,000,001 values"),
            ("RETURN range(0, size($x) + 4000000000)", {"x": [1]}, "bound 'size($x) + 4000000000' is not allowed")]:
        with pytest.raises(CypherRefused, match=re.escape(says)):
            check_ranges(query, params)


def test_the_supervisor_restarts_only_after_a_full_heap_or_a_runaway_and_not_forever(tmp_path):
    """Exit codes 3 (-XX:+ExitOnOutOfMemoryError) and 75 (the runaway watchdog) are restarted, at most 5 times
    a minute; any other exit ends the supervisor with that code at once."""
    import subprocess

    from cli.neo4j_server import MODULE, build

    build()
    classes = str(MODULE / "target" / "classes")
    for code, starts, last in [(3, 6, "GAVE UP the server exited with 3 again after 5 restarts within a minute"),
                               (75, 6, "GAVE UP the server exited with 75 again after 5 restarts within a minute"),
                               (1, 1, "started")]:
        done = subprocess.run(["java", "-cp", classes, "circuitcatalog.Supervisor", "--", "sh", "-c",
                               f"echo started; exit {code}"], capture_output=True, text=True, timeout=60)
        lines = done.stdout.strip().splitlines()
        assert done.returncode == code and lines.count("started") == starts and lines[-1] == last, done.stdout
