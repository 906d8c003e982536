"""Which runs a query adds up: the selection (``--run`` / ``?run=``) and the rule that numbers made
under different settings are never added together.

Edges, node statistics and evidence are stored per run (docs/catalog.md). A query reads a
selection of runs and the stores sum over it; two runs may be summed only when they share the
model, the SAEs and the pruning (their *settings*, read from the run manifests). Without a
selection a query reads every run that holds edges, and refuses, naming the groups of compatible
runs, when they do not all share settings.
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

from catalog.schema import JSON, Run
from catalog.stores.base import NotFound, Store, StoreError

EXPORTING = "exporting"  # the status of a run an export is still copying: queries refuse it
EDGE_RUN_KINDS = ("ingest",)  # manifest "kind" of runs that hold edges (sae_eval runs hold a result only)
# A query may reuse the list of runs another query read this long ago: a run's settings never change
# once it starts, and stores read exactly the runs named, so a reused list can only leave out a run
# started in the last second, never mix settings. (On Neo4j the list costs a round trip a query.)
RUNS_REUSE_S = 1.0
_runs_read: weakref.WeakKeyDictionary[Any, tuple[float, dict[str, Run]]] = weakref.WeakKeyDictionary()
_runs_lock = threading.Lock()


class IncompatibleRuns(StoreError):
    """The selected runs used different model, SAEs or pruning; ``groups`` lists the compatible sets."""

    def __init__(self, message: str, groups: list[list[str]]):
        super().__init__(message)
        self.groups = groups


def holds_edges(run: Run) -> bool:
    return run.manifest.get("kind", "ingest") in EDGE_RUN_KINDS


def segment_of(run: Run) -> str | None:
    parent: str | None = run.manifest.get("segment_of")
    return parent


def visible(run: Run, stored: dict[str, Run]) -> bool:
    """Whether queries read ``run``: every run but a segment (``ingest --publish-every``, catalog.publish_every)
    that its run does not list (replaced, or one whose publish was cut short) or whose run is done (published
    whole)."""
    parent_id = segment_of(run)
    if parent_id is None:
        return True
    parent = stored.get(parent_id)
    return parent is not None and parent.status != "done" and run.run_id in parent.manifest.get("segments", [])


def settings_of(run: Run) -> JSON:
    """What must match for two runs' numbers to be added: the model (name, source, revision, weight
    processing), the SAEs (their keys) and the pruning (top-k, min |v|, direct view and positions)."""
    m = run.manifest
    model = m.get("model")
    model = model if isinstance(model, dict) else {"name": model}
    return {"model": {k: model.get(k) for k in ("name", "source", "revision", "processing")},
            "saes": sorted(str(s.get("key")) for s in m.get("saes", [])),
            "pruning": m.get("pruning")}


def describe(settings: JSON) -> str:
    pruning = settings["pruning"] or {}
    prune = ", ".join(f"{k}={pruning[k]}" for k in sorted(pruning)) or "unrecorded"
    return (f"model {settings['model']['name']}, SAEs {', '.join(settings['saes']) or 'none recorded'}, "
            f"pruning {prune}")


def compatibility_groups(runs: Sequence[Run]) -> list[tuple[JSON, list[str]]]:
    """Runs grouped by settings, groups in the order of their first run id, ids sorted."""
    groups: dict[str, tuple[JSON, list[str]]] = {}
    for r in sorted(runs, key=lambda r: r.run_id):
        s = settings_of(r)
        groups.setdefault(json.dumps(s, sort_keys=True), (s, []))[1].append(r.run_id)
    return list(groups.values())


def select_runs(store: Store, run_ids: Sequence[str] | None = None) -> tuple[str, ...]:
    """The runs a query sums over: ``run_ids`` as given (each must exist and hold edges), or every run
    that holds edges; raises IncompatibleRuns when they do not share settings."""
    stored = _stored_runs(store, run_ids or ())
    if run_ids:
        chosen = []
        for run_id in dict.fromkeys(run_ids):
            run = stored.get(run_id)
            if run is None:
                raise NotFound(f"no run {run_id!r} in this catalog; runs: "
                               f"{', '.join(sorted(k for k, r in stored.items() if segment_of(r) is None)) or 'none'}")
            if not holds_edges(run):
                raise StoreError(f"run {run_id!r} is a {run.manifest.get('kind')} run and holds no edges")
            # a run still being ingested with --publish-every is read through the segments it shows
            chosen += [run, *(stored[s] for s in run.manifest.get("segments", [])
                              if s in stored and visible(stored[s], stored))]
    else:
        chosen = [r for r in stored.values() if holds_edges(r) and visible(r, stored)]
    cut = [r.run_id for r in chosen if r.status == EXPORTING]
    if cut:
        raise StoreError(f"run(s) {', '.join(cut)} are incomplete: an export into this catalog was interrupted. "
                         "Export again into an empty catalog")
    groups = compatibility_groups(chosen)
    if len(groups) > 1:
        lines = "; ".join(f"group {i + 1} ({describe(s)}): {', '.join(ids)}" for i, (s, ids) in enumerate(groups))
        raise IncompatibleRuns(
            f"{'the selected' if run_ids else 'the stored'} runs used different settings and are never added "
            f"together: {lines}. Choose runs of one group with --run (REST: ?run=)",
            [ids for _, ids in groups])
    return tuple(sorted({r.run_id for r in chosen}))  # a run and its segment both named count once


def _stored_runs(store: Store, needed: Sequence[str]) -> dict[str, Run]:
    """The store's runs by id, read again unless read less than RUNS_REUSE_S ago (and holding ``needed``)."""
    with _runs_lock:
        seen = _runs_read.get(store)
    if seen is not None and time.monotonic() - seen[0] < RUNS_REUSE_S and all(r in seen[1] for r in needed):
        return seen[1]
    stored = {r.run_id: r for r in store.runs()}
    with _runs_lock:
        _runs_read[store] = (time.monotonic(), stored)
    return stored
