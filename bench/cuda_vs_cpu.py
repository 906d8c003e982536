"""CUDA against the CPU, two ways. (1) The reduction alone: a toy job on CUDA whose every batch and
window is also reduced and merged from the same tensors copied to the CPU (numpy's sorts there,
torch's sorts, scatters and extremes on the device: ingest/segments.py); every column must agree,
integers and evidence exactly, double sums to summation order. (2) The whole job on each device
into two SQLite catalogs, compared edge by edge: attribution itself then runs on other kernels, so
values differ in their last bits and evidence near-ties may rank otherwise; the figures say how far.
Needs a GPU; prints what it found. Usage: python bench/cuda_vs_cpu.py [--prompts 400]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import fields, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ingest.windows  # noqa: E402
from catalog.stores import open_store  # noqa: E402
from ingest.jobs import JobOptions, run_job  # noqa: E402
from ingest.model_with_saes import ModelWithSaes  # noqa: E402
from ingest.reduce import Partial  # noqa: E402


def catalog_of(device: str, corpus: str, url: str) -> tuple[dict, dict, float]:
    """(edges by (src, dst, kind), evidence rows by edge, seconds) of one toy run on ``device``."""
    session = ModelWithSaes.open("toy-ioi", ["toy-ioi"], device)
    store = open_store(url)
    t = time.perf_counter()
    run_job(session, corpus, store, JobOptions(run="r", batch_size=8, progress=False, mine=False), log=lambda *_: None)
    seconds = time.perf_counter() - t
    edges = {(e.src, e.dst, e.kind): e for e in store.all_edges()}
    evidence: dict = {}  # edge -> its evidence rows' provenance (prompt, positions, head)
    for row in store.all_evidence():
        evidence.setdefault((row.src, row.dst, row.kind), set()).add((row.prompt, row.src_pos, row.dst_pos, row.head))
    return edges, evidence, seconds


def on_cpu(x):
    """A dataclass of tensors (Observations, Activations, Partial) copied to the CPU."""
    return replace(x, **{f.name: getattr(x, f.name).cpu() for f in fields(x) if isinstance(getattr(x, f.name), torch.Tensor)})


SUMS = {"sum", "sumsq", "sum_abs", "head_sum", "role_abs", "node_sum_act"}  # float64 sums of float32 values


class ReductionCheck:
    """Wraps ingest.windows' reduce_batch and merge: each call is repeated on CPU copies and compared."""

    def __init__(self):
        self.calls, self.mismatches, self.worst = 0, [], 0.0
        self.reduce, self.merge = ingest.windows.reduce_batch, ingest.windows.merge

    def compare(self, what: str, device: Partial, cpu: Partial) -> None:
        self.calls += 1
        for f in fields(Partial):
            a, b = getattr(device, f.name).cpu(), getattr(cpu, f.name)
            if a.shape != b.shape:
                self.mismatches.append(f"{what}.{f.name}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
            elif a.dtype.is_floating_point and f.name in SUMS:
                scale = b.abs().max().item() if b.numel() else 0.0  # double sums: only their order may differ
                err = (a - b).abs().max().item() / scale if scale else 0.0
                self.worst = max(self.worst, err)
                if err > 1e-12:
                    self.mismatches.append(f"{what}.{f.name}: relative difference {err:.2e}")
            elif not torch.equal(a, b):
                self.mismatches.append(f"{what}.{f.name}: {int((a != b).sum())} values differ")

    def reduce_batch(self, obs, acts, rank, n_slots, cap):
        part = self.reduce(obs, acts, rank, n_slots, cap)
        self.compare("reduce_batch", part, self.reduce(on_cpu(obs), on_cpu(acts), rank.cpu(), n_slots, cap))
        return part

    def merge_parts(self, parts, rank, cap):
        merged = self.merge(parts, rank, cap)
        if len(parts) > 1:
            self.compare("merge", merged, self.merge([on_cpu(p) for p in parts], rank.cpu(), cap))
        return merged


def reduction_alone(device: str, corpus: str, url: str) -> None:
    check = ReductionCheck()
    ingest.windows.reduce_batch, ingest.windows.merge = check.reduce_batch, check.merge_parts
    try:
        session = ModelWithSaes.open("toy-ioi", ["toy-ioi"], device)
        run_job(
            session, corpus, open_store(url), JobOptions(run="r", batch_size=8, progress=False, mine=False), log=lambda *_: None
        )
    finally:
        ingest.windows.reduce_batch, ingest.windows.merge = check.reduce, check.merge
    print(
        f"  reduction alone: {check.calls} reduce_batch/merge calls on {device} repeated on CPU copies: "
        f"{'every column equal' if not check.mismatches else 'DIFFERENT: ' + '; '.join(check.mismatches[:5])} "
        f"(double sums: largest relative difference {check.worst:.1e})"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=400)
    ap.add_argument("--device", default="cuda", help="the device compared with the CPU (cpu: a dry run)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("cuda_vs_cpu: no CUDA device here")
    corpus = f"ioi:{args.prompts}"
    with tempfile.TemporaryDirectory() as d:
        reduction_alone(args.device, corpus, f"sqlite:///{d}/check.db")
        cpu, cpu_ev, t_cpu = catalog_of("cpu", corpus, f"sqlite:///{d}/cpu.db")
        gpu, gpu_ev, t_gpu = catalog_of(args.device, corpus, f"sqlite:///{d}/gpu.db")
    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"{name}: toy-ioi {corpus}, CPU {t_cpu:.1f} s, {args.device} {t_gpu:.1f} s")
    only_cpu, only_gpu = cpu.keys() - gpu.keys(), gpu.keys() - cpu.keys()
    both = cpu.keys() & gpu.keys()
    counts = sum(
        cpu[k].n_obs != gpu[k].n_obs or cpu[k].n_prompts != gpu[k].n_prompts or cpu[k].n_pos != gpu[k].n_pos for k in both
    )
    # relative to sum_abs: a sum of values of both signs may cancel to near zero
    rel = max((abs(cpu[k].sum - gpu[k].sum) / max(cpu[k].sum_abs, 1e-12) for k in both), default=0.0)
    ev_keys = sum(cpu_ev.get(k) != gpu_ev.get(k) for k in both)
    print(f"  edges: {len(cpu):,} on CPU, {len(gpu):,} on CUDA; only on CPU {len(only_cpu)}, only on CUDA {len(only_gpu)}")
    print(
        f"  edges whose n_obs, n_prompts or n_pos differ: {counts}; "
        f"largest difference of a sum relative to its sum_abs: {rel:.2e}"
    )
    print(f"  edges whose evidence (prompt, positions, head) differs: {ev_keys}")
    print(
        f"  whole job: edges and counts {'equal' if not (only_cpu or only_gpu or counts) else 'DIFFERENT'}; "
        f"evidence of {ev_keys / max(len(both), 1):.2%} of edges ranked otherwise (attribution's last bits)"
    )


if __name__ == "__main__":
    main()
