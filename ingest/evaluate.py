"""SAE sufficiency checks and causal spot-checks (the seed's first lesson: check whether an SAE
destroys what the task needs before trusting edges through it).

* ``eval_saes``: splice each SAE in place of its activation (reconstruction only, no error term —
  what SAELens's HookedSAETransformer does with use_error_term=False, done here with hooks on the
  processed model) and measure the mean IO-S logit difference and KL(clean || spliced) at the
  answer position, next to the clean model and a mean-ablation baseline (the activation replaced by
  its mean over the ABC distribution). Groups splice several SAEs in one pass, so each later SAE
  sees the earlier ones' reconstructions (sequential recomputation).
* ``spot_check``: for stored edges, ablate the source feature (its activation set to zero, the SAE
  error kept) and measure the change of the target's pre-activation: with attention patterns, LN
  scales and all other components' outputs frozen it must equal the DFA value; unfrozen, the
  correlation and error say how far the linear picture carries.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from catalog.ids import NodeKind
from catalog.queries import node_ref_of
from ingest import ioi
from ingest.lens import attn_out_hook, mlp_out_hook, replay_hooks, run_with_cache, run_with_hooks, sae_hook
from ingest.model_with_saes import ModelWithSaes
from ingest.rdfa.graph import SAE_KINDS
from ingest.rdfa.types import SaeWeights


@dataclass
class Thresholds:
    min_recovery: float = 0.8  # fraction of the clean logit difference (over mean ablation) kept
    max_kl: float = 0.5


def _prompts(session: ModelWithSaes, kind: str, n: int, seed: int):
    rng = random.Random(seed)
    make = ioi.ioi_prompt if kind == "ioi" else ioi.abc_prompt
    vocab = {} if session.lm.is_toy else __import__("ingest.corpora", fromlist=["gpt2_vocab"]).gpt2_vocab(session.lm.tokenizer)
    return [make(rng, **vocab) for _ in range(n)]


def _batch(session: ModelWithSaes, prompts):
    ids = [session.lm.tokenizer.encode(p.text) for p in prompts]
    tokens, lengths = session.pad(ids)
    if "io" not in prompts[0].meta:  # ABC prompts: no answer
        return tokens, lengths - 1, None, None
    space = "" if session.lm.is_toy else " "
    io = torch.tensor([session.lm.tokenizer.token_id(space + p.meta["io"]) for p in prompts], device=tokens.device)
    s = torch.tensor([session.lm.tokenizer.token_id(space + p.meta["s"]) for p in prompts], device=tokens.device)
    return tokens, lengths - 1, io, s


def _splice_hook(sae):
    def hook(act, hook):
        flat = act.flatten(-2) if act.ndim == 4 else act
        recon = sae.decode(sae.activation(sae.pre_activation(flat)))
        return recon.view_as(act)
    return hook


def _transcoder_hooks(tc, layer: int) -> list:
    """Hooks that replace layer ``layer``'s MLP output with transcoder ``tc``'s reconstruction from the MLP's input
    of the same forward pass (no error term)."""
    seen = {}

    def keep_input(act, hook):
        seen["x"] = act
        return act

    def splice(act, hook):
        return tc.decode(tc.activation(tc.pre_activation(seen["x"]))).view_as(act)

    return [(sae_hook(NodeKind.TRANSCODER, layer), keep_input), (mlp_out_hook(layer), splice)]


@torch.no_grad()
def _metrics(session, tokens, last, io, s, hooks, clean_logp=None):
    logits = run_with_hooks(session.lm.model, tokens, hooks)
    ar = torch.arange(len(tokens), device=tokens.device)
    final = logits[ar, last]
    ld = float((final[ar, io] - final[ar, s]).mean())
    logp = torch.log_softmax(final, -1)
    kl = 0.0 if clean_logp is None else float((clean_logp.exp() * (clean_logp - logp)).sum(-1).mean())
    return ld, kl, logp


def eval_saes(session: ModelWithSaes, n: int = 100, groups: list[list[int]] | None = None, seed: int = 0,
              thresholds: Thresholds | None = None) -> dict:
    """Per SAE and per group of layers: logit difference, KL, recovery and a flag."""
    th = thresholds or Thresholds()
    for group in groups or []:  # before any forward pass: a named group must be spliced whole
        if lacking := [l for l in group if l not in session.attn]:
            raise ValueError(f"--groups: no attention SAE at layers {lacking} of group {group}")
    tokens, last, io, s = _batch(session, _prompts(session, "ioi", n, seed))
    abc_tokens, _, _, _ = _batch(session, _prompts(session, "abc", n, seed + 1))
    clean_ld, _, clean_logp = _metrics(session, tokens, last, io, s, [])
    names = {sae_hook(k, l) for k in (NodeKind.ATTN, NodeKind.RESID) for l in range(session.lm.cfg.n_layers)}
    _, abc_cache = run_with_cache(session.lm.model, abc_tokens, names)
    rows = []
    for kind, saes in ((NodeKind.ATTN, session.attn), (NodeKind.RESID, session.resid)):
        for layer, sae in sorted(saes.items()):
            name = sae_hook(kind, layer)
            ld, kl, _ = _metrics(session, tokens, last, io, s, [(name, _splice_hook(sae))], clean_logp)
            mean = abc_cache[name].mean(dim=(0, 1))
            abl_ld, abl_kl, _ = _metrics(session, tokens, last, io, s,
                                         [(name, lambda act, hook, m=mean: m.expand_as(act).clone())], clean_logp)
            rows.append(_row(kind, layer, ld, kl, abl_ld, abl_kl, clean_ld, th))
    if session.transcoders:  # a transcoder stands in for its MLP: its output replaces the MLP's, from the MLP's input
        outs = [mlp_out_hook(l) for l in session.transcoders]
        _, abc_out = run_with_cache(session.lm.model, abc_tokens, outs)
        for layer, tc in sorted(session.transcoders.items()):
            ld, kl, _ = _metrics(session, tokens, last, io, s, _transcoder_hooks(tc, layer), clean_logp)
            mean = abc_out[mlp_out_hook(layer)].mean(dim=(0, 1))
            abl_ld, abl_kl, _ = _metrics(session, tokens, last, io, s, [
                (mlp_out_hook(layer), lambda act, hook, m=mean: m.expand_as(act).clone())], clean_logp)
            rows.append(_row(NodeKind.TRANSCODER, layer, ld, kl, abl_ld, abl_kl, clean_ld, th))
    cross, skipped = [], []
    for group in groups or _default_groups(session):
        lacking = [l for l in group if l not in session.attn]
        if lacking:  # splicing part of a default group would report a cross-section nobody asked for
            skipped.append({"layers": group, "reason": f"no attention SAE at layers {lacking}"})
            continue
        hooks = [(sae_hook(NodeKind.ATTN, l), _splice_hook(session.attn[l])) for l in group]
        ld, kl, _ = _metrics(session, tokens, last, io, s, hooks, clean_logp)
        cross.append({"layers": group, "logit_diff": ld, "kl": kl})
    return {"task": "ioi", "n": n, "clean_logit_diff": clean_ld, "thresholds": th.__dict__, "saes": rows,
            "cross_sections": cross, "skipped_cross_sections": skipped}


def _row(kind, layer, ld, kl, abl_ld, abl_kl, clean_ld, th: Thresholds) -> dict:
    denom = clean_ld - abl_ld
    recovery = (ld - abl_ld) / denom if abs(denom) > 1e-9 else None
    flagged = (recovery is not None and recovery < th.min_recovery) or kl > th.max_kl
    return {"kind": kind.value, "layer": layer, "logit_diff": ld, "kl": kl, "mean_ablation_logit_diff": abl_ld,
            "mean_ablation_kl": abl_kl, "logit_diff_recovery": recovery, "flagged": bool(flagged)}


def _default_groups(session: ModelWithSaes) -> list[list[int]]:
    L = session.lm.cfg.n_layers
    if L == 12:  # the seed's cross-sections for GPT-2 Small
        return [[0, 3], [2, 4], [5, 6], [7, 8], [9, 10, 11]]
    return [list(range(i, min(L, i + 2))) for i in range(0, L, 2)] + [list(range(L))]


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, marker in (("attn", "o"), ("resid", "s"), ("transcoder", "^")):
        rows = [r for r in result["saes"] if r["kind"] == kind]
        a.plot([r["layer"] for r in rows], [r["logit_diff"] for r in rows], marker=marker, label=f"{kind} SAE spliced")
        b.plot([r["layer"] for r in rows], [r["kl"] for r in rows], marker=marker, label=f"{kind} SAE spliced")
        a.plot([r["layer"] for r in rows], [r["mean_ablation_logit_diff"] for r in rows], ls=":", marker=marker,
               label=f"{kind} mean-ablated")
    layers = sorted({r["layer"] for r in result["saes"]})
    a.set_xticks(layers)
    b.set_xticks(layers)
    a.axhline(result["clean_logit_diff"], color="k", ls="--", label="clean")
    a.set(xlabel="layer", ylabel="mean IO - S logit difference", title="IOI logit difference")
    b.set(xlabel="layer", ylabel="KL(clean || spliced)", title="KL divergence")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _sae_of(session: ModelWithSaes, ref) -> SaeWeights | None:
    """The session's SAE (or transcoder) of a feature ref's kind and layer; None where it has none."""
    by_kind = {NodeKind.ATTN: session.attn, NodeKind.RESID: session.resid, NodeKind.TRANSCODER: session.transcoders}
    return by_kind.get(ref.kind, {}).get(ref.layer)


def _target_pre(session: ModelWithSaes, ref, cache_name: str, act: torch.Tensor) -> float:
    sae = _sae_of(session, ref)
    x = act[0, ref.pos]
    return float(sae.pre_activation(x.flatten() if x.ndim == 2 else x)[ref.index])


@torch.no_grad()
def ablation_effect(session: ModelWithSaes, text: str, src, dst, frozen: bool) -> float:
    """Clean minus ablated pre-activation of ``dst`` (a NodeRef with pos) when feature ``src`` (with
    pos) is zeroed at its hook (the SAE error is kept, so nothing else changes there). A transcoder feature is
    read from its MLP's input and zeroed in the MLP's output."""
    model = session.lm.model
    tokens = torch.tensor([session.lm.tokenizer.encode(text)], device=session.device)
    src_hook, dst_hook = sae_hook(src.kind, src.layer), sae_hook(dst.kind, dst.layer)
    _, cache = run_with_cache(model, tokens)
    sae = _sae_of(session, src)
    transcoder = src.kind is NodeKind.TRANSCODER
    read = {}

    def ablate(act, hook):
        flat = act.flatten(-2) if act.ndim == 4 else act
        x = read["x"] if transcoder else flat[0, src.pos]
        a = sae.activation(sae.pre_activation(x))[src.index]
        flat = flat.clone()
        flat[0, src.pos] -= a * sae.W_dec[src.index]
        return flat.view_as(act)

    def keep_input(act, hook):
        read["x"] = act[0, src.pos]
        return act

    seen = {}
    hooks = [(src_hook, keep_input)] if transcoder else []
    out_hook = mlp_out_hook(src.layer) if transcoder else src_hook
    hooks += [(out_hook, ablate), (dst_hook, lambda act, hook: seen.setdefault("act", act))]
    if frozen:  # direct effect only: patterns, LN scales and every other component output as in the clean run
        keep = {NodeKind.ATTN: {attn_out_hook(src.layer)}, NodeKind.TRANSCODER: {mlp_out_hook(src.layer)}}
        hooks += replay_hooks(cache, keep=keep.get(src.kind, set()))
    run_with_hooks(model, tokens, hooks)
    return _target_pre(session, dst, dst_hook, cache[dst_hook]) - _target_pre(session, dst, dst_hook, seen["act"])


def dfa_value(session: ModelWithSaes, text: str, src, dst) -> float:
    """The RDFA value of src -> dst on this prompt, summed over heads, from an unpruned graph."""
    from ingest.rdfa.tensors import Pruning

    _, graph = session.attribute([session.lm.tokenizer.encode(text)], Pruning(direct=False, qk=False))
    e = graph.edges
    code = SAE_KINDS
    hit = ((e.src_code == code[src.kind]) & (e.src_layer == src.layer) & (e.src_index == src.index) &
           (e.src_pos == src.pos) & (e.dst_code == code[dst.kind]) & (e.dst_layer == dst.layer) &
           (e.dst_index == dst.index) & (e.dst_pos == dst.pos))
    return float(e.value[hit].sum())


def spot_check(session: ModelWithSaes, store, run_id: str, n: int = 20, seed: int = 0) -> dict:
    """Ablate the source of ``n`` stored feature->feature edges (attn_in / resid_in / mlp_in) of a run, among
    those whose SAEs (and transcoders) the session has loaded."""
    rng = random.Random(seed)
    loaded = lambda uid: _feature(uid) and _sae_of(session, node_ref_of(uid)) is not None  # noqa: E731
    candidates = [e for e in store.all_edges(("attn_in", "resid_in", "mlp_in"), (run_id,))
                  if loaded(e.src) and loaded(e.dst) and e.n_prompts > 0]
    rng.shuffle(candidates)
    rows = []
    for e in candidates:
        ev = store.evidence(e.src, e.dst, e.kind, 5, (run_id,))
        if not ev:
            continue
        v = ev[0]
        text = store.prompt(v.prompt).text
        src, dst = node_ref_of(e.src).at(v.src_pos), node_ref_of(e.dst).at(v.dst_pos)
        rows.append({"source": str(src), "target": str(dst), "prompt": v.prompt, "dfa": dfa_value(session, text, src, dst),
                     "frozen": ablation_effect(session, text, src, dst, True),
                     "unfrozen": ablation_effect(session, text, src, dst, False)})
        if len(rows) >= n:
            break
    if not rows:
        return {"n": 0, "edges": []}
    dfa = torch.tensor([r["dfa"] for r in rows])
    frozen, unfrozen = torch.tensor([r["frozen"] for r in rows]), torch.tensor([r["unfrozen"] for r in rows])
    corr = float(torch.corrcoef(torch.stack([dfa, unfrozen]))[0, 1]) if len(rows) > 2 else None
    return {"n": len(rows), "max_abs_frozen_minus_dfa": float((frozen - dfa).abs().max()),
            "unfrozen_correlation": corr, "unfrozen_mean_abs_error": float((unfrozen - dfa).abs().mean()),
            "edges": rows}


def _feature(uid: str) -> bool:
    return node_ref_of(uid).is_feature


def label_sae_rows(session: ModelWithSaes, result: dict) -> dict:
    """Name the model and, on each row, the SAE's own key (what the catalog matches flags by)."""
    result["model"] = session.lm.name
    for row in result["saes"]:
        row["sae"] = session.saes.key_of(NodeKind(row["kind"]), row["layer"])
    return result


def store_sae_eval(store, session: ModelWithSaes, result: dict) -> str:
    """Record an ``eval_saes`` result in a catalog as run ``sae-eval-{model}`` (kind sae_eval), where
    feature pages find each SAE's flag by the SAE's own key. Returns the run id."""
    label_sae_rows(session, result)
    run_id = f"sae-eval-{session.lm.name}"
    store.start_run(run_id, {"kind": "sae_eval", **session.manifest()}, resume=True)
    store.finish_run(run_id, "done", {"sae_eval": result})
    return run_id


def store_spot_check(store, run_id: str, result: dict) -> None:
    """Add a ``spot_check`` result (its first 50 edges) to the manifest of the run it checked."""
    existing = store.run(run_id)
    if existing is None:
        raise ValueError(f"no run {run_id!r} in {store.url}")
    store.finish_run(run_id, existing.status, {"spot_check": {k: v for k, v in result.items() if k != "edges"}
                                               | {"edges": result["edges"][:50]}})
