"""Compaction: a run's spooled windows merged into its aggregate, each edge once.

Windows name nodes and prompts by their rows in the window; compaction maps them to the run's (``Layout``):
windows in corpus order, prompts in that order, nodes in order of first appearance. A run edge's key is
``(src * n_nodes + dst) * n_kinds + kind`` over the run's node rows. Edges are split into ``n_parts``
partitions by a hash of that key; a partition reads its rows out of every window (one window in memory at a
time), sorts them by key and reduces them exactly as the device reduction does (``ingest.reduce``): counts
and float64 sums add, min and max take theirs, head sums and role counts add per (edge, head) and (edge,
role), evidence keeps each edge's top N by the total order of ``catalog.evidence_rank``. So a partition
holds about 1/n_parts of the spool's rows: the partition count follows the spool's size and the memory
allowed (``mem``), and partitions merge in parallel processes. Each partition is saved as a window file
(``catalog.spool.save_window``) whose rows name the layout's nodes and prompts; a killed compaction
keeps the partitions it finished. No torch here.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from catalog.aggregate import (
    EdgeColumns,
    EvidenceColumns,
    HeadColumns,
    RoleColumns,
    StatColumns,
    WindowAggregate,
)
from catalog.evidence_rank import tie_key, top_per_group
from catalog.schema import EDGE_KINDS, NodeInfo, Prompt
from catalog.spool import load_window, save_window, window_meta
from catalog.stores.base import StoreError

N_KINDS = len(EDGE_KINDS)
DEFAULT_MEM = 2 << 30  # bytes a compaction may hold; the spool's bytes times GROWTH are split to fit it
GROWTH = 4  # a partition's rows in memory (concatenated, sorted, reduced) against their bytes on disk
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
    digest: str  # names the set of windows (a resumed compaction finds its finished partitions by it)


def layout(run: str, paths: list[Path], mem: int = DEFAULT_MEM) -> Layout:
    """Read the windows' prompts and nodes (not their columns) and lay out the run."""
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
        for n in meta["nodes"]:
            if n["uid"] not in node_at:
                node_at[n["uid"]] = len(nodes)
                nodes.append(NodeInfo(**n))
        node_rows.append(np.array([node_at[n["uid"]] for n in meta["nodes"]], np.int64))
        for p in meta["prompts"]:
            if p["uid"] in prompt_at:
                raise StoreError(f"prompt {p['uid']!r} is in two spooled windows of run {run!r} ({path.name} and "
                                 "another): was the spool written by two jobs with different --batch-size?")
            prompt_at[p["uid"]] = len(prompts)
            prompts.append(Prompt(**p))
        prompt_rows.append(np.array([prompt_at[p["uid"]] for p in meta["prompts"]], np.int64))
    rank = np.empty(len(prompts), np.int64)
    rank[np.argsort(np.array([p.uid for p in prompts], dtype=object), kind="stable")] = np.arange(len(prompts))
    size = sum(p.stat().st_size for p in paths)
    digest = hashlib.blake2b("\n".join(sorted(p.name for p in paths)).encode(), digest_size=8).hexdigest()
    return Layout(run, [p for _, p in metas], prompts, nodes, node_rows, prompt_rows, rank,
                  next(iter(caps)) if caps else None, sum(m["observations"] for m, _ in metas),
                  max(1, math.ceil(size * GROWTH / mem)), digest)


def compact(lay: Layout, folder: Path, workers: int = 1) -> list[Path]:
    """Compact ``lay``'s windows into ``folder/part-K.npz`` (K < lay.n_parts), keeping partitions a killed
    compaction finished; returns their paths. ``workers`` > 1 merges partitions in that many processes."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"part-{k}.npz" for k in range(lay.n_parts)]
    todo = [k for k, path in enumerate(paths) if not path.exists()]
    if workers > 1 and len(todo) > 1:
        # fresh interpreters (`python -m catalog.compact`), not multiprocessing: a fork would copy the job's torch
        # threads mid-flight, and spawn re-runs the caller's main script, which a notebook or a script without a
        # __main__ guard does not survive
        with open(folder / "layout.pickle", "wb") as fh:
            pickle.dump(lay, fh)
        shares = [todo[i::workers] for i in range(min(workers, len(todo)))]
        procs = [subprocess.Popen([sys.executable, "-m", "catalog.compact", str(folder), *map(str, share)],
                                  stderr=subprocess.PIPE, text=True) for share in shares]
        errors = [p.communicate()[1] for p in procs]
        for proc, err in zip(procs, errors, strict=True):
            if proc.returncode:
                raise StoreError(f"a compaction process failed (exit {proc.returncode}): "
                                 f"{(err.strip().splitlines() or ['no message'])[-1]}")
    else:
        for k in todo:
            compact_part(lay, k, paths[k])
    return paths


def load_part(lay: Layout, path: Path) -> WindowAggregate:
    """A compacted partition with the run's prompts and nodes that its rows name."""
    part = load_window(path)
    part.run, part.prompts, part.nodes = lay.run, lay.prompts, lay.nodes
    return part


def part_of(key: np.ndarray, n_parts: int) -> np.ndarray:
    """[k] the partition of each int64 key in [0, n_parts)."""
    with np.errstate(over="ignore"):
        mixed = key.astype(np.uint64) * _HASH
    return ((mixed >> np.uint64(32)) % np.uint64(n_parts)).astype(np.int64)


def compact_part(lay: Layout, k: int, out: Path) -> None:
    """Merge partition ``k`` of every window into one aggregate file at ``out``."""
    n = max(len(lay.nodes), 1)
    rows: dict[str, list[np.ndarray]] = {}

    def keep(name: str, *cols: np.ndarray) -> None:
        for i, col in enumerate(cols):
            rows.setdefault(f"{name}{i}", []).append(col)

    for path, nodes, prompts in zip(lay.paths, lay.node_rows, lay.prompt_rows, strict=True):
        w = load_window(path)
        e, h, r, v, s = w.edges, w.heads, w.roles, w.evidence, w.stats
        key = (nodes[e.src] * n + nodes[e.dst]) * N_KINDS + e.kind
        at = part_of(key, lay.n_parts) == k
        keep("e", key[at], *(c[at] for c in (e.n_prompts, e.n_obs, e.sum, e.sumsq, e.sum_abs, e.min, e.max, e.n_pos)))
        key = (nodes[h.src] * n + nodes[h.dst]) * N_KINDS + h.kind
        at = part_of(key, lay.n_parts) == k
        keep("h", key[at], h.head[at], h.sum[at])
        key = (nodes[r.src] * n + nodes[r.dst]) * N_KINDS + r.kind
        at = part_of(key, lay.n_parts) == k
        keep("r", key[at], r.role[at], r.n[at], r.sum_abs[at])
        key = (nodes[v.src] * n + nodes[v.dst]) * N_KINDS + v.kind
        at = part_of(key, lay.n_parts) == k
        keep("v", key[at], prompts[v.prompt[at]], v.src_pos[at], v.dst_pos[at], v.head[at], v.value[at])
        node = nodes[s.node]
        at = part_of(node, lay.n_parts) == k
        keep("s", node[at], s.n_obs[at], s.n_prompts[at], s.sum_act[at], s.max_act[at])
        del w
    cat = {name: np.concatenate(cols) for name, cols in rows.items()}
    if not cat:  # a run with no windows
        cat = {f"{x}{i}": np.zeros(0, np.float64 if (x, i) in _FLOATS else np.int64)
               for x, width in (("e", 9), ("h", 3), ("r", 4), ("v", 6), ("s", 5)) for i in range(width)}
    edges, uniq = _edges(cat, n)
    agg = WindowAggregate(lay.run, [], [], edges, _heads(cat, uniq, n), _evidence(cat, uniq, n, lay), _stats(cat),
                          lay.cap, lay.observations if k == 0 else 0, _roles(cat, uniq, n), seq=k)
    save_window(agg, out)


_FLOATS = {("e", 3), ("e", 4), ("e", 5), ("e", 6), ("e", 7), ("h", 2), ("r", 3), ("v", 5), ("s", 3), ("s", 4)}


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


def _worker(folder: Path, parts: list[int]) -> None:
    """``python -m catalog.compact FOLDER K...``: compact partitions K of the layout pickled in FOLDER."""
    with open(folder / "layout.pickle", "rb") as fh:
        lay = pickle.load(fh)  # written by compact() in this folder: the job's own data
    for k in parts:
        compact_part(lay, k, folder / f"part-{k}.npz")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), [int(k) for k in sys.argv[2:]])
