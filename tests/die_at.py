"""Run the circuit-catalog CLI and SIGKILL this very process at a point the caller names: a real
kill -9, at a moment the test controls rather than one found by polling.

    python tests/die_at.py flush N -- ARGS...   inside the N-th window's store transaction
                                               (after its prompts, nodes, stats, heads and roles were written)
    python tests/die_at.py batch N -- ARGS...   before reducing the N-th batch, once the windows
                                               before it are stored (dies computing, not writing)
"""

from __future__ import annotations

import os
import signal
import sys
import time


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    point, n, sep, *args = sys.argv[1:]
    assert sep == "--", "usage: die_at.py flush|batch N -- ARGS"
    calls = [0]
    if point == "flush":
        from catalog.stores.neo4j import Neo4jStore
        from catalog.stores.sqlite import SqliteStore

        for cls in (SqliteStore, Neo4jStore):
            def write_evidence(self, *a, _real=cls._write_evidence, **k):
                calls[0] += 1
                if calls[0] == int(n):
                    die()
                return _real(self, *a, **k)

            cls._write_evidence = write_evidence
    elif point == "batch":
        import ingest.windows as windows
        from catalog.stores import open_store

        url, run = args[args.index("--store") + 1], args[args.index("--run") + 1]
        batch_size, window = int(args[args.index("--batch-size") + 1]), int(args[args.index("--window") + 1])

        def reduce_batch(*a, _real=windows.reduce_batch, **k):
            calls[0] += 1
            if calls[0] == int(n):
                stored_before = (int(n) - 1) // (window // batch_size) * window
                deadline = time.time() + 120
                while len(open_store(url).done_prompts(run)) < stored_before and time.time() < deadline:
                    time.sleep(0.05)
                die()
            return _real(*a, **k)

        windows.reduce_batch = reduce_batch
    else:
        raise SystemExit(f"unknown point {point!r}")
    from cli import app

    app(args, prog_name="circuit-catalog")


if __name__ == "__main__":
    main()
