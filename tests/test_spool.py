"""Issue 14 (job arrays without a reachable database): shards spool their windows to a folder (issue 35:
the spool), `merge` publishes them into a catalog; docs/ingest.md's SLURM script, run for every task index, then merged,
gives the catalog of one process, on both stores; merging again stores nothing twice."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_ingest import _catalog, _fresh, _ingest
from typer.testing import CliRunner

from catalog.spool import Spool, load_window, save_window
from catalog.stores import open_store
from cli import app

INGEST_DOC = (Path(__file__).resolve().parent.parent / "docs" / "ingest.md").read_text()
BIN = Path(sys.executable).parent  # where `circuit-catalog` is installed


def job_script() -> str:
    block = INGEST_DOC.split("### Job arrays")[1]
    return re.search(r"```bash\n(.*?)```", block, re.S).group(1)


def test_the_readme_job_script_is_a_slurm_array_of_shards_writing_partials():
    script = job_script()
    assert re.search(r"^#SBATCH --array=0-7$", script, re.M)
    assert '--shard "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT"' in script
    assert '--partials "$PARTIALS"' in script and "--store" not in script


def _run_array(script: Path, partials: Path, n: int) -> None:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "MODEL": "toy-ioi", "SAES": "toy-ioi",
           "CORPUS": "ioi:16:6", "PARTIALS": str(partials), "SLURM_ARRAY_TASK_COUNT": str(n),
           "CIRCUIT_CATALOG_TORCH_THREADS": "1"}
    tasks = [subprocess.Popen(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": str(i)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(n)]
    for task in tasks:
        assert task.wait(timeout=600) == 0, task.stderr.read()


def test_array_then_merge_equals_one_process_and_merging_again_adds_nothing(store_url, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text(job_script())
    partials = tmp_path / "partials"
    _run_array(script, partials, 2)
    windows = sorted((partials / "pile10k").glob("window-*.npz"))
    assert len(windows) == 2  # ioi:16 in batches of 8: one window per shard
    finishes = sorted(p.name for p in (partials / "pile10k").glob("finish-*.json"))
    assert finishes == ["finish-shard-0-2-done.json", "finish-shard-1-2-done.json"]

    first = CliRunner().invoke(app, ["merge", str(partials), "--store", store_url])
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)["runs"]["pile10k"]
    assert (report["windows_published"], report["windows_published_before"], report["prompts_published"],
            report["status"]) == (2, 0, 16, "done")
    assert report["edges_published"] == len(_catalog(store_url)["edges"])  # each edge written once
    merged = _catalog(store_url)
    again = json.loads(CliRunner().invoke(app, ["merge", str(partials), "--store", store_url]).stdout)
    assert again["runs"]["pile10k"]["windows_published"] == 0 and again["runs"]["pile10k"]["windows_published_before"] == 2
    assert _catalog(store_url) == merged
    assert merged["runs"] == [("pile10k", "done")]
    manifest = open_store(store_url).run("pile10k").manifest
    assert manifest["counts_shard0"]["prompts"] + manifest["counts_shard1"]["prompts"] == 16

    one = _fresh(store_url, "one", tmp_path)  # on Neo4j: the same database, wiped
    _ingest(one, "--corpus", "ioi:16:6", "--run", "pile10k", "--batch-size", "8")
    single = _catalog(one)
    for key in ("edges", "evidence", "stats", "activations", "prompts"):
        assert merged[key] == single[key], key


def test_a_window_file_round_trips_exactly(tmp_path):
    from test_store_conformance import _batches

    (_, _, agg), _ = _batches()
    save_window(agg, tmp_path / "w.npz")
    back = load_window(tmp_path / "w.npz")
    assert (back.run, back.prompts, back.nodes, back.evidence_cap, back.observations) == \
        (agg.run, agg.prompts, agg.nodes, agg.evidence_cap, agg.observations)
    assert len(agg.tops) and len(agg.hists)
    for part in ("edges", "heads", "evidence", "stats", "roles", "tops", "hists"):
        ours, theirs = getattr(agg, part).columns(), getattr(back, part).columns()
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert ours[name].dtype == theirs[name].dtype and (ours[name] == theirs[name]).all(), (part, name)
    unnamed = load_window(tmp_path / "w.npz", names=False)
    assert (unnamed.prompts, unnamed.nodes) == ([], []) and (unnamed.edges.sum == agg.edges.sum).all()


def test_a_window_file_of_the_earlier_layout_still_loads(tmp_path):
    """Windows spooled before nodes were rows and the JSON bytes (a str, nodes as dicts, no roles or top
    activations) load as they were, so a job resumed across the upgrade publishes them."""
    import json
    from dataclasses import asdict

    from test_store_conformance import _batches

    (_, _, agg), _ = _batches()
    meta = {"run": agg.run, "prompts": [asdict(p) for p in agg.prompts], "nodes": [asdict(n) for n in agg.nodes],
            "evidence_cap": agg.evidence_cap, "observations": agg.observations}
    columns = {f"{part}.{name}": col for part in ("edges", "heads", "evidence", "stats")
               for name, col in getattr(agg, part).columns().items()}
    np.savez(tmp_path / "old.npz", meta=np.array(json.dumps(meta)), **columns)
    back = load_window(tmp_path / "old.npz")
    assert (back.prompts, back.nodes, back.seq, len(back.roles), len(back.tops)) == (agg.prompts, agg.nodes, -1, 0, 0)
    assert (back.edges.sum == agg.edges.sum).all() and (back.evidence.value == agg.evidence.value).all()


def test_partials_resume_skips_written_windows_and_refuses_a_second_start(tmp_path):
    folder = Spool(tmp_path / "p", evidence_per_edge=8)
    folder.start_run("r", {"batch_size": 8}, resume=False)
    from test_store_conformance import _batches

    (_, _, agg), _ = _batches("r")
    assert folder.write_window(agg) is True and folder.write_window(agg) is False
    assert folder.done_prompts("r") == {p.prompt_id for p in agg.prompts}
    with pytest.raises(Exception, match="pass --resume"):
        folder.start_run("r", {"batch_size": 8}, resume=False)
    assert not list((tmp_path / "p" / "r").glob(".*.tmp"))  # no temporary file left behind


def test_merge_of_a_folder_without_partials_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["merge", str(tmp_path), "--store", f"sqlite:///{tmp_path}/c.db"])
    assert result.exit_code == 2 and "no partials in" in result.output
