"""SAE loading through SAELens: registry releases, ``release:id``, local folders, ``toy-ioi``.

Each SAE is checked against the model (hook and width) and turned into plain
:class:`~ingest.rdfa.types.SaeWeights` for the maths. Provenance (release, id, weight hash,
Neuronpedia id) is kept for the run manifest. ``import sae_lens`` costs seconds, so it happens
only inside the loaders here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from catalog.ids import NodeKind
from ingest.errors import LoadError
from ingest.lens import parse_sae_hook
from ingest.models import TOY_DIR, TOY_NAME, _offline_message
from ingest.rdfa.types import SaeWeights


@dataclass
class LoadedSae:
    """An SAE ready for RDFA, with where it came from."""

    weights: SaeWeights
    release: str  # registry release, or the folder it was read from
    sae_id: str
    hook_name: str
    weights_hash: str
    neuronpedia_id: str | None = None
    local: bool = False  # read from a folder the user named (not a registry release)

    @property
    def kind(self) -> NodeKind:
        return self.weights.kind

    @property
    def layer(self) -> int:
        return self.weights.layer

    @property
    def key(self) -> str:
        """How the catalog names this SAE in node uids: ``release:sae_id`` for a registry or toy SAE,
        ``local:<weights hash>`` for a folder on disk (its path or name says nothing stable about it)."""
        return f"local:{self.weights_hash[:16]}" if self.local else f"{self.release}:{self.sae_id}"

    def manifest(self) -> dict:
        return {"release": self.release, "sae_id": self.sae_id, "key": self.key, "hook_name": self.hook_name,
                "kind": self.kind.value, "layer": self.layer, "d_sae": self.weights.d_sae,
                "weights_hash": self.weights_hash, "neuronpedia_id": self.neuronpedia_id}


@dataclass
class SaeSet:
    """The SAEs of a run, by kind and layer."""

    attn: dict[int, LoadedSae]
    resid: dict[int, LoadedSae]

    def all(self) -> list[LoadedSae]:
        return [self.attn[k] for k in sorted(self.attn)] + [self.resid[k] for k in sorted(self.resid)]

    def key_of(self, kind: NodeKind, layer: int) -> str:
        return (self.attn if kind is NodeKind.ATTN else self.resid)[layer].key


def load_saes(specs: list[str], model_cfg, device="cpu") -> SaeSet:
    """Load every ``--saes`` spec, check each fits ``model_cfg``, refuse duplicates."""
    if not specs:
        raise LoadError("no SAEs given: pass --saes RELEASE, RELEASE:SAE_ID, a directory, or toy-ioi")
    attn: dict[int, LoadedSae] = {}
    resid: dict[int, LoadedSae] = {}
    for spec in specs:
        for sae in _load_spec(spec, device):
            check_fits(sae, model_cfg)
            bucket = attn if sae.kind is NodeKind.ATTN else resid
            if sae.layer in bucket:
                raise LoadError(f"two SAEs read {sae.hook_name}: {bucket[sae.layer].sae_id} and {sae.sae_id}")
            bucket[sae.layer] = sae
    return SaeSet(attn, resid)


def check_fits(sae: LoadedSae, cfg) -> None:
    """Refuse an SAE whose hook or width does not fit the model, naming both."""
    want = cfg.n_heads * cfg.d_head if sae.kind is NodeKind.ATTN else cfg.d_model
    what = "n_heads*d_head" if sae.kind is NodeKind.ATTN else "d_model"
    d_in = sae.weights.W_enc.shape[0]
    if sae.layer >= cfg.n_layers:
        raise LoadError(f"SAE {sae.sae_id} reads {sae.hook_name}, but model {cfg.model_name} has only "
                        f"{cfg.n_layers} layers")
    if d_in != want:
        raise LoadError(f"SAE {sae.sae_id} reads {sae.hook_name} with width {d_in}, but model "
                        f"{cfg.model_name} has {what}={want} there")


def _load_spec(spec: str, device) -> list[LoadedSae]:
    if spec == TOY_NAME:
        return load_sae_dir(TOY_DIR / "saes", device, release=TOY_NAME)
    path = Path(spec).expanduser()
    if path.exists():
        return load_sae_dir(path, device, release=str(path), local=True)
    release, _, sae_id = spec.partition(":")
    return _load_release(release, sae_id or None, device)


def load_sae_dir(path: Path, device, release: str, local: bool = False) -> list[LoadedSae]:
    """A folder in SAELens's on-disk format (cfg.json + sae_weights.safetensors), or a folder of them."""
    folders = [path] if (path / "cfg.json").exists() else sorted(p for p in path.iterdir()
                                                                 if (p / "cfg.json").exists())
    if not folders:
        raise LoadError(f"--saes {path}: no SAE folders (cfg.json + sae_weights.safetensors) found there")
    from sae_lens import SAE

    return [_from_sae_lens(SAE.load_from_disk(str(f), device=str(device)), release, f.name, None, local)
            for f in folders]


def _load_release(release: str, sae_id: str | None, device) -> list[LoadedSae]:
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise LoadError(f"--saes {release}: not a directory on disk and not a SAELens release "
                        f"(known releases include {', '.join(sorted(directory)[:5])}, ...)")
    info = directory[release]
    ids = [sae_id] if sae_id else list(info.saes_map)
    out = []
    for sid in ids:
        if sid not in info.saes_map:
            raise LoadError(f"--saes {release}:{sid}: release has no SAE id {sid!r}")
        try:
            sae = SAE.from_pretrained(release, sid, device=str(device))
        except Exception as exc:  # hub client errors of many types all mean "could not fetch"
            raise LoadError(_offline_message(f"SAE {release}:{sid}", exc,
                                             "or pass --saes PATH (folders with cfg.json and "
                                             "sae_weights.safetensors, as SAE.save_model writes)")) from None
        np_id = (info.neuronpedia_id or {}).get(sid) if hasattr(info, "neuronpedia_id") else None
        out.append(_from_sae_lens(sae, release, sid, np_id))
    return out


def _from_sae_lens(sae, release: str, sae_id: str, neuronpedia_id: str | None, local: bool = False) -> LoadedSae:
    cfg = sae.cfg
    hook = cfg.metadata.hook_name or ""
    parsed = parse_sae_hook(hook)
    if parsed is None:
        raise LoadError(f"SAE {sae_id} reads {hook!r}; the catalog supports blocks.L.attn.hook_z and "
                        "blocks.L.hook_resid_pre")
    if getattr(cfg, "normalize_activations", "none") not in (None, "none"):
        raise LoadError(f"SAE {sae_id} normalizes its input ({cfg.normalize_activations}); RDFA needs "
                        "a linear encoder input, so fold the normalization into the weights first")
    kind, layer = parsed
    state = {k: v.detach().float() for k, v in sae.state_dict().items()}
    weights = SaeWeights(kind, layer, state["W_enc"], state["b_enc"], state["W_dec"], state["b_dec"],
                         bool(getattr(cfg, "apply_b_dec_to_input", True)), state.get("threshold"),
                         getattr(cfg, "k", None))
    return LoadedSae(weights, release, sae_id, hook, weights_hash(state), neuronpedia_id, local)


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """blake2b of the tensors, in name order; identifies the exact SAE a run used."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
