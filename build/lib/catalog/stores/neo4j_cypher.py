"""Read-only Cypher for untrusted callers (docs/catalog.md): a READ session *and* the planner's own
verdict. The query is EXPLAINed first: anything whose query type is not 'r', any LOAD CSV, and
any procedure call outside a short allow-list is refused before it runs; what runs has a row cap
and a transaction timeout. Parameters are passed as parameters, never formatted into the text.
"""

from __future__ import annotations

import re
from typing import Any

from catalog.schema import JSON
from catalog.stores.base import CypherRefused, StoreError

ALLOWED_PROCEDURES = {"db.labels", "db.relationshipTypes", "db.propertyKeys", "db.schema.visualization",
                      "db.schema.nodeTypeProperties", "db.schema.relTypeProperties"}
_PREFIX = re.compile(r"^\s*(EXPLAIN|PROFILE)\b", re.IGNORECASE)
_ADMIN = re.compile(r"^\s*(USE|SHOW|CREATE|DROP|ALTER|GRANT|DENY|REVOKE|START|STOP|TERMINATE|ENABLE|RENAME)\b",
                    re.IGNORECASE)


def _operators(plan: Any) -> list[tuple[str, JSON]]:
    out: list[tuple[str, JSON]] = []
    stack = [plan]
    while stack:
        node = stack.pop()
        if not node:
            continue
        op = node.get("operatorType", "") if isinstance(node, dict) else getattr(node, "operator_type", "")
        args = node.get("args", {}) if isinstance(node, dict) else getattr(node, "arguments", {})
        out.append((op.split("@")[0], args or {}))
        stack.extend(node.get("children", []) if isinstance(node, dict) else getattr(node, "children", []))
    return out


def check_plan(query_type: str | None, plan: Any) -> None:
    """Raise CypherRefused unless the planner says read-only and the plan has no forbidden operator."""
    if query_type != "r":
        what = {"rw": "reads and writes", "w": "writes", "s": "changes the schema"}.get(query_type or "", "is not a read")
        raise CypherRefused(f"only read-only Cypher is allowed; this query {what} (query type {query_type!r})")
    for op, args in _operators(plan):
        if op.startswith("LoadCSV"):
            raise CypherRefused("LOAD CSV is not allowed through the catalog's Cypher endpoint")
        if op.startswith("ProcedureCall"):
            sig = str(args.get("Signature", ""))
            name = sig.split("(")[0].strip()
            if name not in ALLOWED_PROCEDURES:
                raise CypherRefused(f"procedure {name or sig!r} is not allowed (allowed: {sorted(ALLOWED_PROCEDURES)})")


def run_read_only(driver: Any, database: str, query: str, params: JSON, limit: int, timeout_s: float) -> list[JSON]:
    """EXPLAIN, check, then run in a READ session with ``timeout_s``; at most ``limit`` rows."""
    import neo4j
    from neo4j.exceptions import ClientError, Neo4jError, ServiceUnavailable

    if not query or not query.strip():
        raise CypherRefused("empty Cypher query")
    if _PREFIX.match(query):
        raise CypherRefused("send the query without EXPLAIN/PROFILE; the catalog explains it itself")
    if _ADMIN.match(query):
        raise CypherRefused("administration and schema commands are not allowed; only read queries run")
    try:
        with driver.session(database=database, default_access_mode=neo4j.READ_ACCESS) as session:
            summary = session.run("EXPLAIN " + query, params or {}).consume()
            check_plan(summary.query_type, summary.plan)
            result = session.run(neo4j.Query(query, timeout=timeout_s), params or {})
            rows: list[JSON] = []
            for record in result:
                if len(rows) >= limit:
                    break
                rows.append(record.data())
            result.consume()
            return rows
    except CypherRefused:
        raise
    except (OverflowError, TypeError, ValueError) as exc:  # the driver cannot pack a parameter
        raise CypherRefused(f"query parameters cannot be sent to Neo4j: {exc}") from None
    except ServiceUnavailable as exc:
        raise StoreError(f"Neo4j unavailable: {exc}") from None
    except ClientError as exc:
        code = exc.code or ""
        if "Timeout" in code or "TransactionTimedOut" in code:
            raise CypherRefused(f"query ran past the {timeout_s:g} s limit and was stopped") from None
        if "AccessMode" in code or "Forbidden" in code or "WriteOnReadOnly" in code:
            raise CypherRefused(f"refused by Neo4j (read-only session): {exc.message}") from None
        raise CypherRefused(f"Cypher error ({code}): {exc.message}") from None
    except Neo4jError as exc:
        raise CypherRefused(f"Cypher error ({exc.code}): {exc.message}") from None
