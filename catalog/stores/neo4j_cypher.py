"""Read-only Cypher for untrusted callers (docs/catalog.md): a READ session *and* the planner's own
verdict, on what Neo4j will execute rather than on the text (comments, case, whitespace, ``USE`` and
``CALL {}`` cannot hide a command). The query is EXPLAINed first and refused before it runs when its query
type is not 'r', when the plan holds a command operator (SHOW ..., TERMINATE ..., any administration or
schema command: Neo4j reports query type 'r' for SHOW and TERMINATE), LOAD CSV, CALL ... IN TRANSACTIONS,
or a procedure call outside a short allow-list, or when it would run on another database than the
catalog's. What runs has a row cap and a transaction timeout; parameters have a size cap and are passed as
parameters, never formatted into the text.
"""

from __future__ import annotations

import re
from typing import Any

from catalog.schema import JSON
from catalog.stores.base import CypherRefused, StoreError

ALLOWED_PROCEDURES = {"db.labels", "db.relationshipTypes", "db.propertyKeys", "db.schema.visualization",
                      "db.schema.nodeTypeProperties", "db.schema.relTypeProperties"}
# Plan operators of commands (Neo4j names them after the command: ShowTransactions, TerminateTransactions,
# ShowProcedures, CreateIndex, ...) and of CALL {...} IN TRANSACTIONS (TransactionApply, TransactionForeach)
COMMAND_OPERATORS = ("Show", "Terminate", "Create", "Drop", "Alter", "Grant", "Deny", "Revoke", "Start", "Stop",
                     "Enable", "Rename", "Transaction", "LoadCSV")
MAX_PARAMS_BYTES = 1 << 20  # the JSON size of a request's parameters
_COMMENTS = re.compile(r"//[^\n]*|/\*.*?\*/", re.DOTALL)
_PREFIX = re.compile(r"^\s*(EXPLAIN|PROFILE)\b", re.IGNORECASE)


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
        if op.startswith(COMMAND_OPERATORS):
            raise CypherRefused(f"administration, schema and transaction commands are not allowed (the plan runs {op}); "
                                "only read queries run")
        if op.startswith("ProcedureCall"):
            # the signature is in 'Signature' on some Neo4j versions, in 'Details' on 5.26: "db.labels() :: (...)"
            sig = str(args.get("Signature") or args.get("Details") or "")
            name = sig.split("(")[0].strip()
            if name not in ALLOWED_PROCEDURES:
                raise CypherRefused(f"procedure {name or sig!r} is not allowed (allowed: {sorted(ALLOWED_PROCEDURES)})")


def check_params(params: JSON | None) -> None:
    """Refuse parameters over MAX_PARAMS_BYTES (as JSON) before anything is sent."""
    import json

    try:
        size = len(json.dumps(params or {}))
    except (TypeError, ValueError) as exc:
        raise CypherRefused(f"query parameters are not JSON values: {exc}") from None
    if size > MAX_PARAMS_BYTES:
        raise CypherRefused(f"query parameters are {size} bytes as JSON; at most {MAX_PARAMS_BYTES} are accepted")


def run_read_only(driver: Any, database: str, query: str, params: JSON, limit: int, timeout_s: float) -> list[JSON]:
    """EXPLAIN, check, then run in a READ session with ``timeout_s``; at most ``limit`` rows."""
    import neo4j
    from neo4j.exceptions import ClientError, Neo4jError, ServiceUnavailable

    if not query or not _COMMENTS.sub(" ", query).strip():
        raise CypherRefused("empty Cypher query")
    if _PREFIX.match(_COMMENTS.sub(" ", query)):
        raise CypherRefused("send the query without EXPLAIN/PROFILE; the catalog explains it itself")
    check_params(params)
    try:
        with driver.session(database=database, default_access_mode=neo4j.READ_ACCESS) as session:
            summary = session.run("EXPLAIN " + query, params or {}).consume()
            if summary.database not in (None, database):
                raise CypherRefused(f"the query runs on database {summary.database!r}; only the catalog's "
                                    f"({database!r}) can be queried")
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
