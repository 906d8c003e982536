"""``circuit-catalog demo``: ingest IOI prompts with toy-ioi into the embedded store, then answer
three showcase questions. Rerunning resumes the same run, so a second call only re-asks."""

from __future__ import annotations

from collections import defaultdict

from rich.table import Table

from catalog import queries
from catalog.mined import patterns
from catalog.stores import open_store
from cli.common import console as new_console
from ingest.jobs import JobOptions, run_job
from ingest.model_with_saes import ModelWithSaes
from ingest.runtime import configure_threads

console = new_console()


def _cell(v) -> str:
    if isinstance(v, dict):  # per-head sums
        return " ".join(f"h{h}:{x:+.3g}" for h, x in sorted(v.items(), key=lambda kv: -abs(kv[1]))[:3])
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):  # residual features a pair goes through, or a chain's paths
        return ", ".join(str(x) for x in v[:3]) + (f" +{len(v) - 3}" if len(v) > 3 else "")
    return "n/a" if v is None else str(v)


def _table(title: str, rows: list[dict], cols: list[str]) -> None:
    t = Table(*cols, title=title, title_justify="left")
    for r in rows:
        t.add_row(*[_cell(r.get(c)) for c in cols])
    console.print(t)


def reads(position: dict | None) -> str:
    """A pattern's dominant relation, role pair and offset: share of its |value| (base rate)."""
    parts = [position[k] for k in ("relation", "pair", "offset") if position and position[k]]
    return ", ".join(f"{x['role']} {x['share']:.0%} ({x['base']:.0%})" for x in parts)


def strongest_answer_feature(store, run: str, top_layer: int, sample: int = 50) -> str:
    """The top-layer attention feature with the largest attribution into it *at the answer position*
    (each prompt's recorded end_pos), over a sample of the run's prompts."""
    weight: dict[str, float] = defaultdict(float)
    uids = sorted(p.uid for p in store.all_prompts() if p.run == run)[:sample]
    for uid in uids:
        graph = queries.prompt_graph(store, uid, limit=2000)
        end = graph["prompt"]["meta"].get("end_pos", len(graph["prompt"]["tokens"]) - 1)
        for e in graph["edges"]:
            ref, _, pos = e["target"].partition("@")
            if ref.startswith(f"A{top_layer}.") and int(pos) == end:
                weight[ref] += abs(e["value"])
    return max(weight, key=weight.get)


def run_demo(store_url: str, n_prompts: int, threads: int) -> None:
    configure_threads(threads)
    store = open_store(store_url)
    console.rule("[bold]circuit-catalog demo: toy-ioi on IOI prompts")
    session = ModelWithSaes.open("toy-ioi", ["toy-ioi"], "cpu", transcoder_specs=["toy-ioi"])
    summary = run_job(session, f"ioi:{n_prompts}", store, JobOptions(run="demo", resume=store.run("demo") is not None),
                      log=console.print)
    console.print(f"ingested {summary.prompts} prompts ({summary.skipped_done} already stored), "
                  f"{summary.observations:,} observations -> {summary.edges:,} edge updates in {summary.seconds:.0f} s, "
                  f"store wait {summary.store_wait_share:.0%}")
    target = strongest_answer_feature(store, "demo", max(session.attn))
    console.print(f"\n[bold]1. Which features feed {target}[/bold], the strongest top-layer attention feature at "
                  "the answer position?")
    up = queries.upstream(store, target, node_kinds=["attn", "resid"], limit=8, runs=["demo"])
    _table(f"upstream of {target}", up, ["id", "edge_kind", "n_prompts", "sum", "mean", "sign_share", "heads"])
    source = next((r["id"] for r in up if r["kind"] == "resid"), up[0]["id"]) if up else target
    src_attn = queries.upstream(store, source, node_kinds=["attn"], limit=1, runs=["demo"]) if source.startswith("R") else []
    probe = src_attn[0]["id"] if src_attn else source
    console.print(f"\n[bold]2. What does {probe} feed?[/bold]")
    _table(f"downstream of {probe}", queries.downstream(store, probe, limit=8, runs=["demo"]),
           ["id", "edge_kind", "n_prompts", "sum", "mean", "sign_share"])
    console.print("\n[bold]3. Attention->attention compositions that recur across prompts[/bold]")
    mined = patterns(store, top=8, runs=["demo"])  # stored by the ingest job when the run was done
    console.print("z: recurrence against a prompt-shuffled null (n/a when a feature fires on every prompt); reads: "
                  "where the attention hop reads, share of |attribution| (base rate over all attention)")
    _table("V-composition pairs", [{**p, "reads": reads(p["position"])} for p in mined["pairs"]],
           ["source", "target", "path", "n_prompts", "total", "heads", "z_score", "reads"])
    _table("K/Q-composition into heads (attention-score logits)",
           [{**p, "reads": reads(p["position"])} for p in mined["qk_pairs"][:6]],
           ["source", "target", "path", "via", "n_prompts", "total", "reads"])
    _table("mechanisms: K/Q into a head, the head writes a feature, the feature's V composition",
           [{**c, "chain": " -> ".join(c["chain"]), "positions": " / ".join(x or "-" for x in c["positions"])}
            for c in mined["qk_chains"][:6]], ["chain", "paths", "positions", "qk_total", "head_share", "v_total"])
    console.print(f"\nBrowse it: [bold].venv/bin/circuit-catalog serve --store {store_url}[/bold], then open "
                  f"http://127.0.0.1:8000/view/feature/{target} (home: http://127.0.0.1:8000/, API: /docs)",
                  soft_wrap=True)  # one line, so the URL can be copied whole
