"""Independent reference for the edges into one attention feature of GPT-2 Small, computed from
TransformerLens's ``HookedTransformer.from_pretrained`` and SAELens's ``SAE.from_pretrained`` alone (no
code of the catalog): gradient x input through TransformerLens's forward pass with attention patterns
and LN scales frozen, per head.

Run as a script (huggingface_hub reads HF_HOME when first imported, so tests start it with the
fixture's cache in the environment); prints JSON:
  {"tokens": [...], "activation": a, "pre_activation": p, "bias": c (the feature's encoder constant),
   "edges": [{"source": "R5.12@3" | "R5.ERR@3" | "R5.BIAS@3", "head": h, "value": v}, ...]}
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch
from frozen import frozen_forward, grad_x_input


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--feature", type=int, required=True)
    ap.add_argument("--pos", type=int, required=True)
    args = ap.parse_args()
    with contextlib.redirect_stdout(sys.stderr):
        from sae_lens import SAE
        from transformer_lens import HookedTransformer

        model = HookedTransformer.from_pretrained("gpt2-small", fold_ln=True, center_writing_weights=True,
                                                  center_unembed=True, fold_value_biases=True)
        L = args.layer
        attn = SAE.from_pretrained("gpt2-small-hook-z-kk", f"blocks.{L}.hook_z")
        resid = SAE.from_pretrained("gpt2-small-res-jb", f"blocks.{L}.hook_resid_pre")
    print(json.dumps(reference(model, attn, resid, args.prompt, L, args.feature, args.pos)))


def reference(model, attn, resid, prompt: str, L: int, f: int, t: int) -> dict:
    tokens = model.to_tokens(prompt)  # [1, T], BOS first
    _, cache = model.run_with_cache(tokens)
    x = cache[f"blocks.{L}.hook_resid_pre"]  # [1, T, d_model]
    with torch.no_grad():
        acts = resid.encode(x)  # [1, T, d_sae], SAELens's own encoder
    err = x - resid.decode(acts)
    leaves = {"acts": acts.clone().requires_grad_(True), "err": err.detach().clone().requires_grad_(True),
              # b_dec once per position, so its grad x input splits by source position as the catalog's does
              "b_dec": resid.b_dec.detach().expand_as(x).clone().requires_grad_(True)}
    rebuilt = leaves["acts"] @ resid.W_dec + leaves["b_dec"] + leaves["err"]
    name = f"blocks.{L}.attn.hook_z"
    z = frozen_forward(model, tokens, cache, {f"blocks.{L}.hook_resid_pre": rebuilt}, [name])[name]  # [1,T,H,dh]
    W_enc = attn.W_enc[:, f].view(model.cfg.n_heads, model.cfg.d_head)  # [H, d_head]
    bias = float(attn.b_enc[f] - (attn.b_dec * attn.W_enc[:, f]).sum())  # the feature's encoder constant
    per_head = (z[0, t] * W_enc).sum(-1)  # [H]: z_t,h . W_enc[h-slice, f]; summed with bias = pre_f(t)
    edges = []
    for h in range(model.cfg.n_heads):
        gx = grad_x_input(per_head[h], leaves)
        for s in range(t + 1):
            for j in torch.nonzero(acts[0, s]).flatten().tolist():
                edges.append({"source": f"R{L}.{j}@{s}", "head": h, "value": float(gx["acts"][0, s, j])})
            edges.append({"source": f"R{L}.ERR@{s}", "head": h, "value": float(gx["err"][0, s].sum())})
            edges.append({"source": f"R{L}.BIAS@{s}", "head": h, "value": float(gx["b_dec"][0, s].sum())})
    with torch.no_grad():
        pre = float(((z[0, t].flatten() - attn.b_dec) @ attn.W_enc[:, f]) + attn.b_enc[f])
        act = float(attn.encode(cache[name])[0, t, f])  # SAELens's hook_z encode takes [..., H, d_head]
    return {"tokens": model.to_str_tokens(tokens[0]), "activation": act, "pre_activation": pre, "bias": bias,
            "edges": edges}


if __name__ == "__main__":
    main()
