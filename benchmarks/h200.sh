#!/usr/bin/env bash
# Runs on the lent H200 (device tool) from the repository root:
#   bash benchmarks/h200.sh PHASE [PHASE ...]
# Phases: install, test, kernels, latency, throughput, compare, quant, serve, ablation;
#   attn-setup, attn-test, attn-kernels, attn-e2e, attn-keep (FlashInfer / FlashAttention: carry .gpu).
# Logs and JSON results go to $OUT (fetched back) and benchmarks/results/.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" benchmarks/results
# Native kernels (csrc/) build here; carry .ext to reuse a build (the native phase returns it).
export TORCH_EXTENSIONS_DIR=$PWD/.ext
[ -d .ext ] && find .ext -type f -exec touch {} +   # newer than the sources: ninja keeps it
CFG=${CFG:-configs/llama3-8b.yaml}
log() { echo "=== $* ($(date +%T))"; }

for phase in "$@"; do
  case $phase in
    install)
      log install
      python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
      nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
      python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
      ;;
    test)
      log "pytest -m gpu"
      python3 -m pytest -m gpu -q -x -p no:cacheprovider tests 2>&1 | tail -25 | tee "$OUT/gpu_tests.log"
      ;;
    kernels)
      log kernels
      python3 benchmarks/kernels_ops.py --json benchmarks/results/kernels_ops_h200.json 2>&1 | tail -40
      cp benchmarks/results/kernels_ops_h200.json "$OUT/" 2>/dev/null
      ;;
    latency)
      log "latency batch 1, 128 in / 256 out"
      loom --log-level WARNING bench latency --config $CFG --batch-size 1 --input-len 128 --output-len 256 \
        --num-iters 5 --num-iters-warmup 2 --json "$OUT/latency_b1.json" 2>&1 | tail -20
      ;;
    throughput)
      log "throughput 1000 x 1024/1024"
      loom --log-level INFO bench throughput --config $CFG --num-prompts 1000 --input-len 1024 \
        --output-len 1024 --json "$OUT/throughput_1000x1024x1024.json" 2>&1 | grep -v "^Processed" | tail -25
      ;;
    compare)
      log "latency batch 1 vs transformers (eager and static compiled)"
      loom --log-level WARNING bench latency --config $CFG --batch-size 1 --input-len 128 --output-len 256 \
        --num-iters 5 --num-iters-warmup 2 --compare hf --hf-num-iters 1 --hf-num-iters-warmup 1 \
        --json "$OUT/latency_b1_vs_hf.json" 2>&1 | tail -20
      log "throughput 512 x 512/256 vs transformers"
      loom --log-level WARNING bench throughput --config $CFG --num-prompts 512 --input-len 512 \
        --output-len 256 --compare hf --hf-batch-size 256 --json "$OUT/throughput_512x512x256_vs_hf.json" 2>&1 | tail -20
      ;;
    quant)
      log "quant kernels"
      timeout 240 python3 benchmarks/kernels_quant.py --json "$OUT/kernels_quant_h200.json" 2>&1 | tail -45
      ;;
    attn-setup)
      # FlashInfer and FlashAttention from the carried .gpu/ (benchmarks/attention_packages/).
      log attn-setup
      source benchmarks/attention_packages/install.sh
      if ! python3 -c "import torch, flash_attn_2_cuda" 2>/dev/null; then   # build in the background
        (python3 benchmarks/attention_packages/build_flash_attn.py /tmp/flash_attn-2.8.3.post2 \
          /tmp/fa-build && cp /tmp/fa-build/flash_attn_2_cuda*.so "$site/") > "$OUT/fa_build.log" 2>&1 &
        FA_BUILD=$!
      fi
      python3 -c "import flashinfer; print('flashinfer', flashinfer.__version__)"
      loom plugins 2>&1 | grep -A2 "attention_flash"
      ;;
    attn-test)
      log "attention backends: conformance kit and engine tests"
      for b in flashinfer flash_attn; do
        if [ $b = flash_attn ] && [ -n "${FA_BUILD:-}" ]; then wait $FA_BUILD; tail -3 "$OUT/fa_build.log"; FA_BUILD=; fi
        python3 -m pytest -q -p no:cacheprovider --pyargs loom.testing --loom-attention $b \
          --loom-platform cuda 2>&1 | tail -6 | tee "$OUT/kit_$b.log"
      done
      python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_attention_backends.py 2>&1 \
        | tail -8 | tee "$OUT/gpu_attention_backends.log"
      ;;
    attn-kernels)
      log "attention kernels: triton vs flashinfer vs flash_attn"
      python3 benchmarks/attention_backends.py --out "$OUT/attention_backends_h200.json" 2>&1 | tail -45
      ;;
    attn-e2e)
      for b in ${ATTN_BACKENDS:-triton flashinfer flash_attn}; do
        log "throughput 1000 x 1024/1024, attention-backend $b"
        loom --log-level INFO bench throughput --config $CFG --attention-backend $b --num-prompts 1000 \
          --input-len 1024 --output-len 1024 --json "$OUT/throughput_$b.json" 2>&1 \
          | grep -v "^Processed" | grep -i "throughput\|tok/s\|error\|blocks\|captured" | tail -8
        log "latency batch 1, 128 in / 256 out, attention-backend $b"
        loom --log-level WARNING bench latency --config $CFG --attention-backend $b --batch-size 1 \
          --input-len 128 --output-len 256 --num-iters 5 --num-iters-warmup 2 \
          --json "$OUT/latency_b1_$b.json" 2>&1 | tail -6
      done
      ;;
    attn-keep)
      # What the next lease restores instead of rebuilding: the extension and FlashInfer's JIT.
      cp "$site"/flash_attn_2_cuda*.so "$OUT/" 2>/dev/null
      (cd "$FLASHINFER_WORKSPACE_BASE" && python3 -c "
import pathlib, tarfile
with tarfile.open('$OUT/flashinfer-jit.tar.xz', 'w:xz') as t:
    for p in pathlib.Path('.').rglob('*.so'):
        t.add(p)")
      ls -la "$OUT"
      ;;
    serve)
      # Needs fastapi/uvicorn/pydantic and pyzmq there: carry .whl (README of the device tool;
      # pyzmq: pip download ... --platform manylinux_2_28_x86_64 -d .whl pyzmq==27.3.0).
      # SERVE_MODES="process thread" also measures the engine core in a thread, as before.
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
      for mode in ${SERVE_MODES:-process}; do
        log "loom serve (engine core in a $mode) + bench serve, 1000 x 1024/128, unlimited rate"
        loom --log-level WARNING serve --config $CFG --port 8011 --engine-core $mode \
          > "$OUT/serve_$mode.log" 2>&1 &
        server=$!
        for _ in $(seq 180); do curl -sf localhost:8011/health > /dev/null && break; sleep 1; done
        name=serve_1000x1024x128; [ $mode = process ] || name=serve_${mode}_1000x1024x128
        loom bench serve --port 8011 --num-prompts 1000 --input-len 1024 --output-len 128 \
          --json "$OUT/$name.json" 2>&1 | tail -15
        kill -TERM $server; wait $server
      done
      log "bench throughput, the same workload"
      loom --log-level WARNING bench throughput --config $CFG --num-prompts 1000 --input-len 1024 \
        --output-len 128 --json "$OUT/throughput_1000x1024x128.json" 2>&1 | grep -v "^Processed" | tail -6
      ;;
    fp8-kernels)
      log "attention kernels: triton over a bf16 cache and an fp8 cache (fp16 vs cast conversion, sweep)"
      python3 benchmarks/attention_backends.py --backends triton --fp8 \
        --out "$OUT/attention_triton_fp8_h200.json" 2>&1 | tail -40
      ;;
    profile)
      # PROFILE_BATCHES="1 64": decode-step kernel time by kernel (benchmarks/decode_profile.py).
      for b in ${PROFILE_BATCHES:-1}; do
        log "decode profile batch $b ${PROFILE_SET:-}"
        python3 benchmarks/decode_profile.py --config $CFG --batch-size $b --set ${PROFILE_SET:-} ${PROFILE_FLAGS:-} \
          --json "$OUT/decode_profile_b${b}${PROFILE_TAG:-}.json" 2>&1 | grep -v "^\[\|USDT" | tail -32
      done
      ;;
    ncu-gemv)
      # Hardware counters of the four native int4 GEMVs of a Llama-3-8B layer (one launch each).
      log "ncu: native int4 GEMVs"
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
      (cd benchmarks && timeout ${NCU_TIMEOUT:-180} $NCU --clock-control none -k regex:int4_gemv --launch-skip 8 \
        --launch-count 4 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        --section LaunchStats --section WarpStateStats --section SchedulerStats \
        python3 native_gemv_once.py) > "$OUT/ncu_gemv.txt" 2>&1
      grep -E "int4_gemv|Duration|DRAM Throughput|Memory Throughput|L2 Hit|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Issued Ipc|No Eligible|Block Limit" \
        "$OUT/ncu_gemv.txt" | head -80
      ;;
    tput)
      # TPUT_VARIANTS: name:flags;... e.g. "bf16:;kvfp8:--kv-cache-dtype fp8"
      IFS=';' read -ra variants <<< "${TPUT_VARIANTS:-bf16:}"
      for v in "${variants[@]}"; do
        name=${v%%:*}; flags=${v#*:}
        log "throughput 1000 x 1024/1024 [$name] $flags"
        loom --log-level INFO bench throughput --config $CFG $flags --num-prompts 1000 \
          --input-len 1024 --output-len 1024 --json "$OUT/throughput_$name.json" 2>&1 \
          | grep -v "^Processed" | grep -i "throughput\|tok/s\|error\|blocks\|captured\|weights\|Traceback" | tail -10
      done
      ;;
    native)
      # Build csrc/ (or load the carried build), run its GPU tests and the GEMV tests beside it.
      log "native kernels: build"
      /usr/bin/time -f "build %e s" python3 -c "from loom.csrc import load; load('wna16_gemv')" 2>&1 | tail -5
      tar -czf "$OUT/ext.tar.gz" .ext 2>/dev/null
      log "native kernels: GPU tests"
      python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_wna16_gemv_native.py \
        tests/test_wna16_gemv.py tests/test_quant_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests_native.log"
      ;;
    quant-gemv)
      # The W4A16/W8A16 GEMV sweep at decode rows (GEMV_LINEARS: which linears).
      log "quant GEMV sweep: ${GEMV_LINEARS:-qkv o_proj gate_up down}"
      timeout ${GEMV_TIMEOUT:-300} python3 benchmarks/kernels_quant.py --gemv-only --rows ${GEMV_ROWS:-1} \
        --linears ${GEMV_LINEARS:-qkv o_proj gate_up down} ${GEMV_CONFIGS:+--configs $GEMV_CONFIGS} \
        ${GEMV_METHODS:+--gemv-methods "$GEMV_METHODS"} --json "$OUT/kernels_quant_gemv_h200${GEMV_TAG:-}.json" 2>&1 | tail -${GEMV_TAIL:-40}
      ;;
    fp8-gemm)
      log "fp8 GEMM variants (_scaled_mm orientation, fast accumulation) vs bf16"
      timeout 240 python3 benchmarks/kernels_fp8_gemm.py --json "$OUT/kernels_fp8_gemm_h200.json" 2>&1 | tail -20
      ;;
    quant-latency)
      # Batch-1 decode of 4-bit GPTQ and AWQ (Llama-3-8B shape, random weights) against bf16.
      # QUANT_LATENCY: configs, each optionally with environment settings after a colon
      # (comma-separated), e.g. "llama3-8b-gptq:LOOM_NATIVE_PDL=0"; results tagged by them.
      for v in ${QUANT_LATENCY:-llama3-8b llama3-8b-gptq llama3-8b-awq}; do
        c=${v%%:*}; envs=; [ "$v" != "$c" ] && envs=${v#*:}
        tag=$c${envs:+_$(echo "$envs" | tr ',=' '__')}
        log "latency batch 1, 128 in / 256 out: $c ${envs}"
        env ${envs//,/ } loom --log-level WARNING bench latency --config configs/$c.yaml --batch-size 1 \
          --input-len 128 --output-len 256 --num-iters 3 --num-iters-warmup 1 \
          --json "$OUT/latency_b1_$tag.json" 2>&1 | tail -5
      done
      ;;
    ablation)
      # In-graph cost of the decode step's parts at batch 1 (benchmarks/decode_ablation.py);
      # ABLATION_ARGS: more arguments, e.g. --variants full --settings default K=V.
      for c in ${ABLATION_CONFIGS:-llama3-8b-gptq llama3-8b}; do
        log "decode ablation: $c ${ABLATION_ARGS:-}"
        python3 benchmarks/decode_ablation.py --config configs/$c.yaml ${ABLATION_ARGS:-} \
          --json "$OUT/decode_ablation_$c.json" 2>&1 | grep -v "^\[" | tail -60
      done
      ;;
    *) echo "unknown phase $phase"; exit 2 ;;
  esac
done
