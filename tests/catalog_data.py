"""A hand-built catalog: random observations over a small feature set, aggregated into batches,
plus an independent (plain-Python) aggregation to check what stores answer."""

from __future__ import annotations

import random
from collections import defaultdict

import torch

from catalog.aggregate import WindowAggregate
from catalog.ids import parse_ref
from catalog.schema import EDGE_KINDS, NodeInfo, Prompt
from ingest.reduce import Activations, Observations
from ingest.to_catalog import aggregate_rows

MODEL, RELEASE = "toy", "rel"
KINDS = ["attn_in", "resid_in", "direct", "mlp_in"]
# transcoders at layers 1 and 2 (their MLP outputs are T nodes); layer 0's MLP stays a leaf
REFS = [f"A{l}.{i}" for l in range(3) for i in range(6)] + [f"R{l}.{i}" for l in range(3) for i in range(6)] + \
    [f"T{l}.{i}" for l in (1, 2) for i in range(4)] + ["EMB", "POS", "MLP0", "T1.ERR", "T2.BIAS", "A1.ERR", "R2.BIAS"]


def nodes() -> list[NodeInfo]:
    return [NodeInfo.of(MODEL, RELEASE, parse_ref(r)) for r in REFS]


def random_prompts(run: str, n: int, start: int = 0) -> list[Prompt]:
    """Prompts of 8 tokens that repeat (so duplicate and induction roles occur), with IOI-style role
    positions in their meta."""
    return [Prompt(f"{run}/p{i:04d}", run, f"p{i:04d}", f"prompt number {i}", [f"t{(i + j * j) % 5}" for j in range(8)],
                   "test:1", f"h{i}", {"i": i, "io_pos": i % 3, "s1_pos": 3, "s2_pos": 5, "end_pos": 7})
            for i in range(start, start + n)]


def random_observations(prompts: list[Prompt], seed: int, per_prompt: int = 60):
    """Rows (prompt_uid, src_ref, dst_ref, kind, head, src_pos, dst_pos, value); values repeat on
    purpose so evidence ties are exercised."""
    rng = random.Random(seed)
    rows = []
    for p in prompts:
        for _ in range(per_prompt):
            dst = rng.choice([r for r in REFS if r[0] in "ART" and ".E" not in r and ".B" not in r and r[1] != "T"])
            src = rng.choice(REFS)
            kind = "mlp_in" if dst[0] == "T" else rng.choice(KINDS[:3])
            head = rng.choice([-1, 0, 1, 2]) if kind != "resid_in" else -1
            value = round(rng.gauss(0, 1), 2) if rng.random() < 0.8 else 0.5
            rows.append((p.uid, src, dst, kind, head, rng.randrange(8), rng.randrange(8), value))
    return rows


def make_batch(run: str, prompts: list[Prompt], rows, evidence_per_edge: int | None) -> WindowAggregate:
    """The window aggregate of ``rows`` (aggregated by ingest.reduce), plus random node activations."""
    infos = nodes()
    uid_of = {n.ref: i for i, n in enumerate(infos)}
    p_of = {p.uid: i for i, p in enumerate(prompts)}
    col = lambda f, dt=torch.long: torch.tensor([f(r) for r in rows], dtype=dt)  # noqa: E731
    obs = Observations(col(lambda r: p_of[r[0]]), col(lambda r: uid_of[r[1]]), col(lambda r: uid_of[r[2]]),
                       col(lambda r: EDGE_KINDS.index(r[3])), col(lambda r: r[4]), col(lambda r: r[5]), col(lambda r: r[6]),
                       col(lambda r: r[7], torch.float64))
    acts_rows = random_activations(prompts, len(rows))
    acts = Activations(torch.tensor([uid_of[r[1]] for r in acts_rows]), torch.tensor([p_of[r[0]] for r in acts_rows]),
                       torch.tensor([r[3] for r in acts_rows], dtype=torch.float64),
                       torch.tensor([r[2] for r in acts_rows]))
    return aggregate_rows(obs, acts, infos, run, prompts, evidence_per_edge)


def random_activations(prompts: list[Prompt], seed: int) -> list[tuple[str, str, int, float]]:
    """(prompt uid, feature ref, position, activation): five features a prompt at positions 0-4, every feature
    in turn (so each is active in every run), with activations that repeat (ties in the top-activation order)."""
    infos = nodes()
    feats = [n.ref for n in infos if n.is_feature]
    rng = random.Random(seed)
    return [(p.uid, feats[(7 * (5 * i + pos) + seed) % len(feats)], pos,
             rng.choice([0.75, 1.5, round(rng.random() * 3, 3)])) for i, p in enumerate(prompts) for pos in range(5)]


def expected_activations(prompts: list[Prompt], rows, acts, top: int) -> dict:
    """Per feature ref: its ``top`` strongest activations (act descending, then prompt uid, then position),
    each with the strongest attn_in / resid_in / mlp_in observation into it there (|value| descending, then the
    source's place in REFS, source position, head), and its histogram {float32 bits >> 21: count}; plain
    Python, from the rows ``make_batch`` aggregated."""
    import struct

    out: dict = {}
    for ref in sorted({a[1] for a in acts}):
        mine = sorted((a for a in acts if a[1] == ref), key=lambda a: (-a[3], a[0], a[2]))
        kept = []
        for p, _, pos, act in mine[:top]:
            feeding = [r for r in rows if r[0] == p and r[2] == ref and r[6] == pos and r[3] in ("attn_in", "resid_in", "mlp_in")]
            best = min(feeding, key=lambda r: (-abs(r[7]), REFS.index(r[1]), r[5], r[4]), default=None)
            token = next(q.tokens[pos] for q in prompts if q.uid == p)
            kept.append((p, pos, act, token, best[1] if best else None, best[5] if best else 0,
                         best[4] if best else -1, best[7] if best else 0.0))
        hist: dict = {}
        for a in acts:
            if a[1] == ref:
                b = struct.unpack("<i", struct.pack("<f", a[3]))[0] >> 21
                hist[b] = hist.get(b, 0) + 1
        out[ref] = (kept, hist)
    return out


def expected_edges(rows) -> dict:
    """Plain-Python aggregation, independent of catalog.aggregate."""
    out: dict = defaultdict(lambda: {"n_obs": 0, "sum": 0.0, "sumsq": 0.0, "sum_abs": 0.0, "prompts": set(),
                                     "min": float("inf"), "max": float("-inf"), "n_pos": 0, "heads": defaultdict(float)})
    for p, s, d, k, h, _sp, _dp, v in rows:
        e = out[(s, d, k)]
        e["n_obs"] += 1
        e["sum"] += v
        e["sumsq"] += v * v
        e["sum_abs"] += abs(v)
        e["prompts"].add(p)
        e["min"], e["max"] = min(e["min"], v), max(e["max"], v)
        e["n_pos"] += v > 0
        if h >= 0:
            e["heads"][h] += v
    return out


def _roles_of(prompt: Prompt, sp: int, dp: int) -> list[str]:
    """The positional roles of an attention observation from dst position dp to src position sp,
    spelled out from their definitions (catalog.schema.ROLES), in plain Python."""
    toks, out = prompt.tokens, []
    if sp != dp and toks[sp] == toks[dp]:
        out.append("duplicate")
    if sp > 0 and toks[sp - 1] == toks[dp]:
        out.append("induction")
    if dp - sp == 1:
        out.append("previous")
    if sp == 0:
        out.append("first")
    off = dp - sp
    if 0 <= off <= 3:
        out.append(f"offset {off}")
    elif 4 <= off <= 7:
        out.append("offset 4-7")
    elif 8 <= off <= 15:
        out.append("offset 8-15")
    elif off >= 16:
        out.append("offset 16+")
    at = {prompt.meta[f"{r.lower()}_pos"]: r for r in ("IO", "S1", "S2", "END") if f"{r.lower()}_pos" in prompt.meta}
    if sp in at and dp in at:
        out.append(f"{at[sp]}->{at[dp]}")
    return out


def expected_roles(rows, prompts: list[Prompt]) -> dict:
    """Per edge (src, dst, kind): {role: (count, sum of |value|)} over observations with a head."""
    by_uid = {p.uid: p for p in prompts}
    out: dict = defaultdict(lambda: defaultdict(lambda: [0, 0.0]))
    for p, s, d, k, h, sp, dp, v in rows:
        if h >= 0:
            for role in _roles_of(by_uid[p], sp, dp):
                out[(s, d, k)][role][0] += 1
                out[(s, d, k)][role][1] += abs(v)
    return out
