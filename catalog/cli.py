"""The thin ``circuit-catalog`` command: parse, call the library, print.

Query commands never import torch; commands that compute (make-toy, trace, ingest, demo,
eval-saes) import ``ingest`` inside their bodies.
"""

from __future__ import annotations

import functools
import json
from typing import Annotated, Optional

import typer

from catalog import __version__ as catalog_version, queries
from catalog.ids import NodeKind
from catalog.stores import StoreError, open_store
from catalog.stores.base import DEFAULT_URL

app = typer.Typer(help="A graph-database catalog of feature circuits (RDFA edges across prompt corpora).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

StoreOpt = Annotated[str, typer.Option("--store", help="sqlite:///path.db or neo4j://host:port")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]
ModelSel = Annotated[Optional[str], typer.Option("--model", help="model name, when the catalog holds several")]


def friendly(fn):
    """Turn the errors users cause into one clear line and exit code 2 (no traceback).

    ingest's UserFacingError is matched by name: importing ingest here would pull torch into
    every query command."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from catalog.ids import NodeRefError

        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            user_error = isinstance(exc, (StoreError, NodeRefError, ValueError, FileNotFoundError)) or \
                any(c.__name__ == "UserFacingError" for c in type(exc).__mro__)
            if not user_error:
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
    return wrapper


def _print(data, as_json: bool, table_cols: list[str] | None = None) -> None:
    if as_json or table_cols is None:
        typer.echo(json.dumps(data, indent=1, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*table_cols)
    for row in data:
        table.add_row(*[str(row.get(c, "")) for c in table_cols])
    Console().print(table)


NEIGHBOUR_COLS = ["id", "kind", "edge_kind", "n_prompts", "n_obs", "sum", "mean", "sign_share"]


@app.command()
@friendly
def upstream(ref: str, store: StoreOpt = DEFAULT_URL, kind: Annotated[Optional[list[str]], typer.Option(
        "--kind", help="node kind of the sources: attn, resid, error, bias, emb, pos, mlp")] = None,
             edge_kind: Annotated[Optional[list[str]], typer.Option("--edge-kind")] = None,
             layer: Annotated[Optional[list[int]], typer.Option("--layer")] = None,
             order: str = "abs", top: int = 20, min_count: int = 0, model: ModelSel = None, json_: JsonOpt = False):
    """Which nodes feed REF (e.g. A2.17 or L2.F17), how strongly, over how many prompts."""
    s = open_store(store, create=False)
    _print(queries.upstream(s, ref, model=model, node_kinds=kind, edge_kinds=edge_kind, layers=layer, order=order,
                            limit=top, min_count=min_count), json_, NEIGHBOUR_COLS)


@app.command()
@friendly
def downstream(ref: str, store: StoreOpt = DEFAULT_URL, kind: Annotated[Optional[list[str]], typer.Option(
        "--kind", help="node kind of the targets: attn, resid")] = None,
               edge_kind: Annotated[Optional[list[str]], typer.Option("--edge-kind")] = None,
               layer: Annotated[Optional[list[int]], typer.Option("--layer")] = None,
               order: str = "abs", top: int = 20, min_count: int = 0, model: ModelSel = None, json_: JsonOpt = False):
    """Which nodes REF feeds."""
    s = open_store(store, create=False)
    _print(queries.downstream(s, ref, model=model, node_kinds=kind, edge_kinds=edge_kind, layers=layer, order=order,
                              limit=top, min_count=min_count), json_, NEIGHBOUR_COLS)


@app.command()
@friendly
def edge(src: str, dst: str, store: StoreOpt = DEFAULT_URL, evidence: int = 10, model: ModelSel = None):
    """Statistics, per-head split and evidence (prompts, tokens, positions) of the edge SRC -> DST."""
    _print(queries.edge(open_store(store, create=False), src, dst, model=model, evidence_limit=evidence), True)


@app.command("top-features")
@friendly
def top_features(store: StoreOpt = DEFAULT_URL, kind: Optional[str] = None, by: str = "degree", limit: int = 20,
                 json_: JsonOpt = False):
    """Nodes with the most edges (--by degree) or the largest total |attribution| (--by total)."""
    _print(queries.top_features(open_store(store, create=False), kind=kind, by=by, limit=limit), json_,
           ["id", "kind", "layer", "degree", "total_abs"])


@app.command()
@friendly
def feature(ref: str, store: StoreOpt = DEFAULT_URL, model: ModelSel = None):
    """A feature's metadata and activation statistics."""
    _print(queries.feature(open_store(store, create=False), ref, model=model), True)


@app.command()
@friendly
def runs(store: StoreOpt = DEFAULT_URL):
    """Runs and their manifests."""
    _print(queries.runs(open_store(store, create=False)), True)


@app.command()
@friendly
def cypher(query: str, store: StoreOpt = "neo4j://127.0.0.1:7687",
           params: Annotated[str, typer.Option(help="JSON object of query parameters")] = "{}",
           limit: int = 1000, timeout: float = 10.0):
    """Run a read-only Cypher query (Neo4j store only)."""
    try:
        bound = json.loads(params)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--params is not a JSON object: {exc.msg}") from None
    _print(open_store(store, create=False).cypher(query, bound, min(limit, 10_000), timeout), True)


@app.command()
@friendly
def export(from_: Annotated[str, typer.Option("--from")], to: Annotated[str, typer.Option("--to")]):
    """Copy a whole catalog between stores, losslessly."""
    from catalog.export import copy_catalog

    counts = copy_catalog(open_store(from_, create=False), open_store(to, evidence_per_edge=None))
    _print(counts, True)


@app.command()
@friendly
def patterns(store: StoreOpt = DEFAULT_URL, top: int = 20, min_prompts: int = 2,
             json_: JsonOpt = False):
    """Attention->attention composition patterns that recur across the corpus, with a null baseline."""
    from catalog.mining import mine

    result = mine(open_store(store, create=False), top=top, min_prompts=min_prompts)
    if json_:
        _print(result, True)
    else:
        _print(result["pairs"], False, ["source", "target", "path", "n_prompts", "total", "mean", "sign_share",
                                        "heads", "z_score"])


@app.command()
@friendly
def serve(store: StoreOpt = DEFAULT_URL, host: str = "127.0.0.1", port: int = 8000):
    """Serve the REST API (and /docs) over a catalog. Binds to 127.0.0.1 unless told otherwise."""
    import uvicorn

    from api.app import create_app
    from api.settings import Settings

    settings = Settings(store=store, host=host, port=port)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port)


@app.command("neo4j-server")
@friendly
def neo4j_server(home: str = ".neo4j/data", port: int = 7687, page_cache: str = "256m"):
    """Build (first time, Maven) and run Neo4j Community with Bolt on 127.0.0.1 for local use."""
    from catalog.neo4j_server import run_foreground

    run_foreground(home, port, page_cache)


@app.command("make-toy")
@friendly
def make_toy(out: str = "toy-ioi", seed: int = 0, threads: int = 1):
    """Train the toy IOI model and its SAEs on the CPU (a few minutes) into OUT."""
    from pathlib import Path

    from ingest.runtime import configure_threads
    from ingest.toy.train import make_toy as train

    configure_threads(threads)
    metrics = train(Path(out), seed=seed)
    _print(metrics, True)


@app.command()
@friendly
def trace(model: Annotated[str, typer.Option(help="toy-ioi, a directory, or a TransformerLens name")],
          saes: Annotated[list[str], typer.Option(help="toy-ioi, RELEASE[:ID] or a directory; repeatable")],
          prompt: Annotated[str, typer.Option(help="the prompt text")],
          feature: Annotated[Optional[str], typer.Option(help="start feature, e.g. A2.17")] = None,
          pos: int = -1, depth: int = 3, top: int = 5, device: Optional[str] = None, threads: int = 1,
          json_: JsonOpt = False,
          format_: Annotated[str, typer.Option("--format", help=(
              "tree (the default), json, or neuronpedia: the attribution-graph JSON that Neuronpedia's graph "
              "page and circuit-tracer's frontend read"))] = "tree"):
    """Recursive RDFA trace of one prompt (the Attention Circuit Explorer's walk)."""
    if format_ not in ("tree", "json", "neuronpedia"):
        raise ValueError(f"--format {format_!r}: expected tree, json or neuronpedia")
    from ingest.runtime import configure_threads
    from ingest.session import Session
    from ingest.trace import render_tree, trace as run_trace

    configure_threads(threads)
    session = Session.open(model, saes, device)
    result = run_trace(session, prompt, feature=feature, pos=pos, depth=depth, top=top)
    if format_ == "neuronpedia":
        from catalog.prompt_graphs import to_neuronpedia

        manifest = session.manifest()
        _print(to_neuronpedia(prompt=result["prompt"], tokens=result["tokens"], edges=result["edges"],
                              scan=session.lm.name, slug=f"trace-{result['start'].replace('.', '-').replace('@', '-at-')}".lower(),
                              saes=[s["key"] for s in manifest["saes"]],
                              activations={n["id"]: n["activation"] for n in result["nodes"]}, clicked=result["start"],
                              description=f"circuit-catalog trace from {result['start']}, depth {depth}, top {top}",
                              version=catalog_version), True)
    elif json_ or format_ == "json":
        _print(result, True)
    else:
        from rich.console import Console

        Console().print(render_tree(result))


@app.command()
@friendly
def ingest(model: Annotated[str, typer.Option()], saes: Annotated[list[str], typer.Option()],
           corpus: Annotated[str, typer.Option(help="ioi:N[:seed], abc:N[:seed], FILE.jsonl, FILE.txt, hf:DATASET")],
           store: StoreOpt = DEFAULT_URL, run: str = "default", batch_size: int = 8, limit: Optional[int] = None,
           device: Optional[str] = None, shard: str = "0/1", resume: bool = False,
           max_tokens: Optional[int] = None, truncate: bool = False, skip_long: bool = False,
           top_k: int = 5, min_abs: float = 0.01, direct_positions: int = 2, evidence_per_edge: int = 8,
           threads: int = 1, progress: bool = True,
           window: Annotated[int, typer.Option(help="prompts per store write (one all-or-nothing transaction)")] = 256,
           window_mem: Annotated[int, typer.Option(help="MiB of device aggregates before a window is flushed early")] = 2048):
    """Run RDFA over a corpus and store every edge with its provenance."""
    from ingest.jobs import JobOptions, parse_shard, run_job
    from ingest.rdfa.tensors import Pruning
    from ingest.runtime import configure_threads
    from ingest.session import Session

    if truncate and skip_long:
        raise ValueError("--truncate and --skip-long exclude each other")
    for name, value in (("--window", window), ("--window-mem", window_mem), ("--batch-size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} {value}: must be at least 1")
    configure_threads(threads)
    opts = JobOptions(run=run, batch_size=batch_size, limit=limit, shard=parse_shard(shard), resume=resume,
                      max_tokens=max_tokens, long_policy="truncate" if truncate else "skip" if skip_long else "refuse",
                      pruning=Pruning(top_k=top_k, min_abs=min_abs, direct_positions=direct_positions),
                      progress=progress, window=window, window_mem=window_mem << 20)
    target = open_store(store, evidence_per_edge=evidence_per_edge or None)
    summary = run_job(Session.open(model, saes, device), corpus, target, opts, log=lambda m: typer.echo(m, err=True))
    _print(summary.as_dict(), True)


@app.command()
@friendly
def demo(store: StoreOpt = "sqlite:///demo-catalog.db", prompts: int = 500, threads: int = 2):
    """The showcase: ingest IOI prompts with toy-ioi into the embedded store and ask it three questions."""
    from ingest.demo import run_demo

    run_demo(store, prompts, threads)


@app.command("eval-saes")
@friendly
def eval_saes(model: Annotated[str, typer.Option()], saes: Annotated[list[str], typer.Option()],
              task: str = "ioi", n: int = 100, groups: Annotated[Optional[str], typer.Option(
                  help='cross-sections, e.g. "0,3;2,4" (default: the seed\'s groups for 12 layers)')] = None,
              min_recovery: float = 0.8, max_kl: float = 0.5, store: Optional[str] = None,
              plot: str = "eval-saes.png", device: Optional[str] = None, threads: int = 1, json_: JsonOpt = False):
    """Splice each SAE in (no error term): IOI logit difference and KL vs clean and mean ablation; flag damage."""
    from ingest.evaluate import Thresholds, eval_saes as run_eval, plot as draw
    from ingest.runtime import configure_threads
    from ingest.session import Session

    if task != "ioi":
        raise ValueError(f"--task {task!r}: only ioi is implemented")
    try:
        parsed = [[int(x) for x in g.split(",")] for g in groups.split(";")] if groups else None
    except ValueError:
        raise ValueError(f"--groups {groups!r}: expected comma-separated layers, groups split by ';'") from None
    configure_threads(threads)
    session = Session.open(model, saes, device)
    result = run_eval(session, n=n, groups=parsed, thresholds=Thresholds(min_recovery, max_kl))
    result["model"] = session.lm.name
    for row in result["saes"]:  # the catalog matches flags to features by the SAE's own key
        row["sae"] = session.saes.key_of(NodeKind(row["kind"]), row["layer"])
    draw(result, plot)
    result["plot"] = plot
    if store:
        target = open_store(store)
        run_id = f"sae-eval-{session.lm.name}"
        target.start_run(run_id, {"kind": "sae_eval", **session.manifest()}, resume=True)
        target.finish_run(run_id, "done", {"sae_eval": result})
    if json_:
        _print(result, True)
    else:
        _print([{**r, "logit_diff": round(r["logit_diff"], 3), "kl": round(r["kl"], 4),
                 "logit_diff_recovery": None if r["logit_diff_recovery"] is None else round(r["logit_diff_recovery"], 3)}
                for r in result["saes"]], False,
               ["kind", "layer", "logit_diff", "kl", "logit_diff_recovery", "flagged"])
        typer.echo(f"clean logit difference {result['clean_logit_diff']:.3f}; plot written to {plot}")


@app.command("spot-check")
@friendly
def spot_check(model: Annotated[str, typer.Option()], saes: Annotated[list[str], typer.Option()],
               run: Annotated[str, typer.Option()], store: StoreOpt = DEFAULT_URL, n: int = 20,
               device: Optional[str] = None, threads: int = 1):
    """Causal spot-check of a run's stored edges: ablate the source, compare with DFA (frozen and not)."""
    from ingest.evaluate import spot_check as check
    from ingest.runtime import configure_threads
    from ingest.session import Session

    configure_threads(threads)
    target = open_store(store, create=False)
    existing = target.run(run)
    if existing is None:
        raise ValueError(f"no run {run!r} in {store}")
    result = check(Session.open(model, saes, device), target, run, n=n)
    target.finish_run(run, existing.status, {"spot_check": {k: v for k, v in result.items() if k != "edges"}
                                             | {"edges": result["edges"][:50]}})
    _print(result, True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
