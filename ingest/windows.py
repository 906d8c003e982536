"""One window of a job: RDFA and the device reduction of its batches into a WindowAggregate (``compute_windows``),
and where windows are cut (``cut_windows``). Used by the local job and by Ray workers alike."""

from __future__ import annotations

from collections.abc import Iterator

from catalog.aggregate import WindowAggregate
from catalog.schema import Prompt
from ingest.corpora import CorpusItem, content_hash
from ingest.job_options import JobOptions, JobSummary
from ingest.model_with_saes import ModelWithSaes
from ingest.reduce import Partial, merge, reduce_batch
from ingest.roles import PromptPositions, role_rows
from ingest.to_catalog import NodeSlots, SaeKeys, observations, prompt_ranks, to_window


def prompt_record(run: str, item: CorpusItem, ids: list[int], session: ModelWithSaes, corpus_spec: str) -> Prompt:
    tokens = session.lm.tokenizer.spell(ids)
    meta = dict(item.meta)
    if "io" in meta and "s" in meta:
        from ingest.ioi import name_positions

        meta.update(name_positions(tokens, meta["io"], meta["s"]))
    return Prompt(f"{run}/{item.prompt_id}", run, item.prompt_id, item.text, tokens, corpus_spec,
                  content_hash(item.text), meta)


def cut_windows(batches: list, per_window: int, min_tail: int = 1) -> list[list]:
    """Consecutive batches grouped into windows of ``per_window``, except at the end: once fewer than
    two full windows are left, each window takes half of what is left (rounded up), down to
    ``min_tail`` batches (or what is left). Why: the writer stores a window while the next is
    computed, so only the last window's write is never overlapped; a halving tail makes that write
    small where a write costs about its window's size (SQLite: one batch; the demo's store wait 19% ->
    docs/performance-log.md). Where a write costs about the same whatever the window (Neo4j rewrites every edge a
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


def node_slots(session: ModelWithSaes) -> NodeSlots:
    saes = session.saes
    keyed = lambda bucket: {l: (s.key, s.weights.d_sae) for l, s in bucket.items()}  # noqa: E731
    keys = SaeKeys(keyed(saes.attn), keyed(saes.resid), keyed(saes.transcoders))
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
        part.ev_prompt = part.ev_prompt - self.first  # rows of the prompts this flush writes
        part.top_prompt = part.top_prompt - self.first
        agg = to_window(part, slots.infos, slots.size, run, self.prompts[self.first:self.end], self.cap,
                        self.observations)
        self.parts, self.first, self.observations = [], self.end, 0
        return agg


def compute_windows(session: ModelWithSaes, batches: list, corpus_spec: str, slots: NodeSlots, opts: JobOptions,
                    cap: int | None, after_batch=None) -> Iterator[WindowAggregate]:
    """RDFA and the device reduction of one window's batches: yields its aggregate (more than one
    when ``window_mem`` forces an early flush). ``after_batch(k)`` runs after batch k (a test hook)."""
    prompts = [prompt_record(opts.run, item, ids, session, corpus_spec) for b in batches for item, ids in b]
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
    summary.windows += 1
