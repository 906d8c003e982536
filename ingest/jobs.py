"""Batch ingest: corpus -> tokens -> batches -> RDFA -> device aggregates -> windows -> spool -> compact -> publish.

Batches are cut from the whole corpus in a fixed order, so batch k holds the same prompts in
every process: ``--shard i/n`` takes batches k with k % n == i. A shard's batches are grouped into
windows of ``window`` prompts in that order. Each batch's graph is reduced on the device that ran
RDFA, the partial aggregates of a window merge on the device (compacted, and the window flushed
early, when they pass ``window_mem`` bytes), and the window is spooled to local disk as one file
(catalog.spool), which never waits on a database. So a killed job leaves whole windows, and
``--resume`` recomputes exactly the batches not spooled. When the job ends (for shards: the last to
end), the run's windows are compacted, each edge once (catalog.compact), and published into the store
in one go, insert-only (catalog.publish). Aggregates merge exactly (counts; sums in float64; evidence by
a total order), so the catalog does not depend on where windows were cut: a resumed, sharded or
windowed run stores what one uninterrupted process stores.
A writer thread spools one window while the next is computed; the summary reports how much of the
wall time went to waiting on the spool, compacting and publishing.
"""

from __future__ import annotations

import queue
import subprocess
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime

import catalog.spool
from catalog import __version__
from catalog.mined import mine_after_ingest
from catalog.publish import publish_run, remove_spooled
from catalog.publish_every import drop_orphans, drop_segments, publish_segment
from catalog.spool import Spool, default_spool, spooled_status
from catalog.stores.base import StoreUnavailable
from ingest.corpora import CorpusItem, open_corpus
from ingest.errors import UserFacingError
from ingest.job_options import (
    DEFAULT_WINDOW_MEM,
    JobOptions,
    JobSummary,
    RayOptions,
    parse_shard,
)
from ingest.model_with_saes import ModelWithSaes
from ingest.to_catalog import NodeSlots
from ingest.windows import compute_windows, count_written, cut_windows, node_slots

__all__ = ["DEFAULT_WINDOW_MEM", "JobOptions", "JobSummary", "RayOptions", "cut_windows", "parse_shard",
           "refuse_existing_run", "run_job"]


def tokenize(items: list[CorpusItem], session: ModelWithSaes, opts: JobOptions) -> tuple[list[tuple[CorpusItem, list[int]]], int]:
    """Token ids per item under the long-prompt policy; returns (kept, number skipped). A prompt with words
    the tokenizer reads as its unknown token says how many in its meta (``unknown_tokens``)."""
    limit = min(opts.max_tokens or session.lm.n_ctx, session.lm.n_ctx)
    kept, skipped = [], 0
    for item in items:
        ids = session.lm.tokenizer.encode(item.text)
        if unknown := session.lm.tokenizer.unknown(ids):
            item = replace(item, meta={**item.meta, "unknown_tokens": unknown})
        if len(ids) > limit:
            if opts.long_policy == "truncate":  # the stored text is what the kept tokens cover, not the whole line
                item = replace(item, text=session.lm.tokenizer.text_of_first(item.text, limit - 1),
                               meta={**item.meta, "truncated_from_tokens": len(ids)})
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


def run_job(session: ModelWithSaes, corpus_spec: str, store, opts: JobOptions, log=print) -> JobSummary:
    """Ingest ``corpus_spec`` under run ``opts.run``: spool its windows, then publish them into ``store``
    (a :class:`catalog.spool.Spool` given as ``store`` is the job array's folder: spooled, never published);
    see the module docstring."""
    t0 = time.time()
    spool = store if isinstance(store, Spool) else Spool(opts.spool or default_spool(store.url), store.evidence_per_edge)
    window = opts.window or catalog.spool.DEFAULT_WINDOW
    opts = replace(opts, window=window, tail_window=opts.tail_window or window)
    corpus = open_corpus(corpus_spec, session.lm.tokenizer, toy=session.lm.is_toy)
    items = corpus.items()[: opts.limit] if opts.limit else corpus.items()
    for bad in corpus.bad_lines[:20]:
        log(f"corpus line {bad.line}: {bad.reason} (skipped)")
    pairs, skipped_long = tokenize(items, session, opts)
    unknown = [item.meta["unknown_tokens"] for item, _ in pairs if "unknown_tokens" in item.meta]
    if unknown:
        log(f"{len(unknown)} prompt(s) hold {sum(unknown)} word(s) the tokenizer does not know, read as its "
            "unknown token; each prompt's meta counts its own (unknown_tokens)")
    batches = [pairs[k:k + opts.batch_size] for k in range(0, len(pairs), opts.batch_size)]
    mine = [b for k, b in enumerate(batches) if k % opts.shard[1] == opts.shard[0]]
    windows = cut_windows(mine, max(1, opts.window // opts.batch_size), max(1, opts.tail_window // opts.batch_size))
    manifest = {**session.manifest(), "code_version": code_version(), "pruning": opts.pruning.manifest(),
                "corpus": {"spec": corpus_spec, "fingerprint": corpus.fingerprint(), "n_items": len(corpus.items())},
                "batch_size": opts.batch_size, "window": opts.window, "tail_window": opts.tail_window, "limit": opts.limit,
                "long_policy": opts.long_policy,
                "max_tokens": opts.max_tokens, "evidence_per_edge": store.evidence_per_edge,
                "started": datetime.now(UTC).isoformat(timespec="seconds")}
    resuming = opts.resume or opts.shard[1] > 1
    _check_resume(store.run(opts.run), opts, manifest)
    if spool is not store:
        if not resuming:  # a new run: what an earlier job of that name spooled (its catalog since deleted) is not its
            remove_spooled(spool, opts.run)
        _check_resume(spool.run(opts.run), opts, manifest)
        store.start_run(opts.run, manifest, resume=resuming)
        if getattr(store, "queryable", True):
            drop_orphans(store)
    spool.start_run(opts.run, manifest, resume=resuming or spool is not store)
    done = (store.done_prompts(opts.run) if resuming else set()) | spool.done_prompts(opts.run)
    todo = [w for w in ([b for b in window if not _stored(b, done)] for window in windows) if w]
    summary = JobSummary(opts.run, skipped_long=skipped_long, bad_lines=len(corpus.bad_lines),
                         unknown_tokens=sum(unknown), prompts_with_unknown_tokens=len(unknown),
                         skipped_done=sum(item.prompt_id in done for b in mine for item, _ in b))
    target = _Sequenced(spool, {item.prompt_id: i for i, (item, _) in enumerate(pairs)},
                        _Segments(spool, store, opts, log) if _segmented(opts) and spool is not store else None)
    try:
        if opts.executor == "ray":
            from ingest.ray_executor import run_on_ray

            run_on_ray(target, todo, corpus.spec, opts, summary)
        else:
            _pipeline(session, target, todo, corpus.spec, node_slots(session), opts, summary)
        status = "done" if opts.shard[1] == 1 else f"shard {opts.shard[0]}/{opts.shard[1]} done"
        updates = {"finished": datetime.now(UTC).isoformat(timespec="seconds"),
                   "counts" + ("" if opts.shard[1] == 1 else f"_shard{opts.shard[0]}"): summary.as_dict(),
                   "bad_lines": [{"line": b.line, "reason": b.reason} for b in corpus.bad_lines[:100]]}
        published = False
        if spool is store:  # a job array's folder: `merge` publishes it
            spool.finish_run(opts.run, status, updates)
        elif opts.shard[1] == 1:
            _publish_spooled(spool, store, opts, summary, log)
            summary.seconds = time.time() - t0
            # done: queries read the run whole from here on, not its segments, which then go
            store.finish_run(opts.run, "done", {**updates, "counts": summary.as_dict(), "segments": []})
            if drop_segments(store, opts.run):
                log(f"run {opts.run!r} published whole; its segments are dropped")
            remove_spooled(spool, opts.run)
            published = True
        else:  # the catalog marks the shard done before the spool does: the shard that publishes marks the run last
            store.finish_run(opts.run, status, updates)
            spool.finish_run(opts.run, status, updates)
            published = _publish_if_complete(spool, store, opts, summary, log)
    except BaseException as exc:
        summary.seconds = time.time() - t0
        _mark_failed(store, opts.run, exc, log)
        log(f"run {opts.run!r}: {summary.prompts} prompt(s) spooled in this job before it stopped, kept in "
            f"{spool.run_dir(opts.run)}; the same command with --resume continues from there")
        raise
    summary.seconds = time.time() - t0
    if spool is not store and not published:
        log(f"shard {opts.shard[0]}/{opts.shard[1]} spooled in {spool.run_dir(opts.run)}; the run is published "
            "when its last shard ends")
    if opts.mine and published and not getattr(store, "queryable", True):
        log(f"run {opts.run!r} is written as import files ({store.url}); `circuit-catalog mine` stores its patterns "
            "once the database is imported")
    elif opts.mine and spool is not store and published:
        try:
            for runs, seconds in mine_after_ingest(store, opts.run):
                summary.mining_seconds += seconds
                log(f"mined the composition patterns of {', '.join(runs)} in {seconds:.1f} s (stored for the API)")
        except KeyboardInterrupt:
            log(f"run {opts.run!r} is stored and done; mining its patterns was interrupted: "
                f"`circuit-catalog mine --run {opts.run} --store {store.url}` stores them")
            raise
    return summary


class _Sequenced:
    """The spool as the compute loop writes to it: each window stamped with its place in the corpus (the
    corpus position of its first prompt), so a compaction lays the run out in corpus order; then, with
    ``--publish-every``, a segment published when one is due."""

    def __init__(self, spool: Spool, positions: dict[str, int], segments: _Segments | None = None):
        self.spool, self.positions, self.evidence_per_edge = spool, positions, spool.evidence_per_edge
        self.segments = segments

    def write_window(self, agg) -> bool:
        agg.seq = self.positions[agg.prompts[0].prompt_id] if agg.prompts else -1
        written = bool(self.spool.write_window(agg))
        if self.segments is not None:
            self.segments.spooled(len(agg.prompts))
        return written


def _segmented(opts: JobOptions) -> bool:
    return opts.publish_every_prompts is not None or opts.publish_every_seconds is not None


class _Segments:
    """When the next segment is due: every ``publish_every_prompts`` prompts spooled or ``publish_every_seconds``."""

    def __init__(self, spool: Spool, store, opts: JobOptions, log):
        self.spool, self.store, self.opts, self.log = spool, store, opts, log
        self.prompts, self.since = 0, time.monotonic()

    def spooled(self, prompts: int) -> None:
        self.prompts += prompts
        every_n, every_s = self.opts.publish_every_prompts, self.opts.publish_every_seconds
        if (every_n is not None and self.prompts >= every_n) or (
                every_s is not None and time.monotonic() - self.since >= every_s):
            publish_segment(self.spool, self.opts.run, self.store, mem=self.opts.compact_mem,
                            workers=self.opts.compact_workers, log=self.log)
            self.prompts, self.since = 0, time.monotonic()


def _publish_if_complete(spool: Spool, store, opts: JobOptions, summary: JobSummary, log) -> bool:
    """After a shard ended: publish the run if every shard has (one publisher: the rest find it published)."""
    if spooled_status([f["status"] for f in spool.finishes(opts.run)]) != "done":
        return False
    _publish_spooled(spool, store, opts, summary, log)
    store.finish_run(opts.run, "done", {"published_by_shard": opts.shard[0]})
    remove_spooled(spool, opts.run)
    return True


def _publish_spooled(spool: Spool, store, opts: JobOptions, summary: JobSummary, log) -> None:
    waited = time.time()
    report = publish_run(spool, opts.run, store, mem=opts.compact_mem, workers=opts.compact_workers, log=log,
                         remove=True)
    summary.edges += report["edges_published"]
    summary.compact_seconds += report["compact_seconds"]
    summary.publish_seconds += report["publish_seconds"]
    summary.store_wait_seconds += time.time() - waited


def _mark_failed(store, run: str, exc: BaseException, log) -> None:
    why = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"[:500]
    if isinstance(exc, StoreUnavailable):  # asking it again would only wait out the driver's retries again
        log(f"run {run!r} could not be marked failed: its store stopped answering; it stays 'running'")
        return
    try:
        store.finish_run(run, "failed", {"error": why})
    except Exception as also:  # noqa: BLE001 - the store may be what failed; the first error is the one to tell
        log(f"run {run!r} could not be marked failed ({type(also).__name__}); it stays 'running'")


def refuse_existing_run(store, opts: JobOptions) -> None:
    """The refusal start_run gives a run that exists and is neither resumed nor sharded, asked before
    the model loads (a TransformerLens import alone is ~12 s); start_run still decides under its lock."""
    old = store.run(opts.run)
    if old is not None and not (opts.resume or opts.shard[1] > 1):
        raise UserFacingError(f"run {opts.run!r} already exists in {store.url} (status {old.status}); pass --resume "
                              "to continue it or choose another --run")


def _check_resume(old, opts: JobOptions, manifest: dict) -> None:
    """A resumed run (``old``: as its catalog or spool has it) must cut the same batches from the same corpus,
    or the catalog would differ."""
    if old is None or not (opts.resume or opts.shard[1] > 1):
        return
    for key in ("batch_size", "limit", "long_policy", "max_tokens", "pruning", "evidence_per_edge"):
        if old.manifest.get(key) != manifest.get(key):
            raise UserFacingError(f"run {opts.run!r} was started with {key}={old.manifest.get(key)!r}; "
                                  f"this job has {manifest.get(key)!r}. Resume with the same options")
    if old.manifest.get("corpus", {}).get("fingerprint") != manifest["corpus"]["fingerprint"]:
        raise UserFacingError(f"run {opts.run!r} was started on a different corpus (fingerprint differs)")
    was, now = _loaded(old.manifest), _loaded(manifest)
    if was["model"] != now["model"]:
        raise UserFacingError(f"run {opts.run!r} was started with model {was['model']}; this job loaded "
                              f"{now['model']}. Resume with the same --model")
    if was["saes"] != now["saes"]:
        gone, new = sorted(set(was["saes"]) - set(now["saes"])), sorted(set(now["saes"]) - set(was["saes"]))
        raise UserFacingError(f"run {opts.run!r} was started with other SAEs (only in the run: {', '.join(gone[:3]) or '-'}; "
                              f"only in this job: {', '.join(new[:3]) or '-'}). Resume with the same --saes")


def _loaded(manifest: dict) -> dict:
    """What a run's numbers depend on beyond its options: the model (name, snapshot) and each SAE (key,
    weights hash)."""
    model = manifest.get("model", {})
    return {"model": f"{model.get('name')!r} (revision {model.get('revision')!r})",
            "saes": sorted(f"{s.get('key')} ({str(s.get('weights_hash'))[:12]})" for s in manifest.get("saes", []))}


def _stored(batch, done: set[str]) -> bool:
    """Whether a batch is stored; windows hold whole batches, so a part-stored one is a foreign run."""
    stored = [item.prompt_id in done for item, _ in batch]
    if any(stored) and not all(stored):
        raise UserFacingError(f"a batch is only partly stored ({sum(stored)} of {len(stored)} prompts, from "
                              f"{batch[0][0].prompt_id!r}); was the run written with another --batch-size?")
    return all(stored)


def _pipeline(session: ModelWithSaes, store, todo, corpus_spec: str, slots: NodeSlots, opts: JobOptions,
              summary: JobSummary) -> None:
    """Compute and reduce on this thread, write on a writer thread, with a bounded queue between."""
    from tqdm import tqdm

    work: queue.Queue = queue.Queue(maxsize=opts.queue_size)
    failure: list[BaseException] = []

    def writer() -> None:
        while (agg := work.get()) is not None:
            if failure:
                continue
            try:
                if store.write_window(agg):
                    count_written(summary, agg)
            except BaseException as exc:  # surfaced on the compute thread
                failure.append(exc)

    def put(agg) -> None:
        waited = time.time()
        work.put(agg)
        summary.store_wait_seconds += time.time() - waited

    thread = threading.Thread(target=writer, name="catalog-writer", daemon=True)
    thread.start()
    bar = tqdm(total=sum(len(b) for w in todo for b in w), unit="prompt", disable=not opts.progress,
               dynamic_ncols=True)
    try:
        for batches in todo:
            for agg in compute_windows(session, batches, corpus_spec, slots, opts, store.evidence_per_edge,
                                       after_batch=lambda k, batches=batches: bar.update(len(batches[k]))):
                if failure:
                    break
                put(agg)
            if failure:
                break
    finally:
        waited = time.time()
        work.put(None)
        thread.join()
        summary.store_wait_seconds += time.time() - waited
        bar.close()
    if failure:
        raise failure[0]
