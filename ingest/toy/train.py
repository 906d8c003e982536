"""``make-toy``: train the toy IOI model, one hook_z and one resid_pre SAE per layer, and one transcoder per
layer, on the CPU.

Phases: (1) a 3-layer GPT-2-architecture model on IOI prompts mixed with non-IOI sentences,
(2) reload it from disk *processed* (as every catalog run loads models) and measure held-out IOI
accuracy and logit difference, (3) SAEs trained on the processed model's activations (the same
coordinates RDFA reads), saved in SAELens's on-disk format, (4) transcoders (LN2's output -> the MLP's
output) likewise, (5) metrics.json.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from catalog.ids import NodeKind
from ingest import ioi
from ingest.lens import mlp_out_hook, new_model, parse_sae_hook, run_with_cache, sae_hook
from ingest.models import load_local_model, save_local_model
from ingest.toy.vocab import BOS, build_tokenizer

MODEL_CFG = dict(n_layers=3, d_model=64, n_heads=4, d_head=16, d_mlp=256, n_ctx=32, act_fn="gelu",
                 normalization_type="LN", positional_embedding_type="standard", model_name="toy-ioi",
                 default_prepend_bos=True)
SAE_WIDTH = 256
SAE_L1 = {"attn": 1.5e-3, "resid": 1.5e-3}
TRANSCODER_WIDTH = 512  # 2x d_mlp
TRANSCODER_L1 = 1.5e-3


def _encode(tok, text: str) -> list[int]:
    return [tok.token_to_id(BOS)] + tok.encode(text, add_special_tokens=False).ids


def training_corpus(tok, n: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [n, n_ctx] (BOS-padded) and a loss mask [n, n_ctx - 1] of real next tokens."""
    rows, masks = [], []
    for _ in range(n):
        p = ioi.ioi_prompt(rng) if rng.random() < 0.7 else ioi.filler_prompt(rng)
        ids = _encode(tok, p.text + (" " + p.answer if p.answer else ""))
        pad = MODEL_CFG["n_ctx"] - len(ids)
        rows.append(ids + [0] * pad)
        masks.append([1.0] * (len(ids) - 1) + [0.0] * pad)
    return torch.tensor(rows), torch.tensor(masks)


def ioi_eval_set(tok, n: int, rng: random.Random):
    """Held-out IOI prompts: token ids [n, T] right-padded, last-token index, IO and S ids."""
    prompts = [ioi.ioi_prompt(rng) for _ in range(n)]
    enc = [_encode(tok, p.text) for p in prompts]
    width = max(map(len, enc))
    ids = torch.tensor([e + [0] * (width - len(e)) for e in enc])
    last = torch.tensor([len(e) - 1 for e in enc])
    io = torch.tensor([tok.token_to_id(p.meta["io"]) for p in prompts])
    s = torch.tensor([tok.token_to_id(p.meta["s"]) for p in prompts])
    return ids, last, io, s


@torch.no_grad()
def ioi_metrics(model, tok, n: int = 500, seed: int = 12345) -> dict:
    """Held-out accuracy (IO logit > S logit at the answer position) and mean logit difference."""
    ids, last, io, s = ioi_eval_set(tok, n, random.Random(seed))
    logits = model(ids)[torch.arange(n), last]
    diff = logits[torch.arange(n), io] - logits[torch.arange(n), s]
    return {"ioi_accuracy": float((diff > 0).float().mean()), "ioi_logit_diff": float(diff.mean()), "n": n}


def train_model(tok, seed: int, steps: int, log) -> dict[str, torch.Tensor]:
    """Train the unprocessed model; returns its state dict."""
    torch.manual_seed(seed)
    model = new_model({**MODEL_CFG, "d_vocab": tok.get_vocab_size(), "seed": seed, "device": "cpu"})
    ids, mask = training_corpus(tok, 30_000, random.Random(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        batch = torch.randint(0, len(ids), (128,), generator=gen)
        logits = model(ids[batch])[:, :-1]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[batch, 1:].reshape(-1), reduction="none")
        loss = (nll * mask[batch].reshape(-1)).sum() / mask[batch].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps - 1:
            log(f"  model step {step:5d}  loss {loss.item():.3f}")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def collect_activations(model, tok, n: int, seed: int, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Activations at ``names`` (default: hook_z, flattened, and resid_pre of every layer) at every non-BOS
    position."""
    rng = random.Random(seed)
    texts = [(ioi.ioi_prompt(rng) if rng.random() < 0.6 else
              (ioi.abc_prompt(rng) if rng.random() < 0.5 else ioi.filler_prompt(rng))).text for _ in range(n)]
    if names is None:
        names = [sae_hook(kind, l) for kind in (NodeKind.ATTN, NodeKind.RESID) for l in range(model.cfg.n_layers)]
    acts = {name: [] for name in names}
    for start in range(0, n, 256):
        enc = [_encode(tok, t) for t in texts[start:start + 256]]
        for length in sorted({len(e) for e in enc}):  # equal lengths: no padding inside the data
            group = torch.tensor([e for e in enc if len(e) == length])
            _, cache = run_with_cache(model, group, names)
            for name in names:
                a = cache[name][:, 1:]
                acts[name].append(a.reshape(-1, a.shape[-2] * a.shape[-1]) if a.ndim == 4 else a.reshape(-1, a.shape[-1]))
    return {k: torch.cat(v) for k, v in acts.items()}


def train_sae(x: torch.Tensor, d_sae: int, l1: float, seed: int, steps: int) -> dict[str, torch.Tensor]:
    """A standard ReLU SAE (L1 on activations times decoder norms), returned as W_enc/b_enc/W_dec/b_dec."""
    g = torch.Generator().manual_seed(seed)
    d_in = x.shape[1]
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec = (W_dec / W_dec.norm(dim=1, keepdim=True) * 0.1).requires_grad_()
    W_enc = W_dec.detach().T.clone().requires_grad_()
    b_enc = torch.zeros(d_sae, requires_grad=True)
    b_dec = x.median(dim=0).values.clone().requires_grad_()
    return _fit(x, x, {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}, l1, steps, g,
                scale=x.pow(2).sum(-1).mean(), subtract_b_dec=True)


def _fit(x: torch.Tensor, y: torch.Tensor, w: dict[str, torch.Tensor], l1: float, steps: int, g: torch.Generator, *,
         scale: torch.Tensor, subtract_b_dec: bool) -> dict[str, torch.Tensor]:
    """Adam on MSE(reconstruction, y) / ``scale`` plus L1 on activations times decoder norms (warmed up over the
    first 30% of the steps), batches of 1024 rows; ``subtract_b_dec``: an SAE's input minus its decoder bias."""
    W_enc, b_enc, W_dec, b_dec = w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"]
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=2e-3)
    for step in range(steps):
        pick = torch.randint(0, len(x), (1024,), generator=g)
        acts = torch.relu(((x[pick] - b_dec) if subtract_b_dec else x[pick]) @ W_enc + b_enc)
        mse = (acts @ W_dec + b_dec - y[pick]).pow(2).sum(-1).mean() / scale
        sparsity = (acts * W_dec.norm(dim=1)).sum(-1).mean() / scale.sqrt()
        loss = mse + l1 * 100 * sparsity * min(1.0, step / (steps * 0.3))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in w.items()}


@torch.no_grad()
def sae_metrics(w: dict[str, torch.Tensor], x: torch.Tensor) -> dict:
    """L0 (mean active features per position) and fraction of variance explained on ``x``."""
    acts = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    recon = acts @ w["W_dec"] + w["b_dec"]
    fve = 1 - (recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    return {"l0": float((acts > 0).float().sum(-1).mean()), "fve": float(fve),
            "alive": int((acts > 0).any(0).sum())}


def save_sae(w: dict[str, torch.Tensor], folder: Path, hook_name: str, reshape: bool) -> None:
    """Save in SAELens's format through SAELens itself, so its loader reads it back."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    cfg = StandardSAEConfig(d_in=w["W_enc"].shape[0], d_sae=w["W_enc"].shape[1],
                            reshape_activations="hook_z" if reshape else "none",
                            metadata=SAEMetadata(hook_name=hook_name, model_name="toy-ioi",
                                                 prepend_bos=True, context_size=MODEL_CFG["n_ctx"]))
    sae = StandardSAE(cfg)
    sae.load_state_dict({k: v.clone() for k, v in w.items()})
    sae.save_model(folder)


def train_transcoder(x: torch.Tensor, y: torch.Tensor, d_sae: int, l1: float, seed: int, steps: int
                     ) -> dict[str, torch.Tensor]:
    """A ReLU transcoder x [n, d_in] -> y [n, d_out] (MSE to y plus L1 on activations times decoder norms), as
    W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_out], b_dec [d_out]; its input has no decoder bias subtracted."""
    g = torch.Generator().manual_seed(seed)
    W_enc = (torch.randn(x.shape[1], d_sae, generator=g) / x.shape[1] ** 0.5).requires_grad_()
    W_dec = torch.randn(d_sae, y.shape[1], generator=g)
    W_dec = (W_dec / W_dec.norm(dim=1, keepdim=True) * 0.1).requires_grad_()
    b_enc = torch.zeros(d_sae, requires_grad=True)
    b_dec = y.mean(0).clone().requires_grad_()
    return _fit(x, y, {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}, l1, steps, g,
                scale=(y - y.mean(0)).pow(2).sum(-1).mean(), subtract_b_dec=False)


@torch.no_grad()
def transcoder_metrics(w: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> dict:
    """L0 and the share of the MLP output's variance the reconstruction explains, on held-out ``x`` -> ``y``."""
    acts = torch.relu(x @ w["W_enc"] + w["b_enc"])
    fve = 1 - (acts @ w["W_dec"] + w["b_dec"] - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    return {"l0": float((acts > 0).float().sum(-1).mean()), "fve": float(fve),
            "alive": int((acts > 0).any(0).sum())}


def save_transcoder(w: dict[str, torch.Tensor], folder: Path, layer: int) -> None:
    """Save in SAELens's format through SAELens's Transcoder class, so its loader reads it back."""
    from sae_lens import Transcoder, TranscoderConfig
    from sae_lens.saes.sae import SAEMetadata

    cfg = TranscoderConfig(d_in=w["W_enc"].shape[0], d_sae=w["W_enc"].shape[1], d_out=w["W_dec"].shape[1],
                           apply_b_dec_to_input=False,
                           metadata=SAEMetadata(hook_name=sae_hook(NodeKind.TRANSCODER, layer), model_name="toy-ioi",
                                                prepend_bos=True, context_size=MODEL_CFG["n_ctx"]))
    transcoder = Transcoder(cfg)
    transcoder.load_state_dict({k: v.clone() for k, v in w.items()})
    transcoder.save_model(folder)


def make_transcoders(out: Path, seed: int = 0, steps: int = 3000, log=print) -> dict:
    """Train one transcoder per layer of the toy model saved under ``out/model`` into ``out/transcoders``, on the
    processed model's MLP inputs and outputs; their metrics are added to ``out/metrics.json``. The model and
    its SAEs are left as they are."""
    t0 = time.time()
    loaded = load_local_model(out / "model", "cpu", name="toy-ioi")
    tok = build_tokenizer()
    n_layers = loaded.cfg.n_layers
    names = [n for l in range(n_layers) for n in (sae_hook(NodeKind.TRANSCODER, l), mlp_out_hook(l))]
    train = collect_activations(loaded.model, tok, 6000, seed + 1, names)
    test = collect_activations(loaded.model, tok, 1000, seed + 2, names)
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    metrics["transcoders"] = {}
    for l in range(n_layers):
        hook, target = sae_hook(NodeKind.TRANSCODER, l), mlp_out_hook(l)
        w = train_transcoder(train[hook], train[target], TRANSCODER_WIDTH, TRANSCODER_L1, seed + 40 + l, steps)
        save_transcoder(w, out / "transcoders" / hook, l)
        metrics["transcoders"][hook] = m = transcoder_metrics(w, test[hook], test[target])
        log(f"  transcoder {hook} -> {target} ({time.time() - t0:.0f}s): L0 {m['l0']:.1f}  FVE {m['fve']:.3f}")
    metrics_path.write_text(json.dumps(metrics, indent=1, sort_keys=True))
    return metrics


def make_toy(out: Path, seed: int = 0, model_steps: int = 1000, sae_steps: int = 1500, log=print) -> dict:
    """Train and save everything under ``out`` (model/, saes/, metrics.json); returns the metrics."""
    t0 = time.time()
    torch.manual_seed(seed)
    tok = build_tokenizer()
    log("phase 1/4: training the toy IOI model")
    state = train_model(tok, seed, model_steps, log)
    save_local_model(out / "model", {**MODEL_CFG, "d_vocab": tok.get_vocab_size(), "seed": seed}, state, tok,
                     name="toy-ioi", bos_token=BOS, revision=f"make-toy-seed{seed}")
    loaded = load_local_model(out / "model", "cpu", name="toy-ioi")
    metrics = {"seed": seed, "model": ioi_metrics(loaded.model, tok), "saes": {}}
    log(f"  held-out IOI accuracy {metrics['model']['ioi_accuracy']:.3f}, "
        f"logit diff {metrics['model']['ioi_logit_diff']:.2f}")
    log(f"  ({time.time() - t0:.0f}s)")
    log("phase 2/4: collecting activations from the processed model")
    train_x = collect_activations(loaded.model, tok, 6000, seed + 1)
    test_x = collect_activations(loaded.model, tok, 1000, seed + 2)
    log("phase 3/4: training SAEs")
    for hook, x in train_x.items():
        kind, layer = parse_sae_hook(hook) or (None, -1)
        is_z = kind is NodeKind.ATTN
        w = train_sae(x, SAE_WIDTH, SAE_L1["attn" if is_z else "resid"], seed + 10 + layer, sae_steps)
        name = hook
        save_sae(w, out / "saes" / name, hook, reshape=is_z)
        metrics["saes"][name] = sae_metrics(w, test_x[hook])
        log(f"  {name} ({time.time() - t0:.0f}s): L0 {metrics['saes'][name]['l0']:.1f}  FVE {metrics['saes'][name]['fve']:.3f}")
    metrics["train_seconds"] = round(time.time() - t0, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    log("phase 4/4: training transcoders")
    return make_transcoders(out, seed, log=log)
