"""The Neo4j catalog over Bolt: the driver, the schema (constraints and indexes, created by whichever process
opens an empty database first) and its format check. Reads are in neo4j_read.py, writes in neo4j_write.py;
catalog/stores/neo4j.py puts them together."""

from __future__ import annotations

from typing import Any

from catalog.evidence_floor import EvidenceFloor
from catalog.stores.base import Runs, StoreError, StoreUnavailable
from catalog.stores.neo4j_edges import RunEdges

Tx = Any  # a neo4j ManagedTransaction (typed loosely: the driver's own hints are incomplete)

SCHEMA = [
    "CREATE CONSTRAINT node_uid IF NOT EXISTS FOR (n:Node) REQUIRE n.uid IS UNIQUE",
    "CREATE CONSTRAINT node_nid IF NOT EXISTS FOR (n:Node) REQUIRE n.nid IS UNIQUE",
    "CREATE CONSTRAINT prompt_uid IF NOT EXISTS FOR (p:Prompt) REQUIRE p.uid IS UNIQUE",
    "CREATE CONSTRAINT run_id IF NOT EXISTS FOR (r:Run) REQUIRE r.run_id IS UNIQUE",
    "CREATE CONSTRAINT dictionary_name IF NOT EXISTS FOR (d:Dictionary) REQUIRE d.name IS UNIQUE",
    "CREATE CONSTRAINT mined_key IF NOT EXISTS FOR (m:Mined) REQUIRE m.key IS UNIQUE",
    "CREATE INDEX node_ref IF NOT EXISTS FOR (n:Node) ON (n.ref)",
    "CREATE INDEX prompt_run IF NOT EXISTS FOR (p:Prompt) ON (p.run)",
    "CREATE INDEX stats_node_run IF NOT EXISTS FOR (s:Stats) ON (s.nid, s.run)",
    "CREATE INDEX stats_node IF NOT EXISTS FOR (s:Stats) ON (s.nid)",
    "CREATE INDEX edge_key IF NOT EXISTS FOR ()-[r:EDGE]-() ON (r.key)",
    # a feature's top tokens as one string (catalog.feature_acts.token_text): search by token is a CONTAINS on it
    "CREATE TEXT INDEX stats_tokens IF NOT EXISTS FOR (s:Stats) ON (s.top_tokens)",
]

# 2: edges, statistics and evidence per run; 3: six edge kinds (QK) in the edge keys, roles; 4: evidence on the
# edges; 5: seven edge kinds (mlp_in, transcoders) in the edge keys
SCHEMA_VERSION = 5


class Neo4jConnection:
    """A driver to one database of a Neo4j server, its catalog schema in place and of this version."""

    def __init__(self, bolt: str, user: str | None, password: str | None, database: str, *, url: str,
                 evidence_per_edge: int | None):
        import neo4j

        self.url, self.database, self.evidence_per_edge = url, database, evidence_per_edge
        self._ids: dict[str, int] = {}  # node uid -> dictionary id, for nodes committed by this process
        self._floors: dict[str, EvidenceFloor] = {}  # per run
        self._stored_evidence: tuple[Any, ...] | None = None  # run and EvidenceFloor.update's rows, of the open write
        # per run: this writer's copy of its stored edges (None: dropped, edges are looked up); see neo4j_edges
        self._run_edges: dict[str, RunEdges | None] = {}
        self._new_edges: tuple[Any, ...] | None = None  # (run, RunEdges.after's arguments) of the open write
        auth = (user, password or "") if user else None
        try:
            # notifications off: the server warns about absent property keys on every query of an empty catalog
            self.driver = neo4j.GraphDatabase.driver(bolt, auth=auth, connection_timeout=10,
                                                     notifications_min_severity="OFF")
            self.driver.verify_connectivity()
            for stmt in SCHEMA:
                _create_schema(self.driver, stmt, database)
            found = self.driver.execute_query("MATCH (d:Dictionary {name: 'nodes'}) RETURN d.schema",
                                              database_=database).records
        except Exception as exc:  # driver raises ServiceUnavailable, AuthError, ...; all mean "cannot use it"
            raise StoreUnavailable(f"cannot reach Neo4j at {bolt} (database {database}): {type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        if found and found[0][0] != SCHEMA_VERSION:
            self.driver.close()
            raise StoreError(f"database {database} at {bolt} holds a catalog of format {found[0][0]} (this version "
                             f"reads {SCHEMA_VERSION}); ingest its corpora again into an empty database")

    def close(self) -> None:
        self.driver.close()

    def _read(self, query: str, **params: Any) -> list[Any]:
        """One read in an auto-commit transaction: one round trip (execute_query's managed transaction
        adds a COMMIT; measured 2.0 -> 1.4 ms a query, most of an API request on this store)."""
        with self.driver.session(database=self.database, default_access_mode="READ") as session:
            return list(session.run(query, params))


def _create_schema(driver: Any, stmt: str, database: str) -> None:
    """``IF NOT EXISTS`` is no guard against a second process creating the same rule at the same time
    (shards opening an empty database together): Neo4j then answers EquivalentSchemaRuleAlreadyExists,
    which means the rule is there, as wanted."""
    import neo4j

    try:
        driver.execute_query(stmt, database_=database)
    except neo4j.exceptions.ClientError as exc:
        if exc.code != "Neo.ClientError.Schema.EquivalentSchemaRuleAlreadyExists":
            raise

def _runs(runs: Runs) -> list[str] | None:
    return None if runs is None else list(runs)
