"""Ray scaling: toy-ioi ingest of one corpus into a fresh SQLite catalog with the local executor, and
with --executor ray on a local cluster with 1 and 2 CPU workers (1 torch thread each), side by side
in one run. Prints wall seconds and prompts/s (Ray's start-up and each worker's model load included),
and the scaling efficiency from 1 to 2 workers: (prompts/s at 2) / (2 x prompts/s at 1).
Usage: python bench/ray_scaling.py [--prompts 192] [--batch-size 8] [--window 32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def ingest(store: str, prompts: int, batch: int, window: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "cli", "ingest", "--model", "toy-ioi", "--saes", "toy-ioi", "--corpus",
           f"ioi:{prompts}", "--store", store, "--run", "bench", "--batch-size", str(batch), "--window", str(window),
           "--no-progress", "--threads", "1", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--window", type=int, default=32)
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("local", []), ("ray, 1 worker", ["--executor", "ray", "--workers", "1"]),
                            ("ray, 2 workers", ["--executor", "ray", "--workers", "2"])):
            s = ingest(f"sqlite:///{tmp}/{len(rows)}.db", args.prompts, args.batch_size, args.window, extra)
            rows[name] = (s["seconds"], s["prompts"] / s["seconds"], s["store_wait_share"])
    print(f"toy-ioi ioi:{args.prompts}, batch {args.batch_size}, window {args.window}, SQLite:")
    for name, (sec, rate, wait) in rows.items():
        print(f"  {name:<15} {sec:6.1f} s  {rate:6.2f} prompts/s  writer busy {wait:.0%}")
    eff = rows["ray, 2 workers"][1] / (2 * rows["ray, 1 worker"][1])
    print(f"scaling efficiency 1 -> 2 workers: {eff:.2f}")


if __name__ == "__main__":
    main()
