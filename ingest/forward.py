"""The forward pass with cache that RDFA reads, and the model weights it needs.

This is the only place that knows TransformerLens hook names; RDFA itself sees plain tensors.
"""

from __future__ import annotations

import torch

from ingest.rdfa.tensors import Capture, Weights


def hook_names(n_layers: int) -> set[str]:
    names = {"hook_embed", "hook_pos_embed"}
    for l in range(n_layers):
        names |= {f"blocks.{l}.hook_resid_pre", f"blocks.{l}.ln1.hook_scale", f"blocks.{l}.attn.hook_pattern",
                  f"blocks.{l}.attn.hook_z", f"blocks.{l}.hook_attn_out", f"blocks.{l}.hook_mlp_out"}
    return names


def check_processed(model) -> None:
    """RDFA's step 2 assumes LN1 = center / sigma (fold_ln) and standard positional embeddings."""
    cfg = model.cfg
    if cfg.normalization_type != "LNPre":
        raise ValueError(f"model {cfg.model_name} has normalization {cfg.normalization_type!r}; RDFA needs "
                         "weights processed with fold_ln=True (LNPre)")
    if cfg.positional_embedding_type != "standard" or cfg.attn_only:
        raise ValueError(f"model {cfg.model_name}: RDFA here supports GPT-2-style models "
                         "(standard positional embeddings, MLPs)")


@torch.no_grad()
def capture(model, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, Capture]:
    """Run ``tokens`` [B, T] (right-padded) and return (logits [B, T, vocab], Capture)."""
    L = model.cfg.n_layers
    names = hook_names(L)
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    cap = Capture(
        lengths=lengths.to(tokens.device),
        embed=cache["hook_embed"],
        pos_embed=cache["hook_pos_embed"],
        resid_pre=[cache[f"blocks.{l}.hook_resid_pre"] for l in range(L)],
        ln1_scale=[cache[f"blocks.{l}.ln1.hook_scale"].squeeze(-1) for l in range(L)],
        pattern=[cache[f"blocks.{l}.attn.hook_pattern"] for l in range(L)],
        z=[cache[f"blocks.{l}.attn.hook_z"] for l in range(L)],
        attn_out=[cache[f"blocks.{l}.hook_attn_out"] for l in range(L)],
        mlp_out=[cache[f"blocks.{l}.hook_mlp_out"] for l in range(L)],
    )
    return logits, cap


def weights_of(model) -> Weights:
    """Per-layer W_V [H,d,dh], b_V [H,dh], W_O [H,dh,d], b_O [d], detached."""
    blocks = model.blocks
    return Weights(
        W_V=[b.attn.W_V.detach() for b in blocks],
        b_V=[b.attn.b_V.detach() for b in blocks],
        W_O=[b.attn.W_O.detach() for b in blocks],
        b_O=[b.attn.b_O.detach() for b in blocks],
    )
