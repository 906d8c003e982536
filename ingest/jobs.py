"""Batch ingest: corpus -> tokens -> batches -> RDFA -> aggregate -> writer thread -> store.

Batches are cut from the whole corpus in a fixed order, so batch k holds the same prompts in
every process: ``--shard i/n`` takes batches k with k % n == i. Each write transaction holds whole
prompts: a batch, or, when a batch has more than ``rows_per_write`` observations, consecutive groups
of its prompts (one huge transaction stalls a small server; a GPT-2-sized prompt of 64 tokens gives ~5x10^5).
So a killed job leaves whole prompts, and ``--resume`` skips stored batches and recomputes a
partly stored one with the same prompts, writing only those not yet stored.
Computation overlaps with writing through a bounded queue; the summary reports how much of the
wall time the compute loop spent waiting on the store.
"""

from __future__ import annotations

import queue
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from catalog import __version__
from catalog.schema import Prompt
from ingest.corpora import Corpus, CorpusItem, content_hash, open_corpus
from ingest.errors import UserFacingError
from ingest.rdfa.tensors import Pruning
from ingest.session import Session
from ingest.to_catalog import NodeCatalog, graph_to_batch


@dataclass
class JobOptions:
    run: str
    batch_size: int = 8
    limit: int | None = None
    shard: tuple[int, int] = (0, 1)
    resume: bool = False
    max_tokens: int | None = None
    long_policy: str = "refuse"  # refuse | truncate | skip
    pruning: Pruning = field(default_factory=lambda: Pruning(top_k=5, min_abs=0.01, direct_positions=2))
    queue_size: int = 2
    progress: bool = True
    rows_per_write: int = 100_000  # observations per write transaction (a single prompt may exceed it)


@dataclass
class JobSummary:
    run: str
    prompts: int = 0
    skipped_long: int = 0
    skipped_done: int = 0
    bad_lines: int = 0
    observations: int = 0
    edges: int = 0
    seconds: float = 0.0
    store_wait_seconds: float = 0.0

    @property
    def store_wait_share(self) -> float:
        return self.store_wait_seconds / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        return {**self.__dict__, "store_wait_share": round(self.store_wait_share, 4)}


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserFacingError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise UserFacingError(f"--shard {text!r}: need 0 <= i < n")
    return i, n


def tokenize(items: list[CorpusItem], session: Session, opts: JobOptions) -> tuple[list[tuple[CorpusItem, list[int]]], int]:
    """Token ids per item under the long-prompt policy; returns (kept, number skipped)."""
    limit = min(opts.max_tokens or session.lm.n_ctx, session.lm.n_ctx)
    kept, skipped = [], 0
    for item in items:
        ids = session.lm.tokenizer.encode(item.text)
        if len(ids) > limit:
            if opts.long_policy == "truncate":
                ids = ids[:limit]
            elif opts.long_policy == "skip":
                skipped += 1
                continue
            else:
                raise UserFacingError(f"prompt {item.prompt_id!r} has {len(ids)} tokens, more than the limit of {limit} "
                                      "(model context or --max-tokens); pass --truncate or --skip-long")
        kept.append((item, ids))
    return kept, skipped


def code_version() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=__file__.rsplit("/", 2)[0]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def _prompt(run: str, item: CorpusItem, ids: list[int], session: Session, corpus: Corpus) -> Prompt:
    tokens = session.lm.tokenizer.spell(ids)
    meta = dict(item.meta)
    if "io" in meta and "s" in meta:
        from ingest.ioi import name_positions

        meta.update(name_positions(tokens, meta["io"], meta["s"]))
    return Prompt(f"{run}/{item.prompt_id}", run, item.prompt_id, item.text, tokens, corpus.spec,
                  content_hash(item.text), meta)


def run_job(session: Session, corpus_spec: str, store, opts: JobOptions, log=print) -> JobSummary:
    """Ingest ``corpus_spec`` into ``store`` under run ``opts.run``; see the module docstring."""
    t0 = time.time()
    corpus = open_corpus(corpus_spec, session.lm.tokenizer, toy=session.lm.is_toy)
    items = corpus.items()[: opts.limit] if opts.limit else corpus.items()
    for bad in corpus.bad_lines[:20]:
        log(f"corpus line {bad.line}: {bad.reason} (skipped)")
    pairs, skipped_long = tokenize(items, session, opts)
    batches = [pairs[k:k + opts.batch_size] for k in range(0, len(pairs), opts.batch_size)]
    mine = [b for k, b in enumerate(batches) if k % opts.shard[1] == opts.shard[0]]
    manifest = {**session.manifest(), "code_version": code_version(), "pruning": opts.pruning.manifest(),
                "corpus": {"spec": corpus_spec, "fingerprint": corpus.fingerprint(), "n_items": len(corpus.items())},
                "batch_size": opts.batch_size, "limit": opts.limit, "long_policy": opts.long_policy,
                "max_tokens": opts.max_tokens, "evidence_per_edge": store.evidence_per_edge,
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    _check_resume(store, opts, manifest)
    store.start_run(opts.run, manifest, resume=opts.resume or opts.shard[1] > 1)
    done = store.done_prompts(opts.run) if (opts.resume or opts.shard[1] > 1) else set()
    todo = [b for b in mine if not all(item.prompt_id in done for item, _ in b)]
    summary = JobSummary(opts.run, skipped_long=skipped_long, bad_lines=len(corpus.bad_lines),
                         skipped_done=sum(item.prompt_id in done for b in mine for item, _ in b))
    nodes = NodeCatalog(session.lm.name, session.saes.release_of_attn(), session.saes.release_of_resid())
    try:
        _pipeline(session, store, todo, done, corpus, nodes, opts, summary)
    except BaseException as exc:
        summary.seconds = time.time() - t0
        store.finish_run(opts.run, "failed", {"error": f"{type(exc).__name__}: {exc}"[:500]})
        raise
    summary.seconds = time.time() - t0
    status = "done" if opts.shard[1] == 1 else f"shard {opts.shard[0]}/{opts.shard[1]} done"
    store.finish_run(opts.run, status, {
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        f"counts{'' if opts.shard[1] == 1 else '_shard%d' % opts.shard[0]}": summary.as_dict(),
        "bad_lines": [{"line": b.line, "reason": b.reason} for b in corpus.bad_lines[:100]]})
    return summary


def _check_resume(store, opts: JobOptions, manifest: dict) -> None:
    """A resumed run must cut the same batches from the same corpus, or the catalog would differ."""
    old = store.run(opts.run)
    if old is None or not (opts.resume or opts.shard[1] > 1):
        return
    for key in ("batch_size", "limit", "long_policy", "max_tokens", "pruning"):
        if old.manifest.get(key) != manifest[key]:
            raise UserFacingError(f"run {opts.run!r} was started with {key}={old.manifest.get(key)!r}; "
                                  f"this job has {manifest[key]!r}. Resume with the same options")
    if old.manifest.get("corpus", {}).get("fingerprint") != manifest["corpus"]["fingerprint"]:
        raise UserFacingError(f"run {opts.run!r} was started on a different corpus (fingerprint differs)")


def write_groups(observations: list[int], stored: list[bool], max_rows: int) -> list[list[int]]:
    """Consecutive groups of a batch's unstored prompts (indices) with at most ``max_rows``
    observations each, a prompt larger than that alone in its group."""
    groups: list[list[int]] = []
    rows = 0
    for i, (n, done) in enumerate(zip(observations, stored)):
        if done:
            continue
        if not groups or rows + n > max_rows:
            groups.append([])
            rows = 0
        groups[-1].append(i)
        rows += n
    return groups


def _pipeline(session: Session, store, todo, done: set[str], corpus: Corpus, nodes: NodeCatalog,
              opts: JobOptions, summary: JobSummary) -> None:
    """Compute on this thread, aggregate+write on a writer thread, with a bounded queue between."""
    from tqdm import tqdm

    work: queue.Queue = queue.Queue(maxsize=opts.queue_size)
    failure: list[BaseException] = []

    def write(graph, prompts: list[Prompt]) -> None:
        per_prompt = graph.observations_per_prompt(len(prompts))
        for group in write_groups(per_prompt, [p.prompt_id in done for p in prompts], opts.rows_per_write):
            part = graph if len(group) == len(prompts) else graph.select_prompts(group, len(prompts))
            batch = graph_to_batch(part, [prompts[i] for i in group], nodes, opts.run, store.evidence_per_edge)
            if store.write_batch(batch):
                summary.edges += len(batch.edges)
                summary.observations += sum(per_prompt[i] for i in group)
                summary.prompts += len(group)

    def writer() -> None:
        while (job := work.get()) is not None:
            if failure:
                continue
            try:
                write(*job)
            except BaseException as exc:  # surfaced on the compute thread
                failure.append(exc)

    thread = threading.Thread(target=writer, name="catalog-writer", daemon=True)
    thread.start()
    bar = tqdm(total=sum(len(b) for b in todo), unit="prompt", disable=not opts.progress, dynamic_ncols=True)
    t_start = time.time()
    try:
        for batch in todo:
            if failure:
                break
            _, graph = session.attribute([ids for _, ids in batch], opts.pruning)
            graph = _to_cpu(graph)
            prompts = [_prompt(opts.run, item, ids, session, corpus) for item, ids in batch]
            waited = time.time()
            work.put((graph, prompts))
            summary.store_wait_seconds += time.time() - waited
            bar.update(len(batch))
            elapsed = max(time.time() - t_start, 1e-9)
            bar.set_postfix(edges_s=f"{summary.observations / elapsed:,.0f}", refresh=False)
    finally:
        waited = time.time()
        work.put(None)
        thread.join()
        summary.store_wait_seconds += time.time() - waited
        bar.close()
    if failure:
        raise failure[0]


def _to_cpu(graph):
    from ingest.rdfa.tensors import Graph

    return Graph(graph.nodes.to("cpu"), graph.edges.to("cpu"), graph.direct.to("cpu"), graph.pruning)
