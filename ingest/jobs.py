"""Batch ingest: corpus -> tokens -> batches -> RDFA -> device aggregates -> windows -> writer -> store.

Batches are cut from the whole corpus in a fixed order, so batch k holds the same prompts in
every process: ``--shard i/n`` takes batches k with k % n == i. A shard's batches are grouped into
windows of ``window`` prompts in that order. Each batch's graph is reduced on the device that ran
RDFA, the partial aggregates of a window merge on the device (compacted, and the window flushed
early, when they pass ``window_mem`` bytes), and the window goes to the store as one all-or-nothing
write of whole batches. So a killed job leaves whole batches, and ``--resume`` recomputes exactly
the batches not stored. Aggregates merge exactly (counts; sums in float64; evidence by a total
order), so the catalog does not depend on where windows were cut: a resumed, sharded or windowed
run stores what one uninterrupted process stores.
A writer thread writes one window while the next is computed; the summary reports how much of
the wall time the compute loop spent waiting on the store.
"""

from __future__ import annotations

import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from catalog import __version__
from catalog.aggregate import WindowAggregate
from catalog.mined import mine_after_ingest
from catalog.schema import Prompt
from catalog.stores.base import StoreUnavailable
from ingest.corpora import CorpusItem, content_hash, open_corpus
from ingest.errors import UserFacingError
from ingest.rdfa.tensors import Pruning
from ingest.reduce import Partial, merge, reduce_batch
from ingest.roles import PromptPositions, role_rows
from ingest.session import ModelWithSaes
from ingest.to_catalog import NodeSlots, SaeKeys, observations, prompt_ranks, to_window

DEFAULT_WINDOW_MEM = 2 << 30  # bytes of device aggregates before a window is compacted or flushed early


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
    queue_size: int = 1  # windows waiting for the writer (each holds its host copy)
    progress: bool = True
    window: int | None = None  # prompts per store write; None: the store's default_window
    window_mem: int = DEFAULT_WINDOW_MEM  # bytes of device aggregates a window may hold
    window_edges: int | None = None  # edges a window may hold before it is flushed early; None: the store's bound
    tail_window: int | None = None  # prompts below which the last windows stop halving; None: the store's
    executor: str = "local"  # local | ray
    ray: RayOptions | None = None  # with executor "ray"
    mine: bool = True  # mine and store composition patterns when the run is done (catalog.mined)


@dataclass
class RayOptions:
    address: str | None = None  # None: start a local cluster; "auto" or HOST:PORT: join one
    workers: int = 2  # RDFA workers (actors), each with the model and SAEs loaded once
    gpus_per_worker: float = 0.0  # 0: CPU workers
    threads_per_worker: int = 1
    model: str = ""  # what each worker loads (the driver's own session only tokenizes)
    saes: list[str] = field(default_factory=list)


@dataclass
class JobSummary:
    run: str
    prompts: int = 0
    skipped_long: int = 0
    skipped_done: int = 0
    bad_lines: int = 0
    unknown_tokens: int = 0  # words the tokenizer does not know, read as <unk> (each prompt's meta counts its own)
    prompts_with_unknown_tokens: int = 0
    observations: int = 0
    edges: int = 0  # edge rows written (an edge recurring in several windows counts once per window)
    windows: int = 0
    seconds: float = 0.0  # ingest, from start to the run's finish (mining excluded)
    store_wait_seconds: float = 0.0
    mining_seconds: float = 0.0  # mining the run's composition patterns afterwards (catalog.mined)

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


def _prompt(run: str, item: CorpusItem, ids: list[int], session: ModelWithSaes, corpus_spec: str) -> Prompt:
    tokens = session.lm.tokenizer.spell(ids)
    meta = dict(item.meta)
    if "io" in meta and "s" in meta:
        from ingest.ioi import name_positions

        meta.update(name_positions(tokens, meta["io"], meta["s"]))
    return Prompt(f"{run}/{item.prompt_id}", run, item.prompt_id, item.text, tokens, corpus_spec,
                  content_hash(item.text), meta)


def run_job(session: ModelWithSaes, corpus_spec: str, store, opts: JobOptions, log=print) -> JobSummary:
    """Ingest ``corpus_spec`` into ``store`` under run ``opts.run``; see the module docstring."""
    t0 = time.time()
    if opts.window_edges is None:
        opts = replace(opts, window_edges=store.max_window_edges)
    if opts.window is None:
        opts = replace(opts, window=store.default_window)
    if opts.tail_window is None:
        opts = replace(opts, tail_window=store.tail_window)
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
    _check_resume(store, opts, manifest)
    store.start_run(opts.run, manifest, resume=opts.resume or opts.shard[1] > 1)
    done = store.done_prompts(opts.run) if (opts.resume or opts.shard[1] > 1) else set()
    todo = [w for w in ([b for b in window if not _stored(b, done)] for window in windows) if w]
    summary = JobSummary(opts.run, skipped_long=skipped_long, bad_lines=len(corpus.bad_lines),
                         unknown_tokens=sum(unknown), prompts_with_unknown_tokens=len(unknown),
                         skipped_done=sum(item.prompt_id in done for b in mine for item, _ in b))
    try:
        if opts.executor == "ray":
            from ingest.ray_executor import run_on_ray

            run_on_ray(store, todo, corpus.spec, opts, summary)
        else:
            _pipeline(session, store, todo, corpus.spec, node_slots(session), opts, summary)
    except BaseException as exc:
        summary.seconds = time.time() - t0
        why = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"[:500]
        if isinstance(exc, StoreUnavailable):  # asking it again would only wait out the driver's retries again
            log(f"run {opts.run!r} could not be marked failed: its store stopped answering; it stays 'running'")
        else:
            try:
                store.finish_run(opts.run, "failed", {"error": why})
            except Exception as also:  # noqa: BLE001 - the store may be what failed; the first error is the one to tell
                log(f"run {opts.run!r} could not be marked failed ({type(also).__name__}); it stays 'running'")
        log(f"run {opts.run!r}: {summary.prompts} prompt(s) stored in this job before it stopped; the same command "
            "with --resume continues from there")
        raise
    summary.seconds = time.time() - t0
    status = "done" if opts.shard[1] == 1 else f"shard {opts.shard[0]}/{opts.shard[1]} done"
    store.finish_run(opts.run, status, {
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "counts" + ("" if opts.shard[1] == 1 else f"_shard{opts.shard[0]}"): summary.as_dict(),
        "bad_lines": [{"line": b.line, "reason": b.reason} for b in corpus.bad_lines[:100]]})
    if opts.mine and opts.shard[1] == 1:
        try:
            for runs, seconds in mine_after_ingest(store, opts.run):
                summary.mining_seconds += seconds
                log(f"mined the composition patterns of {', '.join(runs)} in {seconds:.1f} s (stored for the API)")
        except KeyboardInterrupt:
            log(f"run {opts.run!r} is stored and done; mining its patterns was interrupted: "
                f"`circuit-catalog mine --run {opts.run} --store {store.url}` stores them")
            raise
    elif opts.mine:
        log(f"shard done; once every shard is, `circuit-catalog mine --run {opts.run}` stores its patterns")
    return summary


def cut_windows(batches: list, per_window: int, min_tail: int = 1) -> list[list]:
    """Consecutive batches grouped into windows of ``per_window``, except at the end: once fewer than
    two full windows are left, each window takes half of what is left (rounded up), down to
    ``min_tail`` batches (or what is left). Why: the writer stores a window while the next is
    computed, so only the last window's write is never overlapped; a halving tail makes that write
    small where a write costs about its window's size (SQLite: one batch; the demo's store wait 19% ->
    see README). Where a write costs about the same whatever the window (Neo4j rewrites every edge a
    window touches, and a corpus's edges saturate), halves smaller than ``min_tail`` would each cost a
    full write and leave the compute waiting. Where windows are cut never changes the catalog (merges
    are exact), and the cut depends only on the batch list, so a resumed or sharded job cuts alike."""
    windows, k = [], 0
    while k < len(batches):
        left = len(batches) - k
        size = per_window if left >= 2 * per_window else min(per_window, max((left + 1) // 2, min_tail), left)
        windows.append(batches[k:k + size])
        k += size
    return windows


def refuse_existing_run(store, opts: JobOptions) -> None:
    """The refusal start_run gives a run that exists and is neither resumed nor sharded, asked before
    the model loads (a TransformerLens import alone is ~12 s); start_run still decides under its lock."""
    old = store.run(opts.run)
    if old is not None and not (opts.resume or opts.shard[1] > 1):
        raise UserFacingError(f"run {opts.run!r} already exists in {store.url} (status {old.status}); pass --resume "
                              "to continue it or choose another --run")


def _check_resume(store, opts: JobOptions, manifest: dict) -> None:
    """A resumed run must cut the same batches from the same corpus, or the catalog would differ."""
    old = store.run(opts.run)
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


def node_slots(session: ModelWithSaes) -> NodeSlots:
    saes = session.saes
    keys = SaeKeys({l: (s.key, s.weights.d_sae) for l, s in saes.attn.items()},
                   {l: (s.key, s.weights.d_sae) for l, s in saes.resid.items()})
    return NodeSlots(session.lm.name, session.lm.cfg.n_layers, keys, session.lm.cfg.n_heads)


class _Window:
    """The partial aggregates of the window being computed, on the device."""

    def __init__(self, prompts: list[Prompt], device, cap: int | None, mem: int, max_edges: int | None):
        self.prompts, self.rank, self.cap, self.mem = prompts, prompt_ranks(prompts, device), cap, mem
        self.max_edges = max_edges
        self.parts: list[Partial] = []
        self.first = 0  # window row of the first prompt not flushed yet
        self.end = 0  # window row after the last prompt reduced
        self.observations = 0

    def add(self, part: Partial, n_prompts: int, n_observations: int) -> bool:
        """Add a batch's partial; True when the window should be flushed early (memory, or more
        edges than the store takes in one write)."""
        self.parts.append(part)
        self.end += n_prompts
        self.observations += n_observations
        too_many = self.max_edges is not None and sum(len(p.edge_key) for p in self.parts) > self.max_edges
        if too_many or sum(p.nbytes for p in self.parts) > self.mem // 2:
            self.parts = [merge(self.parts, self.rank, self.cap)]
            return self.parts[0].nbytes > self.mem // 2 or (
                self.max_edges is not None and len(self.parts[0].edge_key) > self.max_edges)
        return False

    def flush(self, slots: NodeSlots, run: str):
        part = merge(self.parts, self.rank, self.cap)
        part.ev_prompt = part.ev_prompt - self.first
        agg = to_window(part, slots.infos, slots.size, run, self.prompts[self.first:self.end], self.cap,
                        self.observations)
        self.parts, self.first, self.observations = [], self.end, 0
        return agg


def compute_windows(session: ModelWithSaes, batches: list, corpus_spec: str, slots: NodeSlots, opts: JobOptions,
                    cap: int | None, after_batch=None) -> Iterator[WindowAggregate]:
    """RDFA and the device reduction of one window's batches: yields its aggregate (more than one
    when ``window_mem`` forces an early flush). ``after_batch(k)`` runs after batch k (a test hook)."""
    prompts = [_prompt(opts.run, item, ids, session, corpus_spec) for b in batches for item, ids in b]
    window = _Window(prompts, session.device, cap, opts.window_mem, opts.window_edges)
    positions = PromptPositions.of(prompts, session.device)
    for k, batch in enumerate(batches):
        _, graph = session.attribute([ids for _, ids in batch], opts.pruning)
        obs, acts = observations(graph, slots, window.end)
        obs.role_row, obs.role_code = role_rows(obs.prompt, obs.head, obs.src_pos, obs.dst_pos, positions)
        part = reduce_batch(obs, acts, window.rank, slots.size, cap)
        if window.add(part, len(batch), len(obs.value)):
            yield window.flush(slots, opts.run)
        if after_batch is not None:
            after_batch(k)
    if window.parts:
        yield window.flush(slots, opts.run)


def count_written(summary: JobSummary, agg: WindowAggregate) -> None:
    summary.prompts += len(agg.prompts)
    summary.observations += agg.observations
    summary.edges += len(agg.edges)
    summary.windows += 1


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
