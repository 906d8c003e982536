import contextlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# every answer of the API (also of servers the tests start as subprocesses) is validated against its
# response model: a field the model lacks fails the test (production skips it: api.settings)
os.environ.setdefault("CIRCUIT_CATALOG_CHECK_RESPONSES", "1")
# jobs that write to Neo4j spool under this folder (catalog.spool.default_spool), not the user's cache;
# removed when the session ends (each session left up to 76 MB behind)
os.environ["CIRCUIT_CATALOG_SPOOL"] = __import__("tempfile").mkdtemp(prefix="circuit-catalog-test-spool-")
__import__("atexit").register(__import__("shutil").rmtree, os.environ["CIRCUIT_CATALOG_SPOOL"], True)

import torch  # noqa: E402

# One intra-op thread: on 2 cores a second busy process (the Neo4j JVM, a writer thread) makes
# torch's default pool thrash (measured: 19 us -> 2.8 ms for one elementwise op).
torch.set_num_threads(1)

import shutil  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc, seconds: float = 60) -> None:
    """Wait until the API server ``proc`` answers ``base``/healthz; fail with its output if it exits or
    does not answer within ``seconds``."""
    import httpx

    deadline = time.time() + seconds
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            out = proc.stdout.read() if proc.stdout else proc.stderr.read() if proc.stderr else ""
            pytest.fail(f"server did not start:\n{out}", pytrace=False)
        time.sleep(0.2)


@pytest.fixture(scope="session")
def neo4j_url():
    """A real Neo4j Community server (tools/neo4j-server, built from Maven Central) on 127.0.0.1.

    If it cannot start, every test that needs it fails loudly: it is never skipped.
    """
    from cli.neo4j_server import start

    home = tempfile.mkdtemp(prefix="neo4j-test-")
    port = _free_port()
    try:
        proc = start(home, port, page_cache="128m")
    except Exception as exc:  # noqa: BLE001 - reported as a failure, not a skip
        pytest.fail(f"Neo4j test server could not start: {exc}", pytrace=False)
    yield f"neo4j://127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except Exception:  # noqa: BLE001
        proc.kill()
        proc.wait(timeout=60)
    # its store and transaction logs are GBs after the suite: left behind, a few runs fill a disk
    shutil.rmtree(home, ignore_errors=True)


def wipe_neo4j(url: str) -> None:
    import neo4j

    with neo4j.GraphDatabase.driver(url.replace("neo4j://", "bolt://"), auth=None) as d, d.session() as s:
        # CALL {...} IN TRANSACTIONS needs an auto-commit transaction: session.run, not execute_query.
        # Relationships first, in bounded batches: DETACH DELETE of 10,000 nodes at once takes every edge of
        # a GPT-2 catalog's error nodes into one transaction (a 1 GB test heap ran out)
        s.run("MATCH ()-[r]->() CALL (r) { DELETE r } IN TRANSACTIONS OF 10000 ROWS").consume()
        s.run("MATCH (n) CALL (n) { DETACH DELETE n } IN TRANSACTIONS OF 10000 ROWS").consume()
    from catalog.spool import default_spool

    shutil.rmtree(default_spool(url), ignore_errors=True)  # what jobs spooled for the catalog wiped


@pytest.fixture(params=["sqlite", "neo4j"])
def store_url(request, tmp_path):
    """A fresh, empty store URL of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/catalog.db"
    url = request.getfixturevalue("neo4j_url")
    wipe_neo4j(url)
    return url


CHROMIUM = os.environ.get("CIRCUIT_CATALOG_CHROMIUM", "/usr/bin/chromium")
# The flags this machine needs: root needs --no-sandbox; without the background-networking flags
# Chromium keeps calling Google's hosts, which a closed network refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium, driven by Playwright (a browser download does not work here)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium)",
                    pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@contextlib.contextmanager
def loopback_page(browser, viewport: dict | None = None):
    """A page that may only talk to 127.0.0.1 (the pages and viewers work offline): yields (page,
    errors); any other request is aborted, and on leaving, script errors or outside requests fail."""
    from urllib.parse import urlparse

    context = browser.new_context(viewport=viewport or {"width": 1400, "height": 900})
    outside: list[str] = []

    def only_loopback(route):
        if urlparse(route.request.url).hostname == "127.0.0.1" or route.request.url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", only_loopback)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page, errors
    finally:
        context.close()
    assert not outside, f"the page asked the internet for {outside}"
    assert not errors, f"script errors on the page: {errors}"
