"""Commands that run models (toy training, trace, ingest, demo, SAE evaluation): the only commands that
import ``ingest`` (and so torch), inside their bodies."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from catalog import __version__ as catalog_version
from catalog.stores import open_store
from catalog.stores.base import DEFAULT_URL, StoreUnavailable
from cli.common import COMPUTE, JsonOpt, StoreOpt, Threads, app, bounded, console, emit, friendly


class Precision(StrEnum):
    """``ingest --precision``: the dtype of the products behind edge values (ingest.rdfa.tensors.Pruning)."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


TranscodersOpt = Annotated[list[str] | None, typer.Option(help=(
    "transcoders, so circuits pass through the MLPs: toy-ioi, RELEASE[:ID] or a directory in SAELens's format "
    "(SAELens Transcoder classes, reading blocks.L.ln2.hook_normalized); repeatable"))]


def open_session(model: str, saes: list[str], device: str | None, *, decompose: bool = True,
                 transcoders: list[str] | None = None):
    """Load the model, SAEs and transcoders; what a release left out is said on stderr, in one line each."""
    from ingest.model_with_saes import ModelWithSaes

    session = ModelWithSaes.open(model, list(saes), device, decompose=decompose,
                                 transcoder_specs=list(transcoders or []))
    for note in session.saes.left_out:
        typer.echo(f"note: {note}", err=True)
    return session


@app.command("make-toy", rich_help_panel=COMPUTE)
@friendly
def make_toy(out: str = "toy-ioi", seed: Annotated[int, bounded(0)] = 0, threads: Threads = 1):
    """Train the toy IOI model and its SAEs on the CPU (a few minutes) into OUT."""
    from pathlib import Path

    from ingest.runtime import configure_threads
    from ingest.toy.train import make_toy as train

    configure_threads(threads)
    metrics = train(Path(out), seed=seed)
    emit(metrics, True)


@app.command(rich_help_panel=COMPUTE)
@friendly
def trace(model: Annotated[str, typer.Option(help="toy-ioi, a directory, or a TransformerLens name")],
          saes: Annotated[list[str], typer.Option(help="toy-ioi, RELEASE[:ID] or a directory; repeatable")],
          prompt: Annotated[str, typer.Option(help="the prompt text")],
          feature: Annotated[str | None, typer.Option(help="start feature, e.g. A2.17 (or T1.207 with transcoders)")] = None,
          transcoders: TranscodersOpt = None,
          pos: int = -1, depth: Annotated[int, bounded(1, 20)] = 3,
          top: Annotated[int, bounded(1, 1000, "contributors kept per node")] = 5, device: str | None = None,
          threads: Threads = 1,
          json_: JsonOpt = False,
          qk: Annotated[bool, typer.Option("--qk", help=(
              "also split the score behind each attention edge into query-side x key-side terms (exact; "
              "attention-score logits)"))] = False,
          format_: Annotated[str, typer.Option("--format", help=(
              "tree (the default), json, or neuronpedia: the attribution-graph JSON that Neuronpedia's graph "
              "page and circuit-tracer's frontend read"))] = "tree"):
    """Recursive RDFA trace of one prompt (the Attention Circuit Explorer's walk)."""
    if format_ not in ("tree", "json", "neuronpedia"):
        raise ValueError(f"--format {format_!r}: expected tree, json or neuronpedia")
    from ingest.runtime import configure_threads
    from ingest.trace import render_tree
    from ingest.trace import trace as run_trace

    configure_threads(threads)
    session = open_session(model, saes, device, transcoders=transcoders)
    result = run_trace(session, prompt, feature=feature, pos=pos, depth=depth, top=top, qk=qk)
    if format_ == "neuronpedia":
        from catalog.neuronpedia import ScoreSplit, to_neuronpedia

        manifest = session.manifest()
        emit(to_neuronpedia(prompt=result["prompt"], tokens=result["tokens"], edges=result["edges"],
                              scan=session.lm.name,
                              slug="trace-" + result["start"].replace(".", "-").replace("@", "-at-").lower(),
                              saes=manifest["saes"], qk=[ScoreSplit.from_trace(e) for e in result.get("qk", [])],
                              activations={n["id"]: n["activation"] for n in result["nodes"]}, clicked=result["start"],
                              description=f"circuit-catalog trace from {result['start']}, depth {depth}, top {top}",
                              version=catalog_version), True)
    elif json_ or format_ == "json":
        emit(result, True)
    else:
        console().print(render_tree(result))
        if qk:
            from ingest.trace_qk import render_qk

            console().print(render_qk(result), soft_wrap=True, markup=False)


@app.command(rich_help_panel=COMPUTE)
@friendly
def ingest(model: Annotated[str, typer.Option()], saes: Annotated[list[str], typer.Option()],
           corpus: Annotated[str, typer.Option(help="ioi:N[:seed], abc:N[:seed], FILE.jsonl, FILE.txt, hf:DATASET")],
           transcoders: TranscodersOpt = None,
           store: StoreOpt = DEFAULT_URL, run: str = "default",
           batch_size: Annotated[int, bounded(1, 4096)] = 8,
           limit: Annotated[int | None, bounded(1, help="stop after this many prompts")] = None,
           device: str | None = None, shard: str = "0/1", resume: bool = False,
           max_tokens: Annotated[int | None, bounded(2, help="longest prompt in tokens (BOS included)")] = None,
           truncate: bool = False, skip_long: bool = False,
           top_k: Annotated[int, bounded(1, 10_000)] = 5, min_abs: Annotated[float, bounded(0)] = 0.01,
           direct_positions: Annotated[int, bounded(0, 100_000)] = 2,
           qk: Annotated[bool, typer.Option(help=(
               "QK attribution: split the scores behind the kept attention edges into q_in, k_in and qk edges"))] = True,
           precision: Annotated[Precision, typer.Option(help=(
               "dtype of the products behind edge values: float32 (exact to float32 rounding), or bfloat16 / "
               "float16 for a GPU's tensor cores (slower on CPUs; the error is in docs/rdfa.md)"))] = Precision.float32,
           evidence_per_edge: Annotated[int, bounded(0, 10_000, "0 keeps every observation")] = 8,
           threads: Threads = 1, progress: bool = True,
           window: Annotated[int | None, typer.Option(help=(
               "prompts per spooled window, one file written whole (default 256)"))] = None,
           tail_window: Annotated[int | None, typer.Option(help=(
               "prompts below which the last windows stop halving (default: the window, no halving)"))] = None,
           window_mem: Annotated[int, typer.Option(help="MiB of device aggregates before a window is flushed early")] = 2048,
           window_edges: Annotated[int | None, bounded(1, help=(
               "edges a window may hold before it is flushed early (default: no bound)"))] = None,
           spool: Annotated[str | None, typer.Option(help=(
               "the folder windows are spooled to until the run is published (default: beside a SQLite "
               "catalog, DB.spool; for Neo4j under ~/.cache/circuit-catalog/spool)"))] = None,
           compact_workers: Annotated[int, bounded(1, 256, "processes that compact the spool in parallel")] = 2,
           compact_mem: Annotated[int, bounded(1, help=(
               "MiB a compaction may hold: the spool is split into key-range partitions that fit"))] = 2048,
           publish_every: Annotated[str | None, typer.Option(help=(
               "publish what is spooled so far every N prompts (500) or minutes (10m), so the run can be queried "
               "while it runs (segments, replaced by the whole run when it ends)"))] = None,
           partials: Annotated[str | None, typer.Option(help=(
               "spool to this folder and publish nothing, for a later `merge` (job arrays whose nodes cannot "
               "reach the database)"))] = None,
           executor: Annotated[str, typer.Option(help="local (this process) or ray (RDFA workers on a Ray cluster)")] = "local",
           ray_address: Annotated[str | None, typer.Option(
               help="join this Ray cluster (auto or HOST:PORT); default: start a local one")] = None,
           workers: Annotated[int, bounded(1, 1024, "Ray RDFA workers")] = 2,
           gpus_per_worker: Annotated[float, bounded(0, 8, "GPUs per Ray worker (0: CPU workers)")] = 0.0,
           mine: Annotated[bool, typer.Option(help=(
               "when the run is done, mine its composition patterns and store them for the API "
               "(later: `circuit-catalog mine`)"))] = True):
    """Run RDFA over a corpus and store every edge with its provenance."""
    from catalog.ids import check_run_name
    from ingest.job_options import parse_publish_every
    from ingest.jobs import JobOptions, RayOptions, parse_shard, refuse_existing_run, run_job
    from ingest.rdfa.tensors import Pruning
    from ingest.runtime import configure_threads

    check_run_name(run)  # before the model loads
    if truncate and skip_long:
        raise ValueError("--truncate and --skip-long exclude each other")
    for name, value in (("--window", window), ("--tail-window", tail_window), ("--window-mem", window_mem),
                        ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{name} {value}: must be at least 1")
    if executor not in ("local", "ray"):
        raise ValueError(f"--executor {executor!r}: expected local or ray")
    every_prompts, every_seconds = parse_publish_every(publish_every)
    if publish_every and (partials or parse_shard(shard)[1] > 1 or store.startswith("neo4j-import:")):
        raise ValueError("--publish-every publishes into a live catalog from one job: not with --partials, --shard "
                         "or a neo4j-import: store")
    configure_threads(threads)
    ray = RayOptions(ray_address, workers, gpus_per_worker, threads, model, list(saes),
                     list(transcoders or [])) if executor == "ray" else None
    opts = JobOptions(run=run, batch_size=batch_size, limit=limit, shard=parse_shard(shard), resume=resume,
                      max_tokens=max_tokens, long_policy="truncate" if truncate else "skip" if skip_long else "refuse",
                      pruning=Pruning(top_k=top_k, min_abs=min_abs, direct_positions=direct_positions, qk=qk,
                                      precision=precision.value),
                      progress=progress, window=window, tail_window=tail_window, window_mem=window_mem << 20,
                      window_edges=window_edges, spool=spool, compact_workers=compact_workers,
                      compact_mem=compact_mem << 20, publish_every_prompts=every_prompts,
                      publish_every_seconds=every_seconds,
                      executor=executor, ray=ray,
                      mine=mine and not partials)
    if not partials:  # an existing run, a store that is down or a foreign file: said before the model loads
        try:
            refuse_existing_run(open_store(store, create=False), opts)
        except StoreUnavailable:
            if not store.startswith("sqlite:"):
                raise  # a server that does not answer; a SQLite file that is not there yet is made below
    # the model before the store is made: a model or SAE that cannot be loaded leaves no store file behind
    # (with Ray the workers run RDFA; this process only tokenizes and writes, so it loads the model on the CPU)
    session = open_session(model, saes, "cpu" if executor == "ray" else device, transcoders=transcoders)
    from ingest.corpora import open_corpus

    open_corpus(corpus, session.lm.tokenizer, toy=session.lm.is_toy)  # a bad spec is refused before the store opens
    if partials:
        from catalog.spool import Spool

        target = Spool(partials, evidence_per_edge or None)
    else:
        target = open_store(store, evidence_per_edge=evidence_per_edge or None)
        refuse_existing_run(target, opts)
    try:
        summary = run_job(session, corpus, target, opts, log=lambda m: typer.echo(m, err=True))
    except KeyboardInterrupt:  # run_job said what was kept and how to go on
        raise typer.Exit(130) from None
    emit(summary.as_dict(), True)


@app.command(rich_help_panel=COMPUTE)
@friendly
def demo(store: StoreOpt = "sqlite:///demo-catalog.db", prompts: Annotated[int, bounded(1, 100_000)] = 500,
         threads: Threads = 2):
    """The showcase: ingest IOI prompts with toy-ioi into the embedded store and ask it three questions."""
    from cli.demo import run_demo

    run_demo(store, prompts, threads)


@app.command("eval-saes", rich_help_panel=COMPUTE)
@friendly
def eval_saes(model: Annotated[str, typer.Option()], saes: Annotated[list[str], typer.Option()],
              task: str = "ioi", n: Annotated[int, bounded(1, 100_000)] = 100, groups: Annotated[str | None, typer.Option(
                  help='cross-sections, e.g. "0,3;2,4" (default: the seed\'s groups for 12 layers)')] = None,
              min_recovery: float = 0.8, max_kl: Annotated[float, bounded(0)] = 0.5, store: str | None = None,
              plot: str = "eval-saes.png", device: str | None = None, threads: Threads = 1, json_: JsonOpt = False,
              transcoders: TranscodersOpt = None):
    """Splice each SAE (and transcoder, for its MLP) in, no error term: IOI logit difference and KL vs clean and
    mean ablation; flag damage."""
    from ingest.evaluate import Thresholds, label_sae_rows, store_sae_eval
    from ingest.evaluate import eval_saes as run_eval
    from ingest.evaluate import plot as draw
    from ingest.runtime import configure_threads

    if task != "ioi":
        raise ValueError(f"--task {task!r}: only ioi is implemented")
    try:
        parsed = [[int(x) for x in g.split(",")] for g in groups.split(";")] if groups else None
    except ValueError:
        raise ValueError(f"--groups {groups!r}: expected comma-separated layers, groups split by ';'") from None
    configure_threads(threads)
    session = open_session(model, saes, device, decompose=False,  # splicing needs no residual SAE pairs
                           transcoders=transcoders)
    result = label_sae_rows(session, run_eval(session, n=n, groups=parsed, thresholds=Thresholds(min_recovery, max_kl)))
    draw(result, plot)
    result["plot"] = plot
    if store:
        store_sae_eval(open_store(store), session, result)
    if json_:
        emit(result, True)
    else:
        emit([{**r, "logit_diff": round(r["logit_diff"], 3), "kl": round(r["kl"], 4),
                 "logit_diff_recovery": None if r["logit_diff_recovery"] is None else round(r["logit_diff_recovery"], 3)}
                for r in result["saes"]], False,
               ["kind", "layer", "logit_diff", "kl", "logit_diff_recovery", "flagged"])
        typer.echo(f"clean logit difference {result['clean_logit_diff']:.3f}; plot written to {plot}")
    for skipped in result["skipped_cross_sections"]:
        typer.echo(f"note: cross-section {skipped['layers']} skipped: {skipped['reason']}", err=True)


@app.command("spot-check", rich_help_panel=COMPUTE)
@friendly
def spot_check(model: Annotated[str, typer.Option()], saes: Annotated[list[str], typer.Option()],
               run: Annotated[str, typer.Option()], store: StoreOpt = DEFAULT_URL,
               n: Annotated[int, bounded(1, 100_000)] = 20, device: str | None = None, threads: Threads = 1,
               transcoders: TranscodersOpt = None):
    """Causal spot-check of a run's stored edges: ablate the source, compare with DFA (frozen and not)."""
    from ingest.evaluate import spot_check as check
    from ingest.evaluate import store_spot_check
    from ingest.runtime import configure_threads

    configure_threads(threads)
    target = open_store(store, create=False)
    if target.run(run) is None:
        raise ValueError(f"no run {run!r} in {store}")
    result = check(open_session(model, saes, device, transcoders=transcoders), target, run, n=n)
    store_spot_check(target, run, result)
    emit(result, True)

