"""Read-only Cypher for untrusted callers (docs/catalog.md): a READ session *and* the planner's own
verdict, on what Neo4j will execute rather than on the text (comments, case, whitespace, ``USE`` and
``CALL {}`` cannot hide a command). The query is EXPLAINed first and refused before it runs when its query
type is not 'r', when the plan holds a command operator (SHOW ..., TERMINATE ..., any administration or
schema command: Neo4j reports query type 'r' for SHOW and TERMINATE), LOAD CSV, CALL ... IN TRANSACTIONS,
or a procedure call outside a short allow-list, or when it would run on another database than the
catalog's. What runs has a row cap and a transaction timeout; parameters have a size cap and are passed as
parameters, never formatted into the text.

Neo4j checks a timeout only between rows and store reads, so one expression over a huge list runs to its
end (or out of heap) whatever the timeout says. The text's ``range()`` calls are bounded here, before
anything runs (the one function that makes a long list from short input); whatever still runs away is
bounded inside the server: the launcher's RunawayWatchdog and -XX:+ExitOnOutOfMemoryError end the server
process and its supervisor starts it again (docs/catalog.md), and the caller gets a 503.
"""

from __future__ import annotations

import re
from typing import Any

from catalog.schema import JSON
from catalog.stores.base import CypherRefused, StoreUnavailable

ALLOWED_PROCEDURES = {"db.labels", "db.relationshipTypes", "db.propertyKeys", "db.schema.visualization",
                      "db.schema.nodeTypeProperties", "db.schema.relTypeProperties"}
# Plan operators of commands (Neo4j names them after the command: ShowTransactions, TerminateTransactions,
# ShowProcedures, CreateIndex, ...) and of CALL {...} IN TRANSACTIONS (TransactionApply, TransactionForeach)
COMMAND_OPERATORS = ("Show", "Terminate", "Create", "Drop", "Alter", "Grant", "Deny", "Revoke", "Start", "Stop",
                     "Enable", "Rename", "Transaction", "LoadCSV")
MAX_PARAMS_BYTES = 1 << 20  # the JSON size of a request's parameters
_COMMENTS = re.compile(r"//[^\n]*|/\*.*?\*/", re.DOTALL)
_PREFIX = re.compile(r"^\s*(EXPLAIN|PROFILE)\b", re.IGNORECASE)
MAX_RANGE_ELEMENTS = 1_000_000  # the product over a query's range() calls (they may nest)
# string literals, quoted names and comments, in one pass: "//" inside a string is not a comment
_LEXEMES = re.compile(r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|`([^`]*)`|//[^\n]*|/\*.*?\*/""", re.DOTALL)
_RANGE_CALL = re.compile(r"(?<![\w.$])range\s*\(", re.IGNORECASE)
_INTEGER = re.compile(r"^[-+]?\s*\d+$")
_PARAM = re.compile(r"^\$(\w+)$")
# range(0, size(list) - 1), the idiom for walking parallel lists: bounded by a list that already exists
_SIZE_OF = re.compile(r"^size\s*\(.*\)\s*([-+]\s*\d+)?$", re.IGNORECASE | re.DOTALL)


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


def _code_only(query: str) -> str:
    """The query with string literals emptied, comments blanked and quoted names unquoted."""
    def keep(m: re.Match[str]) -> str:
        text = m.group(0)
        if text.startswith("`"):  # a quoted name: its characters cannot open or close a call
            return re.sub(r"\W", "_", m.group(1))
        return "''" if text[0] in "'\"" else " "
    return _LEXEMES.sub(keep, query)


def _arguments(text: str, start: int) -> tuple[list[str], int]:
    """The top-level comma-separated arguments of the call whose '(' is at ``start``, and the index after ')'."""
    depth, begin = 0, start + 1
    args: list[str] = []
    for i in range(start, len(text)):
        ch = text[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                return [*args, text[begin:i].strip()], i + 1
        elif ch == "," and depth == 1:
            args.append(text[begin:i].strip())
            begin = i + 1
    raise CypherRefused("unbalanced parentheses in the query")


def check_ranges(query: str, params: JSON | None) -> None:
    """Refuse a query whose range() calls could make more than MAX_RANGE_ELEMENTS values, before it runs.

    A bound is an integer literal, an integer parameter, or ``size(...) ± n`` (n at most MAX_RANGE_ELEMENTS).
    A range that ends at ``size(...)`` is as long as a list that already exists; any other is bounded by its
    literals, a ``size(...)`` start or step read as its smallest value (0 + n, and 1). The product of those
    lengths is bounded, since ranges may nest: [a IN range(..) | [b IN range(..) | ...]]."""
    code, product = _code_only(query), 1
    for call in _RANGE_CALL.finditer(code):
        args, _ = _arguments(code, call.end() - 1)
        values: list[int] = []
        sized: list[bool] = []
        for arg in args:
            param = _PARAM.match(arg)
            value = (params or {}).get(param.group(1)) if param else None
            size_of = _SIZE_OF.match(arg)
            if _INTEGER.match(arg):
                values.append(int(arg.replace(" ", "")))
            elif param and isinstance(value, int) and not isinstance(value, bool):
                values.append(value)
            elif size_of and abs(offset := int((size_of.group(1) or "0").replace(" ", ""))) <= MAX_RANGE_ELEMENTS:
                values.append(offset)
            else:
                raise CypherRefused(f"range() bound {arg!r} is not allowed: the endpoint takes integer literals, "
                                    f"integer parameters or size(list) ± n (n up to {MAX_RANGE_ELEMENTS:,}) as "
                                    f"bounds, so that a query's lists stay under {MAX_RANGE_ELEMENTS:,} values")
            sized.append(bool(size_of) and not _INTEGER.match(arg) and not param)
        if len(values) not in (2, 3) or sized[1]:
            continue  # wrong arity is Neo4j's to refuse; a range up to size(...) is as long as a stored list
        first, last, step = (*values, 1) if len(values) == 2 else values
        step = 1 if len(values) == 3 and sized[2] else step
        product *= max(0, (last - first) // step + 1) if step else 1
        if product > MAX_RANGE_ELEMENTS:
            raise CypherRefused(f"the query's range() calls span {product:,} values; at most {MAX_RANGE_ELEMENTS:,} "
                                "(one expression over a longer list cannot be stopped by the time limit)")


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
    from neo4j.exceptions import ClientError, Neo4jError, ServiceUnavailable, SessionExpired

    if not query or not _COMMENTS.sub(" ", query).strip():
        raise CypherRefused("empty Cypher query")
    if _PREFIX.match(_COMMENTS.sub(" ", query)):
        raise CypherRefused("send the query without EXPLAIN/PROFILE; the catalog explains it itself")
    check_params(params)
    check_ranges(query, params)
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
    except (ServiceUnavailable, SessionExpired) as exc:
        raise StoreUnavailable(f"Neo4j stopped answering ({exc}); a query that outlives its time limit or fills "
                               "the server's heap restarts the server") from None
    except ClientError as exc:
        code = exc.code or ""
        if "Timeout" in code or "TransactionTimedOut" in code:
            raise CypherRefused(f"query ran past the {timeout_s:g} s limit and was stopped") from None
        if "AccessMode" in code or "Forbidden" in code or "WriteOnReadOnly" in code:
            raise CypherRefused(f"refused by Neo4j (read-only session): {exc.message}") from None
        raise CypherRefused(f"Cypher error ({code}): {exc.message}") from None
    except Neo4jError as exc:
        raise CypherRefused(f"Cypher error ({exc.code}): {exc.message}") from None
