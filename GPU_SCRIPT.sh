#!/usr/bin/env bash
# Issue 11's GPU check: benchmarks/quantized.py on bitsandbytes' CUDA path (nf4 with bf16 compute, LLM.int8),
# random Llama-shaped weights, NEAT vs peft LoRA on the same quantized base and vs fp32 NEAT. About 3 minutes on
# one H200; nothing is downloaded there.
#
#   bash GPU_SCRIPT.sh --prepare      # here, once: bitsandbytes' wheel unpacked into .gpu_carry/ (CUDA 13 libs only)
#   device run, carry [".gpu_carry"], timeout_s 420:   bash GPU_SCRIPT.sh
#
# The device image has torch (cu130), transformers and peft but no bitsandbytes; the unpacked wheel keeps its
# dist-info so transformers sees the package. Results: $OUT/quantized_gpu.txt and $OUT/quantized_gpu.json.
set -euo pipefail
cd "$(dirname "$0")"
CARRY=.gpu_carry
BNB=bitsandbytes==0.50.2

if [[ "${1:-}" == "--prepare" ]]; then
  rm -rf "$CARRY" && mkdir -p "$CARRY/wheel" "$CARRY/site"
  pip download --no-deps "$BNB" -d "$CARRY/wheel" -q
  python3 -m zipfile -e "$CARRY"/wheel/*.whl "$CARRY/site"
  # Keep the CPU and CUDA 13.x libraries (the image's torch is cu130): 125 MB -> about 10 MB.
  find "$CARRY/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda13*.so' -delete
  rm -rf "$CARRY/wheel"
  du -sh "$CARRY"
  exit 0
fi

OUT=${OUT:-/tmp/quantized_gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/$CARRY/site:$PWD/src" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, bitsandbytes, transformers, peft; print('torch', torch.__version__, 'bnb', bitsandbytes.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
set -o pipefail
timeout 330 python3 benchmarks/quantized.py --device cuda --compute-dtype bfloat16 --backends nf4 int8 \
  --sizes 2048 4096 --targets qv all --layers 4 --batch 8 --seq 512 --warmup 2 --repeats 10 \
  --json "$OUT/quantized_gpu.json" 2>&1 | grep -v -e 'Loading weights' -e 'Writing model' | tee "$OUT/quantized_gpu.txt"
