"""Every use of TransformerLens, behind one module: the model classes, weight processing, hook
names, forward passes with a cache or with hooks, and the weights RDFA reads. RDFA, evaluation, SAE
loading and the toy trainer see plain tensors and call these functions, so a move to TransformerLens 4
(TransformerBridge) changes this file only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import torch

from catalog.ids import NodeKind
from ingest.rdfa.tensors import Capture, Weights

# The weight processing the catalog's SAEs were trained under (docs/rdfa.md); recorded in every manifest.
PROCESSING = {
    "fold_ln": True,
    "center_writing_weights": True,
    "center_unembed": True,
    "fold_value_biases": True,
}
# The hook each kind of SAE reads: attention SAEs hook_z, residual SAEs resid_pre, transcoders the MLP's input
# (LN2's output; with fold_ln it is center(resid_mid) / sigma, LN2's weights live in W_in). A transcoder writes
# the MLP's output, blocks.{layer}.hook_mlp_out.
SAE_HOOK = {NodeKind.ATTN: "blocks.{layer}.attn.hook_z", NodeKind.RESID: "blocks.{layer}.hook_resid_pre",
            NodeKind.TRANSCODER: "blocks.{layer}.ln2.hook_normalized"}
SAE_HOOK_PATTERN = {NodeKind.ATTN: re.compile(r"blocks\.(\d+)\.attn\.hook_z"),
                    NodeKind.RESID: re.compile(r"blocks\.(\d+)\.hook_resid_pre"),
                    NodeKind.TRANSCODER: re.compile(r"blocks\.(\d+)\.ln2\.hook_normalized")}
Hook = tuple[str, Callable[..., Any]]


def sae_hook(kind: NodeKind, layer: int) -> str:
    """The hook an SAE of ``kind`` at ``layer`` reads, e.g. ``blocks.5.attn.hook_z``."""
    return SAE_HOOK[kind].format(layer=layer)


def parse_sae_hook(name: str) -> tuple[NodeKind, int] | None:
    """(kind, layer) of a hook an SAE of the catalog can read, or None for any other hook."""
    for kind, pattern in SAE_HOOK_PATTERN.items():
        if m := pattern.fullmatch(name):
            return kind, int(m.group(1))
    return None


def attn_out_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_attn_out"


def mlp_out_hook(layer: int) -> str:
    """What a transcoder at ``layer`` writes: the MLP's output."""
    return f"blocks.{layer}.hook_mlp_out"


def hooked_transformer() -> tuple[Any, Any]:
    """(HookedTransformer, HookedTransformerConfig), imported on first use: transformer_lens takes
    seconds to import and the CLI should start fast."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HookedTransformer is deprecated in 3.x; 4.x removes it
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    return HookedTransformer, HookedTransformerConfig


def new_model(cfg_dict: dict[str, Any]) -> torch.nn.Module:
    """A freshly initialised (unprocessed) model of this config (the toy trainer's)."""
    HookedTransformer, HookedTransformerConfig = hooked_transformer()
    return HookedTransformer(HookedTransformerConfig(**cfg_dict))


def build_processed(cfg_dict: dict[str, Any], state_dict: dict[str, torch.Tensor], device: Any) -> torch.nn.Module:
    """A model from a config and an *unprocessed* state dict, processed as PROCESSING."""
    HookedTransformer, HookedTransformerConfig = hooked_transformer()
    cfg = HookedTransformerConfig(**{**cfg_dict, "device": str(device)})
    model = HookedTransformer(cfg, move_to_device=False)
    model.load_and_process_state_dict(state_dict, **PROCESSING)
    model.eval()
    return model.to(device, print_details=False)


def from_pretrained(name: str, device: Any) -> torch.nn.Module:
    """A registry model (needs the Hugging Face Hub or its cache), processed as PROCESSING."""
    HookedTransformer, _ = hooked_transformer()
    model = HookedTransformer.from_pretrained(name, device=str(device), **PROCESSING)
    model.eval()
    return model


def official_name(name: str) -> str:
    """The Hugging Face repo TransformerLens reads for a model name or alias (``gpt2-small`` -> ``gpt2``);
    a name TransformerLens does not know is a user error naming it."""
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        return get_official_model_name(name)
    except ValueError:
        from ingest.errors import LoadError

        raise LoadError(f"--model {name!r}: not a directory and not a model TransformerLens knows "
                        "(e.g. gpt2-small, pythia-70m)") from None


def run_with_cache(model: Any, tokens: torch.Tensor, names: Iterable[str] | None = None) -> tuple[torch.Tensor, Any]:
    """(logits, cache) of a forward pass; only ``names`` are cached (all hooks when None)."""
    if names is None:
        return model.run_with_cache(tokens)
    wanted = set(names)
    return model.run_with_cache(tokens, names_filter=lambda n: n in wanted)


def run_with_hooks(model: Any, tokens: torch.Tensor, hooks: list[Hook]) -> torch.Tensor:
    """Logits of a forward pass with ``hooks`` [(hook name, fn(activation, hook))] applied."""
    return model.run_with_hooks(tokens, fwd_hooks=hooks)


def replay_hooks(cache: Any, keep: set[str]) -> list[Hook]:
    """Hooks that replay a clean run's attention patterns, LN scales and every attention and MLP
    output (but those named in ``keep``): the frozen run in which an ablation's effect is direct."""
    frozen = ("hook_pattern", "hook_scale", "hook_mlp_out", "hook_attn_out")
    return [(name, lambda act, hook, v=cache[name]: v) for name in cache if name.endswith(frozen) and name not in keep]


def hook_names(n_layers: int, mlp_layers: Iterable[int] = ()) -> set[str]:
    """The hooks RDFA reads; ``mlp_layers``: layers with a transcoder, whose MLP input and LN2 scale it reads too."""
    names = {"hook_embed", "hook_pos_embed"}
    for l in range(n_layers):
        names |= {f"blocks.{l}.hook_resid_pre", f"blocks.{l}.ln1.hook_scale", f"blocks.{l}.attn.hook_pattern",
                  f"blocks.{l}.attn.hook_z", f"blocks.{l}.hook_attn_out", f"blocks.{l}.hook_mlp_out"}
    for l in mlp_layers:
        names |= {f"blocks.{l}.ln2.hook_normalized", f"blocks.{l}.ln2.hook_scale"}
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
def capture(model, tokens: torch.Tensor, lengths: torch.Tensor, mlp_layers: Iterable[int] = ()
            ) -> tuple[torch.Tensor, Capture]:
    """Run ``tokens`` [B, T] (right-padded) and return (logits [B, T, vocab], Capture); ``mlp_layers``: the
    layers with a transcoder."""
    L = model.cfg.n_layers
    mlp_layers = sorted(mlp_layers)
    names = hook_names(L, mlp_layers)
    logits, cache = run_with_cache(model, tokens, names)
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
        mlp_in={l: cache[f"blocks.{l}.ln2.hook_normalized"] for l in mlp_layers},
        ln2_scale={l: cache[f"blocks.{l}.ln2.hook_scale"].squeeze(-1) for l in mlp_layers},
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
        W_Q=[b.attn.W_Q.detach() for b in blocks],
        W_K=[b.attn.W_K.detach() for b in blocks],
        b_Q=[b.attn.b_Q.detach() for b in blocks],
        b_K=[b.attn.b_K.detach() for b in blocks],
        attn_scale=float(blocks[0].attn.attn_scale) if blocks else 1.0,
    )


def qk_weights(model, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Layer ``layer``'s W_Q, W_K [H, d, dh], b_Q, b_K [H, dh] (detached) and the score divisor."""
    attn = model.blocks[layer].attn
    return attn.W_Q.detach(), attn.W_K.detach(), attn.b_Q.detach(), attn.b_K.detach(), float(attn.attn_scale)
