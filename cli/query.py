"""Commands that read a catalog: they never import torch (a test checks it in a fresh interpreter)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from catalog import queries
from catalog.fires_on import MAX_CONTEXTS
from catalog.stores import open_store
from catalog.stores.base import DEFAULT_URL
from cli.common import QUERY, JsonOpt, MinCount, ModelSel, RunSel, StoreOpt, Top, app, bounded, emit, friendly

# commands whose answer is JSON either way take --json too, so every query command does
AlwaysJson = Annotated[bool, typer.Option("--json", help="print JSON (this command always does)")]
NEIGHBOUR_COLS = ["id", "kind", "edge_kind", "n_prompts", "n_obs", "sum", "mean", "sign_share"]


@app.command(rich_help_panel=QUERY)
@friendly
def upstream(ref: str, store: StoreOpt = DEFAULT_URL, kind: Annotated[list[str] | None, typer.Option(
        "--kind", help="node kind of the sources: attn, resid, transcoder, error, bias, emb, pos, mlp")] = None,
             edge_kind: Annotated[list[str] | None, typer.Option("--edge-kind")] = None,
             layer: Annotated[list[int] | None, typer.Option("--layer")] = None,
             order: str = "abs", top: Top = 20, min_count: MinCount = 0, model: ModelSel = None,
             run: RunSel = None, json_: JsonOpt = False):
    """Which nodes feed REF (e.g. A2.17 or L2.F17), how strongly, over how many prompts."""
    s = open_store(store, create=False)
    emit(queries.upstream(s, ref, model=model, runs=run, node_kinds=kind, edge_kinds=edge_kind, layers=layer, order=order,
                            limit=top, min_count=min_count), json_, NEIGHBOUR_COLS)


@app.command(rich_help_panel=QUERY)
@friendly
def downstream(ref: str, store: StoreOpt = DEFAULT_URL, kind: Annotated[list[str] | None, typer.Option(
        "--kind", help="node kind of the targets: attn, resid, transcoder")] = None,
               edge_kind: Annotated[list[str] | None, typer.Option("--edge-kind")] = None,
               layer: Annotated[list[int] | None, typer.Option("--layer")] = None,
               order: str = "abs", top: Top = 20, min_count: MinCount = 0, model: ModelSel = None,
               run: RunSel = None, json_: JsonOpt = False):
    """Which nodes REF feeds."""
    s = open_store(store, create=False)
    emit(queries.downstream(s, ref, model=model, runs=run, node_kinds=kind, edge_kinds=edge_kind, layers=layer, order=order,
                              limit=top, min_count=min_count), json_, NEIGHBOUR_COLS)


@app.command(rich_help_panel=QUERY)
@friendly
def edge(src: str, dst: str, store: StoreOpt = DEFAULT_URL,
         evidence: Annotated[int, bounded(0, 1000, "evidence rows per edge kind")] = 10, model: ModelSel = None,
         run: RunSel = None, json_: AlwaysJson = False):
    """Statistics, per-head split and evidence (prompts, tokens, positions) of the edge SRC -> DST."""
    emit(queries.edge(open_store(store, create=False), src, dst, model=model, evidence_limit=evidence, runs=run), True)


@app.command("top-features", rich_help_panel=QUERY)
@friendly
def top_features(store: StoreOpt = DEFAULT_URL, kind: str | None = None, by: str = "degree", limit: Top = 20,
                 run: RunSel = None, json_: JsonOpt = False):
    """Nodes with the most edges (--by degree) or the largest total |attribution| (--by total)."""
    emit(queries.top_features(open_store(store, create=False), kind=kind, by=by, limit=limit, runs=run), json_,
           ["id", "kind", "layer", "degree", "total_abs"])


@app.command(rich_help_panel=QUERY)
@friendly
def completeness(store: StoreOpt = DEFAULT_URL, run: RunSel = None, json_: JsonOpt = False):
    """Per layer and feature kind: the share of |attribution| into its features that features, SAE or
    transcoder errors, and the rest (embeddings, biases, whole MLP outputs) carry: where a circuit is trustworthy."""
    result = queries.completeness(open_store(store, create=False), runs=run)
    if json_:
        emit(result, True)
        return
    emit(result["layers"], False, ["kind", "layer", "targets", "features", "errors", "other"])


@app.command(rich_help_panel=QUERY)
@friendly
def feature(ref: str, store: StoreOpt = DEFAULT_URL, model: ModelSel = None, run: RunSel = None,
            contexts: Annotated[int, bounded(0, MAX_CONTEXTS, "top-activating contexts shown")] = 5,
            json_: JsonOpt = False):
    """A feature's metadata, activation statistics and what it fires on (its top-activating contexts)."""
    result = queries.feature(open_store(store, create=False), ref, model=model, runs=run, contexts=contexts)
    if json_:
        emit(result, True)
        return
    shown = {k: v for k, v in result.items() if k not in ("contexts", "histogram")}
    for key, value in shown.items():  # one line a field; nested values as compact JSON
        text = value if isinstance(value, str | int | float) or value is None else json.dumps(value)
        typer.echo(f"{key}: {text}")
    hist = result["histogram"]
    if hist:
        typer.echo(f"histogram: {sum(b['n'] for b in hist)} activations in [{hist[0]['low']:.4g}, "
                   f"{hist[-1]['high']:.4g}) over {len(hist)} bins (--json lists them)")
    typer.echo("top activations: [activating token], <where its strongest incoming edge reads from>")
    for c in result["contexts"]:
        typer.echo(f"  {c['activation']:8.4g}  {context_line(c)}  ({c['prompt']})")


def context_line(c: dict) -> str:
    """A context's tokens on one line, the activating one in [brackets], its strongest source's in <angles>."""
    source = c["source"]["pos"] if c["source"] else None
    out = []
    for i, token in enumerate(c["tokens"], start=c["start"]):
        text = repr(token)[1:-1]
        out.append(f"[{text}]" if i == c["pos"] else f"<{text}>" if i == source else text)
    return "|".join(out)


@app.command("features-on", rich_help_panel=QUERY)
@friendly
def features_on(token: Annotated[str, typer.Argument(help='the token, e.g. " and" (quote it to keep its space)')],
                store: StoreOpt = DEFAULT_URL, top: Top = 20, run: RunSel = None, json_: JsonOpt = False):
    """Features whose top activations sit on TOKEN, the most concentrated first."""
    result = queries.features_by_token(open_store(store, create=False), token, runs=run, limit=top)
    emit(result if json_ else result["features"], json_, ["id", "kind", "layer", "share", "n_on_token", "n_top",
                                                          "max_on_token"])


@app.command(rich_help_panel=QUERY)
@friendly
def diff(ref: str, run: Annotated[list[str], typer.Option("--run", help="run A, then run B (change is B - A)")],
         store: StoreOpt = DEFAULT_URL, direction: Annotated[str, typer.Option(help="up or down")] = "up",
         edge_kind: Annotated[list[str] | None, typer.Option("--edge-kind")] = None, top: Top = 20,
         model: ModelSel = None, json_: JsonOpt = False):
    """What feeds REF in run A against run B: edges side by side, ranked by change in attribution per prompt."""
    from catalog.diff import diff as diff_runs

    if len(run) != 2:
        raise ValueError(f"diff takes exactly two --run options (A, then B), got {len(run)}")
    if direction not in ("up", "down"):
        raise ValueError(f"--direction must be up or down, got {direction!r}")
    result = diff_runs(open_store(store, create=False), ref, run[0], run[1], model=model, limit=top,
                       edge_kinds=edge_kind, direction=direction)
    if json_:
        emit(result, True)
        return
    a, b = result["runs"]["a"], result["runs"]["b"]
    typer.echo(f"{result['feature']}: {result['direction']}stream edges, {a['run']} ({a['prompts']} prompts) -> "
          f"{b['run']} ({b['prompts']} prompts); {result['n_edges']} edges in either run")
    if not result["same_settings"]:
        typer.echo(f"note: the runs differ in settings: A {result['settings']['a']}; B {result['settings']['b']}")
    emit([{"id": r["id"], "edge_kind": r["edge_kind"], "change": r["change"],
           **{f"{side}_{k}": (r[side] or {}).get(k, "-") for side in "ab" for k in ("per_prompt", "n_prompts", "n_obs")}}
          for r in result["edges"]], False,
         ["id", "edge_kind", "change", "a_per_prompt", "b_per_prompt", "a_n_prompts", "b_n_prompts", "a_n_obs", "b_n_obs"])


@app.command(rich_help_panel=QUERY)
@friendly
def runs(store: StoreOpt = DEFAULT_URL, json_: AlwaysJson = False):
    """Runs and their manifests."""
    emit(queries.runs(open_store(store, create=False)), True)


@app.command(rich_help_panel=QUERY)
@friendly
def cypher(query: str, store: StoreOpt = "neo4j://127.0.0.1:7687",
           params: Annotated[str, typer.Option(help="JSON object of query parameters")] = "{}",
           limit: Annotated[int, bounded(1, 10_000)] = 1000,
           timeout: Annotated[float, bounded(0.1, 600, "seconds")] = 10.0, json_: AlwaysJson = False):
    """Run a read-only Cypher query (Neo4j store only)."""
    try:
        bound = json.loads(params)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--params is not a JSON object: {exc.msg}") from None
    emit(open_store(store, create=False).cypher(query, bound, min(limit, 10_000), timeout), True)


@app.command(rich_help_panel=QUERY)
@friendly
def export(from_: Annotated[str, typer.Option("--from")], to: Annotated[str, typer.Option("--to")]):
    """Copy a whole catalog between stores, losslessly."""
    from catalog.export import copy_catalog

    counts = copy_catalog(open_store(from_, create=False), open_store(to, evidence_per_edge=None))
    emit(counts, True)


@app.command(rich_help_panel=QUERY)
@friendly
def merge(folder: Annotated[str, typer.Argument(help="the folder `ingest --partials` wrote")],
          store: StoreOpt = DEFAULT_URL,
          compact_workers: Annotated[int, bounded(1, 256, "processes that compact the spool in parallel")] = 2):
    """Publish the windows of `ingest --partials FOLDER` into a catalog, each edge once (idempotent: a run
    published already is skipped)."""
    from catalog.publish import publish_folder

    stores: dict[int | None, object] = {}

    def store_for(cap: int | None):
        if cap not in stores:
            stores[cap] = open_store(store, evidence_per_edge=cap)
        return stores[cap]

    emit(publish_folder(folder, store_for, workers=compact_workers), True)


@app.command(rich_help_panel=QUERY)
@friendly
def patterns(store: StoreOpt = DEFAULT_URL, top: Annotated[int, bounded(1, 100)] = 20,
             min_prompts: Annotated[int, bounded(1)] = 2, run: RunSel = None,
             json_: JsonOpt = False):
    """Attention->attention composition patterns that recur across the corpus, with a null baseline
    (the result stored at ingest or by `mine` while the runs are unchanged; else mined now)."""
    from catalog.mined import patterns as stored_or_mined

    result = stored_or_mined(open_store(store, create=False), top=top, min_prompts=min_prompts, runs=run)
    if json_:
        emit(result, True)
        return

    def reads(position: dict | None) -> str:  # dominant relation, role pair, offset: share (base rate)
        parts = [position[k] for k in ("relation", "pair", "offset") if position and position[k]]
        return ", ".join(f"{x['role']} {x['share']:.0%} ({x['base']:.0%})" for x in parts)

    typer.echo("V-composition (attribution to feature pre-activations)")
    emit([{**p, "reads": reads(p["position"])} for p in result["pairs"]], False,
         ["source", "target", "path", "n_prompts", "total", "mean", "sign_share", "heads", "z_score", "reads"])
    typer.echo("K/Q-composition into heads (attention-score logits)")
    emit([{**p, "reads": reads(p["position"])} for p in result["qk_pairs"]], False,
         ["source", "target", "path", "n_prompts", "total", "heads", "reads"])
    typer.echo("mechanisms: K/Q into a head -> the head writes a feature -> that feature's V composition")
    emit([{**c, "chain": " -> ".join(c["chain"]), "paths": ", ".join(c["paths"]),
           "positions": " / ".join(x or "-" for x in c["positions"])} for c in result["qk_chains"]], False,
         ["chain", "paths", "positions", "qk_total", "head_share", "v_total"])




@app.command("mine", rich_help_panel=QUERY)
@friendly
def mine_command(store: StoreOpt = DEFAULT_URL, min_prompts: Annotated[int, bounded(1)] = 2, run: RunSel = None):
    """Mine the composition patterns of the selected runs (default: every run) and store them, so the API
    and `patterns` answer from the catalog (an ingest does this when its run is done; shards and merges
    leave it to this command)."""
    from catalog.mined import STORED_TOP, mine_and_store

    result, seconds = mine_and_store(open_store(store, create=False), run, min_prompts)
    emit({"runs": result["runs"], "min_prompts": min_prompts, "pairs": len(result["pairs"]), "top": STORED_TOP,
          "mined": result["mined"], "seconds": round(seconds, 2)}, True)
