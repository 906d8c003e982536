"""Issue 13: the browser view, in a real headless Chromium (Debian's package, driven by Playwright)
against `circuit-catalog serve` on a free loopback port, over a catalog the toy model really made.

Every number a page shows is compared with the REST API's answer to the same question; every
request the browser makes is checked to stay on the loopback server (the pages work offline).
Screenshots of each page go to test-artifacts/screenshots/ (docs/api.md names it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import _free_port, loopback_page, wait_healthy
from typer.testing import CliRunner

SHOTS = Path(__file__).parent.parent / "test-artifacts" / "screenshots"


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """24 IOI prompts ingested with toy-ioi and its transcoders, and an SAE evaluation stored beside them (both
    through the commands a user runs)."""
    from cli import app

    url = f"sqlite:///{tmp_path_factory.mktemp('pages')}/catalog.db"
    runner = CliRunner()
    for args in (["ingest", "--model", "toy-ioi", "--saes", "toy-ioi", "--transcoders", "toy-ioi", "--corpus", "ioi:24:5",
                  "--store", url, "--run", "ioi", "--batch-size", "8", "--no-progress"],
                 ["eval-saes", "--model", "toy-ioi", "--saes", "toy-ioi", "--n", "16", "--store", url,
                  "--plot", str(tmp_path_factory.mktemp("plot") / "eval.png")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    return url


@pytest.fixture(scope="module")
def server(catalog):
    port = _free_port()
    cli = Path(sys.executable).parent / "circuit-catalog"
    proc = subprocess.Popen([str(cli), "serve", "--store", catalog, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base, proc)
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def page(browser, server):
    """A page that may only talk to the server: any other request is aborted and recorded."""
    with loopback_page(browser) as (pg, _):
        yield pg


def api(server, path, **params):
    r = httpx.get(f"{server}{path}", params=params, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def cells(page, selector: str, field: str) -> list[str]:
    return page.locator(f"{selector} td[data-field='{field}']").all_inner_texts()


def test_home_shows_the_overview_the_api_gives(page, server):
    overview = api(server, "/overview")
    page.goto(server + "/")
    for name, value in overview["counts"].items():
        assert page.locator(f"#counts td[data-field='{name}']").inner_text() == str(value)
    assert overview["counts"]["prompts"] == 24 and overview["counts"]["edges"] > 100
    run_row = page.locator("#runs tr[data-run='ioi']")
    assert "toy-ioi" in run_row.inner_text() and "ioi:24:5" in run_row.inner_text()
    assert run_row.locator("td[data-field='prompts']").inner_text() == "24"
    assert [b["layer"] for b in overview["strongest_attention"]] == [0, 1, 2]
    for block in overview["strongest_attention"]:
        table = f"table.strongest[data-layer='{block['layer']}']"
        assert page.locator(f"{table} a.node").all_inner_texts() == [f["id"] for f in block["features"]]
        assert cells(page, table, "total_abs") == [str(f["total_abs"]) for f in block["features"]]
        assert cells(page, table, "degree") == [str(f["degree"]) for f in block["features"]]
    shot(page, "home")


def _rows_match(page, table: str, items: list[dict]) -> None:
    assert page.locator(f"{table} tbody tr[data-id]").count() == len(items)
    assert [r.get_attribute("data-id") for r in page.locator(f"{table} tbody tr[data-id]").all()] == [i["id"] for i in items]
    for field in ("n_prompts", "n_obs", "sum", "mean", "std", "sign_share"):
        assert cells(page, table, field) == [str(i[field]) for i in items], field


def test_home_to_feature_to_edge_to_prompt(page, server):
    page.goto(server + "/")
    first = api(server, "/overview")["strongest_attention"][2]["features"][0]["id"]
    page.locator("table.strongest[data-layer='2'] a.node").first.click()
    page.wait_for_url(f"**/view/feature/{first}")

    # feature page: stats, the SAE sufficiency flag, upstream and downstream equal the API's
    feature = api(server, f"/features/{first}")
    assert page.locator("#feature-id").inner_text().startswith(first)
    assert page.locator("[data-field='n_prompts']").first.inner_text() == str(feature["activation"]["n_prompts"])
    assert page.locator("[data-field='max_activation']").inner_text() == str(feature["activation"]["max"])
    flags = feature["sae_flags"]
    assert flags is not None and str(flags["logit_diff_recovery"]) in page.locator("#sae-flag").inner_text()
    up = api(server, f"/features/{first}/upstream", limit=20)["items"]
    _rows_match(page, "#upstream", up)
    _rows_match(page, "#downstream", api(server, f"/features/{first}/downstream", limit=20)["items"])
    with_heads = next(i for i in up if i["heads"])
    bars = page.locator(f"#upstream tr[data-id='{with_heads['id']}'][data-edge-kind='{with_heads['edge_kind']}'] rect")
    assert {b.get_attribute("data-head"): float(b.get_attribute("data-value")) for b in bars.all()} == with_heads["heads"]
    shot(page, "feature")

    # the filter form reproduces the API's filters, and its URL reproduces the page
    page.select_option("#filters select[name='kind']", ["attn"])
    page.select_option("#filters select[name='order']", "count")
    page.locator("#filters input[name='limit']").fill("3")
    page.locator("#filters button[type='submit']").click()
    page.wait_for_url("**kind=attn**")
    filtered = api(server, f"/features/{first}/upstream", kind="attn", order="count", limit=3)
    _rows_match(page, "#upstream", filtered["items"])
    if filtered["next_cursor"]:
        page.locator("a.next-up").click()
        page.wait_for_url("**up_offset=3**")
        second = api(server, f"/features/{first}/upstream", kind="attn", order="count", limit=3,
                     cursor=filtered["next_cursor"])
        _rows_match(page, "#upstream", second["items"])
    deep_link = page.url
    page.goto(deep_link)
    assert page.locator("#filters select[name='order']").input_value() == "count"

    # edge page: statistics and evidence with the source and destination tokens highlighted
    page.goto(f"{server}/view/feature/{first}")
    source = next(i for i in up if i["edge_kind"] == "attn_in")["id"]
    page.locator(f"#upstream tr[data-id='{source}'][data-edge-kind='attn_in'] a.edge-link").click()
    page.wait_for_url(f"**/view/edge/{source}/{first}")
    edge = api(server, f"/edges/{source}/{first}", evidence=20)
    for kind in edge["kinds"]:
        section = f"section[data-edge-kind='{kind['edge_kind']}']"
        for field in ("n_prompts", "n_obs", "sum", "mean", "std", "min", "max", "sign_share"):
            assert page.locator(f"{section} table.stats td[data-field='{field}']").inner_text() == str(kind[field])
        rows = page.locator(f"{section} table.evidence tbody tr[data-prompt]").all()
        assert len(rows) == len(kind["evidence"]) > 0
        for row, ev in zip(rows, kind["evidence"]):
            assert row.get_attribute("data-prompt") == ev["prompt"]
            assert row.locator("td[data-field='value']").inner_text() == str(ev["value"])
            assert row.locator("td[data-field='head']").inner_text() == str(ev["head"])
            assert row.locator(".tok.src").get_attribute("data-pos") == str(ev["src_pos"])
            assert row.locator(".tok.dst").get_attribute("data-pos") == str(ev["dst_pos"])
            assert row.locator(".tok.src").inner_text() == ev["src_token"]
            assert row.locator(".tok.dst").inner_text() == ev["dst_token"]
    shot(page, "edge")

    # prompt page: the stored graph around the evidence's target, drawn by Cytoscape
    ev = edge["kinds"][0]["evidence"][0]
    page.locator("table.evidence a.prompt-link").first.click()
    page.wait_for_url("**/view/prompt/**around=**")
    graph = api(server, f"/prompts/{ev['prompt']}/graph", around=f"{first}@{ev['dst_pos']}", limit=200)
    page.wait_for_function("window.cy && window.cy.nodes().length > 0")
    ends = {e[side] for e in graph["edges"] for side in ("source", "target")}
    assert page.evaluate("window.cy.nodes('[kind != \"token\"]').map(n => n.id()).sort()") == sorted(ends)
    tokens = api(server, f"/prompts/{ev['prompt']}")["tokens"]
    heads = page.evaluate("window.cy.nodes('[kind = \"token\"]').map(n => n.data('label'))")
    assert heads == [f"{p} {tokens[p]}" for p in sorted({int(n.rpartition('@')[2]) for n in ends})]
    assert page.evaluate("window.cy.edges().length") == len({(e["source"], e["target"]) for e in graph["edges"]})
    assert cells(page, "#prompt-edges", "value") == [str(e["value"]) for e in graph["edges"]]
    # layers run top to bottom, positions left to right
    y = page.evaluate("Object.fromEntries(window.cy.nodes().map(n => [n.id(), n.position('y')]))")
    x = page.evaluate("Object.fromEntries(window.cy.nodes().map(n => [n.id(), n.position('x')]))")
    for e in graph["edges"]:
        assert y[e["source"]] < y[e["target"]], e  # every edge points down the page
    by_pos: dict[int, list[float]] = {}
    for n in ends:
        by_pos.setdefault(int(n.rpartition("@")[2]), []).append(x[n])
    columns = [by_pos[p] for p in sorted(by_pos)]
    assert all(max(a) < min(b) for a, b in zip(columns, columns[1:]))  # positions left to right
    target = f"{first}@{ev['dst_pos']}"
    shot(page, "prompt")
    page.evaluate(f"window.cy.getElementById('{target}').emit('tap')")
    page.wait_for_url(f"**/view/feature/{first}")


def test_feature_page_shows_what_it_fires_on_and_the_home_page_searches_by_token(page, server):
    """Issue 36 §2: a feature page's top-activating contexts and histogram equal the API's; each context's
    highlighted token is the prompt's token at that position (from GET /prompts) and its marked token is where
    the strongest incoming edge reads from; the home page's token search lists what GET /features?token= does."""
    first = api(server, "/overview")["strongest_attention"][2]["features"][0]["id"]
    feature = api(server, f"/features/{first}")
    contexts = feature["contexts"]
    assert len(contexts) == 10 and sum(b["n"] for b in feature["histogram"]) == feature["activation"]["n_positions"]
    page.goto(f"{server}/view/feature/{first}")
    rows = page.locator("#contexts tbody tr").all()
    assert [(r.get_attribute("data-prompt"), int(r.get_attribute("data-pos"))) for r in rows] == \
        [(c["prompt"], c["pos"]) for c in contexts]
    marked = 0
    for row, c in zip(rows, contexts, strict=True):
        tokens = api(server, f"/prompts/{c['prompt']}")["tokens"]
        hot = row.locator(".tok.dst")
        assert hot.count() == 1 and int(hot.get_attribute("data-pos")) == c["pos"]
        assert hot.inner_text() == tokens[c["pos"]].strip() and c["token"] == tokens[c["pos"]]
        assert row.locator("td[data-field='activation']").inner_text() == f"{c['activation']:.4g}"
        src = row.locator(".tok.src")
        if c["source"] and c["start"] <= c["source"]["pos"]:
            marked += 1
            assert src.count() == 1 and int(src.get_attribute("data-pos")) == c["source"]["pos"]
            assert src.inner_text() == tokens[c["source"]["pos"]].strip()
            assert c["source"]["id"] in row.inner_text()
    assert marked > 0
    bars = page.locator("#histogram rect").all()
    assert [int(b.get_attribute("data-n")) for b in bars] == [b["n"] for b in feature["histogram"]]
    shot(page, "feature-contexts")

    token = contexts[0]["token"]
    page.goto(server + "/")
    page.locator("#token-search input[name='token']").fill(f'"{token}"')
    page.locator("#token-search button").click()
    page.wait_for_url("**/view/features?token=**")
    found = api(server, "/features", token=f'"{token}"', limit=50)
    assert found["token"] == token and found["features"]
    assert page.locator("#searched-token").inner_text() == token.strip()
    assert [r.get_attribute("data-id") for r in page.locator("#token-features tbody tr[data-id]").all()] == \
        [f["id"] for f in found["features"]]
    assert cells(page, "#token-features", "share") == [f"{f['share']:.3f}" for f in found["features"]]
    assert all(f["n_on_token"] >= 1 for f in found["features"])
    assert first in [f["id"] for f in api(server, "/features", token=f'"{token}"', limit=500)["features"]]
    shot(page, "token-search")
    for bad in ({"token": ""}, {"token": "x" * 101}):
        assert httpx.get(f"{server}/features", params=bad, timeout=30).status_code == 422
    assert httpx.get(f"{server}/features/{first}", params={"contexts": 21}, timeout=30).status_code == 422


def test_a_transcoder_feature_page_shows_where_its_inputs_come_from(page, server):
    """A transcoder feature that feeds the strongest layer-2 attention feature: its page, its mlp_in inputs and the
    shares of its incoming |attribution| from features, errors and the rest equal the API's."""
    first = api(server, "/overview")["strongest_attention"][2]["features"][0]["id"]
    source = api(server, f"/features/{first}/upstream", kind="transcoder", limit=1)["items"][0]["id"]
    assert source.startswith("T")
    feature = api(server, f"/features/{source}")
    inputs = feature["inputs"]
    assert inputs["complete"] and abs(inputs["features"] + inputs["errors"] + inputs["other"] - 1) < 1e-5
    page.goto(f"{server}/view/feature/{source}")
    assert page.locator("#feature-id").inner_text().startswith(source) and "transcoder" in page.locator("h1").inner_text()
    for name in ("features", "errors", "other"):
        assert page.locator(f"#input-shares [data-field='{name}_share']").inner_text() == f"{100 * inputs[name]:.0f}%"
    up = api(server, f"/features/{source}/upstream", limit=20)["items"]
    assert up and {r["edge_kind"] for r in up} == {"mlp_in"}
    _rows_match(page, "#upstream", up)
    shot(page, "feature-transcoder")


def test_patterns_page_equals_the_mining_endpoint(page, server):
    mined = api(server, "/patterns/composition", top=10, min_prompts=2)
    page.goto(f"{server}/view/patterns?top=10&min_prompts=2")
    rows = page.locator("#pairs tbody tr[data-path]").all()
    assert len(rows) == len(mined["pairs"]) > 0
    for row, pair in zip(rows, mined["pairs"]):
        assert (row.get_attribute("data-source"), row.get_attribute("data-target"), row.get_attribute("data-path")) == \
            (pair["source"], pair["target"], pair["path"])
        assert row.locator("td[data-field='n_prompts']").inner_text() == str(pair["n_prompts"])
        assert row.locator("td[data-field='total']").inner_text() == str(pair["total"])
        pos = pair["position"]
        reads = ", ".join(f"{x['role']} {round(x['share'] * 100)}% ({round(x['base'] * 100)}%)"
                          for x in (pos["relation"], pos["pair"], pos["offset"]) if x) if pos else ""
        assert row.locator("td[data-field='position']").inner_text() == reads
        assert [a.get_attribute("href").split("?")[0].removeprefix("/view/prompt/")
                for a in row.locator("a.exemplar").all()] == [x["prompt"] for x in pair["exemplars"]]
    qk_rows = page.locator("#qk-pairs tbody tr[data-path]").all()
    assert [(r.get_attribute("data-source"), r.get_attribute("data-target"), r.get_attribute("data-path"),
             r.locator("td[data-field='total']").inner_text()) for r in qk_rows] == \
        [(p["source"], p["target"], p["path"], str(p["total"])) for p in mined["qk_pairs"]]
    shot(page, "patterns")
    page.locator("#pairs a.edge-link").first.click()
    page.wait_for_url("**/view/edge/**")
    assert page.locator("section.edge-kind").count() >= 1


def test_bad_ids_and_search(page, server):
    response = page.goto(f"{server}/view/feature/A1.x")
    assert response.status == 422
    text = page.locator("#error").inner_text()
    assert "cannot parse node reference 'A1.x'" in text and "Traceback" not in page.content()
    shot(page, "error")
    assert page.goto(f"{server}/view/feature/A2.99999").status == 404
    assert "no node A2.99999" in page.locator("#error").inner_text()
    assert page.goto(f"{server}/view/feature/A2.1?limit=nope").status == 422
    assert "limit" in page.locator("#error").inner_text()
    assert page.goto(f"{server}/view/prompt/ioi/nope").status == 404

    some = api(server, "/overview")["strongest_attention"][1]["features"][0]["id"]
    page.goto(server + "/")
    page.locator("#search").fill(f"L1.F{some.split('.')[1]}")  # the seed's alias form
    page.locator("header form button").click()
    page.wait_for_url(f"**/view/feature/{some}")
    page.locator("#search").fill("not an id")
    page.locator("header form button").click()
    page.wait_for_load_state()
    assert "cannot parse node reference 'not an id'" in page.locator("#error").inner_text()


def test_docs_and_redoc_render_offline(page, server):
    spec = api(server, "/openapi.json")
    operations = sum(len(methods) for methods in spec["paths"].values())
    page.goto(f"{server}/docs")
    page.wait_for_selector(".opblock")
    assert page.locator(".opblock").count() == operations
    assert page.locator(".opblock-summary-path", has_text="/features/{ref}/upstream").count() == 1
    shot(page, "docs")
    page.goto(f"{server}/redoc")
    page.wait_for_selector("[data-section-id^='operation/']")
    assert page.locator("[data-section-id^='operation/']").count() == operations


def test_the_export_link_serves_neuronpedia_json(page, server):
    uid = _a_prompt(server)
    page.goto(f"{server}/view/prompt/{uid}")
    href = page.locator("#neuronpedia-export").get_attribute("href")
    body = json.loads(httpx.get(server + href, timeout=30).text)
    assert set(body) - {"qk_only_nodes"} == {"metadata", "qParams", "nodes", "links"}
    assert body["metadata"]["scan"] == "toy-ioi"


def _a_prompt(server) -> str:
    mined = api(server, "/patterns/composition", top=1, min_prompts=1)
    return mined["pairs"][0]["exemplars"][0]["prompt"]



def test_the_demo_ends_by_pointing_at_a_page_that_exists(tmp_path):
    """`make demo`'s last line names a feature page of the catalog it just made (a small corpus here)."""
    import re

    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import Settings
    from cli import app

    url = f"sqlite:///{tmp_path}/demo.db"
    result = CliRunner().invoke(app, ["demo", "--store", url, "--prompts", "16", "--threads", "1"])
    assert result.exit_code == 0, result.output
    tail = result.stdout.strip().splitlines()[-1]
    link = re.search(r"http://127\.0\.0\.1:8000(/view/feature/A\d+\.\d+)", tail)
    assert link and f"serve --store {url}" in tail, tail
    with TestClient(create_app(Settings(store=url, warm_patterns=False))) as client:
        page = client.get(link.group(1))
        assert page.status_code == 200 and "Upstream: what feeds" in page.text
