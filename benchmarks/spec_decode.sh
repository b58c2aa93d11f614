#!/usr/bin/env bash
# Speculative decoding on the H200, Llama-3-8B shapes with random weights (issue 7). Run from
# the repository root after `bash benchmarks/h200.sh install`:
#   bash benchmarks/spec_decode.sh PHASE [PHASE ...]
# Phases: test (pytest -m gpu on speculative decoding), oracle (k = 2, 4, 8 x acceptance 1.0,
# 0.7, 0.4, 0.0 against plain decoding), ngram (prompts that end on the model's own greedy
# trajectory), draft (a Llama-3.2-1B-shaped draft, random weights: acceptance ~0, its cost).
# JSON results go to $OUT and benchmarks/results/. Batch sizes: SPEC_BATCH_SIZES (default 1).
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" benchmarks/results
CFG=configs/llama3-8b.yaml
BATCHES=${SPEC_BATCH_SIZES:-1}
# Few graph sizes and sequences: one engine per k starts quickly.
COMMON=(--config $CFG --batch-size $BATCHES --input-len 128 --output-len 256 --num-iters 3
        --num-iters-warmup 1 --max-num-seqs 16 --cuda-graph-sizes 1 2 4 8 16)
log() { echo "=== $* ($(date +%T))"; }
save() { cp "$OUT/$1" "benchmarks/results/$1" 2>/dev/null; }

for phase in "$@"; do
  case $phase in
    test)
      log "pytest -m gpu (speculative decoding)"
      python3 -m pytest -m gpu -q -x -p no:cacheprovider tests/test_gpu_spec_decode.py 2>&1 | tail -15
      ;;
    oracle)
      log "oracle: k 2 4 8 x acceptance 1.0 0.7 0.4 0.0, batch $BATCHES, 128 in / 256 out"
      loom --log-level WARNING bench latency "${COMMON[@]}" \
        --speculative '{method: oracle, num-speculative-tokens: 4, force-path: true}' \
        --spec-k 2 4 8 --spec-acceptance-rate 1.0 0.7 0.4 0.0 \
        --json "$OUT/spec_oracle_llama3-8b.json" 2>&1 | tail -20
      save spec_oracle_llama3-8b.json
      ;;
    ngram)
      log "ngram: k 2 4 8 on self-repeating prompts"
      loom --log-level WARNING bench latency "${COMMON[@]}" --spec-prompts self-repeat \
        --speculative '{method: ngram, num-speculative-tokens: 4, prompt-lookup-min: 2, prompt-lookup-max: 5}' \
        --spec-k 2 4 8 --json "$OUT/spec_ngram_llama3-8b.json" 2>&1 | tail -8
      save spec_ngram_llama3-8b.json
      ;;
    draft)
      log "draft model of Llama-3.2-1B shape (dummy weights): k 2 4"
      loom --log-level WARNING bench latency "${COMMON[@]}" \
        --speculative '{method: draft, model: configs/llama3.2-1b, num-speculative-tokens: 4}' \
        --spec-k 2 4 --json "$OUT/spec_draft1b_llama3-8b.json" 2>&1 | tail -8
      save spec_draft1b_llama3-8b.json
      ;;
    *) echo "unknown phase $phase"; exit 2 ;;
  esac
done
