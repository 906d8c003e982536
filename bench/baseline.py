"""Today's path, side by side: the ingest of main before the columnar write path (issue 11's "today",
commit BASELINE_COMMIT), run from a git worktree in a subprocess on the same corpus, so that its
prompts/s and store wait are measured in the same benchmark run as the current code's (this VM's
speed drifts by 2x between hours, so a ratio to a figure of another day says little).

It needs the repository's history (a clone has it) and the same virtual environment; where git or
the commit is missing, the benchmark says so and prints the current figures alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BASELINE_COMMIT = "92abd96"  # the last commit before "Ingest writes windows of prompts as columnar aggregates"
ROOT = Path(__file__).resolve().parent.parent

# run inside the worktree: that commit's own session, job and stores (its API, not today's)
SCRIPT = """
import json, sys
import torch
torch.set_num_threads(int(sys.argv[3]))
import ingest
assert ingest.__file__.startswith(sys.argv[4]), ingest.__file__  # the worktree's code, not the installed one
from catalog.stores import open_store
from ingest.jobs import JobOptions, run_job
from ingest.session import Session
toy = Session.open("toy-ioi", ["toy-ioi"], "cpu")
s = run_job(toy, sys.argv[1], open_store(sys.argv[2]), JobOptions(run="baseline", batch_size=8, progress=False),
            log=lambda *_: None)
print(json.dumps({"prompts": s.prompts, "seconds": s.seconds, "observations": s.observations,
                  "store_wait_share": s.store_wait_share}))
"""


@contextmanager
def worktree(commit: str = BASELINE_COMMIT) -> Iterator[Path]:
    """A detached checkout of ``commit`` in a temporary folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as d:
        path = Path(d) / "tree"
        made = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit],
                              capture_output=True, text=True)
        if made.returncode:
            raise RuntimeError(f"git worktree add {commit}: {made.stderr.strip()}")
        try:
            yield path
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], capture_output=True)


def run_baseline(tree: Path, corpus: str, url: str, threads: int) -> dict:
    """The old ingest of ``corpus`` into ``url`` (an empty store): prompts, seconds, observations and
    store-wait share, as that commit's JobSummary reports them."""
    out = subprocess.run([sys.executable, "-c", SCRIPT, corpus, url, str(threads), str(tree)], cwd=tree,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tree)})
    if out.returncode:
        raise RuntimeError((out.stderr.strip().splitlines() or ["no output"])[-1])
    result: dict = json.loads(out.stdout.strip().splitlines()[-1])
    return result
