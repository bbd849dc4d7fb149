#!/usr/bin/env bash
# The full quality benchmark as run for docs/RESULTS.md (about 45 minutes on a shared 2-core CPU).
# Sentiment: every method, learning rate tuned per family on validation (seed 0), 3 seeds at the chosen rate.
# BBC News: four methods at sentiment's learning rates (no time to tune again on that machine), 3 seeds.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-benchmarks/quality/results}
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1
$PY benchmarks/quality/run.py --tasks sentiment --out "$OUT" --resume --deadline-minutes "${SENTIMENT_MINUTES:-34}"
$PY benchmarks/quality/run.py --tasks bbc-news --methods head-only,full,lora-r8,neat-r8 --lr-from sentiment \
    --out "$OUT" --resume --deadline-minutes "${BBC_MINUTES:-11}"
$PY benchmarks/quality/report.py "$OUT/quality.json"
