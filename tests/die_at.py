"""Run the circuit-catalog CLI and SIGKILL this very process at a point the caller names: a real
kill -9, at a moment the test controls rather than one found by polling.

    python tests/die_at.py spool N -- ARGS...     while spooling the N-th window (its file half written,
                                                  not renamed into place)
    python tests/die_at.py batch N -- ARGS...     before reducing the N-th batch, once the windows
                                                  before it are spooled (dies computing, not writing)
    python tests/die_at.py compact N -- ARGS...   compacting, once N partitions are compacted
    python tests/die_at.py publish N -- ARGS...   publishing, once the N-th partition is written (inside
                                                  SQLite's one transaction; after Neo4j's committed batches)
    python tests/die_at.py segment N -- ARGS...   once the N-th segment of --publish-every is stored, before
                                                  the run lists it (queries do not see it yet)
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    point, n, sep, *args = sys.argv[1:]
    assert sep == "--", "usage: die_at.py spool|batch|compact|publish|segment N -- ARGS"
    calls = [0]

    def nth() -> bool:
        calls[0] += 1
        return calls[0] == int(n)

    if point == "spool":
        import numpy as np

        import catalog.spool as spool

        def savez(fh, *a, _real=np.savez, **k):
            _real(fh, *a, **k)
            if nth():
                fh.flush()
                die()

        spool.np.savez = savez  # type: ignore[attr-defined]
    elif point == "batch":
        import ingest.windows as windows
        from catalog.spool import Spool, default_spool

        url, run = args[args.index("--store") + 1], args[args.index("--run") + 1]
        batch_size, window = int(args[args.index("--batch-size") + 1]), int(args[args.index("--window") + 1])

        def reduce_batch(*a, _real=windows.reduce_batch, **k):
            if nth():
                spooled_before = (int(n) - 1) // (window // batch_size) * window
                deadline = time.time() + 120
                while (len(Spool(default_spool(url), None).done_prompts(run)) < spooled_before
                       and time.time() < deadline):
                    time.sleep(0.05)
                die()
            return _real(*a, **k)

        windows.reduce_batch = reduce_batch
    elif point == "compact":
        import catalog.compact as compact

        def compact_part(lay, k: int, out: Path, _real=compact.compact_part) -> None:
            _real(lay, k, out)
            if nth():
                die()

        compact.compact_part = compact_part
    elif point == "publish":
        from catalog.stores.neo4j_publish import Neo4jPublish
        from catalog.stores.sqlite_write import SqliteWrites

        def sqlite_part(self, *a, _real=SqliteWrites._write_aggregate, **k):
            _real(self, *a, **k)
            if nth():
                die()

        def neo4j_part(self, *a, _real=Neo4jPublish._publish_part, **k):
            written = _real(self, *a, **k)
            if nth():
                die()
            return written

        SqliteWrites._write_aggregate = sqlite_part
        Neo4jPublish._publish_part = neo4j_part
    elif point == "segment":  # once the N-th segment's rows are stored, before its run lists it
        import catalog.publish_every as segments

        def finish_run(store, _real):
            def hooked(run_id, status, updates):
                if "segments" in updates and updates["segments"] and nth():
                    die()
                return _real(run_id, status, updates)
            return hooked

        def publish_segment(spool, run, store, *a, _real=segments.publish_segment, **k):
            store.finish_run = finish_run(store, store.finish_run)
            try:
                return _real(spool, run, store, *a, **k)
            finally:
                del store.finish_run

        import ingest.jobs

        ingest.jobs.publish_segment = publish_segment
    else:
        raise SystemExit(f"unknown point {point!r}")
    from cli import app

    app(args, prog_name="circuit-catalog")


if __name__ == "__main__":
    main()
