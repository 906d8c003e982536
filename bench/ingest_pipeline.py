"""Ingest benchmark: end-to-end prompts/s, observations/s and store-wait share of `run_job` (tokenize,
forward, RDFA, device reduction, windowed writes), and the write path's own ceiling by replay.

  toy     toy-ioi on ioi:N into SQLite and a live Neo4j (targets: store wait <= 10% / <= 15%,
          >= 3x / >= 5x the prompts/s of main before the columnar path, which runs first in the same
          benchmark from a git worktree: bench/baseline.py)
  gpt2    gpt2-small with both SAELens releases from the real-width Hub fixture (bench/gpt2_hub.py),
          64-token prompts, into SQLite and Neo4j
  replay  RDFA graphs of GPT-2-shaped prompts recorded once, then fed again and again (feature
          indices shifted per pass, so passes share some edges and not others) through the same
          reduction, spool, compaction and publish with no RDFA: observations/s the write path sustains,
          peak memory, and the stored catalog checked against an independent numpy aggregation of every
          replayed observation (bench/spool_publish.py measures the write path's targets side by side
          with the per-window path it replaced)

Usage: python bench/ingest_pipeline.py [--only toy,gpt2,replay] [--no-neo4j] [--threads 1]
       python bench/ingest_pipeline.py --only replay --no-neo4j --no-write   (the aggregation's own ceiling)
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpt2_hub  # noqa: E402,I001 - first: it points HF_HOME at the fixture before huggingface_hub is imported
import numpy as np  # noqa: E402
import torch  # noqa: E402
from baseline import BASELINE_COMMIT, run_baseline, worktree  # noqa: E402

from catalog.stores import open_store  # noqa: E402
from catalog.spool import DEFAULT_WINDOW  # noqa: E402
from ingest.jobs import JobOptions, run_job  # noqa: E402
from ingest.rdfa.tensors import Code, EdgeTable, Graph  # noqa: E402

TRACEBACKS = False  # --traceback: a failed configuration stops the benchmark with its traceback


gpt2_shaped_session, word_corpus = gpt2_hub.gpt2_session, gpt2_hub.word_corpus


class ReplaySession:
    """A ModelWithSaes whose attribute() returns recorded graphs instead of running RDFA: pass k over the
    recording shifts every feature index by SHIFTS[k % len(SHIFTS)], so the same edge recurs in
    every len(SHIFTS)-th pass and the store sees both new and recurring edges."""

    SHIFTS = (0, 7919, 15401, 3571)

    def __init__(self, session, graphs: list[Graph]):
        self.real, self.graphs, self.calls = session, graphs, 0
        self.lm, self.saes, self.device = session.lm, session.saes, session.device
        self.d_sae = min(sae.weights.d_sae for sae in session.saes.all())  # a shifted index fits every SAE

    def manifest(self) -> dict:
        return self.real.manifest()

    def attribute(self, token_lists, pruning):
        graph = self.graphs[self.calls % len(self.graphs)]
        shift = self.SHIFTS[(self.calls // len(self.graphs)) % len(self.SHIFTS)]
        self.calls += 1
        return None, Graph(graph.nodes, _shifted(graph.edges, shift, self.d_sae), _shifted(graph.direct, shift, self.d_sae),
                           graph.pruning)


def _shifted(t: EdgeTable, shift: int, d_sae: int) -> EdgeTable:
    out = EdgeTable(*[getattr(t, c) for c in EdgeTable.COLUMNS])
    for end in ("src", "dst"):
        code, index = getattr(t, f"{end}_code"), getattr(t, f"{end}_index")
        feature = (code == Code.ATTN) | (code == Code.RESID)
        setattr(out, f"{end}_index", torch.where(feature, (index + shift) % d_sae, index))
    return out


def one(session, corpus, url, run, batch, label, no_write=False, **opts):
    peak_before = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    try:
        store = open_store(url)
        if no_write:  # the aggregation's own ceiling: windows are computed, then dropped (nothing to publish)
            import catalog.spool

            catalog.spool.Spool.write_window = lambda self, agg: True  # type: ignore[method-assign]
        # mining after the run is not ingest (and would read a replayed catalog's million edges): off
        s = run_job(session, corpus, store, JobOptions(run=run, batch_size=batch, progress=False, mine=False, **opts),
                    log=lambda *_: None)
    except Exception as exc:  # report and go on: a failed configuration is a figure too
        if TRACEBACKS:
            raise
        print(f"  {label:<22} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        return None, None
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    mem = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB" + (
        f", GPU {max(gpu, peak_before) / 2**30:.1f} GiB" if gpu else "")
    print(f"  {label:<22} {s.prompts / s.seconds:8.2f} prompts/s {s.observations / s.seconds:12,.0f} obs/s   "
          f"store wait {s.store_wait_share:5.1%}   ({s.prompts} prompts, {s.observations:,} obs, {s.windows} windows, "
          f"{s.edges:,} edge rows written: {s.observations / max(s.edges, 1):.1f} obs each; {s.seconds:.1f} s; {mem})")
    return s, store


def toy_section(args, tmp, neo):
    from ingest.model_with_saes import ModelWithSaes

    toy = ModelWithSaes.open("toy-ioi", ["toy-ioi"], args.device)
    default = JobOptions.__dataclass_fields__["pruning"].default_factory()
    corpus = f"ioi:{args.toy_prompts}"
    before = {} if args.no_baseline else baseline_section(args, tmp, neo is not None)
    print(f"toy-ioi, {corpus}, batch 8, the default window ({DEFAULT_WINDOW} prompts spooled, then compacted and "
          "published); without QK attribution (the work main did before) and with it (the default since):")
    for url, kind in ((f"sqlite:///{tmp}/toy.db", "sqlite"), (neo, "neo4j")):
        if url is None:
            continue
        for qk in (False, True):
            pruning = replace(default, qk=qk)
            s, _ = one(toy, corpus, url, f"toy-{time.time_ns()}", 8, f"{kind}{', QK' if qk else ''}", pruning=pruning)
            if s and not qk and kind in before:
                print(f"  {'':<22} {s.prompts / s.seconds / before[kind]:.1f}x the {before[kind]:.2f} prompts/s of "
                      f"{BASELINE_COMMIT} in this run")


def baseline_section(args, tmp, with_neo4j: bool) -> dict[str, float]:
    """prompts/s of main before the columnar path (bench/baseline.py) on the toy corpus, each store
    empty (Neo4j: a server of its own, so the two catalogs' schemas never meet)."""
    from cli.neo4j_server import running_on_free_port

    corpus, rates = f"ioi:{args.toy_prompts}", {}
    print(f"toy-ioi, {corpus}, batch 8: main before the columnar path ({BASELINE_COMMIT}, from a git worktree):")
    try:
        with worktree() as tree:
            for kind in ("sqlite", "neo4j") if with_neo4j else ("sqlite",):
                if kind == "sqlite":
                    r = run_baseline(tree, corpus, f"sqlite:///{tmp}/baseline.db", args.threads)
                else:
                    with running_on_free_port(f"{tmp}/neo4j-baseline", page_cache="1g", heap="3g") as url:
                        r = run_baseline(tree, corpus, url, args.threads)
                rates[kind] = r["prompts"] / r["seconds"]
                print(f"  {kind:<22} {rates[kind]:8.2f} prompts/s {r['observations'] / r['seconds']:12,.0f} obs/s   "
                      f"store wait {r['store_wait_share']:5.1%}   ({r['prompts']} prompts, {r['seconds']:.1f} s)")
    except (RuntimeError, OSError) as exc:
        print(f"  unavailable ({exc}); no ratio is printed")
    return rates


def gpt2_section(args, tmp, neo, session):
    corpus = word_corpus(tmp / "words.jsonl", args.gpt2_prompts, 64)
    print(f"gpt2-small with both SAELens releases (Hub fixture, random weights, width {session.lm.cfg.d_model}), "
          f"{args.gpt2_prompts} prompts x 64 tokens, batch 4:")
    for url, kind in ((f"sqlite:///{tmp}/gpt2.db", "sqlite"), (neo, "neo4j")):
        if url is not None:
            one(session, corpus, url, f"gpt2-{time.time_ns()}", 4, kind)


def replay_section(args, tmp, neo, session):
    corpus = word_corpus(tmp / "record.jsonl", args.record, 64)
    t = time.time()
    recorded = []
    for line in Path(corpus).read_text().splitlines():
        ids = session.lm.tokenizer.encode(__import__("json").loads(line)["text"])
        recorded.append(session.attribute([ids], JobOptions.__dataclass_fields__["pruning"].default_factory())[1])
    n_obs = sum(len(g.edges) + len(g.direct) for g in recorded)
    print(f"replay: {args.record} GPT-2-shaped 64-token graphs recorded in {time.time() - t:.0f} s "
          f"(~{n_obs / args.record:,.0f} observations each, REST included); {args.replay} prompts replayed, "
          f"batch 1, window {args.replay_window}:")
    replay_corpus = word_corpus(tmp / "replay.jsonl", args.replay, 64)  # as long as the recorded: roles read positions
    targets = ((f"sqlite:///{tmp}/nowrite.db", "no write"),) if args.no_write else (
        (f"sqlite:///{tmp}/replay.db", "sqlite"), (neo, "neo4j"))
    for url, kind in targets:
        if url is None:
            continue
        s, store = one(ReplaySession(session, recorded), replay_corpus, url, f"replay-{time.time_ns()}", 1, kind,
                       no_write=args.no_write, window=args.replay_window)
        if s and args.check and kind == "sqlite":
            check_against_numpy(store, ReplaySession(session, recorded), args.replay)


def check_against_numpy(store, replay, n_prompts):
    """The stored edges equal an independent numpy aggregation of every replayed observation."""
    from ingest.to_catalog import _catalog_edges
    from ingest.windows import node_slots

    slots = node_slots(replay.real)
    keys, vals = [], []
    for _ in range(n_prompts):
        _, g = replay.attribute(None, None)
        t = EdgeTable.cat([g.edges, g.direct]).to("cpu")
        t = t.select(_catalog_edges(t))
        src = slots.slot(t.src_code, t.src_layer, t.src_index).numpy()
        dst = slots.slot(t.dst_code, t.dst_layer, t.dst_index).numpy()
        keys.append((src * slots.size + dst) * 3 + t.kind.numpy())
        vals.append(t.value.double().numpy())
    key, v = np.concatenate(keys), np.concatenate(vals)
    uniq, inv = np.unique(key, return_inverse=True)
    n_obs, sums = np.bincount(inv), np.bincount(inv, v)
    stored = {(e.src, e.dst, e.kind): (e.n_obs, e.sum) for e in store.all_edges()}
    names = ("attn_in", "resid_in", "direct")
    want = {(slots.info(int(k // 3 // slots.size)).uid, slots.info(int(k // 3 % slots.size)).uid, names[k % 3]):
            (int(n), s) for k, n, s in zip(uniq, n_obs, sums)}
    same = stored.keys() == want.keys() and all(
        stored[k][0] == want[k][0] and abs(stored[k][1] - want[k][1]) <= 1e-6 * max(1.0, abs(want[k][1])) for k in want)
    print(f"  {'':<22} stored catalog vs independent numpy aggregation ({len(want):,} edges): "
          f"{'identical counts, sums within 6 significant digits' if same else 'DIFFERENT'}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default=None)
    ap.add_argument("--only", default="toy,gpt2,replay")
    ap.add_argument("--no-neo4j", action="store_true")
    ap.add_argument("--toy-prompts", type=int, default=2000)
    ap.add_argument("--gpt2-prompts", type=int, default=8)
    ap.add_argument("--record", type=int, default=4)
    ap.add_argument("--replay", type=int, default=64)
    ap.add_argument("--replay-window", type=int, default=16)
    ap.add_argument("--check", action="store_true", help="replay: compare the SQLite catalog with numpy")
    ap.add_argument("--no-write", action="store_true", help="replay: aggregate and decode windows, write nothing")
    ap.add_argument("--traceback", action="store_true", help="stop at a failure, with its traceback")
    ap.add_argument("--no-baseline", action="store_true",
                    help="toy: skip running main before the columnar path side by side (bench/baseline.py)")
    args = ap.parse_args()
    global TRACEBACKS
    TRACEBACKS = args.traceback
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.device = str(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}, torch threads {torch.get_num_threads()}; ingest defaults (top-k 5, |v| >= 0.01, direct top-2, "
          "evidence 8 per edge)")
    only = set(args.only.split(","))
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as d:
        tmp = Path(d)
        if args.no_neo4j:
            sections(args, only, tmp, None, device)
        else:
            from cli.neo4j_server import running_on_free_port

            with running_on_free_port(f"{d}/neo4j", page_cache="1g", heap="3g") as neo:
                sections(args, only, tmp, neo, device)


def sections(args, only, tmp, neo, device):
    if "toy" in only:
        toy_section(args, tmp, neo)
    if only & {"gpt2", "replay"}:
        session = gpt2_shaped_session(device)
        if "gpt2" in only:
            gpt2_section(args, tmp, neo, session)
        if "replay" in only:
            replay_section(args, tmp, neo, session)


if __name__ == "__main__":
    main()
