"""Compaction: a run's spooled windows merged into its aggregate, each edge once.

Windows name nodes and prompts by their rows in the window; compaction maps them to the run's (``Layout``):
windows in corpus order, prompts in that order, nodes in order of first appearance. A run edge's key is
``(src * n_nodes + dst) * n_kinds + kind`` over the run's node rows. Edges are split into ``n_parts``
partitions by a hash of that key: each window is read once and its rows split by partition (scatter), then
each partition sorts its rows by key and reduces them exactly as the device reduction does
(``ingest.reduce``): counts and float64 sums add, min and max take theirs, head sums and role counts add per
(edge, head) and (edge, role), evidence keeps each edge's top N by the total order of
``catalog.evidence_rank``. So a partition holds about 1/n_parts of the spool's rows: the partition count
follows the spool's size and the memory allowed (``mem``), and both phases run in parallel processes. Each
partition is saved as a window file (``catalog.spool.save_window``) whose rows name the layout's nodes and
prompts; a killed compaction keeps the windows it split and the partitions it finished. No torch here.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

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
)
from catalog.evidence_rank import tie_key, top_per_group
from catalog.schema import EDGE_KINDS, TOP_ACTIVATIONS, NodeInfo, Prompt
from catalog.spool import atomic_write, load_window, narrow, node_info, node_uid, save_window, wide, window_meta
from catalog.stores.base import StoreError

N_KINDS = len(EDGE_KINDS)
DEFAULT_MEM = 2 << 30  # bytes a compaction may hold; the spool's column bytes times GROWTH are split to fit it
# peak bytes of a partition in memory (concatenated, sorted, reduced) against its column bytes in the window files
# (their JSON part left out): 8.6 measured on 64 replayed GPT-2-shaped prompts in one partition
GROWTH = 9
_HASH = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads consecutive keys over the partitions


@dataclass
class Layout:
    """A run's windows mapped onto its prompts and nodes."""

    run: str
    paths: list[Path]  # window files, in corpus order
    prompts: list[Prompt]  # the run's, in corpus order
    nodes: list[NodeInfo]  # in order of first appearance
    node_rows: list[np.ndarray]  # per window [window nodes]: the node's row in ``nodes``
    prompt_rows: list[np.ndarray]  # per window [window prompts]: the prompt's row in ``prompts``
    prompt_rank: np.ndarray  # [prompts] rank of each prompt's uid (the evidence tie-break)
    cap: int | None  # evidence per edge the windows were reduced with
    observations: int
    n_parts: int
    digest: str  # names the windows and the partition count (a resumed compaction finds what it finished by it)


def layout(run: str, paths: list[Path], mem: int = DEFAULT_MEM, workers: int = 1) -> Layout:
    """Read the windows' prompts and nodes (not their columns) and lay out the run in partitions that fit
    ``mem`` bytes together while ``workers`` of them are merged at once."""
    metas = sorted(((window_meta(p), p) for p in paths),
                   key=lambda mp: (mp[0].get("seq", -1), mp[0]["prompts"][0]["uid"] if mp[0]["prompts"] else ""))
    caps = {m["evidence_cap"] for m, _ in metas}
    if len(caps) > 1:
        raise StoreError(f"the spooled windows of run {run!r} were reduced with different evidence caps {sorted(caps, key=str)}")
    node_at: dict[str, int] = {}
    nodes: list[NodeInfo] = []
    prompt_at: dict[str, int] = {}
    prompts: list[Prompt] = []
    node_rows, prompt_rows = [], []
    for meta, path in metas:
        uids = [node_uid(n) for n in meta["nodes"]]
        for uid, n in zip(uids, meta["nodes"], strict=True):
            if uid not in node_at:
                node_at[uid] = len(nodes)
                nodes.append(node_info(n))
        node_rows.append(np.array([node_at[uid] for uid in uids], np.int64))
        for p in meta["prompts"]:
            if p["uid"] in prompt_at:
                raise StoreError(f"prompt {p['uid']!r} is in two spooled windows of run {run!r} ({path.name} and "
                                 "another): was the spool written by two jobs with different --batch-size?")
            prompt_at[p["uid"]] = len(prompts)
            prompts.append(Prompt(**p))
        prompt_rows.append(np.array([prompt_at[p["uid"]] for p in meta["prompts"]], np.int64))
    rank = np.empty(len(prompts), np.int64)
    rank[np.argsort(np.array([p.uid for p in prompts], dtype=object), kind="stable")] = np.arange(len(prompts))
    size = sum(column_bytes(p) for p in paths)
    n_parts = math.ceil(size * GROWTH / mem)
    if n_parts > 1 and workers > 1:
        n_parts = math.ceil(size * GROWTH * min(workers, n_parts) / mem)
    n_parts = max(1, n_parts)
    # the partition count is in the name: partitions of another count (a resume with other --compact-mem or
    # --compact-workers) hold other edges, and must not be mixed with these
    digest = hashlib.blake2b("\n".join([*sorted(p.name for p in paths), f"parts {n_parts}"]).encode(),
                             digest_size=8).hexdigest()
    return Layout(run, [p for _, p in metas], prompts, nodes, node_rows, prompt_rows, rank,
                  next(iter(caps)) if caps else None, sum(m["observations"] for m, _ in metas),
                  n_parts, digest)


def column_bytes(path: Path) -> int:
    """The bytes of a window file's columns, as stored (its JSON part, prompts and node names, left out)."""
    with zipfile.ZipFile(path) as z:
        return sum(i.file_size for i in z.infolist() if not i.filename.startswith("meta."))


def compact(lay: Layout, folder: Path, workers: int = 1) -> list[Path]:
    """Compact ``lay``'s windows into ``folder/part-K.npz`` (K < lay.n_parts), keeping what a killed compaction
    finished; returns their paths. With several partitions, each window is first read once and its rows split
    by partition (``scatter/``), so that each partition then reads only its own rows: reading every window once
    per partition made a 4x larger spool take 8x longer. ``workers`` > 1 runs each phase in that many processes."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"part-{k}.npz" for k in range(lay.n_parts)]
    todo = [k for k, path in enumerate(paths) if not path.exists()]
    if lay.n_parts > 1 and todo:
        (folder / "scatter").mkdir(exist_ok=True)
        windows = [i for i in range(len(lay.paths)) if not (folder / "scatter" / f"w{i}.done").exists()]
        _run(lay, folder, "scatter", windows, workers)
    _run(lay, folder, "merge", todo, workers)
    shutil.rmtree(folder / "scatter", ignore_errors=True)
    return paths


def _run(lay: Layout, folder: Path, phase: str, items: list[int], workers: int) -> None:
    """Run ``phase`` (scatter windows, merge partitions) on ``items``, here or in ``workers`` processes."""
    if workers > 1 and len(items) > 1:
        # fresh interpreters (`python -m catalog.compact`), not multiprocessing: a fork would copy the job's torch
        # threads mid-flight, and spawn re-runs the caller's main script, which a notebook or a script without a
        # __main__ guard does not survive
        with open(folder / "layout.pickle", "wb") as fh:
            pickle.dump(lay, fh)
        shares = [items[i::workers] for i in range(min(workers, len(items)))]
        procs = [subprocess.Popen([sys.executable, "-m", "catalog.compact", str(folder), phase, *map(str, share)],
                                  stderr=subprocess.PIPE, text=True) for share in shares]
        errors = [p.communicate()[1] for p in procs]
        for proc, err in zip(procs, errors, strict=True):
            if proc.returncode:
                raise StoreError(f"a compaction process failed (exit {proc.returncode}): "
                                 f"{(err.strip().splitlines() or ['no message'])[-1]}")
    else:
        for i in items:
            _PHASES[phase](lay, i, folder)


def load_part(lay: Layout, path: Path) -> WindowAggregate:
    """A compacted partition with the run's prompts and nodes that its rows name."""
    part = load_window(path, names=False)
    part.run, part.prompts, part.nodes = lay.run, lay.prompts, lay.nodes
    return part


def part_of(key: np.ndarray, n_parts: int) -> np.ndarray:
    """[k] the partition of each int64 key in [0, n_parts)."""
    with np.errstate(over="ignore"):
        mixed = key.astype(np.uint64) * _HASH
    return ((mixed >> np.uint64(32)) % np.uint64(n_parts)).astype(np.int64)


def _window_rows(lay: Layout, i: int) -> dict[str, np.ndarray]:
    """Window ``i``'s rows keyed by run edge key (``e0``, ``h0``, ``r0``, ``v0``) or run node row (``s0``, ``t0``,
    ``g0``), the other columns beside each: the form every partition's rows take."""
    n = max(len(lay.nodes), 1)
    nodes, prompts = lay.node_rows[i], lay.prompt_rows[i]
    w = load_window(lay.paths[i], names=False)
    e, h, r, v, s, t, g = w.edges, w.heads, w.roles, w.evidence, w.stats, w.tops, w.hists
    cols = {"e": ((nodes[e.src] * n + nodes[e.dst]) * N_KINDS + e.kind, e.n_prompts, e.n_obs, e.sum, e.sumsq, e.sum_abs,
                  e.min, e.max, e.n_pos),
            "h": ((nodes[h.src] * n + nodes[h.dst]) * N_KINDS + h.kind, h.head, h.sum),
            "r": ((nodes[r.src] * n + nodes[r.dst]) * N_KINDS + r.kind, r.role, r.n, r.sum_abs),
            "v": ((nodes[v.src] * n + nodes[v.dst]) * N_KINDS + v.kind, prompts[v.prompt], v.src_pos, v.dst_pos, v.head,
                  v.value),
            "s": (nodes[s.node], s.n_obs, s.n_prompts, s.sum_act, s.max_act),
            "t": (nodes[t.node], prompts[t.prompt], t.pos, t.act, np.where(t.src >= 0, nodes[t.src.clip(0)], -1),
                  t.src_pos, t.head, t.value),
            "g": (nodes[g.node], g.bin, g.n)}
    return {f"{x}{j}": col for x, group in cols.items() for j, col in enumerate(group)}


def _select(rows: dict[str, np.ndarray], n_parts: int, k: int) -> dict[str, np.ndarray]:
    """The rows of partition ``k`` (each group by the partition of its key)."""
    at = {x: part_of(rows[f"{x}0"], n_parts) == k for x in _GROUPS}
    return {name: col[at[name[0]]] for name, col in rows.items()}


def scatter_window(lay: Layout, i: int, folder: Path) -> None:
    """Split window ``i``'s rows by partition into ``folder/scatter/w{i}-p{k}.npz``, then mark it done."""
    rows = _window_rows(lay, i)
    for k in range(lay.n_parts):
        part = {name: narrow(col) for name, col in _select(rows, lay.n_parts, k).items()}
        atomic_write(folder / "scatter" / f"w{i}-p{k}.npz", lambda fh, part=part: np.savez(fh, **part))
    atomic_write(folder / "scatter" / f"w{i}.done", lambda fh: fh.write(b""))


def merge_part(lay: Layout, k: int, folder: Path) -> None:
    compact_part(lay, k, folder / f"part-{k}.npz")


def compact_part(lay: Layout, k: int, out: Path) -> None:
    """Merge partition ``k`` of every window into one aggregate file at ``out``: read from the windows when the
    run is one partition, else from what ``scatter_window`` split out of them beside ``out``."""
    n = max(len(lay.nodes), 1)
    rows: dict[str, list[np.ndarray]] = {}
    for i in range(len(lay.paths)):
        if lay.n_parts == 1:
            got = _window_rows(lay, i)
        else:
            with np.load(out.parent / "scatter" / f"w{i}-p{k}.npz", allow_pickle=False) as data:
                got = {name: wide(data[name]) for name in data.files}
        for name, col in got.items():
            rows.setdefault(name, []).append(col)
    cat = {name: np.concatenate(cols) for name, cols in rows.items()}
    if not cat:  # a run with no windows
        cat = {f"{x}{i}": np.zeros(0, np.float64 if (x, i) in _FLOATS else np.int64)
               for x, width in _GROUPS.items() for i in range(width)}
    edges, uniq = _edges(cat, n)
    agg = WindowAggregate(lay.run, [], [], edges, _heads(cat, uniq, n), _evidence(cat, uniq, n, lay), _stats(cat),
                          lay.cap, lay.observations if k == 0 else 0, _roles(cat, uniq, n), seq=k, tops=_tops(cat, lay),
                          hists=_hists(cat))
    save_window(agg, out)


_GROUPS = {"e": 9, "h": 3, "r": 4, "v": 6, "s": 5, "t": 8, "g": 3}  # row groups and their columns
_FLOATS = {("e", 3), ("e", 4), ("e", 5), ("e", 6), ("e", 7), ("h", 2), ("r", 3), ("v", 5), ("s", 3), ("s", 4),
           ("t", 3), ("t", 7)}


def _segments(key: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order [k] sorting ``key`` stably, starts [u] of each distinct key in that order, the keys [u])."""
    order = np.argsort(key, kind="stable")
    s = key[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]]) if len(s) else np.zeros(0, np.int64)
    return order, starts, s[starts]


def _ends(uniq: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pair, kind = np.divmod(uniq, N_KINDS)
    src, dst = np.divmod(pair, n)
    return src, dst, kind


def _edges(cat: dict[str, np.ndarray], n: int) -> tuple[EdgeColumns, np.ndarray]:
    order, starts, uniq = _segments(cat["e0"])

    def add(i: int) -> np.ndarray:
        return np.add.reduceat(cat[f"e{i}"][order], starts) if len(starts) else cat[f"e{i}"][:0]

    def ext(i: int, ufunc: np.ufunc) -> np.ndarray:
        return ufunc.reduceat(cat[f"e{i}"][order], starts) if len(starts) else cat[f"e{i}"][:0]

    return EdgeColumns(*_ends(uniq, n), add(1), add(2), add(3), add(4), add(5), ext(6, np.minimum),
                       ext(7, np.maximum), add(8)), uniq


def _sub_rows(uniq: np.ndarray, key: np.ndarray, sub: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Rows naming (edge key, sub-index) grouped: (order, starts, their edge rows in ``uniq``, sub slots)."""
    edge = np.searchsorted(uniq, key)
    slots = int(sub.max()) + 1 if len(sub) else 1
    order, starts, pairs = _segments(edge * slots + sub)
    return order, starts, pairs, slots


def _heads(cat: dict[str, np.ndarray], uniq: np.ndarray, n: int) -> HeadColumns:
    order, starts, pairs, slots = _sub_rows(uniq, cat["h0"], cat["h1"])
    sums = np.add.reduceat(cat["h2"][order], starts) if len(starts) else cat["h2"][:0]
    return HeadColumns(*_ends(uniq[pairs // slots], n), pairs % slots, sums)


def _roles(cat: dict[str, np.ndarray], uniq: np.ndarray, n: int) -> RoleColumns:
    order, starts, pairs, slots = _sub_rows(uniq, cat["r0"], cat["r1"])
    count, total = ((np.add.reduceat(cat[c][order], starts) if len(starts) else cat[c][:0]) for c in ("r2", "r3"))
    return RoleColumns(*_ends(uniq[pairs // slots], n), pairs % slots, count, total)


def _evidence(cat: dict[str, np.ndarray], uniq: np.ndarray, n: int, lay: Layout) -> EvidenceColumns:
    group = np.searchsorted(uniq, cat["v0"])
    prompt, src_pos, dst_pos, head, value = (cat[f"v{i}"] for i in range(1, 6))
    keep = top_per_group(group, np.abs(value), tie_key(lay.prompt_rank[prompt], src_pos, dst_pos, head), lay.cap)
    return EvidenceColumns(*_ends(uniq[group[keep]], n), prompt[keep], src_pos[keep], dst_pos[keep], head[keep],
                           value[keep])


def _stats(cat: dict[str, np.ndarray]) -> StatColumns:
    order, starts, node = _segments(cat["s0"])
    if not len(starts):
        return StatColumns(node, cat["s1"][:0], cat["s2"][:0], cat["s3"][:0], cat["s4"][:0])
    n_obs, n_prompts, sum_act = (np.add.reduceat(cat[c][order], starts) for c in ("s1", "s2", "s3"))
    return StatColumns(node, n_obs, n_prompts, sum_act, np.maximum.reduceat(cat["s4"][order], starts))


def _tops(cat: dict[str, np.ndarray], lay: Layout) -> TopColumns:
    """Each node's TOP_ACTIVATIONS strongest activations of the run: act descending, then prompt rank, then
    position (the order ingest.reduce keeps them in)."""
    node, prompt, pos = cat["t0"], cat["t1"], cat["t2"]
    keep = top_per_group(node, cat["t3"], tie_key(lay.prompt_rank[prompt], pos, np.zeros_like(pos),
                                                  np.full_like(pos, -1)), TOP_ACTIVATIONS)
    return TopColumns(*(cat[f"t{i}"][keep] for i in range(8)))


def _hists(cat: dict[str, np.ndarray]) -> HistColumns:
    slots = int(cat["g1"].max()) + 1 if len(cat["g1"]) else 1
    order, starts, pairs = _segments(cat["g0"] * slots + cat["g1"])
    n = np.add.reduceat(cat["g2"][order], starts) if len(starts) else cat["g2"][:0]
    return HistColumns(pairs // slots, pairs % slots, n)


_PHASES = {"scatter": scatter_window, "merge": merge_part}


def _worker(folder: Path, phase: str, items: list[int]) -> None:
    """``python -m catalog.compact FOLDER scatter|merge I...``: that phase for windows or partitions I of the
    layout pickled in FOLDER."""
    with open(folder / "layout.pickle", "rb") as fh:
        lay = pickle.load(fh)  # written by compact() in this folder: the job's own data
    for i in items:
        _PHASES[phase](lay, i, folder)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2], [int(k) for k in sys.argv[3:]])
