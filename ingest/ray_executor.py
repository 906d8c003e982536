"""``ingest --executor ray``: RDFA on a Ray cluster, one spool writer.

Each RDFA worker is a Ray actor holding the model and SAEs, loaded once (one per GPU with
``--gpus-per-worker 1``, or CPU workers). The driver hands out windows (the same deterministic cut of
the corpus a local run makes) through Ray's ``ActorPool.map_unordered``: each actor computes a whole
window (RDFA + the device reduction) and returns its columnar aggregate through the object store,
and the driver, the only writer, spools each as it arrives (catalog.spool); the job publishes the spool
when every window is in. So a window is spooled once, whole, whatever the number of GPUs.

Why actors and ActorPool rather than Ray Data: the unit of work is a window of whole batches whose
aggregate must reach a single transactional writer in one piece, and workers must keep a model
loaded; an actor pool gives exactly that with no dataset materialisation. A worker that dies is
restarted by Ray (``max_restarts``) and its window retried (``max_task_retries``); a window's result
is spooled only when it arrives, so a lost window is recomputed, never spooled twice (and a spool
write is idempotent per prompt set anyway). Kill the driver and ``--resume``: the windows already
spooled are skipped, as in a local run.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from ingest.job_options import JobOptions, JobSummary
from ingest.windows import compute_windows, count_written, node_slots

DIE_ONCE_ENV = "CIRCUIT_CATALOG_RAY_DIE_ONCE"  # test hook: a marker path; the first worker to see it missing dies


def _die_once_after_first_batch(k: int) -> None:
    """Test hook: simulate a worker lost mid-window (after its first batch), exactly once per marker."""
    marker = os.environ.get(DIE_ONCE_ENV)
    if k == 0 and marker and not Path(marker).exists():
        Path(marker).write_text(str(os.getpid()))
        os._exit(1)


class RdfaWorker:
    """A Ray actor: the model and SAEs loaded once; turns windows of batches into aggregates."""

    def __init__(self, model: str, saes: list[str], device: str | None, threads: int, transcoders: list[str] = ()):
        from ingest.model_with_saes import ModelWithSaes
        from ingest.runtime import configure_threads

        configure_threads(threads)
        self.session = ModelWithSaes.open(model, saes, device, transcoder_specs=list(transcoders))
        self.slots = node_slots(self.session)

    def window(self, batches: list, corpus_spec: str, opts: JobOptions, cap: int | None) -> list[Any]:
        return list(compute_windows(self.session, batches, corpus_spec, self.slots, opts, cap,
                                    after_batch=_die_once_after_first_batch))


def run_on_ray(store: Any, todo: list, corpus_spec: str, opts: JobOptions, summary: JobSummary) -> None:
    """Compute ``todo`` (windows of batches) on Ray workers; spool every result here (``store``: the job's
    spool writer), one at a time."""
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        from ingest.errors import UserFacingError

        raise UserFacingError("--executor ray needs Ray: pip install 'circuit-catalog[ray]'") from None
    from tqdm import tqdm

    cfg = opts.ray
    assert cfg is not None, "executor ray needs RayOptions"
    # Ray prints its workers' and raylet's messages (a retried task, say) to stdout; a job's stdout is its
    # JSON summary, so they go to stderr while Ray runs here.
    with contextlib.redirect_stdout(sys.stderr):
        _run(ray, ActorPool, tqdm, cfg, store, todo, corpus_spec, opts, summary)


def _run(ray: Any, ActorPool: Any, tqdm: Any, cfg: Any, store: Any, todo: list, corpus_spec: str, opts: JobOptions,
         summary: JobSummary) -> None:
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=cfg.address, include_dashboard=False, log_to_driver=False,
                 **({} if cfg.address else {"num_cpus": max(cfg.workers * cfg.threads_per_worker, 1)}))
    device = "cuda" if cfg.gpus_per_worker > 0 else "cpu"
    actor = ray.remote(num_cpus=cfg.threads_per_worker, num_gpus=cfg.gpus_per_worker, max_restarts=-1,
                       max_task_retries=-1)(RdfaWorker)
    workers = [actor.remote(cfg.model, cfg.saes, device, cfg.threads_per_worker, cfg.transcoders) for _ in range(cfg.workers)]
    pool = ActorPool(workers)
    bar = tqdm(total=sum(len(b) for w in todo for b in w), unit="prompt", disable=not opts.progress,
               dynamic_ncols=True)
    cap = store.evidence_per_edge
    try:
        results = pool.map_unordered(lambda w, batches: w.window.remote(batches, corpus_spec, opts, cap), todo)
        for aggs in results:
            waited = time.time()
            for agg in aggs:
                if store.write_window(agg):
                    count_written(summary, agg)
                bar.update(len(agg.prompts))
            summary.store_wait_seconds += time.time() - waited
    finally:
        bar.close()
        for w in workers:
            ray.kill(w)
        if started_here:
            ray.shutdown()
