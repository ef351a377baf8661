#!/usr/bin/env bash
# One batched GPU session: GPU tests, kernel microbenchmarks, then the end-to-end benchmark against
# Hugging Face. Logs go to $OUT (or ./gpu-out). Usage: PYTHONPATH=. bash scripts/gpu_check.sh [steps]
# (steps: tests,kernels,fused,profile,prefill,levers1,costs1,levers256,fp8tests,fp8bench,fp8kernels,moelayer,
# fewrows,fp8moe,fp8moe1,fp8mla,buffers,swaps,router256,more256,profile256,fp8acc,abtree,abfp8,serve,bench; see each below). PACK=1: at the end, everything written to $OUT goes
# into one file, $OUT/gpu-check.tgz (for a machine that hands back few files).
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { [ -n "${PACK:-}" ] && tar -czf /tmp/gpu-check.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* \
  && mv /tmp/gpu-check.tgz "$OUT/"; }
trap pack EXIT
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1
STEPS=${1:-tests,kernels,bench}
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
has() { [[ ",$STEPS," == *",$1,"* ]]; }
step() { local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"; local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "=== $name rc=$rc in $(( $(date +%s) - t0 ))s"; tail -n 25 "$OUT/$name.log"; }
# Packages the device image may lack (the server's, llguidance), carried as wheels in .whl/
# (fetched by scripts/device_wheels.sh)
if [ -d .whl ]; then
  for wheel in .whl/*.whl; do  # one by one: a wheel this machine cannot take leaves the others installed
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$wheel" 2>/dev/null \
      || echo "could not install $wheel"
  done
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
has tests && step gpu-tests 420 python3 -m pytest -q tests/gpu
# the grammar bitmask on the GPU (needs llguidance and jsonschema: carried in .whl/ if the image lacks them)
has tests && step so-gpu 60 python3 -m pytest -q tests/test_structured_outputs.py::test_bitmask_on_the_gpu_equals_the_cpu
has kernels && step bench-kernels 120 python3 scripts/bench_kernels.py
has fused && step bench-fused 90 python3 scripts/bench_fused_kernels.py
# where a decode step's time goes (batch 1), the MLA decode and MoE launch sweeps; a step that admits a
# prompt beside 256 decodes
has profile && step profile-decode 300 python3 scripts/profile_decode.py
has profile && step profile-mixed 120 python3 scripts/profile_mixed_step.py
# batch 1's step with FP8 weights: where its 2.26 ms go (the 1.5 ms target's kernels)
has profile && step profile-decode-fp8 120 python3 scripts/profile_decode.py --step-only --fp8
# prefill attention: the variants (flash, cuDNN, SDPA loops, our Triton kernel), the Triton kernel's launch
# sweep beside flash, then the 128K-token prompt with the Triton kernel (the default) and with flash for
# every prefill step
if has prefill; then
  step prefill-variants 240 python3 scripts/prefill_attention_variants.py
  step prefill-sweep 240 python3 scripts/prefill_attention_variants.py --sweep
  LONG="--shape v2-lite --batch-sizes 1 --decode-len 16 --prefill-len 131072 --prefill-prompts 1"
  step long-triton 150 python3 -m deepseek_v2.cli bench $LONG --json "$OUT/long-triton.json"
  step long-flash 150 python3 scripts/with_settings.py prefill.TRITON_FROM_KEYS=None -- bench $LONG \
    --json "$OUT/long-flash.json"
fi
# decode's levers that are built but off (each a setting of deepseek_v2/kernels, applied by
# scripts/with_settings.py; docs/benchmarks.md has their last timings), batch 1 (step levers1, ~5 min): the
# default twice beside the weights not asked of L2 before each kernel waits (bf16 and FP8); FP8: the
# gate/up GEMM storing the intermediate quantized, each token's picks summed in the down GEMM, the bf16
# kv_a_proj beside (not in) the query projection's launch, x quantized by a launch of its own (not the
# router's), the shared experts' tiles not asked of L2 first. 256 sequences (levers256), bf16 and FP8: the
# MoE's 32-row blocks on Hopper's warpgroup MMA (operands swapped); then the MoE layer's variants alone and
# where a 256-sequence decode step goes
B1="--shape v2-lite --batch-sizes 1 --prompt-len 1024 --output-len 256 --prefill-len 4096 --prefill-prompts 1"
B256="--shape v2-lite --batch-sizes 256 --prompt-len 1024 --output-len 256 --prefill-len 4096 --prefill-prompts 1"
for q in bf16 fp8; do
  quant=""; [ $q = fp8 ] && quant="--quantization fp8"
  if has levers1; then
    for i in 1 2; do
      step levers-$q-1-default-$i 120 python3 -m deepseek_v2.cli bench $B1 $quant
      step levers-$q-1-no-prefetch-$i 120 python3 scripts/with_settings.py launch.PREFETCH_WEIGHTS=False -- bench $B1 $quant
    done
    if [ $q = fp8 ]; then
      step levers-$q-1-quantize-inter 120 python3 scripts/with_settings.py moe.QUANTIZE_INTER_MAX_TOKENS=16 \
        -- bench $B1 $quant
      step levers-$q-1-combine 120 python3 scripts/with_settings.py moe.COMBINE_IN_GEMM_MAX_TOKENS=64 -- bench $B1 $quant
      step levers-$q-1-no-plain 120 python3 scripts/with_settings.py fp8_linear.PLAIN_ROWS_IN_LAUNCH=False \
        -- bench $B1 $quant
      step levers-$q-1-quantize-apart 120 python3 scripts/with_settings.py router.QUANTIZE_X_IN_KERNEL=False \
        -- bench $B1 $quant
      step levers-$q-1-no-shared-prefetch 120 python3 scripts/with_settings.py moe.PREFETCH_SHARED=False \
        -- bench $B1 $quant
    fi
  fi
  if has levers256; then
    step levers-$q-256-default 150 python3 -m deepseek_v2.cli bench $B256 $quant
    step levers-$q-256-on 150 python3 scripts/with_settings.py moe.SWAP_AB_MAX_BLOCK_M=32 -- bench $B256 $quant
  fi
done
has levers1 && step levers-moe-layer 150 python3 scripts/bench_moe_layer.py --variants
# what each family of batch 1's launches costs in the FP8 step: the step with its kernels swapped for nothing
# (scripts/time_without_launches.py; docs/benchmarks.md, "what batch 1's small launches cost"), ~4 min
if has costs1; then
  i=0
  for what in none experts attention fp8_gemms router norms prepare,absorb none; do
    i=$((i + 1))
    step costs-1-$i-${what/,/-} 120 python3 scripts/time_without_launches.py $what -- bench $B1 --quantization fp8
  done
fi
has levers256 && step profile-256 240 python3 scripts/profile_decode.py --step-only --batch=256
# FP8 (docs/fp8.md): its GPU tests, then bf16 / FP8 weights / FP8 weights + FP8 cache in the same run,
# the kernel table and the V2-Lite-shape KL
has fp8tests && step fp8-tests 130 python3 -m pytest -q -s tests/gpu/test_fp8_gpu.py
FP8_BENCH="--shape v2-lite --batch-sizes 1,256 --prompt-len 1024 --output-len 256 --prefill-len 4096 --prefill-prompts 8"
if has fp8bench; then
  step bench-bf16 110 python3 -m deepseek_v2.cli bench $FP8_BENCH --json "$OUT/bench-bf16.json"
  step bench-fp8 110 python3 -m deepseek_v2.cli bench $FP8_BENCH --quantization fp8 --json "$OUT/bench-fp8.json"
  step bench-fp8-kv 110 python3 -m deepseek_v2.cli bench $FP8_BENCH --quantization fp8 --kv-cache-dtype fp8 \
    --json "$OUT/bench-fp8-kv.json"
fi
# ALT_TREE=DIR: the mixed workload and the fixed benchmark above (bf16) with this tree, then with DIR's
# (another version of the project, e.g. `git archive BRANCH | tar -x -C DIR`), back to back on one machine
if has abtree; then
  for name in main alt; do
    tree=.; [ $name = alt ] && tree=${ALT_TREE:?set ALT_TREE to the other tree}
    step mixed-$name 150 bash -c "cd $tree && PYTHONPATH=. python3 -m deepseek_v2.cli bench --shape v2-lite \
      --workload mixed --json $(realpath "$OUT")/mixed-$name.json"
    step fixed-$name 150 bash -c "cd $tree && PYTHONPATH=. python3 -m deepseek_v2.cli bench $FP8_BENCH \
      --json $(realpath "$OUT")/fixed-$name.json"
  done
fi
# ALT_TREE=DIR: the FP8 kernel table, then prefill and 256 sequences with FP8 weights, with this tree and with
# DIR's, back to back (the FP8 GEMMs' one scale a row against the tree before it, docs/fp8.md)
if has abfp8; then
  for name in main alt main-again; do
    tree=.; [ $name = alt ] && tree=${ALT_TREE:?set ALT_TREE to the other tree}
    step fp8-kernels-$name 90 bash -c "cd $tree && PYTHONPATH=. python3 scripts/bench_fp8.py"
    step fp8-bench-$name 150 bash -c "cd $tree && PYTHONPATH=. python3 -m deepseek_v2.cli bench --shape v2-lite \
      --batch-sizes 256 --prompt-len 1024 --output-len 256 --prefill-len 4096 --prefill-prompts 8 --quantization fp8"
  done
fi
has fp8kernels && step bench-fp8-kernels 70 python3 scripts/bench_fp8.py
# a whole MoE layer with the shared experts beside the routed experts' kernel and inside it (bf16, FP8)
has moelayer && step bench-moe-layer 120 python3 scripts/bench_moe_layer.py
# the FP8 GEMM at one row against cuBLAS bf16, with a sweep of its launch (K in pieces)
has fewrows && step bench-few-rows 300 python3 scripts/bench_fp8.py --few-rows
# the fused MoE with FP8 experts: default launch against a sweep, 1 to 4096 tokens
has fp8moe && step bench-fp8-moe 400 python3 scripts/bench_fp8.py --moe-sweep
# the FP8 MoE at one and eight tokens (batch-1 decode's experts: ~1.2 TB/s at one token in the kernel table)
has fp8moe1 && step bench-fp8-moe-1 200 python3 scripts/bench_fp8.py --moe-sweep=1,8
# MLA decode over the FP8 cache: its default launch and a grid of tile reads, warps and tiles (~1 min)
has fp8mla && step bench-fp8-mla 150 python3 scripts/bench_fp8.py --mla-sweep
# MLA decode with two tiles in flight (mla_decode.TILE_BUFFERS=2, built and tested, not yet timed) against
# the default, twice each: batch 1 and 256 sequences, FP8 weights with the bf16 cache and with the FP8 cache
# (step buffers, ~6 min)
if has buffers; then
  for i in 1 2; do
    for kv in bf16 fp8; do
      cache=""; [ $kv = fp8 ] && cache="--kv-cache-dtype fp8"
      for b in 1 2; do
        step buffers-$b-kv-$kv-1-$i 120 python3 scripts/with_settings.py mla_decode.TILE_BUFFERS=$b -- bench $B1 \
          --quantization fp8 $cache
        [ $i = 1 ] && step buffers-$b-kv-$kv-256 150 python3 scripts/with_settings.py mla_decode.TILE_BUFFERS=$b \
          -- bench $B256 --quantization fp8 $cache
      done
    done
  done
fi
# FP8 weights, the swapped operands (~5 min; on by default since this step timed them): the default beside the
# dense FP8 GEMM's one-row tiles unswapped (fp8_linear.SWAP_AB_MAX_M=0) at batch 1, the MoE's 32-row tiles
# unswapped (moe.SWAP_AB_MAX_BLOCK_M=16) and the gate/up GEMM storing the intermediate quantized
# (moe.QUANTIZE_INTER_MAX_TOKENS) at 256 sequences
if has swaps; then
  for i in 1 2; do
    step swaps-1-default-$i 120 python3 -m deepseek_v2.cli bench $B1 --quantization fp8
    step swaps-1-gemm-off-$i 120 python3 scripts/with_settings.py fp8_linear.SWAP_AB_MAX_M=0 -- bench $B1 --quantization fp8
  done
  step swaps-256-default 150 python3 -m deepseek_v2.cli bench $B256 --quantization fp8
  step swaps-256-moe-16 150 python3 scripts/with_settings.py moe.SWAP_AB_MAX_BLOCK_M=16 -- bench $B256 --quantization fp8
  step swaps-256-quantize-inter 150 python3 scripts/with_settings.py moe.QUANTIZE_INTER_MAX_TOKENS=256 \
    -- bench $B256 --quantization fp8
fi
# 256 sequences' levers built without a GPU (docs/fp8.md, "The router in one launch and inputs quantized
# once"): their GPU tests, then 256 sequences, each against the default in the same call (~9 min): the
# router in blocks of tokens (router.ROUTE_BLOCKS_MAX_TOKENS=512) in bf16 and FP8, and with FP8 the GEMMs'
# inputs quantized once (fp8.QUANTIZE_ONCE_FROM), alone and with the router's blocks. Step more256 (~8 min),
# FP8: the shared experts inside the routed experts' kernel at 256 tokens, the gate/up GEMM storing the
# intermediate quantized, the Triton GEMM for the dense layers in place of cuBLAS's, the query projection's
# Triton GEMM with the bf16 kv_a_proj in its launch, and all of the levers
BLOCKS=router.ROUTE_BLOCKS_MAX_TOKENS=512 ONCE=fp8.QUANTIZE_ONCE_FROM=17 INTER=moe.QUANTIZE_INTER_MAX_TOKENS=256
if has router256; then
  step router256-tests 240 python3 -m pytest -q tests/gpu/test_fused_kernels_gpu.py tests/gpu/test_fp8_gpu.py \
    -k "route or quantized_once or x_once or quantizes_for_fp8 or silu or plain_rows"
  step router256-bf16-default 120 python3 -m deepseek_v2.cli bench $B256
  step router256-bf16-blocks 120 python3 scripts/with_settings.py $BLOCKS -- bench $B256
  step router256-fp8-default 120 python3 -m deepseek_v2.cli bench $B256 --quantization fp8
  step router256-fp8-blocks 120 python3 scripts/with_settings.py $BLOCKS -- bench $B256 --quantization fp8
  step router256-fp8-once 120 python3 scripts/with_settings.py $ONCE -- bench $B256 --quantization fp8
  step router256-fp8-both 120 python3 scripts/with_settings.py $BLOCKS $ONCE -- bench $B256 --quantization fp8
fi
if has more256; then
  step more256-fp8-default 120 python3 -m deepseek_v2.cli bench $B256 --quantization fp8
  step more256-fp8-fused-shared 120 python3 scripts/with_settings.py deepseek_v2.moe.MoE.FUSED_SHARED_MAX_TOKENS=256 \
    -- bench $B256 --quantization fp8
  step more256-fp8-quantize-inter 120 python3 scripts/with_settings.py $INTER -- bench $B256 --quantization fp8
  step more256-fp8-triton-dense 120 python3 scripts/with_settings.py fp8_linear.SCALED_MM_MIN_M=None \
    -- bench $B256 --quantization fp8
  step more256-fp8-plain-in-launch 120 python3 scripts/with_settings.py fp8_linear.PLAIN_ROWS_IN_LAUNCH_MAX_M=512 \
    -- bench $B256 --quantization fp8
  step more256-fp8-all 120 python3 scripts/with_settings.py $BLOCKS $ONCE $INTER -- bench $B256 --quantization fp8
  step more256-fp8-default-again 120 python3 -m deepseek_v2.cli bench $B256 --quantization fp8
fi
# where the 256-sequence FP8 step goes with the levers above on, against the default (kernels by family)
if has profile256; then
  step profile256-fp8-default 150 python3 scripts/profile_decode.py --step-only --batch=256 --fp8
  step profile256-fp8-levers 150 python3 scripts/with_settings.py $BLOCKS $ONCE -- scripts/profile_decode.py \
    --step-only --batch=256 --fp8
fi
has fp8acc && step fp8-accuracy 90 python3 scripts/fp8_accuracy.py --v2-lite
# The online benchmark (docs/benchmarks.md): a server of random V2-Lite-shape weights with the shipped
# tokenizer, driven at 20 requests/s and all at once. The server's packages must be installed there
# (or carried as wheels in .whl/, installed below). Each server prints, at exit, what its steps were
# where a stream waited over 30 ms for a token and how late its event loop woke (server_overhead's
# report_step_gaps and report_loop_lag, where the tree has them) and its garbage collector's pauses (scripts/server_overhead.py's report_gc_pauses), echoed below; a variant's flag --no-freeze-gc
# leaves the start-up heap to the collector (server_overhead.keep_gc_unfrozen; the server freezes it).
serve_once() {  # $1: a name for the logs; then extra serve flags (TREE=DIR: the server of DIR's tree)
  local name=$1; shift
  env -C "${TREE:-.}" python3 -c "import sys; from scripts.server_overhead import report_gc_pauses as gc_pauses; gc_pauses(); \
so = __import__('scripts.server_overhead').server_overhead; [getattr(so, f)() for f in ('report_step_gaps', 'report_loop_lag') if hasattr(so, f)]; \
thaw = '--no-freeze-gc' in sys.argv; thaw and sys.argv.remove('--no-freeze-gc'); \
thaw and __import__('scripts.server_overhead').server_overhead.keep_gc_unfrozen(); \
from deepseek_v2.server.cli import main; sys.exit(main(sys.argv[1:]))" \
    --model /tmp/v2-lite-dummy --load-format dummy --dtype bfloat16 --max-model-len 3072 \
    --gpu-memory-utilization 0.85 --port 8011 --log-level warning "$@" > "$OUT/server-$name.log" 2>&1 &
  local server=$! started=$(date +%s)
  for _ in $(seq 1 180); do
    kill -0 $server 2>/dev/null || break
    python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8011/health', timeout=2)" 2>/dev/null && break
    sleep 1
  done
  tail -n 3 "$OUT/server-$name.log"; touch "$OUT/ready-$name"
  echo "server $name answered /health after $(( $(date +%s) - started )) s"
  step bench-serve-$name 300 python3 -m deepseek_v2.cli bench-serve --url http://127.0.0.1:8011 \
    --checkpoint /tmp/v2-lite-dummy --num-prompts 500 --request-rate 20,inf --json "$OUT/bench-serve-$name.json"
  kill $server 2>/dev/null; wait $server 2>/dev/null
  grep -A4 "^gc generation\|^steps with decodes\|^event loop lag" "$OUT/server-$name.log" | grep "gc generation\|^steps\|^  \|^event"
  # with TRITON_CACHE_DIR set (fresh): the Triton kernels first compiled while serving, not at start-up
  [ -n "${TRITON_CACHE_DIR:-}" ] && find "$TRITON_CACHE_DIR" -name '*.json' ! -name '__grp__*' -newer "$OUT/ready-$name" \
    | python3 -c "import sys, json, collections; names = [json.load(open(p.strip())).get('name') for p in sys.stdin]; \
print('Triton kernels compiled while serving:', len(names), dict(collections.Counter(names)))"
}
if has serve; then
  python3 scripts/dummy_checkpoint.py /tmp/v2-lite-dummy
  # SERVE_VARIANTS: the servers to measure in this run, "name:flags" separated by ";" (loans of the same
  # kind differ by up to 25%, so what is compared is measured in one run)
  # ALT_TREE=DIR: the same run with the server of DIR's tree (another version of the project), after
  # the variants, or before them and again after them with ALT_FIRST=1 (the first server of a call
  # has measured slower all at once: docs/benchmarks.md, "Mixed steps")
  [ -n "${ALT_TREE:-}" ] && [ -n "${ALT_FIRST:-}" ] && TREE=$ALT_TREE serve_once alt-first
  IFS=';' read -ra variants <<< "${SERVE_VARIANTS:-main:;cap-1024:--max-prefill-tokens-beside-decodes 1024}"
  for v in "${variants[@]}"; do
    read -ra flags <<< "${v#*:}"
    serve_once "${v%%:*}" "${flags[@]}"
  done
  [ -n "${ALT_TREE:-}" ] && TREE=$ALT_TREE serve_once alt
  # ALT_ASYNC_ENGINE=FILE: the same run again with FILE as deepseek_v2/engine/async_engine.py, so that two
  # versions of the serving loop are compared on one machine
  if [ -n "${ALT_ASYNC_ENGINE:-}" ]; then
    cp deepseek_v2/engine/async_engine.py /tmp/async_engine.main.py && cp "$ALT_ASYNC_ENGINE" deepseek_v2/engine/async_engine.py
    serve_once alt
    cp /tmp/async_engine.main.py deepseek_v2/engine/async_engine.py
  fi
fi
has bench && step bench-v2-lite 330 python3 -m deepseek_v2.cli bench --shape v2-lite --compare-hf \
  --batch-sizes 1,32,256 --prompt-len 1024 --output-len 256 --prefill-len 4096 --prefill-prompts 8 \
  --json "$OUT/bench-v2-lite.json"
exit 0
