"""Copy a catalog between stores (SQLite <-> Neo4j), losslessly, in bounded chunks."""

from __future__ import annotations

from itertools import islice


def _chunks(it, n):
    it = iter(it)
    while chunk := list(islice(it, n)):
        yield chunk


def copy_catalog(src, dst, chunk: int = 20_000) -> dict:
    """Nodes (+stats), edges (+head sums), all evidence, prompts and runs; returns the counts copied."""
    if dst.runs() or next(iter(dst.all_nodes()), None) is not None:
        from catalog.stores.base import StoreError

        raise StoreError(f"export target {dst.url} is not empty; export into an empty catalog")
    nodes = list(src.all_nodes())
    for part in _chunks(nodes, chunk):
        dst.import_rows([n for n, _ in part], [s for _, s in part if s is not None], [], [], [], [])
    counts = {"nodes": len(nodes), "edges": 0, "evidence": 0, "prompts": 0, "runs": 0}
    for part in _chunks(src.all_edges(), chunk):
        dst.import_rows([], [], part, [], [], [])
        counts["edges"] += len(part)
    for part in _chunks(src.all_evidence(), chunk):
        dst.import_rows([], [], [], part, [], [])
        counts["evidence"] += len(part)
    for part in _chunks(src.all_prompts(), chunk):
        dst.import_rows([], [], [], [], part, [])
        counts["prompts"] += len(part)
    runs = src.runs()
    dst.import_rows([], [], [], [], [], runs)
    counts["runs"] = len(runs)
    return counts
