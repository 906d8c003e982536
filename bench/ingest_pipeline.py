"""Ingest benchmark: end-to-end prompts/s and observations/s of `run_job` (tokenize, forward, RDFA,
aggregate, write through the writer thread), on toy-ioi and on the GPT-2-shaped random model of
bench/rdfa.py, into SQLite and a live Neo4j; plus the share of wall time the compute loop waited on
the store (target <= 10%). Usage: python bench/ingest_pipeline.py [--threads 2] [--gpt2-prompts 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from catalog.neo4j_server import running_on_free_port  # noqa: E402
from catalog.stores import open_store  # noqa: E402
from ingest.forward import weights_of  # noqa: E402
from ingest.jobs import JobOptions, run_job  # noqa: E402
from ingest.models import LoadedModel, Tokenizer  # noqa: E402
from ingest.saes import LoadedSae, SaeSet  # noqa: E402
from ingest.session import Session  # noqa: E402


def gpt2_shaped_session(device) -> Session:
    """The random GPT-2-shaped model + TopK SAEs of bench/rdfa.py, with a word-level tokenizer w0..w50256."""
    import rdfa
    from tokenizers import Tokenizer as Fast, models, pre_tokenizers

    model = rdfa.gpt2_shaped(device)
    attn, resid = rdfa.calibrated_saes(model, device)
    fast = Fast(models.WordLevel({f"w{i}": i for i in range(rdfa.CFG["d_vocab"])}, unk_token="w0"))
    fast.pre_tokenizer = pre_tokenizers.Whitespace()
    lm = LoadedModel(model, Tokenizer(fast=fast, bos_id=0, name="words"), "gpt2-shaped-random", "bench", None)
    wrap = lambda w, hook: LoadedSae(w, "bench", hook, hook, "random")  # noqa: E731
    saes = SaeSet({l: wrap(w, f"blocks.{l}.attn.hook_z") for l, w in attn.items()},
                  {l: wrap(w, f"blocks.{l}.hook_resid_pre") for l, w in resid.items()})
    return Session(lm, saes, weights_of(model), attn, resid, device)


def word_corpus(path: Path, n: int, tokens: int) -> str:
    g = torch.Generator().manual_seed(0)
    with path.open("w") as fh:
        for i in range(n):
            words = " ".join(f"w{int(t)}" for t in torch.randint(1, 50257, (tokens - 1,), generator=g))
            fh.write(f'{{"text": "{words}", "id": "w{i}"}}\n')
    return str(path)


def one(session, corpus, url, run, batch) -> None:
    try:
        s = run_job(session, corpus, open_store(url), JobOptions(run=run, batch_size=batch, progress=False),
                    log=lambda *_: None)
    except Exception as exc:  # report and go on: a failed configuration is a figure too
        print(f"  {url.split(':')[0]:<7} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        return
    print(f"  {url.split(':')[0]:<7} {s.prompts / s.seconds:8.2f} prompts/s {s.observations / s.seconds:10,.0f} "
          f"observations/s   store wait {s.store_wait_share:5.1%}   ({s.prompts} prompts, {s.seconds:.0f} s)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--toy-prompts", type=int, default=200)
    ap.add_argument("--gpt2-prompts", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as d, \
            running_on_free_port(f"{d}/neo4j", page_cache="1g", heap="3g") as neo:
        tmp = Path(d)
        print(f"CPU, torch threads {torch.get_num_threads()}; ingest defaults (top-k 5, |v| >= 0.01, direct top-2)")
        toy = Session.open("toy-ioi", ["toy-ioi"], "cpu")
        print(f"toy-ioi, ioi:{args.toy_prompts}, batch 8:")
        one(toy, f"ioi:{args.toy_prompts}", f"sqlite:///{tmp}/toy.db", "toy", 8)
        one(toy, f"ioi:{args.toy_prompts}", neo, "toy", 8)
        print(f"GPT-2-shaped random model, {args.gpt2_prompts} prompts x 64 tokens, batch 4:")
        big = gpt2_shaped_session(torch.device("cpu"))
        corpus = word_corpus(tmp / "words.jsonl", args.gpt2_prompts, 64)
        one(big, corpus, f"sqlite:///{tmp}/gpt2.db", "gpt2", 4)
        one(big, corpus, neo, "gpt2", 4)

if __name__ == "__main__":
    main()
