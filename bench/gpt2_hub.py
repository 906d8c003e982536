"""GPT-2 Small as users load it, for the benchmarks: ``gpt2-small`` with ``gpt2-small-hook-z-kk`` and
``gpt2-small-res-jb`` through TransformerLens's and SAELens's own loaders, offline, from the Hub-shaped
cache of tests/hub_fixture.py at GPT-2 Small's real width (d_model 768, SAEs 24576 and 49152 wide as the
releases are; random weights, encoder biases set for L0 about 40). Built once (~4 GB) under
``CIRCUIT_CATALOG_BENCH_HF_HOME`` (default ~/.cache/circuit-catalog/gpt2-hub-768).

Import this module before anything that imports huggingface_hub: it reads HF_HOME once, on import.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
D_MODEL = int(os.environ.get("CIRCUIT_CATALOG_BENCH_D_MODEL", "768"))
SAE_SHRINK = 1 if D_MODEL == 768 else 128  # a narrow model gets the tests' narrow SAEs (quick checks)
HF_HOME = Path(os.environ.get("CIRCUIT_CATALOG_BENCH_HF_HOME",
                              Path.home() / ".cache" / "circuit-catalog" / f"gpt2-hub-{D_MODEL}"))
os.environ["HF_HOME"], os.environ["HF_HUB_OFFLINE"] = str(HF_HOME), "1"
SAES = ["gpt2-small-hook-z-kk", "gpt2-small-res-jb"]
# single GPT-2 tokens with a leading space: a prompt of N words is N tokens after BOS
WORDS = (" the of and to in is was for on that with as at by from his her it he she they when then after "
         "Mary John Tom James Dan store garden school house park drink ring book apple went gave said").split()


def ensure_built() -> Path:
    """Build the fixture cache unless it is there (tests/hub_fixture.py, in its own process)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from hub_fixture import built_marker

    if not (HF_HOME / built_marker(D_MODEL, SAE_SHRINK, 0)).exists():
        print(f"building the GPT-2 Hub fixture at width {D_MODEL} in {HF_HOME} (once)", file=sys.stderr)
        subprocess.run([sys.executable, str(ROOT / "tests" / "hub_fixture.py"), str(HF_HOME), "--d-model",
                        str(D_MODEL), "--sae-shrink", str(SAE_SHRINK), "--l0", "40"], check=True,
                       stdout=subprocess.DEVNULL)
    return HF_HOME


def gpt2_session(device):
    """ModelWithSaes of gpt2-small and both releases, loaded as `circuit-catalog ingest` loads them."""
    from ingest.model_with_saes import ModelWithSaes

    ensure_built()
    return ModelWithSaes.open("gpt2-small", SAES, str(device))


def word_corpus(path: Path, n: int, tokens: int, seed: int = 0) -> str:
    """A .jsonl corpus of ``n`` prompts of exactly ``tokens`` GPT-2 tokens (BOS included)."""
    import json
    import random

    rng = random.Random(seed)
    with path.open("w") as fh:
        for i in range(n):
            text = "".join(" " + rng.choice(WORDS) for _ in range(tokens - 1))
            fh.write(json.dumps({"text": text, "id": f"w{i:06d}"}) + "\n")
    return str(path)
