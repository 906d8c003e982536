"""The write path, spool -> compact -> publish, side by side with the per-window path it replaced (issue 35).

  replay  RDFA graphs of GPT-2-shaped 64-token prompts recorded once and fed again and again through the
          device reduction into the spool (bench/ingest_pipeline.py's ReplaySession), then compacted and
          published by `merge` in a process of its own, whose peak RSS is the write path's memory: end-to-end
          observations/s (spooling + compaction + publish), edge rows written per observation, peak RSS;
          into SQLite, a live Neo4j and (through `neo4j-import:` files and Neo4j's offline importer) a new
          Neo4j database, for --replay prompts and (SQLite) --big prompts (memory must not
          grow with the corpus). The per-window path (PER_WINDOW_COMMIT, from a git worktree: its own
          bench/ingest_pipeline.py) replays the same graphs first, in the same run.
  toy     toy-ioi on ioi:N, mining off, into each store: wall time of the per-window path (worktree) and of
          this tree's, alternated, and their ratio.

Usage: python bench/spool_publish.py [--only replay,toy] [--no-neo4j] [--replay 64] [--big 256]
       [--stores sqlite,neo4j,importer] [--no-baseline]
       [--toy-prompts 2000] [--baseline-neo4j-replay 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import gpt2_hub  # noqa: E402,I001 - first: it points HF_HOME at the fixture before huggingface_hub is imported
from baseline import worktree  # noqa: E402

PER_WINDOW_COMMIT = "1197587"  # the last commit whose jobs upserted each window into the store

# `merge` of a spool folder into a store, in a process of its own: the peak RSS of it and its compaction
# processes together (sampled every 20 ms from /proc: getrusage's ru_maxrss survives exec, so a child of this
# 8 GB benchmark would report the benchmark's peak) is the write path's memory
MERGE = """
import json, os, sys, threading, time
from catalog.publish import publish_folder
from catalog.stores import open_store

def tree_rss(pid):
    total, kids = 0, []
    try:
        with open(f"/proc/{pid}/status") as fh:
            total = next(int(l.split()[1]) for l in fh if l.startswith("VmRSS")) * 1024
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                kids += [int(k) for k in fh.read().split()]
    except (OSError, StopIteration):
        return 0
    return total + sum(tree_rss(k) for k in kids)

peak, done = [0], threading.Event()
def sample():
    while not done.wait(0.02):
        peak[0] = max(peak[0], tree_rss(os.getpid()))
threading.Thread(target=sample, daemon=True).start()
t = time.time()
stores = {}
def store_for(cap):
    return stores.setdefault(cap, open_store(sys.argv[2], evidence_per_edge=cap))
report = publish_folder(sys.argv[1], store_for, workers=int(sys.argv[3]))["runs"]
done.set()
print(json.dumps({"seconds": time.time() - t, "rss_gib": peak[0] / 2**30, **next(iter(report.values()))}))
"""

# the toy ingest of this tree or of the per-window commit's worktree (its own API: same names there)
TOY = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[3]))
import ingest
assert ingest.__file__.startswith(sys.argv[4]), ingest.__file__
from catalog.stores import open_store
from ingest.jobs import JobOptions, run_job
from ingest.model_with_saes import ModelWithSaes
toy = ModelWithSaes.open("toy-ioi", ["toy-ioi"], "cpu")
s = run_job(toy, sys.argv[1], open_store(sys.argv[2]), JobOptions(run="t", batch_size=8, progress=False, mine=False),
            log=lambda *_: None)
print(json.dumps({"prompts": s.prompts, "seconds": s.seconds, "edges": s.edges, "observations": s.observations}))
"""


def _json_line(out: subprocess.CompletedProcess) -> dict:
    if out.returncode:
        raise RuntimeError((out.stderr.strip().splitlines() or ["no output"])[-1])
    result: dict = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _env(tree: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(tree), "CIRCUIT_CATALOG_TORCH_THREADS": "1"}


def replay_baseline(args, neo: str | None) -> None:
    print(f"replay of GPT-2-shaped 64-token prompts (batch 1, window {args.window}); the per-window path of "
          f"{PER_WINDOW_COMMIT} first, from a worktree:")
    with worktree(PER_WINDOW_COMMIT) as tree:
        for label, extra, n in (("sqlite", ["--no-neo4j"], args.replay),
                                ("neo4j", [], args.baseline_neo4j_replay)):
            if label == "neo4j" and neo is None:
                continue
            out = subprocess.run([sys.executable, str(tree / "bench" / "ingest_pipeline.py"), "--only", "replay",
                                  "--replay", str(n), "--replay-window", "16", "--no-baseline", *extra], cwd=tree,
                                 capture_output=True, text=True, env=_env(tree))
            line = next((x for x in out.stdout.splitlines() if x.strip().startswith(label)), None)
            print(f"  per-window {label:<8} {n:>4} prompts: " + (
                re.sub(r"\s+", " ", line.strip()[len(label):]) if line else f"FAILED: {out.stderr.strip()[-300:]}"))


def replay_section(args, tmp: Path, neo: str | None) -> None:
    import ingest_pipeline
    import torch

    from catalog.spool import Spool
    from ingest.jobs import JobOptions, run_job

    if not args.no_baseline:
        replay_baseline(args, neo)
    chosen = set(args.stores.split(","))
    session = gpt2_hub.gpt2_session(torch.device("cpu"))
    corpus = gpt2_hub.word_corpus(tmp / "record.jsonl", 4, 64)
    recorded = []
    default = JobOptions.__dataclass_fields__["pruning"].default_factory()
    for line in Path(corpus).read_text().splitlines():
        recorded.append(session.attribute([session.lm.tokenizer.encode(json.loads(line)["text"])], default)[1])
    print("this tree: spooled in this process (the ReplaySession's reduction), then `merge` in a process of its own:")
    for n, stores in ((args.replay, ("sqlite", "neo4j", "importer")), (args.big, ("sqlite",))):
        if n <= 0 or not chosen.intersection(stores):
            continue
        folder = tmp / f"spool-{n}"
        replay_corpus = gpt2_hub.word_corpus(tmp / f"replay-{n}.jsonl", n, 64)
        t = time.time()
        s = run_job(ingest_pipeline.ReplaySession(session, recorded), replay_corpus, Spool(folder, 8),
                    JobOptions(run="replay", batch_size=1, window=args.window, progress=False, mine=False),
                    log=lambda *_: None)
        spool_s = time.time() - t
        for kind in (k for k in stores if k in chosen):
            url = {"neo4j": neo, "sqlite": f"sqlite:///{tmp}/replay-{n}.db",
                   "importer": f"neo4j-import:{tmp}/import-{n}"}[kind]
            if url is None or (kind == "importer" and neo is None):
                continue
            if kind == "neo4j":
                _wipe(url)  # an empty catalog, as the per-window path's own server was
            try:
                m = _json_line(subprocess.run([sys.executable, "-c", MERGE, str(folder), url, str(args.workers)],
                                              capture_output=True, text=True, env=_env(ROOT), cwd=ROOT))
            except RuntimeError as exc:
                print(f"  spool {kind:<8} {n:>4} prompts: FAILED: {exc}")
                continue
            total = spool_s + m["seconds"]
            if kind == "importer":  # then Neo4j's offline importer builds a new database from the files
                imported = _import(url.split(":", 1)[1], tmp / f"import-home-{n}")
                m["publish_seconds"] += imported["import_seconds"]
                total += imported["import_seconds"]
                print(f"  importer: {imported['summary']}; import {imported['import_seconds']:.1f} s, then the "
                      f"server's start and its indexes' population {imported['start_seconds']:.1f} s (not counted)")
            print(f"  spool {kind:<8} {n:>4} prompts: {s.observations / total:12,.0f} obs/s end to end "
                  f"({s.observations:,} obs; spool {spool_s:.1f} s, compact {m['compact_seconds']:.1f} s, publish "
                  f"{m['publish_seconds']:.1f} s, merge process {m['seconds']:.1f} s); {m['edges_published']:,} edge rows: "
                  f"{m['edges_published'] / s.observations:.4f} per observation; merge peak RSS {m['rss_gib']:.2f} GiB")
    del session


def toy_section(args, tmp: Path, neo: str | None) -> None:
    print(f"toy-ioi, ioi:{args.toy_prompts}, batch 8, mining off: wall time of the per-window path ({PER_WINDOW_COMMIT}) "
          "and of this tree's, alternated:")
    with worktree(PER_WINDOW_COMMIT) as tree:
        for kind, url_of in (("sqlite", lambda tag: f"sqlite:///{tmp}/toy-{tag}.db"), ("neo4j", lambda tag: neo)):
            if kind == "neo4j" and neo is None:
                continue
            times: dict[str, list[float]] = {"per-window": [], "spool": []}
            for rep in range(args.repeats):
                for label, where in (("per-window", tree), ("spool", ROOT)):
                    if kind == "neo4j":
                        _wipe(neo)
                    r = _json_line(subprocess.run(
                        [sys.executable, "-c", TOY, f"ioi:{args.toy_prompts}", url_of(f"{label}-{rep}"),
                         str(args.threads), str(where)], capture_output=True, text=True, env=_env(where), cwd=where))
                    times[label].append(r["seconds"])
                    print(f"  {kind:<7} {label:<11} {r['seconds']:7.1f} s  {r['prompts'] / r['seconds']:7.2f} prompts/s  "
                          f"{r['edges']:,} edge rows written")
            ratio = sum(times["spool"]) / sum(times["per-window"])
            print(f"  {kind:<7} spool / per-window wall time: {ratio:.2f}x (target <= 0.8x)")


def _import(files: str, home: Path) -> dict:
    """``neo4j-server --import``'s two steps, timed apart: the importer, then a server start and the first
    connection (which creates the catalog's constraints and indexes and waits for them to populate)."""
    from catalog.stores import open_store
    from cli.neo4j_server import import_files, start_on_free_port

    t = time.time()
    summary = import_files(str(home), files, heap="2g")
    import_seconds = time.time() - t
    t = time.time()
    proc, url = start_on_free_port(str(home), page_cache="1g", heap="3g")
    try:
        store = open_store(url)
        store.driver.execute_query("CALL db.awaitIndexes(600)")
        start_seconds = time.time() - t
        store.close()
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    return {"summary": summary, "import_seconds": import_seconds, "start_seconds": start_seconds}


def _wipe(url: str) -> None:
    import neo4j

    with neo4j.GraphDatabase.driver(url.replace("neo4j://", "bolt://"), auth=None) as d, d.session() as s:
        s.run("MATCH ()-[r]->() CALL (r) { DELETE r } IN TRANSACTIONS OF 10000 ROWS").consume()
        s.run("MATCH (n) CALL (n) { DETACH DELETE n } IN TRANSACTIONS OF 10000 ROWS").consume()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="replay,toy")
    ap.add_argument("--no-neo4j", action="store_true")
    ap.add_argument("--replay", type=int, default=64)
    ap.add_argument("--big", type=int, default=256)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--baseline-neo4j-replay", type=int, default=8,
                    help="prompts the per-window path replays into Neo4j (~20k obs/s: 64 would take half an hour)")
    ap.add_argument("--stores", default="sqlite,neo4j,importer", help="which publishes the replay times")
    ap.add_argument("--no-baseline", action="store_true", help="skip the per-window path's replay")
    ap.add_argument("--toy-prompts", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2, help="compaction processes")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    only = set(args.only.split(","))
    print(f"CPU, torch threads {args.threads}, compaction workers {args.workers}")
    with tempfile.TemporaryDirectory(prefix="bench-spool-") as d:
        tmp = Path(d)
        if args.no_neo4j:
            sections(args, only, tmp, None)
        else:
            from cli.neo4j_server import running_on_free_port

            with running_on_free_port(f"{d}/neo4j", page_cache="1g", heap="3g") as neo:
                sections(args, only, tmp, neo)


def sections(args, only: set[str], tmp: Path, neo: str | None) -> None:
    if "toy" in only:
        toy_section(args, tmp, neo)
    if "replay" in only:
        replay_section(args, tmp, neo)


if __name__ == "__main__":
    main()
