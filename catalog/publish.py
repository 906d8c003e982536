"""Publish: a run's spooled windows compacted and written into a store, each edge once.

A run is published once, when its job (or, for shards, the last of its shards) ends, or by ``merge``: its
spooled windows are compacted (``catalog.compact``) and the store writes the result insert-only
(``publish_run``: SQLite in one transaction; Neo4j in batches, with the run marked ``publishing`` until the
last, so a killed publish is cleared and done again). The spool stays the durable state until the store has
every prompt; then the publisher removes it (a ``--partials`` folder it was given is left alone).

One publisher at a time per run (a lock file in its spool folder), so shards that end together publish
once; the windows whose prompts the store holds are skipped, so publishing again stores nothing twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from catalog.aggregate import WindowAggregate
from catalog.compact import DEFAULT_MEM, compact, layout, load_part
from catalog.schema import JSON
from catalog.spool import Spool, spooled_status, window_meta
from catalog.stores.base import Store, StoreError


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run's publish lock (an flock on a file in its spool folder) while the body runs. The folder is
    made if a publisher that held the lock before removed it (the run is published then: nothing is left)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "publish.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def publish_run(spool: Spool, run: str, store: Store, *, mem: int = DEFAULT_MEM, workers: int = 1,
                log: Callable[[str], None] = lambda _: None, remove: bool = False) -> JSON:
    """Compact and publish ``run``'s spooled windows not in ``store`` yet; returns what it did. ``remove``:
    delete the run's spool folder once the store holds all of it (still under the lock, so a publisher
    waiting for it finds nothing to read)."""
    run_dir = spool.run_dir(run)
    with run_lock(run_dir):
        paths = spool.windows(run)
        published = store.done_prompts(run)
        todo, before = [], 0
        for path in paths:
            ids = [p["prompt_id"] for p in window_meta(path)["prompts"]]
            stored = sum(i in published for i in ids)
            if stored and stored < len(ids):
                raise StoreError(f"spooled window {path.name} of run {run!r} is only partly in {store.url} ({stored} "
                                 f"of {len(ids)} prompts): that catalog's run was not written from this spool")
            if stored:
                before += 1
            else:
                todo.append(path)
        report: JSON = {"windows_published": len(todo), "windows_published_before": before, "prompts_published": 0,
                        "edges_published": 0, "compact_seconds": 0.0, "publish_seconds": 0.0}
        if not todo:
            if remove:
                shutil.rmtree(run_dir, ignore_errors=True)
            return report
        if published:
            raise StoreError(f"run {run!r} already has {len(published)} prompts in {store.url}, published from "
                             f"other windows than the {len(todo)} spooled now: a run is published once (start "
                             "another --run for more prompts)")
        t = time.time()
        lay = layout(run, todo, mem, workers)
        folder = run_dir / f"compacted-{lay.digest}"
        for stale in run_dir.glob("compacted-*"):
            if stale != folder:
                shutil.rmtree(stale)
        parts = compact(lay, folder, workers)
        report["compact_seconds"] = round(time.time() - t, 3)
        log(f"run {run!r}: {len(todo)} spooled window(s) compacted into {len(parts)} partition(s) in "
            f"{report['compact_seconds']:.1f} s; publishing into {store.url}")
        t = time.time()
        edges = [0]

        def loaded() -> Iterator[WindowAggregate]:
            for path in parts:
                part = load_part(lay, path)
                edges[0] += len(part.edges)
                yield part

        store.publish_run(run, lay.prompts, lay.nodes, loaded())
        report.update(prompts_published=len(lay.prompts), edges_published=edges[0],
                      publish_seconds=round(time.time() - t, 3), observations=lay.observations)
        shutil.rmtree(run_dir if remove else folder, ignore_errors=True)
        return report


def remove_spooled(spool: Spool, run: str) -> None:
    """Delete a run's spool folder (once its store holds every prompt of it, or before a new run of its name)."""
    shutil.rmtree(spool.run_dir(run), ignore_errors=True)
    with contextlib.suppress(OSError):  # the spool folder itself too, when no other run is in it
        spool.folder.rmdir()


def publish_folder(folder: str | Path, store_for: Callable[[int | None], Store], *, mem: int = DEFAULT_MEM,
                   workers: int = 1) -> JSON:
    """``merge``: publish every run spooled in ``folder`` (``ingest --partials``) into the store that
    ``store_for(evidence per edge)`` opens (each run's windows were reduced with its manifest's cap, and are
    published with it); idempotent. Returns what it did, per run."""
    root = Path(folder)
    runs = sorted(p.parent for p in root.glob("*/manifest.json"))
    if not runs:
        raise StoreError(f"no partials in {root}: expected <run>/manifest.json from `ingest --partials {root}`")
    report: JSON = {"runs": {}}
    for run_dir in runs:
        manifest = json.loads((run_dir / "manifest.json").read_text())
        run_id = manifest.pop("run_id")
        spool = Spool(root, manifest.get("evidence_per_edge"))
        store = store_for(manifest.get("evidence_per_edge"))
        store.start_run(run_id, manifest, resume=True)
        done = publish_run(spool, run_id, store, mem=mem, workers=workers)
        finishes = spool.finishes(run_id)
        status = spooled_status([f["status"] for f in finishes])
        updates: JSON = {}
        for f in finishes:
            updates.update(f["updates"])
        store.finish_run(run_id, status, {**updates, "merged_from": str(root)})
        report["runs"][run_id] = {**done, "status": status}
    return report
