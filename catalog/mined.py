"""Composition patterns mined once and kept in the catalog, so that reading them costs one lookup.

Mining (catalog.mining) reads every edge of a selection and evidence per pair: seconds on the demo's
500 prompts, hours on a real corpus. An ingest job mines its run when it ends (and the default
selection of runs, when that differs), ``circuit-catalog mine`` mines on demand, and the API and
pages serve what is stored.

A stored result is keyed by the selection (its run ids) and ``min_prompts``, mined with the API's
largest ``top`` (``STORED_TOP``): a smaller ``top`` is its prefix, since pairs, chains and hubs are
ranked from all pairs before they are cut. It is served only while the catalog still holds what it
was mined from: its *fingerprint* lists each selected run's status, finish time and prompt count,
which change whenever a window of that run is written or the run is resumed or finished. A stale or
missing result is mined live (and the answer says so: ``mined`` is null).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from catalog.mining import mine
from catalog.runs import IncompatibleRuns, select_runs
from catalog.schema import JSON
from catalog.stores.base import Store

STORED_TOP = 100  # the largest ?top= of GET /patterns/composition
DEFAULT_MIN_PROMPTS = 2


def selection_key(runs: Sequence[str], min_prompts: int) -> str:
    return json.dumps({"runs": sorted(runs), "min_prompts": min_prompts})


def fingerprint(store: Store, runs: Sequence[str]) -> str:
    """What the selection holds now: per run its status, finish time and number of prompts."""
    by_id = {r.run_id: r for r in store.runs()}
    return json.dumps([[run, by_id[run].status if run in by_id else None,
                        by_id[run].manifest.get("finished") if run in by_id else None, store.prompt_count(run)]
                       for run in sorted(runs)])


def mine_and_store(store: Store, runs: Sequence[str] | None = None,
                   min_prompts: int = DEFAULT_MIN_PROMPTS) -> tuple[JSON, float]:
    """Mine the selection (default: every run that holds edges), store the result; (result, seconds)."""
    t0 = time.perf_counter()
    selected = select_runs(store, runs)
    # read before mining: a window landing meanwhile leaves the result stale, never wrongly fresh
    state = fingerprint(store, selected)
    result = mine(store, top=STORED_TOP, min_prompts=min_prompts, runs=selected)
    result["mined"] = datetime.now(UTC).isoformat(timespec="seconds")
    store.put_mined(selection_key(selected, min_prompts), state, json.dumps(result))
    return result, time.perf_counter() - t0


def mine_after_ingest(store: Store, run: str) -> list[tuple[list[str], float]]:
    """What an ingest job mines when its run ends: the run alone and, when it differs and its runs
    are compatible, the default selection (what the API shows without ?run=); (runs, seconds) each."""
    done = [([run], mine_and_store(store, [run])[1])]
    try:
        default = select_runs(store, None)
    except IncompatibleRuns:
        return done  # the default view refuses mixed settings anyway
    if sorted(default) != [run]:
        done.append((sorted(default), mine_and_store(store, default)[1]))
    return done


def cut(result: JSON, top: int) -> JSON:
    return {**result, **{part: result[part][:top] for part in ("pairs", "qk_pairs", "chains", "qk_chains", "hubs")}}


def stored_patterns(store: Store, top: int, min_prompts: int, runs: Sequence[str] | None) -> JSON | None:
    """The stored result for this selection, cut to ``top``, if it is still current; else None."""
    if top > STORED_TOP:
        return None
    selected = select_runs(store, runs)
    found = store.get_mined(selection_key(selected, min_prompts))
    if found is None or found[0] != fingerprint(store, selected):
        return None
    result: JSON = json.loads(found[1])
    return cut(result, top)


def patterns(store: Store, top: int = 20, min_prompts: int = DEFAULT_MIN_PROMPTS,
             runs: Sequence[str] | None = None) -> JSON:
    """The stored result while current, else mined now (``mined`` null)."""
    stored = stored_patterns(store, top, min_prompts, runs)
    return stored if stored is not None else mine(store, top=top, min_prompts=min_prompts, runs=runs)
