"""Model loading: sources, tokenizers and the on-disk format (the TransformerLens calls themselves are
in ingest.lens).

Three sources, one result (:class:`LoadedModel`):
  * ``toy-ioi``        the toy IOI model shipped inside the package (offline);
  * a directory        ``config.json`` (HookedTransformerConfig fields), ``model.safetensors``
                       (unprocessed weights), ``tokenizer.json`` (a `tokenizers` file);
  * any other name     ``HookedTransformer.from_pretrained`` (needs the Hub or its cache).

Every model is loaded with the weight processing the catalog's SAEs were trained under
(see docs/rdfa.md): fold_ln, center_writing_weights, center_unembed, fold_value_biases.
The flags are recorded in every run manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ingest.errors import LoadError
from ingest.hub import hub_errors, snapshot_commit
from ingest.lens import PROCESSING, build_processed, from_pretrained, official_name

TOY_NAME = "toy-ioi"
TOY_DIR = Path(__file__).parent / "toy" / "assets" / TOY_NAME


class Tokenizer:
    """Text <-> token ids with the BOS convention of the model, and token spellings.

    Wraps either a `tokenizers.Tokenizer` (local models) or a Hugging Face tokenizer (hub models).
    """

    def __init__(self, *, fast=None, hf=None, bos_id: int, name: str):
        self._fast, self._hf, self.bos_id, self.name = fast, hf, bos_id, name

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with BOS prepended, as the model was trained."""
        if self._fast is not None:
            return [self.bos_id] + self._fast.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + self._hf.encode(text, add_special_tokens=False)

    def text_of_first(self, text: str, n: int) -> str:
        """The part of ``text`` that its first ``n`` tokens (BOS not counted) cover: what a truncated prompt
        stores, so its text matches its tokens."""
        if n <= 0:
            return ""
        if self._fast is not None:
            offsets = self._fast.encode(text, add_special_tokens=False).offsets
        else:
            offsets = self._hf(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return text[:offsets[min(n, len(offsets)) - 1][1]] if offsets else ""

    def unknown(self, ids: list[int]) -> int:
        """How many of ``ids`` are the tokenizer's unknown token (0 for byte-level BPE, which has none)."""
        unk = self._fast.token_to_id("<unk>") if self._fast is not None else getattr(self._hf, "unk_token_id", None)
        return 0 if unk is None or unk == self.bos_id else sum(i == unk for i in ids)

    def spell(self, ids: list[int]) -> list[str]:
        """Each token as its tokenizer spells it (hub tokenizers: the decoded text of the token)."""
        if self._fast is not None:
            return [self._fast.id_to_token(i) for i in ids]
        return [self._hf.decode([i]) for i in ids]

    def token_id(self, word: str) -> int:
        """The id of a single-token word (with a leading space on byte-level tokenizers)."""
        if self._fast is not None:
            tid = self._fast.token_to_id(word)
            if tid is None:
                raise KeyError(word)
            return tid
        ids = self._hf.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise KeyError(word)
        return ids[0]


@dataclass
class LoadedModel:
    """A processed HookedTransformer with its tokenizer and the facts a run manifest needs."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    name: str
    source: str
    revision: str | None  # a Hub model: the snapshot commit of its repo in the cache it was read from
    processing: dict = field(default_factory=lambda: dict(PROCESSING))
    repo_id: str | None = None  # a Hub model: the repo its weights came from (gpt2-small: gpt2)

    @property
    def cfg(self):
        return self.model.cfg

    @property
    def n_ctx(self) -> int:
        return int(self.model.cfg.n_ctx)

    @property
    def is_toy(self) -> bool:
        return self.name == TOY_NAME


def load_model(spec: str, device: torch.device | str = "cpu") -> LoadedModel:
    """Load ``toy-ioi``, a local model directory, or a TransformerLens pretrained name."""
    if spec == TOY_NAME:
        return load_local_model(TOY_DIR / "model", device, name=TOY_NAME)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LoadError(f"--model {spec}: expected a directory with config.json, model.safetensors "
                            "and tokenizer.json, got a file")
        return load_local_model(path, device)
    return _load_pretrained(spec, device)


def load_local_model(path: Path, device, name: str | None = None) -> LoadedModel:
    """Load the on-disk format :func:`save_local_model` writes."""
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (path / f).exists()]
    if missing:
        raise LoadError(f"model directory {path} lacks {', '.join(missing)} "
                        "(expected config.json, model.safetensors, tokenizer.json)")
    from tokenizers import Tokenizer as FastTokenizer

    meta = json.loads((path / "config.json").read_text())
    cfg_dict = meta["config"]
    model = build_processed(cfg_dict, load_file(str(path / "model.safetensors")), device)
    fast = FastTokenizer.from_file(str(path / "tokenizer.json"))
    tok = Tokenizer(fast=fast, bos_id=fast.token_to_id(meta["bos_token"]), name=str(path))
    return LoadedModel(model, tok, name or meta.get("name", path.name), str(path), meta.get("revision"))


def save_local_model(path: Path, cfg_dict: dict, state_dict: dict, fast_tokenizer, *, name: str,
                     bos_token: str, revision: str) -> None:
    """Write config.json, model.safetensors (unprocessed weights) and tokenizer.json."""
    path.mkdir(parents=True, exist_ok=True)
    meta = {"name": name, "revision": revision, "bos_token": bos_token, "config": cfg_dict}
    (path / "config.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path / "model.safetensors"))
    fast_tokenizer.save(str(path / "tokenizer.json"))


def _load_pretrained(name: str, device) -> LoadedModel:
    with hub_errors(f"model {name!r}", "or pass --model PATH (a directory with config.json, "
                                       "model.safetensors, tokenizer.json)"):
        repo_id = official_name(name)
        model = from_pretrained(name, device)
    hf = model.tokenizer
    return LoadedModel(model, Tokenizer(hf=hf, bos_id=hf.bos_token_id, name=name), name, "huggingface",
                       snapshot_commit(repo_id, "config.json"), repo_id=repo_id)
