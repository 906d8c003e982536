"""SAE loading through SAELens: registry releases, ``release:id``, local folders, ``toy-ioi``.

Transcoders (``--transcoders``) load the same ways, through SAELens's ``Transcoder`` classes. Each SAE is
checked against the model (hook and width) and turned into plain
:class:`~ingest.rdfa.types.SaeWeights` for the maths. Provenance (release, id, weight hash,
Neuronpedia id) is kept for the run manifest. ``import sae_lens`` costs seconds, so it happens
only inside the loaders here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from catalog.ids import NodeKind
from ingest.errors import LoadError
from ingest.hub import hub_errors, snapshot_commit
from ingest.lens import PROCESSING, parse_sae_hook
from ingest.models import TOY_DIR, TOY_NAME
from ingest.rdfa.types import SaeWeights

SAE_HINT = "or pass --saes PATH (folders with cfg.json and sae_weights.safetensors, as SAE.save_model writes)"


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
    repo_id: str | None = None  # the Hugging Face repo a registry SAE was read from
    revision: str | None = None  # that repo's snapshot commit in the cache the weights came from

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
                "weights_hash": self.weights_hash, "neuronpedia_id": self.neuronpedia_id,
                "repo_id": self.repo_id, "revision": self.revision}


@dataclass
class SaeSet:
    """The SAEs of a run, by kind and layer."""

    attn: dict[int, LoadedSae]
    resid: dict[int, LoadedSae]
    left_out: list[str] = field(default_factory=list)  # SAEs of a requested release the catalog cannot use, and why
    transcoders: dict[int, LoadedSae] = field(default_factory=dict)

    def all(self) -> list[LoadedSae]:
        return [b[k] for b in (self.attn, self.resid, self.transcoders) for k in sorted(b)]

    def of_kind(self, kind: NodeKind) -> dict[int, LoadedSae]:
        return {NodeKind.ATTN: self.attn, NodeKind.RESID: self.resid, NodeKind.TRANSCODER: self.transcoders}[kind]

    def key_of(self, kind: NodeKind, layer: int) -> str:
        return self.of_kind(kind)[layer].key


def load_saes(specs: list[str], model_cfg, device="cpu", transcoder_specs: list[str] = ()) -> SaeSet:
    """Load every ``--saes`` and ``--transcoders`` spec, check each fits ``model_cfg``, refuse duplicates and an
    SAE given under the other option."""
    if not specs:
        raise LoadError("no SAEs given: pass --saes RELEASE, RELEASE:SAE_ID, a directory, or toy-ioi")
    saes = SaeSet({}, {})
    for option, option_specs in (("--saes", specs), ("--transcoders", transcoder_specs)):
        for spec in option_specs:
            for sae in _load_spec(spec, device, saes.left_out, transcoders=option == "--transcoders"):
                if (sae.kind is NodeKind.TRANSCODER) != (option == "--transcoders"):
                    raise LoadError(f"{option} {spec}: {sae.sae_id} reads {sae.hook_name}; pass "
                                    + ("transcoders with --transcoders" if option == "--saes" else
                                       "SAEs with --saes (--transcoders takes transcoders, which read "
                                       "blocks.L.ln2.hook_normalized)"))
                check_fits(sae, model_cfg)
                bucket = saes.of_kind(sae.kind)
                if sae.layer in bucket:
                    raise LoadError(f"two SAEs read {sae.hook_name}: {bucket[sae.layer].sae_id} and {sae.sae_id}")
                bucket[sae.layer] = sae
    return saes


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
    d_out = sae.weights.W_dec.shape[1]
    if sae.kind is NodeKind.TRANSCODER and d_out != cfg.d_model:
        raise LoadError(f"transcoder {sae.sae_id} writes width {d_out}, but the MLP output of model "
                        f"{cfg.model_name} has d_model={cfg.d_model}")


def _load_spec(spec: str, device, left_out: list[str], transcoders: bool = False) -> list[LoadedSae]:
    if spec == TOY_NAME:
        return load_sae_dir(TOY_DIR / ("transcoders" if transcoders else "saes"), device, release=TOY_NAME)
    path = Path(spec).expanduser()
    if path.exists():
        return load_sae_dir(path, device, release=str(path), local=True)
    release, _, sae_id = spec.partition(":")
    return _load_release(release, sae_id or None, device, left_out, transcoders)


def load_sae_dir(path: Path, device, release: str, local: bool = False) -> list[LoadedSae]:
    """A folder in SAELens's on-disk format (cfg.json + sae_weights.safetensors), or a folder of them."""
    folders = [path] if (path / "cfg.json").exists() else sorted(p for p in path.iterdir()
                                                                 if (p / "cfg.json").exists())
    if not folders:
        raise LoadError(f"--saes {path}: no SAE folders (cfg.json + sae_weights.safetensors) found there")
    from sae_lens import SAE

    return [_from_sae_lens(SAE.load_from_disk(str(f), device=str(device)), release, f.name, None, local)
            for f in folders]


def _load_release(release: str, sae_id: str | None, device, left_out: list[str], transcoders: bool = False
                  ) -> list[LoadedSae]:
    """Every SAE (``transcoders``: every transcoder) of a release the catalog can use (the others named in
    ``left_out``), or one named id."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise LoadError(f"--saes {release}: not a directory on disk and not a SAELens release "
                        f"(known releases include {', '.join(sorted(directory)[:5])}, ...)")
    info = directory[release]
    if sae_id is not None and sae_id not in info.saes_map:
        raise LoadError(f"--saes {release}:{sae_id}: release has no SAE id {sae_id!r} "
                        f"(it has {', '.join(list(info.saes_map)[:4])}, ...)")
    out, skipped = [], []
    for sid in [sae_id] if sae_id else list(info.saes_map):
        hook = _release_hook(release, sid)
        parsed = parse_sae_hook(hook)
        if parsed is None or (parsed[0] is NodeKind.TRANSCODER) != transcoders:
            if sae_id is not None and parsed is None:  # named explicitly: refuse (a kind given under the
                raise LoadError(_unsupported_hook(f"{release}:{sid}", hook))  # other option: load_saes says so)
            if sae_id is None:
                skipped.append(f"{sid} (reads {hook})")
                continue
        out.append(_load_registry_sae(release, sid, info, device))
    if skipped:
        left_out.append(f"--{'transcoders' if transcoders else 'saes'} {release}: left out {', '.join(skipped)}: "
                        + ("transcoders read blocks.L.ln2.hook_normalized" if transcoders else
                           "the catalog reads blocks.L.attn.hook_z and blocks.L.hook_resid_pre (transcoders, "
                           "blocks.L.ln2.hook_normalized, with --transcoders)"))
    return out


def _release_hook(release: str, sae_id: str) -> str:
    """The hook a registry SAE reads, from its config alone (no weights fetched)."""
    from sae_lens.loading.pretrained_sae_loaders import load_sae_config_from_huggingface

    with hub_errors(f"SAE {release}:{sae_id}", SAE_HINT):
        cfg = load_sae_config_from_huggingface(release, sae_id)
    return cfg.get("hook_name") or cfg.get("metadata", {}).get("hook_name") or ""


def _load_registry_sae(release: str, sae_id: str, info, device) -> LoadedSae:
    import warnings

    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name

    with hub_errors(f"SAE {release}:{sae_id}", SAE_HINT), warnings.catch_warnings():
        # SAELens warns about model_from_pretrained_kwargs; check_processing_kwargs checks them instead
        warnings.filterwarnings("ignore", message="(?s).*model_from_pretrained_kwargs")
        sae = SAE.from_pretrained(release, sae_id, device=str(device))
    check_processing_kwargs(f"{release}:{sae_id}", getattr(sae.cfg.metadata, "model_from_pretrained_kwargs", None))
    np_id = (info.neuronpedia_id or {}).get(sae_id)
    loaded = _from_sae_lens(sae, release, sae_id, np_id)
    repo_id, path = get_repo_id_and_folder_name(release, sae_id)
    loaded.repo_id = repo_id
    loaded.revision = snapshot_commit(repo_id, path if path.endswith(".pt") else f"{path}/cfg.json")
    return loaded


def check_processing_kwargs(name: str, kwargs: dict | None) -> None:
    """Refuse an SAE trained on a model processed otherwise than the catalog loads it (docs/rdfa.md)."""
    for key, want in (kwargs or {}).items():
        if key in PROCESSING and bool(want) != PROCESSING[key]:
            raise LoadError(f"SAE {name} was trained with {key}={want}, but the catalog loads models with "
                            f"{key}={PROCESSING[key]}: its inputs would be shifted")


def _unsupported_hook(name: str, hook: str) -> str:
    return (f"SAE {name} reads {hook!r}; the catalog supports blocks.L.attn.hook_z and "
            "blocks.L.hook_resid_pre (and, with --transcoders, transcoders reading blocks.L.ln2.hook_normalized)")


def _from_sae_lens(sae, release: str, sae_id: str, neuronpedia_id: str | None, local: bool = False) -> LoadedSae:
    cfg = sae.cfg
    hook = cfg.metadata.hook_name or ""
    parsed = parse_sae_hook(hook)
    if parsed is None:
        raise LoadError(_unsupported_hook(sae_id, hook))
    if getattr(cfg, "normalize_activations", "none") not in (None, "none"):
        raise LoadError(f"SAE {sae_id} normalizes its input ({cfg.normalize_activations}); RDFA needs "
                        "a linear encoder input, so fold the normalization into the weights first")
    kind, layer = parsed
    check_transcoder_class(sae, sae_id, kind)
    state = {k: v.detach().float() for k, v in sae.state_dict().items()}
    weights = SaeWeights(kind, layer, state["W_enc"], state["b_enc"], state["W_dec"], state["b_dec"],
                         bool(getattr(cfg, "apply_b_dec_to_input", True)), state.get("threshold"),
                         getattr(cfg, "k", None))
    return LoadedSae(weights, release, sae_id, hook, weights_hash(state), neuronpedia_id, local)


def check_transcoder_class(sae, name: str, kind: NodeKind) -> None:
    """A transcoder is one of SAELens's ``Transcoder`` classes (it reads the MLP's input and writes its output); a
    skip transcoder's W_skip path is not decomposed yet, so it is refused rather than hidden in the error node."""
    from sae_lens import SkipTranscoder, Transcoder

    is_transcoder = isinstance(sae, Transcoder)
    if kind is NodeKind.TRANSCODER and not is_transcoder:
        raise LoadError(f"{name} reads the MLP's input but is a {type(sae).__name__}, not a transcoder: a transcoder "
                        "decodes into the MLP's output (SAELens's Transcoder classes)")
    if is_transcoder and kind is not NodeKind.TRANSCODER:
        raise LoadError(f"transcoder {name} reads {sae.cfg.metadata.hook_name}; transcoders must read "
                        "blocks.L.ln2.hook_normalized (the MLP's input) and write blocks.L.hook_mlp_out")
    if isinstance(sae, SkipTranscoder):
        raise LoadError(f"transcoder {name} has a skip connection (W_skip): not supported yet, since its linear "
                        "path would have to be decomposed too")


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """blake2b of the tensors, in name order; identifies the exact SAE a run used."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
