"""Tiny random GPT-2-shaped models and random SAEs for exactness tests (no files, no network)."""

from __future__ import annotations

import torch

from catalog.ids import NodeKind
from ingest.models import build_processed
from ingest.rdfa.types import SaeWeights

TINY_CFG = dict(n_layers=3, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=40, n_ctx=12, act_fn="gelu",
                normalization_type="LN", positional_embedding_type="standard", model_name="tiny-random")


def tiny_model(seed: int = 0, **overrides):
    """A processed HookedTransformer whose unprocessed weights had non-trivial LN weights and biases."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    cfg = {**TINY_CFG, **overrides, "seed": seed}
    raw = HookedTransformer(HookedTransformerConfig(**cfg, device="cpu"))
    sd = raw.state_dict()
    g = torch.Generator().manual_seed(seed + 1)
    for name, t in sd.items():
        if name.endswith(("ln1.w", "ln2.w", "ln_final.w")):
            sd[name] = 1 + 0.5 * torch.randn(t.shape, generator=g)
        elif name.endswith(("ln1.b", "ln2.b", "ln_final.b", "b_V", "b_O", "b_Q", "b_K", "b_in", "b_out")):
            sd[name] = 0.3 * torch.randn(t.shape, generator=g)
        elif name.endswith(("W_E", "W_pos")):
            sd[name] = torch.randn(t.shape, generator=g)
        elif name.startswith("blocks") and t.ndim >= 2:
            sd[name] = torch.randn(t.shape, generator=g) / t.shape[-2] ** 0.5 if t.ndim == 2 else \
                torch.randn(t.shape, generator=g) * 0.4
    return build_processed(cfg, sd, "cpu")


def random_sae(kind: NodeKind, layer: int, d_in: int, d_sae: int, seed: int, fire: float = 0.3,
               jump: bool = False) -> SaeWeights:
    """A random SAE whose encoder bias makes roughly ``fire`` of its features active."""
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5
    W_dec = torch.randn(d_sae, d_in, generator=g) / d_in ** 0.5
    b_dec = 0.2 * torch.randn(d_in, generator=g)
    b_enc = 0.1 * torch.randn(d_sae, generator=g) - 0.3 * (1 - fire)
    threshold = 0.05 + 0.05 * torch.rand(d_sae, generator=g) if jump else None
    return SaeWeights(kind, layer, W_enc, b_enc, W_dec, b_dec, True, threshold)


def random_saes(model, seed: int = 0, d_sae: int = 24, jump_layers=()):
    cfg = model.cfg
    attn = {l: random_sae(NodeKind.ATTN, l, cfg.n_heads * cfg.d_head, d_sae, seed + 10 + l, jump=l in jump_layers)
            for l in range(cfg.n_layers)}
    resid = {l: random_sae(NodeKind.RESID, l, cfg.d_model, d_sae, seed + 20 + l) for l in range(cfg.n_layers)}
    return attn, resid


def random_transcoders(model, seed: int = 0, d_sae: int = 24, jump_layers=(), fire: float = 0.3) -> dict:
    """SAELens ``Transcoder`` objects (``JumpReLUTranscoder`` at ``jump_layers``), one per layer, reading
    blocks.L.ln2.hook_normalized and writing the MLP's output, with random weights firing roughly ``fire``."""
    from sae_lens import JumpReLUTranscoder, JumpReLUTranscoderConfig, Transcoder, TranscoderConfig
    from sae_lens.saes.sae import SAEMetadata

    d = model.cfg.d_model
    out = {}
    for l in range(model.cfg.n_layers):
        g = torch.Generator().manual_seed(seed + 30 + l)
        jump = l in jump_layers
        config = JumpReLUTranscoderConfig if jump else TranscoderConfig
        cfg = config(d_in=d, d_sae=d_sae, d_out=d, apply_b_dec_to_input=False,
                     metadata=SAEMetadata(hook_name=f"blocks.{l}.ln2.hook_normalized", model_name="tiny-random"))
        tc = (JumpReLUTranscoder if jump else Transcoder)(cfg)
        state = {"W_enc": torch.randn(d, d_sae, generator=g) / d ** 0.5,
                 "b_enc": 0.1 * torch.randn(d_sae, generator=g) - 0.3 * (1 - fire),
                 "W_dec": torch.randn(d_sae, d, generator=g) / d ** 0.5, "b_dec": 0.2 * torch.randn(d, generator=g)}
        if jump:
            state["threshold"] = 0.05 + 0.05 * torch.rand(d_sae, generator=g)
        tc.load_state_dict(state)
        out[l] = tc
    return out
