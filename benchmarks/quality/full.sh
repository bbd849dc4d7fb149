#!/usr/bin/env bash
# The full quality benchmark behind docs/RESULTS.md (about an hour on a busy 2-core CPU; see RESULTS.md for the
# invocations actually run, which are also recorded in quality.json).
# Sentiment: every method, learning rate tuned per family on validation (seed 0), 3 seeds at the chosen rate.
# BBC News: the same, tuned on its own validation split.
# Optional clock limits (UTC HH:MM; runs that would end later are skipped and recorded as such; rerunning the
# same command with --resume semantics fills them in): SENTIMENT_STOP_AT, BBC_STOP_AT.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-benchmarks/quality/results}
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1
$PY benchmarks/quality/run.py --tasks sentiment --out "$OUT" --resume ${SENTIMENT_STOP_AT:+--stop-at $SENTIMENT_STOP_AT}
$PY benchmarks/quality/run.py --tasks bbc-news --out "$OUT" --resume ${BBC_STOP_AT:+--stop-at $BBC_STOP_AT}
$PY benchmarks/quality/small_norm.py --out "$OUT/small_norm.json"
LR_NEAT=$($PY -c "import json;print(json.load(open('$OUT/quality.json'))['tasks']['sentiment']['chosen_lr']['neat-r8'])")
LR_LORA=$($PY -c "import json;print(json.load(open('$OUT/quality.json'))['tasks']['sentiment']['chosen_lr']['lora-r8'])")
$PY -m neat_peft.cli.main analyze "$OUT/runs/sentiment/neat-r8_lr${LR_NEAT}_seed0" \
    --compare "$OUT/runs/sentiment/lora-r8_lr${LR_LORA}_seed0" --out "$OUT/analysis"
$PY benchmarks/quality/report.py "$OUT/quality.json"
$PY benchmarks/quality/results_doc.py --results "$OUT" --doc docs/RESULTS.md
