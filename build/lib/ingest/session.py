"""A loaded model + SAEs on one device, ready to attribute prompts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ingest.lens import capture, check_processed, weights_of
from ingest.models import LoadedModel, load_model
from ingest.rdfa.graph import check_decomposable, full_graph
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

    @classmethod
    def open(cls, model_spec: str, sae_specs: list[str], device: str | None = None) -> ModelWithSaes:
        dev = pick_device(device)
        lm = load_model(model_spec, dev)
        check_processed(lm.model)
        saes = load_saes(sae_specs, lm.cfg, dev)
        attn = {l: s.weights.to(dev) for l, s in saes.attn.items()}
        resid = {l: s.weights.to(dev) for l, s in saes.resid.items()}
        check_decomposable(attn, resid)
        return cls(lm, saes, weights_of(lm.model), attn, resid, dev)

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
        logits, cap = capture(self.lm.model, tokens, lengths)
        return logits, full_graph(cap, self.weights, self.attn, self.resid, pruning)

    def manifest(self) -> dict:
        return {"model": {"name": self.lm.name, "source": self.lm.source, "revision": self.lm.revision,
                          "processing": self.lm.processing, "n_layers": self.lm.cfg.n_layers,
                          "d_model": self.lm.cfg.d_model, "n_heads": self.lm.cfg.n_heads, "n_ctx": self.lm.n_ctx},
                "saes": [s.manifest() for s in self.saes.all()], "dtype": "float32", "device": str(self.device)}
