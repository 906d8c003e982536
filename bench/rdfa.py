"""RDFA benchmark: full-graph attribution on a GPT-2-Small-shaped model (12 layers, d_model 768,
12 heads, random weights) with random SAEs of the real width (24576, one hook_z and one resid_pre
per layer) with exactly 40 features firing at every position: TopK(40) over ReLU pre-activations,
encoder biases calibrated so that ~200 are positive. (A constant ReLU bias alone cannot give 20-60
per position here: a random model's attention averages shrink z with position, so its L0 runs from
thousands at position 0 to near zero late in the prompt.)

Prints prompts/s and the ratio (full attribution time) / (forward pass + all 24 SAE encodes), both
measured in the same run on the same inputs, and the cost of QK attribution (issue 15: the scores
behind the kept attention edges split over the residual SAE decompositions) as a ratio to the full
graph without it, in the same run (target <= 1.0). Usage: python bench/rdfa.py [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from catalog.ids import NodeKind  # noqa: E402
from ingest.lens import capture, weights_of  # noqa: E402
from ingest.models import build_processed  # noqa: E402
from ingest.rdfa.graph import full_graph  # noqa: E402
from ingest.rdfa.tensors import Pruning  # noqa: E402
from ingest.rdfa.types import SaeWeights  # noqa: E402

CFG = dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257, n_ctx=1024,
           act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard", model_name="gpt2-shaped")
D_SAE = 24576
TARGET_L0 = 40


def gpt2_shaped(device):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    raw = HookedTransformer(HookedTransformerConfig(**CFG, seed=0, device="cpu"))
    return build_processed(CFG, raw.state_dict(), device)


def calibrated_saes(model, device):
    """Random TopK(TARGET_L0) SAEs; each encoder bias is the quantile that makes ~5 x TARGET_L0 positive."""
    tokens = torch.randint(0, CFG["d_vocab"], (2, 64), device=device)
    _, cache = model.run_with_cache(tokens)
    g = torch.Generator(device="cpu").manual_seed(1)
    attn, resid = {}, {}
    for l in range(CFG["n_layers"]):
        for kind, x in ((NodeKind.ATTN, cache[f"blocks.{l}.attn.hook_z"].flatten(-2)),
                        (NodeKind.RESID, cache[f"blocks.{l}.hook_resid_pre"])):
            d_in = x.shape[-1]
            W_enc = (torch.randn(d_in, D_SAE, generator=g) / d_in ** 0.5).to(device)
            W_dec = (torch.randn(D_SAE, d_in, generator=g) / d_in ** 0.5).to(device)
            b_dec = x.reshape(-1, d_in).mean(0)
            pre = ((x[:, 1:] - b_dec) @ W_enc).flatten()
            tau = pre.kthvalue(int(pre.numel() * (1 - 5 * TARGET_L0 / D_SAE))).values
            sae = SaeWeights(kind, l, W_enc, torch.full((D_SAE,), -float(tau), device=device), W_dec, b_dec,
                             top_k=TARGET_L0)
            (attn if kind is NodeKind.ATTN else resid)[l] = sae
    return attn, resid


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps):
    if reps > 1:
        fn()  # warm-up (large configurations amortise it anyway)
        sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="one configuration only")
    ap.add_argument("--long", action="store_true", help="also a 1024-token prompt (memory check)")
    ap.add_argument("--configs", help="comma-separated BATCHxTOKENS, e.g. 1x1024 (replaces the default list)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}")
    model = gpt2_shaped(device)
    attn, resid = calibrated_saes(model, device)
    weights = weights_of(model)
    pruning = Pruning(top_k=5, min_abs=0.01, direct_positions=2, qk=False)  # the ingest defaults, without QK
    with_qk = Pruning(top_k=5, min_abs=0.01, direct_positions=2, qk=True)  # ... and with it (what ingest runs)
    configs = [(1, 64)] if args.quick else [(1, 64), (4, 64), (8, 64), (1, 128), (4, 128)]
    if args.long:
        configs.append((1, 1024))
    if args.configs:
        configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    print(f"{'batch':>5} {'tokens':>6} {'L0 (min-max)':>14} {'fwd+enc s':>10} {'attrib s':>9} {'ratio':>6} "
          f"{'prompts/s':>9} {'edges':>9} {'+QK s':>7} {'QK/attrib':>9} {'QK edges':>9} {'scores':>8}")
    for B, T in configs:
        tokens = torch.randint(0, CFG["d_vocab"], (B, T), device=device)
        lengths = torch.full((B,), T, device=device)

        def baseline():  # timed in this iteration, never later
            _, cap = capture(model, tokens, lengths)  # noqa: B023
            for l in range(CFG["n_layers"]):
                attn[l].activation(attn[l].pre_activation(cap.z[l].flatten(-2)))
                resid[l].activation(resid[l].pre_activation(cap.resid_pre[l]))
            return cap

        with torch.no_grad():
            t_base, cap = timed(baseline, device, 2 if T * B <= 256 else 1)
            t_attr, graph = timed(lambda: full_graph(cap, weights, attn, resid, pruning), device,  # noqa: B023
                                  2 if T * B <= 256 else 1)
            t_full, graph_qk = timed(lambda: full_graph(cap, weights, attn, resid, with_qk), device,  # noqa: B023
                                     2 if T * B <= 256 else 1)
        t_qk = t_full - t_attr
        qk = graph_qk.qk
        scores = len({(int(b), int(h), int(t), int(s)) for b, h, t, s in zip(
            qk.prompt.tolist(), qk.head.tolist(), qk.dst_pos.tolist(), qk.src_pos.tolist())}) if len(qk) < 5_000_000 else -1
        l0 = [(resid[l].activation(resid[l].pre_activation(cap.resid_pre[l])) > 0).sum(-1)[:, 1:] for l in range(12)]
        l0 = torch.cat([x.flatten() for x in l0]).float()
        total = t_base + t_attr  # what an ingest step costs: forward + encodes happen inside full_graph too
        print(f"{B:>5} {T:>6} {f'{l0.mean():.0f} ({l0.min():.0f}-{l0.max():.0f})':>14} {t_base:>10.2f} "
              f"{t_attr:>9.2f} {t_attr / t_base:>6.2f} {B / total:>9.2f} {len(graph.edges) + len(graph.direct):>9} "
              f"{t_qk:>7.2f} {t_qk / t_attr:>9.2f} {len(qk):>9} {scores:>8}")
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    print(f"peak memory: {peak:.1f} GiB ({'GPU allocated' if device.type == 'cuda' else 'process RSS'})")
    print("ratio = full_graph time / (forward with cache + 24 SAE encodes); prompts/s counts both (without QK)")
    print("+QK s = full_graph with QK - without; QK/attrib = that / full_graph without QK (target <= 1.0)")


if __name__ == "__main__":
    main()
