"""``circuit-catalog demo``: ingest IOI prompts with toy-ioi into the embedded store, then answer
three showcase questions. Rerunning resumes the same run, so a second call only re-asks."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from catalog import queries
from catalog.mining import mine
from catalog.stores import open_store
from ingest.jobs import JobOptions, run_job
from ingest.runtime import configure_threads
from ingest.session import Session

console = Console()


def _table(title: str, rows: list[dict], cols: list[str]) -> None:
    t = Table(*cols, title=title, title_justify="left")
    for r in rows:
        t.add_row(*[json.dumps(r.get(c)) if isinstance(r.get(c), (dict, list)) else str(r.get(c, "")) for c in cols])
    console.print(t)


def strongest_answer_feature(store) -> str:
    """The top-layer attention feature with the largest total attribution flowing into it."""
    attn = queries.top_features(store, kind="attn", by="total", limit=200)
    top_layer = max(r["layer"] for r in attn)
    return next(r["id"] for r in attn if r["layer"] == top_layer)


def run_demo(store_url: str, n_prompts: int, threads: int) -> None:
    configure_threads(threads)
    store = open_store(store_url)
    console.rule("[bold]circuit-catalog demo: toy-ioi on IOI prompts")
    session = Session.open("toy-ioi", ["toy-ioi"], "cpu")
    summary = run_job(session, f"ioi:{n_prompts}", store, JobOptions(run="demo", resume=store.run("demo") is not None),
                      log=console.print)
    console.print(f"ingested {summary.prompts} prompts ({summary.skipped_done} already stored), "
                  f"{summary.observations:,} observations -> {summary.edges:,} edge updates in {summary.seconds:.0f} s, "
                  f"store wait {summary.store_wait_share:.0%}")
    target = strongest_answer_feature(store)
    console.print(f"\n[bold]1. Which features feed {target}[/bold] (a top-layer attention feature at the answer)?")
    up = queries.upstream(store, target, node_kinds=["attn", "resid"], limit=8)
    _table(f"upstream of {target}", up, ["id", "edge_kind", "n_prompts", "sum", "mean", "sign_share", "heads"])
    source = next((r["id"] for r in up if r["kind"] == "resid"), up[0]["id"]) if up else target
    src_attn = queries.upstream(store, source, node_kinds=["attn"], limit=1) if source.startswith("R") else []
    probe = src_attn[0]["id"] if src_attn else source
    console.print(f"\n[bold]2. What does {probe} feed?[/bold]")
    _table(f"downstream of {probe}", queries.downstream(store, probe, limit=8),
           ["id", "edge_kind", "n_prompts", "sum", "mean", "sign_share"])
    console.print("\n[bold]3. Attention->attention compositions that recur across prompts[/bold]")
    pairs = mine(store, top=8, min_prompts=5)["pairs"]
    _table("composition pairs (z: against prompt-shuffled null)", pairs,
           ["source", "target", "path", "n_prompts", "total", "sign_share", "heads", "z_score"])
    console.print(f"\nBrowse it: [bold].venv/bin/circuit-catalog serve --store {store_url}[/bold] "
                  "then open http://127.0.0.1:8000/docs")
