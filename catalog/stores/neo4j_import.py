"""Publishing into an empty Neo4j database through its offline importer (``neo4j-admin database import full``).

A publish target, ``neo4j-import:FOLDER``, that writes what ``publish_run`` would create on a live server as the
importer's CSV files instead: one folder per published run (its prompts, statistics and edges, each edge one
relationship row with its head, role and evidence lists, and the nodes it added to the dictionary), renamed
into place when complete, so a killed publish leaves nothing half-written. ``import_arguments`` then names
every file for the importer, which builds the whole database in one offline pass; the server (the launcher's
``neo4j-server --import FOLDER``, or the docker-compose ``neo4j-import`` service) starts on it afterwards and
creates the catalog's indexes when the first client connects. The rows are those of the live route
(``neo4j_publish.part_rows``), so both load the same catalog; a test compares them through every read.

Community Edition imports only into a new, empty database: runs added later go through the live route.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from catalog.aggregate import WindowAggregate
from catalog.feature_acts import StatLists, stat_lists
from catalog.ids import check_run_name
from catalog.schema import JSON, NODE_ID_LIMIT, NodeInfo, Prompt, Run
from catalog.spool import atomic_write, safe_name
from catalog.stores.base import StoreError
from catalog.stores.neo4j_connection import SCHEMA_VERSION
from catalog.stores.neo4j_publish import PartRows, part_rows

ARRAY = "\x1f"  # the importer's array delimiter (--array-delimiter=U+001F): no string a list holds may contain it
EDGE_HEADER = (":START_ID(Node),:END_ID(Node),:TYPE,run,key:long,kind,n_prompts:long,n_obs:long,sum:double,"
               "sumsq:double,sum_abs:double,min:double,max:double,n_pos:long,head_sums:double[],role_n:long[],"
               "role_abs:double[],ev_prompt:string[],ev_src_pos:long[],ev_dst_pos:long[],ev_head:long[],"
               "ev_value:double[]")
NODE_HEADER = "nid:ID(Node),uid,model,sae,ref,kind,layer:long,index:long,:LABEL"
PROMPT_HEADER = "uid,run,prompt_id,text,tokens:string[],corpus,content_hash,meta,evidence_edges:long[],:LABEL"
STATS_HEADER = ("nid:long,run,n_obs:long,n_prompts:long,sum_act:double,max_act:double,top_prompt:string[],"
                "top_pos:long[],top_act:double[],top_token:string[],top_src:long[],top_src_pos:long[],top_head:long[],"
                "top_value:double[],hist_bin:long[],hist_n:long[],top_tokens,:LABEL")
RUN_HEADER = "run_id,status,manifest,:LABEL"
DICTIONARY_HEADER = "name,next:long,schema:long,evidence:long,:LABEL"
# what the importer is told besides the files (neo4j-admin 5.26; docs/catalog.md)
OPTIONS = ["--id-type=INTEGER", f"--array-delimiter=U+{ord(ARRAY):04X}", "--multiline-fields=true",
           "--quote=\"", "--skip-duplicate-nodes=false", "--skip-bad-relationships=false", "--bad-tolerance=0"]


def open_url(url: str, evidence_per_edge: int | None, create: bool) -> Neo4jImportFiles:
    folder = url.split(":", 1)[1].removeprefix("//")
    if not folder:
        raise StoreError(f"store URL {url!r} names no folder: neo4j-import:path/to/folder")
    return Neo4jImportFiles(folder, evidence_per_edge)


class Neo4jImportFiles:
    """The part of the Store protocol an ingest job or ``merge`` publishes through, kept as import files.
    Its state is the folder: ``runs.json`` (each run's status and manifest), ``run-<name>/`` per published
    run (``done.json`` last), the node dictionary being the union of the runs' ``nodes.csv`` in run order."""

    queryable = False  # nothing reads it before the import (ingest skips mining)

    def __init__(self, folder: str | Path, evidence_per_edge: int | None):
        self.folder = Path(folder)  # made by the first start_run
        self.url = f"neo4j-import:{self.folder}"
        self.evidence_per_edge = evidence_per_edge

    def __getattr__(self, name: str) -> Any:  # the reads of a catalog: there are none before the import
        raise StoreError(f"{self.url} is a folder of files for Neo4j's importer, not a catalog to query: "
                         f"`circuit-catalog neo4j-server --import {self.folder}` loads it into a new database")

    # ---- runs
    def _runs(self) -> dict[str, JSON]:
        path = self.folder / "runs.json"
        runs: dict[str, JSON] = json.loads(path.read_text()) if path.exists() else {}
        return runs

    def _save_runs(self, runs: dict[str, JSON]) -> None:
        text = json.dumps(runs, indent=1, sort_keys=True).encode()
        atomic_write(self.folder / "runs.json", lambda fh: fh.write(text))

    def runs(self) -> list[Run]:
        return [Run(k, v["status"], v["manifest"]) for k, v in sorted(self._runs().items())]

    def run(self, run_id: str) -> Run | None:
        found = self._runs().get(run_id)
        return Run(run_id, found["status"], found["manifest"]) if found else None

    def start_run(self, run_id: str, manifest: JSON, resume: bool) -> None:
        check_run_name(run_id)
        runs = self._runs()
        if run_id in runs and not resume:
            raise StoreError(f"run {run_id!r} already exists in {self.url} (status {runs[run_id]['status']}); pass "
                             "--resume to continue it or choose another --run")
        old = runs.get(run_id)
        new = {**old["manifest"], "resumed": old["manifest"].get("resumed", 0) + 1} if old else manifest
        runs[run_id] = {"status": "running", "manifest": new}
        self.folder.mkdir(parents=True, exist_ok=True)
        self._save_runs(runs)

    def finish_run(self, run_id: str, status: str, updates: JSON) -> None:
        runs = self._runs()
        old = runs.get(run_id, {"manifest": {}})["manifest"]
        runs[run_id] = {"status": status, "manifest": {**old, **updates}}
        self._save_runs(runs)

    def done_prompts(self, run: str) -> set[str]:
        path = self._run_folder(run) / "prompt_ids.json"
        return set(json.loads(path.read_text())) if path.exists() else set()

    def _run_folder(self, run: str) -> Path:
        return self.folder / f"run-{safe_name(run)}"

    def published_runs(self) -> list[Path]:
        """The folders of the runs published so far, in the order they were (their nodes' ids follow it)."""
        done = [p.parent for p in self.folder.glob("run-*/done.json")]
        return sorted(done, key=lambda p: json.loads((p / "done.json").read_text())["order"])

    # ---- publish
    def publish_run(self, run: str, prompts: list[Prompt], nodes: list[NodeInfo],
                    parts: Iterable[WindowAggregate]) -> bool:
        """Write the run's import files (False if they are written already)."""
        final = self._run_folder(run)
        if (final / "done.json").exists():
            return False
        if run not in self._runs():
            raise StoreError(f"run {run!r} was never started in {self.url} (start_run comes first)")
        known = self._dictionary()
        new = [n for n in dict.fromkeys(nodes) if n.uid not in known]
        if len(known) + len(new) > NODE_ID_LIMIT:
            raise StoreError(f"node dictionary of {self.url} is full ({NODE_ID_LIMIT} nodes)")
        added = {n.uid: len(known) + i for i, n in enumerate(new)}
        ids = np.array([known.get(n.uid, added.get(n.uid, -1)) for n in nodes], dtype=np.int64)
        work = self.folder / f".writing-{safe_name(run)}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        _write_csv(work / "nodes.csv", [
            [str(added[n.uid]) for n in new], *(_strings([getattr(n, c) for n in new])
                                                for c in ("uid", "model", "sae", "ref", "kind")),
            _optional_ints([n.layer for n in new]), _optional_ints([n.index for n in new]),
            ["Node" + ARRAY + "Feature" if n.is_feature else "Node" for n in new]])
        evidence, prompt_keys = 0, [np.zeros(0, np.int64)] * len(prompts)
        uid_row = {p.uid: i for i, p in enumerate(prompts)}
        for k, part in enumerate(parts):
            rows = part_rows(part, ids)
            _check_strings(rows.evidence["ev_prompt"], "a prompt uid")
            _write_csv(work / f"edges-{k:05d}.csv", _edge_columns(rows, run))
            s = part.stats
            _write_csv(work / f"stats-{k:05d}.csv", [
                _ints(ids[s.node]), [_quoted(run)] * len(s), _ints(s.n_obs), _ints(s.n_prompts),
                _floats(s.sum_act), _floats(s.max_act), *_activation_lists(stat_lists(part, ids)), ["Stats"] * len(s)])
            for i in rows.prompts_with_evidence.tolist():
                row = uid_row[part.prompts[i].uid]
                prompt_keys[row] = np.concatenate([
                    prompt_keys[row], rows.prompt_keys[rows.prompt_offsets[i]:rows.prompt_offsets[i + 1]]])
            evidence += len(part.evidence)
        for p in prompts:
            _check_strings(p.tokens, f"a token of prompt {p.prompt_id!r}")
        _write_csv(work / "prompts.csv", [
            *(_strings([getattr(p, c) for p in prompts]) for c in ("uid", "run", "prompt_id", "text")),
            _string_lists([p.tokens for p in prompts]),
            *(_strings([getattr(p, c) for p in prompts]) for c in ("corpus", "content_hash")),
            _strings([json.dumps(p.meta, sort_keys=True) for p in prompts]),
            [ARRAY.join(_ints(keys)) for keys in prompt_keys], ["Prompt"] * len(prompts)])
        (work / "prompt_ids.json").write_text(json.dumps([p.prompt_id for p in prompts]))
        order = len(self.published_runs())
        (work / "done.json").write_text(json.dumps({"run": run, "order": order, "evidence": evidence,
                                                    "nodes": len(new)}))
        os.replace(work, final)
        return True

    def _dictionary(self) -> dict[str, int]:
        """uid -> nid of the nodes the published runs added, in order."""
        uids: list[str] = []
        for folder in self.published_runs():
            uids.extend(_first_column(folder / "nodes.csv"))
        return {u: i for i, u in enumerate(uids)}

    # ---- the importer's view
    def import_arguments(self) -> list[str]:
        """Write the files that describe the whole database (headers, runs, the dictionary's node) and return
        the arguments for ``neo4j-admin database import full`` (the database, then options; paths relative to the
        folder). The same command goes into ``import.sh`` for the docker-compose ``neo4j-import`` service."""
        published = self.published_runs()
        if not published:
            raise StoreError(f"nothing to import in {self.folder}: no run has been published into it")
        runs = self._runs()
        for name, header in (("nodes", NODE_HEADER), ("prompts", PROMPT_HEADER), ("stats", STATS_HEADER),
                             ("edges", EDGE_HEADER), ("runs", RUN_HEADER), ("dictionary", DICTIONARY_HEADER)):
            (self.folder / f"header-{name}.csv").write_text(header + "\n")
        listed = [json.loads((p / "done.json").read_text()) for p in published]
        _write_csv(self.folder / "runs.csv", [
            _strings(list(runs)), _strings([r["status"] for r in runs.values()]),
            _strings([json.dumps(r["manifest"], sort_keys=True) for r in runs.values()]),
            ["Run"] * len(runs)])
        _write_csv(self.folder / "dictionary.csv", [
            _strings(["nodes"]), [str(len(self._dictionary()))], [str(SCHEMA_VERSION)],
            [str(sum(d["evidence"] for d in listed))], ["Dictionary"]])

        def files(header: str, pattern: str) -> str:
            return ",".join([f"header-{header}.csv", *(str(f.relative_to(self.folder)) for p in published
                                                        for f in sorted(p.glob(pattern)))])
        arguments = ["neo4j", *OPTIONS, f"--nodes={files('nodes', 'nodes.csv')}",
                     f"--nodes={files('prompts', 'prompts.csv')}", f"--nodes={files('stats', 'stats-*.csv')}",
                     "--nodes=header-runs.csv,runs.csv", "--nodes=header-dictionary.csv,dictionary.csv",
                     f"--relationships={files('edges', 'edges-*.csv')}"]
        script = ("#!/bin/sh\n# Neo4j's offline importer over these files, into a new database (circuit-catalog)\n"
                  "set -e\ncd \"$(dirname \"$0\")\"\nexec \"${NEO4J_ADMIN:-neo4j-admin}\" database import full "
                  + " ".join(shlex.quote(a) for a in arguments) + "\n")
        (self.folder / "import.sh").write_text(script)
        return arguments

    def close(self) -> None:
        with contextlib.suppress(OSError):
            for stale in self.folder.glob(".writing-*"):
                shutil.rmtree(stale)


def _edge_columns(rows: PartRows, run: str) -> list[list[str]]:
    m = len(rows.keys)
    ev = rows.evidence
    ev_end = rows.ev_start + rows.ev_width
    kinds = {k: _quoted(k) for k in set(rows.kinds.tolist())}
    prompts = {u: _quote_free(u) for u in set(ev["ev_prompt"].tolist())}
    return [_ints(rows.src), _ints(rows.dst), ["EDGE"] * m, [_quoted(run)] * m, _ints(rows.keys),
            [kinds[k] for k in rows.kinds.tolist()],
            *(_floats(v) if v.dtype.kind == "f" else _ints(v) for v in rows.scalars.values()),
            _lists(_floats(rows.heads), rows.hoff[:-1], rows.hoff[1:]),
            _lists(_ints(rows.role_n), rows.roff[:-1], rows.roff[1:]),
            _lists(_floats(rows.role_abs), rows.roff[:-1], rows.roff[1:]),
            _lists([prompts[u] for u in ev["ev_prompt"].tolist()], rows.ev_start, ev_end, quote=True),
            *(_lists(_ints(ev[c]), rows.ev_start, ev_end) for c in ("ev_src_pos", "ev_dst_pos", "ev_head")),
            _lists(_floats(ev["ev_value"]), rows.ev_start, ev_end)]


def _ints(values: np.ndarray) -> list[str]:
    return list(map(str, np.asarray(values).tolist()))


def _floats(values: np.ndarray) -> list[str]:
    """float64 as the shortest text that reads back as the same double (Python's repr, which Java parses)."""
    values = np.asarray(values, np.float64)
    if not np.isfinite(values).all():
        raise StoreError("a non-finite number cannot go through Neo4j's importer as written")
    return list(map(repr, values.tolist()))


def _lists(tokens: list[str], starts: np.ndarray, ends: np.ndarray, quote: bool = False) -> list[str]:
    """One field per row: tokens[starts[i]:ends[i]] joined by the array delimiter (empty: no property, which
    the reads take as an empty list)."""
    join = ARRAY.join
    fields = [join(tokens[a:b]) for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]
    return [f'"{f}"' if f else "" for f in fields] if quote else fields


def _activation_lists(acts: StatLists) -> list[list[str]]:
    """The Stats rows' top-activation and histogram list fields, in STATS_HEADER's order."""
    t, t_end = acts.top, acts.top_start + acts.top_width
    h_end = acts.hist_start + acts.hist_width
    text = {"top_prompt": t["top_prompt"].tolist(), "top_token": t["top_token"].tolist()}
    for what, values in text.items():
        _check_strings(values, f"a {what.removeprefix('top_')} of a top activation")
    out = []
    for c in ("top_prompt", "top_pos", "top_act", "top_token", "top_src", "top_src_pos", "top_head", "top_value"):
        fields = ([_quote_free(v) for v in text[c]] if c in text else
                  _floats(t[c]) if c in ("top_act", "top_value") else _ints(t[c]))
        out.append(_lists(fields, acts.top_start, t_end, quote=c in text))
    out += [_lists(_ints(acts.hist[c]), acts.hist_start, h_end) for c in ("hist_bin", "hist_n")]
    return [*out, _strings(acts.token_text)]


def _quoted(text: str) -> str:
    return f'"{_quote_free(text)}"'


def _quote_free(text: str) -> str:
    return text.replace('"', '""')


def _strings(values: list[Any]) -> list[str]:
    """Quoted CSV fields (quotes doubled): a quoted empty field is an empty string, not a missing one."""
    return [_quoted(str(v)) for v in values]


def _string_lists(lists: list[list[str]]) -> list[str]:
    return [_quoted(ARRAY.join(values)) if values else "" for values in lists]


def _optional_ints(values: list[int | None]) -> list[str]:
    return ["" if v is None else str(v) for v in values]


def _check_strings(values: Iterable[str], what: str) -> None:
    bad = next((v for v in values if ARRAY in v), None)
    if bad is not None:
        raise StoreError(f"{what} holds the character U+001F, the importer's list separator ({bad!r}): publish "
                         "this run into a live server instead")


def _write_csv(path: Path, columns: list[list[str]]) -> None:
    """One row per index of the columns (fields already encoded), without a header (the header files have it)."""
    with open(path, "w", encoding="utf-8", newline="") as fh:
        if len(columns[0]):
            fh.write("\n".join(map(",".join, zip(*columns, strict=True))))
            fh.write("\n")


def _first_column(path: Path) -> list[str]:
    """The uids of a nodes.csv (second field: nid, "uid", ...); parsed, since a uid may hold a comma or quote."""
    import csv

    with open(path, encoding="utf-8", newline="") as fh:
        return [row[1] for row in csv.reader(fh)]
