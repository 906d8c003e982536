"""Issue 36 §1: exported graphs drawn by circuit-tracer 0.5.0's own viewer (its frontend/assets, served
from a folder laid out as its local server lays it out; tests/ct_viewer.py) in headless Chromium.

At first load, with no click: no script error, every prompt token labelled on the token axis, the
start node clicked (its header names its layer and index as the catalog does) and pinned, and the
input list of the clicked node is exactly the export's links into it. Screenshots go to
test-artifacts/screenshots/ (viewer-*.png)."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from collections import defaultdict
from pathlib import Path

import ct_viewer
import pytest
from conftest import loopback_page
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from typer.testing import CliRunner

from catalog.ids import parse_ref
from catalog.neuronpedia import cantor

SHOTS = Path(__file__).parent.parent / "test-artifacts" / "screenshots"
PROMPT = "When Mary and John went to the store, John gave a drink to"


def _exports(tmp: Path) -> list[dict]:
    """A trace (with QK) and a stored prompt graph of a toy ingest, as a user exports them."""
    from cli import app

    runner = CliRunner()
    traced = runner.invoke(app, ["trace", "--model", "toy-ioi", "--saes", "toy-ioi", "--prompt", PROMPT, "--depth",
                                 "2", "--top", "3", "--qk", "--format", "neuronpedia"])
    assert traced.exit_code == 0, traced.output
    url = f"sqlite:///{tmp}/c.db"
    ingested = runner.invoke(app, ["ingest", "--model", "toy-ioi", "--saes", "toy-ioi", "--corpus", "ioi:4:5",
                                   "--store", url, "--run", "v", "--no-progress", "--no-mine"])
    assert ingested.exit_code == 0, ingested.output
    from catalog import queries
    from catalog.stores import open_store

    stored = queries.prompt_graph_neuronpedia(open_store(url), "v/ioi-5-000002", limit=150)
    return [json.loads(traced.stdout), stored]


@pytest.fixture(scope="module")
def viewer(tmp_path_factory):
    graphs = _exports(tmp_path_factory.mktemp("exports"))
    root = ct_viewer.site(tmp_path_factory.mktemp("viewer"), graphs)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", graphs
    server.shutdown()


def _d3_signed(x: float) -> str:
    """d3.format('+.3f'), which writes a minus sign (U+2212), not a hyphen."""
    return f"{x:+.3f}".replace("-", "\u2212")


@pytest.mark.parametrize("which", [0, 1], ids=["trace", "stored"])
def test_the_viewer_draws_the_export_at_first_load(browser, viewer, which):
    base, graphs = viewer
    with loopback_page(browser, {"width": 1400, "height": 1000}) as (page, errors):
        _check_first_drawing(page, errors, base, graphs[which], which)


def _check_first_drawing(page, errors: list[str], base: str, graph: dict, which: int) -> None:
    slug, tokens = graph["metadata"]["slug"], graph["metadata"]["prompt_tokens"]
    page.goto(f"{base}/index.html?slug={slug}")
    try:
        page.wait_for_function(f"document.querySelectorAll('g.prompt-token text').length == {len(tokens)}",
                               timeout=30_000)
        page.wait_for_selector(".node-connections .features.input .feature-row", timeout=10_000)
    except PlaywrightTimeout:
        pytest.fail(f"the viewer did not finish its first drawing; script errors: {errors}")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"viewer-{['trace', 'stored'][which]}.png"))
    assert page.locator("g.prompt-token text").all_text_contents() == tokens  # every position labelled
    nodes = {n["node_id"]: n for n in graph["nodes"]}
    start = nodes[graph["qParams"]["clickedId"]]
    ref = parse_ref(start["clerp"].split(" (")[0])
    assert start["feature"] == cantor(3 * ref.layer + (ref.kind.value == "attn"), ref.index)
    # the header of the clicked node: the viewer decodes the Cantor pair into layer / index
    assert page.locator(".feature-detail .header-top-row, .feature-detail b").first.text_content() == \
        f"L{ref.layer}/{ref.index}"
    assert page.locator(".subgraph").get_by_text(start["clerp"]).count() >= 1  # pinned
    want: dict[tuple[str, str], int] = defaultdict(int)
    for link in graph["links"]:
        if link["target"] == start["node_id"]:
            source = nodes[link["source"]]
            label = (f"Emb: \u201c{tokens[source['ctx_idx']]}\"" if source["feature_type"] == "embedding"
                     else source["clerp"])
            want[(label, _d3_signed(link["weight"]))] += 1
    rows = page.locator(".node-connections .features.input .feature-row")
    got: dict[tuple[str, str], int] = defaultdict(int)
    for i in range(rows.count()):
        got[(rows.nth(i).locator(".label").text_content(), rows.nth(i).locator(".weight").text_content())] += 1
    assert got == want
