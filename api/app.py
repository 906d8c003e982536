"""FastAPI app factory: ``create_app(Settings(...))``. The store opens in ``lifespan`` (nothing at
import time); every handler goes through catalog.queries; errors map to 4xx/5xx with a message and
never a stack trace.

(No `from __future__ import annotations` here: FastAPI must evaluate the dependency aliases
defined inside create_app.)"""


import base64
import functools
import gc
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from api import models, pages
from api.settings import Settings
from catalog import queries
from catalog.diff import diff
from catalog.fires_on import MAX_CONTEXTS
from catalog.ids import NodeRefError
from catalog.mined import stored_stamp
from catalog.runs import IncompatibleRuns
from catalog.schema import EDGE_KINDS, JSON
from catalog.stores import StoreError, StoreUnavailable, open_store
from catalog.stores.base import CypherRefused, CypherUnsupported
from catalog.stores.base import Store as StoreProtocol

log = logging.getLogger("circuit_catalog.api")
# Most specific first: Starlette picks the handler of the nearest class in the exception's MRO.
ERROR_STATUS = {NodeRefError: 422, queries.NotFound: 404, queries.Ambiguous: 409, CypherUnsupported: 501,
                CypherRefused: 400, StoreError: 400, ValueError: 422}
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data:; font-src 'self' data:; "
                           "style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'; "
                           "worker-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'")
# Fields a query leaves out stay out (e.g. a direct pair has no "via"): the models describe, never pad.
ANSWER: dict[str, Any] = {"response_model_exclude_unset": True}
CSP_HEADER = CONTENT_SECURITY_POLICY.encode()
NodeKindName = Literal["attn", "resid", "transcoder", "error", "bias", "emb", "pos", "mlp", "attn_out", "head"]
KindQ = Annotated[list[NodeKindName] | None, Query(description="node kinds of the other end")]
LayerQ = Annotated[list[int] | None, Query(description="layers of the other end")]
EdgeKindQ = Annotated[list[Literal[EDGE_KINDS]] | None, Query(description="edge kinds")]  # type: ignore[valid-type]
RunQ = Annotated[list[Annotated[str, Query(max_length=200)]] | None, Query(
    max_length=100, description="runs to sum over (repeat for several); default: every run, when they share model, "
                                "SAEs and pruning (else 409 naming the groups)")]
INCOMPATIBLE: dict[int | str, dict[str, Any]] = {
    409: {"model": models.IncompatibleRunsAnswer, "description": "runs of different settings selected"}}


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


class SameOriginOnly:
    """Pages may load nothing from elsewhere: the vendored assets are all they need, and a browser
    offline (or a bundle's hard-coded CDN image, as ReDoc's logo is) must not wait on the internet.
    Inline scripts/styles: Swagger UI's start-up script and ReDoc's styles. A plain ASGI middleware
    (Starlette's BaseHTTPMiddleware costs every JSON request measurably), touching HTML only."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_policy(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if any(k.lower() == b"content-type" and v.startswith(b"text/html") for k, v in headers):
                    message = {**message, "headers": [*headers, (b"content-security-policy", CSP_HEADER)]}
            await send(message)

        await self.app(scope, receive, send_with_policy)


WARM_UP_JOIN_S = 60.0  # how long shutdown waits for a patterns warm-up still mining


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        warm_up = None
        if settings.warm_patterns:
            # its own store: closing the app's store at shutdown must never close a connection the warm-up
            # is using (the Neo4j driver's connections are not thread-safe: a BufferError was seen in CI)
            warm_up = threading.Thread(target=pages.warm, daemon=True, name="patterns-warm-up",
                                       args=(app, lambda: open_store(settings.store, create=False),
                                             settings.warm_patterns_max_edges))
            warm_up.start()
        if settings.freeze_gc:
            # Everything imported and built so far lives as long as the server: out of the collector's
            # sight, a full collection no longer walks it while requests wait (measured, Neo4j, 8
            # connections: API p99 55-65 -> 34-40 ms; raising the thresholds instead: 70-88 ms)
            gc.freeze()
        yield
        if warm_up is not None:
            warm_up.join(WARM_UP_JOIN_S)  # bounded: warm-up runs only on small catalogs (seconds)
        if app.state.store is not None:
            app.state.store.close()

    # docs_url/redoc_url off: FastAPI's own pages load Swagger UI and ReDoc from a CDN, blank offline;
    # the routes below serve the same pages with the copies vendored in api/static/vendor.
    app = FastAPI(title="circuit-catalog", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Feature circuits across prompt corpora: RDFA attribution edges with provenance. "
                              "Browse it at [/](/); this page lists the JSON API.")
    app.state.settings = settings
    app.state.store = None  # opened on first use; also when a server runs without lifespan events
    opening = threading.Lock()  # the warm-up thread and the first request may both open it
    app.mount("/static", StaticFiles(directory=pages.STATIC), name="static")

    app.add_middleware(SameOriginOnly)

    def _store(app_: FastAPI) -> StoreProtocol:
        """The store, opened on first use (so a store that is down gives 503s, not a dead server)."""
        with opening:
            if app_.state.store is None:
                app_.state.store = open_store(settings.store, create=False)
        opened: StoreProtocol = app_.state.store
        return opened

    async def store(request: Request) -> StoreProtocol:
        """Async: a sync dependency costs every request a second trip through the thread pool (measured,
        Neo4j: 2.0 -> 1.7 ms of Python CPU a request); only the request that opens the store takes one."""
        opened: StoreProtocol | None = request.app.state.store
        return opened if opened is not None else await run_in_threadpool(_store, request.app)

    Store = Annotated[Any, Depends(store)]
    Limit = Annotated[int, Query(ge=1, le=settings.max_limit)]

    answers: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()  # encoded stored-pattern answers
    answers_lock = threading.Lock()

    @functools.cache
    def validator(model: Any) -> TypeAdapter[Any]:
        return TypeAdapter(model)

    def reply(model: Any, data: JSON) -> Response:
        """``data`` as JSON, not validated again on the way out: the route's response_model documents it
        and, with ``check_responses`` (on in the tests), every answer is validated against it. (FastAPI's
        own validation and encoding of the answer cost as much as the query on the hot endpoints.)"""
        if settings.check_responses:
            try:
                validator(model).validate_python(data)
            except ValidationError as exc:  # a field the model lacks, or a wrong type: our fault, a 500
                raise RuntimeError(f"answer does not match its response model {model}: {exc}") from None
        return JSONResponse(data)

    def error(request: Request, status: int, detail: Any, headers: dict[str, str] | None = None) -> Response:
        """JSON for the API; an HTML page with the same message for a browser page."""
        if pages.is_page(request):
            return pages.error_page(request, status, detail, headers)
        return JSONResponse(status_code=status, headers=headers, content={"detail": detail})

    for exc_type, status in ERROR_STATUS.items():  # expected errors: their message, no stack trace
        app.add_exception_handler(exc_type, lambda request, exc, status=status: error(request, status, str(exc)))

    @app.exception_handler(IncompatibleRuns)
    async def _incompatible(request: Request, exc: IncompatibleRuns) -> Response:
        if pages.is_page(request):
            return pages.error_page(request, 409, str(exc))
        return JSONResponse(status_code=409, content={"detail": str(exc), "groups": exc.groups})

    @app.exception_handler(StoreUnavailable)
    async def _down(request: Request, exc: Exception) -> Response:
        return error(request, 503, f"catalog store unavailable: {exc}; retry shortly", {"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return error(request, 422, [{"loc": list(e.get("loc", [])), "msg": e.get("msg")} for e in exc.errors()])

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        if type(exc).__module__.startswith(("neo4j", "sqlite3")):
            log.warning("store failure: %r", exc)
            return error(request, 503, "catalog store failed; retry shortly", {"Retry-After": "5"})
        log.exception("unhandled error")
        return error(request, 500, "internal error (logged on the server)")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title="circuit-catalog API",
                                   swagger_js_url=pages.vendored("swagger-ui/swagger-ui-bundle.js"),
                                   swagger_css_url=pages.vendored("swagger-ui/swagger-ui.css"),
                                   swagger_favicon_url=pages.vendored("swagger-ui/favicon-32x32.png"),
                                   oauth2_redirect_url="/docs/oauth2-redirect")

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=app.openapi_url or "/openapi.json", title="circuit-catalog API",
                              redoc_js_url=pages.vendored("redoc/redoc.standalone.js"),
                              redoc_favicon_url=pages.vendored("swagger-ui/favicon-32x32.png"), with_google_fonts=False)

    app.include_router(pages.router(store, settings))

    @app.get("/healthz", response_model=models.Health, **ANSWER)
    def healthz(s: Store) -> JSON:
        return {"ok": True, "store": queries.public_url(s.url), "runs": len(s.runs())}

    @app.get("/overview", response_model=models.Overview, responses=INCOMPATIBLE, **ANSWER)
    def get_overview(s: Store, per_layer: Annotated[int, Query(ge=1, le=50)] = 5, run: RunQ = None) -> Response:
        """Counts, runs, the groups of runs that may be added together, and the strongest attention
        features of each layer in the runs chosen (the home page's data)."""
        return reply(models.Overview, queries.overview(s, per_layer, runs=run))

    @app.get("/features", response_model=models.TokenSearch, responses=INCOMPATIBLE, **ANSWER)
    def search_features(s: Store, token: Annotated[str, Query(min_length=1, max_length=100, description=(
                            'the token, e.g. " and" (in double quotes, a leading space is kept)'))],
                        limit: Limit = 20, run: RunQ = None) -> Response:
        """Features whose top activations sit on a token, the most concentrated first: by the share of the
        activation mass of their top activations that sits on it."""
        return reply(models.TokenSearch, queries.features_by_token(s, token, runs=run, limit=limit))

    @app.get("/features/{ref}", response_model=models.Feature, responses=INCOMPATIBLE, **ANSWER)
    def get_feature(ref: Annotated[str, Path(max_length=64)], s: Store, model: str | None = None,
                    contexts: Annotated[int, Query(ge=0, le=MAX_CONTEXTS, description="top-activating contexts shown")] = 10,
                    run: RunQ = None) -> Response:
        """A feature: its activation statistics, top-activating contexts and histogram, SAE and Neuronpedia link."""
        return reply(models.Feature, queries.feature(s, ref, model=model, runs=run, contexts=contexts))

    @app.get("/features/{ref}/diff", response_model=models.Diff, **ANSWER)
    def get_diff(ref: Annotated[str, Path(max_length=64)], s: Store,
                 run: Annotated[list[Annotated[str, Query(max_length=200)]], Query(
                     min_length=2, max_length=2, description="the two runs: ?run=A&run=B (change is B - A)")],
                 direction: Literal["up", "down"] = "up", edge_kind: EdgeKindQ = None, limit: Limit = 20,
                 model: str | None = None) -> Response:
        """Upstream (or downstream) edges of a feature in two runs side by side, ranked by the change in
        attribution per prompt of each run; each side with its prompt and observation counts."""
        return reply(models.Diff, diff(s, ref, run[0], run[1], model=model, limit=limit, edge_kinds=edge_kind,
                                       direction=direction))

    def _neighbours(direction: str, ref: str, s: StoreProtocol, kind: Sequence[str] | None, layer: list[int] | None,
                    edge_kind: Sequence[str] | None, min_count: int, order: str, limit: int, cursor: str | None,
                    model: str | None, run: list[str] | None) -> Response:
        offset = _offset(cursor)
        rows = queries.neighbours(s, ref, direction, model=model, runs=run, node_kinds=kind, layers=layer,
                                  edge_kinds=edge_kind, min_count=min_count, order=order, limit=limit, offset=offset)
        return reply(models.NeighbourPage,
                     {"items": rows, "next_cursor": _cursor(offset + limit) if len(rows) == limit else None})


    @app.get("/features/{ref}/upstream", response_model=models.NeighbourPage, responses=INCOMPATIBLE, **ANSWER)
    def get_upstream(ref: Annotated[str, Path(max_length=64)], s: Store,
                     kind: KindQ = None, layer: LayerQ = None,
                     edge_kind: EdgeKindQ = None, min_count: Annotated[int, Query(ge=0)] = 0,
                     order: Literal["sum", "mean", "count", "abs"] = "abs", limit: Limit = 20,
                     cursor: Annotated[str | None, Query(max_length=200)] = None, model: str | None = None,
                     run: RunQ = None) -> Response:
        return _neighbours("up", ref, s, kind, layer, edge_kind, min_count, order, limit, cursor, model, run)

    @app.get("/features/{ref}/downstream", response_model=models.NeighbourPage, responses=INCOMPATIBLE, **ANSWER)
    def get_downstream(ref: Annotated[str, Path(max_length=64)], s: Store,
                       kind: KindQ = None, layer: LayerQ = None,
                       edge_kind: EdgeKindQ = None, min_count: Annotated[int, Query(ge=0)] = 0,
                       order: Literal["sum", "mean", "count", "abs"] = "abs", limit: Limit = 20,
                       cursor: Annotated[str | None, Query(max_length=200)] = None, model: str | None = None,
                     run: RunQ = None) -> Response:
        return _neighbours("down", ref, s, kind, layer, edge_kind, min_count, order, limit, cursor, model, run)

    @app.get("/edges/{src}/{dst}", response_model=models.Edge, responses=INCOMPATIBLE, **ANSWER)
    def get_edge(src: Annotated[str, Path(max_length=64)], dst: Annotated[str, Path(max_length=64)], s: Store,
                 evidence: Annotated[int, Query(ge=0, le=settings.evidence_limit)] = 20,
                 model: str | None = None, run: RunQ = None) -> Response:
        return reply(models.Edge, queries.edge(s, src, dst, model=model, evidence_limit=evidence, runs=run))

    @app.get("/heads/{ref}/qk", response_model=models.HeadQK, responses=INCOMPATIBLE, **ANSWER)
    def get_head_qk(ref: Annotated[str, Path(max_length=64, description="a head: H{layer}.{head}, e.g. H1.3")],
                    s: Store, limit: Annotated[int, Query(ge=1, le=100)] = 20, model: str | None = None,
                    run: RunQ = None) -> Response:
        """Why a head attends where it does, across the corpus (QK attribution; values are attention-score
        logits): its query-side and key-side nodes with their positional roles, and its largest pairs."""
        return reply(models.HeadQK, queries.head_qk(s, ref, model=model, limit=limit, runs=run))

    @app.get("/prompts/{uid:path}/graph", response_model=models.PromptGraph | models.NeuronpediaGraph, **ANSWER)
    def get_prompt_graph(uid: Annotated[str, Path(max_length=300)], s: Store, limit: Limit = 200,
                         around: Annotated[str | None, Query(max_length=80, description=(
                             "keep the edges on paths into or out of this node: A2.17@14, or A2.17 for all "
                             "its positions"))] = None,
                         format: Annotated[Literal["catalog", "neuronpedia"], Query(description=(
                             "neuronpedia: the attribution-graph JSON Neuronpedia and circuit-tracer's "
                             "frontend read"))] = "catalog") -> JSON:
        if format == "neuronpedia":
            return queries.prompt_graph_neuronpedia(s, uid, limit, around)
        return queries.prompt_graph(s, uid, limit, around)

    @app.get("/prompts/{uid:path}", response_model=models.Prompt, **ANSWER)
    def get_prompt(uid: Annotated[str, Path(max_length=300)], s: Store) -> JSON:
        return queries.prompt(s, uid)

    @app.get("/runs", response_model=list[models.Run], **ANSWER)
    def get_runs(s: Store) -> list[JSON]:
        return queries.runs(s)[: settings.max_limit]

    @app.get("/runs/{run_id}", response_model=models.Run, **ANSWER)
    def get_run(run_id: Annotated[str, Path(max_length=200)], s: Store) -> JSON:
        return queries.run(s, run_id)

    @app.get("/patterns/composition", response_model=models.Patterns, responses=INCOMPATIBLE, **ANSWER)
    def get_patterns(request: Request, s: Store, top: Annotated[int, Query(ge=1, le=100)] = 20,
                     min_prompts: Annotated[int, Query(ge=1, le=100000)] = 2, run: RunQ = None) -> Response:
        """Served from the result stored when the run was ingested (or `circuit-catalog mine`d) while the
        runs are unchanged since; otherwise mined for this request (slow on a big catalog)."""
        stamp = stored_stamp(s, min_prompts, run)
        if stamp is None:
            return reply(models.Patterns, pages.mined(request.app.state, s, top, min_prompts, run))
        # the stored result's answers are fixed until it is re-mined: encode each (stamp, top) once
        key = (s.url, stamp, min_prompts, tuple(sorted(run or ())), top)
        with answers_lock:
            body = answers.get(key)
        if body is None:
            body = bytes(reply(models.Patterns, pages.mined(request.app.state, s, top, min_prompts, run)).body)
            with answers_lock:
                answers[key] = body
                while len(answers) > 64:
                    answers.popitem(last=False)
        return Response(body, media_type="application/json")

    @app.post("/cypher", response_model=models.CypherAnswer, **ANSWER)
    def post_cypher(body: CypherRequest, s: Store) -> JSON:
        rows = s.cypher(body.query, body.params, settings.cypher_row_cap, settings.cypher_timeout_s)
        return {"rows": json.loads(json.dumps(rows, default=str)), "row_cap": settings.cypher_row_cap,
                "truncated": len(rows) >= settings.cypher_row_cap}

    return app

