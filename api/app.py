"""FastAPI app factory: ``create_app(Settings(...))``. The store opens in ``lifespan`` (nothing at
import time); every handler goes through catalog.queries; errors map to 4xx/5xx with a message and
never a stack trace.

(No `from __future__ import annotations` here: FastAPI must evaluate the dependency aliases
defined inside create_app.)"""


import base64
import json
import logging
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from api.settings import Settings
from catalog import queries
from catalog.ids import NodeRefError
from catalog.schema import EDGE_KINDS
from catalog.stores import StoreError, StoreUnavailable, open_store
from catalog.stores.base import CypherRefused, CypherUnsupported

log = logging.getLogger("circuit_catalog.api")
# Most specific first: Starlette picks the handler of the nearest class in the exception's MRO.
ERROR_STATUS = {NodeRefError: 422, queries.NotFound: 404, queries.Ambiguous: 409, CypherUnsupported: 501,
                CypherRefused: 400, StoreError: 400, ValueError: 422}
NodeKindName = Literal["attn", "resid", "error", "bias", "emb", "pos", "mlp", "attn_out"]
KindQ = Annotated[list[NodeKindName] | None, Query(description="node kinds of the other end")]
LayerQ = Annotated[list[int] | None, Query(description="layers of the other end")]
EdgeKindQ = Annotated[list[Literal[EDGE_KINDS]] | None, Query(description="edge kinds")]  # type: ignore[valid-type]


class CypherRequest(BaseModel):
    query: str = Field(..., max_length=10_000, description="a read-only Cypher query")
    params: dict[str, Any] = Field(default_factory=dict, description="query parameters ($name in the query)")


def _cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"o": offset}).encode()).decode()


def _offset(cursor: str | None) -> int:
    if not cursor:
        return 0
    try:
        offset = int(json.loads(base64.urlsafe_b64decode(cursor.encode()))["o"])
    except (ValueError, KeyError, TypeError):
        raise ValueError("cursor is not one this API issued") from None
    if offset < 0:
        raise ValueError("cursor is not one this API issued")
    return offset


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if app.state.store is not None:
            app.state.store.close()

    app = FastAPI(title="circuit-catalog", version="0.1.0", lifespan=lifespan,
                  description="Feature circuits across prompt corpora: RDFA attribution edges with provenance.")
    app.state.settings = settings
    app.state.store = None  # opened on first use; also when a server runs without lifespan events

    def store(request: Request):
        """The store, opened on first use (so a store that is down gives 503s, not a dead server)."""
        if request.app.state.store is None:
            request.app.state.store = open_store(settings.store, create=False)
        return request.app.state.store

    Store = Annotated[Any, Depends(store)]
    Limit = Annotated[int, Query(ge=1, le=settings.max_limit)]

    for exc_type, status in ERROR_STATUS.items():  # expected errors: their message, no stack trace
        app.add_exception_handler(exc_type, lambda _, exc, status=status: JSONResponse(
            status_code=status, content={"detail": str(exc)}))

    @app.exception_handler(StoreUnavailable)
    async def _down(_, exc):
        return JSONResponse(status_code=503, headers={"Retry-After": "5"},
                            content={"detail": f"catalog store unavailable: {exc}; retry shortly"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc):
        return JSONResponse(status_code=422, content={"detail": [
            {"loc": list(e.get("loc", [])), "msg": e.get("msg")} for e in exc.errors()]})

    @app.exception_handler(Exception)
    async def _unexpected(_, exc):
        if type(exc).__module__.startswith(("neo4j", "sqlite3")):
            log.warning("store failure: %r", exc)
            return JSONResponse(status_code=503, headers={"Retry-After": "5"},
                                content={"detail": "catalog store failed; retry shortly"})
        log.exception("unhandled error")
        return JSONResponse(status_code=500, content={"detail": "internal error (logged on the server)"})

    @app.get("/healthz")
    def healthz(s: Store) -> dict:
        return {"ok": True, "store": s.url.split("@")[-1] if "@" in s.url else s.url, "runs": len(s.runs())}

    @app.get("/features/{ref}")
    def get_feature(ref: Annotated[str, Path(max_length=64)], s: Store, model: str | None = None) -> dict:
        return queries.feature(s, ref, model=model)

    def _neighbours(direction: str, ref, s, kind, layer, edge_kind, min_count, order, limit, cursor, model):
        offset = _offset(cursor)
        rows = queries.neighbours(s, ref, direction, model=model, node_kinds=kind, layers=layer,
                                  edge_kinds=edge_kind, min_count=min_count, order=order, limit=limit, offset=offset)
        return {"items": rows, "next_cursor": _cursor(offset + limit) if len(rows) == limit else None}


    @app.get("/features/{ref}/upstream")
    def get_upstream(ref: Annotated[str, Path(max_length=64)], s: Store,
                     kind: KindQ = None, layer: LayerQ = None,
                     edge_kind: EdgeKindQ = None, min_count: Annotated[int, Query(ge=0)] = 0,
                     order: Literal["sum", "mean", "count", "abs"] = "abs", limit: Limit = 20,
                     cursor: Annotated[str | None, Query(max_length=200)] = None, model: str | None = None) -> dict:
        return _neighbours("up", ref, s, kind, layer, edge_kind, min_count, order, limit, cursor, model)

    @app.get("/features/{ref}/downstream")
    def get_downstream(ref: Annotated[str, Path(max_length=64)], s: Store,
                       kind: KindQ = None, layer: LayerQ = None,
                       edge_kind: EdgeKindQ = None, min_count: Annotated[int, Query(ge=0)] = 0,
                       order: Literal["sum", "mean", "count", "abs"] = "abs", limit: Limit = 20,
                       cursor: Annotated[str | None, Query(max_length=200)] = None, model: str | None = None) -> dict:
        return _neighbours("down", ref, s, kind, layer, edge_kind, min_count, order, limit, cursor, model)

    @app.get("/edges/{src}/{dst}")
    def get_edge(src: Annotated[str, Path(max_length=64)], dst: Annotated[str, Path(max_length=64)], s: Store,
                 evidence: Annotated[int, Query(ge=0, le=settings.evidence_limit)] = 20,
                 model: str | None = None) -> dict:
        return queries.edge(s, src, dst, model=model, evidence_limit=evidence)

    @app.get("/prompts/{uid:path}/graph")
    def get_prompt_graph(uid: Annotated[str, Path(max_length=300)], s: Store, limit: Limit = 200) -> dict:
        return queries.prompt_graph(s, uid, limit)

    @app.get("/prompts/{uid:path}")
    def get_prompt(uid: Annotated[str, Path(max_length=300)], s: Store) -> dict:
        return queries.prompt(s, uid)

    @app.get("/runs")
    def get_runs(s: Store) -> list[dict]:
        return queries.runs(s)[: settings.max_limit]

    @app.get("/runs/{run_id}")
    def get_run(run_id: Annotated[str, Path(max_length=200)], s: Store) -> dict:
        return queries.run(s, run_id)

    @app.get("/patterns/composition")
    def get_patterns(s: Store, top: Annotated[int, Query(ge=1, le=100)] = 20,
                     min_prompts: Annotated[int, Query(ge=1, le=100000)] = 2) -> dict:
        from catalog.mining import mine

        return mine(s, top=top, min_prompts=min_prompts)

    @app.post("/cypher")
    def post_cypher(body: CypherRequest, s: Store) -> dict:
        rows = s.cypher(body.query, body.params, settings.cypher_row_cap, settings.cypher_timeout_s)
        return {"rows": json.loads(json.dumps(rows, default=str)), "row_cap": settings.cypher_row_cap,
                "truncated": len(rows) >= settings.cypher_row_cap}

    return app

