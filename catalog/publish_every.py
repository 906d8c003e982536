"""Segments: a long run queryable while it runs (``ingest --publish-every``).

Every N prompts (or minutes) the windows spooled since the last segment are compacted and published as a
*segment*: a run of its own in the store, named ``<run>~<k>`` (catalog.ids.segment_name), with the run's
settings, its prompts under ``<run>~<k>/<prompt id>``, and the names of the windows it covers in its manifest.
Queries sum a run's segments exactly as they sum compatible runs (catalog.runs.select_runs): the run's own
manifest lists the segments a reader sees (``segments``), so a new segment appears, or replaces the earlier
ones, in one write of that list. When MAX_SEGMENTS are visible, the next segment covers every window spooled so
far and replaces them all (then they are dropped). When the job ends the run is published whole under its own
name, as without segments; marking it done hides its segments, which are then dropped. The spool keeps every
window until then: it stays the job's durable state, and a killed job resumes with the segments it published.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

from catalog.aggregate import WindowAggregate
from catalog.compact import DEFAULT_MEM, compact, layout, load_part
from catalog.ids import segment_name
from catalog.publish import run_lock
from catalog.runs import RUNS_REUSE_S, segment_of
from catalog.schema import JSON
from catalog.spool import Spool
from catalog.stores.base import Store

MAX_SEGMENTS = 8  # visible at once; the next publish replaces them with one
SEGMENT_KEYS = ("segment_of", "windows", "segments", "counts")  # manifest keys a segment does not copy from its run


def publish_segment(spool: Spool, run: str, store: Store, *, mem: int = DEFAULT_MEM, workers: int = 1,
                    log: Callable[[str], None] = lambda _: None) -> JSON:
    """Publish the run's windows that no visible segment covers as its next segment (all of them, replacing the
    visible ones, once MAX_SEGMENTS are); returns what it did."""
    run_dir = spool.run_dir(run)
    with run_lock(run_dir):
        parent = store.run(run)
        if parent is None:
            raise ValueError(f"run {run!r} was never started in {store.url}")
        stored = {r.run_id: r for r in store.runs()}
        mine = {k: r for k, r in stored.items() if segment_of(r) == run}
        shown = [s for s in parent.manifest.get("segments", []) if s in mine]
        covered = {name for s in shown for name in mine[s].manifest["windows"]}
        paths = spool.windows(run)
        if all(p.name in covered for p in paths):
            return {"segment": None}
        for leftover in set(mine) - set(shown):  # a segment whose publish or replacement was cut short
            store.drop_run(leftover)
        whole = len(shown) >= MAX_SEGMENTS
        chosen = paths if whole else [p for p in paths if p.name not in covered]
        seg = segment_name(run, 1 + max((int(k.rsplit("~", 1)[1]) for k in mine), default=0))
        t = time.time()
        lay = layout(seg, chosen, mem, workers)
        folder = run_dir / f"segment-{lay.digest}"
        parts = compact(lay, folder, workers)
        prompts = [replace(p, uid=f"{seg}/{p.prompt_id}", run=seg) for p in lay.prompts]
        settings = {k: v for k, v in parent.manifest.items() if k not in SEGMENT_KEYS}
        store.start_run(seg, {**settings, "segment_of": run, "windows": [p.name for p in chosen]}, resume=True)

        def loaded() -> Iterator[WindowAggregate]:
            for path in parts:
                part = load_part(lay, path)
                part.prompts = prompts
                yield part

        store.publish_run(seg, prompts, lay.nodes, loaded())
        store.finish_run(seg, "done", {})
        # the one write that shows it (and, when it covers every window, hides the segments it replaces)
        store.finish_run(run, parent.status, {"segments": [seg] if whole else [*shown, seg]})
        shutil.rmtree(folder, ignore_errors=True)
        if whole:
            drop_segments(store, run, keep=seg)
        log(f"run {run!r}: segment {seg} published ({len(prompts)} prompts, {len(chosen)} window(s)"
            f"{', replacing ' + str(len(shown)) + ' segments' if whole else ''}) in {time.time() - t:.1f} s")
        return {"segment": seg, "prompts": len(prompts), "windows": len(chosen), "replaced": len(shown) if whole else 0}


def drop_segments(store: Store, run: str, keep: str | None = None) -> int:
    """Drop the segments of ``run`` but ``keep`` once no reader sees them: a query may use a list of runs read
    RUNS_REUSE_S ago (catalog.runs), so they go after that long. Returns how many were dropped."""
    doomed = [r.run_id for r in store.runs() if segment_of(r) == run and r.run_id != keep]
    if doomed:
        time.sleep(RUNS_REUSE_S + 0.5)
    for seg in doomed:
        store.drop_run(seg)
    return len(doomed)


def drop_orphans(store: Store) -> int:
    """Drop the segments of runs that are done (or gone): a job killed between marking its run done and dropping
    its segments leaves them stored, unread; the next job on the catalog clears them. Returns how many."""
    stored = {r.run_id: r for r in store.runs()}
    orphans = [k for k, r in stored.items() if (parent := segment_of(r)) is not None
               and (parent not in stored or stored[parent].status == "done")]
    for seg in orphans:
        store.drop_run(seg)
    return len(orphans)
