#!/usr/bin/env bash
# Train the demonstration model on one GPU: pretraining, SFT, plots and sample conversations.
# Needs data/demo (scripts/build_demo_corpus.py). Results go to runs/ and, packed, to $OUT.
#   PYTHONPATH=. bash scripts/train_demo.sh [pretrain_minutes] [sft_minutes]
set -u
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1
OUT=${OUT:-runs/out}; mkdir -p "$OUT" runs
PRE_MIN=${1:-4.3}; SFT_MIN=${2:-1.2}
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m deepseek_v2.cli train configs/demo-pretrain.json --max-minutes "$PRE_MIN" 2>&1 | tee runs/pretrain.log \
  | grep -E "val|model:|data:|budget|saved|00/|Error|error" 
python3 -m deepseek_v2.cli sft configs/demo-sft.json --max-minutes "$SFT_MIN" 2>&1 | tee runs/sft.log \
  | grep -E "val|model:|data:|budget|saved|0/|Error|error"
python3 scripts/plot_training.py runs/demo-pretrain/metrics.jsonl runs/demo-sft/metrics.jsonl \
  --out runs/demo-loss.png --load-out runs/demo-expert-load.png 2>&1 | tail -3
timeout 120 python3 scripts/demo_samples.py runs/demo-sft/model data/demo/chat_val.jsonl 8 > runs/samples.md 2> runs/samples.err
tail -30 runs/samples.md
tar cf - runs/demo-sft/model runs/demo-pretrain/metrics.jsonl runs/demo-sft/metrics.jsonl runs/*.png \
  runs/*.log runs/samples.md runs/demo-pretrain/expert_load.png runs/demo-sft/expert_load.png 2>/dev/null \
  | split -b 15m - "$OUT/demo.tar.part-"
ls -la "$OUT"
