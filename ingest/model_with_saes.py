"""A loaded model + SAEs on one device, ready to attribute prompts."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ingest.errors import LoadError
from ingest.lens import capture, check_processed, weights_of
from ingest.models import LoadedModel, load_model
from ingest.rdfa.graph import full_graph
from ingest.rdfa.tensors import Graph, Pruning, Weights
from ingest.rdfa.types import SaeWeights
from ingest.runtime import pick_device
from ingest.saes import SaeSet, load_saes


@dataclass
class ModelWithSaes:
    lm: LoadedModel
    saes: SaeSet
    weights: Weights
    attn: dict[int, SaeWeights]
    resid: dict[int, SaeWeights]
    device: torch.device
    transcoders: dict[int, SaeWeights] = field(default_factory=dict)

    @classmethod
    def open(cls, model_spec: str, sae_specs: list[str], device: str | None = None, *,
             decompose: bool = True, transcoder_specs: list[str] = ()) -> ModelWithSaes:
        """Load the model, its SAEs and transcoders on ``device``. ``decompose``: the SAEs must support RDFA (a
        residual SAE at every attention SAE's layer); evaluation, which only splices SAEs in, needs no such pairs."""
        dev = pick_device(device)
        lm = load_model(model_spec, dev)
        check_processed(lm.model)
        saes = load_saes(sae_specs, lm.cfg, dev, list(transcoder_specs))
        if decompose:
            check_pairs(saes, lm.name)
        on_device = lambda bucket: {l: s.weights.to(dev) for l, s in bucket.items()}  # noqa: E731
        return cls(lm, saes, weights_of(lm.model), on_device(saes.attn), on_device(saes.resid), dev,
                   on_device(saes.transcoders))

    def pad(self, token_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to the longest prompt: tokens [B, T], lengths [B]. Causal attention keeps real
        positions independent of the padding."""
        width = max(map(len, token_lists))
        tokens = torch.tensor([t + [t[-1]] * (width - len(t)) for t in token_lists], device=self.device)
        return tokens, torch.tensor([len(t) for t in token_lists], device=self.device)

    @torch.no_grad()
    def attribute(self, token_lists: list[list[int]], pruning: Pruning) -> tuple[torch.Tensor, Graph]:
        """Forward with cache + full RDFA graph of a batch. Returns (logits [B,T,V], graph)."""
        tokens, lengths = self.pad(token_lists)
        logits, cap = capture(self.lm.model, tokens, lengths, self.transcoders)
        return logits, full_graph(cap, self.weights, self.attn, self.resid, pruning, self.transcoders)

    def manifest(self) -> dict:
        return {"model": {"name": self.lm.name, "source": self.lm.source, "repo_id": self.lm.repo_id,
                          "revision": self.lm.revision,
                          "processing": self.lm.processing, "n_layers": self.lm.cfg.n_layers,
                          "d_model": self.lm.cfg.d_model, "n_heads": self.lm.cfg.n_heads, "n_ctx": self.lm.n_ctx},
                "saes": [s.manifest() for s in self.saes.all()], "saes_left_out": self.saes.left_out,
                "dtype": "float32", "device": str(self.device)}


# The residual SAEs that pair with a model's attention SAEs, when a user names only the latter.
RESID_RELEASE_OF = {"gpt2-small": "gpt2-small-res-jb:blocks.{layer}.hook_resid_pre", "toy-ioi": "toy-ioi"}


def check_pairs(saes: SaeSet, model_name: str) -> None:
    """RDFA decomposes an attention feature's sources through the residual SAE at its layer: refuse a
    set without one, naming what to add."""
    missing = sorted(set(saes.attn) - set(saes.resid))
    if not missing:
        return
    pattern = RESID_RELEASE_OF.get(model_name, "<a residual SAE reading blocks.{layer}.hook_resid_pre>")
    add = dict.fromkeys(f"--saes {pattern.format(layer=l)}" for l in missing)  # ordered, without repeats
    raise LoadError(f"attention SAEs at layers {missing} need residual (resid_pre) SAEs at the same layers to "
                    f"decompose their sources: add {' '.join(add)}")
