"""The Store protocol and the URL that picks an implementation.

``sqlite:///path/to/catalog.db`` (the default, embedded) or ``neo4j://host:port[/database]`` /
``bolt://...`` (credentials from the URL or NEO4J_USER / NEO4J_PASSWORD).
Both implementations pass the same conformance suite (tests/test_store_conformance.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlparse

from catalog.aggregate import WindowAggregate
from catalog.schema import JSON, EdgeStats, Evidence, NodeInfo, NodeStats, Prompt, Run, TopActivation

DEFAULT_URL = "sqlite:///catalog.db"
ORDERS = ("sum", "mean", "count", "abs")


class StoreError(Exception):
    """A store refused an operation; the message says why."""


class StoreUnavailable(StoreError):
    """The store cannot be reached (server down, file not writable)."""


class CypherUnsupported(StoreError):
    """Cypher was asked of a store that has no Cypher engine."""


class CypherRefused(StoreError):
    """A Cypher query that is not read-only, or otherwise not allowed."""


class NotFound(StoreError):
    """A well-formed reference that names nothing in this catalog."""


class Ambiguous(StoreError):
    """A reference that names nodes of several models/releases; pass model= to choose."""


@dataclass
class EdgeQuery:
    """Filters and ordering for upstream/downstream; validated by catalog.queries."""

    edge_kinds: tuple[str, ...] | None = None
    node_kinds: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    min_count: int = 0
    order: str = "abs"
    limit: int = 20
    offset: int = 0
    runs: tuple[str, ...] | None = None  # the runs summed over (None: every run)


Runs = Sequence[str] | None  # run ids whose rows a read sums over; None: every run


class Store(Protocol):
    url: str
    evidence_per_edge: int | None

    def write_window(self, agg: WindowAggregate) -> bool:
        """Store whole prompts of run ``agg.run`` (started with start_run) and their aggregates in one
        all-or-nothing transaction, adding into that run's edges and statistics and keeping the
        top-N evidence per edge and run; False (nothing written) if every prompt was stored already."""

    def publish_run(self, run: str, prompts: list[Prompt], nodes: list[NodeInfo],
                    parts: Iterable[WindowAggregate]) -> bool:
        """Write a compacted run, each edge once (catalog.publish); False if its prompts are stored already."""

    def import_window(self, agg: WindowAggregate) -> None:
        """Load rows exported from another catalog into this (empty) one, as they are."""

    def import_runs(self, runs: list[Run]) -> None: ...

    def done_prompts(self, run: str) -> set[str]: ...
    def start_run(self, run_id: str, manifest: JSON, resume: bool) -> None: ...
    def finish_run(self, run_id: str, status: str, updates: JSON) -> None: ...
    def runs(self) -> list[Run]: ...
    def run(self, run_id: str) -> Run | None: ...
    def find_nodes(self, ref: str, model: str | None = None) -> list[NodeInfo]: ...
    # Reads sum each edge's (and node's) rows over the runs named; catalog.runs chooses them.
    def node(self, uid: str, runs: Runs = None) -> tuple[NodeInfo, NodeStats | None] | None: ...
    def neighbours(self, uid: str, direction: str, q: EdgeQuery) -> list[tuple[NodeInfo, EdgeStats]]: ...
    def resolve_neighbours(self, ref: str, model: str | None, direction: str,
                           q: EdgeQuery) -> tuple[list[NodeInfo], list[tuple[NodeInfo, EdgeStats]]]:
        """The nodes ``find_nodes(ref, model)`` finds and, when exactly one, its ``neighbours``."""
    def edges_between(self, src: str, dst: str, runs: Runs = None) -> list[EdgeStats]: ...
    # What a feature fires on: the stored top activations of the runs named, in no order (a run written
    # window by window keeps each window's: catalog.queries orders them and keeps the top), and the
    # histogram {bin code: activations} summed over those runs (bins: catalog.schema.HIST_SHIFT).
    def activations(self, uid: str, runs: Runs = None) -> tuple[list[TopActivation], dict[int, int]]: ...
    def all_activations(self, runs: Runs = None) -> Iterator[tuple[str, list[TopActivation], dict[int, int]]]:
        """``activations`` of every node that has any, by node uid."""
    def token_activations(self, token: str, runs: Runs, max_nodes: int) -> list[tuple[NodeInfo, list[TopActivation]]]:
        """The ``max_nodes`` features with a stored top activation on ``token`` (strongest such activation
        first, then uid), each with all its stored top activations in the runs named."""
    def head_pairs(self, model: str, layer: int, head: int, limit: int,
                   runs: Runs = None) -> list[tuple[str, str, float]]:
        """The qk edges of one head (query-side uid, key-side uid, that head's summed share), largest |share| first."""
    def evidence(self, src: str, dst: str, kind: str, limit: int, runs: Runs = None) -> list[Evidence]: ...
    def evidence_of_edges(self, edges: Sequence[tuple[str, str, str]], limit: int,
                          runs: Runs = None) -> list[list[Evidence]]:
        """``evidence`` of each (src, dst, kind), in order: what mining reads for hundreds of edges at once."""
    def prompt(self, uid: str) -> Prompt | None: ...
    def prompts(self, uids: list[str]) -> dict[str, Prompt]: ...
    def prompt_evidence(self, uid: str, limit: int, qk: bool = False) -> list[Evidence]:
        """A prompt's stored RDFA observations, strongest first; with ``qk`` its QK attribution terms
        instead (q_in, k_in, qk: another quantity, attention-score logits)."""
    def top_nodes(self, node_kind: str | None, by: str, limit: int, layer: int | None = None,
                  runs: Runs = None) -> list[tuple[NodeInfo, float, int]]: ...
    def counts(self) -> dict[str, int]: ...  # runs, prompts, nodes, edges (rows: one per edge and run), evidence
    def prompt_count(self, run: str) -> int: ...
    def all_edges(self, edge_kinds: tuple[str, ...] | None = None, runs: Runs = None) -> Iterator[EdgeStats]: ...
    def all_nodes(self, runs: Runs = None) -> Iterator[tuple[NodeInfo, NodeStats | None]]: ...
    def all_prompts(self) -> Iterator[Prompt]: ...
    def all_evidence(self, runs: Runs = None) -> Iterator[Evidence]: ...
    def cypher(self, query: str, params: JSON, limit: int, timeout_s: float) -> list[JSON]: ...
    def drop_run(self, run_id: str) -> None: ...  # the run and every row it holds (catalog.publish_every)
    # Stored mining results (catalog.mined): one JSON text per selection key, with the fingerprint of
    # the catalog state it was mined from and a stamp naming the result (readers cache it by stamp).
    def put_mined(self, key: str, fingerprint: str, stamp: str, result: str) -> None: ...
    def get_mined(self, key: str) -> tuple[str, str, str] | None:
        """(fingerprint, stamp, result) stored under ``key``, or None."""
    def mined_stamp(self, key: str) -> tuple[str, str] | None:
        """(fingerprint, stamp) stored under ``key``, or None: without the result's text."""
    def all_mined(self) -> Iterator[tuple[str, str, str, str]]: ...  # (key, fingerprint, stamp, result), by key
    def close(self) -> None: ...


# URL scheme -> "module:function" that opens it, imported on use (the Neo4j driver stays unloaded for
# SQLite users). A new store registers its schemes here; each opener takes (url, evidence_per_edge, create).
STORE_OPENERS: dict[str, str] = {
    "sqlite": "catalog.stores.sqlite:open_url",
    **{scheme: "catalog.stores.neo4j:open_url"
       for scheme in ("neo4j", "bolt", "neo4j+s", "bolt+s", "neo4j+ssc", "bolt+ssc")},
    "neo4j-import": "catalog.stores.neo4j_import:open_url",
}


def open_store(url: str | None = None, *, evidence_per_edge: int | None = 8, create: bool = True) -> Store:
    """Open the store named by ``url`` through the opener its scheme is registered with."""
    url = url or DEFAULT_URL
    opener = STORE_OPENERS.get(urlparse(url).scheme)
    if opener is None:
        raise StoreError(f"store URL {url!r} not understood: use sqlite:///path/to/catalog.db or "
                         "neo4j://host:port (bolt:// also works), or neo4j-import:FOLDER (files for Neo4j's offline importer)")
    module, _, function = opener.partition(":")
    opened: Store = getattr(importlib.import_module(module), function)(url, evidence_per_edge, create)
    return opened
