#!/usr/bin/env bash
# One batched GPU session: GPU tests, kernel microbenchmarks, then the end-to-end benchmark against
# Hugging Face. Logs go to $OUT (or ./gpu-out). Usage: PYTHONPATH=. bash scripts/gpu_check.sh [steps]
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1
STEPS=${1:-tests,kernels,bench}
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
step() { local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"; local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "=== $name rc=$rc in $(( $(date +%s) - t0 ))s"; tail -n 25 "$OUT/$name.log"; }
[[ $STEPS == *tests* ]] && step gpu-tests 200 python3 -m pytest -q -x tests/gpu
[[ $STEPS == *kernels* ]] && step bench-kernels 120 python3 scripts/bench_kernels.py
[[ $STEPS == *fused* ]] && step bench-fused 90 python3 scripts/bench_fused_kernels.py
[[ $STEPS == *bench* ]] && step bench-v2-lite 330 python3 -m deepseek_v2.cli bench --shape v2-lite --compare-hf \
  --batch-sizes 1,32,256 --prompt-len 1024 --output-len 256 --prefill-len 4096 --prefill-prompts 8 \
  --json "$OUT/bench-v2-lite.json"
exit 0
