"""Page benchmark: how long each browser page takes on a real catalog (the demo's by default), served by
`circuit-catalog serve` in its own process and loaded in headless Chromium (Debian's, as the tests).

For each page: the server's time to answer (median of --repeat HTTP GETs) and the browser's time from
navigation to the `load` event, plus drawing for the prompt graph (median of --repeat loads).
`--screenshots DIR` also saves the feature page and the prompt graph (the pictures of the README and docs/api.md).
Usage: python bench/pages.py [--store sqlite:///demo-catalog.db] [--repeat 5] [--screenshots docs/img]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from conftest import _free_port as free_port  # noqa: E402
from test_pages import CHROMIUM, CHROMIUM_ARGS  # noqa: E402


def serve(store: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "circuit-catalog"), "serve", "--store", store,
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start")


def pages_of(base: str) -> dict[str, str]:
    """One URL of each page kind, chosen from the catalog's own answers."""
    overview = httpx.get(f"{base}/overview", timeout=60).json()
    # a top-layer feature read at a late position (the answer is read at the last one), by way of an attn_in edge
    best = None
    for feature in overview["strongest_attention"][-1]["features"]:
        top = feature["id"]
        up = httpx.get(f"{base}/features/{top}/upstream", params={"limit": 20, "edge_kind": "attn_in"},
                       timeout=60).json()["items"]
        for source in [i["id"] for i in up][:5]:
            edge = httpx.get(f"{base}/edges/{source}/{top}", timeout=60).json()
            ev = max((v for k in edge["kinds"] for v in k["evidence"]), key=lambda v: (v["dst_pos"], abs(v["value"])))
            if best is None or ev["dst_pos"] > best[2]["dst_pos"]:
                best = (top, source, ev)
    top, source, ev = best
    return {"home": "/", "feature": f"/view/feature/{top}", "edge": f"/view/edge/{source}/{top}",
            "prompt graph": f"/view/prompt/{quote(ev['prompt'])}?around={quote(top + '@' + str(ev['dst_pos']))}",
            "patterns": "/view/patterns", "docs": "/docs"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default="sqlite:///demo-catalog.db")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--screenshots", default=None)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    proc, base = serve(args.store)
    try:
        time.sleep(1.0)
        urls = pages_of(base)
        httpx.get(base + urls["patterns"], timeout=120)  # the warm-up the server starts anyway
        rows = []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            for name, path in urls.items():
                server = []
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    assert httpx.get(base + path, timeout=60).status_code == 200
                    server.append(time.perf_counter() - t)
                loaded = []
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    page.goto(base + path, wait_until="load")
                    if name == "prompt graph":
                        page.wait_for_function("window.cy && window.cy.nodes().length > 0")
                    elif name == "docs":
                        page.wait_for_selector(".opblock")
                    loaded.append(time.perf_counter() - t)
                rows.append((name, statistics.median(server) * 1e3, statistics.median(loaded) * 1e3))
                if args.screenshots and name in ("feature", "prompt graph"):
                    Path(args.screenshots).mkdir(parents=True, exist_ok=True)
                    out = Path(args.screenshots) / ("feature.png" if name == "feature" else "prompt-graph.png")
                    page.screenshot(path=str(out), full_page=name != "feature")
            browser.close()
    finally:
        proc.terminate()
    print(f"pages over {args.store} (median of {args.repeat}):")
    print(f"{'page':<14} {'server ms':>10} {'browser load ms':>16}")
    for name, s, b in rows:
        print(f"{name:<14} {s:>10.1f} {b:>16.1f}")


if __name__ == "__main__":
    main()
