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

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, datetime

from catalog.mining import mine
from catalog.runs import IncompatibleRuns, select_runs
from catalog.schema import JSON
from catalog.stores.base import Store

STORED_TOP = 100  # the largest ?top= of GET /patterns/composition
DEFAULT_MIN_PROMPTS = 2
PARSED_KEPT = 8  # parsed stored results kept per process, keyed by (store, selection, stamp)
_parsed: OrderedDict[tuple[str, str, str], JSON] = OrderedDict()
_parsed_lock = threading.Lock()
CHECK_REUSE_S = 1.0
_checked: OrderedDict[tuple[str, str], tuple[float, str | None]] = OrderedDict()  # (store URL, selection) -> stamp


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
    text = json.dumps(result)
    stamp = hashlib.sha1(text.encode()).hexdigest()[:16]
    store.put_mined(selection_key(selected, min_prompts), state, stamp, text)
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
    """The first ``top`` of each list, as copies a caller may change (pages add fields to pairs)."""
    return {**result, **{part: [dict(x) for x in result[part][:top]]
                         for part in ("pairs", "qk_pairs", "chains", "qk_chains", "hubs")}}


def stored_stamp(store: Store, min_prompts: int, runs: Sequence[str] | None) -> str | None:
    """The stamp of the stored result for this selection while it is current, else None (no result
    text is read: a server may cache its answers by stamp). The check is reused for up to
    CHECK_REUSE_S, as catalog.runs reuses the run list: an answer can lag a window written in the
    last second, never mix runs (on Neo4j the check costs a few round trips a request)."""
    selected = select_runs(store, runs)
    key = selection_key(selected, min_prompts)
    now = time.monotonic()
    with _parsed_lock:
        seen = _checked.get((store.url, key))
    if seen is not None and now - seen[0] < CHECK_REUSE_S:
        return seen[1]
    state = store.mined_stamp(key)
    stamp = state[1] if state is not None and state[0] == fingerprint(store, selected) else None
    with _parsed_lock:
        _checked[(store.url, key)] = (now, stamp)
        while len(_checked) > 64:
            _checked.popitem(last=False)
    return stamp


def stored_patterns(store: Store, top: int, min_prompts: int, runs: Sequence[str] | None) -> JSON | None:
    """The stored result for this selection, cut to ``top``, if it is still current; else None."""
    if top > STORED_TOP:
        return None
    selected = select_runs(store, runs)
    key = selection_key(selected, min_prompts)
    state = store.mined_stamp(key)
    if state is None or state[0] != fingerprint(store, selected):
        return None
    with _parsed_lock:
        result = _parsed.get((store.url, key, state[1]))
    if result is None:  # parse once per stored result (a few ms for the demo's 230 kB), not per request
        found = store.get_mined(key)
        if found is None or found[1] != state[1]:  # re-mined in between: the next request reads the new one
            return None
        result = json.loads(found[2])
        with _parsed_lock:
            _parsed[(store.url, key, state[1])] = result
            while len(_parsed) > PARSED_KEPT:
                _parsed.popitem(last=False)
    return cut(result, top)


def patterns(store: Store, top: int = 20, min_prompts: int = DEFAULT_MIN_PROMPTS,
             runs: Sequence[str] | None = None) -> JSON:
    """The stored result while current, else mined now (``mined`` null)."""
    stored = stored_patterns(store, top, min_prompts, runs)
    return stored if stored is not None else mine(store, top=top, min_prompts=min_prompts, runs=runs)
