"""Issue 14: ingest on a local Ray cluster (started by the test, 2 CPU workers): the same catalog as
one process and as shards + partials + merge, on both stores; a worker lost mid-window is restarted,
its window recomputed, and nothing is counted twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from test_ingest import CLI, DIE_AT, JOB, WINDOWED, _catalog, _uninterrupted

from catalog.spool import Spool, default_spool
from catalog.stores import open_store
from ingest.ray_executor import DIE_ONCE_ENV

CORPUS = [*WINDOWED, "--corpus", "ioi:24:5"]  # batches of 4: three windows of 2 batches
RAY = ["--executor", "ray", "--workers", "2", "--no-progress"]


def _ray_ingest(url, env=None):
    out = subprocess.run(CLI + JOB + CORPUS + RAY + ["--store", url], capture_output=True, text=True, timeout=900,
                         env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_ray_run_equals_one_process_and_survives_a_lost_worker(store_url, tmp_path):
    marker = tmp_path / "died"
    summary = _ray_ingest(store_url, {DIE_ONCE_ENV: str(marker)})
    assert marker.exists()  # a worker really died mid-window (after its first batch) ...
    assert summary["prompts"] == 24 and summary["windows"] == 3  # ... and its window was spooled once
    on_ray = _catalog(store_url)
    single = _uninterrupted(store_url, tmp_path, *CORPUS)
    for key in ("edges", "evidence", "stats", "activations", "prompts"):
        assert on_ray[key] == single[key], key
    assert on_ray["runs"] == single["runs"] == [("r", "done")]


def test_driver_killed_inside_a_write_then_resume_equals_one_process(store_url, tmp_path):
    """kill -9 of the driver (the only writer) while it spools the second window; the next command, also on
    Ray, resumes into exactly the catalog of one process."""
    died = subprocess.run(DIE_AT + ["spool", "2", "--"] + JOB + CORPUS + RAY + ["--store", store_url],
                          capture_output=True, text=True, timeout=900)
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True, timeout=120)
    assert open_store(store_url).done_prompts("r") == set()  # nothing published ...
    assert len(Spool(default_spool(store_url), None).done_prompts("r")) == 8  # ... the first window spooled, whole
    out = subprocess.run(CLI + JOB + CORPUS + RAY + ["--store", store_url, "--resume"], capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)["skipped_done"] == 8
    resumed = _catalog(store_url)
    single = _uninterrupted(store_url, tmp_path, *CORPUS)
    for key in ("edges", "evidence", "stats", "activations", "prompts"):
        assert resumed[key] == single[key], key
