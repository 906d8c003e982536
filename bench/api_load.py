"""API benchmark: requests/s and p50/p99 latency of GET /features/{ref}/upstream with 8 concurrent
clients, against the API served by uvicorn (a separate process) over a 1M-observation catalog
(bench/store.py's synthetic data) in SQLite and in Neo4j. Target: p99 <= 50 ms.
Usage: python bench/api_load.py [--obs 1000000] [--requests 400]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from catalog.stores import open_store  # noqa: E402
from cli.neo4j_server import running_on_free_port  # noqa: E402

CLIENTS = 8
# Server processes: one Python process is held to one core by the GIL; this VM has two, shared with
# the load generator (and with Neo4j's JVM). `--workers 1` measures a single process. Served with
# --no-access-log (a log line a request costs ~5-10% of throughput here).
WORKERS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill(url: str, n_obs: int, n_runs: int) -> list[str]:
    from store import fill_runs

    store = open_store(url)
    for batch in fill_runs(store, n_obs, n_runs):
        store.write_window(batch)
    return sorted({e.dst.split("|")[2] for e in store.all_edges()})


def load(port: int, refs: list[str], per_client: int) -> tuple[float, list[float]]:
    lat: list[float] = []
    lock = threading.Lock()
    rng = np.random.default_rng(0)
    picks = [refs[i] for i in rng.integers(len(refs), size=CLIENTS * per_client)]

    def client(k: int) -> None:
        mine = []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            for ref in picks[k::CLIENTS]:
                t = time.perf_counter()
                r = c.get(f"/features/{ref}/upstream", params={"limit": 20})
                mine.append(time.perf_counter() - t)
                assert r.status_code == 200, r.text
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(lat) / (time.perf_counter() - t0), lat


def serve_and_measure(url: str, refs: list[str], per_client: int, workers: int = WORKERS) -> float:
    """Serve ``url`` with `circuit-catalog serve --workers N` and load it; prints and returns p99 in ms."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--store", url, "--port", str(port),
                               "--workers", str(workers), "--no-access-log"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        load(port, refs, 5)  # warm-up
        rps, lat = load(port, refs, per_client)
        ms = np.array(lat) * 1000
        print(f"  {url.split(':')[0]:<7} {rps:7.0f} requests/s   p50 {np.percentile(ms, 50):6.1f} ms   "
              f"p99 {np.percentile(ms, 99):6.1f} ms   ({len(lat)} requests, {CLIENTS} clients, {workers} server "
              f"process{'es' if workers > 1 else ''})")
        return float(np.percentile(ms, 99))
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--obs", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=5, help="runs the observations are spread over")
    ap.add_argument("--requests", type=int, default=400, help="per client")
    ap.add_argument("--workers", type=int, default=WORKERS, help="server processes")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        print(f"catalog: {args.obs:,} synthetic observations in {args.runs} runs (bench/store.py); "
              "GET /features/{ref}/upstream?limit=20")
        sqlite = f"sqlite:///{tmp}/api.db"
        refs = fill(sqlite, args.obs, args.runs)
        serve_and_measure(sqlite, refs, args.requests, args.workers)
        with running_on_free_port(f"{tmp}/neo4j", page_cache="1g", heap="3g") as neo:
            fill(neo, args.obs, args.runs)
            serve_and_measure(neo, refs, args.requests, args.workers)

if __name__ == "__main__":
    main()
