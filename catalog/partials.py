"""Partial aggregates on disk, for job arrays that have no database in reach of every node.

``circuit-catalog ingest ... --shard i/n --partials DIR`` writes each window, the same columnar
:class:`WindowAggregate` a store would receive, to ``DIR/<run>/window-<hash>.npz`` (named by its
prompts, written to a temporary name and renamed, so a killed shard leaves whole files only), next to
the run's ``manifest.json`` and one ``finish-*.json`` per shard that ended. ``circuit-catalog merge
DIR --store URL`` then writes every window into the catalog through the store's own all-or-nothing
window write, which skips windows whose prompts are stored already: merging twice, or merging a
folder some of whose windows another merge wrote, stores each prompt once. Aggregates merge exactly,
so shards + merge give the catalog one uninterrupted process gives.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np

from catalog.aggregate import (
    EdgeColumns,
    EvidenceColumns,
    HeadColumns,
    RoleColumns,
    StatColumns,
    WindowAggregate,
    empty_columns,
)
from catalog.ids import check_run_name
from catalog.schema import JSON, NodeInfo, Prompt, Run
from catalog.stores.base import Store, StoreError
from catalog.stores.sqlite import DEFAULT_WINDOW as SQLITE_WINDOW
from catalog.stores.sqlite import TAIL_WINDOW as SQLITE_TAIL

COLUMNS = {"edges": EdgeColumns, "heads": HeadColumns, "evidence": EvidenceColumns, "stats": StatColumns,
           "roles": RoleColumns}


def _atomic_write(path: Path, write: Any) -> None:
    """``write(file object)`` into a temporary file beside ``path``, then rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_window(agg: WindowAggregate, path: Path) -> None:
    """One window as an .npz: every column as an array, the rest as one JSON string."""
    meta = {"run": agg.run, "prompts": [asdict(p) for p in agg.prompts], "nodes": [asdict(n) for n in agg.nodes],
            "evidence_cap": agg.evidence_cap, "observations": agg.observations}
    arrays = {f"{part}.{name}": col for part in COLUMNS for name, col in getattr(agg, part).columns().items()}
    _atomic_write(path, lambda fh: np.savez(fh, meta=np.array(json.dumps(meta)), **arrays))


def load_window(path: Path) -> WindowAggregate:
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        # files written before roles were kept hold no roles columns: those windows add no roles
        parts = {part: cls(**{f.name: data[f"{part}.{f.name}"] for f in fields(cls)})
                 if f"{part}.{fields(cls)[0].name}" in data else empty_columns(cls) for part, cls in COLUMNS.items()}
    return WindowAggregate(meta["run"], [Prompt(**p) for p in meta["prompts"]], [NodeInfo(**n) for n in meta["nodes"]],
                           parts["edges"], parts["heads"], parts["evidence"], parts["stats"], meta["evidence_cap"],
                           meta["observations"], parts["roles"])


def _prompt_ids(path: Path) -> list[str]:
    with np.load(path, allow_pickle=False) as data:
        return [p["prompt_id"] for p in json.loads(str(data["meta"]))["prompts"]]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


class PartialsDir:
    """The part of the Store protocol an ingest job writes through, kept in a folder."""

    def __init__(self, folder: str | Path, evidence_per_edge: int | None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.evidence_per_edge = evidence_per_edge
        self.max_window_edges: int | None = None
        self.default_window = SQLITE_WINDOW  # a later merge writes the windows as they were cut, into either store
        self.tail_window = SQLITE_TAIL
        self.url = f"partials:{self.folder}"

    def _run_dir(self, run_id: str) -> Path:
        return self.folder / _safe(run_id)

    def run(self, run_id: str) -> Run | None:
        path = self._run_dir(run_id) / "manifest.json"
        return Run(run_id, "running", json.loads(path.read_text())) if path.exists() else None

    def start_run(self, run_id: str, manifest: JSON, resume: bool) -> None:
        check_run_name(run_id)
        folder = self._run_dir(run_id)
        if (folder / "manifest.json").exists() and not resume:
            raise StoreError(f"run {run_id!r} already has partials in {folder}; pass --resume to continue it")
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "manifest.json").exists():  # shards of one run write the same manifest: the first stays
            text = json.dumps({**manifest, "run_id": run_id}, indent=1, sort_keys=True).encode()
            _atomic_write(folder / "manifest.json", lambda fh: fh.write(text))

    def done_prompts(self, run: str) -> set[str]:
        return {pid for path in self._run_dir(run).glob("window-*.npz") for pid in _prompt_ids(path)}

    def write_window(self, agg: WindowAggregate) -> bool:
        """Write the window unless a file of the same prompts exists; False then."""
        digest = hashlib.blake2b("\n".join(p.uid for p in agg.prompts).encode(), digest_size=12).hexdigest()
        path = self._run_dir(agg.run) / f"window-{digest}.npz"
        if path.exists():
            return False
        save_window(agg, path)
        return True

    def finish_run(self, run_id: str, status: str, updates: JSON) -> None:
        text = json.dumps({"status": status, "updates": updates}, indent=1, sort_keys=True).encode()
        _atomic_write(self._run_dir(run_id) / f"finish-{_safe(status)}.json", lambda fh: fh.write(text))


def merge_partials(folder: str | Path, store_for: Callable[[int | None], Store]) -> JSON:
    """Write every run's windows in ``folder`` into the store ``store_for(evidence per edge)`` opens
    (each run's windows were reduced with its manifest's cap, and are written with it); idempotent.
    Returns what it did, per run."""
    root = Path(folder)
    runs = sorted(p.parent for p in root.glob("*/manifest.json"))
    if not runs:
        raise StoreError(f"no partials in {root}: expected <run>/manifest.json from `ingest --partials {root}`")
    report: JSON = {"runs": {}}
    for run_dir in runs:
        manifest = json.loads((run_dir / "manifest.json").read_text())
        run_id = manifest.pop("run_id")
        store = store_for(manifest.get("evidence_per_edge"))
        store.start_run(run_id, manifest, resume=True)
        written = stored_already = prompts = 0
        for path in sorted(run_dir.glob("window-*.npz")):
            agg = load_window(path)
            if store.write_window(agg):
                written += 1
                prompts += len(agg.prompts)
            else:
                stored_already += 1
        finishes = [json.loads(p.read_text()) for p in sorted(run_dir.glob("finish-*.json"))]
        status = _merged_status([f["status"] for f in finishes], manifest)
        updates: JSON = {}
        for f in finishes:
            updates.update(f["updates"])
        store.finish_run(run_id, status, {**updates, "merged_from": str(root)})
        report["runs"][run_id] = {"windows_written": written, "windows_stored_already": stored_already,
                                  "prompts_written": prompts, "status": status}
    return report


def _merged_status(statuses: list[str], manifest: JSON) -> str:
    """"done" when the run (or every one of its shards) finished, else what is missing."""
    if any(s == "failed" for s in statuses):
        return "failed"
    shards = {int(m[1]): int(m[2]) for s in statuses if (m := re.fullmatch(r"shard (\d+)/(\d+) done", s))}
    if "done" in statuses or (shards and len(shards) == next(iter(shards.values()))):
        return "done"
    n = next(iter(shards.values()), None)
    return f"partial: {len(shards)} of {n} shards done" if n else "partial: no shard finished"
