"""The production store: Neo4j over Bolt with the official driver.

Graph model: (:Node {nid, uid, model, sae, ref, kind, layer, index}) — features also carry the label
:Feature; ``nid`` is the node dictionary's integer id — joined by one [:EDGE {run, key, kind, n_prompts,
n_obs, sum, sumsq, sum_abs, min, max, n_pos, head_sums, role_n, role_abs, ev_prompt, ev_src_pos, ev_dst_pos,
ev_head, ev_value}] per run that observed the edge (``run`` = the run id; ``key`` =
catalog.schema.edge_key of the two nids and the kind, the same in every run; head_sums: a list indexed
by head; role_n/role_abs: count and sum of |value| of its observations per positional role, lists
indexed by the role's code in catalog.schema.ROLES; ev_*: the run's top-N evidence of the edge as
parallel lists, best first: see catalog.stores.neo4j_evidence). A feature's activation statistics
are (:Stats {nid, run, n_obs, n_prompts, sum_act, max_act}), one per run; prompts are (:Prompt {uid,
run, ..., evidence_edges}) with the keys of the edges whose evidence took one of its observations;
runs (:Run). Reads sum over the selected runs' relationships (docs/catalog.md has the Cypher).
One window is one transaction: every query in it UNWINDs parallel arrays of primitives (CHUNK rows
each), nodes are found by their indexed integer nid, edges by their indexed integer key, or, while a
writer is its run's only one, from its own copy of what it stored (catalog.stores.neo4j_edges).

The driver and schema: neo4j_connection.py; every read: neo4j_read.py; every write: neo4j_write.py, but
publishing a compacted run (insert-only): neo4j_publish.py.
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlparse

from catalog.stores.base import CypherRefused
from catalog.stores.neo4j_connection import SCHEMA_VERSION
from catalog.stores.neo4j_publish import Neo4jPublish
from catalog.stores.neo4j_write import CREATE_EDGES, FIND_EDGES, UPDATE_EDGES

__all__ = ["CREATE_EDGES", "FIND_EDGES", "SCHEMA_VERSION", "UPDATE_EDGES", "CypherRefused", "Neo4jStore", "open_url"]


class Neo4jStore(Neo4jPublish):
    """The catalog in a Neo4j database: the Store protocol (catalog/stores/base.py), reads and writes."""


def open_url(url: str, evidence_per_edge: int | None, create: bool) -> Neo4jStore:
    """``neo4j://[user:password@]host[:port][/database]`` (or bolt://, +s, +ssc); credentials may
    also come from NEO4J_USER / NEO4J_PASSWORD, the database from NEO4J_DATABASE."""
    parsed = urlparse(url)
    user = unquote(parsed.username) if parsed.username else os.environ.get("NEO4J_USER")
    password = unquote(parsed.password) if parsed.password else os.environ.get("NEO4J_PASSWORD")
    database = parsed.path.strip("/") or os.environ.get("NEO4J_DATABASE", "neo4j")
    bolt = f"{parsed.scheme}://{parsed.hostname or '127.0.0.1'}:{parsed.port or 7687}"
    return Neo4jStore(bolt, user, password, database, url=url, evidence_per_edge=evidence_per_edge)
