"""The browser view, served by the API's own process at ``/`` and ``/view/...``.

Pages are rendered on the server from the same ``catalog.queries`` calls the JSON API makes, so a
number on a page is the number the API returns for the same question (tests compare them). Every
page is a plain GET whose URL reproduces it; the only script is the prompt page's graph drawing
(Cytoscape.js, vendored with Swagger UI and ReDoc in static/vendor: see its README for versions,
sources and checksums). Nothing loads from the internet. (No ``from __future__ import annotations``: FastAPI evaluates the
parameter aliases defined inside ``router``.)
"""

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from api.settings import Settings
from catalog import queries
from catalog.ids import NodeKind, NodeRefError, format_ref, parse_ref
from catalog.prompt_graphs import display_row
from catalog.schema import EDGE_KINDS, JSON
from catalog.stores.base import Store

log = logging.getLogger("circuit_catalog.pages")
HERE = FilePath(__file__).parent
STATIC = HERE / "static"
templates = Jinja2Templates(directory=HERE / "templates")
NODE_KINDS = ("attn", "resid", "transcoder", "error", "bias", "emb", "pos", "mlp", "attn_out", "head")
ORDERS = ("abs", "sum", "mean", "count")
MINED_CACHE = 8  # mining results kept per process (each keyed by what the catalog holds)


def vendored(path: str) -> str:
    return f"/static/vendor/{path}"


def is_page(request: Request) -> bool:
    return request.url.path == "/" or request.url.path.startswith("/view/")


def error_page(request: Request, status: int, detail: Any, headers: JSON | None = None) -> HTMLResponse:
    if isinstance(detail, list):  # request validation: one line per bad parameter
        detail = "; ".join(f"{'.'.join(str(x) for x in d['loc'][1:])}: {d['msg']}" for d in detail)
    return templates.TemplateResponse(request, "error.html", {"status": status, "detail": detail},
                                      status_code=status, headers=headers)


_mining = threading.Lock()


def mined(state: Any, store: Store, top: int, min_prompts: int, runs: Sequence[str] | None = None) -> JSON:
    """The stored mining result (catalog.mined) while current; else ``catalog.mining.mine``, cached
    per process (``state``: the app's state): mining reads the whole catalog (seconds on a corpus),
    its answer changes only when the catalog does, and the key holds what would change (counts, runs
    and their status)."""
    from catalog.mined import stored_patterns
    from catalog.mining import mine

    stored = stored_patterns(store, top, min_prompts, runs)
    if stored is not None:
        return stored
    key = (top, min_prompts, tuple(sorted(set(runs or ()))), json.dumps(store.counts(), sort_keys=True),
           tuple((r.run_id, r.status, r.manifest.get("finished")) for r in store.runs()))
    with _mining:  # one mining at a time: a second caller waits for the first's answer
        cache: OrderedDict[Any, JSON] = state.__dict__.setdefault("_mined", OrderedDict())
        if key not in cache:
            cache[key] = mine(store, top=top, min_prompts=min_prompts, runs=runs)
            while len(cache) > MINED_CACHE:
                cache.popitem(last=False)
        cache.move_to_end(key)
        copy: JSON = json.loads(json.dumps(cache[key]))  # callers may change their copy, not the cache
        return copy


def warm(app: Any, open_store: Callable[[], Store], max_edges: int) -> None:
    """Mine the default patterns in the background when a server starts, so the first visit to the
    patterns page does not wait for it; only on catalogs of at most ``max_edges`` edges, because the
    mining thread holds the GIL and slows every request while it runs (measured: API p99 73 -> 159 ms
    on a 1M-observation catalog). A store that is down is only logged (pages report it).
    ``open_store`` opens a store of the warm-up's own, closed when it ends."""
    try:
        store = open_store()
    except Exception as exc:  # noqa: BLE001 - a warm-up never takes the server down
        log.warning("patterns warm-up skipped: %r", exc)
        return
    try:
        if store.counts()["edges"] > max_edges:
            log.info("patterns warm-up skipped: more than %d edges (mined on the first visit instead)", max_edges)
            return
        mined(app.state, store, 20, 2)
    except Exception as exc:  # noqa: BLE001
        log.warning("patterns warm-up skipped: %r", exc)
    finally:
        store.close()


def n_heads(store: Store) -> int:
    """Heads per layer of the catalog's model(s), from the run manifests (0 when none says)."""
    return max((queries.manifest_model(r.manifest).get("n_heads") or 0 for r in store.runs()), default=0)


def _heads_svg(heads: dict[str, float], n: int = 0, width: int = 96, height: int = 18) -> JSON:
    """Bars of the per-head split, one slot per head of the model (``n``), height by |sum|, colour
    by sign, for the template to draw."""
    if not heads:
        return {"bars": [], "width": width, "height": height}
    top = max(abs(v) for v in heads.values()) or 1.0
    n = max(n, max(int(h) for h in heads) + 1)
    step = width / n
    bars = [{"head": int(h), "value": v, "x": round(int(h) * step + 1, 1), "w": round(max(step - 2, 1), 1),
             "h": round(max(abs(v) / top * (height - 2), 1), 1), "sign": "pos" if v >= 0 else "neg"}
            for h, v in sorted(heads.items(), key=lambda kv: int(kv[0]))]
    return {"bars": bars, "width": width, "height": height}


def _graph_elements(edges: list[JSON], tokens: list[str]) -> JSON:
    """Cytoscape elements with preset positions: rows are catalog.prompt_graphs.display_row (layers
    top to bottom), columns the token positions that hold a node (left to right, empty positions
    left out), each headed by its token; nodes sharing a cell sit side by side."""
    nodes: dict[str, JSON] = {}
    for e in edges:
        for side in ("source", "target"):
            node_id = e[side]
            if node_id not in nodes:
                ref = parse_ref(node_id)
                row = display_row(ref, parse_ref(e["target"]) if side == "source" else None)
                nodes[node_id] = {"id": node_id, "ref": format_ref(ref.at(None)), "pos": ref.pos, "row": row,
                                  "kind": ref.kind.value, "linkable": ref.kind is not NodeKind.REST}
    cells: dict[tuple[int, int], list[str]] = {}
    for n in sorted(nodes.values(), key=lambda n: n["id"]):
        cells.setdefault((n["row"], n["pos"]), []).append(n["id"])
    widest = max((len(v) for v in cells.values()), default=1)
    column = max(90, 58 * widest)
    rank = {pos: i for i, pos in enumerate(sorted({n["pos"] for n in nodes.values()}))}
    for (row, pos), ids in cells.items():
        for i, node_id in enumerate(ids):
            nodes[node_id]["x"] = rank[pos] * column + (i - (len(ids) - 1) / 2) * 58
            nodes[node_id]["y"] = row * 70
    heads = [{"id": f"token@{pos}", "label": f"{pos} {tokens[pos] if pos < len(tokens) else ''}", "x": i * column,
              "y": -70} for pos, i in rank.items()]
    weights: dict[tuple[str, str], float] = {}
    for e in edges:
        weights[(e["source"], e["target"])] = weights.get((e["source"], e["target"]), 0.0) + e["value"]
    top = max((abs(w) for w in weights.values()), default=1.0) or 1.0
    links = [{"id": f"{s}->{t}", "source": s, "target": t, "weight": queries.rnd(w), "width": round(1 + 5 * abs(w) / top, 2),
              "sign": "pos" if w >= 0 else "neg"} for (s, t), w in weights.items()]
    return {"nodes": list(nodes.values()), "edges": links, "tokens": heads}


def _layers(values: list[str] | None) -> list[int] | None:
    """The layer filter of a page: the form sends an empty field when no layer is chosen."""
    chosen = [v.strip() for v in values or () if v.strip()]
    if not all(v.isdigit() for v in chosen):
        raise ValueError(f"layer must be a non-negative integer, got {', '.join(chosen)}")
    return [int(v) for v in chosen] or None


def router(store_dependency: Callable[..., Any], settings: Settings) -> APIRouter:
    pages = APIRouter(include_in_schema=False)
    StoreDep = Annotated[Any, Depends(store_dependency)]
    Ref = Annotated[str, Path(max_length=64)]
    Limit = Annotated[int, Query(ge=1, le=settings.max_limit)]
    Runs = Annotated[list[Annotated[str, Query(max_length=200)]] | None, Query(max_length=100)]

    def render(request: Request, template: str, **context: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, template, context)

    @pages.get("/", response_class=HTMLResponse)
    def home(request: Request, s: StoreDep, run: Runs = None) -> HTMLResponse:
        return render(request, "home.html", overview=queries.overview(s, runs=run), title="circuit-catalog")

    @pages.get("/view/search")
    def search(s: StoreDep, q: Annotated[str, Query(max_length=300)] = "") -> RedirectResponse:
        """A node id in any accepted form (A5.44256, L5.F44256, R3.ERR@7) or a prompt uid."""
        text = q.strip()
        if not text:
            raise ValueError("type a node id (A5.44256, L5.F44256, R3.19755, A5.ERR, EMB) or a prompt uid")
        try:
            ref = parse_ref(text)
        except NodeRefError:
            if s.prompt(text) is not None:
                return RedirectResponse(f"/view/prompt/{quote(text)}", status_code=303)
            raise
        return RedirectResponse(f"/view/feature/{quote(format_ref(ref.at(None)))}", status_code=303)

    @pages.get("/view/features", response_class=HTMLResponse)
    def features(request: Request, s: StoreDep, token: Annotated[str, Query(min_length=1, max_length=100)],
                 limit: Limit = 50, run: Runs = None) -> HTMLResponse:
        result = queries.features_by_token(s, token, runs=run, limit=limit)
        return render(request, "features.html", result=result, title=f"features on {result['token']!r}")

    @pages.get("/view/feature/{ref}", response_class=HTMLResponse)
    def feature(request: Request, ref: Ref, s: StoreDep, kind: Annotated[list[Literal[NODE_KINDS]] | None, Query()] = None,  # type: ignore[valid-type]
                layer: Annotated[list[str] | None, Query(max_length=6)] = None,
                edge_kind: Annotated[list[Literal[EDGE_KINDS]] | None, Query()] = None,  # type: ignore[valid-type]
                order: Literal[ORDERS] = "abs", min_count: Annotated[int, Query(ge=0)] = 0,  # type: ignore[valid-type]
                limit: Limit = 20, up_offset: Annotated[int, Query(ge=0)] = 0,
                down_offset: Annotated[int, Query(ge=0)] = 0, model: str | None = None, run: Runs = None) -> HTMLResponse:
        node = queries.feature(s, ref, model=model, runs=run)
        layers = _layers(layer)
        filters = {"node_kinds": kind, "layers": layers, "edge_kinds": edge_kind, "order": order,
                   "min_count": min_count, "limit": limit, "model": model, "runs": run}
        tables, heads = {}, n_heads(s)
        for direction, offset in (("up", up_offset), ("down", down_offset)):
            rows = queries.neighbours(s, ref, direction, offset=offset, **filters)
            for r in rows:
                r["head_bars"] = _heads_svg(r["heads"], heads)
            tables[direction] = {"rows": rows, "offset": offset,
                                 "next": offset + limit if len(rows) == limit else None,
                                 "prev": max(offset - limit, 0) if offset else None}
        query = {"kind": kind or [], "layer": layers or [], "edge_kind": edge_kind or [], "order": order,
                 "min_count": min_count, "limit": limit, **({"model": model} if model else {}),
                 **({"run": run} if run else {})}

        def link(**change: int) -> str:
            params = {**query, "up_offset": up_offset, "down_offset": down_offset, **change}
            return f"/view/feature/{quote(node['id'])}?" + urlencode(params, doseq=True)

        return render(request, "feature.html", node=node, tables=tables, query=query, link=link,
                      node_kinds=NODE_KINDS, edge_kinds=EDGE_KINDS, orders=ORDERS, title=node["id"])

    @pages.get("/view/edge/{src}/{dst}", response_class=HTMLResponse)
    def edge(request: Request, src: Ref, dst: Ref, s: StoreDep,
             evidence: Annotated[int, Query(ge=0, le=settings.evidence_limit)] = 20,
             model: str | None = None, run: Runs = None) -> HTMLResponse:
        body = queries.edge(s, src, dst, model=model, evidence_limit=evidence, runs=run)
        uids = sorted({v["prompt"] for k in body["kinds"] for v in k["evidence"]})
        tokens = {uid: p.tokens for uid, p in s.prompts(uids).items()}
        for k in body["kinds"]:
            k["head_bars"] = _heads_svg(k["heads"], n_heads(s))
        return render(request, "edge.html", edge=body, tokens=tokens, title=f"{body['source']} -> {body['target']}")

    @pages.get("/view/prompt/{uid:path}", response_class=HTMLResponse)
    def prompt(request: Request, uid: Annotated[str, Path(max_length=300)], s: StoreDep, limit: Limit = 200,
               around: Annotated[str | None, Query(max_length=80)] = None) -> HTMLResponse:
        graph = queries.prompt_graph(s, uid, limit, around or None)
        elements = _graph_elements(graph["edges"], graph["prompt"]["tokens"])
        params = {"limit": limit, **({"around": around} if around else {})}
        base = f"/prompts/{quote(uid)}/graph?"
        json_links = {"catalog": base + urlencode(params), "neuronpedia": base + urlencode({**params, "format": "neuronpedia"})}
        return render(request, "prompt.html", graph=graph, elements=elements, limit=limit, json_links=json_links,
                      title=f"prompt {graph['prompt']['uid']}")

    @pages.get("/view/patterns", response_class=HTMLResponse)
    def patterns(request: Request, s: StoreDep, top: Annotated[int, Query(ge=1, le=100)] = 20,
                 min_prompts: Annotated[int, Query(ge=1, le=100000)] = 2, run: Runs = None) -> HTMLResponse:
        result = mined(request.app.state, s, top, min_prompts, run)
        heads = n_heads(s)
        for p in result["pairs"] + result["qk_pairs"]:
            p["head_bars"] = _heads_svg(p["heads"], heads)
        return render(request, "patterns.html", result=result, top=top, min_prompts=min_prompts,
                      title="composition patterns")

    return pages
