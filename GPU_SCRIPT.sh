#!/usr/bin/env bash
# The GPU checks, one device call each, on one H100 or H200; nothing is downloaded there (random weights).
#
#   bash GPU_SCRIPT.sh --prepare      # here, once: bitsandbytes and peft unpacked into .gpu_carry/ (about 11 MB)
#   device run, carry [".gpu_carry"], timeout_s 600:   bash GPU_SCRIPT.sh             # issue 29, about 4 minutes
#   device run, carry [".gpu_carry"], timeout_s 420:   bash GPU_SCRIPT.sh quantized   # issue 11, about 3 minutes
#
# Default (issue 29): benchmarks/llm.py -- NEAT vs peft LoRA vs peft PEANuT train steps on random models in
# Llama-3-8B, Llama-3.2-3B and Llama-3.2-1B shapes (8, 8 and 16 blocks), bf16 and nf4 bases, q+v and all-linear,
# r = 1 and 32, 8 x 1024 tokens per step, plus the correctness checks on CUDA. Its own limit is 8 minutes (the
# JSON is rewritten after every group, so a cut-off run keeps what it measured). Results: $OUT/llm_gpu.txt,
# $OUT/llm_gpu.json.
# `quantized` (issue 11): benchmarks/quantized.py on bitsandbytes' CUDA path (nf4 with bf16 compute, LLM.int8).
# Results: $OUT/quantized_gpu.txt, $OUT/quantized_gpu.json.
#
# The device image has torch (cu130) and transformers but no bitsandbytes, and a peft of unknown version; the
# unpacked wheels keep their dist-info, so transformers sees bitsandbytes, and they come first on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")"
CARRY=.gpu_carry
WHEELS=(bitsandbytes==0.50.2 peft==0.21.2)

if [[ "${1:-}" == "--prepare" ]]; then
  rm -rf "$CARRY" && mkdir -p "$CARRY/wheel" "$CARRY/site"
  for wheel in "${WHEELS[@]}"; do
    pip download --no-deps "$wheel" -d "$CARRY/wheel" -q
  done
  for file in "$CARRY"/wheel/*.whl; do
    python3 -m zipfile -e "$file" "$CARRY/site"
  done
  # Keep the CPU and CUDA 13.x libraries (the image's torch is cu130): 125 MB -> about 10 MB.
  find "$CARRY/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda13*.so' -delete
  rm -rf "$CARRY/wheel"
  du -sh "$CARRY"
  exit 0
fi

OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/$CARRY/site:$PWD/src" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, bitsandbytes, transformers, peft; print('torch', torch.__version__, 'bnb', bitsandbytes.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
set -o pipefail
if [[ "${1:-}" == "quantized" ]]; then
  timeout 330 python3 -m benchmarks.quantized --device cuda --compute-dtype bfloat16 --backends nf4 int8 \
    --sizes 2048 4096 --targets qv all --layers 4 --batch 8 --seq 512 --warmup 2 --repeats 10 \
    --json "$OUT/quantized_gpu.json" 2>&1 | grep -v -e 'Loading weights' -e 'Writing model' | tee "$OUT/quantized_gpu.txt"
else
  timeout 480 python3 -m benchmarks.llm --device cuda --json "$OUT/llm_gpu.json" 2>&1 \
    | grep -v -e 'Loading weights' -e 'Writing model' | tee "$OUT/llm_gpu.txt"
fi
