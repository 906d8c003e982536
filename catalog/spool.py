"""The spool: a job's windows on local disk, its durable state until they are published.

An ingest job writes each window, the columnar :class:`WindowAggregate` of whole batches, to
``DIR/<run>/window-<hash>.npz`` (named by its prompts, written to a temporary name, fsynced and renamed,
so a killed job leaves whole files only), next to the run's ``manifest.json`` and one ``finish-*.json``
per job or shard that ended. Writing a window never waits on a database. ``catalog.publish`` then
compacts a run's windows (``catalog.compact``: each edge once) and writes them into a store in one go.

The same folder is what job arrays write with ``ingest --partials DIR`` (nodes that cannot reach the
database); ``circuit-catalog merge DIR --store URL`` publishes it. A job that writes to a store spools
next to it (``default_spool``) and publishes when it ends; shards of one run spool into one folder and
the shard that finds every shard finished publishes the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np

from catalog.aggregate import (
    EdgeColumns,
    EvidenceColumns,
    HeadColumns,
    HistColumns,
    RoleColumns,
    StatColumns,
    TopColumns,
    WindowAggregate,
    empty_columns,
)
from catalog.ids import check_run_name
from catalog.schema import JSON, NodeInfo, Prompt, Run
from catalog.stores.base import StoreError

COLUMNS = {"edges": EdgeColumns, "heads": HeadColumns, "evidence": EvidenceColumns, "stats": StatColumns,
           "roles": RoleColumns, "tops": TopColumns, "hists": HistColumns}

# prompts per spooled window when the job names none: a window's aggregate is held on the device until it
# is spooled (``--window-mem`` bounds it), and a spool write costs about its size, so no store tunes it now
DEFAULT_WINDOW = 256


def atomic_write(path: Path, write: Any) -> None:
    """``write(file object)`` into a temporary file beside ``path``, fsynced, then renamed into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_window(agg: WindowAggregate, path: Path) -> None:
    """One window as an .npz: every column as an array, the rest as one JSON string."""
    # nodes as rows of NODE_FIELDS, not dicts (a GPT-2-shaped window names ~10^5 nodes: dataclasses.asdict
    # took 1.1 s of a 1.4 s write); the JSON as UTF-8 bytes (a str array is stored in UTF-32: 4x the bytes)
    meta = {"run": agg.run, "prompts": [asdict(p) for p in agg.prompts],
            "nodes": [[n.uid, n.model, n.sae, n.ref, n.kind, n.layer, n.index] for n in agg.nodes],
            "evidence_cap": agg.evidence_cap, "observations": agg.observations, "seq": agg.seq}
    arrays: dict[str, Any] = {f"{part}.{name}": narrow(col) for part in COLUMNS
                              for name, col in getattr(agg, part).columns().items()}
    text = np.frombuffer(json.dumps(meta, ensure_ascii=False).encode(), np.uint8)
    atomic_write(path, lambda fh: np.savez(fh, meta=text, **arrays))


def narrow(col: np.ndarray) -> np.ndarray:
    """The column in the smallest dtype that holds every value exactly (load_window widens it back): integers
    in 8, 16 or 32 bits where they fit, floats in 32 where each is a float32 (RDFA's values, their min and
    max, are). A spooled GPT-2-shaped window is mostly evidence: this halves the bytes a compaction reads."""
    if not len(col):
        return col
    if col.dtype.kind == "i":
        lo, hi = int(col.min()), int(col.max())
        for dtype in (np.int8, np.int16, np.int32):
            if np.iinfo(dtype).min <= lo and hi <= np.iinfo(dtype).max:
                return col.astype(dtype)
    elif col.dtype == np.float64:
        single = col.astype(np.float32)
        if np.array_equal(single.astype(np.float64), col, equal_nan=True):
            return single
    return col


def load_window(path: Path, names: bool = True) -> WindowAggregate:
    """A spooled window; ``names`` False leaves its prompts and nodes out (a compaction names them by the run's
    layout: building ~10^5 NodeInfo took longer than reading the columns)."""
    with np.load(path, allow_pickle=False) as data:
        meta = _meta(data["meta"])
        # files written before roles (or top activations) were kept hold none: those windows add none
        parts = {part: cls(**{f.name: wide(data[f"{part}.{f.name}"]) for f in fields(cls)})
                 if f"{part}.{fields(cls)[0].name}" in data else empty_columns(cls) for part, cls in COLUMNS.items()}
    return WindowAggregate(meta["run"], [Prompt(**p) for p in meta["prompts"]] if names else [],
                           [node_info(n) for n in meta["nodes"]] if names else [],
                           parts["edges"], parts["heads"], parts["evidence"], parts["stats"], meta["evidence_cap"],
                           meta["observations"], parts["roles"], meta.get("seq", -1), parts["tops"], parts["hists"])


def wide(col: np.ndarray) -> np.ndarray:
    """A spooled column back in the dtype a WindowAggregate holds (int64 or float64)."""
    return col.astype(np.int64 if col.dtype.kind == "i" else np.float64, copy=False)


def window_meta(path: Path) -> JSON:
    """A window file's JSON part (prompts, nodes, cap, seq) without reading its columns."""
    with np.load(path, allow_pickle=False) as data:
        return _meta(data["meta"])


def _meta(stored: np.ndarray) -> JSON:
    """The JSON part as written: UTF-8 bytes, or (files of earlier versions) a str."""
    meta: JSON = json.loads(stored.tobytes().decode() if stored.dtype == np.uint8 else str(stored))
    return meta


def node_info(entry: list[Any] | JSON) -> NodeInfo:
    """A window's node: a row of uid, model, sae, ref, kind, layer, index (earlier files: a dict of them)."""
    return NodeInfo(*entry) if isinstance(entry, list) else NodeInfo(**entry)


def node_uid(entry: list[Any] | JSON) -> str:
    uid: str = entry[0] if isinstance(entry, list) else entry["uid"]
    return uid


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


def default_spool(store_url: str) -> Path:
    """Where a job spools for a store: beside a SQLite file or a neo4j-import: folder (shards on a shared volume
    find one folder), else under ``$CIRCUIT_CATALOG_SPOOL`` or ``~/.cache/circuit-catalog/spool``, one folder
    per server."""
    if store_url.startswith("sqlite:///"):
        return Path(store_url.removeprefix("sqlite:///") + ".spool")
    if store_url.startswith("neo4j-import:"):  # files for Neo4j's importer: beside them too
        return Path(store_url.split(":", 1)[1].removeprefix("//").rstrip("/") + ".spool")
    root = Path(os.environ.get("CIRCUIT_CATALOG_SPOOL") or Path.home() / ".cache" / "circuit-catalog" / "spool")
    return root / safe_name(store_url.split("://", 1)[-1])


class Spool:
    """The part of the Store protocol an ingest job writes through, kept in a folder."""

    def __init__(self, folder: str | Path, evidence_per_edge: int | None):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot make the spool folder {self.folder}: {exc.strerror}") from None
        self.evidence_per_edge = evidence_per_edge
        self.url = f"spool:{self.folder}"

    def run_dir(self, run_id: str) -> Path:
        return self.folder / safe_name(run_id)

    def run(self, run_id: str) -> Run | None:
        path = self.run_dir(run_id) / "manifest.json"
        return Run(run_id, "running", json.loads(path.read_text())) if path.exists() else None

    def start_run(self, run_id: str, manifest: JSON, resume: bool) -> None:
        check_run_name(run_id)
        folder = self.run_dir(run_id)
        if (folder / "manifest.json").exists() and not resume:
            raise StoreError(f"run {run_id!r} already has spooled windows in {folder}; pass --resume to continue it")
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "manifest.json").exists():  # shards of one run write the same manifest: the first stays
            text = json.dumps({**manifest, "run_id": run_id}, indent=1, sort_keys=True).encode()
            atomic_write(folder / "manifest.json", lambda fh: fh.write(text))

    def windows(self, run_id: str) -> list[Path]:
        return sorted(self.run_dir(run_id).glob("window-*.npz"))

    def done_prompts(self, run: str) -> set[str]:
        return {p["prompt_id"] for path in self.windows(run) for p in window_meta(path)["prompts"]}

    def write_window(self, agg: WindowAggregate) -> bool:
        """Write the window unless a file of the same prompts exists; False then."""
        digest = hashlib.blake2b("\n".join(p.uid for p in agg.prompts).encode(), digest_size=12).hexdigest()
        path = self.run_dir(agg.run) / f"window-{digest}.npz"
        if path.exists():
            return False
        save_window(agg, path)
        return True

    def finish_run(self, run_id: str, status: str, updates: JSON) -> None:
        text = json.dumps({"status": status, "updates": updates}, indent=1, sort_keys=True).encode()
        atomic_write(self.run_dir(run_id) / f"finish-{safe_name(status)}.json", lambda fh: fh.write(text))
        if status != "failed":  # a resumed job that ended: the failure it resumed from is over
            (self.run_dir(run_id) / "finish-failed.json").unlink(missing_ok=True)

    def finishes(self, run_id: str) -> list[JSON]:
        return [json.loads(p.read_text()) for p in sorted(self.run_dir(run_id).glob("finish-*.json"))]


def spooled_status(statuses: list[str]) -> str:
    """"done" when the run (or every one of its shards) finished, else what is missing."""
    if any(s == "failed" for s in statuses):
        return "failed"
    shards = {int(m[1]): int(m[2]) for s in statuses if (m := re.fullmatch(r"shard (\d+)/(\d+) done", s))}
    if "done" in statuses or (shards and len(shards) == next(iter(shards.values()))):
        return "done"
    n = next(iter(shards.values()), None)
    return f"partial: {len(shards)} of {n} shards done" if n else "partial: no shard finished"
