"""API benchmark: requests/s and p50/p99 latency with 8 concurrent clients, against the API served by
uvicorn (separate processes):
* GET /features/{ref}/upstream over a 1M-observation catalog (bench/store.py's synthetic data) in
  SQLite and in Neo4j (issue 12). Target: p99 <= 50 ms.
* GET /patterns/composition on the demo's catalog (toy-ioi, 500 IOI prompts, ingested by this script
  as `make demo` does, patterns stored at the end of the run) in SQLite and, exported, in Neo4j
  (issue 15). Target: p99 <= 50 ms.
Load generator: wrk (Debian's package; `make bench` installs it), 8 connections over 2 threads, closed loop
like the Python clients it replaced as the default: those 8 Python processes spent as much CPU making
requests as the server spent answering them, on the 2 cores the server has (`--client python` keeps them).
Usage: python bench/api_load.py [--obs 1000000] [--seconds 12] [--demo-prompts 500] [--skip-upstream]
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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
    from synthetic_catalog import fill_runs

    store = open_store(url)
    for batch in fill_runs(store, n_obs, n_runs):
        store.write_window(batch)
    return sorted({e.dst.split("|")[2] for e in store.all_edges()})


def _client(port: int, paths: list[str], start: Any, out: Any) -> None:
    """One client: requests one after another, each timed; started with the others at ``start``."""
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            c.get("/healthz")  # connect before the clock starts
            start.wait()
            mine = []
            for path in paths:
                t = time.perf_counter()
                r = c.get(path)
                mine.append(time.perf_counter() - t)
                if r.status_code != 200:
                    raise RuntimeError(f"{r.status_code}: {r.text[:200]}")
        out.put(mine)
    except Exception as exc:  # noqa: BLE001 - reported by the parent, which waits for every client
        out.put(f"client failed: {exc!r}")


def load(port: int, paths: list[str], per_client: int) -> tuple[float, list[float]]:
    """CLIENTS concurrent clients, each its own process: threads of one Python process queue for its GIL
    and add that wait to the latencies they measure (side by side on this VM: p99 37.5 -> 30.8 ms and
    44.2 -> 40.4 ms for threads -> processes against the same server)."""
    rng = np.random.default_rng(0)
    picks = [paths[i] for i in rng.integers(len(paths), size=CLIENTS * per_client)]
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Barrier(CLIENTS + 1), ctx.Queue()
    procs = [ctx.Process(target=_client, args=(port, picks[k::CLIENTS], start, out)) for k in range(CLIENTS)]
    for p in procs:
        p.start()
    start.wait()
    t0 = time.perf_counter()
    answers = [out.get() for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    failed = [a for a in answers if isinstance(a, str)]
    if failed:
        raise RuntimeError(failed[0])
    lat: list[float] = [x for a in answers for x in a]
    return len(lat) / wall, lat


WRK_SCRIPT = Path(__file__).resolve().parent / "wrk_paths.lua"


def wrk_load(port: int, paths: list[str], seconds: float) -> tuple[float, float, float, int]:
    """CLIENTS connections over 2 wrk threads for ``seconds``; (requests/s, p50 ms, p99 ms, requests)."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk, or `make bench`); or use --client python")
    rng = np.random.default_rng(0)
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as listing:
        listing.write("\n".join(paths[i] for i in rng.integers(len(paths), size=20_000)) + "\n")
        listing.flush()
        done = subprocess.run([wrk, "-t2", f"-c{CLIENTS}", f"-d{seconds:g}s", "--timeout", "30s", "-s", str(WRK_SCRIPT),
                               f"http://127.0.0.1:{port}", "--", listing.name], capture_output=True, text=True,
                              check=True)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    if figures["non_2xx"] or figures["socket_errors"]:
        raise RuntimeError(f"wrk saw {figures['non_2xx']} non-2xx answers and {figures['socket_errors']} socket "
                           f"errors:\n{done.stdout}")
    return (figures["requests"] / (figures["duration_us"] / 1e6), figures["p50_us"] / 1000,
            figures["p99_us"] / 1000, figures["requests"])


def serve_and_measure(url: str, paths: list[str], per_client: int, workers: int = WORKERS,
                      stored_patterns: bool = False, warmup: int = 100, client: str = "wrk",
                      seconds: float = 12.0, warmup_seconds: float = 45.0) -> float:
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
        if stored_patterns and httpx.get(f"http://127.0.0.1:{port}{paths[0]}", timeout=60).json()["mined"] is None:
            raise RuntimeError(f"{url}: the patterns are not stored (this would measure live mining)")
        # steady state: a served API is warm. The JVM compiles Neo4j's query paths only after thousands of
        # calls (measured, 12-s windows under load from a fresh server: Neo4j's CPU a request fell from 6.9 to
        # 0.6 ms over the first ~60 s), and each server process's first requests pay imports and set-up
        p99 = 0.0
        for each in (["wrk", "python"] if client == "both" else [client]):
            if each == "wrk":
                wrk_load(port, paths, warmup_seconds)
                rps, p50, p99, n = wrk_load(port, paths, seconds)
            else:
                load(port, paths, warmup)
                rps, lat = load(port, paths, per_client)
                ms = np.array(lat) * 1000
                p50, p99, n = float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), len(lat)
            store = "sqlite" if url.startswith("sqlite") else "neo4j"
            print(f"  {store:<7} {rps:7.0f} requests/s   p50 {p50:6.1f} ms   p99 {p99:6.1f} ms   "
                  f"({n} requests, {CLIENTS} {'wrk connections' if each == 'wrk' else 'client processes'}, "
                  f"{workers} server process{'es' if workers > 1 else ''})", flush=True)
        return p99
    finally:
        server.terminate()
        try:  # shutdown waits for a patterns warm-up still mining (small catalogs), up to a minute
            server.wait(timeout=90)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def upstream_paths(refs: list[str]) -> list[str]:
    return [f"/features/{ref}/upstream?limit=20" for ref in refs]


def demo_catalog(url: str, prompts: int) -> None:
    """The demo's ingest (toy-ioi, IOI prompts, run "demo"), which stores its mined patterns at the end."""
    subprocess.run([sys.executable, "-m", "cli", "ingest", "--model", "toy-ioi", "--saes", "toy-ioi", "--corpus",
                    f"ioi:{prompts}", "--run", "demo", "--store", url, "--threads", "2", "--no-progress"],
                   check=True, stdout=subprocess.DEVNULL)


PATTERN_PATHS = [f"/patterns/composition?top={top}" for top in (10, 20, 50)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--obs", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=5, help="runs the observations are spread over")
    ap.add_argument("--client", choices=["wrk", "python", "both"], default="wrk",
                    help="load generator (both: one after the other against the same server)")
    ap.add_argument("--seconds", type=float, default=12.0, help="measured seconds (wrk)")
    ap.add_argument("--requests", type=int, default=400, help="per client (--client python)")
    ap.add_argument("--workers", type=int, default=WORKERS, help="server processes")
    ap.add_argument("--demo-prompts", type=int, default=500, help="prompts of the demo catalog (patterns)")
    ap.add_argument("--skip-upstream", action="store_true", help="only the patterns endpoint")
    ap.add_argument("--skip-patterns", action="store_true", help="only the upstream endpoint")
    ap.add_argument("--demo-catalog", help="a demo catalog already ingested (its patterns stored), instead of "
                                           "ingesting one")
    ap.add_argument("--warmup", type=int, default=100, help="warm-up requests per client (--client python)")
    ap.add_argument("--warmup-seconds", type=float, default=45.0, help="warm-up load before measuring (wrk)")
    args = ap.parse_args()
    measure = functools.partial(serve_and_measure, per_client=args.requests, workers=args.workers,
                                warmup=args.warmup, client=args.client, seconds=args.seconds,
                                warmup_seconds=args.warmup_seconds)
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        if not args.skip_upstream:
            print(f"catalog: {args.obs:,} synthetic observations in {args.runs} runs (bench/store.py); "
                  "GET /features/{ref}/upstream?limit=20")
            sqlite = f"sqlite:///{tmp}/api.db"
            refs = fill(sqlite, args.obs, args.runs)
            measure(sqlite, upstream_paths(refs))
            with running_on_free_port(f"{tmp}/neo4j", page_cache="1g", heap="3g") as neo:
                fill(neo, args.obs, args.runs)
                measure(neo, upstream_paths(refs))
        if not args.skip_patterns:
            print(f"catalog: the demo's (toy-ioi, {args.demo_prompts} IOI prompts); "
                  "GET /patterns/composition?top=10|20|50 (stored at the end of the ingest)")
            demo = args.demo_catalog or f"sqlite:///{tmp}/demo.db"
            if not args.demo_catalog:
                demo_catalog(demo, args.demo_prompts)
            measure(demo, PATTERN_PATHS, stored_patterns=True)
            with running_on_free_port(f"{tmp}/neo4j-demo", page_cache="512m", heap="2g") as neo:
                # export copies the stored patterns with the rest
                subprocess.run([sys.executable, "-m", "cli", "export", "--from", demo, "--to", neo],
                               check=True, stdout=subprocess.DEVNULL)
                measure(neo, PATTERN_PATHS, stored_patterns=True)


if __name__ == "__main__":
    main()
